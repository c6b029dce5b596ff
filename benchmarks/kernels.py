"""Pallas kernels vs XLA (and cuDNN attention) at the Helios-14B shapes, on one GPU.

  python benchmarks/kernels.py [--backward] [--iters 20] [--json out.json]
  python benchmarks/kernels.py --cpu_smoke      # tiny shapes, Pallas interpret mode, any machine

Shapes (architecture.md §3.7, §8): the three pyramid stages at 384x640 with 2400 history
tokens, S = 2940 / 4560 / 11040 tokens, N = S - 2400 noisy tokens, 40 heads x 128 (D = 5120),
512 text tokens, bf16 activations:

  self-attention   q, k, v [1, S, 40, 128]                          4 * S * S * D FLOPs
  cross-attention  q [1, N, 40, 128], k, v [1, 512, 40, 128]        4 * N * 512 * D FLOPs
  norm1/norm3      adaLN LayerNorm x [1, S, 5120], num_history 2400  bytes: read x, write y
  norm2            affine LayerNorm x [1, N, 5120] (fp32 weight, bias)
  q/k norm         RMSNorm x [1, S, 5120]
  RoPE             x [1, S, 40, 128], cos/sin [1, S, 64] fp32
  q/k norm + RoPE  fused kernel vs the two unfused ones

Each row reports the median time of `--iters` back-to-back calls of a jitted function, the
achieved TFLOP/s (attention; backward counts 2.5x the forward FLOPs) or GB/s (the others,
counting the bytes each op must move), the fraction of H100 SXM peak (989 TFLOP/s dense bf16,
3.35 TB/s HBM3) and the max error relative to the XLA reference (max|out - ref| / max|ref|).
Without a GPU (and without --cpu_smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels import norm as norm_lib
from pallas_kernels import rope as rope_lib

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
PEAK_GBPS = 3350.0  # H100 SXM HBM3

HISTORY = 2400
TEXT = 512
HEADS, HEAD_DIM = 40, 128
STAGES = (2940, 4560, 11040)


@dataclasses.dataclass
class Row:
  op: str
  shape: str
  impl: str
  ms: float
  work: float  # FLOPs (attention) or bytes (memory-bound ops)
  unit: str  # "TFLOP/s" or "GB/s"
  rel_err: float

  @property
  def rate(self) -> float:
    scale = 1e12 if self.unit == "TFLOP/s" else 1e9
    return self.work / (self.ms * 1e-3) / scale

  @property
  def peak_fraction(self) -> float:
    return self.rate / (PEAK_TFLOPS if self.unit == "TFLOP/s" else PEAK_GBPS)


def time_ms(fn: Callable, args, iters: int) -> float:
  """Median wall time (ms) of fn(*args), measured over groups of back-to-back async calls."""
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))
  per_call = []
  group = max(1, iters // 5)
  for _ in range(5):
    t0 = time.perf_counter()
    out = None
    for _ in range(group):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / group * 1e3)
  return statistics.median(per_call)


def rel_err(out, ref) -> float:
  def leaves(t):
    return [np.asarray(jnp.asarray(x, jnp.float32)) for x in jax.tree_util.tree_leaves(t)]
  errs = [np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
          for a, b in zip(leaves(out), leaves(ref))]
  return float(max(errs))


def _rand(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def attention_rows(b, sq, skv, h, d, dtype, impls, backward, iters, interpret, op):
  """Times attention forward (and forward+backward) for each impl."""
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (_rand(ks[0], (b, sq, h, d), dtype), _rand(ks[1], (b, skv, h, d), dtype),
             _rand(ks[2], (b, skv, h, d), dtype))
  flops = 4.0 * b * h * sq * skv * d
  shape = f"q[{b},{sq},{h},{d}] kv[{skv}]"
  fns = {impl: jax.jit(lambda q, k, v, impl=impl: dispatch.attention(
      q, k, v, impl=impl, interpret=interpret)) for impl in impls}
  ref = fns["xla"](q, k, v)
  rows = []
  for impl, fn in fns.items():
    err = rel_err(fn(q, k, v), ref)
    rows.append(Row(op, shape, impl, time_ms(fn, (q, k, v), iters), flops, "TFLOP/s", err))
  if backward:
    ct = _rand(ks[3], q.shape, dtype)
    grads = {impl: jax.jit(jax.grad(
        lambda q, k, v, impl=impl: jnp.sum(dispatch.attention(
            q, k, v, impl=impl, interpret=interpret).astype(jnp.float32) * ct),
        argnums=(0, 1, 2))) for impl in impls}
    gref = grads["xla"](q, k, v)
    for impl, fn in grads.items():
      err = rel_err(fn(q, k, v), gref)
      rows.append(Row(op + " fwd+bwd", shape, impl, time_ms(fn, (q, k, v), iters),
                      3.5 * flops, "TFLOP/s", err))
  return rows


def memory_rows(op, shape, nbytes, fns: dict[str, Callable], args, iters):
  ref = fns["xla"](*args)
  return [Row(op, shape, impl, time_ms(fn, args, iters), nbytes, "GB/s", rel_err(fn(*args), ref))
          for impl, fn in fns.items()]


def norm_rope_rows(s, n, d, h, hd, dtype, iters, interpret):
  ks = jax.random.split(jax.random.PRNGKey(1), 8)
  it = jnp.dtype(dtype).itemsize
  x = _rand(ks[0], (1, s, d), dtype, 2.0)
  xn = x[:, s - n:]
  w = _rand(ks[1], (d,), dtype)
  w32, b32 = _rand(ks[2], (d,), jnp.float32), _rand(ks[3], (d,), jnp.float32)
  shift, scale = _rand(ks[4], (1, 2, d), jnp.float32), _rand(ks[5], (1, 2, d), jnp.float32, 0.5)
  ang = jax.random.uniform(ks[6], (1, s, hd // 2), jnp.float32, 0.0, 100.0)
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xr = x.reshape(1, s, h, hd)
  hist = s - n

  def both(make):
    return {impl: jax.jit(make(impl)) for impl in ("xla", "pallas")}

  rows = []
  rows += memory_rows(
      "adaLN LayerNorm", f"[1,{s},{d}] hist {hist}", 2 * s * d * it + 4 * d * 4,
      both(lambda impl: lambda x, sh, sc: dispatch.layer_norm_modulate(
          x, sh, sc, num_history=hist, impl=impl, interpret=interpret)),
      (x, shift, scale), iters)
  rows += memory_rows(
      "LayerNorm affine", f"[1,{n},{d}]", 2 * n * d * it + 2 * d * 4,
      both(lambda impl: lambda x, w, b: dispatch.layer_norm(
          x, w, b, eps=1e-6, impl=impl, interpret=interpret)),
      (xn, w32, b32), iters)
  rows += memory_rows(
      "RMSNorm", f"[1,{s},{d}]", 2 * s * d * it + d * it,
      both(lambda impl: lambda x, w: dispatch.rms_norm(
          x, w, eps=1e-6, impl=impl, interpret=interpret)),
      (x, w), iters)
  rows += memory_rows(
      "RoPE", f"[1,{s},{h},{hd}]", 2 * s * d * it + 2 * s * (hd // 2) * 4,
      both(lambda impl: lambda x, c, sn: dispatch.apply_rope(
          x, c, sn, impl=impl, interpret=interpret)),
      (xr, cos, sin), iters)
  fused = both(lambda impl: lambda x, w, c, sn: dispatch.rms_norm_rope(
      x, w, c, sn, heads=h, impl=impl, interpret=interpret))
  fused["pallas unfused"] = jax.jit(lambda x, w, c, sn: rope_lib.apply_rope(
      norm_lib.rms_norm(x, w, eps=1e-6, interpret=interpret).reshape(1, s, h, hd), c, sn,
      interpret=interpret))
  rows += memory_rows("RMSNorm+RoPE", f"[1,{s},{d}]", 2 * s * d * it + 2 * s * (hd // 2) * 4,
                      fused, (x, w, cos, sin), iters)
  return rows


def print_rows(rows: list[Row]) -> None:
  head = (f"{'op':<24} {'shape':<28} {'impl':<15} {'ms':>9} {'rate':>16} {'% peak':>7} "
          f"{'rel err':>9}")
  print(head)
  print("-" * len(head))
  for r in rows:
    print(f"{r.op:<24} {r.shape:<28} {r.impl:<15} {r.ms:>9.3f} "
          f"{r.rate:>9.1f} {r.unit:<6} {100 * r.peak_fraction:>6.1f}% {r.rel_err:>9.2e}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cpu_smoke", action="store_true",
                 help="tiny shapes with Pallas in interpret mode (any backend)")
  p.add_argument("--backward", action="store_true", help="also time attention fwd+bwd")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--stages", type=int, nargs="*", default=list(STAGES),
                 help="total token counts S to run (history is 2400 tokens)")
  p.add_argument("--json", default=None, help="write the rows to this JSON file")
  args = p.parse_args(argv)

  on_gpu = jax.devices()[0].platform == "gpu"
  if not on_gpu and not args.cpu_smoke:
    print(f"No GPU present (default backend: {jax.devices()[0].platform}); the kernel benchmark "
          "needs one. Use --cpu_smoke for a tiny interpret-mode run.")
    return 0

  if args.cpu_smoke:
    stages, hist, text, heads, hd, iters = [37], 20, 16, 2, 64, 1
    interpret, impls = True, ("xla", "pallas")
  else:
    stages, hist, text, heads, hd, iters = args.stages, HISTORY, TEXT, HEADS, HEAD_DIM, args.iters
    interpret, impls = False, ("xla", "pallas", "cudnn")
  d = heads * hd
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), jax "
        f"{jax.__version__}; peaks: {PEAK_TFLOPS:.0f} TFLOP/s, {PEAK_GBPS:.0f} GB/s (H100 SXM)")
  rows: list[Row] = []
  for s in stages:
    n = max(1, s - hist)
    stage = attention_rows(1, s, s, heads, hd, jnp.bfloat16, impls, args.backward, iters,
                           interpret, "self-attention")
    stage += attention_rows(1, n, text, heads, hd, jnp.bfloat16, impls, args.backward, iters,
                            interpret, "cross-attention")
    stage += norm_rope_rows(s, n, d, heads, hd, jnp.bfloat16, iters, interpret)
    print(f"\nS = {s} tokens ({n} noisy, {s - n} history):")
    print_rows(stage)
    rows += stage
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dict(dataclasses.asdict(r), rate=r.rate, peak_fraction=r.peak_fraction)
                 for r in rows], f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
