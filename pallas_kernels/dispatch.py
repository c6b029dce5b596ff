"""One entry point per op that picks its implementation: "xla", "pallas", "cudnn", "auto".

* "xla": the pure-jnp references (they define the numerics), attention chunked over queries.
* "pallas": the Pallas kernels of this package (Triton lowering, GPU); with `interpret=True`
  they run in Pallas interpret mode on any backend (CPU tests).
* "cudnn" (attention only): `jax.nn.dot_product_attention(..., implementation="cudnn")`.
* "auto": "pallas" when it can run (a GPU backend, or `interpret=True`) and supports the
  inputs, else "xla". For attention, "auto" on a GPU with bf16/fp16 inputs picks "cudnn"
  (the built-in to beat) until the Pallas kernel is measured faster at the Helios shapes.

Nothing falls back silently: an explicit "pallas" or "cudnn" that cannot run raises
`ImplementationUnavailableError` (or `PallasUnsupportedError` for unsupported inputs) saying why.
`interpret` only affects the "pallas" path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import attention as attention_lib
from pallas_kernels import norm as norm_lib
from pallas_kernels import rope as rope_lib

ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "auto")
IMPLS = ("xla", "pallas", "auto")


class ImplementationUnavailableError(RuntimeError):
  """The requested implementation cannot run on this platform."""


def _check_impl(impl: str, allowed: tuple[str, ...]) -> None:
  if impl not in allowed:
    raise ValueError(f"impl={impl!r} is not one of {allowed}")


def _platform() -> str:
  return jax.devices()[0].platform


def _pallas_runnable(interpret: bool) -> str | None:
  """None if Pallas can run here, else the reason it cannot."""
  if interpret or _common.gpu_available():
    return None
  return (f"impl='pallas' needs a GPU backend (default backend is {_platform()!r}); pass "
          "interpret=True to run the kernels in Pallas interpret mode")


def _resolve(impl: str, interpret: bool, support_check) -> str:
  """Maps impl to "xla" or "pallas" (raising for an explicit "pallas" that cannot run)."""
  if impl == "xla":
    return "xla"
  reason = _pallas_runnable(interpret)
  if impl == "pallas":
    if reason is not None:
      raise ImplementationUnavailableError(reason)
    support_check()  # raises PallasUnsupportedError naming the unsupported input
    return "pallas"
  # auto
  if reason is not None:
    return "xla"
  try:
    support_check()
  except _common.PallasUnsupportedError:
    return "xla"
  return "pallas"


def resolve_attention_impl(q, impl: str = "auto", *, interpret: bool = False) -> str:
  """The implementation `attention` would run for queries like q: "xla", "pallas" or "cudnn".

  Args:
    q: `[B, S_q, H, D]` queries (only dtype and head_dim are consulted).
    impl: "xla" | "cudnn" | "pallas" | "auto".
    interpret: whether "pallas" would run in interpret mode.

  Returns:
    The concrete implementation name.
  """
  _check_impl(impl, ATTENTION_IMPLS)
  if impl == "cudnn":
    if not _common.gpu_available():
      raise ImplementationUnavailableError(
          f"impl='cudnn' needs a GPU backend (default backend is {_platform()!r})")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      raise ImplementationUnavailableError(
          f"impl='cudnn' supports bf16/fp16 only, got q.dtype={jnp.dtype(q.dtype)}")
    return "cudnn"
  if (impl == "auto" and not interpret and _common.gpu_available()
      and jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
    # cuDNN until the Pallas kernel is measured at least as fast at the Helios shapes
    # (benchmarks/kernels.py, S = 11040); see BENCHMARKS.md.
    return "cudnn"
  return _resolve(impl, interpret, lambda: attention_lib.check_pallas_support(q))


def _cudnn_attention(q, k, v, kv_mask, q_segment_ids, kv_segment_ids, sm_scale):
  b, sq = q.shape[:2]
  skv = k.shape[1]
  mask = None
  if kv_mask is not None:
    mask = jnp.broadcast_to(kv_mask[:, None, None, :], (b, 1, sq, skv))
  if q_segment_ids is not None:
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    mask = same if mask is None else mask & same
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale,
                                     implementation="cudnn")
  if mask is not None:  # rows with no valid key are defined as 0
    has_key = jnp.any(mask[:, 0], axis=-1)[:, :, None, None]  # [B, S_q, 1, 1]
    out = jnp.where(has_key, out, jnp.zeros_like(out))
  return out


def attention(q, k, v, *, kv_mask=None, q_segment_ids=None, kv_segment_ids=None,
              sm_scale: float | None = None, impl: str = "auto", interpret: bool = False,
              block_sizes: attention_lib.BlockSizes | None = None):
  """Non-causal softmax attention, `[B, S, H, D]` layout, with implementation choice.

  Args:
    q: `[B, S_q, H, D]` queries.
    k: `[B, S_kv, H, D]` keys (S_kv may differ from S_q: cross-attention).
    v: `[B, S_kv, H, D]` values.
    kv_mask: optional bool `[B, S_kv]`, True = key may be attended.
    q_segment_ids: optional int `[B, S_q]`; a query attends only to keys of its segment.
    kv_segment_ids: optional int `[B, S_kv]`, given together with q_segment_ids.
    sm_scale: logit scale, default 1/sqrt(D).
    impl: "xla" | "cudnn" | "pallas" | "auto" (see module docstring).
    interpret: run "pallas" in Pallas interpret mode.
    block_sizes: Pallas tiling, default `attention.BlockSizes()`.

  Returns:
    `[B, S_q, H, D]` in q.dtype; rows with no valid key are 0.
  """
  attention_lib.check_attention_args(q, k, v, kv_mask, q_segment_ids, kv_segment_ids)
  chosen = resolve_attention_impl(q, impl, interpret=interpret)
  if chosen == "pallas":
    return attention_lib.flash_attention(
        q, k, v, kv_mask=kv_mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)
  if chosen == "cudnn":
    return _cudnn_attention(q, k, v, kv_mask, q_segment_ids, kv_segment_ids, sm_scale)
  return attention_lib.attention_reference(
      q, k, v, kv_mask=kv_mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      sm_scale=sm_scale)


def _norm_support(x):
  def check():
    _common.check_float_dtype("x", x.dtype)
    if x.shape[-1] > _common.MAX_ROW_BLOCK:
      raise _common.PallasUnsupportedError(
          f"feature size D={x.shape[-1]} exceeds the single-block limit "
          f"{_common.MAX_ROW_BLOCK}")
  return check


def resolve_impl(x, impl: str = "auto", *, interpret: bool = False) -> str:
  """The implementation a norm / rope call would run for activations like x.

  Args:
    x: the activation array (only dtype and last-axis size are consulted).
    impl: "xla" | "pallas" | "auto".
    interpret: whether "pallas" would run in interpret mode.

  Returns:
    "xla" or "pallas".
  """
  _check_impl(impl, IMPLS)
  return _resolve(impl, interpret, _norm_support(x))


def layer_norm_modulate(x, shift, scale, *, num_history: int, eps: float = 1e-6,
                        impl: str = "auto", interpret: bool = False):
  """adaLN `cast(LN(x_f32) * (1 + scale) + shift)`; see `norm.layer_norm_modulate`.

  Args:
    x: `[B, S, D]` activations.
    shift: `[B or 1, 2, D]` fp32 (row 0: tokens `s < num_history`, row 1: the rest).
    scale: `[B or 1, 2, D]` fp32.
    num_history: static count of leading history tokens.
    eps: LayerNorm epsilon.
    impl: "xla" | "pallas" | "auto".
    interpret: run "pallas" in interpret mode.

  Returns:
    `[B, S, D]` in x.dtype.
  """
  if resolve_impl(x, impl, interpret=interpret) == "pallas":
    return norm_lib.layer_norm_modulate(x, shift, scale, num_history=num_history, eps=eps,
                                        interpret=interpret)
  return norm_lib.layer_norm_modulate_reference(x, shift, scale, num_history=num_history,
                                                eps=eps)


def layer_norm(x, weight=None, bias=None, *, eps: float, impl: str = "auto",
               interpret: bool = False):
  """LayerNorm with fp32 math and one rounding; see `norm.layer_norm`.

  Args:
    x: `[..., D]` activations.
    weight: optional `[D]` scale.
    bias: optional `[D]` offset.
    eps: LayerNorm epsilon.
    impl: "xla" | "pallas" | "auto".
    interpret: run "pallas" in interpret mode.

  Returns:
    `[..., D]` in x.dtype.
  """
  if resolve_impl(x, impl, interpret=interpret) == "pallas":
    return norm_lib.layer_norm(x, weight, bias, eps=eps, interpret=interpret)
  return norm_lib.layer_norm_reference(x, weight, bias, eps=eps)


def rms_norm(x, weight, *, eps: float, impl: str = "auto", interpret: bool = False):
  """RMSNorm with torch.nn.RMSNorm numerics; see `norm.rms_norm`.

  Args:
    x: `[..., D]` activations.
    weight: `[D]` scale.
    eps: epsilon.
    impl: "xla" | "pallas" | "auto".
    interpret: run "pallas" in interpret mode.

  Returns:
    `[..., D]` in x.dtype.
  """
  if resolve_impl(x, impl, interpret=interpret) == "pallas":
    return norm_lib.rms_norm(x, weight, eps=eps, interpret=interpret)
  return norm_lib.rms_norm_reference(x, weight, eps=eps)


def apply_rope(x, cos, sin, *, impl: str = "auto", interpret: bool = False):
  """Interleaved-pair RoPE; see `rope.apply_rope`.

  Args:
    x: `[B, S, H, Dh]` q or k.
    cos: `[B or 1, S, Dh // 2]` fp32.
    sin: `[B or 1, S, Dh // 2]` fp32.
    impl: "xla" | "pallas" | "auto".
    interpret: run "pallas" in interpret mode.

  Returns:
    `[B, S, H, Dh]` in x.dtype.
  """
  if resolve_impl(x, impl, interpret=interpret) == "pallas":
    return rope_lib.apply_rope(x, cos, sin, interpret=interpret)
  return rope_lib.apply_rope_reference(x, cos, sin)


def rms_norm_rope(x, weight, cos, sin, *, heads: int, eps: float = 1e-6, impl: str = "auto",
                  interpret: bool = False):
  """q/k RMSNorm across heads then RoPE; see `rope.rms_norm_rope`.

  Args:
    x: `[B, S, H * Dh]` projected q or k.
    weight: `[H * Dh]` RMSNorm scale.
    cos: `[B or 1, S, Dh // 2]` fp32.
    sin: `[B or 1, S, Dh // 2]` fp32.
    heads: static head count.
    eps: RMSNorm epsilon.
    impl: "xla" | "pallas" | "auto".
    interpret: run "pallas" in interpret mode.

  Returns:
    `[B, S, H, Dh]` in x.dtype.
  """
  if resolve_impl(x, impl, interpret=interpret) == "pallas":
    return rope_lib.rms_norm_rope(x, weight, cos, sin, heads=heads, eps=eps,
                                  interpret=interpret)
  return rope_lib.rms_norm_rope_reference(x, weight, cos, sin, heads=heads, eps=eps)
