"""The distilled student's timestep schedule as Stage 3 trains it (spec training.md §2.4).

Per pyramid stage k with n steps (4 = 2n for an amplified first chunk): the DMD
`set_timesteps(n + 1)` drop-last schedule, local sigmas linspace(0.999, ~0, n + 1)[:-1],
linear dynamic shift with mu of *that level's own* token count (540 / 2160 / 8640 at 48x80;
the inference pipeline uses the pre-upsample size instead), and model timesteps
t = t_lo_k + sigma' (t_max_k - t_lo_k). The stage's 1000-entry (timestep, sigma) table is
shifted the same way; every sigma used by a loss or a rollout step is found by nearest-
timestep lookup in that table (the reference's `convert_flow_pred_to_x0` / `add_noise`).

At 384x640 this reproduces the lists hard-coded in `get_ode-pairs.py`:
  2 steps: {998.534, 833.964}, {742.822, 547.193}, {385.414, 253.991};
  4 steps: {998.534, 902.218, 833.964, 783.066}, {742.822, 640.004, 547.193, 462.995},
           {385.414, 328.625, 253.991, 151.531}.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.constants import CHUNK_LATENT_FRAMES
from helios_jax.schedulers import pyramid as pyr
from helios_jax.schedulers import tables
from helios_jax.schedulers.config import HeliosDMDSchedulerConfig

F32 = jnp.float32

# The Stage 3 trainer's scheduler: the released Distilled scheduler with linear dynamic shift.
TRAIN_SCHEDULER = HeliosDMDSchedulerConfig(use_dynamic_shifting=True, time_shift_type="linear")


@dataclasses.dataclass(frozen=True, eq=False)
class StageSchedule:
  """One pyramid stage of the student schedule (host numpy, float64).

  Attributes:
    level: pyramid stage k (0 = lowest resolution).
    timesteps: `[n]` model timesteps of the student's steps.
    table_t: `[1000]` shifted stage timestep table (descending).
    table_sigma: `[1000]` shifted stage sigma table, paired with `table_t`.
    mu: the linear shift parameter of this level.
  """

  level: int
  timesteps: np.ndarray
  table_t: np.ndarray
  table_sigma: np.ndarray
  mu: float

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])

  def sigma_of(self, t: float) -> float:
    """Host-side nearest-timestep sigma (first index on ties, as torch.argmin)."""
    return float(self.table_sigma[int(np.argmin(np.abs(self.table_t - float(t))))])

  @property
  def sigmas(self) -> np.ndarray:
    """`[n]` looked-up sigma of every step."""
    return np.array([self.sigma_of(t) for t in self.timesteps])


@functools.lru_cache(maxsize=64)
def student_schedule(steps: tuple[int, ...], height: int, width: int, amplify: bool = False,
                     patch_size: tuple[int, int, int] = (1, 2, 2),
                     window: int = CHUNK_LATENT_FRAMES) -> tuple[StageSchedule, ...]:
  """Every stage's student schedule at a full-resolution latent size.

  Args:
    steps: student steps per stage ((2, 2, 2) released).
    height, width: full-resolution latent size (48, 80 at 384x640).
    amplify: doubled steps (first chunk with an all-zero history, spec quirk 13).
    patch_size: transformer patch (token count for the shift).
    window: latent frames per chunk.

  Returns:
    One `StageSchedule` per pyramid stage, lowest resolution first.
  """
  cfg = TRAIN_SCHEDULER
  if len(steps) != cfg.stages:
    raise ValueError(f"student steps {steps} need one entry per pyramid stage ({cfg.stages})")
  const = pyr.constants_for(cfg)
  seqs = pyr.stage_shift_seq_lens(window, height, width, cfg.stages, patch_size,
                                  pre_upsample=False)
  out = []
  for k, (n, seq) in enumerate(zip(steps, seqs)):
    mu = tables.calculate_shift(seq)
    sched = tables.set_timesteps(cfg, int(n), stage_index=k, mu=mu, amplify=amplify)
    stage_t = const.stage_timesteps[k]
    t_min, t_max = float(stage_t.min()), float(stage_t.max())
    table_sigma = tables.time_shift(mu, np.asarray(const.stage_sigmas, np.float64), "linear")
    table_t = t_min + table_sigma * (t_max - t_min)
    out.append(StageSchedule(level=k, timesteps=np.asarray(sched.timesteps, np.float64),
                             table_t=table_t, table_sigma=table_sigma, mu=float(mu)))
  return tuple(out)


def nearest_sigma(t: jax.Array, table_t, table_sigma) -> jax.Array:
  """Traced nearest-timestep lookup (`[B]` timesteps -> `[B]` fp32 sigmas of a paired
  (timestep, sigma) table; first index on ties, as torch.argmin)."""
  table_t = jnp.asarray(table_t, F32)
  idx = jnp.argmin(jnp.abs(table_t[None, :] - jnp.asarray(t, F32)[:, None]), axis=1)
  return jnp.asarray(table_sigma, F32)[idx]


def lookup_sigma(t: jax.Array, stage: StageSchedule) -> jax.Array:
  """`nearest_sigma` in a stage's shifted 1000-entry table."""
  return nearest_sigma(t, stage.table_t, stage.table_sigma)


def per_sample(s: jax.Array, like: jax.Array) -> jax.Array:
  """`[B]` -> `[B, 1, ..., 1]` broadcastable against `like`."""
  return s.reshape((-1,) + (1,) * (like.ndim - 1))


def flow_to_x0(v: jax.Array, x_t: jax.Array, sigma: jax.Array) -> jax.Array:
  """x0 = x_t - sigma v (fp32), sigma `[B]` broadcast over `[B, T, h, w, C]`."""
  return x_t.astype(F32) - per_sample(sigma.astype(F32), x_t) * v.astype(F32)
