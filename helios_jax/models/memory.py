"""Multi-Term Memory Patchification: patch embeddings of the noisy window and of the history.

Spec: architecture.md §3.1-§3.3. The noisy window and three history groups are patchified by
separate kernel = stride Conv3d stems (implemented as a reshape + matmul):

  short (1,2,2): [anchor frame, newest frame]      -> RoPE on its own post-patch grid
  mid   (2,4,4): the 2 frames before that          -> 2x2x2 average-pooled RoPE of the short grid
  long  (4,8,8): the 16 frames before that         -> 4x4x4 average-pooled RoPE of the short grid

(kernels shown for patch_size (1,2,2); they are 1x, 2x and 4x the patch size). Mid and long
latents are replicate-padded at the end of t, h, w to multiples of (2,4,4) / (4,8,8) first, as
the reference does. The assembled sequence is [long | mid | short | noisy].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.models import layers
from helios_jax.models import rope

F32 = jnp.float32
# The reference pads mid/long latents to these multiples (hard-coded, independent of patch_size).
MID_LATENT_PAD = (2, 4, 4)
LONG_LATENT_PAD = (4, 8, 8)
MID_ROPE_POOL = 2
LONG_ROPE_POOL = 4


class PatchEmbed3D(nnx.Module):
  """Conv3d with kernel = stride as a matmul over flattened patches.

  kernel `[kt, kh, kw, C_in, D]` (Flax conv layout), bias `[D]`, in the model dtype.
  """

  def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int], *, dtype,
               rngs: nnx.Rngs):
    self.patch = tuple(int(p) for p in patch)
    fan_shape = self.patch + (in_channels, dim)
    self.kernel = nnx.Param(layers.kernel_init(rngs.params(), fan_shape, dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, T, H, W, C]` -> `[B, T//kt, H//kh, W//kw, D]` (remainders dropped, like torch)."""
    kt, kh, kw = self.patch
    b, t, h, w, c = x.shape
    tt, hh, ww = t // kt, h // kh, w // kw
    x = x[:, : tt * kt, : hh * kh, : ww * kw]
    x = x.reshape(b, tt, kt, hh, kh, ww, kw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b, tt, hh, ww, kt * kh * kw * c)
    k = self.kernel[...]
    y = jnp.dot(x.astype(k.dtype), k.reshape(-1, k.shape[-1]), preferred_element_type=F32)
    return (y + self.bias[...].astype(F32)).astype(k.dtype)


@dataclasses.dataclass
class HistoryInputs:
  """The three history groups (any may be None). Latents channels-last, indices per frame.

  short/mid/long: `[B, T, H, W, C]` latents; idx_*: `[B, T]` RoPE frame indices.
  """

  short: jax.Array | None = None
  mid: jax.Array | None = None
  long: jax.Array | None = None
  idx_short: jax.Array | None = None
  idx_mid: jax.Array | None = None
  idx_long: jax.Array | None = None


class MultiTermMemoryPatch(nnx.Module):
  """`patch_short`, `patch_mid`, `patch_long` stems and the history token/RoPE assembly."""

  def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int], *, dtype,
               rngs: nnx.Rngs):
    self.patch = tuple(patch)
    self.patch_short = PatchEmbed3D(in_channels, dim, patch, dtype=dtype, rngs=rngs)
    self.patch_mid = PatchEmbed3D(in_channels, dim, tuple(2 * p for p in patch), dtype=dtype,
                                  rngs=rngs)
    self.patch_long = PatchEmbed3D(in_channels, dim, tuple(4 * p for p in patch), dtype=dtype,
                                   rngs=rngs)

  def __call__(self, hist: HistoryInputs, rope_dim, theta):
    """Embeds the history groups.

    Returns:
      tokens `[B, H_tok, D]` ordered [long | mid | short] (None if no group), and RoPE
      (cos, sin) `[B, H_tok, head_dim // 2]`.
    """
    groups = []  # prepended in order short, mid, long -> final [long | mid | short]
    if hist.short is not None:
      tok = self.patch_short(hist.short)
      _, _, h1, w1, _ = tok.shape
      cos, sin = rope.rope_tables(hist.idx_short, h1, w1, rope_dim, theta)
      groups.append(("short", tok, cos, sin))
    for name, x, idx, pad, pool, stem in (
        ("mid", hist.mid, hist.idx_mid, MID_LATENT_PAD, MID_ROPE_POOL, self.patch_mid),
        ("long", hist.long, hist.idx_long, LONG_LATENT_PAD, LONG_ROPE_POOL, self.patch_long)):
      if x is None:
        continue
      if hist.short is None:
        raise ValueError(f"latents_history_{name} needs latents_history_short: its RoPE grid is "
                         "the short history's post-patch grid")
      tok = stem(rope.replicate_pad_to_multiple(x, pad, (1, 2, 3)))
      cos, sin = rope.pooled_rope_tables(idx, h1, w1, pool, rope_dim, theta)
      if tok.shape[1:4] != cos.shape[1:4]:
        raise ValueError(
            f"latents_history_{name} {tuple(x.shape)} gives a token grid {tuple(tok.shape[1:4])} "
            f"but its {idx.shape[1]} indices on the short grid {(h1, w1)} give RoPE grid "
            f"{tuple(cos.shape[1:4])}")
      groups.append((name, tok, cos, sin))
    if not groups:
      return None, None
    groups.reverse()
    tokens = jnp.concatenate([rope.flatten_grid(g[1]) for g in groups], axis=1)
    cos = jnp.concatenate([rope.flatten_grid(g[2]) for g in groups], axis=1)
    sin = jnp.concatenate([rope.flatten_grid(g[3]) for g in groups], axis=1)
    return tokens, (cos, sin)


def init_memory_patches_from_patch_embedding(kernel: np.ndarray, bias: np.ndarray,
                                             in_channels: int):
  """Official Helios init of the memory stems from `patch_embedding` (spec §3.2).

  Args:
    kernel: `patch_embedding` kernel `[kt, kh, kw, C, D]` (Flax layout); channels beyond
      `in_channels` are dropped.
    bias: `[D]`.
    in_channels: latent channels.

  Returns:
    dict name -> (kernel, bias) for patch_short / patch_mid / patch_long: short = W, mid = W
    nearest-repeated x2 on t, h, w and divided by 8, long = x4 repeated / 64 (so a stem applied
    to a latent equals patch_embedding applied to its average-pooled latent).
  """
  w = np.asarray(kernel)[..., :in_channels, :]
  out = {"patch_short": (w, np.asarray(bias))}
  for name, r in (("patch_mid", 2), ("patch_long", 4)):
    big = w
    for axis in range(3):
      big = np.repeat(big, r, axis=axis)
    out[name] = ((big / np.asarray(r ** 3, w.dtype)).astype(w.dtype), np.asarray(bias))
  return out
