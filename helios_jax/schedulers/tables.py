"""Host-side (numpy, float64) timestep / sigma tables and per-step solver coefficients.

Everything here runs once per call shape, outside `jit`; the results are static per-step
arrays that the jitted sampler scans over. The computations follow diffusers 0.42.1
`HeliosScheduler` / `HeliosDMDScheduler.set_timesteps` and the pipelines' table building
(`HeliosPipeline` for Base, `HeliosPyramidPipeline` for Mid / Distilled) operation by
operation, including PyTorch's `scalar / tensor = tensor.reciprocal() * scalar` evaluation
in the dynamic time shift, so the tables match the reference to the last bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.struct
import numpy as np

from helios_jax.schedulers import _numerics
from helios_jax.schedulers import pyramid
from helios_jax.schedulers.config import SchedulerConfig


def calculate_shift(image_seq_len: int, base_seq_len: int = pyramid.BASE_SEQ_LEN,
                    max_seq_len: int = pyramid.MAX_SEQ_LEN,
                    base_shift: float = pyramid.BASE_SHIFT,
                    max_shift: float = pyramid.MAX_SHIFT) -> float:
  """Dynamic-shift mu for a token count (diffusers' flux `calculate_shift`).

  Args:
    image_seq_len: noisy tokens (T h w) / (pt ph pw).
    base_seq_len: sequence length mapped to `base_shift`.
    max_seq_len: sequence length mapped to `max_shift`.
    base_shift: mu at `base_seq_len`.
    max_shift: mu at `max_seq_len`.

  Returns:
    mu (1.919167 for 8640 tokens).
  """
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  b = base_shift - m * base_seq_len
  return image_seq_len * m + b


def time_shift(mu: float, t: np.ndarray, shift_type: str = "exponential", *,
               torch_semantics: bool = True) -> np.ndarray:
  """Shifted sigmas e^mu / (e^mu + 1/t - 1) ("exponential") or mu / (mu + 1/t - 1) ("linear").

  Args:
    mu: shift parameter.
    t: sigmas in (0, 1]; t = 0 maps to exactly 0.
    shift_type: "exponential" or "linear".
    torch_semantics: evaluate `c / tensor` as `tensor.reciprocal() * c` (the reference applies
      the shift to a torch tensor); False gives numpy's true division (the reference's
      `stages == 1, sigmas is None` path applies it to a float32 numpy array).

  Returns:
    Shifted values, dtype of `t`.
  """
  t = np.asarray(t)
  if shift_type == "exponential":
    num = math.exp(float(mu))
  elif shift_type == "linear":
    num = float(mu)
  else:
    raise ValueError(f"shift_type={shift_type!r} must be 'exponential' or 'linear'")
  with np.errstate(divide="ignore"):
    den = num + (1 / t - 1)
    out = (1 / den) * num if torch_semantics else num / den
  return np.asarray(out, t.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """One `set_timesteps` result (a Base chunk, or one pyramid stage).

  Attributes:
    timesteps: [N] scheduler timesteps (float64 for every released path).
    sigmas: [N+1] sigmas; sigmas[N] = 0.
    stage_index: pyramid stage, or None for the single-resolution Base schedule.
    mu: dynamic-shift parameter passed to set_timesteps (applied only if the config enables
      dynamic shifting).
    amplified: whether the DMD schedule was doubled (first chunk).
  """

  timesteps: np.ndarray
  sigmas: np.ndarray
  stage_index: int | None = None
  mu: float | None = None
  amplified: bool = False

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])

  @property
  def model_timesteps(self) -> np.ndarray:
    """[N] int32 truncation of `timesteps` (what the pyramid pipelines feed the model)."""
    return np.trunc(self.timesteps).astype(np.int32)


def set_timesteps(config: SchedulerConfig, num_inference_steps: int,
                  stage_index: int | None = None, sigmas: np.ndarray | None = None,
                  mu: float | None = None, amplify: bool = False) -> Schedule:
  """`HeliosScheduler.set_timesteps` / `HeliosDMDScheduler.set_timesteps` in numpy.

  Args:
    config: scheduler config (DMD when `config.is_dmd`).
    num_inference_steps: steps of this schedule (per stage for pyramids).
    stage_index: pyramid stage (required iff config.stages > 1).
    sigmas: custom sigmas for the single-stage path (the Base pipeline passes
      linspace(0.999, 0, N+1)[:-1] as float64).
    mu: dynamic-shift parameter (required iff config.use_dynamic_shifting).
    amplify: DMD only: use 2n steps instead of n (`is_amplify_first_chunk` on chunk 0).

  Returns:
    The schedule.
  """
  n_steps = int(num_inference_steps)
  if n_steps < 1:
    raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
  if config.is_dmd:
    n_steps = n_steps * 2 + 1 if amplify else n_steps + 1
  n_train = int(config.num_train_timesteps)
  if config.stages == 1:
    if stage_index not in (None, 0):
      raise ValueError(f"stage_index={stage_index} given for a single-stage scheduler")
    if sigmas is None:
      sig = np.linspace(1, 1 / n_train, n_steps + 1)[:-1].astype(np.float32)
      if config.shift != 1.0:
        sig = time_shift(config.shift, sig, config.time_shift_type, torch_semantics=False)
    else:
      sig = np.asarray(sigmas)
      if sig.dtype.kind != "f":
        sig = sig.astype(np.float64)
      if sig.ndim != 1 or sig.shape[0] != n_steps:
        raise ValueError(f"sigmas of shape {sig.shape} must be 1-D with num_inference_steps="
                         f"{n_steps} entries")
    timesteps = sig * n_train
    stage_index = None
  else:
    if stage_index is None or not 0 <= int(stage_index) < config.stages:
      raise ValueError(f"stage_index={stage_index} must be in [0, {config.stages - 1}] for a "
                       f"{config.stages}-stage scheduler")
    stage_index = int(stage_index)
    if sigmas is not None:
      raise ValueError("custom sigmas are only supported for single-stage schedulers "
                       "(the pyramid reference ignores them)")
    const = pyramid.constants_for(config)
    stage_ts = const.stage_timesteps[stage_index]
    timesteps = np.linspace(float(stage_ts[0]), float(stage_ts[-1]), n_steps)
    sig = np.linspace(float(const.stage_sigmas[0]), float(const.stage_sigmas[-1]), n_steps)
  sig = np.concatenate([sig, np.zeros(1, sig.dtype)])
  if config.is_dmd:
    timesteps = timesteps[:-1]
    sig = np.concatenate([sig[:-2], sig[-1:]])
  if config.use_dynamic_shifting:
    if mu is None:
      raise ValueError("use_dynamic_shifting=True needs mu (see calculate_shift)")
    sig = time_shift(mu, sig, config.time_shift_type)
    if config.stages == 1:
      timesteps = sig[:-1] * n_train
    else:
      stage_ts = pyramid.constants_for(config).stage_timesteps[stage_index]
      t_min, t_max = stage_ts.min(), stage_ts.max()
      timesteps = t_min + sig[:-1] * (t_max - t_min)
  return Schedule(timesteps=np.array(timesteps), sigmas=np.array(sig), stage_index=stage_index,
                  mu=None if mu is None else float(mu), amplified=bool(amplify and config.is_dmd))


def base_schedule(config: SchedulerConfig, num_inference_steps: int, num_frames: int,
                  height: int, width: int, patch_size: Sequence[int] = (1, 2, 2),
                  sigmas: np.ndarray | None = None) -> Schedule:
  """The single-resolution schedule `HeliosPipeline` builds for every chunk (Helios-Base).

  Args:
    config: a single-stage scheduler config (stages = 1).
    num_inference_steps: N (50).
    num_frames: latent frames per chunk (9).
    height: latent height (48 at 384x640).
    width: latent width (80).
    patch_size: transformer patch (pt, ph, pw).
    sigmas: custom sigmas; default linspace(0.999, 0, N+1)[:-1] (float64).

  Returns:
    The schedule with mu = calculate_shift(T h w / (pt ph pw)).
  """
  if config.stages != 1:
    raise ValueError(f"Base sampling needs a single-stage scheduler, got stages={config.stages}")
  if sigmas is None:
    sigmas = np.linspace(0.999, 0.0, int(num_inference_steps) + 1)[:-1]
  seq = num_frames * height * width // int(np.prod(patch_size))
  return set_timesteps(config, num_inference_steps, sigmas=sigmas, mu=calculate_shift(seq))


def pyramid_schedules(config: SchedulerConfig, steps_per_stage: Sequence[int], num_frames: int,
                      height: int, width: int, patch_size: Sequence[int] = (1, 2, 2),
                      amplify: bool = False, pre_upsample: bool = True) -> list[Schedule]:
  """Per-stage schedules `HeliosPyramidPipeline` builds for one chunk (Mid, Distilled).

  Args:
    config: a pyramid scheduler config (stages = len(steps_per_stage)).
    steps_per_stage: steps of every stage ([20, 20, 20] Mid, [2, 2, 2] Distilled).
    num_frames: latent frames per chunk (9).
    height: full-resolution latent height (48).
    width: full-resolution latent width (80).
    patch_size: transformer patch (pt, ph, pw).
    amplify: `is_amplify_first_chunk and chunk == 0` (only DMD reacts).
    pre_upsample: shift each stage with the size before its upsample (the inference
      pipelines); False uses the stage's own size (repo training pipeline).

  Returns:
    One `Schedule` per stage.
  """
  steps_per_stage = [int(s) for s in steps_per_stage]
  if len(steps_per_stage) != config.stages:
    raise ValueError(f"steps_per_stage={steps_per_stage} needs one entry per scheduler stage "
                     f"(stages={config.stages})")
  seqs = pyramid.stage_shift_seq_lens(num_frames, height, width, config.stages, patch_size,
                                      pre_upsample)
  return [set_timesteps(config, n, stage_index=k, mu=calculate_shift(seqs[k]), amplify=amplify)
          for k, n in enumerate(steps_per_stage)]


# ---------------------------------------------------------------------------------------------
# Per-step coefficient tables. Each is a pytree of arrays with leading axis N (steps), so
# `jax.lax.scan(body, carry, table)` hands `body` one step's slice.


@flax.struct.dataclass
class EulerTable:
  """Flow-matching Euler steps x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i."""

  index: np.ndarray  # [N] int32 step index
  timestep: np.ndarray  # [N] float scheduler timestep
  model_timestep: np.ndarray  # [N] int32 truncated timestep
  sigma_delta: np.ndarray  # [N] sigma_{i+1} - sigma_i (float64)


@flax.struct.dataclass
class UniPCTable:
  """UniPC (predictor + corrector) coefficients, K = solver_order.

  Corrector at step i (active iff `corrector_on`), from the previous corrected sample xs:
    x_i <- c_ratio xs - c_x0 m_{i-1}
           - c_res (sum_k c_rho[k] (m_{i-2-k} - m_{i-1}) / c_rk[k] + c_rho_new (m_i - m_{i-1})).
  Predictor:
    x_{i+1} = p_ratio x_i - p_x0 m_i - p_res sum_k p_rho[k] (m_{i-1-k} - m_i) / p_rk[k].
  Unused history terms have rho = 0 and rk = 1.
  """

  index: np.ndarray  # [N] int32
  timestep: np.ndarray  # [N] float
  model_timestep: np.ndarray  # [N] int32
  sigma: np.ndarray  # [N] sigma_i (x0 = x - sigma_i v)
  order: np.ndarray  # [N] int32 predictor order of step i
  corrector_on: np.ndarray  # [N] bool
  c_ratio: np.ndarray  # [N]
  c_x0: np.ndarray  # [N]
  c_res: np.ndarray  # [N]
  c_rk: np.ndarray  # [N, K-1]
  c_rho: np.ndarray  # [N, K-1]
  c_rho_new: np.ndarray  # [N]
  p_ratio: np.ndarray  # [N]
  p_x0: np.ndarray  # [N]
  p_res: np.ndarray  # [N]
  p_rk: np.ndarray  # [N, K-1]
  p_rho: np.ndarray  # [N, K-1]


@flax.struct.dataclass
class DMDTable:
  """DMD steps: x0 = x - sigma v; x_next = keep_next x0 + sigma_next start (start = stage start)."""

  index: np.ndarray  # [N] int32
  timestep: np.ndarray  # [N] float
  model_timestep: np.ndarray  # [N] int32
  sigma: np.ndarray  # [N] sigma looked up from trunc(t_i)
  sigma_next: np.ndarray  # [N] sigma looked up from trunc(t_{i+1}); 0 at the last step
  keep_next: np.ndarray  # [N] 1 - sigma_next (float64)
  # float32 pieces of the three coefficients (for exact float64 emulation without x64)
  sigma_split: np.ndarray  # [N, P]
  sigma_next_split: np.ndarray  # [N, P]
  keep_next_split: np.ndarray  # [N, P]


def _common(schedule: Schedule) -> dict[str, np.ndarray]:
  n = schedule.num_steps
  return dict(index=np.arange(n, dtype=np.int32), timestep=np.asarray(schedule.timesteps),
              model_timestep=schedule.model_timesteps)


def euler_table(schedule: Schedule) -> EulerTable:
  """Euler coefficients of a schedule (`HeliosScheduler.step_euler`)."""
  s = np.asarray(schedule.sigmas, np.float64)
  return EulerTable(**_common(schedule), sigma_delta=s[1:] - s[:-1])


def _alpha_sigma(s: float, flow: bool) -> tuple[float, float]:
  if flow:
    return 1 - s, max(s, 1e-8)
  alpha = 1 / ((s ** 2 + 1) ** 0.5)
  return alpha, s * alpha


def _uni_coefficients(sig_t, sig_s0, sig_hist, order, bh1, flow, corrector):
  """Scalars of one UniP / UniC update (multistep_uni_{p,c}_bh_update, predict_x0)."""
  a_t, s_t = _alpha_sigma(sig_t, flow)
  a_s0, s_s0 = _alpha_sigma(sig_s0, flow)

  def lam(a, s):
    with np.errstate(divide="ignore"):  # sigma = 0 without flow sigmas: -inf, as the reference
      return np.log(a) - np.log(s)

  lam_t, lam_s0 = lam(a_t, s_t), lam(a_s0, s_s0)
  h = lam_t - lam_s0
  rks = [(lam(*_alpha_sigma(si, flow)) - lam_s0) / h for si in sig_hist] + [1.0]
  rks = np.asarray(rks, np.float64)
  hh = -h
  h_phi_1 = np.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1
  factorial = 1
  b_h = hh if bh1 else np.expm1(hh)
  big_r, b = [], []
  for i in range(1, order + 1):
    big_r.append(rks ** (i - 1))
    b.append(h_phi_k * factorial / b_h)
    factorial *= i + 1
    h_phi_k = h_phi_k / hh - 1 / factorial
  big_r, b = np.stack(big_r), np.asarray(b)
  if corrector:
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, b)
  elif order == 1:
    rhos = np.zeros(0)
  elif order == 2:
    rhos = np.array([0.5])
  else:
    rhos = np.linalg.solve(big_r[:-1, :-1], b[:-1])
  return dict(ratio=s_t / s_s0, x0=a_t * h_phi_1, res=a_t * b_h, rk=rks[:-1], rho=rhos)


def unipc_table(config: SchedulerConfig, schedule: Schedule) -> UniPCTable:
  """UniPC coefficients for every step of a schedule (`HeliosScheduler.step_unipc`).

  Args:
    config: a `HeliosSchedulerConfig` with scheduler_type 'unipc'.
    schedule: the stage (or Base chunk) schedule; the solver history is reset at its start.

  Returns:
    The table (float64 coefficients; cast to the sample's dtype at use, like PyTorch's 0-dim
    float64 scalars).
  """
  if config.solver != "unipc":
    raise ValueError(f"unipc_table needs a UniPC scheduler config, got solver={config.solver!r}")
  k = int(config.solver_order)
  n = schedule.num_steps
  s = [float(v) for v in schedule.sigmas]
  bh1 = config.solver_type == "bh1"
  flow = bool(config.use_flow_sigmas)
  disabled = {int(i) for i in config.disable_corrector}
  orders = []
  for i in range(n):
    o = min(k, n - i) if config.lower_order_final else k
    orders.append(min(o, min(i, k) + 1))
  cols = {name: np.zeros(n) for name in ("c_ratio", "c_x0", "c_res", "c_rho_new", "p_ratio",
                                         "p_x0", "p_res")}
  c_rk, c_rho = np.ones((n, k - 1)), np.zeros((n, k - 1))
  p_rk, p_rho = np.ones((n, k - 1)), np.zeros((n, k - 1))
  corrector_on = np.zeros(n, bool)
  for i in range(n):
    if i > 0 and (i - 1) not in disabled:
      p = orders[i - 1]
      co = _uni_coefficients(s[i], s[i - 1], [s[i - 1 - j] for j in range(1, p)], p, bh1, flow,
                             corrector=True)
      corrector_on[i] = True
      cols["c_ratio"][i], cols["c_x0"][i], cols["c_res"][i] = co["ratio"], co["x0"], co["res"]
      c_rk[i, :p - 1] = co["rk"]
      c_rho[i, :p - 1] = co["rho"][:-1]
      cols["c_rho_new"][i] = co["rho"][-1]
    p = orders[i]
    po = _uni_coefficients(s[i + 1], s[i], [s[i - j] for j in range(1, p)], p, bh1, flow,
                           corrector=False)
    cols["p_ratio"][i], cols["p_x0"][i], cols["p_res"][i] = po["ratio"], po["x0"], po["res"]
    p_rk[i, :p - 1] = po["rk"]
    p_rho[i, :p - 1] = po["rho"]
  return UniPCTable(**_common(schedule), sigma=np.asarray(s[:-1]),
                    order=np.asarray(orders, np.int32), corrector_on=corrector_on, c_rk=c_rk,
                    c_rho=c_rho, p_rk=p_rk, p_rho=p_rho, **cols)


def dmd_table(schedule: Schedule) -> DMDTable:
  """DMD coefficients (`HeliosDMDScheduler.step` inside `HeliosPyramidPipeline`).

  Sigmas are found like the reference: the step's timestep is truncated to int64 and matched
  to the nearest entry of the schedule's timesteps (first index on ties).

  Args:
    schedule: a DMD stage schedule.

  Returns:
    The table.
  """
  ts = np.asarray(schedule.timesteps, np.float64)
  sig = np.asarray(schedule.sigmas, np.float64)
  n = ts.shape[0]

  def lookup(t):
    return float(sig[int(np.argmin(np.abs(ts - float(np.trunc(t)))))])

  sigma = np.array([lookup(t) for t in ts])
  sigma_next = np.array([lookup(ts[i + 1]) if i < n - 1 else 0.0 for i in range(n)])
  keep_next = 1 - sigma_next

  def split(a):
    return np.stack([_numerics.split_coefficient(c) for c in a])

  return DMDTable(**_common(schedule), sigma=sigma, sigma_next=sigma_next, keep_next=keep_next,
                  sigma_split=split(sigma), sigma_next_split=split(sigma_next),
                  keep_next_split=split(keep_next))
