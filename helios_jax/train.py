"""Trains a Helios stage: `python -m helios_jax.train --config=experiments/stage2.py --workdir=DIR`.

Thin entry point (the loop is `helios_jax.training.trainer.train_and_evaluate`). The config
file's `get_config(arg)` takes its argument after a colon, e.g.
`--config=experiments/stage1.py:tiny` or `--config=experiments/stage2.py:post`; any field can be
overridden with `--config.optim.lr=1e-4` (unknown keys are an error). Re-running with the same
`--workdir` resumes from its latest checkpoint.

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

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _MULTIHOST.value:
    initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from helios_jax.training import trainer  # pylint: disable=g-import-not-at-top
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if _MULTIHOST.value:
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
