"""Captioned clips in the upstream metadata format and their pixel preprocessing (spec §3.1).

A metadata file is a JSON list of clips with the fields
  cut [start, end), crop [x0, x1, y0, y1], fps, num_frames, resolution {height, width},
  cap (list of captions; the first is used), path (relative to the metadata file's folder),
as in `data/toy_data/toy_filter.json`. Reading a clip (as the upstream loader does): take a
random start inside the cut, read `bucket` consecutive frames (the largest length bucket not
above the clip length; no fps resampling), apply the crop, centre-crop to the target aspect,
resize to the training resolution, scale to [-1, 1]. Sections are the non-overlapping 33-frame
pieces of that window (a 121-frame bucket gives 3 sections, 501 gives 15).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from helios_jax.constants import CHUNK_FRAMES

# Length buckets 21, 41, ..., 501 (spec §3.1 "21 ... 501, mostly steps of 20"; the exact
# upstream list is not in the spec, inferred as a stride-20 list).
LENGTH_BUCKETS = tuple(range(21, 502, 20))
MIN_FRAMES = 121      # Stage 1/2 loaders drop shorter clips
REQUIRED_FIELDS = ("cut", "crop", "fps", "num_frames", "resolution", "cap", "path")


class DataError(ValueError):
  """Malformed metadata, unreadable clip, or a clip that cannot give a training sample."""


@dataclasses.dataclass(frozen=True)
class Clip:
  """One metadata entry (paths resolved).

  Attributes:
    uttid: clip id (file name without extension).
    path: absolute video path.
    cut: (start, end) frame range inside the video.
    crop: (x0, x1, y0, y1) pixel crop of the source frames.
    fps: source frame rate (kept for reference; no resampling).
    num_frames: frames inside the cut.
    height, width: source resolution.
    caption: the first caption.
  """

  uttid: str
  path: str
  cut: tuple[int, int]
  crop: tuple[int, int, int, int]
  fps: float
  num_frames: int
  height: int
  width: int
  caption: str


def _entry_clip(entry: Any, i: int, root: str, source: str) -> Clip:
  if not isinstance(entry, dict):
    raise DataError(f"{source}: entry {i} is a {type(entry).__name__}, expected an object")
  missing = [f for f in REQUIRED_FIELDS if f not in entry]
  if missing:
    raise DataError(f"{source}: entry {i} misses field(s) {missing}")
  try:
    cut = tuple(int(v) for v in entry["cut"])
    crop = tuple(int(v) for v in entry["crop"])
    res = entry["resolution"]
    height, width = int(res["height"]), int(res["width"])
    caps = entry["cap"]
    caption = caps[0] if isinstance(caps, (list, tuple)) else caps
  except (TypeError, ValueError, KeyError, IndexError) as e:
    raise DataError(f"{source}: entry {i} has malformed fields ({e})") from e
  if len(cut) != 2 or not 0 <= cut[0] < cut[1]:
    raise DataError(f"{source}: entry {i} cut={list(cut)} must be [start, end) with start < end")
  if len(crop) != 4 or not (0 <= crop[0] < crop[1] and 0 <= crop[2] < crop[3]):
    raise DataError(f"{source}: entry {i} crop={list(crop)} must be [x0, x1, y0, y1] with "
                    "x0 < x1 and y0 < y1")
  if not isinstance(caption, str) or not caption:
    raise DataError(f"{source}: entry {i} has an empty caption")
  path = str(entry["path"])
  path = path if os.path.isabs(path) else os.path.join(root, path)
  return Clip(uttid=os.path.splitext(os.path.basename(path))[0], path=path, cut=cut, crop=crop,
              fps=float(entry["fps"]), num_frames=int(entry["num_frames"]), height=height,
              width=width, caption=caption)


def load_metadata(path: str | os.PathLike) -> list[Clip]:
  """Parses and validates a metadata JSON file.

  Args:
    path: the JSON file (a list of clip entries).

  Returns:
    The clips in file order.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"metadata file not found: {path}")
  try:
    with open(path) as f:
      entries = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(entries, list):
    raise DataError(f"{path}: expected a JSON list of clips, got {type(entries).__name__}")
  root = os.path.dirname(os.path.abspath(path))
  return [_entry_clip(e, i, root, path) for i, e in enumerate(entries)]


def length_bucket(num_frames: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int | None:
  """The largest bucket <= num_frames (None if the clip is shorter than every bucket)."""
  fitting = [b for b in buckets if b <= num_frames]
  return max(fitting) if fitting else None


def num_sections(bucket_frames: int) -> int:
  """Non-overlapping 33-frame sections of a window (121 -> 3, 501 -> 15)."""
  return int(bucket_frames) // CHUNK_FRAMES


def select_clips(clips: Sequence[Clip], min_frames: int = MIN_FRAMES) -> list[Clip]:
  """Clips long enough for training (>= min_frames and at least one section)."""
  if min_frames < CHUNK_FRAMES:
    raise DataError(f"min_frames={min_frames} is shorter than one section ({CHUNK_FRAMES} "
                    "frames); such clips cannot give a training sample")
  out = []
  for c in clips:
    bucket = length_bucket(c.num_frames)
    if c.num_frames >= min_frames and bucket is not None and num_sections(bucket) >= 1:
      out.append(c)
  return out


def read_frames(path: str, start: int, count: int) -> np.ndarray:
  """Frames [start, start + count) of a video as `[count, H, W, 3]` uint8."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise DataError(f"video not found: {path}")
  frames = []
  try:
    for i, frame in enumerate(iio.imiter(path, plugin="FFMPEG")):
      if i >= start + count:
        break
      if i >= start:
        frames.append(np.asarray(frame)[..., :3])
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"unreadable video {path}: {e}") from e
  if len(frames) < count:
    raise DataError(f"video {path} has only {start + len(frames)} frames; frames "
                    f"[{start}, {start + count}) were requested")
  return np.stack(frames)


def center_crop_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """Centre-crop `[T, h, w, 3]` uint8 to the target aspect, resize, scale to [-1, 1].

  Returns:
    `[3, T, height, width]` float32 (channel-first, the VAE's layout).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, h, w, _ = frames.shape
  target = width / height
  if w / h > target:  # too wide: crop width
    cw, ch = int(round(h * target)), h
  else:
    cw, ch = w, int(round(w / target))
  x0, y0 = (w - cw) // 2, (h - ch) // 2
  out = []
  for f in frames:
    img = Image.fromarray(f[y0:y0 + ch, x0:x0 + cw])
    if img.size != (width, height):
      img = img.resize((width, height), Image.BILINEAR)
    out.append(np.asarray(img, np.float32) / np.float32(127.5) - np.float32(1.0))
  return np.transpose(np.stack(out), (3, 0, 1, 2))


def clip_sections(clip: Clip, height: int, width: int, rng: np.random.Generator,
                  max_sections: int | None = None) -> np.ndarray:
  """Reads a clip's training window and splits it into 33-frame sections.

  Args:
    clip: the metadata entry.
    height, width: training resolution (pixels).
    rng: draws the start frame inside the cut.
    max_sections: optional cap on the number of sections.

  Returns:
    `[N, 3, 33, height, width]` float32 in [-1, 1].
  """
  bucket = length_bucket(clip.num_frames)
  n = 0 if bucket is None else num_sections(bucket)
  if n < 1:
    raise DataError(f"clip {clip.uttid} ({clip.path}) has {clip.num_frames} frames, shorter than "
                    f"one {CHUNK_FRAMES}-frame section")
  if max_sections is not None:
    n = min(n, int(max_sections))
  length = n * CHUNK_FRAMES
  lo, hi = clip.cut[0], clip.cut[1] - bucket
  if hi < lo:
    raise DataError(f"clip {clip.uttid}: cut {list(clip.cut)} is shorter than its bucket {bucket}")
  start = int(rng.integers(lo, hi + 1))
  frames = read_frames(clip.path, start, length)
  x0, x1, y0, y1 = clip.crop
  frames = frames[:, y0:y1, x0:x1]
  if frames.shape[1] == 0 or frames.shape[2] == 0:
    raise DataError(f"clip {clip.uttid}: crop {list(clip.crop)} is empty for frames of size "
                    f"{frames.shape[1:3]}")
  video = center_crop_resize(frames, height, width)  # [3, T, H, W]
  video = video.reshape(3, n, CHUNK_FRAMES, height, width)
  return np.ascontiguousarray(np.transpose(video, (1, 0, 2, 3, 4)))
