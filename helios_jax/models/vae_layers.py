"""Wan 2.1 VAE building blocks (Flax NNX, channels-last) with the causal per-frame feature cache."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Frames of the previous call kept by every temporal 3x3x3 causal conv (diffusers' CACHE_T).
CACHE_T = 2
_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _tuple3(v: int | Sequence[int]) -> tuple[int, int, int]:
  if isinstance(v, int):
    return (v, v, v)
  v = tuple(int(i) for i in v)
  if len(v) != 3:
    raise ValueError(f"expected an int or 3 ints, got {v}")
  return v  # type: ignore[return-value]


def _torch_default_init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype: Any):
  """PyTorch's default Conv init (kaiming-uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(dtype)


class FeatCache:
  """Per-call feature caches of the causal convs, visited in a fixed module order.

  `prev` is the list written by the previous call (None on the first call, where every slot
  reads as zeros / "not yet seen"). Modules call `take()` to read their slot and `put()` to
  write the slot for the next call, in the same order, so `new` is the next call's `prev`.
  """

  def __init__(self, prev: Sequence[jax.Array] | None):
    self._prev = None if prev is None else list(prev)
    self._i = 0
    self.new: list[jax.Array] = []

  @property
  def first(self) -> bool:
    """True on the first call of a sequence (no cache yet)."""
    return self._prev is None

  def take(self) -> jax.Array | None:
    """Returns this slot's cached frames from the previous call (None on the first call)."""
    if self._prev is None:
      self._i += 1
      return None
    if self._i >= len(self._prev):
      raise RuntimeError(f"feature cache has {len(self._prev)} slots; slot {self._i} requested")
    out = self._prev[self._i]
    self._i += 1
    return out

  def put(self, frames: jax.Array) -> None:
    """Stores this slot's frames for the next call."""
    self.new.append(frames)

  def done(self) -> list[jax.Array]:
    """Checks that every slot was read and written once; returns the next call's caches."""
    if self._prev is not None and self._i != len(self._prev):
      raise RuntimeError(f"feature cache has {len(self._prev)} slots but {self._i} were read")
    if len(self.new) != self._i:
      raise RuntimeError(f"feature cache: {self._i} slots read but {len(self.new)} written")
    return self.new


class CausalConv3d(nnx.Module):
  """Conv3d with causal time padding (2*p_t frames in front, none behind) and zero spatial pad.

  Params: `kernel` [kt, kh, kw, in, out] (PyTorch [out, in, kt, kh, kw]) and `bias` [out].
  """

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int | Sequence[int], *,
               stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    k = _tuple3(kernel_size)
    self.kernel_size = k
    self.stride = _tuple3(stride)
    self.padding = _tuple3(padding)
    self.context_len = 2 * self.padding[0]
    if self.context_len not in (0, CACHE_T):
      raise ValueError(f"causal conv time padding {self.padding[0]} is not 0 or {CACHE_T // 2}")
    fan_in = in_dim * k[0] * k[1] * k[2]
    self.kernel = nnx.Param(_torch_default_init(rngs, k + (in_dim, out_dim), fan_in, dtype))
    self.bias = nnx.Param(_torch_default_init(rngs, (out_dim,), fan_in, dtype))

  def valid(self, x: jax.Array) -> jax.Array:
    """Convolves `x` whose time context is already prepended (no time padding).

    Args:
      x: [B, T, H, W, C_in].

    Returns:
      [B, T', H', W', C_out].
    """
    _, ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(x.dtype), window_strides=self.stride,
        padding=((0, 0), (ph, ph), (pw, pw)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + self.bias[...].astype(y.dtype)

  def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
    """Cached causal conv: prepends the slot's last frames (zeros on the first call).

    Args:
      x: [B, T, H, W, C_in] frames of the current call.
      cache: the call's feature cache (convs without time padding do not use a slot).

    Returns:
      [B, T', H', W', C_out].
    """
    if not self.context_len:
      return self.valid(x)
    ctx = cache.take()
    if ctx is None:
      b, _, h, w, c = x.shape
      ctx = jnp.zeros((b, self.context_len, h, w, c), x.dtype)
    ext = jnp.concatenate([ctx.astype(x.dtype), x], axis=1)
    cache.put(ext[:, -CACHE_T:])
    return self.valid(ext)


class Conv2d(nnx.Module):
  """Per-image 2-D conv with explicit (top, bottom), (left, right) zero padding.

  Params: `kernel` [kh, kw, in, out] (PyTorch [out, in, kh, kw]) and `bias` [out].
  """

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int, *, stride: int = 1,
               padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.stride = (stride, stride)
    self.padding = tuple(tuple(p) for p in padding)
    fan_in = in_dim * kernel_size * kernel_size
    self.kernel = nnx.Param(
        _torch_default_init(rngs, (kernel_size, kernel_size, in_dim, out_dim), fan_in, dtype))
    self.bias = nnx.Param(_torch_default_init(rngs, (out_dim,), fan_in, dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [N, H, W, C_in]. Returns [N, H', W', C_out]."""
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(x.dtype), window_strides=self.stride, padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(y.dtype)


class RMSNorm(nnx.Module):
  """Wan RMS_norm: L2-normalize over channels (eps 1e-12), times sqrt(C), times gamma [C]."""

  def __init__(self, dim: int, *, dtype: Any = jnp.float32):
    self.scale = dim ** 0.5
    self.gamma = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [..., C]. Returns [..., C] in x.dtype (bf16/fp16 normalized in fp32)."""
    xf = x.astype(jnp.float32) if x.dtype in _LOW_PRECISION else x
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
    normalized = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
    return normalized * self.scale * self.gamma[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
  """RMS_norm -> SiLU -> causal conv 3^3 -> RMS_norm -> SiLU -> causal conv 3^3, plus shortcut.

  Dropout is inference-inactive (the reference runs in eval mode) and therefore omitted.
  """

  def __init__(self, in_dim: int, out_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(in_dim, dtype=dtype)
    self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, dtype=dtype, rngs=rngs)
    self.norm2 = RMSNorm(out_dim, dtype=dtype)
    self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, dtype=dtype, rngs=rngs)
    if in_dim != out_dim:
      self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, dtype=dtype, rngs=rngs)
    else:
      self.conv_shortcut = None

  def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
    """Args: x [B, T, H, W, C_in]. Returns [B, T, H, W, C_out]."""
    h = x if self.conv_shortcut is None else self.conv_shortcut.valid(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), cache)
    x = self.conv2(jax.nn.silu(self.norm2(x)), cache)
    return x + h


class AttentionBlock(nnx.Module):
  """Per-frame single-head self-attention over the H*W positions (no cache), with residual."""

  def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, dtype=dtype)
    self.to_qkv = Conv2d(dim, 3 * dim, 1, dtype=dtype, rngs=rngs)
    self.proj = Conv2d(dim, dim, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Args: x [B, T, H, W, C]. Returns [B, T, H, W, C]."""
    b, t, h, w, c = x.shape
    y = self.norm(x.reshape(b * t, h, w, c))
    qkv = self.to_qkv(y).reshape(b * t, h * w, 3 * c)  # channels ordered [q | k | v]
    q, k, v = jnp.split(qkv, 3, axis=-1)  # [N, L, C] each
    scores = jnp.einsum("NLC,NSC->NLS", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * (1.0 / math.sqrt(c)), axis=-1).astype(v.dtype)
    out = jnp.einsum("NLS,NSC->NLC", probs, v).astype(x.dtype)
    out = self.proj(out.reshape(b * t, h, w, c)).reshape(b, t, h, w, c)
    return out + x


class Resample(nnx.Module):
  """Spatial 2x down/up-sampling, optionally with the causal time conv (downsample3d/upsample3d).

  * downsample: ZeroPad2d(right 1, bottom 1) + Conv2d 3x3 stride 2 per frame; `downsample3d`
    then runs `time_conv` (3,1,1) stride 2 on [last cached frame, frames] (skipped on the
    first call, which caches the downsampled frame).
  * upsample: `upsample3d` first runs `time_conv` (3,1,1) to 2*dim channels and interleaves the
    halves in time (skipped on the first call), then nearest 2x + Conv2d 3x3 to dim/2 per frame.
  """

  MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

  def __init__(self, dim: int, mode: str, *, dtype: Any, rngs: nnx.Rngs):
    if mode not in self.MODES:
      raise ValueError(f"resample mode={mode!r} must be one of {self.MODES}")
    self.mode = mode
    time_conv = None
    if mode.startswith("upsample"):
      self.resample = Conv2d(dim, dim // 2, 3, padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
      if mode == "upsample3d":
        time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), dtype=dtype,
                                 rngs=rngs)
    else:
      self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype,
                             rngs=rngs)
      if mode == "downsample3d":
        time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), dtype=dtype, rngs=rngs)
    self.time_conv = time_conv

  def _per_frame(self, x: jax.Array) -> jax.Array:
    """Args: x [B, T, H, W, C]. Returns [B, T, H', W', C']."""
    b, t, h, w, c = x.shape
    y = x.reshape(b * t, h, w, c)
    if self.mode.startswith("upsample"):
      y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)  # nearest(-exact) 2x
    y = self.resample(y)
    return y.reshape((b, t) + y.shape[1:])

  def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
    """Args: x [B, T, H, W, C]. Returns the resampled frames [B, T', H', W', C']."""
    if self.mode == "upsample3d":
      if cache.first:
        # The reference marks the slot "Rep" and skips the time conv; the next call then
        # time-convolves with zero padding, i.e. with an all-zero cache.
        cache.take()
        b, _, h, w, c = x.shape
        cache.put(jnp.zeros((b, CACHE_T, h, w, c), x.dtype))
      else:
        y = self.time_conv(x, cache)  # [B, T, H, W, 2C]
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2)
        x = jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c2 // 2)  # frame 2i: A(i), 2i+1: B(i)
    x = self._per_frame(x)
    if self.mode == "downsample3d":
      prev = cache.take()
      cache.put(x[:, -1:])
      if prev is not None:
        x = self.time_conv.valid(jnp.concatenate([prev[:, -1:].astype(x.dtype), x], axis=1))
    return x


class MidBlock(nnx.Module):
  """ResidualBlock, then (AttentionBlock, ResidualBlock), all at width `dim`."""

  def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
    """Args: x [B, T, H, W, C]. Returns [B, T, H, W, C]."""
    x = self.resnets[0](x, cache)
    for attn, resnet in zip(self.attentions, list(self.resnets)[1:]):
      x = resnet(attn(x), cache)
    return x


class Encoder(nnx.Module):
  """Wan 2.1 encoder: conv_in, flat `down_blocks` list, mid block, RMS_norm, SiLU, conv_out."""

  def __init__(self, *, in_channels: int, dim: int, z_dim: int, dim_mult: Sequence[int],
               num_res_blocks: int, temperal_downsample: Sequence[bool], dtype: Any,
               rngs: nnx.Rngs):
    dims = [dim * u for u in (1,) + tuple(dim_mult)]
    self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
    blocks: list[nnx.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(num_res_blocks):
        blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
        in_dim = out_dim
      if i != len(dim_mult) - 1:
        mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
        blocks.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], dtype=dtype, rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], dtype=dtype)
    self.conv_out = CausalConv3d(dims[-1], z_dim, 3, padding=1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
    """One causal chunk.

    Args:
      x: [B, T, H, W, C_in] (T = 1 on the first call, 4 afterwards).
      cache: the call's feature cache.

    Returns:
      [B, T / temporal_factor (1 on the first call), H / s, W / s, z_dim].
    """
    x = self.conv_in(x, cache)
    for block in self.down_blocks:
      x = block(x, cache)
    x = self.mid_block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class UpBlock(nnx.Module):
  """num_res_blocks + 1 ResidualBlocks, then an optional upsampler (`upsamplers[0]`)."""

  def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None,
               *, dtype: Any, rngs: nnx.Rngs):
    resnets = []
    for _ in range(num_res_blocks + 1):
      resnets.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
      in_dim = out_dim
    self.resnets = nnx.List(resnets)
    if upsample_mode is None:
      self.upsamplers = None
    else:
      self.upsamplers = nnx.List([Resample(out_dim, upsample_mode, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
    """Args: x [B, T, H, W, C_in]. Returns [B, T', H', W', C_out']."""
    for resnet in self.resnets:
      x = resnet(x, cache)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, cache)
    return x


class Decoder(nnx.Module):
  """Wan 2.1 decoder: conv_in, mid block, `up_blocks`, RMS_norm, SiLU, conv_out."""

  def __init__(self, *, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
               temperal_upsample: Sequence[bool], out_channels: int, dtype: Any,
               rngs: nnx.Rngs):
    dim_mult = tuple(dim_mult)
    dims = [dim * u for u in (dim_mult[-1],) + dim_mult[::-1]]
    self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(dims[0], dtype=dtype, rngs=rngs)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        in_dim = in_dim // 2  # the previous upsampler halves the width
      mode = None
      if i != len(dim_mult) - 1:
        mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
      blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, mode, dtype=dtype, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], dtype=dtype)
    self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
    """One latent frame.

    Args:
      x: [B, 1, h, w, z_dim].
      cache: the call's feature cache.

    Returns:
      [B, 1 (first call) or temporal_factor, h * s, w * s, out_channels].
    """
    x = self.conv_in(x, cache)
    x = self.mid_block(x, cache)
    for block in self.up_blocks:
      x = block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)
