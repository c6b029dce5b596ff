"""Aesthetic metric (upstream `0_get_aesthetic.py` / `5_get_drifting_aesthetic.py`) in JAX.

Per frame: upstream decode (640 px wide), `clip_transform(224)` on float frames, CLIP ViT-L/14
image embedding, L2 normalisation, LAION linear head, / 10. The video score is the mean over
all frames; the drift variant compares the means of the first/last max(1, int(0.15 N)) frames.
Upstream runs CLIP in fp16 on GPU; this port runs fp32 by default (pass `dtype` to change).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.models import clip as clip_lib
from helios_jax.heliosbench import drift as drift_lib
from helios_jax.heliosbench import preprocess
from helios_jax.constants import CHUNK_FRAMES

BATCH_SIZE = 32


class AestheticScorer:
  """CLIP + LAION head, loaded from user-provided files.

  Args:
    clip_path: CLIP weights (transformers folder, Orbax export, or OpenAI `ViT-L-14.pt`).
    head_path: LAION head (`sa_0_4_vit_l_14_linear.pth`, `.safetensors` or `.npz`).
    dtype: parameter dtype (None -> float32).
    batch_size: frames per forward; the last batch is padded so one program is compiled.
  """

  def __init__(self, clip_path: str | os.PathLike, head_path: str | os.PathLike,
               dtype: Any = None, batch_size: int = BATCH_SIZE):
    self.clip_config, clip_model = clip_lib.load_clip_vision(clip_path, dtype)
    self.head_config, head = clip_lib.load_aesthetic_head(head_path, dtype)
    if self.head_config.input_dim != self.clip_config.projection_dim:
      raise ValueError(
          f"aesthetic head input_dim={self.head_config.input_dim} does not match CLIP "
          f"projection_dim={self.clip_config.projection_dim}")
    self._clip = nnx.split(clip_model)
    self._head = nnx.split(head)
    self.batch_size = int(batch_size)

  def frame_scores(self, frames: np.ndarray) -> np.ndarray:
    """Per-frame aesthetic score / 10.

    Args:
      frames: # [T, H, W, 3] uint8 RGB (upstream-decoded, 640 px wide).

    Returns:
      # [T] float32.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    size = self.clip_config.image_size
    out = []
    for i in range(0, len(frames), self.batch_size):
      batch = frames[i:i + self.batch_size]
      n = len(batch)
      if n < self.batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, axis=0)])
      pixels = preprocess.clip_preprocess(jnp.asarray(batch), size=size)
      scores = clip_lib.aesthetic_scores(self._clip[0], self._clip[1], self._head[0],
                                         self._head[1], pixels)
      out.append(np.asarray(scores)[:n] / 10.0)
    if not out:
      raise ValueError("no frames to score")
    return np.concatenate(out).astype(np.float32)


class AestheticAccumulator:
  """Buffers frames in batches and keeps the per-frame scores of one video."""

  def __init__(self, scorer: AestheticScorer):
    self.scorer = scorer
    self._pending: list[np.ndarray] = []
    self._scores: list[np.ndarray] = []

  def update(self, frame: np.ndarray) -> None:
    self._pending.append(frame)
    if len(self._pending) == self.scorer.batch_size:
      self._flush()

  def _flush(self) -> None:
    if self._pending:
      self._scores.append(self.scorer.frame_scores(np.stack(self._pending)))
      self._pending = []

  def scores(self) -> np.ndarray:
    """# [N] per-frame scores (score / 10)."""
    self._flush()
    if not self._scores:
      raise ValueError("video has no frames")
    return np.concatenate(self._scores)

  def score(self) -> float:
    return float(np.mean(self.scores()))

  def drift(self) -> tuple[float, float, float]:
    s = self.scores()
    return drift_lib.window_drift(lambda a, b: float(np.mean(s[a:b])), len(s), minimum=1)

  def chunk_curve(self, chunk: int = CHUNK_FRAMES) -> list[float]:
    s = self.scores()
    return [float(np.mean(s[a:b])) for a, b in drift_lib.chunk_bounds(len(s), chunk)]
