"""Parity of helios_jax.schedulers with diffusers 0.42.1 HeliosScheduler / HeliosDMDScheduler."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from helios_jax import schedulers as hs
from helios_jax.config import ConfigError

diffusers = pytest.importorskip("diffusers")
base_mod = pytest.importorskip("diffusers.pipelines.helios.pipeline_helios")
pyr_mod = pytest.importorskip("diffusers.pipelines.helios.pipeline_helios_pyramid")

TOL = 1e-6


def to_jax(t: torch.Tensor) -> jax.Array:
  """torch [B, C, T, H, W] -> jax [B, T, H, W, C], dtype kept."""
  dtype = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}[t.dtype]
  return jnp.asarray(t.permute(0, 2, 3, 4, 1).float().numpy(), dtype)


def to_np(t: torch.Tensor) -> np.ndarray:
  """torch [B, C, T, H, W] -> numpy float64 [B, T, H, W, C]."""
  return t.permute(0, 2, 3, 4, 1).double().numpy()


def save_ref_config(sched, tmp_path) -> hs.SchedulerConfig:
  """Round-trips a diffusers scheduler config through our loader (as a checkpoint would)."""
  folder = os.path.join(tmp_path, "scheduler")
  sched.save_config(folder)
  return hs.load_scheduler_config(tmp_path)


def pipeline_mu(num_frames, h, w):
  return base_mod.calculate_shift(num_frames * h * w // 4, 256, 4096, 0.5, 1.15)


# ------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("shift", [None, "exponential", "linear"])
@pytest.mark.parametrize("steps,h,w", [(50, 48, 80), (7, 24, 40), (12, 30, 52)])
def test_base_tables(tmp_path, shift, steps, h, w):
  kw = {} if shift is None else dict(use_dynamic_shifting=True, time_shift_type=shift)
  ref = diffusers.HeliosScheduler(stages=1, **kw)
  cfg = save_ref_config(ref, tmp_path)
  ref.set_timesteps(steps, sigmas=np.linspace(0.999, 0.0, steps + 1)[:-1],
                    mu=pipeline_mu(9, h, w))
  ours = hs.base_schedule(cfg, steps, 9, h, w)
  assert ref.timesteps.dtype == torch.float64 and ref.sigmas.dtype == torch.float64
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
  if (steps, h, w, shift) == (50, 48, 80, "exponential"):  # spec sampling.md §4.2
    np.testing.assert_allclose(ours.timesteps[[0, 1, -2, -1]],
                               [999.853, 996.866, 220.986, 121.995], atol=1e-3)
    assert abs(ours.mu - 1.919167) < 1e-6


@pytest.mark.parametrize("cls", ["HeliosScheduler", "HeliosDMDScheduler"])
def test_single_stage_default_sigmas(tmp_path, cls):
  """set_timesteps without custom sigmas (float32 numpy path, static shift)."""
  ref = getattr(diffusers, cls)(stages=1, shift=3.0)
  cfg = save_ref_config(ref, tmp_path)
  for n in (4, 9):
    ref.set_timesteps(n)
    ours = hs.set_timesteps(cfg, n)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())


@pytest.mark.parametrize("shift", [None, "exponential", "linear"])
@pytest.mark.parametrize("cls", ["HeliosScheduler", "HeliosDMDScheduler"])
def test_pyramid_tables(tmp_path, cls, shift):
  kw = {} if shift is None else dict(use_dynamic_shifting=True, time_shift_type=shift)
  ref = getattr(diffusers, cls)(**kw)
  cfg = save_ref_config(ref, tmp_path)
  for (h, w), steps in (((48, 80), (3, 5, 2)), ((32, 32), (20, 20, 20)), ((16, 24), (1, 2, 4))):
    # pre-upsample sequence lengths, as HeliosPyramidPipeline computes them
    expect_mu = [pipeline_mu(9, h // 4, w // 4), pipeline_mu(9, h // 4, w // 4),
                 pipeline_mu(9, h // 2, w // 2)]
    for amplify in (False, True):
      ours = hs.pyramid_schedules(cfg, steps, 9, h, w, amplify=amplify)
      for k, s in enumerate(ours):
        assert s.mu == expect_mu[k]
        ref.set_timesteps(steps[k], k, mu=expect_mu[k], is_amplify_first_chunk=amplify)
        np.testing.assert_array_equal(s.timesteps, ref.timesteps.numpy())
        np.testing.assert_array_equal(s.sigmas, ref.sigmas.numpy())
        n_expect = steps[k] * (2 if amplify and cls == "HeliosDMDScheduler" else 1)
        assert s.num_steps == n_expect


def test_distilled_spec_numbers():
  """Spec sampling.md §4.6 table at 384x640 (linear shift, pre-upsample mu)."""
  cfg = hs.HeliosDMDSchedulerConfig(use_dynamic_shifting=True)
  normal = hs.pyramid_schedules(cfg, (2, 2, 2), 9, 48, 80)
  amp = hs.pyramid_schedules(cfg, (2, 2, 2), 9, 48, 80, amplify=True)
  np.testing.assert_allclose([s.mu for s in normal], [0.548073, 0.548073, 0.822292], atol=1e-6)
  np.testing.assert_array_equal(
      [list(s.model_timesteps) for s in normal], [[998, 833], [742, 512], [385, 174]])
  np.testing.assert_array_equal(
      [list(s.model_timesteps) for s in amp],
      [[998, 902, 833, 783], [742, 607, 512, 441], [385, 274, 174, 84]])
  np.testing.assert_allclose(amp[2].sigmas, [0.998784, 0.711008, 0.451240, 0.215580, 0],
                             atol=1e-6)
  # the training-pipeline variant shifts with the current resolution (spec §11)
  train = hs.pyramid_schedules(cfg, (2, 2, 2), 9, 48, 80, pre_upsample=False)
  np.testing.assert_allclose(train[1].timesteps, [742.822, 547.193], atol=1e-3)


@pytest.mark.parametrize("kw", [
    {},
    dict(stages=2, stage_range=[0, 0.4, 1], gamma=0.25, shift=2.0, num_train_timesteps=500),
])
def test_pyramid_constants(kw):
  ref = diffusers.HeliosScheduler(**kw)
  const = hs.pyramid_constants(kw.get("num_train_timesteps", 1000), kw.get("shift", 1.0),
                               kw.get("stages", 3), tuple(kw.get("stage_range",
                                                                 hs.pyramid.STAGE_RANGE)),
                               kw.get("gamma", 1 / 3))
  stages = const.num_stages
  np.testing.assert_array_equal(const.ori_start_sigmas, [ref.ori_start_sigmas[k]
                                                         for k in range(stages)])
  np.testing.assert_array_equal(const.start_sigmas, [ref.start_sigmas[k] for k in range(stages)])
  np.testing.assert_array_equal(const.end_sigmas, [ref.end_sigmas[k] for k in range(stages)])
  np.testing.assert_array_equal(const.timestep_ratios, [ref.timestep_ratios[k]
                                                        for k in range(stages)])
  for k in range(stages):
    np.testing.assert_array_equal(const.stage_timesteps[k], ref.timesteps_per_stage[k].numpy())
    np.testing.assert_array_equal(const.stage_sigmas, ref.sigmas_per_stage[k].numpy())
    if k:  # the pipeline's renoise coefficients
      o = 1 - ref.ori_start_sigmas[k]
      g = ref.config.gamma
      alpha = 1 / (np.sqrt(1 + 1 / g) * (1 - o) + o)
      assert const.renoise_alpha[k] == alpha
      assert const.renoise_beta[k] == alpha * (1 - o) / np.sqrt(g)
  if not kw:  # spec numbers (§4.4)
    np.testing.assert_allclose(const.start_sigmas, [0.999, 0.799760, 0.500374], atol=1e-6)
    np.testing.assert_allclose(const.stage_timestep_min, [743.511744, 385.971642, 1.383615],
                               atol=1e-6)
    np.testing.assert_allclose(const.renoise_alpha[1:], [0.600120, 0.749813], atol=1e-6)
    np.testing.assert_allclose(const.renoise_beta[1:], [0.692612, 0.433337], atol=1e-6)


# ------------------------------------------------------------------------------------ steps


def _draws(n, shape, v_dtype, seed):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(shape, generator=g)
  vs = [torch.randn(shape, generator=g).to(v_dtype) for _ in range(n)]
  return x, vs


UNIPC_CASES = {
    "base_bh2_o2": (dict(stages=1, use_dynamic_shifting=True), None, 6),
    "stage1_bh1_o3": (dict(solver_order=3, solver_type="bh1", use_dynamic_shifting=True,
                           time_shift_type="linear"), 1, 7),
    "stage0_o1": (dict(solver_order=1), 0, 4),
    "no_corrector_no_lof": (dict(disable_corrector=[1, 3], lower_order_final=False), 2, 5),
    "non_flow_sigmas": (dict(use_flow_sigmas=False, solver_order=3), 1, 5),
}


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(UNIPC_CASES))
def test_unipc_multistep(tmp_path, case, v_dtype):
  kw, stage, n = UNIPC_CASES[case]
  ref = diffusers.HeliosScheduler(**kw)
  cfg = save_ref_config(ref, tmp_path)
  if stage is None:
    sched = hs.base_schedule(cfg, n, 3, 6, 10)
    ref.set_timesteps(n, sigmas=np.linspace(0.999, 0.0, n + 1)[:-1], mu=pipeline_mu(3, 6, 10))
  else:
    sched = hs.pyramid_schedules(cfg, (n,) * 3, 3, 12, 20)[stage]
    ref.set_timesteps(n, stage, mu=sched.mu)
  table = hs.unipc_table(cfg, sched)
  x, vs = _draws(n, (1, 4, 3, 6, 10), v_dtype, seed=len(case))
  ref_x, ref_traj = x, []
  for i, t in enumerate(ref.timesteps):
    ref_x = ref.step(vs[i], t, ref_x, return_dict=False)[0]
    ref_traj.append(to_np(ref_x))

  v_all = jnp.stack([to_jax(v) for v in vs])

  @jax.jit
  def traj(x0):
    def body(carry, step):
      x, state = carry
      state, x = hs.unipc_step(state, x, v_all[step.index], step)
      return (x, state), x
    return jax.lax.scan(body, (x0, hs.unipc_init(x0, cfg.solver_order)), table)[1]

  ours = traj(to_jax(x))
  assert ours.dtype == jnp.float32
  for i in range(n):
    assert rel_err(ours[i], ref_traj[i]) <= TOL, (i, rel_err(ours[i], ref_traj[i]))
  if case == "stage1_bh1_o3":  # the packaged scan loop gives the same result
    final = jax.jit(lambda x0: hs.run_unipc(x0, table, lambda x, s: v_all[s.index]))(to_jax(x))
    assert rel_err(final, ref_traj[-1]) <= TOL


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_euler_multistep(tmp_path, v_dtype):
  ref = diffusers.HeliosScheduler(scheduler_type="euler", use_dynamic_shifting=True)
  cfg = save_ref_config(ref, tmp_path)
  sched = hs.pyramid_schedules(cfg, (5, 5, 5), 3, 12, 20)[1]
  ref.set_timesteps(5, 1, mu=sched.mu)
  x, vs = _draws(5, (1, 4, 3, 6, 10), v_dtype, seed=3)
  ref_x = x
  for i, t in enumerate(ref.timesteps):
    ref_x = ref.step(vs[i], t, ref_x, return_dict=False)[0]
  v_all = jnp.stack([to_jax(v) for v in vs])
  ours = jax.jit(lambda x0: hs.run_euler(x0, hs.euler_table(sched),
                                         lambda x, s: v_all[s.index]))(to_jax(x))
  assert ours.dtype == v_all.dtype
  assert rel_err(ours, to_np(ref_x)) <= TOL


@pytest.mark.parametrize("stage,start_dtype,v_dtype", [
    (0, torch.float32, torch.float32), (0, torch.float32, torch.bfloat16),
    (1, torch.bfloat16, torch.bfloat16), (2, torch.float32, torch.float32)])
@pytest.mark.parametrize("amplify", [False, True])
def test_dmd_loop(tmp_path, stage, start_dtype, v_dtype, amplify):
  """The pipeline's DMD inner loop (x0, re-noise towards the stage start point)."""
  ref = diffusers.HeliosDMDScheduler(use_dynamic_shifting=True)
  cfg = save_ref_config(ref, tmp_path)
  sched = hs.pyramid_schedules(cfg, (2, 3, 2), 9, 16, 24, amplify=amplify)[stage]
  ref.set_timesteps((2, 3, 2)[stage], stage, mu=sched.mu, is_amplify_first_chunk=amplify)
  n = len(ref.timesteps)
  start, vs = _draws(n, (1, 4, 3, 4, 6), v_dtype, seed=stage)
  start = start.to(start_dtype)
  latents, outs = start, []
  for i, t in enumerate(ref.timesteps):
    latents = ref.step(vs[i], t, latents, return_dict=False, cur_sampling_step=i,
                       dmd_noisy_tensor=start, dmd_sigmas=ref.sigmas,
                       dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps)[0]
    outs.append(latents)
  table = hs.dmd_table(sched)
  v_all = jnp.stack([to_jax(v) for v in vs])
  p = to_jax(start)
  x = p
  for i in range(n):
    step = jax.tree.map(lambda a, i=i: a[i], table)
    x_next, x0 = jax.jit(hs.dmd_step)(x, v_all[i], p, step)
    expect = outs[i]
    got = x0 if i == n - 1 else x_next
    assert got.dtype == {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}[expect.dtype]
    assert rel_err(got.astype(jnp.float32), to_np(expect)) <= TOL, i
    x = x_next
  final = jax.jit(lambda p: hs.run_dmd(p, table, lambda x, s: v_all[s.index]))(p)
  assert final.dtype == v_all.dtype
  assert rel_err(final.astype(jnp.float32), to_np(outs[-1])) <= TOL


def test_dmd_x64_path_matches():
  """Under jax_enable_x64 dmd_step computes in float64 like the reference; the default float32
  path (exact piece products + TwoSum) must give identical values."""
  cfg = hs.HeliosDMDSchedulerConfig(use_dynamic_shifting=True)
  table = hs.dmd_table(hs.pyramid_schedules(cfg, (2, 2, 2), 9, 16, 24, amplify=True)[1])
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1, 3, 8, 12, 4)).astype(np.float32)
  v = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
  start = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
  step = jax.tree.map(lambda a: a[1], table)
  ours = jax.jit(hs.dmd_step)(jnp.asarray(x), v, start, step)
  with jax.enable_x64(True):
    wide = jax.jit(hs.dmd_step)(jnp.asarray(x), v, start, jax.tree.map(np.asarray, step))
  for a, b in zip(ours, wide):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  x0 = torch.from_numpy(x).double() - step.sigma * torch.from_numpy(np.asarray(v, np.float32))
  np.testing.assert_array_equal(np.asarray(ours[1], np.float32),
                                x0.to(torch.bfloat16).float().numpy())


# ------------------------------------------------------------------------ pyramid transforms


class _FakePipe:
  """Just enough of HeliosPyramidPipeline for its `sample_block_noise` method."""

  def __init__(self, gamma):
    self.scheduler = type("S", (), {"config": type("C", (), {"gamma": gamma})()})()


def _cuda_order_interpolate(real):
  """F.interpolate whose 2x bilinear downsample sums like PyTorch's CUDA kernel
  (h0 (w0 x00 + w1 x01) + h1 (w0 x10 + w1 x11) with all weights 1/2). PyTorch's CPU kernel sums
  in a channel-count-dependent order instead (one fp32 ulp apart)."""

  def interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None, **kw):
    if (mode == "bilinear" and size is not None and not align_corners
        and tuple(size) == (x.shape[-2] // 2, x.shape[-1] // 2)
        and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0):
      return ((x[..., 0::2, 0::2] + x[..., 0::2, 1::2])
              + (x[..., 1::2, 0::2] + x[..., 1::2, 1::2])) * 0.25
    return real(x, size=size, scale_factor=scale_factor, mode=mode,
                align_corners=align_corners, **kw)

  return interpolate


def _analytic_cholesky(monkeypatch):
  """The reference's CPU float32 Cholesky fails (indefinite); give it the analytic factor."""
  real = torch.linalg.cholesky

  def chol(a, *args, **kwargs):
    if tuple(a.shape) == (4, 4):
      return torch.tensor(hs.BLOCK_NOISE_L, dtype=a.dtype)
    return real(a, *args, **kwargs)

  monkeypatch.setattr(torch.linalg, "cholesky", chol)


def test_reference_block_noise_covariance_is_indefinite_in_float32():
  """Why the tests always give the reference the analytic factor (spec sampling.md §4.4).

  diffusers builds `(1 + gamma) I - gamma 11^T + 1e-8 I` in float32 and factors it with
  `torch.linalg.cholesky`. Rounded to float32 the matrix is indefinite (its exact smallest
  eigenvalue, computed here in float64 from the float32 entries, is about -3e-8), so no true
  Cholesky factor exists: what LAPACK returns (an error, or a residue L[3,3] ~ 4e-4 on some
  CPUs, ~1e-4 on CUDA) depends on the host library. Our factor is the exact one.
  """
  gamma = 1 / 3
  cov32 = (torch.eye(4) * (1 + gamma) - torch.ones(4, 4) * gamma + torch.eye(4) * 1e-8).float()
  eig = np.linalg.eigvalsh(cov32.double().numpy())  # exact enough: float64, well separated
  assert eig[0] < -1e-8 and np.all(eig[1:] > 1.3)
  # The exact covariance is singular along the block mean: L[3,3] = 0 exactly.
  assert hs.BLOCK_NOISE_L[3, 3] == 0


def test_block_noise_factor():
  l = hs.BLOCK_NOISE_L
  cov = (1 + 1 / 3) * np.eye(4) - np.ones((4, 4)) / 3
  np.testing.assert_allclose(l @ l.T, cov, atol=1e-15)
  np.testing.assert_allclose(l[:, :3], [[1, 0, 0], [-1 / 3, 0.942809, 0],
                                        [-1 / 3, -0.471405, 0.816497],
                                        [-1 / 3, -0.471405, -0.816497]], atol=1e-6)
  assert l[3, 3] == 0 and np.abs(l.sum(axis=0)).max() < 1e-15  # zero block mean
  l2 = hs.block_noise_cholesky(0.2)
  np.testing.assert_allclose(l2 @ l2.T, 1.2 * np.eye(4) - 0.2, atol=1e-15)
  z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 4, 4, 3, 4)), jnp.float32)
  b = np.asarray(jax.jit(hs.block_noise)(z))  # [1, 2, 8, 8, 3]
  blocks = b.reshape(1, 2, 4, 2, 4, 2, 3).mean(axis=(3, 5))
  assert np.abs(blocks).max() < 1e-6


def test_pyramid_noise_and_transition(monkeypatch):
  _analytic_cholesky(monkeypatch)
  g = torch.Generator().manual_seed(7)
  b, c, t, h, w = 1, 16, 3, 16, 24
  eps = torch.randn(b, c, t, h, w, generator=g)
  # stage-0 start exactly as HeliosPyramidPipeline: (B*T, C, h, w), bilinear 0.5x, times 2
  lat = eps.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
  for _ in range(2):
    lat = F.interpolate(lat, size=(lat.shape[-2] // 2, lat.shape[-1] // 2), mode="bilinear") * 2
  ref_start = lat.reshape(b, t, c, h // 4, w // 4).permute(0, 2, 1, 3, 4)
  ours_start = jax.jit(hs.noise_pyramid_start, static_argnums=1)(to_jax(eps), 3)
  assert rel_err(ours_start, to_np(ref_start)) <= TOL  # CPU kernel: other summation order
  with monkeypatch.context() as m:  # the CUDA kernel's order, bit for bit
    m.setattr(F, "interpolate", _cuda_order_interpolate(F.interpolate))
    lat = eps.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    for _ in range(2):
      lat = F.interpolate(lat, size=(lat.shape[-2] // 2, lat.shape[-1] // 2),
                          mode="bilinear") * 2
  cuda_start = lat.reshape(b, t, c, h // 4, w // 4).permute(0, 2, 1, 3, 4)
  np.testing.assert_array_equal(np.asarray(ours_start), to_np(cuda_start))

  pipe = _FakePipe(1 / 3)
  for k, dtype in ((1, torch.float32), (2, torch.bfloat16)):
    y = torch.randn(b, c, t, h // 2 ** (3 - k), w // 2 ** (3 - k), generator=g)
    if dtype == torch.bfloat16:  # Distilled: bf16 stage output
      y = y.to(torch.bfloat16)
    up = F.interpolate(y.permute(0, 2, 1, 3, 4).reshape(b * t, c, *y.shape[-2:]),
                       size=(2 * y.shape[-2], 2 * y.shape[-1]), mode="nearest")
    up = up.reshape(b, t, c, 2 * y.shape[-2], 2 * y.shape[-1]).permute(0, 2, 1, 3, 4)
    zg = torch.Generator().manual_seed(100 + k)
    noise = pyr_mod.HeliosPyramidPipeline.sample_block_noise(
        pipe, b, c, t, up.shape[-2], up.shape[-1], (1, 2, 2), "cpu", zg)
    noise = noise.to(torch.bfloat16)  # transformer dtype
    ori = 1 - hs.HELIOS_PYRAMID.ori_start_sigmas[k]
    alpha = 1 / (np.sqrt(1 + 3) * (1 - ori) + ori)
    beta = alpha * (1 - ori) / np.sqrt(1 / 3)
    ref_next = alpha * up + beta * noise
    # replay the draw: same generator state -> the raw z of shape (B*C*T*h/2*w/2, 4)
    z_raw = torch.randn(b * c * t * y.shape[-2] * y.shape[-1], 4,
                        generator=torch.Generator().manual_seed(100 + k))
    z = hs.block_noise_z_from_reference(z_raw.numpy(), b, c, t, up.shape[-2], up.shape[-1])
    ours = jax.jit(hs.stage_transition, static_argnums=(2,))(to_jax(y), jnp.asarray(z), k)
    assert ours.dtype == {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}[
        ref_next.dtype]
    assert rel_err(ours.astype(jnp.float32), to_np(ref_next)) <= TOL


# ---------------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guidance(dtype):
  g = torch.Generator().manual_seed(11)
  shape = (2, 4, 3, 6, 10)
  vc = torch.randn(shape, generator=g).to(dtype)
  vu = (0.7 * vc.float() + 0.5 * torch.randn(shape, generator=g)).to(dtype)
  w = 5.0
  ref_cfg = vu + w * (vc - vu)
  ours_cfg = jax.jit(hs.cfg, static_argnums=2)(to_jax(vc), to_jax(vu), w)
  assert rel_err(ours_cfg.astype(jnp.float32), to_np(ref_cfg)) <= TOL

  # CFG-Zero* exactly as HeliosPyramidPipeline (optimized_scale from diffusers)
  alpha = pyr_mod.optimized_scale(vc.view(2, -1), vu.view(2, -1))
  np.testing.assert_allclose(np.asarray(hs.optimized_scale(to_jax(vc), to_jax(vu))),
                             alpha[:, 0].numpy(), rtol=1e-6)
  alpha = alpha.view(2, 1, 1, 1, 1).to(dtype)
  ref_zs = vu * alpha + w * (vc - vu * alpha)
  fn = jax.jit(hs.cfg_zero_star, static_argnums=2)
  ours_zs = fn(to_jax(vc), to_jax(vu), w, False)
  assert ours_zs.dtype == to_jax(vc).dtype
  assert rel_err(ours_zs.astype(jnp.float32), to_np(ref_zs)) <= TOL
  assert not np.any(np.asarray(fn(to_jax(vc), to_jax(vu), w, True), np.float32))
  np.testing.assert_array_equal(hs.zero_init_mask(5, 0, 1), [True, True, False, False, False])
  assert not hs.zero_init_mask(5, 1, 1).any() and not hs.zero_init_mask(5, 0, 1, False).any()


def test_guidance_mode():
  mid = hs.PipelineFlags(is_cfg_zero_star=True)
  assert hs.guidance_mode(mid, 5.0) == "cfg_zero_star"
  assert hs.guidance_mode(mid, 5.0, pyramid=False) == "cfg"
  assert hs.guidance_mode(hs.PipelineFlags(is_distilled=True), 1.0) == "none"
  assert hs.guidance_mode(None, 5.0) == "cfg"


# ------------------------------------------------------------------ pipeline-level replays


class _NullVAE(torch.nn.Module):
  """Stands in for the Wan VAE: the pipeline decodes every chunk, which the replay ignores."""

  def __init__(self):
    super().__init__()
    self.anchor = torch.nn.Parameter(torch.zeros(1))
    self.config = type("Cfg", (), dict(z_dim=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
                                       scale_factor_temporal=4, scale_factor_spatial=8))()

  @property
  def dtype(self):
    return torch.float32

  @property
  def device(self):
    return torch.device("cpu")

  def decode(self, z, return_dict=False):
    del return_dict
    return (torch.zeros(z.shape[0], 3, 4 * (z.shape[2] - 1) + 1, 1, 1),)


def _tiny_pipeline(scheduler, dtype, pipeline=pyr_mod.HeliosPyramidPipeline, **flags):
  torch.manual_seed(0)
  transformer = diffusers.HeliosTransformer3DModel(
      num_attention_heads=2, attention_head_dim=8, text_dim=16, freq_dim=16, ffn_dim=16,
      num_layers=1, rope_dim=(4, 2, 2)).eval().to(dtype)
  return pipeline(tokenizer=None, text_encoder=None, vae=_NullVAE(), scheduler=scheduler,
                  transformer=transformer, **flags)


def _record_calls(pipe):
  calls = []

  def hook(module, args, kwargs, output):
    del module, args
    calls.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].clone(),
                  output[0].detach().clone()))

  pipe.transformer.register_forward_hook(hook, with_kwargs=True)
  return calls


def _inject_block_noise(pipe):
  """Makes the reference use our block noise for its own draw (same z), after checking that
  its fp32 `z @ L.T` agrees: BLAS and our sum may differ by an fp32 ulp, which the bf16 cast
  can turn into a one-ulp bf16 flip and break bit-level replays."""
  errs = []
  orig = pipe.sample_block_noise

  def sample(batch, channel, frames, height, width, patch_size=(1, 2, 2), device=None,
             generator=None):
    state = generator.get_state()
    ref = orig(batch, channel, frames, height, width, patch_size, device, generator)
    z = torch.randn(batch * channel * frames * (height // 2) * (width // 2), 4,
                    generator=torch.Generator().set_state(state))
    z = hs.block_noise_z_from_reference(z.numpy(), batch, channel, frames, height, width)
    ours = np.asarray(jax.jit(hs.block_noise)(jnp.asarray(z)))
    errs.append(rel_err(ours, to_np(ref)))
    return torch.from_numpy(np.array(ours)).permute(0, 4, 1, 2, 3).contiguous()

  pipe.sample_block_noise = sample
  return errs


_transition = jax.jit(hs.stage_transition, static_argnums=(2, 3, 4, 5))


@functools.partial(jax.jit, static_argnames="mode")
def _replay_stage(x, table, vc, vu, zmask, mode):
  """One pyramid stage driven by recorded model outputs vc / vu [N, B, T, H, W, C]."""

  def denoise(x, step):
    del x
    if mode == "cfg_zero_star":
      return hs.cfg_zero_star(vc[step.index], vu[step.index], 5.0, zmask[step.index])
    return vc[step.index]

  if isinstance(table, hs.DMDTable):
    return hs.run_dmd(x, table, denoise)
  return hs.run_unipc(x, table, denoise)


PIPE_CASES = {
    # Helios-Mid: pyramid UniPC + CFG-Zero* (zero-init on stage-0 steps 0, 1)
    "mid": dict(scheduler=dict(cls="HeliosScheduler", use_dynamic_shifting=True,
                               time_shift_type="linear"),
                flags=dict(is_cfg_zero_star=True), steps=[3, 2, 3], guidance=5.0,
                amplify=False),
    # Helios-Distilled: pyramid DMD, amplified first chunk, no CFG
    "distilled": dict(scheduler=dict(cls="HeliosDMDScheduler", use_dynamic_shifting=True),
                      flags=dict(is_distilled=True), steps=[2, 1, 2], guidance=1.0,
                      amplify=True),
}


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.slow),
                                   torch.bfloat16])
@pytest.mark.parametrize("case", sorted(PIPE_CASES))
def test_pyramid_pipeline_replay(tmp_path, monkeypatch, case, dtype):
  """Runs diffusers' HeliosPyramidPipeline (tiny model, 2 chunks) and replays its recorded
  model outputs through our tables, transitions, guidance and steps; every stage start and
  both chunk outputs must match."""
  _analytic_cholesky(monkeypatch)
  monkeypatch.setattr(F, "interpolate", _cuda_order_interpolate(F.interpolate))
  spec = PIPE_CASES[case]
  skw = dict(spec["scheduler"])
  scheduler = getattr(diffusers, skw.pop("cls"))(**skw)
  pipe = _tiny_pipeline(scheduler, dtype, **spec["flags"])
  calls = _record_calls(pipe)
  noise_errs = _inject_block_noise(pipe)
  seed, h, w, n_chunks = 5, 8, 16, 2
  emb = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
  out = pipe(prompt_embeds=emb, negative_prompt_embeds=-emb, height=8 * h, width=8 * w,
             num_frames=33 * n_chunks, pyramid_num_inference_steps_list=spec["steps"],
             guidance_scale=spec["guidance"], is_amplify_first_chunk=spec["amplify"],
             generator=torch.Generator().manual_seed(seed), output_type="latent").frames

  # our side: configs read from the files a checkpoint carries
  pipe.scheduler.save_config(os.path.join(tmp_path, "scheduler"))
  with open(os.path.join(tmp_path, "model_index.json"), "w") as f:
    json.dump(dict(pipe.config), f)
  cfg = hs.load_scheduler_config(tmp_path)
  flags = hs.load_pipeline_flags(tmp_path)
  mode = hs.guidance_mode(flags, spec["guidance"])
  assert mode == {"mid": "cfg_zero_star", "distilled": "none"}[case]
  passes = 2 if mode != "none" else 1
  model_dtype = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16}[dtype]

  gen = torch.Generator().manual_seed(seed)  # replay the generator (spec §9 order)
  call = 0
  for chunk in range(n_chunks):
    eps = torch.randn(1, 16, 9, h, w, generator=gen)
    zs = [torch.randn(16 * 9 * (h // 4) * (w // 4), 4, generator=gen),
          torch.randn(16 * 9 * (h // 2) * (w // 2), 4, generator=gen)]
    scheds = hs.pyramid_schedules(cfg, spec["steps"], 9, h, w, amplify=spec["amplify"]
                                  and chunk == 0)
    x = hs.noise_pyramid_start(to_jax(eps), 3)
    for k, sched in enumerate(scheds):
      if k:
        hk, wk = x.shape[2] * 2, x.shape[3] * 2
        z = hs.block_noise_z_from_reference(zs[k - 1].numpy(), 1, 16, 9, hk, wk)
        x = _transition(x, jnp.asarray(z), k, hs.HELIOS_PYRAMID, None, model_dtype)
      # the model saw exactly our stage start point, at our truncated timesteps
      assert rel_err(x.astype(model_dtype).astype(jnp.float32), to_np(calls[call][0])) <= TOL
      n = sched.num_steps
      stage_calls = calls[call:call + passes * n]
      call += passes * n
      np.testing.assert_array_equal([c[1].item() for c in stage_calls[::passes]],
                                    sched.model_timesteps)
      vc = jnp.stack([to_jax(c[2]) for c in stage_calls[::passes]])
      vu = jnp.stack([to_jax(c[2]) for c in stage_calls[passes - 1::passes]])
      table = hs.dmd_table(sched) if cfg.is_dmd else hs.unipc_table(cfg, sched)
      x = _replay_stage(x, table, vc, vu, hs.zero_init_mask(n, k, zero_steps=1), mode)
    ref_chunk = out[:, :, 9 * chunk:9 * (chunk + 1)]
    err = rel_err(x.astype(jnp.float32), to_np(ref_chunk))
    assert err <= TOL, (chunk, err)
  assert call == len(calls)
  assert len(noise_errs) == 2 * n_chunks and max(noise_errs) <= TOL, noise_errs


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.slow),
                                   torch.bfloat16])
def test_base_pipeline_replay(tmp_path, dtype):
  """diffusers' HeliosPipeline (Base: single-resolution UniPC + CFG, float timesteps),
  replayed through base_schedule / unipc_table / cfg with its recorded model outputs."""
  ref_sched = diffusers.HeliosScheduler(stages=1, use_dynamic_shifting=True)
  pipe = _tiny_pipeline(ref_sched, dtype, pipeline=base_mod.HeliosPipeline)
  calls = _record_calls(pipe)
  seed, h, w, n_chunks, steps = 3, 8, 16, 2, 5
  emb = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
  out = pipe(prompt_embeds=emb, negative_prompt_embeds=-emb, height=8 * h, width=8 * w,
             num_frames=33 * n_chunks, num_inference_steps=steps, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(seed), output_type="latent").frames
  pipe.scheduler.save_config(os.path.join(tmp_path, "scheduler"))
  cfg = hs.load_scheduler_config(tmp_path)
  sched = hs.base_schedule(cfg, steps, 9, h, w)
  table = hs.unipc_table(cfg, sched)
  gen = torch.Generator().manual_seed(seed)

  @jax.jit
  def chunk(x, vc, vu):
    return hs.run_unipc(x, table, lambda x, step: hs.cfg(vc[step.index], vu[step.index], 5.0))

  for k in range(n_chunks):
    eps = torch.randn(1, 16, 9, h, w, generator=gen)
    cs = calls[2 * steps * k:2 * steps * (k + 1)]
    # Base feeds the float64 scheduler timestep itself (no truncation)
    np.testing.assert_array_equal([c[1].item() for c in cs[::2]], sched.timesteps)
    assert rel_err(np.asarray(to_jax(eps).astype(to_jax(cs[0][0]).dtype), np.float32),
                   to_np(cs[0][0])) == 0
    x = chunk(to_jax(eps), jnp.stack([to_jax(c[2]) for c in cs[::2]]),
              jnp.stack([to_jax(c[2]) for c in cs[1::2]]))
    err = rel_err(x, to_np(out[:, :, 9 * k:9 * (k + 1)]))
    assert err <= TOL, (k, err)
  assert len(calls) == 2 * steps * n_chunks


# ------------------------------------------------------------------------------------ config


def test_scheduler_config_roundtrip(tmp_path):
  ref = diffusers.HeliosScheduler(stages=1, use_dynamic_shifting=True, solver_order=3,
                                  disable_corrector=[2])
  cfg = save_ref_config(ref, tmp_path)
  assert isinstance(cfg, hs.HeliosSchedulerConfig)
  assert (cfg.stages, cfg.solver_order, cfg.disable_corrector, cfg.time_shift_type) == (
      1, 3, (2,), "exponential")
  assert cfg.solver == "unipc" and not cfg.is_dmd
  out = os.path.join(tmp_path, "out.json")
  cfg.to_json(out)
  back = diffusers.HeliosScheduler.from_config(diffusers.HeliosScheduler.load_config(out))
  public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}
  assert public(back.config) == public(ref.config)
  assert hs.SchedulerConfig.from_json(out) == cfg

  dmd = save_ref_config(diffusers.HeliosDMDScheduler(), os.path.join(tmp_path, "d"))
  assert isinstance(dmd, hs.HeliosDMDSchedulerConfig) and dmd.is_dmd
  assert dmd.time_shift_type == "linear"  # the DMD class default differs
  official = hs.SchedulerConfig.from_dict({"_class_name": "HeliosScheduler",
                                           "scheduler_type": "dmd"})
  assert official.is_dmd
  assert hs.SchedulerConfig.from_dict({"_class_name": "HeliosDMDScheduler",
                                       "scheduler_type": "dmd"}).is_dmd


@pytest.mark.parametrize("d,match", [
    ({"_class_name": "HeliosScheduler", "solver_orderr": 2}, "solver_orderr"),
    ({"_class_name": "HeliosDMDScheduler", "solver_order": 2}, "solver_order"),
    ({"_class_name": "HeliosDMDScheduler", "scheduler_type": "unipc"}, "scheduler_type"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "FlowMatchEulerDiscreteScheduler"),
    ({"stages": 3}, "_class_name"),
    ({"_class_name": "HeliosScheduler", "time_shift_type": "cubic"}, "cubic"),
    ({"_class_name": "HeliosScheduler", "stages": 3, "stage_range": [0, 1]}, "stage_range"),
    ({"_class_name": "HeliosScheduler", "thresholding": True}, "thresholding"),
    ({"_class_name": "HeliosScheduler", "use_dynamic_shifting": True, "shift": 3.0}, "shift=3.0"),
    ({"_class_name": "HeliosScheduler", "prediction_type": "epsilon"}, "epsilon"),
])
def test_scheduler_config_errors(d, match):
  with pytest.raises(ConfigError, match=match):
    hs.SchedulerConfig.from_dict(d)


def test_missing_files(tmp_path):
  with pytest.raises(ConfigError, match="scheduler config not found"):
    hs.load_scheduler_config(tmp_path)
  with pytest.raises(ConfigError, match="model_index.json not found"):
    hs.load_pipeline_flags(tmp_path)
  bad = os.path.join(tmp_path, "scheduler")
  os.makedirs(bad)
  with open(os.path.join(bad, "scheduler_config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ConfigError, match="not valid JSON"):
    hs.load_scheduler_config(tmp_path)


def test_pipeline_flags(tmp_path):
  index = {"_class_name": "HeliosPyramidPipeline", "_diffusers_version": "0.42.1",
           "is_cfg_zero_star": True, "is_distilled": False,
           "scheduler": ["diffusers", "HeliosScheduler"], "text_encoder": ["transformers",
                                                                           "UMT5EncoderModel"],
           "tokenizer": [None, None], "transformer": ["diffusers", "HeliosTransformer3DModel"],
           "vae": ["diffusers", "AutoencoderKLWan"]}
  with open(os.path.join(tmp_path, "model_index.json"), "w") as f:
    json.dump(index, f)
  flags = hs.load_pipeline_flags(tmp_path)
  assert flags.is_cfg_zero_star and not flags.is_distilled
  assert flags.pipeline_class == "HeliosPyramidPipeline"
  assert flags.component("scheduler") == ("diffusers", "HeliosScheduler")
  assert flags.component("tokenizer") == (None, None)
  with pytest.raises(ConfigError, match="'unet'"):
    flags.component("unet")
  assert hs.PipelineFlags.from_dict(flags.to_dict()) == flags
  with pytest.raises(ConfigError, match="is_amplify_first_chunk"):
    hs.PipelineFlags.from_dict({**index, "is_amplify_first_chunk": True})
  with pytest.raises(ConfigError, match="is_distilled"):
    hs.PipelineFlags.from_dict({**index, "is_distilled": "yes"})


def test_bad_inputs():
  cfg3 = hs.HeliosSchedulerConfig()
  with pytest.raises(ValueError, match=r"steps_per_stage=\[2, 2\]"):
    hs.pyramid_schedules(cfg3, (2, 2), 9, 48, 80)
  with pytest.raises(ValueError, match="50x80"):
    hs.pyramid_schedules(cfg3, (2, 2, 2), 9, 50, 80)
  with pytest.raises(ValueError, match="stages=3"):
    hs.base_schedule(cfg3, 50, 9, 48, 80)
  with pytest.raises(ValueError, match="stage_index=3"):
    hs.set_timesteps(cfg3, 4, stage_index=3)
  with pytest.raises(ValueError, match="needs mu"):
    hs.set_timesteps(hs.HeliosSchedulerConfig(use_dynamic_shifting=True), 4, stage_index=0)
  with pytest.raises(ValueError, match="num_inference_steps=0"):
    hs.set_timesteps(cfg3, 0, stage_index=0)
  with pytest.raises(ValueError, match="solver='dmd'"):
    hs.unipc_table(hs.HeliosDMDSchedulerConfig(), hs.set_timesteps(cfg3, 2, stage_index=0))
  with pytest.raises(ValueError, match="5x6"):
    hs.downsample_2x(jnp.zeros((1, 1, 5, 6, 2)))
  with pytest.raises(ValueError, match=r"\(1, 1, 2, 2, 2, 3\)"):
    hs.block_noise(jnp.zeros((1, 1, 2, 2, 2, 3)))
  with pytest.raises(ValueError, match="B=1 C=16"):
    hs.block_noise_z_from_reference(np.zeros((10, 4)), 1, 16, 9, 8, 8)
  with pytest.raises(ValueError, match="stage_index=0"):
    hs.stage_transition(jnp.zeros((1, 1, 2, 2, 2)), jnp.zeros((1, 1, 2, 2, 2, 4)), 0)
  with pytest.raises(ValueError, match=r"\(1, 1, 2, 2, 2, 4\)"):
    hs.stage_transition(jnp.zeros((1, 1, 2, 2, 3)), jnp.zeros((1, 1, 2, 2, 2, 4)), 1)
  with pytest.raises(ValueError, match="gamma=0.5"):
    hs.block_noise_cholesky(0.5)
