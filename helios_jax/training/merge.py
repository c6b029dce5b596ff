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

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from helios_jax import checkpoint
from helios_jax import runtime
from helios_jax.models import transformer
from helios_jax.training import lora
from helios_jax.training import model as model_lib
from helios_jax.training import runs

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined when run as a program, so importing merge_run defines none)."""
  runs.define_run_flags("Output transformer folder (must not exist).")
  flags.DEFINE_string("dtype", None, "Output dtype (default: the base's param dtype).")


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
  st = runs.read_run(workdir)
  model_config, _, base_host = model_lib.build_base(st.model)
  base = jax.tree.map(jnp.asarray, base_host)
  trainables, step = runs.restore_trainables(workdir, step, ema)
  trainables = jax.tree.map(jnp.asarray, trainables)
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
  out = runs.run_tool(lambda workdir, out: merge_run(workdir, out, FLAGS.step, FLAGS.dtype,
                                                     ema=FLAGS.ema))
  if out is None:
    return 2
  print(f"merged transformer written to {out}", flush=True)
  return 0


if __name__ == "__main__":
  define_flags()
  runtime.run_cli(main)
