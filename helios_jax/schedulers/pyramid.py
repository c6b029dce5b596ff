"""Pyramid constants (the one place for the 3-stage numbers) and pyramid stage transitions.

Everything here mirrors diffusers 0.42.1 `HeliosScheduler.init_sigmas_for_each_stage` and the
stage logic of `HeliosPyramidPipeline.__call__` (spec sampling.md §4.4). Host-side constants
are float64 numpy / Python floats; the array transforms are `jax.numpy` on channels-last
latents `[B, T, H, W, C]` and reproduce PyTorch's rounding (fp32 math, bf16 block noise).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.schedulers import _numerics

# Released Helios (Mid, Distilled) pyramid: diffusers' HeliosScheduler / HeliosDMDScheduler
# defaults, also used by Stage-2/3 training (training.md §2.3).
NUM_TRAIN_TIMESTEPS = 1000
NUM_STAGES = 3
STAGE_RANGE = (0.0, 1 / 3, 2 / 3, 1.0)
GAMMA = 1 / 3
SHIFT = 1.0
# Block-noise block = the transformer's spatial patch (patch_size[1:]).
BLOCK = (2, 2)
# calculate_shift defaults (diffusers; the Helios scheduler configs carry none of these keys).
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15


@dataclasses.dataclass(frozen=True, eq=False)
class PyramidConstants:
  """Stage bands and tables of a pyramid scheduler (float64, as the reference computes them).

  Attributes:
    num_train_timesteps: N (1000).
    shift: static shift of the global table (1.0).
    stage_range: the S + 1 stage boundaries in [0, 1] over the global table.
    gamma: block-noise correlation / renoise parameter (1/3).
    global_sigmas: [N] 0.999 ... 0.000999 (shifted by `shift`).
    global_timesteps: [N] 1000 * global_sigmas.
    ori_start_sigmas: [S] original stage starts o_k = global_sigmas[int(N * stage_range[k])].
    start_sigmas: [S] corrected starts S_k (k >= 1 accounts for upsample + renoise).
    end_sigmas: [S] stage ends E_k (0 for the last stage).
    timestep_ratios: [S, 2] (start, end) of each stage's share of the total flow length.
    stage_timesteps: [S, N] per-stage model-timestep table linspace(t_max, t_min, N+1)[:-1].
    stage_sigmas: [N] stage-local sigma table linspace(0.999, 0, N+1)[:-1] (same per stage).
    stage_timestep_end: [S] t_min of each band (the excluded last linspace point).
    renoise_alpha: [S] upsample weight alpha_k of the transition into stage k (1 for k = 0).
    renoise_beta: [S] block-noise weight beta_k (0 for k = 0).
  """

  num_train_timesteps: int
  shift: float
  stage_range: tuple[float, ...]
  gamma: float
  global_sigmas: np.ndarray
  global_timesteps: np.ndarray
  ori_start_sigmas: np.ndarray
  start_sigmas: np.ndarray
  end_sigmas: np.ndarray
  timestep_ratios: np.ndarray
  stage_timesteps: np.ndarray
  stage_sigmas: np.ndarray
  stage_timestep_end: np.ndarray
  renoise_alpha: np.ndarray
  renoise_beta: np.ndarray

  @property
  def num_stages(self) -> int:
    return len(self.stage_range) - 1

  @property
  def stage_timestep_min(self) -> np.ndarray:
    """[S] smallest entry of each stage table, t_min + (t_max - t_min) / N."""
    return self.stage_timesteps[:, -1]


def renoise_coefficients(ori_start_sigma: float, gamma: float) -> tuple[float, float]:
  """(alpha, beta) of the upsample + block-noise renoise into a stage (pipeline formula).

  Args:
    ori_start_sigma: the stage's original start sigma o_k.
    gamma: block-noise parameter.

  Returns:
    alpha = 1 / (sqrt(1 + 1/gamma) (1 - c) + c), beta = alpha (1 - c) / sqrt(gamma), with
    c = 1 - o_k.
  """
  ori_sigma = 1 - ori_start_sigma  # the original signal coefficient
  alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - ori_sigma) + ori_sigma)
  beta = alpha * (1 - ori_sigma) / math.sqrt(gamma)
  return alpha, beta


@functools.lru_cache(maxsize=32)
def pyramid_constants(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = SHIFT,
                      stages: int = NUM_STAGES, stage_range: Sequence[float] = STAGE_RANGE,
                      gamma: float = GAMMA) -> PyramidConstants:
  """Computes the stage bands exactly as `HeliosScheduler.init_sigmas_for_each_stage`.

  Args:
    num_train_timesteps: N.
    shift: static shift.
    stages: S.
    stage_range: at least S + 1 increasing boundaries in [0, 1] (only the first S + 1 are
      used; the last stage always ends at the end of the table).
    gamma: block-noise parameter.

  Returns:
    The constants (arrays are read-only).
  """
  n = int(num_train_timesteps)
  num_stages = int(stages)
  if len(stage_range) < num_stages + 1:
    raise ValueError(f"stage_range={list(stage_range)} needs at least stages + 1 = "
                     f"{num_stages + 1} entries")
  stage_range = tuple(float(r) for r in stage_range[:num_stages + 1])
  alphas = np.linspace(1, 1 / n, n + 1)
  sig = 1.0 - alphas
  sig = np.flip(shift * sig / (1 + (shift - 1) * sig))[:-1].copy()
  ts = sig * n

  ori, start, end, dist = [], [], [], []
  for k in range(num_stages):
    i0 = max(int(stage_range[k] * n), 0)
    i1 = min(int(stage_range[k + 1] * n), n)
    s0 = float(sig[i0])
    e0 = float(sig[i1]) if i1 < n else 0.0
    ori.append(s0)
    if k != 0:
      o = 1 - s0
      corrected = (1 / (math.sqrt(1 + (1 / gamma)) * (1 - o) + o)) * o
      s0 = 1 - corrected
    dist.append(s0 - e0)
    start.append(s0)
    end.append(e0)
  total = sum(dist)
  ratios = []
  for k in range(num_stages):
    r0 = 0.0 if k == 0 else sum(dist[:k]) / total
    r1 = 0.9999999999999999 if k == num_stages - 1 else sum(dist[:k + 1]) / total
    ratios.append((r0, r1))

  stage_ts, t_end = [], []
  for r0, r1 in ratios:
    t_max = min(float(ts[int(r0 * n)]), 999)
    t_min = float(ts[min(int(r1 * n), n - 1)])
    stage_ts.append(np.linspace(t_max, t_min, n + 1)[:-1])
    t_end.append(t_min)
  coefs = [(1.0, 0.0)] + [renoise_coefficients(o, gamma) for o in ori[1:]]

  def ro(a):
    a = np.asarray(a, np.float64)
    a.setflags(write=False)
    return a

  return PyramidConstants(
      num_train_timesteps=n, shift=float(shift), stage_range=stage_range, gamma=float(gamma),
      global_sigmas=ro(sig), global_timesteps=ro(ts), ori_start_sigmas=ro(ori),
      start_sigmas=ro(start), end_sigmas=ro(end), timestep_ratios=ro(ratios),
      stage_timesteps=ro(np.stack(stage_ts)), stage_sigmas=ro(np.linspace(0.999, 0, n + 1)[:-1]),
      stage_timestep_end=ro(t_end), renoise_alpha=ro([c[0] for c in coefs]),
      renoise_beta=ro([c[1] for c in coefs]))


def constants_for(config) -> PyramidConstants:
  """`pyramid_constants` of a `SchedulerConfig`."""
  return pyramid_constants(int(config.num_train_timesteps), float(config.shift),
                           int(config.stages), tuple(float(r) for r in config.stage_range),
                           float(config.gamma))


HELIOS_PYRAMID = pyramid_constants()


def block_noise_cholesky(gamma: float = GAMMA, block_size: int = 4) -> np.ndarray:
  """Analytic lower Cholesky factor of the block-noise covariance (1+gamma) I - gamma 11^T.

  The reference factorises the float32 matrix (+1e-8 I) with `torch.linalg.cholesky`, which
  fails on CPU (the float32 matrix is indefinite) and returns a rounding residue L[3,3] ~ 1e-4
  on CUDA (spec sampling.md §4.4). This closed form (Schur-complement pivots
  d_k = (1+gamma)(1 - k gamma) / (1 - (k-1) gamma)) gives the exact factor, with
  L[3,3] = 0 for gamma = 1/3 (the covariance is singular: block means are exactly 0). Pass a
  dumped CUDA factor instead where latent-for-latent GPU parity matters.

  Args:
    gamma: correlation parameter, 0 < gamma <= 1 / (block_size - 1).
    block_size: entries per block (ph * pw = 4).

  Returns:
    [block_size, block_size] float64 lower-triangular L with L L^T = covariance.
  """
  if not 0 < gamma or 1 - (block_size - 1) * gamma < 0:
    raise ValueError(f"gamma={gamma} makes the {block_size}x{block_size} block covariance "
                     f"indefinite (need 0 < gamma <= 1/{block_size - 1})")
  a = 1 + gamma
  out = np.zeros((block_size, block_size), np.float64)
  for k in range(block_size):
    d = a * (1 - k * gamma) / (1 - (k - 1) * gamma)
    out[k, k] = math.sqrt(d)
    if d > 0:
      off = -a * gamma / (1 - (k - 1) * gamma) / math.sqrt(d)
      out[k + 1:, k] = off
  return out


BLOCK_NOISE_L = block_noise_cholesky()


def stage_latent_sizes(height: int, width: int,
                       num_stages: int = NUM_STAGES) -> list[tuple[int, int]]:
  """Latent (h, w) of every stage, lowest resolution first ([12x20, 24x40, 48x80]).

  Args:
    height: full-resolution latent height.
    width: full-resolution latent width.
    num_stages: S.

  Returns:
    S (h, w) pairs.
  """
  f = 2 ** (num_stages - 1)
  if height % f or width % f:
    raise ValueError(f"latent size {height}x{width} must be divisible by 2**(stages-1)={f} "
                     f"for a {num_stages}-stage pyramid")
  return [(height // 2 ** (num_stages - 1 - k), width // 2 ** (num_stages - 1 - k))
          for k in range(num_stages)]


def stage_shift_seq_lens(num_frames: int, height: int, width: int,
                         num_stages: int = NUM_STAGES, patch_size: Sequence[int] = (1, 2, 2),
                         pre_upsample: bool = True) -> list[int]:
  """`image_seq_len` fed to `calculate_shift` for each stage.

  Args:
    num_frames: latent frames per chunk (9).
    height: full-resolution latent height.
    width: full-resolution latent width.
    num_stages: S.
    patch_size: transformer patch (pt, ph, pw).
    pre_upsample: True (inference pipelines): stage k >= 1 uses the size BEFORE its upsample,
      i.e. stage k-1's size (540, 540, 2160 at 48x80). False (repo training pipeline / Stage-3
      training): the stage's own size (540, 2160, 8640).

  Returns:
    S sequence lengths (T h w) // (pt ph pw).
  """
  sizes = stage_latent_sizes(height, width, num_stages)
  p = int(np.prod(patch_size))
  out = []
  for k in range(num_stages):
    h, w = sizes[max(k - 1, 0)] if pre_upsample else sizes[k]
    out.append((num_frames * h * w) // p)
  return out


def downsample_2x(x: jax.Array) -> jax.Array:
  """Bilinear 0.5x resize (align_corners=False, no antialias) = exact 2x2 block mean.

  All bilinear weights are 1/2 (exact scalings), so `F.interpolate(x, scale 1/2, "bilinear")`
  is the block mean up to the summation order. This uses the order of PyTorch's CUDA kernel
  (the reference GPU run), ((x00 + x01) + (x10 + x11)) / 4, bit for bit. PyTorch's CPU kernel
  sums in another, channel-count-dependent order (e.g. x11, x10, x01, x00 for C = 16): a
  difference of at most one fp32 ulp.

  Args:
    x: [B, T, H, W, C] latents, H and W even.

  Returns:
    [B, T, H/2, W/2, C], dtype of `x`.
  """
  h, w = x.shape[-3], x.shape[-2]
  if h % 2 or w % 2:
    raise ValueError(f"downsample_2x needs even H, W; got {h}x{w}")
  op = _numerics.opmath_dtype(x.dtype)
  y = x.astype(op)
  top = y[..., 0::2, 0::2, :] + y[..., 0::2, 1::2, :]
  bottom = y[..., 1::2, 0::2, :] + y[..., 1::2, 1::2, :]
  return _numerics.round_to((top + bottom) * 0.25, x.dtype)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Nearest 2x upsample (each value copied into a 2x2 block).

  Args:
    x: [B, T, h, w, C].

  Returns:
    [B, T, 2h, 2w, C].
  """
  return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


def noise_pyramid_start(noise: jax.Array, num_stages: int = NUM_STAGES) -> jax.Array:
  """Stage-0 start point: (S-1) times `2 * bilinear_0.5x(noise)` (keeps unit variance).

  Args:
    noise: [B, T, H, W, C] fp32 full-resolution chunk noise (the reference's per-chunk randn).
    num_stages: S.

  Returns:
    [B, T, H / 2^(S-1), W / 2^(S-1), C], dtype of `noise`.
  """
  for _ in range(num_stages - 1):
    noise = _numerics.scale(2, downsample_2x(noise))
  return noise


def block_noise_z_from_reference(z: jax.Array | np.ndarray, batch: int, channels: int,
                                 frames: int, height: int, width: int,
                                 block: Sequence[int] = BLOCK):
  """Reorders the reference's raw block-noise draw into our layout.

  The reference draws `z = randn(B*C*T*(h/ph)*(w/pw), ph*pw)` (row-major over
  (B, C, T, h/ph, w/pw), block entries row-major over (dy, dx)); in diffusers 0.42.1 from the
  user generator right after the chunk's initial noise, stage 1 then stage 2 (spec §9).

  Args:
    z: [B*C*T*(h/ph)*(w/pw), ph*pw] (numpy or jax).
    batch: B.
    channels: C.
    frames: T.
    height: h, the latent height AFTER the stage's upsample.
    width: w.
    block: (ph, pw).

  Returns:
    [B, T, h/ph, w/pw, C, ph*pw] (same array library as `z`).
  """
  ph, pw = block
  shape = (batch, channels, frames, height // ph, width // pw, ph * pw)
  if int(np.prod(z.shape)) != int(np.prod(shape)) or z.shape[-1] != ph * pw:
    raise ValueError(f"reference block-noise draw of shape {tuple(z.shape)} does not match "
                     f"(B*C*T*(h/{ph})*(w/{pw}), {ph * pw}) = ({int(np.prod(shape[:-1]))}, "
                     f"{ph * pw}) for B={batch} C={channels} T={frames} h={height} w={width}")
  return z.reshape(shape).transpose(0, 2, 3, 4, 1, 5)


def block_noise(z: jax.Array, chol: jax.Array | np.ndarray | None = None,
                block: Sequence[int] = BLOCK) -> jax.Array:
  """Correlated block noise b = L z per spatial block (zero block mean for gamma = 1/3).

  Args:
    z: [B, T, h/ph, w/pw, C, ph*pw] fp32 standard normal draws.
    chol: [ph*pw, ph*pw] lower-triangular factor (a dumped CUDA factor); None = the analytic
      `block_noise_cholesky(GAMMA, ph*pw)` (`BLOCK_NOISE_L` for 2x2 blocks).
    block: (ph, pw).

  Returns:
    [B, T, h, w, C] fp32 noise; entry (dy, dx) of a block is component ph*dy + dx.
  """
  ph, pw = block
  k = ph * pw
  if z.shape[-1] != k or z.ndim != 6:
    raise ValueError(f"block-noise z must be [B, T, h/{ph}, w/{pw}, C, {k}], got {z.shape}")
  if chol is None:
    chol = BLOCK_NOISE_L if k == 4 else block_noise_cholesky(GAMMA, k)
  chol = jnp.asarray(chol, jnp.float32)
  if chol.shape != (k, k):
    raise ValueError(f"Cholesky factor must be {k}x{k}, got {chol.shape}")
  z = z.astype(jnp.float32)
  comps = []
  for i in range(k):  # z @ L.T, accumulated in column order like a row-by-row GEMM
    acc = chol[i, 0] * z[..., 0]
    for j in range(1, k):
      acc = acc + chol[i, j] * z[..., j]
    comps.append(acc)
  b, t, hb, wb, c = z.shape[:5]
  n = jnp.stack(comps, axis=-1).reshape(b, t, hb, wb, c, ph, pw)
  return n.transpose(0, 1, 2, 5, 3, 6, 4).reshape(b, t, hb * ph, wb * pw, c)


def renoise(upsampled: jax.Array, noise: jax.Array, alpha: float, beta: float) -> jax.Array:
  """`alpha * upsampled + beta * noise` with PyTorch's dtype rules.

  Args:
    upsampled: [B, T, h, w, C] the nearest-upsampled previous stage output (fp32 for UniPC,
      the model dtype for DMD).
    noise: [B, T, h, w, C] block noise already cast to the transformer dtype.
    alpha: upsample weight.
    beta: noise weight.

  Returns:
    [B, T, h, w, C] in the promoted dtype (fp32 for Mid, bf16 for Distilled).
  """
  return _numerics.binary(jnp.add, _numerics.scale(alpha, upsampled),
                          _numerics.scale(beta, noise))


def stage_transition(y: jax.Array, z: jax.Array, stage_index: int,
                     constants: PyramidConstants = HELIOS_PYRAMID,
                     chol: jax.Array | np.ndarray | None = None,
                     noise_dtype=jnp.bfloat16) -> jax.Array:
  """Start point of stage k >= 1 from stage k-1's output (upsample + block-noise renoise).

  Args:
    y: [B, T, h, w, C] previous stage output.
    z: [B, T, h, w, C, 4] standard-normal draws for this transition (see
      `block_noise_z_from_reference` for the reference's order); h, w are pre-upsample sizes.
    stage_index: k in 1..S-1 (static).
    constants: pyramid constants (alpha_k, beta_k).
    chol: block-noise Cholesky factor (None = analytic `BLOCK_NOISE_L`; pass a dumped CUDA
      factor for latent-level GPU parity).
    noise_dtype: transformer dtype the block noise is cast to before the blend.

  Returns:
    [B, T, 2h, 2w, C] start point x^(0)_k.
  """
  if not 1 <= stage_index < constants.num_stages:
    raise ValueError(f"stage_index={stage_index} must be in [1, {constants.num_stages - 1}]")
  up = upsample_nearest_2x(y)
  if z.shape[:5] != (y.shape[0], y.shape[1], y.shape[2], y.shape[3], y.shape[4]):
    raise ValueError(f"block-noise z shape {z.shape} must be [B, T, h, w, C, 4] = "
                     f"{(*y.shape, 4)} for a stage input of shape {y.shape}")
  noise = _numerics.round_to(block_noise(z, chol), noise_dtype)
  return renoise(up, noise, float(constants.renoise_alpha[stage_index]),
                 float(constants.renoise_beta[stage_index]))
