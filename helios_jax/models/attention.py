"""Helios attention: projections, q/k RMSNorm across heads, RoPE, attention core.

The numerics-bearing ops (RMSNorm, RoPE, softmax attention) go through
`pallas_kernels.dispatch`, which selects the XLA reference, the Pallas kernel or cuDNN per
`KernelConfig` and never falls back silently.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from helios_jax.models import layers
from pallas_kernels import dispatch

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Which implementation runs each op (static; part of the module graph).

  attention: "xla" | "cudnn" | "pallas" | "auto" (GPU bf16: cuDNN; otherwise XLA).
  ops: norms and RoPE, "xla" | "pallas" | "auto" (pallas on GPU, XLA elsewhere).
  interpret: run Pallas kernels in interpret mode (CPU tests of the kernel path).
  """

  attention: str = "auto"
  ops: str = "auto"
  interpret: bool = False

  def __post_init__(self):
    if self.attention not in dispatch.ATTENTION_IMPLS:
      raise ValueError(f"attention impl {self.attention!r} not in {dispatch.ATTENTION_IMPLS}")
    if self.ops not in dispatch.IMPLS:
      raise ValueError(f"ops impl {self.ops!r} not in {dispatch.IMPLS}")

  def op_kwargs(self):
    return {"impl": self.ops, "interpret": self.interpret}


class HeliosAttention(nnx.Module):
  """diffusers `HeliosAttention` + `HeliosAttnProcessor` (self- or cross-attention).

  Parameters mirror the PyTorch names: to_q, to_k, to_v, to_out (torch `to_out.0`), norm_q,
  norm_k (RMSNorm over all heads jointly), optional add_k_proj/add_v_proj/norm_added_k (created
  when `added_kv_proj_dim` is set; the reference forward never uses them) and
  history_key_scale (only with `is_amplify_history`).
  """

  def __init__(self, dim: int, heads: int, eps: float, *, dtype, rngs: nnx.Rngs,
               added_kv_proj_dim: int | None = None, is_amplify_history: bool = False,
               history_scale_mode: str = "per_head", kernels: KernelConfig = KernelConfig()):
    self.heads = heads
    self.eps = eps
    self.kernels = kernels
    self.to_q = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_k = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_v = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_out = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.norm_q = layers.NormWeight(dim, dtype=dtype)
    self.norm_k = layers.NormWeight(dim, dtype=dtype)
    if added_kv_proj_dim is not None:
      self.add_k_proj = layers.Linear(added_kv_proj_dim, dim, dtype=dtype, rngs=rngs)
      self.add_v_proj = layers.Linear(added_kv_proj_dim, dim, dtype=dtype, rngs=rngs)
      self.norm_added_k = layers.NormWeight(dim, dtype=dtype)
    self.is_amplify_history = is_amplify_history
    if is_amplify_history:
      n = 1 if history_scale_mode == "scalar" else heads
      self.history_key_scale = nnx.Param(jnp.ones((n,), F32))  # fp32-kept
    self.max_scale = 10.0

  def _norm_heads(self, x: jax.Array, weight: nnx.Param, rope) -> jax.Array:
    """RMSNorm over all heads (one rounding), then RoPE if given: `[B,S,D]` -> `[B,S,H,Dh]`."""
    b, s, d = x.shape
    kw = self.kernels.op_kwargs()
    if rope is not None:
      return dispatch.rms_norm_rope(x, weight[...], *rope, heads=self.heads, eps=self.eps, **kw)
    return dispatch.rms_norm(x, weight[...], eps=self.eps, **kw).reshape(b, s, self.heads,
                                                                         d // self.heads)

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               rope: tuple[jax.Array, jax.Array] | None = None,
               num_history: int = 0) -> jax.Array:
    """Attention over `x` `[B, S, D]` (self) or from `x` to `context` `[B, L, D]` (cross).

    Args:
      x: queries' hidden states.
      context: keys/values' hidden states for cross-attention; None for self-attention.
      rope: (cos, sin) `[B, S, head_dim // 2]` fp32, applied to q and k (self-attention).
      num_history: number of leading history tokens (history-key amplification).

    Returns:
      `[B, S, D]` in the model dtype.
    """
    kv_in = x if context is None else context
    b, s, _ = x.shape
    q = self._norm_heads(self.to_q(x), self.norm_q.weight, rope)
    k = self._norm_heads(self.to_k(kv_in), self.norm_k.weight, rope)
    v = self.to_v(kv_in).reshape(b, kv_in.shape[1], self.heads, -1)
    if context is None and self.is_amplify_history and num_history > 0:
      sk = 1.0 + jax.nn.sigmoid(self.history_key_scale[...]) * (self.max_scale - 1.0)
      sk = sk.reshape(1, 1, -1, 1)  # per head (or one scalar)
      k_hist = (k[:, :num_history].astype(F32) * sk).astype(k.dtype)
      k = jnp.concatenate([k_hist, k[:, num_history:]], axis=1)
    o = dispatch.attention(q, k, v, impl=self.kernels.attention,
                           interpret=self.kernels.interpret)
    return self.to_out(o.reshape(b, s, -1))
