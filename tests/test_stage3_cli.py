"""Stage 3 from the command line (CPU subprocesses): ODE pairs -> stage3_ode -> stage3_dmd.

A random tiny teacher records ODE pairs (`python -m helios_jax.training.ode_pairs`);
`experiments/stage3_ode.py:tiny` regresses them and `stage3_dmd.py:tiny,gan` (DMD + GAN heads)
distills from it against a score model; each leaves Orbax checkpoints and, restarted from an
earlier checkpoint, reproduces the uninterrupted run bit for bit. The EMA generator merged by
`python -m helios_jax.training.merge --ema` loads in the `Pipeline` as a Distilled model.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helios_jax import checkpoint
from helios_jax import presets
from helios_jax.training import model as model_lib
from test_training_cli import _ckpt_steps, _metrics, _ok, _run, cli_env  # noqa: F401

TEXT_LEN = 16  # the tiny experiments' synthetic text length


@pytest.fixture(scope="module")
def chain(cli_env, tmp_path_factory):
  """teacher -> ODE pairs -> stage3_ode (4 steps) -> merge --ema -> stage3_dmd,gan (4 steps)."""
  root = tmp_path_factory.mktemp("stage3")
  config, _, params = model_lib.build_base(model_lib.BaseModelConfig(preset="tiny", seed=3))
  teacher = str(root / "teacher")
  with checkpoint.atomic_directory(teacher) as tmp:
    config.to_json(os.path.join(tmp, "config.json"), _class_name="HeliosTransformer3DModel")
    checkpoint.save_params(os.path.join(tmp, checkpoint.PARAMS_DIR), params)
  pairs = str(root / "pairs")
  _ok(_run(cli_env, [f"--teacher={teacher}", f"--out={pairs}", "--data_source=synthetic",
                     "--num_prompts=2", "--num_sections=3", "--teacher_steps=3",
                     f"--text_len={TEXT_LEN}", "--param_dtype=float32", "--attention=xla"],
           module="helios_jax.training.ode_pairs"))
  ode = str(root / "ode")
  ode_args = [f"--config=experiments/stage3_ode.py:tiny,steps=4,data={pairs},init={teacher}",
              "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5",
              "--config.data.text_len=16"]
  _ok(_run(cli_env, ode_args + [f"--workdir={ode}"]))
  student = str(root / "student")
  _ok(_run(cli_env, [f"--workdir={ode}", f"--out={student}", "--ema"],
           module="helios_jax.training.merge"))
  dmd = str(root / "dmd")
  dmd_args = [f"--config=experiments/stage3_dmd.py:tiny,gan,steps=4,init={student},"
              f"score={teacher}", "--config.train.checkpoint_every=2",
              "--config.train.keep_checkpoints=5"]
  _ok(_run(cli_env, dmd_args + [f"--workdir={dmd}"]))
  return {"root": root, "teacher": teacher, "pairs": pairs, "ode": ode, "ode_args": ode_args,
          "student": student, "dmd": dmd, "dmd_args": dmd_args}


def _restart_from(cli_env, src, args, step, dst):
  """Copies run `src` keeping only checkpoint `step` (and the metrics up to it), reruns."""
  shutil.copytree(src, dst)
  for s in _ckpt_steps(dst):
    if s > step:
      shutil.rmtree(os.path.join(dst, "checkpoints", str(s)))
  path = os.path.join(dst, "metrics.jsonl")
  lines = [l for l in open(path) if json.loads(l)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(lines)
  return _ok(_run(cli_env, args + [f"--workdir={dst}"]))


def test_ode_run_checkpoints_ema_and_resumes_bit_exactly(cli_env, chain, tmp_path):
  m = _metrics(chain["ode"])
  assert sorted(m) == [1, 2, 3, 4] and _ckpt_steps(chain["ode"]) == [2, 4]
  assert all(np.isfinite(m[s]["loss"]) and m[s]["loss"] > 0 for s in m)
  assert {"ode_stage0", "ode_stage1", "ode_stage2"} <= set(m[4])
  proc = _restart_from(cli_env, chain["ode"], chain["ode_args"], 2, str(tmp_path / "ode"))
  assert "resumed from step 2" in proc.stdout
  got = _metrics(str(tmp_path / "ode"))
  for s in (3, 4):
    assert got[s]["loss"] == m[s]["loss"] and got[s]["grad_norm"] == m[s]["grad_norm"], s


def test_dmd_gan_run_checkpoints_and_resumes_bit_exactly(cli_env, chain, tmp_path):
  m = _metrics(chain["dmd"])
  assert sorted(m) == [1, 2, 3, 4] and _ckpt_steps(chain["dmd"]) == [2, 4]
  assert [m[s]["gen_step"] for s in (1, 2, 3, 4)] == [True, False, True, False]  # ratio 2
  for k in ("dmd_loss", "critic_fm_loss", "gan_d_loss", "gan_r1", "gan_g_loss"):
    assert all(np.isfinite(m[s][k]) for s in m), k
  assert m[3]["gan_g_loss"] > 0 and m[3]["gan_d_loss"] > 0   # GAN active from step 2
  proc = _restart_from(cli_env, chain["dmd"], chain["dmd_args"], 2, str(tmp_path / "dmd"))
  assert "resumed from step 2" in proc.stdout
  got = _metrics(str(tmp_path / "dmd"))
  for s in (3, 4):
    for k in ("loss", "grad_norm", "gen_loss", "gen_grad_norm", "gan_r1"):
      assert got[s][k] == m[s][k], (s, k)


def test_ema_generator_exports_as_a_distilled_pipeline(cli_env, chain, tmp_path):
  out = str(tmp_path / "distilled")
  _ok(_run(cli_env, [f"--workdir={chain['dmd']}", f"--out={out}", "--ema"],
           module="helios_jax.training.merge"))
  pipe_dir = str(tmp_path / "pipe")
  presets.write_tiny_pipeline(pipe_dir, "distilled")
  shutil.rmtree(os.path.join(pipe_dir, "transformer"))
  shutil.copytree(out, os.path.join(pipe_dir, "transformer"))
  from helios_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  pipe = Pipeline.from_pretrained(pipe_dir, dtype=jnp.float32, load_text_encoder=False)
  assert pipe.sampler_config(64, 64).is_dmd
  merged = checkpoint.load_params(os.path.join(out, checkpoint.PARAMS_DIR))
  leaves = jax.tree.leaves(jax.tree.map(np.asarray, merged))
  loaded = jax.tree.leaves(jax.tree.map(np.asarray, pipe.transformer.params))
  assert len(leaves) == len(loaded)
  for a, b in zip(sorted(leaves, key=lambda x: (x.shape, float(x.sum()))),
                  sorted(loaded, key=lambda x: (x.shape, float(x.sum())))):
    np.testing.assert_array_equal(a, b)
  emb = np.random.default_rng(0).normal(size=(1, TEXT_LEN, 32)).astype(np.float32)
  video = pipe.generate(prompt_embeds=emb, num_frames=33, height=64, width=64, seed=0)
  assert video.frames.shape == (33, 64, 64, 3) and video.latents.shape[2] == 9
  assert np.isfinite(video.latents).all()
  # The merged generator differs from its init (the EMA moved with training).
  student = checkpoint.load_params(os.path.join(chain["student"], checkpoint.PARAMS_DIR))
  diff = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
          zip(jax.tree.leaves(student), jax.tree.leaves(merged))]
  assert max(diff) > 0


def test_tiny_stage3_variants_run_alone(cli_env, tmp_path):
  """No data / init given: stage3_ode.py:tiny records the ODE pairs of its own random tiny
  base (the teacher, written to the workdir too) into the workdir and regresses them;
  stage3_dmd.py:tiny builds random tiny student / score models and trains on synthetic
  latents."""
  ode = str(tmp_path / "ode")
  _ok(_run(cli_env, ["--config=experiments/stage3_ode.py:tiny,steps=1", f"--workdir={ode}"]))
  assert os.path.isfile(os.path.join(ode, "tiny_pairs", "index.json"))
  teacher = checkpoint.load_params(os.path.join(ode, "tiny_teacher", checkpoint.PARAMS_DIR))
  _, _, student = model_lib.build_base(model_lib.BaseModelConfig(preset="tiny"))
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(student)):  # the tiny random base
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)  # (XLA -O0 vs default)
  m = _metrics(ode)
  assert sorted(m) == [1] and np.isfinite(m[1]["loss"]) and m[1]["loss"] > 0
  dmd = str(tmp_path / "dmd")
  _ok(_run(cli_env, ["--config=experiments/stage3_dmd.py:tiny,steps=1", f"--workdir={dmd}"]))
  m = _metrics(dmd)
  assert sorted(m) == [1] and np.isfinite(m[1]["loss"]) and np.isfinite(m[1]["gen_loss"])


@pytest.mark.slow
@pytest.mark.heavy
def test_dmd_two_device_data_mesh_matches_one_device(cli_env, tmp_path):
  args = ["--config=experiments/stage3_dmd.py:tiny,steps=2"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _ok(_run(cli_env, args + [f"--workdir={one}"]))
  _ok(_run(cli_env, args + ["--config.mesh.data=2", "--config.mesh.fsdp=1", f"--workdir={two}"],
           devices=2))
  a, b = _metrics(one), _metrics(two)
  for s in (1, 2):
    for k in ("loss", "grad_norm", "gen_loss", "gen_grad_norm", "dmd_loss"):
      assert abs(a[s][k] - b[s][k]) <= 1e-5 * max(1.0, abs(a[s][k])), (s, k)
