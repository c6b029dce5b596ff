"""Stage-3 GAN discriminator heads, crops and losses (spec training.md §7.6, quirk 5 in §10).

The discriminator is the fake-score backbone (with its LoRA) plus `DiscriminatorHeads`: one
`Discriminator3DHead` per feature, fed with the noisy-token hidden states after the blocks of
`head_blocks(num_layers)` (`[B, T, h, w, D]` at token resolution) and the final velocity
(`[B, T, H, W, C_out]` at latent resolution). Everything is channels-last.

Logit sign convention (spec): a large logit means "fake".

  D loss  = w_d * mean softplus(-D(fake)) + w_d * mean softplus(D(real))     (w_d = 0.01)
  G loss  = w_g * mean softplus(D(fake'))                                    (w_g = 0.05)
  R1~     = w_r1 * mean (D(crop(real)) - D(crop'(real + 0.1 eps')))^2          (w_r1 = 100)

Means run over batch and heads jointly. The crops of the real and the perturbed real are
independent (quirk 5: the approximate R1 also penalises crop inconsistency; kept as in the
reference).

Generator side ("Gan_D_Loss_With_Cached_Grad"): D is frozen, so the G loss is evaluated on a
detached input, its input gradient is taken at once and a surrogate `sum(stopgrad(g) * x)`
carries it upstream (`cached_grad_surrogate`); the outer backward never holds D activations.

Initialisation decision: the heads use the Flax default initialisers (Conv / Linear kernels
lecun-normal, biases zero; GroupNorm scale 1, bias 0), not torch's default kaiming-uniform
(a = sqrt(5)) of the reference. The spec only says "framework default init" and the heads
are trained from scratch, so the two are equivalent in distribution role, not in values.
GroupNorm epsilon is torch's default 1e-5 (the reference's `nn.GroupNorm(32, 768)`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32

# Blocks (0-based, of the reference's 40) whose outputs feed the hidden-state heads.
REFERENCE_NUM_LAYERS = 40
REFERENCE_HEAD_BLOCKS = (5, 15, 25, 35)

# (kernel [kt, kh, kw], stride [st, sh, sw], padding [pt, ph, pw]) of the six convs of a head;
# PyTorch semantics: symmetric zero padding p on both sides of each axis.
HEAD_CONVS: tuple[tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1)),
    ((4, 4, 4), (2, 2, 2), (1, 1, 1)),
    ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
    ((3, 3, 3), (2, 1, 1), (1, 1, 1)),
    ((1, 3, 3), (1, 1, 1), (0, 1, 1)),
)
GN_EPS = 1e-5  # torch nn.GroupNorm default


@dataclasses.dataclass(frozen=True)
class GanConfig:
  """Stage-3 GAN settings of `stage_3_post_gan_version.yaml` (spec §7.6; the `stage3.gan` group).

  Attributes:
    enabled: the GAN variant (`is_use_gan`).
    start_step: first global step with GAN losses (`gan_start_step`, 1000).
    g_weight: generator (non-saturating) loss weight (0.05).
    d_weight: discriminator loss weight, each of the fake and real terms (0.01).
    r1_weight: approximate-R1 weight (`aprox_r1`, 100).
    r1_sigma: std of the R1 input perturbation (real + r1_sigma * eps', 0.1).
    crop: spatial crop fraction of every D input (0.5).
    blocks: 0-based blocks whose hidden states feed the heads, plus the final output
      (() -> `head_blocks(num_layers)`: (5, 15, 25, 35) scaled to the model depth).
    head_width: channels of every head (768).
    head_groups: GroupNorm groups of every head (32).
    head_seed: seed of the heads' initialisation.
  """

  enabled: bool = False
  start_step: int = 1000
  g_weight: float = 0.05
  d_weight: float = 0.01
  r1_weight: float = 100.0
  r1_sigma: float = 0.1
  crop: float = 0.5
  blocks: tuple[int, ...] = ()
  head_width: int = 768
  head_groups: int = 32
  head_seed: int = 0

  def __post_init__(self):
    _check_groups(self.head_width, self.head_groups)
    if not 0.0 < self.crop <= 1.0:
      raise ValueError(f"crop={self.crop} must be in (0, 1]")
    if min(self.blocks, default=0) < 0:
      raise ValueError(f"blocks={self.blocks} must be >= 0")


# ------------------------------------------------------------------------------------------
# Heads.


def _check_groups(width: int, groups: int) -> None:
  if int(width) < 1 or int(groups) < 1 or int(width) % int(groups):
    raise ValueError(f"GroupNorm groups={groups} must be >= 1 and divide the head width="
                     f"{width}")


def _conv_out(n: int, k: int, s: int, p: int) -> int:
  """PyTorch conv output length floor((n + 2p - k) / s) + 1 (may be <= 0 when n is small)."""
  return (n + 2 * p - k) // s + 1


def head_feature_shapes(t: int, h: int, w: int) -> list[tuple[int, int, int]]:
  """(T, H, W) after each of the six convs of a head for a `(t, h, w)` input.

  T: t -> t -> floor(t/2) -> floor(t/4) -> ceil(.../2) -> ceil(.../2) -> same;
  H, W: n -> n -> floor(n/2) -> floor(n/4) -> same. Entries may be <= 0 for too-small inputs
  (see `check_head_input`); for (9, 4, 4): (9,4,4), (4,2,2), (2,1,1), (1,1,1), (1,1,1), (1,1,1).
  """
  shapes, cur = [], (int(t), int(h), int(w))
  for k, s, p in HEAD_CONVS:
    cur = tuple(_conv_out(n, ki, si, pi) for n, ki, si, pi in zip(cur, k, s, p))
    shapes.append(cur)
  return shapes


def check_head_input(t: int, h: int, w: int) -> None:
  """Raises ValueError if any conv of a head would produce an empty axis (needs T, H, W >= 4)."""
  cur = (int(t), int(h), int(w))
  for i, shape in enumerate(head_feature_shapes(*cur)):
    if min(shape) < 1:
      raise ValueError(
          f"discriminator head input (T, H, W)={cur} is too small: conv {i} (kernel "
          f"{HEAD_CONVS[i][0]}, stride {HEAD_CONVS[i][1]}, padding {HEAD_CONVS[i][2]}) gives "
          f"{shape}; every axis needs >= 4 (two stride-2 k4 p1 convs)")


class Discriminator3DHead(nnx.Module):
  """One GAN head: six Conv3d -> GroupNorm -> SiLU stages, global average pool, Linear(width, 1).

  Layers (PyTorch notation, spec §7.6): Conv3d k3 s1 p1; Conv3d k4 s2 p1; Conv3d k4 s2 p1;
  Conv3d k3 s(2,1,1) p1; Conv3d k3 s(2,1,1) p1; Conv3d k(1,3,3) p(0,1,1); each followed by
  GroupNorm(groups, width) and SiLU; then the mean over (T, H, W) and Linear(width, 1).

  Attributes:
    convs: six `nnx.Conv` (kernel `[kt, kh, kw, C_in, C_out]`, explicit symmetric padding).
    norms: six `nnx.GroupNorm` (epsilon 1e-5).
    proj: `nnx.Linear(width, 1)`.
  """

  def __init__(self, in_channels: int, width: int = 768, groups: int = 32, *,
               dtype: Any = None, rngs: nnx.Rngs):
    """Builds the head.

    Args:
      in_channels: channels C of the input feature.
      width: channels of every conv (768 at full size).
      groups: GroupNorm groups; must divide `width`.
      dtype: computation dtype (None: the inputs'; params are fp32).
      rngs: parameter initialisation (Flax defaults, see the module docstring).
    """
    _check_groups(width, groups)
    if int(in_channels) < 1:
      raise ValueError(f"in_channels={in_channels} must be >= 1")
    self.in_channels, self.width, self.groups = int(in_channels), int(width), int(groups)
    convs, norms, c = [], [], self.in_channels
    for k, s, p in HEAD_CONVS:
      convs.append(nnx.Conv(c, self.width, k, s, padding=tuple((pi, pi) for pi in p),
                            dtype=dtype, rngs=rngs))
      norms.append(nnx.GroupNorm(self.width, num_groups=self.groups, epsilon=GN_EPS,
                                 use_fast_variance=False, dtype=dtype, rngs=rngs))
      c = self.width
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.proj = nnx.Linear(self.width, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of one feature.

    Args:
      x: `[B, T, H, W, C]` feature (C = in_channels; T, H, W >= 4).

    Returns:
      `[B]` logits (large = fake).
    """
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"discriminator head expects [B, T, H, W, {self.in_channels}], got "
                       f"shape {tuple(x.shape)}")
    check_head_input(*x.shape[1:4])
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.silu(norm(conv(x)))
    x = jnp.mean(x.astype(F32), axis=(1, 2, 3))
    return self.proj(x)[:, 0].astype(F32)


def head_blocks(num_layers: int) -> tuple[int, ...]:
  """0-based block indices whose outputs feed the hidden-state heads.

  The reference taps blocks (5, 15, 25, 35) of 40: the (rounded-up) middle of each quarter.
  For another depth L we scale with floor: i_k = floor(b_k * L / 40) = floor((2k + 1) L / 8),
  k = 0..3. This gives (5, 15, 25, 35) for 40 and (0, 1, 2, 3) for the 4-block tiny model; it is
  strictly increasing for L >= 4 (consecutive gaps are L / 4 >= 1) and always <= L - 1. For
  L < 4 duplicates are dropped in order (L = 2 -> (0, 1), L = 1 -> (0,)), so fewer heads.
  (Decision: floor rather than round-half-up, which for L = 4 would give (1, 2, 3, 3) and lose a
  head and block 0.)
  """
  num_layers = int(num_layers)
  if num_layers < 1:
    raise ValueError(f"num_layers={num_layers} must be >= 1")
  out: list[int] = []
  for b in REFERENCE_HEAD_BLOCKS:
    i = min(max((b * num_layers) // REFERENCE_NUM_LAYERS, 0), num_layers - 1)
    if i not in out:
      out.append(i)
  return tuple(out)


def head_in_channels(num_layers: int, hidden_dim: int, out_channels: int) -> tuple[int, ...]:
  """`in_channels` of `DiscriminatorHeads`: hidden_dim per tapped block, then out_channels."""
  return (int(hidden_dim),) * len(head_blocks(num_layers)) + (int(out_channels),)


class DiscriminatorHeads(nnx.Module):
  """All GAN heads, one per feature (tapped block hidden states, then the velocity).

  Attributes:
    heads: `nnx.List` of `Discriminator3DHead`, in feature order.
  """

  def __init__(self, in_channels: Sequence[int], width: int = 768, groups: int = 32, *,
               dtype: Any = None, rngs: nnx.Rngs):
    """Builds the heads.

    Args:
      in_channels: channels of each feature, e.g. (D, D, D, D, C_out) (`head_in_channels`).
      width, groups, dtype: as in `Discriminator3DHead` (shared by all heads).
      rngs: parameter initialisation.
    """
    in_channels = tuple(int(c) for c in in_channels)
    if not in_channels:
      raise ValueError("DiscriminatorHeads needs at least one head (in_channels is empty)")
    self.in_channels = in_channels
    self.heads = nnx.List([Discriminator3DHead(c, width, groups, dtype=dtype, rngs=rngs)
                           for c in in_channels])

  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """Logits of all heads.

    Args:
      features: one `[B, T_i, H_i, W_i, C_i]` array per head (C_i = in_channels[i]).

    Returns:
      `[B, num_heads]` logits (large = fake).
    """
    if len(features) != len(self.heads):
      raise ValueError(f"got {len(features)} features for {len(self.heads)} heads")
    return jnp.stack([head(f) for head, f in zip(self.heads, features)], axis=1)


# ------------------------------------------------------------------------------------------
# Crops.


def crop_size(h: int, w: int, scale: float = 0.5, multiple: int = 1) -> tuple[int, int]:
  """Crop size (ch, cw) = (round(h scale), round(w scale)), in units of `multiple`.

  With multiple m the size is m * round(n scale / m) (round half up), at least m, and must fit
  in n (48 x 80 latent, m 2 -> 24 x 40; 24 x 40 tokens of 48 x 80). Use m = patch size when the
  crop is taken on a latent that is patchified afterwards, so the crop covers whole tokens of
  the uncropped token grid (m = 1 on a token-resolution feature).
  """
  m = int(multiple)
  if m < 1:
    raise ValueError(f"crop multiple={multiple} must be >= 1")
  if not 0.0 < float(scale) <= 1.0:
    raise ValueError(f"crop scale={scale} must be in (0, 1]")
  out = []
  for n in (int(h), int(w)):
    c = m * max(int(math.floor(n * float(scale) / m + 0.5)), 1)
    if c > n:
      raise ValueError(f"crop of size {c} (scale {scale}, multiple {m}) does not fit in the "
                       f"spatial size {(h, w)}")
    out.append(c)
  return out[0], out[1]


def crop_offsets(key: jax.Array, batch: int, h: int, w: int, size: tuple[int, int],
                 multiple: int = 1) -> jax.Array:
  """Independent per-sample top-left offsets, uniform over the valid multiples of `multiple`.

  Returns:
    `[B, 2]` int32 (row, column); offset o = m * j, j ~ U{0 .. (n - c) // m}, so o + c <= n.
  """
  m = int(multiple)
  kh, kw = jax.random.split(key)
  cols = []
  for k, n, c in ((kh, h, size[0]), (kw, w, size[1])):
    cols.append(m * jax.random.randint(k, (batch,), 0, (int(n) - int(c)) // m + 1, jnp.int32))
  return jnp.stack(cols, axis=1)


def crop(x: jax.Array, offsets: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Per-sample spatial crop: `[B, T, H, W, C]`, `[B, 2]` offsets -> `[B, T, ch, cw, C]`."""

  def one(xi, oi):
    start = (jnp.int32(0), oi[0], oi[1], jnp.int32(0))
    return jax.lax.dynamic_slice(xi, start, (xi.shape[0], size[0], size[1], xi.shape[3]))

  return jax.vmap(one)(x, offsets.astype(jnp.int32))


def random_crop(key: jax.Array, x: jax.Array, scale: float = 0.5,
                multiple: int = 1) -> jax.Array:
  """Independent random spatial crop of each sample (spec §7.6: 50% crops of the noisy latent).

  Args:
    key: PRNG key.
    x: `[B, T, H, W, C]`.
    scale: crop fraction of H and W (`crop_size`).
    multiple: crop sizes and offsets are multiples of it (the patch size 2 for a latent that
      is patchified afterwards: the crop then lies on the token grid).

  Returns:
    `[B, T, ch, cw, C]` with (ch, cw) = `crop_size(H, W, scale, multiple)`; the offsets are
    `crop_offsets(key, B, H, W, (ch, cw), multiple)`.
  """
  if x.ndim != 5:
    raise ValueError(f"random_crop expects [B, T, H, W, C], got shape {tuple(x.shape)}")
  b, _, h, w, _ = x.shape
  size = crop_size(h, w, scale, multiple)
  return crop(x, crop_offsets(key, b, h, w, size, multiple), size)


# ------------------------------------------------------------------------------------------
# Losses.


def d_loss(logits_fake: jax.Array, logits_real: jax.Array, weight: float = 0.01) -> jax.Array:
  """Discriminator loss w mean softplus(-D(fake)) + w mean softplus(D(real)) (large = fake).

  Args:
    logits_fake, logits_real: `[B, num_heads]` (or any shape; means over all entries).
    weight: w (`0.01`).

  Returns:
    scalar fp32.
  """
  fake = jnp.mean(jax.nn.softplus(-logits_fake.astype(F32)))
  real = jnp.mean(jax.nn.softplus(logits_real.astype(F32)))
  return weight * fake + weight * real


def g_loss(logits_fake: jax.Array, weight: float = 0.05) -> jax.Array:
  """Non-saturating generator loss w mean softplus(D(fake)); `[B, num_heads]` -> scalar fp32."""
  return weight * jnp.mean(jax.nn.softplus(logits_fake.astype(F32)))


def approx_r1(logits_real: jax.Array, logits_real_perturbed: jax.Array,
              weight: float = 100.0) -> jax.Array:
  """Approximate R1 w mean((D(crop(real)) - D(crop'(real + 0.1 eps')))^2); scalar fp32."""
  d = logits_real.astype(F32) - logits_real_perturbed.astype(F32)
  return weight * jnp.mean(d * d)


def cached_grad_surrogate(loss_fn: Callable[[Any], jax.Array], x: Any) -> tuple[jax.Array,
                                                                                  jax.Array]:
  """`Gan_D_Loss_With_Cached_Grad`: loss value plus a surrogate that carries its input gradient.

  g = grad(loss_fn)(stopgrad(x)) is computed here (D frozen: its parameters are closed over in
  `loss_fn`); surrogate = sum(stopgrad(g) * x) + stopgrad(value - sum(g * x)), so the
  surrogate's value equals the loss value (to fp32 rounding) and d surrogate / d x = g.
  Backpropagating the surrogate into whatever produced x gives the same gradients as
  backpropagating through `loss_fn`, without keeping D's activations for the outer backward.

  Args:
    loss_fn: x -> scalar loss (e.g. g_loss of the heads' logits on x).
    x: array or pytree of arrays (e.g. the cropped noisy fake `[B, T, H, W, C]`).

  Returns:
    (value, surrogate): scalar fp32 each; differentiate the surrogate.
  """
  x_det = jax.tree.map(jax.lax.stop_gradient, x)
  value, g = jax.value_and_grad(loss_fn)(x_det)
  value, g = jax.lax.stop_gradient(value), jax.lax.stop_gradient(g)
  dots = [jnp.sum(gi.astype(F32) * xi.astype(F32))
          for gi, xi in zip(jax.tree.leaves(g), jax.tree.leaves(x))]
  lin = sum(dots[1:], dots[0])
  value = value.astype(F32)
  return value, lin + jax.lax.stop_gradient(value - lin)
