"""Command-line video generation.

  python -m helios_jax.generate --model_dir Helios-Distilled --prompt "..." --num_frames 240 \
      --out out.mp4
  python -m helios_jax.generate --out outputs/demo.mp4     # embedded tiny random model (CPU ok)
  python -m helios_jax.generate --model_dir DIR --image first.jpg --prompt "..."       # I2V
  python -m helios_jax.generate --model_dir DIR --video clip.mp4 --prompt "..."        # V2V
  python -m helios_jax.generate --model_dir DIR --interpolate_prompts \
      --prompt "a calm sea" --prompt "a storm at sea" --num_frames 1452                # interactive

Writes an mp4 at 24 fps (atomically: nothing is written when generation fails) and prints the
per-chunk time (DiT and VAE decode) and the end-to-end FPS. Defaults follow the official
`infer_helios.py` scripts (seed 42, 384x640, its long negative prompt, steps and guidance per
model type from the checkpoint). Without `--model_dir`, a tiny random pipeline (`presets.py`) is
built once into the helios-jax cache and run at 128x128.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "pipeline folder (diffusers layout or our Orbax export); "
                    "omitted: embedded tiny random preset")
flags.DEFINE_enum("tiny_model", "distilled", ["base", "mid", "distilled"],
                  "which tiny preset to run when --model_dir is omitted")
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
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "transformer/text encoder dtype")
flags.DEFINE_bool("interpolate_prompts", False, "interactive prompt switching (sampling.md §6)")
flags.DEFINE_integer("interpolate_time", 7, "chunks per prompt (interactive)")
flags.DEFINE_integer("interpolation_steps", 3, "chunks blending one prompt into the next")
flags.DEFINE_bool("amplify_first_chunk", None, "DMD: double chunk 0's steps (default on)")
flags.DEFINE_bool("skip_first_chunk", False, "re-anchor on chunk 1 (is_skip_first_chunk)")
flags.DEFINE_bool("use_zero_init", True, "CFG-Zero* zero-init (Mid)")
flags.DEFINE_integer("zero_steps", 1, "CFG-Zero* zero-init steps")
flags.DEFINE_bool("text_encoder_on_cpu", False, "run umT5 on the host CPU (saves GPU memory)")
flags.DEFINE_bool("release_text_encoder", False, "free umT5 after encoding the prompts")
flags.DEFINE_bool("compile_cache", True, "persist compiled programs in the helios-jax cache")


def tiny_model_dir(model: str) -> str:
  """The embedded tiny pipeline, written once into the cache."""
  from helios_jax import presets, runtime  # pylint: disable=g-import-not-at-top
  path = os.path.join(runtime.cache_dir("presets"), f"tiny-{model}-v1")
  if not os.path.isdir(path):
    print(f"building the embedded tiny '{model}' pipeline in {path} (once)")
    presets.write_tiny_pipeline(path, model, seed=0)
  return path


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from helios_jax import media, runtime  # pylint: disable=g-import-not-at-top
  from helios_jax.pipeline import DEFAULT_NEGATIVE_PROMPT, Pipeline  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-load INFO lines out of the output
  if FLAGS.compile_cache:
    runtime.enable_compilation_cache()
  tiny = FLAGS.model_dir is None
  model_dir = tiny_model_dir(FLAGS.tiny_model) if tiny else FLAGS.model_dir
  height = FLAGS.height or (128 if tiny else 384)
  width = FLAGS.width or (128 if tiny else 640)
  prompts = FLAGS.prompt or ["A train window time-lapse of fields, towns and rivers passing by."]
  dtype = jnp.float32 if (tiny or FLAGS.dtype == "float32") else jnp.bfloat16
  t0 = time.perf_counter()
  try:
    pipe = Pipeline.from_pretrained(
        model_dir, dtype, text_encoder_device=jax.devices("cpu")[0] if FLAGS.text_encoder_on_cpu
        else None, release_text_encoder=FLAGS.release_text_encoder)
    print(f"loaded {model_dir} in {time.perf_counter() - t0:.1f} s "
          f"({'pyramid' if pipe.is_pyramid else 'single-resolution'} "
          f"{pipe.scheduler.solver}, backend {jax.default_backend()})")
    steps = None if FLAGS.steps is None else [int(s) for s in FLAGS.steps]
    t0 = time.perf_counter()
    chunks = list(pipe.stream(
        prompts if len(prompts) > 1 else prompts[0],
        DEFAULT_NEGATIVE_PROMPT if FLAGS.negative_prompt is None else FLAGS.negative_prompt,
        image=FLAGS.image, video=FLAGS.video, num_frames=FLAGS.num_frames, height=height,
        width=width, steps=steps, guidance_scale=FLAGS.guidance_scale, seed=FLAGS.seed,
        use_zero_init=FLAGS.use_zero_init, zero_steps=FLAGS.zero_steps,
        amplify_first_chunk=FLAGS.amplify_first_chunk,
        is_skip_first_chunk=FLAGS.skip_first_chunk,
        interpolate_prompts=FLAGS.interpolate_prompts,
        interpolate_time=FLAGS.interpolate_time,
        interpolation_steps=FLAGS.interpolation_steps))
    wall = time.perf_counter() - t0
  except (ValueError, FileNotFoundError, FloatingPointError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from helios_jax import sampling  # pylint: disable=g-import-not-at-top
  frames = np.concatenate([c.frames for c in chunks], axis=1)
  frames = frames[:, :sampling.output_frames(len(chunks))]
  root, ext = os.path.splitext(FLAGS.out)
  paths = []
  for b in range(frames.shape[0]):
    path = FLAGS.out if frames.shape[0] == 1 else f"{root}_{b}{ext or '.mp4'}"
    paths.append(media.write_video(path, frames[b], fps=FLAGS.fps))
  print(f"{'chunk':>5} {'DiT s':>8} {'decode s':>9}")
  for c in chunks:
    print(f"{c.index:>5} {c.dit_seconds:>8.2f} {c.decode_seconds:>9.2f}")
  # Chunk 0 (and chunk 1 after an amplified chunk 0) include compilation.
  steady = chunks[2:] or chunks[-1:]
  per_chunk = float(np.mean([c.dit_seconds + c.decode_seconds for c in steady]))
  print(f"{frames.shape[1]} frames of {height}x{width} in {wall:.1f} s (incl. compile): "
        f"{frames.shape[1] / wall:.2f} FPS end to end; steady state (chunks >= "
        f"{steady[0].index}) {per_chunk:.2f} s/chunk = {33 / per_chunk:.2f} FPS")
  for p in paths:
    print(f"wrote {p}")
  return 0


if __name__ == "__main__":
  app.run(main)
