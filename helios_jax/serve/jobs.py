"""Video jobs (OpenAI-videos style) and their persistent records.

Every generation the server runs (a job, or a realtime session's video) has a record, a JSON
file `<out_dir>/jobs/<id>.json` rewritten atomically at each change (status, chunks done,
timings); finished videos are `<out_dir>/videos/<id>.mp4`, written progressively to a hidden
temporary file and renamed when complete (`media.VideoWriter`). A new `JobStore` on the same
folder lists every earlier record; one left `queued` or `in_progress` by a server that died is
marked `failed` with the reason, so no job is silently lost.

Statuses: queued -> in_progress -> completed | failed | cancelled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import threading
import time
from typing import Any

import numpy as np

from helios_jax import media
from helios_jax import runtime
from helios_jax import sampling
from helios_jax.constants import CHUNK_FRAMES
from helios_jax.serve import driver as driver_lib
from helios_jax.serve.worker import CANCELLED, WorkItem

# Frame rate of the written mp4 files (the CLI's default and the official scripts').
VIDEO_FPS = 24
FINAL = ("completed", "failed", "cancelled")
_ID = re.compile(r"^video_[0-9a-f]{24}$")


def new_id() -> str:
  return f"video_{secrets.token_hex(12)}"


class JobStore:
  """The records of one output folder (thread-safe; see the module docstring)."""

  def __init__(self, out_dir: str | os.PathLike):
    self.out_dir = os.path.abspath(os.fspath(out_dir))
    runtime.check_writable(self.out_dir, folder=True)
    self.jobs_dir = os.path.join(self.out_dir, "jobs")
    self.videos_dir = os.path.join(self.out_dir, "videos")
    os.makedirs(self.jobs_dir, exist_ok=True)
    os.makedirs(self.videos_dir, exist_ok=True)
    self._lock = threading.Lock()
    self._records: dict[str, dict[str, Any]] = {}
    self._load()

  def _load(self) -> None:
    for name in sorted(os.listdir(self.jobs_dir)):
      if not name.endswith(".json") or name.startswith("."):
        continue
      path = os.path.join(self.jobs_dir, name)
      try:
        with open(path, encoding="utf-8") as f:
          rec = json.load(f)
        if not isinstance(rec, dict) or not _ID.match(str(rec.get("id", ""))):
          raise ValueError("not a job record")
      except (OSError, ValueError) as e:
        logging.warning("skipping unreadable job record %s: %s", path, e)
        continue
      if rec.get("status") not in FINAL:
        was = rec.get("status")
        rec.update(status="failed", completed_at=time.time(), error={
            "message": f"the server stopped while this {rec.get('kind', 'job')} was {was}; "
                       "it did not finish"})
        self._write(rec)
      self._records[rec["id"]] = rec

  def _write(self, rec: dict[str, Any]) -> None:
    with runtime.atomic_write(os.path.join(self.jobs_dir, f"{rec['id']}.json")) as f:
      json.dump(rec, f, indent=1)

  def create(self, kind: str, request: driver_lib.GenerationRequest,
             chunks_total: int | None) -> dict[str, Any]:
    rec = {"id": new_id(), "object": "video", "kind": kind, "status": "queued",
           "created_at": time.time(), "started_at": None, "completed_at": None,
           "progress": 0, "chunks_done": 0, "chunks_total": chunks_total,
           "frames": 0, "params": request.describe(), "timings": {}, "error": None,
           "end_reason": None}
    with self._lock:
      self._records[rec["id"]] = rec
      self._write(rec)
      return dict(rec)

  def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
    with self._lock:
      rec = self._records[job_id]
      rec.update(fields)
      self._write(rec)
      return dict(rec)

  def get(self, job_id: str) -> dict[str, Any] | None:
    with self._lock:
      rec = self._records.get(job_id)
      return None if rec is None else json.loads(json.dumps(rec))

  def list(self) -> list[dict[str, Any]]:
    with self._lock:
      return sorted((json.loads(json.dumps(r)) for r in self._records.values()),
                    key=lambda r: r["created_at"], reverse=True)

  def video_path(self, job_id: str) -> str:
    if not _ID.match(job_id):
      raise KeyError(job_id)
    return os.path.join(self.videos_dir, f"{job_id}.mp4")

  def delete(self, job_id: str) -> dict[str, Any]:
    """Removes a finished record and its video."""
    with self._lock:
      rec = self._records.pop(job_id)
      for path in (os.path.join(self.jobs_dir, f"{job_id}.json"), self.video_path(job_id)):
        if os.path.exists(path):
          os.remove(path)
      return rec


class TrimmedVideoWriter:
  """Appends whole chunks to an mp4, trimming the total to `sampling.output_frames(K)`.

  The trim (at most 3 frames, from the VAE's 1 + 4k frame grid) only touches the last chunk,
  so each chunk is written when the next arrives (or at `close`).
  """

  def __init__(self, path: str, fps: int = VIDEO_FPS):
    self.writer = media.VideoWriter(path, fps=fps)
    self._pending: np.ndarray | None = None
    self.chunks = 0
    self.frames = 0

  def add(self, frames: np.ndarray) -> None:
    if self._pending is not None:
      self.writer.write(self._pending)
      self.frames += len(self._pending)
    self._pending = frames
    self.chunks += 1

  def close(self) -> str | None:
    """Finishes the file (None and nothing written when no chunk came)."""
    if self._pending is None:
      self.writer.abort()
      return None
    keep = sampling.output_frames(self.chunks) - self.frames
    self.writer.write(self._pending[:keep])
    self.frames += keep
    self._pending = None
    return self.writer.close()

  def abort(self) -> None:
    self.writer.abort()


def timings(chunks: list[driver_lib.DriverChunk], first_chunk_s: float | None,
            wall_s: float) -> dict[str, Any]:
  """The timings block of a record."""
  gen = sum(c.dit_seconds + c.decode_seconds for c in chunks)
  frames = sampling.output_frames(len(chunks)) if chunks else 0
  return {"first_chunk_s": first_chunk_s, "wall_s": wall_s,
          "dit_s": [round(c.dit_seconds, 4) for c in chunks],
          "decode_s": [round(c.decode_seconds, 4) for c in chunks],
          "fps": frames / wall_s if wall_s > 0 and frames else None,
          "generation_fps": frames / gen if gen > 0 else None}


class JobItem(WorkItem):
  """A `POST /v1/videos` job: `num_frames` frames written to `<out_dir>/videos/<id>.mp4`."""

  kind = "job"

  def __init__(self, store: JobStore, request: driver_lib.GenerationRequest):
    self.store = store
    self.request = request
    self.chunks_total = sampling.num_chunks(request.num_frames)
    rec = store.create("job", request, self.chunks_total)
    super().__init__(rec["id"])

  def run(self, pipe: Any) -> None:
    t0 = time.perf_counter()
    self.store.update(self.id, status="in_progress", started_at=time.time())
    kept = sampling.output_frames(self.chunks_total)
    writer = media.VideoWriter(self.store.video_path(self.id), fps=VIDEO_FPS)
    done: list[driver_lib.DriverChunk] = []
    first = None
    try:
      drv = driver_lib.ChunkDriver(pipe, self.request)
      for k in range(self.chunks_total):
        if self.cancelled:
          break
        c = drv.step()
        keep = min(CHUNK_FRAMES, kept - k * CHUNK_FRAMES)
        writer.write(c.frames[:keep])
        done.append(strip_arrays(c))
        first = first if first is not None else time.perf_counter() - t0
        self.store.update(self.id, chunks_done=k + 1,
                          progress=int(100 * (k + 1) / self.chunks_total),
                          frames=min(kept, (k + 1) * CHUNK_FRAMES),
                          timings=timings(done, first, time.perf_counter() - t0))
      if self.cancelled:
        writer.abort()
        if self.cancel_reason == CANCELLED:
          self.store.update(self.id, status="cancelled", completed_at=time.time(),
                            end_reason="cancelled")
        else:
          self.store.update(self.id, status="failed", completed_at=time.time(),
                            error={"message": f"{self.cancel_reason} after {len(done)} of "
                                              f"{self.chunks_total} chunk(s)"})
        return
      writer.close()
    except BaseException:
      writer.abort()
      raise
    self.store.update(self.id, status="completed", completed_at=time.time(), progress=100,
                      frames=kept, end_reason="done",
                      timings=timings(done, first, time.perf_counter() - t0))

  def fail(self, message: str) -> None:
    self.store.update(self.id, status="failed", completed_at=time.time(),
                      error={"message": message})

  def skipped(self) -> None:
    self.store.update(self.id, status="cancelled", completed_at=time.time(),
                      end_reason="cancelled before it ran")


def strip_arrays(c: driver_lib.DriverChunk) -> driver_lib.DriverChunk:
  """The chunk without its frames and latents (kept for timings only)."""
  return dataclasses.replace(c, frames=None, latents=np.empty(0, np.float32))
