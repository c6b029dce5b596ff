"""3D rotary position embedding of the Helios DiT, incl. averaged tables for compressed history.

Spec: architecture.md §3.4. A token at (t, y, x) rotates channel pair p (channels 2p, 2p+1) by
angle `pos_axis(p) * omega_p`; pairs [0, dt/2) use t, the next dy/2 use y, the last dx/2 use x.
Tables are kept as one angle per pair: `cos`, `sin` of shape `[B, tokens, head_dim // 2]` (the
reference stores each value twice, repeat-interleaved; both copies are always equal). Applying
them to q/k is `pallas_kernels.dispatch.rms_norm_rope` (XLA reference or Pallas kernel).

Compressed history tokens (mid: kernel 2, long: kernel 4) take the table of their fine grid,
replicate-padded and *average-pooled on the cos/sin values* (not on positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def inv_freqs(dim: int, theta: float) -> np.ndarray:
  """`1 / theta ** (arange(0, dim, 2) / dim)` as fp32, the reciprocal form the reference uses.

  The exponents are rounded to fp32 as the reference's are (`arange(...) / dim` in fp32); the
  power and reciprocal are then evaluated in float64 and rounded once, so the table is the
  correctly rounded value on every host instead of depending on the CPU's vectorised `powf`
  (the reference's own fp32 `pow` may differ from it by 1 ulp).
  """
  e = np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim)
  return (1.0 / (np.float64(np.float32(theta)) ** e.astype(np.float64))).astype(np.float32)


def rope_tables(frame_indices: jax.Array, height: int, width: int,
                rope_dim: tuple[int, int, int], theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables on a (t, y, x) grid.

  Args:
    frame_indices: `[B, T]` frame positions (RoPE t coordinate), any numeric dtype.
    height, width: grid size; y = 0..height-1, x = 0..width-1.
    rope_dim: (dt, dy, dx) channel split of the head dimension.
    theta: RoPE base.

  Returns:
    (cos, sin), each `[B, T, height, width, sum(rope_dim) // 2]` fp32.
  """
  b, t = frame_indices.shape
  ft, fy, fx = (jnp.asarray(inv_freqs(d, theta)) for d in rope_dim)
  ang_t = frame_indices.astype(F32)[:, :, None] * ft                        # [B, T, dt/2]
  ang_y = jnp.arange(height, dtype=F32)[:, None] * fy                        # [H, dy/2]
  ang_x = jnp.arange(width, dtype=F32)[:, None] * fx                         # [W, dx/2]
  shape = (b, t, height, width)
  parts = (jnp.broadcast_to(ang_t[:, :, None, None, :], shape + ang_t.shape[-1:]),
           jnp.broadcast_to(ang_y[None, None, :, None, :], shape + ang_y.shape[-1:]),
           jnp.broadcast_to(ang_x[None, None, None, :, :], shape + ang_x.shape[-1:]))
  cos = jnp.concatenate([jnp.cos(p) for p in parts], axis=-1)
  sin = jnp.concatenate([jnp.sin(p) for p in parts], axis=-1)
  return cos, sin


def replicate_pad_to_multiple(x: jax.Array, multiples: tuple[int, int, int],
                              axes: tuple[int, int, int]) -> jax.Array:
  """Pads `x` at the end of `axes` by edge replication up to multiples (torch `pad_for_3d_conv`)."""
  pad = [(0, 0)] * x.ndim
  for m, a in zip(multiples, axes):
    pad[a] = (0, (-x.shape[a]) % m)
  if all(p == (0, 0) for p in pad):
    return x
  return jnp.pad(x, pad, mode="edge")


def avg_pool_3d(x: jax.Array, k: int) -> jax.Array:
  """Mean over non-overlapping k x k x k windows of axes 1..3 of `[B, T, H, W, C]`."""
  b, t, h, w, c = x.shape
  x = x.reshape(b, t // k, k, h // k, k, w // k, k, c)
  return jnp.mean(x, axis=(2, 4, 6))


def pooled_rope_tables(frame_indices: jax.Array, height: int, width: int, k: int,
                       rope_dim: tuple[int, int, int], theta: float):
  """Tables for compressed history: fine-grid table, replicate-padded, k^3 average-pooled.

  Returns:
    (cos, sin), each `[B, ceil(T/k), ceil(height/k), ceil(width/k), head_dim // 2]` fp32.
  """
  out = []
  for table in rope_tables(frame_indices, height, width, rope_dim, theta):
    table = replicate_pad_to_multiple(table, (k, k, k), (1, 2, 3))
    out.append(avg_pool_3d(table, k))
  return tuple(out)


def flatten_grid(table: jax.Array) -> jax.Array:
  """`[B, T, H, W, C]` -> `[B, T*H*W, C]` (row-major t, h, w: the token order)."""
  b, t, h, w, c = table.shape
  return table.reshape(b, t * h * w, c)
