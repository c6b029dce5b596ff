"""Training-step benchmark: step time, tokens/s and memory of the Stage 1/2 step.

  python benchmarks/train_step.py                                  # tiny config, this machine
  python benchmarks/train_step.py --objective pyramid_flow_matching
  python benchmarks/train_step.py --preset helios-14b              # one 14B step (GPU, 80 GB)
  python benchmarks/train_step.py --preset helios-14b --trace_only # eval_shape only (any machine)

The step is the trainer's (`trainer.make_train_step`): sample drop + history corruption, the
stage loss through the LoRA-merged DiT (per-block remat), grads w.r.t. the fp32 trainables,
clip + AdamW. `--preset helios-14b` uses random bf16 weights, LoRA r256 on every Linear, remat
"full", batch 1 at 384x640 (latent 48x80, 11,040 tokens per forward, text 512x4096) and
reports peak memory per device; `--trace_only` traces the step with `jax.eval_shape` and
prints the parameter / optimizer-state sizes, which is what decides the mesh. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import common  # pylint: disable=g-import-not-at-top
from helios_jax import sharding
from helios_jax.config import HeliosTransformerConfig
from helios_jax.training import lora
from helios_jax.training import losses
from helios_jax.training import optim
from helios_jax.training import trainer


def make_config(args) -> "trainer.Settings":
  c = common.base_config()
  c.objective.kind = args.objective
  c.objective.multiplicities = (1, 2, 1)
  if args.preset == "tiny":
    common.apply_tiny(c, "", 10)
  c.model.preset = args.preset
  c.model.remat = args.remat
  c.model.param_dtype = args.dtype
  if args.layers:
    c.model.overrides.num_layers = args.layers
  c.trainable.rank, c.trainable.alpha = args.rank, float(args.rank)
  c.trainable.patch_embedding = "lora"
  c.trainable.memory_patches = "full" if args.objective == "flow_matching" else "lora"
  c.mesh.fsdp = -1
  return trainer.settings_from_config(c)


def fake_batch(b: int, h: int, w: int, text_len: int, text_dim: int, abstract: bool):
  shapes = {"history": (b, 19, h, w, 16), "anchor": (b, 1, h, w, 16),
            "target": (b, 9, h, w, 16), "text": (b, text_len, text_dim)}
  if abstract:
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  rng = np.random.default_rng(0)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny", choices=("tiny", "helios-14b"))
  p.add_argument("--objective", default="flow_matching", choices=sorted(losses.OBJECTIVES))
  p.add_argument("--layers", type=int, default=0, help="override num_layers (0: preset)")
  p.add_argument("--rank", type=int, default=0, help="LoRA rank (0: 8 tiny, 256 14B)")
  p.add_argument("--remat", default="full")
  p.add_argument("--latent", default="", help="HxW latent size (default 16x16 tiny, 48x80)")
  p.add_argument("--batch", type=int, default=0, help="global batch (0: 2 tiny, 1 14B)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--trace_only", action="store_true")
  args = p.parse_args()
  big = args.preset == "helios-14b"
  args.rank = args.rank or (256 if big else 8)
  args.dtype = "bfloat16" if big else "float32"
  h, w = map(int, (args.latent or ("48x80" if big else "16x16")).split("x"))
  b = args.batch or (1 if big else 2)
  st = make_config(args)
  cfg = HeliosTransformerConfig.from_preset(st.model.preset).replace(**dict(st.model.overrides))
  text_len = 512 if big else 16
  mesh = sharding.make_mesh("training", **dataclasses.asdict(st.mesh))
  spec = st.model.spec()
  graphdef, abstract_base = spec.abstract(cfg, st.model.dtype)
  key = jax.random.key(0)
  init_tr = lambda base: lora.init_trainables(base, st.trainable, key)
  abstract_tr = jax.eval_shape(init_tr, abstract_base)
  tx = optim.make_optimizer(st.optim, abstract_tr)
  abstract_opt = jax.eval_shape(tx.init, abstract_tr)
  tokens = losses.tokens_per_sample(st.objective.kind, h, w, st.objective.multiplicities,
                                    cfg.patch_size) * b
  step = trainer.make_train_step(trainer.make_loss_fn(graphdef, st, mesh), tx, st)
  print(f"{args.preset}: {cfg.num_layers} layers x {cfg.inner_dim}, {args.objective}, batch {b}, "
        f"latent {h}x{w}, {tokens} tokens/step, LoRA r{args.rank}, remat {args.remat}, "
        f"{args.dtype} base; jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}")
  print(f"  base params {nbytes(abstract_base) / 2**20:.1f} MiB, trainables "
        f"{sum(lora.count(abstract_tr).values()) / 1e6:.2f} M ({nbytes(abstract_tr) / 2**20:.1f} "
        f"MiB fp32), Adam state {nbytes(abstract_opt) / 2**20:.1f} MiB")
  state_abs = {"step": jax.ShapeDtypeStruct((), jnp.int32),
               "rng": jax.eval_shape(lambda: jax.random.key_data(key)),
               "trainables": abstract_tr, "opt_state": abstract_opt}
  batch_abs = fake_batch(b, h, w, text_len, cfg.text_dim, abstract=True)
  out = jax.eval_shape(step, state_abs, abstract_base, batch_abs)
  print(f"  eval_shape of the step: ok (loss {out[1]['loss'].dtype}, "
        f"{len(jax.tree.leaves(out[0]))} state leaves)")
  if args.trace_only:
    return

  base = nnx.to_pure_dict(nnx.state(spec.init(cfg, st.model.dtype, 0)))
  trainables = jax.jit(init_tr)(base)
  state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(key),
           "trainables": trainables, "opt_state": jax.jit(tx.init)(trainables)}
  batch = fake_batch(b, h, w, text_len, cfg.text_dim, abstract=False)
  fn = jax.jit(step, donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = fn.lower(state, base, batch).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, base, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  times = times[1:]
  med = statistics.median(times)
  print(f"  compile {compile_s:.1f} s; step median {med * 1e3:.1f} ms (min "
        f"{min(times) * 1e3:.1f}) over {len(times)}; {tokens / med:.0f} tokens/s; "
        f"loss {float(metrics['loss']):.4f}")
  mem = compiled.memory_analysis()
  if mem is not None:
    print(f"  compiled temp {getattr(mem, 'temp_size_in_bytes', 0) / 2**30:.2f} GiB, args "
          f"{getattr(mem, 'argument_size_in_bytes', 0) / 2**30:.2f} GiB")
  for d in jax.local_devices():
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      print(f"  {d}: peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB of "
            f"{stats.get('bytes_limit', 0) / 2**30:.2f} GiB")


if __name__ == "__main__":
  main()
