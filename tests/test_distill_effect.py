"""Stage 3 measured effect (heavy, `make test-all`): after ODE regression the 6-call student is
closer to its 60-call teacher on held-out prompts than the teacher's own weights run with the
6-call sampler (the distillation starting point). Runs `benchmarks/distill_effect.py` at a reduced
size; the full-size CPU numbers are in BENCHMARKS.md."""

import os
import subprocess
import sys
import json

import pytest

from conftest import HEAVY_SUBPROCESS_TIMEOUT_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.heavy
def test_distilled_student_is_closer_to_teacher(tmp_path):
  work = str(tmp_path / "effect")
  proc = subprocess.run(
      [sys.executable, "benchmarks/distill_effect.py", f"--workdir={work}", "--s1_steps=30",
       "--s2_steps=20", "--prompts=4", "--ode_steps=60", "--dmd_steps=10", "--eval_prompts=4"],
      cwd=REPO, capture_output=True, text=True, timeout=HEAVY_SUBPROCESS_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.load(open(os.path.join(work, "effect.json")))["results"]
  before = res["before (teacher weights, 6 calls)"]["mse"]
  ode = res["ODE student (EMA)"]["mse"]
  assert ode < 0.8 * before, (before, ode)
  assert res["DMD student (EMA)"]["mse"] < before
