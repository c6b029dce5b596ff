"""The generation worker: one thread owns the device and runs queued work items one at a time.

Realtime sessions and jobs are both `WorkItem`s. `submit` puts an item in a bounded FIFO queue
(`Busy` when full, with the queue length and an estimated retry time); the worker thread takes
the oldest item and calls `item.run(pipe)`, which generates chunk by chunk and checks
`item.cancelled` at every chunk boundary (a disconnected client, a DELETE, a `session.stop`). An
item cancelled while it waits is skipped. `stop()` cancels the running item and fails the queued
ones with a reason, so no item is silently dropped.
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
import time
import traceback
from typing import Any

# How long `stop()` waits for the running item to reach its next chunk boundary.
STOP_TIMEOUT_S = 120.0
# Seconds assumed per queued item before any item has finished (for `Busy.retry_after_s`).
DEFAULT_ITEM_SECONDS = 30.0
# `WorkItem.cancel_reason` of a cancellation the client asked for (others are failures).
CANCELLED = "cancelled"


class Busy(Exception):
  """The queue is full.

  Attributes:
    queued: items waiting. max_queue: the queue's bound. retry_after_s: estimated seconds
    until a place frees up.
  """

  def __init__(self, queued: int, max_queue: int, retry_after_s: int):
    super().__init__(f"the server is busy: {queued} request(s) queued (limit {max_queue}); "
                     f"retry in about {retry_after_s} s")
    self.queued = queued
    self.max_queue = max_queue
    self.retry_after_s = retry_after_s


class WorkItem(abc.ABC):
  """A unit of device work (a job or a realtime session).

  Subclasses implement `run(pipe)` (generate, checking `cancelled` between chunks) and
  `fail(message)` (record that the item could not run).
  """

  kind = "item"

  def __init__(self, item_id: str):
    self.id = item_id
    self._cancel = threading.Event()
    self.cancel_reason: str | None = None
    self.finished = threading.Event()

  @property
  def cancelled(self) -> bool:
    return self._cancel.is_set()

  def cancel(self, reason: str = CANCELLED) -> None:
    """Asks the item to stop at its next chunk boundary (or not to start).

    `reason`: `CANCELLED` (the client asked), or why the server stops it (reported as a
    failure, e.g. "the server shut down").
    """
    if not self._cancel.is_set():
      self.cancel_reason = reason
    self._cancel.set()

  @abc.abstractmethod
  def run(self, pipe: Any) -> None:
    """Produces the item's chunks on the worker thread (checks `cancelled` between chunks)."""

  @abc.abstractmethod
  def fail(self, message: str) -> None:
    """Records that the item could not run (`message` says why)."""

  def skipped(self) -> None:
    """Called instead of `run` for an item cancelled while it waited."""


class GenerationWorker:
  """One thread running `WorkItem`s in order on `pipe` (see the module docstring)."""

  def __init__(self, pipe: Any, max_queue: int = 8):
    if max_queue < 1:
      raise ValueError(f"max_queue={max_queue} must be >= 1")
    self.pipe = pipe
    self.max_queue = max_queue
    self._queue: collections.deque[WorkItem] = collections.deque()
    self._cond = threading.Condition()
    self._current: WorkItem | None = None
    self._stopping = False
    self._thread: threading.Thread | None = None
    self._durations: collections.deque[float] = collections.deque(maxlen=20)
    self.completed = 0
    self.failed = 0

  # ------------------------------------------------------------------------------ control

  def start(self) -> None:
    if self._thread is not None:
      return
    self._thread = threading.Thread(target=self._loop, name="helios-generation-worker",
                                    daemon=True)
    self._thread.start()

  def stop(self, reason: str = "the server shut down", timeout: float = STOP_TIMEOUT_S) -> None:
    """Fails queued items with `reason`, cancels the running one and joins the thread."""
    with self._cond:
      self._stopping = True
      queued = list(self._queue)
      self._queue.clear()
      current = self._current
      self._cond.notify_all()
    for item in queued:
      item.cancel(reason)
      _safe_fail(item, f"{reason} before this request ran")
    if current is not None:
      current.cancel(reason)
    if self._thread is not None:
      self._thread.join(timeout)
      self._thread = None

  # ------------------------------------------------------------------------------ queue

  def submit(self, item: WorkItem) -> int:
    """Queues `item`; returns how many items run before it (0: it runs next).

    Raises:
      Busy: the queue holds `max_queue` items.
      RuntimeError: the worker is stopping.
    """
    with self._cond:
      if self._stopping:
        raise RuntimeError("the server is shutting down")
      if len(self._queue) >= self.max_queue:
        raise Busy(len(self._queue), self.max_queue, self._retry_after_locked())
      self._queue.append(item)
      ahead = len(self._queue) - 1 + (self._current is not None)
      self._cond.notify_all()
      return ahead

  def remove(self, item: WorkItem) -> bool:
    """Takes a waiting `item` out of the queue; False when it is not waiting."""
    with self._cond:
      try:
        self._queue.remove(item)
        return True
      except ValueError:
        return False

  def position(self, item: WorkItem) -> int | None:
    """Items that run before a waiting `item`; None when it is not waiting."""
    with self._cond:
      for i, queued in enumerate(self._queue):
        if queued is item:
          return i + (self._current is not None)
      return None

  def status(self) -> dict[str, Any]:
    with self._cond:
      return {"queued": len(self._queue), "max_queue": self.max_queue,
              "running": None if self._current is None else {
                  "id": self._current.id, "kind": self._current.kind},
              "completed": self.completed, "failed": self.failed,
              "alive": self._thread is not None and self._thread.is_alive()}

  def retry_after(self) -> int:
    with self._cond:
      return self._retry_after_locked()

  def _retry_after_locked(self) -> int:
    per_item = (sum(self._durations) / len(self._durations) if self._durations
                else DEFAULT_ITEM_SECONDS)
    return max(1, int(round(per_item * (len(self._queue) + (self._current is not None)))))

  # ------------------------------------------------------------------------------ thread

  def _loop(self) -> None:
    while True:
      with self._cond:
        while not self._queue and not self._stopping:
          self._cond.wait()
        if self._stopping:
          return
        item = self._queue.popleft()
        self._current = item
      t0 = time.perf_counter()
      try:
        if item.cancelled:
          item.skipped()
        else:
          item.run(self.pipe)
          self.completed += 1
      except Exception as e:  # pylint: disable=broad-except
        # An item's failure is reported to its client; the worker keeps serving the others.
        self.failed += 1
        logging.error("work item %s failed: %s", item.id, traceback.format_exc())
        _safe_fail(item, f"{type(e).__name__}: {e}")
      finally:
        self._durations.append(time.perf_counter() - t0)
        item.finished.set()
        with self._cond:
          self._current = None


def _safe_fail(item: WorkItem, message: str) -> None:
  try:
    item.fail(message)
  except Exception:  # pylint: disable=broad-except
    logging.error("reporting the failure of %s failed: %s", item.id, traceback.format_exc())
  finally:
    item.finished.set()
