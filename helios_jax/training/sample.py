"""Stage 1/2 training samples, device side (spec training.md §4; the host side, section choice
and history / anchor / target cutting, is `helios_jax.data.sections`).

Inside the jitted step, per sample: the random conditioning drop (T2V,
I2V, V2V with the spec's probabilities) and the model's history inputs with the fixed RoPE
frame indices (anchor 0, long 1..16, mid 17..18, newest 19, noisy 20..28).

Decision (quirk 4): every draw is per sample (the reference draws the drop once per batch);
for batch 1 the two are the same distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax import sampling
from helios_jax.constants import CHUNK_LATENT_FRAMES, NUM_HISTORY_FRAMES
from helios_jax.models.memory import HistoryInputs

F32 = jnp.float32
# Drop modes returned by `random_drop` (for statistics and tests).
KEEP, T2V, I2V, V2V = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class DropConfig:
  """Random conditioning drop probabilities (evaluated in this order, spec §4.5).

  Attributes:
    p_t2v: zero the anchor and all history.
    p_i2v: keep only the anchor and the newest frame (`random_drop_i2v_ratio`).
    p_v2v: drop d = (19 mod 9) + 9k oldest frames, k uniform in {0, 1, 2}.
    enabled: False skips the drop (`is_random_drop: false`).
  """

  p_t2v: float = 0.4
  p_i2v: float = 0.0
  p_v2v: float = 0.4
  enabled: bool = True

  def __post_init__(self):
    for name in ("p_t2v", "p_i2v", "p_v2v"):
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p} must lie in [0, 1]")


def v2v_drop_counts(num_history: int = NUM_HISTORY_FRAMES,
                    window: int = CHUNK_LATENT_FRAMES) -> np.ndarray:
  """The V2V drop sizes d = (N mod window) + window k, k = 0..N // window ({1, 10, 19})."""
  return np.arange(num_history // window + 1) * window + num_history % window


def random_drop(key: jax.Array, history: jax.Array, anchor: jax.Array, cfg: DropConfig):
  """Per-sample conditioning drop.

  Args:
    key: PRNG key.
    history: `[B, 19, h, w, C]` oldest first.
    anchor: `[B, 1, h, w, C]`.
    cfg: probabilities.

  Returns:
    (history, anchor, mode `[B]` int32 in {KEEP, T2V, I2V, V2V}, dropped `[B]` int32: the
    number of oldest history frames zeroed by V2V, else 0).
  """
  b, n = history.shape[:2]
  if not cfg.enabled:
    zeros = jnp.zeros((b,), jnp.int32)
    return history, anchor, zeros, zeros
  u = jax.random.uniform(key, (b, 4), F32)
  counts = jnp.asarray(v2v_drop_counts(n), jnp.int32)
  t2v = u[:, 0] <= cfg.p_t2v
  i2v = ~t2v & (u[:, 1] <= cfg.p_i2v)
  v2v = ~t2v & ~i2v & (u[:, 2] <= cfg.p_v2v)
  k = jnp.minimum((u[:, 3] * counts.shape[0]).astype(jnp.int32), counts.shape[0] - 1)
  d = jnp.where(v2v, counts[k], 0)
  frame = jnp.arange(n)[None, :]
  keep = jnp.where(t2v[:, None], False,
                   jnp.where(i2v[:, None], frame == n - 1, frame >= d[:, None]))  # [B, 19]
  history = jnp.where(keep[:, :, None, None, None], history, jnp.zeros_like(history))
  anchor = jnp.where(t2v[:, None, None, None, None], jnp.zeros_like(anchor), anchor)
  mode = jnp.where(t2v, T2V, jnp.where(i2v, I2V, jnp.where(v2v, V2V, KEEP))).astype(jnp.int32)
  return history, anchor, mode, d.astype(jnp.int32)


def history_inputs(history: jax.Array, anchor: jax.Array) -> HistoryInputs:
  """The transformer's history groups: long 16, mid 2, short = [anchor, newest] (spec §4.6-7).

  Args:
    history: `[B, 19, h, w, C]`.
    anchor: `[B, 1, h, w, C]`.

  Returns:
    `HistoryInputs` with the constant RoPE frame indices of `sampling.rope_indices`.
  """
  return sampling.history_inputs(sampling.HistoryState(latents=history, anchor=anchor))


def noisy_indices(batch: int) -> jax.Array:
  """`[B, 9]` RoPE frame indices 20..28 of the noisy window."""
  idx = jnp.asarray(sampling.rope_indices()["noisy"], jnp.int32)
  return jnp.broadcast_to(idx[None], (batch, idx.shape[0]))


def caption_dropout(key: jax.Array, text: jax.Array, p: float) -> jax.Array:
  """Zeroes each sample's text embedding with probability p (0 in every released config).

  Args:
    key: PRNG key.
    text: `[B, L, D]`.
    p: dropout probability.

  Returns:
    `[B, L, D]`.
  """
  if p <= 0:
    return text
  drop = jax.random.uniform(key, (text.shape[0],)) < p
  return jnp.where(drop[:, None, None], jnp.zeros_like(text), text)
