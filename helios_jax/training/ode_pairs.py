"""Stage 3a teacher data: ODE pairs recorded from the Mid teacher (spec training.md §2.4, §7.4).

  python -m helios_jax.training.ode_pairs --teacher=<transformer folder> --out=<dir> \
      --data_source=synthetic --num_prompts=8 [--negative_text=neg.npy] [--num_sections=5]

What is recorded (the reference `tools/offload_data/get_ode-pairs.py` with
`helios/pipelines/pipeline_helios_ode.py`): the teacher (Helios-Mid: 3-stage pyramid, UniPC,
plain CFG 5.0 against a negative prompt embedding, linear dynamic shift) samples
`num_sections` 9-frame sections autoregressively. Per pyramid stage its 20-step schedule is
augmented so the trajectory passes (almost) through the student's timesteps:

  1. the teacher's pre-shift schedule `set_timesteps(20, k)` (timesteps linspace(t_max_k,
     t_lo_k, 20), sigmas linspace(0.999, 0.000999, 20) + [0]);
  2. the student's *pre-shift* timesteps (the DMD `set_timesteps(n + 1)` drop-last schedule
     without shift, rounded to 4 decimals as the reference hard-codes them: stage 0 {999,
     935.1279, 871.2559, 807.3838} amplified, {999, 871.2559} otherwise; resolution
     independent) that are not already teacher timesteps (|dt| >= 1e-4; the first one always
     is) are merged in, each with the sigma of the nearest entry of the stage's 1000-entry
     (timestep, sigma) table, and sorted by descending timestep;
  3. all sigmas are shifted linearly with mu of *that level's own* token count (540 / 2160 /
     8640 at 48x80) and timesteps recomputed as t_lo_k + sigma' (t_max_k - t_lo_k).

So a stage takes 20 + 2n - 1 = 23 steps in the amplified first section and 20 + n - 1 = 21
later (n = 2). The states are recorded at the teacher steps nearest to the student's actual
(shifted) timesteps (`student.student_schedule`, the list hard-coded in the reference at
384x640); because the inserted sigmas were snapped to the table, the recorded timesteps differ
from the student's by up to ~0.2 (834.08 vs 833.96; quirk 16: training feeds the recorded
value, harmless through the nearest-timestep sigma lookup).

As in the reference, the model sees the truncated (int) timestep, the recorded timesteps are
the float schedule values, x_t is the fp32 sample *before* the step (the input the teacher
saw), and the stage endpoint is the stage's final fp32 sample at that stage's resolution. The
last stage's endpoint is the section output: it enters the history (`sampling.advance`; the
anchor becomes the first latent of section 0's output).

Noise (quirk 12): the reference builds a fresh generator seeded 42 for every prompt, so every
trajectory starts from the same initial noise and block noise. `same_noise_per_prompt=True`
(default) keeps that: prompt p's draws depend only on (seed, section). With False each prompt
gets its own draws, keyed by (seed, prompt index, section), so results do not depend on the
batch size either way. The draws are JAX PRNG draws (not the reference's torch stream).

Negative prompt: the reference encodes its default negative prompt with umT5; the CLI takes
that embedding from `--negative_text=<file.npy>` (`[n, D]`, zero-padded to `--text_len`) and
uses an all-zero embedding when none is given (then CFG contrasts with "no text").

The dataset layout, its writer and its reader are `helios_jax.data.ode_pairs`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx

from helios_jax import runtime
from helios_jax import sampling
from helios_jax import variants
from helios_jax.data import ode_pairs as dataset
from helios_jax import schedulers as hs
from helios_jax.schedulers import pyramid as pyr
from helios_jax.schedulers import tables
from helios_jax.schedulers.config import HeliosSchedulerConfig
from helios_jax.training import student

F32 = jnp.float32
WINDOW = sampling.CHUNK_LATENT_FRAMES
# Two timesteps closer than this count as the same step (the reference's merge test).
MERGE_TOL = 1e-4
# Decimals of the pre-shift student timesteps hard-coded in the reference ODE pipeline.
PRE_SHIFT_DECIMALS = 4

# The teacher's scheduler: Helios-Mid's UniPC `HeliosScheduler` (solver order 2, bh2, lower
# order final, flow sigmas) with the ODE script's `--use_dynamic_shifting --time_shift_type
# linear` (the ODE pipeline shifts the merged schedule itself, see `teacher_stage_schedules`).
TEACHER_SCHEDULER = HeliosSchedulerConfig(use_dynamic_shifting=True, time_shift_type="linear")


# ------------------------------------------------------------------------------------------
# Schedules (host numpy, float64).


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherStage:
  """One pyramid stage of the augmented teacher schedule.

  Attributes:
    level: pyramid stage k.
    schedule: the merged, shifted `tables.Schedule` (N steps; feed it to `tables.unipc_table`).
    record_index: `[m]` int32 teacher step indices whose input states are recorded (one per
      student step, strictly increasing, index 0 first).
    student_timesteps: `[m]` the student's exact (shifted) timesteps they stand for.
  """

  level: int
  schedule: tables.Schedule
  record_index: np.ndarray
  student_timesteps: np.ndarray

  @property
  def num_steps(self) -> int:
    return self.schedule.num_steps

  @property
  def recorded_timesteps(self) -> np.ndarray:
    """`[m]` the teacher timesteps at `record_index` (what the dataset stores)."""
    return np.asarray(self.schedule.timesteps)[self.record_index]


def _per_stage(value: int | Sequence[int], stages: int, what: str) -> tuple[int, ...]:
  vals = (int(value),) * stages if np.ndim(value) == 0 else tuple(int(v) for v in value)
  if len(vals) != stages or min(vals) < 1:
    raise ValueError(f"{what}={value} must be one positive step count or one per pyramid stage "
                     f"({stages})")
  return vals


def teacher_stage_schedules(teacher_steps: int | Sequence[int] = 20,
                            student_steps: Sequence[int] = (2, 2, 2), height: int = 48,
                            width: int = 80, amplify: bool = False,
                            patch_size: Sequence[int] = (1, 2, 2),
                            scheduler: HeliosSchedulerConfig = TEACHER_SCHEDULER,
                            ) -> tuple[TeacherStage, ...]:
  """The teacher's per-stage UniPC schedules with the student's timesteps inserted.

  Args:
    teacher_steps: teacher steps per stage (20 in the reference), one int or one per stage.
    student_steps: student steps per stage ((2, 2, 2)); doubled when `amplify`.
    height, width: full-resolution latent size (48 x 80 at 384 x 640).
    amplify: the first section (empty history): 2n student steps per stage.
    patch_size: transformer patch (token count of the dynamic shift).
    scheduler: a UniPC `HeliosSchedulerConfig` with linear dynamic shifting.

  Returns:
    One `TeacherStage` per pyramid stage, lowest resolution first.
  """
  stages = int(scheduler.stages)
  return _teacher_stage_schedules(_per_stage(teacher_steps, stages, "teacher_steps"),
                                  _per_stage(student_steps, stages, "student_steps"),
                                  int(height), int(width), bool(amplify),
                                  tuple(int(p) for p in patch_size), scheduler)


@functools.lru_cache(maxsize=32)
def _teacher_stage_schedules(teacher_steps, student_steps, height, width, amplify, patch_size,
                             scheduler) -> tuple[TeacherStage, ...]:
  if scheduler.solver != "unipc":
    raise ValueError(f"the ODE teacher samples with UniPC; got solver={scheduler.solver!r}")
  if not scheduler.use_dynamic_shifting or scheduler.time_shift_type != "linear":
    raise ValueError("the ODE teacher schedule is defined for linear dynamic shifting "
                     f"(use_dynamic_shifting={scheduler.use_dynamic_shifting}, "
                     f"time_shift_type={scheduler.time_shift_type!r})")
  if tuple(scheduler.stage_range[:scheduler.stages + 1]) != tuple(
      student.TRAIN_SCHEDULER.stage_range[:scheduler.stages + 1]) or (
          scheduler.stages != student.TRAIN_SCHEDULER.stages
          or scheduler.gamma != student.TRAIN_SCHEDULER.gamma
          or scheduler.num_train_timesteps != student.TRAIN_SCHEDULER.num_train_timesteps):
    raise ValueError("the teacher scheduler's pyramid must equal the student's "
                     f"({student.TRAIN_SCHEDULER})")
  unshifted = dataclasses.replace(scheduler, use_dynamic_shifting=False)
  # The student's pre-shift timesteps: its DMD schedule without the dynamic shift.
  student_pre = dataclasses.replace(student.TRAIN_SCHEDULER, use_dynamic_shifting=False)
  students = student.student_schedule(student_steps, height, width, amplify, patch_size,
                                      WINDOW)
  const = pyr.constants_for(scheduler)
  seqs = pyr.stage_shift_seq_lens(WINDOW, height, width, scheduler.stages, patch_size,
                                  pre_upsample=False)
  out = []
  for k in range(scheduler.stages):
    base = tables.set_timesteps(unshifted, teacher_steps[k], stage_index=k)
    pre = tables.set_timesteps(student_pre, student_steps[k], stage_index=k,
                               amplify=amplify).timesteps
    # The reference hard-codes these values with 4 decimals; several lie exactly half way
    # between two table entries, so the rounding decides which sigma they snap to.
    pre = np.round(np.asarray(pre, np.float64), PRE_SHIFT_DECIMALS)
    base_t = np.asarray(base.timesteps, np.float64)
    new_t = np.asarray([t for t in pre if np.all(np.abs(base_t - t) >= MERGE_TOL)], np.float64)
    stage_t = np.asarray(const.stage_timesteps[k], np.float64)
    snap = np.argmin(np.abs(new_t[:, None] - stage_t[None, :]), axis=1) if new_t.size else []
    new_s = np.asarray(const.stage_sigmas, np.float64)[snap]
    merged_t = np.concatenate([base_t, new_t])
    merged_s = np.concatenate([np.asarray(base.sigmas[:-1], np.float64), new_s])
    order = np.argsort(-merged_t, kind="stable")
    sig = np.concatenate([merged_s[order], np.asarray(base.sigmas[-1:], np.float64)])
    mu = tables.calculate_shift(seqs[k])
    sig = tables.time_shift(mu, sig, "linear")
    t_min, t_max = float(stage_t.min()), float(stage_t.max())
    ts = t_min + sig[:-1] * (t_max - t_min)
    sched = tables.Schedule(timesteps=ts, sigmas=sig, stage_index=k, mu=float(mu))
    stud_t = np.asarray(students[k].timesteps, np.float64)
    idx = np.argmin(np.abs(ts[None, :] - stud_t[:, None]), axis=1).astype(np.int32)
    if np.any(np.diff(idx) <= 0):
      raise ValueError(f"stage {k}: student timesteps {stud_t} map to teacher steps {idx} "
                       "that are not distinct and increasing (too few teacher steps?)")
    out.append(TeacherStage(level=k, schedule=sched, record_index=idx,
                            student_timesteps=stud_t))
  return tuple(out)


# ------------------------------------------------------------------------------------------
# Recording one section.


@dataclasses.dataclass(frozen=True)
class OdeConfig:
  """Static settings of the teacher run (hashable: a jit static argument).

  Attributes:
    teacher_steps: teacher UniPC steps per stage before the student steps are inserted.
    student_steps: student steps per stage (doubled in the amplified section 0).
    guidance_scale: CFG scale (plain CFG against the negative embedding; <= 1 disables it).
    latent_height, latent_width: full-resolution latent size.
    channels: latent channels.
    patch_size: transformer patch.
    scheduler: the teacher's UniPC scheduler config.
  """

  teacher_steps: tuple[int, ...] = variants.VARIANTS["mid"].default_steps
  student_steps: tuple[int, ...] = variants.VARIANTS["distilled"].default_steps
  guidance_scale: float = variants.VARIANTS["mid"].default_guidance_scale
  latent_height: int = 48
  latent_width: int = 80
  channels: int = 16
  patch_size: tuple[int, int, int] = (1, 2, 2)
  scheduler: HeliosSchedulerConfig = TEACHER_SCHEDULER

  def __post_init__(self):
    stages = int(self.scheduler.stages)
    object.__setattr__(self, "teacher_steps",
                       _per_stage(self.teacher_steps, stages, "teacher_steps"))
    object.__setattr__(self, "student_steps",
                       _per_stage(self.student_steps, stages, "student_steps"))
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    self.sampler_config()  # validates the latent size against the pyramid

  @property
  def num_stages(self) -> int:
    return int(self.scheduler.stages)

  @property
  def cfg_on(self) -> bool:
    return float(self.guidance_scale) > 1.0

  def sampler_config(self) -> sampling.SamplerConfig:
    """The equivalent plain Mid sampler config (noise shapes, stage sizes)."""
    return sampling.SamplerConfig(
        scheduler=self.scheduler, pyramid=True, steps=self.teacher_steps,
        guidance="cfg" if self.cfg_on else "none", guidance_scale=float(self.guidance_scale),
        latent_height=self.latent_height, latent_width=self.latent_width,
        patch_size=self.patch_size)

  def stages(self, first_section: bool) -> tuple[TeacherStage, ...]:
    """The augmented schedules of a section (section 0 is amplified)."""
    return teacher_stage_schedules(self.teacher_steps, self.student_steps, self.latent_height,
                                   self.latent_width, bool(first_section), self.patch_size,
                                   self.scheduler)

  def stage_sizes(self) -> list[tuple[int, int]]:
    return pyr.stage_latent_sizes(self.latent_height, self.latent_width, self.num_stages)

  def max_steps(self) -> tuple[int, ...]:
    """Recorded steps per stage of the amplified section 0 (2 n_k): the padded length."""
    return tuple(2 * n for n in self.student_steps)


@flax.struct.dataclass
class SectionRecord:
  """What `record_section` returns, one entry per pyramid stage (lowest resolution first).

  xt: `[B, m_k, 9, h_k, w_k, C]` fp32 states before the recorded teacher steps.
  t: `[m_k]` fp32 recorded teacher timesteps.
  end: `[B, 9, h_k, w_k, C]` fp32 stage endpoints; `end[-1]` is the section output.
  """

  xt: tuple[jax.Array, ...]
  t: tuple[jax.Array, ...]
  end: tuple[jax.Array, ...]

  @property
  def output(self) -> jax.Array:
    return self.end[-1]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def record_section(graphdef: nnx.GraphDef, oc: OdeConfig, first_section: bool,
                   params: nnx.State, text: jax.Array, neg_text: jax.Array | None,
                   state: sampling.HistoryState, noise: sampling.ChunkNoise,
                   chol: jax.Array | None = None) -> SectionRecord:
  """Runs the teacher over the pyramid stages of one section and records its ODE pairs.

  The teacher runs the samplers' stage loop (`sampling.run_stages`, UniPC) over the augmented
  schedules, recording the states before the `record_index` steps.

  Args:
    graphdef, params: `nnx.split` of the teacher transformer (static graphdef).
    oc: static teacher settings.
    first_section: section 0 (amplified student schedule: 2n recorded steps per stage).
    params: teacher parameters.
    text: `[B, L, D]` prompt embeddings.
    neg_text: `[B, L, D]` negative embeddings (required iff `oc.guidance_scale > 1`).
    state: the history the section reads.
    noise: the section's draws (`sampling.draw_chunk_noise`).
    chol: optional block-noise Cholesky factor (None = analytic).

  Returns:
    The `SectionRecord`; feed `record.output` to `sampling.advance` for the next section.
  """
  if oc.cfg_on and neg_text is None:
    raise ValueError(f"guidance_scale={oc.guidance_scale} needs negative prompt embeddings")
  dt = nnx.merge(graphdef, params).dtype
  # The pyramid pipelines (the ODE one included) feed the truncated integer timestep.
  denoise = sampling.denoiser(graphdef, params, oc.sampler_config(), text, neg_text, state)
  stages = oc.stages(first_section)
  traj = sampling.run_stages(
      noise.eps, [hs.unipc_table(oc.scheduler, s.schedule) for s in stages],
      [denoise] * len(stages), "unipc", block=noise.block,
      constants=pyr.constants_for(oc.scheduler), chol=chol, noise_dtype=dt,
      record=[s.record_index for s in stages])
  xts = tuple(x.astype(F32) for x in traj.states)
  ts = tuple(jnp.asarray(s.recorded_timesteps, F32) for s in stages)
  ends = tuple(x.astype(F32) for x in traj.ends)
  return SectionRecord(xt=xts, t=ts, end=ends)


# ------------------------------------------------------------------------------------------
# Whole trajectories.


def section_noise(oc: OdeConfig, seed: int, prompt_index: int, section: int,
                  same_noise_per_prompt: bool = True) -> sampling.ChunkNoise:
  """One prompt's draws for one section (batch 1).

  Quirk 12: with `same_noise_per_prompt` (the reference's per-prompt reseeding) the draws
  depend only on (seed, section); otherwise also on the prompt index.
  """
  key = jax.random.key(int(seed))
  if not same_noise_per_prompt:
    key = jax.random.fold_in(key, int(prompt_index))
  key = jax.random.fold_in(key, int(section))
  return sampling.draw_chunk_noise(key, oc.sampler_config(), 1, oc.channels)


def record_trajectory(graphdef: nnx.GraphDef, params: nnx.State, text: Any,
                      neg_text: Any = None, num_sections: int = 5, noise_seed: int = 42,
                      same_noise_per_prompt: bool = True, config: OdeConfig | None = None,
                      batch_size: int = 1, chol: Any = None,
                      progress: Callable[[int, int, float], None] | None = None,
                      ) -> list[dict[str, np.ndarray]]:
  """Records the teacher's ODE pairs for a batch of prompts (T2V, empty history).

  Args:
    graphdef, params: the teacher transformer.
    text: `[P, L, D]` prompt embeddings.
    neg_text: `[L, D]` (shared) or `[P, L, D]` negative embeddings; None = zeros.
    num_sections: sections per prompt (5 = 165 frames in the reference).
    noise_seed: the seed (42 in the reference).
    same_noise_per_prompt: quirk 12: every prompt gets the same draws (reference behaviour,
      default); False draws fresh noise per prompt.
    config: teacher settings (default `OdeConfig()`).
    batch_size: prompts per teacher call (results do not depend on it).
    chol: optional block-noise Cholesky factor.
    progress: called as progress(prompts_done, num_prompts, seconds_for_batch).

  Returns:
    One record (dict of numpy arrays, see the module docstring) per prompt.
  """
  oc = config or OdeConfig()
  text = np.asarray(text, np.float32)
  if text.ndim != 3:
    raise ValueError(f"text must be [P, L, D] prompt embeddings, got shape {text.shape}")
  p_total = text.shape[0]
  if neg_text is None:
    neg = np.zeros_like(text)
  else:
    neg = np.asarray(neg_text, np.float32)
    if neg.ndim == 2:
      neg = np.broadcast_to(neg[None], text.shape)
    if neg.shape != text.shape:
      raise ValueError(f"negative embeddings of shape {np.shape(neg_text)} do not match the "
                       f"prompt embeddings {text.shape} (need [L, D] or [P, L, D])")
  if int(num_sections) < 1 or int(batch_size) < 1:
    raise ValueError(f"num_sections={num_sections} and batch_size={batch_size} must be >= 1")
  sizes = oc.stage_sizes()
  max_steps = oc.max_steps()
  records = []
  for p0 in range(0, p_total, int(batch_size)):
    tic = time.perf_counter()
    idx = list(range(p0, min(p0 + int(batch_size), p_total)))
    b = len(idx)
    state = sampling.empty_history(b, oc.latent_height, oc.latent_width, oc.channels)
    recs = [{"text": text[i],
             **{f"xt{k}": np.zeros((num_sections, m, WINDOW, h, w, oc.channels), np.float32)
                for k, (m, (h, w)) in enumerate(zip(max_steps, sizes))},
             **{f"t{k}": np.full((num_sections, m), -1.0, np.float32)
                for k, m in enumerate(max_steps)},
             **{f"n{k}": np.zeros((num_sections,), np.int32) for k in range(oc.num_stages)},
             **{f"end{k}": np.zeros((num_sections, WINDOW, h, w, oc.channels), np.float32)
                for k, (h, w) in enumerate(sizes)}} for i in idx]
    t_b = jnp.asarray(text[idx])
    n_b = jnp.asarray(neg[idx]) if oc.cfg_on else None
    for s in range(int(num_sections)):
      draws = [section_noise(oc, noise_seed, i, s, same_noise_per_prompt) for i in idx]
      noise = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *draws)
      rec = record_section(graphdef, oc, s == 0, params, t_b, n_b, state, noise, chol)
      state = sampling.advance(state, rec.output, s == 0)
      host = jax.device_get(rec)
      for j, r in enumerate(recs):
        for k in range(oc.num_stages):
          m = host.t[k].shape[0]
          r[f"xt{k}"][s, :m] = host.xt[k][j]
          r[f"t{k}"][s, :m] = host.t[k]
          r[f"n{k}"][s] = m
          r[f"end{k}"][s] = host.end[k][j]
    records.extend(recs)
    if progress is not None:
      progress(len(records), p_total, time.perf_counter() - tic)
  return records


def dataset_info(config: OdeConfig, num_sections: int, noise_seed: int,
                 same_noise_per_prompt: bool, **extra: Any) -> dict[str, Any]:
  """The teacher settings stored in `index.json`."""
  sched = config.scheduler
  return {
      "num_sections": int(num_sections), "teacher_steps": list(config.teacher_steps),
      "student_steps": list(config.student_steps), "max_steps": list(config.max_steps()),
      "guidance_scale": float(config.guidance_scale), "latent_height": config.latent_height,
      "latent_width": config.latent_width, "channels": config.channels,
      "patch_size": list(config.patch_size), "noise_seed": int(noise_seed),
      "same_noise_per_prompt": bool(same_noise_per_prompt),
      "scheduler": {f.name: getattr(sched, f.name) for f in dataclasses.fields(sched)},
      **extra}


# ------------------------------------------------------------------------------------------
# CLI.

def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the CLI flags on `fv` (done lazily: other helios_jax CLIs share flag names)."""
  d = dict(flag_values=fv)
  flags.DEFINE_string("teacher", None, "Teacher (Helios-Mid) transformer folder (diffusers "
                      "safetensors or our Orbax export).", **d)
  flags.DEFINE_string("out", None, "Output dataset folder (must not exist).", **d)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", **d)
  flags.DEFINE_enum("data_source", "synthetic", ["synthetic", "tfds"],
                    "Where the prompt embeddings come from.", **d)
  flags.DEFINE_string("data_dir", "", "TFDS latents root (--data_source=tfds).", **d)
  flags.DEFINE_string("split", "train", "TFDS split.", **d)
  flags.DEFINE_integer("num_prompts", 8, "Prompts to record (tfds: the first N; 0 = all).", **d)
  flags.DEFINE_integer("synthetic_seed", 0, "Synthetic caption seed.", **d)
  flags.DEFINE_integer("text_len", 512, "Text rows fed to the teacher (zero padded).", **d)
  flags.DEFINE_string("negative_text", None, "`.npy` negative prompt embedding [n, D] (the "
                      "encoded negative prompt); default: all zeros.", **d)
  flags.DEFINE_integer("latent_height", 0, "Latent height (0: from the data; synthetic 16).",
                       **d)
  flags.DEFINE_integer("latent_width", 0, "Latent width (0: from the data; synthetic 16).", **d)
  flags.DEFINE_integer("num_sections", 5, "Sections per prompt.", **d)
  flags.DEFINE_list("teacher_steps", ["20"], "Teacher steps (one or one per stage).", **d)
  flags.DEFINE_list("student_steps", ["2", "2", "2"], "Student steps per stage.", **d)
  flags.DEFINE_float("guidance_scale", 5.0, "CFG scale.", **d)
  flags.DEFINE_integer("seed", 42, "Noise seed.", **d)
  flags.DEFINE_bool("fresh_noise", False, "Fresh noise per prompt (default: the reference's "
                    "identical noise for every prompt, quirk 12).", **d)
  flags.DEFINE_integer("batch_size", 1, "Prompts per teacher call.", **d)
  flags.DEFINE_string("param_dtype", "bfloat16", "Teacher parameter dtype.", **d)
  flags.DEFINE_string("attention", "auto", "Attention implementation.", **d)


def _pad_text(emb: np.ndarray, text_len: int, what: str) -> np.ndarray:
  emb = np.asarray(emb, np.float32)
  if emb.ndim != 2:
    raise ValueError(f"{what}: embedding of shape {emb.shape} is not [n, D]")
  if emb.shape[0] > text_len:
    raise ValueError(f"{what}: {emb.shape[0]} text rows exceed --text_len={text_len}")
  out = np.zeros((text_len, emb.shape[1]), np.float32)
  out[:emb.shape[0]] = emb
  return out


def _prompts(fv: flags.FlagValues, text_dim: int
             ) -> tuple[list[np.ndarray], list[dict[str, Any]], int, int]:
  """(embeddings, per-record metadata, latent height, latent width) of the chosen prompts."""
  n = int(fv.num_prompts)
  if fv.data_source == "synthetic":
    from helios_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    h = fv.latent_height or synthetic.SyntheticConfig.height
    w = fv.latent_width or synthetic.SyntheticConfig.width
    src = synthetic.SyntheticLatents(synthetic.SyntheticConfig(
        num_clips=max(n, 1), sections=(1,), height=h, width=w, text_dim=text_dim,
        seed=int(fv.synthetic_seed)))
    recs = [src[i] for i in range(n)]
  else:
    from helios_jax.data import latents  # pylint: disable=g-import-not-at-top
    if not fv.data_dir:
      raise app.UsageError("--data_source=tfds needs --data_dir")
    src = latents.load_source(fv.data_dir, fv.split)
    n = len(src) if n <= 0 else min(n, len(src))
    recs = [src[i] for i in range(n)]
    h = fv.latent_height or (int(recs[0]["height"]) if recs else 0)
    w = fv.latent_width or (int(recs[0]["width"]) if recs else 0)
  embs = [r["prompt_embed"] for r in recs]
  meta = [{"uttid": str(r.get("uttid", "")), "caption": str(r.get("caption", ""))}
          for r in recs]
  return embs, meta, h, w


def run(fv: flags.FlagValues = flags.FLAGS) -> str:
  """The CLI on parsed flags (`define_flags`); returns the dataset folder."""
  if not fv.teacher or not fv.out:
    raise app.UsageError("--teacher and --out are required")
  if os.path.exists(fv.out) and not fv.overwrite:
    raise app.UsageError(f"--out={fv.out} exists (pass --overwrite to replace it)")
  from helios_jax.training import model as model_lib  # pylint: disable=g-import-not-at-top
  model_cfg = model_lib.BaseModelConfig(init_from=fv.teacher, param_dtype=fv.param_dtype,
                                        remat="none", attention=fv.attention)
  mcfg, graphdef, params = model_lib.build_base(model_cfg)
  params = jax.tree.map(jnp.asarray, params)
  embs, meta, h, w = _prompts(fv, int(mcfg.text_dim))
  if not embs:
    raise app.UsageError("no prompts selected (--num_prompts / the data source is empty)")
  text_len = int(fv.text_len)
  text = np.stack([_pad_text(e, text_len, f"prompt {m['uttid']}") for e, m in zip(embs, meta)])
  if fv.negative_text:
    if not os.path.isfile(fv.negative_text):
      raise app.UsageError(f"--negative_text file not found: {fv.negative_text}")
    neg = _pad_text(np.load(fv.negative_text), text_len, fv.negative_text)
  else:
    neg = np.zeros(text.shape[1:], np.float32)
  if neg.shape[-1] != text.shape[-1]:
    raise app.UsageError(f"negative embedding width {neg.shape[-1]} != prompt width "
                         f"{text.shape[-1]}")
  steps = [int(s) for s in fv.teacher_steps]
  oc = OdeConfig(teacher_steps=steps[0] if len(steps) == 1 else tuple(steps),
                 student_steps=tuple(int(s) for s in fv.student_steps),
                 guidance_scale=float(fv.guidance_scale), latent_height=h, latent_width=w,
                 channels=int(mcfg.in_channels), patch_size=tuple(mcfg.patch_size))
  sections = int(fv.num_sections)
  logging.info("ODE pairs: %d prompts x %d sections, latent %dx%d, teacher steps %s + student "
               "%s, CFG %.2f", len(text), sections, h, w, oc.teacher_steps, oc.student_steps,
               oc.guidance_scale)

  def progress(done, total, secs):
    logging.info("prompt %d/%d recorded (%.1f s)", done, total, secs)

  same = not fv.fresh_noise
  records = record_trajectory(graphdef, params, text, neg, sections, int(fv.seed), same, oc,
                              int(fv.batch_size), progress=progress)
  info = dataset_info(oc, sections, int(fv.seed), same, teacher=os.path.abspath(fv.teacher),
                      text_len=text_len, data_source=fv.data_source,
                      negative_text=fv.negative_text or "zeros", param_dtype=fv.param_dtype)
  dataset.write_dataset(fv.out, records, info, meta, overwrite=fv.overwrite)
  logging.info("wrote %d records to %s", len(records), fv.out)
  return fv.out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = run(flags.FLAGS)
  print(f"ODE pairs written to {out}", flush=True)


if __name__ == "__main__":
  define_flags()
  runtime.run_cli(main)
