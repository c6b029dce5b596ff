"""Wall-clock timing shared by the benchmark scripts (run as `python bench/<name>.py`)."""

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
