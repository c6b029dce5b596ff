"""Shared pytest set-up: CPU JAX, deterministic torch, GPU-test skipping."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", os.environ.get("HELIOS_TEST_PLATFORMS", "cpu"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache per test session, shared with the subprocesses the tests start (CLI
# runs compile the same tiny programs as the in-process tests).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="helios_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest


# Named, generous limits. No test asserts on wall-clock time; these only stop a hung run. A
# loaded 2-core machine (another job on both cores) runs several times slower than an idle one.
SUBPROCESS_TIMEOUT_S = 3600      # one CLI / training subprocess
HEAVY_SUBPROCESS_TIMEOUT_S = 7200  # a multi-stage `heavy` run (benchmarks/distill_effect.py)
LOCAL_HTTP_TIMEOUT_S = 120       # a request to a server the test runs on localhost


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  del config
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU (none present)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref| (the project's parity metric)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
