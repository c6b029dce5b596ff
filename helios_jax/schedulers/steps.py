"""Jittable solver steps (Euler, UniPC predictor-corrector, DMD) and per-stage scan loops.

All step functions are pure `jax.numpy` functions of arrays and of one step's slice of a
coefficient table from `tables.py`; the UniPC multistep history is a fixed-shape pytree, so a
stage runs as one `jax.lax.scan`. Dtypes follow the reference: the sample stays fp32, the
model output may be bf16 and `sigma * v` is then formed in bf16 (sigma itself rounded to bf16,
as PyTorch casts the 0-dim float64 sigma tensor to the output dtype) before x0 = x - sigma v
is formed in fp32 (spec sampling.md §4.3, §10).
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from helios_jax.schedulers import _numerics
from helios_jax.schedulers.tables import DMDTable, EulerTable, UniPCTable

Denoise = Callable[[jax.Array, object], jax.Array]


def _coef(c, dtype) -> jax.Array:
  """A 0-dim float64 table entry as PyTorch uses it against a `dtype` tensor."""
  return jnp.asarray(c).astype(_numerics.opmath_dtype(dtype))


# ------------------------------------------------------------------------------------- Euler


def euler_step(x: jax.Array, v: jax.Array, step: EulerTable) -> jax.Array:
  """One flow-matching Euler step (`HeliosScheduler.step_euler`).

  Args:
    x: [B, T, H, W, C] sample (upcast to fp32 as the reference does).
    v: [B, T, H, W, C] velocity (model output dtype).
    step: one step of an `EulerTable`.

  Returns:
    [B, T, H, W, C] x + (sigma_next - sigma) v, cast to the dtype of `v` (as the reference).
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return _numerics.round_to(
      _numerics.binary(jnp.add, xf, _numerics.scale_by_tensor(step.sigma_delta, v)),
      v.dtype)


# ------------------------------------------------------------------------------------- UniPC


@flax.struct.dataclass
class UniPCState:
  """UniPC multistep history (reset at the start of every schedule / pyramid stage)."""

  model_outputs: jax.Array  # [K, B, T, H, W, C] x0 estimates m_{i-K}..m_{i-1}, newest last
  last_sample: jax.Array  # [B, T, H, W, C] corrected sample of the previous step


def unipc_init(x: jax.Array, solver_order: int = 2) -> UniPCState:
  """Empty history for a sample `x` [B, T, H, W, C] (fp32)."""
  if solver_order < 1:
    raise ValueError(f"solver_order={solver_order} must be >= 1")
  return UniPCState(model_outputs=jnp.zeros((solver_order, *x.shape), x.dtype),
                    last_sample=jnp.zeros_like(x))


def _history_sum(hist: jax.Array, m0: jax.Array, rk: jax.Array, rho: jax.Array, dtype):
  """sum_k rho[k] (hist[-2-k] - m0) / rk[k]; terms with rho = 0, rk = 1 contribute exactly 0."""
  res = None
  for j in range(rk.shape[0]):
    d = (hist[hist.shape[0] - 2 - j] - m0) / _coef(rk[j], dtype)
    term = _coef(rho[j], dtype) * d
    res = term if res is None else res + term
  return res


def unipc_step(state: UniPCState, x: jax.Array, v: jax.Array,
               step: UniPCTable) -> tuple[UniPCState, jax.Array]:
  """One `HeliosScheduler.step_unipc` (bh1/bh2, any order, predict_x0, flow sigmas).

  Args:
    state: history from `unipc_init` or the previous step.
    x: [B, T, H, W, C] fp32 sample the model was evaluated at.
    v: [B, T, H, W, C] velocity (bf16 or fp32 model output, after guidance).
    step: one step of a `UniPCTable` (solver order K = step.c_rk.shape[-1] + 1).

  Returns:
    (new state, [B, T, H, W, C] next sample).
  """
  k = state.model_outputs.shape[0]
  if step.c_rk.shape[-1] != k - 1:
    raise ValueError(f"table solver order {step.c_rk.shape[-1] + 1} != history slots {k}")
  dt = x.dtype
  m = _numerics.binary(jnp.subtract, x, _numerics.scale_by_tensor(step.sigma, v))
  hist = state.model_outputs
  m_prev = hist[k - 1]
  corr = _history_sum(hist, m_prev, step.c_rk, step.c_rho, dt)
  new = _coef(step.c_rho_new, dt) * (m - m_prev)
  corr = new if corr is None else corr + new
  x_corr = (_coef(step.c_ratio, dt) * state.last_sample - _coef(step.c_x0, dt) * m_prev
            - _coef(step.c_res, dt) * corr)
  x = jnp.where(step.corrector_on, x_corr.astype(dt), x)
  hist = jnp.concatenate([hist[1:], m[None].astype(hist.dtype)], axis=0)
  x_next = _coef(step.p_ratio, dt) * x - _coef(step.p_x0, dt) * m
  pred = _history_sum(hist, m, step.p_rk, step.p_rho, dt)
  if pred is not None:
    x_next = x_next - _coef(step.p_res, dt) * pred
  return UniPCState(model_outputs=hist, last_sample=x), x_next.astype(dt)


# --------------------------------------------------------------------------------------- DMD


def _per_sample(c, ndim: int, pieces: bool = False) -> jax.Array:
  """A step coefficient of shape [] or [B] (plus a trailing [P] when `pieces`), reshaped to
  broadcast against a rank-`ndim` sample [B, ...]."""
  c = jnp.asarray(c)
  lead = c.ndim - int(pieces)
  if lead == 0:
    return c
  return c.reshape(c.shape[:lead] + (1,) * (ndim - lead) + c.shape[lead:])


def dmd_step(x: jax.Array, v: jax.Array, start: jax.Array,
             step: DMDTable) -> tuple[jax.Array, jax.Array]:
  """One `HeliosDMDScheduler.step`: x0 estimate, then re-noise towards the stage start point.

  The reference evaluates both lines in float64 and rounds once (via float32) to the storage
  dtype. Under `jax_enable_x64` this runs in float64; otherwise `_numerics.exact_affine`
  reproduces the same rounded values with float32 arithmetic only.

  Args:
    x: [B, T, H, W, C] current sample (dtype of `start`).
    v: [B, T, H, W, C] velocity (model output dtype).
    start: [B, T, H, W, C] the stage's start point P_k (the injected "noise": stage-0
      downsampled noise, or the renoised upsampled previous output).
    step: one step of a `DMDTable`; its coefficients are scalars, or `[B]` per sample (the
      Stage 3 rollout, where each sample follows its own schedule).

  Returns:
    (x_next, x0): x_next = (1 - sigma_next) x0 + sigma_next P_k in the dtype of `start`
    (equal to x0 at the stage's last step); x0 = x - sigma v in the dtype of `v`.
  """
  n = x.ndim
  if _numerics.wide_dtype() == jnp.float64:
    f64 = jnp.float64
    coef = lambda c: _per_sample(c, n).astype(f64)
    x0 = _numerics.round_to(x.astype(f64) - coef(step.sigma) * v.astype(f64), v.dtype)
    xn = coef(step.keep_next) * x0.astype(f64) + coef(step.sigma_next) * start.astype(f64)
    return _numerics.round_to(xn, start.dtype), x0
  pieces = lambda c: _per_sample(c, n, pieces=True)
  x0 = _numerics.exact_affine([(None, x), (-pieces(step.sigma_split), v)], v.dtype)
  xn = _numerics.exact_affine([(pieces(step.keep_next_split), x0),
                               (pieces(step.sigma_next_split), start)], start.dtype)
  return xn, x0


# ----------------------------------------------------------------------- per-stage scan loops


def _first(table):
  return jax.tree.map(lambda a: a[0], table)


def run_euler(x: jax.Array, table: EulerTable, denoise: Denoise) -> jax.Array:
  """All Euler steps of a schedule.

  Args:
    x: [B, T, H, W, C] start sample.
    table: `euler_table(schedule)`.
    denoise: `denoise(x, step) -> v` (step = this step's table slice).

  Returns:
    [B, T, H, W, C] final sample (the model output dtype, as the reference).
  """
  out_dtype = jax.eval_shape(denoise, x, _first(table)).dtype
  carry_dtype = jnp.promote_types(x.dtype, out_dtype)

  def body(x, step):
    # each step returns the model dtype; the wider carry holds those values exactly
    return euler_step(x, denoise(x, step), step).astype(carry_dtype), None

  return jax.lax.scan(body, x.astype(carry_dtype), table)[0].astype(out_dtype)


def run_unipc(x: jax.Array, table: UniPCTable, denoise: Denoise,
              return_states: bool = False):
  """All UniPC steps of a schedule (one Base chunk or one Mid stage).

  Args:
    x: [B, T, H, W, C] fp32 start sample.
    table: `unipc_table(config, schedule)`.
    denoise: `denoise(x, step) -> v` (guidance applied inside).
    return_states: also return the sample before every step (Stage 3 ODE pairs).

  Returns:
    [B, T, H, W, C] fp32 sample after the last step (the stage output); with
    `return_states`, the pair (that sample, [N, B, T, H, W, C] inputs of the N steps).
  """
  k = table.c_rk.shape[-1] + 1

  def body(carry, step):
    x, state = carry
    state, x_next = unipc_step(state, x, denoise(x, step), step)
    return (x_next, state), (x if return_states else None)

  (x, _), states = jax.lax.scan(body, (x, unipc_init(x, k)), table)
  return (x, states) if return_states else x


def run_dmd(start: jax.Array, table: DMDTable, denoise: Denoise,
            exit_step: jax.Array | None = None,
            denoise_nograd: Denoise | None = None) -> jax.Array:
  """All DMD steps of a pyramid stage, or (with `exit_step`) the steps up to a random exit.

  With `exit_step` (the Stage 3 staged backward simulation, spec training.md §7.5) sample b
  runs its steps i < exit_step[b] without gradient (`denoise_nograd`, re-noising towards the
  stop-gradient start point), then its exit step with `denoise`; that step's x0 is the stage
  output. Gradient therefore reaches the stage's start point only through samples whose exit
  is step 0. Every field of `table` then carries a batch axis after the step axis
  (`[N, B, ...]`: each sample follows its own schedule).

  Args:
    start: [B, T, H, W, C] stage start point P_k (fp32 for stage 0, model dtype later).
    table: `dmd_table(schedule)` (`[N, B, ...]` fields with `exit_step`).
    denoise: `denoise(x, step) -> v`.
    exit_step: optional `[B]` int32 exit step of every sample (< its schedule's length).
    denoise_nograd: with `exit_step`: the same velocity without gradient to any parameter
      (the steps before the exit run in a dynamic-length loop, which cannot be
      differentiated).

  Returns:
    [B, T, H, W, C] the last x0 estimate (stage output), in the model output dtype; with
    `exit_step`, the exit step's x0 (model output dtype).
  """
  if exit_step is None:
    out_dtype = jax.eval_shape(denoise, start, _first(table)).dtype

    def body(x, step):
      x_next, _ = dmd_step(x, denoise(x, step), start, step)
      return x_next, None

    # The last step has sigma_next = 0, so its x_next is exactly its x0 (stored in the start
    # point's dtype, which holds every model-dtype value exactly).
    return jax.lax.scan(body, start, table)[0].astype(out_dtype)

  if denoise_nograd is None:
    raise ValueError("run_dmd with exit_step needs denoise_nograd for the steps before the exit")
  start_ng = jax.lax.stop_gradient(start)

  def pre_exit(i, x):
    step = jax.tree.map(lambda a: a[i], table)
    x_next, _ = dmd_step(x, denoise_nograd(x, step), start_ng, step)
    return jnp.where(_per_sample(i < exit_step, x.ndim), x_next, x)

  pre = jax.lax.stop_gradient(
      jax.lax.fori_loop(0, jnp.max(exit_step), pre_exit, start_ng))
  x = jnp.where(_per_sample(exit_step == 0, start.ndim), start, pre)
  step = jax.tree.map(lambda a: a[exit_step, jnp.arange(start.shape[0])], table)
  return dmd_step(x, denoise(x, step), start_ng, step)[1]
