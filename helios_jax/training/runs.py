"""Reading a finished (or stopped) training run: its settings and its checkpointed trainables.

Shared by the tools that turn a `--workdir` into weights (`training.merge`: the merged
transformer; `training.lora_export`: diffusers LoRA files).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from helios_jax.training import checkpointing
from helios_jax.training import trainer


def read_run(workdir: str) -> trainer.Settings:
  """The typed settings of a run, from `<workdir>/config.json` (what the trainer wrote)."""
  path = os.path.join(workdir, trainer.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no run config {path}: not a helios_jax training workdir")
  with open(path) as f:
    return trainer.settings_from_config(ml_collections.ConfigDict(json.load(f)))


def restore_trainables(workdir: str, step: int | None = None,
                       ema: bool = False) -> tuple[dict[str, Any], int]:
  """(trainables or their EMA as host arrays, step) of a checkpoint (default: the latest).

  Restored without a target: only the trainables are read back (every stage's state is a
  dict holding them, Stage 3's with more groups), with their saved shapes and dtypes.
  """
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    steps = ckpt.all_steps()
    step = ckpt.latest_step() if step is None else int(step)
    if step is None or step not in steps:
      raise FileNotFoundError(f"checkpoint step {step} not found in {ckpt.directory} "
                              f"(have {steps})")
    state, _ = ckpt.restore_state(step)
  finally:
    ckpt.close()
  name = "ema" if ema else "trainables"
  if name not in state:
    raise KeyError(f"checkpoint step {step} in {ckpt.directory} has no {name!r} entry "
                   f"(entries: {sorted(state)}); EMA exists only when ema.enabled")
  return jax.tree.map(np.asarray, state[name]), step
