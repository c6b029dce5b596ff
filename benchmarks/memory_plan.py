"""Device-memory plan of the 14B pipeline per DiT precision and placement, no weights.

  python benchmarks/memory_plan.py [--model distilled] [--height 384] [--width 640]
      [--modes bf16,fp8,int8w,bf16+low,fp8+low,int8w+low] [--no_compile]

Builds the DiT and VAE abstractly (`nnx.eval_shape`), quantizes the abstract DiT
(`quantize.quantize_transformer` on ShapeDtypeStructs), for "+low" modes puts the stacked block
weights in host memory (`offload.offload_blocks`: low-memory mode, one layer at a time on the
device), lowers the steady-state `chunk_step` (the jitted per-chunk program: all stages and steps
of one chunk) at full shapes and, unless `--no_compile`, compiles it on this backend and reads
XLA's `memory_analysis()`: arguments (DiT params + text + history + noise), temporaries and
outputs. Host-resident block weights are not device memory: where the backend reports host
arguments separately (GPU) they are excluded by XLA, on CPU (one memory) they are subtracted
here. The peak is estimated as device arguments + VAE params + the larger of the chunk step's
temporaries + outputs and the VAE decode's (one 33-frame chunk, `decode_step` compiled the same
way; they run one after the other; the umT5 encoder is assumed released or on the host:
`release_text_encoder=True` / `text_encoder_device=cpu`).
Temporaries come from the backend that compiled (CPU here: its fusion and fp8/int8 up-casts differ
from a GPU's; rerun on the GPU for the card's number; on CPU the bf16 / fp8 programs hold up-cast
f32 copies of the stacked weights as temporaries, 61 / 33 GB, while int8w's 4.8 GB is close to the
real activation memory, so "est. peak" uses int8w's temporaries of the same placement for every
mode). Prints one table: the weights on the host (host RAM needed for them), the device peak, the
estimate, and which card sizes the estimate fits (with 10% headroom).
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
from helios_jax import offload  # pylint: disable=wrong-import-position
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


def _mem(compiled) -> dict:
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  return {"argument_bytes": int(mem.argument_size_in_bytes),
          "host_argument_bytes": int(getattr(mem, "host_argument_size_in_bytes", 0) or 0),
          "temp_bytes": int(mem.temp_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes)}


def vae_decode_plan(height: int, width: int) -> dict:
  """XLA memory analysis of decoding one chunk (9 latent -> 33 frames, fp32 VAE)."""
  _, vae_cfg, _ = variants.get_size("helios-14b").configs()
  graphdef, params = nnx.split(nnx.eval_shape(lambda: vae_lib.VAE_SPEC.build(vae_cfg,
                                                                              jnp.float32)))
  h, w = height // 8, width // 8
  lat = jax.ShapeDtypeStruct((1, 9, h, w, vae_cfg.z_dim), jnp.float32)
  stat = jax.ShapeDtypeStruct((1, vae_cfg.z_dim, 1, 1, 1), jnp.float32)
  lowered = pl.decode_step.lower(graphdef, params, lat, stat, stat, "uint8")
  return _mem(lowered.compile())


def plan(mode: str, model: str, height: int, width: int, compile_it: bool) -> dict:
  """Weight bytes and XLA memory analysis of the steady chunk step for one DiT mode."""
  precision, low = mode.removesuffix("+low"), mode.endswith("+low")
  dit_cfg, vae_cfg, _ = variants.get_size("helios-14b").configs()
  dit = tr_lib.HeliosTransformer(
      dit_cfg, nnx.eval_shape(lambda: tr_lib.TRANSFORMER_SPEC.build(dit_cfg, jnp.bfloat16)))
  if precision != "bf16":
    dit = quant.quantize_transformer(dit, precision)
  if low:
    dit = offload.offload_blocks(dit)
  vae = nnx.eval_shape(lambda: vae_lib.VAE_SPEC.build(vae_cfg, jnp.float32))
  sc = flops.model_sampler_config(model, height, width, patch_size=dit_cfg.patch_size)
  x = sampling.abstract_chunk_inputs(sc, dit_cfg.in_channels, dit_cfg.text_dim, jnp.bfloat16,
                                     MAX_SEQUENCE_LENGTH)
  t0 = time.perf_counter()
  lowered = pl.chunk_step.lower(dit.graphdef, sc, False, dit.params, x["text"], x["neg_text"],
                                x["state"], x["noise"], x["set_anchor"])
  out = {"mode": mode, "dit_bytes": quant.param_bytes(dit.params),
         "host_bytes": offload.block_bytes(dit.params) if low else 0,
         "vae_bytes": quant.param_bytes(nnx.state(vae)), "lower_s": time.perf_counter() - t0}
  if compile_it:
    t0 = time.perf_counter()
    out.update(_mem(lowered.compile()))
    out["compile_s"] = time.perf_counter() - t0
    if "argument_bytes" in out and out["host_bytes"] and not out["host_argument_bytes"]:
      out["argument_bytes"] -= out["host_bytes"]  # one memory (CPU): host weights counted in
  return out


def peak_bytes(row: dict, vae: dict, temps: int | None = None) -> int:
  """Device bytes: resident (DiT device args, VAE params) + the larger of the chunk step's and
  the VAE decode's working memory (they run one after the other). `temps`: the chunk step's
  temporaries to use (default: the row's own)."""
  if "temp_bytes" not in row:
    return row["dit_bytes"] - row["host_bytes"] + row["vae_bytes"]  # weights only (no compile)
  temps = row["temp_bytes"] if temps is None else temps
  return (row["argument_bytes"] + row["vae_bytes"]
          + max(temps + row["output_bytes"], vae.get("temp_bytes", 0) + vae.get("output_bytes", 0)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="distilled", choices=sorted(variants.VARIANTS))
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--modes", default="bf16,fp8,int8w,bf16+low,fp8+low,int8w+low")
  p.add_argument("--no_compile", action="store_true", help="lower only: weight bytes, no XLA "
                 "memory analysis")
  args = p.parse_args()
  modes = args.modes.split(",")
  bad = [m for m in modes if m.removesuffix("+low") != "bf16"
         and m.removesuffix("+low") not in quant.MODES]
  if bad:
    p.error(f"--modes {bad} not in {['bf16', *sorted(quant.MODES)]} (each optionally +low)")
  vae = {}
  if not args.no_compile:
    vae = vae_decode_plan(args.height, args.width)
    print({"vae_decode": vae}, flush=True)
  rows = []
  for mode in modes:
    rows.append(plan(mode, args.model, args.height, args.width, not args.no_compile))
    print(rows[-1], flush=True)
  # Activation proxy: int8w's temporaries (its weights are dequantized per use, so they hold no
  # up-cast copy of the stack, unlike CPU bf16 / fp8 programs) with the same placement.
  proxy = {r["mode"].endswith("+low"): r["temp_bytes"] for r in rows
           if r["mode"].removesuffix("+low") == "int8w" and "temp_bytes" in r}
  print(f"\nHelios-14B {args.model}, {args.height}x{args.width}, steady chunk_step on "
        f"{jax.default_backend()} (GB = 1e9 bytes; VAE decode of one chunk: temporaries "
        f"{vae.get('temp_bytes', 0) / GB:.2f})")
  cards = " / ".join(f"{c}" for c in CARDS_GB)
  print(f"| DiT | DiT weights | on host | VAE | device args | temps | peak | est. peak "
        f"(int8w temps) | est. fits ({cards} GB) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    pk = peak_bytes(r, vae)
    low = r["mode"].endswith("+low")
    est = peak_bytes(r, vae, proxy[low]) if low in proxy else pk
    fits = " / ".join("yes" if est <= HEADROOM * c * GB else "no" for c in CARDS_GB)
    f = lambda k, r=r: f"{r[k] / GB:.2f}" if k in r else "-"
    print(f"| {r['mode']} | {f('dit_bytes')} | {f('host_bytes')} | {f('vae_bytes')} | "
          f"{f('argument_bytes')} | {f('temp_bytes')} | {pk / GB:.2f} | {est / GB:.2f} | "
          f"{fits} |")

if __name__ == "__main__":
  main()
