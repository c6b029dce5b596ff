"""Video decoding for HeliosBench: a bit-exact video-reader-rs 0.4.1 emulation and OpenCV paths.

Upstream decodes with two libraries (spec benchmark.md §1.2):

* video-reader-rs 0.4.1 (Aesthetic, Motion Amplitude, Semantic and their drift variants): an
  FFmpeg filter graph `format=yuv420p,scale=w=W:h=H:flags=fast_bilinear` followed by the Rust
  `yuv` crate's (0.8.9) fixed-point YUV420 -> RGB conversion. `iter_frames` reproduces it with
  the FFmpeg binary of `imageio-ffmpeg` (same filter graph, YUV420P output) and a NumPy port of
  the crate's SIMD arithmetic (10-bit widening, `mulhrs` products, nearest chroma); on the toy
  clips the RGB frames are identical byte for byte to video-reader-rs 0.4.1.
* OpenCV `VideoCapture` (Motion Smoothness, Naturalness): `iter_frames_cv2` / `read_frames_cv2_at`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Iterator, Sequence

import numpy as np

# Default evaluation size of HeliosBench (upstream `--height 384 --width 640`).
TARGET_HEIGHT = 384
TARGET_WIDTH = 640


class VideoReadError(RuntimeError):
  """A video cannot be opened or decoded, or has no frames; the message names the file."""


def align_dimension(value: float, alignment: int = 2) -> int:
  """Upstream `align_dimension`: Python round-half-to-even of `value / alignment`."""
  return int(round(value / alignment) * alignment)


def target_size(width: int, height: int, target_height: int = TARGET_HEIGHT,
                target_width: int = TARGET_WIDTH) -> tuple[int, int]:
  """Upstream aspect-preserving evaluation size (`utils.load_video`).

  Args:
    width: source width in pixels.
    height: source height in pixels.
    target_height: requested height (only the orientation of the request matters).
    target_width: requested width.

  Returns:
    (height, width), both even: width = target_width when target_width > target_height (the
    default), height = int(target_width * H / W) rounded to even; 832x480 -> (368, 640).
  """
  if width <= 0 or height <= 0:
    raise ValueError(f"source size {width}x{height} must be positive")
  aspect = width / height
  if target_width > target_height:
    w, h = target_width, int(target_width / aspect)
  else:
    h, w = target_height, int(target_height * aspect)
  return align_dimension(h, 2), align_dimension(w, 2)


# ------------------------------------------------------------------------------------------
# The `yuv` crate's YUV420 -> RGB24 (AVX2/SSE4.1 path, 13-bit coefficients, 8-bit depth).

# (y_coef, cr_coef, cb_coef, g_coeff_1, g_coeff_2) from yuv 0.8.9 `built_coefficients.rs`.
_INVERSE_COEFFS = {
    ("bt601", "limited"): (9539, 13075, 16525, 6660, 3209),
    ("bt601", "full"): (8192, 11485, 14516, 5850, 2819),
    ("bt709", "limited"): (9539, 14686, 17305, 4366, 1747),
    ("bt709", "full"): (8192, 12901, 15201, 3835, 1535),
    ("bt2020", "limited"): (9539, 13752, 17545, 5328, 1535),
    ("bt2020", "full"): (8192, 12080, 15412, 4681, 1348),
}


def _mulhrs(a: np.ndarray, c: int) -> np.ndarray:
  """x86 `pmulhrsw`: (a * c + 2^14) >> 15 on int32."""
  return (a * np.int32(c) + np.int32(16384)) >> 15


def yuv420_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, color_space: str = "bt601",
                  color_range: str = "limited") -> np.ndarray:
  """Converts YUV420P planes to RGB24 exactly like the `yuv` crate 0.8.9 used by video-reader-rs.

  Args:
    y: # [..., H, W] uint8 luma (H, W even).
    u: # [..., H/2, W/2] uint8 Cb.
    v: # [..., H/2, W/2] uint8 Cr.
    color_space: "bt601", "bt709" or "bt2020".
    color_range: "limited" (tv) or "full" (pc).

  Returns:
    # [..., H, W, 3] uint8 RGB.
  """
  key = (color_space, color_range)
  if key not in _INVERSE_COEFFS:
    raise ValueError(f"unsupported colour space/range {key}; known {sorted(_INVERSE_COEFFS)}")
  yc, crc, cbc, g1, g2 = _INVERSE_COEFFS[key]
  bias_y = 16 if color_range == "limited" else 0
  yi = y.astype(np.int32)
  # Saturating subtract of the luma bias, then 8 -> 10 bit widening ((v * 257) >> 6).
  y10 = (np.maximum(yi - bias_y, 0) * 257) >> 6
  uv_bias = (128 << 2) | (128 >> 6)
  u10 = ((u.astype(np.int32) * 257) >> 6) - uv_bias
  v10 = ((v.astype(np.int32) * 257) >> 6) - uv_bias
  u10 = np.repeat(np.repeat(u10, 2, axis=-1), 2, axis=-2)
  v10 = np.repeat(np.repeat(v10, 2, axis=-1), 2, axis=-2)
  luma = _mulhrs(y10, yc)
  r = luma + _mulhrs(v10, crc)
  b = luma + _mulhrs(u10, cbc)
  g = luma - (_mulhrs(v10, g1) + _mulhrs(u10, g2))
  return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# FFmpeg (imageio-ffmpeg) decoding.


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """Container facts about one video.

  Attributes:
    path: the file.
    width: coded width in pixels (after FFmpeg's display rotation).
    height: coded height in pixels.
    fps: frames per second reported by the container.
    pix_fmt: FFmpeg's pixel-format description, e.g. "yuv420p(tv, bt709, progressive)".
    color_space: the stream's matrix tag ("bt709", "smpte170m", ... or "" when untagged).
    color_range: "tv", "pc" or "" when untagged.
  """

  path: str
  width: int
  height: int
  fps: float
  pix_fmt: str
  color_space: str
  color_range: str


def _quiet_imageio_ffmpeg():
  logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  return imageio_ffmpeg


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise VideoReadError(f"{path}: video file not found")
  if os.path.getsize(path) == 0:
    raise VideoReadError(f"{path}: empty file (0 bytes)")


def _ffmpeg_error(path: str, e: BaseException) -> VideoReadError:
  text = str(e).strip().splitlines()
  detail = next((ln for ln in reversed(text) if ln.strip() and not ln.startswith("===")), "")
  return VideoReadError(f"{path}: cannot decode video ({detail or type(e).__name__})")


def _parse_color_tags(pix_fmt: str) -> tuple[str, str]:
  m = re.search(r"\(([^)]*)\)", pix_fmt)
  if not m:
    return "", ""
  tokens = [t.strip() for t in m.group(1).split(",")]
  crange = next((t for t in tokens if t in ("tv", "pc")), "")
  rest = [t for t in tokens if t not in ("tv", "pc", "progressive") and "first" not in t]
  cspace = rest[0].split("/")[0] if rest else ""
  return cspace, crange


def probe_video(path: str | os.PathLike) -> VideoInfo:
  """Reads a video's size, fps and colour tags with FFmpeg (no frame is decoded).

  Raises:
    VideoReadError: missing, empty or undecodable file (the message names it).
  """
  path = os.fspath(path)
  _check_file(path)
  iio = _quiet_imageio_ffmpeg()
  gen = iio.read_frames(path)
  try:
    meta = next(gen)
  except (OSError, RuntimeError, StopIteration, ValueError) as e:
    raise _ffmpeg_error(path, e) from None
  finally:
    gen.close()
  w, h = meta.get("source_size") or meta.get("size") or (0, 0)
  if not w or not h:
    raise VideoReadError(f"{path}: no video stream found")
  pix_fmt = str(meta.get("pix_fmt", ""))
  cspace, crange = _parse_color_tags(pix_fmt)
  return VideoInfo(path, int(w), int(h), float(meta.get("fps") or 0.0), pix_fmt, cspace, crange)


def vrr_color_params(info: VideoInfo, out_height: int) -> tuple[str, str]:
  """The matrix/range video-reader-rs 0.4.1 picks (`convert.rs:get_colorspace/get_colorrange`).

  Only an explicit `bt709` tag is honoured; every other tag (smpte170m, bt470bg, bt2020nc, ...)
  falls back to the output height: < 720 -> BT.601, > 1080 -> BT.2020, else BT.709. The range is
  full only for a `pc` (JPEG) tag.
  """
  if info.color_space == "bt709":
    space = "bt709"
  elif out_height < 720:
    space = "bt601"
  elif out_height > 1080:
    space = "bt2020"
  else:
    space = "bt709"
  return space, ("full" if info.color_range == "pc" else "limited")


def iter_frames(path: str | os.PathLike, size: tuple[int, int] | None = None, *,
                info: VideoInfo | None = None) -> Iterator[np.ndarray]:
  """Decodes RGB frames exactly like video-reader-rs 0.4.1 `PyVideoReader(...).decode()`.

  Args:
    path: video file.
    size: (height, width) output size, or None for `target_size` of the source (640 wide).
    info: a `probe_video` result to reuse.

  Yields:
    # [H, W, 3] uint8 RGB frames, one at a time (constant memory).

  Raises:
    VideoReadError: the file cannot be decoded (the message names it).
  """
  path = os.fspath(path)
  info = info or probe_video(path)
  h, w = size if size is not None else target_size(info.width, info.height)
  if h % 2 or w % 2 or h <= 0 or w <= 0:
    raise ValueError(f"output size {h}x{w} must be positive and even")
  space, crange = vrr_color_params(info, h)
  iio = _quiet_imageio_ffmpeg()
  gen = iio.read_frames(
      path, pix_fmt="yuv420p", bits_per_pixel=12,
      output_params=["-vf", f"format=yuv420p,scale=w={w}:h={h}:flags=fast_bilinear"])
  n_y, n_c = w * h, (w // 2) * (h // 2)
  try:
    try:
      next(gen)
    except (OSError, RuntimeError, StopIteration, ValueError) as e:
      raise _ffmpeg_error(path, e) from None
    while True:
      try:
        raw = next(gen)
      except StopIteration:
        return
      except (OSError, RuntimeError, ValueError) as e:
        raise _ffmpeg_error(path, e) from None
      buf = np.frombuffer(raw, np.uint8)
      yy = buf[:n_y].reshape(h, w)
      uu = buf[n_y:n_y + n_c].reshape(h // 2, w // 2)
      vv = buf[n_y + n_c:n_y + 2 * n_c].reshape(h // 2, w // 2)
      yield yuv420_to_rgb(yy, uu, vv, space, crange)
  finally:
    gen.close()


def read_frames(path: str | os.PathLike, size: tuple[int, int] | None = None,
                indices: Sequence[int] | None = None) -> np.ndarray:
  """All (or the selected) frames of `iter_frames` as one array.

  Args:
    path: video file.
    size: (height, width) or None for the upstream 640-wide size.
    indices: frame indices to keep (any order, repeats allowed), or None for all.

  Returns:
    # [T, H, W, 3] uint8 RGB.

  Raises:
    VideoReadError: undecodable video, no frames, or an index past the last frame.
  """
  path = os.fspath(path)
  if indices is None:
    frames = list(iter_frames(path, size))
    if not frames:
      raise VideoReadError(f"{path}: video has no decodable frames")
    return np.stack(frames)
  want = sorted(set(int(i) for i in indices))
  if want and want[0] < 0:
    raise ValueError(f"frame index {want[0]} must be >= 0")
  if not want:
    raise ValueError("indices must not be empty")
  want_set, kept, decoded = set(want), {}, 0
  for n, frame in enumerate(iter_frames(path, size)):
    decoded = n + 1
    if n in want_set:
      kept[n] = frame
    if n >= want[-1]:
      break
  missing = [i for i in want if i not in kept]
  if missing:
    raise VideoReadError(
        f"{path}: frame(s) {missing[:5]} requested but the video decodes to {decoded} frame(s)")
  return np.stack([kept[int(i)] for i in indices])


def count_frames(path: str | os.PathLike) -> int:
  """Number of video frames (FFmpeg stream copy, no decoding).

  Raises:
    VideoReadError: the file cannot be read.
  """
  path = os.fspath(path)
  _check_file(path)
  iio = _quiet_imageio_ffmpeg()
  try:
    n, _ = iio.count_frames_and_secs(path)
  except (OSError, RuntimeError, ValueError) as e:
    raise _ffmpeg_error(path, e) from None
  return int(n)


# ------------------------------------------------------------------------------------------
# OpenCV decoding (upstream Motion Smoothness / Naturalness).


def _open_cv2(path: str):
  import cv2  # pylint: disable=g-import-not-at-top
  _check_file(path)
  cap = cv2.VideoCapture(path)
  if not cap.isOpened():
    cap.release()
    raise VideoReadError(f"{path}: OpenCV cannot open the video")
  return cv2, cap


def iter_frames_cv2(path: str | os.PathLike, size: tuple[int, int] | None = None
                    ) -> Iterator[np.ndarray]:
  """Upstream `FrameProcess.get_frames`: OpenCV decode, BGR->RGB, `cv2.resize` (bilinear).

  Args:
    path: video file.
    size: (height, width) or None for `target_size` of `CAP_PROP_FRAME_WIDTH/HEIGHT`.

  Yields:
    # [H, W, 3] uint8 RGB frames.
  """
  path = os.fspath(path)
  cv2, cap = _open_cv2(path)
  try:
    if size is None:
      size = target_size(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                         int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    h, w = size
    while True:
      ok, frame = cap.read()
      if not ok:
        return
      frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
      yield cv2.resize(frame, (w, h))
  finally:
    cap.release()


def cv2_frame_count(path: str | os.PathLike) -> int:
  """OpenCV's `CAP_PROP_FRAME_COUNT` (what the Naturalness scripts use)."""
  path = os.fspath(path)
  cv2, cap = _open_cv2(path)
  try:
    return int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
  finally:
    cap.release()


def read_frames_cv2_at(path: str | os.PathLike, indices: Sequence[int]) -> list[np.ndarray]:
  """Seeks with `CAP_PROP_POS_FRAMES` and reads native-resolution BGR frames.

  Frames that fail to read are dropped, as upstream does.

  Returns:
    list of # [H, W, 3] uint8 BGR frames.
  """
  path = os.fspath(path)
  cv2, cap = _open_cv2(path)
  out = []
  try:
    for i in indices:
      cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
      ok, frame = cap.read()
      if ok:
        out.append(frame)
  finally:
    cap.release()
  return out
