"""The per-chunk generation driver behind the server: one chunk per call, prompt switches blended.

  driver = ChunkDriver(pipe, request)          # conditioning + embeddings, nothing sampled yet
  c = driver.step()                            # chunk 0: frames [33, H, W, 3] uint8 + latents
  driver.update_prompt("a storm at sea")       # blended in from the next chunk on
  c = driver.step()

It runs exactly the programs of `Pipeline._run` (the fused path): `chunk_keys` of the seed's key,
`prepare_conditioning` with the conditioning key, chunk k's draws `chunk_noise(chunk key, k)`,
`chunk_step` (sampler + history update) and `decode_step`, so a driver fed the same prompt
schedule produces the latents of `Pipeline.generate` for the same seed. A prompt update blends as
the interactive schedule does (spec sampling.md §6, `pipeline.interactive_schedule`): the first
`interpolation_steps` chunks after the update use `lerp_embeddings(E_old, E_new, w)` with
w = linspace(0, 1, interpolation_steps)[q], then E_new. An update during a blend starts a new
blend from the embedding the last chunk used. The history is the pipeline's static-shape
`HistoryState`, so a session of any length holds constant memory.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax import pipeline as pipeline_lib
from helios_jax import sampling

# Chunks a prompt change takes to blend in (the official scripts' `interpolation_steps`).
DEFAULT_INTERPOLATION_STEPS = 3


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  """What to generate: the validated fields of a job or a realtime `session.start`.

  Attributes:
    prompt: the (first) prompt.
    negative_prompt: used when the checkpoint runs classifier-free guidance.
    seed: the run's seed (`jax.random.key(seed)`, as `Pipeline.generate(seed=...)`).
    height, width: pixels (multiples of 16; of 64 for the 3-stage pyramid).
    steps: Base steps or steps per pyramid stage; None: the checkpoint's default.
    guidance_scale: CFG scale; None: the checkpoint's default.
    num_frames: frames requested (jobs; None for a realtime session, which runs until stopped).
    image: I2V image `[H, W, 3]` uint8, or None.
    video: V2V frames `[T, H, W, 3]` uint8 (T >= 33), or None.
    interpolation_steps: chunks a prompt update blends over.
  """

  prompt: str
  negative_prompt: str = pipeline_lib.DEFAULT_NEGATIVE_PROMPT
  seed: int = 42
  height: int = 384
  width: int = 640
  steps: tuple[int, ...] | None = None
  guidance_scale: float | None = None
  num_frames: int | None = None
  image: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
  video: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
  interpolation_steps: int = DEFAULT_INTERPOLATION_STEPS

  @property
  def task(self) -> str:
    return "t2v" if self.image is None and self.video is None else (
        "i2v" if self.image is not None else "v2v")

  def describe(self) -> dict[str, Any]:
    """JSON-ready parameters (no media arrays)."""
    return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
            "height": self.height, "width": self.width,
            "steps": None if self.steps is None else list(self.steps),
            "guidance_scale": self.guidance_scale, "num_frames": self.num_frames,
            "task": self.task, "interpolation_steps": self.interpolation_steps}


@dataclasses.dataclass
class DriverChunk:
  """One finished chunk.

  Attributes:
    index: chunk number k.
    frames: `[33, H, W, 3]` uint8 decoded frames (None when not decoded).
    latents: `[1, 16, 9, h, w]` fp32 normalized latents (channel-first, as `ChunkOutput`).
    prompts: [(prompt, weight)] the chunk's embedding mixes, largest weight first.
    blend_weight: the lerp weight of the chunk's embedding (None outside a blend).
    encode_seconds: prompt encoding done at this chunk's boundary (a prompt update).
    dit_seconds, decode_seconds: wall time of the sampler and the VAE decode.
  """

  index: int
  frames: np.ndarray | None
  latents: np.ndarray
  prompts: list[tuple[str, float]]
  blend_weight: float | None
  encode_seconds: float
  dit_seconds: float
  decode_seconds: float

  @property
  def fps(self) -> float:
    """Generated frames per second of this chunk (DiT + decode)."""
    total = self.dit_seconds + self.decode_seconds
    return self.num_frames / total if total > 0 else float("nan")

  @property
  def num_frames(self) -> int:
    return pipeline_lib.CHUNK_FRAMES


def _mix(a: dict[str, float], b: dict[str, float], w: float) -> dict[str, float]:
  out = {k: (1.0 - w) * v for k, v in a.items()}
  for k, v in b.items():
    out[k] = out.get(k, 0.0) + w * v
  return {k: v for k, v in out.items() if v > 0.0}


class PromptMixer:
  """Which embedding each chunk uses: the interactive schedule, driven by live updates.

  `update(label)` queues a prompt (the latest queued one wins at the boundary); `next(encode)`
  returns the next chunk's `[1, L, D]` embedding, its prompt weights and its blend weight, and
  encodes a queued prompt with `encode(label)` when the blend starts. Thread-safe: updates may
  come from any thread, `next` runs on the generation thread.
  """

  def __init__(self, embedding: jax.Array, label: str,
               interpolation_steps: int = DEFAULT_INTERPOLATION_STEPS):
    if isinstance(interpolation_steps, bool) or not isinstance(
        interpolation_steps, (int, np.integer)) or interpolation_steps < 1:
      raise ValueError(f"interpolation_steps={interpolation_steps!r} must be an integer >= 1")
    self._lock = threading.Lock()
    self._pending: str | None = None
    self._weights = (np.linspace(0.0, 1.0, interpolation_steps) if interpolation_steps > 1
                     else np.ones(1))
    self._target, self._target_mix = embedding, {label: 1.0}
    self._last, self._last_mix = embedding, {label: 1.0}
    self._blend: tuple[jax.Array, dict[str, float]] | None = None  # start of a blend
    self._q = 0

  @property
  def interpolation_steps(self) -> int:
    return len(self._weights)

  def update(self, label: str) -> None:
    with self._lock:
      self._pending = label

  def has_pending(self) -> bool:
    with self._lock:
      return self._pending is not None

  def next(self, encode: Callable[[str], jax.Array]
           ) -> tuple[jax.Array, dict[str, float], float | None]:
    """(embedding `[1, L, D]`, {prompt: weight}, blend weight or None) for the next chunk."""
    with self._lock:
      pending, self._pending = self._pending, None
    if pending is not None:
      self._blend = (self._last, self._last_mix)
      self._target, self._target_mix = encode(pending), {pending: 1.0}
      self._q = 0
    if self._blend is None:
      emb, mix, w = self._target, self._target_mix, None
    else:
      w = float(self._weights[self._q])
      start, start_mix = self._blend
      emb = pipeline_lib.lerp_embeddings(start, self._target, w)
      mix = _mix(start_mix, self._target_mix, w)
      self._q += 1
      if self._q >= len(self._weights):
        self._blend = None
    self._last, self._last_mix = emb, mix
    return emb, mix, w


class ChunkDriver:
  """Generates one video chunk by chunk on the calling thread (see the module docstring)."""

  def __init__(self, pipe: pipeline_lib.Pipeline, request: GenerationRequest):
    if pipe.mesh is not None:
      raise ValueError("the chunk driver runs single-device pipelines; this one is sharded")
    self.pipe = pipe
    self.request = request
    self.sc = pipe.sampler_config(request.height, request.width, steps=request.steps,
                                  guidance_scale=request.guidance_scale)
    self.channels = pipe.transformer.config.in_channels
    cond_key, self._chunk_key = pipeline_lib.chunk_keys(jax.random.key(int(request.seed)))
    t0 = time.perf_counter()
    self.conditioning = pipe.prepare_conditioning(1, request.height, request.width,
                                                  image=request.image, video=request.video,
                                                  rng=cond_key)
    self.state = self.conditioning.state
    self.neg = None
    if self.sc.guidance != "none":
      self.neg = self._encode([request.negative_prompt])
    self.mixer = PromptMixer(self._encode(request.prompt), request.prompt,
                             request.interpolation_steps)
    self.setup_seconds = time.perf_counter() - t0
    self.index = 0

  def _encode(self, prompt: str | list[str]) -> jax.Array:
    return jnp.asarray(self.pipe.encode_prompt(prompt)).astype(self.pipe.transformer.dtype)[:1]

  def update_prompt(self, prompt: str) -> None:
    """Blends `prompt` in from the next chunk on (thread-safe)."""
    self.mixer.update(prompt)

  def step(self, decode: bool = True) -> DriverChunk:
    """Generates (and decodes) the next chunk.

    Raises:
      FloatingPointError: the sampler produced NaN/Inf latents.
    """
    pipe, k = self.pipe, self.index
    t0 = time.perf_counter()
    text, mix, w = self.mixer.next(self._encode)
    t1 = time.perf_counter()
    noise = pipeline_lib.chunk_noise(self._chunk_key, k, self.sc, 1, self.channels)
    set_anchor = sampling.set_anchor_flag(k, self.conditioning.anchor_given, False)
    state, latents, finite = pipeline_lib.chunk_step(
        pipe.transformer.graphdef, self.sc, k == 0, pipe.transformer.params, text, self.neg,
        self.state, noise, jnp.asarray(set_anchor), constrain=pipe.token_constraint)
    if not bool(finite):
      raise FloatingPointError(f"chunk {k}: the sampler produced NaN/Inf latents")
    t2 = time.perf_counter()
    frames = None
    if decode:
      frames = np.asarray(pipeline_lib.decode_step(
          pipe.vae.graphdef, pipe.vae.params, latents, pipe.vae.latents_mean,
          pipe.vae.latents_inv_std, "uint8"))[0]
    t3 = time.perf_counter()
    self.state = state
    self.index += 1
    prompts = sorted(mix.items(), key=lambda kv: -kv[1])
    return DriverChunk(index=k, frames=frames,
                       latents=np.moveaxis(np.asarray(latents), -1, 1), prompts=prompts,
                       blend_weight=w, encode_seconds=t1 - t0, dit_seconds=t2 - t1,
                       decode_seconds=t3 - t2)
