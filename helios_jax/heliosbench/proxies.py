"""Model-free PROXY metrics (not HeliosBench metrics): colour-histogram drift, SSIM consistency.

These stand in where the learned metrics' weights are unavailable (spec benchmark.md §1.6). They
are never rated nor included in the HeliosBench totals; every result key starts with `proxy_`.

* `proxy_color_drift`: total-variation distance between the luma, saturation and per-channel RGB
  histograms of the first and last 15% of the frames (0 = same distribution, 1 = disjoint); it
  exposes slow colour casts such as the yellow tint of Helios issue #146.
* `proxy_temporal_ssim`: mean SSIM (Wang et al. 2004, Gaussian 11x11 window, sigma 1.5, on the
  luma plane) between consecutive frames; `proxy_drifting_temporal_ssim` is |start - end| of it
  over the first/last 15%.
"""

from __future__ import annotations

import numpy as np

from helios_jax.heliosbench import drift as drift_lib
from helios_jax.constants import CHUNK_FRAMES

HIST_BINS = 32
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def _hist(values: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
  return np.bincount(((values.astype(np.int32) * bins) >> 8).ravel(),
                     minlength=bins).astype(np.float64)


def frame_histograms(frame: np.ndarray, bins: int = HIST_BINS) -> dict[str, np.ndarray]:
  """Unnormalised histograms of one # [H, W, 3] uint8 RGB frame.

  Returns:
    {"luma", "saturation", "red", "green", "blue"} -> # [bins] float64 pixel counts; luma is
    OpenCV's BT.601 gray, saturation the HSV S channel.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
  sat = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)[..., 1]
  return {"luma": _hist(gray, bins), "saturation": _hist(sat, bins),
          "red": _hist(frame[..., 0], bins), "green": _hist(frame[..., 1], bins),
          "blue": _hist(frame[..., 2], bins)}


def tv_distance(h0: np.ndarray, h1: np.ndarray) -> float:
  """Total-variation distance 0.5 * sum|p - q| of two histograms (normalised here)."""
  p, q = h0 / max(h0.sum(), 1e-12), h1 / max(h1.sum(), 1e-12)
  return float(0.5 * np.abs(p - q).sum())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
  """Mean SSIM of two # [H, W] uint8 images (Gaussian 11x11, sigma 1.5, data range 255)."""
  import cv2  # pylint: disable=g-import-not-at-top
  if a.shape != b.shape:
    raise ValueError(f"SSIM needs equal sizes, got {a.shape} and {b.shape}")
  x, y = a.astype(np.float64), b.astype(np.float64)
  blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)
  mx, my = blur(x), blur(y)
  sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  num = (2 * mx * my + _C1) * (2 * sxy + _C2)
  den = (mx * mx + my * my + _C1) * (sxx + syy + _C2)
  return float(np.mean(num / den))


class ColorStats:
  """Streaming per-frame colour histograms and means of one video."""

  CHANNELS = ("luma", "saturation", "red", "green", "blue")

  def __init__(self, bins: int = HIST_BINS):
    self.bins = bins
    self.hists: list[dict[str, np.ndarray]] = []

  @property
  def num_frames(self) -> int:
    return len(self.hists)

  def update(self, frame: np.ndarray) -> None:
    """Adds the next # [H, W, 3] uint8 RGB frame."""
    self.hists.append(frame_histograms(frame, self.bins))

  def window_hist(self, start: int, stop: int) -> dict[str, np.ndarray]:
    return {c: np.sum([h[c] for h in self.hists[start:stop]], axis=0) for c in self.CHANNELS}

  def window_means(self, start: int, stop: int) -> dict[str, float]:
    """Mean value (0-255 scale, from bin centres) of every channel in [start, stop)."""
    centres = (np.arange(self.bins) + 0.5) * (256 / self.bins)
    out = {}
    for c, h in self.window_hist(start, stop).items():
      out[c] = float((h * centres).sum() / max(h.sum(), 1e-12))
    return out

  def drift(self) -> dict[str, float]:
    """Histogram distances and means of the first/last 15% windows.

    Returns:
      {"drift_proxy_color_score": mean TV distance over the five channels, per-channel
      "<channel>_hist_distance", "start_mean_<channel>", "end_mean_<channel>"}.
    """
    if not self.hists:
      raise ValueError("no frames")
    (s0, e0), (s1, e1) = drift_lib.drift_windows(self.num_frames)
    h0, h1 = self.window_hist(s0, e0), self.window_hist(s1, e1)
    dists = {c: tv_distance(h0[c], h1[c]) for c in self.CHANNELS}
    m0, m1 = self.window_means(s0, e0), self.window_means(s1, e1)
    out = {"drift_proxy_color_score": float(np.mean(list(dists.values())))}
    out.update({f"{c}_hist_distance": d for c, d in dists.items()})
    out.update({f"start_mean_{c}": m0[c] for c in self.CHANNELS})
    out.update({f"end_mean_{c}": m1[c] for c in self.CHANNELS})
    return out

  def chunk_curves(self, chunk: int = CHUNK_FRAMES) -> dict[str, list[float]]:
    """Per-chunk mean luma and saturation (0-255)."""
    bounds = drift_lib.chunk_bounds(self.num_frames, chunk)
    means = [self.window_means(s, e) for s, e in bounds]
    return {"proxy_luma_mean": [m["luma"] for m in means],
            "proxy_saturation_mean": [m["saturation"] for m in means]}


class TemporalSSIM:
  """Streaming SSIM between consecutive frames of one video."""

  def __init__(self):
    self._prev = None
    self.values: list[float] = []
    self.num_frames = 0

  def update(self, frame: np.ndarray) -> None:
    """Adds the next # [H, W, 3] uint8 RGB frame."""
    import cv2  # pylint: disable=g-import-not-at-top
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    if self._prev is not None:
      self.values.append(ssim(self._prev, gray))
    self._prev = gray
    self.num_frames += 1

  def window_score(self, start: int, stop: int) -> float:
    """Mean SSIM of the consecutive pairs inside frames [start, stop) (1.0 with no pair)."""
    vals = self.values[start:max(stop - 1, start)]
    return float(np.mean(vals)) if vals else 1.0

  def score(self) -> float:
    if self.num_frames < 2:
      raise ValueError(f"temporal SSIM needs >= 2 frames, got {self.num_frames}")
    return self.window_score(0, self.num_frames)

  def drift(self) -> tuple[float, float, float]:
    return drift_lib.window_drift(self.window_score, self.num_frames, minimum=2)

  def chunk_curve(self, chunk: int = CHUNK_FRAMES) -> list[float]:
    return [self.window_score(s, e) for s, e in drift_lib.chunk_bounds(self.num_frames, chunk)]
