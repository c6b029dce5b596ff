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


def dit_inputs(cfg, dtype, seed: int = 0) -> dict:
  """Random DiT inputs (diffusers names, channel-first) with all three history groups: 3 noisy
  frames of 12x10 latents, 7 text tokens."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  c = cfg.in_channels
  rnd = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return dict(
      hidden_states=rnd(1, c, 3, 12, 10), timestep=jnp.array([731.25]),
      encoder_hidden_states=rnd(1, 7, cfg.text_dim), indices_hidden_states=jnp.arange(20, 23)[None],
      latents_history_short=rnd(1, c, 2, 12, 10), indices_latents_history_short=jnp.array([[0, 19]]),
      latents_history_mid=rnd(1, c, 2, 12, 10), indices_latents_history_mid=jnp.array([[17, 18]]),
      latents_history_long=rnd(1, c, 5, 12, 10),
      indices_latents_history_long=jnp.arange(1, 6)[None])
