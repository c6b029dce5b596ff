"""Sharding: one logical-axis table for inference and training (meshes, parameters, tokens).

Arrays are described by logical axes, and each use maps them onto the axes of its own mesh
(`RULES`, Flax/MaxText style):

  logical   what it indexes                          inference   training
  batch     samples (the CFG cond / uncond halves)   data        (data, fsdp)
  tokens    the [history | noisy] token sequence     context     context
  embed     the model width D                        -           -
  heads     attention heads (q/k/v features)         tensor      -
  mlp       FFN hidden units                         tensor      -
  layers    the stacked block axis (scan-sliced)     -           -

Inference, mesh ("data", "context", "tensor"): the DiT's block parameters carry logical axes
(`BLOCK_PARAM_AXES`), which makes q/k/v and FFN-in column-parallel, attention-out and FFN-out
row-parallel (Megatron) and splits the q/k RMSNorm weights over heads; everything else is
replicated. Inputs arrive replicated, so the token constraint splits the batch and the tokens.

Training, mesh ("data", "fsdp", "context"): the FSDP rule beside the table. Every
parameter-like array (base weights, LoRA factors, Adam moments) with at least `MIN_SHARD_SIZE`
elements is split over "fsdp" along its largest divisible axis, never the stacked layer axis of
`blocks/...` (the scan slices it; sharding it would all-gather every layer at once). Batches
arrive split over the batch axes, so the token constraint splits only the tokens.

The models never look up a mesh: `token_constraint(mesh)` is passed to the DiT's forward, which
applies it at every block entry. XLA's SPMD partitioner inserts the collectives (K/V all-gathers
for context parallelism, all-reduces for row-parallel layers and the q/k RMSNorm across heads,
FSDP all-gathers / reduce-scatters), so results equal one device up to reduction order (tested
on forced host devices).

  mesh = sharding.make_mesh("inference", tensor=4)
  pipe.shard(mesh)      # places the DiT parameters; generate / stream then run on the mesh
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence, Union

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Logical axes of activations and parameters.
BATCH, TOKENS, EMBED, HEADS, MLP, LAYERS = "batch", "tokens", "embed", "heads", "mlp", "layers"
TOKEN_AXES = (BATCH, TOKENS, EMBED)  # hidden states [B, S, D]

MIN_SHARD_SIZE = 1024  # FSDP: arrays with fewer elements stay replicated

MeshAxes = Union[str, tuple[str, ...], None]


@dataclasses.dataclass(frozen=True)
class Rules:
  """One use's layout: its mesh axes and the mesh axes of every logical axis.

  Attributes:
    mesh_axes: the mesh's axis names, in order.
    logical: logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
    pinned: logical axes of the hidden states that the block-entry constraint splits; a mesh
      whose axes for all of them have size 1 gets no constraint.
    fsdp: mesh axis of the FSDP rule (None: parameters follow `logical` only).
    all_devices: the mesh must span every device (training: every process's devices); else it
      takes the first `prod(sizes)` devices.
  """

  mesh_axes: tuple[str, ...]
  logical: Mapping[str, MeshAxes]
  pinned: tuple[str, ...]
  fsdp: str | None = None
  all_devices: bool = False


RULES = {
    "inference": Rules(
        mesh_axes=("data", "context", "tensor"),
        logical={BATCH: "data", TOKENS: "context", EMBED: None, HEADS: "tensor",
                 MLP: "tensor", LAYERS: None},
        pinned=(BATCH, TOKENS)),
    "training": Rules(
        mesh_axes=("data", "fsdp", "context"),
        logical={BATCH: ("data", "fsdp"), TOKENS: "context", EMBED: None, HEADS: None,
                 MLP: None, LAYERS: None},
        pinned=(TOKENS,), fsdp="fsdp", all_devices=True),
}

# Logical axes of the stacked DiT block parameters (kernels are [in, out]); other leaves have
# none (replicated unless the FSDP rule splits them).
_ATTN_AXES = {
    ("to_q", "kernel"): (LAYERS, EMBED, HEADS),
    ("to_k", "kernel"): (LAYERS, EMBED, HEADS),
    ("to_v", "kernel"): (LAYERS, EMBED, HEADS),
    ("to_q", "bias"): (LAYERS, HEADS),
    ("to_k", "bias"): (LAYERS, HEADS),
    ("to_v", "bias"): (LAYERS, HEADS),
    ("norm_q", "weight"): (LAYERS, HEADS),
    ("norm_k", "weight"): (LAYERS, HEADS),
    ("to_out", "kernel"): (LAYERS, HEADS, EMBED),
}
BLOCK_PARAM_AXES = {
    **{(attn,) + k: v for attn in ("attn1", "attn2") for k, v in _ATTN_AXES.items()},
    ("ffn", "proj_in", "kernel"): (LAYERS, EMBED, MLP),
    ("ffn", "proj_in", "bias"): (LAYERS, MLP),
    ("ffn", "proj_out", "kernel"): (LAYERS, MLP, EMBED),
}


def rules_of(mesh: jax.sharding.Mesh) -> Rules:
  """The `RULES` entry whose mesh axes are `mesh`'s."""
  for rules in RULES.values():
    if tuple(mesh.axis_names) == rules.mesh_axes:
      return rules
  raise ValueError(f"mesh axes {tuple(mesh.axis_names)} match no sharding rules; expected one "
                   f"of {[r.mesh_axes for r in RULES.values()]}")


def axis_size(sizes: Mapping[str, int], axes: MeshAxes) -> int:
  """Devices along mesh axes `axes` (a name, a tuple of names or None) of a mesh's `shape`."""
  if axes is None:
    return 1
  return math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


def logical_spec(axes: Sequence[str | None], rules: Rules) -> P:
  """PartitionSpec of an array whose dimensions have logical `axes` (None: replicated)."""
  return P(*(None if a is None else rules.logical[a] for a in axes))


# ------------------------------------------------------------------------------------------
# Meshes.


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Training mesh sizes; one of them may be -1 (= all remaining devices).

  Attributes:
    data: data-parallel replicas.
    fsdp: parameter-sharding data-parallel axis.
    context: sequence-parallel axis inside the blocks.
  """

  data: int = 1
  fsdp: int = -1
  context: int = 1


def mesh_shape(use: str, num_devices: int, **sizes: int) -> tuple[int, ...]:
  """Axis sizes of a `use` mesh: named sizes, unnamed axes 1, one -1 = the remaining devices."""
  if use not in RULES:
    raise ValueError(f"unknown sharding use {use!r}; expected one of {sorted(RULES)}")
  rules = RULES[use]
  unknown = sorted(set(sizes) - set(rules.mesh_axes))
  if unknown:
    raise ValueError(f"mesh axes {unknown} are not {use} axes {rules.mesh_axes}")
  named = {a: int(sizes.get(a, 1)) for a in rules.mesh_axes}
  shape = list(named.values())
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"mesh {named}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh {named}: sizes must be >= 1 or -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh {named} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  n = math.prod(shape)
  if rules.all_devices and n != num_devices:
    raise ValueError(f"mesh {named} has {n} devices, but {num_devices} are present")
  if n > num_devices:
    raise ValueError(f"mesh {named} has {n} devices, only {num_devices} available")
  return tuple(shape)


def make_mesh(use: str, devices: Sequence[jax.Device] | None = None,
              **sizes: int) -> jax.sharding.Mesh:
  """A mesh over `RULES[use].mesh_axes` (sizes as in `mesh_shape`).

  Args:
    use: "inference" (data, context, tensor) or "training" (data, fsdp, context).
    devices: the devices (default all); inference takes the first `prod(sizes)` of them,
      training needs all.
    **sizes: axis sizes by name.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(use, len(devices), **sizes)
  # Auto axes: XLA's SPMD partitioner propagates shardings (newer JAX defaults to Explicit).
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, RULES[use].mesh_axes, axis_types=auto,
                       devices=devices[:math.prod(shape)])


# ------------------------------------------------------------------------------------------
# Parameters.


def _names(path) -> tuple[str, ...]:
  names = (str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return tuple(n for n in names if n != "value")  # nnx.Variable leaves


def param_spec(path, shape: tuple[int, ...], rules: Rules, sizes: Mapping[str, int]) -> P:
  """PartitionSpec of one parameter-like array: its logical axes, then the FSDP rule.

  The FSDP rule (training) picks the largest axis that `sizes[rules.fsdp]` divides among the
  axes the logical table left unsplit, never the leading layer axis under `blocks`; arrays
  under `MIN_SHARD_SIZE` elements stay replicated.

  Args:
    path: the leaf's pytree path (`blocks/<module>/<leaf>` of a DiT tree has logical axes).
    shape: its shape.
    rules: the use's rules.
    sizes: the mesh's axis sizes (`mesh.shape`).
  """
  names = _names(path)
  axes = BLOCK_PARAM_AXES.get(names[1:]) if names[:1] == ("blocks",) else None
  if axes is None or len(axes) != len(shape):
    axes = (None,) * len(shape)
  spec = list(logical_spec(axes, rules))
  fsdp = rules.fsdp
  if fsdp is not None and sizes[fsdp] > 1 and math.prod(shape) >= MIN_SHARD_SIZE:
    skip = 1 if "blocks" in names and len(shape) >= 2 else 0  # the stacked layer axis
    best = None
    for axis in range(skip, len(shape)):
      if spec[axis] is None and shape[axis] % sizes[fsdp] == 0 and (
          best is None or shape[axis] > shape[best]):
        best = axis
    if best is not None:
      spec[best] = fsdp
  return P(*spec) if any(a is not None for a in spec) else P()


def param_specs(tree: Any, rules: Rules, sizes: Mapping[str, int]) -> Any:
  """PartitionSpecs for a pytree of arrays / ShapeDtypeStructs (e.g. an `nnx.State`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: param_spec(path, tuple(np.shape(x)), rules, sizes), tree)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs on `mesh` (its use's rules)."""
  rules = rules_of(mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, tuple(np.shape(x)), rules,
                                                     mesh.shape)), tree)


def transformer_param_specs(params: Any, config, sizes: Mapping[str, int]) -> Any:
  """Inference PartitionSpecs of a DiT parameter tree; "tensor" must divide heads and FFN.

  Args:
    params: an `nnx.State` of a `HeliosTransformer3DModel` (or its pure dict).
    config: its `HeliosTransformerConfig`.
    sizes: the inference mesh's axis sizes (`mesh.shape`).
  """
  tensor = sizes["tensor"]
  if config.num_attention_heads % tensor or config.ffn_dim % tensor:
    raise ValueError(f"tensor={tensor} must divide num_attention_heads="
                     f"{config.num_attention_heads} and ffn_dim={config.ffn_dim}")
  return param_specs(params, RULES["inference"], sizes)


def shard_transformer(transformer, mesh: jax.sharding.Mesh):
  """Places a `HeliosTransformer`'s params on an inference `mesh` (in place); returns it."""
  specs = transformer_param_specs(transformer.params, transformer.config, mesh.shape)
  transformer.params = jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), transformer.params, specs)
  return transformer


# ------------------------------------------------------------------------------------------
# Activations and batches.


@dataclasses.dataclass(frozen=True)
class TokenConstraint:
  """Pins hidden states `[B, S, D]` to (batch, tokens, embed) on `mesh`.

  Hashable, so it can be a static jit argument. The batch axis is split only when divisible
  (one prompt stays whole on data=2); the token axis may split unevenly (XLA pads).

  Attributes:
    mesh: the mesh.
    batch, tokens, embed: the mesh axes of the three logical axes.
  """

  mesh: jax.sharding.Mesh
  batch: MeshAxes
  tokens: MeshAxes
  embed: MeshAxes

  def __call__(self, x: jax.Array) -> jax.Array:
    batch = self.batch if x.shape[0] % axis_size(self.mesh.shape, self.batch) == 0 else None
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, P(batch, self.tokens, self.embed)))


def token_constraint(mesh: jax.sharding.Mesh) -> TokenConstraint | None:
  """The block-entry constraint of `mesh`'s use; None when it would split nothing."""
  rules = rules_of(mesh)
  if all(axis_size(mesh.shape, rules.logical[a]) == 1 for a in rules.pinned):
    return None
  return TokenConstraint(mesh, *(rules.logical[a] for a in TOKEN_AXES))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Leading axis over the mesh axes of "batch", the rest replicated."""
  return NamedSharding(mesh, logical_spec((BATCH,) + (None,) * (ndim - 1), rules_of(mesh)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: jax.sharding.Mesh) -> None:
  """Raises unless the mesh axes of "batch" divide `global_batch`."""
  axes = rules_of(mesh).logical[BATCH]
  n = axis_size(mesh.shape, axes)
  if global_batch % n:
    names = " x ".join((axes,) if isinstance(axes, str) else axes)
    raise ValueError(f"global batch {global_batch} is not divisible by {names} = {n} "
                     f"(mesh {dict(mesh.shape)})")


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
