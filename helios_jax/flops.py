"""FLOP model of a Helios chunk: DiT forwards (spec architecture.md §8) and the Wan VAE decode.

Counts are dense FLOPs with 2 per multiply-add, the convention of the spec and of
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention products only;
norms, activations, RoPE and softmax are not counted). Per DiT block, with N noisy tokens,
S = N + H tokens in all (H history tokens), L text tokens, width D and FFN width F:

  self-attention projections 8SD^2, self-attention core 4S^2 D, cross-attention q/o 4ND^2,
  cross-attention k/v 4LD^2, cross-attention core 4NLD, FFN 4SDF

(cross-attention runs on the noisy tokens only with `guidance_cross_attn`, on all S otherwise),
plus the small terms outside the blocks (patch embeddings, text projection, time MLPs, output
projection). `chunk_flops` sums the forwards of one 33-frame chunk for a sampler config (pyramid
stages, steps, CFG batch doubling, the DMD-amplified first chunk); `vae_decode_flops` follows
the Wan 2.1 decoder's convolution shapes, one causal decoder call per latent frame.

  from helios_jax import flops
  cfg = HeliosTransformerConfig.from_preset("helios-14b")
  flops.model_chunk_flops(cfg, "distilled").blocks / 1e12     # ~1,097 TFLOP per chunk
  flops.vae_decode_flops(WanVAEConfig(), 9, 48, 80).total     # ~69.26e12
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from helios_jax import sampling
from helios_jax import variants
from helios_jax.config import HeliosTransformerConfig
from helios_jax.models import memory
from helios_jax.text import MAX_SEQUENCE_LENGTH

# Text tokens per prompt in the pipelines (umT5 `max_sequence_length`, 512).
TEXT_LEN = MAX_SEQUENCE_LENGTH
# H100 SXM dense bf16 tensor-core peak, and the measured bf16 matmul rate (spec architecture.md
# §8 / issue "[H100 speed]"), in TFLOP/s: the two MFU denominators of the benchmark.
H100_PEAK_TFLOPS = 989.0
H100_MATMUL_TFLOPS = 800.0


def _positive(name: str, value: int) -> int:
  if isinstance(value, bool) or int(value) != value or int(value) < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")
  return int(value)


def _grid(n: int, pad: int, patch: int) -> int:
  """Tokens along one axis: replicate-pad `n` to a multiple of `pad`, then patchify."""
  return (-(-n // pad) * pad) // patch


@dataclasses.dataclass(frozen=True)
class TokenCounts:
  """Tokens of one DiT forward: the noisy window and the three history groups."""

  noisy: int
  short: int = 0
  mid: int = 0
  long: int = 0

  @property
  def history(self) -> int:
    return self.short + self.mid + self.long

  @property
  def total(self) -> int:
    return self.noisy + self.history


def dit_tokens(config: HeliosTransformerConfig, latent_height: int, latent_width: int, *,
               latent_frames: int = sampling.CHUNK_LATENT_FRAMES,
               history: bool = True) -> TokenCounts:
  """Token counts of a single-resolution forward (noisy window and history at one latent size).

  Args:
    config: the DiT config (patch size, memory patches).
    latent_height, latent_width: the latent size.
    latent_frames: noisy latent frames (9 per chunk).
    history: include the sampler's history groups (sampling.md §3.1).

  Returns:
    The `TokenCounts` (see `stage_tokens` for pyramid stages).
  """
  return stage_tokens(config, (latent_height, latent_width), (latent_height, latent_width),
                      latent_frames=latent_frames, history=history)


def stage_tokens(config: HeliosTransformerConfig, noisy_size: tuple[int, int],
                 history_size: tuple[int, int], *,
                 latent_frames: int = sampling.CHUNK_LATENT_FRAMES,
                 history: bool = True) -> TokenCounts:
  """Token counts of one forward whose noisy window and history have different latent sizes.

  In a pyramid stage the noisy window is downsampled while the history stays at the full
  latent resolution, so the history tokens are the same for every stage.

  Args:
    config: the DiT config.
    noisy_size: (h, w) latent size of the noisy window.
    history_size: (h, w) latent size of the history latents (the full resolution).
    latent_frames: noisy latent frames.
    history: include the history groups (False: a plain text-to-video forward).

  Returns:
    The `TokenCounts`.
  """
  pt, ph, pw = (int(p) for p in config.patch_size)
  h, w = (_positive("latent height", noisy_size[0]), _positive("latent width", noisy_size[1]))
  t = _positive("latent_frames", latent_frames)
  noisy = (t // pt) * (h // ph) * (w // pw)
  if noisy < 1:
    raise ValueError(f"noisy latent {t}x{h}x{w} is smaller than patch_size {config.patch_size}")
  if not history or not config.has_multi_term_memory_patch:
    return TokenCounts(noisy=noisy)
  hh, hw = (_positive("history height", history_size[0]),
            _positive("history width", history_size[1]))
  n_long, n_mid, n_one = sampling.HISTORY_SIZES
  short = ((1 + n_one) // pt) * (hh // ph) * (hw // pw)  # [anchor, newest], patch 1x
  mt, mh, mw = memory.MID_LATENT_PAD
  mid = (_grid(n_mid, mt, 2 * pt) * _grid(hh, mh, 2 * ph) * _grid(hw, mw, 2 * pw))
  lt, lh, lw = memory.LONG_LATENT_PAD
  long_ = (_grid(n_long, lt, 4 * pt) * _grid(hh, lh, 4 * ph) * _grid(hw, lw, 4 * pw))
  return TokenCounts(noisy=noisy, short=short, mid=mid, long=long_)


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
  """FLOPs of one DiT forward, by term (all layers summed; batch included)."""

  attn1_proj: int
  attn1_core: int
  attn2_qo: int
  attn2_kv: int
  attn2_core: int
  ffn: int
  patch_embed: int
  text_proj: int
  time_mlp: int
  proj_out: int

  @property
  def blocks(self) -> int:
    """The transformer blocks: the spec's per-forward total."""
    return (self.attn1_proj + self.attn1_core + self.attn2_qo + self.attn2_kv + self.attn2_core
            + self.ffn)

  @property
  def small(self) -> int:
    """Everything outside the blocks (~0.1 TFLOP at 14B)."""
    return self.patch_embed + self.text_proj + self.time_mlp + self.proj_out

  @property
  def total(self) -> int:
    return self.blocks + self.small

  def scaled(self, factor: int) -> "ForwardFlops":
    return ForwardFlops(**{f.name: getattr(self, f.name) * factor
                           for f in dataclasses.fields(self)})

  def __add__(self, other: "ForwardFlops") -> "ForwardFlops":
    return ForwardFlops(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                           for f in dataclasses.fields(self)})


def dit_forward_flops(config: HeliosTransformerConfig, tokens: TokenCounts, *,
                      text_len: int = TEXT_LEN, batch: int = 1) -> ForwardFlops:
  """FLOPs of one DiT forward (spec architecture.md §8 per-block terms, plus small terms).

  Args:
    config: the DiT config.
    tokens: the forward's token counts (`stage_tokens`).
    text_len: text tokens L (512 in the pipelines).
    batch: batch size (2 for a CFG forward of one video).

  Returns:
    `ForwardFlops`; `.blocks` is the spec's figure, `.total` adds the small terms.
  """
  text_len = _positive("text_len", text_len)
  batch = _positive("batch", batch)
  d, f, layers = config.inner_dim, int(config.ffn_dim), int(config.num_layers)
  s, n, l = tokens.total, tokens.noisy, text_len
  q = n if config.guidance_cross_attn else s  # tokens that cross-attend to the text
  patch_in = int(config.in_channels) * math.prod(config.patch_size)
  # The t = 0 modulation for history tokens is one extra (batch-1) pass of the time MLPs.
  timesteps = batch + (1 if config.zero_history_timestep else 0)
  per_step = config.freq_dim * d + d * d + d * 6 * d
  out = ForwardFlops(
      attn1_proj=layers * 8 * s * d * d,
      attn1_core=layers * 4 * s * s * d,
      attn2_qo=layers * 4 * q * d * d,
      attn2_kv=layers * 4 * l * d * d,
      attn2_core=layers * 4 * q * l * d,
      ffn=layers * 4 * s * d * f,
      patch_embed=2 * d * patch_in * (tokens.noisy + tokens.short + 8 * tokens.mid
                                      + 64 * tokens.long),
      text_proj=2 * l * (int(config.text_dim) * d + d * d),
      time_mlp=0,
      proj_out=2 * n * d * config.out_dim * math.prod(config.patch_size),
  )
  out = out.scaled(batch)
  return dataclasses.replace(out, time_mlp=2 * timesteps * per_step)


@dataclasses.dataclass(frozen=True)
class StageFlops:
  """One pyramid stage (or the single Base stage) of a chunk."""

  latent_size: tuple[int, int]
  calls: int              # transformer forwards (a CFG pair is one batch-2 forward)
  batch: int
  tokens: TokenCounts
  forward: ForwardFlops   # one forward, batch included

  @property
  def total(self) -> int:
    return self.calls * self.forward.total

  @property
  def blocks(self) -> int:
    return self.calls * self.forward.blocks


@dataclasses.dataclass(frozen=True)
class ChunkFlops:
  """FLOPs of all DiT forwards of one 33-frame chunk."""

  stages: tuple[StageFlops, ...]

  @property
  def total(self) -> int:
    return sum(s.total for s in self.stages)

  @property
  def blocks(self) -> int:
    """The spec's accounting (transformer blocks only)."""
    return sum(s.blocks for s in self.stages)

  @property
  def calls(self) -> int:
    return sum(s.calls for s in self.stages)


def chunk_flops(config: HeliosTransformerConfig, stage_sizes: Sequence[tuple[int, int]],
                steps: Sequence[int], *, guidance: bool,
                history_size: tuple[int, int] | None = None,
                latent_frames: int = sampling.CHUNK_LATENT_FRAMES, text_len: int = TEXT_LEN,
                batch: int = 1, history: bool = True) -> ChunkFlops:
  """FLOPs of one chunk from explicit stage sizes and step counts.

  Args:
    config: the DiT config.
    stage_sizes: (h, w) noisy latent size per stage, coarse to fine.
    steps: transformer steps per stage (already doubled for an amplified first chunk).
    guidance: CFG on (every forward runs the conditional and unconditional batch).
    history_size: full-resolution latent (h, w) of the history (default: the last stage's).
    latent_frames: noisy latent frames per chunk.
    text_len: text tokens.
    batch: videos generated together.
    history: include the history tokens.

  Returns:
    `ChunkFlops`.
  """
  if len(stage_sizes) != len(steps) or not steps:
    raise ValueError(f"stage_sizes {list(stage_sizes)} and steps {list(steps)} must be "
                     "non-empty and of equal length")
  hist = tuple(stage_sizes[-1]) if history_size is None else tuple(history_size)
  b = _positive("batch", batch) * (2 if guidance else 1)
  out = []
  for size, n in zip(stage_sizes, steps):
    tok = stage_tokens(config, tuple(size), hist, latent_frames=latent_frames, history=history)
    out.append(StageFlops(latent_size=tuple(size), calls=_positive("steps", n), batch=b,
                          tokens=tok,
                          forward=dit_forward_flops(config, tok, text_len=text_len, batch=b)))
  return ChunkFlops(stages=tuple(out))


def sampler_chunk_flops(config: HeliosTransformerConfig, sc: sampling.SamplerConfig,
                        first_chunk: bool = False, *, text_len: int = TEXT_LEN,
                        batch: int = 1) -> ChunkFlops:
  """FLOPs of one chunk as `sampling.sample_chunk` runs it for the sampler config `sc`.

  Args:
    config: the DiT config.
    sc: the sampler config (stages, steps, guidance, amplification).
    first_chunk: chunk 0 (DMD amplification doubles every stage's steps).
    text_len: text tokens.
    batch: videos generated together.

  Returns:
    `ChunkFlops`.
  """
  mult = 2 if sc.amplified(first_chunk) else 1
  return chunk_flops(config, sc.stage_sizes(), [s * mult for s in sc.steps],
                     guidance=sc.guidance != "none",
                     history_size=(sc.latent_height, sc.latent_width), text_len=text_len,
                     batch=batch)


def model_sampler_config(model: str, height: int = 384, width: int = 640, *,
                         steps: Sequence[int] | None = None,
                         guidance_scale: float | None = None,
                         amplify_first_chunk: bool | None = None,
                         patch_size: tuple[int, int, int] = (1, 2, 2),
                         vae_scale: int = 8) -> sampling.SamplerConfig:
  """The sampler config of a released variant with its default schedule (`variants.VARIANTS`).

  Args:
    model: "base" | "mid" | "distilled".
    height, width: pixels.
    steps: override of the variant's default steps.
    guidance_scale: override of the variant's default; CFG is on when > 1.
    amplify_first_chunk: override of the variant's DMD first-chunk amplification default.
    patch_size: the DiT patch.
    vae_scale: pixels per latent (8).

  Returns:
    A `sampling.SamplerConfig` (the one `Pipeline.sampler_config` builds for that checkpoint).
  """
  from helios_jax import schedulers as hs  # pylint: disable=g-import-not-at-top
  v = variants.get_variant(model)
  for name, value in (("height", height), ("width", width)):
    if _positive(name, value) % vae_scale:
      raise ValueError(f"{name}={value} must be a multiple of vae_scale={vae_scale}")
  w = v.default_guidance_scale if guidance_scale is None else float(guidance_scale)
  return sampling.SamplerConfig(
      scheduler=v.scheduler_config, pyramid=v.pyramid,
      steps=tuple(int(s) for s in (v.default_steps if steps is None else steps)),
      guidance=hs.guidance_mode(v.flags, w, v.pyramid), guidance_scale=w,
      amplify_first_chunk=v.amplify_first_chunk if amplify_first_chunk is None
      else bool(amplify_first_chunk),
      latent_height=height // vae_scale, latent_width=width // vae_scale,
      patch_size=tuple(patch_size))


def model_chunk_flops(config: HeliosTransformerConfig, model: str, height: int = 384,
                      width: int = 640, *, first_chunk: bool = False,
                      steps: Sequence[int] | None = None, text_len: int = TEXT_LEN,
                      **kwargs) -> ChunkFlops:
  """Per-chunk DiT FLOPs of a released variant (Base / Mid / Distilled defaults).

  Args:
    config: the DiT config.
    model: "base" | "mid" | "distilled".
    height, width: pixels.
    first_chunk: chunk 0 (Distilled: amplified, 2x the steps).
    steps: override of the default steps.
    text_len: text tokens.
    **kwargs: forwarded to `model_sampler_config` (guidance_scale, amplify_first_chunk).

  Returns:
    `ChunkFlops`.
  """
  sc = model_sampler_config(model, height, width, steps=steps, patch_size=config.patch_size,
                            **kwargs)
  return sampler_chunk_flops(config, sc, first_chunk, text_len=text_len)


# ------------------------------------------------------------------------------------------
# Wan VAE decoder.


@dataclasses.dataclass(frozen=True)
class VAEFlops:
  """FLOPs of a VAE decode: convolutions and the mid-block attention products."""

  conv: int
  attention: int

  @property
  def total(self) -> int:
    return self.conv + self.attention


def vae_decode_flops(config, latent_frames: int, latent_height: int, latent_width: int, *,
                     batch: int = 1) -> VAEFlops:
  """FLOPs of decoding `latent_frames` latents with the Wan 2.1 decoder (`AutoencoderKLWan`).

  Mirrors `vae_layers.Decoder` (and diffusers' `WanDecoder3d`): `post_quant_conv` over all
  latents, then one causal decoder call per latent frame. A call runs `conv_in`, the mid block
  (2 residual blocks around a per-frame single-head attention), the up blocks (residual blocks
  with a 1x1x1 shortcut on width changes, then a 2x spatial upsampler whose causal time conv
  doubles the frames; the first call skips the time conv and yields 1 frame), `conv_out`.
  A convolution costs 2 * output positions * C_in * C_out * kernel volume; the attention
  4 * (h w)^2 * C per frame (scores and weighted sum), as torch's FLOP counter counts them.

  Args:
    config: a `WanVAEConfig`.
    latent_frames: latents decoded in one sequence (9 per chunk -> 33 frames).
    latent_height, latent_width: latent size.
    batch: batch size.

  Returns:
    `VAEFlops`.
  """
  t_lat = _positive("latent_frames", latent_frames)
  h0, w0 = _positive("latent_height", latent_height), _positive("latent_width", latent_width)
  batch = _positive("batch", batch)
  z = int(config.z_dim)
  mult = tuple(int(m) for m in config.dim_mult)
  dims = [config.decoder_dim * u for u in (mult[-1],) + mult[::-1]]
  t_up = tuple(bool(t) for t in config.temperal_downsample)[::-1]
  conv = attn = 0

  def c(t, h, w, cin, cout, k):
    return t * h * w * cin * cout * k

  def resblock(t, h, w, cin, cout):
    return c(t, h, w, cin, cout, 27) + c(t, h, w, cout, cout, 27) + (
        c(t, h, w, cin, cout, 1) if cin != cout else 0)

  conv += c(t_lat, h0, w0, z, z, 1)  # post_quant_conv
  for call in range(t_lat):
    first = call == 0
    t, h, w = 1, h0, w0
    conv += c(t, h, w, z, dims[0], 27)
    conv += 2 * resblock(t, h, w, dims[0], dims[0])
    conv += c(t, h, w, dims[0], 3 * dims[0], 1) + c(t, h, w, dims[0], dims[0], 1)
    attn += 2 * t * (h * w) ** 2 * dims[0]
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        cin //= 2
      for _ in range(int(config.num_res_blocks) + 1):
        conv += resblock(t, h, w, cin, cout)
        cin = cout
      if i != len(mult) - 1:
        if t_up[i] and not first:
          conv += c(t, h, w, cout, 2 * cout, 3)
          t *= 2
        h, w = 2 * h, 2 * w
        conv += c(t, h, w, cout, cout // 2, 9)
    conv += c(t, h, w, dims[-1], int(config.out_channels), 27)
  return VAEFlops(conv=2 * batch * conv, attention=2 * batch * attn)


def mfu(flop_count: float, seconds: float, peak_tflops: float = H100_PEAK_TFLOPS) -> float:
  """Achieved / peak throughput (`flop_count` FLOPs in `seconds` vs `peak_tflops` TFLOP/s)."""
  if seconds <= 0:
    raise ValueError(f"seconds={seconds} must be > 0")
  return flop_count / seconds / (peak_tflops * 1e12)
