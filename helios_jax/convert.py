"""Checkpoint converter: diffusers/transformers safetensors -> our Orbax export.

  python -m helios_jax.convert --src DIR --dst DIR [--dtype auto|float32|bfloat16] [--overwrite]

`--src` is either one component folder (`transformer/`, `vae/`, `text_encoder/`, recognised by its
config.json) or a whole pipeline folder (`model_index.json` + `transformer/ vae/ text_encoder/
tokenizer/ scheduler/`). Components are converted tensor by tensor (peak host RAM ~ the largest
stacked parameter, not the model); `tokenizer/`, `scheduler/` and `model_index.json` are copied.
The output of one component is `DST/config.json` + `DST/params/`, an Orbax PyTree checkpoint that
`orbax.checkpoint.experimental.v1.load(DST/params)` reads without this package. `--dst` is written
atomically: a failed conversion leaves nothing behind.

`--dtype auto` stores each component in the precision the pipelines run it in: transformer and
text encoder bf16 (fp32-kept modules stay fp32), VAE fp32.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from absl import flags

from helios_jax import checkpoint
from helios_jax import runtime

COMPONENTS = ("transformer", "vae", "text_encoder")
COPIED = ("tokenizer", "scheduler")
AUTO_DTYPE = {"transformer": "bfloat16", "vae": "float32", "text_encoder": "bfloat16"}


def get_spec(component: str) -> checkpoint.ModelSpec:
  """The `ModelSpec` of a component name."""
  if component == "transformer":
    from helios_jax.models.transformer import TRANSFORMER_SPEC  # pylint: disable=g-import-not-at-top
    return TRANSFORMER_SPEC
  if component == "vae":
    from helios_jax.models.vae import VAE_SPEC  # pylint: disable=g-import-not-at-top
    return VAE_SPEC
  if component == "text_encoder":
    from helios_jax.models.text_encoder import TEXT_ENCODER_SPEC  # pylint: disable=g-import-not-at-top
    return TEXT_ENCODER_SPEC
  raise ValueError(f"unknown component {component!r}; known: {COMPONENTS}")


def detect_component(folder: str) -> str:
  """Which component a folder holds, from its config.json."""
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise checkpoint.CheckpointError(f"{folder}: no config.json (and no model_index.json)")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cls = cfg.get("_class_name", "")
  if cls == "HeliosTransformer3DModel":
    return "transformer"
  if cls == "AutoencoderKLWan":
    return "vae"
  if cfg.get("model_type") == "umt5" or "UMT5EncoderModel" in cfg.get("architectures", []):
    return "text_encoder"
  raise checkpoint.CheckpointError(
      f"{cfg_path}: cannot tell which component this is (_class_name={cls!r}, "
      f"model_type={cfg.get('model_type')!r})")


def _dtype(component: str, dtype: str) -> Any:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  name = AUTO_DTYPE[component] if dtype == "auto" else dtype
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"--dtype={dtype!r}: use auto, float32, bfloat16 or float16")
  return jnp.dtype(name)


def _folder_bytes(folder: str) -> int:
  """Bytes of the weight files under `folder` (what a conversion writes at most)."""
  total = 0
  for root, _, files in os.walk(folder):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                 if f.endswith((".safetensors", ".bin")))
  return total


def convert(src: str, dst: str, dtype: str = "auto", *, overwrite: bool = False,
            progress: bool = True) -> list[str]:
  """Converts a component or pipeline folder; returns the converted component names."""
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
flags.DEFINE_string("src", None, "diffusers component or pipeline folder", required=True)
flags.DEFINE_string("dst", None, "output folder (must not exist unless --overwrite)",
                    required=True)
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                  "stored parameter dtype (auto: transformer/text encoder bf16, VAE fp32)")
flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


def main(argv):
  del argv
  try:
    done = convert(FLAGS.src, FLAGS.dst, FLAGS.dtype, overwrite=FLAGS.overwrite)
  except (checkpoint.CheckpointError, FileExistsError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"converted {', '.join(done)} -> {FLAGS.dst}")
  return 0


if __name__ == "__main__":
  runtime.run_cli(main)
