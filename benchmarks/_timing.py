"""Wall-clock timing shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import time
from typing import Callable


def timeit(fn: Callable[[], object], repeats: int) -> list[float]:
  """Seconds of `repeats` calls of `fn` (the caller blocks on device results inside `fn`)."""
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def compile_and_time(fn: Callable[[], object], repeats: int) -> tuple[object, float, list[float]]:
  """(first result, seconds of the first call — compilation included —, `timeit` of the rest)."""
  t0 = time.perf_counter()
  out = fn()
  compile_s = time.perf_counter() - t0
  return out, compile_s, timeit(fn, repeats)


def torch_time(fn: Callable[[], object], repeats: int) -> tuple[object, list[float]]:
  """(first result, `timeit`) of a PyTorch callable on every core, without autograd."""
  import os  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  with torch.no_grad():
    out = fn()
    return out, timeit(fn, repeats)
