"""Exports a run's LoRA in the PyTorch ecosystem's format (diffusers / PEFT / official Helios).

  python -m helios_jax.training.lora_export --workdir=/runs/stage1_init --out=/ckpt/s1_lora \
      [--step=N] [--ema] [--partial_format=pth|safetensors]

Reads the run as `training.merge` does (`<workdir>/config.json`, the trainables of the latest
or given Orbax checkpoint, `--ema`: the Stage 3 EMA generator) and writes, atomically:

  <out>/pytorch_lora_weights.safetensors   the LoRA factors in diffusers naming,
      `transformer.<module>.lora_A.weight` `[r, in(, kt, kh, kw)]` and `.lora_B.weight`
      `[out, r(, 1, 1, 1)]` (Conv3d stems: A a kernel-sized conv, B a 1x1x1 conv, as PEFT),
      with the PEFT `LoraConfig` (r, lora_alpha, target_modules) in the header's
      `lora_adapter_metadata`, as `HeliosPipeline.save_lora_weights` writes it: diffusers'
      `load_lora_weights` and our `load_transformer(lora=...)` read it.
  <out>/transformer_partial.pth            the fully trained tensors (the memory stems when
      trained in full) in diffusers names and torch layout, as the official training's
      `save_extra_components` writes it (`--partial_format=safetensors`: no torch needed).
      Omitted when nothing trains in full.

The base is not read (only its shapes, from the run's config), so a 14B export is quick.
`base + s * (alpha / r) * B @ A` with the partial tensors replaced equals `training.merge`'s
output (spec §7.1).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from absl import flags

from helios_jax import checkpoint
from helios_jax import runtime
from helios_jax.config import HeliosTransformerConfig
from helios_jax.models import lora as lora_io
from helios_jax.models import transformer
from helios_jax.training import lora
from helios_jax.training import model as model_lib
from helios_jax.training import runs
from helios_jax.training import trainer

PARTIAL_FORMATS = ("pth", "safetensors")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined when run as a program, so importing export_run defines none)."""
  runs.define_run_flags("Output folder (must not exist).")
  flags.DEFINE_enum("partial_format", "pth", PARTIAL_FORMATS,
                    "Format of the fully trained tensors' file.")


def base_shapes(st: trainer.Settings) -> tuple[HeliosTransformerConfig, dict[str, Any]]:
  """(model config, nested dict of `ShapeDtypeStruct`) of a run's frozen base, no weights read.

  The config comes from where `model.build_base` takes it: the `init_from` folder (a Wan2.1
  folder for `init_format="wan"`) or the random-init preset with its overrides.
  """
  m = st.model
  if m.init_from:
    if not os.path.isdir(m.init_from):
      raise checkpoint.CheckpointError(f"init_from folder not found: {m.init_from}")
    config = (model_lib.read_wan_config(m.init_from) if m.init_format == "wan"
              else transformer.TRANSFORMER_SPEC.read_config(m.init_from))
  else:
    config = HeliosTransformerConfig.from_preset(m.preset).replace(**dict(m.overrides))
  _, abstract = transformer.TRANSFORMER_SPEC.abstract(config, m.dtype)
  return config, abstract


def _torch_kernel(x: np.ndarray) -> np.ndarray:
  """Flax kernel `[*k, in, out]` -> torch `[out, in, *k]` (inverse of `torch_to_flax`)."""
  n = x.ndim
  return np.ascontiguousarray(np.transpose(x, (n - 1, n - 2) + tuple(range(n - 2))))


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def lora_tensors(trainables: Mapping[str, Any], abstract: Mapping[str, Any],
                 config: HeliosTransformerConfig) -> tuple[dict[str, np.ndarray], list[str]]:
  """The LoRA factors as diffusers tensors, and the adapted module names.

  Args:
    trainables: {"lora": {...}, "full": {...}} (`training.lora` layout).
    abstract: the base's shapes (for the Conv3d kernel sizes).
    config: the model config (for the key map).

  Returns:
    ({"transformer.<module>.lora_A.weight": [r, in, *k], ".lora_B.weight": [out, r, *1]},
    sorted module names).
  """
  key_map = transformer.TRANSFORMER_SPEC.key_map(config)
  out: dict[str, np.ndarray] = {}
  modules = []
  for path in checkpoint.flatten_tree(trainables.get("lora", {})):
    if path[-1] != lora.LORA_A:
      continue
    module = path[:-1]
    node = _get(trainables["lora"], module)
    a_all = np.asarray(node[lora.LORA_A], np.float32)
    b_all = np.asarray(node[lora.LORA_B], np.float32)
    kshape = tuple(_get(abstract, module + ("kernel",)).shape)
    stacked = module[0] == "blocks"
    layers = range(kshape[0]) if stacked else [None]
    kshape = kshape[1:] if stacked else kshape
    for layer in layers:
      a = a_all[layer] if stacked else a_all   # [fan_in, r], rows ordered (*k, in)
      b = b_all[layer] if stacked else b_all   # [r, out]
      r = a.shape[-1]
      name = lora_io.torch_key(module + ("kernel",), layer, key_map).removesuffix(".weight")
      down = a.reshape(kshape[:-1] + (r,))           # [*k, in, r]
      down = _torch_kernel(down)                      # [r, in, *k]
      up = b.T.reshape((kshape[-1], r) + (1,) * (len(kshape) - 2))
      out[f"{lora_io.PREFIX}{name}.lora_A.weight"] = down
      out[f"{lora_io.PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(up)
      modules.append(name)
  return out, sorted(modules)


def partial_tensors(trainables: Mapping[str, Any],
                    config: HeliosTransformerConfig) -> dict[str, np.ndarray]:
  """The fully trained tensors in diffusers names and torch layout (`transformer_partial`)."""
  key_map = transformer.TRANSFORMER_SPEC.key_map(config)
  out = {}
  for path, x in checkpoint.flatten_tree(trainables.get("full", {})).items():
    x = np.asarray(x, np.float32)
    stacked = path[0] == "blocks"
    for layer in (range(x.shape[0]) if stacked else [None]):
      v = x[layer] if stacked else x
      out[lora_io.torch_key(path, layer, key_map)] = (
          _torch_kernel(v) if path[-1] == "kernel" and v.ndim >= 2 else np.ascontiguousarray(v))
  return out


def adapter_metadata(modules: list[str], rank: int, alpha: float) -> dict[str, Any]:
  """The PEFT `LoraConfig` fields diffusers stores (prefixed with the component name)."""
  cfg = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": list(modules),
         "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none",
         "use_rslora": False, "use_dora": False, "lora_bias": False}
  return {f"{lora_io.PREFIX}{k}": v for k, v in cfg.items()}


def _save_partial(tensors: dict[str, np.ndarray], folder: str, fmt: str) -> str:
  if fmt == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    path = os.path.join(folder, lora_io.PARTIAL_SAFETENSORS_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("--partial_format=pth needs torch; use --partial_format=safetensors") from e
  path = os.path.join(folder, lora_io.PARTIAL_PTH_NAME)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, path)
  return path


def export_run(workdir: str, out: str, step: int | None = None, ema: bool = False,
               partial_format: str = "pth", overwrite: bool = False) -> dict[str, Any]:
  """Writes a run's LoRA (+ partial file) as diffusers/PEFT files; returns a summary.

  Args:
    workdir: training run folder.
    out: destination folder (written atomically).
    step: checkpoint step (None: latest).
    ema: export the EMA of the trainables (Stage 3 releases the EMA generator).
    partial_format: "pth" (official `transformer_partial.pth`) or "safetensors".
    overwrite: replace an existing `out`.

  Returns:
    {"step", "lora_modules", "rank", "alpha", "partial_tensors", "files"}.
  """
  if partial_format not in PARTIAL_FORMATS:
    raise ValueError(f"partial_format={partial_format!r} must be one of {PARTIAL_FORMATS}")
  st = runs.read_run(workdir)
  config, abstract = base_shapes(st)
  trainables, step = runs.restore_trainables(workdir, step, ema)
  tensors, modules = lora_tensors(trainables, abstract, config)
  partial = partial_tensors(trainables, config)
  if not tensors and not partial:
    raise ValueError(f"{workdir}: the checkpoint at step {step} holds no trainables to export")
  files = []
  with checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
    if tensors:
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      meta = adapter_metadata(modules, st.trainable.rank, st.trainable.alpha)
      save_file(tensors, os.path.join(tmp, lora_io.LORA_WEIGHTS_NAME),
                metadata={"format": "pt", lora_io.METADATA_KEY: json.dumps(meta, sort_keys=True)})
      files.append(lora_io.LORA_WEIGHTS_NAME)
    if partial:
      files.append(os.path.basename(_save_partial(partial, tmp, partial_format)))
  return {"step": step, "lora_modules": len(modules), "rank": st.trainable.rank,
          "alpha": st.trainable.alpha, "partial_tensors": sorted(partial), "files": files}


def main(argv):
  del argv
  info = runs.run_tool(lambda workdir, out: export_run(workdir, out, FLAGS.step, FLAGS.ema,
                                                       FLAGS.partial_format))
  if info is None:
    return 2
  print(f"step {info['step']}: LoRA on {info['lora_modules']} module(s) (r={info['rank']}, "
        f"alpha={info['alpha']:g}), {len(info['partial_tensors'])} fully trained tensor(s) -> "
        f"{FLAGS.out}/{{{', '.join(info['files'])}}}", flush=True)
  return 0


if __name__ == "__main__":
  define_flags()
  runtime.run_cli(main)
