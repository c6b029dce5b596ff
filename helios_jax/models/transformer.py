"""The Helios DiT (`HeliosTransformer3DModel`) in Flax NNX.

Spec: architecture.md §2-§5. Forward, in order: patchify the noisy window, embed the three
history groups (Multi-Term Memory Patchification, `memory.py`), assemble the sequence
[long | mid | short | noisy], build 3D RoPE tables (`rope.py`), timestep embeddings (t for noisy
tokens, t = 0 for history tokens when `zero_history_timestep`), run the scanned blocks
(self-attention over all tokens, guidance cross-attention on noisy tokens only, FFN), output
norm + projection on the noisy tokens, unpatchify. The output is a flow-matching velocity.

Public entry points: `load_transformer(path, dtype)` -> `HeliosTransformer` (a callable with the
diffusers argument names and channel-first shapes), and the pure `transformer_forward(graphdef,
params, inputs)` it jits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax import checkpoint
from helios_jax.config import HeliosTransformerConfig
from helios_jax.models import layers
from helios_jax.models import memory
from helios_jax.models import rope as rope_lib
from helios_jax.models.attention import HeliosAttention
from helios_jax.models.attention import KernelConfig
from pallas_kernels import dispatch

F32 = jnp.float32

# Parameters kept in fp32 whatever the model dtype (diffusers `_keep_in_fp32_modules`).
FP32_MODULES = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3",
                "history_key_scale")

# Optional per-layer hook of the block scan: (layer_state, layer_extra, h) -> (layer_state, h).
BlockHook = Callable[[Any, Any, jax.Array], "tuple[Any, jax.Array]"]
# Optional constraint on the hidden states `[B, S, D]` at every block entry, h -> h (e.g. a
# device mesh's token sharding; the caller builds it, the model never looks up a mesh).
Constraint = Callable[[jax.Array], jax.Array]

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def _table_init(rngs: nnx.Rngs, shape, dim):
  return jax.random.normal(rngs.params(), shape, F32) / math.sqrt(dim)


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2 (fp32-kept)."""

  def __init__(self, in_dim: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear_1 = layers.Linear(in_dim, dim, dtype=dtype, rngs=rngs)
    self.linear_2 = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TextProjection(nnx.Module):
  """PixArtAlphaTextProjection: linear_1 -> GELU(tanh) -> linear_2."""

  def __init__(self, in_dim: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear_1 = layers.Linear(in_dim, dim, dtype=dtype, rngs=rngs)
    self.linear_2 = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.linear_2(layers.gelu_tanh(self.linear_1(x)))


class ConditionEmbedder(nnx.Module):
  """Timestep sinusoid + MLP (fp32) -> temb; SiLU + time_proj -> 6 modulation rows; text MLP."""

  def __init__(self, cfg: HeliosTransformerConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.inner_dim
    self.freq_dim = cfg.freq_dim
    self.dtype = dtype
    self.time_embedder = TimestepEmbedding(cfg.freq_dim, d, dtype=F32, rngs=rngs)
    self.time_proj = layers.Linear(d, 6 * d, dtype=dtype, rngs=rngs)
    self.text_embedder = TextProjection(cfg.text_dim, d, dtype=dtype, rngs=rngs)

  def time(self, t: jax.Array):
    """`t` `[B]` -> temb `[B, D]` (model dtype), timestep_proj `[B, 6, D]` (model dtype)."""
    temb = self.time_embedder(layers.timestep_sinusoid(t, self.freq_dim)).astype(self.dtype)
    tp = self.time_proj(jax.nn.silu(temb.astype(F32)).astype(self.dtype))
    return temb, tp.reshape(tp.shape[0], 6, -1)


class FeedForward(nnx.Module):
  """diffusers FeedForward(gelu-approximate): proj_in (net.0.proj) -> GELU tanh -> proj_out (net.2)."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.proj_in = layers.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.proj_out = layers.Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.proj_out(layers.gelu_tanh(self.proj_in(x)))


@dataclasses.dataclass(frozen=True)
class BlockContext:
  """Per-forward values shared by all blocks (closed over by the layer scan).

  text: `[B, L, D]` projected text; mod_hist: `[1, 6, D]` fp32 (time_proj at t = 0);
  mod_noisy: `[B, 6, D]` fp32 (time_proj at t); rope: (cos, sin) `[B, S, head_dim // 2]`.
  """

  text: jax.Array
  mod_hist: jax.Array
  mod_noisy: jax.Array
  rope: tuple[jax.Array, jax.Array]
  num_history: int  # leading history tokens
  mod_split: int    # leading tokens modulated with t = 0 (num_history or 0)


def _rows(m_hist: jax.Array, m_noisy: jax.Array, i: int) -> jax.Array:
  """Modulation row i as `[B, 2, D]`: row 0 for history tokens, row 1 for noisy tokens."""
  h, n = m_hist[:, i], m_noisy[:, i]
  h = jnp.broadcast_to(h, n.shape)
  return jnp.stack([h, n], axis=1)


class HeliosBlock(nnx.Module):
  """One DiT block: adaLN self-attention, guidance cross-attention, adaLN FFN (spec §3.7)."""

  def __init__(self, cfg: HeliosTransformerConfig, *, dtype, rngs: nnx.Rngs,
               kernels: KernelConfig):
    d = cfg.inner_dim
    self.eps = cfg.eps
    self.kernels = kernels
    self.guidance_cross_attn = cfg.guidance_cross_attn
    self.scale_shift_table = nnx.Param(_table_init(rngs, (1, 6, d), d))
    self.attn1 = HeliosAttention(d, cfg.num_attention_heads, cfg.eps, dtype=dtype, rngs=rngs,
                                 is_amplify_history=cfg.is_amplify_history,
                                 history_scale_mode=cfg.history_scale_mode, kernels=kernels)
    self.attn2 = HeliosAttention(d, cfg.num_attention_heads, cfg.eps, dtype=dtype, rngs=rngs,
                                 added_kv_proj_dim=cfg.added_kv_proj_dim, kernels=kernels)
    self.norm2 = layers.NormAffine(d) if cfg.cross_attn_norm else None
    self.ffn = FeedForward(d, cfg.ffn_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, ctx: BlockContext) -> jax.Array:
    """`x` `[B, S, D]` (model dtype) -> `[B, S, D]`."""
    dt = x.dtype
    kw = dict(eps=self.eps, **self.kernels.op_kwargs())
    table = self.scale_shift_table[...]  # [1, 6, D] fp32
    mh, mn = ctx.mod_hist + table, ctx.mod_noisy + table
    split = ctx.mod_split
    # Per-token gates: history tokens [0, split) use the t = 0 row.
    is_hist = (jnp.arange(x.shape[1]) < split)[None, :, None]
    gate = jnp.where(is_hist, mh[:, 2][:, None], mn[:, 2][:, None])
    c_gate = jnp.where(is_hist, mh[:, 5][:, None], mn[:, 5][:, None])

    # (a) self-attention over all tokens.
    h = dispatch.layer_norm_modulate(x, _rows(mh, mn, 0), _rows(mh, mn, 1), num_history=split,
                                     **kw)
    a = self.attn1(h, rope=ctx.rope, num_history=ctx.num_history)
    x = (x.astype(F32) + a.astype(F32) * gate).astype(dt)

    # (b) cross-attention to the text: noisy tokens only with guidance_cross_attn.
    n_skip = ctx.num_history if self.guidance_cross_attn else 0
    xh, xn = x[:, :n_skip], x[:, n_skip:]
    c = (dispatch.layer_norm(xn, self.norm2.weight[...], self.norm2.bias[...], **kw)
         if self.norm2 is not None else xn)
    xn = xn + self.attn2(c, context=ctx.text)
    x = jnp.concatenate([xh, xn], axis=1) if n_skip else xn

    # (c) feed-forward over all tokens.
    h = dispatch.layer_norm_modulate(x, _rows(mh, mn, 3), _rows(mh, mn, 4), num_history=split,
                                     **kw)
    f = self.ffn(h)
    return (x.astype(F32) + f.astype(F32) * c_gate).astype(dt)


class OutputNorm(nnx.Module):
  """`norm_out`: non-affine LayerNorm modulated by (scale_shift_table + temb) rows (shift, scale)."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, kernels: KernelConfig):
    self.eps = eps
    self.kernels = kernels
    self.scale_shift_table = nnx.Param(_table_init(rngs, (1, 2, dim), dim))

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    """x `[B, N, D]`, temb `[B, D]` -> `[B, N, D]` in x.dtype."""
    mod = self.scale_shift_table[...] + temb.astype(F32)[:, None, :]  # [B, 2, D]: shift, scale
    shift, scale = (jnp.broadcast_to(mod[:, i:i + 1], mod.shape) for i in (0, 1))
    return dispatch.layer_norm_modulate(x, shift, scale, num_history=0, eps=self.eps,
                                        **self.kernels.op_kwargs())


def _layer_to_device(state: Any, i: jax.Array) -> Any:
  """Layer `i` of a stacked (host-memory) block state, copied to device memory."""
  layer = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
  return jax.device_put(layer, jax.memory.Space.Device)


def _scan_streamed(step: Callable[..., Any], x: jax.Array, state: Any, extra: Any,
                   lo: int, hi: int) -> jax.Array:
  """Layers [lo, hi) of a host-resident stacked state, double-buffered on the device.

  `extra`: the per-layer `block_extra` of these layers (leading axis hi - lo, or None). The carry
  holds (hidden states, this layer's weights on the device); each iteration starts the copy of
  the next layer before running the block (the last iteration re-reads layer hi - 1, one spare
  copy per segment).
  """

  def body(carry, xs):
    h, layer = carry
    i, layer_extra = xs
    nxt = _layer_to_device(state, jnp.minimum(i + 1, hi - 1))
    h, _ = step(h, (layer, layer_extra))
    return (h, nxt), None

  first = _layer_to_device(state, jnp.asarray(lo))
  (x, _), _ = jax.lax.scan(body, (x, first), (jnp.arange(lo, hi), extra))
  return x


# JAX memory kinds of host RAM (low-memory mode keeps block weights there, helios_jax/offload.py).
HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def in_host_memory(a: Any) -> bool:
  """Whether an array (or a ShapeDtypeStruct with a sharding) lives in host memory."""
  return getattr(getattr(a, "sharding", None), "memory_kind", None) in HOST_MEMORY_KINDS


def _slice_layers(a: Any, lo: int, hi: int) -> Any:
  """`a[lo:hi]` of a stacked leaf, in the leaf's own memory (host-resident leaves are sliced on
  the host, never brought to the device whole)."""
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((hi - lo, *a.shape[1:]), a.dtype, sharding=a.sharding)
  if in_host_memory(a):
    return jax.device_put(np.asarray(a)[lo:hi], a.sharding)
  return a[lo:hi]


def segment_blocks(model: "HeliosTransformer3DModel", bounds: Any) -> None:
  """Cuts the stacked blocks into separately stacked segments, in place.

  `bounds` (0 = b0 < b1 < ... < bk = num_layers): segment j holds blocks [b_j, b_{j+1}) and
  becomes `model.blocks[j]` (an `nnx.List` of stacked modules; parameter paths
  `blocks/<j>/...`). The forward is unchanged (one `lax.scan` per segment); segments may then
  differ in parameter types, e.g. quantized middle blocks and bf16 first/last blocks
  (`quantize.quantize_transformer(keep_blocks=...)`).
  """
  n = model.config.num_layers
  bounds = tuple(int(b) for b in bounds)
  if model.block_bounds is not None:
    raise ValueError(f"blocks are already segmented at {model.block_bounds}")
  if (len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != n
      or any(a >= b for a, b in zip(bounds[:-1], bounds[1:]))):
    raise ValueError(f"segment bounds {bounds} must increase from 0 to num_layers={n}")
  graphdef, state = nnx.split(model.blocks)
  model.blocks = nnx.List([
      nnx.merge(graphdef, jax.tree.map(lambda a, lo=lo, hi=hi: _slice_layers(a, lo, hi), state))
      for lo, hi in zip(bounds[:-1], bounds[1:])])
  model.block_bounds = bounds


class HeliosTransformer3DModel(nnx.Module):
  """Flax NNX twin of diffusers' `HeliosTransformer3DModel`.

  Args:
    config: the model hyper-parameters.
    dtype: parameter/compute dtype (fp32-kept modules stay fp32, see `FP32_MODULES`).
    rngs: initialisation RNGs.
    kernels: which implementation runs attention / norms / RoPE (`KernelConfig`).
    remat: per-block rematerialisation policy name in `REMAT_POLICIES` ("none" at inference).
  """

  def __init__(self, config: HeliosTransformerConfig, *, dtype=F32, rngs: nnx.Rngs,
               kernels: KernelConfig = KernelConfig(), remat: str = "none"):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r} not in {sorted(REMAT_POLICIES)}")
    cfg = config
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    self.remat = remat
    d = cfg.inner_dim
    self.patch_embedding = memory.PatchEmbed3D(cfg.in_channels, d, cfg.patch_size, dtype=dtype,
                                               rngs=rngs)
    self.memory = (memory.MultiTermMemoryPatch(cfg.in_channels, d, cfg.patch_size, dtype=dtype,
                                               rngs=rngs)
                   if cfg.has_multi_term_memory_patch else None)
    self.condition_embedder = ConditionEmbedder(cfg, dtype=dtype, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers)
    def make_blocks(r: nnx.Rngs):
      return HeliosBlock(cfg, dtype=dtype, rngs=r, kernels=kernels)

    self.blocks = make_blocks(rngs)
    self.norm_out = OutputNorm(d, cfg.eps, rngs, kernels)
    self.proj_out = layers.Linear(d, cfg.out_dim * math.prod(cfg.patch_size), dtype=dtype,
                                  rngs=rngs)
    # Low-memory mode (helios_jax/offload.py): the stacked block weights live in host memory and
    # the scan moves one layer at a time to the device (static: part of the graphdef).
    self.blocks_on_host = False
    # None: one stack of all blocks; else segment bounds (0, b1, ..., num_layers) and `blocks` is
    # an `nnx.List` of stacks (`segment_blocks`; static).
    self.block_bounds: tuple[int, ...] | None = None

  def _run_blocks(self, x: jax.Array, ctx: BlockContext, block_hook: BlockHook | None = None,
                  block_extra: Any = None, capture: tuple[int, ...] = (),
                  constrain: Constraint | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """All blocks as one `jax.lax.scan` over the stacked block state (one compiled block).

    A plain lax.scan over `nnx.split(self.blocks)` (rather than `nnx.scan`) keeps the model
    usable inside other JAX loops, e.g. the sampler's `lax.scan` over denoising steps.

    Args:
      x: `[B, S, D]` hidden states.
      ctx: per-forward values shared by all blocks.
      block_hook: optional `(layer_state, layer_extra, h) -> (layer_state, h)` applied inside
        the scan body before each block (e.g. LoRA deltas merged per layer); runs under the
        block's remat.
      block_extra: pytree whose leaves carry a leading layer axis, scanned with the blocks and
        passed to `block_hook` one layer slice at a time (None: nothing).
      capture: 0-based block indices whose output hidden states are also returned (the GAN
        discriminator's features); the scan is cut into segments at those blocks, so no
        per-layer stack of activations is kept.
      constrain: optional `h -> h` applied to the hidden states at each block entry (after
        `block_hook`, under the block's remat), e.g. a device mesh's sharding constraint.

    With `blocks_on_host` (low-memory mode), the stacked block state stays in host memory: the
    scan carries the current layer's weights on the device and, while block i runs, copies
    layer i + 1 from the host (`jax.device_put` to device memory inside the loop), so the copy
    can overlap the block's compute and the device holds two layers of weights, not L.

    Returns:
      (`[B, S, D]` output of the last block, [`[B, S, D]` output of each captured block]).
    """
    def make_step(graphdef):
      def step(h, xs):
        layer_state, layer_extra = xs
        if block_hook is not None:
          layer_state, h = block_hook(layer_state, layer_extra, h)
        if constrain is not None:
          h = constrain(h)
        return nnx.merge(graphdef, layer_state)(h, ctx), None

      if self.remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
      return step

    n = self.config.num_layers
    if any(not 0 <= int(c) < n for c in capture) or list(capture) != sorted(set(capture)):
      raise ValueError(f"capture blocks {capture} must be increasing indices in [0, {n - 1}]")
    bounds = self.block_bounds or (0, n)
    stacks = self.blocks if self.block_bounds else [self.blocks]
    segments = [(lo, hi, *nnx.split(m)) for lo, hi, m in zip(bounds[:-1], bounds[1:], stacks)]
    captured = {int(c) + 1 for c in capture}
    cuts = sorted({0, n} | captured | set(bounds))
    feats = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      s_lo, s_hi, graphdef, state = next(s for s in segments if s[0] <= lo and hi <= s[1])
      step = make_step(graphdef)
      extra = block_extra if (lo, hi) == (0, n) else jax.tree.map(
          lambda a, lo=lo, hi=hi: a[lo:hi], block_extra)
      if self.blocks_on_host:
        x = _scan_streamed(step, x, state, extra, lo - s_lo, hi - s_lo)
      else:
        if (lo, hi) != (s_lo, s_hi):
          state = jax.tree.map(lambda a, a0=lo - s_lo, a1=hi - s_lo: a[a0:a1], state)
        x = jax.lax.scan(step, x, (state, extra))[0]
      if hi in captured:
        feats.append(x)
    return x, feats

  def __call__(self, hidden_states, timestep, encoder_hidden_states, indices_hidden_states=None,
               indices_latents_history_short=None, indices_latents_history_mid=None,
               indices_latents_history_long=None, latents_history_short=None,
               latents_history_mid=None, latents_history_long=None, *,
               constrain: Constraint | None = None):
    """Denoiser forward with the diffusers argument names and channel-first layouts.

    Args:
      hidden_states: `[B, C, T, H, W]` noisy latents.
      timestep: `[B]` (or scalar / `[1]`, broadcast) timesteps in [0, 1000].
      encoder_hidden_states: `[B, L, text_dim]` text embeddings.
      indices_hidden_states: `[B, T // pt]` RoPE frame indices (default 0..T'-1).
      indices_latents_history_{short,mid,long}: `[B, T_g]` RoPE frame indices per group.
      latents_history_{short,mid,long}: `[B, C, T_g, H_g, W_g]` clean history latents. A group
        is used only when both its latents and indices are given.
      constrain: optional hidden-state constraint at each block entry (see `_run_blocks`).

    Returns:
      `[B, out_channels, T, H, W]` velocity in the model dtype.
    """
    cfg = self.config
    validate_inputs(cfg, hidden_states, timestep, encoder_hidden_states, indices_hidden_states,
                    {"short": (latents_history_short, indices_latents_history_short),
                     "mid": (latents_history_mid, indices_latents_history_mid),
                     "long": (latents_history_long, indices_latents_history_long)})
    to_cl = lambda v: None if v is None else jnp.moveaxis(jnp.asarray(v), 1, -1)
    use = lambda lat, idx: to_cl(lat) if lat is not None and idx is not None else None
    hist = memory.HistoryInputs(
        short=use(latents_history_short, indices_latents_history_short),
        mid=use(latents_history_mid, indices_latents_history_mid),
        long=use(latents_history_long, indices_latents_history_long),
        idx_short=indices_latents_history_short, idx_mid=indices_latents_history_mid,
        idx_long=indices_latents_history_long)
    y = self.forward_channels_last(to_cl(hidden_states), timestep, encoder_hidden_states,
                                   indices_hidden_states, hist, constrain=constrain)
    return jnp.moveaxis(y, -1, 1)

  def forward_channels_last(self, x: jax.Array, timestep: jax.Array, text: jax.Array,
                            frame_indices: jax.Array | None,
                            hist: memory.HistoryInputs, *, block_hook: BlockHook | None = None,
                            block_extra: Any = None, capture_blocks: tuple[int, ...] = (),
                            constrain: Constraint | None = None):
    """The forward on channels-last latents (what the sampler calls; no input validation).

    Args:
      x: `[B, T, H, W, C]` noisy latents.
      timestep: `[B]` (or `[1]` / scalar) timesteps.
      text: `[B, L, text_dim]` text embeddings.
      frame_indices: `[B, T // pt]` RoPE frame indices of the noisy window (None: 0..T'-1).
      hist: history groups, latents `[B, T_g, H_g, W_g, C]` (None = group absent).
      block_hook: optional per-layer transform inside the block scan (see `_run_blocks`).
      block_extra: per-layer data for `block_hook`, leaves `[num_layers, ...]`.
      capture_blocks: 0-based blocks whose noisy-token outputs are also returned.
      constrain: optional hidden-state constraint at each block entry (see `_run_blocks`).

    Returns:
      `[B, T, H, W, out_channels]` velocity in the model dtype; with `capture_blocks`, the pair
      (velocity, [`[B, T', H', W', D]` noisy-token hidden states after each captured block]).
    """
    cfg = self.config
    dt = self.dtype
    b = x.shape[0]
    cast = lambda v: None if v is None else v.astype(dt)
    hist = dataclasses.replace(hist, short=cast(hist.short), mid=cast(hist.mid),
                               long=cast(hist.long))

    # Noisy window.
    x = self.patch_embedding(x.astype(dt))                          # [B, T', H', W', D]
    _, tn, hn, wn, _ = x.shape
    if frame_indices is None:
      frame_indices = jnp.broadcast_to(jnp.arange(tn)[None], (b, tn))
    cos, sin = rope_lib.rope_tables(jnp.asarray(frame_indices), hn, wn, cfg.rope_dim,
                                    cfg.rope_theta)
    x = rope_lib.flatten_grid(x)
    cos, sin = rope_lib.flatten_grid(cos), rope_lib.flatten_grid(sin)

    # History (Multi-Term Memory Patchification).
    num_history = 0
    if self.memory is not None and (hist.short is not None or hist.mid is not None
                                    or hist.long is not None):
      h_tok, (h_cos, h_sin) = self.memory(hist, cfg.rope_dim, cfg.rope_theta)
      num_history = h_tok.shape[1]
      x = jnp.concatenate([h_tok, x], axis=1)
      cos = jnp.concatenate([h_cos, cos], axis=1)
      sin = jnp.concatenate([h_sin, sin], axis=1)

    # Timestep and text conditioning.
    t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (b,))
    temb, tp = self.condition_embedder.time(t)
    if cfg.zero_history_timestep:
      _, tp0 = self.condition_embedder.time(jnp.zeros((1,), t.dtype))
      mod_split = num_history
    else:
      tp0, mod_split = tp, 0
    text = self.condition_embedder.text_embedder(jnp.asarray(text).astype(dt))
    ctx = BlockContext(text=text, mod_hist=tp0.astype(F32), mod_noisy=tp.astype(F32),
                       rope=(cos, sin), num_history=num_history, mod_split=mod_split)

    x, feats = self._run_blocks(x, ctx, block_hook, block_extra, tuple(capture_blocks),
                                constrain)

    # Output head on the noisy tokens, unpatchify.
    y = self.proj_out(self.norm_out(x[:, num_history:], temb))    # [B, N, pt*ph*pw*C]
    pt, ph, pw = cfg.patch_size
    y = y.reshape(b, tn, hn, wn, pt, ph, pw, cfg.out_dim)
    y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    y = y.reshape(b, tn * pt, hn * ph, wn * pw, cfg.out_dim)
    if not capture_blocks:
      return y
    return y, [f[:, num_history:].reshape(b, tn, hn, wn, -1) for f in feats]


def validate_inputs(cfg: HeliosTransformerConfig, hidden_states, timestep, encoder_hidden_states,
                    indices_hidden_states, groups: Mapping[str, tuple[Any, Any]]) -> None:
  """Shape checks with errors that name the offending argument and value."""
  shape = tuple(hidden_states.shape)
  if len(shape) != 5:
    raise ValueError(f"hidden_states must be [B, C, T, H, W], got shape {shape}")
  b, c, t, h, w = shape
  if c != cfg.in_channels:
    raise ValueError(f"hidden_states has {c} channels (shape {shape}); the model expects "
                     f"in_channels={cfg.in_channels}")
  for name, n, p in (("T", t, cfg.patch_size[0]), ("H", h, cfg.patch_size[1]),
                     ("W", w, cfg.patch_size[2])):
    if n % p:
      raise ValueError(f"hidden_states {name}={n} (shape {shape}) is not a multiple of "
                       f"patch_size {cfg.patch_size}")
  tsize = int(np.prod(np.shape(timestep)))
  if tsize not in (1, b):
    raise ValueError(f"timestep has shape {tuple(np.shape(timestep))}; expected [B]={b} or [1]")
  e = tuple(encoder_hidden_states.shape)
  if len(e) != 3 or e[0] != b or e[2] != cfg.text_dim:
    raise ValueError(f"encoder_hidden_states must be [B={b}, L, text_dim={cfg.text_dim}], got {e}")
  if indices_hidden_states is not None:
    want = (b, t // cfg.patch_size[0])
    if tuple(np.shape(indices_hidden_states)) != want:
      raise ValueError(f"indices_hidden_states has shape {tuple(np.shape(indices_hidden_states))},"
                       f" expected {want} for hidden_states {shape}")
  for name, (lat, idx) in groups.items():
    if (lat is None) != (idx is None):
      given = "latents" if lat is not None else "indices"
      raise ValueError(f"history group '{name}': only {given} given; pass both "
                       f"latents_history_{name} and indices_latents_history_{name} (or neither)")
    if lat is None:
      continue
    if not cfg.has_multi_term_memory_patch:
      raise ValueError(f"latents_history_{name} given but the model has no memory patches "
                       "(has_multi_term_memory_patch=False)")
    ls = tuple(lat.shape)
    if len(ls) != 5 or ls[0] != b or ls[1] != cfg.in_channels:
      raise ValueError(f"latents_history_{name} must be [B={b}, C={cfg.in_channels}, T, H, W], "
                       f"got {ls}")
    ishape = tuple(np.shape(idx))
    if len(ishape) != 2 or ishape[0] != b:
      raise ValueError(f"indices_latents_history_{name} must be [B={b}, T], got {ishape}")
    if name == "short" and ishape[1] != ls[2] // cfg.patch_size[0]:
      raise ValueError(f"indices_latents_history_short has {ishape[1]} frames but "
                       f"latents_history_short {ls} has {ls[2] // cfg.patch_size[0]}")
    if name != "short" and ishape[1] != ls[2]:
      raise ValueError(f"indices_latents_history_{name} has {ishape[1]} frames but "
                       f"latents_history_{name} {ls} has {ls[2]}")
  if groups["short"][0] is None and (groups["mid"][0] is not None or groups["long"][0] is not None):
    raise ValueError("latents_history_mid/long need latents_history_short: they use the short "
                     "history's RoPE grid")


# ------------------------------------------------------------------------------------------
# Checkpoint glue.


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _torch_key_map(key: str):
  """diffusers state-dict key -> (Flax path, layer index | None); None ignores the key."""
  if "norm_added_q" in key:  # the reference ignores it too
    return None
  if key == "scale_shift_table":  # Wan-diffusers name of the output table
    key = "norm_out.scale_shift_table"
  layer = None
  m = _BLOCK_KEY.match(key)
  if m:
    layer, key = int(m.group(1)), m.group(2)
  key = key.replace("to_out.0.", "to_out.").replace("ffn.net.0.proj.", "ffn.proj_in.")
  key = key.replace("ffn.net.2.", "ffn.proj_out.")
  parts = key.split(".")
  if parts[0] in ("patch_short", "patch_mid", "patch_long"):
    parts = ["memory"] + parts
  if parts[-1] == "weight" and not parts[-2].startswith("norm"):
    parts[-1] = "kernel"
  path = tuple(parts)
  return (("blocks",) + path, layer) if layer is not None else (path, None)


class TransformerSpec(checkpoint.ModelSpec):
  """Storage glue for `HeliosTransformer3DModel` (diffusers `transformer/` folders)."""

  name = "transformer"
  config_cls = HeliosTransformerConfig

  def __init__(self, kernels: KernelConfig = KernelConfig(), remat: str = "none"):
    self.kernels = kernels
    self.remat = remat

  def build(self, config, dtype, seed: int = 0):
    return HeliosTransformer3DModel(config, dtype=dtype, rngs=nnx.Rngs(seed),
                                    kernels=self.kernels, remat=self.remat)

  def key_map(self, config):
    return _torch_key_map

  def stacked_len(self, config):
    return config.num_layers


TRANSFORMER_SPEC = TransformerSpec()

INPUT_NAMES = ("hidden_states", "timestep", "encoder_hidden_states", "indices_hidden_states",
               "indices_latents_history_short", "indices_latents_history_mid",
               "indices_latents_history_long", "latents_history_short", "latents_history_mid",
               "latents_history_long")


def transformer_forward(graphdef: nnx.GraphDef, params: nnx.State, inputs: Mapping[str, Any],
                        constrain: Constraint | None = None) -> jax.Array:
  """Pure forward: (static graphdef, params, dict of `INPUT_NAMES` arrays) -> velocity.

  `constrain` (static under jit) is the optional hidden-state constraint at each block entry.
  """
  model = nnx.merge(graphdef, params)
  return model(**inputs, constrain=constrain)


class HeliosTransformer:
  """A loaded DiT: `nnx.split` state + a jitted pure forward, called like diffusers' model.

  Attributes:
    config: `HeliosTransformerConfig`.
    graphdef, params: the `nnx.split` of the module.
    forward: `jax.jit(transformer_forward)` with graphdef bound:
      `forward(params, inputs, constrain=None)` (`constrain` static).
  """

  def __init__(self, config: HeliosTransformerConfig, model: HeliosTransformer3DModel):
    self.config = config
    self.dtype = model.dtype
    self.graphdef, self.params = nnx.split(model)
    self.forward = jax.jit(functools.partial(transformer_forward, self.graphdef),
                           static_argnames=("constrain",))

  def module(self) -> HeliosTransformer3DModel:
    return nnx.merge(self.graphdef, self.params)

  def __call__(self, hidden_states, timestep, encoder_hidden_states, **kwargs) -> jax.Array:
    unknown = sorted(set(kwargs) - set(INPUT_NAMES))
    if unknown:
      raise TypeError(f"unknown transformer input(s) {unknown}; expected {INPUT_NAMES}")
    inputs = {"hidden_states": hidden_states, "timestep": timestep,
              "encoder_hidden_states": encoder_hidden_states, **kwargs}
    inputs = {k: (None if v is None else jnp.asarray(v)) for k, v in inputs.items()}
    return self.forward(self.params, inputs)


def load_transformer(path, dtype=None, *, kernels: KernelConfig | None = None,
                     attention_impl: str | None = None, remat: str = "none",
                     lora: Any = None, placement: Any = None) -> HeliosTransformer:
  """Loads a diffusers `transformer/` folder (safetensors, single or sharded) or our Orbax export.

  Args:
    path: the folder (holding `config.json`).
    dtype: parameter/compute dtype, e.g. `jnp.bfloat16` (None -> float32). The fp32-kept
      modules (`FP32_MODULES`) stay float32 either way, as in diffusers.
    kernels: op implementations (`KernelConfig`; default "auto" everywhere).
    attention_impl: shorthand for `KernelConfig(attention=attention_impl)`.
    remat: rematerialisation policy (training).
    lora: `[(path, scale), ...]` of diffusers/PEFT LoRA files, partial-parameter files or
      folders holding them (`models/lora.py`), fused into the weights at load (no per-step
      cost); partial files are applied first, as the official merge script does.
    placement: optional `flax path -> Sharding` per parameter (`checkpoint.load_model`; e.g.
      `offload.load_placement()` for low-memory mode, then `offload.offload_blocks`).
  """
  spec = TransformerSpec(resolve_kernels(kernels, attention_impl), remat=remat)
  config, model = checkpoint.load_model(spec, path, dtype, placement=placement)
  if lora:
    from helios_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
    lora_lib.fuse_into_module(model, spec.key_map(config), lora)
  return HeliosTransformer(config, model)


def resolve_kernels(kernels: KernelConfig | None, attention_impl: str | None) -> KernelConfig:
  """The loaders' `kernels=` / `attention_impl=` pair as one `KernelConfig`."""
  kernels = kernels or KernelConfig()
  return dataclasses.replace(kernels, attention=attention_impl) if attention_impl else kernels


def init_transformer(config: HeliosTransformerConfig, dtype=F32, seed: int = 0, *,
                     kernels: KernelConfig | None = None, attention_impl: str | None = None,
                     remat: str = "none") -> HeliosTransformer:
  """A randomly initialised model (tiny demos, benchmarks with the 14B shapes)."""
  model = TransformerSpec(resolve_kernels(kernels, attention_impl), remat).init(
      config, jnp.dtype(dtype), seed)
  return HeliosTransformer(config, model)


def count_params(config: HeliosTransformerConfig) -> int:
  """Parameter count from `jax.eval_shape` (no memory allocated)."""
  _, abstract = TRANSFORMER_SPEC.abstract(config, jnp.bfloat16)
  return int(sum(np.prod(v.shape) for v in jax.tree.leaves(abstract)))
