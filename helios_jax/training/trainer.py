"""The training loop shared by every stage, parameterised by an ml_collections config.

`train_and_evaluate(config, workdir)`:
  1. mesh over all devices (data / fsdp / context axes), the input pipeline (grain over the
     TFDS latents or synthetic latents), the frozen base (random, Helios or Wan2.1 weights)
     placed with FSDP shardings;
  2. trainables (LoRA factors + full-trained stems, fp32) and the optax state, created by
     jitted functions with their output shardings;
  3. restore from the latest checkpoint in `<workdir>/checkpoints` if any (trainables,
     optimizer state, step, rng, grain iterator position);
  4. the jitted step: the stage objective (`losses.OBJECTIVES[config.objective.kind]`) through
     the LoRA-merged model, `value_and_grad` w.r.t. the trainables only, clip + AdamW; a
     non-finite loss or gradient leaves the state unchanged and stops the run with the step
     number (the last good checkpoint stays the latest);
  5. logs (loss, grad norm, lr, steps/s, tokens/s) to stdout and `<workdir>/metrics.jsonl`,
     asynchronous Orbax checkpoints every `train.checkpoint_every` steps and at the end.

The per-step PRNG key is fold_in(key(seed), step) and every random draw of the step is made
for the global batch inside the jitted step (threefry, partitionable), so runs are
bit-reproducible across restarts and give the same numbers on any mesh up to the reduction
order of the sharded sums.

Stage 3 (`stage3.py`, `distill.py`) plugs in as two more objectives: "ode_regression" (the
same single-group step on the ODE-pair dataset, with the EMA of the trainables) and "dmd", whose
step updates two trainable groups (generator / critic, each with its own optax state) from two
section draws per step and keeps the generator EMA; the state is a dict, so those extra entries
use the same checkpointing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from helios_jax import sharding
from helios_jax import checkpoint
from helios_jax import runtime
from helios_jax.config import ConfigError
from helios_jax.text import MAX_SEQUENCE_LENGTH
from helios_jax.data import ode_pairs
from helios_jax.data import synthetic as synthetic_lib
from helios_jax.data import pipeline as pipeline_lib
from helios_jax.data.clips import DataError
from helios_jax.schedulers import pyramid as pyr
from helios_jax.training import checkpointing
from helios_jax.training import corrupt as corrupt_lib
from helios_jax.training import distill
from helios_jax.training import lora
from helios_jax.training import losses
from helios_jax.training import model as model_lib
from helios_jax.training import ode_pairs as ode_pairs_lib
from helios_jax.training import optim
from helios_jax.training import sample as sample_lib
from helios_jax.training import settings
from helios_jax.training import stage3 as stage3_lib

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TINY_TEACHER_DIR = "tiny_teacher"
TINY_PAIRS_DIR = "tiny_pairs"
# The miniature's ODE pairs (`stage3.record_tiny_pairs`): synthetic prompts x sections, teacher
# UniPC steps per stage (+ the student steps), CFG against zeros, noise seed.
TINY_PAIRS = dict(num_prompts=2, num_sections=3, teacher_steps=3, guidance_scale=5.0,
                  noise_seed=42)
DEVICE_KEYS = ("history", "anchor", "target", "text")


def device_keys(kind: str) -> tuple[str, ...]:
  """The batch entries the step reads (ODE-pair records: text and every per-stage array)."""
  if kind == "ode_regression":
    return ode_pairs.record_keys(pyr.NUM_STAGES)
  return DEVICE_KEYS


class TrainingStopped(Exception):
  """A stop signal ended the run cleanly after a checkpoint at `step`."""

  def __init__(self, signal_name: str, step: int, directory: str):
    super().__init__(f"{signal_name}: stopped at step {step}; checkpoint saved in {directory}. "
                     "Run the same command to resume from step "
                     f"{step}.")
    self.signal_name, self.step = signal_name, step


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; the run stopped."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The input pipeline, the `data` config group.

  Attributes:
    source: "tfds" (precomputed section latents), "synthetic" or "ode_pairs" (Stage 3a).
    data_dir: TFDS data root / ODE-pair dataset folder.
    split: TFDS split.
    global_batch_size: > 0: the global batch; else per_device_batch_size x devices (quirk 11:
      only per-device sizes are published).
    per_device_batch_size: batch per device.
    text_len: text rows of every sample (zero padded; umT5's 512, spec §7.0 "Common").
    seed: shuffle seed (< 0: the run's seed).
    num_threads, prefetch: grain worker threads / prefetched batches.
    synthetic: the synthetic latents (`source="synthetic"`).
  """

  source: str = "tfds"
  data_dir: str = ""
  split: str = "train"
  global_batch_size: int = 0
  per_device_batch_size: int = 2
  text_len: int = MAX_SEQUENCE_LENGTH
  seed: int = -1
  num_threads: int = 2
  prefetch: int = 2
  synthetic: synthetic_lib.SyntheticConfig = synthetic_lib.SyntheticConfig()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop, the `train` config group.

  Attributes:
    num_steps: optimizer steps of the run.
    log_every: stdout log interval (metrics.jsonl gets every step).
    checkpoint_every: checkpoint interval (<= 0: only at the end).
    keep_checkpoints: checkpoints kept.
    async_checkpoint: asynchronous Orbax saves.
    abort_at_step: fault injection (tests): SIGKILL after this step (0: off).
    debug_nan_at_step: fault injection (tests): a NaN batch at this step (0: off).
  """

  num_steps: int = 1_000_000
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  abort_at_step: int = 0
  debug_nan_at_step: int = 0

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"num_steps={self.num_steps} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The typed experiment config: one field per config group (validated once at start-up).

  Stage 3 groups (`stage3`, `critic`, `score_model`) are None in Stages 1-2. `objective` and
  `stage3` carry the `drop` / `corrupt` groups as derived fields.
  """

  stage: str = ""
  seed: int = 0
  objective: losses.ObjectiveConfig = losses.ObjectiveConfig()
  model: model_lib.BaseModelConfig = model_lib.BaseModelConfig()
  trainable: lora.TrainableSpec = lora.TrainableSpec()
  data: DataConfig = DataConfig()
  drop: sample_lib.DropConfig = sample_lib.DropConfig()
  corrupt: corrupt_lib.CorruptConfig = corrupt_lib.CorruptConfig()
  optim: optim.OptimConfig = optim.OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: sharding.MeshConfig = sharding.MeshConfig()
  ema: stage3_lib.EmaConfig = stage3_lib.EmaConfig()
  stage3: distill.Stage3Config | None = None
  critic: stage3_lib.CriticConfig | None = None
  score_model: model_lib.BaseModelConfig | None = None

  @property
  def kind(self) -> str:
    return self.objective.kind


def settings_from_config(config: ml_collections.ConfigDict) -> Settings:
  """Builds and validates the typed settings; errors name the bad key and value."""
  st = settings.from_configdict(Settings, config)
  obj = dataclasses.replace(st.objective, drop=st.drop, corrupt=st.corrupt)
  s3 = st.stage3
  if obj.kind in losses.STAGE3_KINDS:
    s3 = stage3_lib.with_history_settings(s3 or distill.Stage3Config(), obj)
  st = dataclasses.replace(st, objective=obj, stage3=s3)
  if st.kind == "dmd" and (st.critic is None or st.score_model is None):
    raise ConfigError("objective.kind='dmd' needs the `critic` and `score_model` groups")
  if s3 is not None and s3.record_tiny_pairs and obj.kind != "ode_regression":
    raise ConfigError(f"stage3.record_tiny_pairs is for objective 'ode_regression', not "
                      f"{obj.kind!r}")
  sources = ("ode_pairs",) if obj.kind == "ode_regression" else ("tfds", "synthetic")
  if st.data.source not in sources:
    raise ConfigError(f"data.source={st.data.source!r} must be one of {sources} for objective "
                      f"{obj.kind!r}")
  return st


# ------------------------------------------------------------------------------------------
# Data.


def make_source(data_cfg: DataConfig):
  """The record source named by `data.source`."""
  if data_cfg.source == "synthetic":
    return synthetic_lib.SyntheticLatents(data_cfg.synthetic)
  if data_cfg.source == "ode_pairs":
    if not data_cfg.data_dir:
      raise DataError("data.data_dir is empty: pass the ODE-pair dataset written by "
                      "`python -m helios_jax.training.ode_pairs --out=<dir>`")
    return OdePairRecords(ode_pairs.OdePairsSource(data_cfg.data_dir))
  from helios_jax.data import latents  # pylint: disable=g-import-not-at-top
  if not data_cfg.data_dir:
    raise DataError("data.data_dir is empty: pass --config.data.data_dir=<TFDS data root with "
                    "helios_latents/> (see `python -m helios_jax.data.precompute`)")
  return latents.load_source(data_cfg.data_dir, data_cfg.split)


def record_tiny_pairs(st: Settings, workdir: str) -> Settings:
  """CPU miniature: records a small ODE-pair dataset of the run's own base model (the teacher).

  The teacher is the base the student starts from (the `model` group; a random tiny DiT when
  `model.init_from` is empty, then also written to `<workdir>/tiny_teacher`). Its pairs
  (`TINY_PAIRS`: synthetic prompts of the `data.synthetic` size and seed, T2V from an empty
  history) go to `<workdir>/tiny_pairs`; a resumed run reuses them. Process 0 records, the
  others wait.

  Args:
    st: settings with `stage3.record_tiny_pairs` and an empty `data.data_dir`.
    workdir: the run's folder.

  Returns:
    `st` reading the recorded dataset (`data.data_dir`).
  """
  if st.data.data_dir:
    raise ConfigError(f"stage3.record_tiny_pairs records into the workdir: data.data_dir="
                      f"{st.data.data_dir!r} must be empty")
  pairs = os.path.join(workdir, TINY_PAIRS_DIR)
  if jax.process_index() == 0 and not os.path.isfile(
      os.path.join(pairs, ode_pairs.INDEX_FILE)):
    p = TINY_PAIRS
    config, graphdef, params = model_lib.build_base(dataclasses.replace(st.model, remat="none"))
    teacher = st.model.init_from
    if not teacher:
      teacher = os.path.join(workdir, TINY_TEACHER_DIR)
      with checkpoint.atomic_directory(teacher, overwrite=True) as tmp:
        config.to_json(os.path.join(tmp, "config.json"), _class_name="HeliosTransformer3DModel")
        checkpoint.save_params(os.path.join(tmp, checkpoint.PARAMS_DIR), params)
    syn = dataclasses.replace(st.data.synthetic, num_clips=p["num_prompts"], sections=(1,),
                              text_dim=config.text_dim)
    source = synthetic_lib.SyntheticLatents(syn)
    text = np.zeros((p["num_prompts"], st.data.text_len, config.text_dim), np.float32)
    for i in range(p["num_prompts"]):
      emb = source[i]["prompt_embed"]
      text[i, :emb.shape[0]] = emb                              # zero-padded [L, D]
    oc = ode_pairs_lib.OdeConfig(
        teacher_steps=p["teacher_steps"], student_steps=st.stage3.student_steps,
        guidance_scale=p["guidance_scale"], latent_height=syn.height, latent_width=syn.width,
        channels=config.in_channels, patch_size=tuple(config.patch_size))
    logging.info("recording the miniature's ODE pairs of %s into %s", teacher, pairs)
    records = ode_pairs_lib.record_trajectory(
        graphdef, jax.tree.map(jnp.asarray, params), text, None, p["num_sections"],
        p["noise_seed"], True, oc)
    info = ode_pairs_lib.dataset_info(oc, p["num_sections"], p["noise_seed"], True,
                                      teacher=os.path.abspath(teacher),
                                      text_len=st.data.text_len, data_source="synthetic",
                                      negative_text="zeros")
    ode_pairs.write_dataset(pairs, records, info, overwrite=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("record_tiny_pairs")
  return dataclasses.replace(st, data=dataclasses.replace(st.data, data_dir=pairs))


class OdePairRecords:
  """An ODE-pair dataset as a pipeline source: one bucket, records used as they are (text
  zero-padded to the pipeline's text length)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.source[int(index)]

  def bucket_keys(self) -> np.ndarray:
    if len(self) == 0:
      return np.zeros((0, 3), np.int64)
    end = np.asarray(self.source[0]["end2"])
    return np.tile(np.asarray([[end.shape[0], end.shape[2], end.shape[3]]], np.int64),
                   (len(self), 1))

  @staticmethod
  def build_sample(record, index, epoch, seed, text_len) -> dict[str, np.ndarray]:
    del epoch, seed
    out = {k: np.asarray(v) for k, v in record.items()}
    emb = np.asarray(out["text"], np.float32)
    if emb.ndim != 2 or emb.shape[0] > text_len:
      raise DataError(f"ODE-pair record {index}: text shape {emb.shape} is not [<= {text_len}, D]")
    text = np.zeros((text_len, emb.shape[1]), np.float32)
    text[:emb.shape[0]] = emb
    out["text"] = text
    return out


def global_batch_size(data_cfg: DataConfig) -> int:
  if data_cfg.global_batch_size > 0:
    return data_cfg.global_batch_size
  return data_cfg.per_device_batch_size * jax.device_count()


# ------------------------------------------------------------------------------------------
# Step.


def make_loss_fn(graphdef: nnx.GraphDef, st: Settings, mesh):
  """loss_fn(trainables, base, batch, key) -> (loss, aux) through the LoRA'd model."""
  if st.kind == "ode_regression":
    objective = lambda fn, batch, key, _: distill.ode_regression_loss(fn, batch, key,
                                                                       st.stage3)
  else:
    objective = losses.OBJECTIVES[st.kind]
  make = stage3_lib.forward_factory(graphdef, sharding.token_constraint(mesh))

  def loss_fn(trainables, base, batch, key):
    return objective(make(base, trainables, st.trainable), batch, key, st.objective)

  return loss_fn


def make_train_step(loss_fn, tx, st: Settings):
  """The pure step: state dict -> (state dict, metrics)."""

  def train_step(state, base, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["trainables"], base, batch, key)
    gnorm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainables"])
    trainables = optax.apply_updates(state["trainables"], updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = dict(state, step=step + 1, trainables=keep(trainables, state["trainables"]),
                     opt_state=keep(opt_state, state["opt_state"]))
    if "ema" in state:  # updated every step (spec §7.4)
      new_state.update(stage3_lib.ema_step(state, new_state["trainables"], ok, st.ema))
    metrics = {"loss": loss, "grad_norm": gnorm, "lr": optim.learning_rate(st.optim, step),
               **aux}
    return new_state, metrics

  return train_step


# ------------------------------------------------------------------------------------------
# Logging.


class MetricsWriter:
  """Appends one JSON line per step to `<workdir>/metrics.jsonl` (process 0 only).

  `start_step` is the step the run (re)starts from: rows of later steps, written by a run
  that stopped after its last checkpoint, are dropped first (rewritten atomically), so a resumed
  run never repeats a step.
  """

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled
    if enabled and os.path.isfile(self.path):
      with open(self.path) as f:
        lines = f.readlines()
      keep = []
      for line in lines:
        try:
          step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
          continue
        if step <= start_step:
          keep.append(line if line.endswith("\n") else line + "\n")
      if len(keep) != len(lines):
        with runtime.atomic_write(self.path) as f:
          f.writelines(keep)

  def write(self, record: dict[str, Any]) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _py(x):
  x = np.asarray(x)
  return x.item() if x.ndim == 0 else x.tolist()


# ------------------------------------------------------------------------------------------
# Workdir lock and stop signals.

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live training process holds the workdir."""


class WorkdirLock:
  """An exclusive `flock` on `<workdir>/.lock`, holding the owner's pid and host.

  The kernel releases the lock when its process dies, so a lock left by a killed run is
  stale by construction: the next run takes it (and says whose it was). Taken by process 0
  only (the processes of one multi-host run share the workdir).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> str | None:
    """Takes the lock; returns a note about a stale previous holder, or None."""
    import fcntl  # pylint: disable=g-import-not-at-top
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown process"
      os.close(fd)
      raise WorkdirBusyError(
          f"workdir {os.path.dirname(self.path)} is in use by {holder} (lock {self.path}); "
          "stop that run or choose another --workdir") from None
    previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
    self._fd = fd
    return f"took over the stale lock of {previous} (no longer running)" if previous else None

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing releases the flock
      self._fd = None


class StopSignals:
  """SIGINT / SIGTERM ask the loop to stop after the current step (checkpoint, clean exit).

  A second SIGINT interrupts at once (Python's default KeyboardInterrupt). Installed only in
  the main thread; `received` is the first signal's name, or None.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is None:
      self.received = signal.Signals(signum).name
      print(f"{self.received}: stopping after the current step (checkpoint first; "
            "Ctrl-C again to interrupt at once)", file=sys.stderr, flush=True)
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def stop_requested(self) -> bool:
    """Whether any process received a stop signal (a collective on multi-process runs)."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))


# ------------------------------------------------------------------------------------------
# Main entry.


@dataclasses.dataclass
class Run:
  """Everything `train_and_evaluate` sets up before the loop (one process's view)."""

  settings: Settings
  mesh: Any
  global_batch: int
  data_iter: Any
  plan: pipeline_lib.BatchPlan
  model_config: Any
  base: dict[str, Any]
  base_shardings: Any
  state: dict[str, Any]
  state_shardings: dict[str, Any]
  tx: Any
  step_fn: Any
  tokens_per_step: int
  negative_text: Any = None  # DMD: global [B, L, D] negative-prompt embeddings


def _setup_data(st: Settings, gbs: int):
  source = make_source(st.data)
  data_seed = st.data.seed if st.data.seed >= 0 else st.seed
  in_cfg = pipeline_lib.InputConfig(global_batch_size=gbs, seed=data_seed,
                                    text_len=st.data.text_len, num_threads=st.data.num_threads,
                                    prefetch=st.data.prefetch)
  dataset, plan = pipeline_lib.make_dataset(source, in_cfg, jax.process_index(),
                                            jax.process_count())
  logging.info("data: %d records, %d buckets, %d batches per epoch", len(source),
               len(plan.buckets), plan.batches_per_epoch)
  return pipeline_lib.make_iterator(dataset, in_cfg), plan


def _log_tree(name: str, tree: Any) -> None:
  """Each leaf's shape / dtype / sharding at verbosity 1 (`--v=1`)."""
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    logging.vlog(1, "%s%s %s %s %s", name, jax.tree_util.keystr(path), x.shape, x.dtype,
                 getattr(x, "sharding", None))


def _init_state(st: Settings, base: dict[str, Any], mesh):
  """Fresh trainables and optimizer state, created with their output shardings."""
  init_key = jax.random.key(st.seed)
  init = lambda b: lora.init_trainables(b, st.trainable, init_key)
  tr_shardings = sharding.tree_shardings(jax.eval_shape(init, base), mesh)
  trainables = jax.jit(init, out_shardings=tr_shardings)(base)
  tx = optim.make_optimizer(st.optim, trainables)
  opt_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, trainables), mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainables)
  rep = sharding.replicated(mesh)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), rep),
           "rng": jax.device_put(jax.random.key_data(init_key), rep),
           "trainables": trainables, "opt_state": opt_state}
  shardings = {"step": rep, "rng": rep, "trainables": tr_shardings, "opt_state": opt_shardings}
  if st.ema.enabled:
    state["ema"] = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=tr_shardings)(
        trainables)
    state["ema_count"] = jax.device_put(jnp.zeros((), jnp.int32), rep)
    shardings.update(ema=tr_shardings, ema_count=rep)
  logging.info("trainable parameters: %s (LoRA rank %d, alpha %g)", lora.count(trainables),
               st.trainable.rank, st.trainable.alpha)
  _log_tree("trainables", trainables)
  return state, shardings, tx


def _init_critic_state(st: Settings, score_base: dict[str, Any], model_config, mesh):
  """Critic trainables (+ GAN heads) and their optimizer state (DMD)."""
  heads_graphdef, heads_params, blocks = None, None, ()
  if st.stage3.gan.enabled:
    heads_graphdef, heads_params, blocks = stage3_lib.make_heads(model_config, st.stage3.gan)
  key = jax.random.fold_in(jax.random.key(st.seed), 1)
  init = lambda b, h: stage3_lib.init_critic(b, st.critic.trainable, key, h)
  shard = sharding.tree_shardings(jax.eval_shape(init, score_base, heads_params), mesh)
  critic = jax.jit(init, out_shardings=shard)(score_base, heads_params)
  mult = dict(st.critic.optim.lr_multipliers)
  mult.setdefault("gan", 1.0)
  copt = dataclasses.replace(st.critic.optim, lr_multipliers=tuple(sorted(mult.items())))
  tx = optim.make_optimizer(copt, critic)
  opt_shard = sharding.tree_shardings(jax.eval_shape(tx.init, critic), mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shard)(critic)
  logging.info("critic parameters: %s", lora.count(critic))
  return ({"critic": critic, "critic_opt_state": opt_state},
          {"critic": shard, "critic_opt_state": opt_shard}, tx, heads_graphdef, blocks)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Mesh, input pipeline, base weights, fresh state and the jitted step of a config."""
  st = settings_from_config(config)
  if st.stage3 is not None and st.stage3.record_tiny_pairs:
    st = record_tiny_pairs(st, workdir)
  jax.config.update("jax_threefry_partitionable", True)
  mesh = sharding.make_mesh("training", **dataclasses.asdict(st.mesh))
  gbs = global_batch_size(st.data)
  sharding.check_batch(gbs, mesh)
  logging.info("mesh %s over %d device(s), %d process(es); global batch %d", dict(mesh.shape),
               jax.device_count(), jax.process_count(), gbs)
  data_iter, plan = _setup_data(st, gbs)

  model_config, graphdef, base_host = model_lib.build_base(st.model)
  for _, h, w in plan.buckets:
    losses.check_latent_size(st.objective.kind, h, w, model_config.patch_size)
  if st.kind == "dmd":  # the student base and the (real / fake) score base
    score_config, _, score_host = model_lib.build_base(st.score_model)
    if score_config != model_config:
      raise ConfigError(f"score_model config {score_config} differs from the student's "
                        f"{model_config}: both must be the same DiT architecture")
    base_host = {"student": base_host, "score": score_host}
  base_shardings = sharding.tree_shardings(base_host, mesh)
  base = sharding.host_to_global(base_host, base_shardings)
  del base_host
  _log_tree("base", base)

  if st.kind == "dmd":
    state, state_shardings, tx = _init_state(st, base["student"], mesh)
    cstate, cshard, ctx_tx, heads_graphdef, blocks = _init_critic_state(
        st, base["score"], model_config, mesh)
    state.update(cstate)
    state_shardings.update(cshard)
    step = stage3_lib.make_dmd_step(graphdef, st.trainable, st.critic.trainable, tx, ctx_tx,
                                    st.stage3, st.ema, st.optim,
                                    sharding.token_constraint(mesh), heads_graphdef, blocks)
    step_fn = jax.jit(step, in_shardings=(state_shardings, base_shardings, None, None),
                      out_shardings=(state_shardings, None), donate_argnums=(0,))
  else:
    state, state_shardings, tx = _init_state(st, base, mesh)
    step_fn = jax.jit(make_train_step(make_loss_fn(graphdef, st, mesh), tx, st),
                      in_shardings=(state_shardings, base_shardings, None),
                      out_shardings=(state_shardings, None), donate_argnums=(0,))
  _, h, w = next(iter(plan.buckets))  # tokens/s uses the first bucket's size
  mult = st.objective.multiplicities
  if st.kind == "ode_regression":    # one forward per chosen section and pyramid stage
    mult = (st.stage3.ode_sections,) * pyr.NUM_STAGES
  elif st.kind == "dmd":             # lower bound: the two rollouts' exit steps per stage, plus
    mult = (2, 2, 2 + 4)             # fake + real cond / uncond scores and the critic forward
  tokens = losses.tokens_per_sample(st.objective.kind, h, w, mult,
                                    model_config.patch_size) * gbs
  neg = None
  if st.kind == "dmd":
    text_dim = model_config.text_dim
    neg = stage3_lib.negative_text(st.stage3.negative_text, st.data.text_len, text_dim)
    # One global [B, L, D] array for the whole run (every DMD batch carries the same one).
    local_b = gbs // jax.process_count()
    neg = sharding.local_batch_to_global(
        {"neg_text": np.broadcast_to(neg[None], (local_b,) + neg.shape)}, mesh)["neg_text"]
  return Run(settings=st, mesh=mesh, global_batch=gbs, data_iter=data_iter, plan=plan,
             model_config=model_config, base=base, base_shardings=base_shardings, state=state,
             state_shardings=state_shardings, tx=tx, step_fn=step_fn, tokens_per_step=tokens,
             negative_text=neg)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a training run; returns the last step's metrics.

  Args:
    config: an experiment config (`experiments/stage1.py`, `stage2.py`).
    workdir: output folder (checkpoints, metrics, config).

  Returns:
    {"step": last step, **metrics of the last step}.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  lock = WorkdirLock(workdir)
  if is_main:
    note = lock.acquire()
    if note:
      logging.warning("%s", note)
  try:
    with StopSignals() as stops:  # from here on, SIGINT / SIGTERM stop at a step boundary
      return _train_locked(config, workdir, is_main, stops)
  finally:
    lock.release()


def _train_locked(config: ml_collections.ConfigDict, workdir: str, is_main: bool,
                  stops: StopSignals) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir lock is held and the stop signals are caught."""
  if is_main:
    with runtime.atomic_write(os.path.join(workdir, CONFIG_FILE)) as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  run = setup(config, workdir)
  st, state = run.settings, run.state

  ckpt = checkpointing.Checkpointer(workdir, keep=st.train.keep_checkpoints,
                                    async_save=st.train.async_checkpoint)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
        run.state_shardings)
    state, meta = ckpt.restore(latest, abstract_state, run.data_iter)
    start = int(meta["step"])
    logging.info("resumed from %s (step %d)", ckpt.directory, start)
    if is_main:
      print(f"resumed from step {start}", flush=True)

  writer = MetricsWriter(workdir, is_main, start)
  num_steps = st.train.num_steps
  log_every = max(st.train.log_every, 1)
  ckpt_every = st.train.checkpoint_every
  abort_at = st.train.abort_at_step
  nan_at = st.train.debug_nan_at_step
  last_good = latest
  last: dict[str, Any] = {"step": start}
  t_window, n_window = time.perf_counter(), 0
  keys = device_keys(st.kind)
  draws = 2 if st.kind == "dmd" else 1  # DMD: draw #1 (generator), draw #2 (critic)
  try:
    for step in range(start, num_steps):
      batches = []
      for _ in range(draws):
        raw = next(run.data_iter)
        local = {k: raw[k] for k in keys}
        if nan_at == step + 1:  # fault injection (tests): a corrupt batch
          local = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
                   for k, v in local.items()}
        batch = sharding.local_batch_to_global(local, run.mesh)
        if run.negative_text is not None:
          batch["neg_text"] = run.negative_text
        batches.append(batch)
      state, metrics = run.step_fn(state, run.base, *batches)
      metrics = jax.device_get(metrics)
      done = step + 1
      loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
      checked = [loss, gnorm] + [float(metrics[k]) for k in ("gen_loss", "gen_grad_norm")
                                 if k in metrics]
      if not all(math.isfinite(v) for v in checked):
        ckpt.wait()
        raise NonFiniteLossError(
            f"non-finite loss {loss} (grad norm {gnorm}) at step {done}; stopping. Last good "
            f"checkpoint: step {last_good} in {ckpt.directory}")
      record = {"step": done, **{k: _py(v) for k, v in metrics.items()}}
      if step == start:  # the first step of a process includes compilation: not timed
        t_window, n_window = time.perf_counter(), 0
      else:
        n_window += 1
      if done % log_every == 0 or done == num_steps:
        line = (f"step {done}/{num_steps} | loss {loss:.5f} | grad_norm {gnorm:.4f} | lr "
                f"{float(metrics['lr']):.3g}")
        if "gen_loss" in metrics:
          line += f" | gen_loss {float(metrics['gen_loss']):.5f}"
        if n_window:
          dt = time.perf_counter() - t_window
          record["steps_per_sec"] = n_window / dt
          record["tokens_per_sec"] = n_window * run.tokens_per_step / dt
          line += (f" | {record['steps_per_sec']:.2f} steps/s | "
                   f"{record['tokens_per_sec']:.0f} tokens/s")
          t_window, n_window = time.perf_counter(), 0
        if is_main:
          print(line, flush=True)
      writer.write(record)
      last = record
      if (ckpt_every > 0 and done % ckpt_every == 0) or done == num_steps:
        ckpt.save(done, state, run.data_iter, {"step": done, "objective": st.objective.kind,
                                               "time": time.time()})
        last_good = done
      if abort_at and done == abort_at:  # fault injection (tests): a hard kill
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
      if done < num_steps and stops.stop_requested():
        if last_good != done:
          ckpt.save(done, state, run.data_iter, {"step": done, "objective": st.objective.kind,
                                                 "time": time.time()})
          last_good = done
        ckpt.wait()
        raise TrainingStopped(stops.received or "a stop signal", done, ckpt.directory)
  finally:
    ckpt.close()
  return last
