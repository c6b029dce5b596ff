"""Image / video input and mp4 output (kept libraries: Pillow, imageio-ffmpeg).

Inputs are resized to the generation size as the official `infer_helios.py` does (Pillow
`resize` to W x H, bicubic) and mapped to [-1, 1] as diffusers' VideoProcessor does
(`2 * (x / 255) - 1` in fp32). Output mp4 files are written progressively to a temporary name,
checked (the encoder's result is read back) and renamed, so a failure never leaves a
half-written video (`VideoWriter`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np

from helios_jax import runtime


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
    # ffmpeg's message ends with its diagnosis after its whole banner: keep that one line.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "===" not in ln]
    raise ValueError(f"unreadable video {path}: {lines[-1] if lines else type(e).__name__}"
                     ) from None
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


class VideoWriteError(runtime.OutputPathError):
  """The encoder failed (e.g. no space left on the device); nothing was left at the path."""


class VideoWriter:
  """Writes an H.264 mp4 frame group by frame group, atomically.

  Frames go to a hidden temporary file beside `path` while they are produced (so a long
  video is written progressively); `close()` finishes the encoder, checks that it succeeded
  and that the file holds every frame, then renames it to `path`. `abort()` (or leaving the
  `with` block by an exception) removes the temporary file, or with `keep_partial` finishes it
  as `<path stem>.partial.mp4`, a playable video of the frames written so far.

    with media.VideoWriter("out.mp4", fps=24) as w:
      for chunk in chunks:          # [T, H, W, 3] uint8 each
        w.write(chunk)
  """

  def __init__(self, path: str | os.PathLike, fps: int = 24, keep_partial: bool = False):
    self.path = runtime.check_writable(path)
    self.fps = int(fps)
    self.keep_partial = bool(keep_partial)
    self.frames_written = 0
    self.size: tuple[int, int] | None = None
    self._gen = None
    self._tmp: str | None = None
    self.partial_path: str | None = None

  def _open(self, width: int, height: int) -> None:
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
    folder = os.path.dirname(self.path)
    os.makedirs(folder, exist_ok=True)
    fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".mp4", dir=folder)
    os.close(fd)
    self.size = (width, height)
    self._gen = imageio_ffmpeg.write_frames(
        self._tmp, (width, height), fps=self.fps, codec="libx264", macro_block_size=1,
        ffmpeg_log_level="error")
    self._gen.send(None)

  def write(self, frames: np.ndarray) -> None:
    """Appends `[T, H, W, 3]` uint8 frames (all calls the same H, W)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"frames must be [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    if self._gen is None:
      self._open(w, h)
    elif (w, h) != self.size:
      raise ValueError(f"frames are {w}x{h}; this video is {self.size[0]}x{self.size[1]}")
    try:
      for frame in frames:
        self._gen.send(np.ascontiguousarray(frame))
    except OSError as e:  # the encoder died (disk full, killed): its pipe is closed
      self._fail(f"the video encoder stopped after {self.frames_written} frames: "
                 f"{str(e).splitlines()[0]}")
    self.frames_written += len(frames)

  def _finish_encoder(self) -> int:
    """Closes the encoder; returns the frames the finished file holds (raises if unreadable)."""
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
    self._gen.close()
    self._gen = None
    try:
      n, _ = imageio_ffmpeg.count_frames_and_secs(self._tmp)
    except RuntimeError as e:
      lines = [ln for ln in str(e).splitlines() if ln.strip()]
      free = shutil.disk_usage(os.path.dirname(self._tmp)).free
      raise VideoWriteError(f"the video encoder failed writing {self.path}: its output is "
                            f"unreadable ({lines[-1] if lines else e}); {free / 1e6:.1f} MB free "
                            "on that filesystem") from None
    return n

  def close(self) -> str:
    """Finishes the video and renames it into place; returns the path."""
    if self._gen is None:
      raise VideoWriteError(f"no frames were written to {self.path}")
    try:
      n = self._finish_encoder()
      if n != self.frames_written:
        raise VideoWriteError(f"the video encoder wrote {n} of {self.frames_written} frames to "
                              f"{self.path} (disk full?)")
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual mode
      os.replace(self._tmp, self.path)
      self._tmp = None
    except BaseException:
      self._remove_tmp()
      raise
    return self.path

  def _fail(self, message: str) -> None:
    self.abort(keep_partial=False)
    raise VideoWriteError(f"{message} (nothing was written at {self.path})")

  def abort(self, keep_partial: bool | None = None) -> str | None:
    """Stops writing. Keeps the frames so far as `<stem>.partial.mp4` when asked (returns it)."""
    keep = self.keep_partial if keep_partial is None else keep_partial
    if self._gen is not None:
      try:
        n = self._finish_encoder()
      except VideoWriteError:
        n, keep = 0, False
      if keep and n > 0:
        stem = os.path.splitext(self.path)[0]
        self.partial_path = f"{stem}.partial.mp4"
        os.replace(self._tmp, self.partial_path)
        self._tmp = None
    self._remove_tmp()
    return self.partial_path

  def _remove_tmp(self) -> None:
    if self._gen is not None:
      try:
        self._gen.close()
      except Exception:  # pylint: disable=broad-except  (already failing; keep the first error)
        pass
      self._gen = None
    if self._tmp is not None and os.path.exists(self._tmp):
      os.remove(self._tmp)
    self._tmp = None

  def __enter__(self) -> "VideoWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 24) -> str:
  """Writes `[T, H, W, 3]` uint8 frames as an H.264 mp4 (atomically); returns the path.

  Raises:
    VideoWriteError: the path is not writable, or the encoder failed (e.g. disk full); no
      file is left at `path` or beside it.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
  with VideoWriter(path, fps=fps) as writer:
    writer.write(frames)
  return writer.path
