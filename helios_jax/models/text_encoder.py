"""umT5 text encoder (transformers `UMT5EncoderModel`) in Flax NNX, with checkpoint loading."""

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

from helios_jax import checkpoint
from helios_jax.config import ConfigError, JsonConfig

# Precision policy, as data: parameter-name patterns kept in float32 under a low-precision load.
# Empty: transformers 5.x applies UMT5's `_keep_in_fp32_modules = ["wo"]` only to float16 loads,
# so a bfloat16 load (the pipeline's) has every weight, `wo` included, in bfloat16 (spec §7).
FP32_PARAM_PATTERNS: tuple[str, ...] = ()

# Parameter dtypes this port reproduces (float16 would need transformers' fp16-only `wo` and
# clamping paths, which the Helios pipelines never use).
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class UMT5Config(JsonConfig):
  """transformers `UMT5Config` as written to `text_encoder/config.json`.

  Fields are the model keys transformers writes (defaults: google/umt5-xxl, the Helios text
  encoder, spec architecture.md §7). `dense_act_fn`, `is_gated_act`, `scale_decoder_outputs` and
  `tie_word_embeddings` are derived by transformers from other keys; they are accepted and
  checked for consistency. `scalable_attention` appears in google/umt5-* configs and is ignored
  by transformers (every UMT5 layer has its own relative bias). Decoder-only keys are kept so
  the file round-trips; the encoder does not use them.
  """

  # Generic `PreTrainedConfig` bookkeeping written into every transformers config file.
  IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({
      "architectures", "dtype", "torch_dtype", "transformers_version", "model_type",
      "output_past", "tokenizer_class", "name_or_path", "return_dict", "output_hidden_states",
      "output_attentions", "chunk_size_feed_forward", "id2label", "label2id", "num_labels",
      "problem_type", "bos_token_id", "sep_token_id", "add_cross_attention",
      "tie_encoder_decoder", "prefix", "task_specific_params", "finetuning_task", "torchscript",
      "pruned_heads", "gradient_checkpointing",
  })
  MODEL_TYPE: ClassVar[str] = "umt5"

  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_decoder_layers: int | None = None
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  initializer_factor: float = 1.0
  feed_forward_proj: str = "gated-gelu"
  is_encoder_decoder: bool = True
  use_cache: bool = True
  pad_token_id: int | None = 0
  eos_token_id: int | tuple[int, ...] | None = 1
  decoder_start_token_id: int | None = 0
  classifier_dropout: float = 0.0
  is_decoder: bool = False
  # Derived by transformers from `feed_forward_proj` / forced; accepted when consistent.
  dense_act_fn: str | None = None
  is_gated_act: bool | None = None
  scale_decoder_outputs: bool | None = None
  tie_word_embeddings: bool | None = None
  scalable_attention: bool | None = None

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_max_distance"):
      if int(getattr(self, name)) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
      raise ConfigError(f"relative_attention_num_buckets must be an even int >= 4, got "
                        f"{self.relative_attention_num_buckets}")
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
      raise ConfigError(
          f"relative_attention_max_distance={self.relative_attention_max_distance} must exceed "
          f"relative_attention_num_buckets // 4 = {self.relative_attention_num_buckets // 4} "
          "(the exact-bucket range)")
    if self.feed_forward_proj != "gated-gelu":
      raise ConfigError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported; the "
                        "umT5 port implements 'gated-gelu' (gelu_new) only")
    if self.dense_act_fn not in (None, "gelu_new"):
      raise ConfigError(f"dense_act_fn={self.dense_act_fn!r} contradicts feed_forward_proj="
                        f"{self.feed_forward_proj!r} (transformers derives 'gelu_new')")
    if self.is_gated_act is False:
      raise ConfigError(f"is_gated_act={self.is_gated_act} contradicts feed_forward_proj="
                        f"{self.feed_forward_proj!r}")
    if self.is_decoder:
      raise ConfigError(f"is_decoder={self.is_decoder}: a causal UMT5 stack is not a text encoder")
    if not self.layer_norm_epsilon > 0:
      raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>"):
    """Like `JsonConfig.from_dict`, and a `model_type` other than 'umt5' is an error."""
    if isinstance(d, Mapping) and d.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
      raise ConfigError(f"{source}: model_type={d['model_type']!r} is not {cls.MODEL_TYPE!r} "
                        "(T5 shares one relative bias across layers; this is the UMT5 port)")
    return super().from_dict(d, source=source)

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv


UMT5_PRESETS: dict[str, UMT5Config] = {
    # google/umt5-xxl encoder, the Helios / Wan 2.1 text encoder (5,680,910,336 parameters).
    "umt5-xxl": UMT5Config(num_decoder_layers=24),
    # A CPU-sized encoder: the text encoder of the tiny set (`helios_jax.variants.SIZES["tiny"]`;
    # d_model = the tiny DiT's text_dim, vocab_size covers the tiny pipeline's tokenizer).
    "tiny": UMT5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=32),
}
UMT5Config.PRESETS = UMT5_PRESETS


def _check_dtype(dtype: Any) -> jnp.dtype:
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  if dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype={dtype} is not supported; use one of "
                     f"{[str(d) for d in SUPPORTED_DTYPES]}")
  return dtype


def _precision(dtype: jnp.dtype):
  # Full fp32 matmuls in fp32 mode (no TF32 on GPU), as PyTorch's default.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 relative-position buckets, bit-identical to transformers'.

  Computed on the host (the sequence length is static), in float32 as PyTorch does.

  Args:
    query_len: number of query positions.
    key_len: number of key positions.
    num_buckets: `relative_attention_num_buckets` (half per sign).
    max_distance: `relative_attention_max_distance`.

  Returns:
    int32 array [query_len, key_len] of bucket ids in [0, num_buckets).
  """
  rel = np.arange(key_len, dtype=np.int64)[None, :] - np.arange(query_len, dtype=np.int64)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    log_ratio = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)))
    log_ratio = log_ratio * np.float32(half - max_exact)
  large = max_exact + np.where(is_small, 0, log_ratio).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class T5RMSNorm(nnx.Module):
  """T5 layer norm: no mean subtraction, no bias; variance in fp32.

  In low precision the normalized value is rounded to the weight dtype *before* the weight
  multiply (two roundings), as transformers' `UMT5LayerNorm`.
  """

  def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x):  # [B, L, D]
    scale = self.scale[...]
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    if scale.dtype != jnp.float32:
      y = y.astype(scale.dtype)
    return scale * y


def _dense(din: int, dout: int, std: float, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=dtype,
                    precision=_precision(dtype), kernel_init=nnx.initializers.normal(std),
                    rngs=rngs)


class UMT5SelfAttention(nnx.Module):
  """Bidirectional self-attention with this layer's own relative-position bias, no 1/sqrt(d)."""

  def __init__(self, config: UMT5Config, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    d, inner, f = config.d_model, config.inner_dim, config.initializer_factor
    self.num_heads, self.d_kv, self.dtype = config.num_heads, config.d_kv, dtype
    self.q = _dense(d, inner, f * (d * config.d_kv) ** -0.5, dtype, rngs)
    self.k = _dense(d, inner, f * d ** -0.5, dtype, rngs)
    self.v = _dense(d, inner, f * d ** -0.5, dtype, rngs)
    self.o = _dense(inner, d, f * inner ** -0.5, dtype, rngs)
    self.relative_attention_bias = nnx.Embed(
        config.relative_attention_num_buckets, config.num_heads, dtype=dtype, param_dtype=dtype,
        embedding_init=nnx.initializers.normal(f * d ** -0.5), rngs=rngs)

  def __call__(self, x, buckets, key_mask):
    """x [B, L, D], buckets [L, L] int32, key_mask [B, L] bool -> [B, L, D]."""
    b, l, _ = x.shape
    prec = _precision(self.dtype)
    q = self.q(x).reshape(b, l, self.num_heads, self.d_kv)
    k = self.k(x).reshape(b, l, self.num_heads, self.d_kv)
    v = self.v(x).reshape(b, l, self.num_heads, self.d_kv)
    scores = jnp.einsum("BLNH,BSNH->BNLS", q, k, precision=prec,
                        preferred_element_type=jnp.float32)
    bias_lsn = self.relative_attention_bias.embedding[...][buckets]
    scores = scores + jnp.transpose(bias_lsn, (2, 0, 1))[None].astype(jnp.float32)
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("BNLS,BSNH->BLNH", probs, v, precision=prec,
                     preferred_element_type=jnp.float32).astype(self.dtype)
    return self.o(out.reshape(b, l, self.num_heads * self.d_kv))


def gelu_new(x):
  """transformers' `NewGELUActivation` (tanh approximation), same operation order."""
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class UMT5GatedFFN(nnx.Module):
  """wo(gelu_new(wi_0 x) * wi_1 x)."""

  def __init__(self, config: UMT5Config, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    d, ff, f = config.d_model, config.d_ff, config.initializer_factor
    self.wi_0 = _dense(d, ff, f * d ** -0.5, dtype, rngs)
    self.wi_1 = _dense(d, ff, f * d ** -0.5, dtype, rngs)
    self.wo = _dense(ff, d, f * ff ** -0.5, dtype, rngs)

  def __call__(self, x):  # [B, L, D]
    return self.wo(gelu_new(self.wi_0(x)) * self.wi_1(x))


class UMT5Block(nnx.Module):
  """Pre-norm block: x += SelfAttn(Norm(x)); x += FFN(Norm(x))."""

  def __init__(self, config: UMT5Config, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    eps = config.layer_norm_epsilon
    self.self_attn_norm = T5RMSNorm(config.d_model, eps, dtype=dtype)
    self.self_attn = UMT5SelfAttention(config, dtype=dtype, rngs=rngs)
    self.ffn_norm = T5RMSNorm(config.d_model, eps, dtype=dtype)
    self.ffn = UMT5GatedFFN(config, dtype=dtype, rngs=rngs)

  def __call__(self, x, buckets, key_mask):
    """x [B, L, D], buckets [L, L], key_mask [B, L] -> [B, L, D]."""
    x = x + self.self_attn(self.self_attn_norm(x), buckets, key_mask)
    return x + self.ffn(self.ffn_norm(x))


class UMT5Encoder(nnx.Module):
  """The umT5 encoder stack; layers are stacked on a leading axis and run with `nnx.scan`."""

  def __init__(self, config: UMT5Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    dtype = _check_dtype(dtype)
    self.config, self.dtype = config, dtype
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.d_model, dtype=dtype, param_dtype=dtype,
        embedding_init=nnx.initializers.normal(config.initializer_factor), rngs=rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return UMT5Block(config, dtype=dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon, dtype=dtype)

  def __call__(self, input_ids, attention_mask):
    """Encodes token ids.

    Args:
      input_ids: [B, L] integer token ids in [0, vocab_size).
      attention_mask: [B, L] 1 for tokens, 0 for padding (padded keys are masked out; padded
        query rows are still computed, as in transformers).

    Returns:
      last_hidden_state [B, L, d_model] in the model dtype.
    """
    cfg = self.config
    _, l = input_ids.shape
    buckets = jnp.asarray(relative_position_buckets(
        l, l, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance))
    key_mask = attention_mask.astype(bool)
    x = self.embed_tokens.embedding[...][input_ids]  # no sqrt(d) scaling

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run_blocks(h, block):
      return block(h, buckets, key_mask)

    x = run_blocks(x, self.blocks)
    return self.final_norm(x)


@functools.partial(jax.jit, static_argnums=0)
def umt5_encode(graphdef: nnx.GraphDef, state: nnx.State, input_ids, attention_mask):
  """Jitted pure forward: (graphdef, params) + ids [B, L] + mask [B, L] -> [B, L, D]."""
  return nnx.merge(graphdef, state)(input_ids, attention_mask)


# ------------------------------------------------------------------------------------------
# Checkpoints.

_LAYER_RE = re.compile(r"^encoder\.block\.(\d+)\.layer\.([01])\.(.+)$")
_LAYER_KEYS = {
    ("0", "SelfAttention.q.weight"): ("self_attn", "q", "kernel"),
    ("0", "SelfAttention.k.weight"): ("self_attn", "k", "kernel"),
    ("0", "SelfAttention.v.weight"): ("self_attn", "v", "kernel"),
    ("0", "SelfAttention.o.weight"): ("self_attn", "o", "kernel"),
    ("0", "SelfAttention.relative_attention_bias.weight"):
        ("self_attn", "relative_attention_bias", "embedding"),
    ("0", "layer_norm.weight"): ("self_attn_norm", "scale"),
    ("1", "DenseReluDense.wi_0.weight"): ("ffn", "wi_0", "kernel"),
    ("1", "DenseReluDense.wi_1.weight"): ("ffn", "wi_1", "kernel"),
    ("1", "DenseReluDense.wo.weight"): ("ffn", "wo", "kernel"),
    ("1", "layer_norm.weight"): ("ffn_norm", "scale"),
}
_EMBED_PATH = ("embed_tokens", "embedding")


class TextEncoderSpec(checkpoint.ModelSpec):
  """transformers `UMT5EncoderModel` safetensors <-> `UMT5Encoder` parameters."""

  name = "text_encoder"
  config_cls = UMT5Config

  def build(self, config: UMT5Config, dtype: Any, seed: int = 0) -> UMT5Encoder:
    return UMT5Encoder(config, dtype=dtype, rngs=nnx.Rngs(seed))

  def stacked_len(self, config: UMT5Config) -> int:
    return config.num_layers

  def tied_keys(self, config: UMT5Config) -> Mapping[str, str]:
    del config
    return {"encoder.embed_tokens.weight": "shared.weight"}

  def key_map(self, config: UMT5Config) -> checkpoint.KeyMap:
    def key_map(key: str):
      unmapped = (("<not a UMT5 encoder parameter>", key), None)
      if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return _EMBED_PATH, None
      if key == "encoder.final_layer_norm.weight":
        return ("final_norm", "scale"), None
      m = _LAYER_RE.match(key)
      if m is None or (m.group(2), m.group(3)) not in _LAYER_KEYS:
        return unmapped
      layer = int(m.group(1))
      if layer >= config.num_layers:
        return unmapped
      return ("blocks",) + _LAYER_KEYS[(m.group(2), m.group(3))], layer
    return key_map


TEXT_ENCODER_SPEC = TextEncoderSpec()


class TextEncoder:
  """A loaded umT5 encoder: `(input_ids [B, L], attention_mask [B, L]) -> [B, L, D]`.

  Calls a jitted pure function of the parameters (`umt5_encode`). Two memory options for a
  pipeline that shares the accelerator with the 14B DiT:

  * `device=jax.devices("cpu")[0]`: parameters live on, and the encoder runs on, that device
    (e.g. the host CPU backend); the result stays there, and the caller moves it.
  * `release()`: deletes the parameter buffers now; the next call reloads them from `path`
    (the checkpoint folder: safetensors or our Orbax export). `lazy=True` defers the first load
    to the first call. So `encode_prompt(...)` then `release()` frees the ~11 GB (bf16) before
    the denoising loop.

  Args:
    path: text_encoder folder (`config.json` + safetensors, single or sharded, or Orbax).
    dtype: parameter/compute dtype, float32 (default) or bfloat16.
    device: a `jax.Device` for parameters and compute; None -> JAX's default device.
    lazy: if True, do not load until the first call.
  """

  def __init__(self, path: str | os.PathLike, dtype: Any = None, *, device: Any = None,
               lazy: bool = False):
    self.path = os.fspath(path)
    if not os.path.isdir(self.path):
      raise checkpoint.CheckpointError(f"text_encoder checkpoint folder not found: {self.path}")
    self.dtype = _check_dtype(dtype)
    self.device = device
    self.config: UMT5Config = TEXT_ENCODER_SPEC.read_config(self.path)
    self._graphdef: nnx.GraphDef | None = None
    self._state: nnx.State | None = None
    if not lazy:
      self.load()

  @property
  def loaded(self) -> bool:
    return self._state is not None

  def load(self) -> None:
    """Loads the parameters (no-op if loaded)."""
    if self.loaded:
      return
    _, model = checkpoint.load_model(TEXT_ENCODER_SPEC, self.path, self.dtype,
                                     device=self.device)
    self._graphdef, self._state = nnx.split(model)

  def release(self) -> None:
    """Frees the parameter buffers now; the next call reloads them from `self.path`."""
    if self._state is None:
      return
    for leaf in jax.tree.leaves(self._state):
      if isinstance(leaf, jax.Array) and not leaf.is_deleted():
        leaf.delete()
    self._state = None

  @property
  def graphdef(self) -> nnx.GraphDef:
    self.load()
    return self._graphdef

  @property
  def params(self) -> nnx.State:
    self.load()
    return self._state

  def __call__(self, input_ids, attention_mask) -> jax.Array:
    """Encodes a batch.

    Args:
      input_ids: [B, L] integer token ids in [0, vocab_size).
      attention_mask: [B, L] of 0/1 (or bool); 0 marks padding.

    Returns:
      last_hidden_state [B, L, d_model] in `self.dtype`, on `self.device` if set.
    """
    ids, mask = validate_inputs(input_ids, attention_mask, self.config.vocab_size)
    self.load()
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    if self.device is not None:
      ids, mask = jax.device_put(ids, self.device), jax.device_put(mask, self.device)
    return umt5_encode(self._graphdef, self._state, ids, mask)


def validate_inputs(input_ids, attention_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Host-side checks of encoder inputs; returns them as numpy arrays.

  Args:
    input_ids: [B, L] integer ids.
    attention_mask: [B, L] of 0/1 or bool.
    vocab_size: ids must lie in [0, vocab_size).

  Returns:
    (ids [B, L] int64, mask [B, L] int64).
  """
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
  if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
    raise ValueError(f"input_ids must be [B, L] with B, L >= 1, got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
    raise TypeError(f"attention_mask must be integer or bool, got dtype {mask.dtype}")
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    raise ValueError(f"input_ids hold token id(s) {sorted(set(ids[bad].tolist()))[:10]} outside "
                     f"the vocabulary [0, {vocab_size})")
  if not np.isin(mask, (0, 1)).all():
    raise ValueError(f"attention_mask must hold only 0/1, got values "
                     f"{sorted(set(np.unique(mask).tolist()))[:10]}")
  return ids.astype(np.int64), mask.astype(np.int64)


def load_text_encoder(path: str | os.PathLike, dtype: Any = None, *, device: Any = None,
                      lazy: bool = False) -> TextEncoder:
  """Loads a umT5 text encoder (see `TextEncoder` for the arguments and memory options).

  Args:
    path: transformers `text_encoder/` folder (single or sharded safetensors, `shared.weight`
      and/or `encoder.embed_tokens.weight`) or our Orbax export of it.
    dtype: float32 (None) or bfloat16.
    device: optional `jax.Device` to hold the parameters and run on (e.g. the host CPU).
    lazy: defer loading to the first call.

  Returns:
    A callable `TextEncoder`.
  """
  return TextEncoder(path, dtype, device=device, lazy=lazy)
