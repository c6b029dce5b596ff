"""HeliosBench CLI: `generate` videos, `metrics` scores a folder, `merge` rates, totals, plots.

  python -m helios_jax.heliosbench generate --model_dir DIR --out VIDEOS \
      [--ids 1-10 ...] [--durations 120 240] [--height 384 --width 640 --steps 2 2 2 --seed 42]
  python -m helios_jax.heliosbench metrics --videos VIDEOS --out RESULTS [--metrics all]
  python -m helios_jax.heliosbench merge --results RESULTS [--short] \
      [--fps 19.5 | --fps-from VIDEOS]

`generate` writes `{id}_{duration}_ori{frames}.mp4` (resumable; see `generation.py`) plus
`timings.json` with the end-to-end FPS that `merge --fps-from` turns into the Throughput Score.
Without `--model_dir` it runs the embedded tiny random pipeline (128x128) so it works anywhere.
"""

from __future__ import annotations

import argparse
import sys

from helios_jax import variants
from helios_jax.constants import CHUNK_FRAMES
from helios_jax.heliosbench import generation
from helios_jax.heliosbench import merge as merge_lib
from helios_jax.heliosbench import naming
from helios_jax.heliosbench import runner


def _generate(args: argparse.Namespace) -> int:
  opts = generation.GenerateOptions(
      out=args.out, model_dir=args.model_dir, prompts_csv=args.prompts,
      ids=generation.parse_ids(args.ids), durations=args.durations, max_frames=args.max_frames,
      height=args.height, width=args.width, steps=args.steps, guidance_scale=args.guidance_scale,
      amplify_first_chunk=args.amplify_first_chunk, seed=args.seed,
      negative_prompt=args.negative_prompt, dtype=args.dtype, tiny_model=args.tiny_model,
      video_fps=args.video_fps, warmup=args.warmup, text_encoder_on_cpu=args.text_encoder_on_cpu,
      release_text_encoder=args.release_text_encoder, progress=not args.no_progress)
  summary = generation.run_generate(opts)
  print(f"generated {len(summary.written)} video(s), {len(summary.skipped)} already present in "
        f"{summary.out}")
  return 0


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
  fps = args.fps
  if args.fps_from is not None:
    if fps is not None:
      raise ValueError(f"pass --fps ({fps}) or --fps-from ({args.fps_from}), not both")
    timings = generation.read_timings(args.fps_from)
    fps = float(timings["fps"])
    print(f"end-to-end FPS {fps:.3f} from {args.fps_from}"
          + (f" ({timings['note']})" if timings.get("note") else ""))
  rules = "short" if args.short else args.rules
  out = merge_lib.run_merge(args.results, args.out,
                            is_long=None if rules == "auto" else rules == "long",
                            long_aesthetic=args.long_aesthetic, fps=fps,
                            score_type=args.score_type, plots=not args.no_plots)
  print("wrote:\n  " + "\n  ".join(out["files"]))
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="heliosbench", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  gen = sub.add_parser("generate", help="generate {id}_{duration}_ori{frames}.mp4 videos "
                       "from the prompt CSV (resumable)")
  gen.add_argument("--model_dir", "--model-dir", default=None,
                   help="pipeline folder (diffusers layout or our Orbax export); omitted: the "
                   "embedded tiny random preset")
  gen.add_argument("--out", required=True, help="video folder (reruns skip finished videos)")
  gen.add_argument("--prompts", default=naming.DEFAULT_PROMPTS_CSV,
                   help="prompt CSV with id, prompt, duration (default: repo "
                   "helios_t2v_prompts.csv)")
  gen.add_argument("--ids", nargs="+", default=None,
                   help="prompt ids: numbers, comma lists, ranges (1-10); default all")
  gen.add_argument("--durations", nargs="+", type=int, default=None,
                   help="duration buckets to generate (120 240 720 1440); default all")
  gen.add_argument("--max_frames", "--max-frames", type=int, default=None,
                   help="cap the frames per video (quick runs); names keep the CSV duration")
  gen.add_argument("--height", type=int, default=None,
                   help="pixels (default 384; 128 for the tiny preset)")
  gen.add_argument("--width", type=int, default=None,
                   help="pixels (default 640; 128 for the tiny preset)")
  gen.add_argument("--steps", nargs="+", type=int, default=None,
                   help="Base: one number; pyramid: steps per stage, e.g. 2 2 2")
  gen.add_argument("--guidance_scale", "--guidance-scale", type=float, default=None,
                   help="CFG scale (default 5.0; distilled 1.0)")
  gen.add_argument("--amplify_first_chunk", "--amplify-first-chunk",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="DMD: double chunk 0's steps (default: on for DMD checkpoints)")
  gen.add_argument("--seed", type=int, default=42, help="base seed; video id uses seed + id")
  gen.add_argument("--negative_prompt", "--negative-prompt", default=None,
                   help="default: the official scripts' negative prompt")
  gen.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="transformer / text encoder dtype (default bfloat16; tiny: float32)")
  gen.add_argument("--tiny_model", "--tiny-model", default=variants.DEFAULT_VARIANT,
                   choices=list(generation.TINY_MODELS), help="tiny preset without --model_dir")
  gen.add_argument("--video_fps", "--video-fps", type=int, default=24,
                   help="frame rate of the mp4 files")
  gen.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile with a throwaway generation before timing (default on)")
  gen.add_argument("--text_encoder_on_cpu", "--text-encoder-on-cpu", action="store_true",
                   help="run umT5 on the host CPU")
  gen.add_argument("--release_text_encoder", "--release-text-encoder", action="store_true",
                   help="free umT5 after each prompt encoding")
  gen.add_argument("--no-progress", "--no_progress", action="store_true")
  gen.set_defaults(fn=_generate)

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
  m.add_argument("--chunk-frames", type=int, default=CHUNK_FRAMES, help="frames per chunk for the curves")
  m.add_argument("--no-progress", action="store_true")
  m.set_defaults(fn=_metrics)

  g = sub.add_parser("merge", help="ratings, totals, summary table, plots")
  g.add_argument("--results", required=True, help="a model's results folder or a folder of them")
  g.add_argument("--out", default=None, help="summary/plots folder (default: --results)")
  g.add_argument("--rules", default="auto", choices=["auto", "short", "long"],
                 help="rating rules: 'auto' (default) picks short rules when no scored video is "
                 f"longer than {merge_lib.SHORT_MAX_FRAMES} frames, long rules otherwise")
  g.add_argument("--short", action="store_true", help="same as --rules short")
  g.add_argument("--long-aesthetic", default="upstream", choices=["upstream", "fixed"],
                 help="'upstream' keeps the duplicated long-Aesthetic thresholds (0.45, 0.40 "
                 "for ratings 3 and 2, which makes them unreachable); 'fixed' uses 0.35, 0.30")
  g.add_argument("--fps", type=float, default=None, help="end-to-end FPS for the Throughput Score")
  g.add_argument("--fps-from", "--fps_from", default=None,
                 help="generation folder (or its timings.json) whose FPS gives the Throughput "
                 "Score")
  g.add_argument("--score-type", default="rating", choices=["rating", "raw", "normalized"])
  g.add_argument("--no-plots", action="store_true")
  g.set_defaults(fn=_merge)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except (FileNotFoundError, ValueError, generation.FolderBusyError) as e:
    print(f"heliosbench {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
