"""Wan VAE decode speed: jitted JAX vs diffusers eager (CPU), or per-chunk time at Wan 2.1 size.

  python benchmarks/vae.py [--base_dim 32] [--height 64] [--width 64] [--latent_frames 9]
  python benchmarks/vae.py --preset wan2.1 --height 384 --width 640 [--precision highest] [--torch]
  python benchmarks/vae.py --preset wan2.1 --height 384 --width 640 --dry_run

Default mode (CPU): a thin VAE with the Wan 2.1 block structure (base_dim 32 instead of 96) with
random weights, saved by diffusers and loaded through `load_vae`; decodes `--latent_frames`
latents (1 + 4(n-1) frames) with both implementations in fp32 and prints a table with the ratio
and the relative error.

`--preset wan2.1`: the default Wan 2.1 VAE (126.9M parameters, random weights) on JAX's default
device (meant for a GPU); reports compile time and per-chunk decode time (one 9-latent chunk =
33 frames, as the Helios sampler decodes it). `--torch` also times diffusers on CUDA (if torch
sees a GPU). `--dry_run` only traces and lowers the jitted decode with abstract parameters
(no parameters allocated, no compile), to check that the full-size program builds.
Not a test: no assertions on time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import statistics
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ helpers
from _timing import compile_and_time, timeit, torch_time  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helios_jax.models import vae as vae_lib


def _row(name: str, times: list[float], extra: str = "") -> str:
  return (f"{name:<30}{statistics.median(times) * 1e3:>12.1f}{min(times) * 1e3:>10.1f}"
          f"{extra}")


def dry_run(config: vae_lib.WanVAEConfig, args) -> None:
  """Traces + lowers the jitted decode (and encode) at full size with abstract parameters."""
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: vae_lib.VAE_SPEC.build(config, jnp.float32)))
  s = config.spatial_factor
  z = jax.ShapeDtypeStruct(
      (args.batch, config.z_dim, args.latent_frames, args.height // s, args.width // s),
      jnp.float32)
  decode = jax.jit(functools.partial(vae_lib.decode_latents, graphdef))
  t0 = time.perf_counter()
  out = jax.eval_shape(decode, abstract, z)
  hlo = decode.lower(abstract, z).as_text()
  print(f"dry run: decode {z.shape} -> {out.shape} {out.dtype}; lowered to "
        f"{len(hlo.splitlines())} StableHLO lines in {time.perf_counter() - t0:.1f} s")
  frames = config.num_pixel_frames(args.latent_frames)
  video = jax.ShapeDtypeStruct((args.batch, config.in_channels, frames, args.height, args.width),
                               jnp.float32)
  mean, _ = jax.eval_shape(functools.partial(vae_lib.encode_moments, graphdef), abstract, video)
  print(f"dry run: encode {video.shape} -> mean {mean.shape}")


def bench_preset(config: vae_lib.WanVAEConfig, args) -> None:
  """Per-chunk decode time of the full-size VAE on JAX's default device."""
  vae = vae_lib.init_vae(config, seed=0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vae.params))
  s = config.spatial_factor
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal(
      (args.batch, config.z_dim, args.latent_frames, args.height // s, args.width // s),
      np.float32))
  frames = config.num_pixel_frames(args.latent_frames)
  _, compile_s, times = compile_and_time(lambda: vae.decode(z).block_until_ready(), args.repeats)
  dev = jax.devices()[0]
  print(f"Wan VAE decode, preset {args.preset} ({n_params:,} params, random weights), fp32, "
        f"precision {args.precision}; latents {tuple(z.shape)} -> {frames} frames "
        f"{args.height}x{args.width}; jax {jax.__version__} on {dev.platform} "
        f"({dev.device_kind})")
  print(f"{'impl':<30}{'median ms':>12}{'min ms':>10}{'frames/s':>10}")
  med = statistics.median(times)
  print(_row("jax jit decode (per chunk)", times, f"{args.batch * frames / med:>10.1f}"
             f"   (first call incl. compile {compile_s:.1f} s)"))
  if args.encode:
    video = jnp.asarray(rng.uniform(-1, 1, (args.batch, config.in_channels, frames, args.height,
                                            args.width)).astype(np.float32))
    _, enc_compile, enc_times = compile_and_time(lambda: vae.encode(video).block_until_ready(),
                                                 args.repeats)
    print(_row("jax jit encode (per chunk)", enc_times,
               f"{args.batch * frames / statistics.median(enc_times):>10.1f}"
               f"   (first call incl. compile {enc_compile:.1f} s)"))
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import AutoencoderKLWan  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      print("torch: no CUDA device; skipped")
      return
    ref = AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v
                              for k, v in config.to_dict().items()}).eval().cuda()
    zt = torch.from_numpy(np.asarray(z)).cuda()

    def run_torch():
      with torch.no_grad():
        ref.decode(zt)
      torch.cuda.synchronize()

    run_torch()
    t_times = timeit(run_torch, args.repeats)
    tm = statistics.median(t_times)
    print(_row("diffusers eager cuda decode", t_times, f"{args.batch * frames / tm:>10.1f}"))
    print(f"speed ratio diffusers/jax: {tm / med:.2f}x")


def bench_cpu(args) -> None:
  """Jitted JAX vs diffusers eager on CPU, same random weights."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKLWan  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = AutoencoderKLWan(base_dim=args.base_dim).eval()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    vae = vae_lib.load_vae(d, device=jax.devices("cpu")[0])  # committed: jit runs on CPU
  config = vae.config
  s = config.spatial_factor
  g = torch.Generator().manual_seed(0)
  z = torch.randn(args.batch, config.z_dim, args.latent_frames, args.height // s,
                  args.width // s, generator=g)
  z_np = z.numpy()
  frames = config.num_pixel_frames(args.latent_frames)

  out, compile_s, jax_times = compile_and_time(lambda: vae.decode(z_np).block_until_ready(),
                                               args.repeats)
  ref_res, torch_times = torch_time(lambda: ref.decode(z), args.repeats)
  ref_out = ref_res.sample.numpy()
  err = float(np.abs(np.asarray(out) - ref_out).max() / np.abs(ref_out).max())
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vae.params))
  jm, tm = statistics.median(jax_times), statistics.median(torch_times)
  print(f"Wan VAE decode, CPU fp32, base_dim {args.base_dim} ({n_params:,} params), latents "
        f"{tuple(z.shape)} -> {frames} frames {args.height}x{args.width}; jax {jax.__version__}, "
        f"torch {torch.__version__}; {os.cpu_count()} cores; rel err {err:.2e}")
  print(f"{'impl':<30}{'median ms':>12}{'min ms':>10}")
  print(_row("jax jit", jax_times, f"   (first call incl. compile {compile_s:.1f} s)"))
  print(_row("diffusers eager", torch_times))
  print(f"speed ratio diffusers/jax: {tm / jm:.2f}x")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(vae_lib.VAE_PRESETS), default=None,
                 help="full-size mode with a preset config and random weights (GPU)")
  p.add_argument("--base_dim", type=int, default=32, help="CPU mode: VAE width")
  p.add_argument("--height", type=int, default=64)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--latent_frames", type=int, default=9)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--precision", choices=("default", "high", "highest"), default="default",
                 help="jax_default_matmul_precision for convs/matmuls (TF32 vs fp32 on GPU)")
  p.add_argument("--encode", action="store_true", help="preset mode: also time encode")
  p.add_argument("--torch", action="store_true", help="preset mode: also time diffusers (CUDA)")
  p.add_argument("--dry_run", action="store_true",
                 help="preset mode: only trace/lower with abstract parameters")
  args = p.parse_args()
  ctx = (contextlib.nullcontext() if args.precision == "default"
         else jax.default_matmul_precision(args.precision))
  with ctx:
    if args.preset is None:
      if args.dry_run or args.torch or args.encode:
        p.error("--dry_run/--torch/--encode need --preset")
      bench_cpu(args)
      return
    config = vae_lib.WanVAEConfig.from_preset(args.preset)
    if args.height % config.spatial_factor or args.width % config.spatial_factor:
      p.error(f"--height {args.height} / --width {args.width} must be multiples of "
              f"{config.spatial_factor}")
    if args.dry_run:
      dry_run(config, args)
    else:
      bench_preset(config, args)


if __name__ == "__main__":
  main()
