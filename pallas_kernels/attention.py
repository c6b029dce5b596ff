"""Non-causal flash attention, forward and backward (Pallas, Triton lowering).

FlashAttention-2 (Dao 2023, arXiv:2307.08691) for Helios' two attention shapes: full
bidirectional self-attention over S = 2940 / 4560 / 11040 tokens and guidance
cross-attention of the noisy tokens over 512 text keys. Layout `[B, S, H, D]`.

* Lengths are arbitrary: the last query block and the last key block are ragged and handled
  by masked loads/stores (no padding copies); the key loop runs the unmasked body over whole
  blocks and a masked body once for the ragged tail.
* Optional key-padding mask `kv_mask [B, S_kv]` and segment ids (`q_segment_ids [B, S_q]`,
  `kv_segment_ids [B, S_kv]`: a query attends only to keys of its own segment). Rows with no
  valid key return 0 (their log-sum-exp is stored as +inf so the backward pass gives 0 too).
* fp32 online-softmax statistics (in base 2: logits are pre-scaled by log2(e)), fp32
  accumulators, probabilities rounded to the value dtype for the P @ V matmul (as FA2 does),
  output in q.dtype. fp32 inputs use IEEE fp32 matmuls (`Precision.HIGHEST`).
* Backward (`jax.custom_vjp`): delta = rowsum(dO * O) in XLA, then two Pallas kernels:
  dK/dV (a program per key block, looping over query blocks) and dQ (a program per query
  block, looping over key blocks). Separate kernels because S_q != S_kv in cross-attention.

`attention_reference` is the pure-XLA implementation (also the dispatcher's "xla" path): fp32
logits, chunked over query blocks so 11040 tokens x 40 heads never materialises the whole
logits tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common

_LOG2E = math.log2(math.e)
# Largest head_dim the kernels accept (one [block, head_dim] tile per operand).
MAX_HEAD_DIM = 256
# Logits bytes per chunk of the XLA reference (fp32 [B, H, chunk, S_kv]).
DEFAULT_XLA_LOGITS_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch knobs of the flash-attention kernels.

  Defaults target head_dim 128 in bf16 on H100 (forward 128 x 64 tiles; backward tiles as in
  the Triton fused-attention tutorial); they also work for head_dim 64. Blocks larger than a
  sequence are shrunk to its next power of two (at least 16) at call time.

  Attributes:
    block_q: forward query rows per program.
    block_k: forward keys per inner-loop step.
    block_q_dkv: dK/dV kernel: query rows per inner-loop step.
    block_kv_dkv: dK/dV kernel: keys per program.
    block_q_dq: dQ kernel: query rows per program.
    block_kv_dq: dQ kernel: keys per inner-loop step.
    num_warps: warps per program; None = 4 for head_dim <= 64, else 8.
    num_stages: Triton software-pipelining stages of the inner loops.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 32
  block_kv_dkv: int = 128
  block_q_dq: int = 128
  block_kv_dq: int = 32
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq",
                 "block_kv_dq"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _common.is_pow2(value) or value < 16:
        raise ValueError(f"BlockSizes.{name}={value!r} must be a power of two >= 16 "
                         "(Triton tile constraint)")
    if self.num_warps is not None and (not isinstance(self.num_warps, int)
                                       or not _common.is_pow2(self.num_warps)
                                       or self.num_warps > 32):
      raise ValueError(f"BlockSizes.num_warps={self.num_warps!r} must be None or a power of "
                       "two <= 32")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"BlockSizes.num_stages={self.num_stages!r} must be an int >= 1")


def _fit_block(block: int, length: int) -> int:
  return min(block, max(16, _common.next_pow2(length)))


# --------------------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------------------


def check_attention_args(q, k, v, kv_mask, q_segment_ids, kv_segment_ids) -> None:
  """Raises ValueError naming the first bad shape / dtype among the attention inputs."""
  for name, t in (("q", q), ("k", k), ("v", v)):
    if t.ndim != 4:
      raise ValueError(f"{name}.shape={t.shape} must be [B, S, H, D]")
  b, sq, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k.shape={k.shape} != v.shape={v.shape}")
  if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
    raise ValueError(f"k.shape={k.shape} does not match q.shape={q.shape} in batch, heads "
                     "or head_dim")
  if sq == 0 or k.shape[1] == 0 or d == 0:
    raise ValueError(f"empty attention: q.shape={q.shape}, k.shape={k.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
  skv = k.shape[1]
  if kv_mask is not None:
    if tuple(kv_mask.shape) != (b, skv) or kv_mask.dtype != jnp.bool_:
      raise ValueError(f"kv_mask (shape {tuple(kv_mask.shape)}, dtype {kv_mask.dtype}) must "
                       f"be bool [B, S_kv] = {(b, skv)}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  if q_segment_ids is not None:
    for name, t, n in (("q_segment_ids", q_segment_ids, sq),
                       ("kv_segment_ids", kv_segment_ids, skv)):
      if tuple(t.shape) != (b, n) or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}) must be integer "
                         f"[B, {n}] = {(b, n)}")


def check_pallas_support(q) -> None:
  """Raises `PallasUnsupportedError` if the kernels cannot handle q's dtype / head_dim."""
  _common.check_float_dtype("q", q.dtype)
  if q.shape[-1] > MAX_HEAD_DIM:
    raise _common.PallasUnsupportedError(
        f"head_dim={q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the Pallas attention")


def _default_scale(head_dim: int, sm_scale: float | None) -> float:
  return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


# --------------------------------------------------------------------------------------
# Reference / XLA implementation.
# --------------------------------------------------------------------------------------


def _reference_block(q, k, v, kv_mask, q_seg, kv_seg, sm_scale):
  """Exact softmax attention of a query block; fully masked rows give 0. Returns fp32."""
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32,
                      precision=precision) * sm_scale
  valid = None
  if kv_mask is not None:
    valid = kv_mask[:, None, None, :]
  if q_seg is not None:
    same = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
    valid = same if valid is None else valid & same
  if valid is None:
    probs = jax.nn.softmax(logits, axis=-1)
  else:
    logits = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(valid, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(denom == 0.0, 1.0, denom)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32),
                    preferred_element_type=jnp.float32, precision=precision)


def attention_reference(q, k, v, *, kv_mask=None, q_segment_ids=None, kv_segment_ids=None,
                        sm_scale: float | None = None,
                        max_logits_bytes: int = DEFAULT_XLA_LOGITS_BYTES):
  """Exact softmax attention in XLA (fp32 logits and softmax), chunked over query blocks.

  Queries are processed in chunks (a `lax.map` with a rematerialised body) whenever the fp32
  logits `[B, H, S_q, S_kv]` would exceed `max_logits_bytes`; the result does not depend on
  the chunking.

  Args:
    q: `[B, S_q, H, D]` queries.
    k: `[B, S_kv, H, D]` keys (same dtype as q).
    v: `[B, S_kv, H, D]` values.
    kv_mask: optional bool `[B, S_kv]`, True = key may be attended.
    q_segment_ids: optional int `[B, S_q]`; a query attends only to keys of its segment.
    kv_segment_ids: optional int `[B, S_kv]` (given together with q_segment_ids).
    sm_scale: logit scale, default 1/sqrt(D).
    max_logits_bytes: chunking threshold for the fp32 logits of one chunk.

  Returns:
    `[B, S_q, H, D]` in q.dtype; rows with no valid key are 0.
  """
  check_attention_args(q, k, v, kv_mask, q_segment_ids, kv_segment_ids)
  b, sq, h, d = q.shape
  skv = k.shape[1]
  scale = _default_scale(d, sm_scale)
  block = functools.partial(_reference_block, k=k, v=v, kv_mask=kv_mask, kv_seg=kv_segment_ids,
                            sm_scale=scale)
  row_bytes = b * h * skv * 4
  chunk = max(1, max_logits_bytes // row_bytes)
  if chunk >= sq:
    return block(q, q_seg=q_segment_ids).astype(q.dtype)
  chunk = 1 << (chunk.bit_length() - 1)  # power of two
  n = pl.cdiv(sq, chunk)
  pad = n * chunk - sq
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qc = qp.reshape(b, n, chunk, h, d).swapaxes(0, 1)  # [n, B, chunk, H, D]
  if q_segment_ids is None:
    segc = None
  else:
    segp = jnp.pad(q_segment_ids, ((0, 0), (0, pad)))
    segc = segp.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, chunk]

  @jax.checkpoint
  def one(args):
    qi, si = args
    return block(qi, q_seg=si).astype(q.dtype)

  out = lax.map(one, (qc, segc))  # [n, B, chunk, H, D]
  return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :sq]


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------
#
# Masks are built only where a bound can actually be crossed (statically known): the head
# dimension when D is not a power of two, the query rows of the last q block when S_q is
# ragged, the keys of the peeled last loop step when S_kv is ragged. `None` = no mask.


def _and(a, b):
  if a is None:
    return b
  return a if b is None else a & b


def _load(ref, mask, other=0.0):
  """Masked load (other where masked), or a plain load when mask is None."""
  return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=other)


def _store(ref, value, mask):
  if mask is None:
    plgpu.store(ref, value)
  else:
    plgpu.store(ref, value, mask=mask)


def _bounds(start, block: int, length: int, ragged: bool):
  """[block] bool in-bounds mask of positions start..start+block, or None if never ragged."""
  return (start + jnp.arange(block) < length) if ragged else None


def _rows(mask):
  return None if mask is None else mask[:, None]


def _block_start(j, block: int):
  """Start offset of loop block j, with an alignment hint for Triton."""
  return pl.multiple_of(j * block, block)


def _block_loop(body, length: int, block: int, carry):
  """Runs body(j, carry, edge) over the blocks of `length`.

  Whole blocks run the unmasked body (edge=False); a ragged tail runs once with edge=True
  (bounds masks). The tail is a one-trip loop so its start offset stays dynamic: a static
  slice past the array end is rejected at trace time, a masked dynamic one is not.
  """
  num_full = length // block
  carry = lax.fori_loop(0, num_full, functools.partial(body, edge=False), carry)
  if length % block:
    carry = lax.fori_loop(num_full, num_full + 1, functools.partial(body, edge=True), carry)
  return carry


def _key_validity(kv_ok, kvm_ref, kvs_ref, q_seg, kslice):
  """Bool validity `[1 or block_q, block_k]` of a key block, or None if all keys are valid.

  Args:
    kv_ok: `[block_k]` in-bounds mask of the keys, or None.
    kvm_ref: `[S_kv]` int key-padding mask ref, or None.
    kvs_ref: `[S_kv]` int key segment-id ref, or None.
    q_seg: `[block_q]` query segment ids, or None.
    kslice: the key block's slice.
  """
  valid = None if kv_ok is None else kv_ok[None, :]
  if kvm_ref is not None:
    valid = _and(valid, (_load(kvm_ref.at[kslice], kv_ok, 0) != 0)[None, :])
  if kvs_ref is not None:
    ks = _load(kvs_ref.at[kslice], kv_ok, 0)
    valid = _and(valid, q_seg[:, None] == ks[None, :])
  return valid


def _fwd_kernel(q_ref, k_ref, v_ref, kvm_ref, qs_ref, kvs_ref, o_ref, lse_ref, *, scale_log2,
                head_dim, q_len, kv_len, block_q, block_k, precision):
  # q_ref/o_ref: [block_q, D_pad]; k_ref/v_ref: [S_kv, D_pad]; kvm/kvs_ref: [S_kv];
  # qs_ref: [block_q]; lse_ref: [block_q].
  d_pad = q_ref.shape[-1]
  d_ok = None if head_dim == d_pad else (jnp.arange(d_pad) < head_dim)[None, :]
  row_ok = _bounds(pl.program_id(0) * block_q, block_q, q_len, q_len % block_q != 0)
  q_tile = _and(_rows(row_ok), d_ok)
  q = _load(q_ref, q_tile)
  q_seg = None if qs_ref is None else _load(qs_ref, row_ok, 0)
  can_empty = kvm_ref is not None or kvs_ref is not None  # rows may have no valid key

  def body(j, carry, edge):
    acc, m_prev, l_prev = carry
    start = _block_start(j, block_k)
    kslice = pl.ds(start, block_k)
    kv_ok = _bounds(start, block_k, kv_len, edge)
    kv_tile = _and(_rows(kv_ok), d_ok)
    k = _load(k_ref.at[kslice, :], kv_tile)
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale_log2  # [block_q, block_k]
    valid = _key_validity(kv_ok, kvm_ref, kvs_ref, q_seg, kslice)
    if valid is not None:
      s = jnp.where(valid, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next) if can_empty else m_next
    alpha = jnp.exp2(m_prev - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    v = _load(v_ref.at[kslice, :], kv_tile)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_next, l_next

  carry = (jnp.zeros((block_q, d_pad), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _block_loop(body, kv_len, block_k, carry)
  if can_empty:
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[:, None]
    lse = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
  else:
    out = acc / l[:, None]
    lse = m + jnp.log2(l)
  _store(o_ref, out.astype(o_ref.dtype), q_tile)
  _store(lse_ref, lse, row_ok)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kvm_ref, qs_ref, kvs_ref,
                dk_ref, dv_ref, *, scale_log2, sm_scale, head_dim, q_len, kv_len, block_q,
                block_kv, precision):
  # q_ref/do_ref: [S_q, D_pad]; lse/delta_ref/qs_ref: [S_q]; k/v/dk/dv_ref: [block_kv, D_pad];
  # kvm/kvs_ref: [block_kv].
  d_pad = k_ref.shape[-1]
  d_ok = None if head_dim == d_pad else (jnp.arange(d_pad) < head_dim)[None, :]
  col_ok = _bounds(pl.program_id(0) * block_kv, block_kv, kv_len, kv_len % block_kv != 0)
  kv_tile = _and(_rows(col_ok), d_ok)
  k = _load(k_ref, kv_tile)
  v = _load(v_ref, kv_tile)
  key_ok = None if kvm_ref is None else (_load(kvm_ref, col_ok, 0) != 0)[None, :]
  kv_seg = None if kvs_ref is None else _load(kvs_ref, col_ok, 0)

  def body(i, carry, edge):
    dk, dv = carry
    start = _block_start(i, block_q)
    qslice = pl.ds(start, block_q)
    rows_ok = _bounds(start, block_q, q_len, edge)
    q_tile = _and(_rows(rows_ok), d_ok)
    q = _load(q_ref.at[qslice, :], q_tile)
    do = _load(do_ref.at[qslice, :], q_tile)
    # Rows past the end get lse = +inf, hence p = 0.
    lse = _load(lse_ref.at[qslice], rows_ok, jnp.inf)
    delta = _load(delta_ref.at[qslice], rows_ok, 0.0)
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale_log2  # [block_q, block_kv]
    valid = key_ok
    if kv_seg is not None:
      q_seg = _load(qs_ref.at[qslice], rows_ok, 0)
      valid = _and(valid, q_seg[:, None] == kv_seg[None, :])
    if valid is not None:
      s = jnp.where(valid, s, -jnp.inf)
    p = jnp.exp2(s - lse[:, None])
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
    dp = plgpu.dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta[:, None])
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
    return dk, dv

  carry = (jnp.zeros((block_kv, d_pad), jnp.float32), jnp.zeros((block_kv, d_pad), jnp.float32))
  dk, dv = _block_loop(body, q_len, block_q, carry)
  _store(dk_ref, (dk * sm_scale).astype(dk_ref.dtype), kv_tile)
  _store(dv_ref, dv.astype(dv_ref.dtype), kv_tile)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kvm_ref, qs_ref, kvs_ref,
               dq_ref, *, scale_log2, sm_scale, head_dim, q_len, kv_len, block_q, block_kv,
               precision):
  # q/do/dq_ref: [block_q, D_pad]; lse/delta/qs_ref: [block_q]; k/v_ref: [S_kv, D_pad];
  # kvm/kvs_ref: [S_kv].
  d_pad = q_ref.shape[-1]
  d_ok = None if head_dim == d_pad else (jnp.arange(d_pad) < head_dim)[None, :]
  rows_ok = _bounds(pl.program_id(0) * block_q, block_q, q_len, q_len % block_q != 0)
  q_tile = _and(_rows(rows_ok), d_ok)
  q = _load(q_ref, q_tile)
  do = _load(do_ref, q_tile)
  lse = _load(lse_ref, rows_ok, jnp.inf)
  delta = _load(delta_ref, rows_ok, 0.0)
  q_seg = None if qs_ref is None else _load(qs_ref, rows_ok, 0)

  def body(j, dq, edge):
    start = _block_start(j, block_kv)
    kslice = pl.ds(start, block_kv)
    kv_ok = _bounds(start, block_kv, kv_len, edge)
    kv_tile = _and(_rows(kv_ok), d_ok)
    k = _load(k_ref.at[kslice, :], kv_tile)
    v = _load(v_ref.at[kslice, :], kv_tile)
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale_log2  # [block_q, block_kv]
    valid = _key_validity(kv_ok, kvm_ref, kvs_ref, q_seg, kslice)
    if valid is not None:
      s = jnp.where(valid, s, -jnp.inf)
    p = jnp.exp2(s - lse[:, None])
    dp = plgpu.dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

  dq = _block_loop(body, kv_len, block_kv, jnp.zeros((block_q, d_pad), jnp.float32))
  _store(dq_ref, (dq * sm_scale).astype(dq_ref.dtype), q_tile)


# --------------------------------------------------------------------------------------
# pallas_call wrappers.
# --------------------------------------------------------------------------------------


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _num_warps(block_sizes: BlockSizes, d_pad: int) -> int:
  if block_sizes.num_warps is not None:
    return block_sizes.num_warps
  return 4 if d_pad <= 64 else 8


def _forward(q, k, v, kv_mask, q_seg, kv_seg, sm_scale, block_sizes, interpret):
  """Returns (out [B, S_q, H, D], lse [B, H, S_q] fp32 in log2 units)."""
  b, sq, h, d = q.shape
  skv = k.shape[1]
  d_pad = max(16, _common.next_pow2(d))
  block_q = _fit_block(block_sizes.block_q, sq)
  block_k = _fit_block(block_sizes.block_k, skv)
  q_spec = pl.BlockSpec((None, block_q, None, d_pad), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, skv, None, d_pad), lambda i, bi, hi: (bi, 0, hi, 0))
  kv_vec_spec = pl.BlockSpec((None, skv), lambda i, bi, hi: (bi, 0))
  q_vec_spec = pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i))
  lse_spec = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
  in_specs = [q_spec, kv_spec, kv_spec,
              None if kv_mask is None else kv_vec_spec,
              None if q_seg is None else q_vec_spec,
              None if kv_seg is None else kv_vec_spec]
  kernel = functools.partial(
      _fwd_kernel, scale_log2=sm_scale * _LOG2E, head_dim=d, q_len=sq, kv_len=skv,
      block_q=block_q, block_k=block_k, precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(sq, block_q), b, h),
      in_specs=in_specs,
      out_specs=[q_spec, lse_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
      compiler_params=_common.compiler_params(
          _num_warps(block_sizes, d_pad), block_sizes.num_stages),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q, k, v, kv_mask, q_seg, kv_seg)


def _backward(q, k, v, kv_mask, q_seg, kv_seg, out, lse, do, sm_scale, block_sizes, interpret):
  """Returns (dq, dk, dv)."""
  b, sq, h, d = q.shape
  skv = k.shape[1]
  d_pad = max(16, _common.next_pow2(d))
  precision = _precision(q.dtype)
  do = do.astype(q.dtype)
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  common = dict(scale_log2=sm_scale * _LOG2E, sm_scale=sm_scale, head_dim=d, q_len=sq,
                kv_len=skv, precision=precision)
  params = _common.compiler_params(_num_warps(block_sizes, d_pad), block_sizes.num_stages)

  # dK, dV: a program per key block, looping over all queries.
  bq, bkv = _fit_block(block_sizes.block_q_dkv, sq), _fit_block(block_sizes.block_kv_dkv, skv)
  full_q = pl.BlockSpec((None, sq, None, d_pad), lambda j, bi, hi: (bi, 0, hi, 0))
  full_q_vec = pl.BlockSpec((None, None, sq), lambda j, bi, hi: (bi, hi, 0))
  kv_blk = pl.BlockSpec((None, bkv, None, d_pad), lambda j, bi, hi: (bi, j, hi, 0))
  kv_vec_blk = pl.BlockSpec((None, bkv), lambda j, bi, hi: (bi, j))
  q_seg_full = pl.BlockSpec((None, sq), lambda j, bi, hi: (bi, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, block_kv=bkv, **common),
      grid=(pl.cdiv(skv, bkv), b, h),
      in_specs=[full_q, kv_blk, kv_blk, full_q, full_q_vec, full_q_vec,
                None if kv_mask is None else kv_vec_blk,
                None if q_seg is None else q_seg_full,
                None if kv_seg is None else kv_vec_blk],
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_bwd_dkv",
  )(q, k, v, do, lse, delta, kv_mask, q_seg, kv_seg)

  # dQ: a program per query block, looping over all keys.
  bq, bkv = _fit_block(block_sizes.block_q_dq, sq), _fit_block(block_sizes.block_kv_dq, skv)
  q_blk = pl.BlockSpec((None, bq, None, d_pad), lambda i, bi, hi: (bi, i, hi, 0))
  q_vec_blk = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  q_seg_blk = pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i))
  full_kv = pl.BlockSpec((None, skv, None, d_pad), lambda i, bi, hi: (bi, 0, hi, 0))
  full_kv_vec = pl.BlockSpec((None, skv), lambda i, bi, hi: (bi, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_kv=bkv, **common),
      grid=(pl.cdiv(sq, bq), b, h),
      in_specs=[q_blk, full_kv, full_kv, q_blk, q_vec_blk, q_vec_blk,
                None if kv_mask is None else full_kv_vec,
                None if q_seg is None else q_seg_blk,
                None if kv_seg is None else full_kv_vec],
      out_specs=q_blk,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_bwd_dq",
  )(q, k, v, do, lse, delta, kv_mask, q_seg, kv_seg)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, kv_mask, q_seg, kv_seg, sm_scale, block_sizes, interpret):
  return _forward(q, k, v, kv_mask, q_seg, kv_seg, sm_scale, block_sizes, interpret)[0]


def _flash_fwd(q, k, v, kv_mask, q_seg, kv_seg, sm_scale, block_sizes, interpret):
  out, lse = _forward(q, k, v, kv_mask, q_seg, kv_seg, sm_scale, block_sizes, interpret)
  return out, (q, k, v, kv_mask, q_seg, kv_seg, out, lse)


def _flash_bwd(sm_scale, block_sizes, interpret, res, do):
  q, k, v, kv_mask, q_seg, kv_seg, out, lse = res
  dq, dk, dv = _backward(q, k, v, kv_mask, q_seg, kv_seg, out, lse, do, sm_scale, block_sizes,
                         interpret)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def flash_attention(q, k, v, *, kv_mask=None, q_segment_ids=None, kv_segment_ids=None,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool = False):
  """Non-causal flash attention (Pallas, Triton lowering), differentiable in q, k, v.

  Args:
    q: `[B, S_q, H, D]` bf16/fp16/fp32 queries, D <= 256.
    k: `[B, S_kv, H, D]` keys, same dtype (S_kv may differ from S_q).
    v: `[B, S_kv, H, D]` values.
    kv_mask: optional bool `[B, S_kv]`, True = key may be attended.
    q_segment_ids: optional int `[B, S_q]`; a query attends only to keys of its segment.
    kv_segment_ids: optional int `[B, S_kv]`, given together with q_segment_ids.
    sm_scale: logit scale, default 1/sqrt(D).
    block_sizes: tiling (`BlockSizes`), default `BlockSizes()`.
    interpret: run the Pallas kernels in interpret mode (CPU tests).

  Returns:
    `[B, S_q, H, D]` in q.dtype; rows with no valid key are 0 (and get zero gradients).
  """
  check_attention_args(q, k, v, kv_mask, q_segment_ids, kv_segment_ids)
  check_pallas_support(q)
  scale = _default_scale(q.shape[-1], sm_scale)
  block_sizes = BlockSizes() if block_sizes is None else block_sizes
  kvm = None if kv_mask is None else kv_mask.astype(jnp.int32)
  qs = None if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
  kvs = None if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
  return _flash(q, k, v, kvm, qs, kvs, scale, block_sizes, interpret)
