"""Orbax `CheckpointManager` for training runs (style anchor §8.14).

One checkpoint per saved step under `<workdir>/checkpoints/<step>/` with composite items:

  state      trainables (LoRA + full masters, fp32), optimizer state, step, rng key data
             (StandardSave; restored straight into the target shardings)
  data_iter  the grain iterator position of every process (`grain.checkpoint`)
  meta       JSON: step, stage, wall-clock, the config name

Saves are asynchronous, old steps are pruned to `keep` (Orbax commits atomically: a run killed
mid-save leaves the previous step as the latest). The frozen base is not stored: it is
re-derived from the config (`init_from` or the random-init seed); `<workdir>/config.json`
records the run's config for the LoRA-merge tool.
"""

from __future__ import annotations

import os
from typing import Any

import jax

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
  """Thin wrapper around `orbax.checkpoint.CheckpointManager` for the trainer's items.

  Args:
    workdir: the run's folder.
    keep: checkpoints kept (older ones deleted).
    async_save: save in a background thread.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                           enable_async_checkpointing=bool(async_save))
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict[str, Any], data_iter: Any, meta: dict[str, Any]) -> bool:
    """Starts saving step `step` (returns once the arrays are copied; writes continue async)."""
    import grain  # pylint: disable=g-import-not-at-top
    args = {"state": self._ocp.args.StandardSave(state), "meta": self._ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(int(step), args=self._ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: dict[str, Any], data_iter: Any):
    """Restores (state, meta) of `step` into `abstract_state` (ShapeDtypeStructs with
    shardings) and moves `data_iter` to its saved position."""
    import grain  # pylint: disable=g-import-not-at-top
    args = {"state": self._ocp.args.StandardRestore(abstract_state),
            "meta": self._ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(int(step), args=self._ocp.args.Composite(**args))
    return out.state, out.meta

  def restore_state(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a step (default latest) as host arrays, without a target (tools)."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self.manager.restore(step, args=self._ocp.args.Composite(
        state=self._ocp.args.StandardRestore(), meta=self._ocp.args.JsonRestore()))
    return jax.tree.map(lambda x: x, out.state), out.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
