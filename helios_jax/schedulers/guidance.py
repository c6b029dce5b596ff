"""Classifier-free guidance: standard CFG and CFG-Zero* (optimized scale + zero-init)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.schedulers import _numerics
from helios_jax.schedulers.config import PipelineFlags


def guidance_mode(flags: PipelineFlags | None, guidance_scale: float,
                  pyramid: bool = True) -> str:
  """Which guidance the reference applies: 'none', 'cfg' or 'cfg_zero_star'.

  Args:
    flags: the checkpoint's `model_index.json` flags (None = all False).
    guidance_scale: w; CFG is on iff w > 1 (also for distilled checkpoints, where the
      reference only warns).
    pyramid: whether the pyramid pipeline samples (only it implements CFG-Zero*; diffusers'
      single-resolution `HeliosPipeline` always uses plain CFG).

  Returns:
    The mode.
  """
  if guidance_scale <= 1.0:
    return "none"
  if pyramid and flags is not None and flags.is_cfg_zero_star:
    return "cfg_zero_star"
  return "cfg"


def cfg(v_cond: jax.Array, v_uncond: jax.Array, guidance_scale: float) -> jax.Array:
  """Standard CFG v_u + w (v_c - v_u), rounded per op in the model dtype (bf16).

  Args:
    v_cond: [B, T, H, W, C] conditional velocity.
    v_uncond: [B, T, H, W, C] unconditional velocity.
    guidance_scale: w.

  Returns:
    [B, T, H, W, C] guided velocity, dtype of the inputs.
  """
  diff = _numerics.binary(jnp.subtract, v_cond, v_uncond)
  return _numerics.binary(jnp.add, v_uncond, _numerics.scale(guidance_scale, diff))


def optimized_scale(v_cond: jax.Array, v_uncond: jax.Array) -> jax.Array:
  """CFG-Zero* scale s* = <v_c, v_u> / (||v_u||^2 + 1e-8) per batch element, in fp32.

  Args:
    v_cond: [B, ...] conditional velocity.
    v_uncond: [B, ...] unconditional velocity.

  Returns:
    [B] fp32.
  """
  c = v_cond.reshape(v_cond.shape[0], -1).astype(jnp.float32)
  u = v_uncond.reshape(v_uncond.shape[0], -1).astype(jnp.float32)
  dot = jnp.sum(c * u, axis=1)
  norm = jnp.sum(u * u, axis=1) + jnp.float32(1e-8)
  return dot / norm


def cfg_zero_star(v_cond: jax.Array, v_uncond: jax.Array, guidance_scale: float,
                  zero_init: bool | jax.Array = False) -> jax.Array:
  """CFG-Zero* as `HeliosPyramidPipeline`: s* v_u + w (v_c - s* v_u), or 0 on zero-init steps.

  s* is computed in fp32 then cast to the model dtype; the combination is evaluated op by op
  in the model dtype.

  Args:
    v_cond: [B, T, H, W, C] conditional velocity.
    v_uncond: [B, T, H, W, C] unconditional velocity.
    guidance_scale: w.
    zero_init: (traced) bool: return `v_cond * 0` (see `zero_init_mask`).

  Returns:
    [B, T, H, W, C] guided velocity, dtype of the inputs.
  """
  dtype = v_cond.dtype
  s = _numerics.round_to(optimized_scale(v_cond, v_uncond), dtype)
  s = s.reshape((-1,) + (1,) * (v_cond.ndim - 1))
  us = _numerics.binary(jnp.multiply, v_uncond, s)
  diff = _numerics.binary(jnp.subtract, v_cond, us)
  guided = _numerics.binary(jnp.add, us, _numerics.scale(guidance_scale, diff))
  return jnp.where(zero_init, v_cond * jnp.zeros((), dtype), guided)


def zero_init_mask(num_steps: int, stage_index: int | None, zero_steps: int = 1,
                   use_zero_init: bool = True) -> np.ndarray:
  """Steps whose CFG-Zero* output is zeroed: stage 0 (or single stage), step i <= zero_steps.

  Args:
    num_steps: steps of the stage.
    stage_index: pyramid stage (None for a single-resolution schedule).
    zero_steps: last zeroed step index (the scripts' `--zero_steps 1` zeroes steps 0 and 1).
    use_zero_init: master switch.

  Returns:
    [num_steps] bool.
  """
  i = np.arange(num_steps)
  on = bool(use_zero_init) and stage_index in (0, None)
  return np.logical_and(on, i <= zero_steps)
