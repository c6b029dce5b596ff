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
from typing import Any, Iterator, Sequence

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
from helios_jax.constants import CHUNK_FRAMES

# The official scripts' negative prompt (infer_helios.py); diffusers' API default is "".
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people in "
    "the background, walking backwards")
COND_SIGMA_RANGE = (0.111, 0.135)


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

  index: chunk number k. frames: `[B, 33, H, W, 3]` (uint8, or fp32 in [0, 1]).
  latents: `[B, 16, 9, h, w]` fp32 normalized latents (channel-first, like diffusers).
  dit_seconds / decode_seconds: wall time of the chunk's sampler and VAE decode.
  """

  index: int
  frames: np.ndarray
  latents: np.ndarray
  dit_seconds: float
  decode_seconds: float


@dataclasses.dataclass
class GenerationOutput:
  """frames: `[T, H, W, 3]` (one prompt) or `[B, T, H, W, 3]`, trimmed to 1 + 4k frames.

  latents: `[B, 16, T_lat, h, w]` fp32 — the reference's `output_type="latent"` tensor
  (conditioning latents first for I2V/V2V, then every generated chunk).
  chunks: per-chunk timings.
  """

  frames: np.ndarray
  latents: np.ndarray
  chunks: list[ChunkOutput]

  @property
  def fps(self) -> float:
    total = sum(c.dit_seconds + c.decode_seconds for c in self.chunks)
    n = self.frames.shape[-4]
    return n / total if total else float("nan")


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
                        block_noise_chol: Any = None) -> sampling.SamplerConfig:
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

  Raises:
    ValueError: naming the bad value.
  """
  for name, v in (("height", height), ("width", width)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % 16:
      raise ValueError(f"{name}={v!r} must be a positive multiple of 16")
  defaults = variants.checkpoint_defaults(flags, scheduler)
  steps = defaults.steps if steps is None else (
      (int(steps),) if np.isscalar(steps) else tuple(int(s) for s in steps))
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
      latent_width=width // 8, patch_size=tuple(patch_size), block_noise_chol=chol)


def read_pipeline_settings(path: str | os.PathLike) -> tuple[Any, Any, Any]:
  """(scheduler config, model_index flags, transformer config) of a pipeline folder.

  Reads only the JSON files (milliseconds, no weights).

  Raises:
    CheckpointError / ConfigError: a missing folder or file, or an invalid config.
  """
  from helios_jax.config import HeliosTransformerConfig  # pylint: disable=g-import-not-at-top
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


class Pipeline:
  """A loaded Helios checkpoint (transformer, VAE, text encoder, tokenizer, scheduler).

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
                      release_text_encoder: bool = False, lora: Any = None) -> "Pipeline":
    """Loads `transformer/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json`.

    Args:
      path: a diffusers pipeline folder or our Orbax export of one.
      dtype: transformer and text-encoder dtype (bf16 as the reference); the VAE is fp32.
      kernels: `KernelConfig` for the DiT (attention / norm / RoPE implementations).
      load_text_encoder: False skips the umT5 stack (pass `prompt_embeds` to generate).
      text_encoder_device: run the encoder on this device (e.g. `jax.devices("cpu")[0]`).
      release_text_encoder: free the encoder after each prompt encoding (reloads lazily).
      lora: `[(path, scale), ...]` LoRA / partial-parameter files fused into the DiT at load
        (`load_transformer(lora=...)`, `models/lora.py`).
    """
    from helios_jax.models.text_encoder import load_text_encoder as _load_te  # pylint: disable=g-import-not-at-top
    from helios_jax.models.transformer import load_transformer  # pylint: disable=g-import-not-at-top
    from helios_jax.models.vae import load_vae  # pylint: disable=g-import-not-at-top
    from helios_jax.text import load_tokenizer  # pylint: disable=g-import-not-at-top
    path = os.fspath(path)
    scheduler, flags, _ = read_pipeline_settings(path)
    transformer = load_transformer(os.path.join(path, "transformer"), dtype, kernels=kernels,
                                   lora=lora)
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

  def _vae_sample(self, video_cf: np.ndarray, eps: Any, rng: jax.Array) -> jax.Array:
    """Normalized posterior sample of `[B, 3, T, H, W]` -> `[B, T_lat, h, w, C]`."""
    if eps is None:
      z = self.vae.encode(video_cf, sample=True, rng=rng)
    else:
      z = self.vae.encode(video_cf, sample=True, noise=_to_cf(eps))
    return jnp.moveaxis(self.vae.normalize(z), 1, -1)

  def prepare_conditioning(self, batch: int, height: int, width: int, image: Any = None,
                           video: Any = None, rng: jax.Array | None = None,
                           noise: dict[str, Any] | None = None,
                           sigma_range: tuple[float, float] = COND_SIGMA_RANGE) -> Conditioning:
    """The chunk-0 history for T2V / I2V / V2V (spec §3.2), reference draw order (§9).

    Args:
      batch: B.
      height, width: output size in pixels.
      image: I2V image (path, PIL image or `[H, W, 3]` array).
      video: V2V video (path or `[T, H, W, 3]` array), at least 33 frames.
      rng: key for the draws not given in `noise`.
      noise: injected draws in the reference's layouts (eps channel-first `[B, C, T, h, w]`,
        uniforms are the raw U[0, 1) draws before scaling to `sigma_range`): I2V
        'image_posterior', 'fake_posterior', 'image_uniform' [1], 'image_eps', 'fake_uniform'
        [1], 'fake_eps'; V2V 'first_posterior', 'block_posteriors' (list), 'anchor_uniform' [1],
        'anchor_eps', 'block_uniforms' (list of [9]), 'block_eps' (list).
    """
    from helios_jax import media  # pylint: disable=g-import-not-at-top
    h, w, c = height // 8, width // 8, self.transformer.config.in_channels
    empty = sampling.empty_history(batch, h, w, c)
    if image is not None and video is not None:
      raise ValueError("pass image (I2V) or video (V2V), not both")
    if image is None and video is None:
      return Conditioning(empty, anchor_given=False)
    noise = dict(noise or {})
    keys = iter(jax.random.split(jax.random.key(0) if rng is None else rng, 64))
    lo, hi = sigma_range

    def draw_sigma(given, n=1):  # sigma = U[0, 1) * (hi - lo) + lo in fp32, as the reference
      if given is not None:
        u = jnp.asarray(_to_cf(given), jnp.float32).reshape(n)
      else:
        u = jax.random.uniform(next(keys), (n,), jnp.float32)
      return u * jnp.float32(hi - lo) + jnp.float32(lo)

    def draw_eps(name, shape):
      if name in noise:
        return jnp.moveaxis(jnp.asarray(_to_cf(noise[name]), jnp.float32), 1, -1)
      return jax.random.normal(next(keys), shape, jnp.float32)

    def blend(sig, eps, lat):  # sigma * eps + (1 - sigma) * latents, sigma per frame
      sig = sig.reshape(1, -1, 1, 1, 1)
      return sig * eps + (1 - sig) * lat

    if image is not None:
      img = media.load_image(image, height, width)                   # [3, H, W] in [-1, 1]
      frame = np.broadcast_to(img[None, :, None], (batch, 3, 1, height, width))
      i_lat = self._vae_sample(frame, noise.get("image_posterior"), next(keys))
      fake = np.broadcast_to(frame, (batch, 3, CHUNK_FRAMES, height, width))
      f_lat = self._vae_sample(fake, noise.get("fake_posterior"), next(keys))[:, -1:]
      i_sig = draw_sigma(noise.get("image_uniform"))
      anchor = blend(i_sig, draw_eps("image_eps", i_lat.shape), i_lat)
      f_sig = draw_sigma(noise.get("fake_uniform"))
      fake_lat = blend(f_sig, draw_eps("fake_eps", f_lat.shape), f_lat)
      state = sampling.HistoryState(
          latents=jnp.concatenate([empty.latents[:, :-1], fake_lat], axis=1), anchor=anchor)
      return Conditioning(state, anchor_given=True, prefix_latents=fake_lat)

    vid = media.load_video(video, height, width)                      # [3, T, H, W] in [-1, 1]
    n_blocks = vid.shape[1] // CHUNK_FRAMES
    if n_blocks == 0:
      raise ValueError(f"V2V video has {vid.shape[1]} frames; at least {CHUNK_FRAMES} needed")
    start = vid.shape[1] - n_blocks * CHUNK_FRAMES
    vb = np.broadcast_to(vid[None], (batch,) + vid.shape)
    first = self._vae_sample(vb[:, :, :1], noise.get("first_posterior"), next(keys))
    posts = noise.get("block_posteriors") or [None] * n_blocks
    blocks = [self._vae_sample(vb[:, :, start + i * CHUNK_FRAMES:start + (i + 1) * CHUNK_FRAMES],
                               posts[i], next(keys)) for i in range(n_blocks)]
    a_sig = draw_sigma(noise.get("anchor_uniform"))
    anchor = blend(a_sig, draw_eps("anchor_eps", first.shape), first)
    noised = []
    for i, lat in enumerate(blocks):
      sig = draw_sigma(noise["block_uniforms"][i] if "block_uniforms" in noise else None,
                       lat.shape[1])
      eps = (jnp.moveaxis(jnp.asarray(_to_cf(noise["block_eps"][i]), jnp.float32), 1, -1)
             if "block_eps" in noise else jax.random.normal(next(keys), lat.shape, jnp.float32))
      noised.append(blend(sig, eps, lat))
    video_lat = jnp.concatenate(noised, axis=1)
    hist = jnp.concatenate([empty.latents, video_lat], axis=1)[:, -sampling.NUM_HISTORY_FRAMES:]
    state = sampling.HistoryState(latents=hist, anchor=anchor)
    return Conditioning(state, anchor_given=True, prefix_latents=video_lat)

  # ---------------------------------------------------------------------------- sampling

  def _texts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, sc,
             interpolate_prompts: bool):
    if prompt_embeds is None:
      if prompt is None:
        raise ValueError("pass prompt or prompt_embeds")
      if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError("prompt list is empty")
      prompt_embeds = self.encode_prompt(prompt)
    prompt_embeds = jnp.asarray(prompt_embeds).astype(self.transformer.dtype)
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.transformer.config.text_dim:
      raise ValueError(f"prompt_embeds must be [B, L, {self.transformer.config.text_dim}], got "
                       f"{tuple(prompt_embeds.shape)}")
    batch = 1 if interpolate_prompts else prompt_embeds.shape[0]
    neg = None
    if sc.guidance != "none":
      if negative_prompt_embeds is None:
        neg_text = "" if negative_prompt is None else negative_prompt
        negs = [neg_text] * batch if isinstance(neg_text, str) else list(neg_text)
        negative_prompt_embeds = self.encode_prompt(negs)
      neg = jnp.asarray(negative_prompt_embeds).astype(self.transformer.dtype)[:batch]
      if neg.shape[0] != batch:
        raise ValueError(f"negative_prompt_embeds batch {neg.shape[0]} != {batch}")
    return prompt_embeds, neg, batch

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
             conditioning: Conditioning | None = None) -> Iterator[Any]:
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
      seed / rng: randomness (rng wins); ignored for draws given in `noise`.
      prompt_embeds / negative_prompt_embeds: precomputed `[B, L, text_dim]` embeddings.
      use_zero_init, zero_steps: CFG-Zero* zero-init (Mid).
      amplify_first_chunk: DMD doubles chunk 0's steps (default on for DMD checkpoints).
      is_skip_first_chunk: re-anchor on chunk 1's first frame (I2V/V2V with a static start).
      interpolate_prompts, interpolate_time, interpolation_steps: interactive prompt switching
        (spec §6).
      noise: injected draws: 'chunks' = list of `ChunkNoise` (or dicts with 'eps'
        `[B, C, 9, h, w]` and 'block' = reference block draws `[N, 4]`), plus the
        conditioning keys of `prepare_conditioning`.
      output_type: 'uint8' | 'float' ([0, 1]).
      block_noise_chol: 4x4 block-noise factor (e.g. dumped from a CUDA reference run).
      progress: tqdm bar over chunks.
      conditioning: a precomputed `Conditioning` (skips image/video encoding).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or \
        num_frames < 1:
      raise ValueError(f"num_frames={num_frames!r} must be an integer >= 1")
    if output_type not in ("uint8", "float"):
      raise ValueError(f"output_type={output_type!r} must be 'uint8' or 'float'")
    sc = self.sampler_config(height, width, steps=steps, guidance_scale=guidance_scale,
                             use_zero_init=use_zero_init, zero_steps=zero_steps,
                             amplify_first_chunk=amplify_first_chunk,
                             block_noise_chol=block_noise_chol)
    text, neg, batch = self._texts(prompt, negative_prompt, prompt_embeds,
                                   negative_prompt_embeds, sc, interpolate_prompts)
    k_total = sampling.num_chunks(num_frames)
    plan = None
    if interpolate_prompts:
      k_total, plan = interactive_schedule(k_total, text.shape[0], interpolate_time,
                                           interpolation_steps)
    if rng is None:
      rng = jax.random.key(0 if seed is None else int(seed))
    cond_key, chunk_key = chunk_keys(rng)
    noise = dict(noise or {})
    if conditioning is None:
      conditioning = self.prepare_conditioning(batch, height, width, image, video, cond_key,
                                               noise)
    yield conditioning
    state = conditioning.state
    injected = noise.get("chunks")
    if injected is not None and len(injected) < k_total:
      raise ValueError(f"noise['chunks'] has {len(injected)} entries for {k_total} chunks")
    c = self.transformer.config.in_channels
    bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=k_total, desc="chunks", unit="chunk")
    try:
      for k in range(k_total):
        if injected is not None:
          cn = _injected_noise(injected[k], sc, batch, c)
        else:
          cn = chunk_noise(chunk_key, k, sc, batch, c)
        t_k = text if plan is None else lerp_embeddings(text[plan[k][0]], text[plan[k][1]],
                                                         plan[k][2])[None]
        set_anchor = sampling.set_anchor_flag(k, conditioning.anchor_given, is_skip_first_chunk)
        t0 = time.perf_counter()
        state, latents, finite = chunk_step(
            self.transformer.graphdef, sc, k == 0, self.transformer.params,
            *self._on_mesh((t_k, neg, state, cn, jnp.asarray(set_anchor))),
            constrain=self.token_constraint)
        latents = self._on_vae_device(latents)
        if not bool(finite):
          raise FloatingPointError(f"chunk {k}: the sampler produced NaN/Inf latents")
        t1 = time.perf_counter()
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
      if bar is not None:
        bar.close()

  def generate(self, prompt: str | Sequence[str] | None = None, negative_prompt: Any = None,
               **kwargs) -> GenerationOutput:
    """Runs `stream` to the end; frames trimmed to floor((33K - 1) / 4) * 4 + 1.

    Takes the arguments of `_run`. Returns a `GenerationOutput` (frames `[T, H, W, 3]` for a
    single prompt, `[B, T, H, W, 3]` for a batch; latents `[B, 16, T_lat, h, w]`).
    """
    run = self._run(prompt, negative_prompt, **kwargs)
    cond = next(run)
    chunks = list(run)
    frames = np.concatenate([c.frames for c in chunks], axis=1)
    frames = frames[:, :sampling.output_frames(len(chunks))]
    latents = np.concatenate([c.latents for c in chunks], axis=2)
    if cond.prefix_latents is not None:
      prefix = np.moveaxis(np.asarray(cond.prefix_latents), -1, 1)
      latents = np.concatenate([prefix, latents], axis=2)
    single = frames.shape[0] == 1 and (prompt is None or isinstance(prompt, str) or
                                       kwargs.get("interpolate_prompts", False))
    return GenerationOutput(frames=frames[0] if single else frames, latents=latents,
                            chunks=chunks)


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


def _to_cf(x: Any) -> np.ndarray:
  """torch tensors / arrays -> numpy (channel-first layout kept)."""
  if hasattr(x, "detach"):
    x = x.detach().cpu().float().numpy()
  return np.asarray(x)


def _injected_noise(entry: Any, sc: sampling.SamplerConfig, batch: int,
                 channels: int) -> sampling.ChunkNoise:
  """Injected chunk noise: a `ChunkNoise`, or reference tensors (torch layout)."""
  if isinstance(entry, sampling.ChunkNoise):
    return entry
  eps = jnp.moveaxis(jnp.asarray(_to_cf(entry["eps"]), jnp.float32), 1, -1)
  want = (batch, sampling.CHUNK_LATENT_FRAMES, sc.latent_height, sc.latent_width, channels)
  if eps.shape != want:
    raise ValueError(f"injected chunk noise has shape {tuple(eps.shape)} (channels-last); "
                     f"expected {want}")
  blocks = []
  for k, z in enumerate(entry.get("block", ())):
    h, w = sc.stage_sizes()[k + 1]
    blocks.append(jnp.asarray(hs.block_noise_z_from_reference(
        _to_cf(z), batch, channels, sampling.CHUNK_LATENT_FRAMES, h, w), jnp.float32))
  if len(blocks) != sc.num_stages - 1:
    raise ValueError(f"injected chunk noise has {len(blocks)} block draws; the "
                     f"{sc.num_stages}-stage sampler needs {sc.num_stages - 1}")
  return sampling.ChunkNoise(eps=eps, block=tuple(blocks))
