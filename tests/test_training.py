"""Training stages 1-2, in-process (CPU): spec training.md §11.2 invariants and parity checks.

Schedules (sigma sampler, shifts, pyramid constants, renoise), sample construction and drop
frequencies, Frame-Aware Corrupt identities, losses at the exact target, the NaViT packed
forward == per-draw forwards, LoRA identities, optimizer / schedule parity with torch and
diffusers, the data pipeline (metadata, bucketing, process sharding, resumable iterator), the
Wan2.1 init and bad-input errors. Command-line runs and the TFDS precompute live in
`test_training_cli.py`.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import rel_err
from helios_jax import sampling
from helios_jax import schedulers as hs
from helios_jax.config import HeliosTransformerConfig
from helios_jax.data import clips as clips_lib
from helios_jax.data import latents as latents_lib
from helios_jax.data import pipeline as pipeline_lib
from helios_jax.data import sections
from helios_jax.data import synthetic
from helios_jax.data.clips import DataError
from helios_jax.models import rope as rope_lib
from helios_jax.schedulers import pyramid as pyr
from helios_jax.training import corrupt
from helios_jax.training import lora
from helios_jax.training import losses
from helios_jax.training import model as model_lib
from helios_jax.training import optim
from helios_jax.training import sample
from pallas_kernels import dispatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_METADATA = os.path.join(REPO, "data", "toy_data", "toy_filter.json")
TINY = HeliosTransformerConfig.from_preset("tiny")
F32 = jnp.float32
NO_DROP = sample.DropConfig(enabled=False)
NO_CORRUPT = corrupt.CorruptConfig(mode="none")
NOISE = corrupt.CorruptConfig(mode="noise", clean_prob=0.0)


@pytest.fixture(autouse=True, scope="module")
def _fast_threefry():
  """Non-partitionable threefry for this module (restored afterwards).

  Same semantics on one device; XLA:CPU compiles the partitionable variant of large random
  draws ~20x slower at its default optimisation level, which dominated these tests' runtime.
  """
  with jax.threefry_partitionable(False):
    yield


# ------------------------------------------------------------------------------------------
# Schedules.


def test_stage1_sigma_sampler_is_logit_normal():
  n = 40000
  i = np.asarray(losses.stage1_sigma_indices(jax.random.key(0), n))
  sigma = np.asarray(losses.stage1_sigmas(jnp.asarray(i)))
  assert sigma.min() >= 0.001 and sigma.max() <= 1.0
  np.testing.assert_array_equal(sigma, ((1000 - i) / 1000.0).astype(np.float32))
  assert abs(np.median(sigma) - 0.5) < 0.01
  # KS distance to logit-normal(0, 1) (symmetric, so sigma = 1 - u has the same law); the
  # table's 0.001 grid adds at most ~0.001 * max pdf to the distance.
  s = np.sort(sigma)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(np.log(s / (1 - s + 1e-12)) / math.sqrt(2)))
  emp_hi = np.arange(1, n + 1) / n
  ks = max(np.max(np.abs(emp_hi - cdf)), np.max(np.abs(emp_hi - 1 / n - cdf)))
  assert ks < 1.36 / math.sqrt(n) + 0.003, ks
  d = losses.stage1_draw(jax.random.key(1), jnp.ones((3, 9, 4, 4, 2)))
  np.testing.assert_allclose(np.asarray(d.t), 1000 * np.asarray(d.sigma), rtol=1e-6)


def test_dynamic_shift_values_and_formulas():
  mu = {n: hs.calculate_shift(n) for n in (8640, 2160, 540)}
  assert mu[8640] == pytest.approx(1.919, abs=1e-3)
  assert mu[2160] == pytest.approx(0.822, abs=1e-3)
  assert mu[540] == pytest.approx(0.548, abs=1e-3)
  t = np.linspace(0.0, 1.0, 101)
  for m in mu.values():
    lin = hs.time_shift(m, t, "linear")
    exp = hs.time_shift(m, t, "exponential")
    inner = t[1:-1]
    np.testing.assert_allclose(lin[1:-1], m * inner / (1 + (m - 1) * inner), rtol=1e-6)
    s = math.exp(m)
    np.testing.assert_allclose(exp[1:-1], s * inner / (1 + (s - 1) * inner), rtol=1e-6)
    for shifted in (lin, exp):
      assert shifted[0] == 0 and shifted[-1] == pytest.approx(1.0)
      assert np.all(np.diff(shifted) > 0)


def test_pyramid_constants_come_from_schedulers():
  assert losses.pyr is pyr  # one implementation, imported
  c = pyr.HELIOS_PYRAMID
  np.testing.assert_allclose(c.end_sigmas, [0.666333, 0.333666, 0.0], atol=1e-6)
  np.testing.assert_allclose(c.start_sigmas, [0.999, 0.79976, 0.50037], atol=1e-5)
  np.testing.assert_allclose(c.stage_timesteps[:, 0], [999, 743.256, 385.614], atol=1e-3)
  np.testing.assert_allclose(c.stage_timestep_end, [743.256, 385.614, 0.999], atol=1e-3)


def test_renoise_signal_and_noise_variance():
  c = pyr.HELIOS_PYRAMID
  for k in (1, 2):
    a, b, e_prev = c.renoise_alpha[k], c.renoise_beta[k], c.end_sigmas[k - 1]
    assert a * (1 - e_prev) == pytest.approx(1 - c.start_sigmas[k], abs=1e-6)
    assert a * a * e_prev ** 2 + b * b == pytest.approx(c.start_sigmas[k] ** 2, abs=1e-6)
  # Empirical: previous endpoint = (1 - E) x + E eps at low res; after the transition the
  # per-pixel noise variance is S_k^2 (x = 0 isolates the noise).
  key = jax.random.key(3)
  for k in (1, 2):
    shape = (4, 9, 16, 16, 8)
    eps = jax.random.normal(key, shape)
    y = c.end_sigmas[k - 1] * eps
    z = jax.random.normal(jax.random.fold_in(key, k), shape + (4,))
    out = jax.jit(pyr.stage_transition, static_argnums=2, static_argnames="noise_dtype")(
        y, z, k, noise_dtype=jnp.float32)
    assert float(jnp.var(out)) == pytest.approx(c.start_sigmas[k] ** 2, rel=0.02)
  bn = np.asarray(jax.jit(pyr.block_noise)(jax.random.normal(key, (8, 9, 16, 16, 8, 4))))
  blocks = bn.reshape(8, 9, 16, 2, 16, 2, 8).mean(axis=(3, 5))
  assert np.abs(blocks).max() < 1e-5
  assert bn.var() == pytest.approx(1.0, rel=0.02)


def test_pyramid_noise_downsampling_keeps_unit_variance():
  x0 = jnp.zeros((4, 9, 32, 32, 8))
  eps = jax.random.normal(jax.random.key(0), x0.shape)
  levels = jax.jit(losses.pyramid_levels)(x0, eps)
  assert [s.shape[2] for s, _ in levels] == [8, 16, 32]
  np.testing.assert_array_equal(np.asarray(levels[0][0]), np.asarray(
      2 * pyr.downsample_2x(2 * pyr.downsample_2x(eps))))
  for (s, _), s_k in zip(levels, pyr.HELIOS_PYRAMID.start_sigmas):  # x0 = 0: s_k = S_k eps_k
    assert float(jnp.var(s)) / s_k ** 2 == pytest.approx(1.0, rel=0.03)


# ------------------------------------------------------------------------------------------
# Sample construction.


def test_indices_and_history_layout():
  idx = sampling.rope_indices()
  np.testing.assert_array_equal(idx["short"], [0, 19])
  np.testing.assert_array_equal(idx["long"], np.arange(1, 17))
  np.testing.assert_array_equal(idx["mid"], [17, 18])
  np.testing.assert_array_equal(idx["noisy"], np.arange(20, 29))
  secs = np.arange(3 * 9, dtype=np.float32).reshape(3, 9, 1, 1, 1) + 1
  hist, anchor, target = sections.sample_from_sections(secs, 0)
  assert not hist.any() and not anchor.any()
  np.testing.assert_array_equal(target[:, 0, 0, 0], np.arange(1, 10))
  hist, anchor, target = sections.sample_from_sections(secs, 1)
  assert not hist[:10].any()
  np.testing.assert_array_equal(hist[10:, 0, 0, 0], np.arange(1, 10))
  assert anchor[0, 0, 0, 0] == 1
  hist, anchor, target = sections.sample_from_sections(secs, 2)
  np.testing.assert_array_equal(hist[:, 0, 0, 0], np.arange(0, 19))
  np.testing.assert_array_equal(target[:, 0, 0, 0], np.arange(19, 28))
  hi = sample.history_inputs(jnp.asarray(hist[None]), jnp.asarray(anchor[None]))
  assert hi.long.shape[1] == 16 and hi.mid.shape[1] == 2 and hi.short.shape[1] == 2
  np.testing.assert_array_equal(np.asarray(hi.short[0, :, 0, 0, 0]), [1, hist[-1, 0, 0, 0]])


def test_choose_section_is_seeded_and_uniform():
  assert sections.choose_section(5, 0, 3, 7) == sections.choose_section(5, 0, 3, 7)
  draws = [sections.choose_section(3, 0, 0, i) for i in range(3000)]
  counts = np.bincount(draws, minlength=3) / 3000
  np.testing.assert_allclose(counts, 1 / 3, atol=0.03)
  with pytest.raises(ValueError, match="num_sections=0"):
    sections.choose_section(0, 0, 0, 4)


@pytest.mark.parametrize("p_i2v,expect", [
    (0.0, {"t2v": 0.40, "i2v": 0.0, "v2v": 0.24, "keep": 0.36}),
    (0.1, {"t2v": 0.40, "i2v": 0.06, "v2v": 0.216, "keep": 0.324})])
def test_random_drop_semantics_and_frequencies(p_i2v, expect):
  n = 40000
  hist = jnp.broadcast_to(jnp.arange(1, 20, dtype=jnp.float32)[None, :, None, None, None],
                          (n, 19, 1, 1, 1))
  anchor = jnp.full((n, 1, 1, 1, 1), 7.0)
  cfg = sample.DropConfig(p_t2v=0.4, p_i2v=p_i2v, p_v2v=0.4)
  h, a, mode, d = jax.device_get(sample.random_drop(jax.random.key(0), hist, anchor, cfg))
  h, a = h[:, :, 0, 0, 0], a[:, 0, 0, 0, 0]
  freq = {name: float(np.mean(mode == m)) for name, m in
          (("t2v", sample.T2V), ("i2v", sample.I2V), ("v2v", sample.V2V), ("keep", sample.KEEP))}
  for k, v in expect.items():
    assert freq[k] == pytest.approx(v, abs=0.01), (k, freq)
  t2v, i2v, v2v, keep = (mode == m for m in (sample.T2V, sample.I2V, sample.V2V, sample.KEEP))
  assert not h[t2v].any() and not a[t2v].any()
  assert (a[~t2v] == 7).all()
  if i2v.any():
    assert not h[i2v][:, :18].any() and (h[i2v][:, 18] == 19).all()
  assert set(np.unique(d[v2v]).tolist()) == {1, 10, 19}
  for dd in (1, 10, 19):
    rows = h[v2v & (d == dd)]
    assert not rows[:, :dd].any() and (rows[:, dd:] == np.arange(dd + 1, 20)).all()
    assert np.mean(v2v & (d == dd)) == pytest.approx(expect["v2v"] / 3, abs=0.01)
  np.testing.assert_array_equal(h[keep], np.broadcast_to(np.arange(1, 20), h[keep].shape))


# ------------------------------------------------------------------------------------------
# Frame-Aware Corrupt.


def test_block_layout():
  ids = corrupt.block_ids(19, 9, 2)
  np.testing.assert_array_equal(ids, [0, 1] + [2] * 9 + [3] * 2 + [4] * 7)


@pytest.mark.parametrize("size,out", [(48, 43), (80, 72), (16, 14), (43, 48), (16, 16)])
def test_blur_matrices_match_torch_antialias(size, out):
  x = torch.randn(1, 1, size, 5, dtype=torch.float64)
  ref = torch.nn.functional.interpolate(x, size=(out, 5), mode="bilinear", antialias=True,
                                        align_corners=False)[0, 0].numpy()
  ours = corrupt.aa_bilinear_matrix(size, out) @ x[0, 0].numpy()
  assert rel_err(ours, ref) < 1e-12


_corrupt = jax.jit(corrupt.corrupt_history, static_argnums=3)


def _rand_history(key, b=3, n=19, hw=8, c=4):
  k1, k2 = jax.random.split(key)
  return jax.random.normal(k1, (b, n, hw, hw, c)), jax.random.normal(k2, (b, 1, hw, hw, c))


def test_corruption_identities():
  hist, anchor = _rand_history(jax.random.key(0))
  hist = hist.at[0, :10].set(0.0).at[1].set(0.0)  # V2V-10 drop, T2V-like sample
  anchor = anchor.at[1].set(0.0)
  key = jax.random.key(1)
  for cfg in (NOISE, corrupt.CorruptConfig(mode="random", clean_prob=0.0, noise_prob=0.5,
                                           saturation=True)):
    h, a = _corrupt(key, hist, anchor, cfg)
    assert not np.asarray(h[0, :10]).any() and not np.asarray(h[1]).any()  # zero blocks
    assert not np.asarray(a[1]).any()
    assert np.asarray(h[0, 10:] != hist[0, 10:]).all()
  h, a = _corrupt(key, hist, anchor, corrupt.CorruptConfig(mode="noise", clean_prob=1.0))
  np.testing.assert_array_equal(np.asarray(h), np.asarray(hist))  # whole-history skip
  # sigma = 0, r = 1, f = 1 are identities.
  x = jnp.concatenate([anchor, hist], axis=1)
  ones = jnp.ones(x.shape[:2])
  np.testing.assert_allclose(jax.jit(corrupt.saturate)(x, ones), x, atol=1e-6)
  np.testing.assert_allclose(jax.jit(corrupt.blur)(x, ones), x, atol=1e-6)
  eps = jax.random.normal(key, x.shape)
  s = jnp.zeros(x.shape[:2])[:, :, None, None, None]
  np.testing.assert_array_equal(np.asarray(s * eps + (1 - s) * x), np.asarray(x))


def test_quirk_15_i2v_zero_frames_stay_zero():
  hist, anchor = _rand_history(jax.random.key(2))
  hist = hist.at[:, :18].set(0.0)  # I2V format: anchor + newest frame only
  h, _ = _corrupt(jax.random.key(3), hist, anchor, NOISE)
  assert not np.asarray(h[:, :18]).any()
  assert np.asarray(h[:, 18] != hist[:, 18]).all()


def test_noise_sigma_range_and_saturation_mean():
  x = jnp.ones((256, 19, 1, 1, 1))
  anchor = jnp.ones((256, 1, 1, 1, 1))
  key = jax.random.key(4)
  h, _ = _corrupt(key, x, anchor, NOISE)
  # x = 1: out = s eps + (1 - s); recover s with the same eps draw.
  _, _, k_sig, k_eps, _, _ = jax.random.split(key, 6)
  eps = jax.random.normal(k_eps, (256, 20, 1, 1, 1))[:, 1:, 0, 0, 0]
  s = (np.asarray(h[:, :, 0, 0, 0]) - 1) / (np.asarray(eps) - 1)
  assert s.min() >= -1e-5 and s.max() <= 1 / 3 + 1e-5 and s.max() > 0.3
  hist, anchor = _rand_history(jax.random.key(5), c=16)
  cfg = corrupt.CorruptConfig(mode="none", saturation=True, saturation_keep_prob=0.0)
  h, a = _corrupt(jax.random.key(6), hist, anchor, cfg)
  np.testing.assert_allclose(h.mean(-1), hist.mean(-1), atol=2e-6)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(anchor))  # anchor never saturated
  assert rel_err(h, hist) > 0.05


# ------------------------------------------------------------------------------------------
# Tiny model fixtures.


@pytest.fixture(scope="module")
def tiny_model():
  """(graphdef, base params dict) of the tiny DiT with memory stems from patch_embedding."""
  cfg = model_lib.BaseModelConfig(preset="tiny", param_dtype="float32", remat="none",
                                  attention="xla", seed=0)
  _, graphdef, params = model_lib.build_base(cfg)
  return graphdef, jax.tree.map(jnp.asarray, params)


def _batch(key, b=2, hw=16, text_len=8, text_dim=32):
  ks = jax.random.split(key, 4)
  return {"history": jax.random.normal(ks[0], (b, 19, hw, hw, 16)),
          "anchor": jax.random.normal(ks[1], (b, 1, hw, hw, 16)),
          "target": jax.random.normal(ks[2], (b, 9, hw, hw, 16)),
          "text": jax.random.normal(ks[3], (b, text_len, text_dim))}


def _model_fn(graphdef, base, trainables, spec):
  params, extra = lora.effective_params(base, trainables, spec)
  model = nnx.merge(graphdef, params)
  hook = lora.block_hook(spec)
  return lambda x, t, txt, idx, hist: model.forward_channels_last(
      x, t, txt, idx, hist, block_hook=hook, block_extra=extra)


def test_memory_stems_equal_pooled_patch_embedding(tiny_model):
  graphdef, base = tiny_model
  model = nnx.merge(graphdef, base)
  x = jax.random.normal(jax.random.key(0), (1, 4, 16, 16, 16))
  for stem, k in ((model.memory.patch_mid, 2), (model.memory.patch_long, 4)):
    ref = model.patch_embedding(rope_lib.avg_pool_3d(x, k))
    assert rel_err(stem(x), ref) < 1e-5
  np.testing.assert_array_equal(np.asarray(model.memory.patch_short.kernel[...]),
                                np.asarray(model.patch_embedding.kernel[...]))


# ------------------------------------------------------------------------------------------
# Losses.


def test_fm_loss_is_zero_at_the_exact_target():
  batch = _batch(jax.random.key(0), hw=8)
  key = jax.random.key(1)
  cfg = losses.ObjectiveConfig(kind="flow_matching", drop=NO_DROP, corrupt=NO_CORRUPT)

  @jax.jit
  def run():
    draw = losses.stage1_draw(jax.random.split(key)[1], batch["target"])
    seen = []

    def oracle(x, t, txt, idx, hist):
      del txt, idx, hist
      seen.append((x, t))
      return draw.start - draw.end  # eps - x0

    loss, _ = losses.flow_matching_loss(oracle, batch, key, cfg)
    zero, _ = losses.flow_matching_loss(lambda x, *a: jnp.zeros_like(x), batch, key, cfg)
    return loss, zero, seen[0], (draw.x, draw.t)

  loss, zero, (x, t), (dx, dt) = run()
  np.testing.assert_array_equal(np.asarray(x), np.asarray(dx))
  np.testing.assert_array_equal(np.asarray(t), np.asarray(dt))
  assert float(loss) == 0.0 and float(zero) > 1.0


def test_pyramid_loss_is_zero_at_the_exact_target():
  batch = _batch(jax.random.key(0), hw=16)
  key = jax.random.key(2)
  cfg = losses.ObjectiveConfig(kind="pyramid_flow_matching", multiplicities=(1, 2, 1),
                               drop=NO_DROP, corrupt=NO_CORRUPT)
  draws = jax.jit(lambda k, x: losses.pyramid_draws(k, x, cfg.multiplicities))(
      jax.random.split(key)[1], batch["target"])
  assert [d.x.shape[0] for d in draws] == [2, 4, 2]
  assert [d.x.shape[2] for d in draws] == [4, 8, 16]
  for d in draws:
    # x_t - sigma (s_k - e_k) recovers e_k (the x0 / ODE conversion identity).
    s = d.sigma[:, None, None, None, None]
    assert rel_err(d.x - s * (d.start - d.end), d.end) < 1e-6
    lo, hi = np.asarray(pyr.HELIOS_PYRAMID.stage_timesteps[d.level][[-1, 0]])
    assert (np.asarray(d.t) >= lo).all() and (np.asarray(d.t) <= hi).all()
  # The two middle-level draws share s_1, e_1 and differ in sigma.
  mid = draws[1]
  np.testing.assert_array_equal(np.asarray(mid.start[:2]), np.asarray(mid.start[2:]))
  @jax.jit
  def run():
    ds = losses.pyramid_draws(jax.random.split(key)[1], batch["target"], cfg.multiplicities)
    targets = {d.x.shape: d.target for d in ds}
    return losses.pyramid_loss(lambda x, *a: targets[x.shape], batch, key, cfg)

  loss, aux = run()
  assert float(loss) == 0.0 and all(float(aux[f"loss_level{k}"]) == 0.0 for k in range(3))
  # The endpoints follow spec §2.3.
  c = pyr.HELIOS_PYRAMID
  x0 = batch["target"]
  eps2 = jax.random.normal(jax.random.split(jax.random.split(key)[1])[0], x0.shape)
  x1 = pyr.downsample_2x(x0)
  e1 = 2 * pyr.downsample_2x(eps2)
  up_x0_level0 = pyr.upsample_nearest_2x(pyr.downsample_2x(x1))
  ref_s1 = c.start_sigmas[1] * e1 + (1 - c.start_sigmas[1]) * up_x0_level0
  ref_e1 = c.end_sigmas[1] * e1 + (1 - c.end_sigmas[1]) * x1
  assert rel_err(mid.start[:2], ref_s1) < 1e-6 and rel_err(mid.end[:2], ref_e1) < 1e-6
  np.testing.assert_array_equal(np.asarray(draws[2].end), np.asarray(x0))


def _packed_forward(model, hist, draws_x, draws_t, text, frame_idx):
  """Reference NaViT forward: all draws of a sample in ONE sequence with segment-id attention.

  Each segment j = [history tokens | noisy tokens of draw j]; per-token modulation (t = 0 for
  history, t_j for noisy tokens), per-segment RoPE, block-diagonal self-attention, text
  cross-attention for noisy tokens only (guidance attention), per-segment output head.
  """
  cfg = model.config
  h_tok, (h_cos, h_sin) = model.memory(hist, cfg.rope_dim, cfg.rope_theta)
  nh = h_tok.shape[1]
  text = model.condition_embedder.text_embedder(text)
  _, tp0 = model.condition_embedder.time(jnp.zeros((1,)))
  tokens, cos, sin, seg, is_noisy, mods, grids, temb = [], [], [], [], [], [], [], []
  for j, (x, t) in enumerate(zip(draws_x, draws_t)):
    z = model.patch_embedding(x)
    b, tn, hn, wn, _ = z.shape
    grids.append((tn, hn, wn))
    c, s = rope_lib.rope_tables(frame_idx, hn, wn, cfg.rope_dim, cfg.rope_theta)
    te, tp = model.condition_embedder.time(t)
    temb.append(te)
    n = tn * hn * wn
    tokens += [h_tok, rope_lib.flatten_grid(z)]
    cos += [h_cos, rope_lib.flatten_grid(c)]
    sin += [h_sin, rope_lib.flatten_grid(s)]
    seg += [jnp.full((b, nh + n), j, jnp.int32)]
    is_noisy += [jnp.zeros((nh,), bool), jnp.ones((n,), bool)]
    mods += [jnp.broadcast_to(tp0[:, None], (b, nh, 6, tp0.shape[-1])),
             jnp.broadcast_to(tp[:, None], (b, n, 6, tp.shape[-1]))]
  x = jnp.concatenate(tokens, 1)
  cos, sin = jnp.concatenate(cos, 1), jnp.concatenate(sin, 1)
  seg = jnp.concatenate(seg, 1)
  noisy = jnp.concatenate(is_noisy)[None, :, None]
  mod = jnp.concatenate(mods, 1)  # [B, S, 6, D]
  gd, gs = nnx.split(model.blocks)

  def ln_mod(v, shift, scale):
    mean = v.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(v - mean), -1, keepdims=True)
    return (v - mean) * jax.lax.rsqrt(var + cfg.eps) * (1 + scale) + shift

  for i in range(cfg.num_layers):
    blk = nnx.merge(gd, jax.tree.map(lambda a, i=i: a[i], gs))
    m = mod + blk.scale_shift_table[...][:, None]  # [B, S, 6, D]
    a1 = blk.attn1
    hcur = ln_mod(x, m[:, :, 0], m[:, :, 1])
    q = dispatch.rms_norm_rope(a1.to_q(hcur), a1.norm_q.weight[...], cos, sin,
                               heads=a1.heads, eps=a1.eps, impl="xla")
    k = dispatch.rms_norm_rope(a1.to_k(hcur), a1.norm_k.weight[...], cos, sin,
                               heads=a1.heads, eps=a1.eps, impl="xla")
    v = a1.to_v(hcur).reshape(q.shape)
    o = dispatch.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="xla")
    x = x + a1.to_out(o.reshape(x.shape)) * m[:, :, 2]
    c = dispatch.layer_norm(x, blk.norm2.weight[...], blk.norm2.bias[...], eps=cfg.eps,
                            impl="xla")
    x = x + jnp.where(noisy, blk.attn2(c, context=text), 0.0)
    x = x + blk.ffn(ln_mod(x, m[:, :, 3], m[:, :, 4])) * m[:, :, 5]
  outs, start = [], 0
  for (tn, hn, wn), te in zip(grids, temb):
    start += nh
    n = tn * hn * wn
    y = model.proj_out(model.norm_out(x[:, start:start + n], te))
    start += n
    b = y.shape[0]
    y = y.reshape(b, tn, hn, wn, 1, 2, 2, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    outs.append(y.reshape(b, tn, hn * 2, wn * 2, -1))
  return outs


@pytest.mark.slow
def test_navit_packed_forward_equals_per_draw_forwards(tiny_model):
  graphdef, base = tiny_model
  model = nnx.merge(graphdef, base)
  batch = _batch(jax.random.key(7), b=2, hw=16)
  key = jax.random.key(8)
  cfg = losses.ObjectiveConfig(kind="pyramid_flow_matching", multiplicities=(1, 2, 1),
                               drop=NO_DROP, corrupt=NO_CORRUPT)
  hist = sample.history_inputs(batch["history"], batch["anchor"])
  draws = jax.jit(lambda k, x: losses.pyramid_draws(k, x, cfg.multiplicities))(
      jax.random.split(key)[1], batch["target"])
  b = 2
  xs = [d.x[j * b:(j + 1) * b] for d in draws for j in range(d.x.shape[0] // b)]
  ts = [d.t[j * b:(j + 1) * b] for d in draws for j in range(d.x.shape[0] // b)]
  tg = [d.target[j * b:(j + 1) * b] for d in draws for j in range(d.x.shape[0] // b)]
  idx = sample.noisy_indices(b)
  packed = jax.jit(lambda: _packed_forward(model, hist, xs, ts, batch["text"], idx))()
  separate = jax.jit(lambda: [model.forward_channels_last(x, t, batch["text"], idx, hist)
                               for x, t in zip(xs, ts)])()
  for p, s in zip(packed, separate):
    assert rel_err(p, s) < 1e-5
  navit_loss = np.mean([np.mean((np.asarray(p) - np.asarray(t)) ** 2) for p, t in
                        zip(packed, tg)])
  model_fn = lambda x, t, txt, i, h: model.forward_channels_last(x, t, txt, i, h)
  ours, _ = jax.jit(lambda: losses.pyramid_loss(model_fn, batch, key, cfg))()
  assert abs(float(ours) - navit_loss) / navit_loss < 1e-5


# ------------------------------------------------------------------------------------------
# LoRA.


def test_lora_plan_and_shapes(tiny_model):
  _, base = tiny_model
  spec = lora.TrainableSpec(rank=4, alpha=8.0, patch_embedding="lora", memory_patches="full")
  tr_ = jax.jit(lambda b: lora.init_trainables(b, spec, jax.random.key(0)))(base)
  blk = tr_["lora"]["blocks"]
  assert set(blk) == {"attn1", "attn2", "ffn"}
  assert blk["attn1"]["to_q"]["lora_a"].shape == (2, 64, 4)
  assert blk["ffn"]["proj_in"]["lora_b"].shape == (2, 4, 96)
  assert tr_["lora"]["patch_embedding"]["lora_a"].shape == (1 * 2 * 2 * 16, 4)
  ce = tr_["lora"]["condition_embedder"]
  assert set(ce) == {"time_embedder", "time_proj", "text_embedder"}
  assert "proj_out" in tr_["lora"]
  assert set(tr_["full"]["memory"]) == {"patch_short", "patch_mid", "patch_long"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tr_))
  a = np.asarray(blk["attn1"]["to_q"]["lora_a"])
  assert a.std() == pytest.approx(1 / 4, rel=0.1)
  assert not any(np.asarray(x).any() for p, x in
                 jax.tree_util.tree_leaves_with_path(tr_["lora"]) if "lora_b" in str(p[-1]))
  frozen = jax.eval_shape(lambda b: lora.init_trainables(
      b, dataclasses.replace(spec, patch_embedding="frozen", memory_patches="frozen"),
      jax.random.key(0)), base)
  assert "patch_embedding" not in frozen["lora"] and not frozen["full"]


def test_lora_at_init_equals_base_and_merged_equals_lora(tiny_model):
  graphdef, base = tiny_model
  spec = lora.TrainableSpec(rank=4, alpha=8.0, patch_embedding="lora", memory_patches="lora")
  tr0 = jax.jit(lambda b: lora.init_trainables(b, spec, jax.random.key(0)))(base)
  batch = _batch(jax.random.key(1), hw=16)
  hist = sample.history_inputs(batch["history"], batch["anchor"])
  x, t, idx = batch["target"], jnp.asarray([300.0, 800.0]), sample.noisy_indices(2)
  fwd = jax.jit(lambda p: nnx.merge(graphdef, p).forward_channels_last(
      x, t, batch["text"], idx, hist))
  hooked_fwd = jax.jit(lambda tr_: _model_fn(graphdef, base, tr_, spec)(
      x, t, batch["text"], idx, hist))
  base_out = fwd(base)
  at_init = hooked_fwd(tr0)
  np.testing.assert_array_equal(np.asarray(at_init), np.asarray(base_out))
  # Non-zero B everywhere: the hooked forward equals a forward of the merged weights.
  keys = iter(jax.random.split(jax.random.key(2), 64))
  tr1 = jax.tree_util.tree_map_with_path(
      lambda p, a: 0.05 * jax.random.normal(next(keys), a.shape) if "lora_b" in str(p[-1])
      else a, tr0)
  hooked = hooked_fwd(tr1)
  merged = jax.jit(lambda tr_: lora.merge(base, tr_, spec))(tr1)
  plain = fwd(merged)
  assert rel_err(hooked, plain) < 1e-6
  assert rel_err(hooked, base_out) > 1e-3
  # The merge is W + (alpha / r) A B per kernel.
  k = merged["blocks"]["attn2"]["to_v"]["kernel"]
  want = base["blocks"]["attn2"]["to_v"]["kernel"] + 2.0 * jnp.einsum(
      "lir,lro->lio", tr1["lora"]["blocks"]["attn2"]["to_v"]["lora_a"],
      tr1["lora"]["blocks"]["attn2"]["to_v"]["lora_b"])
  assert rel_err(k, want) < 1e-6


def test_bf16_base_keeps_fp32_policy_and_merge_rounds_once():
  cfg = model_lib.BaseModelConfig(preset="tiny", param_dtype="bfloat16", remat="full")
  _, abstract = cfg.spec().abstract(TINY, cfg.dtype)
  assert abstract["blocks"]["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16
  assert abstract["condition_embedder"]["time_embedder"]["linear_1"]["kernel"].dtype == F32
  assert abstract["blocks"]["scale_shift_table"].dtype == F32
  rng = np.random.default_rng(0)
  base = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), abstract)
  spec = lora.TrainableSpec(rank=4, alpha=4.0)
  tr_, merged = jax.jit(lambda b: (lambda t: (t, lora.merge(b, t, spec)))(
      lora.init_trainables(b, spec, jax.random.key(0))))(base)
  assert all(x.dtype == F32 for x in jax.tree.leaves(tr_))  # fp32 masters
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ------------------------------------------------------------------------------------------
# Optimizer and schedule parity (torch AdamW + clip_grad_norm_, diffusers schedule).


def test_adamw_clip_and_warmup_match_torch():
  diffusers_opt = pytest.importorskip("diffusers.optimization")
  rng = np.random.default_rng(0)
  params = {"lora": {"w": rng.normal(size=(5, 3)).astype(np.float32)},
            "full": {"b": rng.normal(size=(4,)).astype(np.float32)}}
  grads = [{"lora": {"w": 3 * rng.normal(size=(5, 3)).astype(np.float32)},
            "full": {"b": 3 * rng.normal(size=(4,)).astype(np.float32)}} for _ in range(6)]
  cfg = optim.OptimConfig(lr=1e-2, warmup_steps=3, b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=1e-2, grad_clip=1.0)
  tx = optim.make_optimizer(cfg, params)
  state, p = tx.init(params), jax.tree.map(jnp.asarray, params)
  tw = torch.tensor(params["lora"]["w"], requires_grad=True)
  tb = torch.tensor(params["full"]["b"], requires_grad=True)
  topt = torch.optim.AdamW([tw, tb], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
  sched = diffusers_opt.get_scheduler("constant_with_warmup", topt, num_warmup_steps=3)
  for step, g in enumerate(grads):
    assert float(optim.learning_rate(cfg, step)) == pytest.approx(sched.get_last_lr()[0])
    upd, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, upd)
    tw.grad, tb.grad = torch.tensor(g["lora"]["w"]), torch.tensor(g["full"]["b"])
    torch.nn.utils.clip_grad_norm_([tw, tb], 1.0)
    topt.step()
    sched.step()
  assert rel_err(p["lora"]["w"], tw.detach().numpy()) < 1e-5
  assert rel_err(p["full"]["b"], tb.detach().numpy()) < 1e-5


# ------------------------------------------------------------------------------------------
# Data.


def test_metadata_parsing_and_errors(tmp_path):
  clips = clips_lib.load_metadata(TOY_METADATA)
  assert [c.num_frames for c in clips] == [81, 129]
  assert clips[0].caption.startswith("A stunning") and os.path.isfile(clips[0].path)
  assert [c.uttid for c in clips_lib.select_clips(clips)] == ["239_120_ori129"]
  assert len(clips_lib.select_clips(clips, min_frames=81)) == 2
  assert clips_lib.length_bucket(129) == 121 and clips_lib.num_sections(121) == 3
  assert clips_lib.num_sections(501) == 15
  with pytest.raises(DataError, match="shorter than one section"):
    clips_lib.select_clips(clips, min_frames=20)
  with pytest.raises(DataError, match="metadata file not found"):
    clips_lib.load_metadata(tmp_path / "nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text('[{"cut": [0, 10], "crop": [0, 8, 0, 8], "fps": 24, "num_frames": 10, '
                 '"resolution": {"height": 8, "width": 8}, "path": "x.mp4"}]')
  with pytest.raises(DataError, match=r"entry 0 misses field\(s\) \['cap'\]"):
    clips_lib.load_metadata(bad)
  short = dataclasses.replace(clips[0], num_frames=20)
  with pytest.raises(DataError, match="shorter than one 33-frame section"):
    clips_lib.clip_sections(short, 64, 64, np.random.default_rng(0))


def test_latent_source_errors(tmp_path):
  with pytest.raises(DataError, match="data dir not found"):
    latents_lib.load_source(str(tmp_path / "missing"))
  with pytest.raises(DataError, match="holds no prepared helios_latents"):
    latents_lib.load_source(str(tmp_path))


def test_batch_plan_buckets_shuffles_and_shards():
  keys = np.asarray([(3, 8, 8)] * 7 + [(4, 8, 8)] * 5)
  plan = pipeline_lib.BatchPlan(keys, 2, seed=0)
  assert plan.batches_per_epoch == 3 + 2
  e0, e1 = plan.epoch(0), plan.epoch(1)
  assert e0.shape == (5, 2)
  for batch in e0:
    assert len({tuple(keys[i]) for i in batch}) == 1  # one bucket per batch
  assert not np.array_equal(e0, e1)
  np.testing.assert_array_equal(e0, pipeline_lib.BatchPlan(keys, 2, seed=0).epoch(0))
  assert len(set(e0.ravel().tolist())) == 10  # no record twice in an epoch
  with pytest.raises(DataError, match="no full batch of global_batch_size=8"):
    pipeline_lib.BatchPlan(keys, 8, seed=0)
  with pytest.raises(DataError, match="empty"):
    pipeline_lib.BatchPlan(np.zeros((0, 3)), 2, seed=0)


def test_pipeline_process_slices_and_resumable_iterator():
  src = synthetic.SyntheticLatents(synthetic.SyntheticConfig(num_clips=12, height=8, width=8,
                                                             text_tokens=3))
  cfg = pipeline_lib.InputConfig(global_batch_size=4, seed=1, text_len=5, num_threads=1)
  ds, plan = pipeline_lib.make_dataset(src, cfg)
  parts = [pipeline_lib.make_dataset(src, cfg, p, 2)[0] for p in range(2)]
  for g in range(3):
    full = ds[g]
    halves = [p[g] for p in parts]
    for k in ("history", "target", "text", "index"):
      np.testing.assert_array_equal(full[k], np.concatenate([h[k] for h in halves]))
    assert full["history"].shape == (4, 19, 8, 8, 16) and full["text"].shape == (4, 5, 32)
    assert full["anchor"].shape == (4, 1, 8, 8, 16) and full["target"].shape == (4, 9, 8, 8, 16)
  e, idx = plan.batch(plan.batches_per_epoch + 1)
  assert e == 1 and len(idx) == 4
  it = pipeline_lib.make_iterator(ds, cfg)
  seq = [next(it)["index"] for _ in range(4)]
  it2 = pipeline_lib.make_iterator(ds, cfg)
  next(it2)
  state = it2.get_state()
  it3 = pipeline_lib.make_iterator(ds, cfg)
  it3.set_state(state)
  for want in seq[1:]:
    np.testing.assert_array_equal(next(it3)["index"], want)
  with pytest.raises(DataError, match="not divisible by process_count=3"):
    pipeline_lib.make_dataset(src, cfg, 0, 3)


def test_build_sample_errors():
  rec = {"latents": np.zeros((0, 9, 8, 8, 16), np.float32),
         "prompt_embed": np.zeros((3, 4), np.float32), "uttid": "c0"}
  with pytest.raises(DataError, match=r"c0\) has no section"):
    pipeline_lib.build_sample(rec, 0, 0, 0, 8)
  rec["latents"] = np.zeros((2, 9, 8, 8, 16), np.float32)
  rec["prompt_embed"] = np.zeros((9, 4), np.float32)
  with pytest.raises(DataError, match="9 text rows, more than text_len=8"):
    pipeline_lib.build_sample(rec, 0, 0, 0, 8)


def test_wan_checkpoint_init_copies_pretrained_stem(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  wan = diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32,
                                        in_channels=16, out_channels=16, text_dim=32,
                                        freq_dim=32, ffn_dim=96, num_layers=2)
  wan.save_pretrained(tmp_path / "wan")
  cfg = model_lib.BaseModelConfig(init_from=str(tmp_path / "wan"), init_format="wan",
                                  param_dtype="float32")
  config, _, params = model_lib.build_base(cfg)
  assert config.rope_dim == (12, 10, 10) and config.has_multi_term_memory_patch
  pe = wan.patch_embedding.weight.detach().numpy()          # [D, C, 1, 2, 2]
  np.testing.assert_array_equal(params["patch_embedding"]["kernel"],
                                np.transpose(pe, (2, 3, 4, 1, 0)))
  np.testing.assert_array_equal(params["memory"]["patch_short"]["kernel"],
                                params["patch_embedding"]["kernel"])
  mid = params["memory"]["patch_mid"]["kernel"]
  np.testing.assert_allclose(mid[1, 3, 2], params["patch_embedding"]["kernel"][0, 1, 1] / 8,
                             rtol=1e-6)
  q = wan.blocks[1].attn1.to_q.weight.detach().numpy()
  np.testing.assert_array_equal(params["blocks"]["attn1"]["to_q"]["kernel"][1], q.T)


def test_config_files_mirror_the_spec_table():
  from experiments import stage1, stage2  # pylint: disable=g-import-not-at-top
  s1i, s1p = stage1.get_config(), stage1.get_config("post")
  s2i, s2p = stage2.get_config(), stage2.get_config("phase=post")
  assert (s1i.seed, s1p.seed, s2i.seed, s2p.seed) == (43, 44, 45, 46)
  assert (s1i.optim.lr, s1p.optim.lr, s2i.optim.lr, s2p.optim.lr) == (5e-5, 3e-5, 1e-4, 3e-5)
  assert (s2i.optim.warmup_steps, s2p.optim.warmup_steps) == (1000, 500)
  assert (s1i.trainable.rank, s2i.trainable.rank) == (128, 256)
  assert (s1i.trainable.patch_embedding, s1i.trainable.memory_patches) == ("lora", "full")
  assert (s2i.trainable.patch_embedding, s2i.trainable.memory_patches) == ("frozen", "frozen")
  assert (s2p.trainable.patch_embedding, s2p.trainable.memory_patches) == ("lora", "lora")
  assert tuple(s2i.objective.multiplicities) == (1, 2, 1)
  assert tuple(s2p.objective.multiplicities) == (1, 1, 1)
  assert (s1i.data.per_device_batch_size, s2i.data.per_device_batch_size) == (2, 1)
  assert s1i.model.init_format == "wan" and s1i.optim.weight_decay == 1e-4
  assert s1i.drop.p_t2v == 0.4 and s1i.drop.p_v2v == 0.4 and s1i.corrupt.mode == "noise"
  with pytest.raises(ValueError, match="unknown config argument 'phsae'"):
    stage1.get_config("phsae=post")
  with pytest.raises(ValueError, match="phase='mid'"):
    stage2.get_config("phase=mid")
  s1i.lock()
  with pytest.raises(AttributeError):
    s1i.train.nmu_steps = 3


def test_settings_round_trip_and_strict_keys():
  """Config groups <-> dataclasses: one converter, casts by field type, unknown keys named."""
  from experiments import stage1, stage3_dmd  # pylint: disable=g-import-not-at-top
  from helios_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from helios_jax.training import settings  # pylint: disable=g-import-not-at-top
  from helios_jax.training import trainer  # pylint: disable=g-import-not-at-top
  st = trainer.settings_from_config(stage3_dmd.get_config("gan"))
  # Every group converts back to the same ConfigDict (sub-groups, pairs and tuples included).
  for group in ("optim", "trainable", "model", "stage3", "critic", "data", "corrupt"):
    want = getattr(st, group)
    got = settings.from_configdict(type(want), settings.to_configdict(want), group)
    if group == "stage3":  # drop / corrupt / saturation are derived, not config keys
      got = dataclasses.replace(got, drop=want.drop, corrupt=want.corrupt,
                                saturation=want.saturation)
    assert got == want, group
  # JSON-style values (lists, ints for floats) are cast by the field types.
  opt = settings.from_configdict(optim.OptimConfig, {"lr": 1, "warmup_steps": 2.0,
                                                     "lr_multipliers": {"lora": 2}}, "optim")
  assert opt == optim.OptimConfig(lr=1.0, warmup_steps=2, lr_multipliers=(("lora", 2.0),))
  assert isinstance(opt.lr, float) and isinstance(opt.warmup_steps, int)
  spec = settings.from_configdict(sample.DropConfig, {"p_t2v": 0.5}, "drop")
  assert spec == sample.DropConfig(p_t2v=0.5)
  c = stage1.get_config("tiny")
  assert trainer.settings_from_config(c).stage3 is None          # optional groups absent
  assert settings.to_configdict(trainer.Settings()).keys() == c.keys()
  c.unlock()
  c.optim.lrr = 1.0
  with pytest.raises(ConfigError, match=r"^unknown config key 'optim.lrr'; did you mean "
                     r"'optim.lr'\?$"):
    trainer.settings_from_config(c)
  c = stage1.get_config("tiny")
  c.unlock()
  c.data.synthetic.hieght = 8
  with pytest.raises(ConfigError, match="'data.synthetic.hieght'; did you mean "
                     "'data.synthetic.height'"):
    trainer.settings_from_config(c)
  with pytest.raises(ConfigError, match=r"optim.warmup_steps=1.5 is not an int"):
    settings.from_configdict(optim.OptimConfig, {"warmup_steps": 1.5}, "optim")
  with pytest.raises(ConfigError, match=r"trainable.linears=3 is not a str"):
    settings.from_configdict(lora.TrainableSpec, {"linears": 3}, "trainable")
  with pytest.raises(ConfigError, match=r"objective.multiplicities\[1\]=True is not an int"):
    settings.from_configdict(losses.ObjectiveConfig, {"multiplicities": (1, True, 1)},
                             "objective")
  with pytest.raises(ConfigError, match=r"^optim: lr=-1.0 must be > 0$"):
    settings.from_configdict(optim.OptimConfig, {"lr": -1.0}, "optim")
  with pytest.raises(ConfigError, match="'stage3.drop'"):   # derived fields are not keys
    settings.from_configdict(type(st.stage3), {"drop": {}}, "stage3")
