"""Rounding helpers that reproduce PyTorch's mixed-precision arithmetic in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def opmath_dtype(dtype) -> np.dtype:
  """The dtype PyTorch computes in for `dtype` tensors: float32 for 16-bit floats."""
  dtype = jnp.dtype(dtype)
  if dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return dtype


def wide_dtype() -> np.dtype:
  """float64 when `jax_enable_x64` is on, else float32 (stand-in for the reference's float64)."""
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def round_to(x: jax.Array, dtype) -> jax.Array:
  """Rounds `x` (computed in a wider dtype) to `dtype`, once, as PyTorch stores an op result.

  A 16-bit target is first rounded with `lax.reduce_precision`, which XLA never removes (a
  plain f32 -> bf16 -> f32 convert pair may be simplified away under excess-precision rules),
  so chains of bf16 ops round after every op exactly like eager PyTorch.

  Args:
    x: values in a dtype at least as wide as `dtype`.
    dtype: the storage dtype.

  Returns:
    `x` rounded to nearest-even and cast to `dtype`.
  """
  dtype = jnp.dtype(dtype)
  if dtype == x.dtype:
    return x
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    if x.dtype.itemsize > 4:  # PyTorch converts float64 -> 16-bit through float32
      x = x.astype(jnp.float32)
    info = jnp.finfo(dtype)
    x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return x.astype(dtype)


def scale(coef, x: jax.Array) -> jax.Array:
  """`coef * x` as PyTorch evaluates a Python-float scalar times a tensor.

  A Python number is a "wrapped" CPU scalar: it is converted to the tensor's opmath dtype
  (float32 for bf16/fp16/fp32), the product is formed there and rounded to the tensor's dtype.

  Args:
    coef: the scalar (Python float, or an array holding its value).
    x: the tensor.

  Returns:
    The product, dtype of `x`.
  """
  op = opmath_dtype(x.dtype)
  return round_to(jnp.asarray(coef).astype(op) * x.astype(op), x.dtype)


def scale_by_tensor(coef, x: jax.Array) -> jax.Array:
  """`coef * x` as PyTorch evaluates a 0-dim float64 TENSOR (first operand) times a tensor.

  Type promotion casts the 0-dim tensor to the tensor's dtype first (e.g. sigma is rounded to
  bf16 before `sigma * v` with a bf16 `v`); this is what the reference schedulers do with
  `self.sigmas[i] * model_output` (on CPU, and on CUDA where the 0-dim tensor lives on the GPU).

  Args:
    coef: the scalar value (float64 host value or array).
    x: the tensor.

  Returns:
    The product, dtype of `x`.
  """
  op = opmath_dtype(x.dtype)
  c = round_to(jnp.asarray(coef).astype(op), x.dtype).astype(op)
  return round_to(c * x.astype(op), x.dtype)


def binary(fn, a: jax.Array, b: jax.Array) -> jax.Array:
  """`fn(a, b)` for two tensors with PyTorch type promotion (compute in opmath, round once)."""
  out = jnp.promote_types(a.dtype, b.dtype)
  op = opmath_dtype(out)
  return round_to(fn(a.astype(op), b.astype(op)), out)


# ---------------------------------------------------------------------------------------------
# Correctly rounded float64 affine combinations without float64 arithmetic.
#
# The DMD scheduler evaluates x0 = x - sigma v and (1 - sigma') x0 + sigma' P in float64 and
# rounds once to bf16 / fp32. Without `jax_enable_x64` we reproduce that single rounding:
# host-side float64 coefficients are split into float32 pieces of <= 12 significant bits,
# arrays are split by bit masking into two <= 12-bit halves, so every piece product is exact
# in float32; the exact products are summed as an unevaluated float32 pair (hi, lo) with
# error-free TwoSum steps (no multiplications, so FMA contraction cannot change them); the
# pair is rounded to float32 and then to the target dtype (PyTorch's float64 -> bf16 cast also
# goes through float32).

COEF_PIECES = 4
_PIECE_BITS = 12


def split_coefficient(c: float) -> np.ndarray:
  """Host-side split of a float64 scalar into `COEF_PIECES` float32 values of <= 12 bits.

  Args:
    c: the coefficient.

  Returns:
    [COEF_PIECES] float32 pieces whose exact sum equals c up to ~2^-48 relative.
  """
  pieces, rem = [], float(c)
  for _ in range(COEF_PIECES):
    if rem == 0.0 or not np.isfinite(rem):
      pieces.append(rem if not np.isfinite(rem) else 0.0)
      rem = 0.0
      continue
    m, e = np.frexp(rem)
    piece = float(np.ldexp(np.trunc(m * 2.0 ** _PIECE_BITS), e - _PIECE_BITS))
    pieces.append(piece)
    rem -= piece
  return np.asarray(pieces, np.float32)


def _split_array(t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """t = hi + lo exactly, both with <= 12 significant bits (t float32)."""
  bits = jax.lax.bitcast_convert_type(t, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, t - hi


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  s = a + b
  bp = s - a
  ap = s - bp
  return s, (a - ap) + (b - bp)


def exact_affine(terms, dtype) -> jax.Array:
  """Correctly rounded sum_i c_i * t_i in `dtype` (the value float64 math would round).

  Args:
    terms: sequence of (pieces, t): `pieces` [COEF_PIECES] float32 from `split_coefficient`
      (may be traced), or None for a coefficient of exactly 1; `t` an array of bf16 / fp32
      values.
    dtype: output dtype (float32 or a 16-bit float).

  Returns:
    The rounded sum, dtype `dtype`.
  """
  prods = []
  for pieces, t in terms:
    if pieces is None:
      prods.append(t.astype(jnp.float32))
      continue
    t_hi, t_lo = _split_array(t.astype(jnp.float32))
    for k in range(COEF_PIECES):
      p = pieces[..., k].astype(jnp.float32)
      prods += [p * t_hi, p * t_lo]
  hi, lo = prods[0], jnp.zeros_like(prods[0])
  for p in prods[1:]:
    hi, e = _two_sum(hi, p)
    lo = lo + e
  hi, _ = _two_sum(hi, lo)  # hi = fl32(exact sum)
  # PyTorch converts float64 -> bf16 through float32 (c10::BFloat16(float)), so rounding the
  # correctly rounded float32 value again reproduces its double rounding.
  return round_to(hi, dtype)
