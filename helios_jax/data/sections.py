"""Host-side training samples from a clip's section stack (spec training.md §4 steps 1-4).

In the input pipeline (numpy): the clip's sections are laid on one time line, left-padded with
19 zero frames; a section c is chosen (seeded by seed + 1e6 * epoch + record index); its 19
preceding frames are the history, its 9 frames the target, and the first latent of section 0
the anchor (zero when c == 0). The device side (conditioning drop, history inputs) is
`helios_jax.training.sample`.
"""

from __future__ import annotations

import numpy as np

from helios_jax.constants import CHUNK_LATENT_FRAMES, NUM_HISTORY_FRAMES


def choose_section(num_sections: int, seed: int, epoch: int, index: int) -> int:
  """Section c uniform in [0, num_sections), seeded by seed + 1e6 * epoch + index (spec §4.2).

  Args:
    num_sections: sections of the clip (>= 1).
    seed: data seed.
    epoch: epoch number.
    index: the record's index in the dataset.

  Returns:
    c.
  """
  if num_sections < 1:
    raise ValueError(f"record {index} has num_sections={num_sections}; a clip needs at least "
                     f"one {CHUNK_LATENT_FRAMES}-latent-frame section")
  rng = np.random.default_rng(int(seed) + 1_000_000 * int(epoch) + int(index))
  return int(rng.integers(0, num_sections))


def sample_from_sections(latents: np.ndarray, c: int, num_history: int = NUM_HISTORY_FRAMES):
  """History, anchor and target of section c (spec §4 steps 1, 3, 4).

  Args:
    latents: `[N, 9, h, w, C]` the clip's independently encoded sections (normalized).
    c: chosen section.
    num_history: history frames (19).

  Returns:
    (history `[19, h, w, C]` oldest first, anchor `[1, h, w, C]`, target `[9, h, w, C]`), fp32.
  """
  latents = np.asarray(latents, np.float32)
  if latents.ndim != 5:
    raise ValueError(f"section latents must be [N, {CHUNK_LATENT_FRAMES}, h, w, C], got {latents.shape}")
  n, t = latents.shape[:2]
  if not 0 <= c < n:
    raise ValueError(f"section c={c} outside [0, {n})")
  line = latents.reshape((n * t,) + latents.shape[2:])
  pad = np.zeros((num_history,) + line.shape[1:], np.float32)
  line = np.concatenate([pad, line], axis=0)
  start = num_history + c * t
  history = line[start - num_history:start]
  target = line[start:start + t]
  anchor = latents[0, :1] if c > 0 else np.zeros_like(latents[0, :1])
  return history, anchor, target
