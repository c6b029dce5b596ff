"""Trains a Helios stage: `python -m helios_jax.train --config=experiments/stage2.py --workdir=DIR`.

Thin entry point (the loop is `helios_jax.training.trainer.train_and_evaluate`). The config
file's `get_config(arg)` takes its argument after a colon, e.g.
`--config=experiments/stage1.py:tiny` or `--config=experiments/stage2.py:post`; any field can be
overridden with `--config.optim.lr=1e-4`. A config mistake (an unknown or misspelt key, a value
of the wrong type, a bad config argument) is one line on stderr and exit status 2, e.g.
`unknown config key 'optim.lrr'; did you mean 'optim.lr'?`. Re-running with the same `--workdir`
resumes from its latest checkpoint. SIGINT (Ctrl-C) or SIGTERM (what a preempting scheduler
sends) stops the run after the current step with a checkpoint and one line saying where it
resumes (exit status 130 / 143); a second Ctrl-C interrupts at once. A workdir is locked by
its running trainer: a second one on the same workdir stops with an error naming the holder.
Logs are quiet by default (`--verbosity=0` shows INFO).

Multi-host (one process per host, same command everywhere): pass `--multihost`, which calls
`jax.distributed.initialize()`. On SLURM / Open MPI / TPU / GKE the coordinator, process count
and process id are detected from the environment; elsewhere set them with the flags below or the
environment variables JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
JAX_PROCESS_ID. Example, two 8-GPU hosts:

  # on host 0 (10.0.0.1) and host 1, with JAX_PROCESS_ID=0 / 1:
  JAX_COORDINATOR_ADDRESS=10.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$RANK \
    python -m helios_jax.train --multihost --config=experiments/stage2.py \
      --config.model.init_from=/ckpt/Helios-Base/transformer \
      --config.data.data_dir=/data/latents --workdir=/shared/runs/stage2

The workdir must be on a filesystem shared by all hosts (Orbax writes one checkpoint
collectively). On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from helios_jax import runtime
from helios_jax.config import ConfigError
from helios_jax.training import settings

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (`get_config(arg)`), e.g. experiments/stage1.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (default: environment).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process (default: environment).")
flags.mark_flags_as_required(["config", "workdir"])


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def initialize_distributed() -> None:
  """`jax.distributed.initialize` from the flags, the JAX_* variables, or auto-detection."""
  import jax  # pylint: disable=g-import-not-at-top
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else _env_int(
      "JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms.startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


CONFIG_ERROR_EXIT = 2
# A run stopped by a signal exits like a process killed by it (128 + number), after its
# checkpoint: schedulers see a preemption, not a success.
STOPPED_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _fail(message: str) -> None:
  """Exits with one line on stderr (a config mistake, no traceback)."""
  sys.stderr.write(message.strip().splitlines()[-1] + "\n")
  sys.exit(CONFIG_ERROR_EXIT)


def _load_config(argv: list[str]):
  """The experiment config named by `--config=FILE[:ARG]` in `argv`, without overrides."""
  values = [a.partition("=")[2] if a.startswith("--config=") else nxt
            for a, nxt in zip(argv, argv[1:] + [""]) if a.startswith("--config=") or (
                a == "--config")]
  if not values:
    return None
  path, sep, arg = values[-1].partition(":")
  spec = importlib.util.spec_from_file_location("_helios_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if sep else module.get_config()


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a config mistake ends the process via `_fail`.

  ml_collections rejects an override of a key the config lacks while parsing; the config is
  then loaded without the overrides to name the key in full with the closest known keys.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # e.g. get_config's ValueError, a value of the wrong type
    _fail(str(e))
  except (AttributeError, KeyError) as e:  # an override naming an unknown key
    config = _load_config(argv)
    keys = [a[len("--config."):].partition("=")[0] for a in argv if a.startswith("--config.")]
    for key in keys if config is not None else ():
      message = settings.check_override(config, key)
      if message:
        _fail(message)
    _fail(f"bad config override: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from helios_jax.training import trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.settings_from_config(_CONFIG.value)  # validated before any work or logging
  except ConfigError as e:
    _fail(str(e))
  if _MULTIHOST.value:
    initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except trainer.WorkdirBusyError as e:
    _fail(f"error: {e}")
  except trainer.TrainingStopped as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(STOPPED_EXIT[e.signal_name])
  if _MULTIHOST.value:
    jax.distributed.shutdown()


if __name__ == "__main__":
  runtime.run_cli(main, flags_parser=parse_flags)
