"""The Stage 3 pieces of the trainer: settings, model closures, EMA and the DMD step.

The trainer (`trainer.py`) stays one loop for every stage; Stage 3 adds

  * `CriticConfig` (the `critic` config group) and `EmaConfig` (`ema`); the `stage3` group is
    `distill.Stage3Config` with its `stage3.gan` sub-group `gan.GanConfig`;
  * ODE regression: the single-group step of Stages 1-2 with `distill.ode_regression_loss` as
    the objective, plus the EMA of the trainables;
  * DMD: `init_dmd_state` / `make_dmd_step`, a step that updates two trainable groups with
    separate optax states — the generator (LoRA on the student base; when
    step % gen_update_ratio == 0, first) and the critic (a second LoRA on the score base, plus
    the GAN heads) — and the generator EMA. The real score is the score base with the adapter
    off, so the frozen score weights exist once (spec §7.5, §8).

State of a DMD run (a dict, checkpointed like the others):
  step, rng, trainables (generator), opt_state, critic ({"lora", "full", ["gan"]}),
  critic_opt_state, ema (generator trainables), ema_count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from helios_jax.config import ConfigError
from helios_jax.training import distill
from helios_jax.training import gan
from helios_jax.training import lora
from helios_jax.training import losses
from helios_jax.training import optim
from helios_jax.training import sample as sample_lib

F32 = jnp.float32
EMPTY_TRAINABLES = {"lora": {}, "full": {}}


@dataclasses.dataclass(frozen=True)
class EmaConfig:
  """EMA of the trainables (spec §7.5 formula), the `ema` config group.

  Attributes:
    enabled: keep an EMA of the trainables.
    decay: maximum decay (0.99).
    update_after_step: EMA updates before the warm-up decay starts.
  """

  enabled: bool = False
  decay: float = 0.99
  update_after_step: int = 0


@dataclasses.dataclass(frozen=True)
class CriticConfig:
  """The DMD critic (fake score), the `critic` config group: its LoRA and its optimizer."""

  trainable: lora.TrainableSpec = lora.TrainableSpec()
  optim: optim.OptimConfig = optim.OptimConfig()


def with_history_settings(cfg: distill.Stage3Config, objective: losses.ObjectiveConfig
                          ) -> distill.Stage3Config:
  """`cfg` with the drop and corruption of the parsed `objective` (saturation split off: it
  runs inside the rollout only, `distill.prepare_history`)."""
  return dataclasses.replace(cfg, drop=objective.drop,
                             corrupt=dataclasses.replace(objective.corrupt, saturation=False),
                             saturation=objective.corrupt.saturation)


# ------------------------------------------------------------------------------------------
# Model closures.


def forward_factory(graphdef: nnx.GraphDef, constrain=None):
  """`make(base, trainables, spec, capture=()) -> model_fn` through the LoRA'd model.

  `constrain` is the DiT's hidden-state constraint at each block entry (the training mesh's
  `sharding.token_constraint`; None: none).
  """

  def make(base, trainables, spec: lora.TrainableSpec, capture=()):
    params, block_extra = lora.effective_params(base, trainables, spec)
    model = nnx.merge(graphdef, params)
    hook = lora.block_hook(spec)

    def model_fn(x, t, text, frame_idx, hist):
      return model.forward_channels_last(x, t, text, frame_idx, hist, block_hook=hook,
                                         block_extra=block_extra,
                                         capture_blocks=tuple(capture), constrain=constrain)

    return model_fn

  return make


def negative_text(path: str, text_len: int, text_dim: int):
  """`[text_len, text_dim]` fp32 negative-prompt embedding: a `.npy` file, or zeros for ""."""
  if not path:
    return np.zeros((text_len, text_dim), np.float32)
  try:
    arr = np.load(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"stage3.negative_text={path!r} cannot be read as .npy: {e}") from e
  arr = np.asarray(arr, np.float32)
  if arr.ndim == 3 and arr.shape[0] == 1:
    arr = arr[0]
  if arr.ndim != 2 or arr.shape[1] != text_dim or arr.shape[0] > text_len:
    raise ConfigError(f"stage3.negative_text={path!r} has shape {arr.shape}; expected "
                      f"[<= {text_len}, {text_dim}]")
  out = np.zeros((text_len, text_dim), np.float32)
  out[:arr.shape[0]] = arr
  return out


# ------------------------------------------------------------------------------------------
# EMA (shared by the ODE and DMD steps).


def ema_step(state: dict[str, Any], new_trainables: Any, do_update: jax.Array,
             cfg: EmaConfig) -> dict[str, Any]:
  """Counts and applies one EMA update where `do_update` (returns the state's EMA entries)."""
  count = state["ema_count"] + do_update.astype(jnp.int32)
  decay = distill.ema_decay(count, cfg.update_after_step, cfg.decay)
  updated = distill.ema_update(state["ema"], new_trainables, decay)
  ema = jax.tree.map(lambda u, e: jnp.where(do_update, u, e), updated, state["ema"])
  return {"ema": ema, "ema_count": count}


# ------------------------------------------------------------------------------------------
# DMD.


def make_heads(model_config, cfg: gan.GanConfig):
  """(graphdef, fp32 params) of the GAN heads on the score backbone, and the captured blocks."""
  blocks = tuple(cfg.blocks) or gan.head_blocks(model_config.num_layers)
  in_ch = tuple([model_config.inner_dim] * len(blocks)) + (model_config.out_dim,)
  heads = gan.DiscriminatorHeads(in_ch, width=cfg.head_width, groups=cfg.head_groups,
                                 rngs=nnx.Rngs(cfg.head_seed))
  graphdef, state = nnx.split(heads)
  return graphdef, jax.tree.map(lambda x: jnp.asarray(x, F32), nnx.to_pure_dict(state)), blocks


def init_critic(score_base, spec: lora.TrainableSpec, key, heads_params=None):
  """Critic trainables: a zero-B LoRA on the score base (+ the GAN heads)."""
  tr = lora.init_trainables(score_base, spec, key)
  if heads_params is not None:
    tr = dict(tr, gan=heads_params)
  return tr


def make_dmd_step(graphdef: nnx.GraphDef, gen_spec: lora.TrainableSpec,
                  critic_spec: lora.TrainableSpec, gen_tx, critic_tx, cfg: distill.Stage3Config,
                  ema_cfg: EmaConfig, gen_optim: optim.OptimConfig, constrain=None,
                  heads_graphdef=None, gan_blocks=()):
  """The pure DMD step: (state, base, batch1, batch2) -> (state, metrics).

  Args:
    graphdef: the DiT graphdef (student and score bases share the architecture).
    gen_spec, critic_spec: generator / critic trainable specs.
    gen_tx, critic_tx: the two optax transformations.
    cfg: Stage 3 settings (with the history settings, `with_history_settings`).
    ema_cfg: generator EMA settings.
    gen_optim: generator optimizer config (for the logged lr).
    constrain: per-block hidden-state constraint (context parallelism) or None.
    heads_graphdef: GAN heads graphdef (GAN variant).
    gan_blocks: blocks feeding the heads.

  Returns:
    `step(state, base, batch1, batch2)`; base = {"student": ..., "score": ...}; each batch
    {"history", "anchor", "target", "text", "neg_text"}.
  """
  make = forward_factory(graphdef, constrain)
  gc = cfg.gan

  def disc_logits(score_base, critic_tr, x, t, text, hist):
    v, feats = make(score_base, critic_tr, critic_spec, gan_blocks)(
        x, t, text, sample_lib.noisy_indices(x.shape[0]), hist)
    heads = nnx.merge(heads_graphdef, nnx.State(critic_tr["gan"]))
    return heads(list(feats) + [v])                                   # [B, n_heads]

  def crop(key, x):
    return gan.random_crop(key, x, gc.crop, multiple=2)

  def gen_loss_fn(gen_tr, critic_tr, base, batch, key, step):
    gen_fn = make(base["student"], gen_tr, gen_spec)
    gen_ng = make(base["student"], jax.lax.stop_gradient(gen_tr), gen_spec)
    critic_ng = jax.lax.stop_gradient(critic_tr)
    real_fn = make(base["score"], EMPTY_TRAINABLES, critic_spec)
    fake_fn = make(base["score"], critic_ng, critic_spec)
    def gan_g_fn(x_g, t, text, hist, k):
      xc = crop(k, x_g)
      loss_of_x = lambda xx: gan.g_loss(
          disc_logits(base["score"], critic_ng, xx, t, text, hist), gc.g_weight)
      return gan.cached_grad_surrogate(loss_of_x, xc)[1]
    return distill.generator_dmd_loss(gen_fn, gen_ng, real_fn, fake_fn, batch,
                                      batch["neg_text"], key, step, cfg,
                                      gan_g_fn if gc.enabled else None)

  def critic_loss_fn(critic_tr, gen_tr, base, batch2, batch1, key, step):
    gen_ng = make(base["student"], jax.lax.stop_gradient(gen_tr), gen_spec)
    fake_fn = make(base["score"], critic_tr, critic_spec)
    def gan_d_fn(x_fake, x_real, t, text, hist, k):
      k1, k2, k3, k4 = jax.random.split(k, 4)
      pert = x_real + gc.r1_sigma * jax.random.normal(k4, x_real.shape, F32)
      xs = jnp.concatenate([crop(k1, x_fake), crop(k2, x_real), crop(k3, pert)], axis=0)
      rep = lambda a: jnp.concatenate([a] * 3, axis=0)
      logits = disc_logits(base["score"], critic_tr, xs, rep(t), rep(text),
                           losses.repeat_hist(hist, 3))
      lf, lr, lp = jnp.split(logits, 3, axis=0)
      return gan.d_loss(lf, lr, gc.d_weight), gan.approx_r1(lr, lp, gc.r1_weight)
    return distill.critic_loss(gen_ng, fake_fn, batch2, batch1, key, step, cfg,
                               gan_d_fn if gc.enabled else None)

  def step_fn(state, base, batch1, batch2):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_gen, k_critic = jax.random.split(key)
    is_gen = (step % cfg.gen_update_ratio) == 0
    gen_tr, critic_tr = state["trainables"], state["critic"]

    def gen_update(_):
      (loss, aux), grads = jax.value_and_grad(gen_loss_fn, has_aux=True)(
          gen_tr, critic_tr, base, batch1, k_gen, step)
      gnorm = optax.global_norm(grads)
      updates, opt = gen_tx.update(grads, state["opt_state"], gen_tr)
      return optax.apply_updates(gen_tr, updates), opt, loss, gnorm, aux

    out_shape = jax.eval_shape(gen_update, None)

    def gen_skip(_):
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
      return (gen_tr, state["opt_state"]) + tuple(zeros[2:])

    new_gen, new_gen_opt, g_loss, g_norm, g_aux = jax.lax.cond(is_gen, gen_update, gen_skip,
                                                               None)
    (c_loss, c_aux), c_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
        critic_tr, new_gen, base, batch2, batch1, k_critic, step)
    c_norm = optax.global_norm(c_grads)
    c_updates, new_c_opt = critic_tx.update(c_grads, state["critic_opt_state"], critic_tr)
    new_critic = optax.apply_updates(critic_tr, c_updates)

    ok = (jnp.isfinite(g_loss) & jnp.isfinite(g_norm) & jnp.isfinite(c_loss)
          & jnp.isfinite(c_norm))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    do_ema = ok & ema_cfg.enabled & (is_gen | (step < ema_cfg.update_after_step))
    ema = ema_step(state, new_gen, do_ema, ema_cfg)
    new_state = dict(state, step=step + 1,
                     trainables=keep(new_gen, gen_tr),
                     opt_state=keep(new_gen_opt, state["opt_state"]),
                     critic=keep(new_critic, critic_tr),
                     critic_opt_state=keep(new_c_opt, state["critic_opt_state"]), **ema)
    metrics = {"loss": c_loss, "grad_norm": c_norm, "gen_loss": g_loss,
               "gen_grad_norm": g_norm, "gen_step": is_gen,
               "lr": optim.learning_rate(gen_optim, step), **g_aux, **c_aux}
    return new_state, metrics

  return step_fn
