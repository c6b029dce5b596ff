"""Chunked autoregressive sampling with static-shape history (spec sampling.md §2-§5, §9).

One chunk = 9 latent frames (33 pixel frames). Every chunk reads a fixed-size history — the
last 19 latent frames (split long 16 / mid 2 / newest 1) plus a one-frame anchor — so the
transformer sees the same shapes and RoPE indices for every chunk and each sampler compiles
once:

  HistoryState.latents  [B, 19, h, w, C] fp32   oldest first; the newest frame is the 1x slot
  HistoryState.anchor   [B, 1, h, w, C]  fp32   first-frame anchor (RoPE t = 0)

`sample_chunk` denoises one chunk (Base: single-resolution UniPC; Mid: 3-stage pyramid +
UniPC; Distilled: 3-stage pyramid + DMD) and `advance` shifts the chunk into the history. Both
are pure functions of arrays; every random draw is an argument (`ChunkNoise`) so tests can
replay the PyTorch reference's draws. Latents are channels-last `[B, T, h, w, C]` throughout.

`run_stages` is the one stage loop (pyramid start, per-stage solver steps, block-noise
transitions) behind `sample_chunk`, the Stage 3 ODE-pair recording (`record`: the states
before chosen steps) and the Stage 3 DMD rollout (`exits`: one random exit step per stage).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import schedulers as hs
from helios_jax.constants import CHUNK_FRAMES, CHUNK_LATENT_FRAMES, HISTORY_SIZES
from helios_jax.constants import NUM_HISTORY_FRAMES, VAE_TEMPORAL_SCALE
from helios_jax.models.memory import HistoryInputs
from helios_jax.schedulers.steps import Denoise

F32 = jnp.float32


def rope_indices(history_sizes=HISTORY_SIZES, chunk=CHUNK_LATENT_FRAMES) -> dict[str, np.ndarray]:
  """The constant, chunk-relative RoPE frame indices: anchor 0, long 1..16, mid 17..18,
  newest 19 (short = [0, 19]), noisy 20..28."""
  long_n, mid_n, one_n = history_sizes
  idx = np.arange(1 + long_n + mid_n + one_n + chunk)
  cuts = np.cumsum([1, long_n, mid_n, one_n])
  prefix, long_i, mid_i, one_i, noisy = np.split(idx, cuts)
  return {"noisy": noisy, "short": np.concatenate([prefix, one_i]), "mid": mid_i,
          "long": long_i}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Everything static about sampling one chunk (hashable: a jit static argument).

  Attributes:
    scheduler: the checkpoint's scheduler config (UniPC/Euler `HeliosSchedulerConfig` or
      `HeliosDMDSchedulerConfig`).
    pyramid: True for `HeliosPyramidPipeline` (Mid, Distilled), False for `HeliosPipeline`.
    steps: (N,) for Base, steps per stage for the pyramid ((20, 20, 20) Mid, (2, 2, 2) DMD).
    guidance: 'none' | 'cfg' | 'cfg_zero_star' (see `schedulers.guidance_mode`).
    guidance_scale: w.
    use_zero_init, zero_steps: CFG-Zero* zero-init (stage 0 steps <= zero_steps).
    amplify_first_chunk: DMD doubles every stage's steps for chunk 0.
    latent_height, latent_width: full-resolution latent size (H/8, W/8).
    patch_size: transformer patch (for the dynamic-shift sequence length).
    block_noise_chol: 4x4 block-noise factor as nested tuples (None = analytic).
    base_sigmas: Base only: custom sigma table (None = linspace(0.999, 0, N+1)[:-1]).
  """

  scheduler: Any
  pyramid: bool
  steps: tuple[int, ...]
  guidance: str = "none"
  guidance_scale: float = 1.0
  use_zero_init: bool = True
  zero_steps: int = 1
  amplify_first_chunk: bool = False
  latent_height: int = 48
  latent_width: int = 80
  patch_size: tuple[int, int, int] = (1, 2, 2)
  block_noise_chol: tuple[tuple[float, ...], ...] | None = None
  base_sigmas: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.guidance not in ("none", "cfg", "cfg_zero_star"):
      raise ValueError(f"guidance={self.guidance!r} must be 'none', 'cfg' or 'cfg_zero_star'")
    if any(int(s) < 1 for s in self.steps):
      raise ValueError(f"steps={self.steps} must all be >= 1")
    if self.pyramid:
      if len(self.steps) != self.scheduler.stages:
        raise ValueError(f"pyramid steps {self.steps} need one entry per scheduler stage "
                         f"(stages={self.scheduler.stages})")
      f = 2 ** (len(self.steps) - 1)
      if self.latent_height % (2 * f) or self.latent_width % (2 * f):
        raise ValueError(
            f"latent size {self.latent_height}x{self.latent_width} must be divisible by "
            f"{2 * f} for a {len(self.steps)}-stage pyramid (pixel height/width by {16 * f})")
    else:
      if len(self.steps) != 1:
        raise ValueError(f"single-resolution sampling takes one step count, got {self.steps}")
      if self.scheduler.solver == "dmd":
        raise ValueError("a DMD scheduler needs the pyramid sampler")
    if self.guidance == "cfg_zero_star" and not self.pyramid:
      raise ValueError("CFG-Zero* exists only in the pyramid sampler (as in the reference)")

  @property
  def is_dmd(self) -> bool:
    return self.scheduler.solver == "dmd"

  @property
  def num_stages(self) -> int:
    return len(self.steps) if self.pyramid else 1

  def amplified(self, first_chunk: bool) -> bool:
    return bool(first_chunk and self.amplify_first_chunk and self.is_dmd)

  def stage_sizes(self) -> list[tuple[int, int]]:
    """Noisy latent (h, w) of every stage (coarse to fine)."""
    n = self.num_stages
    return [(self.latent_height >> (n - 1 - k), self.latent_width >> (n - 1 - k))
            for k in range(n)]


@functools.lru_cache(maxsize=64)
def _tables(sc: SamplerConfig, amplify: bool):
  """Per-stage (schedule, step table, zero-init mask), host numpy (cached per config)."""
  h, w = sc.latent_height, sc.latent_width
  if not sc.pyramid:
    sig = None if sc.base_sigmas is None else np.asarray(sc.base_sigmas, np.float64)
    schedules = [hs.base_schedule(sc.scheduler, sc.steps[0], CHUNK_LATENT_FRAMES, h, w,
                                  sc.patch_size, sigmas=sig)]
  else:
    schedules = hs.pyramid_schedules(sc.scheduler, sc.steps, CHUNK_LATENT_FRAMES, h, w,
                                     sc.patch_size, amplify=amplify)
  out = []
  for k, sched in enumerate(schedules):
    solver = sc.scheduler.solver
    if solver == "dmd":
      table = hs.dmd_table(sched)
    elif solver == "unipc":
      table = hs.unipc_table(sc.scheduler, sched)
    else:
      table = hs.euler_table(sched)
    zero = hs.zero_init_mask(sched.num_steps, k if sc.pyramid else None, sc.zero_steps,
                             sc.use_zero_init and sc.guidance == "cfg_zero_star")
    out.append((sched, table, zero))
  return out


def schedules(sc: SamplerConfig, first_chunk: bool = False):
  """The per-stage `Schedule`s a chunk uses (for display and tests)."""
  return [s for s, _, _ in _tables(sc, sc.amplified(first_chunk))]


@flax.struct.dataclass
class HistoryState:
  """The fixed-size autoregressive memory (normalized latents, channels-last).

  latents: `[B, 19, h, w, C]` fp32, oldest first.
  anchor: `[B, 1, h, w, C]` fp32 first-frame anchor (zeros until set for T2V).
  """

  latents: jax.Array
  anchor: jax.Array


def empty_history(batch: int, height: int, width: int, channels: int = 16) -> HistoryState:
  """T2V start: 19 zero frames and a zero anchor."""
  z = jnp.zeros((batch, NUM_HISTORY_FRAMES, height, width, channels), F32)
  return HistoryState(latents=z, anchor=jnp.zeros_like(z[:, :1]))


@flax.struct.dataclass
class ChunkNoise:
  """All random draws of one chunk (diffusers order: eps, then one block draw per transition).

  eps: `[B, 9, h, w, C]` fp32 full-resolution standard normal (the reference's per-chunk randn).
  block: per pyramid transition k = 1..S-1, `[B, 9, h_k/2, w_k/2, C, 4]` fp32 standard normal
    (`h_k` is stage k's latent height; convert reference draws with
    `schedulers.block_noise_z_from_reference`). Empty for Base.
  """

  eps: jax.Array
  block: tuple[jax.Array, ...] = ()


def abstract_chunk_inputs(sc: SamplerConfig, channels: int, text_dim: int, dtype: Any,
                          text_len: int, batch: int = 1) -> dict[str, Any]:
  """`jax.ShapeDtypeStruct`s of one chunk step's inputs (for lowering without real arrays).

  Returns:
    {"text" `[B, text_len, text_dim]`, "neg_text" (None without guidance), "state"
    (`HistoryState`), "noise" (`ChunkNoise`), "set_anchor" `[]` bool}.
  """
  text = jax.ShapeDtypeStruct((batch, text_len, text_dim), dtype)
  return {
      "text": text, "neg_text": text if sc.guidance != "none" else None,
      "state": jax.eval_shape(lambda: empty_history(batch, sc.latent_height, sc.latent_width,
                                                    channels)),
      "noise": jax.eval_shape(lambda k: draw_chunk_noise(k, sc, batch, channels),
                              jax.random.key(0)),
      "set_anchor": jax.ShapeDtypeStruct((), jnp.bool_)}


def draw_chunk_noise(rng: jax.Array, sc: SamplerConfig, batch: int,
                     channels: int = 16) -> ChunkNoise:
  """Fresh `ChunkNoise` from a JAX PRNG key (same shapes and order as the reference)."""
  keys = jax.random.split(rng, sc.num_stages)
  eps = jax.random.normal(keys[0], (batch, CHUNK_LATENT_FRAMES, sc.latent_height,
                                    sc.latent_width, channels), F32)
  block = tuple(
      jax.random.normal(keys[k], (batch, CHUNK_LATENT_FRAMES, h // 2, w // 2, channels, 4), F32)
      for k, (h, w) in enumerate(sc.stage_sizes()) if k > 0)
  return ChunkNoise(eps=eps, block=block)


def history_inputs(state: HistoryState, batch_repeat: int = 1) -> HistoryInputs:
  """Transformer history groups from the state: long 16, mid 2, short = [anchor, newest]."""
  lat = state.latents
  n_long, n_mid, _ = HISTORY_SIZES
  long_, mid = lat[:, :n_long], lat[:, n_long:n_long + n_mid]
  short = jnp.concatenate([state.anchor, lat[:, n_long + n_mid:]], axis=1)
  idx = rope_indices()
  b = lat.shape[0] * batch_repeat
  rep = lambda a: jnp.concatenate([a] * batch_repeat, axis=0) if batch_repeat > 1 else a
  ib = lambda i: jnp.broadcast_to(jnp.asarray(i, jnp.int32)[None], (b, len(i)))
  return HistoryInputs(short=rep(short), mid=rep(mid), long=rep(long_),
                       idx_short=ib(idx["short"]), idx_mid=ib(idx["mid"]),
                       idx_long=ib(idx["long"]))


def denoiser(graphdef: nnx.GraphDef, params: nnx.State, sc: SamplerConfig, text: jax.Array,
             neg_text: jax.Array | None, state: HistoryState, zero_mask: Any = None,
             constrain: Callable[[jax.Array], jax.Array] | None = None):
  """`denoise(x, step) -> v`: the (guided) velocity of one sampler step.

  Args:
    graphdef, params: `nnx.split` of a `HeliosTransformer3DModel` (merged inside each step).
    sc: the sampler config (guidance mode and scale; pyramid models get the truncated integer
      `step.model_timestep`, Base the float `step.timestep`).
    text: `[B, L, text_dim]` prompt embeddings.
    neg_text: `[B, L, text_dim]` negative embeddings (required when guidance is on).
    state: the history read by the chunk.
    zero_mask: CFG-Zero* per-step zero-init mask (None: no zero-init).
    constrain: the DiT's hidden-state constraint at each block entry (a device mesh's token
      sharding, `sharding.token_constraint`; None: none).

  Returns:
    The denoiser closure (the history and text are prepared once).
  """
  dt = nnx.merge(graphdef, params).dtype
  b = state.latents.shape[0]
  cfg_on = sc.guidance != "none"
  if cfg_on and neg_text is None:
    raise ValueError(f"guidance={sc.guidance!r} needs negative prompt embeddings")
  reps = 2 if cfg_on else 1
  hist = history_inputs(state, reps)
  hist = dataclasses.replace(hist, short=hist.short.astype(dt), mid=hist.mid.astype(dt),
                             long=hist.long.astype(dt))
  txt = jnp.concatenate([text, neg_text], axis=0) if cfg_on else text
  txt = txt.astype(dt)
  noisy_idx = jnp.broadcast_to(jnp.asarray(rope_indices()["noisy"], jnp.int32)[None],
                               (b * reps, CHUNK_LATENT_FRAMES))
  zero_mask = None if zero_mask is None else jnp.asarray(zero_mask)

  def denoise(x, step):
    xb = x.astype(dt)
    t = step.model_timestep if sc.pyramid else step.timestep
    if cfg_on:
      xb = jnp.concatenate([xb, xb], axis=0)
    model = nnx.merge(graphdef, params)
    v = model.forward_channels_last(xb, t, txt, noisy_idx, hist, constrain=constrain)
    if not cfg_on:
      return v
    vc, vu = v[:b], v[b:]
    if sc.guidance == "cfg_zero_star":
      return hs.cfg_zero_star(vc, vu, sc.guidance_scale, zero_mask[step.index])
    return hs.cfg(vc, vu, sc.guidance_scale)

  return denoise


def sample_chunk(graphdef: nnx.GraphDef, params: nnx.State, sc: SamplerConfig,
                 first_chunk: bool, text: jax.Array,
                 neg_text: jax.Array | None, state: HistoryState, noise: ChunkNoise,
                 chol: jax.Array | None = None,
                 constrain: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Denoises one chunk (pure; call inside jit with `sc` and `first_chunk` static).

  Args:
    graphdef, params: `nnx.split` of a `HeliosTransformer3DModel` (merged inside each step).
    sc: the sampler config.
    first_chunk: chunk 0 (DMD amplification).
    text: `[B, L, text_dim]` prompt embeddings (model dtype).
    neg_text: `[B, L, text_dim]` negative embeddings (required when guidance is on).
    state: the history read by this chunk.
    noise: this chunk's draws.
    chol: optional `[4, 4]` block-noise factor overriding `sc.block_noise_chol`.
    constrain: the DiT's hidden-state constraint at each block entry (see `denoiser`).

  Returns:
    `[B, 9, h, w, C]` chunk latents: fp32 (UniPC/Euler) or the model dtype (DMD), exactly the
    values the reference appends to its history.
  """
  dt = nnx.merge(graphdef, params).dtype
  if chol is None and sc.block_noise_chol is not None:
    chol = jnp.asarray(sc.block_noise_chol, F32)
  make_denoise = functools.partial(denoiser, graphdef, params, sc, text, neg_text, state,
                                   constrain=constrain)

  stages = _tables(sc, sc.amplified(first_chunk))
  constants = hs.pyramid.constants_for(sc.scheduler) if sc.pyramid else None
  return run_stages(noise.eps, [table for _, table, _ in stages],
                    [make_denoise(zero) for _, _, zero in stages], sc.scheduler.solver,
                    block=noise.block, constants=constants, chol=chol,
                    noise_dtype=dt).output


@flax.struct.dataclass
class Trajectory:
  """What `run_stages` returns (one entry per stage, lowest resolution first).

  ends: `[B, 9, h_k, w_k, C]` stage outputs; `ends[-1]` is the chunk (`output`).
  states: with `record`, `[B, m_k, 9, h_k, w_k, C]` inputs of the recorded steps; else ().
  """

  ends: tuple[jax.Array, ...]
  states: tuple[jax.Array, ...] = ()

  @property
  def output(self) -> jax.Array:
    return self.ends[-1]


def run_stages(eps: jax.Array, tables: Sequence[Any], denoise: Sequence[Denoise],
               solver: str, *, block: Sequence[jax.Array] = (),
               constants: hs.PyramidConstants | None = None, chol: jax.Array | None = None,
               noise_dtype: Any = F32, record: Sequence[np.ndarray] | None = None,
               exits: Sequence[jax.Array] | None = None,
               denoise_nograd: Sequence[Denoise] | None = None) -> Trajectory:
  """The stage loop of every sampler: generation, Stage 3 ODE pairs and the DMD rollout.

  Stage 0 starts from the noise downsampled S - 1 times (S = len(tables); the noise itself
  for the single-resolution Base sampler); stage k >= 1 starts from `stage_transition` of stage
  k - 1's output with the block draw `block[k - 1]`; every stage runs the steps of its table
  with `solver` (pure; call inside jit).

  Args:
    eps: `[B, 9, H, W, C]` full-resolution noise (cast to fp32).
    tables: one step table per stage, coarse to fine (`unipc_table` / `euler_table` /
      `dmd_table`; with `exits` the `[N, B, ...]` per-sample tables of `run_dmd`).
    denoise: one `denoise(x, step) -> v` per stage.
    solver: 'unipc' | 'euler' | 'dmd'.
    block: per transition k = 1..S-1, `[B, 9, h_{k-1}, w_{k-1}, C, 4]` standard-normal
      block-noise draws (`ChunkNoise.block`).
    constants: the pyramid constants of the transitions (required when S > 1).
    chol: block-noise factor (None = analytic).
    noise_dtype: dtype the block noise is rounded to before the renoise (transformer dtype).
    record: UniPC only: per stage, the static step indices whose input states are returned
      (Stage 3 ODE pairs).
    exits: DMD only: per stage, the `[B]` int32 exit step of the staged backward simulation
      (`run_dmd`'s `exit_step`; gradient only through the exit steps).
    denoise_nograd: with `exits`: per stage, `denoise` without gradient to any parameter.

  Returns:
    The `Trajectory`: stage outputs (UniPC fp32, Euler / DMD the model output dtype) and the
    recorded states.
  """
  num = len(tables)
  if solver not in ("unipc", "euler", "dmd"):
    raise ValueError(f"solver={solver!r} must be 'unipc', 'euler' or 'dmd'")
  if len(denoise) != num or len(block) != num - 1:
    raise ValueError(f"{num} stage tables need {num} denoisers and {num - 1} block draws, got "
                     f"{len(denoise)} and {len(block)}")
  if num > 1 and constants is None:
    raise ValueError(f"a {num}-stage pyramid needs its constants")
  if record is not None and (solver != "unipc" or len(record) != num):
    raise ValueError(f"record needs the 'unipc' solver and one index list per stage; got "
                     f"solver={solver!r} with {len(record)} lists for {num} stages")
  if exits is not None and (solver != "dmd" or len(exits) != num or denoise_nograd is None
                            or len(denoise_nograd) != num):
    raise ValueError("exits need the 'dmd' solver, one exit and one no-gradient denoiser per "
                     f"stage; got solver={solver!r} for {num} stages")
  x = None
  ends, states = [], []
  for k in range(num):
    x = stage_start(x, eps, block, k, num, constants, chol, noise_dtype)
    if solver == "dmd":
      x = hs.run_dmd(x, tables[k], denoise[k], None if exits is None else exits[k],
                     None if exits is None else denoise_nograd[k])
    elif solver == "euler":
      x = hs.run_euler(x, tables[k], denoise[k])
    elif record is None:
      x = hs.run_unipc(x, tables[k], denoise[k])
    else:
      x, before = hs.run_unipc(x, tables[k], denoise[k], return_states=True)
      states.append(jnp.moveaxis(before[np.asarray(record[k])], 0, 1))
    ends.append(x)
  return Trajectory(ends=tuple(ends), states=tuple(states))


def stage_start(x: jax.Array | None, eps: jax.Array, block: Sequence[jax.Array], k: int,
                num_stages: int, constants: hs.PyramidConstants | None = None,
                chol: jax.Array | None = None, noise_dtype: Any = F32) -> jax.Array:
  """The start sample of stage `k` (the one rule of `run_stages` and `sample_chunk_stepwise`).

  Args:
    x: stage k - 1's output `[B, 9, h_{k-1}, w_{k-1}, C]` (ignored for k = 0).
    eps: `[B, 9, H, W, C]` full-resolution chunk noise.
    block: the block-noise draws of the transitions (`ChunkNoise.block`).
    k: the stage (static).
    num_stages: S.
    constants, chol, noise_dtype: as `run_stages`.

  Returns:
    Stage 0: the noise downsampled S - 1 times (fp32); stage k >= 1: `stage_transition` of `x`
    with `block[k - 1]`.
  """
  if k == 0:
    return hs.noise_pyramid_start(eps.astype(F32), num_stages)
  return hs.stage_transition(x, block[k - 1], k, constants, chol=chol, noise_dtype=noise_dtype)


# A per-step observer of `sample_chunk_stepwise`: on_step(stage, i, timestep, x, text, neg_text)
# -> None (keep going) or (x, text, neg_text) replacing the sample and the embeddings.
OnStep = Callable[[int, int, float, jax.Array, jax.Array, Any], Any]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _stepwise_start(sc: SamplerConfig, k: int, noise_dtype: Any, x: jax.Array | None,
                    noise: ChunkNoise, chol: jax.Array | None) -> jax.Array:
  """`stage_start` of stage k as its own program (`sample_chunk_stepwise`)."""
  constants = hs.pyramid.constants_for(sc.scheduler) if sc.pyramid else None
  return stage_start(x, noise.eps, noise.block, k, sc.num_stages, constants, chol, noise_dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), static_argnames=("constrain",))
def _stepwise_step(graphdef: nnx.GraphDef, sc: SamplerConfig, amplify: bool, k: int,
                   params: nnx.State, text: jax.Array, neg_text: jax.Array | None,
                   state: HistoryState, carry: tuple[Any, ...], i: jax.Array, *,
                   constrain: Callable[[jax.Array], jax.Array] | None = None):
  """Solver step i of stage k: the body of `run_unipc` / `run_euler` / `run_dmd`'s scan.

  `amplify` (static) is `sc.amplified(first_chunk)`, so chunk 0 shares the programs of the other
  chunks unless DMD amplifies it.

  `carry` is (x, UniPCState) for UniPC, (x,) for Euler, (x, stage start) for DMD. Returns
  (next carry, a 0-dim array of the velocity's dtype = the stage output dtype of Euler / DMD).
  """
  _, table, zero = _tables(sc, amplify)[k]
  step = jax.tree.map(lambda a: jnp.asarray(a)[i], table)
  denoise = denoiser(graphdef, params, sc, text, neg_text, state, zero, constrain=constrain)
  x = carry[0]
  v = denoise(x, step)
  solver = sc.scheduler.solver
  if solver == "unipc":
    st, x_next = hs.unipc_step(carry[1], x, v, step)
    new = (x_next, st)
  elif solver == "euler":
    new = (hs.euler_step(x, v, step).astype(jnp.promote_types(x.dtype, v.dtype)),)
  else:
    new = (hs.dmd_step(x, v, carry[1], step)[0], carry[1])
  return new, jnp.zeros((), v.dtype)


def sample_chunk_stepwise(graphdef: nnx.GraphDef, params: nnx.State, sc: SamplerConfig,
                          first_chunk: bool, text: jax.Array, neg_text: jax.Array | None,
                          state: HistoryState, noise: ChunkNoise, *,
                          on_step: OnStep | None = None,
                          constrain: Callable[[jax.Array], jax.Array] | None = None
                          ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`sample_chunk` with one jitted program per solver step, observable between the steps.

  The same stage loop as `run_stages` (`stage_start`, then the solver's scan body step by step),
  so without changes by `on_step` it gives `sample_chunk`'s latents (up to XLA fusing the step
  differently). Host-side Python: do not call it inside jit.

  Args:
    graphdef, params, sc, first_chunk, text, neg_text, state, noise, constrain: as
      `sample_chunk`.
    on_step: called after every solver step as `on_step(stage, i, timestep, x, text, neg_text)`
      with `x` the sample after step i of `stage` (`[B, 9, h_k, w_k, C]`, channels-last);
      returns None, or `(x, text, neg_text)` used from the next step on (diffusers'
      `callback_on_step_end` replacing `latents` / `prompt_embeds` / `negative_prompt_embeds`).

  Returns:
    (chunk latents `[B, 9, h, w, C]` as `sample_chunk`, the final text and negative
    embeddings).
  """
  dt = nnx.merge(graphdef, params).dtype
  chol = None if sc.block_noise_chol is None else jnp.asarray(sc.block_noise_chol, F32)
  solver = sc.scheduler.solver
  x = None
  amplify = sc.amplified(first_chunk)
  for k, (sched, table, _) in enumerate(_tables(sc, amplify)):
    x = _stepwise_start(sc, k, dt, x, noise, chol)
    if solver == "unipc":
      carry = (x, hs.unipc_init(x, table.c_rk.shape[-1] + 1))
    elif solver == "euler":
      carry = (x,)
    else:
      carry = (x, x)
    out_dtype = x.dtype
    for i in range(sched.num_steps):
      carry, marker = _stepwise_step(graphdef, sc, amplify, k, params, text, neg_text, state,
                                     carry, i, constrain=constrain)
      out_dtype = marker.dtype
      if on_step is not None:
        upd = on_step(k, i, float(table.timestep[i]), carry[0], text, neg_text)
        if upd is not None:
          new_x, text, neg_text = upd
          carry = (jnp.asarray(new_x).astype(carry[0].dtype),) + tuple(carry[1:])
    x = carry[0] if solver == "unipc" else carry[0].astype(out_dtype)
  return x, text, neg_text


def advance(state: HistoryState, chunk: jax.Array, set_anchor: jax.Array | bool) -> HistoryState:
  """Appends a finished chunk to the history (keeping the last 19 frames).

  Args:
    state: the history before the chunk.
    chunk: `[B, 9, h, w, C]` chunk latents (any float dtype; stored fp32 like the reference's
      concatenation).
    set_anchor: (traced) bool: the anchor becomes the chunk's first latent frame (T2V after
      chunk 0; with `is_skip_first_chunk` also after chunk 1).

  Returns:
    The new state.
  """
  chunk = chunk.astype(F32)
  latents = jnp.concatenate([state.latents, chunk], axis=1)[:, -NUM_HISTORY_FRAMES:]
  anchor = jnp.where(set_anchor, chunk[:, :1], state.anchor)
  return HistoryState(latents=latents, anchor=anchor)


def set_anchor_flag(chunk_index: int, anchor_given: bool, skip_first_chunk: bool) -> bool:
  """Whether `advance` replaces the anchor after chunk `chunk_index` (reference rule)."""
  return bool((chunk_index == 0 and not anchor_given) or (skip_first_chunk and chunk_index == 1))


def num_chunks(num_frames: int) -> int:
  """K = max(1, ceil(num_frames / 33))."""
  return max(1, -(-int(num_frames) // CHUNK_FRAMES))


def output_frames(k: int) -> int:
  """Frames kept from K decoded chunks: floor((33K - 1) / 4) * 4 + 1."""
  total = k * CHUNK_FRAMES
  return (total - 1) // VAE_TEMPORAL_SCALE * VAE_TEMPORAL_SCALE + 1
