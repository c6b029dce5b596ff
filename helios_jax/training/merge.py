"""Merges a run's LoRA (and fully trained stems) into its base: the next phase's init weights.

  python -m helios_jax.training.merge --workdir=/runs/stage1_init --out=/ckpt/base_init \
      [--step=N] [--dtype=bfloat16]

Reads `<workdir>/config.json` (the run's config: where the base came from, the LoRA rank /
alpha and modes), rebuilds the frozen base exactly as the trainer did, restores the trainables
of the latest (or given) checkpoint, forms W + (alpha / r) A B in fp32 per kernel (full-trained
stems replace their base copies) and writes `<out>/config.json` + `<out>/params/` in our
Orbax export layout (atomically), loadable by `load_transformer` and as `model.init_from`
(`init_format="helios"`) of the next phase, which attaches a fresh zero-initialised LoRA
(spec §7.1, `tools/merge_lora_for_helios.py`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags

from helios_jax import checkpoint
from helios_jax import runtime
from helios_jax.models import transformer
from helios_jax.training import checkpointing
from helios_jax.training import lora
from helios_jax.training import losses
from helios_jax.training import model as model_lib
from helios_jax.training import optim
from helios_jax.training import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder (config.json, checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output transformer folder (must not exist).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_DTYPE = flags.DEFINE_string("dtype", None, "Output dtype (default: the base's param dtype).")
_EMA = flags.DEFINE_bool("ema", False, "Merge the EMA trainables (Stage 3) instead of the live ones.")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, trainer.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no run config {path}: not a helios_jax training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_trainables(workdir: str, base: dict[str, Any], st: trainer.Settings,
                       step: int | None = None, ema: bool = False) -> tuple[dict[str, Any], int]:
  """The trainables (or their EMA) of a checkpoint as host-device arrays, and their step."""
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else int(step)
    if step is None or step not in ckpt.all_steps():
      raise FileNotFoundError(f"checkpoint step {step} not found in {ckpt.directory} "
                              f"(have {ckpt.all_steps()})")
    if ema or st.kind in losses.STAGE3_KINDS:  # Stage 3 states carry more groups: untargeted
      state, _ = ckpt.restore_state(step)
      name = "ema" if ema else "trainables"
      if name not in state:
        raise KeyError(f"checkpoint step {step} in {ckpt.directory} has no {name!r} entry "
                       f"(entries: {sorted(state)}); EMA exists only when ema.enabled")
      return jax.tree.map(jnp.asarray, state[name]), step
    key = jax.random.key(st.seed)
    abstract_tr = jax.eval_shape(lambda b: lora.init_trainables(b, st.trainable, key), base)
    tx = optim.make_optimizer(st.optim, abstract_tr)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)
    abstract = {"step": spec(jax.ShapeDtypeStruct((), jnp.int32)),
                "rng": spec(jax.eval_shape(lambda: jax.random.key_data(key))),
                "trainables": jax.tree.map(spec, abstract_tr),
                "opt_state": jax.tree.map(spec, jax.eval_shape(tx.init, abstract_tr))}
    state, _ = ckpt.restore(step, abstract, None)
  finally:
    ckpt.close()
  return state["trainables"], step


def merge_run(workdir: str, out: str, step: int | None = None, dtype: Any = None,
              overwrite: bool = False, ema: bool = False) -> str:
  """Writes the merged transformer of a run; returns `out`.

  Args:
    workdir: training run folder.
    out: destination folder (our export layout).
    step: checkpoint step (None: latest).
    dtype: output dtype (None: the run's base dtype; fp32-kept modules stay fp32).
    overwrite: replace an existing `out`.
    ema: merge the EMA of the trainables (Stage 3 releases the EMA generator).
  """
  config = read_run_config(workdir)
  st = trainer.settings_from_config(config)
  model_config, _, base_host = model_lib.build_base(st.model)
  base = jax.tree.map(jnp.asarray, base_host)
  trainables, step = restore_trainables(workdir, base, st, step, ema)
  merged = jax.jit(lambda b, t: lora.merge(b, t, st.trainable))(base, trainables)
  if dtype is not None:  # the precision policy of that dtype (fp32-kept modules stay fp32)
    _, abstract = transformer.TRANSFORMER_SPEC.abstract(model_config, jnp.dtype(dtype))
    merged = jax.tree.map(lambda x, a: x.astype(a.dtype), merged, abstract)
  merged = jax.tree.map(np.asarray, merged)
  with checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
    model_config.to_json(os.path.join(tmp, "config.json"),
                         _class_name="HeliosTransformer3DModel",
                         _helios_jax_merged_from=f"{os.path.abspath(workdir)}@{step}")
    checkpoint.save_params(os.path.join(tmp, checkpoint.PARAMS_DIR), merged)
  return out


def main(argv):
  del argv
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  try:
    runtime.check_writable(_OUT.value, folder=True)
    out = merge_run(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value, ema=_EMA.value)
  except (FileNotFoundError, FileExistsError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"merged transformer written to {out}", flush=True)
  return 0


if __name__ == "__main__":
  runtime.run_cli(main)
