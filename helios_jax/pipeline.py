"""Helios text/image/video-to-video generation: the user-facing `Pipeline`.

  pipe = Pipeline.from_pretrained("Helios-Distilled", dtype=jnp.bfloat16)
  out = pipe.generate("A train window time-lapse ...", num_frames=240, seed=42)
  out.frames              # [T, H, W, 3] uint8 (one prompt) or [B, T, H, W, 3]
  for chunk in pipe.stream("...", num_frames=1452):   # 33 decoded frames as soon as they exist
    show(chunk.frames)

Equivalent to diffusers' `HeliosPipeline` (Base) / `HeliosPyramidPipeline` (Mid, Distilled)
chunk for chunk (spec sampling.md), with one jitted program per chunk kind (`chunk_step`:
the whole pyramid sampler of a chunk + the history update) and one per decode. Every random draw
can be injected (`noise=`) in the reference's order (sampling.md §9) to replay its draws.

diffusers users can call the pipeline as `HeliosPipeline` / `HeliosPyramidPipeline`, with the same
argument names (`Pipeline.__call__`; differences listed there):

  out = pipe("A cat ...", num_frames=99, pyramid_num_inference_steps_list=[2, 2, 2],
             generator=42, output_type="np")      # out.frames [B, T, H, W, 3] in [0, 1]

The replayable random draws (`noise=`) are listed, with their order, in `NOISE_KEYS`.

Underneath, `Pipeline.generate_fn(...)` returns a single jitted pure function
`generate_fn(params, inputs, rng)` that runs the same per-chunk programs (`chunk_noise` draws,
`chunk_step`, `decode_step`) over all chunks with `jax.lax.scan` (for notebooks).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import schedulers as hs
from helios_jax import sampling
from helios_jax import sharding
from helios_jax import variants
from helios_jax.checkpoint import CheckpointError
from helios_jax.config import ConfigError
from helios_jax.config import HeliosTransformerConfig
from helios_jax.constants import CHUNK_FRAMES

# The official scripts' negative prompt (infer_helios.py); diffusers' API default is "".
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people in "
    "the background, walking backwards")
COND_SIGMA_RANGE = (0.111, 0.135)

# The `noise=` replay dict of `Pipeline.generate` / `stream` / `__call__` /
# `prepare_conditioning`: the reference's random draws, injected in place of fresh JAX draws so a
# run reproduces a PyTorch run (spec sampling.md §9). Keys are listed in diffusers 0.42.1's draw
# order (conditioning first, then per chunk); shapes are the reference's torch layouts
# (channel-first latents `[B, 16, T, h, w]`, h = height / 8, w = width / 8; uniforms are the raw
# U[0, 1) draws before the scaling to the sigma range). Draws not given are drawn from the run's
# key; a key not in this table, a key of another task, or a draw of the wrong shape is an error.
#   key: (tasks, shape, what it is)
NOISE_KEYS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "image_posterior": (("i2v",), "[B, 16, 1, h, w]",
                        "1. VAE posterior eps of the image"),
    "fake_posterior": (("i2v",), "[B, 16, 9, h, w]",
                       "2. VAE posterior eps of the image repeated to 33 frames (the last latent "
                       "frame is the fake history frame)"),
    "image_uniform": (("i2v",), "[1]", "3. U[0, 1) of the anchor's sigma (image_noise_sigma_*)"),
    "image_eps": (("i2v",), "[B, 16, 1, h, w]", "4. the anchor's noise"),
    "fake_uniform": (("i2v",), "[1]",
                     "5. U[0, 1) of the fake frame's sigma (video_noise_sigma_*)"),
    "fake_eps": (("i2v",), "[B, 16, 1, h, w]", "6. the fake frame's noise"),
    "first_posterior": (("v2v",), "[B, 16, 1, h, w]",
                        "1. VAE posterior eps of the video's first frame"),
    "block_posteriors": (("v2v",), "n x [B, 16, 9, h, w]",
                         "2. VAE posterior eps of each of the n trailing 33-frame blocks"),
    "anchor_uniform": (("v2v",), "[1]", "3. U[0, 1) of the anchor's sigma (image_noise_sigma_*)"),
    "anchor_eps": (("v2v",), "[B, 16, 1, h, w]", "4. the anchor's noise"),
    "block_uniforms": (("v2v",), "n x [9]",
                       "5. per block i: U[0, 1) per latent frame (video_noise_sigma_*), drawn "
                       "before block_eps[i]"),
    "block_eps": (("v2v",), "n x [B, 16, 9, h, w]", "6. per block i: its noise"),
    "chunks": (("t2v", "i2v", "v2v"), "K entries",
               "then per chunk k (K = chunks generated): a `sampling.ChunkNoise`, or a dict with "
               "'eps' [B, 16, 9, h, w] (the chunk's initial noise) and 'block' (pyramid only: "
               "one raw draw [B*16*9*(h_s/2)*(w_s/2), 4] per stage s = 1..S-1, h_s = stage s's "
               "latent height)"),
}
CHUNK_NOISE_KEYS = ("eps", "block")
# What `callback_on_step_end` may read and replace (diffusers' `_callback_tensor_inputs`).
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")


def check_noise(noise: dict[str, Any] | None, task: str) -> dict[str, Any]:
  """Validates the keys of a `noise=` replay dict (`NOISE_KEYS`) for a task.

  Args:
    noise: the dict, or None.
    task: 't2v' | 'i2v' | 'v2v'.

  Returns:
    A copy of the dict ({} for None).

  Raises:
    ValueError: naming a key that is unknown (with the closest known keys) or belongs to
      another task.
  """
  import difflib  # pylint: disable=g-import-not-at-top
  if noise is None:
    return {}
  if not isinstance(noise, dict):
    raise TypeError(f"noise must be a dict (keys: NOISE_KEYS), got {type(noise).__name__}")
  for key in noise:
    if key not in NOISE_KEYS:
      close = difflib.get_close_matches(str(key), list(NOISE_KEYS), n=3)
      hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
      raise ValueError(f"noise[{key!r}] is not a known draw{hint} (known: "
                       f"{', '.join(NOISE_KEYS)}; see pipeline.NOISE_KEYS)")
    tasks = NOISE_KEYS[key][0]
    if task not in tasks:
      raise ValueError(f"noise[{key!r}] belongs to {'/'.join(t.upper() for t in tasks)} runs, "
                       f"but this run is {task.upper()} (its keys: "
                       f"{', '.join(k for k, v in NOISE_KEYS.items() if task in v[0])})")
  return dict(noise)


# ------------------------------------------------------------------------------------------
# Jitted building blocks (pure functions; graphdefs and sampler configs are static).


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("constrain",))
def chunk_step(graphdef: nnx.GraphDef, sc: sampling.SamplerConfig, first_chunk: bool,
               params: nnx.State, text: jax.Array, neg_text: jax.Array | None,
               state: sampling.HistoryState, noise: sampling.ChunkNoise,
               set_anchor: jax.Array, *, constrain: sharding.TokenConstraint | None = None):
  """One chunk: denoise with the history, then shift it into the history.

  `constrain` (static) is the DiT's token constraint on a device mesh (`Pipeline.shard`).

  Returns:
    (new state, chunk latents `[B, 9, h, w, C]` fp32, all-finite flag).
  """
  out = sampling.sample_chunk(graphdef, params, sc, first_chunk, text, neg_text, state, noise,
                              constrain=constrain)
  return sampling.advance(state, out, set_anchor), out.astype(jnp.float32), jnp.isfinite(out).all()


@jax.jit
def _finish_chunk(state: sampling.HistoryState, out: jax.Array, set_anchor: jax.Array):
  """`chunk_step`'s tail for the step-by-step path: (new state, fp32 latents, finite flag)."""
  return sampling.advance(state, out, set_anchor), out.astype(jnp.float32), jnp.isfinite(out).all()


def chunk_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(conditioning key, chunk key) of a video's key: the one derivation behind `stream`,
  `generate` and `generate_fn` (chunk k draws from `chunk_noise(chunk key, k, ...)`)."""
  cond_key, chunk_key = jax.random.split(rng)
  return cond_key, chunk_key


def chunk_noise(chunk_key: jax.Array, k: jax.Array | int, sc: sampling.SamplerConfig,
                batch: int, channels: int) -> sampling.ChunkNoise:
  """Chunk k's draws (`k` may be traced): `draw_chunk_noise` of `fold_in(chunk_key, k)`."""
  return sampling.draw_chunk_noise(jax.random.fold_in(chunk_key, k), sc, batch, channels)


def _denormalize_cl(z: jax.Array, mean: jax.Array, inv_std: jax.Array) -> jax.Array:
  """Channels-last `z / (1/std) + mean` (the pipelines' decode-side de-normalisation)."""
  return z / inv_std.reshape(-1) + mean.reshape(-1)


def to_unit(frames: jax.Array) -> jax.Array:
  """[-1, 1] frames -> [0, 1]: the pipelines' `(x / 2 + 0.5).clamp(0, 1)`."""
  return jnp.clip(frames / 2 + 0.5, 0.0, 1.0)


def to_uint8(frames: jax.Array) -> jax.Array:
  """[-1, 1] frames -> uint8 (`to_unit`, then x 255 rounded), on the device."""
  return jnp.round(to_unit(frames) * 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=(0, 5))
def decode_step(vae_graphdef: nnx.GraphDef, vae_params: nnx.State, latents: jax.Array,
                mean: jax.Array, inv_std: jax.Array, output: str = "raw") -> jax.Array:
  """Normalized chunk latents `[B, 9, h, w, C]` -> frames `[B, 33, H, W, 3]`.

  `output`: "raw" fp32 in [-1, 1], "float" fp32 in [0, 1], "uint8" (converted on the device, so
  only a quarter of the bytes cross to the host).
  """
  from helios_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  z = _denormalize_cl(latents, mean, inv_std)
  video = jnp.moveaxis(vae_lib.decode_latents(vae_graphdef, vae_params, jnp.moveaxis(z, -1, 1)),
                       1, -1)
  return {"raw": lambda v: v, "float": to_unit, "uint8": to_uint8}[output](video)


# ------------------------------------------------------------------------------------------
# Interactive prompt switching (sampling.md §6).


def interactive_schedule(num_chunks: int, num_prompts: int, interpolate_time: int | Sequence[int],
                         interpolation_steps: int = 3) -> tuple[int, list[tuple[int, int, float]]]:
  """Which prompt embedding each chunk uses, as in `infer_helios.py --use_interpolate_prompt`.

  Args:
    num_chunks: K requested.
    num_prompts: P.
    interpolate_time: chunks per prompt (an int or one value per prompt; default 7).
    interpolation_steps: chunks over which prompt j-1 blends into prompt j.

  Returns:
    (K used, [(j_from, j_to, w)] per chunk): embedding = lerp(E[j_from], E[j_to], w).
    K is raised to cumulative-sum(time)[-1] when smaller, so every prompt is shown (the
    official script raises it to the *sum of the cumulative list*, a documented quirk we do not
    reproduce). Chunks past the last prompt fall back to prompt 0 (as upstream).
  """
  times = ([int(interpolate_time)] * num_prompts if np.isscalar(interpolate_time)
           else [int(t) for t in interpolate_time])
  if len(times) != num_prompts:
    raise ValueError(f"interpolate_time has {len(times)} entries for {num_prompts} prompts")
  if min(times) <= interpolation_steps:
    raise ValueError(f"every interpolate_time {times} must exceed interpolation_steps="
                     f"{interpolation_steps}")
  cum = np.cumsum(times)
  k = max(int(num_chunks), int(cum[-1]))
  weights = np.linspace(0.0, 1.0, interpolation_steps) if interpolation_steps > 1 else [1.0]
  plan = []
  for c in range(k):
    later = np.nonzero(c < cum)[0]
    j = int(later[0]) if later.size else 0
    if j == 0:
      plan.append((0, 0, 0.0))
      continue
    q = c - int(cum[j - 1])
    plan.append((j - 1, j, float(weights[q])) if q < interpolation_steps else (j, j, 0.0))
  return k, plan


def describe_plan(k_total: int, num_frames: int, batch: int, height: int, width: int,
               plan: list[tuple[int, int, float]] | None) -> list[str]:
  """What will be generated and why, as lines for a CLI to print before the work starts.

  Args:
    k_total: chunks that will be generated.
    num_frames: frames the user asked for.
    batch: videos.
    height, width: pixels.
    plan: the interactive schedule (`interactive_schedule`), or None.
  """
  kept = sampling.output_frames(k_total)
  why = (f"{num_frames} requested frames -> {k_total} chunk(s) of {CHUNK_FRAMES}"
         if plan is None else f"interactive schedule -> {k_total} chunk(s) of {CHUNK_FRAMES}")
  lines = [f"generating {batch} video(s) of {kept} frames at {height}x{width}: {why}, "
           f"trimmed to {kept} = 1 + 4k frames (the VAE's causal frame grid)"]
  if plan is not None:
    runs, start = [], 0
    for c in range(1, k_total + 1):
      if c == k_total or plan[c] != plan[start]:
        runs.append((start, c - 1, plan[start]))
        start = c
    merged, i = [], 0
    while i < len(runs):  # consecutive blend steps of one prompt pair print as one line
      s0, e0, (a, b, w) = runs[i]
      if a != b:
        ws = [w]
        while i + 1 < len(runs) and runs[i + 1][2][:2] == (a, b):
          i += 1
          e0 = runs[i][1]
          ws.append(runs[i][2][2])
        merged.append(f"  chunks {s0}-{e0}: blend prompt {a} -> {b} "
                      f"(weights {', '.join(f'{x:g}' for x in ws)})")
      else:
        tail = " (past the last prompt: back to prompt 0, as upstream)" if (
            a == 0 and s0 > 0) else ""
        merged.append(f"  chunks {s0}-{e0}: prompt {a}{tail}")
      i += 1
    lines += merged
  if num_frames > kept and plan is None:
    lines.append(f"  note: {num_frames} frames cannot be kept exactly; {kept} are written")
  return lines


def lerp_embeddings(start: jax.Array, end: jax.Array, w: float) -> jax.Array:
  """torch.lerp in bf16 semantics: fp32 opmath, two formulas around w = 0.5, one rounding."""
  a, b = start.astype(jnp.float32), end.astype(jnp.float32)
  w = jnp.float32(w)
  out = jnp.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))
  return out.astype(start.dtype)


# ------------------------------------------------------------------------------------------
# Outputs.


@dataclasses.dataclass
class ChunkOutput:
  """One finished chunk from `Pipeline.stream`.

  index: chunk number k. frames: `[B, 33, H, W, 3]` (uint8, or fp32 in [0, 1]); None with
  `output_type="latent"` (not decoded).
  latents: `[B, 16, 9, h, w]` fp32 normalized latents (channel-first, like diffusers).
  dit_seconds / decode_seconds: wall time of the chunk's sampler and VAE decode.
  """

  index: int
  frames: np.ndarray | None
  latents: np.ndarray
  dit_seconds: float
  decode_seconds: float


@dataclasses.dataclass
class GenerationOutput:
  """frames: `[T, H, W, 3]` (one prompt) or `[B, T, H, W, 3]`, trimmed to 1 + 4k frames
  (None with `output_type="latent"`).

  latents: `[B, 16, T_lat, h, w]` fp32 — the reference's `output_type="latent"` tensor
  (conditioning latents first for I2V/V2V, then every generated chunk).
  chunks: per-chunk timings.
  seed: the int seed the run's key was made from (None when a key was passed); the same seed
    repeats the run.
  """

  frames: np.ndarray | None
  latents: np.ndarray
  chunks: list[ChunkOutput]
  seed: int | None = None

  @property
  def fps(self) -> float:
    total = sum(c.dit_seconds + c.decode_seconds for c in self.chunks)
    n = sampling.output_frames(len(self.chunks))
    return n / total if total else float("nan")


@dataclasses.dataclass
class PipelineOutput:
  """What `Pipeline.__call__` returns: diffusers' `HeliosPipelineOutput` plus our extras.

  frames: as diffusers for `output_type`: "np" `[B, T, H, W, 3]` float32 in [0, 1]; "pil" a list
    of B lists of T `PIL.Image`s; "latent" the `[B, 16, T_lat, h, w]` latents.
  latents: `[B, 16, T_lat, h, w]` fp32 normalized latents (conditioning latents first for
    I2V/V2V), whatever `output_type`.
  seed: the int seed of the run (drawn from os.urandom when no `generator` was given; None when
    a JAX key was given): `pipe(..., generator=out.seed)` repeats it.
  chunks: per-chunk timings (`ChunkOutput` without frames).
  """

  frames: Any
  latents: np.ndarray
  seed: int | None = None
  chunks: list[ChunkOutput] = dataclasses.field(default_factory=list)

  def to_tuple(self) -> tuple[Any, ...]:
    """(frames,) as diffusers' `return_dict=False`."""
    return (self.frames,)

  def __getitem__(self, i):
    """`out[0]` is `frames`, as diffusers' `BaseOutput` indexing."""
    return self.to_tuple()[i]


@dataclasses.dataclass
class Conditioning:
  """Start state of the chunk loop (spec sampling.md §3.2).

  state: the `HistoryState` for chunk 0. anchor_given: I2V/V2V set the anchor up front.
  prefix_latents: `[B, T, h, w, C]` conditioning latents the reference puts in front of the
  generated ones in its latent output (I2V: the fake frame; V2V: all noised video latents).
  """

  state: sampling.HistoryState
  anchor_given: bool
  prefix_latents: jax.Array | None = None


# ------------------------------------------------------------------------------------------
# The pipeline.


def make_sampler_config(scheduler: Any, flags: Any, patch_size: Sequence[int],
                        height: int = 384, width: int = 640, *,
                        steps: int | Sequence[int] | None = None,
                        guidance_scale: float | None = None, use_zero_init: bool = True,
                        zero_steps: int = 1, amplify_first_chunk: bool | None = None,
                        block_noise_chol: Any = None, sigmas: Any = None
                        ) -> sampling.SamplerConfig:
  """The static sampler settings of a checkpoint for a resolution and the sampling knobs.

  Needs only the checkpoint's small config files (`read_pipeline_settings`), so a CLI can
  validate its arguments before loading any weights.

  Args:
    scheduler: the checkpoint's scheduler config.
    flags: its `model_index.json` flags.
    patch_size: the DiT patch (t, h, w).
    height, width: pixels, positive multiples of 16 (of 64 for the 3-stage pyramid).
    steps: Base steps or steps per pyramid stage (default: `variants.checkpoint_defaults`).
    guidance_scale: CFG scale (default 5.0; distilled 1.0).
    use_zero_init, zero_steps: CFG-Zero* zero-init (Mid).
    amplify_first_chunk: DMD doubles chunk 0's steps (default on for DMD checkpoints).
    block_noise_chol: 4x4 block-noise factor (e.g. dumped from a CUDA reference run).
    sigmas: Base only: the custom sigma table (diffusers' `HeliosPipeline(sigmas=...)`), one per
      step (default: `steps` = its length); used as float64.

  Raises:
    ValueError: naming the bad value.
  """
  for name, v in (("height", height), ("width", width)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % 16:
      raise ValueError(f"{name}={v!r} must be a positive multiple of 16")
  defaults = variants.checkpoint_defaults(flags, scheduler)
  base_sigmas = None
  if sigmas is not None:
    if defaults.pyramid:
      raise ValueError("sigmas= is a Base (HeliosPipeline) option; a pyramid checkpoint's "
                       "sigmas come from its scheduler (diffusers' HeliosPyramidPipeline "
                       "ignores them)")
    sig = np.asarray(_to_cf(sigmas), np.float64)
    if sig.ndim != 1 or sig.size == 0 or not np.all(np.isfinite(sig)):
      raise ValueError(f"sigmas={sigmas!r} must be a non-empty 1-D list of finite floats")
    base_sigmas = tuple(float(v) for v in sig)
    if steps is None:
      steps = len(base_sigmas)
  steps = defaults.steps if steps is None else (
      (int(steps),) if np.isscalar(steps) else tuple(int(s) for s in steps))
  if base_sigmas is not None and steps != (len(base_sigmas),):
    raise ValueError(f"sigmas has {len(base_sigmas)} entries but steps={steps}: pass one sigma "
                     "per step")
  w = defaults.guidance_scale if guidance_scale is None else float(guidance_scale)
  if w > 1.0 and defaults.distilled:
    warnings.warn(f"guidance_scale={w} on a distilled checkpoint: CFG will be applied (as "
                  "in the reference), doubling the cost; distilled models use "
                  f"{defaults.guidance_scale}",
                  stacklevel=3)
  if amplify_first_chunk is None:
    amplify_first_chunk = defaults.amplify_first_chunk
  chol = None if block_noise_chol is None else tuple(
      tuple(float(v) for v in row) for row in np.asarray(block_noise_chol))
  return sampling.SamplerConfig(
      scheduler=scheduler, pyramid=defaults.pyramid, steps=steps,
      guidance=hs.guidance_mode(flags, w, defaults.pyramid), guidance_scale=w,
      use_zero_init=use_zero_init, zero_steps=zero_steps,
      amplify_first_chunk=bool(amplify_first_chunk), latent_height=height // 8,
      latent_width=width // 8, patch_size=tuple(patch_size), block_noise_chol=chol,
      base_sigmas=base_sigmas)


def read_pipeline_settings(path: str | os.PathLike) -> tuple[Any, Any, Any]:
  """(scheduler config, model_index flags, transformer config) of a pipeline folder.

  Reads only the JSON files (milliseconds, no weights).

  Raises:
    CheckpointError / ConfigError: a missing folder or file, or an invalid config.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"model folder not found: {path}")
  for sub in ("transformer", "vae", "scheduler"):
    if not os.path.isdir(os.path.join(path, sub)):
      raise CheckpointError(f"{path}: missing the '{sub}/' folder of a Helios pipeline")
  scheduler = hs.load_scheduler_config(path)
  flags = (hs.load_pipeline_flags(path) if os.path.isfile(os.path.join(path, "model_index.json"))
           else hs.PipelineFlags())
  transformer = HeliosTransformerConfig.from_json(os.path.join(path, "transformer"))
  return scheduler, flags, transformer


def check_model_options(path: str | os.PathLike, *, quantize: str | None = None,
                        keep_bf16: Sequence[str] | None = None,
                        keep_blocks: str | Sequence[int] = (), low_memory: bool = False,
                        lora: Any = None, dtype: Any = None) -> bool:
  """Checks `from_pretrained`'s DiT options against a pipeline folder, before any weights load.

  Reads only `transformer/config.json` and, for a pre-quantized export, its quantization.json.

  Returns:
    Whether `transformer/` is a pre-quantized export (`convert --quantize`).

  Raises:
    ValueError: keep_bf16 / keep_blocks without quantize, a bad block spec, an unknown mode, or
      options a pre-quantized export cannot honour (other mode, LoRA, dtype, keep_*).
    RuntimeError: what this platform or installation cannot run: fp8 dots, host memory for
      low_memory, a jax / qwix older than a pre-quantized export needs.
    CheckpointError / ConfigError: a missing or bad config / quantization.json.
  """
  from helios_jax.checkpoint import QUANTIZATION_FILE  # pylint: disable=g-import-not-at-top
  dit_path = os.path.join(os.fspath(path), "transformer")
  prequantized = os.path.isfile(os.path.join(dit_path, QUANTIZATION_FILE))
  keeps = keep_bf16 is not None or bool(keep_blocks)
  if keeps and quantize is None and not prequantized:
    raise ValueError(f"keep_bf16={keep_bf16!r} / keep_blocks={keep_blocks!r} need quantize "
                     "('fp8' or 'int8w', --quantize)")
  if quantize is not None or prequantized:
    from helios_jax import quantize as quant_lib  # pylint: disable=g-import-not-at-top
    if prequantized:
      if keeps:
        raise ValueError(f"{dit_path} is pre-quantized: its kept layers and blocks are "
                         "recorded in quantization.json; drop keep_bf16 / keep_blocks")
      quant_lib.check_load_request(dit_path, quantize=quantize, lora=lora, dtype=dtype)
    else:
      quant_lib.check_mode(quantize)
      cfg = HeliosTransformerConfig.from_json(dit_path)
      quant_lib.parse_blocks(keep_blocks, cfg.num_layers)
  if low_memory:
    from helios_jax import offload  # pylint: disable=g-import-not-at-top
    offload.check_supported()
  return prequantized


class Pipeline:
  """A loaded Helios checkpoint (transformer, VAE, text encoder, tokenizer, scheduler).

  Run it with `generate` / `stream` (our argument names), `generate_fn` (one pure jitted
  function), or call it like diffusers' `HeliosPipeline` / `HeliosPyramidPipeline`
  (`pipe(prompt, ...)`, `__call__`).

  Attributes:
    transformer: `HeliosTransformer` (graphdef + params).
    vae: `WanVAE` (fp32, as the reference pipelines run it).
    text_encoder, tokenizer: umT5 encoder and its tokenizer (None when loaded without text
      stack; then pass `prompt_embeds`).
    scheduler: the scheduler config; flags: `model_index.json` flags.
    release_text_encoder: free the encoder's device memory after each prompt encoding (it is
      reloaded from disk on the next prompt). Use it, or `text_encoder_device=cpu`, to fit the
      14B DiT + 5.7B encoder + VAE on one 80 GB GPU.
  """

  def __init__(self, transformer, vae, scheduler, flags, text_encoder=None, tokenizer=None,
               release_text_encoder: bool = False):
    self.transformer = transformer
    self.vae = vae
    self.scheduler = scheduler
    self.flags = flags
    self.text_encoder = text_encoder
    self.tokenizer = tokenizer
    self.release_text_encoder = release_text_encoder
    self.mesh = None
    self.token_constraint = None
    if vae.config.z_dim != transformer.config.in_channels:
      raise ConfigError(f"VAE z_dim={vae.config.z_dim} != transformer in_channels="
                        f"{transformer.config.in_channels}")

  # ---------------------------------------------------------------------------- loading

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype: Any = jnp.bfloat16, *,
                      kernels=None, load_text_encoder: bool = True,
                      text_encoder_device: Any = None,
                      release_text_encoder: bool | None = None, lora: Any = None,
                      quantize: str | None = None, keep_bf16: Sequence[str] | None = None,
                      keep_blocks: str | Sequence[int] = (),
                      low_memory: bool = False) -> "Pipeline":
    """Loads `transformer/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json`.

    Args:
      path: a diffusers pipeline folder or our Orbax export of one.
      dtype: transformer and text-encoder dtype (bf16 as the reference); the VAE is fp32.
      kernels: `KernelConfig` for the DiT (attention / norm / RoPE implementations).
      load_text_encoder: False skips the umT5 stack (pass `prompt_embeds` to generate).
      text_encoder_device: run the encoder on this device (e.g. `jax.devices("cpu")[0]`).
      release_text_encoder: free the encoder after each prompt encoding (reloads lazily);
        None: only with `low_memory` (and no `text_encoder_device`).
      lora: `[(path, scale), ...]` LoRA / partial-parameter files fused into the DiT at load
        (`load_transformer(lora=...)`, `models/lora.py`).
      quantize: None (default: the DiT in `dtype`), "fp8" or "int8w": Qwix PTQ of the DiT after
        loading (and LoRA fusion), `quantize.quantize_transformer`.
      keep_bf16: with `quantize`, module-path regexes kept unquantized (None:
        `quantize.DEFAULT_KEEP`).
      keep_blocks: with `quantize`, whole blocks kept unquantized ("first:3,last:3", [0, 39],
        `quantize.parse_blocks`).
      low_memory: keep the DiT's block weights in host memory and stream them to the device one
        block at a time (`offload.py`): device memory ~ non-block weights + two blocks +
        activations, host RAM ~ the block weights; the text encoder is released after each
        prompt unless `text_encoder_device` places it. Not combinable with `shard`.

    A pre-quantized `transformer/` (`convert --quantize`, holding quantization.json) is loaded
    with `quantize.load_quantized_transformer` (bf16, its recorded mode, kept layers and
    blocks): `quantize` must be None or that mode, `dtype` bf16, `keep_bf16` / `keep_blocks`
    unset, and `lora` is refused (fuse it before quantizing).
    """
    from helios_jax.models.text_encoder import load_text_encoder as _load_te  # pylint: disable=g-import-not-at-top
    from helios_jax.models.transformer import load_transformer  # pylint: disable=g-import-not-at-top
    from helios_jax.models.vae import load_vae  # pylint: disable=g-import-not-at-top
    from helios_jax.text import load_tokenizer  # pylint: disable=g-import-not-at-top
    path = os.fspath(path)
    dit_path = os.path.join(path, "transformer")
    prequantized = check_model_options(path, quantize=quantize, keep_bf16=keep_bf16,
                                       keep_blocks=keep_blocks, low_memory=low_memory,
                                       lora=lora, dtype=dtype)
    if quantize is not None or prequantized:
      from helios_jax import quantize as quant_lib  # pylint: disable=g-import-not-at-top
    placement = None
    if low_memory:
      from helios_jax import offload  # pylint: disable=g-import-not-at-top
      placement = offload.load_placement()
    scheduler, flags, _ = read_pipeline_settings(path)
    if prequantized:
      transformer = quant_lib.load_quantized_transformer(dit_path, kernels=kernels,
                                                         placement=placement)
    else:
      transformer = load_transformer(dit_path, dtype, kernels=kernels, lora=lora,
                                     placement=placement)
    if quantize is not None and not prequantized:
      transformer = quant_lib.quantize_transformer(
          transformer, quantize, quant_lib.DEFAULT_KEEP if keep_bf16 is None else keep_bf16,
          keep_blocks)
    if low_memory:
      transformer = offload.offload_blocks(transformer)
    if release_text_encoder is None:
      release_text_encoder = low_memory and text_encoder_device is None
    vae = load_vae(os.path.join(path, "vae"), jnp.float32)
    text_encoder = tokenizer = None
    if load_text_encoder:
      for sub in ("text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, sub)):
          raise CheckpointError(f"{path}: missing '{sub}/' (or pass load_text_encoder=False and "
                                "prompt_embeds)")
      text_encoder = _load_te(os.path.join(path, "text_encoder"), dtype,
                              device=text_encoder_device, lazy=release_text_encoder)
      tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    return cls(transformer, vae, scheduler, flags, text_encoder, tokenizer,
               release_text_encoder=release_text_encoder)

  def shard(self, mesh: jax.sharding.Mesh) -> "Pipeline":
    """Runs the DiT over the devices of an inference `mesh` (`sharding.make_mesh`).

    The transformer parameters are split over the "tensor" axis (heads / FFN units), tokens
    over "context" and the (CFG-doubled) batch over "data" (the token constraint the chunk
    step passes to the DiT); the VAE and text encoder stay on one device. Results equal the
    single-device pipeline up to reduction order.
    """
    if self.low_memory:
      raise ValueError("this pipeline was loaded with low_memory=True (DiT blocks streamed from "
                       "one host to one device); a mesh already splits the weights over its "
                       "devices: load without low_memory to shard it")
    sharding.shard_transformer(self.transformer, mesh)
    self.mesh = mesh
    self.token_constraint = sharding.token_constraint(mesh)
    return self

  def _on_mesh(self, tree):
    """Inputs of the sharded DiT: replicated over the mesh (identity without a mesh)."""
    if self.mesh is None:
      return tree
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda a: jax.device_put(a, rep), tree)

  def _on_vae_device(self, x: jax.Array) -> jax.Array:
    if self.mesh is None:
      return x
    return jax.device_put(x, next(iter(jax.tree.leaves(self.vae.params)[0].devices())))

  # ---------------------------------------------------------------------------- config

  @property
  def low_memory(self) -> bool:
    """Whether the DiT's block weights live in host memory (`from_pretrained(low_memory=True)`)."""
    from helios_jax import offload  # pylint: disable=g-import-not-at-top
    return offload.is_offloaded(self.transformer)

  @property
  def is_pyramid(self) -> bool:
    return variants.is_pyramid(self.flags, self.scheduler)

  @property
  def default_steps(self) -> tuple[int, ...]:
    """The checkpoint's default steps (`variants.checkpoint_defaults`)."""
    return variants.checkpoint_defaults(self.flags, self.scheduler).steps

  @property
  def default_guidance_scale(self) -> float:
    """The checkpoint's default CFG scale (`variants.checkpoint_defaults`)."""
    return variants.checkpoint_defaults(self.flags, self.scheduler).guidance_scale

  def sampler_config(self, height: int = 384, width: int = 640, **kwargs
                     ) -> sampling.SamplerConfig:
    """The static sampler settings for a resolution (pixels) and the sampling knobs
    (`make_sampler_config` with this checkpoint's scheduler, flags and patch)."""
    return make_sampler_config(self.scheduler, self.flags, self.transformer.config.patch_size,
                               height, width, **kwargs)

  # ---------------------------------------------------------------------------- text

  def encode_prompt(self, prompt: str | Sequence[str], max_length: int = 512) -> jax.Array:
    """`[B, max_length, text_dim]` embeddings in the transformer dtype (zero-filled rows)."""
    from helios_jax.text import encode_prompt  # pylint: disable=g-import-not-at-top
    if self.text_encoder is None or self.tokenizer is None:
      raise ValueError("this pipeline has no text encoder/tokenizer: pass prompt_embeds "
                       "(and negative_prompt_embeds when guidance is on)")
    try:
      out = encode_prompt(prompt, self.tokenizer, self.text_encoder, max_length,
                          dtype=self.transformer.dtype)
      return jax.device_put(out, jax.devices()[0])
    finally:
      if self.release_text_encoder:
        self.text_encoder.release()

  # ---------------------------------------------------------------------------- conditioning

  def _vae_sample(self, video_cf: np.ndarray, eps: Any, rng: jax.Array,
                  name: str = "posterior") -> jax.Array:
    """Normalized posterior sample of `[B, 3, T, H, W]` -> `[B, T_lat, h, w, C]`.

    `eps` is the injected posterior draw `noise[name]` (`[B, 16, T_lat, h, w]`) or None.
    """
    if eps is None:
      z = self.vae.encode(video_cf, sample=True, rng=rng)
    else:
      eps = _to_cf(eps)
      b, _, t, hh, ww = video_cf.shape
      want = (b, self.vae.config.z_dim, (t - 1) // 4 + 1, hh // 8, ww // 8)
      if tuple(eps.shape) != want:
        raise ValueError(f"noise[{name}] has shape {tuple(eps.shape)}; expected {want} "
                         "(see pipeline.NOISE_KEYS)")
      z = self.vae.encode(video_cf, sample=True, noise=eps)
    return jnp.moveaxis(self.vae.normalize(z), 1, -1)

  def prepare_conditioning(self, batch: int, height: int, width: int, image: Any = None,
                           video: Any = None, rng: jax.Array | None = None,
                           noise: dict[str, Any] | None = None,
                           sigma_range: tuple[float, float] = COND_SIGMA_RANGE,
                           video_sigma_range: tuple[float, float] | None = None
                           ) -> Conditioning:
    """The chunk-0 history for T2V / I2V / V2V (spec §3.2), reference draw order (§9).

    Args:
      batch: B.
      height, width: output size in pixels.
      image: I2V image (path, PIL image or `[H, W, 3]` array).
      video: V2V video (path, `[T, H, W, 3]` array or list of frames), at least 33 frames.
      rng: key for the draws not given in `noise`.
      noise: injected draws in the reference's layouts, keys and order in `NOISE_KEYS`
        (unknown keys, keys of another task and wrong shapes raise).
      sigma_range: (min, max) of the anchor's noise sigma (diffusers'
        `image_noise_sigma_min/max`).
      video_sigma_range: (min, max) of the I2V fake frame's and the V2V blocks' noise sigmas
        (diffusers' `video_noise_sigma_min/max`); None: `sigma_range`.
    """
    from helios_jax import media  # pylint: disable=g-import-not-at-top
    h, w, c = height // 8, width // 8, self.transformer.config.in_channels
    empty = sampling.empty_history(batch, h, w, c)
    if image is not None and video is not None:
      raise ValueError("pass image (I2V) or video (V2V), not both")
    task = "t2v" if image is None and video is None else ("i2v" if image is not None else "v2v")
    noise = {k: v for k, v in check_noise(noise, task).items() if k != "chunks"}
    if task == "t2v":
      return Conditioning(empty, anchor_given=False)
    keys = iter(jax.random.split(jax.random.key(0) if rng is None else rng, 64))
    ranges = {}
    for name, rg in (("sigma_range", sigma_range),
                     ("video_sigma_range", sigma_range if video_sigma_range is None
                      else video_sigma_range)):
      lo, hi = (float(v) for v in rg)
      if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name}={tuple(rg)} must satisfy 0 <= min <= max <= 1")
      ranges[name] = (lo, hi)

    def draw_sigma(name, given, rg, n=1):  # sigma = U[0, 1) * (hi - lo) + lo in fp32
      lo, hi = ranges[rg]
      if given is not None:
        u = jnp.asarray(_to_cf(given), jnp.float32)
        if u.size != n:
          raise ValueError(f"noise[{name}] has shape {tuple(u.shape)}; expected [{n}] (see "
                           "pipeline.NOISE_KEYS)")
        u = u.reshape(n)
      else:
        u = jax.random.uniform(next(keys), (n,), jnp.float32)
      return u * jnp.float32(hi - lo) + jnp.float32(lo)

    def draw_eps(name, given, shape):  # shape channels-last; `given` channel-first
      if given is None:
        return jax.random.normal(next(keys), shape, jnp.float32)
      eps = _to_cf(given)
      want = (shape[0], shape[-1]) + tuple(shape[1:-1])
      if tuple(eps.shape) != want:
        raise ValueError(f"noise[{name}] has shape {tuple(eps.shape)}; expected {want} (see "
                         "pipeline.NOISE_KEYS)")
      return jnp.moveaxis(jnp.asarray(eps, jnp.float32), 1, -1)

    def listed(name, n):
      if name not in noise:
        return [None] * n
      v = list(noise[name])
      if len(v) != n:
        raise ValueError(f"noise[{name!r}] has {len(v)} entries; the video has {n} blocks of "
                         f"{CHUNK_FRAMES} frames")
      return v

    def blend(sig, eps, lat):  # sigma * eps + (1 - sigma) * latents, sigma per frame
      sig = sig.reshape(1, -1, 1, 1, 1)
      return sig * eps + (1 - sig) * lat

    if image is not None:
      img = media.load_image(image, height, width)                   # [3, H, W] in [-1, 1]
      frame = np.broadcast_to(img[None, :, None], (batch, 3, 1, height, width))
      i_lat = self._vae_sample(frame, noise.get("image_posterior"), next(keys),
                               "'image_posterior'")
      fake = np.broadcast_to(frame, (batch, 3, CHUNK_FRAMES, height, width))
      f_lat = self._vae_sample(fake, noise.get("fake_posterior"), next(keys),
                               "'fake_posterior'")[:, -1:]
      i_sig = draw_sigma("'image_uniform'", noise.get("image_uniform"), "sigma_range")
      anchor = blend(i_sig, draw_eps("'image_eps'", noise.get("image_eps"), i_lat.shape), i_lat)
      f_sig = draw_sigma("'fake_uniform'", noise.get("fake_uniform"), "video_sigma_range")
      fake_lat = blend(f_sig, draw_eps("'fake_eps'", noise.get("fake_eps"), f_lat.shape), f_lat)
      state = sampling.HistoryState(
          latents=jnp.concatenate([empty.latents[:, :-1], fake_lat], axis=1), anchor=anchor)
      return Conditioning(state, anchor_given=True, prefix_latents=fake_lat)

    vid = media.load_video(video, height, width)                      # [3, T, H, W] in [-1, 1]
    n_blocks = vid.shape[1] // CHUNK_FRAMES
    if n_blocks == 0:
      raise ValueError(f"V2V video has {vid.shape[1]} frames; at least {CHUNK_FRAMES} needed")
    start = vid.shape[1] - n_blocks * CHUNK_FRAMES
    vb = np.broadcast_to(vid[None], (batch,) + vid.shape)
    first = self._vae_sample(vb[:, :, :1], noise.get("first_posterior"), next(keys),
                             "'first_posterior'")
    posts = listed("block_posteriors", n_blocks)
    blocks = [self._vae_sample(vb[:, :, start + i * CHUNK_FRAMES:start + (i + 1) * CHUNK_FRAMES],
                               posts[i], next(keys), f"'block_posteriors'][{i}")
              for i in range(n_blocks)]
    a_sig = draw_sigma("'anchor_uniform'", noise.get("anchor_uniform"), "sigma_range")
    anchor = blend(a_sig, draw_eps("'anchor_eps'", noise.get("anchor_eps"), first.shape), first)
    uniforms, epss = listed("block_uniforms", n_blocks), listed("block_eps", n_blocks)
    noised = []
    for i, lat in enumerate(blocks):
      sig = draw_sigma(f"'block_uniforms'][{i}", uniforms[i], "video_sigma_range", lat.shape[1])
      eps = draw_eps(f"'block_eps'][{i}", epss[i], lat.shape)
      noised.append(blend(sig, eps, lat))
    video_lat = jnp.concatenate(noised, axis=1)
    hist = jnp.concatenate([empty.latents, video_lat], axis=1)[:, -sampling.NUM_HISTORY_FRAMES:]
    state = sampling.HistoryState(latents=hist, anchor=anchor)
    return Conditioning(state, anchor_given=True, prefix_latents=video_lat)

  # ---------------------------------------------------------------------------- sampling

  def _texts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, sc,
             interpolate_prompts: bool, max_sequence_length: int = 512,
             num_videos_per_prompt: int = 1):
    """(text `[B, L, D]`, negative text or None, B) in the transformer dtype.

    With `num_videos_per_prompt` n, every prompt's (and negative prompt's) embedding row is
    repeated n times in place (p0, p0, p1, p1, ...: diffusers' `repeat(1, n, 1).view(...)`).
    """
    if isinstance(num_videos_per_prompt, bool) or not isinstance(
        num_videos_per_prompt, (int, np.integer)) or num_videos_per_prompt < 1:
      raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt!r} must be an integer >= 1")
    if interpolate_prompts and num_videos_per_prompt != 1:
      raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt} with interpolate_prompts: "
                       "an interactive run makes one video")
    n = int(num_videos_per_prompt)
    rep = lambda e: e if n == 1 else jnp.repeat(e, n, axis=0)
    if prompt_embeds is None:
      if prompt is None:
        raise ValueError("pass prompt or prompt_embeds")
      if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError("prompt list is empty")
      prompt_embeds = self.encode_prompt(prompt, max_sequence_length)
    prompt_embeds = jnp.asarray(_from_torch(prompt_embeds)).astype(self.transformer.dtype)
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.transformer.config.text_dim:
      raise ValueError(f"prompt_embeds must be [B, L, {self.transformer.config.text_dim}], got "
                       f"{tuple(prompt_embeds.shape)}")
    batch = 1 if interpolate_prompts else prompt_embeds.shape[0]
    neg = None
    if sc.guidance != "none":
      if negative_prompt_embeds is None:
        neg_text = "" if negative_prompt is None else negative_prompt
        negs = [neg_text] * batch if isinstance(neg_text, str) else list(neg_text)
        negative_prompt_embeds = self.encode_prompt(negs, max_sequence_length)
      neg = jnp.asarray(_from_torch(negative_prompt_embeds)).astype(self.transformer.dtype)[:batch]
      if neg.shape[0] != batch:
        raise ValueError(f"negative_prompt_embeds batch {neg.shape[0]} != {batch}")
      neg = rep(neg)
    if not interpolate_prompts:
      prompt_embeds = rep(prompt_embeds)
    return prompt_embeds, neg, batch * n

  def stream(self, prompt: str | Sequence[str] | None = None, negative_prompt: Any = None,
             **kwargs) -> Iterator[ChunkOutput]:
    """Generates chunk by chunk, yielding each decoded 33-frame chunk as soon as it exists.

    Arguments as `_run` (below). Each `ChunkOutput` holds the chunk's full 33 frames; the
    concatenation of all chunks trimmed to `sampling.output_frames(K)` equals `generate`.
    """
    run = self._run(prompt, negative_prompt, **kwargs)
    next(run)  # the conditioning
    yield from run

  def _run(self, prompt: str | Sequence[str] | None = None, negative_prompt: Any = None, *,
             image: Any = None, video: Any = None, num_frames: int = 132, height: int = 384,
             width: int = 640, steps: int | Sequence[int] | None = None,
             guidance_scale: float | None = None, seed: int | None = 0,
             rng: jax.Array | None = None, prompt_embeds: Any = None,
             negative_prompt_embeds: Any = None, use_zero_init: bool = True,
             zero_steps: int = 1, amplify_first_chunk: bool | None = None,
             is_skip_first_chunk: bool = False, interpolate_prompts: bool = False,
             interpolate_time: int | Sequence[int] = 7, interpolation_steps: int = 3,
             noise: dict[str, Any] | None = None, output_type: str = "uint8",
             block_noise_chol: Any = None, progress: bool = True,
             conditioning: Conditioning | None = None, sigmas: Any = None,
             num_videos_per_prompt: int = 1, max_sequence_length: int = 512,
             sigma_range: tuple[float, float] = COND_SIGMA_RANGE,
             video_sigma_range: tuple[float, float] | None = None,
             callback_on_step_end: Callable[..., Any] | None = None,
             callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
             stepwise: bool = False) -> Iterator[Any]:
    """The chunk loop: yields the `Conditioning` first, then one `ChunkOutput` per chunk.

    Args:
      prompt: a prompt, a list (one video each), or with `interpolate_prompts` the prompt
        sequence of one interactive video.
      negative_prompt: used when guidance is on; default "" (diffusers' API default; the CLI
        uses `DEFAULT_NEGATIVE_PROMPT` as the official scripts do).
      image / video: I2V image or V2V video (see `prepare_conditioning`).
      num_frames: requested frames (>= 1); K = ceil(num_frames / 33) chunks are generated.
      height, width: pixels, multiples of 16 (of 64 for the 3-stage pyramid).
      steps: Base steps or steps per pyramid stage (default 50 / [20]*3 / DMD [2]*3).
      guidance_scale: CFG scale (default 5.0, distilled 1.0).
      seed / rng: randomness (rng wins; seed None = 0); ignored for draws given in `noise`.
      prompt_embeds / negative_prompt_embeds: precomputed `[B, L, text_dim]` embeddings.
      use_zero_init, zero_steps: CFG-Zero* zero-init (Mid).
      amplify_first_chunk: DMD doubles chunk 0's steps (default on for DMD checkpoints).
      is_skip_first_chunk: re-anchor on chunk 1's first frame (I2V/V2V with a static start).
      interpolate_prompts, interpolate_time, interpolation_steps: interactive prompt switching
        (spec §6).
      noise: injected draws of the reference (keys, shapes and order: `NOISE_KEYS`; an unknown
        key, a key of another task or a wrong shape raises).
      output_type: 'uint8' | 'float' ([0, 1]) | 'latent' (no decoding: `frames` None).
      block_noise_chol: 4x4 block-noise factor (e.g. dumped from a CUDA reference run).
      progress: tqdm bars over chunks and denoising steps.
      conditioning: a precomputed `Conditioning` (skips image/video encoding).
      sigmas: Base only: custom sigma table (see `make_sampler_config`).
      num_videos_per_prompt: n videos per prompt (embedding rows repeated in place).
      max_sequence_length: text tokens of `encode_prompt` (512).
      sigma_range, video_sigma_range: conditioning noise-sigma ranges (`prepare_conditioning`).
      callback_on_step_end: `callback(pipe, i, t, callback_kwargs) -> dict | None` after every
        denoising step (i: the step within its pyramid stage, t: its scheduler timestep), as
        diffusers; `callback_kwargs` holds the `callback_on_step_end_tensor_inputs` ("latents"
        `[B, 16, 9, h_s, w_s]` channel-first at the stage's resolution, "prompt_embeds",
        "negative_prompt_embeds") and a returned dict replaces them for the next steps (and the
        embeddings for the next chunks). Runs the chunk step by step
        (`sampling.sample_chunk_stepwise`), the same latents as the fused chunk program.
      callback_on_step_end_tensor_inputs: names from `CALLBACK_TENSOR_INPUTS`.
      stepwise: run the step-by-step path even without a callback.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or \
        num_frames < 1:
      raise ValueError(f"num_frames={num_frames!r} must be an integer >= 1")
    if output_type not in ("uint8", "float", "latent"):
      raise ValueError(f"output_type={output_type!r} must be 'uint8', 'float' or 'latent'")
    tensor_inputs = tuple(callback_on_step_end_tensor_inputs or ())
    bad = [k for k in tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
    if bad:
      raise ValueError(f"callback_on_step_end_tensor_inputs has {bad}; allowed: "
                       f"{list(CALLBACK_TENSOR_INPUTS)}")
    if callback_on_step_end is not None and not callable(callback_on_step_end):
      raise TypeError(f"callback_on_step_end={callback_on_step_end!r} is not callable")
    sc = self.sampler_config(height, width, steps=steps, guidance_scale=guidance_scale,
                             use_zero_init=use_zero_init, zero_steps=zero_steps,
                             amplify_first_chunk=amplify_first_chunk,
                             block_noise_chol=block_noise_chol, sigmas=sigmas)
    text, neg, batch = self._texts(prompt, negative_prompt, prompt_embeds,
                                   negative_prompt_embeds, sc, interpolate_prompts,
                                   max_sequence_length, num_videos_per_prompt)
    k_total = sampling.num_chunks(num_frames)
    plan = None
    if interpolate_prompts:
      k_total, plan = interactive_schedule(k_total, text.shape[0], interpolate_time,
                                           interpolation_steps)
    if rng is None:
      rng = jax.random.key(0 if seed is None else int(seed))
    cond_key, chunk_key = chunk_keys(rng)
    task = "t2v" if image is None and video is None else ("i2v" if image is not None else "v2v")
    noise = check_noise(noise, task)
    if conditioning is None:
      conditioning = self.prepare_conditioning(batch, height, width, image, video, cond_key,
                                               noise, sigma_range, video_sigma_range)
    yield conditioning
    state = conditioning.state
    injected = noise.get("chunks")
    if injected is not None and len(injected) != k_total:
      raise ValueError(f"noise['chunks'] has {len(injected)} entries for {k_total} chunks")
    c = self.transformer.config.in_channels
    chunk_steps = lambda k: sum(s.num_steps for s in sampling.schedules(sc, k == 0))
    bar = step_bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=k_total, desc="chunks", unit="chunk")
      step_bar = tqdm(total=sum(chunk_steps(k) for k in range(k_total)), desc="steps",
                      unit="step", leave=False)
    on_step = None
    if callback_on_step_end is not None or step_bar is not None:
      on_step = self._step_observer(callback_on_step_end, tensor_inputs, step_bar,
                                    plan is not None)
    try:
      for k in range(k_total):
        if injected is not None:
          cn = _injected_noise(injected[k], sc, batch, c, k)
        else:
          cn = chunk_noise(chunk_key, k, sc, batch, c)
        t_k = text if plan is None else lerp_embeddings(text[plan[k][0]], text[plan[k][1]],
                                                         plan[k][2])[None]
        set_anchor = sampling.set_anchor_flag(k, conditioning.anchor_given, is_skip_first_chunk)
        t0 = time.perf_counter()
        if callback_on_step_end is None and not stepwise:
          state, latents, finite = chunk_step(
              self.transformer.graphdef, sc, k == 0, self.transformer.params,
              *self._on_mesh((t_k, neg, state, cn, jnp.asarray(set_anchor))),
              constrain=self.token_constraint)
          if step_bar is not None:
            step_bar.update(chunk_steps(k))
        else:
          t_in, neg_in, state_in, cn_in = self._on_mesh((t_k, neg, state, cn))
          out, t_out, neg = sampling.sample_chunk_stepwise(
              self.transformer.graphdef, self.transformer.params, sc, k == 0, t_in, neg_in,
              state_in, cn_in, on_step=on_step, constrain=self.token_constraint)
          if plan is None:
            text = t_out
          state, latents, finite = _finish_chunk(state, out, jnp.asarray(set_anchor))
        latents = self._on_vae_device(latents)
        if not bool(finite):
          raise FloatingPointError(f"chunk {k}: the sampler produced NaN/Inf latents")
        t1 = time.perf_counter()
        frames = None
        if output_type != "latent":
          frames = np.asarray(decode_step(self.vae.graphdef, self.vae.params, latents,
                                          self.vae.latents_mean, self.vae.latents_inv_std,
                                          output_type))
        t2 = time.perf_counter()
        if bar is not None:
          bar.update(1)
          bar.set_postfix(dit=f"{t1 - t0:.2f}s", decode=f"{t2 - t1:.2f}s")
        yield ChunkOutput(index=k, frames=frames, latents=np.moveaxis(np.asarray(latents), -1, 1),
                          dit_seconds=t1 - t0, decode_seconds=t2 - t1)
    finally:
      for b in (step_bar, bar):
        if b is not None:
          b.close()

  def _step_observer(self, callback, tensor_inputs, step_bar, interactive: bool):
    """The `on_step` of `sampling.sample_chunk_stepwise` for a diffusers-style callback."""

    def as_array(name, value, like):
      arr = jnp.asarray(_from_torch(value))
      if like is None or tuple(arr.shape) != tuple(like.shape):
        raise ValueError(f"callback_on_step_end returned {name} of shape {tuple(arr.shape)}; "
                         f"expected {None if like is None else tuple(like.shape)}")
      return arr.astype(like.dtype)

    def on_step(stage, i, t, x, text, neg):
      del stage
      if step_bar is not None:
        step_bar.update(1)
      if callback is None:
        return None
      current = {"latents": lambda: jnp.moveaxis(x, -1, 1), "prompt_embeds": lambda: text,
                 "negative_prompt_embeds": lambda: neg}
      out = callback(self, i, t, {name: current[name]() for name in tensor_inputs})
      if out is None:
        return None
      if not isinstance(out, dict):
        raise TypeError(f"callback_on_step_end must return a dict (or None), got "
                        f"{type(out).__name__}")
      unknown = [key for key in out if key not in CALLBACK_TENSOR_INPUTS]
      if unknown:
        raise ValueError(f"callback_on_step_end returned {unknown}; it may replace only "
                         f"{list(CALLBACK_TENSOR_INPUTS)}")
      if interactive and ("prompt_embeds" in out or "negative_prompt_embeds" in out):
        raise ValueError("callback_on_step_end cannot replace the embeddings of an "
                         "interactive (interpolate_prompts) run")
      if "latents" in out:
        x = jnp.moveaxis(as_array("latents", out["latents"], jnp.moveaxis(x, -1, 1)), 1, -1)
      if "prompt_embeds" in out:
        text = as_array("prompt_embeds", out["prompt_embeds"], text)
      if "negative_prompt_embeds" in out:
        neg = as_array("negative_prompt_embeds", out["negative_prompt_embeds"], neg)
      return x, text, neg

    return on_step

  def generate(self, prompt: str | Sequence[str] | None = None, negative_prompt: Any = None,
               **kwargs) -> GenerationOutput:
    """Runs `stream` to the end; frames trimmed to floor((33K - 1) / 4) * 4 + 1.

    Takes the arguments of `_run`. Returns a `GenerationOutput` (frames `[T, H, W, 3]` for a
    single prompt, `[B, T, H, W, 3]` for a batch, None for `output_type="latent"`; latents
    `[B, 16, T_lat, h, w]`; seed: the `seed` used, None when `rng` was given).
    """
    run = self._run(prompt, negative_prompt, **kwargs)
    cond = next(run)
    chunks = list(run)
    frames = None
    if chunks[0].frames is not None:
      frames = np.concatenate([c.frames for c in chunks], axis=1)
      frames = frames[:, :sampling.output_frames(len(chunks))]
    latents = np.concatenate([c.latents for c in chunks], axis=2)
    if cond.prefix_latents is not None:
      prefix = np.moveaxis(np.asarray(cond.prefix_latents), -1, 1)
      latents = np.concatenate([prefix, latents], axis=2)
    single = latents.shape[0] == 1 and (prompt is None or isinstance(prompt, str) or
                                        kwargs.get("interpolate_prompts", False))
    seed = None if kwargs.get("rng") is not None else int(kwargs.get("seed", 0) or 0)
    return GenerationOutput(frames=frames[0] if single and frames is not None else frames,
                            latents=latents, chunks=chunks, seed=seed)


  # ---------------------------------------------------------------------------- diffusers API

  def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: Any = None,
               height: int = 384, width: int = 640, num_frames: int = 132,
               sigmas: Sequence[float] | None = None, guidance_scale: float | None = None,
               num_videos_per_prompt: int = 1, generator: Any = None, latents: Any = None,
               prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
               output_type: str = "np", return_dict: bool = True,
               attention_kwargs: dict[str, Any] | None = None,
               callback_on_step_end: Callable[..., Any] | None = None,
               callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
               max_sequence_length: int = 512, image: Any = None, image_latents: Any = None,
               fake_image_latents: Any = None, add_noise_to_image_latents: bool = True,
               image_noise_sigma_min: float = COND_SIGMA_RANGE[0],
               image_noise_sigma_max: float = COND_SIGMA_RANGE[1], video: Any = None,
               video_latents: Any = None, add_noise_to_video_latents: bool = True,
               video_noise_sigma_min: float = COND_SIGMA_RANGE[0],
               video_noise_sigma_max: float = COND_SIGMA_RANGE[1],
               history_sizes: Sequence[int] = (16, 2, 1), num_latent_frames_per_chunk: int = 9,
               keep_first_frame: bool = True, is_skip_first_chunk: bool = False,
               num_inference_steps: int | None = None,
               pyramid_num_inference_steps_list: Sequence[int] | None = None,
               use_zero_init: bool = True, zero_steps: int = 1,
               is_amplify_first_chunk: bool | None = None, **kwargs) -> Any:
    """diffusers' `HeliosPipeline.__call__` / `HeliosPyramidPipeline.__call__`, same names.

    The arguments mean what they mean in diffusers 0.42.1, with these differences:
      - defaults of `num_inference_steps` / `pyramid_num_inference_steps_list`, `guidance_scale`
        and `is_amplify_first_chunk` (None) are the checkpoint's (`variants.checkpoint_defaults`:
        Base 50 steps, Mid [20, 20, 20], Distilled [2, 2, 2] with CFG off and the amplified
        first chunk) where diffusers' signature has [10, 10, 10], 5.0 and False for every
        checkpoint. `num_inference_steps` is Base only, `pyramid_num_inference_steps_list`
        pyramid only (the other raises); `sigmas` (Base only) sets the steps to its length.
      - `generator`: an int seed or a `jax.random.key`; None draws a fresh seed from
        `os.urandom`, reported as `out.seed` (`generator=out.seed` repeats the run). JAX cannot
        reproduce torch's random numbers, so a seed gives other videos than the same torch
        seed; to replay a torch run pass its recorded draws as `noise=` (`NOISE_KEYS`).
      - `latents` is accepted and ignored, as in diffusers 0.42.1 (its chunk loop calls
        `prepare_latents(..., latents=None)`); a warning says so. Inject the per-chunk initial
        noise with `noise={"chunks": [...]}` instead.
      - `num_videos_per_prompt` = n makes n videos per prompt (the embeddings of prompts and
        precomputed `prompt_embeds` alike repeated in place: p0, p0, p1, p1, ...); diffusers
        0.42.1 repeats only the embeddings it encodes itself and keeps the latents' batch at
        len(prompt), so there n > 1 fails with a prompt and is ignored with `prompt_embeds`.
      - `output_type`: "np" (float32 `[B, T, H, W, 3]` in [0, 1]), "pil" (B lists of T PIL
        images) or "latent" (no VAE decode: the `[B, 16, T_lat, h, w]` latents, numpy); no "pt".
      - `callback_on_step_end(pipe, i, t, callback_kwargs)` gets this pipeline, the step i within
        its pyramid stage, the scheduler timestep t (float) and JAX arrays ("latents"
        channel-first `[B, 16, 9, h_s, w_s]` at the stage's resolution); it may return a dict
        replacing any of them (numpy / JAX / torch CPU arrays of the same shape). With a callback
        every denoising step is its own jitted call (same latents as the fused chunk program).
        diffusers' `PipelineCallback` objects (torch-specific) are not supported.
      - not supported (raise unless left at their defaults): `attention_kwargs`,
        `image_latents`, `fake_image_latents`, `video_latents`, `add_noise_to_*_latents=False`,
        other `history_sizes`, `num_latent_frames_per_chunk`, `keep_first_frame=False`.

    Extra keyword arguments of ours: `noise` (replayed draws, `NOISE_KEYS`), `progress`
    (tqdm bars over chunks and steps; default on), `block_noise_chol`, `interpolate_prompts`,
    `interpolate_time`, `interpolation_steps`, `conditioning`, `stepwise` (see `_run`).

    Returns:
      `PipelineOutput` (`.frames` as diffusers, `.latents`, `.seed`), or `(frames,)` with
      `return_dict=False`.
    """
    import difflib  # pylint: disable=g-import-not-at-top
    extra = ("noise", "progress", "block_noise_chol", "interpolate_prompts", "interpolate_time",
             "interpolation_steps", "conditioning", "stepwise")
    for key in kwargs:
      if key not in extra:
        known = list(extra) + list(_param_names(Pipeline.__call__))
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        extra_hint = " (use generator= for the seed)" if key in ("seed", "rng") else ""
        raise TypeError(f"Pipeline.__call__() got an unexpected keyword argument {key!r}"
                        f"{hint}{extra_hint}")
    unsupported = {"attention_kwargs": (attention_kwargs, None),
                   "image_latents": (image_latents, None),
                   "fake_image_latents": (fake_image_latents, None),
                   "video_latents": (video_latents, None),
                   "add_noise_to_image_latents": (add_noise_to_image_latents, True),
                   "add_noise_to_video_latents": (add_noise_to_video_latents, True),
                   "num_latent_frames_per_chunk": (num_latent_frames_per_chunk, 9),
                   "keep_first_frame": (keep_first_frame, True)}
    for name, (value, default) in unsupported.items():
      if (value is not None) if default is None else (value != default):
        raise ValueError(f"{name}={value!r} is not supported (only {default!r})")
    if sorted((int(v) for v in history_sizes), reverse=True) != [16, 2, 1]:
      raise ValueError(f"history_sizes={list(history_sizes)!r} is not supported (only "
                       "[16, 2, 1])")
    if prompt is not None and prompt_embeds is not None:
      raise ValueError("pass prompt or prompt_embeds, not both")
    if negative_prompt is not None and negative_prompt_embeds is not None:
      raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
    if output_type not in ("np", "pil", "latent"):
      raise ValueError(f"output_type={output_type!r} must be 'np', 'pil' or 'latent'")
    if self.is_pyramid:
      if num_inference_steps is not None:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} is HeliosPipeline's "
                         "(Base); this pyramid checkpoint takes pyramid_num_inference_steps_list")
      steps = pyramid_num_inference_steps_list
    else:
      if pyramid_num_inference_steps_list is not None:
        raise ValueError(f"pyramid_num_inference_steps_list={pyramid_num_inference_steps_list!r}"
                         " is HeliosPyramidPipeline's; this Base checkpoint takes "
                         "num_inference_steps")
      steps = num_inference_steps
    if latents is not None:
      warnings.warn("latents= is ignored, as diffusers 0.42.1's Helios pipelines ignore it "
                    "(their chunk loop calls prepare_latents(..., latents=None)); pass "
                    "noise={'chunks': [...]} to set the chunks' initial noise", stacklevel=2)
    seed, rng = _seed_and_key(generator)
    kind = {"np": "float", "pil": "uint8", "latent": "latent"}[output_type]
    run = self._run(
        prompt, negative_prompt, image=image, video=video, num_frames=num_frames, height=height,
        width=width, steps=steps, guidance_scale=guidance_scale, rng=rng,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        use_zero_init=use_zero_init, zero_steps=zero_steps,
        amplify_first_chunk=is_amplify_first_chunk, is_skip_first_chunk=is_skip_first_chunk,
        output_type=kind, sigmas=sigmas, num_videos_per_prompt=num_videos_per_prompt,
        max_sequence_length=max_sequence_length,
        sigma_range=(image_noise_sigma_min, image_noise_sigma_max),
        video_sigma_range=(video_noise_sigma_min, video_noise_sigma_max),
        callback_on_step_end=callback_on_step_end,
        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs)
    cond = next(run)
    chunks = list(run)
    lat = np.concatenate([c.latents for c in chunks], axis=2)
    if cond.prefix_latents is not None:
      lat = np.concatenate([np.moveaxis(np.asarray(cond.prefix_latents), -1, 1), lat], axis=2)
    if output_type == "latent":
      frames = lat
    else:
      frames = np.concatenate([c.frames for c in chunks], axis=1)
      frames = frames[:, :sampling.output_frames(len(chunks))]
      if output_type == "pil":
        from PIL import Image  # pylint: disable=g-import-not-at-top
        frames = [[Image.fromarray(f) for f in video] for video in frames]
    chunks = [dataclasses.replace(c, frames=None) for c in chunks]
    if not return_dict:
      return (frames,)
    return PipelineOutput(frames=frames, latents=lat, seed=seed, chunks=chunks)

  # ---------------------------------------------------------------------------- pure API

  @property
  def params(self) -> dict[str, nnx.State]:
    """{"transformer": DiT params, "vae": VAE params} — the first argument of `generate_fn`."""
    return {"transformer": self.transformer.params, "vae": self.vae.params}

  def generate_fn(self, num_frames: int, height: int = 384, width: int = 640, *,
                  prompt: Any = None, negative_prompt: Any = None, prompt_embeds: Any = None,
                  negative_prompt_embeds: Any = None, image: Any = None, video: Any = None,
                  is_skip_first_chunk: bool = False, rng: jax.Array | None = None,
                  **sampler_kwargs):
    """A single jitted pure function for the whole video, and its inputs.

    Returns `(fn, inputs)` with `fn(params, inputs, rng) -> {"latents": [B, 9K, h, w, C] fp32,
    "frames": [B, T, H, W, 3] uint8}` (T = `sampling.output_frames(K)`); `params` is
    `pipe.params`, `inputs` holds the text embeddings and the chunk-0 history (T2V, or I2V/V2V
    conditioning encoded with `rng`). Chunk 0 runs on its own (DMD amplification), the other
    chunks in one `jax.lax.scan`: each chunk is `stream`'s `chunk_step` followed by its
    `decode_step`, with the draws of `chunk_noise`. With the same `rng`, the
    result equals `generate(..., rng=rng)` / `generate(..., seed=s)` with rng = key(s).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or \
        num_frames < 1:
      raise ValueError(f"num_frames={num_frames!r} must be an integer >= 1")
    sc = self.sampler_config(height, width, **sampler_kwargs)
    text, neg, batch = self._texts(prompt, negative_prompt, prompt_embeds,
                                   negative_prompt_embeds, sc, False)
    cond_key = chunk_keys(jax.random.key(0) if rng is None else rng)[0]
    cond = self.prepare_conditioning(batch, height, width, image, video, cond_key)
    k_total = sampling.num_chunks(num_frames)
    flags = tuple(sampling.set_anchor_flag(k, cond.anchor_given, is_skip_first_chunk)
                  for k in range(k_total))
    fn = jax.jit(functools.partial(
        _generate_all, self.transformer.graphdef, self.vae.graphdef, sc, k_total, flags,
        self.transformer.config.in_channels, self.token_constraint))
    inputs = {"text": text, "neg_text": neg, "state": cond.state,
              "latents_mean": self.vae.latents_mean, "latents_inv_std": self.vae.latents_inv_std}
    return fn, inputs


def _generate_all(tr_graphdef, vae_graphdef, sc, k_total, flags, channels, constrain, params,
                  inputs, rng):
  """All chunks of a video as one traced program: the chunk loop of `Pipeline._run` (the same
  key derivation and draws, `chunk_step` with the pipeline's token constraint, `decode_step`),
  chunks 1..K-1 in one `lax.scan`."""
  chunk_key = chunk_keys(rng)[1]
  text, neg = inputs["text"], inputs["neg_text"]
  batch = inputs["state"].latents.shape[0]

  def one(state, k, first, set_anchor):
    noise = chunk_noise(chunk_key, k, sc, batch, channels)
    state, latents, _ = chunk_step(tr_graphdef, sc, first, params["transformer"], text, neg,
                                   state, noise, set_anchor, constrain=constrain)
    frames = decode_step(vae_graphdef, params["vae"], latents, inputs["latents_mean"],
                         inputs["latents_inv_std"], "uint8")
    return state, (latents, frames)

  state, (lat0, fr0) = one(inputs["state"], 0, True, flags[0])
  lats, frames = [lat0[None]], [fr0[None]]
  if k_total > 1:
    def body(state, xs):
      k, set_anchor = xs
      return one(state, k, False, set_anchor)
    _, (lat_r, fr_r) = jax.lax.scan(body, state, (jnp.arange(1, k_total),
                                                  jnp.asarray(flags[1:])))
    lats.append(lat_r)
    frames.append(fr_r)
  lat = jnp.concatenate(lats, axis=0)          # [K, B, 9, h, w, C]
  fr = jnp.concatenate(frames, axis=0)         # [K, B, 33, H, W, 3]
  lat = jnp.moveaxis(lat, 0, 1).reshape((batch, -1) + lat.shape[3:])
  fr = jnp.moveaxis(fr, 0, 1).reshape((batch, -1) + fr.shape[3:])
  return {"latents": lat, "frames": fr[:, :sampling.output_frames(k_total)]}


def _param_names(fn: Callable[..., Any]) -> list[str]:
  """The keyword parameter names of `fn` (for "did you mean" hints)."""
  import inspect  # pylint: disable=g-import-not-at-top
  return [p for p in inspect.signature(fn).parameters if p not in ("self", "kwargs")]


def _seed_and_key(generator: Any) -> tuple[int | None, jax.Array]:
  """(reported seed, key) of `__call__`'s `generator`: an int seed, a JAX key, or None (a fresh
  31-bit seed from os.urandom)."""
  if generator is None:
    seed = int.from_bytes(os.urandom(4), "little") >> 1
    return seed, jax.random.key(seed)
  if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
    return int(generator), jax.random.key(int(generator))
  if isinstance(generator, jax.Array) and (
      jnp.issubdtype(generator.dtype, jax.dtypes.prng_key) or
      (generator.dtype == jnp.uint32 and generator.shape == (2,))):
    return None, generator
  raise TypeError(f"generator={generator!r} ({type(generator).__name__}): pass an int seed or a "
                  "jax.random.key; torch generators cannot drive JAX's random numbers (to replay "
                  "a torch run, pass its draws as noise=, see pipeline.NOISE_KEYS)")


def _from_torch(x: Any) -> Any:
  """torch tensors -> numpy; anything else (JAX arrays stay on their device) unchanged."""
  return _to_cf(x) if hasattr(x, "detach") else x


def _to_cf(x: Any) -> np.ndarray:
  """torch tensors / arrays -> numpy (channel-first layout kept)."""
  if hasattr(x, "detach"):
    x = x.detach().cpu().float().numpy()
  return np.asarray(x)


def _injected_noise(entry: Any, sc: sampling.SamplerConfig, batch: int,
                    channels: int, k: int = 0) -> sampling.ChunkNoise:
  """Injected noise of chunk k (`noise['chunks'][k]`): a `ChunkNoise`, or the reference's
  tensors (torch layout, `NOISE_KEYS`); a missing, unknown or misshapen entry raises naming it."""
  name = f"noise['chunks'][{k}]"
  want = (batch, sampling.CHUNK_LATENT_FRAMES, sc.latent_height, sc.latent_width, channels)
  if isinstance(entry, sampling.ChunkNoise):
    if tuple(entry.eps.shape) != want or len(entry.block) != sc.num_stages - 1:
      raise ValueError(f"{name} (ChunkNoise) has eps {tuple(entry.eps.shape)} and "
                       f"{len(entry.block)} block draws; expected eps {want} (channels-last) and "
                       f"{sc.num_stages - 1}")
    return entry
  if not isinstance(entry, dict):
    raise TypeError(f"{name} must be a ChunkNoise or a dict with {list(CHUNK_NOISE_KEYS)}, got "
                    f"{type(entry).__name__}")
  unknown = [key for key in entry if key not in CHUNK_NOISE_KEYS]
  if unknown or "eps" not in entry:
    raise ValueError(f"{name} has keys {list(entry)}; expected 'eps' (and 'block' for a "
                     f"pyramid model); see pipeline.NOISE_KEYS")
  eps = _to_cf(entry["eps"])
  want_cf = (batch, channels) + want[1:4]
  if tuple(eps.shape) != want_cf:
    raise ValueError(f"{name}['eps'] has shape {tuple(eps.shape)}; expected {want_cf} "
                     "(channel-first, as the reference draws it)")
  eps = jnp.moveaxis(jnp.asarray(eps, jnp.float32), 1, -1)
  draws = list(entry.get("block", ()))
  if len(draws) != sc.num_stages - 1:
    raise ValueError(f"{name}['block'] has {len(draws)} block draws; the "
                     f"{sc.num_stages}-stage sampler needs {sc.num_stages - 1}")
  blocks = []
  for s, z in enumerate(draws):
    h, w = sc.stage_sizes()[s + 1]
    try:
      blocks.append(jnp.asarray(hs.block_noise_z_from_reference(
          _to_cf(z), batch, channels, sampling.CHUNK_LATENT_FRAMES, h, w), jnp.float32))
    except ValueError as e:
      raise ValueError(f"{name}['block'][{s}]: {e}") from None
  return sampling.ChunkNoise(eps=eps, block=tuple(blocks))
