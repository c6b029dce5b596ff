"""The generation CLI, the example notebook and the embedded tiny preset."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  env = dict(os.environ, HELIOS_JAX_CACHE=str(tmp_path_factory.mktemp("helios_cache")),
             JAX_PLATFORMS="cpu")
  return env


@pytest.mark.slow
def test_cli_writes_video_and_reports_fps(cache_env, tmp_path):
  out = tmp_path / "demo.mp4"
  res = subprocess.run([sys.executable, "-m", "helios_jax.generate", f"--out={out}",
                        "--num_frames=66", "--seed=1", "--height=64", "--width=64"],
                       env=cache_env, capture_output=True,
                       text=True, check=False, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "FPS" in res.stdout and f"wrote {out}" in res.stdout
  # The plan is printed first; two chunks are both compilation runs: no steady state claimed.
  plan = [ln for ln in res.stdout.splitlines() if ln.startswith("generating ")]
  assert plan and plan[0].startswith(
      "generating 1 video(s) of 65 frames at 64x64: 66 requested frames -> 2 chunk(s) of 33")
  assert res.stdout.index(plan[0]) < res.stdout.index("loaded ")  # before the weights load
  assert "steady state: n/a" in res.stdout
  assert not [ln for ln in res.stderr.splitlines() if ln.startswith(("I1", "I0"))]  # quiet
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  frames = iio.imread(out, plugin="FFMPEG")
  assert frames.shape == (65, 64, 64, 3)  # 2 chunks = 66 frames, trimmed to 1 + 4k
  # Bad input: a clear error, exit code 2, nothing written.
  bad = tmp_path / "bad.mp4"
  res = subprocess.run([sys.executable, "-m", "helios_jax.generate", f"--out={bad}",
                        "--height=100"], env=cache_env, capture_output=True, text=True,
                       check=False, cwd=ROOT)
  assert res.returncode == 2 and "height=100" in res.stderr
  assert not bad.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


@pytest.mark.slow
def test_example_notebook_executes(cache_env, monkeypatch):
  """Runs every code cell of examples/generate_fn.ipynb in order (so it never rots)."""
  for k, v in cache_env.items():
    monkeypatch.setenv(k, v)
  with open(os.path.join(ROOT, "examples", "generate_fn.ipynb")) as f:
    nb = json.load(f)
  namespace = {}
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert len(code) >= 3
  for cell in code:
    exec(compile("".join(cell["source"]), "generate_fn.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["frames"].shape == (1, 97, 64, 64, 3)
  assert namespace["frames"].dtype == np.uint8


@pytest.mark.parametrize("args,message", [
    (["--height=100"], "height=100 must be a positive multiple of 16"),
    (["--height=96"], "divisible by"),                     # 3-stage pyramid: multiples of 64
    (["--num_frames=0"], "--num_frames=0 must be >= 1"),
    (["--steps=2,x,2"], "--steps=2,x,2 must be integers"),
    (["--steps=2,2"], "need one entry per scheduler stage"),
    (["--video={bad}"], "unreadable video"),
    (["--out={afile}/x.mp4"], "is not a folder"),
    (["--interpolate_prompts", "--prompt=a", "--prompt=b", "--interpolate_time=2"],
     "must exceed interpolation_steps"),
])
def test_cli_rejects_bad_arguments_before_loading_weights(tmp_path, args, message):
  """The model folder holds only the config files: an argument error must come first."""
  from helios_jax import presets  # pylint: disable=g-import-not-at-top
  full = presets.write_tiny_pipeline(tmp_path / "full")
  configs = tmp_path / "configs_only"
  for root, _, files in os.walk(full):
    if os.sep + "params" in root or root.endswith("tokenizer"):
      continue
    for f in files:
      if f.endswith(".json"):
        dst = configs / os.path.relpath(os.path.join(root, f), full)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(open(os.path.join(root, f), "rb").read())
  (tmp_path / "bad.mp4").write_text("not a video")
  (tmp_path / "afile").write_text("")
  args = [a.format(bad=tmp_path / "bad.mp4", afile=tmp_path / "afile") for a in args]
  res = subprocess.run([sys.executable, "-m", "helios_jax.generate", f"--model_dir={configs}",
                        f"--out={tmp_path / 'o.mp4'}", *args], capture_output=True, text=True,
                       check=False, cwd=ROOT)
  assert res.returncode == 2, res.stderr[-2000:]
  err = res.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_plan_describes_the_interactive_schedule():
  from helios_jax import pipeline  # pylint: disable=g-import-not-at-top
  k, plan = pipeline.interactive_schedule(44, 2, 7, 3)
  lines = pipeline.describe_plan(k, 1452, 1, 384, 640, plan)
  assert lines[0].startswith("generating 1 video(s) of 1449 frames at 384x640: interactive")
  assert lines[1:] == ["  chunks 0-6: prompt 0",
                       "  chunks 7-9: blend prompt 0 -> 1 (weights 0, 0.5, 1)",
                       "  chunks 10-13: prompt 1",
                       "  chunks 14-43: prompt 0 (past the last prompt: back to prompt 0, "
                       "as upstream)"]
  k, plan = pipeline.interactive_schedule(2, 2, 7, 3)
  assert k == 14 and pipeline.describe_plan(k, 66, 1, 64, 64, plan)[0].startswith(
      "generating 1 video(s) of 461 frames")
