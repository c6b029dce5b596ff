"""Low-memory inference: the DiT's block weights in host memory, streamed one block at a time.

The 14B DiT's 40 stacked blocks hold 98 % of its weights (28.1 of 28.7 GB in bf16). In
low-memory mode they stay in the host's pinned memory (JAX memory kind "pinned_host") and the
block scan copies one layer at a time to the device, double-buffered so the next layer's copy can
overlap the current block (`HeliosTransformer3DModel._run_blocks` with `blocks_on_host`). What
stays on the device: the embeddings, the head, two layers of block weights, the activations.
Host RAM needed: the block weights' bytes (`block_bytes`: 28.1 GB bf16, 14.1 GB fp8 / int8w)
plus what the process already holds; the text encoder is released after each prompt
(`Pipeline(release_text_encoder=True)`) unless it is placed on the CPU.

Every chunk streams the whole stack once per model call (each solver step, CFG included), so
the mode trades PCIe bandwidth for memory: about `block_bytes / bandwidth` per DiT call (28 GB
over PCIe 5 x16 ~ 0.5 s, an estimate: not yet measured on a GPU).

Used through `Pipeline.from_pretrained(..., low_memory=True)` / `generate --low_memory`.
Not combined with `Pipeline.shard(mesh)`: a mesh already splits the weights over its devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from helios_jax.models import transformer as transformer_lib

HOST_MEMORY_KIND = "pinned_host"
BLOCKS = "blocks"  # the stacked-block subtree of the DiT's parameters


def host_memory_kinds(device: jax.Device | None = None) -> list[str]:
  """The memory kinds a device can address (e.g. ["device", "pinned_host", "unpinned_host"])."""
  device = device or jax.devices()[0]
  return [m.kind for m in device.addressable_memories()]


def check_supported(device: jax.Device | None = None) -> None:
  """Raises RuntimeError when `device` cannot address pinned host memory."""
  device = device or jax.devices()[0]
  kinds = host_memory_kinds(device)
  if HOST_MEMORY_KIND not in kinds:
    raise RuntimeError(
        f"low_memory needs {HOST_MEMORY_KIND!r} memory, which {device.platform} device {device} "
        f"does not address (memory kinds: {kinds}); run without low_memory, or use a backend "
        "with host memory spaces (CUDA GPUs, TPUs, CPU)")


def host_sharding(device: jax.Device | None = None) -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(device or jax.devices()[0],
                                           memory_kind=HOST_MEMORY_KIND)


def load_placement(device: jax.Device | None = None
                   ) -> Callable[[tuple[str, ...]], jax.sharding.Sharding]:
  """Where `checkpoint.load_model` puts each parameter: block leaves in host memory, the rest
  on the device (so loading never holds the block stack on the device)."""
  device = device or jax.devices()[0]
  check_supported(device)
  host, dev = host_sharding(device), jax.sharding.SingleDeviceSharding(device)
  return lambda path: host if path and path[0] == BLOCKS else dev


def _single_device(leaves: list[Any]) -> jax.Device:
  devices = {d for x in leaves for d in x.devices()}
  if len(devices) != 1:
    raise ValueError(f"low_memory needs the DiT on one device; its parameters span "
                     f"{len(devices)} devices (a sharded pipeline: use the mesh or low_memory, "
                     "not both)")
  return next(iter(devices))


def offload_blocks(transformer: transformer_lib.HeliosTransformer
                   ) -> transformer_lib.HeliosTransformer:
  """A `HeliosTransformer` whose block weights are in host memory and streamed per block.

  Leaves already in host memory stay where they are; the others are moved one leaf at a time
  (peak device memory: the input's). Quantized kernels (`QArray` qvalue + scale) move like any
  leaf. The non-block parameters stay on the device. The input object keeps its arrays (drop it
  to free the device copies). Abstract models (`ShapeDtypeStruct` leaves, e.g.
  benchmarks/memory_plan.py) get host-memory shardings on their block leaves.

  Raises:
    ValueError: parameters on several devices (a sharded pipeline).
    RuntimeError: the device has no pinned host memory.
  """
  leaves = jax.tree.leaves(transformer.params)
  abstract = all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)
  device = jax.devices()[0] if abstract else _single_device(leaves)
  check_supported(device)
  host = host_sharding(device)

  def move(a):
    if isinstance(a, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host)
    if transformer_lib.in_host_memory(a):
      return a
    return jax.device_put(a, host)

  params = jax.tree.map(lambda a: a, transformer.params)  # fresh Variables: the input keeps its own
  params[BLOCKS] = jax.tree.map(move, params[BLOCKS])
  model = nnx.merge(transformer.graphdef, params)
  model.blocks_on_host = True
  out = transformer_lib.HeliosTransformer(transformer.config, model)
  for name in ("quantize_mode", "quantized_paths", "keep_blocks"):
    if hasattr(transformer, name):
      setattr(out, name, getattr(transformer, name))
  return out


def is_offloaded(transformer: transformer_lib.HeliosTransformer) -> bool:
  return bool(transformer.module().blocks_on_host)


def block_bytes(params: nnx.State) -> int:
  """Bytes of the stacked block weights (the host RAM low-memory mode needs for them)."""
  blocks = params[BLOCKS] if BLOCKS in params else params
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(blocks)))
