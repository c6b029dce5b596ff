"""Pallas kernels vs their XLA references: forward, gradients, masks, dispatch, Triton lowering.

On CPU the kernels run in Pallas interpret mode (`interpret=True`); the same kernels are also
lowered to Triton IR for the "cuda" platform (no GPU needed), which checks the Triton
constraints (power-of-two tiles, supported ops). Tests marked `gpu_only` compile and run the
real kernels and skip without a GPU.

Tolerances: fp32 relative error max|ours - ref| / max|ref| <= 1e-5. bf16 norms/RoPE: every
element within 1 bf16 ulp of the reference. bf16 attention: max error <= 2 bf16 ulps of
max|ref| (the kernel rounds probabilities to bf16 for the P @ V matmul, as FlashAttention does,
so small outputs carry an absolute error on the scale of the largest ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention
from pallas_kernels import BlockSizes
from pallas_kernels import dispatch
from pallas_kernels import ImplementationUnavailableError
from pallas_kernels import norm
from pallas_kernels import PallasUnsupportedError
from pallas_kernels import rope

ON_GPU = jax.devices()[0].platform == "gpu"
cpu_only = pytest.mark.skipif(ON_GPU, reason="checks behaviour without a GPU")


def gpu_only(fn):
  """Marks a test `gpu` and skips it unless JAX's default device is a GPU."""
  skip = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (real Triton compilation)")
  return pytest.mark.gpu(skip(fn))

# Interpret-mode programs are large while loops; XLA's backend optimisations only cost
# compile time here (numerics are unchanged), so tests compile them at level 0.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
INTERPRET = not ON_GPU


def _jit(fn):
  return jax.jit(fn, compiler_options=None if ON_GPU else _FAST_COMPILE)


def _rand(seed, shape, dtype=jnp.float32, scale=1.0, offset=0.0):
  x = np.random.RandomState(seed).standard_normal(shape).astype(np.float32)
  return jnp.asarray(x * scale + offset).astype(dtype)


def _rel_err(ours, ref) -> float:
  ours = np.asarray(jnp.asarray(ours, jnp.float32))
  ref = np.asarray(jnp.asarray(ref, jnp.float32))
  assert np.isfinite(ours).all(), "non-finite values in the kernel output"
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _bf16_ulp(x):
  """Spacing of bf16 numbers at |x| (8 significant bits)."""
  return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** -126))) - 7)


def _assert_bf16_within_ulp(ours, ref, ulps=1):
  ours = np.asarray(jnp.asarray(ours, jnp.float32))
  ref = np.asarray(jnp.asarray(ref, jnp.float32))
  err = np.abs(ours - ref) / _bf16_ulp(np.maximum(np.abs(ours), np.abs(ref)))
  assert err.max() <= ulps, f"max error {err.max()} bf16 ulps > {ulps}"


def _assert_close(ours, ref, dtype, ulps=1):
  assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  if dtype == jnp.float32:
    assert _rel_err(ours, ref) <= 1e-5
  else:
    _assert_bf16_within_ulp(ours, ref, ulps)


def _grads(fn, args, cotangent):
  """Gradients of sum(fn(*args) * cotangent) with respect to every argument."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
  return _jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def _assert_grads_close(ours, ref):
  for i, (g, r) in enumerate(zip(ours, ref)):
    assert g.shape == r.shape and g.dtype == r.dtype, (i, g.shape, r.shape, g.dtype, r.dtype)
    err = _rel_err(g, r)
    assert err <= 1e-5, f"gradient {i}: relative error {err}"


DTYPES = [jnp.float32, jnp.bfloat16]

# --------------------------------------------------------------------------------------
# Norms.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 37, 160), (5, 64)])
def test_rms_norm_matches_reference(dtype, shape):
  x = _rand(0, shape, dtype, scale=3.0, offset=0.5)
  w = _rand(1, shape[-1:], dtype)
  ours = _jit(lambda x, w: norm.rms_norm(x, w, eps=1e-6, interpret=INTERPRET))(x, w)
  _assert_close(ours, norm.rms_norm_reference(x, w, eps=1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias"])
def test_layer_norm_matches_reference(dtype, affine):
  x = _rand(0, (2, 37, 160), dtype, scale=3.0, offset=1.0)
  w = None if affine == "none" else _rand(1, (160,))
  b = _rand(2, (160,)) if affine == "weight_bias" else None
  ours = _jit(lambda x, w, b: norm.layer_norm(x, w, b, eps=1e-6, interpret=INTERPRET))(x, w, b)
  _assert_close(ours, norm.layer_norm_reference(x, w, b, eps=1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_history", [0, 5, 37])
def test_layer_norm_modulate_matches_reference(dtype, num_history):
  x = _rand(0, (2, 37, 160), dtype, scale=3.0, offset=1.0)
  shift, scale = _rand(1, (2, 2, 160)), _rand(2, (2, 2, 160), scale=0.5)
  fn = lambda x, sh, sc: norm.layer_norm_modulate(x, sh, sc, num_history=num_history,
                                                  interpret=INTERPRET)
  ours = _jit(fn)(x, shift, scale)
  ref = norm.layer_norm_modulate_reference(x, shift, scale, num_history=num_history)
  _assert_close(ours, ref, dtype)
  # Row selection is real: history and noisy tokens see different modulation.
  if 0 < num_history < 37:
    swapped = norm.layer_norm_modulate_reference(x, shift[:, ::-1], scale[:, ::-1],
                                                 num_history=num_history)
    assert _rel_err(ours, swapped) > 1e-2


def test_norm_gradients():
  x = _rand(0, (2, 37, 160), scale=2.0, offset=0.5)
  ct = _rand(9, x.shape)
  w, b = _rand(1, (160,)), _rand(2, (160,))
  shift, scale = _rand(3, (1, 2, 160)), _rand(4, (1, 2, 160), scale=0.5)  # batch-broadcast

  _assert_grads_close(
      _grads(lambda x, w: norm.rms_norm(x, w, eps=1e-6, interpret=INTERPRET), (x, w), ct),
      _grads(lambda x, w: norm.rms_norm_reference(x, w, eps=1e-6), (x, w), ct))
  _assert_grads_close(
      _grads(lambda x, w, b: norm.layer_norm(x, w, b, eps=1e-6, interpret=INTERPRET),
             (x, w, b), ct),
      _grads(lambda x, w, b: norm.layer_norm_reference(x, w, b, eps=1e-6), (x, w, b), ct))
  _assert_grads_close(
      _grads(lambda x: norm.layer_norm(x, eps=1e-6, interpret=INTERPRET), (x,), ct),
      _grads(lambda x: norm.layer_norm_reference(x, eps=1e-6), (x,), ct))
  _assert_grads_close(
      _grads(lambda x, sh, sc: norm.layer_norm_modulate(x, sh, sc, num_history=5,
                                                        interpret=INTERPRET),
             (x, shift, scale), ct),
      _grads(lambda x, sh, sc: norm.layer_norm_modulate_reference(x, sh, sc, num_history=5),
             (x, shift, scale), ct))


def test_norm_bad_inputs_raise():
  x = jnp.zeros((2, 7, 16))
  with pytest.raises(ValueError, match=r"weight.shape=\(8,\)"):
    norm.rms_norm(x, jnp.ones((8,)), eps=1e-6, interpret=True)
  with pytest.raises(ValueError, match=r"num_history=8"):
    norm.layer_norm_modulate(x, jnp.zeros((2, 2, 16)), jnp.zeros((2, 2, 16)), num_history=8,
                             interpret=True)
  with pytest.raises(ValueError, match=r"shift.shape=\(2, 1, 16\)"):
    norm.layer_norm_modulate(x, jnp.zeros((2, 1, 16)), jnp.zeros((2, 2, 16)), num_history=0,
                             interpret=True)
  with pytest.raises(PallasUnsupportedError, match="int32"):
    norm.layer_norm(jnp.zeros((3, 16), jnp.int32), eps=1e-6, interpret=True)


# --------------------------------------------------------------------------------------
# RoPE.
# --------------------------------------------------------------------------------------


def _tables(seed, batch, seq, pairs):
  angles = np.random.RandomState(seed).uniform(-8.0, 8.0, (batch, seq, pairs)).astype(np.float32)
  return jnp.cos(angles), jnp.sin(angles)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,h,dh,table_batch", [(2, 37, 3, 64, 2), (1, 13, 3, 128, 1),
                                                  (2, 5, 2, 12, 1)])
def test_apply_rope_matches_reference(dtype, b, s, h, dh, table_batch):
  x = _rand(0, (b, s, h, dh), dtype)
  cos, sin = _tables(1, table_batch, s, dh // 2)
  ours = _jit(lambda x, c, s_: rope.apply_rope(x, c, s_, interpret=INTERPRET))(x, cos, sin)
  ref = rope.apply_rope_reference(x, cos, sin)
  _assert_close(ours, ref, dtype)


def test_apply_rope_pair_convention():
  # Pairs are (2p, 2p+1); a +90 degree rotation maps (a, b) -> (-b, a).
  x = jnp.arange(8, dtype=jnp.float32).reshape(1, 1, 1, 8)
  cos, sin = jnp.zeros((1, 1, 4)), jnp.ones((1, 1, 4))
  out = _jit(lambda x, c, s: rope.apply_rope(x, c, s, interpret=INTERPRET))(x, cos, sin)
  np.testing.assert_array_equal(np.asarray(out).ravel(), [-1, 0, -3, 2, -5, 4, -7, 6])


def test_apply_rope_gradients():
  x = _rand(0, (2, 9, 3, 12))
  cos, sin = _tables(1, 1, 9, 6)
  ct = _rand(2, x.shape)
  _assert_grads_close(
      _grads(lambda x, c, s: rope.apply_rope(x, c, s, interpret=INTERPRET), (x, cos, sin), ct),
      _grads(rope.apply_rope_reference, (x, cos, sin), ct))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rope_matches_unfused(dtype):
  b, s, h, dh = 2, 11, 3, 64
  x = _rand(0, (b, s, h * dh), dtype, scale=2.0)
  w = _rand(1, (h * dh,), dtype)
  cos, sin = _tables(2, b, s, dh // 2)
  fused = _jit(lambda x, w, c, s_: rope.rms_norm_rope(x, w, c, s_, heads=h, eps=1e-6,
                                                      interpret=INTERPRET))(x, w, cos, sin)
  ref = rope.rms_norm_rope_reference(x, w, cos, sin, heads=h, eps=1e-6)
  _assert_close(fused, ref, dtype)
  if dtype == jnp.bfloat16:  # same two roundings as the unfused kernels: bit-identical
    unfused = _jit(lambda x, w, c, s_: rope.apply_rope(
        norm.rms_norm(x, w, eps=1e-6, interpret=INTERPRET).reshape(b, s, h, dh), c, s_,
        interpret=INTERPRET))(x, w, cos, sin)
    np.testing.assert_array_equal(np.asarray(fused, np.float32), np.asarray(unfused, np.float32))


def test_rms_norm_rope_gradients():
  b, s, h, dh = 1, 7, 3, 12
  x, w = _rand(0, (b, s, h * dh), scale=2.0), _rand(1, (h * dh,))
  cos, sin = _tables(2, 1, s, dh // 2)
  ct = _rand(3, (b, s, h, dh))
  _assert_grads_close(
      _grads(lambda x, w, c, s_: rope.rms_norm_rope(x, w, c, s_, heads=h, eps=1e-6,
                                                    interpret=INTERPRET), (x, w, cos, sin), ct),
      _grads(lambda x, w, c, s_: rope.rms_norm_rope_reference(x, w, c, s_, heads=h, eps=1e-6),
             (x, w, cos, sin), ct))


def test_rope_bad_inputs_raise():
  x = jnp.zeros((1, 4, 2, 8))
  cos, sin = _tables(0, 1, 4, 4)
  with pytest.raises(ValueError, match=r"Dh=7"):
    rope.apply_rope(jnp.zeros((1, 4, 2, 7)), cos, sin, interpret=True)
  with pytest.raises(ValueError, match=r"cos.shape=\(1, 5, 4\)"):
    rope.apply_rope(x, jnp.zeros((1, 5, 4)), sin, interpret=True)
  with pytest.raises(ValueError, match=r"sin.dtype=bfloat16"):
    rope.apply_rope(x, cos, sin.astype(jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match=r"heads=3"):
    rope.rms_norm_rope(jnp.zeros((1, 4, 16)), jnp.ones((16,)), cos, sin, heads=3,
                       interpret=True)


# --------------------------------------------------------------------------------------
# Attention.
# --------------------------------------------------------------------------------------

# Small tiles so that tiny sequences still take several (and ragged) blocks.
SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_kv_dkv=32,
                          block_q_dq=32, block_kv_dq=16)


def _qkv(b, sq, skv, h, d, dtype, seed=0):
  return (_rand(seed, (b, sq, h, d), dtype), _rand(seed + 1, (b, skv, h, d), dtype),
          _rand(seed + 2, (b, skv, h, d), dtype))


def _masks(b, sq, skv, seed=0):
  """Random kv_mask and segments; segment 2 has no keys, the last of b > 1 no valid key."""
  rng = np.random.RandomState(seed)
  kv_mask = rng.uniform(size=(b, skv)) < 0.7
  if b > 1:
    kv_mask[-1] = False  # every query of the last batch element has no valid key
  q_seg = rng.randint(0, 3, (b, sq)).astype(np.int32)
  kv_seg = rng.randint(0, 2, (b, skv)).astype(np.int32)
  return dict(kv_mask=jnp.asarray(kv_mask), q_segment_ids=jnp.asarray(q_seg),
              kv_segment_ids=jnp.asarray(kv_seg))


def _flash(block_sizes=None, **kw):
  return _jit(lambda q, k, v, m: attention.flash_attention(
      q, k, v, **m, block_sizes=block_sizes, interpret=INTERPRET, **kw))


ATTENTION_CASES = [
    # b, sq, skv, h, d, masks, block_sizes
    (2, 37, 37, 3, 64, False, SMALL_BLOCKS),  # self-attention, ragged q and kv blocks
    (1, 130, 130, 2, 128, False, None),  # default 128 x 64 tiles, ragged tails
    (2, 37, 70, 3, 64, True, SMALL_BLOCKS),  # cross-attention + kv mask + segment ids
    (2, 20, 45, 1, 12, True, SMALL_BLOCKS),  # head_dim 12 (padded to 16)
    (1, 32, 48, 2, 64, False, SMALL_BLOCKS),  # block-aligned: no bounds masks at all
]


@pytest.mark.parametrize("b,sq,skv,h,d,masks,block_sizes", ATTENTION_CASES)
def test_flash_attention_fp32_matches_reference(b, sq, skv, h, d, masks, block_sizes):
  q, k, v = _qkv(b, sq, skv, h, d, jnp.float32)
  m = _masks(b, sq, skv) if masks else {}
  ours = _flash(block_sizes)(q, k, v, m)
  _assert_close(ours, attention.attention_reference(q, k, v, **m), jnp.float32)


@pytest.mark.parametrize("b,sq,skv,h,d,masks,block_sizes",
                         [ATTENTION_CASES[0], ATTENTION_CASES[2]])
def test_flash_attention_bf16_matches_reference(b, sq, skv, h, d, masks, block_sizes):
  q, k, v = _qkv(b, sq, skv, h, d, jnp.bfloat16)
  m = _masks(b, sq, skv) if masks else {}
  ours = _flash(block_sizes)(q, k, v, m)
  ref = attention.attention_reference(q, k, v, **m)
  assert ours.dtype == jnp.bfloat16
  err = np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32)).max()
  assert err <= 2 * _bf16_ulp(np.abs(np.asarray(ref, np.float32)).max())


def test_flash_attention_scale_override():
  q, k, v = _qkv(1, 20, 33, 2, 64, jnp.float32)
  ours = _flash(SMALL_BLOCKS, sm_scale=0.3)(q, k, v, {})
  _assert_close(ours, attention.attention_reference(q, k, v, sm_scale=0.3), jnp.float32)


def test_flash_attention_fully_masked_rows_are_zero():
  b, sq, skv, h, d = 2, 20, 24, 2, 64
  q, k, v = _qkv(b, sq, skv, h, d, jnp.float32)
  m = _masks(b, sq, skv)
  out = np.asarray(_flash(SMALL_BLOCKS)(q, k, v, m))
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[-1], 0.0)  # all keys padded
  kv_mask, q_seg, kv_seg = (np.asarray(m[n]) for n in ("kv_mask", "q_segment_ids",
                                                       "kv_segment_ids"))
  no_key = ~((q_seg[:, :, None] == kv_seg[:, None, :]) & kv_mask[:, None, :]).any(-1)
  assert no_key[0].any() and not no_key[0].all()
  np.testing.assert_array_equal(out[no_key], 0.0)
  ct = _rand(5, q.shape)
  dq, dk, dv = _grads(lambda q, k, v: attention.flash_attention(
      q, k, v, **m, block_sizes=SMALL_BLOCKS, interpret=INTERPRET), (q, k, v), ct)
  for g in (dq, dk, dv):
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(np.asarray(dq)[no_key], 0.0)
  np.testing.assert_array_equal(np.asarray(dk)[-1], 0.0)


@pytest.mark.parametrize("b,sq,skv", [(2, 37, 37), (1, 32, 48)])
def test_flash_attention_gradients(b, sq, skv):
  h, d = 2, 64
  q, k, v = _qkv(b, sq, skv, h, d, jnp.float32)
  ct = _rand(7, q.shape)
  _assert_grads_close(
      _grads(lambda q, k, v: attention.flash_attention(
          q, k, v, block_sizes=SMALL_BLOCKS, interpret=INTERPRET), (q, k, v), ct),
      _grads(lambda q, k, v: attention.attention_reference(q, k, v), (q, k, v), ct))


def test_flash_attention_gradients_cross_masked():
  b, sq, skv, h, d = 2, 37, 45, 1, 128
  q, k, v = _qkv(b, sq, skv, h, d, jnp.float32)
  m = _masks(b, sq, skv, seed=3)
  ct = _rand(7, q.shape)
  _assert_grads_close(
      _grads(lambda q, k, v: attention.flash_attention(
          q, k, v, **m, block_sizes=SMALL_BLOCKS, interpret=INTERPRET), (q, k, v), ct),
      _grads(lambda q, k, v: attention.attention_reference(q, k, v, **m), (q, k, v), ct))


def test_block_sizes_validation():
  assert BlockSizes().block_q == 128 and BlockSizes().block_k == 64
  with pytest.raises(ValueError, match=r"block_q=96"):
    BlockSizes(block_q=96)
  with pytest.raises(ValueError, match=r"block_k=8"):
    BlockSizes(block_k=8)
  with pytest.raises(ValueError, match=r"num_warps=3"):
    BlockSizes(num_warps=3)
  with pytest.raises(ValueError, match=r"num_stages=0"):
    BlockSizes(num_stages=0)


def test_attention_bad_inputs_raise():
  q, k, v = _qkv(1, 8, 8, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"kv_mask"):
    attention.flash_attention(q, k, v, kv_mask=jnp.ones((1, 9), bool), interpret=True)
  with pytest.raises(ValueError, match="given together"):
    attention.flash_attention(q, k, v, q_segment_ids=jnp.zeros((1, 8), jnp.int32),
                              interpret=True)
  with pytest.raises(ValueError, match=r"k.shape=\(1, 8, 3, 16\)"):
    attention.flash_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)),
                              interpret=True)
  with pytest.raises(PallasUnsupportedError, match=r"head_dim=512"):
    attention.flash_attention(*_qkv(1, 8, 8, 1, 512, jnp.float32), interpret=True)


def test_xla_attention_chunking_is_exact():
  b, sq, skv, h, d = 2, 37, 21, 2, 16
  q, k, v = _qkv(b, sq, skv, h, d, jnp.float32)
  m = _masks(b, sq, skv)
  whole = attention.attention_reference(q, k, v, **m)
  tiny = b * h * skv * 4 * 8  # 8 query rows per chunk -> 5 chunks, the last one padded
  chunked = attention.attention_reference(q, k, v, **m, max_logits_bytes=tiny)
  assert _rel_err(chunked, whole) <= 1e-6
  ct = _rand(3, q.shape)
  _assert_grads_close(
      _grads(lambda q, k, v: attention.attention_reference(q, k, v, **m, max_logits_bytes=tiny),
             (q, k, v), ct),
      _grads(lambda q, k, v: attention.attention_reference(q, k, v, **m), (q, k, v), ct))


# --------------------------------------------------------------------------------------
# Triton lowering (runs on CPU: lowers for the "cuda" platform without compiling).
# --------------------------------------------------------------------------------------


def _lower_for_cuda(fn, *avals) -> None:
  """Lowers fn for CUDA; every pallas_call must pass the Pallas -> Triton IR lowering."""
  try:
    text = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:
    # Newer jaxlibs compile the Triton IR during lowering; without a CUDA plugin that last
    # step has no compiler, but reaching it means the Triton IR was built.
    if "Triton compilation handler" in str(e):
      return
    raise
  assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text


_SDS = jax.ShapeDtypeStruct
_BF16 = jnp.bfloat16


def _loss(fn):
  return lambda *a: jnp.sum(fn(*a).astype(jnp.float32))


LOWERING_CASES = {
    "rms_norm_5120": (lambda x, w: norm.rms_norm(x, w, eps=1e-6),
                      (_SDS((1, 37, 5120), _BF16), _SDS((5120,), _BF16))),
    "layer_norm_affine": (lambda x, w, b: norm.layer_norm(x, w, b, eps=1e-6),
                          (_SDS((1, 37, 5120), _BF16), _SDS((5120,), jnp.float32),
                           _SDS((5120,), jnp.float32))),
    "layer_norm_modulate": (lambda x, sh, sc: norm.layer_norm_modulate(x, sh, sc,
                                                                       num_history=11),
                            (_SDS((1, 37, 160), _BF16), _SDS((1, 2, 160), jnp.float32),
                             _SDS((1, 2, 160), jnp.float32))),
    "rope_40x128": (rope.apply_rope, (_SDS((1, 37, 40, 128), _BF16),
                                      _SDS((1, 37, 64), jnp.float32),
                                      _SDS((1, 37, 64), jnp.float32))),
    "rms_norm_rope": (lambda x, w, c, s: rope.rms_norm_rope(x, w, c, s, heads=3),
                      (_SDS((1, 37, 36), _BF16), _SDS((36,), _BF16),
                       _SDS((1, 37, 6), jnp.float32), _SDS((1, 37, 6), jnp.float32))),
    "attention_self_11040": (attention.flash_attention,
                             (_SDS((1, 11040, 40, 128), _BF16),) * 3),
    "attention_cross_8640x512": (attention.flash_attention,
                                 (_SDS((1, 8640, 40, 128), _BF16),
                                  _SDS((1, 512, 40, 128), _BF16),
                                  _SDS((1, 512, 40, 128), _BF16))),
    "attention_cross_masked": (
        lambda q, k, v, m, qs, ks: attention.flash_attention(
            q, k, v, kv_mask=m, q_segment_ids=qs, kv_segment_ids=ks),
        (_SDS((2, 37, 3, 64), jnp.float32), _SDS((2, 512, 3, 64), jnp.float32),
         _SDS((2, 512, 3, 64), jnp.float32), _SDS((2, 512), jnp.bool_),
         _SDS((2, 37), jnp.int32), _SDS((2, 512), jnp.int32))),
}


@pytest.mark.parametrize("name", sorted(LOWERING_CASES))
def test_kernels_lower_to_triton(name):
  fn, avals = LOWERING_CASES[name]
  float_args = tuple(i for i, a in enumerate(avals) if jnp.issubdtype(a.dtype, jnp.floating))
  _lower_for_cuda(fn, *avals)  # forward
  _lower_for_cuda(jax.grad(_loss(fn), argnums=float_args), *avals)  # backward


# --------------------------------------------------------------------------------------
# Dispatcher.
# --------------------------------------------------------------------------------------


def test_dispatch_rejects_unknown_impl():
  q, k, v = _qkv(1, 8, 8, 1, 16, jnp.float32)
  with pytest.raises(ValueError, match=r"impl='triton'"):
    dispatch.attention(q, k, v, impl="triton")
  with pytest.raises(ValueError, match=r"impl='cudnn'"):
    dispatch.rms_norm(q, jnp.ones((16,)), eps=1e-6, impl="cudnn")


@cpu_only
def test_dispatch_never_falls_back_silently_on_cpu():
  q, k, v = _qkv(1, 8, 8, 1, 16, jnp.float32)
  x = q.reshape(1, 8, 16)
  with pytest.raises(ImplementationUnavailableError, match="interpret=True"):
    dispatch.attention(q, k, v, impl="pallas")
  with pytest.raises(ImplementationUnavailableError, match="cudnn"):
    dispatch.attention(q, k, v, impl="cudnn")
  with pytest.raises(ImplementationUnavailableError, match="needs a GPU"):
    dispatch.rms_norm(x, jnp.ones((16,)), eps=1e-6, impl="pallas")
  with pytest.raises(ImplementationUnavailableError, match="needs a GPU"):
    dispatch.layer_norm(x, eps=1e-6, impl="pallas")
  with pytest.raises(ImplementationUnavailableError, match="needs a GPU"):
    dispatch.layer_norm_modulate(x, jnp.zeros((1, 2, 16)), jnp.zeros((1, 2, 16)),
                                 num_history=0, impl="pallas")
  cos, sin = _tables(0, 1, 8, 8)
  with pytest.raises(ImplementationUnavailableError, match="needs a GPU"):
    dispatch.apply_rope(q, cos, sin, impl="pallas")
  # "auto" picks XLA on CPU and says so.
  assert dispatch.resolve_attention_impl(q) == "xla"
  assert dispatch.resolve_impl(x) == "xla"
  assert dispatch.resolve_attention_impl(q, interpret=True) == "pallas"


def test_dispatch_unsupported_inputs():
  q, k, v = _qkv(1, 8, 8, 1, 512, jnp.float32)
  with pytest.raises(PallasUnsupportedError, match=r"head_dim=512"):
    dispatch.attention(q, k, v, impl="pallas", interpret=True)
  # "auto" does not pick a kernel that cannot run the inputs.
  assert dispatch.resolve_attention_impl(q, interpret=True) == "xla"
  xi = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(PallasUnsupportedError, match="int32"):
    dispatch.layer_norm(xi, eps=1e-6, impl="pallas", interpret=True)
  assert dispatch.resolve_impl(xi, interpret=True) == "xla"


def test_dispatch_routes_to_the_requested_implementation():
  q, k, v = _qkv(1, 21, 21, 2, 16, jnp.float32)
  m = _masks(1, 21, 21)
  ref = attention.attention_reference(q, k, v, **m)
  xla = _jit(lambda q, k, v: dispatch.attention(q, k, v, **m, impl="xla"))(q, k, v)
  pallas = _jit(lambda q, k, v: dispatch.attention(q, k, v, **m, impl="pallas",
                                                   interpret=INTERPRET))(q, k, v)
  np.testing.assert_array_equal(np.asarray(xla), np.asarray(ref))
  assert _rel_err(pallas, ref) <= 1e-5
  x = _rand(0, (3, 5, 48), jnp.bfloat16)
  w = _rand(1, (48,), jnp.bfloat16)
  ours = _jit(lambda x, w: dispatch.rms_norm(x, w, eps=1e-6, impl="pallas",
                                             interpret=INTERPRET))(x, w)
  _assert_close(ours, norm.rms_norm_reference(x, w, eps=1e-6), jnp.bfloat16)


# --------------------------------------------------------------------------------------
# GPU only: the real Triton kernels at moderate sizes.
# --------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,skv,masks", [(1000, 1000, False), (777, 512, True)])
def test_gpu_flash_attention(dtype, sq, skv, masks):
  b, h, d = 2, 4, 128
  q, k, v = _qkv(b, sq, skv, h, d, dtype)
  m = _masks(b, sq, skv) if masks else {}
  ours = _flash()(q, k, v, m)
  ref = attention.attention_reference(q, k, v, **m)
  if dtype == jnp.float32:
    assert _rel_err(ours, ref) <= 1e-5
  else:
    err = np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32)).max()
    assert err <= 2 * _bf16_ulp(np.abs(np.asarray(ref, np.float32)).max())
  if dtype == jnp.float32:
    ct = _rand(5, q.shape)
    _assert_grads_close(
        _grads(lambda q, k, v: attention.flash_attention(q, k, v, **m), (q, k, v), ct),
        _grads(lambda q, k, v: attention.attention_reference(q, k, v, **m), (q, k, v), ct))


@gpu_only
def test_gpu_norms_and_rope():
  x = _rand(0, (1, 300, 5120), jnp.bfloat16, scale=2.0)
  w = _rand(1, (5120,), jnp.bfloat16)
  _assert_close(norm.rms_norm(x, w, eps=1e-6), norm.rms_norm_reference(x, w, eps=1e-6),
                jnp.bfloat16)
  sh, sc = _rand(2, (1, 2, 5120)), _rand(3, (1, 2, 5120), scale=0.5)
  _assert_close(norm.layer_norm_modulate(x, sh, sc, num_history=100),
                norm.layer_norm_modulate_reference(x, sh, sc, num_history=100), jnp.bfloat16)
  xr = x.reshape(1, 300, 40, 128)
  cos, sin = _tables(4, 1, 300, 64)
  _assert_close(rope.apply_rope(xr, cos, sin), rope.apply_rope_reference(xr, cos, sin),
                jnp.bfloat16)
  _assert_close(rope.rms_norm_rope(x, w, cos, sin, heads=40),
                rope.rms_norm_rope_reference(x, w, cos, sin, heads=40, eps=1e-6), jnp.bfloat16)


@gpu_only
def test_gpu_cudnn_matches_xla():
  q, k, v = _qkv(1, 1000, 512, 4, 128, jnp.bfloat16)
  m = _masks(1, 1000, 512)
  out = dispatch.attention(q, k, v, **m, impl="cudnn")
  ref = attention.attention_reference(q, k, v, **m)
  err = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).max()
  assert err <= 2 * _bf16_ulp(np.abs(np.asarray(ref, np.float32)).max())
