"""Device-memory plan of the 14B pipeline per DiT precision (bf16 / fp8 / int8w), no weights.

  python benchmarks/memory_plan.py [--model distilled] [--height 384] [--width 640]
      [--modes bf16,fp8,int8w] [--no_compile]

Builds the DiT and VAE abstractly (`nnx.eval_shape`), quantizes the abstract DiT
(`quantize.quantize_transformer` on ShapeDtypeStructs), lowers the steady-state `chunk_step`
(the jitted per-chunk program: all stages and steps of one chunk) at full shapes and, unless
`--no_compile`, compiles it on this backend and reads XLA's `memory_analysis()`:
arguments (DiT params + text + history + noise), temporaries and outputs. The peak is estimated as
arguments + temporaries + outputs + VAE params (the umT5 encoder is assumed released or on the
host: `release_text_encoder=True` / `text_encoder_device=cpu`). Temporaries come from the backend
that compiled (CPU here: its fusion and fp8/int8 up-casts differ from a GPU's; rerun on the GPU
for the card's number; on CPU the bf16 / fp8 programs hold up-cast f32 copies of the stacked
weights as temporaries, 61 / 33 GB, while int8w's 4.8 GB is close to the real activation
memory). Prints one table and which card sizes each mode fits (with 10% headroom).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from helios_jax import flops  # pylint: disable=wrong-import-position
from helios_jax import pipeline as pl  # pylint: disable=wrong-import-position
from helios_jax import quantize as quant  # pylint: disable=wrong-import-position
from helios_jax import sampling  # pylint: disable=wrong-import-position
from helios_jax import variants  # pylint: disable=wrong-import-position
from helios_jax.models import transformer as tr_lib  # pylint: disable=wrong-import-position
from helios_jax.models import vae as vae_lib  # pylint: disable=wrong-import-position
from helios_jax.text import MAX_SEQUENCE_LENGTH  # pylint: disable=wrong-import-position

CARDS_GB = (24, 40, 48, 80)
HEADROOM = 0.9  # usable fraction of a card (allocator, CUDA context, fragmentation)
GB = 1e9


def plan(mode: str, model: str, height: int, width: int, compile_it: bool) -> dict:
  """Weight bytes and XLA memory analysis of the steady chunk step for one DiT precision."""
  dit_cfg, vae_cfg, _ = variants.get_size("helios-14b").configs()
  dit = tr_lib.HeliosTransformer(
      dit_cfg, nnx.eval_shape(lambda: tr_lib.TRANSFORMER_SPEC.build(dit_cfg, jnp.bfloat16)))
  if mode != "bf16":
    dit = quant.quantize_transformer(dit, mode)
  vae = nnx.eval_shape(lambda: vae_lib.VAE_SPEC.build(vae_cfg, jnp.float32))
  sc = flops.model_sampler_config(model, height, width, patch_size=dit_cfg.patch_size)
  x = sampling.abstract_chunk_inputs(sc, dit_cfg.in_channels, dit_cfg.text_dim, jnp.bfloat16,
                                     MAX_SEQUENCE_LENGTH)
  t0 = time.perf_counter()
  lowered = pl.chunk_step.lower(dit.graphdef, sc, False, dit.params, x["text"], x["neg_text"],
                                x["state"], x["noise"], x["set_anchor"])
  out = {"mode": mode, "dit_bytes": quant.param_bytes(dit.params),
         "vae_bytes": quant.param_bytes(nnx.state(vae)), "lower_s": time.perf_counter() - t0}
  if compile_it:
    t0 = time.perf_counter()
    mem = lowered.compile().memory_analysis()
    out["compile_s"] = time.perf_counter() - t0
    if mem is not None:
      out.update(argument_bytes=int(mem.argument_size_in_bytes),
                 temp_bytes=int(mem.temp_size_in_bytes),
                 output_bytes=int(mem.output_size_in_bytes))
  return out


def peak_bytes(row: dict) -> int:
  if "temp_bytes" in row:
    return row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"] + row["vae_bytes"]
  return row["dit_bytes"] + row["vae_bytes"]  # weights only (no compile)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="distilled", choices=sorted(variants.VARIANTS))
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--modes", default="bf16,fp8,int8w")
  p.add_argument("--no_compile", action="store_true", help="lower only: weight bytes, no XLA "
                 "memory analysis")
  args = p.parse_args()
  modes = args.modes.split(",")
  bad = [m for m in modes if m != "bf16" and m not in quant.MODES]
  if bad:
    p.error(f"--modes {bad} not in {['bf16', *sorted(quant.MODES)]}")
  rows = []
  for mode in modes:
    rows.append(plan(mode, args.model, args.height, args.width, not args.no_compile))
    print(rows[-1], flush=True)
  print(f"\nHelios-14B {args.model}, {args.height}x{args.width}, steady chunk_step on "
        f"{jax.default_backend()} (GB = 1e9 bytes)")
  cards = " / ".join(f"{c}" for c in CARDS_GB)
  print(f"| DiT | DiT weights | VAE | args | temps | outputs | peak | peak fits ({cards} GB) "
        f"| weights fit ({cards} GB) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    pk, wt = peak_bytes(r), r["dit_bytes"] + r["vae_bytes"]
    fits = lambda b: " / ".join("yes" if b <= HEADROOM * c * GB else "no" for c in CARDS_GB)
    f = lambda k, r=r: f"{r[k] / GB:.2f}" if k in r else "-"
    print(f"| {r['mode']} | {f('dit_bytes')} | {f('vae_bytes')} | {f('argument_bytes')} | "
          f"{f('temp_bytes')} | {f('output_bytes')} | {pk / GB:.2f} | {fits(pk)} | "
          f"{fits(wt)} |")


if __name__ == "__main__":
  main()
