"""Optimizer of the trainable tensors: global-norm clip + AdamW, warmup then constant (spec §7.1).

Only the trainables (LoRA factors, full-trained stems; all fp32) have optimizer state; the
frozen base never enters optax. `optax.multi_transform` keys the groups ("lora", "full") so a
config can give them different learning rates (equal in every released config); clipping is
over the global L2 norm of all trainables jointly, as torch's `clip_grad_norm_`. AdamW is
decoupled (torch semantics, decay applied to every trainable tensor, biases included).

The schedule is diffusers' `constant_with_warmup`: lr * min(1, step / warmup) with `step` the
number of optimizer steps taken so far (so the first update uses lr * 0 when warmup > 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + clipping + schedule settings.

  Attributes:
    lr: peak learning rate.
    warmup_steps: linear warmup length (0: constant).
    b1, b2, eps: Adam moments.
    weight_decay: decoupled decay.
    grad_clip: max global gradient norm (<= 0: no clipping).
    lr_multipliers: per-group factors {"lora": 1.0, "full": 1.0}.
  """

  lr: float = 5e-5
  warmup_steps: int = 0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-4
  grad_clip: float = 1.0
  lr_multipliers: tuple[tuple[str, float], ...] = (("lora", 1.0), ("full", 1.0))

  def __post_init__(self):
    if self.lr <= 0:
      raise ValueError(f"lr={self.lr} must be > 0")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")


def schedule(cfg: OptimConfig, multiplier: float = 1.0) -> optax.Schedule:
  """lr * multiplier * min(1, count / warmup_steps)."""
  peak = cfg.lr * multiplier
  if cfg.warmup_steps == 0:
    return optax.constant_schedule(peak)
  w = float(cfg.warmup_steps)
  return lambda count: peak * jnp.minimum(1.0, jnp.asarray(count, jnp.float32) / w)


def make_optimizer(cfg: OptimConfig, trainables: Mapping[str, Any]):
  """The optax transformation for a trainables tree {"lora": ..., "full": ...}.

  Args:
    cfg: settings.
    trainables: the trainable pytree (only its top-level keys are used, for labels).

  Returns:
    optax.GradientTransformation.
  """
  mult = dict(cfg.lr_multipliers)
  groups = sorted(trainables)
  unknown = [g for g in groups if g not in mult]
  if unknown:
    raise ValueError(f"trainable group(s) {unknown} have no lr multiplier; known {sorted(mult)}")
  transforms = {g: optax.adamw(schedule(cfg, mult[g]), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
                for g in groups}
  labels = {g: jax.tree.map(lambda _, g=g: g, trainables[g]) for g in groups}
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  return optax.chain(*chain, optax.multi_transform(transforms, labels))


def learning_rate(cfg: OptimConfig, step: jax.Array | int) -> jax.Array:
  """The base group's learning rate used by optimizer step `step` (0-based)."""
  return jnp.asarray(schedule(cfg)(step), jnp.float32)
