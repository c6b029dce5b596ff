r"""Stage 3b (Helios-Distilled): Adversarial Hierarchical Distillation (spec §7.5, §7.6).

Generator: the ODE-regressed student + a fresh LoRA r256 (linears + stems), rolled out with the
2/2/2 pyramid schedule (4 steps per stage for an all-zero history) and one random exit step per
stage. Real score: Helios-Base (frozen, CFG 3 against the negative prompt); fake score: the same
base with a critic LoRA r256. DMD2 gradient, Beta(4, 1.5) -> uniform timesteps over 500 steps,
linear shift, clamp [20, 980]; the generator is updated every 5th step (AdamW 2e-6), the critic
every step (4e-7); EMA 0.99 after step 750. Variant "gan": 5 discriminator heads on the critic
backbone (blocks 5/15/25/35 + output), 50% crops, softplus losses 0.05 / 0.01, approximate R1
(100, 0.1) from step 1000, and 10% blur in the history corruption.

Launch:
  python -m helios_jax.train --config=experiments/stage3_dmd.py[:gan] \
      --config.model.init_from=/ckpt/Helios-Distilled/transformer_ode \
      --config.score_model.init_from=/ckpt/Helios-Base/transformer \
      --config.stage3.negative_text=/data/negative_prompt_embed.npy \
      --config.data.data_dir=/data/latents --workdir=/runs/stage3_dmd
  python -m helios_jax.training.merge --workdir=/runs/stage3_dmd --ema \
      --out=/ckpt/Helios-Distilled/transformer

CPU miniature:
  python -m helios_jax.train --config=experiments/stage3_dmd.py:tiny[,gan] --workdir=/tmp/s3
"""

try:
  from experiments import common
except ImportError:  # launched from outside the repository root
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import common  # pylint: disable=g-import-not-at-top
import ml_collections

from helios_jax.training import settings
from helios_jax.training import stage3


def get_config(arg=None):
  """Stage 3b config; arg: "gan", "tiny", "init=<student>", "score=<Base>", "steps=N"."""
  a = common.parse_arg(arg, gan=False, tiny=False, init="", score="", toy="", steps=20)
  c = common.base_config()
  common.add_stage3_groups(c)
  c.stage = "stage3_dmd_gan" if a.gan else "stage3_dmd"
  c.seed = 49
  c.objective.kind = "dmd"
  c.model.init_format = "helios"
  c.model.init_from = a.init
  c.score_model = ml_collections.ConfigDict(c.model.to_dict())
  c.score_model.init_from = a.score
  c.score_model.seed = 1
  c.ema.update_after_step = 750
  c.drop.update(dict(enabled=True, p_t2v=0.4, p_i2v=0.0, p_v2v=0.5))
  c.corrupt.update(dict(mode="random" if a.gan else "noise", saturation=True))
  c.stage3.gan.enabled = a.gan
  # Critic: LoRA r256 on every Linear of the score base (stems / patch_embedding frozen).
  c.critic = settings.to_configdict(stage3.CriticConfig())
  c.critic.trainable.update(dict(rank=256, alpha=256.0, linears="lora",
                                 patch_embedding="frozen", memory_patches="frozen"))
  c.critic.optim.update(dict(lr=4e-7, warmup_steps=0, b1=0.0, b2=0.999, weight_decay=1e-3,
                             grad_clip=10.0))
  if a.tiny:
    common.apply_tiny(c, a.toy, a.steps)
    c.model.init_from = a.init
    c.score_model.update(dict(preset="tiny", param_dtype="float32", attention="xla",
                              init_from=a.score))
    c.trainable.patch_embedding = "frozen"
    c.critic.trainable.update(dict(rank=8, alpha=8.0))
    c.optim.update(dict(lr=2e-4, weight_decay=1e-3))
    c.critic.optim.lr = 1e-3
    c.stage3.update(dict(gen_update_ratio=2, beta_anneal_steps=10))
    c.stage3.gan.update(dict(start_step=2, head_width=32, head_groups=8))
    c.ema.update_after_step = 2
  return c
