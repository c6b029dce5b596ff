"""Small building blocks shared by the Helios DiT: linear layers, norms, activations, timesteps.

Precision conventions follow diffusers (spec architecture.md §3.9): matmuls in the parameter
dtype with fp32 accumulation and one rounding. Norm / RoPE / attention numerics live in
`pallas_kernels.dispatch` (XLA references and Pallas kernels).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32

# Xavier-uniform for every Linear/Conv weight (the official Helios init), zero biases.
kernel_init = nnx.initializers.xavier_uniform()


class Linear(nnx.Module):
  """`y = x @ kernel + bias` in the parameter dtype (torch `nn.Linear`, kernel stored [in, out])."""

  def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs,
               use_bias: bool = True, init=kernel_init):
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
    k = self.kernel[...]
    y = jnp.dot(x.astype(k.dtype), k, preferred_element_type=F32)
    if self.bias is not None:
      y = y + self.bias[...].astype(F32)
    return y.astype(k.dtype)


class NormWeight(nnx.Module):
  """The learned scale of an RMSNorm (`weight` [D], model dtype); the op is in `dispatch`."""

  def __init__(self, dim: int, *, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))


class NormAffine(nnx.Module):
  """Affine LayerNorm parameters kept in fp32 (diffusers `FP32LayerNorm` with affine)."""

  def __init__(self, dim: int):
    self.weight = nnx.Param(jnp.ones((dim,), F32))
    self.bias = nnx.Param(jnp.zeros((dim,), F32))


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation, computed in fp32 and rounded once (torch semantics)."""
  return jax.nn.gelu(x.astype(F32), approximate=True).astype(x.dtype)


def timestep_sinusoid(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`.

  Args:
    t: `[B]` timesteps (any numeric dtype; cast to fp32 first, as torch does).
    dim: even embedding width.

  Returns:
    `[B, dim]` fp32: `[cos(t f) | sin(t f)]` with `f_i = exp(-ln(max_period) i / (dim/2))`.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=F32) / F32(half)
  emb = t.astype(F32)[:, None] * jnp.exp(exponent)[None, :]
  return jnp.concatenate([jnp.cos(emb), jnp.sin(emb)], axis=-1)
