"""Checkpoint I/O: streaming safetensors reader, PyTorch->Flax key mapping, Orbax export/load.

Formats handled:
  * diffusers / transformers safetensors folders: one `*.safetensors` file, or shards listed
    by a `*.safetensors.index.json` (`weight_map`). Tensors are read one at a time through a
    memory map, so a 14B checkpoint is never held in host RAM at once.
  * our Orbax export: `<component>/config.json` + `<component>/params/` (an Orbax v1 PyTree
    checkpoint of the model's parameter dict, readable with
    `orbax.checkpoint.experimental.v1.load(path)` alone, as tests/test_transformer.py does).

The mapping from PyTorch names to Flax paths is given per model as a function
`key_map(torch_key) -> (flax_path, layer_index | None)`; stacked (scanned) blocks receive
`layer_index` and are filled slice by slice. Tensor layout changes are derived from the Flax
leaf name (see `torch_to_flax`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

PARAMS_DIR = "params"
ORBAX_MARKER = "_CHECKPOINT_METADATA"
# A pre-quantized DiT export (`convert --quantize`, helios_jax/quantize.py) holds this file next to
# config.json; its params tree has QArray leaves, so `load_model` refuses it.
QUANTIZATION_FILE = "quantization.json"

FlaxPath = tuple[str, ...]
KeyMap = Callable[[str], "tuple[FlaxPath, int | None] | None"]


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class _SafetensorsFile:
  """One `.safetensors` file: header parsed eagerly, tensors memory-mapped on demand."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
          raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size:
          raise CheckpointError(f"{path}: corrupt safetensors header length {n} (file {size} B)")
        header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self._base = 8 + n
    self._entries = {}
    for key, info in header.items():
      dt = info.get("dtype")
      if dt not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dt!r}")
      start, end = info["data_offsets"]
      shape = tuple(info["shape"])
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[dt]).itemsize
      if end - start != nbytes or self._base + end > size:
        raise CheckpointError(f"{path}: tensor {key!r} data offsets {start}..{end} are corrupt")
      self._entries[key] = (np.dtype(_ST_DTYPES[dt]), shape, start)

  def keys(self) -> Iterable[str]:
    return self._entries.keys()

  def info(self, key: str) -> tuple[np.dtype, tuple[int, ...]]:
    dt, shape, _ = self._entries[key]
    return dt, shape

  def get(self, key: str) -> np.ndarray:
    """Returns a copy of the tensor (the memory map is released right after)."""
    dt, shape, start = self._entries[key]
    if int(np.prod(shape, dtype=np.int64)) == 0:
      return np.zeros(shape, dt)
    mm = np.memmap(self.path, dtype=dt, mode="r", offset=self._base + start, shape=shape)
    out = np.array(mm)
    del mm
    return out


class SafetensorsFolder:
  """All tensors of a diffusers/transformers model folder (single file or sharded)."""

  def __init__(self, folder: str | os.PathLike):
    folder = os.fspath(folder)
    self.folder = folder
    if not os.path.isdir(folder):
      raise CheckpointError(f"checkpoint folder not found: {folder}")
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    self._key_to_file: dict[str, _SafetensorsFile] = {}
    if indexes:
      if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several safetensors indexes {indexes}")
      index_path = os.path.join(folder, indexes[0])
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: corrupt index ({e})") from e
      shards = sorted(set(weight_map.values()))
      missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
      if missing:
        raise CheckpointError(f"{folder}: missing shard file(s) {missing} listed in {indexes[0]}")
      files = {s: _SafetensorsFile(os.path.join(folder, s)) for s in shards}
      for key, shard in weight_map.items():
        if key not in set(files[shard].keys()):
          raise CheckpointError(f"{index_path}: tensor {key!r} is not in shard {shard}")
        self._key_to_file[key] = files[shard]
    else:
      singles = [n for n in names if n.endswith(".safetensors")]
      if not singles:
        raise CheckpointError(f"{folder}: no *.safetensors file or safetensors index found")
      if len(singles) > 1:
        raise CheckpointError(f"{folder}: several safetensors files {singles} and no index")
      f = _SafetensorsFile(os.path.join(folder, singles[0]))
      for key in f.keys():
        self._key_to_file[key] = f

  def keys(self) -> list[str]:
    return list(self._key_to_file)

  def __contains__(self, key: str) -> bool:
    return key in self._key_to_file

  def info(self, key: str) -> tuple[np.dtype, tuple[int, ...]]:
    return self._key_to_file[key].info(key)

  def get(self, key: str) -> np.ndarray:
    if key not in self._key_to_file:
      raise CheckpointError(f"{self.folder}: tensor {key!r} not found")
    return self._key_to_file[key].get(key)


def is_safetensors_folder(folder: str | os.PathLike) -> bool:
  folder = os.fspath(folder)
  return os.path.isdir(folder) and any(n.endswith(".safetensors") or
                                       n.endswith(".safetensors.index.json")
                                       for n in os.listdir(folder))


def is_orbax_export(folder: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(os.fspath(folder), PARAMS_DIR, ORBAX_MARKER))


# ------------------------------------------------------------------------------------------
# Layout conversion.


def torch_to_flax(x: np.ndarray, leaf: str, target_shape: Sequence[int]) -> np.ndarray:
  """Converts one PyTorch tensor to the layout of the Flax leaf `leaf` with `target_shape`.

  `kernel` leaves: Linear [out, in] -> [in, out]; ConvNd [out, in, *k] -> [*k, in, out].
  Every other leaf keeps its values and is reshaped (only if the element count matches).
  """
  target_shape = tuple(target_shape)
  if leaf == "kernel" and x.ndim >= 2:
    x = np.transpose(x, tuple(range(2, x.ndim)) + (1, 0))
  if x.shape != target_shape:
    if x.size != int(np.prod(target_shape, dtype=np.int64)):
      raise CheckpointError(f"shape {x.shape} cannot become {target_shape}")
    x = x.reshape(target_shape)
  return x


def _flatten(tree: Mapping[str, Any], prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _unflatten(flat: Mapping[FlaxPath, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


flatten_tree = _flatten
unflatten_tree = _unflatten


class ConversionPlan:
  """Which PyTorch tensors fill which Flax leaf; validates coverage before any data moves.

  Args:
    reader: the source tensors.
    abstract: nested dict of `jax.ShapeDtypeStruct` (the model's parameter state).
    key_map: torch key -> (flax path, layer index or None), or None to ignore the key.
    stacked_len: leading-axis length of leaves filled per layer (number of scanned blocks).
    tied: {alias key: canonical key} for one tensor that a checkpoint may store under either
      name or both (tied weights). When both are present the alias is skipped (its shape must
      match); when only the alias is present it is mapped like any other key.
  """

  def __init__(self, reader: SafetensorsFolder, abstract: Mapping[str, Any], key_map: KeyMap,
               *, stacked_len: int | None = None, tied: Mapping[str, str] | None = None):
    self.reader = reader
    self.targets = _flatten(abstract)
    self.sources: dict[FlaxPath, dict[int | None, str]] = {p: {} for p in self.targets}
    tied = dict(tied or {})
    unexpected = []
    for key in reader.keys():
      canonical = tied.get(key)
      if canonical is not None and canonical in reader:
        if reader.info(key)[1] != reader.info(canonical)[1]:
          raise CheckpointError(
              f"{reader.folder}: tied tensors {key!r} {reader.info(key)[1]} and {canonical!r} "
              f"{reader.info(canonical)[1]} differ in shape")
        continue
      mapped = key_map(key)
      if mapped is None:
        continue
      path, layer = mapped
      if path not in self.targets:
        unexpected.append(key)
        continue
      if layer in self.sources[path]:
        raise CheckpointError(f"{reader.folder}: two tensors map to {'/'.join(path)}[{layer}]")
      self.sources[path][layer] = key
    if unexpected:
      raise CheckpointError(
          f"{reader.folder}: unexpected key(s) not in the model: {unexpected[:10]}"
          + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = []
    for path, got in self.sources.items():
      if not got:
        missing.append("/".join(path))
      elif None not in got:
        want = range(stacked_len if stacked_len is not None else 0)
        missing += [f"{'/'.join(path)}[layer {i}]" for i in want if i not in got]
    if missing:
      raise CheckpointError(
          f"{reader.folder}: missing key(s) for model parameter(s) {missing[:10]}"
          + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))

  def load_leaf(self, path: FlaxPath, dtype: Any = None) -> np.ndarray:
    """Reads, converts and (if stacked) stacks the tensors for one Flax leaf."""
    target = self.targets[path]
    dtype = np.dtype(dtype if dtype is not None else target.dtype)
    got = self.sources[path]
    leaf = path[-1]
    if None in got:
      key = got[None]
      try:
        return torch_to_flax(self.reader.get(key), leaf, target.shape).astype(dtype)
      except CheckpointError as e:
        raise CheckpointError(f"{key!r} -> {'/'.join(path)}: {e}") from None
    out = np.empty(target.shape, dtype)
    for layer, key in got.items():
      try:
        out[layer] = torch_to_flax(self.reader.get(key), leaf, target.shape[1:])
      except CheckpointError as e:
        raise CheckpointError(f"{key!r} -> {'/'.join(path)}[{layer}]: {e}") from None
    return out

  def leaf_paths(self) -> list[FlaxPath]:
    return list(self.targets)

  def source_dtype(self, path: FlaxPath) -> np.dtype:
    """The stored dtype of a leaf's source tensor(s) (stacked: the common type of the layers)."""
    return np.result_type(*[self.reader.info(k)[0] for k in self.sources[path].values()])


# ------------------------------------------------------------------------------------------
# Orbax.


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `dst`; renames it to `dst` only if the block succeeds."""
  dst = os.path.abspath(os.fspath(dst))
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"destination already exists: {dst} (pass overwrite=True / --overwrite)")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.rename(tmp, dst)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def save_params_streaming(path: str, groups: Iterable[Mapping[str, Any]]) -> None:
  """Writes an Orbax PyTree checkpoint at `path` group by group (peak RAM ~ one group).

  Each group is a nested dict of numpy arrays with disjoint leaves; the union is the tree.
  """
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  wrote = False
  for group in groups:
    ocp.partial.save(path, dict(group))
    wrote = True
  if not wrote:
    raise CheckpointError("nothing to save: empty parameter tree")
  ocp.partial.finalize(path)


def save_params(path: str, tree: Mapping[str, Any]) -> None:
  """Writes a whole parameter tree (numpy or jax arrays) as an Orbax PyTree checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  tree = jax.tree.map(np.asarray, dict(tree))
  save_params_streaming(path, [tree])


def load_params(path: str, abstract: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Reads an Orbax PyTree checkpoint; `abstract` (ShapeDtypeStructs) fixes shapes/dtypes."""
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(path, ORBAX_MARKER)):
    raise CheckpointError(f"not an Orbax checkpoint (no {ORBAX_MARKER}): {path}")
  if abstract is not None:
    try:
      meta = ocp.metadata(path).metadata
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{path}: unreadable Orbax metadata ({e})") from e
    want, have = _flatten(abstract), _flatten(meta)
    missing = sorted("/".join(p) for p in want if p not in have)
    extra = sorted("/".join(p) for p in have if p not in want)
    if missing or extra:
      raise CheckpointError(f"{path}: parameter tree mismatch: missing {missing[:10]}, "
                            f"unexpected {extra[:10]}")
    bad = [f"{'/'.join(p)}: {tuple(have[p].shape)} vs model {tuple(want[p].shape)}"
           for p in want if tuple(have[p].shape) != tuple(want[p].shape)]
    if bad:
      raise CheckpointError(f"{path}: shape mismatch {bad[:10]}")
  if abstract is not None:
    import jax  # pylint: disable=g-import-not-at-top
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=default), abstract)
  try:
    return ocp.load(path, abstract) if abstract is not None else ocp.load(path)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}: failed to read Orbax checkpoint ({e})") from e


# ------------------------------------------------------------------------------------------
# Per-model glue: one `ModelSpec` per component (transformer, vae, text_encoder).


class ModelSpec:
  """How one component is stored and rebuilt. Subclass per model.

  Subclasses implement:
    config_cls: a `JsonConfig` dataclass type.
    build(config, dtype, seed) -> nnx.Module        (random init; seed is an int or a PRNG key;
                                                     used under `nnx.eval_shape` / `init`)
    key_map(config) -> KeyMap                       (PyTorch key -> Flax path, layer index)
    stacked_len(config) -> int | None               (layers stacked on a leading axis)

  `build` applies the precision policy itself (e.g. fp32-kept modules), so the abstract state's
  dtypes are the dtypes parameters are loaded and exported in.
  """

  name: str = ""
  config_cls: Any = None

  def build(self, config: Any, dtype: Any, seed: int = 0):
    raise NotImplementedError

  def key_map(self, config: Any) -> KeyMap:
    raise NotImplementedError

  def stacked_len(self, config: Any) -> int | None:
    return None

  def tied_keys(self, config: Any) -> Mapping[str, str]:
    """{alias torch key: canonical torch key} of tied tensors (see `ConversionPlan`)."""
    del config
    return {}

  def init(self, config: Any, dtype: Any, seed: int = 0):
    """A randomly initialised module, built by one jitted program (fast on any backend).

    Uses an "rbg" PRNG key (cheap to compile); the values are for demos, tests and benchmarks
    with random weights, not a cross-backend reproducible init.
    """
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    key = jax.random.key(seed, impl="rbg")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: self.build(config, dtype, key)))
    state = jax.jit(lambda k: nnx.split(self.build(config, dtype, k))[1])(key)
    return nnx.merge(graphdef, state)

  def read_config(self, folder: str):
    return self.config_cls.from_json(os.path.join(folder, self.config_cls.CONFIG_NAME))

  def abstract(self, config: Any, dtype: Any):
    """(graphdef, nested dict of ShapeDtypeStruct) without allocating parameters."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    model = nnx.eval_shape(lambda: self.build(config, dtype))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def _resolve_dtype(dtype: Any):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.dtype(jnp.float32 if dtype is None else dtype)


def load_model(spec: ModelSpec, path: str | os.PathLike, dtype: Any = None, *,
               device: Any = None, placement: Callable[[FlaxPath], Any] | None = None):
  """Loads a component from a diffusers/transformers folder or our Orbax export.

  Args:
    spec: the component's `ModelSpec`.
    path: folder with `config.json` and either safetensors or `params/` (Orbax).
    dtype: parameter dtype (None -> float32); fp32-kept parameters stay float32.
    device: optional `jax.Device` the parameters are placed on (e.g. `jax.devices("cpu")[0]`
      to keep a component off the accelerator); None -> JAX's default device.
    placement: optional `flax path -> jax.sharding.Sharding` per parameter (overrides `device`;
      e.g. `offload.load_placement()`: block weights in host memory), so no leaf passes through
      another memory on the way.

  Returns:
    (config, nnx module with the loaded parameters).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{spec.name} checkpoint folder not found: {path}")
  if os.path.isfile(os.path.join(path, QUANTIZATION_FILE)):
    raise CheckpointError(
        f"{path} is a pre-quantized export ({QUANTIZATION_FILE}); load it with "
        "helios_jax.quantize.load_quantized_transformer or Pipeline.from_pretrained")
  config = spec.read_config(path)
  dtype = _resolve_dtype(dtype)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: spec.build(config, dtype)))
  flat = _flatten(nnx.to_pure_dict(abstract_state))
  sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
  want = {p: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                  sharding=placement(p) if placement else sharding)
          for p, v in flat.items()}
  if is_orbax_export(path):
    params = load_params(os.path.join(path, PARAMS_DIR), _unflatten(want))
  elif is_safetensors_folder(path):
    plan = ConversionPlan(SafetensorsFolder(path), _unflatten(flat), spec.key_map(config),
                          stacked_len=spec.stacked_len(config), tied=spec.tied_keys(config))
    params = _unflatten({p: jax.device_put(plan.load_leaf(p, want[p].dtype), want[p].sharding)
                         for p in flat})
  else:
    raise CheckpointError(f"{path}: neither safetensors weights nor an Orbax '{PARAMS_DIR}/' found")
  nnx.replace_by_pure_dict(abstract_state, params)
  return config, nnx.merge(graphdef, abstract_state)


# Bytes of leaves per Orbax partial save (`batch_leaves`).
GROUP_BYTES = 256 << 20


def batch_leaves(leaves: Iterable[tuple[FlaxPath, np.ndarray]], max_bytes: int | None = None
                 ) -> Iterator[dict[str, Any]]:
  """(path, array) pairs batched into nested-dict groups of <= max_bytes (or one leaf if larger;
  default `GROUP_BYTES`).

  Each group is one Orbax partial save (`save_params_streaming`), whose cost grows with the tree
  size, so small leaves are batched; peak RAM stays below max_bytes plus the largest leaf. The
  pairs are consumed lazily: an error raised by their producer stops the save before the next
  group (and before `finalize`).
  """
  max_bytes = GROUP_BYTES if max_bytes is None else max_bytes
  group: dict[FlaxPath, np.ndarray] = {}
  size = 0
  for p, leaf in leaves:
    if group and size + leaf.nbytes > max_bytes:
      yield _unflatten(group)
      group, size = {}, 0
    group[p] = leaf
    size += leaf.nbytes
  if group:
    yield _unflatten(group)


def _leaf_groups(plan: ConversionPlan, paths: Iterable[FlaxPath], *, keep_dtype: bool = False
                 ) -> Iterator[dict[str, Any]]:
  """Converted leaves in `batch_leaves` groups. `keep_dtype`: each leaf in its source tensors'
  stored dtype instead of the plan's target dtype."""
  return batch_leaves((p, plan.load_leaf(p, plan.source_dtype(p) if keep_dtype else None))
                      for p in paths)


def export_model(spec: ModelSpec, src: str | os.PathLike, dst: str | os.PathLike,
                 dtype: Any = None, *, progress: bool = True, overwrite: bool = False) -> None:
  """Converts a safetensors component folder to `dst/config.json` + `dst/params/` (Orbax).

  Streams one parameter leaf (all its stacked layers) at a time. `dst` must not exist and is
  written atomically: on any error nothing is left behind.

  `dtype`: the stored parameter dtype under the model's precision policy (None -> float32);
  "keep" stores every tensor in its safetensors dtype, bit for bit (lossless).
  """
  src, dst = os.fspath(src), os.fspath(dst)
  config = spec.read_config(src)
  keep = isinstance(dtype, str) and dtype == "keep"
  dtype = _resolve_dtype(None if keep else dtype)
  _, abstract = spec.abstract(config, dtype)
  plan = ConversionPlan(SafetensorsFolder(src), abstract, spec.key_map(config),
                        stacked_len=spec.stacked_len(config), tied=spec.tied_keys(config))
  paths = plan.leaf_paths()
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    paths = tqdm(paths, desc=f"convert {spec.name}", unit="tensor")
  with atomic_directory(dst, overwrite=overwrite) as tmp:
    with open(os.path.join(src, spec.config_cls.CONFIG_NAME)) as f:
      raw_config = json.load(f)
    with open(os.path.join(tmp, spec.config_cls.CONFIG_NAME), "w") as f:
      json.dump(raw_config, f, indent=2, sort_keys=True)
    save_params_streaming(os.path.join(tmp, PARAMS_DIR),
                          _leaf_groups(plan, paths, keep_dtype=keep))


def save_model(spec: ModelSpec, config: Any, model: Any, dst: str | os.PathLike, *,
               overwrite: bool = False, **config_extra: Any) -> None:
  """Writes an in-memory model as our export layout (`dst/config.json` + `dst/params/`).

  Args:
    spec: the component's `ModelSpec` (for the config file name).
    config: the model config (a `JsonConfig`).
    model: the NNX module (its parameters are saved as a plain dict).
    dst: output folder (written atomically).
    overwrite: replace an existing `dst`.
    **config_extra: extra keys for config.json (e.g. `_class_name`).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(model))
  with atomic_directory(dst, overwrite=overwrite) as tmp:
    config.to_json(os.path.join(tmp, spec.config_cls.CONFIG_NAME), **config_extra)
    save_params(os.path.join(tmp, PARAMS_DIR), params)


# ------------------------------------------------------------------------------------------
# Flax -> PyTorch: the inverse mapping (export back to diffusers / transformers safetensors).


def flax_to_torch(x: np.ndarray, leaf: str, torch_shape: Sequence[int]) -> np.ndarray:
  """Converts one Flax leaf value back to the PyTorch layout `torch_shape` (inverts `torch_to_flax`).

  `kernel` leaves: Linear [in, out] -> [out, in]; ConvNd [*k, in, out] -> [out, in, *k] (a
  kernel stored reshaped is first brought back to the transposed PyTorch shape). Every other
  leaf keeps its values and is reshaped. Returns a C-contiguous array (values unchanged).
  """
  torch_shape = tuple(int(s) for s in torch_shape)
  if x.size != int(np.prod(torch_shape, dtype=np.int64)):
    raise CheckpointError(f"shape {x.shape} cannot become {torch_shape}")
  if leaf == "kernel" and len(torch_shape) >= 2:
    n = len(torch_shape)
    x = x.reshape(torch_shape[2:] + (torch_shape[1], torch_shape[0]))
    x = np.transpose(x, (n - 1, n - 2) + tuple(range(n - 2)))  # argsort of (2..n-1, 1, 0)
  return np.ascontiguousarray(x.reshape(torch_shape))


def default_torch_shape(path: FlaxPath, flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax leaf: kernels transposed back, other leaves unchanged."""
  flax_shape = tuple(int(s) for s in flax_shape)
  if path[-1] == "kernel" and len(flax_shape) >= 2:
    return (flax_shape[-1], flax_shape[-2]) + flax_shape[:-2]
  return flax_shape


@dataclasses.dataclass(frozen=True)
class InverseKeyMap:
  """A model's Flax-leaf -> PyTorch-key mapping (the inverse of its `KeyMap`).

  Attributes:
    torch_key: (flax path, layer index | None) -> PyTorch state-dict key.
    stacked: flax path -> whether the leaf stacks the scanned layers on axis 0.
    torch_shape: (flax path, per-layer flax shape) -> PyTorch tensor shape.
  """

  torch_key: Callable[[FlaxPath, "int | None"], str]
  stacked: Callable[[FlaxPath], bool] = lambda path: False
  torch_shape: Callable[[FlaxPath, Sequence[int]], tuple[int, ...]] = default_torch_shape


def _blocks_stacked(path: FlaxPath) -> bool:
  return path[0] == "blocks"


def _transformer_torch_key(path: FlaxPath, layer: int | None) -> str:
  """Inverse of `models.transformer._torch_key_map`."""
  parts = list(path[1:] if path[0] == "blocks" else path)
  if parts[0] == "memory":
    parts = parts[1:]
  if parts[-1] == "kernel":
    parts[-1] = "weight"
  key = ".".join(parts)
  key = key.replace("to_out.", "to_out.0.").replace("ffn.proj_in.", "ffn.net.0.proj.")
  key = key.replace("ffn.proj_out.", "ffn.net.2.")
  return f"blocks.{layer}.{key}" if layer is not None else key


def _vae_torch_key(path: FlaxPath, layer: int | None) -> str:
  """Inverse of `models.vae.WanVAESpec.key_map` (`resample` holds nn.Sequential's conv [1])."""
  del layer
  parts = list(path)
  if len(parts) >= 2 and parts[-2] == "resample":
    parts = parts[:-1] + ["1", parts[-1]]
  if parts[-1] == "kernel":
    parts[-1] = "weight"
  return ".".join(parts)


def _vae_torch_shape(path: FlaxPath, flax_shape: Sequence[int]) -> tuple[int, ...]:
  """Wan RMS-norm gammas are [C, 1, 1] in attention blocks (images=True), else [C, 1, 1, 1]."""
  if path[-1] == "gamma" and len(flax_shape) == 1:
    return (int(flax_shape[0]),) + ((1, 1) if "attentions" in path else (1, 1, 1))
  return default_torch_shape(path, flax_shape)


# {Flax sub-path of a umT5 block: (layer group, PyTorch name)}: the inverse of
# `models.text_encoder._LAYER_KEYS` (kept here, as models import this module; `ExportPlan`
# checks every name against the forward map).
_UMT5_LAYER_NAMES = {
    ("self_attn", "q", "kernel"): ("0", "SelfAttention.q.weight"),
    ("self_attn", "k", "kernel"): ("0", "SelfAttention.k.weight"),
    ("self_attn", "v", "kernel"): ("0", "SelfAttention.v.weight"),
    ("self_attn", "o", "kernel"): ("0", "SelfAttention.o.weight"),
    ("self_attn", "relative_attention_bias", "embedding"):
        ("0", "SelfAttention.relative_attention_bias.weight"),
    ("self_attn_norm", "scale"): ("0", "layer_norm.weight"),
    ("ffn", "wi_0", "kernel"): ("1", "DenseReluDense.wi_0.weight"),
    ("ffn", "wi_1", "kernel"): ("1", "DenseReluDense.wi_1.weight"),
    ("ffn", "wo", "kernel"): ("1", "DenseReluDense.wo.weight"),
    ("ffn_norm", "scale"): ("1", "layer_norm.weight"),
}


def _text_encoder_torch_key(path: FlaxPath, layer: int | None) -> str:
  """Inverse of `models.text_encoder.TextEncoderSpec.key_map` (the tied embedding: `shared`)."""
  if path == ("embed_tokens", "embedding"):
    return "shared.weight"
  if path == ("final_norm", "scale"):
    return "encoder.final_layer_norm.weight"
  if path[0] != "blocks" or path[1:] not in _UMT5_LAYER_NAMES or layer is None:
    raise CheckpointError(f"text encoder parameter {'/'.join(path)} has no PyTorch name")
  sub, name = _UMT5_LAYER_NAMES[path[1:]]
  return f"encoder.block.{layer}.layer.{sub}.{name}"


INVERSE_KEY_MAPS: dict[str, InverseKeyMap] = {
    "transformer": InverseKeyMap(_transformer_torch_key, _blocks_stacked),
    "vae": InverseKeyMap(_vae_torch_key, torch_shape=_vae_torch_shape),
    "text_encoder": InverseKeyMap(_text_encoder_torch_key, _blocks_stacked),
}


@dataclasses.dataclass(frozen=True)
class TorchTensor:
  """One PyTorch tensor of an export: its key, source Flax leaf (+ layer), shape and dtype."""

  key: str
  path: FlaxPath
  layer: int | None
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class ExportPlan:
  """Which Flax leaf (and layer) fills which PyTorch tensor: the inverse of `ConversionPlan`.

  Every name is checked against the forward mapping before any data moves: each PyTorch key
  must map back (`key_map`) to the leaf and layer it was produced from, and the element counts
  must agree.

  Args:
    leaves: {flax path: (shape, dtype)} of the stored parameters (stacked leaves whole).
    key_map: the model's PyTorch -> Flax `KeyMap` (for the round-trip check).
    inverse: the model's `InverseKeyMap`.
    stacked_len: number of scanned layers (leading axis of stacked leaves).
    dtypes: optional {flax path: dtype} the tensors are written in (default: stored dtype).
  """

  def __init__(self, leaves: Mapping[FlaxPath, tuple[Sequence[int], Any]], key_map: KeyMap,
               inverse: InverseKeyMap, *, stacked_len: int | None = None,
               dtypes: Mapping[FlaxPath, Any] | None = None):
    self.tensors: list[TorchTensor] = []
    seen: dict[str, str] = {}
    for path, (shape, stored) in leaves.items():
      shape = tuple(int(s) for s in shape)
      dtype = np.dtype((dtypes or {}).get(path, stored))
      name = "/".join(path)
      if inverse.stacked(path):
        if stacked_len is None or not shape or shape[0] != stacked_len:
          raise CheckpointError(f"stacked parameter {name} has shape {shape}; expected "
                                f"{stacked_len} layers on axis 0")
        layers, per_layer = list(range(shape[0])), shape[1:]
      else:
        layers, per_layer = [None], shape
      for layer in layers:
        key = inverse.torch_key(path, layer)
        back = key_map(key)
        if back != (path, layer):
          raise CheckpointError(f"{name}[{layer}] exports as {key!r}, which loads back as "
                                f"{back!r}: the inverse key mapping is wrong")
        if key in seen:
          raise CheckpointError(f"{name} and {seen[key]} both export as {key!r}")
        seen[key] = name
        tshape = tuple(inverse.torch_shape(path, per_layer))
        if int(np.prod(tshape, dtype=np.int64)) != int(np.prod(per_layer, dtype=np.int64)):
          raise CheckpointError(f"{name}: shape {per_layer} cannot become {key!r} {tshape}")
        self.tensors.append(TorchTensor(key, path, layer, tshape, dtype))

  @property
  def nbytes(self) -> int:
    return sum(t.nbytes for t in self.tensors)

  def convert(self, tensor: TorchTensor, leaf_value: np.ndarray) -> np.ndarray:
    """The PyTorch tensor `tensor` from its (whole, possibly stacked) Flax leaf value."""
    x = leaf_value if tensor.layer is None else leaf_value[tensor.layer]
    x = flax_to_torch(np.asarray(x), tensor.path[-1], tensor.shape)
    return x if x.dtype == tensor.dtype else x.astype(tensor.dtype)

  def shards(self, max_shard_bytes: int) -> list[list[TorchTensor]]:
    """Tensors split in order into shards of <= max_shard_bytes (a larger tensor: its own)."""
    if max_shard_bytes <= 0:
      raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    out: list[list[TorchTensor]] = []
    size = 0
    for t in self.tensors:
      if not out or (out[-1] and size + t.nbytes > max_shard_bytes):
        out.append([])
        size = 0
      out[-1].append(t)
      size += t.nbytes
    return out


_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsWriter:
  """Writes one `.safetensors` file tensor by tensor (header first, from known shapes/dtypes).

  Only one tensor is in memory at a time. The tensors must be written in the declared order;
  `close()` checks every declared tensor was written.

    with SafetensorsWriter(path, [(key, shape, dtype), ...]) as w:
      w.write(key, array)
  """

  def __init__(self, path: str, entries: Sequence[tuple[str, Sequence[int], Any]],
               metadata: Mapping[str, str] | None = None):
    self.path = path
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    self._order: list[tuple[str, tuple[int, ...], np.dtype]] = []
    offset = 0
    for key, shape, dtype in entries:
      dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
      if dtype not in _NP_TO_ST:
        raise CheckpointError(f"{key!r}: dtype {dtype} cannot be stored in safetensors")
      n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[key] = {"dtype": _NP_TO_ST[dtype], "shape": list(shape),
                     "data_offsets": [offset, offset + n]}
      self._order.append((key, shape, dtype))
      offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    self._f = open(path, "wb")  # pylint: disable=consider-using-with
    self._f.write(struct.pack("<Q", len(raw)) + raw)
    self._next = 0

  def write(self, key: str, x: np.ndarray) -> None:
    want_key, shape, dtype = self._order[self._next]
    if key != want_key or tuple(x.shape) != shape or x.dtype != dtype:
      raise CheckpointError(f"{self.path}: got {key!r} {tuple(x.shape)} {x.dtype}, expected "
                            f"{want_key!r} {shape} {dtype}")
    self._f.write(np.ascontiguousarray(x).tobytes(order="C") if x.size else b"")
    self._next += 1

  def close(self) -> None:
    f, self._f = self._f, None
    if f is None:
      return
    f.close()
    if self._next != len(self._order):
      raise CheckpointError(f"{self.path}: only {self._next} of {len(self._order)} tensors "
                            "were written")

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    elif self._f is not None:
      self._f.close()
      self._f = None


def iter_orbax_leaves(path: str, leaves: Mapping[FlaxPath, Any], order: Iterable[FlaxPath],
                      max_bytes: int = 256 << 20) -> Iterator[tuple[FlaxPath, np.ndarray]]:
  """Reads an Orbax PyTree checkpoint leaf by leaf, as host numpy arrays in their stored dtype.

  Consecutive small leaves are read together (one Orbax load of up to `max_bytes`; the other
  leaves are `PLACEHOLDER`s, so they are not read), a larger leaf alone: peak RAM is about
  max(max_bytes, the largest leaf). Arrays are placed on the host CPU device.

  Args:
    path: the `params/` folder.
    leaves: {flax path: metadata with `.shape` and `.dtype`} of every leaf in the checkpoint.
    order: the leaves to read, in order.
    max_bytes: batch size of one read.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

  def nbytes(p):
    return int(np.prod(leaves[p].shape, dtype=np.int64)) * np.dtype(leaves[p].dtype).itemsize

  def read(group):
    want = {p: (jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=cpu)
                if p in group else ocp.PLACEHOLDER) for p, m in leaves.items()}
    try:
      got = _flatten(ocp.load(path, _unflatten(want)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{path}: failed to read {['/'.join(p) for p in group][:3]} "
                            f"({e})") from e
    for p in group:
      yield p, np.asarray(got.pop(p))

  group: list[FlaxPath] = []
  size = 0
  for p in order:
    if group and size + nbytes(p) > max_bytes:
      yield from read(group)
      group, size = [], 0
    group.append(p)
    size += nbytes(p)
  if group:
    yield from read(group)
