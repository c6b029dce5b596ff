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
               device: Any = None):
  """Loads a component from a diffusers/transformers folder or our Orbax export.

  Args:
    spec: the component's `ModelSpec`.
    path: folder with `config.json` and either safetensors or `params/` (Orbax).
    dtype: parameter dtype (None -> float32); fp32-kept parameters stay float32.
    device: optional `jax.Device` the parameters are placed on (e.g. `jax.devices("cpu")[0]`
      to keep a component off the accelerator); None -> JAX's default device.

  Returns:
    (config, nnx module with the loaded parameters).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{spec.name} checkpoint folder not found: {path}")
  config = spec.read_config(path)
  dtype = _resolve_dtype(dtype)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: spec.build(config, dtype)))
  flat = _flatten(nnx.to_pure_dict(abstract_state))
  sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
  want = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for p, v in flat.items()}
  if is_orbax_export(path):
    params = load_params(os.path.join(path, PARAMS_DIR), _unflatten(want))
  elif is_safetensors_folder(path):
    plan = ConversionPlan(SafetensorsFolder(path), _unflatten(flat), spec.key_map(config),
                          stacked_len=spec.stacked_len(config), tied=spec.tied_keys(config))
    params = _unflatten({p: jax.device_put(plan.load_leaf(p, want[p].dtype), device)
                         for p in flat})
  else:
    raise CheckpointError(f"{path}: neither safetensors weights nor an Orbax '{PARAMS_DIR}/' found")
  nnx.replace_by_pure_dict(abstract_state, params)
  return config, nnx.merge(graphdef, abstract_state)


def _leaf_groups(plan: ConversionPlan, paths: Iterable[FlaxPath],
                 max_bytes: int = 256 << 20) -> Iterator[dict[str, Any]]:
  """Converted leaves batched into groups of <= max_bytes (or one leaf if larger).

  Each group is one Orbax partial save, whose cost grows with the tree size, so small leaves
  are batched; peak RAM stays below max_bytes plus the largest leaf.
  """
  group: dict[FlaxPath, np.ndarray] = {}
  size = 0
  for p in paths:
    leaf = plan.load_leaf(p)
    if group and size + leaf.nbytes > max_bytes:
      yield _unflatten(group)
      group, size = {}, 0
    group[p] = leaf
    size += leaf.nbytes
  if group:
    yield _unflatten(group)


def export_model(spec: ModelSpec, src: str | os.PathLike, dst: str | os.PathLike,
                 dtype: Any = None, *, progress: bool = True, overwrite: bool = False) -> None:
  """Converts a safetensors component folder to `dst/config.json` + `dst/params/` (Orbax).

  Streams one parameter leaf (all its stacked layers) at a time. `dst` must not exist and is
  written atomically: on any error nothing is left behind.
  """
  src, dst = os.fspath(src), os.fspath(dst)
  config = spec.read_config(src)
  dtype = _resolve_dtype(dtype)
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
    save_params_streaming(os.path.join(tmp, PARAMS_DIR), _leaf_groups(plan, paths))


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
