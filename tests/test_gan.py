"""Stage-3 GAN discriminator (spec training.md §7.6): heads, crops, losses, cached-grad trick.

Head shapes on tiny sizes, parity of one `Discriminator3DHead` with an equivalent torch
`nn.Sequential`, softplus losses against hand formulas, crop sizes / offsets, the cached-grad
surrogate against direct backprop, and the error messages for bad inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import rel_err
from helios_jax.training import gan


@pytest.fixture(autouse=True, scope="module")
def _fast_threefry():
  """Non-partitionable threefry (as in test_training.py): XLA:CPU compiles the eager parameter
  initialisers of the partitionable variant several times slower."""
  with jax.threefry_partitionable(False):
    yield


def _fwd(module):
  """Jitted forward of an nnx module via split / merge (eager 3D convs compile op by op)."""
  graphdef, params = nnx.split(module)
  return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)), params


def _softplus(x):
  x = np.asarray(x, np.float64)
  return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def test_head_feature_shapes_follow_conv_arithmetic():
  assert gan.head_feature_shapes(9, 4, 4) == [(9, 4, 4), (4, 2, 2), (2, 1, 1), (1, 1, 1),
                                              (1, 1, 1), (1, 1, 1)]
  # Full size: 9 frames, 24 x 40 token crops.
  assert gan.head_feature_shapes(9, 24, 40)[-1] == (1, 6, 10)
  assert gan.head_feature_shapes(4, 5, 7)[2] == (1, 1, 1)
  gan.check_head_input(4, 4, 4)
  for shape in [(3, 8, 8), (9, 3, 8), (9, 8, 2)]:
    with pytest.raises(ValueError, match="too small"):
      gan.check_head_input(*shape)


def test_heads_output_shape_on_tiny_sizes_via_split_merge():
  b, d, c_out, num_layers = 2, 16, 4, 4
  in_ch = gan.head_in_channels(num_layers, d, c_out)
  assert in_ch == (16, 16, 16, 16, 4)
  heads = gan.DiscriminatorHeads(in_ch, width=16, groups=8, rngs=nnx.Rngs(0))
  fwd, params = _fwd(heads)
  keys = jax.random.split(jax.random.key(1), 5)
  # 4 hidden-state features at token resolution (9 x 4 x 4) + velocity at latent res (9 x 8 x 8).
  feats = [jax.random.normal(k, (b, 9, 4, 4, d)) for k in keys[:4]]
  feats.append(jax.random.normal(keys[4], (b, 9, 8, 8, c_out)))
  out = fwd(params, feats)
  assert out.shape == (b, 5) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  # Column i is head i on feature i; different samples give different logits.
  head_fwd, head_params = _fwd(heads.heads[4])
  np.testing.assert_allclose(out[:, 4], head_fwd(head_params, feats[4]), rtol=1e-5, atol=1e-6)
  assert abs(float(out[0, 0] - out[1, 0])) > 0
  with pytest.raises(ValueError, match="5 heads"):
    heads(feats[:4])


def _torch_head(c_in, width, groups):
  layers = []
  c = c_in
  for k, s, p in gan.HEAD_CONVS:
    layers += [torch.nn.Conv3d(c, width, k, s, p), torch.nn.GroupNorm(groups, width),
               torch.nn.SiLU()]
    c = width
  layers += [torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(width, 1)]
  return torch.nn.Sequential(*layers)


def test_head_matches_torch_sequential():
  c_in, width, groups = 5, 32, 8
  torch.manual_seed(0)
  ref = _torch_head(c_in, width, groups).double()
  with torch.no_grad():  # non-trivial GroupNorm affine parameters
    for m in ref:
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.3, 0.3)
  head = gan.Discriminator3DHead(c_in, width, groups, rngs=nnx.Rngs(0))
  convs = [m for m in ref if isinstance(m, torch.nn.Conv3d)]
  norms = [m for m in ref if isinstance(m, torch.nn.GroupNorm)]
  t2j = lambda t: jnp.asarray(t.detach().numpy(), jnp.float32)
  for conv, tc, norm, tn in zip(head.convs, convs, head.norms, norms):
    conv.kernel.value = t2j(tc.weight.permute(2, 3, 4, 1, 0))
    conv.bias.value = t2j(tc.bias)
    norm.scale.value = t2j(tn.weight)
    norm.bias.value = t2j(tn.bias)
  head.proj.kernel.value = t2j(ref[-1].weight.T)
  head.proj.bias.value = t2j(ref[-1].bias)

  x = np.random.default_rng(0).standard_normal((2, 9, 6, 8, c_in)).astype(np.float32)
  fwd, params = _fwd(head)
  ours = fwd(params, jnp.asarray(x))
  with torch.no_grad():
    want = ref(torch.from_numpy(x).double().permute(0, 4, 1, 2, 3))[:, 0].numpy()
  assert ours.shape == (2,)
  assert rel_err(ours, want) <= 1e-5, rel_err(ours, want)


def test_head_errors():
  with pytest.raises(ValueError, match=r"groups=32 .*width=48"):
    gan.Discriminator3DHead(4, width=48, groups=32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="groups=32"):
    gan.GanConfig(head_width=48)
  head = gan.Discriminator3DHead(4, width=8, groups=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(3, 8, 8\) is too small"):
    head(jnp.zeros((1, 3, 8, 8, 4)))
  with pytest.raises(ValueError, match=r"\(9, 8, 2\) is too small"):
    head(jnp.zeros((1, 9, 8, 2, 4)))
  with pytest.raises(ValueError, match=r"\[B, T, H, W, 4\]"):
    head(jnp.zeros((1, 9, 8, 8, 3)))


def test_head_blocks():
  assert gan.head_blocks(40) == (5, 15, 25, 35)
  assert gan.head_blocks(4) == (0, 1, 2, 3)
  assert gan.head_blocks(8) == (1, 3, 5, 7)
  assert gan.head_blocks(30) == (3, 11, 18, 26)
  assert gan.head_blocks(2) == (0, 1) and gan.head_blocks(1) == (0,)
  for n in range(4, 81):
    blocks = gan.head_blocks(n)
    assert len(blocks) == 4 and all(a < b for a, b in zip(blocks, blocks[1:]))
    assert 0 <= blocks[0] and blocks[-1] <= n - 1
  with pytest.raises(ValueError):
    gan.head_blocks(0)


def test_losses_match_hand_formulas():
  rng = np.random.default_rng(0)
  lf, lr, lp = (rng.standard_normal((3, 5)).astype(np.float32) * 3 for _ in range(3))
  d = gan.d_loss(jnp.asarray(lf), jnp.asarray(lr))
  np.testing.assert_allclose(d, 0.01 * _softplus(-lf).mean() + 0.01 * _softplus(lr).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(gan.d_loss(jnp.asarray(lf), jnp.asarray(lr), weight=0.5),
                             0.5 * (_softplus(-lf).mean() + _softplus(lr).mean()), rtol=1e-6)
  np.testing.assert_allclose(gan.g_loss(jnp.asarray(lf)), 0.05 * _softplus(lf).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(gan.approx_r1(jnp.asarray(lr), jnp.asarray(lp)),
                             100.0 * np.mean((lr.astype(np.float64) - lp) ** 2), rtol=1e-6)
  # Sign convention: large logit = fake; D is happy with fake >> 0 and real << 0.
  assert float(gan.d_loss(jnp.full((2, 5), 20.0), jnp.full((2, 5), -20.0))) < 1e-9
  np.testing.assert_allclose(gan.d_loss(jnp.zeros((2, 5)), jnp.zeros((2, 5))),
                             0.02 * np.log(2.0), rtol=1e-6)
  assert float(gan.g_loss(jnp.full((2, 5), -20.0))) < 1e-9


def test_crop_sizes():
  assert gan.crop_size(48, 80) == (24, 40)
  assert gan.crop_size(48, 80, multiple=2) == (24, 40)
  assert gan.crop_size(10, 14, 0.5, multiple=2) == (6, 8)  # 2.5 -> 3 tokens, 3.5 -> 4 tokens
  assert gan.crop_size(9, 5, 0.5) == (5, 3)  # round half up
  assert gan.crop_size(2, 2, 0.1, multiple=2) == (2, 2)  # at least one multiple
  with pytest.raises(ValueError, match="does not fit"):
    gan.crop_size(3, 8, 1.0, multiple=2)


@pytest.mark.parametrize("h, w, multiple", [(16, 12, 1), (16, 12, 2)])
def test_random_crop_offsets_valid_uniform_and_independent(h, w, multiple):
  b, t, c = 512, 2, 3
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  code = (1000 * ii + jj).astype(np.float32)  # value encodes the (row, column) position
  x = jnp.broadcast_to(jnp.asarray(code)[None, None, :, :, None], (b, t, h, w, c))
  key = jax.random.key(3)
  out = jax.jit(gan.random_crop, static_argnums=(2, 3))(key, x, 0.5, multiple)
  ch, cw = gan.crop_size(h, w, 0.5, multiple)
  assert out.shape == (b, t, ch, cw, c)
  off = np.asarray(gan.crop_offsets(key, b, h, w, (ch, cw), multiple))
  got = np.stack([np.asarray(out[:, 0, 0, 0, 0]) // 1000, np.asarray(out[:, 0, 0, 0, 0]) % 1000],
                 axis=1).astype(np.int64)
  np.testing.assert_array_equal(got, off)
  # Each sample is the contiguous window at its offset.
  o = off[7]
  np.testing.assert_array_equal(out[7, 1, :, :, 2], code[o[0]:o[0] + ch, o[1]:o[1] + cw])
  # Valid multiples only, every valid position is hit, roughly uniformly.
  for axis, n, cn in ((0, h, ch), (1, w, cw)):
    assert np.all(off[:, axis] % multiple == 0)
    assert off[:, axis].min() >= 0 and off[:, axis].max() + cn <= n
    valid = np.arange(0, n - cn + 1, multiple)
    counts = np.array([(off[:, axis] == v).sum() for v in valid])
    assert counts.sum() == b and counts.min() > 0.5 * b / len(valid)
  # Independent across samples: many distinct (row, column) pairs, row / column uncorrelated,
  # and consecutive samples not correlated.
  assert len({tuple(r) for r in off}) > 0.5 * len(np.arange(0, h - ch + 1, multiple)) * len(
      np.arange(0, w - cw + 1, multiple))
  assert abs(np.corrcoef(off[:, 0], off[:, 1])[0, 1]) < 0.15
  assert abs(np.corrcoef(off[:-1, 0], off[1:, 0])[0, 1]) < 0.15


def test_cached_grad_surrogate_equals_direct_backprop():
  heads = gan.DiscriminatorHeads((3,), width=8, groups=4, rngs=nnx.Rngs(0))
  graphdef, d_params = nnx.split(heads)
  shape = (2, 4, 5, 6, 3)
  a = jax.random.normal(jax.random.key(1), (6, int(np.prod(shape))), jnp.float32) * 0.5

  def upstream(theta):  # generator stand-in: x = f(theta)
    return jnp.tanh(theta @ a).reshape(shape) * (1.0 + theta[0])

  def loss_fn(x):  # frozen D (closed over) on a crop of x
    x = gan.crop(x, jnp.array([[0, 2], [1, 0]]), (4, 4))
    return gan.g_loss(nnx.merge(graphdef, d_params)([x])) * 100.0

  theta = jax.random.normal(jax.random.key(2), (6,), jnp.float32)
  direct_v, direct_g = jax.jit(jax.value_and_grad(lambda th: loss_fn(upstream(th))))(theta)

  def surrogate(th):
    value, sur = gan.cached_grad_surrogate(loss_fn, upstream(th))
    return sur, value

  (sur_v, value), sur_g = jax.jit(jax.value_and_grad(surrogate, has_aux=True))(theta)
  np.testing.assert_allclose(value, direct_v, rtol=1e-6)
  np.testing.assert_allclose(sur_v, direct_v, rtol=1e-6)
  assert rel_err(sur_g, direct_g) <= 1e-5, rel_err(sur_g, direct_g)
  assert float(jnp.abs(direct_g).max()) > 0
  # Pytree inputs work too (gradient reaches both leaves).
  v2, s2 = gan.cached_grad_surrogate(lambda p: jnp.sum(p[0] ** 2) + jnp.sum(p[1]),
                                     [jnp.ones(3), jnp.ones(2)])
  np.testing.assert_allclose([v2, s2], [5.0, 5.0])
  g2 = jax.grad(lambda p: gan.cached_grad_surrogate(
      lambda q: jnp.sum(q[0] ** 2) + jnp.sum(q[1]), p)[1])([jnp.ones(3), jnp.ones(2)])
  np.testing.assert_allclose(g2[0], 2.0)
  np.testing.assert_allclose(g2[1], 1.0)
