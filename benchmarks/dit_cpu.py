"""DiT forward on CPU: jitted JAX vs diffusers eager on the same small config, side by side.

  python benchmarks/dit_cpu.py [--layers 4] [--heads 4] [--head_dim 32] [--latent 16] [--repeats 5]

Both run in fp32 on the same weights (the diffusers model is saved and loaded through our
converter) with the Helios history layout (short 2 + mid 2 + long 16 frames, 9 noisy frames).
Prints one table row per implementation and the speed ratio. Not a test: no assertions on time.
"""

from __future__ import annotations

import argparse
import os
import sys
import statistics
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ helpers
from _timing import compile_and_time, torch_time  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import torch

from helios_jax.models.transformer import load_transformer


def history_inputs(b: int, c: int, h: int, w: int, text_dim: int, seed: int = 0):
  """Full Helios chunk layout (sampling.md §3.1) with random latents."""
  g = torch.Generator().manual_seed(seed)
  rnd = lambda *s: torch.randn(*s, generator=g)
  return {
      "hidden_states": rnd(b, c, 9, h, w), "timestep": torch.tensor([500] * b),
      "encoder_hidden_states": rnd(b, 512, text_dim),
      "indices_hidden_states": torch.arange(20, 29).repeat(b, 1),
      "latents_history_short": rnd(b, c, 2, h, w),
      "indices_latents_history_short": torch.tensor([[0, 19]] * b),
      "latents_history_mid": rnd(b, c, 2, h, w),
      "indices_latents_history_mid": torch.tensor([[17, 18]] * b),
      "latents_history_long": rnd(b, c, 16, h, w),
      "indices_latents_history_long": torch.arange(1, 17).repeat(b, 1),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--latent", type=int, default=16, help="latent height = width")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  from diffusers import HeliosTransformer3DModel  # pylint: disable=g-import-not-at-top
  hd = args.head_dim
  rope = (hd - 2 * (hd // 3 // 2 * 2), hd // 3 // 2 * 2, hd // 3 // 2 * 2)
  kw = dict(num_attention_heads=args.heads, attention_head_dim=hd, num_layers=args.layers,
            ffn_dim=3 * args.heads * hd, text_dim=64, freq_dim=64, rope_dim=rope)
  torch.manual_seed(0)
  ref = HeliosTransformer3DModel(**kw).eval()
  inputs = history_inputs(1, 16, args.latent, args.latent, 64)
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    ours = load_transformer(d, attention_impl="xla")
  np_inputs = {k: v.numpy() for k, v in inputs.items()}

  out, compile_s, jax_times = compile_and_time(
      lambda: ours(**np_inputs).block_until_ready(), args.repeats)
  ref_res, torch_times = torch_time(lambda: ref(**inputs), args.repeats)
  ref_out = ref_res.sample.numpy()
  err = float(np.abs(np.asarray(out) - ref_out).max() / np.abs(ref_out).max())
  s = 9 * (args.latent // 2) ** 2
  hist = 2 * (args.latent // 2) ** 2 + (-(-args.latent // 4)) ** 2 + 4 * (-(-args.latent // 8)) ** 2
  jm, tm = statistics.median(jax_times), statistics.median(torch_times)
  print(f"DiT forward, CPU fp32, {args.layers} layers x {args.heads} heads x {hd}, "
        f"tokens {s} noisy + {hist} history, text 512; jax {jax.__version__}, "
        f"torch {torch.__version__}; {os.cpu_count()} cores; rel err {err:.2e}")
  print(f"{'impl':<26}{'median ms':>12}{'min ms':>10}")
  print(f"{'jax jit (xla)':<26}{jm * 1e3:>12.1f}{min(jax_times) * 1e3:>10.1f}"
        f"   (first call incl. compile {compile_s:.1f} s)")
  print(f"{'diffusers eager':<26}{tm * 1e3:>12.1f}{min(torch_times) * 1e3:>10.1f}")
  print(f"speed ratio diffusers/jax: {tm / jm:.2f}x")


if __name__ == "__main__":
  main()
