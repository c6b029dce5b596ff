"""Shared pieces of the experiment configs: `parse_arg` and the base training ConfigDict."""

from __future__ import annotations

import ml_collections

from helios_jax.training import distill
from helios_jax.training import settings
from helios_jax.training import trainer


def parse_arg(arg: str | None, **spec):
  """Parses "tiny,phase=post,toy=/data" into a ConfigDict typed by the defaults in `spec`.

  Bare words set a boolean to True; `key=value` is cast to the type of `spec[key]`. Unknown
  keys raise (big_vision's `parse_arg` convention).

  Args:
    arg: the string after the colon of `--config=file.py:arg` (None or "" -> defaults).
    **spec: the allowed keys with their defaults.

  Returns:
    ml_collections.ConfigDict with every key of `spec`.
  """
  out = ml_collections.ConfigDict(dict(spec))
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    key, sep, value = token.partition("=")
    if key not in spec:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(spec)}")
    default = spec[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} must be true/false")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value!r} is not a {type(default).__name__}"
                         ) from e
  return out


def parse_phase_arg(arg: str | None, stage: str, steps: int):
  """(args, phase) of a two-phase stage (1 or 2): "init" (default) | "post" (or bare `post`),
  plus "init=<dir>", "tiny", "toy=<dir>", "steps=N" (default `steps`)."""
  a = parse_arg(arg, phase="init", init="", post=False, tiny=False, toy="", steps=steps)
  phase = "post" if a.post else a.phase
  if phase not in ("init", "post"):
    raise ValueError(f"{stage} phase={phase!r} must be 'init' or 'post'")
  return a, phase


def base_config() -> ml_collections.ConfigDict:
  """Fields shared by Stages 1-2 with the released values (spec §7.0 "Common", §7.1).

  Every group is derived from its settings dataclass (`trainer.Settings`, whose defaults are
  the released Stage 1-2 values except where set below); Stage 3 adds its groups with
  `add_stage3_groups`.
  """
  c = settings.to_configdict(trainer.Settings())
  # Quirk 10: no caption dropout in any released config (objective.caption_dropout = 0).
  c.model.preset = "helios-14b"
  c.model.param_dtype = "bfloat16"
  # trainable.init_std = 0 -> A ~ N(0, 1 / rank) (spec §7.1).
  # Quirk 11: only per-device batch sizes are published; the global batch is
  # per_device_batch_size x devices unless data.global_batch_size > 0 is given.
  # Random conditioning drop (spec §4.5): drop.p_i2v = 0.1 is correct.yaml's I2V fix.
  # Frame-Aware Corrupt (spec §5): released Stages 1-2 use noise only; correct.yaml suggests
  # corrupt.mode="random" (10% blur) and corrupt.saturation=True.
  # train.num_steps is a placeholder: the released runs were stopped manually.
  return c


def apply_tiny(c: ml_collections.ConfigDict, toy: str, steps: int) -> None:
  """Shrinks a config to the CPU miniature: tiny DiT, fp32, LoRA r8, high LR, few steps.

  Args:
    c: the config to modify in place.
    toy: "" -> synthetic latents (spec §11.1); else a TFDS data root holding the toy clips'
      precomputed latents (`python -m helios_jax.data.precompute`).
    steps: number of optimizer steps.
  """
  c.model.preset = "tiny"
  c.model.init_format = "helios"
  c.model.param_dtype = "float32"
  c.model.attention = "xla"
  c.trainable.rank = 8
  c.trainable.alpha = 8.0
  c.optim.lr = 2e-3
  c.optim.weight_decay = 1e-4
  c.train.num_steps = steps
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.keep_checkpoints = 2
  c.data.num_threads = 1
  if toy:
    c.data.source = "tfds"
    c.data.data_dir = toy
    c.data.global_batch_size = 1  # two toy clips in two length buckets
  else:
    c.data.source = "synthetic"
    c.data.text_len = 16
    c.data.global_batch_size = 2


def add_stage3_groups(c: ml_collections.ConfigDict) -> None:
  """The Stage 3 groups (spec §7.4-7.6, §11.1 `stage3`), released values; modifies `c`.

  `stage3` (with its `stage3.gan` sub-group) is derived from `distill.Stage3Config`, whose
  defaults are the released values.
  """
  c.stage3 = settings.to_configdict(distill.Stage3Config())
  # AdamW (0, 0.999), wd 1e-3, clip 10 for every Stage 3 optimizer (spec §7.0).
  c.optim.update(dict(lr=2e-6, warmup_steps=0, b1=0.0, b2=0.999, weight_decay=1e-3,
                      grad_clip=10.0))
  # Generator / student: LoRA r256 on every Linear and on the memory stems.
  c.trainable.update(dict(rank=256, alpha=256.0, linears="lora", patch_embedding="frozen",
                          memory_patches="lora"))
  c.data.per_device_batch_size = 1
  c.ema.update(dict(enabled=True, decay=0.99))
