"""Semantic metric (upstream `3_get_semantic.py` / `7_get_drifting_semantic.py`).

Frame selection and preprocessing are reproduced here; the video/text encoder is upstream's
PyTorch ViCLIP-L/14 (InternVid-10M-FLT), loaded from a user-provided copy of Helios' `eval/`
folder (`utils/third_party/ViCLIP`) and a weights folder holding `ViClip-InternVid-10M-FLT.pth`
and `bpe_simple_vocab_16e6.txt.gz`. The score is the cosine similarity of the L2-normalised
video embedding (8 frames) and the prompt embedding (ViCLIP truncates prompts to 32 tokens).
"""

from __future__ import annotations

import importlib
import os
import sys

import jax.numpy as jnp
import numpy as np

from helios_jax.heliosbench import drift as drift_lib
from helios_jax.heliosbench import preprocess

NUM_FRAMES = 8
VICLIP_WEIGHTS = "ViClip-InternVid-10M-FLT.pth"
VICLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"


def middle_frame_indices(vlen: int, num_frames: int = NUM_FRAMES) -> list[int]:
  """Upstream `get_frame_indices(sample="middle")`: middle of each of `num_frames` intervals.

  N = 81 -> [4, 14, 24, 34, 44, 54, 64, 75]; shorter videos are padded with the last index.
  """
  if vlen < 1:
    raise ValueError(f"vlen={vlen} must be >= 1")
  acc = min(num_frames, vlen)
  intervals = np.linspace(start=0, stop=vlen, num=acc + 1).astype(int)
  ranges = [(int(intervals[i]), int(intervals[i + 1]) - 1) for i in range(acc)]
  idx = [(a + b) // 2 for a, b in ranges]
  if len(idx) < num_frames:
    idx = idx + [idx[-1]] * (num_frames - len(idx))
  return idx


def window_frame_indices(total: int, start_ratio: float, end_ratio: float,
                         num_frames: int = NUM_FRAMES) -> list[int]:
  """Upstream `load_video_frames` frame choice for a [start_ratio, end_ratio) portion.

  N = 81, (0, 0.15) -> [0, 1, 3, 4, 6, 7, 9, 10]; (0.85, 1) -> [68, 69, 71, 72, 74, 76, 77, 79].
  """
  if total < 1:
    raise ValueError(f"total={total} must be >= 1")
  start, end = int(total * start_ratio), int(total * end_ratio)
  length = end - start
  if length < num_frames:
    expansion = (num_frames - length) / 2
    new_start = max(0, start - int(np.ceil(expansion)))
    new_end = min(total, end + int(np.floor(expansion)))
    if new_end - new_start < num_frames:
      if new_start == 0:
        new_end = min(total, new_start + num_frames)
      elif new_end == total:
        new_start = max(0, new_end - num_frames)
    start, end = new_start, new_end
    idx = [int(i) for i in np.linspace(start, end - 1, num_frames, dtype=int)]
  else:
    step = length / num_frames
    idx = [int(start + i * step) for i in range(num_frames)]
  return [min(i, total - 1) for i in idx]


def drift_frame_indices(total: int, num_frames: int = NUM_FRAMES) -> tuple[list[int], list[int]]:
  """(start-window, end-window) indices of the drift variant (windows 0-15% and 85-100%)."""
  r = drift_lib.DRIFT_RATIO
  return (window_frame_indices(total, 0.0, r, num_frames),
          window_frame_indices(total, 1.0 - r, 1.0, num_frames))


def viclip_pixels(frames: np.ndarray) -> np.ndarray:
  """Upstream semantic preprocessing of 8 uint8 frames (resize on uint8, so rounded).

  Args:
    frames: # [T, H, W, 3] uint8 RGB.

  Returns:
    # [T, 3, 224, 224] float32 (channels first, as ViCLIP takes them).
  """
  x = preprocess.clip_preprocess(jnp.asarray(frames), size=224, round_to_uint8=True)
  return np.array(x).transpose(0, 3, 1, 2).copy()


class ViClipScorer:
  """Upstream ViCLIP (PyTorch) video-text similarity.

  Args:
    upstream_eval_dir: folder of Helios' `eval/` (holds `utils/third_party/ViCLIP`).
    weights_dir: folder with `ViClip-InternVid-10M-FLT.pth` and `bpe_simple_vocab_16e6.txt.gz`.
    device: torch device string (default: cuda if available, else cpu).
  """

  def __init__(self, upstream_eval_dir: str, weights_dir: str, device: str | None = None):
    import torch  # pylint: disable=g-import-not-at-top
    for p in (upstream_eval_dir, os.path.join(weights_dir, VICLIP_WEIGHTS),
              os.path.join(weights_dir, VICLIP_VOCAB)):
      if not os.path.exists(p):
        raise FileNotFoundError(f"ViCLIP path not found: {p}")
    if upstream_eval_dir not in sys.path:
      sys.path.insert(0, upstream_eval_dir)
    tok_mod = importlib.import_module("utils.third_party.ViCLIP.simple_tokenizer")
    vic_mod = importlib.import_module("utils.third_party.ViCLIP.viclip")
    tokenizer = tok_mod.SimpleTokenizer(os.path.join(weights_dir, VICLIP_VOCAB))
    self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    self.model = vic_mod.ViCLIP(tokenizer=tokenizer,
                                pretrain=os.path.join(weights_dir, VICLIP_WEIGHTS))
    self.model = self.model.to(self.device).eval()
    self._text_cache: dict[str, object] = {}
    self._torch = torch

  def _text(self, prompt: str):
    if prompt not in self._text_cache:
      with self._torch.no_grad():
        t = self.model.encode_text(prompt).float()
        self._text_cache[prompt] = t / t.norm(dim=-1, keepdim=True)
    return self._text_cache[prompt]

  def similarity(self, frames: np.ndarray, prompt: str) -> float:
    """Cosine similarity of 8 # [8, H, W, 3] uint8 frames and the prompt."""
    torch = self._torch
    pixels = torch.from_numpy(viclip_pixels(frames)).unsqueeze(0).to(self.device)
    with torch.no_grad():
      v = self.model.encode_vision(pixels, test=True).float()
      v = v / v.norm(dim=-1, keepdim=True)
      return float((v @ self._text(prompt).T)[0][0].cpu())


class SemanticAccumulator:
  """Keeps the (at most 24) frames the full and drift scores need while a video streams by."""

  def __init__(self, scorer, prompt: str, expected_frames: int):
    self.scorer = scorer
    self.prompt = prompt
    self._frames: dict[int, np.ndarray] = {}
    self._plan(int(expected_frames))
    self.num_frames = 0

  def _plan(self, total: int) -> None:
    self.total = total
    start, end = drift_frame_indices(total)
    self.wanted = set(middle_frame_indices(total)) | set(start) | set(end)

  def update(self, frame: np.ndarray) -> None:
    if self.num_frames in self.wanted:
      self._frames[self.num_frames] = frame
    self.num_frames += 1

  def _gather(self, idx: list[int]) -> np.ndarray:
    missing = [i for i in idx if i not in self._frames]
    if missing:
      raise ValueError(f"frames {missing} not kept (decoded {self.num_frames}, announced "
                       f"{self.total})")
    return np.stack([self._frames[i] for i in idx])

  def _check_count(self) -> None:
    if self.num_frames == 0:
      raise ValueError("video has no frames")
    if self.num_frames != self.total:
      raise ValueError(f"decoded {self.num_frames} frames but the container announced "
                       f"{self.total}")

  def score(self) -> float:
    self._check_count()
    return self.scorer.similarity(self._gather(middle_frame_indices(self.total)), self.prompt)

  def drift(self) -> tuple[float, float, float]:
    self._check_count()
    s, e = drift_frame_indices(self.total)
    return drift_lib.drift_entry(self.scorer.similarity(self._gather(s), self.prompt),
                                 self.scorer.similarity(self._gather(e), self.prompt))
