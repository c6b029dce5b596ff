"""End-to-end Helios generation speed: the JAX pipeline vs diffusers, per chunk, same device.

  python benchmarks/e2e.py --preset tiny --model distilled --chunks 3                  # CPU, both
  python benchmarks/e2e.py --preset tiny --chunks 2 --no_torch --json out.json          # JAX only
  python benchmarks/e2e.py --preset helios-14b --model distilled --steps 2,2,2 --chunks 6 \
      [--torch_compile] [--text_encoder_offload release] --json h100.json          # one GPU
  python benchmarks/e2e.py --preset helios-14b --dry_run                                # trace only
  python benchmarks/e2e.py --preset helios-14b --quantize fp8 --steps 1,1,1 --json fp8.json  # fp8
  python benchmarks/e2e.py --preset helios-14b --low_memory --no_torch              # streamed DiT

Both sides build random-weight models of the preset's exact shapes (DiT and umT5 in
`--dtype`, bfloat16 by default; Wan VAE in float32, as the reference pipelines run it) and
generate a text-to-video of `--chunks` 33-frame chunks at `--height`x`--width`:

* JAX: `helios_jax.pipeline.Pipeline` built from in-memory components (jitted random init:
  `init_transformer`, `init_vae`, `TEXT_ENCODER_SPEC.init`), run through `Pipeline.stream`
  (one jitted `chunk_step` per chunk + one `decode_step`, exactly what users run). The umT5
  encoder runs the jitted `umt5_encode` on random token ids.
* diffusers: `HeliosPyramidPipeline` (Mid, Distilled) or `HeliosPipeline` (Base) with random
  `HeliosTransformer3DModel`, `AutoencoderKLWan` and transformers `UMT5EncoderModel`, the fastest
  available attention backend (`--torch_attention`), optional `torch.compile` of the
  transformer, VAE decoder and text encoder ("max-autotune-no-cudagraphs", as `infer_helios.py
  --enable_compile`). Per-chunk times come from hooks on `prepare_latents` (chunk start), the
  transformer forward and `vae.decode` (device-synchronised). On CPU, `torch.linalg.cholesky`
  of the block-noise covariance has no true answer (the float32 matrix is indefinite; LAPACK
  raises on some CPUs and returns a residue on others), so it always returns the exact factor
  `helios_jax.schedulers.block_noise_cholesky` there.

Each side first runs a warm-up generation (`--warmup_chunks`, compiles everything), then the
timed one. Reported per side: init and warm-up seconds, text encoding (once per video: 1
prompt, or prompt + negative prompt under CFG), the first chunk (Distilled: amplified, 2x steps)
and the steady-state chunk (mean of chunks >= 1) split into DiT (the whole sampler: transformer
calls, scheduler and pyramid math), VAE decode and host overhead (noise draws, uint8
conversion, Python), FPS = 33 / steady chunk seconds, end-to-end FPS (the HeliosBench protocol:
output frames / (text + all chunks + finalisation)), achieved TFLOP/s and MFU from the spec's
FLOP model (`helios_jax.flops`, vs 989 TFLOP/s H100 dense bf16 and the measured ~800 TFLOP/s
matmul rate), and peak device memory (`memory_stats()` / `torch.cuda.max_memory_allocated`,
host RSS on CPU). With both sides requested each runs in its own subprocess (so one side's
device memory pool never starves the other), one after the other.

Memory (helios-14b on one 80 GB GPU): DiT 28.6 GB + umT5-XXL 11.4 GB (bf16) + VAE 0.5 GB;
`--text_encoder_offload release` frees the encoder after encoding, `cpu` keeps it on the host.

`--quantize fp8|int8w` (+ `--keep_blocks`) runs the JAX DiT through Qwix PTQ
(`helios_jax.quantize`, `DEFAULT_KEEP` layers bf16) and `--low_memory` streams its block weights
from host memory (`helios_jax.offload`); the diffusers side stays bf16 (the reference to beat).

`--dry_run` builds every component abstractly (`nnx.eval_shape`, nothing allocated) and traces
and lowers the chunk programs (first and steady chunk), the decode and the text encoder with
`jax.eval_shape` / `jit(...).lower`, printing shapes and parameter bytes: the full-size check
for machines without a GPU. Not a test: no assertions on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ helpers
from _timing import timeit  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np

from helios_jax import variants  # noqa: E402  pylint: disable=wrong-import-position
from helios_jax.constants import CHUNK_FRAMES  # noqa: E402  pylint: disable=wrong-import-position

# JAX's GPU pool defaults to 75% of the device: too little for the 40.6 GB of 14B-pipeline
# parameters plus activations on an 80 GB card. (Read when the backend starts; no effect on CPU.)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

# Valid (unpadded) tokens of the random prompt; the encoder always runs on 512 tokens.
PROMPT_TOKENS = 120
GB = 1e9


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Arguments and shared settings.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=list(variants.SIZES), default="tiny",
                 help="model shapes: 'tiny' (CPU) or the released 14B pipeline")
  p.add_argument("--model", choices=list(variants.VARIANTS), default=variants.DEFAULT_VARIANT,
                 help="released variant: sampler, steps and guidance defaults")
  p.add_argument("--steps", default=None,
                 help="steps per pyramid stage, e.g. 2,2,2 (Base: one number); default per model")
  p.add_argument("--guidance_scale", type=float, default=None,
                 help="CFG scale (default 5.0; Distilled 1.0)")
  p.add_argument("--chunks", type=int, default=3, help="33-frame chunks in the timed run")
  p.add_argument("--warmup_chunks", type=int, default=None,
                 help="chunks of the warm-up run; default: the fewest that compile every "
                      "program (JAX 2: the first-chunk and steady-chunk programs; diffusers 1: "
                      "shapes do not change between chunks); 0: no warm-up")
  p.add_argument("--height", type=int, default=None, help="pixels (default 128 tiny, 384 14B)")
  p.add_argument("--width", type=int, default=None, help="pixels (default 128 tiny, 640 14B)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="DiT and text-encoder dtype (the VAE is float32)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--text_repeats", type=int, default=3, help="timed text-encoder calls")
  p.add_argument("--text_encoder_offload", choices=("none", "release", "cpu"), default="none",
                 help="free the encoder after encoding ('release') or keep it on the host CPU")
  from pallas_kernels import dispatch  # pylint: disable=g-import-not-at-top
  p.add_argument("--attention", choices=dispatch.ATTENTION_IMPLS, default="auto",
                 help="JAX attention implementation (auto: cuDNN on GPU bf16, else XLA)")
  p.add_argument("--ops", choices=dispatch.IMPLS, default="auto",
                 help="JAX norm/RoPE implementation (auto: Pallas on GPU, else XLA)")
  p.add_argument("--compile_cache", action=argparse.BooleanOptionalAction, default=True,
                 help="JAX: persist compiled programs in the helios-jax cache, so a rerun "
                      "skips compilation (--no-compile_cache: always compile)")
  p.add_argument("--quantize", choices=("none", "fp8", "int8w"), default="none",
                 help="JAX DiT precision: Qwix PTQ fp8 / int8w (diffusers stays bf16)")
  p.add_argument("--keep_blocks", default="", help="with --quantize: blocks kept bf16, e.g. "
                 "first:3,last:3")
  p.add_argument("--low_memory", action="store_true",
                 help="JAX DiT block weights in host memory, streamed per block")
  p.add_argument("--no_torch", action="store_true", help="JAX side only (same as --side jax)")
  p.add_argument("--side", choices=("both", "jax", "torch"), default="both",
                 help="which implementation(s) to run")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="diffusers on CPU: intra-op threads (default: all cores; 1 is steadier "
                      "on a loaded machine, where OpenMP barriers stall)")
  p.add_argument("--torch_compile", action="store_true",
                 help="diffusers: torch.compile transformer, VAE decoder and text encoder")
  p.add_argument("--torch_compile_mode", default="max-autotune-no-cudagraphs")
  p.add_argument("--torch_compile_parts", default="transformer,vae,text_encoder",
                 help="comma-separated parts compiled with --torch_compile")
  p.add_argument("--torch_attention", default="auto",
                 help="diffusers attention backend (auto: FA3 > flash > cuDNN SDPA on CUDA, "
                      "native on CPU)")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="MFU denominator (default: H100 dense bf16, 989)")
  p.add_argument("--matmul_tflops", type=float, default=None,
                 help="second MFU denominator (default: measured H100 bf16 matmul, 800)")
  p.add_argument("--dry_run", action="store_true",
                 help="build abstractly and trace/lower the programs (no allocation, no run)")
  p.add_argument("--dry_run_compile", action="store_true",
                 help="with --dry_run: also compile each program on this backend and report "
                      "its temporary-buffer bytes (XLA memory analysis; meaningful on the GPU: "
                      "XLA:CPU upcasts bf16 weights to fp32, so CPU figures for bf16 are ~2x "
                      "the DiT weights)")
  p.add_argument("--json", default=None, help="write all results to this JSON file")
  args = p.parse_args(argv)
  if args.no_torch:
    args.side = "jax"
  h, w = variants.get_size(args.preset).resolution
  args.height = h if args.height is None else args.height
  args.width = w if args.width is None else args.width
  for name in ("height", "width"):
    v = getattr(args, name)
    if v <= 0 or v % 16:
      p.error(f"--{name}={v} must be a positive multiple of 16")
  variant = variants.get_variant(args.model)
  if variant.pyramid and (args.height % 64 or args.width % 64):
    p.error(f"--height={args.height} / --width={args.width}: the 3-stage pyramid needs "
            "multiples of 64")
  if args.chunks < 1:
    p.error(f"--chunks={args.chunks} must be >= 1")
  if args.dry_run_compile and not args.dry_run:
    p.error("--dry_run_compile needs --dry_run")
  if args.keep_blocks and args.quantize == "none":
    p.error(f"--keep_blocks={args.keep_blocks} needs --quantize fp8|int8w")
  if args.keep_blocks:
    from helios_jax import quantize as quant_lib  # pylint: disable=g-import-not-at-top
    try:
      quant_lib.parse_blocks(args.keep_blocks, variants.get_size(args.preset).configs()[0]
                             .num_layers)
    except ValueError as e:
      p.error(f"--keep_blocks: {e}")
  if args.warmup_chunks is not None and args.warmup_chunks < 0:
    p.error(f"--warmup_chunks={args.warmup_chunks} must be >= 0")
  parts = tuple(x.strip() for x in args.torch_compile_parts.split(",") if x.strip())
  bad = sorted(set(parts) - {"transformer", "vae", "text_encoder"})
  if bad:
    p.error(f"--torch_compile_parts={args.torch_compile_parts!r}: unknown part(s) {bad}; "
            "choose from transformer, vae, text_encoder")
  args.torch_compile_parts = parts
  if args.torch_threads is not None and args.torch_threads < 1:
    p.error(f"--torch_threads={args.torch_threads} must be >= 1")
  if args.text_repeats < 1:
    p.error(f"--text_repeats={args.text_repeats} must be >= 1")
  if args.steps is not None:
    try:
      args.steps = tuple(int(s) for s in str(args.steps).split(",") if s.strip())
    except ValueError:
      p.error(f"--steps={args.steps!r} must be comma-separated integers")
    want = len(variant.default_steps)
    if len(args.steps) != want or min(args.steps) < 1:
      p.error(f"--steps={','.join(map(str, args.steps))}: the {args.model} model takes {want} "
              "positive step count(s)")
  from helios_jax import flops  # pylint: disable=g-import-not-at-top
  for name, default in (("peak_tflops", flops.H100_PEAK_TFLOPS),
                        ("matmul_tflops", flops.H100_MATMUL_TFLOPS)):
    v = getattr(args, name)
    if v is not None and v <= 0:
      p.error(f"--{name}={v} must be > 0")
    setattr(args, name, default if v is None else v)
  return args


def preset_configs(preset: str):
  """(DiT, VAE, umT5) configs of a model size (`variants.SIZES`)."""
  return variants.get_size(preset).configs()


def sampler_config(args):
  """The `SamplerConfig` both sides sample with (the one `Pipeline.sampler_config` builds)."""
  from helios_jax import flops  # pylint: disable=g-import-not-at-top
  dit_cfg, _, _ = preset_configs(args.preset)
  return flops.model_sampler_config(args.model, args.height, args.width, steps=args.steps,
                                    guidance_scale=args.guidance_scale,
                                    patch_size=dit_cfg.patch_size)


def text_inputs(args, vocab_size: int, num_prompts: int) -> tuple[np.ndarray, np.ndarray]:
  """Random token ids `[P, 512]` with `PROMPT_TOKENS` valid tokens, and the mask."""
  from helios_jax.text import MAX_SEQUENCE_LENGTH  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(args.seed)
  ids = rng.integers(2, vocab_size, (num_prompts, MAX_SEQUENCE_LENGTH)).astype(np.int32)
  mask = np.zeros_like(ids)
  mask[:, :PROMPT_TOKENS] = 1
  return np.where(mask == 1, ids, 0).astype(np.int32), mask


def host_peak_rss_bytes() -> int:
  import resource  # pylint: disable=g-import-not-at-top
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _median_time(fn, repeats: int) -> float:
  return statistics.median(timeit(fn, repeats))


def _tree_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------
# JAX side.


@dataclasses.dataclass
class JaxComponents:
  """The in-memory JAX pipeline and the umT5 encoder (graphdef + state)."""

  pipe: Any
  text_graphdef: Any
  text_state: Any
  text_device: Any
  param_bytes: dict[str, int]


def build_jax(args, abstract: bool = False) -> JaxComponents:
  """Random-weight (or abstract) DiT, VAE and umT5, and a `Pipeline` around them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from helios_jax import pipeline as pl  # pylint: disable=g-import-not-at-top
  from helios_jax.models import text_encoder as te_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.models import transformer as tr_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.models.attention import KernelConfig  # pylint: disable=g-import-not-at-top
  dit_cfg, vae_cfg, text_cfg = preset_configs(args.preset)
  dtype = jnp.dtype(args.dtype)
  kernels = KernelConfig(attention=args.attention, ops=args.ops)
  dit_spec = tr_lib.TransformerSpec(kernels)
  te_device = jax.devices("cpu")[0] if args.text_encoder_offload == "cpu" else jax.devices()[0]
  if abstract:
    dit = nnx.eval_shape(lambda: dit_spec.build(dit_cfg, dtype))
    vae = nnx.eval_shape(lambda: vae_lib.VAE_SPEC.build(vae_cfg, jnp.float32))
    te = nnx.eval_shape(lambda: te_lib.TEXT_ENCODER_SPEC.build(text_cfg, dtype))
  else:
    dit = dit_spec.init(dit_cfg, dtype, args.seed)
    vae = vae_lib.VAE_SPEC.init(vae_cfg, jnp.float32, args.seed)
    with jax.default_device(te_device):
      te = te_lib.TEXT_ENCODER_SPEC.init(text_cfg, dtype, args.seed)
  transformer = tr_lib.HeliosTransformer(dit_cfg, dit)
  if args.quantize != "none":
    from helios_jax import quantize as quant_lib  # pylint: disable=g-import-not-at-top
    transformer = quant_lib.quantize_transformer(transformer, args.quantize,
                                                 keep_blocks=args.keep_blocks)
  if args.low_memory:
    from helios_jax import offload  # pylint: disable=g-import-not-at-top
    transformer = offload.offload_blocks(transformer)
  vae = vae_lib.WanVAE(vae_cfg, vae)
  te_graphdef, te_state = nnx.split(te)
  variant = variants.get_variant(args.model)
  pipe = pl.Pipeline(transformer, vae, variant.scheduler_config, variant.flags)
  sizes = {"transformer": _tree_bytes(transformer.params), "vae": _tree_bytes(vae.params),
           "text_encoder": _tree_bytes(te_state)}
  return JaxComponents(pipe, te_graphdef, te_state, te_device, sizes)


def _jax_encode_fn(comps: JaxComponents, dit_dtype):
  """(ids, mask) -> `[P, 512, D]` prompt embeddings on the default device, as `encode_prompt`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from helios_jax.models.text_encoder import umt5_encode  # pylint: disable=g-import-not-at-top

  @jax.jit
  def keep_valid_rows(hidden, mask):  # zero rows past the prompt, in the DiT dtype
    return jnp.where(mask[..., None] > 0, hidden.astype(dit_dtype), jnp.zeros((), dit_dtype))

  def encode(ids, mask):
    ids_d = jax.device_put(jnp.asarray(ids), comps.text_device)
    mask_d = jax.device_put(jnp.asarray(mask), comps.text_device)
    hidden = umt5_encode(comps.text_graphdef, comps.text_state, ids_d, mask_d)
    out = keep_valid_rows(hidden, mask_d)
    return jax.device_put(out, jax.devices()[0]).block_until_ready()

  return encode


def _jax_device_info() -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
          "cpu_count": os.cpu_count(),
          "versions": {"python": platform.python_version(), "jax": jax.__version__,
                       "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                       "numpy": np.__version__}}


def _resolved_attention(args) -> str:
  """What `--attention` runs as on this backend (e.g. auto -> cudnn on a GPU in bf16)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pallas_kernels import dispatch  # pylint: disable=g-import-not-at-top
  dit_cfg, _, _ = preset_configs(args.preset)
  q = jax.ShapeDtypeStruct((1, 1, dit_cfg.num_attention_heads, dit_cfg.attention_head_dim),
                           jnp.dtype(args.dtype))
  return dispatch.resolve_attention_impl(q, args.attention)


def run_jax(args) -> dict[str, Any]:
  """Builds the JAX pipeline, times text encoding, a warm-up and the timed generation."""
  import jax  # pylint: disable=g-import-not-at-top
  if args.compile_cache:
    from helios_jax import runtime  # pylint: disable=g-import-not-at-top
    runtime.enable_compilation_cache()
  info = _jax_device_info()
  info["attention_resolved"] = _resolved_attention(args)
  log(f"[jax] building {args.preset} components on {info['device_kind']} ...")
  t0 = time.perf_counter()
  comps = build_jax(args)
  jax.block_until_ready((comps.pipe.transformer.params, comps.pipe.vae.params, comps.text_state))
  init_s = time.perf_counter() - t0
  pipe = comps.pipe
  sc = pipe.sampler_config(args.height, args.width, steps=args.steps,
                           guidance_scale=args.guidance_scale)
  cfg_on = sc.guidance != "none"
  ids, mask = text_inputs(args, preset_configs(args.preset)[2].vocab_size, 2 if cfg_on else 1)
  encode = _jax_encode_fn(comps, pipe.transformer.dtype)
  t0 = time.perf_counter()
  embeds = encode(ids, mask)
  text_compile_s = time.perf_counter() - t0
  text_s = _median_time(lambda: encode(ids, mask), args.text_repeats)
  log(f"[jax] init {init_s:.1f} s; text encode {text_s * 1e3:.1f} ms "
      f"(first call {text_compile_s:.1f} s)")
  if args.text_encoder_offload == "release":
    for leaf in jax.tree.leaves(comps.text_state):
      leaf.delete()
  text, neg = embeds[:1], (embeds[1:2] if cfg_on else None)
  kwargs = dict(prompt_embeds=text, negative_prompt_embeds=neg, height=args.height,
                width=args.width, steps=args.steps, guidance_scale=args.guidance_scale,
                seed=args.seed, progress=False)
  warmup_s = 0.0
  warmup = 2 if args.warmup_chunks is None else args.warmup_chunks
  if warmup:
    t0 = time.perf_counter()
    for _ in pipe.stream(num_frames=CHUNK_FRAMES * warmup, **kwargs):
      pass
    warmup_s = time.perf_counter() - t0
    log(f"[jax] warm-up ({warmup} chunks, incl. compile) {warmup_s:.1f} s")
  chunks = []
  start = prev = time.perf_counter()
  for c in pipe.stream(num_frames=CHUNK_FRAMES * args.chunks, **kwargs):
    now = time.perf_counter()
    wall = now - prev
    chunks.append({"index": c.index, "wall_s": wall, "dit_s": c.dit_seconds,
                   "decode_s": c.decode_seconds,
                   "host_s": wall - c.dit_seconds - c.decode_seconds})
    log(f"[jax] chunk {c.index}: {wall:.3f} s (DiT {c.dit_seconds:.3f}, decode "
        f"{c.decode_seconds:.3f})")
    prev = now
  total_s = time.perf_counter() - start
  stats = jax.devices()[0].memory_stats() or {}
  return {
      **info, "implementation": "helios-jax",
      "attention": args.attention, "ops": args.ops, "quantize": args.quantize,
      "keep_blocks": args.keep_blocks, "low_memory": args.low_memory, "text_encoder_offload":
      args.text_encoder_offload, "init_s": init_s, "text_encode_s": text_s,
      "text_encode_first_call_s": text_compile_s, "warmup_chunks": warmup,
      "warmup_s": warmup_s, "compile_cache": args.compile_cache, "chunks": chunks,
      "finalize_s": 0.0, "generate_s": total_s, "param_bytes": comps.param_bytes,
      "peak_device_bytes": stats.get("peak_bytes_in_use"),
      "device_bytes_in_use": stats.get("bytes_in_use"),
      "host_peak_rss_bytes": host_peak_rss_bytes(),
  }


def _lowered_info(lowered, compile_it: bool) -> dict[str, Any]:
  """StableHLO size of a lowered program, and (compiled) XLA's buffer sizes."""
  out: dict[str, Any] = {"hlo_lines": len(lowered.as_text().splitlines())}
  if compile_it:
    mem = lowered.compile().memory_analysis()
    if mem is not None:
      out.update(temp_bytes=int(mem.temp_size_in_bytes),
                 argument_bytes=int(mem.argument_size_in_bytes),
                 output_bytes=int(mem.output_size_in_bytes))
  return out


def dry_run(args) -> dict[str, Any]:
  """Abstract build + trace/lower of every program at the preset's full size."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from helios_jax import pipeline as pl  # pylint: disable=g-import-not-at-top
  from helios_jax import sampling  # pylint: disable=g-import-not-at-top
  from helios_jax.models.text_encoder import umt5_encode  # pylint: disable=g-import-not-at-top
  from helios_jax.text import MAX_SEQUENCE_LENGTH  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  comps = build_jax(args, abstract=True)
  pipe = comps.pipe
  sc = pipe.sampler_config(args.height, args.width, steps=args.steps,
                           guidance_scale=args.guidance_scale)
  dit_cfg = pipe.transformer.config
  dt = pipe.transformer.dtype
  x = sampling.abstract_chunk_inputs(sc, dit_cfg.in_channels, dit_cfg.text_dim, dt,
                                     MAX_SEQUENCE_LENGTH)
  text, neg, state, noise, flag = (x["text"], x["neg_text"], x["state"], x["noise"],
                                   x["set_anchor"])
  out: dict[str, Any] = {"param_bytes": comps.param_bytes, "programs": {}}
  for first in (True, False):
    name = "chunk_step(first)" if first else "chunk_step"
    t1 = time.perf_counter()
    new_state, lat, _ = jax.eval_shape(
        functools.partial(pl.chunk_step, pipe.transformer.graphdef, sc, first),
        pipe.transformer.params, text, neg, state, noise, flag)
    out["programs"][name] = {
        "latents": list(lat.shape), "history": list(new_state.latents.shape),
        **_lowered_info(pl.chunk_step.lower(pipe.transformer.graphdef, sc, first,
                                            pipe.transformer.params, text, neg, state, noise,
                                            flag), args.dry_run_compile),
        "seconds": time.perf_counter() - t1}
  t1 = time.perf_counter()
  frames = jax.eval_shape(functools.partial(pl.decode_step, pipe.vae.graphdef),
                          pipe.vae.params, lat, pipe.vae.latents_mean,
                          pipe.vae.latents_inv_std)
  out["programs"]["decode_step"] = {
      "frames": list(frames.shape),
      **_lowered_info(pl.decode_step.lower(pipe.vae.graphdef, pipe.vae.params, lat,
                                           pipe.vae.latents_mean, pipe.vae.latents_inv_std),
                      args.dry_run_compile),
      "seconds": time.perf_counter() - t1}
  t1 = time.perf_counter()
  n_prompts = 2 if sc.guidance != "none" else 1
  ids = jax.ShapeDtypeStruct((n_prompts, MAX_SEQUENCE_LENGTH), jnp.int32)
  emb = jax.eval_shape(functools.partial(umt5_encode, comps.text_graphdef), comps.text_state,
                       ids, ids)
  out["programs"]["umt5_encode"] = {
      "embeddings": list(emb.shape),
      **_lowered_info(umt5_encode.lower(comps.text_graphdef, comps.text_state, ids, ids),
                      args.dry_run_compile),
      "seconds": time.perf_counter() - t1}
  out["attention_resolved"] = _resolved_attention(args)
  out["seconds"] = time.perf_counter() - t0
  out.update(_jax_device_info())
  return out


# ------------------------------------------------------------------------------------------
# diffusers side.


def _torch_module(factory, device, dtype, keep_fp32: Sequence[str] = ()):
  """Builds `factory()` directly on `device` in `dtype`; names in `keep_fp32` stay float32."""
  import torch  # pylint: disable=g-import-not-at-top
  prev = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(device):
      module = factory()
  finally:
    torch.set_default_dtype(prev)
  if keep_fp32:
    for name, param in module.named_parameters():
      if any(k in name.split(".") for k in keep_fp32):
        param.data = param.data.float()
  return module.eval().requires_grad_(False)


def _config_kwargs(cfg) -> dict[str, Any]:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()
          if v is not None}


def _pick_torch_attention(requested: str, cuda: bool) -> str:
  if requested != "auto":
    return requested
  if not cuda:
    return "native"
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("flash_attn_interface") is not None:
    return "_flash_3"
  if importlib.util.find_spec("flash_attn") is not None:
    return "flash"
  return "_native_cudnn"


class _CholeskyPatch:
  """`torch.linalg.cholesky` that returns the exact block-noise factor for CPU tensors.

  The pyramid pipelines factor the block-noise covariance `(1 + g) I - g 11^T (+1e-8 I)` in
  float32, where it is indefinite: what LAPACK returns depends on the CPU (an error on some,
  a rounding residue on others). On CPU tensors of that pattern we always return
  `block_noise_cholesky(g, k)`, so the reference's draws do not depend on the host's library;
  CUDA tensors and every other matrix go to torch unchanged.
  """

  def __init__(self):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.orig = torch.linalg.cholesky
    self.patched = 0

  @staticmethod
  def block_noise_gamma(a) -> float | None:
    """g when `a` is a k x k block-noise covariance `(1 + g) I - g 11^T (+1e-8 I)`, else None."""
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
      return None
    m = a.detach().double().cpu().numpy()
    gamma = -m[0, 1]
    off = m - np.diag(np.diag(m))
    ones = np.ones_like(m) - np.eye(len(m))
    if gamma <= 0 or np.abs(off + gamma * ones).max() > 1e-6:
      return None
    if np.abs(np.diag(m) - 1).max() > 1e-6:  # (1 + g) - g on the diagonal
      return None
    return float(np.float32(gamma))

  def __call__(self, a, *args, **kwargs):
    gamma = self.block_noise_gamma(a) if a.device.type == "cpu" else None
    if gamma is None:
      return self.orig(a, *args, **kwargs)
    from helios_jax.schedulers import block_noise_cholesky  # pylint: disable=g-import-not-at-top
    # The float32 gamma stands for the config's 1/3 etc.: snap to the nearest 1/n when close.
    n = round(1 / gamma)
    exact = 1 / n if abs(gamma - 1 / n) <= 1e-6 else gamma
    self.patched += 1
    return self.torch.tensor(block_noise_cholesky(exact, a.shape[0]), dtype=a.dtype,
                             device=a.device)

  def __enter__(self):
    self.torch.linalg.cholesky = self
    return self

  def __exit__(self, *exc):
    self.torch.linalg.cholesky = self.orig


class _TorchTimer:
  """Hooks a diffusers Helios pipeline: chunk starts, transformer calls, VAE decodes."""

  def __init__(self, pipe, sync, clock=time.perf_counter):
    self.sync = sync
    self.clock = clock
    self.events: list[tuple[str, float, float]] = []
    self.enabled = False
    orig_prepare = pipe.prepare_latents
    orig_decode = pipe.vae.decode
    orig_forward = pipe.transformer.forward

    def prepare(*a, **k):
      if self.enabled:
        self.sync()
        t = self.clock()
        self.events.append(("chunk", t, t))
      return orig_prepare(*a, **k)

    def timed(kind, fn):
      def wrapped(*a, **k):
        if not self.enabled:
          return fn(*a, **k)
        self.sync()
        t0 = self.clock()
        out = fn(*a, **k)
        self.sync()
        self.events.append((kind, t0, self.clock()))
        return out
      return wrapped

    pipe.prepare_latents = prepare
    pipe.vae.decode = timed("decode", orig_decode)
    pipe.transformer.forward = timed("transformer", orig_forward)
    processor = getattr(pipe, "video_processor", None)
    if processor is not None:  # marks the end of the last chunk (output postprocessing)
      orig_post = processor.postprocess_video

      def postprocess(*a, **k):
        if self.enabled:
          self.sync()
          t = self.clock()
          self.events.append(("finalize", t, t))
        return orig_post(*a, **k)

      processor.postprocess_video = postprocess

  def chunks(self, start: float, end: float) -> tuple[list[dict[str, float]], float]:
    """Per-chunk records from the events of one pipeline call, and the finalisation time.

    Chunk k runs from its `prepare_latents` call (chunk 0: from the call's start) to the next
    chunk's; the last chunk ends where the output postprocessing starts (or at its decode's
    end when there is none), and the rest of the call is the finalisation.
    """
    starts = [t for kind, t, _ in self.events if kind == "chunk"]
    finals = [t for kind, t, _ in self.events if kind == "finalize"]
    out = []
    last_end = start
    for k, t_k in enumerate(starts):
      t_next = starts[k + 1] if k + 1 < len(starts) else None
      inside = [(kind, a, b) for kind, a, b in self.events
                if kind in ("transformer", "decode") and a >= t_k
                and (t_next is None or a < t_next)]
      decodes = [(a, b) for kind, a, b in inside if kind == "decode"]
      if len(decodes) != 1:
        raise RuntimeError(f"chunk {k}: expected one vae.decode call, saw {len(decodes)}")
      dec_start, dec_end = decodes[0]
      chunk_start = start if k == 0 else t_k
      chunk_end = t_next if t_next is not None else (finals[-1] if finals else dec_end)
      wall = chunk_end - chunk_start
      dit = dec_start - chunk_start
      out.append({"index": k, "wall_s": wall, "dit_s": dit, "decode_s": dec_end - dec_start,
                  "host_s": wall - dit - (dec_end - dec_start),
                  "transformer_s": sum(b - a for kind, a, b in inside if kind == "transformer"),
                  "transformer_calls": sum(1 for kind, _, _ in inside if kind == "transformer")})
      last_end = chunk_end
    return out, end - last_end


def run_torch(args) -> dict[str, Any]:
  """Builds diffusers' pipeline with random weights and times it like `run_jax`."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if not cuda:
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  dtype = getattr(torch, args.dtype)
  dit_cfg, vae_cfg, text_cfg = preset_configs(args.preset)
  info = {"platform": "gpu" if cuda else "cpu",
          "device_kind": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
          "cpu_count": os.cpu_count(), "torch_threads": None if cuda else torch.get_num_threads(),
          "versions": {"python": platform.python_version(), "torch": torch.__version__,
                       "diffusers": diffusers.__version__,
                       "transformers": transformers.__version__,
                       "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version() if cuda else None}}
  log(f"[torch] building {args.preset} components on {info['device_kind']} ...")
  t0 = time.perf_counter()
  torch.manual_seed(args.seed)
  dit_cls = diffusers.HeliosTransformer3DModel
  keep_fp32 = dit_cls._keep_in_fp32_modules  # pylint: disable=protected-access
  tr = _torch_module(lambda: dit_cls(**_config_kwargs(dit_cfg)), device, dtype, keep_fp32)
  vae = _torch_module(lambda: diffusers.AutoencoderKLWan(**_config_kwargs(vae_cfg)), device,
                      torch.float32)
  te_device = torch.device("cpu") if args.text_encoder_offload == "cpu" else device
  te = _torch_module(lambda: transformers.UMT5EncoderModel(
      transformers.UMT5Config(**_config_kwargs(text_cfg))), te_device, dtype)
  sync()
  init_s = time.perf_counter() - t0
  attention = _pick_torch_attention(args.torch_attention, cuda)
  if attention != "native":
    try:
      tr.set_attention_backend(attention)
    except Exception as e:  # pylint: disable=broad-except
      log(f"[torch] attention backend {attention!r} unavailable ({e}); using 'native'")
      attention = "native"
  compiled = args.torch_compile_parts if args.torch_compile else ()
  compile_kw = dict(mode=args.torch_compile_mode, dynamic=False)
  for part, module in (("transformer", tr), ("vae", vae.decoder), ("text_encoder", te)):
    if part in compiled:  # the bound forward, so the timing hooks stay outside the graph
      module.forward = torch.compile(module.forward, **compile_kw)
  variant = variants.get_variant(args.model)
  sched_kw = dict(variant.scheduler)
  sched = getattr(diffusers, sched_kw.pop("_class_name"))(**sched_kw)
  flag_kw = dict(is_cfg_zero_star=variant.is_cfg_zero_star,
                 is_distilled=variant.is_distilled) if variant.pyramid else {}
  pipe = getattr(diffusers, variant.pipeline_class)(
      tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=tr, **flag_kw)
  pipe.set_progress_bar_config(disable=True)
  sc = sampler_config(args)
  cfg_on = sc.guidance != "none"
  ids, mask = text_inputs(args, text_cfg.vocab_size, 2 if cfg_on else 1)
  ids_t = torch.from_numpy(ids.astype(np.int64)).to(te_device)
  mask_t = torch.from_numpy(mask.astype(np.int64)).to(te_device)

  def encode():
    with torch.no_grad():
      hidden = te(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
      hidden = (hidden * mask_t[..., None].to(hidden.dtype)).to(device=device, dtype=dtype)
    sync()
    return hidden

  t0 = time.perf_counter()
  embeds = encode()
  text_first_s = time.perf_counter() - t0
  text_s = _median_time(encode, args.text_repeats)
  log(f"[torch] init {init_s:.1f} s; text encode {text_s * 1e3:.1f} ms "
      f"(first call {text_first_s:.1f} s); attention {attention}")
  if args.text_encoder_offload == "release":
    te.to("cpu")
    if cuda:
      torch.cuda.empty_cache()
  call = dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:2] if cfg_on else None,
              height=args.height, width=args.width, guidance_scale=sc.guidance_scale,
              output_type="np")
  if sc.pyramid:
    call.update(pyramid_num_inference_steps_list=list(sc.steps),
                is_amplify_first_chunk=sc.amplify_first_chunk, use_zero_init=sc.use_zero_init,
                zero_steps=sc.zero_steps)
  else:
    call["num_inference_steps"] = sc.steps[0]
  timer = _TorchTimer(pipe, sync)

  def generate(chunks: int) -> float:
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t = time.perf_counter()
    with torch.no_grad(), _CholeskyPatch():
      pipe(num_frames=CHUNK_FRAMES * chunks, generator=gen, **call)
    sync()
    return time.perf_counter() - t

  warmup = 1 if args.warmup_chunks is None else args.warmup_chunks
  warmup_s = generate(warmup) if warmup else 0.0
  if warmup:
    log(f"[torch] warm-up ({warmup} chunk(s){', incl. compile' if args.torch_compile else ''}) "
        f"{warmup_s:.1f} s")
  if cuda:
    peak_before = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
  timer.enabled = True
  sync()
  start = time.perf_counter()
  with torch.no_grad(), _CholeskyPatch() as chol:
    pipe(num_frames=CHUNK_FRAMES * args.chunks,
         generator=torch.Generator(device=device).manual_seed(args.seed), **call)
  sync()
  end = time.perf_counter()
  timer.enabled = False
  chunks, finalize_s = timer.chunks(start, end)
  for c in chunks:
    log(f"[torch] chunk {c['index']}: {c['wall_s']:.3f} s (DiT {c['dit_s']:.3f}, "
        f"decode {c['decode_s']:.3f})")
  return {
      **info, "implementation": "diffusers", "attention": attention,
      "torch_compile": (f"{args.torch_compile_mode} ({', '.join(compiled)})" if compiled
                        else None),
      "text_encoder_offload": args.text_encoder_offload,
      "cholesky_patched": bool(chol.patched), "init_s": init_s, "text_encode_s": text_s,
      "text_encode_first_call_s": text_first_s, "warmup_chunks": warmup,
      "warmup_s": warmup_s, "chunks": chunks,
      "finalize_s": finalize_s, "generate_s": end - start,
      "param_bytes": {"transformer": _torch_bytes(tr), "vae": _torch_bytes(vae),
                      "text_encoder": _torch_bytes(te)},
      "peak_device_bytes": (max(peak_before, torch.cuda.max_memory_allocated()) if cuda
                            else None),
      "peak_device_bytes_generation": torch.cuda.max_memory_allocated() if cuda else None,
      "host_peak_rss_bytes": host_peak_rss_bytes(),
  }


def _torch_bytes(module) -> int:
  return int(sum(p.numel() * p.element_size() for p in module.parameters()))


# ------------------------------------------------------------------------------------------
# Summary and report.


def flop_summary(args) -> dict[str, float]:
  """Per-chunk FLOPs of the run's settings (spec FLOP model, small terms included)."""
  from helios_jax import flops  # pylint: disable=g-import-not-at-top
  from helios_jax import sampling  # pylint: disable=g-import-not-at-top
  dit_cfg, vae_cfg, _ = preset_configs(args.preset)
  sc = sampler_config(args)
  s = vae_cfg.spatial_factor
  vae = flops.vae_decode_flops(vae_cfg, sampling.CHUNK_LATENT_FRAMES, args.height // s,
                               args.width // s).total
  first, steady = (flops.sampler_chunk_flops(dit_cfg, sc, f) for f in (True, False))
  return {"dit_first_chunk": first.total, "dit_chunk": steady.total,
          "dit_calls_first_chunk": first.calls, "dit_calls_chunk": steady.calls,
          "dit_batch": 2 if sc.guidance != "none" else 1,
          "vae_decode_chunk": vae, "guidance": sc.guidance, "steps": list(sc.steps),
          "amplify_first_chunk": sc.amplified(True)}


def summarize(side: dict[str, Any], fl: dict[str, float], args) -> dict[str, Any]:
  """Steady-state numbers of one side (mean over chunks >= 1, so the parts add up)."""
  chunks = side["chunks"]
  first = chunks[0]
  steady = chunks[1:]
  mean = lambda key: float(np.mean([c[key] for c in steady])) if steady else None
  out: dict[str, Any] = {"first_chunk_s": first["wall_s"], "first_chunk_dit_s": first["dit_s"]}
  for key in ("wall_s", "dit_s", "decode_s", "host_s", "transformer_s"):
    if all(key in c for c in chunks):
      out[f"steady_{key}"] = mean(key)
  from helios_jax import sampling  # pylint: disable=g-import-not-at-top
  frames = sampling.output_frames(len(chunks))
  total = side["text_encode_s"] + sum(c["wall_s"] for c in chunks) + side["finalize_s"]
  out["e2e_s"] = total
  out["e2e_fps"] = frames / total
  out["output_frames"] = frames
  if steady:
    wall, dit = out["steady_wall_s"], out["steady_dit_s"]
    out["fps"] = CHUNK_FRAMES / wall
    out["dit_tflops"] = fl["dit_chunk"] / dit / 1e12
    out["dit_mfu_peak"] = out["dit_tflops"] / args.peak_tflops
    out["dit_mfu_matmul"] = out["dit_tflops"] / args.matmul_tflops
    out["e2e_tflops"] = (fl["dit_chunk"] + fl["vae_decode_chunk"]) / wall / 1e12
    out["e2e_mfu_peak"] = out["e2e_tflops"] / args.peak_tflops
    if out.get("steady_transformer_s"):
      out["transformer_tflops"] = fl["dit_chunk"] / out["steady_transformer_s"] / 1e12
  out["first_chunk_dit_tflops"] = fl["dit_first_chunk"] / first["dit_s"] / 1e12
  out["peak_device_gb"] = (None if side.get("peak_device_bytes") is None
                           else side["peak_device_bytes"] / GB)
  out["host_peak_rss_gb"] = side["host_peak_rss_bytes"] / GB
  return out


def _fmt(v: Any, digits: int = 3) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    if v != 0 and abs(v) < 10 ** -digits:
      return f"{v:.2e}"
    return f"{v:.{digits}f}"
  return str(v)


# (label, key in the side summary or raw result, higher is better, digits)
_ROWS = (
    ("init (random weights) s", "init_s", False, 1),
    ("warm-up run (incl. compile) s", "warmup_s", False, 1),
    ("text encode s (once per video)", "text_encode_s", False, 4),
    ("first chunk s", "first_chunk_s", False, 3),
    ("steady chunk s", "steady_wall_s", False, 3),
    ("  DiT (sampler) s", "steady_dit_s", False, 3),
    ("  of which transformer calls s", "steady_transformer_s", False, 3),
    ("  VAE decode s", "steady_decode_s", False, 3),
    ("  host overhead s", "steady_host_s", False, 4),
    ("finalisation s (end of video)", "finalize_s", False, 3),
    ("FPS (33 / steady chunk)", "fps", True, 2),
    ("end-to-end FPS (incl. text, all chunks)", "e2e_fps", True, 2),
    ("DiT TFLOP/s (steady)", "dit_tflops", True, 3),
    ("  transformer calls only TFLOP/s", "transformer_tflops", True, 3),
    ("DiT TFLOP/s (first chunk)", "first_chunk_dit_tflops", True, 3),
    ("DiT MFU vs peak", "dit_mfu_peak", True, 4),
    ("DiT MFU vs matmul rate", "dit_mfu_matmul", True, 4),
    ("end-to-end TFLOP/s (DiT + VAE)", "e2e_tflops", True, 3),
    ("peak device memory GB", "peak_device_gb", False, 2),
    ("host peak RSS GB", "host_peak_rss_gb", False, 2),
)


def format_report(results: dict[str, Any]) -> str:
  """Markdown: run settings, the side-by-side table and the per-chunk tables."""
  s = results["settings"]
  fl = results["flops"]
  sides = [k for k in ("jax", "torch") if k in results]
  lines = [
      f"Helios end-to-end, preset {s['preset']}, model {s['model']}, steps "
      f"{','.join(map(str, fl['steps']))}, guidance {fl['guidance']} "
      f"(scale {s['guidance_scale']}), {s['height']}x{s['width']}, {s['chunks']} chunks "
      f"({results[sides[0]]['summary']['output_frames']} frames), {s['dtype']} DiT/umT5, fp32 VAE, "
      f"random weights; {results['date']}",
      f"FLOPs per chunk (helios_jax.flops): DiT {fl['dit_chunk'] / 1e12:.4g} TFLOP "
      f"({fl['dit_calls_chunk']} forwards of batch {fl['dit_batch']}), first chunk "
      f"{fl['dit_first_chunk'] / 1e12:.4g} TFLOP ({fl['dit_calls_first_chunk']}), VAE decode "
      f"{fl['vae_decode_chunk'] / 1e12:.4g} TFLOP; "
      f"MFU vs {s['peak_tflops']:g} (peak) and {s['matmul_tflops']:g} (matmul) TFLOP/s; "
      f"{_roofline(fl, s['matmul_tflops'])}",
  ]
  for k in sides:
    r = results[k]
    versions = ", ".join(f"{n} {v}" for n, v in r["versions"].items() if v is not None)
    resolved = r.get("attention_resolved")
    extra = (f"attention {r['attention']}"
             + (f" (= {resolved})" if resolved and resolved != r["attention"] else "")
             + (f", ops {r['ops']}" if "ops" in r else "")
             + (f", torch.compile {r['torch_compile']}" if r.get("torch_compile") else "")
             + (", CPU Cholesky patched" if r.get("cholesky_patched") else "")
             + (", compile cache on" if r.get("compile_cache") else "")
             + (f", DiT quantized {r['quantize']}"
                + (f" (blocks {r['keep_blocks']} bf16)" if r.get("keep_blocks") else "")
                if r.get("quantize", "none") != "none" else "")
             + (", DiT blocks streamed from host memory" if r.get("low_memory") else "")
             + f", text encoder offload {r['text_encoder_offload']}")
    threads = f", {r['torch_threads']} threads" if r.get("torch_threads") else ""
    lines.append(f"- {r['implementation']}: {r['device_kind']} ({r['platform']}, "
                 f"{r['cpu_count']} CPUs{threads}); {extra}; {versions}")
  lines.append("")
  head = "| metric | " + " | ".join("JAX" if k == "jax" else "diffusers" for k in sides)
  both = len(sides) == 2
  lines.append(head + (" | ratio (>1: JAX better) |" if both else " |"))
  lines.append("|---" * (len(sides) + 1 + both) + "|")
  for label, key, higher, digits in _ROWS:
    vals = [results[k]["summary"].get(key, results[k].get(key)) for k in sides]
    if all(v is None for v in vals):
      continue
    row = f"| {label} | " + " | ".join(_fmt(v, digits) for v in vals)
    if both:
      a, b = vals
      ratio = None
      if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
        ratio = a / b if higher else b / a
      row += f" | {_fmt(ratio, 2)}"
    lines.append(row + " |")
  for k in sides:
    name = "JAX" if k == "jax" else "diffusers"
    lines += ["", f"{name} per chunk:", "", "| chunk | wall s | DiT s | decode s | host s |",
              "|---|---|---|---|---|"]
    for c in results[k]["chunks"]:
      lines.append(f"| {c['index']} | {c['wall_s']:.3f} | {c['dit_s']:.3f} | "
                   f"{c['decode_s']:.3f} | {c['host_s']:.4f} |")
  return "\n".join(lines)


def _roofline(fl: dict[str, Any], matmul_tflops: float) -> str:
  """The FLOP floor of a steady chunk at the matmul rate, and the FPS ceiling it implies."""
  floor = (fl["dit_chunk"] + fl["vae_decode_chunk"]) / (matmul_tflops * 1e12)
  return (f"floor at {matmul_tflops:g} TFLOP/s: {floor:.3g} s per steady chunk = "
          f"{CHUNK_FRAMES / floor:.3g} FPS ceiling")


def format_dry_run(res: dict[str, Any], args) -> str:
  pb = res["param_bytes"]
  fl = res["flops"]
  lines = [f"dry run, preset {args.preset}, model {args.model}, {args.height}x{args.width}, "
           f"{args.dtype}, attention {args.attention} (= {res['attention_resolved']}) "
           f"({res['platform']}, jax {res['versions']['jax']}): built abstractly and traced in "
           f"{res['seconds']:.1f} s",
           "parameters: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in pb.items())
           + f"; total {sum(pb.values()) / GB:.2f} GB"
           + ("; on the accelerator without the host-resident text encoder "
              f"{(sum(pb.values()) - pb['text_encoder']) / GB:.2f} GB"
              if args.text_encoder_offload == "cpu" else ""),
           f"FLOPs per chunk: DiT {fl['dit_chunk'] / 1e12:.4g} TFLOP ({fl['dit_calls_chunk']} "
           f"forwards of batch {fl['dit_batch']}; first chunk "
           f"{fl['dit_first_chunk'] / 1e12:.4g}), VAE decode {fl['vae_decode_chunk'] / 1e12:.4g} "
           f"TFLOP; {_roofline(fl, args.matmul_tflops)}"]
  for name, prog in res["programs"].items():
    shapes = ", ".join(f"{k} {v}" for k, v in prog.items() if isinstance(v, list))
    mem = (f"; XLA temp buffers {prog['temp_bytes'] / GB:.2f} GB" if "temp_bytes" in prog
           else "")
    lines.append(f"  {name}: {shapes}; {prog['hlo_lines']} StableHLO lines{mem} "
                 f"({prog['seconds']:.1f} s)")
  temps = [p["temp_bytes"] for p in res["programs"].values() if "temp_bytes" in p]
  if temps:
    resident = sum(pb.values()) - (pb["text_encoder"] if args.text_encoder_offload != "none"
                                   else 0)
    lines.append(f"estimated device peak: resident parameters {resident / GB:.2f} GB + largest "
                 f"temp {max(temps) / GB:.2f} GB = {(resident + max(temps)) / GB:.2f} GB "
                 f"({res['platform']} compiler"
                 + ("; XLA:CPU upcasts bf16 weights, not a GPU estimate)"
                    if res["platform"] == "cpu" and args.dtype == "bfloat16" else ")"))
  return "\n".join(lines)


def _run_side_subprocess(side: str, argv: Sequence[str]) -> dict[str, Any]:
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, f"{side}.json")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--side", side, "--json", path]
    # The child's own one-sided report goes to /dev/null; its progress log (stderr) is shown.
    res = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    if res.returncode != 0:
      raise RuntimeError(f"the {side} side failed (exit code {res.returncode}): "
                         f"{' '.join(cmd)}")
    with open(path) as f:
      return json.load(f)[side]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark; returns the results dict (also printed, and written with --json)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
              if k not in ("json",)}
  results: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(
      timespec="seconds"), "command": "python benchmarks/e2e.py " + " ".join(argv),
                             "settings": settings}
  if args.dry_run:
    results["dry_run"] = dry_run(args)
    results["dry_run"]["flops"] = flop_summary(args)
    print(format_dry_run(results["dry_run"], args))
  else:
    results["flops"] = flop_summary(args)
    settings["guidance_scale"] = sampler_config(args).guidance_scale
    sides = ["jax", "torch"] if args.side == "both" else [args.side]
    runners = {"jax": run_jax, "torch": run_torch}
    for side in sides:
      results[side] = (_run_side_subprocess(side, argv) if len(sides) > 1
                       else runners[side](args))
      results[side]["summary"] = summarize(results[side], results["flops"], args)
    print(format_report(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=str)
  return results


if __name__ == "__main__":
  main()
