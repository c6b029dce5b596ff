"""Stage 1 flow matching and Stage 2 pyramid flow matching (spec training.md §2.1, §2.3, §7.2-7.3).

Both objectives share the sample pipeline of the jitted step: random conditioning drop
(`sample.random_drop`), Frame-Aware Corrupt of the history (`corrupt.corrupt_history`), the
model's history inputs with the fixed RoPE indices. They differ in how the noisy input and the
velocity target are drawn:

  Stage 1: sigma = sigmas[floor(1000 u)], u = sigmoid(n), n ~ N(0, 1) (logit-normal),
           sigmas[i] = (1000 - i) / 1000, t = 1000 sigma; x = (1 - sigma) x0 + sigma eps,
           target v* = eps - x0.
  Stage 2: for every pyramid level k with multiplicity r_k, r_k draws of i ~ U{0..999}: local
           sigma = stage_sigmas[i], t = stage_timesteps[k, i]; x = sigma s_k + (1 - sigma) e_k,
           target v* = s_k - e_k, with the level's start / end points built from one shared
           full-resolution noise tensor (spec §2.3). Pyramid constants come from
           `helios_jax.schedulers.pyramid` (never copied).

Loss = mean over draws of (per-sample mean squared error, then batch mean); stage 1 has one
draw. NaViT decision (spec §7.3): the reference packs all draws of a sample into one sequence
with block-diagonal attention, each segment carrying its own copy of the history; that is
exactly a separate forward per draw, so we run one forward per pyramid level (the draws of a
level batched together) and average the per-draw losses. `tests/test_training.py` checks the
equality against a packed segment-id forward.

Timesteps are floats (quirk 14: training = float convention); dynamic shifting is off in
Stages 1-2 (quirk 9, `use_dynamic_shifting: false`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.constants import CHUNK_LATENT_FRAMES, HISTORY_SIZES
from helios_jax.schedulers import pyramid as pyr
from helios_jax.training import corrupt as corrupt_lib
from helios_jax.training import sample as sample_lib
from helios_jax.training import settings

F32 = jnp.float32
NUM_TRAIN_TIMESTEPS = pyr.NUM_TRAIN_TIMESTEPS
# Stage 3 objectives (`distill.py`), run by the trainer's Stage 3 branches.
STAGE3_KINDS = ("ode_regression", "dmd")

# model_fn(x [B, T, h, w, C], t [B], text [B, L, D], frame_idx [B, T], hist) -> v [B, T, h, w, C]
ModelFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static settings of the stage objective.

  Attributes:
    kind: "flow_matching" (Stage 1) or "pyramid_flow_matching" (Stage 2).
    logit_mean, logit_std: Stage 1 logit-normal parameters (0, 1).
    multiplicities: Stage 2 draws per pyramid level, lowest resolution first ([1, 2, 1] init,
      [1, 1, 1] post).
    caption_dropout: text-embedding dropout probability (0 in released configs).
    drop: conditioning drop (derived: the `drop` group).
    corrupt: history corruption (derived: the `corrupt` group).
  """

  kind: str = "flow_matching"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  multiplicities: tuple[int, ...] = (1, 2, 1)
  caption_dropout: float = 0.0
  drop: sample_lib.DropConfig = settings.derived(sample_lib.DropConfig())
  corrupt: corrupt_lib.CorruptConfig = settings.derived(corrupt_lib.CorruptConfig())

  def __post_init__(self):
    if self.kind not in OBJECTIVES and self.kind not in STAGE3_KINDS:
      raise ValueError(f"objective kind={self.kind!r} must be one of "
                       f"{sorted(OBJECTIVES) + list(STAGE3_KINDS)}")
    if self.kind == "pyramid_flow_matching":
      if len(self.multiplicities) != pyr.NUM_STAGES or min(self.multiplicities) < 0 or (
          sum(self.multiplicities) < 1):
        raise ValueError(f"multiplicities={self.multiplicities} must be {pyr.NUM_STAGES} "
                         "non-negative counts with at least one draw")


# ------------------------------------------------------------------------------------------
# Stage 1.


def stage1_sigma_indices(key: jax.Array, batch: int, mean: float = 0.0,
                         std: float = 1.0) -> jax.Array:
  """i = floor(1000 sigmoid(n)), n ~ N(mean, std^2), clipped to [0, 999]; `[B]` int32."""
  u = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), F32))
  i = jnp.floor(u * NUM_TRAIN_TIMESTEPS).astype(jnp.int32)
  return jnp.clip(i, 0, NUM_TRAIN_TIMESTEPS - 1)


def stage1_sigma_table(n: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """`FlowMatchEulerDiscreteScheduler(n)` sigmas (shift 1): (n - i) / n, float32 as the reference
  computes them (numpy `linspace(1, n, n, float32)[::-1] / n`, correctly rounded)."""
  timesteps = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
  return (timesteps / np.float32(n)).astype(np.float32)


def stage1_sigmas(indices: jax.Array) -> jax.Array:
  """sigma_i = (1000 - i) / 1000 looked up in the reference's float32 table."""
  return jnp.asarray(stage1_sigma_table())[indices]


@flax.struct.dataclass
class Draw:
  """One noisy model input and its target.

  x: `[B, T, h, w, C]` noisy latents; t: `[B]` model timesteps; sigma: `[B]`;
  target: `[B, T, h, w, C]` velocity target; level: pyramid level (0 lowest; -1 for stage 1).
  start, end: `[B, T, h, w, C]` the flow's endpoints (stage 2: s_k, e_k; stage 1: eps, x0).
  """

  x: jax.Array
  t: jax.Array
  sigma: jax.Array
  target: jax.Array
  start: jax.Array
  end: jax.Array
  level: int = flax.struct.field(pytree_node=False, default=-1)


def stage1_draw(key: jax.Array, x0: jax.Array, mean: float = 0.0, std: float = 1.0) -> Draw:
  """Noisy input and v-target of Stage 1 flow matching.

  Args:
    key: PRNG key.
    x0: `[B, 9, h, w, C]` clean target latents.
    mean, std: logit-normal parameters.

  Returns:
    The draw (x = (1 - sigma) x0 + sigma eps, target eps - x0, t = 1000 sigma).
  """
  k_t, k_eps = jax.random.split(key)
  b = x0.shape[0]
  sigma = stage1_sigmas(stage1_sigma_indices(k_t, b, mean, std))
  x0 = x0.astype(F32)
  eps = jax.random.normal(k_eps, x0.shape, F32)
  s = sigma[:, None, None, None, None]
  x = (1.0 - s) * x0 + s * eps
  return Draw(x=x, t=sigma * NUM_TRAIN_TIMESTEPS, sigma=sigma, target=eps - x0, level=-1,
              start=eps, end=x0)


# ------------------------------------------------------------------------------------------
# Stage 2.


def pyramid_levels(x0: jax.Array, eps: jax.Array,
                   constants: pyr.PyramidConstants = pyr.HELIOS_PYRAMID):
  """Start and end points of every pyramid level (spec §2.3), lowest resolution first.

  Args:
    x0: `[B, T, H, W, C]` clean full-resolution latents.
    eps: `[B, T, H, W, C]` full-resolution noise (shared by all levels).
    constants: pyramid constants.

  Returns:
    list over levels k of (s_k, e_k), level k at `H / 2^(S-1-k)`: s_0 = eps_0,
    s_k = S_k eps_k + (1 - S_k) up_nearest(x_{k-1}); e_k = E_k eps_k + (1 - E_k) x_k
    (e_{S-1} = x_{S-1} since E = 0), with eps_{k-1} = 2 down(eps_k), x_{k-1} = down(x_k).
  """
  n = constants.num_stages
  xs, es = [x0.astype(F32)], [eps.astype(F32)]
  for _ in range(n - 1):
    xs.insert(0, pyr.downsample_2x(xs[0]))
    es.insert(0, 2.0 * pyr.downsample_2x(es[0]))
  out = []
  for k in range(n):
    s_k, e_k = float(constants.start_sigmas[k]), float(constants.end_sigmas[k])
    start = es[k] if k == 0 else s_k * es[k] + (1.0 - s_k) * pyr.upsample_nearest_2x(xs[k - 1])
    end = xs[k] if e_k == 0.0 else e_k * es[k] + (1.0 - e_k) * xs[k]
    out.append((start, end))
  return out


def pyramid_draws(key: jax.Array, x0: jax.Array, multiplicities,
                  constants: pyr.PyramidConstants = pyr.HELIOS_PYRAMID) -> list[Draw]:
  """All Stage 2 draws of a batch, one `Draw` per level with the r_k draws stacked on batch.

  Args:
    key: PRNG key.
    x0: `[B, 9, H, W, C]` clean targets (H, W divisible by 2^(S-1) times the patch size).
    multiplicities: draws per level (lowest first).
    constants: pyramid constants.

  Returns:
    Draws for the levels with r_k > 0: arrays `[r_k * B, ...]` ordered draw-major
    (draw j of sample b at row j * B + b).
  """
  k_eps, k_i = jax.random.split(key)
  b = x0.shape[0]
  eps = jax.random.normal(k_eps, x0.shape, F32)
  levels = pyramid_levels(x0, eps, constants)
  stage_sig = jnp.asarray(constants.stage_sigmas, F32)
  draws = []
  for k, (r, (start, end)) in enumerate(zip(multiplicities, levels)):
    if r == 0:
      continue
    i = jax.random.randint(jax.random.fold_in(k_i, k), (r * b,), 0, NUM_TRAIN_TIMESTEPS)
    sigma = stage_sig[i]
    t = jnp.asarray(constants.stage_timesteps[k], F32)[i]
    rep = lambda a: jnp.concatenate([a] * r, axis=0) if r > 1 else a
    s_, e_ = rep(start), rep(end)
    sg = sigma[:, None, None, None, None]
    draws.append(Draw(x=sg * s_ + (1.0 - sg) * e_, t=t, sigma=sigma, target=s_ - e_, level=k,
                      start=s_, end=e_))
  return draws


# ------------------------------------------------------------------------------------------
# Shared sample pipeline and the objectives.


def per_sample_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """`[N]` mean squared error over all but the leading axis (fp32)."""
  d = pred.astype(F32) - target.astype(F32)
  return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def prepare_conditioning(key: jax.Array, batch: dict[str, jax.Array], cfg: ObjectiveConfig):
  """Drop + corruption of the history, caption dropout; returns (hist, text, stats)."""
  k_drop, k_cor, k_cap = jax.random.split(key, 3)
  history, anchor, mode, _ = sample_lib.random_drop(
      k_drop, batch["history"], batch["anchor"], cfg.drop)
  history, anchor = corrupt_lib.corrupt_history(k_cor, history, anchor, cfg.corrupt)
  text = sample_lib.caption_dropout(k_cap, batch["text"], cfg.caption_dropout)
  stats = {"frac_t2v": jnp.mean(mode == sample_lib.T2V),
           "frac_v2v": jnp.mean(mode == sample_lib.V2V)}
  return sample_lib.history_inputs(history, anchor), text, stats


def repeat_hist(hist, r: int):
  """`HistoryInputs` tiled r times along the batch (draw-major, as the draws' inputs)."""
  if r == 1:
    return hist
  rep = lambda a: None if a is None else jnp.concatenate([a] * r, axis=0)
  return dataclasses.replace(hist, short=rep(hist.short), mid=rep(hist.mid), long=rep(hist.long),
                             idx_short=rep(hist.idx_short), idx_mid=rep(hist.idx_mid),
                             idx_long=rep(hist.idx_long))


def flow_matching_loss(model_fn: ModelFn, batch: dict[str, jax.Array], key: jax.Array,
                       cfg: ObjectiveConfig):
  """Stage 1 loss: mean((v_theta(x_sigma, t | history, text) - (eps - x0))^2).

  Args:
    model_fn: the denoiser (see `ModelFn`).
    batch: {"history" `[B, 19, h, w, C]`, "anchor" `[B, 1, h, w, C]`, "target"
      `[B, 9, h, w, C]`, "text" `[B, L, D]`}.
    key: PRNG key of this step.
    cfg: objective settings.

  Returns:
    (scalar loss, aux dict).
  """
  k_cond, k_draw = jax.random.split(key)
  hist, text, stats = prepare_conditioning(k_cond, batch, cfg)
  draw = stage1_draw(k_draw, batch["target"], cfg.logit_mean, cfg.logit_std)
  b = draw.x.shape[0]
  v = model_fn(draw.x, draw.t, text, sample_lib.noisy_indices(b), hist)
  loss = jnp.mean(per_sample_mse(v, draw.target))
  return loss, {"sigma_mean": jnp.mean(draw.sigma), **stats}


def pyramid_loss(model_fn: ModelFn, batch: dict[str, jax.Array], key: jax.Array,
                 cfg: ObjectiveConfig):
  """Stage 2 loss: mean over draws of each draw's MSE against s_k - e_k (spec §7.3).

  Args:
    model_fn: the denoiser.
    batch: as `flow_matching_loss`.
    key: PRNG key of this step.
    cfg: objective settings (multiplicities).

  Returns:
    (scalar loss, aux dict with the per-level losses).
  """
  k_cond, k_draw = jax.random.split(key)
  hist, text, stats = prepare_conditioning(k_cond, batch, cfg)
  draws = pyramid_draws(k_draw, batch["target"], cfg.multiplicities)
  b = batch["target"].shape[0]
  total, n_draws, aux = 0.0, 0, {}
  for d in draws:
    r = d.x.shape[0] // b
    v = model_fn(d.x, d.t, jnp.concatenate([text] * r, axis=0) if r > 1 else text,
                 sample_lib.noisy_indices(d.x.shape[0]), repeat_hist(hist, r))
    mse = per_sample_mse(v, d.target).reshape(r, b)   # [draw, sample]
    per_draw = jnp.mean(mse, axis=1)                  # batch mean per draw
    total = total + jnp.sum(per_draw)
    n_draws += r
    aux[f"loss_level{d.level}"] = jnp.mean(per_draw)
  return total / n_draws, {**aux, **stats}


OBJECTIVES: dict[str, Callable[..., Any]] = {
    "flow_matching": flow_matching_loss,
    "pyramid_flow_matching": pyramid_loss,
}


def check_latent_size(kind: str, height: int, width: int, patch: tuple[int, int, int]) -> None:
  """Raises if the latent size cannot run the objective (pyramid levels, patchification)."""
  pyramid = kind == "pyramid_flow_matching" or kind in STAGE3_KINDS
  f = 2 ** (pyr.NUM_STAGES - 1) if pyramid else 1
  ph, pw = patch[1], patch[2]
  if height % (f * ph) or width % (f * pw):
    raise ValueError(f"latent size {height}x{width} must be divisible by {f * ph}x{f * pw} for "
                     f"objective {kind!r} (patch {patch}, {f}x pyramid downsampling)")


def tokens_per_sample(kind: str, height: int, width: int, multiplicities=(1, 2, 1),
                      patch=(1, 2, 2), history_sizes=HISTORY_SIZES,
                      window: int = CHUNK_LATENT_FRAMES) -> int:
  """Transformer tokens processed per sample per step (history + noisy, summed over draws)."""
  pt, ph, pw = patch
  hh, ww = height // ph, width // pw
  long_n, mid_n, _ = history_sizes
  hist = 2 * hh * ww + (-(-mid_n // 2)) * (-(-hh // 2)) * (-(-ww // 2)) + (
      -(-long_n // 4)) * (-(-hh // 4)) * (-(-ww // 4))
  if kind == "flow_matching":
    return hist + window // pt * hh * ww
  total = 0
  for k, r in enumerate(multiplicities):
    f = 2 ** (pyr.NUM_STAGES - 1 - k)
    total += r * (hist + window // pt * (hh // f) * (ww // f))
  return int(total)

