"""CLIP-style frame preprocessing of the upstream metrics (torchvision semantics, in JAX).

Upstream `clip_transform(224)`: `Resize(224, bicubic, antialias=False)` of the shorter side,
`CenterCrop(224)`, `/255`, CLIP mean/std. The resize is torch's `upsample_bicubic2d` (cubic
convolution a = -0.75, half-pixel centres, border replicate), written here as two interpolation
matrices. Aesthetic resizes float frames (no rounding); Semantic resizes uint8 frames, which
torchvision rounds and clamps back to uint8 (`round_to_uint8=True`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.models.clip import CLIP_MEAN, CLIP_STD

_A = -0.75


def _cubic1(x: np.ndarray) -> np.ndarray:  # |x| <= 1
  return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cubic2(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
  return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """torch `interpolate(mode="bicubic", align_corners=False, antialias=False)` along one axis.

  Args:
    in_size: source length.
    out_size: destination length.

  Returns:
    # [out_size, in_size] float32 M with out = M @ in.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be >= 1, got in_size={in_size} out_size={out_size}")
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  real = scale * (dst + np.float32(0.5)) - np.float32(0.5)
  idx = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
  t = np.clip(real - idx, 0.0, 1.0).astype(np.float32)
  weights = np.stack([_cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t)], axis=-1)
  m = np.zeros((out_size, in_size), np.float64)
  for k in range(4):
    cols = np.clip(idx - 1 + k, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), cols), weights[:, k].astype(np.float64))
  return m.astype(np.float32)


def resized_shape(height: int, width: int, size: int = 224) -> tuple[int, int]:
  """torchvision `Resize(size)` with an int: shorter side -> size, longer int(size * L / S)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def center_crop_offsets(height: int, width: int, size: int = 224) -> tuple[int, int]:
  """torchvision `CenterCrop(size)` top/left: int(round((H - size) / 2))."""
  if height < size or width < size:
    raise ValueError(f"image {height}x{width} is smaller than the crop {size}")
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


@functools.lru_cache(maxsize=16)
def _crop_matrices(height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  rh, rw = resized_shape(height, width, size)
  top, left = center_crop_offsets(rh, rw, size)
  mh = bicubic_matrix(height, rh)[top:top + size]
  mw = bicubic_matrix(width, rw)[left:left + size]
  return mh, mw


@functools.partial(jax.jit, static_argnames=("size", "round_to_uint8"))
def clip_preprocess(frames: jax.Array, *, size: int = 224, round_to_uint8: bool = False
                    ) -> jax.Array:
  """Upstream `clip_transform(size)` on RGB frames.

  Args:
    frames: # [T, H, W, 3] uint8 or float RGB in 0..255.
    size: output side.
    round_to_uint8: round and clamp the resized image to uint8 first (torchvision on uint8
      tensors; the Semantic metric), else keep floats (Aesthetic).

  Returns:
    # [T, size, size, 3] float32, CLIP-normalised.
  """
  _, h, w, c = frames.shape
  if c != 3:
    raise ValueError(f"frames must have 3 channels, got shape {frames.shape}")
  mh, mw = _crop_matrices(h, w, size)
  x = frames.astype(jnp.float32)
  x = jnp.einsum("oh,thwc->towc", jnp.asarray(mh), x, precision=jax.lax.Precision.HIGHEST)
  x = jnp.einsum("pw,towc->topc", jnp.asarray(mw), x, precision=jax.lax.Precision.HIGHEST)
  if round_to_uint8:
    x = jnp.clip(jnp.round(x), 0, 255)
  x = x / 255.0
  mean = jnp.asarray(CLIP_MEAN, jnp.float32)
  std = jnp.asarray(CLIP_STD, jnp.float32)
  return (x - mean) / std
