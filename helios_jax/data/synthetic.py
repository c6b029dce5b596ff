"""Synthetic latent clips for CPU-scale training (spec training.md §11.1).

Each clip is a deterministic function of (seed, index): a latent video of N sections x 9 frames
with persistent content (a smooth per-clip background texture), motion (Gaussian blobs moving
on linear paths) and colour statistics (each blob carries a random C-dim colour; the whole clip
drifts slowly in colour), scaled to about unit variance like normalised VAE latents. The text is
a few tokens from a small vocabulary that describe the clip (blob count, colour class, speed),
embedded with a fixed random table and zero-padded, so text conditioning is learnable.

Records have the same fields as the precomputed TFDS latents (`latents.LatentSource`), so the
input pipeline treats both alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size and seed of the synthetic dataset.

  Attributes:
    num_clips: records.
    sections: possible section counts (one bucket per value).
    height, width: latent size (divisible by 8 for the pyramid and the long stem).
    channels: latent channels (16 like the Wan VAE).
    text_tokens: valid text rows per caption (<= the pipeline's text length).
    text_dim: embedding width (the model's text_dim).
    vocab: token vocabulary size.
    seed: content seed.
  """

  num_clips: int = 32
  sections: tuple[int, ...] = (3, 4)
  height: int = 16
  width: int = 16
  channels: int = 16
  text_tokens: int = 6
  text_dim: int = 32
  vocab: int = 32
  seed: int = 0

  def __post_init__(self):
    if self.num_clips < 0 or not self.sections or min(self.sections) < 1:
      raise ValueError(f"num_clips={self.num_clips} must be >= 0 and sections={self.sections} "
                       ">= 1")


class SyntheticLatents:
  """Random-access synthetic source (`len`, `[i]`, `bucket_keys()`)."""

  def __init__(self, cfg: SyntheticConfig):
    self.cfg = cfg
    rng = np.random.default_rng([cfg.seed, 7])
    self._table = rng.normal(0.0, 1.0, (cfg.vocab, cfg.text_dim)).astype(np.float32)

  def __len__(self) -> int:
    return self.cfg.num_clips

  def _num_sections(self, index: int) -> int:
    return int(self.cfg.sections[index % len(self.cfg.sections)])

  def bucket_keys(self) -> np.ndarray:
    return np.asarray([(self._num_sections(i), self.cfg.height, self.cfg.width)
                       for i in range(len(self))], np.int64)

  def __getitem__(self, index: int) -> dict[str, Any]:
    cfg = self.cfg
    index = int(index)
    if not 0 <= index < cfg.num_clips:
      raise IndexError(f"record {index} outside [0, {cfg.num_clips})")
    rng = np.random.default_rng([cfg.seed, index])
    n = self._num_sections(index)
    t_len = 9 * n
    h, w, c = cfg.height, cfg.width, cfg.channels
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # Background: a few low-frequency waves per channel.
    bg = np.zeros((h, w, c), np.float32)
    for _ in range(3):
      fy, fx = rng.uniform(0.5, 2.0, 2) * 2 * np.pi / np.asarray([h, w])
      ph = rng.uniform(0, 2 * np.pi)
      bg += np.sin(fy * yy + fx * xx + ph)[..., None] * rng.normal(0, 0.5, c)
    # Blobs: position p0 + v t (wrapping), colour vector, radius.
    n_blobs = int(rng.integers(1, 4))
    colour_class = int(rng.integers(0, 4))
    base_colour = np.random.default_rng([cfg.seed, 11, colour_class]).normal(0, 1, c)
    speed = float(rng.uniform(0.1, 0.6))
    frames = np.empty((t_len, h, w, c), np.float32)
    pos = rng.uniform(0, [h, w], (n_blobs, 2))
    ang = rng.uniform(0, 2 * np.pi, n_blobs)
    vel = speed * np.stack([np.sin(ang), np.cos(ang)], axis=-1)
    cols = base_colour + 0.3 * rng.normal(0, 1, (n_blobs, c))
    radius = rng.uniform(1.5, 3.0, n_blobs)
    drift = rng.normal(0, 0.01, c)
    for t in range(t_len):
      f = bg + drift * t
      for p, v, col, r in zip(pos, vel, cols, radius):
        cy, cx = (p + v * t) % [h, w]
        dy = np.minimum(np.abs(yy - cy), h - np.abs(yy - cy))
        dx = np.minimum(np.abs(xx - cx), w - np.abs(xx - cx))
        f = f + np.exp(-(dy ** 2 + dx ** 2) / (2 * r * r))[..., None] * col
      frames[t] = f
    frames /= max(float(frames.std()), 1e-6)
    latents = frames.reshape(n, 9, h, w, c)
    tokens = [n_blobs, 4 + colour_class, 8 + min(int(speed * 10), 7)]
    tokens += list(rng.integers(16, cfg.vocab, max(cfg.text_tokens - len(tokens), 0)))
    tokens = np.asarray(tokens[:cfg.text_tokens]) % cfg.vocab
    return {"latents": latents, "prompt_embed": self._table[tokens],
            "caption": f"{n_blobs} blobs, colour {colour_class}, speed {speed:.2f}",
            "uttid": f"synthetic_{index}", "num_frames": np.int32(33 * n),
            "num_sections": np.int32(n), "height": np.int32(h), "width": np.int32(w)}
