r"""Stage 2 (Helios-Mid): Pyramid Unified Predictor-Corrector (spec §7.3).

Pyramid flow matching over the 3 resolution levels of the Helios scheduler (start / end points
s_k, e_k from one shared noise tensor), draws per level [1, 2, 1] (init) / [1, 1, 1] (post),
uniform per-stage timesteps; the same corrupted full-resolution history for every draw; the loss
is the mean of the per-draw MSEs (equal to the reference's NaViT packed forward). LoRA r256 on
every Linear; stems and patch_embedding frozen in init, LoRA'd in post; AdamW 1e-4 with 1000
warmup steps (init) / 3e-5 with 500 (post); batch 1 per device.

Launch:
  python -m helios_jax.train --config=experiments/stage2.py \
      --config.model.init_from=/ckpt/Helios-Base/transformer \
      --config.data.data_dir=/data/latents --workdir=/runs/stage2_init
  python -m helios_jax.train --config=experiments/stage2.py:post \
      --config.model.init_from=/ckpt/Helios-Mid/transformer_init ...
Hardware: 14B, 4 forwards per step (2,940 + 2 x 4,560 + 11,040 tokens); 80 GB GPUs with FSDP.

CPU miniature:
  python -m helios_jax.train --config=experiments/stage2.py:tiny --workdir=/tmp/s2
"""

try:
  from experiments import common
except ImportError:  # launched from outside the repository root
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  """Stage 2 config; arg: "init" (default) | "post", plus "tiny", "toy=<dir>", "steps=N"."""
  a, phase = common.parse_phase_arg(arg, "stage2", steps=20)
  c = common.base_config()
  c.stage = f"stage2_{phase}"
  c.seed = 45 if phase == "init" else 46
  c.objective.kind = "pyramid_flow_matching"
  c.objective.multiplicities = (1, 2, 1) if phase == "init" else (1, 1, 1)
  c.model.init_format = "helios"  # Helios-Base/transformer (init), Helios-Mid/transformer_init
  c.model.init_from = a.init
  c.trainable.rank, c.trainable.alpha = 256, 256.0
  c.trainable.patch_embedding = "frozen" if phase == "init" else "lora"
  c.trainable.memory_patches = "frozen" if phase == "init" else "lora"
  c.optim.lr = 1e-4 if phase == "init" else 3e-5
  c.optim.warmup_steps = 1000 if phase == "init" else 500
  c.data.per_device_batch_size = 1
  if a.tiny:
    common.apply_tiny(c, a.toy, a.steps)
    c.model.init_from = a.init
    c.optim.warmup_steps = 2
  return c
