"""Post-training quantization of the DiT with Qwix: fp8 (e4m3) weights + activations, int8 weights.

`quantize_transformer(transformer, mode)` returns a new `HeliosTransformer` whose `Linear`
kernels are Qwix `QArray`s (per-output-channel absmax scales) and whose forward is intercepted by
a `qwix.PtqProvider`: every `jnp.dot` of a quantized `Linear` becomes `qwix.dot_general` on the
quantized operands (fp8: the activation is quantized per token on the fly, dynamic range; int8w:
weight-only, the activation stays bf16). Nothing else changes: norms, RoPE, attention
(softmax(QK^T)V), modulation arithmetic and the fp32 residual stream keep their dtypes.

How the scanned blocks are handled: Qwix's NNX PTQ replaces a weight by its quantized form the
first time the op runs inside the module, which cannot reach the stacked block weights (the block
scan merges a fresh per-layer module from a slice of the stacked state in every iteration). So
the weights are quantized here, ahead of any forward (`skip_nnx_init`): a stacked kernel
`[L, in, out]` is quantized layer by layer (vmapped `qwix.quantize`, the same `HowToQuantize` that
Qwix derives for `jnp.dot`), stored as `WithAux(QArray)` on the stacked module, and the scan
slices the `QArray` leaves like any other layer state. Qwix then matches its rules by module path
inside the scan body (`blocks/attn1/to_q`, ...), one path for all layers.

Consequence: one scanned block stack is one program, so a rule applies to every layer of the
stack. `keep_bf16` names module paths, and a block path ("blocks/ffn/proj_out") keeps (or
quantizes) that layer type in all blocks. Per-block exceptions (ModelOpt's "first/last 3 blocks
in bf16") are `keep_blocks`: the stack is cut into separately stacked segments
(`transformer.segment_blocks`, one scan per segment, paths `blocks/<segment>/...`) and the
segments of kept blocks stay entirely in the model dtype (`parse_blocks("first:3,last:3", n)`).

Works on abstract models too (`jax.ShapeDtypeStruct` leaves, e.g. `TRANSFORMER_SPEC.abstract`):
the quantized shapes come from `jax.eval_shape` (benchmarks/memory_plan.py).

Pre-quantized export (`python -m helios_jax.convert --quantize fp8|int8w`, `export_quantized`):
a diffusers `transformer/` folder becomes `config.json` + `params/` (Orbax) + `quantization.json`,
streamed one parameter leaf at a time; each quantized kernel is stored as its Qwix `QArray`
fields (`<linear>/kernel/array/qvalue` float8_e4m3fn / int8 `[L, in, out]`,
`<linear>/kernel/array/scale` bf16 `[L, 1, out]`), every other leaf in the bf16 precision policy
(fp32-kept modules fp32). The arrays are bit-identical to `nnx.to_pure_dict(quantize_transformer(
load_transformer(src, jnp.bfloat16), mode, keep_bf16).params)` (same `_quantize_value`).
`load_quantized_transformer` reads it back without the bf16 weights: it quantizes the abstract
model with the recorded mode and keep patterns (so the trees match) and fills it from `params/`.
`quantization.json` records the format, mode, qtypes, patterns, quantized paths, the minimum
jax/qwix versions that can read it (`requires`) and the versions that wrote it (`written_with`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwix
from qwix._src.core import dot_general as qwix_dot_general
from qwix._src.core import qarray as qwix_qarray
from qwix._src.providers import ptq as qwix_ptq
from qwix._src.utils import flax_util as qwix_flax_util

from helios_jax import checkpoint
from helios_jax.models import layers
from helios_jax.models import transformer as transformer_lib
from helios_jax.models.attention import KernelConfig

try:  # not a declared dependency: without it versions compare as numeric release tuples
  from packaging import version as _packaging_version
except ImportError:  # pragma: no cover
  _packaging_version = None

# mode -> (weight qtype, activation qtype or None = weight-only).
MODES = {
    "fp8": (jnp.float8_e4m3fn, jnp.float8_e4m3fn),
    "int8w": (jnp.int8, None),
}

# Module paths (regexes, full match on the '/'-joined NNX path of a `Linear`) whose matmuls
# stay in the model dtype by default:
#   condition_embedder/*: text projection, timestep MLP (fp32-kept) and time_proj (the adaLN
#     modulation of every block);
#   proj_out: the output head.
# Never quantized (not `Linear`s, no pattern needed): the patch embeddings (`patch_embedding`,
# `memory/*`, 3D convs), norms, scale-shift tables, RoPE, the attention core.
# Whole blocks (e.g. the first/last N) are kept with `keep_blocks`, not with patterns.
DEFAULT_KEEP: tuple[str, ...] = (
    r"condition_embedder/.*",
    r"proj_out",
)

CALL_METHOD = "forward_channels_last"  # what the sampler calls; __call__ goes through it.


@functools.cache
def fp8_supported(platform: str | None = None) -> tuple[bool, str]:
  """Whether the backend compiles and runs a float8_e4m3fn dot (probed once per platform).

  Returns:
    (ok, reason): reason is the compiler/runtime error when not ok.
  """
  platform = platform or jax.default_backend()
  try:
    dev = jax.devices(platform)[0]
    a = jax.device_put(jnp.ones((16, 16), jnp.float8_e4m3fn), dev)
    y = jax.jit(lambda u, v: jnp.dot(u, v, preferred_element_type=jnp.float32))(a, a)
    ok = float(y[0, 0]) == 16.0
    return ok, "" if ok else f"fp8 dot returned {float(y[0, 0])}, expected 16"
  except Exception as e:  # pylint: disable=broad-except
    return False, f"{type(e).__name__}: {e}"


def check_mode(mode: str):
  """Raises for an unknown mode (ValueError) or fp8 where it cannot run (RuntimeError)."""
  if mode not in MODES:
    raise ValueError(f"quantize mode {mode!r} not in {sorted(MODES)}")
  if mode == "fp8":
    ok, reason = fp8_supported()
    if not ok:
      raise RuntimeError(
          f"quantize='fp8' cannot run on platform {jax.default_backend()!r} ({reason}); fp8 "
          "(e4m3) dots need an NVIDIA GPU with fp8 tensor cores (Ada/Hopper/Blackwell, sm_89+), "
          "a TPU, or XLA CPU; use quantize='int8w' (weight-only, runs everywhere)")


def _kernel_how(qtype) -> qwix_qarray.HowToQuantize:
  """What `PtqProvider.dot_general` derives for `jnp.dot(x[..., in], kernel[in, out])`."""
  return qwix_dot_general.get_how_to_quantize(
      dimension_numbers=(((1,), (0,)), ((), ())), ndims=(2, 2), for_lhs=False,
      qtype=qtype, calibration_method="absmax", tile_size=None)


def _quantize_value(value, how: qwix_qarray.HowToQuantize, stacked: bool):
  """`qwix.quantize` of one kernel (`[L, in, out]` layer by layer when `stacked`).

  A kernel held in host memory (low-memory mode, `offload.py`) is quantized on the device
  and the `QArray` goes back to host memory, so the device never holds more than this leaf.
  """
  fn = functools.partial(qwix_qarray.quantize, how=how)
  if stacked:
    fn = jax.vmap(fn)
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.eval_shape(fn, value)
  if transformer_lib.in_host_memory(value):
    return jax.jit(lambda v: fn(jax.device_put(v, jax.memory.Space.Device)),
                   out_shardings=value.sharding)(value)
  return jax.jit(fn)(value)


def linear_paths(model: nnx.Module) -> list[tuple[str, layers.Linear]]:
  """('/'-joined NNX path, module) of every `Linear` in the model (stacked blocks included)."""
  return [("/".join(map(str, p)), m) for p, m in model.iter_modules()
          if isinstance(m, layers.Linear)]


def _matches(path: str, patterns: Iterable[str]) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


def check_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
  """`keep_bf16` patterns as a tuple; ValueError naming one that is not a regex."""
  patterns = tuple(patterns)
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"keep_bf16 pattern {p!r} is not a regex ({e})") from None
  return patterns


def layer_type_path(path: str) -> str:
  """A `Linear`'s path without its block segment ("blocks/1/ffn/proj_in" -> "blocks/ffn/proj_in"):
  what `keep_bf16` patterns match, segmented or not."""
  return re.sub(r"^blocks/\d+/", "blocks/", path)


def parse_blocks(spec: str | Iterable[int], num_layers: int) -> tuple[int, ...]:
  """Block indices from "first:N", "last:N", "I", "I-J" items (comma-separated) or ints.

  Negative ints count from the end (-1: the last block). Returns sorted unique indices.

  Raises:
    ValueError: an item that is not one of these forms or an index outside the model (named).
  """
  items = ([x.strip() for x in spec.split(",") if x.strip()] if isinstance(spec, str)
           else list(spec))
  out = set()
  for item in items:
    text = str(item)
    m = re.fullmatch(r"(first|last):(\d+)", text) if isinstance(item, str) else None
    r = re.fullmatch(r"(\d+)-(\d+)", text) if isinstance(item, str) else None
    if m:
      k = int(m.group(2))
      if not 0 < k <= num_layers:
        raise ValueError(f"keep_blocks item {text!r}: N must be in [1, {num_layers}]")
      out.update(range(k) if m.group(1) == "first" else range(num_layers - k, num_layers))
    elif r:
      lo, hi = int(r.group(1)), int(r.group(2))
      if not 0 <= lo <= hi < num_layers:
        raise ValueError(f"keep_blocks item {text!r}: need 0 <= I <= J < {num_layers}")
      out.update(range(lo, hi + 1))
    else:
      try:
        i = int(item)
      except (TypeError, ValueError):
        raise ValueError(f"keep_blocks item {text!r}: expected first:N, last:N, I or I-J"
                         ) from None
      if not -num_layers <= i < num_layers:
        raise ValueError(f"keep_blocks index {i} outside the model's {num_layers} blocks")
      out.add(i % num_layers)
  return tuple(sorted(out))


def _block_segments(keep_blocks: tuple[int, ...], n: int
                    ) -> tuple[tuple[int, ...], tuple[bool, ...]]:
  """Segment bounds (0, ..., n) of runs of kept / quantized blocks, and which runs are kept."""
  kept = [i in keep_blocks for i in range(n)]
  bounds = [0] + [i for i in range(1, n) if kept[i] != kept[i - 1]] + [n]
  return tuple(bounds), tuple(kept[lo] for lo in bounds[:-1])


def quantize_transformer(transformer: transformer_lib.HeliosTransformer, mode: str,
                         keep_bf16: Iterable[str] = DEFAULT_KEEP,
                         keep_blocks: str | Iterable[int] = ()
                         ) -> transformer_lib.HeliosTransformer:
  """Quantizes a loaded DiT with Qwix PTQ (the input is left untouched).

  Args:
    transformer: a `HeliosTransformer` (`load_transformer` / `init_transformer`; bf16 for the
      intended use; abstract `ShapeDtypeStruct` params are accepted).
    mode: "fp8" (e4m3 weights and activations, per-channel weight / per-token activation
      scales) or "int8w" (int8 weights, bf16 activations).
    keep_bf16: module-path regexes (full match on e.g. "blocks/ffn/proj_in", "proj_out")
      whose matmuls stay in the model dtype; `DEFAULT_KEEP` by default, () quantizes every
      `Linear`. Patterns match the layer type's path (`layer_type_path`).
    keep_blocks: whole blocks kept in the model dtype (`parse_blocks` forms, e.g.
      "first:3,last:3" or [0, 1, 39]); the block stack is cut into segments at their edges.

  Returns:
    A new `HeliosTransformer` with the same config; `params` hold `WithAux(QArray)` kernels;
    attributes `quantize_mode`, `quantized_paths` (actual paths), `keep_blocks`.

  Raises:
    ValueError: unknown mode, a keep pattern that is not a regex or matches no `Linear`, a bad
      block index, every block kept, an already quantized or already segmented model.
    RuntimeError: fp8 on a platform that cannot run fp8 dots.
  """
  check_mode(mode)
  keep = check_patterns(keep_bf16)
  model = transformer.module()
  if hasattr(type(model), "_unquantized_type"):
    raise ValueError("the transformer is already quantized")
  n = transformer.config.num_layers
  blocks = parse_blocks(keep_blocks, n)
  kept_segments = set()
  if blocks:
    if len(blocks) == n:
      raise ValueError(f"keep_blocks keeps all {n} blocks: nothing left to quantize in the "
                       "blocks (use the unquantized model)")
    bounds, kept = _block_segments(blocks, n)
    transformer_lib.segment_blocks(model, bounds)
    kept_segments = {str(j) for j, k in enumerate(kept) if k}
  paths = linear_paths(model)
  types = sorted({layer_type_path(path) for path, _ in paths})
  unused = [p for p in keep if not any(re.fullmatch(p, t) for t in types)]
  if unused:
    raise ValueError(f"keep_bf16 pattern(s) {unused} match no Linear; known paths: {types}")
  weight_qtype, act_qtype = MODES[mode]
  quantized = [path for path, _ in paths if not _matches(layer_type_path(path), keep)
               and not (path.startswith("blocks/") and path.split("/")[1] in kept_segments)]
  rules = [qwix.QuantizationRule(module_path=re.escape(path), op_names=("dot_general",),
                                 weight_qtype=weight_qtype, act_qtype=act_qtype)
           for path in quantized]
  provider = qwix.PtqProvider(rules)
  # Intercepts `forward_channels_last` and sets each module's `qwix_path`; no forward is run.
  qmodel = qwix.quantize_model(model, provider, methods=(CALL_METHOD,), skip_nnx_init=True)
  how = _kernel_how(weight_qtype)
  for path, lin in linear_paths(qmodel):
    if path not in quantized:
      continue
    param = lin.kernel
    stacked = path.startswith("blocks/")
    q = _quantize_value(param[...] if not isinstance(param.value, jax.ShapeDtypeStruct)
                        else param.value, how, stacked)
    boxed = jax.tree.map(lambda v, p=param: qwix_flax_util.update_boxed(p, value=v), q)
    lin.kernel = qwix_ptq.WithAux(boxed, how)
  out = transformer_lib.HeliosTransformer(transformer.config, qmodel)
  out.quantize_mode = mode
  out.quantized_paths = tuple(quantized)
  out.keep_blocks = blocks
  return out


def kernel_dtypes(transformer: transformer_lib.HeliosTransformer) -> dict[str, str]:
  """'/'-joined path -> storage dtype of each `Linear` kernel (quantized: the qvalue dtype)."""
  out = {}
  for path, lin in linear_paths(transformer.module()):
    k = lin.kernel
    if isinstance(k, qwix_ptq.WithAux):
      out[path] = str(jnp.dtype(qwix_flax_util.unbox(k.array).qvalue.dtype))
    else:
      out[path] = str(jnp.dtype(k.value.dtype if hasattr(k, "value") else k.dtype))
  return out


def param_bytes(params) -> int:
  """Bytes of a params pytree (arrays or ShapeDtypeStructs; QArray leaves count qvalue+scale)."""
  return int(sum(l.size * jnp.dtype(l.dtype).itemsize for l in jax.tree.leaves(params)))


# ------------------------------------------------------------------------------------------
# Pre-quantized export (`python -m helios_jax.convert --quantize`) and its loader.

EXPORT_FORMAT = "helios-jax-quantized-dit"
EXPORT_VERSION = 1
# The oldest jax / qwix that read this format: the package's declared lower bounds
# (pyproject.toml), written into quantization.json `requires` and checked on load.
REQUIRES = {"jax": "0.10.2", "qwix": "0.1.8"}
WRITTEN_WITH = ("jax", "jaxlib", "qwix", "orbax-checkpoint")
# The precision policy of an export's non-quantized layers (fp32-kept modules stay fp32).
EXPORT_DTYPE = jnp.bfloat16


def installed_version(package: str) -> str:
  """The installed version of a distribution ("jax", "qwix", "orbax-checkpoint", ...)."""
  return jax.__version__ if package == "jax" else importlib.metadata.version(package)


def _version_key(version: str):
  """A comparable key of a version string (`packaging.version.Version` when installed).

  Raises:
    ValueError: not a version.
  """
  if _packaging_version is not None:
    return _packaging_version.Version(version)  # InvalidVersion is a ValueError
  m = re.match(r"(\d+(?:\.\d+)*)", str(version))
  if m is None:
    raise ValueError(f"invalid version {version!r}")
  parts = [int(x) for x in m.group(1).split(".")]
  while len(parts) > 1 and parts[-1] == 0:
    parts.pop()
  return tuple(parts)


def _qtype_name(qtype) -> str | None:
  return None if qtype is None else str(jnp.dtype(qtype))


def _abstract_quantized(config, mode: str, keep_bf16: Iterable[str],
                        kernels: KernelConfig | None = None, keep_blocks: Iterable[int] = ()
                        ) -> transformer_lib.HeliosTransformer:
  """The bf16 model with `ShapeDtypeStruct` params, quantized abstractly (no memory)."""
  spec = transformer_lib.TransformerSpec(kernels or KernelConfig())
  model = nnx.eval_shape(lambda: spec.build(config, EXPORT_DTYPE))
  return quantize_transformer(transformer_lib.HeliosTransformer(config, model), mode, keep_bf16,
                              tuple(keep_blocks))


def _quantized_leaves(plan: checkpoint.ConversionPlan, paths: Iterable[checkpoint.FlaxPath],
                      quantized: set[str], how: qwix_qarray.HowToQuantize,
                      bounds: tuple[int, ...] | None = None
                      ) -> Iterator[tuple[checkpoint.FlaxPath, np.ndarray]]:
  """(stored path, host array) of every leaf: kernels of `quantized` Linears as their QArray
  fields (`.../kernel/array/qvalue`, `.../scale`), the rest as loaded (bf16 policy). With
  segment `bounds` (`keep_blocks`), a stacked block leaf `blocks/...` `[L, ...]` is stored as
  one leaf per segment, `blocks/<j>/...` `[b_{j+1} - b_j, ...]`."""
  for path in paths:
    leaf = plan.load_leaf(path)  # the abstract model's dtype: bf16, fp32-kept modules fp32
    if bounds is not None and path[0] == "blocks":
      pieces = [(("blocks", str(j)) + path[1:], leaf[lo:hi])
                for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
    else:
      pieces = [(path, leaf)]
    del leaf
    for stored, value in pieces:
      module = "/".join(stored[:-1])
      if stored[-1] != "kernel" or module not in quantized:
        yield stored, value
        continue
      qa = _quantize_value(jnp.asarray(value), how, stacked=module.startswith("blocks/"))
      for field in dataclasses.fields(qa):
        x = getattr(qa, field.name)
        if isinstance(x, jax.Array):
          yield stored + ("array", field.name), np.asarray(x)


def _checked_leaves(leaves: Iterable[tuple[checkpoint.FlaxPath, np.ndarray]],
                    want: Mapping[checkpoint.FlaxPath, Any]
                    ) -> Iterator[tuple[checkpoint.FlaxPath, np.ndarray]]:
  """The (path, array) pairs, each checked against the abstract quantized tree `want` (path,
  shape, dtype; all of it by the end, so a missing leaf stops the save before it is
  finalized)."""
  seen = set()
  for path, x in leaves:
    name = "/".join(path)
    if path not in want:
      raise checkpoint.CheckpointError(f"quantized export produced {name}, which the "
                                       "quantized model does not have")
    w = want[path]
    if tuple(x.shape) != tuple(w.shape) or np.dtype(x.dtype) != np.dtype(w.dtype):
      raise checkpoint.CheckpointError(f"quantized export produced {name} {tuple(x.shape)} "
                                       f"{x.dtype}; the quantized model has {tuple(w.shape)} "
                                       f"{np.dtype(w.dtype)}")
    seen.add(path)
    yield path, x
  missing = sorted("/".join(p) for p in want if p not in seen)
  if missing:
    raise checkpoint.CheckpointError(f"quantized export is missing {missing[:10]}")


def export_quantized(src: str | os.PathLike, dst: str | os.PathLike, mode: str,
                     keep_bf16: Iterable[str] = DEFAULT_KEEP,
                     keep_blocks: str | Iterable[int] = (), *, progress: bool = True,
                     overwrite: bool = False) -> dict[str, Any]:
  """Converts a diffusers `transformer/` safetensors folder to a pre-quantized export.

  Writes `dst/config.json` (the source's, unchanged), `dst/params/` (an Orbax PyTree
  checkpoint of `nnx.to_pure_dict(quantize_transformer(load_transformer(src, jnp.bfloat16),
  mode, keep_bf16).params)`, bit for bit: a quantized `Linear` stores
  `<path>/kernel/array/qvalue` (float8_e4m3fn or int8, the kernel's shape, e.g. `[L, in, out]`
  in the blocks) and `<path>/kernel/array/scale` (bf16, `[L, 1, out]`); every other leaf is in
  the bf16 precision policy, fp32-kept modules fp32) and `dst/quantization.json` (see
  `read_quantization_info`). One parameter leaf (all its stacked layers) is read, quantized
  and written at a time, so peak host RAM is about the largest leaf (batches of small leaves
  up to 256 MB), not the model. `dst` is written atomically: on any error nothing is left.

  Args:
    src: a diffusers `transformer/` folder (config.json + safetensors, single or sharded).
    dst: the output folder (must not exist unless `overwrite`).
    mode: "fp8" or "int8w" (`MODES`).
    keep_bf16: module-path regexes kept unquantized (`quantize_transformer`).
    keep_blocks: whole blocks kept unquantized (`parse_blocks` forms; `quantize_transformer`).
    progress: show a progress bar.
    overwrite: replace an existing `dst`.

  Returns:
    The quantization.json contents.

  Raises:
    ValueError: unknown mode or a keep pattern matching no `Linear`.
    RuntimeError: fp8 on a platform that cannot run fp8 dots.
    checkpoint.CheckpointError: a missing / corrupt / mismatching source.
  """
  src, dst = os.fspath(src), os.fspath(dst)
  spec = transformer_lib.TRANSFORMER_SPEC
  config = spec.read_config(src)
  keep = tuple(keep_bf16)
  blocks = parse_blocks(keep_blocks, config.num_layers)
  qt = _abstract_quantized(config, mode, keep, keep_blocks=blocks)  # validates first
  _, abstract = spec.abstract(config, EXPORT_DTYPE)
  plan = checkpoint.ConversionPlan(
      checkpoint.SafetensorsFolder(src), abstract, spec.key_map(config),
      stacked_len=spec.stacked_len(config), tied=spec.tied_keys(config))
  weight_qtype, act_qtype = MODES[mode]
  info = {
      "format": EXPORT_FORMAT,
      "format_version": EXPORT_VERSION,
      "mode": mode,
      "weight_qtype": _qtype_name(weight_qtype),
      "activation_qtype": _qtype_name(act_qtype),
      "dtype": str(jnp.dtype(EXPORT_DTYPE)),
      "keep_bf16": list(keep),
      "keep_blocks": list(blocks),
      "quantized_paths": list(qt.quantized_paths),
      "requires": dict(REQUIRES),
      "written_with": {p: installed_version(p) for p in WRITTEN_WITH},
  }
  paths = plan.leaf_paths()
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    paths = tqdm(paths, desc=f"quantize transformer ({mode})", unit="tensor")
  want = checkpoint.flatten_tree(nnx.to_pure_dict(qt.params))
  bounds = _block_segments(blocks, config.num_layers)[0] if blocks else None
  leaves = _quantized_leaves(plan, paths, set(qt.quantized_paths),
                             _kernel_how(weight_qtype), bounds)
  with checkpoint.atomic_directory(dst, overwrite=overwrite) as tmp:
    with open(os.path.join(src, spec.config_cls.CONFIG_NAME)) as f:
      raw_config = json.load(f)
    with open(os.path.join(tmp, spec.config_cls.CONFIG_NAME), "w") as f:
      json.dump(raw_config, f, indent=2, sort_keys=True)
    checkpoint.save_params_streaming(os.path.join(tmp, checkpoint.PARAMS_DIR),
                                     checkpoint.batch_leaves(_checked_leaves(leaves, want)))
    with open(os.path.join(tmp, checkpoint.QUANTIZATION_FILE), "w") as f:
      json.dump(info, f, indent=2)
  return info


def is_quantized_export(path: str | os.PathLike) -> bool:
  """Whether `path` is a pre-quantized transformer export (holds quantization.json)."""
  return os.path.isfile(os.path.join(os.fspath(path), checkpoint.QUANTIZATION_FILE))


def read_quantization_info(path: str | os.PathLike) -> dict[str, Any]:
  """Reads and validates `path/quantization.json` of a pre-quantized export.

  Schema (format "helios-jax-quantized-dit", format_version 1):
    format, format_version (int), mode ("fp8" | "int8w"), weight_qtype / activation_qtype
    (dtype names, activation null for weight-only), dtype (non-quantized layers: "bfloat16"),
    keep_bf16 (regexes), keep_blocks (block indices kept whole; optional, default []; the block
    params are then stored per segment, `blocks/<j>/...`), quantized_paths ('/'-joined `Linear`
    paths), requires {"jax", "qwix":
    minimum versions that read it}, written_with {"jax", "jaxlib", "qwix", "orbax-checkpoint"}.

  Raises:
    checkpoint.CheckpointError: the file is missing or unreadable, or a field (named in the
      message) is missing or has an unknown / invalid value.
  """
  file = os.path.join(os.fspath(path), checkpoint.QUANTIZATION_FILE)
  try:
    with open(file) as f:
      info = json.load(f)
  except FileNotFoundError:
    raise checkpoint.CheckpointError(f"{file} not found: {os.fspath(path)} is not a "
                                     "pre-quantized export (convert --quantize)") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise checkpoint.CheckpointError(f"{file}: unreadable ({e})") from e
  if not isinstance(info, dict):
    raise checkpoint.CheckpointError(f"{file}: expected a JSON object")

  def bad(field, why):
    return checkpoint.CheckpointError(f"{file}: field {field!r} {why}")

  for field in ("format", "format_version", "mode", "weight_qtype", "keep_bf16",
                "quantized_paths", "requires"):
    if field not in info:
      raise bad(field, "is missing")
  if info["format"] != EXPORT_FORMAT:
    raise bad("format", f"is {info['format']!r}; expected {EXPORT_FORMAT!r}")
  version = info["format_version"]
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise bad("format_version", f"is {version!r}; expected a positive integer")
  if version != EXPORT_VERSION:
    raise bad("format_version", f"is {version}; this helios-jax reads version {EXPORT_VERSION}"
              + (" (the export was written by a newer helios-jax: upgrade it)"
                 if version > EXPORT_VERSION else ""))
  mode = info["mode"]
  if mode not in MODES:
    raise bad("mode", f"is {mode!r}; expected one of {sorted(MODES)}")
  for field, qtype in (("weight_qtype", MODES[mode][0]), ("activation_qtype", MODES[mode][1])):
    if info.get(field) != _qtype_name(qtype):
      raise bad(field, f"is {info.get(field)!r}; mode {mode!r} stores {_qtype_name(qtype)!r}")
  for field in ("keep_bf16", "quantized_paths"):
    if not isinstance(info[field], list) or not all(isinstance(x, str) for x in info[field]):
      raise bad(field, f"is {info[field]!r}; expected a list of strings")
  blocks = info.setdefault("keep_blocks", [])  # optional: absent = no kept blocks
  if not isinstance(blocks, list) or not all(
      isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in blocks):
    raise bad("keep_blocks", f"is {blocks!r}; expected a list of block indices")
  requires = info["requires"]
  if not isinstance(requires, dict) or set(REQUIRES) - set(requires):
    raise bad("requires", f"is {requires!r}; expected versions for {sorted(REQUIRES)}")
  for package, need in requires.items():
    try:
      _version_key(need)
    except (ValueError, TypeError):
      raise bad("requires", f"has {package} version {need!r}, which is not a version") from None
  return info


def check_requirements(info: Mapping[str, Any], where: str = "the export") -> None:
  """Raises RuntimeError when an installed package is older than `info["requires"]`."""
  for package, need in info["requires"].items():
    try:
      have = installed_version(package)
    except importlib.metadata.PackageNotFoundError:
      raise RuntimeError(f"{where} needs {package} >= {need}, which is not installed") from None
    if _version_key(have) < _version_key(need):
      raise RuntimeError(f"{where} needs {package} >= {need}, installed {package} {have}; "
                         f"upgrade {package} to read it")


def check_load_request(path: str | os.PathLike, *, quantize: str | None = None,
                       lora: Any = None, dtype: Any = None) -> dict[str, Any]:
  """Validates loading the pre-quantized export `path` as asked (before any weights load).

  Args:
    path: the export (`transformer/` folder holding quantization.json).
    quantize: the requested mode: None or the export's mode are fine.
    lora: LoRA entries to fuse: refused (a quantized model cannot take a LoRA).
    dtype: the requested model dtype: None or bfloat16 (the export's precision policy).

  Returns:
    The validated quantization.json contents.

  Raises:
    checkpoint.CheckpointError: a bad quantization.json.
    ValueError: a mode / LoRA / dtype that the export cannot honour (named in the message).
    RuntimeError: installed jax / qwix too old, or fp8 on a platform that cannot run it.
  """
  file = os.path.join(os.fspath(path), checkpoint.QUANTIZATION_FILE)
  info = read_quantization_info(path)
  mode = info["mode"]
  if quantize is not None and quantize != mode:
    raise ValueError(f"{os.fspath(path)} is pre-quantized with mode {mode!r} but "
                     f"quantize={quantize!r} was asked; pass quantize=None (or {mode!r}), or "
                     "quantize the bf16 checkpoint on load")
  if lora:
    raise ValueError(f"{os.fspath(path)} is pre-quantized ({mode}): a LoRA must be fused before "
                     "quantizing; load the bf16 checkpoint with lora= and quantize= (quantize on "
                     "load), or fuse the LoRA into a merged checkpoint and convert --quantize it")
  if dtype is not None and jnp.dtype(dtype) != jnp.dtype(EXPORT_DTYPE):
    raise ValueError(f"{os.fspath(path)} is pre-quantized ({mode}) with its non-quantized layers "
                     f"in {info.get('dtype', 'bfloat16')}; dtype={jnp.dtype(dtype).name} cannot "
                     "apply to it: use bfloat16, or load the unquantized checkpoint")
  check_requirements(info, file)
  check_mode(mode)
  return info


def load_quantized_transformer(path: str | os.PathLike, *, kernels: KernelConfig | None = None,
                               attention_impl: str | None = None, placement: Any = None
                               ) -> transformer_lib.HeliosTransformer:
  """Loads a pre-quantized export (`export_quantized`; no bf16 weights needed).

  The bf16 model is built abstractly, quantized abstractly with the recorded mode and
  keep patterns (so its `WithAux(QArray)` tree matches the stored one) and filled from
  `params/` (shapes and dtypes checked against the Orbax metadata).

  Args:
    path: the export folder (config.json + params/ + quantization.json).
    kernels: op implementations (`KernelConfig`; default "auto" everywhere).
    attention_impl: shorthand for `KernelConfig(attention=attention_impl)`.
    placement: optional `flax path -> Sharding` per stored leaf (`checkpoint.load_model`; e.g.
      `offload.load_placement()`: block weights straight into host memory).

  Returns:
    A `HeliosTransformer` (bf16, `quantize_mode` and `quantized_paths` set, as
    `quantize_transformer` returns).

  Raises:
    checkpoint.CheckpointError: missing folder / files, a bad quantization.json, or parameters
      that do not match the recorded quantization.
    RuntimeError: installed jax / qwix older than the export requires, or fp8 on a platform
      that cannot run it.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise checkpoint.CheckpointError(f"quantized transformer folder not found: {path}")
  file = os.path.join(path, checkpoint.QUANTIZATION_FILE)
  info = check_load_request(path)
  kernels = transformer_lib.resolve_kernels(kernels, attention_impl)
  config = transformer_lib.TRANSFORMER_SPEC.read_config(path)
  try:
    qt = _abstract_quantized(config, info["mode"], info["keep_bf16"], kernels,
                             info["keep_blocks"])
  except ValueError as e:  # e.g. a keep pattern / block that does not exist in this config
    raise checkpoint.CheckpointError(f"{file}: fields 'keep_bf16' / 'keep_blocks' do not fit "
                                     f"the model ({e})") from e
  if list(qt.quantized_paths) != list(info["quantized_paths"]):
    got, want = set(qt.quantized_paths), set(info["quantized_paths"])
    raise checkpoint.CheckpointError(
        f"{file}: field 'quantized_paths' does not match what mode {info['mode']!r} with "
        f"keep_bf16 {info['keep_bf16']} quantizes in this model: recorded only "
        f"{sorted(want - got)}, model only {sorted(got - want)}")
  abstract = nnx.to_pure_dict(qt.params)
  if placement is not None:
    abstract = checkpoint.unflatten_tree({
        p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placement(p))
        for p, a in checkpoint.flatten_tree(abstract).items()})
  params_dir = os.path.join(path, checkpoint.PARAMS_DIR)
  if os.path.isfile(os.path.join(params_dir, checkpoint.ORBAX_MARKER)):
    _check_stored_dtypes(params_dir, abstract)
  params = checkpoint.load_params(params_dir, abstract)
  nnx.replace_by_pure_dict(qt.params, params)
  return qt


def _check_stored_dtypes(params_dir: str, abstract: Mapping[str, Any]) -> None:
  """Stored dtypes must equal the quantized model's (a cast would change the quantization)."""
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  try:
    meta = checkpoint.flatten_tree(ocp.metadata(params_dir).metadata)
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint.CheckpointError(f"{params_dir}: unreadable Orbax metadata ({e})") from e
  bad = [f"{'/'.join(p)}: stored {np.dtype(meta[p].dtype)}, model {np.dtype(w.dtype)}"
         for p, w in checkpoint.flatten_tree(abstract).items()
         if p in meta and np.dtype(meta[p].dtype) != np.dtype(w.dtype)]
  if bad:
    raise checkpoint.CheckpointError(f"{params_dir}: dtype mismatch {bad[:10]}")
