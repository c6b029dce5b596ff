"""Measured effect of Stage 3 on the CPU miniature: is the 6-call student closer to its teacher?

  python benchmarks/distill_effect.py [--workdir /tmp/distill] [--ode_steps 150] [--dmd_steps 40]

Chain (every stage through its real command line, tiny DiT, synthetic latents 16x16):
  stage1.py:tiny -> merge -> stage2.py:tiny -> merge = the teacher (a tiny "Helios-Mid");
  ode_pairs (teacher 20 UniPC steps per stage, CFG 5) -> stage3_ode.py:tiny -> merge --ema
  = the ODE student; stage3_dmd.py:tiny (real score = the merged stage-1 "Base") -> merge --ema
  = the DMD student.
Evaluation on held-out prompts (synthetic captions with another seed, never trained on), same
noise for everyone, chunk 1 conditioned on the teacher's own chunk 0 (so only one chunk's
sampling is compared): the teacher's 60-call sample (20/20/20 UniPC + CFG 5 = 120 forwards) vs
the student's 2/2/2 DMD sample (6 calls), MSE over latents, and the per-channel mean / std gap
(a simple distribution distance). "before" = the teacher's own weights run with the 6-call
sampler (what distillation starts from).

Prints a table and writes `<workdir>/effect.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TEXT_LEN = 16


def _cli(module: str, args: list[str], env: dict[str, str]) -> None:
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
  print(f"  {module} {args[0]} ... {time.perf_counter() - t0:.0f} s", flush=True)


def train_chain(work: str, a, env) -> dict[str, str]:
  """Runs the stages; returns the merged model folders (skips what already exists)."""
  p = {k: os.path.join(work, k) for k in ("s1", "base", "s2", "mid", "pairs", "ode", "student",
                                          "dmd", "distilled")}
  synth = ["--config.data.global_batch_size=4", "--config.train.checkpoint_every=1000000"]
  steps = [
      ("s1", "helios_jax.train", [f"--config=experiments/stage1.py:tiny,steps={a.s1_steps}",
                                  *synth, f"--workdir={p['s1']}"]),
      ("base", "helios_jax.training.merge", [f"--workdir={p['s1']}", f"--out={p['base']}"]),
      ("s2", "helios_jax.train", [f"--config=experiments/stage2.py:tiny,steps={a.s2_steps},"
                                  f"init={p['base']}", *synth, f"--workdir={p['s2']}"]),
      ("mid", "helios_jax.training.merge", [f"--workdir={p['s2']}", f"--out={p['mid']}"]),
      ("pairs", "helios_jax.training.ode_pairs", [
          f"--teacher={p['mid']}", f"--out={p['pairs']}", "--data_source=synthetic",
          f"--num_prompts={a.prompts}", f"--num_sections={a.sections}", "--teacher_steps=20",
          f"--text_len={TEXT_LEN}", "--param_dtype=float32", "--attention=xla",
          "--guidance_scale=5"]),
      ("ode", "helios_jax.train", [
          f"--config=experiments/stage3_ode.py:tiny,steps={a.ode_steps},data={p['pairs']},"
          f"init={p['mid']}", f"--config.stage3.ode_sections={min(3, a.sections)}",
          "--config.train.checkpoint_every=1000000", f"--workdir={p['ode']}"]),
      ("student", "helios_jax.training.merge", [f"--workdir={p['ode']}", f"--out={p['student']}",
                                                "--ema"]),
      ("dmd", "helios_jax.train", [
          f"--config=experiments/stage3_dmd.py:tiny,steps={a.dmd_steps},init={p['student']},"
          f"score={p['base']}", "--config.train.checkpoint_every=1000000",
          f"--workdir={p['dmd']}"]),
      ("distilled", "helios_jax.training.merge", [f"--workdir={p['dmd']}",
                                                  f"--out={p['distilled']}", "--ema"]),
  ]
  for name, module, args in steps:
    done = os.path.isdir(os.path.join(p[name], "checkpoints")) or (
        os.path.isfile(os.path.join(p[name], "config.json")) and name not in ("s1", "s2", "ode",
                                                                              "dmd")) or (
        name == "pairs" and os.path.isfile(os.path.join(p[name], "index.json")))
    if not done:
      _cli(module, args, env)
  return p


def evaluate(p: dict[str, str], num_prompts: int, seed: int = 123) -> dict[str, dict[str, float]]:
  """MSE and moment gaps of each 6-call student against the 60-call teacher on held prompts."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from helios_jax import checkpoint, sampling, variants  # pylint: disable=g-import-not-at-top
  from helios_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from helios_jax.models import transformer as tr  # pylint: disable=g-import-not-at-top

  def load(folder):
    _, module = checkpoint.load_model(tr.TransformerSpec(), folder, jnp.float32)
    return nnx.split(module)

  src = synthetic.SyntheticLatents(synthetic.SyntheticConfig(
      num_clips=num_prompts, sections=(3, 3), height=16, width=16, channels=16, text_tokens=6,
      text_dim=32, vocab=32, seed=seed))
  text = np.zeros((num_prompts, TEXT_LEN, 32), np.float32)
  for i in range(num_prompts):
    emb = np.asarray(src[i]["prompt_embed"], np.float32)
    text[i, :emb.shape[0]] = emb
  text = jnp.asarray(text)
  neg = jnp.zeros_like(text)
  mid, distilled = variants.get_variant("mid"), variants.get_variant("distilled")
  teacher_sc = sampling.SamplerConfig(scheduler=mid.scheduler_config, pyramid=True,
                                      steps=mid.default_steps, guidance="cfg",
                                      guidance_scale=mid.default_guidance_scale,
                                      latent_height=16, latent_width=16)
  student_sc = sampling.SamplerConfig(scheduler=distilled.scheduler_config, pyramid=True,
                                      steps=distilled.default_steps,
                                      amplify_first_chunk=distilled.amplify_first_chunk,
                                      latent_height=16, latent_width=16)
  b = num_prompts
  keys = jax.random.split(jax.random.key(seed), 2)
  run = jax.jit(sampling.sample_chunk, static_argnums=(0, 2, 3))
  g_t, p_t = load(p["mid"])
  state0 = sampling.empty_history(b, 16, 16)
  noise0 = sampling.draw_chunk_noise(keys[0], teacher_sc, b)
  chunk0 = run(g_t, p_t, teacher_sc, True, text, neg, state0, noise0)
  state1 = sampling.advance(state0, chunk0, True)
  noise1 = sampling.draw_chunk_noise(keys[1], teacher_sc, b)
  teacher1 = np.asarray(run(g_t, p_t, teacher_sc, False, text, neg, state1, noise1))

  def stats(x):
    x = np.asarray(x, np.float64)
    mse = float(np.mean((x - teacher1) ** 2))
    mu = np.abs(x.mean(axis=(1, 2, 3)) - teacher1.mean(axis=(1, 2, 3))).mean()
    sd = np.abs(x.std(axis=(1, 2, 3)) - teacher1.std(axis=(1, 2, 3))).mean()
    return {"mse": mse, "mean_gap": float(mu), "std_gap": float(sd)}

  out = {}
  for name, folder in (("before (teacher weights, 6 calls)", p["mid"]),
                       ("ODE student (EMA)", p["student"]),
                       ("DMD student (EMA)", p["distilled"])):
    g, params = load(folder)
    out[name] = stats(run(g, params, student_sc, False, text, None, state1, noise1))
  out["_teacher_variance"] = {"mse": float(np.var(teacher1)), "mean_gap": 0.0, "std_gap": 0.0}
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="/tmp/helios_distill_effect")
  ap.add_argument("--s1_steps", type=int, default=60)
  ap.add_argument("--s2_steps", type=int, default=40)
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--sections", type=int, default=3)
  ap.add_argument("--ode_steps", type=int, default=150)
  ap.add_argument("--dmd_steps", type=int, default=40)
  ap.add_argument("--eval_prompts", type=int, default=8)
  a = ap.parse_args()
  os.makedirs(a.workdir, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA, PYTHONPATH=REPO)
  print(f"training chain in {a.workdir}", flush=True)
  paths = train_chain(a.workdir, a, env)
  res = evaluate(paths, a.eval_prompts)
  print(f"\n{'student vs 60-call teacher (held-out prompts)':46s} {'MSE':>10s} "
        f"{'|mean| gap':>11s} {'|std| gap':>10s}")
  for name, r in res.items():
    print(f"{name:46s} {r['mse']:10.5f} {r['mean_gap']:11.5f} {r['std_gap']:10.5f}")
  with open(os.path.join(a.workdir, "effect.json"), "w") as f:
    json.dump({"args": vars(a), "results": res}, f, indent=2)
  return res


if __name__ == "__main__":
  main()
