"""Flax NNX port of the CLIP ViT vision tower (+ projection) and the LAION aesthetic head.

The vision tower matches transformers' `CLIPVisionModelWithProjection` (the OpenAI CLIP
ViT-L/14 image encoder that upstream's Aesthetic metric runs): patch conv without bias, class
token, learned positions, `pre_layrnorm`, N pre-LN blocks (quick-GELU MLP), `post_layernorm` of
the class token, bias-free projection. Blocks are stacked on a leading axis and run with
`nnx.scan`. Images enter as NHWC float32 already normalised with the CLIP mean/std.

Weights load from a transformers folder (`CLIPVisionModelWithProjection` or a full `CLIPModel`
such as openai/clip-vit-large-patch14), from our Orbax export, or from OpenAI's `ViT-L-14.pt`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import checkpoint as ckpt_lib
from helios_jax.config import ConfigError, JsonConfig

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST

# Keys that transformers writes into (nested) config files without describing the model.
_TRANSFORMERS_GENERIC_KEYS = frozenset({
    "architectures", "dtype", "torch_dtype", "model_type", "transformers_version",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class",
    "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "dropout",
})

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(JsonConfig):
  """transformers `CLIPVisionConfig` keys; defaults are OpenAI CLIP ViT-L/14 (224 px)."""

  IGNORED_KEYS: ClassVar[frozenset[str]] = _TRANSFORMERS_GENERIC_KEYS

  hidden_size: int = 1024
  intermediate_size: int = 4096
  projection_dim: int = 768
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  initializer_factor: float = 1.0

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by "
                        f"num_attention_heads={self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ConfigError(f"image_size={self.image_size} is not a multiple of "
                        f"patch_size={self.patch_size}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ConfigError(
          f"hidden_act={self.hidden_act!r} not supported; known {sorted(_ACTIVATIONS)}")
    for name in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                 "num_channels"):
      if int(getattr(self, name)) < 1:
        raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_any_json(cls, path: str | os.PathLike) -> "ClipVisionConfig":
    """Reads a `CLIPVisionConfig` file, or the `vision_config` of a full `CLIPConfig` file."""
    d, path = cls.read_json(path)
    if isinstance(d, dict) and "vision_config" in d:
      vision = dict(d["vision_config"] or {})
      if "projection_dim" in d:
        vision["projection_dim"] = d["projection_dim"]
      return cls.from_dict(vision, source=f"{path}[vision_config]")
    return cls.from_dict(d, source=path)


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


CLIP_PRESETS = {
    "vit-l-14": ClipVisionConfig(),
    "tiny": ClipVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=16,
                             num_hidden_layers=2, num_attention_heads=4, image_size=32,
                             patch_size=8),
}


class Linear(nnx.Module):
  """`y = x @ kernel + bias`, kernel [in, out], fp32 accumulation at full precision."""

  def __init__(self, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs,
               use_bias: bool = True):
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out] fp32
    k = self.kernel[...]
    y = jnp.dot(x.astype(k.dtype), k, precision=HIGHEST, preferred_element_type=F32)
    if self.bias is not None:
      y = y + self.bias[...].astype(F32)
    return y


class LayerNorm(nnx.Module):
  """torch `nn.LayerNorm` (biased variance), computed in fp32."""

  def __init__(self, dim: int, eps: float, *, dtype):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(F32) + \
        self.bias[...].astype(F32)


class Attention(nnx.Module):
  """Multi-head self-attention with separate q/k/v/out projections (CLIP layout)."""

  def __init__(self, config: ClipVisionConfig, *, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    self.q_proj = Linear(d, d, dtype=dtype, rngs=rngs)
    self.k_proj = Linear(d, d, dtype=dtype, rngs=rngs)
    self.v_proj = Linear(d, d, dtype=dtype, rngs=rngs)
    self.out_proj = Linear(d, d, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, self.head_dim)
    q = split(self.q_proj(x)) * (self.head_dim ** -0.5)
    k, v = split(self.k_proj(x)), split(self.v_proj(x))
    logits = jnp.einsum("blnh,bsnh->bnls", q, k, precision=HIGHEST)
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    out = jnp.einsum("bnls,bsnh->blnh", probs, v, precision=HIGHEST).reshape(b, l, -1)
    return self.out_proj(out)


class Mlp(nnx.Module):

  def __init__(self, config: ClipVisionConfig, *, dtype, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[config.hidden_act]
    self.fc1 = Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class PatchEmbedding(nnx.Module):
  """Bias-free stride-P patch conv; kernel stored [P, P, C, D] (torch Conv2d [D, C, P, P])."""

  def __init__(self, patch: int, channels: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (patch, patch, channels, dim), dtype))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, config: ClipVisionConfig, *, dtype, rngs: nnx.Rngs):
    eps = config.layer_norm_eps
    self.layer_norm1 = LayerNorm(config.hidden_size, eps, dtype=dtype)
    self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(config.hidden_size, eps, dtype=dtype)
    self.mlp = Mlp(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] fp32
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class ClipVisionModel(nnx.Module):
  """CLIP image encoder + projection (transformers `CLIPVisionModelWithProjection`)."""

  def __init__(self, config: ClipVisionConfig, *, dtype=F32, rngs: nnx.Rngs):
    self.config = config
    d, p, c = config.hidden_size, config.patch_size, config.num_channels
    init = nnx.initializers.normal(0.02)
    self.class_embedding = nnx.Param(init(rngs.params(), (d,), dtype))
    self.patch_embedding = PatchEmbedding(p, c, d, dtype=dtype, rngs=rngs)
    self.position_embedding = nnx.Param(init(rngs.params(), (config.num_patches + 1, d), dtype))
    self.pre_layernorm = LayerNorm(d, config.layer_norm_eps, dtype=dtype)

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(r):
      return EncoderLayer(config, dtype=dtype, rngs=r)

    self.layers = make_layers(rngs)
    self.post_layernorm = LayerNorm(d, config.layer_norm_eps, dtype=dtype)
    self.visual_projection = Linear(d, config.projection_dim, dtype=dtype, rngs=rngs,
                                    use_bias=False)

  def embed(self, pixels: jax.Array) -> jax.Array:
    """# [B, H, W, C] normalised pixels -> # [B, 1 + (H/P)(W/P), D] tokens (fp32)."""
    cfg = self.config
    b, h, w, c = pixels.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"pixels shape {pixels.shape} must be [B, {cfg.image_size}, "
                       f"{cfg.image_size}, {cfg.num_channels}]")
    p = cfg.patch_size
    gh, gw = h // p, w // p
    patches = pixels.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p * p * c)
    kernel = self.patch_embedding.kernel[...]
    tokens = jnp.dot(patches.astype(kernel.dtype), kernel.reshape(p * p * c, -1),
                     precision=HIGHEST, preferred_element_type=F32)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(F32), (b, 1, tokens.shape[-1]))
    x = jnp.concatenate([cls, tokens], axis=1)
    return x + self.position_embedding[...].astype(F32)[None]

  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes images.

    Args:
      pixels: # [B, H, W, C] float, CLIP-normalised.

    Returns:
      (image_embeds # [B, projection_dim], last_hidden_state # [B, L, D]), fp32.
    """
    x = self.pre_layernorm(self.embed(pixels))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(h, layer):
      return layer(h)

    x = run(x, self.layers)
    pooled = self.post_layernorm(x[:, 0])
    return self.visual_projection(pooled), x


# ------------------------------------------------------------------------------------------
# LAION aesthetic head.


@dataclasses.dataclass(frozen=True)
class AestheticHeadConfig:
  """LAION aesthetic predictor shape: `input_dim -> hidden_dims... -> 1`, no activations.

  `hidden_dims=()` is the linear head `sa_0_4_vit_l_14_linear.pth` (768 -> 1) that upstream
  uses; `(1024, 128, 64, 16)` is the improved-aesthetic-predictor MLP (whose dropouts are
  inactive at inference and which has no nonlinearity).
  """

  input_dim: int = 768
  hidden_dims: tuple[int, ...] = ()

  def __post_init__(self):
    if self.input_dim < 1 or any(int(h) < 1 for h in self.hidden_dims):
      raise ConfigError(f"bad aesthetic head sizes {self.input_dim} -> {self.hidden_dims} -> 1")

  @property
  def dims(self) -> tuple[int, ...]:
    return (self.input_dim,) + tuple(self.hidden_dims) + (1,)


class AestheticHead(nnx.Module):
  """Stack of Linear layers `dense0 ... denseK` (no activation), output [..., 1]."""

  def __init__(self, config: AestheticHeadConfig, *, dtype=F32, rngs: nnx.Rngs):
    self.config = config
    self.num_layers = len(config.dims) - 1
    for i, (a, b) in enumerate(zip(config.dims[:-1], config.dims[1:])):
      setattr(self, f"dense{i}", Linear(a, b, dtype=dtype, rngs=rngs))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., input_dim] -> [..., 1]
    for i in range(self.num_layers):
      x = getattr(self, f"dense{i}")(x)
    return x


# ------------------------------------------------------------------------------------------
# Checkpoints.


class ClipVisionSpec(ckpt_lib.ModelSpec):
  """transformers CLIP (vision tower + projection) <-> `ClipVisionModel`."""

  name = "clip_vision"
  config_cls = ClipVisionConfig

  def read_config(self, folder: str) -> ClipVisionConfig:
    return ClipVisionConfig.from_any_json(folder)

  def build(self, config: ClipVisionConfig, dtype: Any = F32, seed: int = 0) -> ClipVisionModel:
    return ClipVisionModel(config, dtype=dtype, rngs=nnx.Rngs(seed))

  def stacked_len(self, config: ClipVisionConfig) -> int:
    return config.num_hidden_layers

  def key_map(self, config: ClipVisionConfig) -> ckpt_lib.KeyMap:
    del config
    fixed = {
        "vision_model.embeddings.class_embedding": ("class_embedding",),
        "vision_model.embeddings.patch_embedding.weight": ("patch_embedding", "kernel"),
        "vision_model.embeddings.position_embedding.weight": ("position_embedding",),
        "vision_model.pre_layrnorm.weight": ("pre_layernorm", "weight"),
        "vision_model.pre_layrnorm.bias": ("pre_layernorm", "bias"),
        "vision_model.post_layernorm.weight": ("post_layernorm", "weight"),
        "vision_model.post_layernorm.bias": ("post_layernorm", "bias"),
        "visual_projection.weight": ("visual_projection", "kernel"),
    }
    layer_re = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")

    def key_map(key: str):
      if key in fixed:
        return fixed[key], None
      m = layer_re.match(key)
      if m:
        leaf = m.group(3)
        if leaf == "weight" and not m.group(2).startswith("layer_norm"):
          leaf = "kernel"
        return ("layers",) + tuple(m.group(2).split(".")) + (leaf,), int(m.group(1))
      # Text tower, logit scale, position ids of full CLIPModel checkpoints: not ours.
      if key.startswith(("text_model.", "text_projection.", "logit_scale")) or \
          key.endswith("position_ids"):
        return None
      return ("<unmapped>", key), None

    return key_map


class _TensorDict:
  """In-memory tensor source with the `SafetensorsFolder` interface `ConversionPlan` reads."""

  def __init__(self, tensors: Mapping[str, np.ndarray], folder: str):
    self._t = dict(tensors)
    self.folder = folder

  def keys(self):
    return list(self._t)

  def get(self, key: str) -> np.ndarray:
    if key not in self._t:
      raise ckpt_lib.CheckpointError(f"{self.folder}: tensor {key!r} not found")
    return self._t[key]


def _load_from_tensors(spec: ckpt_lib.ModelSpec, config: Any, tensors: Mapping[str, np.ndarray],
                       source: str, dtype: Any):
  """Builds `spec`'s module from an in-memory state dict (PyTorch names and layouts)."""
  dtype = jnp.dtype(F32 if dtype is None else dtype)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: spec.build(config, dtype)))
  flat = ckpt_lib.flatten_tree(nnx.to_pure_dict(abstract_state))
  plan = ckpt_lib.ConversionPlan(_TensorDict(tensors, source), ckpt_lib.unflatten_tree(flat),
                                 spec.key_map(config), stacked_len=spec.stacked_len(config))
  params = ckpt_lib.unflatten_tree(
      {p: jnp.asarray(plan.load_leaf(p, flat[p].dtype)) for p in flat})
  nnx.replace_by_pure_dict(abstract_state, params)
  return nnx.merge(graphdef, abstract_state)


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a TorchScript archive or a pickled state dict as {name: float32 numpy}."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    sd = torch.jit.load(path, map_location="cpu").state_dict()
  except (RuntimeError, ValueError):
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ckpt_lib.CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise ckpt_lib.CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
  return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in sd.items()
          if hasattr(v, "detach")}


def openai_to_transformers(sd: Mapping[str, np.ndarray], num_heads: int | None = None
                           ) -> tuple[ClipVisionConfig, dict[str, np.ndarray]]:
  """Renames an OpenAI CLIP state dict (`visual.*`) to transformers' vision keys.

  Args:
    sd: OpenAI names (`visual.conv1.weight`, `visual.transformer.resblocks.{i}.attn.in_proj_weight`,
      `visual.proj`, ...); other keys (text tower) are ignored.
    num_heads: attention heads; OpenAI's rule `width // 64` when None.

  Returns:
    (config inferred from the shapes, tensors under transformers names and layouts).
  """
  if "visual.conv1.weight" not in sd:
    raise ckpt_lib.CheckpointError("not an OpenAI CLIP checkpoint: 'visual.conv1.weight' missing")
  width, _, patch, _ = sd["visual.conv1.weight"].shape
  grid = int(round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1)))
  layers = sorted({int(m.group(1)) for k in sd
                   if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))})
  heads = num_heads if num_heads is not None else width // 64
  config = ClipVisionConfig(
      hidden_size=int(width),
      intermediate_size=int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
      projection_dim=int(sd["visual.proj"].shape[1]), num_hidden_layers=len(layers),
      num_attention_heads=int(heads), image_size=int(grid * patch), patch_size=int(patch))
  out = {
      "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
      "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
      "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
      "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
      "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
      "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
      "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
      "visual_projection.weight": np.ascontiguousarray(sd["visual.proj"].T),
  }
  names = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
           "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
  for i in layers:
    src, dst = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
    for kind in ("weight", "bias"):
      qkv = np.split(sd[f"{src}attn.in_proj_{kind}"], 3, axis=0)
      for name, t in zip(("q_proj", "k_proj", "v_proj"), qkv):
        out[f"{dst}self_attn.{name}.{kind}"] = t
      for a, b in names.items():
        out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
  return config, out


def load_clip_vision(path: str | os.PathLike, dtype: Any = None, *, num_heads: int | None = None
                     ) -> tuple[ClipVisionConfig, ClipVisionModel]:
  """Loads the CLIP vision tower from any supported format.

  Args:
    path: a transformers folder (`config.json` + safetensors), our Orbax export folder, or an
      OpenAI CLIP file (`ViT-L-14.pt` TorchScript archive or a plain state dict `.pt/.pth`).
    dtype: parameter dtype (None -> float32).
    num_heads: attention heads for OpenAI files (default `width // 64`, OpenAI's rule).

  Returns:
    (config, module).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return ckpt_lib.load_model(ClipVisionSpec(), path, dtype)
  if not os.path.isfile(path):
    raise ckpt_lib.CheckpointError(f"CLIP checkpoint not found: {path}")
  config, tensors = openai_to_transformers(_torch_state_dict(path), num_heads)
  return config, _load_from_tensors(ClipVisionSpec(), config, tensors, path, dtype)


class AestheticHeadSpec(ckpt_lib.ModelSpec):
  """LAION head state dict (`weight`/`bias` or `layers.{0,2,4,6,7}.*`) <-> `AestheticHead`."""

  name = "aesthetic_head"

  def build(self, config: AestheticHeadConfig, dtype: Any = F32, seed: int = 0) -> AestheticHead:
    return AestheticHead(config, dtype=dtype, rngs=nnx.Rngs(seed))

  def key_map(self, config: AestheticHeadConfig) -> ckpt_lib.KeyMap:
    def key_map(key: str):
      if key in ("weight", "bias"):
        if config.hidden_dims:
          return ("<unmapped>", key), None
        return ("dense0", "kernel" if key == "weight" else "bias"), None
      m = re.match(r"^layers\.(\d+)\.(weight|bias)$", key)
      if m:
        order = _mlp_layer_order(int(m.group(1)))
        return (f"dense{order}", "kernel" if m.group(2) == "weight" else "bias"), None
      return ("<unmapped>", key), None
    return key_map


def _mlp_layer_order(torch_index: int) -> int:
  # improved-aesthetic-predictor: Linear at 0, 2, 4, 6, 7 (dropouts at 1, 3, 5).
  order = {0: 0, 2: 1, 4: 2, 6: 3, 7: 4}
  if torch_index not in order:
    raise ckpt_lib.CheckpointError(f"aesthetic MLP layer index {torch_index} is not a Linear")
  return order[torch_index]


def head_config_from_tensors(tensors: Mapping[str, np.ndarray]) -> AestheticHeadConfig:
  """Infers the head's sizes from its weight shapes."""
  if "weight" in tensors:
    w = tensors["weight"]
    if w.ndim != 2 or w.shape[0] != 1:
      raise ckpt_lib.CheckpointError(
          f"linear aesthetic head weight has shape {w.shape}, want [1, D]")
    return AestheticHeadConfig(int(w.shape[1]), ())
  idx = sorted(int(m.group(1)) for k in tensors if (m := re.match(r"^layers\.(\d+)\.weight$", k)))
  if not idx:
    raise ckpt_lib.CheckpointError(
        f"unrecognised aesthetic head keys {sorted(tensors)[:6]}; want 'weight'/'bias' or "
        "'layers.N.weight'")
  shapes = [tensors[f"layers.{i}.weight"].shape for i in idx]
  if shapes[-1][0] != 1:
    raise ckpt_lib.CheckpointError(f"aesthetic head must end in 1 output, got {shapes[-1]}")
  return AestheticHeadConfig(int(shapes[0][1]), tuple(int(s[0]) for s in shapes[:-1]))


def load_aesthetic_head(path: str | os.PathLike, dtype: Any = None
                        ) -> tuple[AestheticHeadConfig, AestheticHead]:
  """Loads a LAION aesthetic head from `.pth/.pt` (torch state dict), `.safetensors` or `.npz`.

  Returns:
    (config inferred from the shapes, module).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ckpt_lib.CheckpointError(f"aesthetic head file not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      tensors = {k: v.astype(np.float32) for k, v in load_file(path).items()}
    except Exception as e:  # pylint: disable=broad-except
      raise ckpt_lib.CheckpointError(f"{path}: unreadable safetensors ({e})") from e
  elif path.endswith(".npz"):
    with np.load(path) as z:
      tensors = {k: z[k].astype(np.float32) for k in z.files}
  else:
    tensors = _torch_state_dict(path)
  config = head_config_from_tensors(tensors)
  return config, _load_from_tensors(AestheticHeadSpec(), config, tensors, path, dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def encode_images(graphdef: nnx.GraphDef, state: nnx.State, pixels: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Pure jitted `ClipVisionModel` forward: # [B, S, S, C] -> (# [B, P] embeds, # [B, L, D])."""
  return nnx.merge(graphdef, state)(pixels)


@functools.partial(jax.jit, static_argnums=(0, 2))
def aesthetic_scores(clip_graphdef: nnx.GraphDef, clip_state: nnx.State,
                     head_graphdef: nnx.GraphDef, head_state: nnx.State,
                     pixels: jax.Array) -> jax.Array:
  """LAION aesthetic score of CLIP-normalised images (raw head output, ~1-10).

  Args:
    clip_graphdef: `nnx.split(clip_model)[0]`.
    clip_state: `nnx.split(clip_model)[1]`.
    head_graphdef: `nnx.split(head)[0]`.
    head_state: `nnx.split(head)[1]`.
    pixels: # [B, S, S, C] float32, CLIP-normalised.

  Returns:
    # [B] float32: head(l2_normalise(CLIP image embedding)).
  """
  embeds, _ = nnx.merge(clip_graphdef, clip_state)(pixels)
  norm = jnp.sqrt(jnp.sum(embeds * embeds, axis=-1, keepdims=True))
  feats = embeds / jnp.maximum(norm, 1e-12)
  return nnx.merge(head_graphdef, head_state)(feats)[..., 0]
