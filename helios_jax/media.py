"""Image / video input and mp4 output (kept libraries: Pillow, imageio-ffmpeg).

Inputs are resized to the generation size as the official `infer_helios.py` does (Pillow
`resize` to W x H, bicubic) and mapped to [-1, 1] as diffusers' VideoProcessor does
(`2 * (x / 255) - 1` in fp32). Output mp4 files are written to a temporary name and renamed,
so a failure never leaves a half-written video.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np


def _to_pil(frame: Any):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(frame, Image.Image):
    return frame.convert("RGB")
  arr = np.asarray(frame)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"image array must be [H, W, 3], got shape {arr.shape}")
  if arr.dtype != np.uint8:
    if arr.min() < 0 or arr.max() > 1:
      raise ValueError("float image arrays must lie in [0, 1] (or pass uint8)")
    arr = np.round(arr * 255).astype(np.uint8)
  return Image.fromarray(arr)


def _resize_normalize(img, height: int, width: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if img.size != (width, height):
    img = img.resize((width, height), Image.BICUBIC)
  x = np.asarray(img, np.float32) / np.float32(255.0)  # diffusers' VaeImageProcessor steps
  x = np.float32(2.0) * x - np.float32(1.0)
  return np.transpose(x, (2, 0, 1))  # [3, H, W]


def load_image(image: Any, height: int, width: int) -> np.ndarray:
  """Path / PIL image / `[H, W, 3]` array -> `[3, height, width]` fp32 in [-1, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"image not found: {path}")
    try:
      with Image.open(path) as im:
        pil = im.convert("RGB")
    except (OSError, ValueError) as e:
      raise ValueError(f"unreadable image {path}: {e}") from e
  else:
    pil = _to_pil(image)
  return _resize_normalize(pil, height, width)


def read_video_frames(path: str | os.PathLike) -> np.ndarray:
  """All frames of a video file as `[T, H, W, 3]` uint8."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"video not found: {path}")
  try:
    frames = np.asarray(iio.imread(path, plugin="FFMPEG"))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"unreadable video {path}: {e}") from e
  if frames.ndim != 4 or frames.shape[0] == 0:
    raise ValueError(f"video {path} has no frames (decoded shape {frames.shape})")
  return frames[..., :3]


def load_video(video: Any, height: int, width: int) -> np.ndarray:
  """Path or `[T, H, W, 3]` frames -> `[3, T, height, width]` fp32 in [-1, 1]."""
  frames = read_video_frames(video) if isinstance(video, (str, os.PathLike)) else video
  if len(frames) == 0:
    raise ValueError("video has no frames")
  out = np.stack([_resize_normalize(_to_pil(f), height, width) for f in frames], axis=1)
  return out


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 24) -> str:
  """Writes `[T, H, W, 3]` uint8 frames as an H.264 mp4 (atomically); returns the path."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".mp4",
                             dir=folder)
  os.close(fd)
  try:
    iio.imwrite(tmp, frames, plugin="FFMPEG", fps=fps, codec="libx264", macro_block_size=1)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
