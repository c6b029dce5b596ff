"""Fused LayerNorm, adaLN-modulated LayerNorm and RMSNorm (Pallas, Triton lowering).

All three compute their statistics and the normalised value in fp32 and round ONCE, at the
store, to the input dtype (Helios numerics, architecture.md §3.7/§3.9/§9):

  layer_norm_modulate: cast(LN(x_f32) * (1 + scale) + shift)    non-affine LN, adaLN rows
  layer_norm:          cast(LN(x_f32) * w_f32 + b_f32)           FP32LayerNorm (affine optional)
  rms_norm:            cast(x_f32 * rsqrt(mean(x_f32^2) + eps) * w_f32)    torch.nn.RMSNorm

Kernel layout: a program owns `block_rows` rows; the feature axis is a single power-of-two
block `next_pow2(D)` with masked loads/stores beyond D (D = 5120 -> 8192, one row per
program, 16 warps, as Helios' Triton norms). Rows beyond the array end are masked too.

Backward (`jax.custom_vjp`): dx is a Pallas kernel (one pass over x and dy, using the fp32
per-row statistics saved by the forward); the parameter gradients (weight, bias, shift,
scale: reductions over rows) are XLA reductions.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common

# --------------------------------------------------------------------------------------
# References (pure jnp, fp32 math, one rounding). These are also the "xla" implementations.
# --------------------------------------------------------------------------------------


def _ln_stats_reference(xf: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return mean, lax.rsqrt(var + eps)


def layer_norm_modulate_reference(x, shift, scale, *, num_history: int, eps: float = 1e-6):
  """adaLN: `cast(LN(x_f32) * (1 + scale) + shift)` with per-segment modulation rows.

  Args:
    x: `[B, S, D]` activations (bf16/fp16/fp32).
    shift: `[B or 1, 2, D]` fp32; row 0 modulates tokens `s < num_history`, row 1 the rest.
    scale: `[B or 1, 2, D]` fp32, same row convention.
    num_history: static number of leading (history) tokens, `0 <= num_history <= S`.
    eps: LayerNorm epsilon.

  Returns:
    `[B, S, D]` in x.dtype.
  """
  _check_modulate_args(x, shift, scale, num_history)
  xf = x.astype(jnp.float32)
  mean, rstd = _ln_stats_reference(xf, eps)
  xhat = (xf - mean) * rstd
  is_hist = (jnp.arange(x.shape[1]) < num_history)[None, :, None]  # [1, S, 1]
  sc = jnp.where(is_hist, scale[:, 0:1].astype(jnp.float32), scale[:, 1:2].astype(jnp.float32))
  sh = jnp.where(is_hist, shift[:, 0:1].astype(jnp.float32), shift[:, 1:2].astype(jnp.float32))
  return (xhat * (1.0 + sc) + sh).astype(x.dtype)


def layer_norm_reference(x, weight=None, bias=None, *, eps: float):
  """LayerNorm over the last axis in fp32, optional affine, one rounding to x.dtype.

  Args:
    x: `[..., D]` activations.
    weight: optional `[D]` scale (any float dtype; applied in fp32).
    bias: optional `[D]` offset (any float dtype; applied in fp32).
    eps: LayerNorm epsilon.

  Returns:
    `[..., D]` in x.dtype.
  """
  _check_affine_args(x, weight, bias)
  xf = x.astype(jnp.float32)
  mean, rstd = _ln_stats_reference(xf, eps)
  y = (xf - mean) * rstd
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def rms_norm_reference(x, weight, *, eps: float):
  """torch.nn.RMSNorm numerics: `cast(x_f32 * rsqrt(mean(x_f32^2) + eps) * w_f32)`.

  Args:
    x: `[..., D]` activations.
    weight: `[D]` scale (bf16 in Helios; applied in fp32).
    eps: epsilon.

  Returns:
    `[..., D]` in x.dtype.
  """
  _check_affine_args(x, weight, None, weight_required=True)
  xf = x.astype(jnp.float32)
  rstd = lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return (xf * rstd * weight.astype(jnp.float32)).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------------------


def _check_modulate_args(x, shift, scale, num_history) -> None:
  if x.ndim != 3:
    raise ValueError(f"x.shape={x.shape} must be [B, S, D]")
  b, s, d = x.shape
  for name, t in (("shift", shift), ("scale", scale)):
    if t.ndim != 3 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (2, d):
      raise ValueError(f"{name}.shape={tuple(t.shape)} must be [B or 1, 2, D] = "
                       f"[{b} or 1, 2, {d}]")
  if shift.shape != scale.shape:
    raise ValueError(f"shift.shape={tuple(shift.shape)} != scale.shape={tuple(scale.shape)}")
  if not isinstance(num_history, int) or not 0 <= num_history <= s:
    raise ValueError(f"num_history={num_history!r} must be a static int in [0, S={s}]")


def _check_affine_args(x, weight, bias, weight_required: bool = False) -> None:
  if x.ndim < 1 or x.shape[-1] == 0:
    raise ValueError(f"x.shape={x.shape} must be [..., D] with D > 0")
  d = x.shape[-1]
  if weight_required and weight is None:
    raise ValueError("weight is required")
  for name, t in (("weight", weight), ("bias", bias)):
    if t is not None and tuple(t.shape) != (d,):
      raise ValueError(f"{name}.shape={tuple(t.shape)} must be [D] = ({d},)")


def _check_pallas_row_width(d: int) -> None:
  if d > _common.MAX_ROW_BLOCK:
    raise _common.PallasUnsupportedError(
        f"feature size D={d} exceeds the single-block limit {_common.MAX_ROW_BLOCK}")


def _row_layout(num_rows: int, d: int) -> tuple[int, int]:
  """(block_rows, block_d) for a row kernel over `num_rows` rows of width d."""
  block_d = _common.next_pow2(d)
  block_rows = min(_common.rows_per_block(block_d), _common.next_pow2(num_rows))
  return block_rows, block_d


# --------------------------------------------------------------------------------------
# Kernel bodies. Refs are [block_rows, block_d] (rows x features) unless noted.
# --------------------------------------------------------------------------------------


def _row_masks(row0, block_rows: int, num_rows: int, block_d: int, d: int):
  rows = row0 + jnp.arange(block_rows)
  row_ok = rows < num_rows
  col_ok = jnp.arange(block_d) < d
  return rows, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


def _ln_stats(x, mask, d: int):
  """fp32 mean and rstd of each row of x ([rows, block_d], zeros where masked)."""
  mean = jnp.sum(x, axis=1) / d
  xc = jnp.where(mask, x - mean[:, None], 0.0)
  var = jnp.sum(xc * xc, axis=1) / d
  return mean, xc, var


def _ln_fwd_kernel(x_ref, w_ref, b_ref, o_ref, mean_ref, rstd_ref, *, eps, d, num_rows,
                   block_rows, block_d):
  _, row_ok, col_ok, mask = _row_masks(pl.program_id(0) * block_rows, block_rows, num_rows,
                                       block_d, d)
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
  mean, xc, var = _ln_stats(x, mask, d)
  rstd = lax.rsqrt(var + eps)
  y = xc * rstd[:, None]
  if w_ref is not None:
    y = y * plgpu.load(w_ref, mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
  if b_ref is not None:
    y = y + plgpu.load(b_ref, mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
  plgpu.store(o_ref, y.astype(o_ref.dtype), mask=mask)
  plgpu.store(mean_ref, mean, mask=row_ok)
  plgpu.store(rstd_ref, rstd, mask=row_ok)


def _modulate_fwd_kernel(x_ref, shift_ref, scale_ref, o_ref, mean_ref, rstd_ref, *, eps, d,
                         num_rows, num_history, block_rows, block_d):
  # x_ref/o_ref: [block_rows, block_d] of one batch element; shift/scale_ref: [2, block_d].
  rows, row_ok, col_ok, mask = _row_masks(pl.program_id(1) * block_rows, block_rows, num_rows,
                                          block_d, d)
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
  mean, xc, var = _ln_stats(x, mask, d)
  rstd = lax.rsqrt(var + eps)
  xhat = xc * rstd[:, None]
  sc, sh = _select_modulation(shift_ref, scale_ref, rows, col_ok, num_history)
  y = xhat * (1.0 + sc) + sh
  plgpu.store(o_ref, y.astype(o_ref.dtype), mask=mask)
  plgpu.store(mean_ref, mean, mask=row_ok)
  plgpu.store(rstd_ref, rstd, mask=row_ok)


def _load_table_row(ref, row: int, col_ok):
  """Row `row` of a [2, block_d] modulation table as a [1, block_d] fp32 value."""
  return plgpu.load(ref.at[pl.ds(row, 1), :], mask=col_ok[None, :], other=0.0)


def _select_modulation(shift_ref, scale_ref, rows, col_ok, num_history: int):
  """Per-row (scale, shift) [rows, block_d] fp32: row 0 for history tokens, row 1 after."""
  sc1 = _load_table_row(scale_ref, 1, col_ok)
  sh1 = _load_table_row(shift_ref, 1, col_ok)
  if num_history == 0:
    return sc1, sh1
  sc0 = _load_table_row(scale_ref, 0, col_ok)
  sh0 = _load_table_row(shift_ref, 0, col_ok)
  is_hist = (rows < num_history)[:, None]
  return jnp.where(is_hist, sc0, sc1), jnp.where(is_hist, sh0, sh1)


def _rms_fwd_kernel(x_ref, w_ref, o_ref, rstd_ref, *, eps, d, num_rows, block_rows, block_d):
  _, row_ok, col_ok, mask = _row_masks(pl.program_id(0) * block_rows, block_rows, num_rows,
                                       block_d, d)
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
  rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)
  w = plgpu.load(w_ref, mask=col_ok, other=0.0).astype(jnp.float32)
  y = x * rstd[:, None] * w[None, :]
  plgpu.store(o_ref, y.astype(o_ref.dtype), mask=mask)
  plgpu.store(rstd_ref, rstd, mask=row_ok)


def _norm_dx(g, xhat, rstd, d: int, center: bool):
  """dx of a normalisation given g = dL/dxhat (fp32, zero outside the row).

  LayerNorm (center=True):  rstd * (g - mean(g) - xhat * mean(g * xhat))
  RMSNorm   (center=False): rstd * (g - xhat * mean(g * xhat))
  """
  c1 = jnp.sum(g * xhat, axis=1) / d
  dx = g - xhat * c1[:, None]
  if center:
    dx = dx - (jnp.sum(g, axis=1) / d)[:, None]
  return dx * rstd[:, None]


def _ln_bwd_dx_kernel(x_ref, w_ref, dy_ref, mean_ref, rstd_ref, dx_ref, *, d, num_rows,
                      block_rows, block_d):
  _, row_ok, col_ok, mask = _row_masks(pl.program_id(0) * block_rows, block_rows, num_rows,
                                       block_d, d)
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
  g = plgpu.load(dy_ref, mask=mask, other=0.0).astype(jnp.float32)
  mean = plgpu.load(mean_ref, mask=row_ok, other=0.0)
  rstd = plgpu.load(rstd_ref, mask=row_ok, other=0.0)
  if w_ref is not None:
    g = g * plgpu.load(w_ref, mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
  xhat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
  dx = _norm_dx(g, xhat, rstd, d, center=True)
  plgpu.store(dx_ref, dx.astype(dx_ref.dtype), mask=mask)


def _modulate_bwd_dx_kernel(x_ref, scale_ref, dy_ref, mean_ref, rstd_ref, dx_ref, *, d,
                            num_rows, num_history, block_rows, block_d):
  rows, row_ok, col_ok, mask = _row_masks(pl.program_id(1) * block_rows, block_rows, num_rows,
                                          block_d, d)
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
  dy = plgpu.load(dy_ref, mask=mask, other=0.0).astype(jnp.float32)
  mean = plgpu.load(mean_ref, mask=row_ok, other=0.0)
  rstd = plgpu.load(rstd_ref, mask=row_ok, other=0.0)
  sc1 = _load_table_row(scale_ref, 1, col_ok)
  if num_history == 0:
    sc = sc1
  else:
    sc0 = _load_table_row(scale_ref, 0, col_ok)
    sc = jnp.where((rows < num_history)[:, None], sc0, sc1)
  g = dy * (1.0 + sc)
  xhat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
  dx = _norm_dx(g, xhat, rstd, d, center=True)
  plgpu.store(dx_ref, dx.astype(dx_ref.dtype), mask=mask)


def _rms_bwd_dx_kernel(x_ref, w_ref, dy_ref, rstd_ref, dx_ref, *, d, num_rows, block_rows,
                       block_d):
  _, row_ok, col_ok, mask = _row_masks(pl.program_id(0) * block_rows, block_rows, num_rows,
                                       block_d, d)
  x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
  dy = plgpu.load(dy_ref, mask=mask, other=0.0).astype(jnp.float32)
  rstd = plgpu.load(rstd_ref, mask=row_ok, other=0.0)
  g = dy * plgpu.load(w_ref, mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
  dx = _norm_dx(g, x * rstd[:, None], rstd, d, center=False)
  plgpu.store(dx_ref, dx.astype(dx_ref.dtype), mask=mask)


# --------------------------------------------------------------------------------------
# pallas_call builders.
# --------------------------------------------------------------------------------------


def _rows_call(kernel, x2d, params, extra_rows, out_dtypes, *, name, interpret, **kw):
  """Launches a row kernel over x2d [R, D].

  Args:
    kernel: kernel body taking (x, *params, *extra_rows, *outs).
    x2d: `[R, D]` input; also the layout of every `[R, D]` output.
    params: `[D]` arrays (or None), broadcast to every program.
    extra_rows: further `[R, D]` inputs (dy) followed by `[R]` inputs (statistics).
    out_dtypes: list of (kind, dtype) with kind "rd" ([R, D]) or "r" ([R]).
    name: kernel name.
    interpret: run in Pallas interpret mode.
    **kw: static kernel keyword arguments.

  Returns:
    The list of outputs.
  """
  r, d = x2d.shape
  block_rows, block_d = _row_layout(r, d)
  rd_spec = pl.BlockSpec((block_rows, block_d), lambda i: (i, 0))
  r_spec = pl.BlockSpec((block_rows,), lambda i: (i,))
  p_spec = pl.BlockSpec((block_d,), lambda i: (0,))
  in_specs = [rd_spec] + [None if p is None else p_spec for p in params]
  in_specs += [rd_spec if t.ndim == 2 else r_spec for t in extra_rows]
  out_shape = [jax.ShapeDtypeStruct((r, d) if k == "rd" else (r,), dt) for k, dt in out_dtypes]
  out_specs = [rd_spec if k == "rd" else r_spec for k, _ in out_dtypes]
  return pl.pallas_call(
      functools.partial(kernel, d=d, num_rows=r, block_rows=block_rows, block_d=block_d, **kw),
      grid=(pl.cdiv(r, block_rows),),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_common.compiler_params(_common.num_warps_for(block_rows * block_d)),
      interpret=interpret,
      name=name,
  )(x2d, *params, *extra_rows)


def _modulate_call(kernel, x, shift_or_none, scale, extra, out_dtypes, *, name, interpret, **kw):
  """Launches an adaLN row kernel over x [B, S, D] with per-batch [B, 2, D] tables."""
  b, s, d = x.shape
  block_rows, block_d = _row_layout(s, d)
  bsd_spec = pl.BlockSpec((None, block_rows, block_d), lambda bi, i: (bi, i, 0))
  bs_spec = pl.BlockSpec((None, block_rows), lambda bi, i: (bi, i))
  tab_b = (lambda bi: bi) if scale.shape[0] == b else (lambda bi: 0)
  tab_spec = pl.BlockSpec((None, 2, block_d), lambda bi, i: (tab_b(bi), 0, 0))
  tables = [scale] if shift_or_none is None else [shift_or_none, scale]
  in_specs = [bsd_spec] + [tab_spec] * len(tables)
  in_specs += [bsd_spec if t.ndim == 3 else bs_spec for t in extra]
  out_shape = [jax.ShapeDtypeStruct((b, s, d) if k == "bsd" else (b, s), dt)
               for k, dt in out_dtypes]
  out_specs = [bsd_spec if k == "bsd" else bs_spec for k, _ in out_dtypes]
  return pl.pallas_call(
      functools.partial(kernel, d=d, num_rows=s, block_rows=block_rows, block_d=block_d, **kw),
      grid=(b, pl.cdiv(s, block_rows)),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_common.compiler_params(_common.num_warps_for(block_rows * block_d)),
      interpret=interpret,
      name=name,
  )(x, *tables, *extra)


# --------------------------------------------------------------------------------------
# layer_norm_modulate
# --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm_modulate(x, shift, scale, num_history, eps, interpret):
  return _layer_norm_modulate_fwd(x, shift, scale, num_history, eps, interpret)[0]


def _layer_norm_modulate_fwd(x, shift, scale, num_history, eps, interpret):
  y, mean, rstd = _modulate_call(
      _modulate_fwd_kernel, x, shift.astype(jnp.float32), scale.astype(jnp.float32), [],
      [("bsd", x.dtype), ("bs", jnp.float32), ("bs", jnp.float32)],
      name="layer_norm_modulate_fwd", interpret=interpret, eps=eps, num_history=num_history)
  return y, (x, shift, scale, mean, rstd)


def _layer_norm_modulate_bwd(num_history, eps, interpret, res, dy):
  del eps
  x, shift, scale, mean, rstd = res
  (dx,) = _modulate_call(
      _modulate_bwd_dx_kernel, x, None, scale.astype(jnp.float32), [dy, mean, rstd],
      [("bsd", x.dtype)], name="layer_norm_modulate_bwd_dx", interpret=interpret,
      num_history=num_history)
  # Parameter gradients: segment sums over the history / noisy tokens (XLA reductions).
  xhat = (x.astype(jnp.float32) - mean[..., None]) * rstd[..., None]
  dyf = dy.astype(jnp.float32)
  h = num_history
  dshift = jnp.stack([dyf[:, :h].sum(axis=1), dyf[:, h:].sum(axis=1)], axis=1)
  dscale = jnp.stack([(dyf[:, :h] * xhat[:, :h]).sum(axis=1),
                      (dyf[:, h:] * xhat[:, h:]).sum(axis=1)], axis=1)
  if scale.shape[0] != x.shape[0]:  # tables broadcast over the batch
    dshift, dscale = dshift.sum(0, keepdims=True), dscale.sum(0, keepdims=True)
  return dx, dshift.astype(shift.dtype), dscale.astype(scale.dtype)


_layer_norm_modulate.defvjp(_layer_norm_modulate_fwd, _layer_norm_modulate_bwd)


@functools.partial(jax.jit, static_argnames=("num_history", "eps", "interpret"))
def layer_norm_modulate(x, shift, scale, *, num_history: int, eps: float = 1e-6,
                        interpret: bool = False):
  """Fused adaLN: `cast(LN(x_f32) * (1 + scale) + shift)`, non-affine LN, one rounding.

  Used for Helios norm1 / norm3 / norm_out, where history tokens (the first `num_history`)
  carry the timestep-0 modulation and the noisy tokens the current one.

  Args:
    x: `[B, S, D]` bf16/fp16/fp32 activations.
    shift: `[B or 1, 2, D]` fp32; row 0 for tokens `s < num_history`, row 1 for the rest.
    scale: `[B or 1, 2, D]` fp32, same row convention.
    num_history: static count of leading history tokens, `0 <= num_history <= S`.
    eps: LayerNorm epsilon (fp32 mean / biased variance).
    interpret: run the Pallas kernels in interpret mode (CPU tests).

  Returns:
    `[B, S, D]` in x.dtype. Differentiable in x, shift and scale.
  """
  _check_modulate_args(x, shift, scale, num_history)
  _common.check_float_dtype("x", x.dtype)
  _check_pallas_row_width(x.shape[-1])
  return _layer_norm_modulate(x, shift, scale, num_history, float(eps), interpret)


# --------------------------------------------------------------------------------------
# layer_norm
# --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x2d, weight, bias, eps, interpret):
  return _layer_norm_fwd(x2d, weight, bias, eps, interpret)[0]


def _layer_norm_fwd(x2d, weight, bias, eps, interpret):
  y, mean, rstd = _rows_call(
      _ln_fwd_kernel, x2d, [weight, bias], [],
      [("rd", x2d.dtype), ("r", jnp.float32), ("r", jnp.float32)],
      name="layer_norm_fwd", interpret=interpret, eps=eps)
  return y, (x2d, weight, bias, mean, rstd)


def _layer_norm_bwd(eps, interpret, res, dy):
  del eps
  x2d, weight, bias, mean, rstd = res
  (dx,) = _rows_call(_ln_bwd_dx_kernel, x2d, [weight], [dy, mean, rstd], [("rd", x2d.dtype)],
                     name="layer_norm_bwd_dx", interpret=interpret)
  dyf = dy.astype(jnp.float32)
  dw = db = None
  if weight is not None:
    xhat = (x2d.astype(jnp.float32) - mean[:, None]) * rstd[:, None]
    dw = jnp.sum(dyf * xhat, axis=0).astype(weight.dtype)
  if bias is not None:
    db = jnp.sum(dyf, axis=0).astype(bias.dtype)
  return dx, dw, db


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def layer_norm(x, weight=None, bias=None, *, eps: float, interpret: bool = False):
  """Fused LayerNorm over the last axis: fp32 statistics and affine, one rounding to x.dtype.

  Helios' `blocks.*.norm2` (FP32LayerNorm, fp32 weight and bias).

  Args:
    x: `[..., D]` bf16/fp16/fp32 activations.
    weight: optional `[D]` scale (any float dtype, applied in fp32).
    bias: optional `[D]` offset (any float dtype, applied in fp32).
    eps: LayerNorm epsilon.
    interpret: run the Pallas kernels in interpret mode.

  Returns:
    `[..., D]` in x.dtype. Differentiable in x, weight and bias.
  """
  _check_affine_args(x, weight, bias)
  _common.check_float_dtype("x", x.dtype)
  _check_pallas_row_width(x.shape[-1])
  x2d = x.reshape(-1, x.shape[-1])
  return _layer_norm(x2d, weight, bias, float(eps), interpret).reshape(x.shape)


# --------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x2d, weight, eps, interpret):
  return _rms_norm_fwd(x2d, weight, eps, interpret)[0]


def _rms_norm_fwd(x2d, weight, eps, interpret):
  y, rstd = _rows_call(_rms_fwd_kernel, x2d, [weight], [],
                       [("rd", x2d.dtype), ("r", jnp.float32)],
                       name="rms_norm_fwd", interpret=interpret, eps=eps)
  return y, (x2d, weight, rstd)


def rms_norm_grads(x2d, weight, rstd, dy, *, interpret: bool):
  """RMSNorm backward from the forward's fp32 statistics (also used by rope.rms_norm_rope).

  Args:
    x2d: `[R, D]` forward input.
    weight: `[D]` scale.
    rstd: `[R]` fp32 rsqrt(mean(x^2) + eps) saved by the forward.
    dy: `[R, D]` output cotangent.
    interpret: run the Pallas dx kernel in interpret mode.

  Returns:
    (dx `[R, D]` in x2d.dtype via the Pallas kernel, dweight `[D]` via an XLA reduction).
  """
  (dx,) = _rows_call(_rms_bwd_dx_kernel, x2d, [weight], [dy, rstd], [("rd", x2d.dtype)],
                     name="rms_norm_bwd_dx", interpret=interpret)
  xhat = x2d.astype(jnp.float32) * rstd[:, None]
  dw = jnp.sum(dy.astype(jnp.float32) * xhat, axis=0).astype(weight.dtype)
  return dx, dw


def _rms_norm_bwd(eps, interpret, res, dy):
  del eps
  x2d, weight, rstd = res
  return rms_norm_grads(x2d, weight, rstd, dy, interpret=interpret)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm(x, weight, *, eps: float, interpret: bool = False):
  """Fused RMSNorm over the last axis with torch.nn.RMSNorm numerics (one rounding).

  Helios' q/k norm runs over the whole `D = heads * head_dim = 5120` vector.

  Args:
    x: `[..., D]` bf16/fp16/fp32 activations.
    weight: `[D]` scale (bf16 in Helios; applied in fp32).
    eps: epsilon added to mean(x^2).
    interpret: run the Pallas kernels in interpret mode.

  Returns:
    `[..., D]` in x.dtype. Differentiable in x and weight.
  """
  _check_affine_args(x, weight, None, weight_required=True)
  _common.check_float_dtype("x", x.dtype)
  _check_pallas_row_width(x.shape[-1])
  x2d = x.reshape(-1, x.shape[-1])
  return _rms_norm(x2d, weight, float(eps), interpret).reshape(x.shape)
