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
    info = jnp.finfo(dtype)
    x = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return x.astype(dtype)


def scale(coef, x: jax.Array) -> jax.Array:
  """`coef * x` as PyTorch evaluates a 0-dim / Python float scalar times a tensor.

  The scalar is converted to the tensor's opmath dtype (float32 for bf16/fp16/fp32), the
  product is formed there and rounded to the tensor's dtype.

  Args:
    coef: a Python float or a 0-dim array (any float dtype).
    x: the tensor.

  Returns:
    The product, dtype of `x`.
  """
  op = opmath_dtype(x.dtype)
  return round_to(jnp.asarray(coef).astype(op) * x.astype(op), x.dtype)


def binary(fn, a: jax.Array, b: jax.Array) -> jax.Array:
  """`fn(a, b)` for two tensors with PyTorch type promotion (compute in opmath, round once)."""
  out = jnp.promote_types(a.dtype, b.dtype)
  op = opmath_dtype(out)
  return round_to(fn(a.astype(op), b.astype(op)), out)
