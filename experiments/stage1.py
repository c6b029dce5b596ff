r"""Stage 1 (Helios-Base): bidirectional Wan2.1 -> autoregressive chunk generator (spec §7.2).

Flow-matching v-loss with logit-normal sigma on 9-frame chunks conditioned on [anchor | 19
history frames]; LoRA r128 on every Linear and on patch_embedding, the memory stems trained in
full, frozen bf16 base, AdamW 5e-5 (init) / 3e-5 (post), clip 1.0, batch 2 per device.

Launch (phase "init" from Wan2.1-T2V-14B; "post" from the merged init result):
  python -m helios_jax.train --config=experiments/stage1.py \
      --config.model.init_from=/ckpt/Wan2.1-T2V-14B-Diffusers/transformer \
      --config.data.data_dir=/data/latents --workdir=/runs/stage1_init
  python -m helios_jax.training.merge --workdir=/runs/stage1_init --out=/ckpt/base_init
  python -m helios_jax.train --config=experiments/stage1.py:post \
      --config.model.init_from=/ckpt/base_init --config.data.data_dir=... --workdir=...
Hardware: 14B at 384x640 (11,040 tokens) needs 80 GB GPUs with FSDP (BENCHMARKS.md); the
released run length is not in the repo (checkpoints every 500 steps, stopped manually).

CPU miniature (minutes; loss falls from ~2 to ~1):
  python -m helios_jax.train --config=experiments/stage1.py:tiny --workdir=/tmp/s1
  python -m helios_jax.train --config=experiments/stage1.py:tiny,toy=/tmp/toy_latents ...
"""

try:
  from experiments import common
except ImportError:  # launched from outside the repository root
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  """Stage 1 config; arg: "init" (default) | "post", plus "tiny", "toy=<dir>", "steps=N"."""
  a, phase = common.parse_phase_arg(arg, "stage1", steps=30)
  c = common.base_config()
  c.stage = f"stage1_{phase}"
  c.seed = 43 if phase == "init" else 44
  c.objective.kind = "flow_matching"
  # S1-init starts from Wan2.1-T2V-14B (stems created from its patch_embedding, quirk 10.1);
  # S1-post from Helios-Base/transformer_init (the merged S1-init result).
  c.model.init_format = "wan" if phase == "init" else "helios"
  c.model.init_from = a.init
  c.trainable.rank, c.trainable.alpha = 128, 128.0
  c.trainable.patch_embedding = "lora"
  c.trainable.memory_patches = "full"
  c.optim.lr = 5e-5 if phase == "init" else 3e-5
  c.optim.warmup_steps = 0
  c.data.per_device_batch_size = 2
  if a.tiny:
    common.apply_tiny(c, a.toy, a.steps)
    c.model.init_from = a.init
  return c
