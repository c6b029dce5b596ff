"""Device mesh and shardings of the trainer: data + FSDP (+ context) axes (style anchor §8.15).

Mesh axes (maxdiffusion's names): "data" (pure data parallelism), "fsdp" (data parallelism
with parameters, gradients and optimizer state sharded) and "context" (the token axis of the
activations inside the block scan, for the 11k-token history + noisy sequence). The batch
axis is sharded over ("data", "fsdp"); every parameter-like array (base weights, LoRA factors,
Adam moments) is sharded over "fsdp" along its largest divisible axis, never the stacked layer
axis of `blocks/...` (the scan slices it; sharding it would all-gather every layer at once).
The same code runs on one device (every axis of size 1) or many; XLA's SPMD partitioner
inserts the all-gathers / reduce-scatters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "context")
BATCH_AXES = ("data", "fsdp")
MIN_SHARD_SIZE = 1024  # arrays with fewer elements stay replicated


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes; one of them may be -1 (= all remaining devices).

  Attributes:
    data: data-parallel replicas.
    fsdp: parameter-sharding data-parallel axis.
    context: sequence-parallel axis inside the blocks.
  """

  data: int = 1
  fsdp: int = -1
  context: int = 1

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.context]
    if sum(s == -1 for s in sizes) > 1:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh {dict(zip(AXES, sizes))}: sizes must be >= 1 or -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide {num_devices} devices")
      sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} has {int(np.prod(sizes))} devices, but "
                       f"{num_devices} are present")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """`jax.make_mesh` over ("data", "fsdp", "context") with all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  shape = cfg.resolve(len(devices))
  # Auto axes: XLA's SPMD partitioner propagates shardings (newer JAX defaults to Explicit).
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def _is_stacked(path) -> bool:
  return any(getattr(k, "key", getattr(k, "name", None)) == "blocks" for k in path)


def param_spec(path, shape: tuple[int, ...], fsdp: int) -> P:
  """FSDP partition spec of one parameter-like array (see module docstring)."""
  if fsdp <= 1 or int(np.prod(shape)) < MIN_SHARD_SIZE:
    return P()
  skip = 1 if _is_stacked(path) and len(shape) >= 2 else 0
  best = None
  for axis in range(skip, len(shape)):
    if shape[axis] % fsdp == 0 and (best is None or shape[axis] > shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs (FSDP rule per leaf)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, tuple(np.shape(x)), fsdp)), tree)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Batch axis over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: jax.sharding.Mesh) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n:
    raise ValueError(f"global batch {global_batch} is not divisible by data x fsdp = {n} "
                     f"(mesh {dict(mesh.shape)})")


def context_constraint(mesh: jax.sharding.Mesh):
  """`h [B, S, D] -> h` sharded (batch, context, -) inside the blocks; None without context axis."""
  if mesh.shape["context"] == 1:
    return None
  sharding = NamedSharding(mesh, P(BATCH_AXES, "context", None))
  return lambda h: jax.lax.with_sharding_constraint(h, sharding)


def host_to_global(tree: Any, shardings: Any) -> Any:
  """Global arrays from host values that every process holds in full (e.g. loaded weights)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def local_batch_to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Global batch arrays from this process's contiguous slice of the global batch."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)),
                                                    np.asarray(v))
          for k, v in batch.items()}
