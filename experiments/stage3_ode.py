r"""Stage 3a (Helios-Distilled init): ODE regression on teacher trajectories (spec §7.4).

The student (merged Helios-Mid + LoRA r256 on every Linear and the memory stems) regresses the
stage endpoints of Helios-Mid's CFG trajectories recorded at the student's timesteps:
x0_hat = x_t - sigma_t v, loss 80 * mean over 3 random sections x 3 pyramid stages of
0.5 mean((x0_hat - e_k)^2), teacher-forced history from the teacher's outputs. AdamW 2e-6,
betas (0, 0.999), wd 1e-3, clip 10, EMA 0.99 from step 250, batch 1 per device.

Launch:
  python -m helios_jax.training.ode_pairs --teacher=/ckpt/Helios-Mid/transformer \
      --data_source=tfds --data_dir=/data/latents --out=/data/ode_pairs
  python -m helios_jax.train --config=experiments/stage3_ode.py \
      --config.model.init_from=/ckpt/Helios-Mid/transformer \
      --config.data.data_dir=/data/ode_pairs --workdir=/runs/stage3_ode
  python -m helios_jax.training.merge --workdir=/runs/stage3_ode --ema \
      --out=/ckpt/Helios-Distilled/transformer_ode

CPU miniature (alone: the random tiny base is the teacher; its ODE pairs are recorded into
<workdir>/tiny_pairs before training, the teacher written to <workdir>/tiny_teacher):
  python -m helios_jax.train --config=experiments/stage3_ode.py:tiny --workdir=/tmp/s3_ode
or on given pairs / teacher (`python -m helios_jax.training.ode_pairs` first):
  python -m helios_jax.train --config=experiments/stage3_ode.py:tiny,data=/tmp/pairs,init=MID \
      --workdir=/tmp/s3_ode
"""

try:
  from experiments import common
except ImportError:  # launched from outside the repository root
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import common  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  """Stage 3a config; arg: "tiny", "init=<teacher dir>", "data=<ode pairs dir>", "steps=N"."""
  a = common.parse_arg(arg, tiny=False, init="", data="", steps=20)
  c = common.base_config()
  common.add_stage3_groups(c)
  c.stage = "stage3_ode"
  c.seed = 47
  c.objective.kind = "ode_regression"
  c.model.init_format = "helios"  # Helios-Mid/transformer
  c.model.init_from = a.init
  c.ema.update_after_step = 250
  c.drop.enabled = False        # no random drop, no corruption (teacher history is clean)
  c.corrupt.mode = "none"
  c.data.source = "ode_pairs"
  c.data.data_dir = a.data
  if a.tiny:
    common.apply_tiny(c, "", a.steps)
    c.model.init_from = a.init
    c.data.source = "ode_pairs"
    c.data.data_dir = a.data
    c.data.global_batch_size = 1
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-3
    c.trainable.patch_embedding = "frozen"
    c.ema.update_after_step = 2
    c.stage3.record_tiny_pairs = not a.data
  return c
