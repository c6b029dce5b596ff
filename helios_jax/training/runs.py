"""Reading a finished (or stopped) training run: its settings and its checkpointed trainables.

Shared by the tools that turn a `--workdir` into weights (`training.merge`: the merged
transformer; `training.lora_export`: diffusers LoRA files).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from helios_jax import runtime
from helios_jax.training import checkpointing
from helios_jax.training import trainer


def define_run_flags(out_help: str) -> None:
  """The flags of a tool that reads a run: --workdir, --out, --step, --ema."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Training run folder (config.json, checkpoints/).")
  flags.DEFINE_string("out", None, out_help)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_bool("ema", False, "Use the EMA trainables (Stage 3) instead of the live ones.")


def run_tool(action: Callable[[str, str], Any]) -> Any:
  """Runs a run-reading CLI's `action(workdir, out)` after its flag and output checks.

  Returns the action's result, or None after printing one `error:` line (the caller exits 2).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  if not fv.workdir or not fv.out:
    raise app.UsageError("--workdir and --out are required")
  try:
    runtime.check_writable(fv.out, folder=True)
    return action(fv.workdir, fv.out)
  except (FileNotFoundError, FileExistsError, KeyError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return None


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
