"""Drift framework: first/last 15% windows, |start - end| scores, fixed-size chunks."""

from __future__ import annotations

from typing import Callable, Sequence

from helios_jax.constants import CHUNK_FRAMES

# Every upstream drift script uses `DRIFT_RATIO = 0.15`.
DRIFT_RATIO = 0.15
# Per-chunk curves use the granularity Helios generates at (33-frame chunks, CHUNK_FRAMES).


def drift_window_len(num_frames: int, minimum: int = 1, ratio: float = DRIFT_RATIO) -> int:
  """Window length `max(minimum, int(ratio * N))` (truncation, as upstream)."""
  if num_frames < 0:
    raise ValueError(f"num_frames={num_frames} must be >= 0")
  return max(minimum, int(num_frames * ratio))


def drift_windows(num_frames: int, minimum: int = 1, ratio: float = DRIFT_RATIO
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
  """[start, stop) frame ranges of the first and last `drift_window_len` frames.

  Python slicing semantics of upstream (`frames[:n]`, `frames[-n:]`): a window longer than the
  video is clipped to the whole video.

  Returns:
    ((0, min(n, N)), (max(N - n, 0), N)).
  """
  n = drift_window_len(num_frames, minimum, ratio)
  return (0, min(n, num_frames)), (max(num_frames - n, 0), num_frames)


def drift_entry(start: float, end: float) -> tuple[float, float, float]:
  """(|start - end|, start, end) as plain floats."""
  start, end = float(start), float(end)
  return abs(start - end), start, end


def window_drift(score_fn: Callable[[int, int], float], num_frames: int, minimum: int = 1,
                 ratio: float = DRIFT_RATIO) -> tuple[float, float, float]:
  """Applies `score_fn(start, stop)` to both drift windows.

  Args:
    score_fn: metric on the frames [start, stop).
    num_frames: decoded frame count N.
    minimum: the metric's minimum window length.
    ratio: window fraction.

  Returns:
    (drift, start score, end score).
  """
  (s0, e0), (s1, e1) = drift_windows(num_frames, minimum, ratio)
  return drift_entry(score_fn(s0, e0), score_fn(s1, e1))


def chunk_bounds(num_frames: int, chunk: int = CHUNK_FRAMES) -> list[tuple[int, int]]:
  """Consecutive [start, stop) ranges of `chunk` frames (the last one may be shorter)."""
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1")
  return [(s, min(s + chunk, num_frames)) for s in range(0, num_frames, chunk)]


def mean(values: Sequence[float]) -> float:
  """Arithmetic mean as upstream computes averages (`sum(x) / len(x)`)."""
  if not values:
    raise ValueError("mean of an empty sequence")
  return sum(values) / len(values)
