"""Command-line video generation.

  python -m helios_jax.generate --model_dir Helios-Distilled --prompt "..." --num_frames 240 \
      --out out.mp4
  python -m helios_jax.generate --out outputs/demo.mp4     # embedded tiny random model (CPU ok)
  python -m helios_jax.generate --model_dir DIR --image first.jpg --prompt "..."       # I2V
  python -m helios_jax.generate --model_dir DIR --video clip.mp4 --prompt "..."        # V2V
  python -m helios_jax.generate --model_dir DIR --lora my_lora.safetensors:0.8 \
      --lora checkpoint-2000/model_ema --prompt "..."           # LoRA(s) fused at load
  python -m helios_jax.generate --model_dir DIR --quantize fp8 --prompt "..."  # PTQ on load
  python -m helios_jax.generate --model_dir CONVERTED --prompt "..."   # `convert --quantize` output
  python -m helios_jax.generate --model_dir DIR --interpolate_prompts \
      --prompt "a calm sea" --prompt "a storm at sea" --interpolate_time 22 \
      --num_frames 1452                                                               # interactive

Frames: video is made in 33-frame chunks, K = ceil(num_frames / 33), and the decoded
33K frames are trimmed to 1 + 4k (the VAE's causal grid): --num_frames 40 gives 2 chunks and
65 frames. The plan is printed before the work starts.

Interactive schedule (--interpolate_prompts, as the official `infer_helios.py`): prompt j is
shown for --interpolate_time chunks (cumulative ends t, 2t, ...); the first
--interpolation_steps chunks of prompt j > 0 blend prompt j-1 into j (weights linspace(0, 1)).
K is raised to cover every prompt (2 prompts x 7 chunks = 14 chunks = 461 frames even for
--num_frames 66); chunks past the last prompt's end fall back to prompt 0 without a blend (as
upstream), so choose --interpolate_time x prompts = K for a clean video (the example: 2 x 22 =
44 chunks = 1452 frames).

The mp4 (24 fps) is written chunk by chunk to a hidden temporary file and renamed when
complete; on failure nothing is left (--keep_partial keeps what was finished). Arguments are
checked before any weights load. Prints the per-chunk time (DiT and VAE decode), the
end-to-end FPS and, when there are chunks past compilation, the steady-state FPS. Defaults
follow the official `infer_helios.py` scripts (seed 42, 384x640, its long negative prompt,
steps and guidance per model type from the checkpoint). Without `--model_dir`, a tiny random
pipeline (`presets.py`) is built once into the helios-jax cache and run at 128x128. Logs are
quiet; --verbosity=0 shows INFO lines.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import flags
import numpy as np

from helios_jax import presets
from helios_jax import runtime
from helios_jax import variants
from helios_jax.checkpoint import CheckpointError
from helios_jax.config import ConfigError
from helios_jax.constants import CHUNK_FRAMES

FLAGS = flags.FLAGS
runtime.define_model_flags()  # --model_dir, --tiny_model, --dtype, --text_encoder_on_cpu, ...
flags.DEFINE_multi_string("prompt", None, "prompt (repeat for a batch, or for the prompt "
                          "sequence with --interpolate_prompts)")
flags.DEFINE_string("negative_prompt", None, "negative prompt (default: the official scripts')")
flags.DEFINE_string("image", None, "I2V: conditioning image")
flags.DEFINE_string("video", None, "V2V: conditioning video (>= 33 frames)")
flags.DEFINE_integer("num_frames", 99, "frames to generate (rounded up to 33-frame chunks, "
                     "then trimmed to 1 + 4k)")
flags.DEFINE_integer("height", None, "pixels, multiple of 16 (64 for pyramid models); "
                     "default 384 (128 for the tiny preset)")
flags.DEFINE_integer("width", None, "pixels; default 640 (128 for the tiny preset)")
flags.DEFINE_list("steps", None, "Base: one number; pyramid: steps per stage, e.g. 2,2,2")
flags.DEFINE_float("guidance_scale", None, "CFG scale (default 5.0; distilled 1.0)")
flags.DEFINE_integer("seed", 42, "random seed")
flags.DEFINE_string("out", "outputs/helios.mp4", "output mp4 path")
flags.DEFINE_integer("fps", 24, "frame rate of the written mp4")
flags.DEFINE_bool("interpolate_prompts", False, "interactive prompt switching (sampling.md §6)")
flags.DEFINE_integer("interpolate_time", 7, "chunks per prompt (interactive)")
flags.DEFINE_integer("interpolation_steps", 3, "chunks blending one prompt into the next")
flags.DEFINE_bool("amplify_first_chunk", None, "DMD: double chunk 0's steps (default on)")
flags.DEFINE_bool("skip_first_chunk", False, "re-anchor on chunk 1 (is_skip_first_chunk)")
flags.DEFINE_bool("use_zero_init", True, "CFG-Zero* zero-init (Mid)")
flags.DEFINE_integer("zero_steps", 1, "CFG-Zero* zero-init steps")
flags.DEFINE_multi_string("lora", None, "PATH[:SCALE] of a diffusers/PEFT LoRA "
                          "(.safetensors), a partial-parameter file (.pth) or a folder with "
                          "both, fused into the DiT at load (repeat to stack adapters)")
flags.DEFINE_bool("keep_partial", False, "on failure or Ctrl-C keep the chunks finished so far "
                  "as <out stem>.partial.mp4 (default: nothing is left)")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from helios_jax import media, runtime, sampling  # pylint: disable=g-import-not-at-top
  from helios_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  tiny = FLAGS.model_dir is None
  default_height, default_width = variants.get_size("tiny" if tiny else "helios-14b").resolution
  height = FLAGS.height or default_height
  width = FLAGS.width or default_width
  prompts = FLAGS.prompt or ["A train window time-lapse of fields, towns and rivers passing by."]
  batch = 1 if FLAGS.interpolate_prompts else len(prompts)
  root, ext = os.path.splitext(FLAGS.out)
  paths = [FLAGS.out if batch == 1 else f"{root}_{b}{ext or '.mp4'}" for b in range(batch)]
  # Everything that can be checked without weights is checked before loading them.
  try:
    if FLAGS.num_frames < 1:
      raise ValueError(f"--num_frames={FLAGS.num_frames} must be >= 1")
    try:
      steps = None if FLAGS.steps is None else [int(s) for s in FLAGS.steps]
    except ValueError:
      raise ValueError(f"--steps={','.join(FLAGS.steps)} must be integers, e.g. 2,2,2") from None
    loras = [lora_lib.parse_lora_arg(a) for a in FLAGS.lora or ()]
    lora_lib.check_entries(loras)
    model_dir = presets.tiny_pipeline_dir(FLAGS.tiny_model) if tiny else FLAGS.model_dir
    scheduler, flags_, dit_cfg = pipeline_lib.read_pipeline_settings(model_dir)
    pipeline_lib.check_model_options(
        model_dir, quantize=FLAGS.quantize, keep_blocks=FLAGS.keep_blocks,
        low_memory=FLAGS.low_memory, lora=loras,
        dtype="float32" if FLAGS.dtype == "float32" else None)
    sc = pipeline_lib.make_sampler_config(  # validates; the run's own settings
        scheduler, flags_, dit_cfg.patch_size, height, width, steps=steps,
        guidance_scale=FLAGS.guidance_scale, use_zero_init=FLAGS.use_zero_init,
        zero_steps=FLAGS.zero_steps, amplify_first_chunk=FLAGS.amplify_first_chunk)
    k_total, plan = sampling.num_chunks(FLAGS.num_frames), None
    if FLAGS.interpolate_prompts:
      k_total, plan = pipeline_lib.interactive_schedule(
          k_total, len(prompts), FLAGS.interpolate_time, FLAGS.interpolation_steps)
    if FLAGS.image is not None:
      media.load_image(FLAGS.image, height, width)
    if FLAGS.video is not None:
      n = len(media.read_video_frames(FLAGS.video))
      if n < CHUNK_FRAMES:
        raise ValueError(f"--video {FLAGS.video} has {n} frames; V2V needs at least "
                         f"{CHUNK_FRAMES}")
    for path in paths:
      runtime.check_writable(path)
  except (ValueError, RuntimeError, FileNotFoundError, OSError, ConfigError,
          CheckpointError) as e:  # RuntimeError: what this platform cannot run
    print(f"error: {e}", file=sys.stderr)
    return 2
  for line in pipeline_lib.describe_plan(k_total, FLAGS.num_frames, batch, height, width,
                                         plan):
    print(line)
  if FLAGS.compile_cache:
    runtime.enable_compilation_cache()
  dtype = jnp.float32 if (tiny or FLAGS.dtype == "float32") else jnp.bfloat16
  kept = sampling.output_frames(k_total)
  writers = [media.VideoWriter(p, fps=FLAGS.fps, keep_partial=FLAGS.keep_partial)
             for p in paths]
  chunks = []
  t0 = time.perf_counter()
  try:
    pipe = pipeline_lib.Pipeline.from_pretrained(model_dir, dtype, lora=loras or None,
                                                 **runtime.model_load_kwargs())
    print(f"loaded {model_dir} in {time.perf_counter() - t0:.1f} s "
          f"({'pyramid' if pipe.is_pyramid else 'single-resolution'} "
          f"{pipe.scheduler.solver}, backend {jax.default_backend()})")
    t0 = time.perf_counter()
    for c in pipe.stream(
        prompts if len(prompts) > 1 else prompts[0],
        pipeline_lib.DEFAULT_NEGATIVE_PROMPT if FLAGS.negative_prompt is None
        else FLAGS.negative_prompt,
        image=FLAGS.image, video=FLAGS.video, num_frames=FLAGS.num_frames, height=height,
        width=width, steps=steps, guidance_scale=FLAGS.guidance_scale, seed=FLAGS.seed,
        use_zero_init=FLAGS.use_zero_init, zero_steps=FLAGS.zero_steps,
        amplify_first_chunk=FLAGS.amplify_first_chunk,
        is_skip_first_chunk=FLAGS.skip_first_chunk,
        interpolate_prompts=FLAGS.interpolate_prompts,
        interpolate_time=FLAGS.interpolate_time,
        interpolation_steps=FLAGS.interpolation_steps):
      keep = min(c.frames.shape[1], kept - c.index * CHUNK_FRAMES)
      for b, writer in enumerate(writers):  # appended as soon as the chunk exists
        writer.write(c.frames[b, :keep])
      chunks.append(dataclasses.replace(c, frames=None))
    wall = time.perf_counter() - t0
    for writer in writers:
      writer.close()
  except (ValueError, FileNotFoundError, FloatingPointError, OSError, ConfigError,
          CheckpointError, KeyboardInterrupt) as e:
    kept_paths = [p for p in (w.abort() for w in writers) if p]
    reason = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
    print(f"error: {reason}", file=sys.stderr)
    for p in kept_paths:
      print(f"kept the {len(chunks)} finished chunk(s) in {p}", file=sys.stderr)
    return 130 if isinstance(e, KeyboardInterrupt) else 2
  print(f"{'chunk':>5} {'DiT s':>8} {'decode s':>9}")
  for c in chunks:
    print(f"{c.index:>5} {c.dit_seconds:>8.2f} {c.decode_seconds:>9.2f}")
  print(f"{kept} frames of {height}x{width} in {wall:.1f} s (incl. compile): "
        f"{kept / wall:.2f} FPS end to end")
  # Chunk 0 compiles the chunk program (an amplified DMD chunk 0 compiles its own, so chunk 1
  # compiles again); steady state starts after those.
  first_steady = 2 if sc.amplified(True) else 1
  steady = chunks[first_steady:]
  if steady:
    per_chunk = float(np.mean([c.dit_seconds + c.decode_seconds for c in steady]))
    print(f"steady state (chunks >= {first_steady}): {per_chunk:.2f} s/chunk = "
          f"{CHUNK_FRAMES / per_chunk:.2f} FPS")
  else:
    print(f"steady state: n/a (every one of the {len(chunks)} chunk(s) included compilation; "
          f"generate at least {first_steady + 1} chunks to measure it)")
  for p in paths:
    print(f"wrote {p}")
  return 0


if __name__ == "__main__":
  runtime.run_cli(main)
