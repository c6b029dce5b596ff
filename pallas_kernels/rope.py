"""Interleaved-pair rotary embedding, and RMSNorm fused with it (Pallas, Triton lowering).

Convention (Helios `apply_rotary_emb_transposed`, architecture.md §3.4): channel pair p of a
head vector is (2p, 2p+1) and shares one angle, given as cos/sin tables with one entry per
pair:

  out[2p]   = x[2p] * c_p - x[2p+1] * s_p
  out[2p+1] = x[2p] * s_p + x[2p+1] * c_p

computed in fp32 from x (bf16/fp32) and fp32 tables, rounded once to x.dtype.

Kernel layout: x `[B, S, H, Dh]` is viewed as `[B, S, H, Dh/2, 2]` (a free reshape), so the
even and odd channels are two strided loads of the same `[block_s, block_h, Dh/2]` tile; the
cos/sin tile `[block_s, Dh/2]` is loaded once per program and broadcast over its heads.
Ragged token/head/pair edges are masked. The backward pass (dx) is the same kernel with
-sin; the table gradients (needed only if cos/sin are differentiated) are XLA reductions.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common
from pallas_kernels import norm

# Values per half (even or odd channels) a rope program handles.
_ROPE_TILE = 4096

# Ref indices of the even / odd channel of a pair (numpy scalars: Python ints trip the
# interpret-mode discharge of integer ref indexers in jax 0.10).
_EVEN = np.int32(0)
_ODD = np.int32(1)

# --------------------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------------------


def apply_rope_reference(x, cos, sin):
  """Reference RoPE (pure jnp, fp32 math, one rounding).

  Args:
    x: `[B, S, H, Dh]` bf16/fp16/fp32, Dh even.
    cos: `[B or 1, S, Dh // 2]` fp32, one angle per channel pair.
    sin: `[B or 1, S, Dh // 2]` fp32.

  Returns:
    `[B, S, H, Dh]` in x.dtype.
  """
  _check_rope_args(x, cos, sin)
  b, s, h, dh = x.shape
  xf = x.astype(jnp.float32).reshape(b, s, h, dh // 2, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  c = cos.astype(jnp.float32)[:, :, None, :]
  sn = sin.astype(jnp.float32)[:, :, None, :]
  out = jnp.stack([x0 * c - x1 * sn, x0 * sn + x1 * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def rms_norm_rope_reference(x, weight, cos, sin, *, heads: int, eps: float):
  """q/k RMSNorm across all heads, then RoPE per head (the unfused Helios pipeline).

  Two roundings, as in the reference model: the RMSNorm output is rounded to x.dtype before
  the rotation.

  Args:
    x: `[B, S, H * Dh]` projected q or k.
    weight: `[H * Dh]` RMSNorm scale.
    cos: `[B or 1, S, Dh // 2]` fp32.
    sin: `[B or 1, S, Dh // 2]` fp32.
    heads: static head count H.
    eps: RMSNorm epsilon.

  Returns:
    `[B, S, H, Dh]` in x.dtype.
  """
  _check_fused_args(x, weight, cos, sin, heads)
  xf = x.astype(jnp.float32)
  rstd = lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  n = (xf * rstd * weight.astype(jnp.float32)).astype(x.dtype)
  b, s, d = x.shape
  return apply_rope_reference(n.reshape(b, s, heads, d // heads), cos, sin)


# --------------------------------------------------------------------------------------
# Checks.
# --------------------------------------------------------------------------------------


def _check_tables(cos, sin, b: int, s: int, pairs: int) -> None:
  for name, t in (("cos", cos), ("sin", sin)):
    if t.ndim != 3 or t.shape[1:] != (s, pairs) or t.shape[0] not in (1, b):
      raise ValueError(
          f"{name}.shape={tuple(t.shape)} must be [B or 1, S, Dh // 2] = [{b} or 1, {s}, "
          f"{pairs}]")
    if t.dtype != jnp.float32:
      raise ValueError(f"{name}.dtype={t.dtype} must be float32")
  if cos.shape != sin.shape:
    raise ValueError(f"cos.shape={tuple(cos.shape)} != sin.shape={tuple(sin.shape)}")


def _check_rope_args(x, cos, sin) -> None:
  if x.ndim != 4:
    raise ValueError(f"x.shape={x.shape} must be [B, S, H, Dh]")
  b, s, _, dh = x.shape
  if dh % 2:
    raise ValueError(f"head_dim Dh={dh} must be even (channel pairs)")
  _check_tables(cos, sin, b, s, dh // 2)


def _check_fused_args(x, weight, cos, sin, heads) -> None:
  if x.ndim != 3:
    raise ValueError(f"x.shape={x.shape} must be [B, S, H * Dh]")
  b, s, d = x.shape
  if not isinstance(heads, int) or heads <= 0 or d % heads or (d // heads) % 2:
    raise ValueError(f"heads={heads!r} must divide D={d} into an even head_dim")
  if tuple(weight.shape) != (d,):
    raise ValueError(f"weight.shape={tuple(weight.shape)} must be [D] = ({d},)")
  _check_tables(cos, sin, b, s, d // heads // 2)


# --------------------------------------------------------------------------------------
# RoPE kernel.
# --------------------------------------------------------------------------------------


def _rope_kernel(x_ref, cos_ref, sin_ref, o_ref, *, seq_len, heads, pairs, block_s, block_h,
                 block_p, negate_sin):
  # x_ref / o_ref: [block_s, block_h, block_p, 2]; cos_ref / sin_ref: [block_s, block_p].
  s_ok = pl.program_id(1) * block_s + jnp.arange(block_s) < seq_len
  h_ok = pl.program_id(2) * block_h + jnp.arange(block_h) < heads
  p_ok = jnp.arange(block_p) < pairs
  mask = s_ok[:, None, None] & h_ok[None, :, None] & p_ok[None, None, :]
  tab_mask = s_ok[:, None] & p_ok[None, :]
  c = plgpu.load(cos_ref, mask=tab_mask, other=0.0)[:, None, :]
  s = plgpu.load(sin_ref, mask=tab_mask, other=0.0)[:, None, :]
  if negate_sin:
    s = -s
  x0 = plgpu.load(x_ref.at[:, :, :, _EVEN], mask=mask, other=0.0).astype(jnp.float32)
  x1 = plgpu.load(x_ref.at[:, :, :, _ODD], mask=mask, other=0.0).astype(jnp.float32)
  plgpu.store(o_ref.at[:, :, :, _EVEN], (x0 * c - x1 * s).astype(o_ref.dtype), mask=mask)
  plgpu.store(o_ref.at[:, :, :, _ODD], (x0 * s + x1 * c).astype(o_ref.dtype), mask=mask)


def _rope_call(x, cos, sin, *, negate_sin: bool, interpret: bool):
  b, s, h, dh = x.shape
  p = dh // 2
  block_p = _common.next_pow2(p)
  block_h = min(_common.next_pow2(h), 8, max(1, _ROPE_TILE // block_p))
  block_s = min(_common.next_pow2(s), max(1, _ROPE_TILE // (block_p * block_h)))
  tab_b = (lambda bi: bi) if cos.shape[0] == b else (lambda bi: 0)
  x_spec = pl.BlockSpec((None, block_s, block_h, block_p, 2), lambda bi, i, j: (bi, i, j, 0, 0))
  tab_spec = pl.BlockSpec((None, block_s, block_p), lambda bi, i, j: (tab_b(bi), i, 0))
  out = pl.pallas_call(
      functools.partial(_rope_kernel, seq_len=s, heads=h, pairs=p, block_s=block_s,
                        block_h=block_h, block_p=block_p, negate_sin=negate_sin),
      grid=(b, pl.cdiv(s, block_s), pl.cdiv(h, block_h)),
      in_specs=[x_spec, tab_spec, tab_spec],
      out_specs=x_spec,
      out_shape=jax.ShapeDtypeStruct((b, s, h, p, 2), x.dtype),
      compiler_params=_common.compiler_params(
          _common.num_warps_for(2 * block_s * block_h * block_p)),
      interpret=interpret,
      name="rope_bwd" if negate_sin else "rope_fwd",
  )(x.reshape(b, s, h, p, 2), cos, sin)
  return out.reshape(x.shape)


def _table_grads(x, dy, cos):
  """d cos, d sin `[B or 1, S, Dh/2]` from x and dy `[B, S, H, Dh]` (fp32 XLA reductions)."""
  b, s, h, dh = x.shape
  xf = x.astype(jnp.float32).reshape(b, s, h, dh // 2, 2)
  gf = dy.astype(jnp.float32).reshape(b, s, h, dh // 2, 2)
  dcos = jnp.sum(gf[..., 0] * xf[..., 0] + gf[..., 1] * xf[..., 1], axis=2)
  dsin = jnp.sum(gf[..., 1] * xf[..., 0] - gf[..., 0] * xf[..., 1], axis=2)
  if cos.shape[0] != b:
    dcos, dsin = dcos.sum(0, keepdims=True), dsin.sum(0, keepdims=True)
  return dcos, dsin


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _apply_rope(x, cos, sin, interpret):
  return _rope_call(x, cos, sin, negate_sin=False, interpret=interpret)


def _apply_rope_fwd(x, cos, sin, interpret):
  return _rope_call(x, cos, sin, negate_sin=False, interpret=interpret), (x, cos, sin)


def _apply_rope_bwd(interpret, res, dy):
  x, cos, sin = res
  dx = _rope_call(dy.astype(x.dtype), cos, sin, negate_sin=True, interpret=interpret)
  dcos, dsin = _table_grads(x, dy, cos)
  return dx, dcos, dsin


_apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


@functools.partial(jax.jit, static_argnames=("interpret",))
def apply_rope(x, cos, sin, *, interpret: bool = False):
  """Fused interleaved-pair RoPE: fp32 rotation, one rounding to x.dtype.

  Args:
    x: `[B, S, H, Dh]` bf16/fp16/fp32 (q or k after the head split), Dh even.
    cos: `[B or 1, S, Dh // 2]` fp32, one value per channel pair.
    sin: `[B or 1, S, Dh // 2]` fp32.
    interpret: run the Pallas kernels in interpret mode.

  Returns:
    `[B, S, H, Dh]` in x.dtype. Differentiable in x, cos and sin (dx = same kernel, -sin).
  """
  _check_rope_args(x, cos, sin)
  _common.check_float_dtype("x", x.dtype)
  return _apply_rope(x, cos, sin, interpret)


# --------------------------------------------------------------------------------------
# Fused RMSNorm (across heads) + RoPE.
# --------------------------------------------------------------------------------------


def _rms_rope_kernel(x_ref, w_ref, cos_ref, sin_ref, o_ref, rstd_ref, *, eps, d, seq_len,
                     pairs_per_head, block_rows, block_pairs):
  # x_ref / o_ref: [block_rows, block_pairs, 2] (tokens x channel pairs of all heads);
  # w_ref: [block_pairs, 2]; cos_ref / sin_ref: [block_rows, pairs_per_head].
  rows = jnp.arange(block_rows)
  row_ok = pl.program_id(1) * block_rows + rows < seq_len
  pair = jnp.arange(block_pairs)
  pair_ok = pair < d // 2
  mask = row_ok[:, None] & pair_ok[None, :]
  x0 = plgpu.load(x_ref.at[:, :, _EVEN], mask=mask, other=0.0).astype(jnp.float32)
  x1 = plgpu.load(x_ref.at[:, :, _ODD], mask=mask, other=0.0).astype(jnp.float32)
  rstd = lax.rsqrt((jnp.sum(x0 * x0, axis=1) + jnp.sum(x1 * x1, axis=1)) / d + eps)
  w0 = plgpu.load(w_ref.at[:, _EVEN], mask=pair_ok, other=0.0).astype(jnp.float32)[None, :]
  w1 = plgpu.load(w_ref.at[:, _ODD], mask=pair_ok, other=0.0).astype(jnp.float32)[None, :]
  # RMSNorm output rounded to x.dtype, as in the unfused model, then rotated in fp32.
  n0 = (x0 * rstd[:, None] * w0).astype(o_ref.dtype).astype(jnp.float32)
  n1 = (x1 * rstd[:, None] * w1).astype(o_ref.dtype).astype(jnp.float32)
  # Pair j of the full row is pair (j mod Dh/2) of head (j div Dh/2): gather its angle.
  tab_idx = (rows[:, None], (pair % pairs_per_head)[None, :])
  c = plgpu.load(cos_ref.at[tab_idx], mask=mask, other=0.0)
  s = plgpu.load(sin_ref.at[tab_idx], mask=mask, other=0.0)
  plgpu.store(o_ref.at[:, :, _EVEN], (n0 * c - n1 * s).astype(o_ref.dtype), mask=mask)
  plgpu.store(o_ref.at[:, :, _ODD], (n0 * s + n1 * c).astype(o_ref.dtype), mask=mask)
  plgpu.store(rstd_ref, rstd, mask=row_ok)


def _rms_rope_call(x, weight, cos, sin, *, heads, eps, interpret):
  b, s, d = x.shape
  pph = d // heads // 2
  block_pairs = _common.next_pow2(d // 2)
  block_rows = min(_common.next_pow2(s), max(1, _ROPE_TILE // block_pairs))
  tab_b = (lambda bi: bi) if cos.shape[0] == b else (lambda bi: 0)
  x_spec = pl.BlockSpec((None, block_rows, block_pairs, 2), lambda bi, i: (bi, i, 0, 0))
  w_spec = pl.BlockSpec((block_pairs, 2), lambda bi, i: (0, 0))
  tab_spec = pl.BlockSpec((None, block_rows, pph), lambda bi, i: (tab_b(bi), i, 0))
  r_spec = pl.BlockSpec((None, block_rows), lambda bi, i: (bi, i))
  y, rstd = pl.pallas_call(
      functools.partial(_rms_rope_kernel, eps=eps, d=d, seq_len=s, pairs_per_head=pph,
                        block_rows=block_rows, block_pairs=block_pairs),
      grid=(b, pl.cdiv(s, block_rows)),
      in_specs=[x_spec, w_spec, tab_spec, tab_spec],
      out_specs=[x_spec, r_spec],
      out_shape=[jax.ShapeDtypeStruct((b, s, d // 2, 2), x.dtype),
                 jax.ShapeDtypeStruct((b, s), jnp.float32)],
      compiler_params=_common.compiler_params(
          _common.num_warps_for(2 * block_rows * block_pairs)),
      interpret=interpret,
      name="rms_norm_rope_fwd",
  )(x.reshape(b, s, d // 2, 2), weight.reshape(d // 2, 2), cos, sin)
  return y.reshape(b, s, heads, d // heads), rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _rms_norm_rope(x, weight, cos, sin, heads, eps, interpret):
  return _rms_rope_call(x, weight, cos, sin, heads=heads, eps=eps, interpret=interpret)[0]


def _rms_norm_rope_fwd(x, weight, cos, sin, heads, eps, interpret):
  y, rstd = _rms_rope_call(x, weight, cos, sin, heads=heads, eps=eps, interpret=interpret)
  return y, (x, weight, cos, sin, rstd)


def _rms_norm_rope_bwd(heads, eps, interpret, res, dy):
  del eps
  x, weight, cos, sin, rstd = res
  b, s, d = x.shape
  # Through the rotation (same kernel, -sin), cotangent in x.dtype as in the unfused graph.
  dn = _rope_call(dy.astype(x.dtype), cos, sin, negate_sin=True, interpret=interpret)
  n = (x.astype(jnp.float32) * rstd[..., None] * weight.astype(jnp.float32)).astype(x.dtype)
  dcos, dsin = _table_grads(n.reshape(dy.shape), dy, cos)
  # Through the RMSNorm: its Pallas dx kernel with the saved fp32 rstd.
  x2d, dn2d, rstd1d = x.reshape(b * s, d), dn.reshape(b * s, d), rstd.reshape(b * s)
  dx, dw = norm.rms_norm_grads(x2d, weight, rstd1d, dn2d, interpret=interpret)
  return dx.reshape(x.shape), dw, dcos, dsin


_rms_norm_rope.defvjp(_rms_norm_rope_fwd, _rms_norm_rope_bwd)


@functools.partial(jax.jit, static_argnames=("heads", "eps", "interpret"))
def rms_norm_rope(x, weight, cos, sin, *, heads: int, eps: float = 1e-6,
                  interpret: bool = False):
  """Fused q/k path: RMSNorm over all heads (`[H * Dh]`), head split, RoPE.

  Bit-compatible with `rms_norm` followed by `apply_rope`: the normalised value is rounded
  to x.dtype before the fp32 rotation, exactly as in the unfused model.

  Args:
    x: `[B, S, H * Dh]` bf16/fp16/fp32 projected q or k.
    weight: `[H * Dh]` RMSNorm scale.
    cos: `[B or 1, S, Dh // 2]` fp32.
    sin: `[B or 1, S, Dh // 2]` fp32.
    heads: static head count H.
    eps: RMSNorm epsilon.
    interpret: run the Pallas kernels in interpret mode.

  Returns:
    `[B, S, H, Dh]` in x.dtype. Differentiable in x, weight, cos and sin.
  """
  _check_fused_args(x, weight, cos, sin, heads)
  _common.check_float_dtype("x", x.dtype)
  if x.shape[-1] > _common.MAX_ROW_BLOCK:
    raise _common.PallasUnsupportedError(
        f"feature size D={x.shape[-1]} exceeds the single-block limit {_common.MAX_ROW_BLOCK}")
  return _rms_norm_rope(x, weight, cos, sin, heads, float(eps), interpret)
