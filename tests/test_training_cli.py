"""Training from the command line (CPU subprocesses): stages 1-2 end to end, resume, meshes.

* the TFDS latent precompute of the two toy clips (`python -m helios_jax.data.precompute`);
* `experiments/stage1.py:tiny` and `stage2.py:tiny` on those toy latents: the loss falls, an
  Orbax checkpoint is left, the LoRA merge tool writes the next phase's init;
* a run killed (SIGKILL) mid-way resumes from its latest checkpoint and reproduces the
  uninterrupted run's losses bit for bit; a NaN loss stops the run with the step number and
  keeps the last good checkpoint; bad config keys / data dirs fail with the offending value;
* 4 forced host devices (data x fsdp, fsdp x context) and 2 processes on localhost (gloo)
  give the same losses as 1 device within fp32 tolerance.

XLA's CPU backend at -O0 compiles these tiny programs ~3x faster (the arithmetic stays fp32);
the session's persistent compilation cache lets the runs that repeat a program (resume, NaN
guard) skip compilation.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
from flax import nnx

from conftest import SUBPROCESS_TIMEOUT_S, rel_err
from helios_jax.data import clips as clips_lib
from helios_jax.data import latents as latents_lib
from helios_jax.models import transformer as tr
from helios_jax.training import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_METADATA = os.path.join(REPO, "data", "toy_data", "toy_filter.json")
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SYNTH = ["--config=experiments/stage1.py:tiny", "--config.data.global_batch_size=4",
         "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5"]

@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  # The session's shared compilation cache (conftest) when set; the XLA flags are part of the
  # cache key, so the -O0 programs never mix with the in-process ones.
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("xla"))
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA}".strip(), PYTHONPATH=REPO,
              JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TOKENIZERS_PARALLELISM="false")


def _run(env, args, devices=None, timeout=SUBPROCESS_TIMEOUT_S, module="helios_jax.train"):
  env = dict(env)
  warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
  if devices:
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _metrics(workdir):
  """{step: record} from metrics.jsonl; every step appears once, resumed runs included."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      assert r["step"] not in out, f"step {r['step']} logged twice in {workdir}"
      out[r["step"]] = r
  return out


def _ckpt_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _decreases(m, k=5):
  losses_ = [m[s]["loss"] for s in sorted(m)]
  return np.mean(losses_[:k]), np.mean(losses_[-k:])


WRITE_ENCODERS = """
import os, sys
import jax.numpy as jnp
from helios_jax import checkpoint, presets
from helios_jax.models.text_encoder import TEXT_ENCODER_SPEC
from helios_jax.models.vae import VAE_SPEC
_, vae_cfg, text_cfg = presets.tiny_configs()
dst = sys.argv[1]
for name, spec, cfg in (("vae", VAE_SPEC, vae_cfg), ("text_encoder", TEXT_ENCODER_SPEC, text_cfg)):
  checkpoint.save_model(spec, cfg, spec.init(cfg, jnp.float32, 0), os.path.join(dst, name))
presets.tiny_tokenizer().save_pretrained(os.path.join(dst, "tokenizer"))
"""


@pytest.fixture(scope="module")
def toy_latents(cli_env, tmp_path_factory):
  """The two toy clips precomputed at 64x64 through the precompute CLI with random tiny
  encoders (written as our export layout): (TFDS data root, encoder folder)."""
  enc = str(tmp_path_factory.mktemp("encoders"))
  warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
  proc = subprocess.run([sys.executable, "-c", WRITE_ENCODERS, enc], cwd=REPO, env=cli_env,
                        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  root = str(tmp_path_factory.mktemp("toy_latents"))
  _ok(_run(cli_env, [f"--metadata={TOY_METADATA}", f"--encoders={enc}", f"--data_dir={root}",
                     "--height=64", "--width=64", "--min_frames=81"],
           module="helios_jax.data.precompute"))
  return root, enc


@pytest.mark.slow
def test_precompute_writes_section_latents(toy_latents):
  root, _ = toy_latents
  src = latents_lib.load_source(root)
  assert len(src) == 2
  keys = src.bucket_keys()
  assert sorted(map(tuple, keys.tolist())) == [(2, 8, 8), (3, 8, 8)]
  for i in range(2):
    r = src[i]
    n = int(r["num_sections"])
    assert r["latents"].shape == (n, 9, 8, 8, 16) and r["latents"].dtype == np.float32
    assert np.isfinite(r["latents"]).all() and r["latents"].std() > 0.1
    assert int(r["num_frames"]) == {2: 81, 3: 121}[n]
    assert r["uttid"] == {2: "2_240_ori81", 3: "239_120_ori129"}[n]
    assert r["prompt_embed"].shape[1] == 32 and 0 < r["prompt_embed"].shape[0] <= 512
    assert np.abs(r["prompt_embed"]).sum(-1).min() > 0  # only the valid rows are stored
  clip = clips_lib.select_clips(clips_lib.load_metadata(TOY_METADATA), 81)[0]
  secs = clips_lib.clip_sections(clip, 64, 64, np.random.default_rng(0))
  assert secs.shape == (2, 3, 33, 64, 64) and -1 <= secs.min() and secs.max() <= 1


@pytest.fixture(scope="module")
def stage1_toy_run(cli_env, toy_latents, tmp_path_factory):
  root, _ = toy_latents
  work = str(tmp_path_factory.mktemp("stage1_toy"))
  proc = _ok(_run(cli_env, [f"--config=experiments/stage1.py:tiny,toy={root},steps=20",
                            f"--workdir={work}"]))
  return work, proc


@pytest.mark.slow
def test_stage1_tiny_cli_on_toy_data(stage1_toy_run):
  work, proc = stage1_toy_run
  m = _metrics(work)
  assert sorted(m) == list(range(1, 21))
  first, last = _decreases(m)
  assert last < 0.85 * first, (first, last)
  assert _ckpt_steps(work)[-1] == 20
  assert os.path.isfile(os.path.join(work, "config.json"))
  for key in ("grad_norm", "lr", "steps_per_sec", "tokens_per_sec"):
    assert key in m[20] and np.isfinite(m[20][key]) and m[20][key] > 0
  assert "step 20/20 | loss" in proc.stdout and "tokens/s" in proc.stdout


@pytest.mark.slow
def test_merge_then_stage2_tiny_cli_on_toy_data(stage1_toy_run, cli_env, toy_latents,
                                                 tmp_path):
  work1, _ = stage1_toy_run
  merged = str(tmp_path / "merged")
  _ok(_run(cli_env, [f"--workdir={work1}", f"--out={merged}"],
           module="helios_jax.training.merge"))
  loaded = tr.load_transformer(merged, attention_impl="xla")
  # The merged stem is the fully trained fp32 master; the merged kernels moved off the base.
  base = model_lib.build_base(model_lib.BaseModelConfig(preset="tiny", remat="none"))[2]
  params = nnx.to_pure_dict(loaded.params)
  assert rel_err(params["blocks"]["attn1"]["to_q"]["kernel"],
                 base["blocks"]["attn1"]["to_q"]["kernel"]) > 1e-4
  # Frozen tensors are copied (up to the init's rounding under the subprocess's XLA flags).
  assert rel_err(params["norm_out"]["scale_shift_table"],
                 base["norm_out"]["scale_shift_table"]) < 1e-6
  root, _ = toy_latents
  work2 = str(tmp_path / "stage2")
  proc = _ok(_run(cli_env, [f"--config=experiments/stage2.py:tiny,toy={root},steps=12,"
                            f"init={merged}", f"--workdir={work2}"]))
  m = _metrics(work2)
  first, last = _decreases(m, 4)
  assert last < 0.9 * first, (first, last)
  assert {"loss_level0", "loss_level1", "loss_level2"} <= set(m[12])
  assert _ckpt_steps(work2)[-1] == 12 and "step 12/12" in proc.stdout


@pytest.fixture(scope="module")
def reference_run(cli_env, tmp_path_factory):
  """Stage 1 tiny on synthetic latents, global batch 4, 6 steps, 1 device."""
  work = str(tmp_path_factory.mktemp("reference"))
  _ok(_run(cli_env, SYNTH + ["--config.train.num_steps=6", f"--workdir={work}"]))
  return work


def test_killed_run_resumes_bit_exactly(cli_env, reference_run, tmp_path):
  work = str(tmp_path / "killed")
  proc = _run(cli_env, SYNTH + ["--config.train.num_steps=6", "--config.train.abort_at_step=5",
                                f"--workdir={work}"])
  assert proc.returncode != 0  # SIGKILL
  assert _ckpt_steps(work) == [2, 4]
  proc = _ok(_run(cli_env, SYNTH + ["--config.train.num_steps=6", f"--workdir={work}"]))
  assert "resumed from step 4" in proc.stdout
  ref, got = _metrics(reference_run), _metrics(work)
  assert sorted(got) == list(range(1, 7))
  for s in range(1, 7):
    assert got[s]["loss"] == ref[s]["loss"] and got[s]["grad_norm"] == ref[s]["grad_norm"], s


def test_sigterm_checkpoints_and_the_rerun_continues_bit_exactly(cli_env, reference_run,
                                                                 tmp_path):
  """SIGTERM (a preempting scheduler) mid-run: the current step finishes, a checkpoint is
  written, one line says where it resumes; the rerun continues from that step bit-exactly."""
  work = str(tmp_path / "term")
  env = dict(cli_env)
  proc = subprocess.Popen(
      [sys.executable, "-m", "helios_jax.train", *SYNTH, "--config.train.num_steps=6",
       "--config.train.log_every=1", f"--workdir={work}"], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stdout:  # blocks until the run logs its third step (no clock involved)
    lines.append(line)
    if line.startswith("step 3/6"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
  assert proc.returncode == 143, err[-3000:]
  stopped = [ln for ln in err.splitlines() if ": stopped at step " in ln]
  assert len(stopped) == 1 and "Traceback" not in err, err[-3000:]
  step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
  assert 3 <= step < 6 and f"resume from step {step}" in stopped[0]
  assert step in _ckpt_steps(work)
  assert max(_metrics(work)) == step
  proc = _ok(_run(cli_env, SYNTH + ["--config.train.num_steps=6", f"--workdir={work}"]))
  assert f"resumed from step {step}" in proc.stdout
  ref, got = _metrics(reference_run), _metrics(work)
  assert sorted(got) == list(range(1, 7))
  for s in range(1, 7):
    assert got[s]["loss"] == ref[s]["loss"] and got[s]["grad_norm"] == ref[s]["grad_norm"], s


def test_a_workdir_in_use_is_refused_and_a_stale_lock_taken_over(cli_env, tmp_path):
  from helios_jax.training import trainer  # pylint: disable=g-import-not-at-top
  work = tmp_path / "locked"
  work.mkdir()
  lock = trainer.WorkdirLock(str(work))
  assert lock.acquire() is None
  try:
    proc = _run(cli_env, SYNTH + ["--config.train.num_steps=1", f"--workdir={work}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"error: workdir {work} is in use by pid {os.getpid()} on host {socket.gethostname()} "
        f"(lock {work / '.lock'}); stop that run or choose another --workdir"]
    assert not (work / "checkpoints").exists()
  finally:
    lock.release()
  (work / ".lock").write_text("pid 999999 on host gone")  # its process died: not flocked
  proc = _ok(_run(cli_env, SYNTH + ["--config.train.num_steps=1", f"--workdir={work}",
                                    "--verbosity=0"]))
  assert "took over the stale lock of pid 999999 on host gone" in proc.stderr


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(cli_env, tmp_path):
  work = str(tmp_path / "nan")
  proc = _run(cli_env, SYNTH + ["--config.train.num_steps=6",
                                "--config.train.debug_nan_at_step=5", f"--workdir={work}"])
  assert proc.returncode != 0
  assert "non-finite loss nan" in proc.stderr and "at step 5" in proc.stderr
  assert "Last good checkpoint: step 4" in proc.stderr
  assert _ckpt_steps(work) == [2, 4]
  assert max(_metrics(work)) == 4


def test_cli_bad_input(cli_env, tmp_path):
  proc = _run(cli_env, SYNTH + ["--config.train.num_stepz=3", f"--workdir={tmp_path}"])
  assert proc.returncode != 0 and "num_stepz" in proc.stderr
  # A config mistake is one line on stderr and exit status 2 (no traceback).
  for args, line in (
      (["--config.optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
      (["--config.stage3.gan.crop_scale", "0.4"],
       "unknown config key 'stage3.gan.crop_scale'; did you mean 'stage3.gan.crop'?")):
    proc = _run(cli_env, ["--config=experiments/stage3_dmd.py:tiny", *args,
                          f"--workdir={tmp_path / 'c'}"])
    assert proc.returncode == 2 and proc.stderr.splitlines() == [line], proc.stderr[-2000:]
  proc = _run(cli_env, SYNTH + ["--config.objective.kind=flow_matchin", f"--workdir={tmp_path}"])
  assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
  assert "objective: objective kind='flow_matchin' must be one of" in proc.stderr
  proc = _run(cli_env, ["--config=experiments/stage1.py:tiny,stpes=3", f"--workdir={tmp_path}"])
  assert proc.returncode == 2 and proc.stderr.splitlines() == [
      "ValueError: unknown config argument 'stpes' in 'tiny,stpes=3'; known: ['init', 'phase', "
      "'post', 'steps', 'tiny', 'toy']"]
  assert not os.path.exists(tmp_path / "c")  # nothing written before the config is valid
  proc = _run(cli_env, ["--config=experiments/stage1.py:tiny,toy=" + str(tmp_path / "none"),
                        f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode != 0 and "data dir not found" in proc.stderr
  proc = _run(cli_env, ["--config=experiments/stage1.py:tiny",
                        "--config.data.synthetic.num_clips=0", f"--workdir={tmp_path / 'e'}"])
  assert proc.returncode != 0 and "empty" in proc.stderr


@pytest.mark.slow
@pytest.mark.heavy
def test_four_device_mesh_matches_one_device(cli_env, reference_run, tmp_path):
  ref = _metrics(reference_run)
  for mesh in (("--config.mesh.data=2", "--config.mesh.fsdp=2"),
               ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.context=2")):
    work = str(tmp_path / "_".join(m.split(".")[-1] for m in mesh))
    _ok(_run(cli_env, SYNTH + ["--config.train.num_steps=3", *mesh, f"--workdir={work}"],
             devices=4))
    got = _metrics(work)
    for s in (1, 2, 3):
      assert abs(got[s]["loss"] - ref[s]["loss"]) <= 1e-5 * abs(ref[s]["loss"]), (mesh, s)


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_match_one_process(cli_env, reference_run, tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  work = str(tmp_path / "mp")
  args = SYNTH + ["--config.train.num_steps=3", "--multihost",
                  f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--workdir={work}"]
  procs = [subprocess.Popen([sys.executable, "-m", "helios_jax.train", *args, f"--process_id={i}"],
                            cwd=REPO, env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=SUBPROCESS_TIMEOUT_S) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  ref, got = _metrics(reference_run), _metrics(work)
  for s in (1, 2, 3):
    assert abs(got[s]["loss"] - ref[s]["loss"]) <= 1e-5 * abs(ref[s]["loss"]), s
  assert _ckpt_steps(work)[-1] == 3
