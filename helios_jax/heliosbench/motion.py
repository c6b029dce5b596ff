"""Motion Amplitude (upstream `1_get_motion_amplitude.py`): OpenCV Farneback flow, no model."""

from __future__ import annotations

import numpy as np

from helios_jax.heliosbench import drift as drift_lib
from helios_jax.constants import CHUNK_FRAMES

# `cv2.calcOpticalFlowFarneback` arguments of the upstream script.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2,
                 flags=0)
DOWNSCALE_WIDTH = 16


def to_gray(frame: np.ndarray) -> np.ndarray:
  """`cv2.COLOR_RGB2GRAY` of # [H, W, 3] uint8 RGB -> # [H, W] uint8."""
  import cv2  # pylint: disable=g-import-not-at-top
  if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
    raise ValueError(f"frame must be [H, W, 3] uint8 RGB, got {frame.shape} {frame.dtype}")
  return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def farneback_flow(prev_gray: np.ndarray, gray: np.ndarray) -> np.ndarray:
  """Dense flow between two # [H, W] uint8 frames -> # [H, W, 2] float32 (dx, dy) in px."""
  import cv2  # pylint: disable=g-import-not-at-top
  return cv2.calcOpticalFlowFarneback(prev_gray, gray, None, **FARNEBACK)


def downscale_flow(flow: np.ndarray, width: int = DOWNSCALE_WIDTH) -> np.ndarray:
  """INTER_AREA resize of a # [H, W, 2] flow map to width 16, height int(H * 16 / W)."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = flow.shape[:2]
  return cv2.resize(flow, (width, int(h * (width / w))), interpolation=cv2.INTER_AREA)


def motion_score(maps: list[np.ndarray]) -> float:
  """Upstream `_motion_score`: mean over time, then over all elements (0.0 for no map)."""
  if not maps:
    return 0.0
  average_map = np.mean(np.array(maps), axis=0)
  return float(np.mean(average_map))


class MotionAmplitude:
  """Streaming Farneback motion amplitude of one video.

  Feed RGB frames in order with `update`; the downscaled flow map of every consecutive pair is
  kept (16 x int(16 H / W) x 2 floats), so any frame window can be scored afterwards.
  """

  def __init__(self):
    self._prev = None
    self.maps: list[np.ndarray] = []
    self.num_frames = 0

  def update(self, frame: np.ndarray) -> None:
    """Adds the next # [H, W, 3] uint8 RGB frame."""
    gray = to_gray(frame)
    if self._prev is not None:
      if gray.shape != self._prev.shape:
        raise ValueError(
            f"frame {self.num_frames} has size {gray.shape}, previous {self._prev.shape}")
      self.maps.append(downscale_flow(farneback_flow(self._prev, gray)))
    self._prev = gray
    self.num_frames += 1

  def window_score(self, start: int, stop: int) -> float:
    """|motion score| of the frames [start, stop) (pairs start..stop-1)."""
    return abs(motion_score(self.maps[start:max(stop - 1, start)]))

  def score(self) -> float:
    """The per-video `motion_fb` value: |mean flow| over the whole video (0.0 below 2 frames)."""
    return abs(motion_score(self.maps))

  def drift(self) -> tuple[float, float, float]:
    """(|start - end|, start, end) over the first/last 15% (at least 2 frames per window)."""
    return drift_lib.window_drift(self.window_score, self.num_frames, minimum=2)

  def chunk_curve(self, chunk: int = CHUNK_FRAMES) -> list[float]:
    """Motion amplitude of each `chunk`-frame chunk."""
    return [self.window_score(s, e) for s, e in drift_lib.chunk_bounds(self.num_frames, chunk)]
