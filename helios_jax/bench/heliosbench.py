"""HeliosBench CLI: `metrics` scores a folder of videos, `merge` rates, totals and plots.

  python -m helios_jax.bench.heliosbench metrics --videos DIR --out DIR [--metrics all]
  python -m helios_jax.bench.heliosbench merge --results DIR [--short] [--fps 19.5]
"""

from __future__ import annotations

import argparse
import sys

from helios_jax.bench import merge as merge_lib
from helios_jax.bench import runner


def _metrics(args: argparse.Namespace) -> int:
  opts = runner.ScorerOptions(
      clip_model=args.clip_model, aesthetic_head=args.aesthetic_head,
      upstream_eval=args.upstream_eval, amt_ckpt=args.amt_ckpt, amt_config=args.amt_config,
      viclip_dir=args.viclip_dir, vlm_base_url=args.vlm_base_url, vlm_model=args.vlm_model,
      dtype=args.dtype, chunk_frames=args.chunk_frames)
  summary = runner.run_metrics(args.videos, args.out, args.metrics, opts,
                               prompts_csv=args.prompts, progress=not args.no_progress)
  for k, v in summary.averages.items():
    print(f"{k:<36} {v:.6f}  -> {summary.written[k]}")
  for k, why in summary.skipped.items():
    print(f"{k:<36} skipped: {why}")
  for k, items in summary.failed.items():
    for item in items:
      print(f"{k:<36} FAILED {item['video_name']}: {item['error']}")
  return 0


def _merge(args: argparse.Namespace) -> int:
  out = merge_lib.run_merge(args.results, args.out, is_long=not args.short,
                            long_aesthetic=args.long_aesthetic, fps=args.fps,
                            score_type=args.score_type, plots=not args.no_plots)
  print("wrote:\n  " + "\n  ".join(out["files"]))
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="heliosbench", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  m = sub.add_parser("metrics", help="score {id}_{duration}_ori{frames}.mp4 videos")
  m.add_argument("--videos", required=True, help="folder of one model's videos")
  m.add_argument("--out", required=True, help="results folder (reused as a cache by id)")
  m.add_argument("--metrics", nargs="+", default=["all"],
                 help="metric keys or groups: all, upstream, model_free, proxies")
  m.add_argument("--prompts", default=None,
                 help="prompt CSV (default: repo helios_t2v_prompts.csv)")
  m.add_argument("--clip-model", default=None, help="CLIP ViT-L/14: HF folder, Orbax export or "
                 "OpenAI ViT-L-14.pt [env HELIOS_BENCH_CLIP_MODEL]")
  m.add_argument("--aesthetic-head", default=None,
                 help="LAION head sa_0_4_vit_l_14_linear.pth [env HELIOS_BENCH_AESTHETIC_HEAD]")
  m.add_argument("--upstream-eval", default=None, help="copy of Helios' eval/ folder (AMT-S, "
                 "ViCLIP code) [env HELIOS_BENCH_UPSTREAM_EVAL]")
  m.add_argument("--amt-ckpt", default=None, help="amt-s.pth [env HELIOS_BENCH_AMT_CKPT]")
  m.add_argument("--amt-config", default=None, help="AMT YAML [env HELIOS_BENCH_AMT_CONFIG]")
  m.add_argument("--viclip-dir", default=None, help="folder with ViClip-InternVid-10M-FLT.pth and "
                 "bpe_simple_vocab_16e6.txt.gz [env HELIOS_BENCH_VICLIP_DIR]")
  m.add_argument("--vlm-base-url", default=None, help="OpenAI-compatible endpoint for "
                 "Naturalness [env HELIOS_BENCH_VLM_BASE_URL]; key from HELIOS_BENCH_VLM_API_KEY")
  m.add_argument("--vlm-model", default=None, help="judge model [env HELIOS_BENCH_VLM_MODEL, "
                 "default gpt-5.2-2025-12-11]")
  m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="JAX CLIP parameter dtype")
  m.add_argument("--chunk-frames", type=int, default=33, help="frames per chunk for the curves")
  m.add_argument("--no-progress", action="store_true")
  m.set_defaults(fn=_metrics)

  g = sub.add_parser("merge", help="ratings, totals, summary table, plots")
  g.add_argument("--results", required=True, help="a model's results folder or a folder of them")
  g.add_argument("--out", default=None, help="summary/plots folder (default: --results)")
  g.add_argument("--short", action="store_true", help="short-video rules (default: long rules)")
  g.add_argument("--long-aesthetic", default="upstream", choices=["upstream", "fixed"],
                 help="'upstream' keeps the duplicated long-Aesthetic thresholds (0.45, 0.40 "
                 "for ratings 3 and 2, which makes them unreachable); 'fixed' uses 0.35, 0.30")
  g.add_argument("--fps", type=float, default=None, help="end-to-end FPS for the Throughput Score")
  g.add_argument("--score-type", default="rating", choices=["rating", "raw", "normalized"])
  g.add_argument("--no-plots", action="store_true")
  g.set_defaults(fn=_merge)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"heliosbench {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
