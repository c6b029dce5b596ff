"""Stage 3: ODE regression and Adversarial Hierarchical Distillation (spec training.md §7.4-7.6).

Everything here is a pure function of arrays, run inside the trainer's jitted step; the model
arguments are `ModelFn`s, `model_fn(x [B, T, h, w, C], t [B], text [B, L, D], frame_idx [B, T],
hist) -> v`, closed over (base, LoRA) by the trainer, so the same code drives the generator
(student base + generator LoRA), the real score (score base, adapter off) and the fake score
(score base + critic LoRA: one copy of the score weights, spec §7.5).

Stage 3a, ODE regression (`ode_regression_loss`): teacher-forced history from the teacher's
final outputs, `num_sections` of the recorded sections chosen at random (in order), and for each
pyramid stage one recorded x_t; loss = weight * mean over terms of 0.5 mean((x0_hat - e_k)^2),
x0_hat = x_t - sigma_t v (sigma by nearest-timestep lookup in the shifted stage table).

Stage 3b, DMD (`generator_loss`, `critic_loss`): the staged backward simulation (`rollout`)
with one random exit step per pyramid stage (gradient only through the exit step), the DMD2
gradient g = (f - r) / mean|x_hat - r| with r the CFG'd real score and f the fake score, the
flow-matching critic on the generator's samples, and the optional GAN heads (`gan.py`) on the
fake-score backbone.

Precision decision (DMD gradient): the reference forms 0.5 mean((x - sg(x - g))^2) in float64
so that x - (x - g) recovers g. We never form that difference: the step differentiates the
surrogate sum(sg(g / N) * x_hat), whose gradient is exactly g / N in fp32, and report the
reference's value 0.5 mean(g^2) (= the float64 loss) as the loss. No float64 is needed.

Critic step decisions (quirks 6-7): the GAN variant's critic gradient is that of
L_fake + L_D + R1 with one optimizer step and the config's clipping (10), i.e. the reference's
"low-VRAM GAN mode" with its two backward calls accumulated, not DeepSpeed's implicit second
step or its 1.0 clip. Draws #1 and #2 of a DMD step are two consecutive batches of the input
pipeline (two clips, each with its own caption) rather than two sections of one clip.

Timestep convention (quirk 14): every network call of Stage 3 gets float timesteps (the
training convention); the DMD / critic scoring timesteps are rounded integers as in the
reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax import sampling
from helios_jax import variants
from helios_jax.schedulers import pyramid as pyr
from helios_jax.schedulers import tables
from helios_jax.training import corrupt as corrupt_lib
from helios_jax.training import gan as gan_lib
from helios_jax.training import losses
from helios_jax.training import sample as sample_lib
from helios_jax.training import settings
from helios_jax.training import student as student_lib

F32 = jnp.float32
ModelFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Stage3Config:
  """Stage 3 settings, the `stage3` config group (spec §7.0 columns S3-ODE / S3-post, §11.1).

  Attributes:
    student_steps: student steps per pyramid stage ((2, 2, 2): 6 calls per chunk).
    amplify_first_chunk: doubled steps when the whole history is zero.
    ode_weight: ODE regression weight (80).
    ode_sections: sections per ODE step (3 of the recorded 5).
    gen_update_ratio: the generator is updated when step % ratio == 0 (5).
    real_guidance: real-score CFG (3.0: r = r_c + 3 (r_c - r_u)).
    beta_a, beta_b, beta_anneal_steps: generator timestep Beta(1 + 3c, 1 + 0.5c) annealed to
      uniform over `beta_anneal_steps` (4, 1.5, 500).
    t_clamp: scoring timesteps clamped to this range ([20, 980]).
    critic_u_min: critic u ~ U(critic_u_min, 1) (0.001).
    gan: the GAN variant's settings (`stage3.gan`, off by default).
    negative_text: `.npy` [L, D] of the negative prompt's embedding ("" -> zeros).
    record_tiny_pairs: CPU miniature (ODE regression with an empty `data.data_dir`): before
      training, record a small ODE-pair dataset of the run's own base model (the teacher) into
      `<workdir>/tiny_pairs` (`trainer.record_tiny_pairs`).
    drop: conditioning drop of the two section draws (derived: the `drop` group).
    corrupt: history corruption (noise / blur) seen by every network (derived: the `corrupt`
      group without saturation).
    saturation: saturation applied inside the student rollout only (derived:
      `corrupt.saturation`).
  """

  student_steps: tuple[int, ...] = variants.VARIANTS["distilled"].default_steps
  amplify_first_chunk: bool = variants.VARIANTS["distilled"].amplify_first_chunk
  ode_weight: float = 80.0
  ode_sections: int = 3
  gen_update_ratio: int = 5
  real_guidance: float = 3.0
  beta_a: float = 4.0
  beta_b: float = 1.5
  beta_anneal_steps: int = 500
  t_clamp: tuple[float, float] = (20.0, 980.0)
  critic_u_min: float = 0.001
  gan: gan_lib.GanConfig = gan_lib.GanConfig()
  negative_text: str = ""
  record_tiny_pairs: bool = False
  drop: sample_lib.DropConfig = settings.derived(
      sample_lib.DropConfig(p_t2v=0.4, p_i2v=0.0, p_v2v=0.5))
  corrupt: corrupt_lib.CorruptConfig = settings.derived(corrupt_lib.CorruptConfig())
  saturation: bool = settings.derived(True)

  def __post_init__(self):
    if len(self.student_steps) != pyr.NUM_STAGES or min(self.student_steps) < 1:
      raise ValueError(f"student_steps={self.student_steps} must be {pyr.NUM_STAGES} counts >= 1")
    if self.gen_update_ratio < 1:
      raise ValueError(f"gen_update_ratio={self.gen_update_ratio} must be >= 1")
    if self.ode_sections < 1:
      raise ValueError(f"ode_sections={self.ode_sections} must be >= 1")
    lo, hi = self.t_clamp
    if not 0 <= lo < hi <= 1000:
      raise ValueError(f"t_clamp={self.t_clamp} must satisfy 0 <= lo < hi <= 1000")


# ------------------------------------------------------------------------------------------
# History of the score networks and of the rollout.


def prepare_history(key: jax.Array, batch: dict[str, jax.Array], cfg: Stage3Config):
  """(hist for the score networks, hist for the rollout, text, stats) of one section draw.

  The drop and the noise / blur corruption are shared; saturation (when on) is applied to the
  rollout's copy only, so the scores see the noise-corrupted but unsaturated history (spec §5).
  """
  k_drop, k_cor, k_sat = jax.random.split(key, 3)
  history, anchor, mode, _ = sample_lib.random_drop(k_drop, batch["history"], batch["anchor"],
                                                    cfg.drop)
  plain = dataclasses.replace(cfg.corrupt, saturation=False)
  history, anchor = corrupt_lib.corrupt_history(k_cor, history, anchor, plain)
  hist = sample_lib.history_inputs(history, anchor)
  if cfg.saturation:
    sat_cfg = dataclasses.replace(cfg.corrupt, mode="none", saturation=True)
    h_sat, a_sat = corrupt_lib.corrupt_history(k_sat, history, anchor, sat_cfg)
    hist_sat = sample_lib.history_inputs(h_sat, a_sat)
  else:
    hist_sat = hist
  zero = ~jnp.any(jnp.concatenate([history, anchor], axis=1) != 0, axis=(1, 2, 3, 4))
  stats = {"frac_t2v": jnp.mean(mode == sample_lib.T2V), "frac_zero_history": jnp.mean(zero)}
  return hist, hist_sat, batch["text"], zero, stats


# ------------------------------------------------------------------------------------------
# Staged backward simulation.


def _student_table(stage: student_lib.StageSchedule) -> tables.DMDTable:
  """The DMD steps of one student stage, every sigma by nearest-timestep lookup in the stage's
  shifted table (`StageSchedule.sigmas`; sigma_next = the next step's, 0 after the last)."""
  sched = tables.Schedule(timesteps=np.asarray(stage.timesteps, np.float64),
                          sigmas=np.append(stage.sigmas, 0.0), stage_index=stage.level)
  # `dmd_table` takes each step's sigma from the schedule entry nearest to its truncated
  # timestep: the step itself while the steps lie more than 1 apart (checked below).
  table = tables.dmd_table(sched)
  if not np.array_equal(table.sigma, stage.sigmas):
    raise ValueError(f"student stage {stage.level}: timesteps {stage.timesteps} lie too close "
                     "together for a DMD table")
  return table


def _per_sample_table(plain: student_lib.StageSchedule, ampl: student_lib.StageSchedule,
                      amp: jax.Array) -> tables.DMDTable:
  """`[m, B, ...]` DMD steps of one stage: sample b follows the amplified schedule where
  `amp[b]`, else the plain one; the shorter schedule is padded with its last step (never run:
  exits lie below each sample's step count)."""
  rows = [_student_table(plain), _student_table(ampl)]
  m = max(plain.num_steps, ampl.num_steps)
  pad = lambda a: np.concatenate([a, np.repeat(a[-1:], m - a.shape[0], axis=0)])

  def pick(p, a):
    sel = amp.reshape((1, -1) + (1,) * (np.ndim(p) - 1))
    return jnp.where(sel, jnp.asarray(pad(a))[:, None], jnp.asarray(pad(p))[:, None])

  return jax.tree.map(pick, *rows)


def rollout(gen_fn: ModelFn, gen_fn_nograd: ModelFn, key: jax.Array, text: jax.Array, hist,
            zero_history: jax.Array, eps: jax.Array, cfg: Stage3Config) -> tuple[jax.Array, dict]:
  """The student's staged backward simulation of one chunk (spec §7.5).

  The samplers' stage loop (`sampling.run_stages`, DMD with exit steps): stage k starts from
  the pyramid start point s_k (stage 0: the twice-downsampled noise; later: upsampled previous
  endpoint + block-noise renoise). One exit index e_k is drawn per stage (one uniform shared by
  the batch, as the reference's rank-synced flag; e_k < each sample's step count); the e_k
  steps before it run without gradient (`schedulers.dmd_step`: x <- (1 - sigma') x0 +
  sigma' s_k), the exit step runs with gradient and its x0 is the stage endpoint.

  Args:
    gen_fn: generator forward (gradient flows to its trainables).
    gen_fn_nograd: the same forward with stop-gradient trainables (for the no-grad steps).
    key: PRNG key (exit indices, block noise).
    text: `[B, L, D]`.
    hist: history inputs of the rollout (saturated copy).
    zero_history: `[B]` bool: the whole history is zero (amplified schedule when enabled).
    eps: `[B, 9, H, W, C]` full-resolution noise.
    cfg: settings.

  Returns:
    (x_hat `[B, 9, H, W, C]` fp32 with gradient to the generator, {"exit{k}": e_k}).
  """
  b, t_frames, h, w, c = eps.shape
  plain = student_lib.student_schedule(tuple(cfg.student_steps), h, w, False)
  ampl = student_lib.student_schedule(tuple(cfg.student_steps), h, w, True)
  const = pyr.HELIOS_PYRAMID
  n = const.num_stages
  amp = zero_history & cfg.amplify_first_chunk                       # [B]
  keys = jax.random.split(key, 2 * n)
  sizes = pyr.stage_latent_sizes(h, w, n)
  block = tuple(jax.random.normal(keys[2 * k + 1], (b, t_frames, *sizes[k - 1], c, 4), F32)
                for k in range(1, n))
  exits = []
  for k in range(n):
    n_steps = jnp.where(amp, ampl[k].num_steps, plain[k].num_steps)  # [B]
    u = jax.random.uniform(keys[2 * k], (), F32)
    exits.append(jnp.minimum(jnp.floor(u * n_steps).astype(jnp.int32), n_steps - 1))
  idx = sample_lib.noisy_indices(b)

  def denoiser(model_fn):  # training convention: float timesteps (quirk 14), fp32 velocity
    return lambda x, step: model_fn(x, step.timestep.astype(F32), text, idx, hist).astype(F32)

  traj = sampling.run_stages(
      eps, [_per_sample_table(plain[k], ampl[k], amp) for k in range(n)],
      [denoiser(gen_fn)] * n, "dmd", block=block, constants=const, noise_dtype=F32,
      exits=exits, denoise_nograd=[denoiser(gen_fn_nograd)] * n)
  return traj.output, {f"exit{k}": jnp.mean(e.astype(F32)) for k, e in enumerate(exits)}


# ------------------------------------------------------------------------------------------
# Scoring timesteps.


def scoring_table(height: int, width: int, patch=(1, 2, 2), window: int = 9):
  """The linear-shifted full-resolution 1000-entry (t, sigma) table of the score networks."""
  seq = window * height * width // int(np.prod(patch))
  mu = tables.calculate_shift(seq)
  sig = tables.time_shift(mu, losses.stage1_sigma_table().astype(np.float64), "linear")
  return np.asarray(1000.0 * sig, np.float32), np.asarray(sig, np.float32), float(mu)


def _shift_clamp_round(u: jax.Array, mu: float, t_clamp) -> jax.Array:
  s = mu * u / (1.0 + (mu - 1.0) * u)   # linear time shift
  return jnp.round(jnp.clip(1000.0 * s, t_clamp[0], t_clamp[1]))


def beta_parameters(step: jax.Array, cfg: Stage3Config) -> tuple[jax.Array, jax.Array]:
  """(a, b) = (1 + (beta_a - 1) c, 1 + (beta_b - 1) c), c = 0.5 (1 + cos(pi min(step/N, 1)))."""
  c = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(
      jnp.asarray(step, F32) / max(cfg.beta_anneal_steps, 1), 1.0)))
  return 1.0 + (cfg.beta_a - 1.0) * c, 1.0 + (cfg.beta_b - 1.0) * c


def _scoring_timesteps(u: jax.Array, height: int, width: int, cfg: Stage3Config):
  """u in [0, 1] -> (timesteps: linear shift, clamp, round; sigmas by nearest lookup)."""
  table_t, table_s, mu = scoring_table(height, width)
  t = _shift_clamp_round(u, mu, cfg.t_clamp)
  return t, student_lib.nearest_sigma(t, table_t, table_s)


def generator_timesteps(key, b: int, step, height: int, width: int, cfg: Stage3Config):
  """`[B]` DMD scoring timesteps (Beta -> uniform annealed, linear shift, clamp, round) and
  their sigmas by nearest lookup."""
  a, bb = beta_parameters(step, cfg)
  return _scoring_timesteps(jax.random.beta(key, a, bb, (b,), F32), height, width, cfg)


def critic_timesteps(key, b: int, height: int, width: int, cfg: Stage3Config):
  """`[B]` critic timesteps: u ~ U(u_min, 1), linear shift, clamp, round; sigmas by lookup."""
  u = jax.random.uniform(key, (b,), F32, cfg.critic_u_min, 1.0)
  return _scoring_timesteps(u, height, width, cfg)


# ------------------------------------------------------------------------------------------
# Losses.


def dmd_loss(x_hat: jax.Array, fake_x0: jax.Array, real_x0: jax.Array):
  """The DMD2 loss with the exact gradient g / N (see module docstring).

  Args:
    x_hat: `[B, ...]` generator sample (differentiated).
    fake_x0, real_x0: `[B, ...]` score x0 predictions (treated as constants).

  Returns:
    (loss, g): loss's value is 0.5 mean(g^2) (the reference's float64 value) and its gradient
    w.r.t. x_hat is g / x_hat.size; g = (f - r) / mean_{per sample}|x_hat - r|, NaNs zeroed.
  """
  xs = jax.lax.stop_gradient(x_hat.astype(F32))
  f = jax.lax.stop_gradient(fake_x0.astype(F32))
  r = jax.lax.stop_gradient(real_x0.astype(F32))
  axes = tuple(range(1, xs.ndim))
  norm = jnp.mean(jnp.abs(xs - r), axis=axes, keepdims=True)
  g = jnp.nan_to_num((f - r) / norm, nan=0.0, posinf=0.0, neginf=0.0)
  n = x_hat.size
  surrogate = jnp.sum(g * x_hat.astype(F32)) / n
  value = 0.5 * jnp.mean(jnp.square(g))
  return surrogate + jax.lax.stop_gradient(value - surrogate), g


def ode_regression_loss(model_fn: ModelFn, batch: dict[str, jax.Array], key: jax.Array,
                        cfg: Stage3Config):
  """Stage 3a loss on one batch of ODE-pair records (spec §7.4).

  Args:
    model_fn: the student.
    batch: `ode_pairs` records stacked on batch: "text" `[B, L, D]`; per stage k "xt{k}"
      `[B, S, M_k, 9, h_k, w_k, C]`, "t{k}" `[B, S, M_k]`, "n{k}" `[B, S]`, "end{k}"
      `[B, S, 9, h_k, w_k, C]`.
    key: PRNG key (section choice, recorded-step choice).
    cfg: settings (ode_sections, ode_weight, student_steps).

  Returns:
    (loss, aux).
  """
  num_sections = batch["end0"].shape[1]
  if cfg.ode_sections > num_sections:
    raise ValueError(f"ode_sections={cfg.ode_sections} > the {num_sections} recorded sections")
  text = batch["text"]
  b = text.shape[0]
  k_sec, k_step = jax.random.split(key)
  # `ode_sections` distinct sections, walked in order (a random subset of a fixed size).
  chosen = jax.random.permutation(k_sec, num_sections)[:cfg.ode_sections]
  selected = jnp.zeros((num_sections,), bool).at[chosen].set(True)
  last = pyr.NUM_STAGES - 1
  height, width = batch[f"end{last}"].shape[3:5]
  plain = student_lib.student_schedule(tuple(cfg.student_steps), height, width, False)
  finals = batch[f"end{last}"].astype(F32)                       # [B, S, 9, H, W, C]
  state = sampling.empty_history(b, height, width, finals.shape[-1])
  idx = sample_lib.noisy_indices(b)
  total = 0.0
  aux = {}
  for s in range(num_sections):
    hist = sampling.history_inputs(state)
    for k in range(pyr.NUM_STAGES):
      xt_all, t_all = batch[f"xt{k}"][:, s], batch[f"t{k}"][:, s]
      n_valid = batch[f"n{k}"][:, s]
      u = jax.random.uniform(jax.random.fold_in(k_step, s * pyr.NUM_STAGES + k), (b,))
      j = jnp.minimum((u * n_valid).astype(jnp.int32), n_valid - 1)
      x_t = jnp.take_along_axis(xt_all, j[:, None, None, None, None, None], axis=1)[:, 0]
      t = jnp.take_along_axis(t_all, j[:, None], axis=1)[:, 0].astype(F32)
      sigma = student_lib.lookup_sigma(t, plain[k])
      term = jax.lax.cond(
          selected[s],
          lambda x_t=x_t, t=t, sigma=sigma, hist=hist, k=k, s=s: 0.5 * jnp.mean(jnp.square(
              student_lib.flow_to_x0(model_fn(x_t, t, text, idx, hist), x_t, sigma)
              - batch[f"end{k}"][:, s].astype(F32))),
          lambda: jnp.zeros((), F32))
      total = total + term
      aux[f"ode_stage{k}"] = aux.get(f"ode_stage{k}", 0.0) + term / cfg.ode_sections
    # teacher forcing: the teacher's section output joins the history (anchor after section 0)
    state = sampling.advance(state, finals[:, s], s == 0)
  loss = cfg.ode_weight * total / (cfg.ode_sections * pyr.NUM_STAGES)
  return loss, aux


def critic_flow_loss(fake_fn: ModelFn, x_hat: jax.Array, eps: jax.Array, t: jax.Array,
                     sigma: jax.Array, text: jax.Array, hist) -> tuple[jax.Array, jax.Array]:
  """L_fake = mean((v_phi(x_c, t) - (eps - x_hat))^2) with x_c = (1 - sigma) x_hat + sigma eps.

  Returns:
    (loss, x_c).
  """
  x_hat = jax.lax.stop_gradient(x_hat.astype(F32))
  s = student_lib.per_sample(sigma, x_hat)
  x_c = (1.0 - s) * x_hat + s * eps
  v = fake_fn(x_c, t, text, sample_lib.noisy_indices(x_hat.shape[0]), hist)
  return jnp.mean(jnp.square(v.astype(F32) - (eps - x_hat))), x_c


def score_x0(model_fn: ModelFn, x_t: jax.Array, t: jax.Array, sigma: jax.Array,
             text: jax.Array, hist) -> jax.Array:
  """Stop-gradient x0 prediction of a score network."""
  v = model_fn(x_t, t, text, sample_lib.noisy_indices(x_t.shape[0]), hist)
  return jax.lax.stop_gradient(student_lib.flow_to_x0(v, x_t, sigma))


def real_score_x0(real_fn: ModelFn, x_t, t, sigma, text, neg_text, hist, scale: float):
  """r = r_c + scale (r_c - r_u), one batched forward over [cond | uncond]."""
  b = x_t.shape[0]
  two = lambda a: jnp.concatenate([a, a], axis=0)
  hist2 = losses.repeat_hist(hist, 2)
  r = score_x0(real_fn, two(x_t), two(t), two(sigma), jnp.concatenate([text, neg_text], 0),
               hist2)
  rc, ru = r[:b], r[b:]
  return rc + scale * (rc - ru)


def generator_dmd_loss(gen_fn, gen_fn_nograd, real_fn, fake_fn, batch, neg_text, key, step,
                       cfg: Stage3Config, gan_g_fn=None):
  """The generator's loss of one step (spec §7.5 "Generator loss").

  Args:
    gen_fn, gen_fn_nograd: generator forwards (with / without gradient to its trainables).
    real_fn: real score (score base, adapter off).
    fake_fn: fake score (score base + critic LoRA), treated as constant.
    batch: section draw #1 {"history", "anchor", "target", "text"}.
    neg_text: `[B, L, D]` negative-prompt embeddings.
    key: PRNG key.
    step: the global step (timestep annealing, GAN start).
    cfg: settings.
    gan_g_fn: optional `(x_noisy, t, text, hist, key) -> G loss` (the frozen discriminator's
      cached-gradient generator loss), active from `cfg.gan.start_step`.

  Returns:
    (loss, aux).
  """
  k_hist, k_roll, k_eps, k_t, k_noise, k_gan, k_fresh = jax.random.split(key, 7)
  hist, hist_sat, text, zero, stats = prepare_history(k_hist, batch, cfg)
  target = batch["target"]
  b, _, h, w, _ = target.shape
  eps0 = jax.random.normal(k_eps, target.shape, F32)
  x_hat, aux = rollout(gen_fn, gen_fn_nograd, k_roll, text, hist_sat, zero, eps0, cfg)
  t, sigma = generator_timesteps(k_t, b, step, h, w, cfg)
  noise = jax.random.normal(k_noise, x_hat.shape, F32)
  s = student_lib.per_sample(sigma, x_hat)
  x_t = (1.0 - s) * jax.lax.stop_gradient(x_hat) + s * noise
  f = score_x0(fake_fn, x_t, t, sigma, text, hist)
  r = real_score_x0(real_fn, x_t, t, sigma, text, neg_text, hist, cfg.real_guidance)
  loss, g = dmd_loss(x_hat, f, r)
  aux = {**aux, **stats, "dmd_loss": loss, "dmd_t_mean": jnp.mean(t),
         "dmd_grad_abs": jnp.mean(jnp.abs(g))}
  if cfg.gan.enabled and gan_g_fn is not None:
    fresh = jax.random.normal(k_fresh, x_hat.shape, F32)
    x_g = (1.0 - s) * x_hat + s * fresh
    active = jnp.asarray(step) >= cfg.gan.start_step
    g_loss = jax.lax.cond(active, lambda: gan_g_fn(x_g, t, text, hist, k_gan),
                          lambda: jnp.zeros((), F32))
    loss = loss + g_loss
    aux["gan_g_loss"] = g_loss
  return loss, aux


def critic_loss(gen_fn_nograd, fake_fn, batch2, batch1, key, step, cfg: Stage3Config,
                gan_d_fn=None):
  """The critic's loss of one step (spec §7.5 "Critic loss", §7.6 D + R1).

  Args:
    gen_fn_nograd: the generator (no gradient) for the rollout of draw #2.
    fake_fn: fake score (differentiated w.r.t. the critic LoRA).
    batch2: section draw #2 (history, text of the critic step).
    batch1: section draw #1 (its target is the GAN's real sample, quirk 5).
    key: PRNG key.
    step: global step (GAN start).
    cfg: settings.
    gan_d_fn: optional `(x_fake_t, x_real_t, t, text, hist, key) -> (D loss, R1)`.

  Returns:
    (loss, aux).
  """
  k_hist, k_roll, k_eps, k_t, k_noise, k_gan = jax.random.split(key, 6)
  hist, hist_sat, text, zero, _ = prepare_history(k_hist, batch2, cfg)
  target = batch2["target"]
  b, _, h, w, _ = target.shape
  eps0 = jax.random.normal(k_eps, target.shape, F32)
  x_hat, _ = rollout(gen_fn_nograd, gen_fn_nograd, k_roll, text, hist_sat, zero, eps0, cfg)
  x_hat = jax.lax.stop_gradient(x_hat)
  t, sigma = critic_timesteps(k_t, b, h, w, cfg)
  noise = jax.random.normal(k_noise, x_hat.shape, F32)
  loss, x_c = critic_flow_loss(fake_fn, x_hat, noise, t, sigma, text, hist)
  aux = {"critic_fm_loss": loss, "critic_t_mean": jnp.mean(t)}
  if cfg.gan.enabled and gan_d_fn is not None:
    s = student_lib.per_sample(sigma, x_hat)
    real_t = (1.0 - s) * batch1["target"].astype(F32) + s * noise
    active = jnp.asarray(step) >= cfg.gan.start_step
    d_loss, r1 = jax.lax.cond(active, lambda: gan_d_fn(x_c, real_t, t, text, hist, k_gan),
                              lambda: (jnp.zeros((), F32), jnp.zeros((), F32)))
    loss = loss + d_loss + r1
    aux.update(gan_d_loss=d_loss, gan_r1=r1)
  return loss, aux


# ------------------------------------------------------------------------------------------
# EMA.


def ema_decay(num_updates: jax.Array, update_after_step: int, max_decay: float) -> jax.Array:
  """decay = 0 while k <= 0 else min((1 + k) / (10 + k), max), k = n - update_after - 1."""
  k = jnp.asarray(num_updates, F32) - float(update_after_step) - 1.0
  return jnp.where(k <= 0, 0.0, jnp.minimum((1.0 + k) / (10.0 + k), max_decay))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """ema <- ema - (1 - decay) (ema - params), leaf by leaf (fp32)."""
  return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p.astype(e.dtype)), ema, params)
