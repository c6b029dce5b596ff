"""Checkpoint converter: diffusers/transformers safetensors -> our Orbax export.

  python -m helios_jax.convert --src DIR --dst DIR [--dtype keep|auto|float32|bfloat16|float16]
      [--overwrite]

`--src` is either one component folder (`transformer/`, `vae/`, `text_encoder/`, recognised by its
config.json) or a whole pipeline folder (`model_index.json` + `transformer/ vae/ text_encoder/
tokenizer/ scheduler/`). Components are converted tensor by tensor (peak host RAM ~ the largest
stacked parameter, not the model); `tokenizer/`, `scheduler/` and `model_index.json` are copied.
The output of one component is `DST/config.json` + `DST/params/`, an Orbax PyTree checkpoint that
`orbax.checkpoint.experimental.v1.load(DST/params)` reads without this package. `--dst` is written
atomically: a failed conversion leaves nothing behind.

`--dtype keep` (the default) is lossless: every tensor is stored in its safetensors dtype, bit
for bit (the loaders cast to the dtype they are asked for). Downcasting is opt-in: `--dtype
bfloat16` (or float32 / float16) stores the component under the model's precision policy
(fp32-kept modules stay fp32), and `--dtype auto` stores each component in the precision the
pipelines run it in: transformer and text encoder bf16, VAE fp32.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import flags

from helios_jax import checkpoint
from helios_jax import components
from helios_jax import runtime

# The component registry (also importable from here, as before).
COMPONENTS, COPIED = components.COMPONENTS, components.COPIED
get_spec, detect_component = components.get_spec, components.detect_component

AUTO_DTYPE = {"transformer": "bfloat16", "vae": "float32", "text_encoder": "bfloat16"}
DTYPES = ("keep", "auto", "float32", "bfloat16", "float16")


def _dtype(component: str, dtype: str) -> Any:
  """The `export_model` dtype of `--dtype` for a component ("keep" passes through)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: use one of {', '.join(DTYPES)}")
  if dtype == "keep":
    return "keep"
  return jnp.dtype(AUTO_DTYPE[component] if dtype == "auto" else dtype)


def _folder_bytes(folder: str) -> int:
  """Bytes of the weight files under `folder` (what a conversion writes at most)."""
  total = 0
  for root, _, files in os.walk(folder):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                 if f.endswith((".safetensors", ".bin")))
  return total


def convert(src: str, dst: str, dtype: str = "keep", *, overwrite: bool = False,
            progress: bool = True) -> list[str]:
  """Converts a component or pipeline folder; returns the converted component names.

  Args:
    src: diffusers/transformers component folder or pipeline folder.
    dst: output folder (written atomically).
    dtype: one of `DTYPES`; "keep" (default) stores every tensor in its stored dtype.
    overwrite: replace an existing `dst`.
    progress: show a progress bar per component.
  """
  _dtype("transformer", dtype)  # a bad --dtype fails before any work
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  if not os.path.isdir(src):
    raise checkpoint.CheckpointError(f"--src folder not found: {src}")
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"--dst already exists: {dst} (pass --overwrite)")
  # At most the source's size (a bf16 conversion of fp32 weights needs half).
  runtime.check_writable(dst, _folder_bytes(src), folder=True)
  index = os.path.join(src, "model_index.json")
  if not os.path.isfile(index):
    component = detect_component(src)
    spec = get_spec(component)
    checkpoint.export_model(spec, src, dst, _dtype(component, dtype), progress=progress,
                            overwrite=overwrite)
    return [component]
  with open(index) as f:
    model_index = json.load(f)
  present = [c for c in COMPONENTS if os.path.isdir(os.path.join(src, c))]
  listed = [c for c in COMPONENTS if model_index.get(c) not in (None, [None, None])]
  missing = [c for c in listed if c not in present]
  if missing:
    raise checkpoint.CheckpointError(f"{src}: model_index.json lists {missing} but the "
                                     "folder(s) are missing")
  with checkpoint.atomic_directory(dst, overwrite=overwrite) as tmp:
    for component in present:
      checkpoint.export_model(get_spec(component), os.path.join(src, component),
                              os.path.join(tmp, component), _dtype(component, dtype),
                              progress=progress)
    for name in COPIED:
      if os.path.isdir(os.path.join(src, name)):
        shutil.copytree(os.path.join(src, name), os.path.join(tmp, name))
    shutil.copy2(index, os.path.join(tmp, "model_index.json"))
  return present


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI flags (defined only when run as a program, so modules can import this one)."""
  flags.DEFINE_string("src", None, "diffusers component or pipeline folder", required=True)
  flags.DEFINE_string("dst", None, "output folder (must not exist unless --overwrite)",
                      required=True)
  flags.DEFINE_enum("dtype", "keep", list(DTYPES),
                    "stored parameter dtype (keep: each tensor's stored dtype, lossless; auto: "
                    "transformer/text encoder bf16, VAE fp32; else that dtype, fp32-kept "
                    "modules stay fp32)")
  flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


def main(argv):
  del argv
  return components.run_cli_action(
      lambda: convert(FLAGS.src, FLAGS.dst, FLAGS.dtype, overwrite=FLAGS.overwrite),
      "converted", FLAGS.dst)


if __name__ == "__main__":
  define_flags()
  runtime.run_cli(main)
