"""The pipeline components a checkpoint folder can hold, and how to tell them apart.

Shared by the converter (`python -m helios_jax.convert`, safetensors -> Orbax) and the exporter
(`python -m helios_jax.export`, Orbax -> safetensors).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

from helios_jax import checkpoint

COMPONENTS = ("transformer", "vae", "text_encoder")
COPIED = ("tokenizer", "scheduler")


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
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise checkpoint.CheckpointError(f"{cfg_path}: unreadable ({e})") from e
  if not isinstance(cfg, dict):
    raise checkpoint.CheckpointError(f"{cfg_path}: expected a JSON object")
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


def run_cli_action(action: Callable[[], list[str]], verb: str, dst: str) -> int:
  """A convert / export CLI's outcome: one `error:` line and exit status 2 for bad input or an
  unwritable destination, else one line naming the components written."""
  try:
    done = action()
  except (checkpoint.CheckpointError, FileExistsError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{verb} {', '.join(done)} -> {dst}")
  return 0
