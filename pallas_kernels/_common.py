"""Shared helpers for the Pallas (Triton lowering) kernels: sizes, dtype checks, launch knobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

# Dtypes every kernel in this package accepts for its activations.
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# The widest feature axis a one-block-per-row kernel handles (Triton tensors are capped at
# 2**20 elements; 65536 is what Helios' `calculate_settings` allows).
MAX_ROW_BLOCK = 65536


class PallasUnsupportedError(ValueError):
  """A Pallas kernel was asked to run on inputs or a platform it does not support."""


def next_pow2(n: int) -> int:
  """Smallest power of two >= max(n, 1)."""
  n = max(int(n), 1)
  return 1 << (n - 1).bit_length()


def is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def check_float_dtype(name: str, dtype) -> None:
  """Raises `PallasUnsupportedError` unless `dtype` is fp32, bf16 or fp16."""
  if jnp.dtype(dtype) not in FLOAT_DTYPES:
    raise PallasUnsupportedError(
        f"{name}.dtype={jnp.dtype(dtype)} is not supported; expected one of "
        f"{[str(d) for d in FLOAT_DTYPES]}")


def num_warps_for(elements: int) -> int:
  """Warps for an elementwise/row kernel holding `elements` values per program.

  Same thresholds as Helios' Triton `calculate_settings` (4/8/16/32 warps).
  """
  if elements >= 32768:
    return 32
  if elements >= 8192:
    return 16
  if elements >= 2048:
    return 8
  return 4


def compiler_params(num_warps: int, num_stages: int | None = None) -> plgpu.CompilerParams:
  """Triton compiler params. Passing them also selects the Triton (not Mosaic GPU) lowering."""
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def rows_per_block(block_d: int, target_elements: int = 4096) -> int:
  """Rows per program for a row kernel whose feature block is `block_d` wide (a power of 2)."""
  return max(1, target_elements // block_d)


def gpu_available() -> bool:
  """True when the default JAX backend is a GPU (CUDA or ROCm)."""
  try:
    return jax.devices()[0].platform == "gpu"
  except RuntimeError:
    return False
