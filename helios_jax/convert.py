"""Checkpoint converter: diffusers/transformers safetensors -> our Orbax export.

  python -m helios_jax.convert --src DIR --dst DIR [--dtype keep|auto|float32|bfloat16|float16]
      [--quantize fp8|int8w [--keep_bf16 REGEX,...] [--keep_blocks first:N,last:N,I,I-J]]
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

`--quantize fp8|int8w` stores the transformer pre-quantized (`quantize.export_quantized`): the
Qwix post-training quantization that `Pipeline.from_pretrained(quantize=...)` applies on load,
done once at conversion (fp8: e4m3 weights, activations quantized per token at run time; int8w:
int8 weights, bf16 activations). Quantized kernels are stored as their int8 / float8_e4m3fn
values + bf16 per-channel scales, every other transformer parameter in bf16 (fp32-kept modules
fp32), plus `DST/quantization.json` (mode, patterns, quantized layers, minimum jax/qwix). It loads
without the bf16 weights (`quantize.load_quantized_transformer`, or `Pipeline.from_pretrained` /
`generate --model_dir` on the converted pipeline, no `--quantize` needed) and is about half the
size of the bf16 transformer. `--keep_bf16` (comma-separated module-path regexes, default
`quantize.DEFAULT_KEEP`: the condition embedder and the output projection) names the `Linear`s left
unquantized; `--keep_blocks` (e.g. `first:3,last:3`) keeps whole blocks unquantized (the block
stack is stored in segments). Only the transformer is quantized (in pipeline mode the other components convert as
without it); with `--quantize`, `--dtype float32|float16` is refused (the transformer is bf16;
keep / auto / bfloat16 are accepted and the VAE / text encoder follow `--dtype` as usual).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Sequence

from absl import flags

from helios_jax import checkpoint
from helios_jax import components
from helios_jax import runtime

# The component registry (also importable from here, as before).
COMPONENTS, COPIED = components.COMPONENTS, components.COPIED
get_spec, detect_component = components.get_spec, components.detect_component

AUTO_DTYPE = {"transformer": "bfloat16", "vae": "float32", "text_encoder": "bfloat16"}
DTYPES = ("keep", "auto", "float32", "bfloat16", "float16")
# --dtype values accepted with --quantize (all store the quantized transformer's rest in bf16).
QUANTIZE_DTYPES = ("keep", "auto", "bfloat16")


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


def _check_quantize(quantize: str | None, dtype: str, keep_bf16: Sequence[str] | None,
                    keep_blocks: Any = ()) -> tuple[str, ...] | None:
  """Validates `--quantize` / `--keep_bf16` / `--keep_blocks` against `--dtype`; returns the
  keep patterns."""
  if quantize is None:
    if keep_bf16 is not None or keep_blocks:
      raise ValueError("--keep_bf16 / --keep_blocks apply only with --quantize fp8|int8w")
    return None
  from helios_jax import quantize as quant_lib  # pylint: disable=g-import-not-at-top
  try:
    quant_lib.check_mode(quantize)
  except RuntimeError as e:  # fp8 on a platform that cannot run it
    raise ValueError(f"--quantize={quantize}: {e}") from None
  if dtype not in QUANTIZE_DTYPES:
    raise ValueError(f"--dtype={dtype} cannot be used with --quantize={quantize}: the quantized "
                     "transformer keeps its non-quantized layers in bfloat16; use --dtype "
                     f"{', '.join(QUANTIZE_DTYPES)}")
  return quant_lib.check_patterns(quant_lib.DEFAULT_KEEP if keep_bf16 is None else keep_bf16)


def convert(src: str, dst: str, dtype: str = "keep", *, overwrite: bool = False,
            progress: bool = True, quantize: str | None = None,
            keep_bf16: Sequence[str] | None = None, keep_blocks: Any = ()) -> list[str]:
  """Converts a component or pipeline folder; returns the converted component names.

  Args:
    src: diffusers/transformers component folder or pipeline folder.
    dst: output folder (written atomically).
    dtype: one of `DTYPES`; "keep" (default) stores every tensor in its stored dtype.
    overwrite: replace an existing `dst`.
    progress: show a progress bar per component.
    quantize: None, "fp8" or "int8w": store the transformer pre-quantized
      (`quantize.export_quantized`); `dtype` must then be keep / auto / bfloat16.
    keep_bf16: module-path regexes of the transformer `Linear`s left unquantized (None:
      `quantize.DEFAULT_KEEP`); only with `quantize`.
    keep_blocks: transformer blocks left unquantized ("first:3,last:3", [0, 39];
      `quantize.parse_blocks`); only with `quantize`.

  Raises:
    ValueError: a bad dtype / mode / pattern, or `quantize` on a non-transformer component.
    checkpoint.CheckpointError: a missing or corrupt source.
    FileExistsError: `dst` exists and not `overwrite`.
  """
  _dtype("transformer", dtype)  # a bad --dtype fails before any work
  keep = _check_quantize(quantize, dtype, keep_bf16, keep_blocks)
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
    if quantize is not None:
      if component != "transformer":
        raise ValueError(f"--quantize={quantize} applies to the transformer only; {src} holds "
                         f"the {component}")
      _export_quantized(src, dst, quantize, keep, keep_blocks, progress=progress,
                        overwrite=overwrite)
      return [component]
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
  if quantize is not None and "transformer" not in present:
    raise ValueError(f"--quantize={quantize}: {src} has no transformer/ folder to quantize")
  with checkpoint.atomic_directory(dst, overwrite=overwrite) as tmp:
    for component in present:
      if component == "transformer" and quantize is not None:
        _export_quantized(os.path.join(src, component), os.path.join(tmp, component), quantize,
                          keep, keep_blocks, progress=progress)
        continue
      checkpoint.export_model(get_spec(component), os.path.join(src, component),
                              os.path.join(tmp, component), _dtype(component, dtype),
                              progress=progress)
    for name in COPIED:
      if os.path.isdir(os.path.join(src, name)):
        shutil.copytree(os.path.join(src, name), os.path.join(tmp, name))
    shutil.copy2(index, os.path.join(tmp, "model_index.json"))
  return present


def _export_quantized(src: str, dst: str, mode: str, keep: Sequence[str], keep_blocks: Any,
                      **kwargs) -> None:
  """`quantize.export_quantized` of a transformer folder (refusing an already quantized one)."""
  from helios_jax import quantize as quant_lib  # pylint: disable=g-import-not-at-top
  if quant_lib.is_quantized_export(src):
    raise ValueError(f"--quantize={mode}: {src} is already a pre-quantized export")
  quant_lib.export_quantized(src, dst, mode, keep, keep_blocks, **kwargs)


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
  flags.DEFINE_enum("quantize", None, ["fp8", "int8w"],
                    "store the transformer pre-quantized (Qwix PTQ): fp8 (e4m3 weights + "
                    "activations) or int8w (int8 weights); unset: not quantized")
  from helios_jax import quantize as quant_lib  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("keep_bf16", list(quant_lib.DEFAULT_KEEP),
                    "with --quantize: comma-separated module-path regexes (full match, e.g. "
                    "blocks/ffn/proj_out) of the transformer Linears left unquantized; empty "
                    "quantizes every Linear")
  flags.DEFINE_string("keep_blocks", "", "with --quantize: transformer blocks left unquantized, "
                      "comma-separated first:N, last:N, I or I-J (e.g. first:3,last:3)")
  flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


def main(argv):
  del argv
  keep = FLAGS.keep_bf16 if FLAGS["keep_bf16"].present else None
  return components.run_cli_action(
      lambda: convert(FLAGS.src, FLAGS.dst, FLAGS.dtype, overwrite=FLAGS.overwrite,
                      quantize=FLAGS.quantize, keep_bf16=keep, keep_blocks=FLAGS.keep_blocks),
      "converted", FLAGS.dst)


if __name__ == "__main__":
  define_flags()
  runtime.run_cli(main)
