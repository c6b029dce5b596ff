"""`make demo`: the embedded tiny Helios DiT on one 33-frame chunk layout, shapes and timing.

  python -m helios_jax.demo [--preset tiny] [--latent_hw 16 16] [--steps 3]

Builds the model with random weights (no download), then runs the denoiser on the exact Helios
chunk layout (anchor + 16 long + 2 mid + 1 short history latents, 9 noisy latents) through the
jitted pure function `transformer_forward(graphdef, params, inputs)`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.config import HeliosTransformerConfig
from helios_jax.models.transformer import init_transformer


def chunk_inputs(cfg: HeliosTransformerConfig, h: int, w: int, seed: int = 0):
  """Random inputs with the released history layout (sampling.md §3.1)."""
  k = iter(jax.random.split(jax.random.key(seed), 8))
  c = cfg.in_channels
  rnd = lambda *s: jax.random.normal(next(k), s, jnp.float32)
  return {
      "hidden_states": rnd(1, c, 9, h, w), "timestep": jnp.array([999.0]),
      "encoder_hidden_states": rnd(1, 512, cfg.text_dim),
      "indices_hidden_states": jnp.arange(20, 29)[None],
      "latents_history_short": rnd(1, c, 2, h, w),
      "indices_latents_history_short": jnp.array([[0, 19]]),
      "latents_history_mid": rnd(1, c, 2, h, w),
      "indices_latents_history_mid": jnp.array([[17, 18]]),
      "latents_history_long": rnd(1, c, 16, h, w),
      "indices_latents_history_long": jnp.arange(1, 17)[None],
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--latent_hw", type=int, nargs=2, default=(16, 16))
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args()
  cfg = HeliosTransformerConfig.from_preset(args.preset)
  model = init_transformer(cfg, jnp.float32, seed=0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
  inputs = chunk_inputs(cfg, *args.latent_hw)
  print(f"helios-jax demo: preset {args.preset!r}, {n_params:,} parameters, "
        f"backend {jax.default_backend()}")
  for k, v in inputs.items():
    print(f"  {k:<32} {tuple(v.shape)}")
  t0 = time.perf_counter()
  out = model.forward(model.params, inputs).block_until_ready()
  print(f"first call (trace + compile + run): {time.perf_counter() - t0:.2f} s")
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    out = model.forward(model.params, inputs).block_until_ready()
    times.append(time.perf_counter() - t0)
  print(f"output velocity {tuple(out.shape)} {out.dtype}, finite={bool(jnp.isfinite(out).all())}")
  print(f"steady-state forward: {1e3 * float(np.median(times)):.1f} ms (median of {args.steps})")


if __name__ == "__main__":
  main()
