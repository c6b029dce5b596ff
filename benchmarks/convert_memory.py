"""Peak host RAM of the transformer converter and exporter on a synthetic full-width bf16 checkpoint.

  python benchmarks/convert_memory.py --layers 4 8 [--mode convert|export|both]
      [--workdir /tmp/helios_convert_mem]

Writes a diffusers-layout `transformer/` folder with the exact 14B tensor shapes (random bf16
values, one shard per block) for each layer count, converts it (`helios_jax.convert`, default
`--dtype keep`: bf16 stays bf16) in a subprocess and, for `--mode export|both`, exports the
result back to diffusers safetensors (`helios_jax.export`, 5 GB shards) in another subprocess,
reading each child's peak RSS. Both peaks are affine in the size of the largest stacked leaf
(the FFN kernels: layers x 5120 x 13824), so two layer counts give the slope and the 40-layer
extrapolation printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from helios_jax.config import HeliosTransformerConfig


def torch_shapes(cfg: HeliosTransformerConfig) -> dict[str, tuple[int, ...]]:
  """diffusers state-dict shapes (architecture.md §5) for `cfg`."""
  d, f = cfg.inner_dim, cfg.ffn_dim
  top = {
      "patch_embedding.weight": (d, 16, 1, 2, 2), "patch_embedding.bias": (d,),
      "patch_short.weight": (d, 16, 1, 2, 2), "patch_short.bias": (d,),
      "patch_mid.weight": (d, 16, 2, 4, 4), "patch_mid.bias": (d,),
      "patch_long.weight": (d, 16, 4, 8, 8), "patch_long.bias": (d,),
      "condition_embedder.time_embedder.linear_1.weight": (d, cfg.freq_dim),
      "condition_embedder.time_embedder.linear_1.bias": (d,),
      "condition_embedder.time_embedder.linear_2.weight": (d, d),
      "condition_embedder.time_embedder.linear_2.bias": (d,),
      "condition_embedder.time_proj.weight": (6 * d, d),
      "condition_embedder.time_proj.bias": (6 * d,),
      "condition_embedder.text_embedder.linear_1.weight": (d, cfg.text_dim),
      "condition_embedder.text_embedder.linear_1.bias": (d,),
      "condition_embedder.text_embedder.linear_2.weight": (d, d),
      "condition_embedder.text_embedder.linear_2.bias": (d,),
      "norm_out.scale_shift_table": (1, 2, d), "proj_out.weight": (64, d),
      "proj_out.bias": (64,),
  }
  block = {"scale_shift_table": (1, 6, d), "norm2.weight": (d,), "norm2.bias": (d,),
           "ffn.net.0.proj.weight": (f, d), "ffn.net.0.proj.bias": (f,),
           "ffn.net.2.weight": (d, f), "ffn.net.2.bias": (d,)}
  for a in ("attn1", "attn2"):
    for p in ("to_q", "to_k", "to_v", "to_out.0"):
      block[f"{a}.{p}.weight"], block[f"{a}.{p}.bias"] = (d, d), (d,)
    block[f"{a}.norm_q.weight"], block[f"{a}.norm_k.weight"] = (d,), (d,)
  return top, block


def write_checkpoint(folder: str, layers: int) -> int:
  """Writes a sharded bf16 checkpoint; returns its size in bytes."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = HeliosTransformerConfig(num_layers=layers)
  os.makedirs(folder, exist_ok=True)
  top, block = torch_shapes(cfg)
  rng = np.random.default_rng(0)
  rand = lambda s: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  weight_map, total = {}, 0
  shards = [("top", top)] + [(f"b{i}", {f"blocks.{i}.{k}": s for k, s in block.items()})
                             for i in range(layers)]
  for n, (tag, shapes) in enumerate(shards):
    name = f"diffusion_pytorch_model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {k: rand(s) for k, s in shapes.items()}
    save_file(tensors, os.path.join(folder, name))
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update({k: name for k in tensors})
    del tensors, tag
  with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  cfg.to_json(os.path.join(folder, "config.json"), _class_name="HeliosTransformer3DModel")
  return total


def _child_peak_rss(call: str) -> tuple[float, float]:
  """Runs `call` (Python source) in a child process; returns (peak RSS GB, seconds)."""
  t0 = time.perf_counter()
  code = (f"import resource; {call}; "
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
  return int(out.stdout.strip().splitlines()[-1]) / 1e6, time.perf_counter() - t0


def convert_peak_rss(src: str, dst: str) -> tuple[float, float]:
  """Runs the converter (default dtype: keep) in a child process; (peak RSS GB, seconds)."""
  shutil.rmtree(dst, ignore_errors=True)
  return _child_peak_rss("from helios_jax import convert; "
                         f"convert.convert({src!r}, {dst!r}, progress=False)")


def export_peak_rss(src: str, dst: str) -> tuple[float, float]:
  """Runs the exporter (Orbax -> safetensors, 5 GB shards) in a child process."""
  shutil.rmtree(dst, ignore_errors=True)
  return _child_peak_rss("from helios_jax import export; "
                         f"export.export({src!r}, {dst!r}, progress=False)")


def _largest_leaf_gb(layers: int) -> float:
  cfg = HeliosTransformerConfig(num_layers=layers)
  return layers * cfg.inner_dim * cfg.ffn_dim * 2 / 1e9


def _fit(rows, col: int, size_col: int = 1) -> str:
  (n0, *r0), (n1, *r1) = rows[0], rows[-1]
  p0, p1, s0, s1 = r0[col - 1], r1[col - 1], r0[size_col - 1], r1[size_col - 1]
  slope, size_slope = (p1 - p0) / (n1 - n0), (s1 - s0) / (n1 - n0)
  return (f"peak RSS {p0 + slope * (40 - n0):.2f} GB ({slope * 1e3:.0f} MB per layer) for a "
          f"{s0 + size_slope * (40 - n0):.1f} GB bf16 checkpoint")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, nargs="+", default=[4, 8])
  p.add_argument("--mode", choices=("convert", "export", "both"), default="convert",
                 help="measure the converter, the exporter (of a conversion), or both")
  p.add_argument("--workdir", default="/tmp/helios_convert_mem")
  p.add_argument("--keep", action="store_true")
  args = p.parse_args()
  rows = []
  for n in args.layers:
    src, dst = os.path.join(args.workdir, f"src{n}"), os.path.join(args.workdir, f"dst{n}")
    back = os.path.join(args.workdir, f"export{n}")
    size = write_checkpoint(src, n)
    c_peak, c_secs = convert_peak_rss(src, dst)
    e_peak, e_secs = (export_peak_rss(dst, back) if args.mode in ("export", "both")
                      else (float("nan"), float("nan")))
    rows.append((n, size / 1e9, _largest_leaf_gb(n), c_peak, c_secs, e_peak, e_secs))
    if not args.keep:
      for folder in (src, dst, back):
        shutil.rmtree(folder, ignore_errors=True)
  print(f"{'layers':>6}{'ckpt GB':>10}{'largest leaf GB':>17}{'convert RSS GB':>16}{'s':>7}"
        f"{'export RSS GB':>15}{'s':>7}")
  for n, gb, leaf, cp, cs, ep, es in rows:
    print(f"{n:>6}{gb:>10.2f}{leaf:>17.2f}{cp:>16.2f}{cs:>7.1f}{ep:>15.2f}{es:>7.1f}")
  if len(rows) >= 2:
    print(f"extrapolated to 40 layers (affine fit), convert: {_fit(rows, 3)}")
    if args.mode in ("export", "both"):
      print(f"extrapolated to 40 layers (affine fit), export: {_fit(rows, 5)}")


if __name__ == "__main__":
  main()
