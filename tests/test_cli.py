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
