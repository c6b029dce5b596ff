"""Quality of the Qwix-quantized DiT (fp8 / int8w) against the bf16 path, on CPU.

  python benchmarks/quant_quality.py [--part forward|pipeline|both] [--frames 1] [--latent 32]
      [--text_len 512] [--layers 2] [--keep_blocks first:1,last:1] [--tiny_keep_blocks first:1]

(a) forward: one DiT forward of a full-width random model (5120 wide, 40 heads, ffn 13824,
    text_dim 4096, `--layers` blocks) on `--frames` x `--latent`^2 latents (patch 1x2x2: frames *
    (latent/2)^2 noisy tokens, no history), relative L2 error of the velocity vs the same weights
    in bf16;
(b) pipeline: 3-chunk Distilled latents of the tiny preset (random weights, 128x128), the
    quantized DiT swapped into the bf16 pipeline, relative L2 error of the latents.

Variants: fp8 / int8w with every `Linear` quantized (keep=()), with `DEFAULT_KEEP` (text/time
embeddings, modulation and head kept bf16), and with `DEFAULT_KEEP` + whole blocks kept bf16
(`--keep_blocks` for (a), `--tiny_keep_blocks` for (b): the tiny preset has 2 blocks; skipped
when they would keep every block). Prints one table per part. Not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from helios_jax import quantize as quant  # pylint: disable=wrong-import-position
from helios_jax.config import HeliosTransformerConfig  # pylint: disable=wrong-import-position
from helios_jax.models import transformer as transformer_lib  # pylint: disable=wrong-import-position

VARIANTS = (("fp8", ()), ("fp8", quant.DEFAULT_KEEP), ("int8w", ()),
            ("int8w", quant.DEFAULT_KEEP))


def variants(keep_blocks: str, num_layers: int) -> list[tuple[str, tuple, str]]:
  """(mode, keep_bf16, keep_blocks) to measure: `VARIANTS`, then + kept blocks if any remain
  quantized."""
  out = [(m, k, "") for m, k in VARIANTS]
  if keep_blocks and len(quant.parse_blocks(keep_blocks, num_layers)) < num_layers:
    out += [(m, quant.DEFAULT_KEEP, keep_blocks) for m in sorted(quant.MODES)]
  return out


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _name(mode, keep, blocks="") -> str:
  return (f"{mode}" + ("+keep" if keep else " (all Linear)")
          + (f" + blocks {blocks} bf16" if blocks else ""))


def forward_inputs(cfg: HeliosTransformerConfig, frames: int, latent: int, text_len: int,
                   seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  c = cfg.in_channels
  return {
      "hidden_states": jnp.asarray(rng.standard_normal((1, c, frames, latent, latent)),
                                   jnp.bfloat16),
      "timestep": jnp.array([500.0]),
      "encoder_hidden_states": jnp.asarray(rng.standard_normal((1, text_len, cfg.text_dim)),
                                           jnp.bfloat16),
      "indices_hidden_states": jnp.arange(20, 20 + frames)[None],
  }


def part_forward(args) -> list[tuple[str, float, float]]:
  cfg = HeliosTransformerConfig(num_layers=args.layers)  # 14B widths: 5120 / 40 heads / 13824
  t0 = time.perf_counter()
  base = transformer_lib.init_transformer(cfg, jnp.bfloat16, seed=0)
  print(f"init {time.perf_counter() - t0:.1f}s, "
        f"{quant.param_bytes(base.params) / 2**30:.2f} GiB bf16 params", flush=True)
  inputs = forward_inputs(cfg, args.frames, args.latent, args.text_len)
  tokens = args.frames * (args.latent // 2) ** 2
  t0 = time.perf_counter()
  ref = np.asarray(base(**inputs), np.float32)
  rows = [(f"bf16 ({tokens} tokens)", 0.0, time.perf_counter() - t0)]
  print(rows[-1], flush=True)
  for mode, keep, blocks in variants(args.keep_blocks, args.layers):
    q = quant.quantize_transformer(base, mode, keep, blocks)
    t0 = time.perf_counter()
    out = np.asarray(q(**inputs), np.float32)
    rows.append((_name(mode, keep, blocks), rel_err(out, ref), time.perf_counter() - t0))
    print(rows[-1], flush=True)
    del q
  return rows


def part_pipeline(args) -> list[tuple[str, float, float]]:
  from helios_jax import pipeline as pl  # pylint: disable=g-import-not-at-top
  from helios_jax import presets  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    folder = presets.write_tiny_pipeline(os.path.join(d, "tiny"), "distilled")
    pipe = pl.Pipeline.from_pretrained(folder, dtype=jnp.bfloat16, load_text_encoder=False)
  return pipeline_errors(pipe, variants(args.tiny_keep_blocks,
                                       pipe.transformer.config.num_layers))


def pipeline_errors(pipe, cases, num_frames: int = 99, seed: int = 0):
  """Relative error of the 3-chunk latents of each (mode, keep[, keep_blocks]) vs `pipe` as
  loaded."""
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((1, 16, pipe.transformer.config.text_dim)).astype(np.float32)
  kw = dict(prompt_embeds=emb, num_frames=num_frames, height=128, width=128, seed=seed,
            output_type="latent")
  base = pipe.transformer
  t0 = time.perf_counter()
  ref = pipe.generate(**kw).latents
  rows = [(f"bf16 ({ref.shape[2]} latent frames)", 0.0, time.perf_counter() - t0)]
  try:
    for mode, keep, *blocks in cases:
      pipe.transformer = quant.quantize_transformer(base, mode, keep, *blocks)
      t0 = time.perf_counter()
      out = pipe.generate(**kw).latents
      rows.append((_name(mode, keep, *blocks), rel_err(out, ref), time.perf_counter() - t0))
  finally:
    pipe.transformer = base
  return rows


def print_table(title: str, rows):
  print(f"\n{title}\n| variant | rel. L2 error vs bf16 | seconds |\n|---|---|---|")
  for name, err, sec in rows:
    print(f"| {name} | {err:.4g} | {sec:.1f} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--part", choices=("forward", "pipeline", "both"), default="both")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--frames", type=int, default=1)
  p.add_argument("--latent", type=int, default=32, help="latent height = width")
  p.add_argument("--text_len", type=int, default=512)
  p.add_argument("--keep_blocks", default="first:1,last:1", help="(a): blocks kept bf16")
  p.add_argument("--tiny_keep_blocks", default="first:1", help="(b): blocks kept bf16")
  args = p.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()}; fp8 supported: "
        f"{quant.fp8_supported()}")
  if args.part in ("pipeline", "both"):
    print_table("(b) tiny Distilled, 3 chunks, latents", part_pipeline(args))
  if args.part in ("forward", "both"):
    print_table(f"(a) full-width DiT forward ({args.layers} blocks, 5120 wide)",
                part_forward(args))


if __name__ == "__main__":
  main()
