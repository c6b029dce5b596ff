"""The frozen base DiT of a training run: random init, Helios checkpoints, or Wan2.1 (S1-init).

Returns host (numpy) parameter dicts that the trainer places on the mesh with its shardings.
Precision policy: the `TransformerSpec` build (bf16 base with `FP32_MODULES` kept fp32).

Quirk 10.1 decision: when the init checkpoint is a Wan2.1 transformer (no memory stems), the
stems are initialised from the *pretrained* `patch_embedding` (copied / tiled / averaged,
`memory.init_memory_patches_from_patch_embedding`), not from a random one as the reference's
constructor order does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import checkpoint
from helios_jax.config import ConfigError
from helios_jax.config import HeliosTransformerConfig
from helios_jax.models import memory
from helios_jax.models import transformer as tr
from helios_jax.models.attention import KernelConfig

INIT_FORMATS = ("helios", "wan")
# Wan2.1 `WanTransformer3DModel` config keys without a Helios counterpart (T2V values only).
WAN_ONLY_KEYS = ("image_dim", "rope_max_seq_len", "pos_embed_seq_len")


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
  """Where the base weights come from and how the module is built.

  Attributes:
    init_from: transformer folder (diffusers safetensors or our Orbax export); "" = random.
    init_format: "helios" (a Helios checkpoint) or "wan" (Wan2.1-T2V, memory stems created).
    preset: `HeliosTransformerConfig` preset for random init.
    overrides: config field overrides for random init (e.g. (("num_layers", 4),)).
    param_dtype: base dtype ("bfloat16" at scale; fp32-kept modules stay fp32).
    remat: per-block remat policy name (`transformer.REMAT_POLICIES`).
    attention: attention implementation ("auto", "xla", "cudnn", "pallas").
    seed: random-init seed.
    init_memory_from_patch_embedding: random init only: stems from patch_embedding (as S1).
  """

  init_from: str = ""
  init_format: str = "helios"
  preset: str = "tiny"
  overrides: tuple[tuple[str, Any], ...] = ()
  param_dtype: str = "float32"
  remat: str = "full"
  attention: str = "auto"
  seed: int = 0
  init_memory_from_patch_embedding: bool = True

  def __post_init__(self):
    if self.init_format not in INIT_FORMATS:
      raise ConfigError(f"init_format={self.init_format!r} must be one of {INIT_FORMATS}")
    if self.remat not in tr.REMAT_POLICIES:
      raise ConfigError(f"remat={self.remat!r} must be one of {sorted(tr.REMAT_POLICIES)}")

  @property
  def dtype(self):
    return jnp.dtype(self.param_dtype)

  def spec(self) -> tr.TransformerSpec:
    return tr.TransformerSpec(KernelConfig(attention=self.attention), remat=self.remat)


def _with_memory_init(params: dict, config: HeliosTransformerConfig) -> dict:
  """Replaces the three memory stems by the patch_embedding-derived init (spec §1)."""
  pe = params["patch_embedding"]
  dt = np.asarray(pe["kernel"]).dtype
  stems = memory.init_memory_patches_from_patch_embedding(
      np.asarray(pe["kernel"], np.float32), np.asarray(pe["bias"], np.float32),
      config.in_channels)
  params = dict(params)
  params["memory"] = {name: {"kernel": k.astype(dt), "bias": b.astype(dt)}
                      for name, (k, b) in stems.items()}
  return params


def _to_host(tree: Any) -> dict:
  return jax.tree.map(np.asarray, tree)


def read_wan_config(folder: str) -> HeliosTransformerConfig:
  """A Helios config from a Wan2.1 T2V transformer config.json (Helios flags on)."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise checkpoint.CheckpointError(f"Wan transformer config not found: {path}")
  with open(path) as f:
    raw = json.load(f)
  if raw.get("image_dim") is not None:
    raise ConfigError(f"{path}: image_dim={raw['image_dim']} is a Wan I2V model; Helios is "
                      "initialised from Wan2.1-T2V")
  d = {k: v for k, v in raw.items() if k not in WAN_ONLY_KEYS and not k.startswith("_")}
  head = int(d.get("attention_head_dim", 128))
  hw = 2 * (head // 6)
  d["rope_dim"] = [head - 2 * hw, hw, hw]  # Wan's t/h/w split of the head dimension
  return HeliosTransformerConfig.from_dict(d, source=path)


def load_wan(folder: str, dtype: Any) -> tuple[HeliosTransformerConfig, dict]:
  """Wan2.1-T2V weights in the Helios layout with stems from the pretrained patch_embedding."""
  config = read_wan_config(folder)
  _, abstract = tr.TRANSFORMER_SPEC.abstract(config, jnp.dtype(dtype))
  without = {k: v for k, v in abstract.items() if k != "memory"}
  plan = checkpoint.ConversionPlan(checkpoint.SafetensorsFolder(folder), without,
                                   tr.TRANSFORMER_SPEC.key_map(config),
                                   stacked_len=config.num_layers)
  flat = {p: plan.load_leaf(p) for p in plan.leaf_paths()}
  return config, _with_memory_init(checkpoint.unflatten_tree(flat), config)


def build_base(cfg: BaseModelConfig) -> tuple[HeliosTransformerConfig, nnx.GraphDef, dict]:
  """(model config, graphdef of the training module, host parameter dict)."""
  spec = cfg.spec()
  if cfg.init_from:
    if not os.path.isdir(cfg.init_from):
      raise checkpoint.CheckpointError(f"init_from folder not found: {cfg.init_from}")
    if cfg.init_format == "wan":
      config, params = load_wan(cfg.init_from, cfg.dtype)
    else:
      config, module = checkpoint.load_model(spec, cfg.init_from, cfg.dtype,
                                             device=jax.devices("cpu")[0])
      params = _to_host(nnx.to_pure_dict(nnx.state(module)))
  else:
    config = HeliosTransformerConfig.from_preset(cfg.preset).replace(**dict(cfg.overrides))
    module = spec.init(config, cfg.dtype, cfg.seed)
    params = _to_host(nnx.to_pure_dict(nnx.state(module)))
    if cfg.init_memory_from_patch_embedding and config.has_multi_term_memory_patch:
      params = _with_memory_init(params, config)
  graphdef, _ = spec.abstract(config, cfg.dtype)
  return config, graphdef, params
