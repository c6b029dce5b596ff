"""Shared pieces of the experiment configs: `parse_arg` and the base training ConfigDict."""

from __future__ import annotations

import ml_collections

# Wan2.1's text length and latent / history layout (spec training.md §7.0 "Common").
TEXT_LEN = 512


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


def base_config() -> ml_collections.ConfigDict:
  """Fields shared by Stages 1-2 with the released values (spec §7.0 "Common", §7.1)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.objective = ml_collections.ConfigDict(dict(
      kind="flow_matching", logit_mean=0.0, logit_std=1.0, multiplicities=(1, 2, 1),
      caption_dropout=0.0))  # quirk 10: no caption dropout in any released config

  c.model = ml_collections.ConfigDict(dict(
      init_from="", init_format="helios", preset="helios-14b",
      overrides=ml_collections.ConfigDict(), param_dtype="bfloat16", remat="full",
      attention="auto", seed=0, init_memory_from_patch_embedding=True))

  c.trainable = ml_collections.ConfigDict(dict(
      lora_rank=128, lora_alpha=128.0, lora_init_std=0.0,  # 0 -> 1 / rank (spec §7.1)
      linears="lora", patch_embedding="lora", memory_patches="full"))

  # Quirk 11: only per-device batch sizes are published; the global batch is
  # per_device_batch_size x devices unless global_batch_size > 0 is given.
  c.data = ml_collections.ConfigDict(dict(
      source="tfds", data_dir="", split="train", global_batch_size=0, per_device_batch_size=2,
      text_len=TEXT_LEN, seed=-1, num_threads=2, prefetch=2,
      synthetic=ml_collections.ConfigDict(dict(
          num_clips=32, sections=(3, 4), height=16, width=16, channels=16, text_tokens=6,
          text_dim=32, vocab=32, seed=0))))

  # Random conditioning drop (spec §4.5); p_i2v = 0.1 is correct.yaml's I2V fix.
  c.drop = ml_collections.ConfigDict(dict(enabled=True, p_t2v=0.4, p_i2v=0.0, p_v2v=0.4))

  # Frame-Aware Corrupt (spec §5): released Stages 1-2 use noise only; correct.yaml suggests
  # mode="random" (10% blur) and saturation=True.
  c.corrupt = ml_collections.ConfigDict(dict(
      mode="noise", clean_prob=0.1, noise_prob=0.9, sigma_max=1.0 / 3.0, blur_min=0.9,
      blur_max=1.0, saturation=False, saturation_keep_prob=0.1))

  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, grad_clip=1.0))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1_000_000,  # placeholder: the released runs were stopped manually
      log_every=50, checkpoint_every=500, keep_checkpoints=3, async_checkpoint=True,
      abort_at_step=0, debug_nan_at_step=0))

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1))
  c.ema = ml_collections.ConfigDict(dict(enabled=False, decay=0.99, update_after_step=0))
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
  c.trainable.lora_rank = 8
  c.trainable.lora_alpha = 8.0
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
  """The Stage 3 groups (spec §7.4-7.6, §11.1 `stage3`), released values; modifies `c`."""
  c.stage3 = ml_collections.ConfigDict(dict(
      student_steps=(2, 2, 2), amplify_first_chunk=True,
      ode_weight=80.0, ode_sections=3,
      gen_update_ratio=5, real_guidance=3.0,
      beta_a=4.0, beta_b=1.5, beta_anneal_steps=500, t_clamp=(20.0, 980.0),
      critic_u_min=0.001,
      gan=False, gan_start_step=1000, gan_g_weight=0.05, gan_d_weight=0.01,
      r1_weight=100.0, r1_sigma=0.1, gan_crop=0.5,
      gan_blocks=(),  # () -> blocks (5, 15, 25, 35) scaled to the model depth
      heads=ml_collections.ConfigDict(dict(width=768, groups=32, seed=0)),
      negative_text=""))  # .npy [L, D] of the negative prompt's embedding; "" -> zeros
  # AdamW (0, 0.999), wd 1e-3, clip 10 for every Stage 3 optimizer (spec §7.0).
  c.optim.update(dict(lr=2e-6, warmup_steps=0, b1=0.0, b2=0.999, weight_decay=1e-3,
                      grad_clip=10.0))
  # Generator / student: LoRA r256 on every Linear and on the memory stems.
  c.trainable.update(dict(lora_rank=256, lora_alpha=256.0, linears="lora",
                          patch_embedding="frozen", memory_patches="lora"))
  c.data.per_device_batch_size = 1
  c.ema.update(dict(enabled=True, decay=0.99))
