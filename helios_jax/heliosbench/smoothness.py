"""Motion Smoothness (upstream `2_get_motion_smoothness.py` / `6_get_drifting_...`).

Procedure (exactly upstream's): OpenCV-decoded RGB frames at the 640-wide size; frames 0, 2, 4,
... are interpolation inputs; the interpolator predicts the midpoint of each consecutive pair;
predictions back to uint8 by x255, clip, truncation; each prediction is compared with the real
frame 1, 3, 5, ... by the mean absolute difference over pixels and channels; the score is
(255 - mean diff) / 255. The drift variant scores the first/last max(4, int(0.15 N)) frames
separately (a window with < 4 frames scores 0.0).

The interpolator is pluggable: `AmtInterpolator` runs upstream's PyTorch AMT-S network from a
user-provided copy of Helios' `eval/` folder and the `amt-s.pth` checkpoint; `BlendInterpolator`
(the average of the two inputs) is the model-free PROXY `proxy_blend_smoothness`.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Protocol, Sequence

import numpy as np

from helios_jax.heliosbench import drift as drift_lib

DEFAULT_AMT_NETWORK = {"name": "utils.third_party.amt.networks.AMT-S.Model",
                       "params": {"corr_radius": 3, "corr_lvls": 4, "num_flows": 3}}


class Interpolator(Protocol):

  def __call__(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    """Midpoint of two # [H, W, 3] uint8 RGB frames -> # [H, W, 3] uint8."""


def to_uint8(x01: np.ndarray) -> np.ndarray:
  """Upstream `tensor2img`: (x * 255).clip(0, 255).astype(uint8) (truncation)."""
  return (x01 * np.float32(255.0)).clip(0, 255).astype(np.uint8)


class BlendInterpolator:
  """PROXY interpolator: (frame0 + frame1) / 2 in [0, 1] floats, upstream uint8 conversion."""

  def __call__(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    a = frame0.astype(np.float32) / np.float32(255.0)
    b = frame1.astype(np.float32) / np.float32(255.0)
    return to_uint8((a + b) / np.float32(2.0))


def frame_diff(a: np.ndarray, b: np.ndarray) -> float:
  """Upstream `get_diff`: mean of `cv2.absdiff` over all pixels and channels."""
  return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.uint8)))


def smoothness_of_frames(frames: Sequence[np.ndarray], interpolate: Interpolator, *,
                         window: bool = False) -> float:
  """Upstream `motion_score` (window=False) / `compute_motion_score_on_frames` (window=True).

  Args:
    frames: # [H, W, 3] uint8 RGB frames in order.
    interpolate: midpoint predictor.
    window: drift-window semantics (fewer than 4 frames -> 0.0; no pair -> 1.0) instead of the
      full-video ones (fewer than 2 inputs raises).

  Returns:
    (255 - mean diff) / 255.
  """
  if window and len(frames) < 4:
    return 0.0
  kept = list(frames[0::2])
  if len(kept) < 2:
    if window:
      return 0.0
    raise ValueError(f"Need more than one frame (current {len(kept)})")
  refs = list(frames[1::2])
  n = min(len(refs), len(kept) - 1)
  diffs = [frame_diff(refs[i], interpolate(kept[i], kept[i + 1])) for i in range(n)]
  vfi = float(np.mean(np.array(diffs))) if diffs else 0.0
  return (255.0 - vfi) / 255.0


class SmoothnessAccumulator:
  """Streams one video's frames; keeps only what the full score and both windows need.

  Args:
    interpolate: midpoint predictor.
    expected_frames: frame count announced by the container (sizes the end-window buffer; the
      actual count is re-checked at the end).
  """

  def __init__(self, interpolate: Interpolator, expected_frames: int):
    self.interpolate = interpolate
    self.expected = int(expected_frames)
    self._win = drift_lib.drift_window_len(self.expected, minimum=4)
    self._first: list[np.ndarray] = []
    self._last: list[np.ndarray] = []
    self._prev_even = None
    self._prev_odd = None
    self._diffs: list[float] = []
    self.num_frames = 0

  def update(self, frame: np.ndarray) -> None:
    i = self.num_frames
    if i % 2 == 0:
      if self._prev_even is not None and self._prev_odd is not None:
        self._diffs.append(frame_diff(self._prev_odd, self.interpolate(self._prev_even, frame)))
      self._prev_even = frame
    else:
      self._prev_odd = frame
    if len(self._first) < self._win:
      self._first.append(frame)
    self._last.append(frame)
    if len(self._last) > self._win:
      self._last.pop(0)
    self.num_frames += 1

  def score(self) -> float:
    kept = (self.num_frames + 1) // 2
    if kept < 2:
      raise ValueError(f"Need more than one frame (current {kept})")
    return (255.0 - float(np.mean(np.array(self._diffs)))) / 255.0

  def drift(self) -> tuple[float, float, float]:
    n = drift_lib.drift_window_len(self.num_frames, minimum=4)
    if n > self._win:
      raise ValueError(f"video decoded {self.num_frames} frames but the container announced "
                       f"{self.expected}; drift window {n} exceeds the buffered {self._win}")
    start = smoothness_of_frames(self._first[:n], self.interpolate, window=True)
    end = smoothness_of_frames(self._last[len(self._last) - min(n, len(self._last)):],
                               self.interpolate, window=True)
    return drift_lib.drift_entry(start, end)


class AmtInterpolator:
  """Upstream AMT-S (PyTorch) from a local copy of Helios' `eval/` code and its checkpoint.

  Args:
    upstream_eval_dir: folder of Helios' `eval/` (holds `utils/third_party/amt`).
    checkpoint: `amt-s.pth` (a dict with `state_dict`).
    config: optional AMT YAML (`network: {name, params}`); defaults to AMT-S with
      corr_radius 3, corr_lvls 4, num_flows 3.
    device: torch device string (default: cuda if available, else cpu).
  """

  def __init__(self, upstream_eval_dir: str, checkpoint: str, config: str | None = None,
               device: str | None = None):
    import torch  # pylint: disable=g-import-not-at-top
    for p in (upstream_eval_dir, checkpoint):
      if not os.path.exists(p):
        raise FileNotFoundError(f"AMT path not found: {p}")
    network = dict(DEFAULT_AMT_NETWORK)
    if config:
      import yaml  # pylint: disable=g-import-not-at-top
      with open(config) as f:
        network = yaml.safe_load(f)["network"]
    module_name, cls_name = network["name"].rsplit(".", 1)
    amt_dir = os.path.join(upstream_eval_dir, "utils", "third_party", "amt")
    for p in (amt_dir, upstream_eval_dir):
      if p not in sys.path:
        sys.path.insert(0, p)
    model = getattr(importlib.import_module(module_name), cls_name)(**network.get("params", {}))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"] if "state_dict" in state else state)
    self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    self.model = model.to(self.device).eval()
    self.embt = torch.tensor(0.5).float().view(1, 1, 1, 1).to(self.device)
    self._torch = torch

  def __call__(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    torch = self._torch
    fn = torch.nn.functional

    def to_t(img):
      return (torch.tensor(img).permute(2, 0, 1).unsqueeze(0) / 255.0).to(self.device)

    h, w = frame0.shape[:2]
    pad_h, pad_w = (-h) % 16, (-w) % 16
    pad = [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]
    a, b = to_t(frame0), to_t(frame1)
    if any(pad):
      a, b = fn.pad(a, pad, mode="replicate"), fn.pad(b, pad, mode="replicate")
    with torch.no_grad():
      pred = self.model(a, b, self.embt, scale_factor=1.0, eval=True)["imgt_pred"]
    pred = pred[..., pad[2]:pred.shape[-2] - pad[3], pad[0]:pred.shape[-1] - pad[1]]
    return (pred * 255.0).detach().squeeze(0).permute(1, 2, 0).cpu().numpy().clip(
        0, 255).astype(np.uint8)


InterpolatorFactory = Callable[[], Interpolator]
