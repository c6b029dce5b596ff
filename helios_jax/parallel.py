"""Multi-device inference: one chunk's DiT over N devices (tensor, context and data axes).

A mesh with up to three axes:

  data     splits the batch (e.g. the cond / uncond halves of a CFG batch),
  context  splits the token sequence (11,040 tokens at 384x640) — "context parallel",
  tensor   splits attention heads and the FFN hidden units (Megatron-style: q/k/v and FFN-in
           column-parallel, attention-out and FFN-out row-parallel).

Parameters get `NamedSharding`s from `transformer_param_specs`; activations are pinned with
`constrain_tokens` at every block entry when a mesh is active (`jax.set_mesh`). XLA's SPMD
partitioner inserts the collectives (all-gathers of K/V for context parallelism, all-reduces for
row-parallel layers and the q/k RMSNorm across heads). Everything else is the single-device code,
so the result equals the 1-device forward up to reduction order (tested on forced host devices).

  mesh = parallel.make_mesh(tensor=4)
  pipe.shard(mesh)                 # places the DiT parameters; generate/stream then run on it
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "context", "tensor")

# Stacked block params have a leading layer axis (None). Kernels are [in, out].
_BLOCK_RULES = {
    ("attn1", "to_q", "kernel"): P(None, None, "tensor"),
    ("attn1", "to_k", "kernel"): P(None, None, "tensor"),
    ("attn1", "to_v", "kernel"): P(None, None, "tensor"),
    ("attn1", "to_q", "bias"): P(None, "tensor"),
    ("attn1", "to_k", "bias"): P(None, "tensor"),
    ("attn1", "to_v", "bias"): P(None, "tensor"),
    ("attn1", "norm_q", "weight"): P(None, "tensor"),
    ("attn1", "norm_k", "weight"): P(None, "tensor"),
    ("attn1", "to_out", "kernel"): P(None, "tensor", None),
    ("ffn", "proj_in", "kernel"): P(None, None, "tensor"),
    ("ffn", "proj_in", "bias"): P(None, "tensor"),
    ("ffn", "proj_out", "kernel"): P(None, "tensor", None),
}
_BLOCK_RULES.update({("attn2",) + k[1:]: v for k, v in _BLOCK_RULES.items() if k[0] == "attn1"})


def make_mesh(data: int = 1, context: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ("data", "context", "tensor") mesh over `data * context * tensor` devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = data * context * tensor
  if n < 1 or min(data, context, tensor) < 1:
    raise ValueError(f"mesh sizes must be >= 1, got data={data} context={context} "
                     f"tensor={tensor}")
  if n > len(devices):
    raise ValueError(f"mesh data={data} x context={context} x tensor={tensor} = {n} devices, "
                     f"only {len(devices)} available")
  arr = np.asarray(devices[:n], dtype=object).reshape(data, context, tensor)
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.sharding.Mesh(arr, AXES, axis_types=auto)


def transformer_param_specs(params: Any, heads: int, ffn_dim: int,
                            tensor_size: int) -> Any:
  """PartitionSpecs for a DiT parameter tree (an `nnx.State` or its pure dict)."""
  if heads % tensor_size or ffn_dim % tensor_size:
    raise ValueError(f"tensor={tensor_size} must divide num_attention_heads={heads} and "
                     f"ffn_dim={ffn_dim}")

  def spec(path, leaf):
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    names = tuple(n for n in names if n not in ("value",))
    if names and names[0] == "blocks":
      rule = _BLOCK_RULES.get(names[1:])
      if rule is not None and np.ndim(leaf) == len(rule):
        return rule
    return P()

  return jax.tree_util.tree_map_with_path(spec, params)


def shard_transformer(transformer, mesh: jax.sharding.Mesh):
  """Places a `HeliosTransformer`'s params on `mesh` (in place); returns the transformer."""
  cfg = transformer.config
  specs = transformer_param_specs(transformer.params, cfg.num_attention_heads, cfg.ffn_dim,
                                  mesh.shape["tensor"])
  transformer.params = jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), transformer.params, specs)
  return transformer


def constrain_tokens(x: jax.Array) -> jax.Array:
  """Pins `[B, S, D]` hidden states to (data, context, -) of the active mesh (no-op without).

  The batch axis is split over "data" only when divisible; the token axis over "context"
  (XLA pads uneven splits).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return x
  if mesh.shape["data"] == 1 and mesh.shape["context"] == 1:
    return x
  batch = "data" if x.shape[0] % mesh.shape["data"] == 0 else None
  return jax.lax.with_sharding_constraint(x, P(batch, "context", None))
