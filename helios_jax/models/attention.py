"""Helios attention: projections, q/k RMSNorm across heads, RoPE, attention core dispatch.

`impl` selects the attention core:
  "xla"    : pure-jnp reference (fp32 logits/softmax, chunked over queries for long sequences),
  "cudnn"  : `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16),
  "pallas" : the Pallas flash-attention kernel in `pallas_kernels/attention.py`,
  "auto"   : cudnn on GPU for bf16/fp16 inputs, otherwise xla.
A requested implementation that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from helios_jax.models import layers
from helios_jax.models import rope as rope_lib

F32 = jnp.float32
IMPLS = ("xla", "cudnn", "pallas", "auto")
# Queries per chunk in the xla core: bounds the fp32 logits to [B, heads, chunk, S_kv].
XLA_QUERY_CHUNK = 2048


def _xla_attention_block(q, k, v, scale):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32) * F32(scale)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=F32)
  return out.astype(q.dtype)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                  query_chunk: int = XLA_QUERY_CHUNK) -> jax.Array:
  """softmax(q k^T * scale) v with fp32 logits; q `[B,Sq,H,D]`, k/v `[B,Sk,H,D]` -> `[B,Sq,H,D]`."""
  b, sq, h, d = q.shape
  if sq <= query_chunk:
    return _xla_attention_block(q, k, v, scale)
  n = -(-sq // query_chunk)
  qp = jnp.pad(q, ((0, 0), (0, n * query_chunk - sq), (0, 0), (0, 0)))
  qp = qp.reshape(b, n, query_chunk, h, d).transpose(1, 0, 2, 3, 4)
  out = jax.lax.map(lambda qc: _xla_attention_block(qc, k, v, scale), qp)
  return out.transpose(1, 0, 2, 3, 4).reshape(b, n * query_chunk, h, d)[:, :sq]


def resolve_impl(impl: str, dtype) -> str:
  if impl not in IMPLS:
    raise ValueError(f"attention impl={impl!r} not in {IMPLS}")
  if impl != "auto":
    return impl
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
  """Non-causal unmasked attention with scale 1/sqrt(head_dim); `[B,S,H,D]` layout."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  impl = resolve_impl(impl, q.dtype)
  if impl == "xla":
    return xla_attention(q, k, v, scale)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise RuntimeError("attention impl='cudnn' needs a GPU backend; use 'xla' on "
                         f"{jax.default_backend()}")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  from pallas_kernels import dispatch  # pylint: disable=g-import-not-at-top
  return dispatch.attention(q, k, v, scale=scale, impl="pallas")


class HeliosAttention(nnx.Module):
  """diffusers `HeliosAttention` + `HeliosAttnProcessor` (self- or cross-attention).

  Parameters mirror the PyTorch names: to_q, to_k, to_v, to_out (torch `to_out.0`), norm_q,
  norm_k (RMSNorm over all heads jointly), optional add_k_proj/add_v_proj/norm_added_k (created
  when `added_kv_proj_dim` is set; the reference forward never uses them) and
  history_key_scale (only with `is_amplify_history`).
  """

  def __init__(self, dim: int, heads: int, eps: float, *, dtype, rngs: nnx.Rngs,
               added_kv_proj_dim: int | None = None, is_amplify_history: bool = False,
               history_scale_mode: str = "per_head", impl: str = "auto"):
    self.heads = heads
    self.impl = impl
    self.to_q = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_k = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_v = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.to_out = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.norm_q = layers.RMSNorm(dim, eps, dtype=dtype)
    self.norm_k = layers.RMSNorm(dim, eps, dtype=dtype)
    if added_kv_proj_dim is not None:
      self.add_k_proj = layers.Linear(added_kv_proj_dim, dim, dtype=dtype, rngs=rngs)
      self.add_v_proj = layers.Linear(added_kv_proj_dim, dim, dtype=dtype, rngs=rngs)
      self.norm_added_k = layers.RMSNorm(dim, eps, dtype=dtype)
    self.is_amplify_history = is_amplify_history
    if is_amplify_history:
      n = 1 if history_scale_mode == "scalar" else heads
      self.history_key_scale = nnx.Param(jnp.ones((n,), F32))  # fp32-kept
    self.max_scale = 10.0

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               rope: tuple[jax.Array, jax.Array] | None = None,
               num_history: int = 0) -> jax.Array:
    """Attention over `x` `[B, S, D]` (self) or from `x` to `context` `[B, L, D]` (cross).

    Args:
      x: queries' hidden states.
      context: keys/values' hidden states for cross-attention; None for self-attention.
      rope: (cos, sin) `[B, S, head_dim // 2]`, applied to q and k (self-attention only).
      num_history: number of leading history tokens (history-key amplification).

    Returns:
      `[B, S, D]` in the model dtype.
    """
    kv_in = x if context is None else context
    b, s, _ = x.shape
    q = self.norm_q(self.to_q(x)).reshape(b, s, self.heads, -1)
    k = self.norm_k(self.to_k(kv_in)).reshape(b, kv_in.shape[1], self.heads, -1)
    v = self.to_v(kv_in).reshape(b, kv_in.shape[1], self.heads, -1)
    if rope is not None:
      q = rope_lib.apply_rope(q, *rope)
      k = rope_lib.apply_rope(k, *rope)
    if context is None and self.is_amplify_history and num_history > 0:
      sk = 1.0 + jax.nn.sigmoid(self.history_key_scale[...]) * (self.max_scale - 1.0)
      sk = sk.reshape(1, 1, -1, 1)  # per head (or one scalar)
      k_hist = (k[:, :num_history].astype(F32) * sk).astype(k.dtype)
      k = jnp.concatenate([k_hist, k[:, num_history:]], axis=1)
    o = attention_core(q, k, v, self.impl)
    return self.to_out(o.reshape(b, s, -1))
