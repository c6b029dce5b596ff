"""Wan 2.1 video VAE (diffusers `AutoencoderKLWan`) in Flax NNX: config, model, loader, API."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import checkpoint
from helios_jax.config import ConfigError, JsonConfig
from helios_jax.models.vae_layers import CausalConv3d, Decoder, Encoder, FeatCache

# Frames per encoder call after the first one (diffusers' `_encode` slices 1, then 4, 4, ...).
ENCODE_CHUNK = 4
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

_WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
    0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
    1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(JsonConfig):
  """`AutoencoderKLWan` hyper-parameters; field names are the diffusers `vae/config.json` keys.

  Defaults are the diffusers class defaults, which are the Wan 2.1 VAE (spec architecture.md
  §6). Wan 2.2 settings (`is_residual=True`, `patch_size`) are rejected. `dropout` is accepted
  but inactive (inference only). `scale_factor_spatial` / `scale_factor_temporal` are metadata
  for pipelines; the actual factors follow from `dim_mult` / `temperal_downsample`.
  """

  attn_scales: tuple[float, ...] = ()
  base_dim: int = 96
  decoder_base_dim: int | None = None
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  dropout: float = 0.0
  in_channels: int = 3
  is_residual: bool = False
  latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
  num_res_blocks: int = 2
  out_channels: int = 3
  patch_size: int | None = None
  scale_factor_spatial: int | None = 8
  scale_factor_temporal: int | None = 4
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  z_dim: int = 16

  def __post_init__(self):
    if self.is_residual:
      raise ConfigError("is_residual=True (the Wan 2.2 residual VAE) is not supported; "
                        "only the Wan 2.1 VAE is implemented")
    if self.patch_size is not None:
      raise ConfigError(f"patch_size={self.patch_size} (Wan 2.2 patchified VAE) is not supported;"
                        " only the Wan 2.1 VAE (patch_size=None) is implemented")
    for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
      if int(getattr(self, name)) < 1:
        raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
    if self.decoder_base_dim is not None and int(self.decoder_base_dim) < 1:
      raise ConfigError(f"decoder_base_dim={self.decoder_base_dim} must be >= 1 or null")
    if not self.dim_mult or any(int(m) < 1 for m in self.dim_mult):
      raise ConfigError(f"dim_mult={list(self.dim_mult)} must be a non-empty list of ints >= 1")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ConfigError(
          f"temperal_downsample={list(self.temperal_downsample)} must have "
          f"len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries")
    if sum(bool(t) for t in self.temperal_downsample) > 2:
      raise ConfigError(
          f"temperal_downsample={list(self.temperal_downsample)} downsamples time more than 4x; "
          f"the causal encoder consumes {ENCODE_CHUNK}-frame chunks, so at most 2 entries may be "
          "true")
    attn_levels = [2.0 ** -i for i in range(len(self.dim_mult))]
    used = sorted(s for s in self.attn_scales if float(s) in attn_levels)
    if used:
      raise ConfigError(
          f"attn_scales={list(self.attn_scales)} would add encoder attention blocks at scale(s) "
          f"{used}, which the reference (diffusers/Wan) cannot run with its feature cache; "
          "not supported")
    if len(self.latents_mean) != len(self.latents_std):
      raise ConfigError(f"len(latents_mean)={len(self.latents_mean)} != "
                        f"len(latents_std)={len(self.latents_std)}")

  @property
  def decoder_dim(self) -> int:
    return int(self.decoder_base_dim or self.base_dim)

  @property
  def spatial_factor(self) -> int:
    """Pixel/latent size ratio in H and W (8 for Wan 2.1)."""
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def temporal_factor(self) -> int:
    """Pixel frames per latent frame after the first (4 for Wan 2.1)."""
    return 2 ** sum(bool(t) for t in self.temperal_downsample)

  def num_latent_frames(self, num_frames: int) -> int:
    """Latent frames for `num_frames` = 1 + 4k pixel frames."""
    return 1 + (num_frames - 1) // ENCODE_CHUNK * (ENCODE_CHUNK // self.temporal_factor)

  def num_pixel_frames(self, num_latent_frames: int) -> int:
    """Pixel frames decoded from `num_latent_frames` latents."""
    return 1 + self.temporal_factor * (num_latent_frames - 1)


VAE_PRESETS: dict[str, WanVAEConfig] = {
    # The Wan 2.1 VAE shipped under Helios' `vae/` (126,892,531 parameters).
    "wan2.1": WanVAEConfig(),
    # A CPU-sized VAE with the same block structure (8x spatial, 4x temporal) and the released
    # 16 latent channels: the VAE of the tiny set (`helios_jax.variants.SIZES["tiny"]`).
    "tiny": WanVAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}
WanVAEConfig.PRESETS = VAE_PRESETS


class WanVAEModel(nnx.Module):
  """`AutoencoderKLWan` parameter tree (names mirror the diffusers state dict) + causal passes.

  Everything inside is channels-last: video [B, T, H, W, C], latents [B, T, h, w, z].
  """

  def __init__(self, config: WanVAEConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    z = config.z_dim
    td = tuple(bool(t) for t in config.temperal_downsample)
    self.encoder = Encoder(
        in_channels=config.in_channels, dim=config.base_dim, z_dim=2 * z,
        dim_mult=config.dim_mult, num_res_blocks=config.num_res_blocks,
        temperal_downsample=td, dtype=dtype, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * z, 2 * z, 1, dtype=dtype, rngs=rngs)
    self.post_quant_conv = CausalConv3d(z, z, 1, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(
        dim=config.decoder_dim, z_dim=z, dim_mult=config.dim_mult,
        num_res_blocks=config.num_res_blocks, temperal_upsample=td[::-1],
        out_channels=config.out_channels, dtype=dtype, rngs=rngs)

  def encode_moments(self, video: jax.Array) -> jax.Array:
    """Causal chunked encode (frame 0, then 4-frame slices under `lax.scan`).

    Args:
      video: [B, T, H, W, C_in] with T = 1 + 4k, already in the compute dtype.

    Returns:
      [B, T_lat, H/s, W/s, 2 * z_dim]: quant_conv output (mean | logvar, logvar unclamped).
    """
    b, t, h, w, c = video.shape
    first, caches = self._encode_call(video[:, :1], None)
    outs = [first]
    if t > 1:
      k = (t - 1) // ENCODE_CHUNK
      chunks = video[:, 1:].reshape(b, k, ENCODE_CHUNK, h, w, c)

      def step(carry, chunk):  # chunk [B, 4, H, W, C]
        y, carry = self._encode_call(chunk, carry)
        return carry, y

      _, ys = jax.lax.scan(step, caches, jnp.moveaxis(chunks, 1, 0))  # [k, B, n, h, w, 2z]
      ys = jnp.moveaxis(ys, 0, 1)
      outs.append(ys.reshape((b, ys.shape[1] * ys.shape[2]) + ys.shape[3:]))
    enc = jnp.concatenate(outs, axis=1)
    return self.quant_conv.valid(enc)

  def _encode_call(self, x: jax.Array, caches: list[jax.Array] | None):
    cache = FeatCache(caches)
    y = self.encoder(x, cache)
    return y, cache.done()

  def decode_frames(self, latents: jax.Array, caches: list[jax.Array] | None = None):
    """Causal decode, one latent frame per decoder call (`lax.scan` after the first call).

    Args:
      latents: [B, T_lat, h, w, z_dim] in the compute dtype (not normalized).
      caches: the feature caches returned by a previous call to continue a sequence, or None
        to start one (its first latent frame gets the first-call special cases).

    Returns:
      (frames [B, T_out, h*s, w*s, C_out] clamped to [-1, 1], caches for the next call). T_out is
      1 + r*(T_lat - 1) when starting a sequence, r*T_lat when continuing (r: temporal factor).
    """
    x = self.post_quant_conv.valid(latents)
    outs = []
    if caches is None:
      first, caches = self._decode_call(x[:, :1], None)
      outs.append(first)
      x = x[:, 1:]
    if x.shape[1]:
      def step(carry, frame):  # frame [B, h, w, z]
        y, carry = self._decode_call(frame[:, None], carry)
        return carry, y

      caches, ys = jax.lax.scan(step, caches, jnp.moveaxis(x, 1, 0))  # [n, B, r, H, W, C]
      ys = jnp.moveaxis(ys, 0, 1)
      outs.append(ys.reshape((ys.shape[0], ys.shape[1] * ys.shape[2]) + ys.shape[3:]))
    frames = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return jnp.clip(frames, -1.0, 1.0), caches

  def _decode_call(self, x: jax.Array, caches: list[jax.Array] | None):
    cache = FeatCache(caches)
    y = self.decoder(x, cache)
    return y, cache.done()


# ------------------------------------------------------------------------------------------
# Pure functions (channel-first public layout) and input validation.


def _shape_str(x: Any) -> str:
  return str(tuple(int(d) for d in np.shape(x)))


def _check_video(config: WanVAEConfig, video: Any) -> None:
  shape = np.shape(video)
  if len(shape) != 5:
    raise ValueError(f"video shape {_shape_str(video)} must be 5-D [B, C, T, H, W]")
  _, c, t, h, w = shape
  if c != config.in_channels:
    raise ValueError(f"video shape {_shape_str(video)}: channels={c}, expected "
                     f"{config.in_channels} ([B, C, T, H, W], channel-first)")
  if t < 1 or (t - 1) % ENCODE_CHUNK:
    raise ValueError(f"video shape {_shape_str(video)}: num_frames={t} must be 1 + "
                     f"{ENCODE_CHUNK}k")
  s = config.spatial_factor
  if h < s or w < s or h % s or w % s:
    raise ValueError(f"video shape {_shape_str(video)}: height={h} and width={w} must be "
                     f"positive multiples of {s}")


def _check_latents(config: WanVAEConfig, latents: Any) -> None:
  shape = np.shape(latents)
  if len(shape) != 5:
    raise ValueError(f"latents shape {_shape_str(latents)} must be 5-D [B, z, T, h, w]")
  _, c, t, h, w = shape
  if c != config.z_dim:
    raise ValueError(f"latents shape {_shape_str(latents)}: channels={c}, expected "
                     f"z_dim={config.z_dim} ([B, z, T, h, w], channel-first)")
  if t < 1 or h < 1 or w < 1:
    raise ValueError(f"latents shape {_shape_str(latents)} has an empty T/h/w axis")


def _to_channels_last(x: jax.Array, dtype: Any) -> jax.Array:
  return jnp.moveaxis(jnp.asarray(x, dtype), 1, -1)  # [B, C, T, H, W] -> [B, T, H, W, C]


def _to_channels_first(x: jax.Array) -> jax.Array:
  return jnp.moveaxis(x, -1, 1)  # [B, T, H, W, C] -> [B, C, T, H, W]


def encode_moments(graphdef: nnx.GraphDef, params: nnx.State, video: jax.Array):
  """Posterior moments of a video (pure function of the parameters; jit it).

  Args:
    graphdef: from `nnx.split(model)`.
    params: the model state from `nnx.split(model)`.
    video: [B, C_in, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of the spatial factor.

  Returns:
    (mean, logvar), each [B, z, T_lat, H/s, W/s]; logvar clamped to [-30, 20].
  """
  model = nnx.merge(graphdef, params)
  _check_video(model.config, video)
  moments = model.encode_moments(_to_channels_last(video, model.dtype))
  mean, logvar = jnp.split(_to_channels_first(moments), 2, axis=1)
  return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def decode_latents(graphdef: nnx.GraphDef, params: nnx.State, latents: jax.Array) -> jax.Array:
  """Decodes un-normalized latents (pure function of the parameters; jit it).

  Args:
    graphdef: from `nnx.split(model)`.
    params: the model state from `nnx.split(model)`.
    latents: [B, z, T_lat, h, w].

  Returns:
    video [B, C_out, 1 + r*(T_lat - 1), h*s, w*s] clamped to [-1, 1].
  """
  model = nnx.merge(graphdef, params)
  _check_latents(model.config, latents)
  frames, _ = model.decode_frames(_to_channels_last(latents, model.dtype))
  return _to_channels_first(frames)


def _decode_chunk(graphdef, params, latents, caches):
  """`decode_latents` that also takes/returns the causal caches (None: start a sequence)."""
  model = nnx.merge(graphdef, params)
  _check_latents(model.config, latents)
  frames, caches = model.decode_frames(_to_channels_last(latents, model.dtype), caches)
  return _to_channels_first(frames), caches


def sample_posterior(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
  """Diagonal-Gaussian sample mean + exp(0.5 * logvar) * noise (all [B, z, T, h, w])."""
  return mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype)


# Jitted with the graphdef static, so VAEs with the same config share compiled programs. One
# program per input shape serves encode/encode_fn (moments) and decode/decode_fn/decode_stream
# (frames + caches); inside another jit the unused outputs are dropped.
_encode_moments_jit = jax.jit(encode_moments, static_argnums=0)
_decode_chunk_jit = jax.jit(_decode_chunk, static_argnums=0)
_sample_jit = jax.jit(sample_posterior)


def _bind_encode_fn(graphdef):
  def encode_fn(params: nnx.State, video: jax.Array) -> jax.Array:
    """Posterior mean [B, z, T_lat, H/s, W/s] of video [B, C_in, T, H, W] (jitted)."""
    return _encode_moments_jit(graphdef, params, video)[0]
  return encode_fn


def _bind_decode_fn(graphdef):
  def decode_fn(params: nnx.State, latents: jax.Array) -> jax.Array:
    """Video [B, C_out, T, H, W] in [-1, 1] from latents [B, z, T_lat, h, w] (jitted)."""
    return _decode_chunk_jit(graphdef, params, latents, None)[0]
  return decode_fn


# ------------------------------------------------------------------------------------------
# User-facing object, loader and checkpoint spec.


class WanVAE:
  """A loaded Wan VAE: channel-first encode/decode on numpy or jax arrays.

  Attributes:
    config: the `WanVAEConfig`.
    graphdef, params: `nnx.split` of the model (params is an `nnx.State` pytree).
    dtype: parameter and compute dtype.
    encode_fn(params, video) -> mean latents; jitted pure function for use in jitted code.
    encode_moments_fn(params, video) -> (mean, logvar); jitted.
    decode_fn(params, latents) -> video; jitted.
    latents_mean: [1, z, 1, 1, 1] float32; latents_inv_std: [1, z, 1, 1, 1] float32 (1 / std).
  """

  def __init__(self, config: WanVAEConfig, model: WanVAEModel):
    self.config = config
    self.dtype = model.dtype
    self.graphdef, self.params = nnx.split(model)
    self.encode_moments_fn = functools.partial(_encode_moments_jit, self.graphdef)
    self.encode_fn = _bind_encode_fn(self.graphdef)
    self.decode_fn = _bind_decode_fn(self.graphdef)
    # Like the pipelines: fp32 mean and fp32 1/std, shaped [1, z, 1, 1, 1].
    self.latents_mean = jnp.asarray(
        np.asarray(config.latents_mean, np.float32).reshape(1, -1, 1, 1, 1))
    self.latents_inv_std = jnp.asarray(
        (np.float32(1.0) / np.asarray(config.latents_std, np.float32)).reshape(1, -1, 1, 1, 1))

  @property
  def model(self) -> WanVAEModel:
    return nnx.merge(self.graphdef, self.params)

  def encode(self, video: Any, *, sample: bool = False, rng: jax.Array | None = None,
             noise: Any = None) -> jax.Array:
    """Encodes a video to (un-normalized) latents.

    Args:
      video: [B, C_in, T, H, W] in [-1, 1] (numpy or jax), T = 1 + 4k.
      sample: False -> the posterior mean (diffusers `latent_dist.mean`); True -> a posterior
        sample mean + exp(logvar / 2) * eps.
      rng: PRNG key for eps (sample=True, noise None).
      noise: eps [B, z, T_lat, H/s, W/s] to use instead of `rng` (e.g. torch's draws).

    Returns:
      [B, z, T_lat, H/s, W/s].
    """
    if not sample and (rng is not None or noise is not None):
      raise ValueError("rng/noise given but sample=False")
    mean, logvar = self.encode_moments_fn(self.params, video)
    if not sample:
      return mean
    if noise is None:
      if rng is None:
        raise ValueError("encode(sample=True) needs rng= or noise=")
      noise = jax.random.normal(rng, mean.shape, mean.dtype)
    elif tuple(np.shape(noise)) != tuple(mean.shape):
      raise ValueError(f"noise shape {_shape_str(noise)} must equal the latent shape "
                       f"{tuple(mean.shape)}")
    return _sample_jit(mean, logvar, jnp.asarray(noise))

  def decode(self, latents: Any) -> jax.Array:
    """Decodes un-normalized latents [B, z, T_lat, h, w] to video [B, C_out, T, H, W] in [-1, 1]."""
    return self.decode_fn(self.params, latents)

  def decode_stream(self, latents: Any, chunk: int = 1) -> Iterator[jax.Array]:
    """Decodes `chunk` latent frames at a time, carrying the causal caches between pieces.

    Args:
      latents: [B, z, T_lat, h, w] un-normalized.
      chunk: latent frames per piece (>= 1).

    Yields:
      video pieces [B, C_out, n, H, W]: 1 + r*(chunk - 1) frames first, then r*chunk (the last
      piece may be shorter); their concatenation along T equals `decode(latents)`.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
      raise ValueError(f"chunk={chunk!r} must be an int >= 1")
    _check_latents(self.config, latents)
    latents = jnp.asarray(latents)
    caches = None
    for start in range(0, latents.shape[2], int(chunk)):
      piece = latents[:, :, start:start + chunk]
      frames, caches = _decode_chunk_jit(self.graphdef, self.params, piece, caches)
      yield frames

  def _check_norm_input(self, z: Any) -> None:
    n = self.latents_mean.shape[1]
    if np.ndim(z) != 5 or np.shape(z)[1] != n:
      raise ValueError(f"latents shape {_shape_str(z)} must be [B, {n}, T, h, w] "
                       f"(config latents_mean/latents_std have {n} channels)")

  def normalize(self, z: Any) -> jax.Array:
    """(z - mean) * (1 / std), per channel, as the pipelines compute it. z: [B, z, T, h, w]."""
    self._check_norm_input(z)
    return (jnp.asarray(z) - self.latents_mean) * self.latents_inv_std

  def denormalize(self, z: Any) -> jax.Array:
    """z / (1 / std) + mean, the inverse used before decoding. z: [B, z, T, h, w]."""
    self._check_norm_input(z)
    return jnp.asarray(z) / self.latents_inv_std + self.latents_mean


class WanVAESpec(checkpoint.ModelSpec):
  """Checkpoint glue for `AutoencoderKLWan` (`vae/` folder)."""

  name = "vae"
  config_cls = WanVAEConfig

  def build(self, config: WanVAEConfig, dtype: Any, seed: int = 0) -> WanVAEModel:
    # Precision policy: every parameter (and the compute) in `dtype`; pipelines use float32.
    return WanVAEModel(config, dtype=dtype, rngs=nnx.Rngs(seed))

  def key_map(self, config: WanVAEConfig) -> checkpoint.KeyMap:
    del config  # the Flax tree mirrors the diffusers names

    def mapping(key: str):
      parts = key.split(".")
      if len(parts) >= 3 and parts[-3] == "resample" and parts[-2] == "1":
        parts = parts[:-2] + parts[-1:]  # nn.Sequential(ZeroPad2d/Upsample, Conv2d)[1]
      if parts[-1] == "weight":
        parts[-1] = "kernel"
      return tuple(parts), None

    return mapping


VAE_SPEC = WanVAESpec()


def load_vae(path: str | os.PathLike, dtype: Any = None, *, device: Any = None) -> WanVAE:
  """Loads a diffusers `vae/` folder (safetensors) or our Orbax export of it.

  Args:
    path: folder with `config.json` and `*.safetensors` or `params/`.
    dtype: parameter and compute dtype (default float32, which the pipelines use).
    device: `jax.Device` for the parameters (default: JAX's default device). Parameters are
      always committed to it, so both checkpoint formats hit the same compiled programs.

  Returns:
    a `WanVAE`.
  """
  device = jax.devices()[0] if device is None else device
  config, model = checkpoint.load_model(VAE_SPEC, path, dtype, device=device)
  return WanVAE(config, model)


def init_vae(config: WanVAEConfig, dtype: Any = None, seed: int = 0) -> WanVAE:
  """A randomly initialized VAE (PyTorch default init), e.g. for benchmarks."""
  dtype = jnp.float32 if dtype is None else dtype
  return WanVAE(config, VAE_SPEC.init(config, jnp.dtype(dtype), seed))
