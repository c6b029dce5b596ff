"""Realtime sessions: the `/v1/realtime/video` WebSocket protocol and its work item.

Client -> server (JSON text messages):
  {"type": "session.start", "prompt": str, "negative_prompt"?: str, "seed"?: int,
   "height"?: int, "width"?: int, "steps"?: int | [int], "guidance_scale"?: float,
   "interpolation_steps"?: int, "image"? | "video"?: base64 file, "max_chunks"?: int,
   "include_latents"?: bool}
  {"type": "prompt.update", "prompt": str}      blended in from the next chunk boundary
  {"type": "session.stop"}                      ends after the chunk in progress
Server -> client:
  {"type": "session.queued", "session_id", "position"}     items ahead of it on the device
  {"type": "busy", "queued", "max_queue", "retry_after_s", "message"}   queue full (no session)
  {"type": "session.started", "session_id", "height", "width", "fps", "chunk_frames", ...}
  {"type": "prompt.accepted", "prompt"}
  {"type": "chunk", "index", "frames": 33, "prompts": [{"prompt", "weight"}], "blend_weight",
   "dit_s", "decode_s", "encode_s", "fps", "stream_fps", "time_to_first_chunk_s",
   "media": "image/jpeg", "sizes": [33 byte counts], "latents_bytes"?}
     followed by one binary message: the chunk's 33 JPEG frames back to back (`sizes` splits
     them), and with `include_latents` a second one: the chunk's `[1, 16, 9, h, w]` float32
     latents as a .npy file.
  {"type": "session.ended", "session_id", "reason", "chunks", "video_url"?}
  {"type": "error", "code", "message", "param"?}  a bad message; the connection stays usable

One session runs per connection at a time; it holds the device from its first chunk to its end
(session.stop, its duration / chunk limit, or a disconnect, which frees the worker at the next
chunk boundary). At most `MAX_CHUNKS_IN_FLIGHT` chunks wait for a slow client (the generator
waits, so memory stays bounded). The video of every session is also written as an mp4 record
(`/v1/videos/{session_id}/content`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading
import time
from typing import Any, Callable

import numpy as np

from helios_jax.constants import CHUNK_FRAMES
from helios_jax.serve import driver as driver_lib
from helios_jax.serve import jobs as jobs_lib
from helios_jax.serve import validation
from helios_jax.serve.worker import Busy, GenerationWorker, WorkItem

# Chunks generated ahead of what the client has received.
MAX_CHUNKS_IN_FLIGHT = 2
# How often a waiting generator re-checks for a cancellation.
POLL_S = 0.1
# How long a closing connection waits for its last events to go out.
SENDER_DRAIN_TIMEOUT_S = 10.0
EVENT_TYPES = ("session.start", "prompt.update", "session.stop")


@dataclasses.dataclass(frozen=True)
class SessionConfig:
  """Server-side settings of realtime sessions."""

  limits: validation.Limits
  default_size: tuple[int, int]
  jpeg_quality: int = 85


def encode_jpegs(frames: np.ndarray, quality: int = 85) -> list[bytes]:
  """`[T, H, W, 3]` uint8 -> T JPEG files."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for frame in frames:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    out.append(buf.getvalue())
  return out


def npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  return buf.getvalue()


@dataclasses.dataclass
class Outgoing:
  """One message for the client: a JSON event, plus the chunk's frames / latents."""

  event: dict[str, Any]
  frames: np.ndarray | None = None
  latents: np.ndarray | None = None
  credit: threading.Semaphore | None = None
  start_clock: bool = False  # not sent: restarts the time-to-first-chunk clock


class RealtimeSession(WorkItem):
  """The device side of one realtime session (runs on the generation worker)."""

  kind = "realtime"

  def __init__(self, store: jobs_lib.JobStore, request: driver_lib.GenerationRequest,
               limits: validation.Limits, emit: Callable[[Outgoing], None],
               max_chunks: int | None = None, include_latents: bool = False):
    self.store = store
    self.request = request
    self.limits = limits
    self.emit = emit
    self.max_chunks = limits.max_session_chunks if max_chunks is None else max_chunks
    self.include_latents = include_latents
    self._lock = threading.Lock()
    self._driver: driver_lib.ChunkDriver | None = None
    self._pending_prompt: str | None = None
    self.credits = threading.Semaphore(MAX_CHUNKS_IN_FLIGHT)
    rec = store.create("realtime", request, None)
    super().__init__(rec["id"])

  def update_prompt(self, prompt: str) -> None:
    """Blends `prompt` in from the next chunk boundary (any thread)."""
    with self._lock:
      if self._driver is None:
        self._pending_prompt = prompt
      else:
        self._driver.update_prompt(prompt)

  def _end_reason(self, started: float, chunks: int) -> str | None:
    if self.cancelled:
      return self.cancel_reason
    if time.perf_counter() - started >= self.limits.max_session_seconds:
      return "duration limit"
    if chunks >= self.max_chunks:
      return "chunk limit"
    return None

  def run(self, pipe: Any) -> None:
    t0 = time.perf_counter()
    self.store.update(self.id, status="in_progress", started_at=time.time())
    writer = jobs_lib.TrimmedVideoWriter(self.store.video_path(self.id))
    done: list[driver_lib.DriverChunk] = []
    first = None
    try:
      drv = driver_lib.ChunkDriver(pipe, self.request)
      with self._lock:
        self._driver = drv
        if self._pending_prompt is not None:
          drv.update_prompt(self._pending_prompt)
      req = self.request
      self.emit(Outgoing({"type": "session.started", "session_id": self.id,
                          "height": req.height, "width": req.width, "seed": req.seed,
                          "fps": jobs_lib.VIDEO_FPS, "chunk_frames": CHUNK_FRAMES,
                          "interpolation_steps": req.interpolation_steps,
                          "max_chunks": self.max_chunks,
                          "max_seconds": self.limits.max_session_seconds,
                          "setup_s": drv.setup_seconds}))
      reason = None
      while (reason := self._end_reason(t0, len(done))) is None:
        c = drv.step()
        writer.add(c.frames)
        done.append(jobs_lib.strip_arrays(c))
        first = first if first is not None else time.perf_counter() - t0
        self.store.update(self.id, chunks_done=len(done), frames=writer.chunks * CHUNK_FRAMES,
                          timings=jobs_lib.timings(done, first, time.perf_counter() - t0))
        while not self.credits.acquire(timeout=POLL_S):  # the client is behind: wait
          if self._end_reason(t0, 0) is not None:
            break
        else:
          self.emit(Outgoing(
              {"type": "chunk", "session_id": self.id, "index": c.index,
               "frames": CHUNK_FRAMES, "height": req.height, "width": req.width,
               "prompts": [{"prompt": p, "weight": round(w, 6)} for p, w in c.prompts],
               "blend_weight": c.blend_weight, "dit_s": c.dit_seconds,
               "decode_s": c.decode_seconds, "encode_s": c.encode_seconds, "fps": c.fps},
              frames=c.frames, latents=c.latents if self.include_latents else None,
              credit=self.credits))
      path = writer.close()
    except BaseException:
      writer.abort()
      raise
    wall = time.perf_counter() - t0
    self.store.update(self.id, status="completed" if path else "cancelled",
                      completed_at=time.time(), end_reason=reason,
                      frames=writer.frames, progress=100,
                      timings=jobs_lib.timings(done, first, wall))
    self.emit(Outgoing({"type": "session.ended", "session_id": self.id, "reason": reason,
                        "chunks": len(done),
                        "video_url": f"/v1/videos/{self.id}/content" if path else None}))

  def fail(self, message: str) -> None:
    self.store.update(self.id, status="failed", completed_at=time.time(),
                      error={"message": message})
    self.emit(Outgoing({"type": "error", "code": "generation_failed", "message": message,
                        "session_id": self.id}))
    self.emit(Outgoing({"type": "session.ended", "session_id": self.id, "reason": "error",
                        "chunks": 0, "video_url": None}))

  def skipped(self) -> None:
    self.store.update(self.id, status="cancelled", completed_at=time.time(),
                      end_reason=self.cancel_reason)
    self.emit(Outgoing({"type": "session.ended", "session_id": self.id,
                        "reason": self.cancel_reason, "chunks": 0, "video_url": None}))


def _error(code: str, message: str, param: str | None = None) -> Outgoing:
  return Outgoing({"type": "error", "code": code, "message": message, "param": param})


async def _send_all(ws, outq: asyncio.Queue, quality: int) -> None:
  """Sends queued `Outgoing`s in order until a None arrives or the client is gone."""
  sent_first = None
  sent_chunks = 0
  t_start = None
  while True:
    out = await outq.get()
    if out is None:
      return
    event = dict(out.event)
    blobs = None
    try:
      if out.start_clock:
        t_start, sent_first, sent_chunks = time.perf_counter(), None, 0
        continue
      if out.frames is not None:
        blobs = await asyncio.to_thread(encode_jpegs, out.frames, quality)
        now = time.perf_counter()
        if sent_first is None:
          sent_first = now
        event.update(media="image/jpeg", sizes=[len(b) for b in blobs],
                     time_to_first_chunk_s=None if t_start is None else sent_first - t_start,
                     stream_fps=(CHUNK_FRAMES * sent_chunks / (now - sent_first)
                                 if sent_chunks and now > sent_first else None))
        sent_chunks += 1
      latents = None if out.latents is None else npy_bytes(out.latents)
      if latents is not None:
        event["latents_bytes"] = len(latents)
      await ws.send_text(json.dumps(event))
      if blobs is not None:
        await ws.send_bytes(b"".join(blobs))
      if latents is not None:
        await ws.send_bytes(latents)
    except Exception:  # pylint: disable=broad-except  (the client went away mid-send)
      return
    finally:
      if out.credit is not None:
        out.credit.release()


async def realtime_endpoint(ws, worker: GenerationWorker, store: jobs_lib.JobStore,
                            config: SessionConfig) -> None:
  """Serves one WebSocket connection (Starlette `WebSocket`); see the module docstring."""
  from starlette.websockets import WebSocketDisconnect  # pylint: disable=g-import-not-at-top
  await ws.accept()
  loop = asyncio.get_running_loop()
  outq: asyncio.Queue = asyncio.Queue()
  limits = config.limits

  def emit_threadsafe(out: Outgoing) -> None:
    try:
      loop.call_soon_threadsafe(outq.put_nowait, out)
    except RuntimeError:  # the connection's loop is gone: nobody to tell
      if out.credit is not None:
        out.credit.release()

  sender = asyncio.create_task(_send_all(ws, outq, config.jpeg_quality))
  session: RealtimeSession | None = None
  try:
    while True:
      msg = await ws.receive()
      if msg["type"] == "websocket.disconnect":
        break
      if msg.get("text") is None:
        outq.put_nowait(_error("binary_not_accepted", "binary messages are not accepted; send "
                               "JSON text events (session.start, prompt.update, session.stop)"))
        continue
      try:
        event = json.loads(msg["text"])
      except ValueError as e:
        outq.put_nowait(_error("invalid_json", f"the message is not valid JSON ({e})"))
        continue
      kind = event.get("type") if isinstance(event, dict) else None
      if kind not in EVENT_TYPES:
        what = (f"unknown event type {kind!r}" if isinstance(event, dict) else
                f"a JSON {type(event).__name__}, not an event object")
        outq.put_nowait(_error("unknown_event", f"{what}; expected one of {list(EVENT_TYPES)}",
                               "type"))
        continue
      active = session is not None and not session.finished.is_set()
      if kind == "session.start":
        if active:
          outq.put_nowait(_error("session_active", "a session is already running on this "
                                 "connection; send session.stop first"))
          continue
        try:
          request, max_chunks, latents = await asyncio.to_thread(
              _parse_start, event, worker.pipe, config)
        except validation.RequestError as e:
          code = "upload_too_large" if e.status == 413 else "invalid_request"
          outq.put_nowait(_error(code, str(e), e.param))
          continue
        session = RealtimeSession(store, request, limits, emit_threadsafe,
                                  max_chunks=max_chunks, include_latents=latents)
        try:
          ahead = worker.submit(session)
        except (Busy, RuntimeError) as e:
          store.delete(session.id)  # never queued: no record
          session = None
          outq.put_nowait(Outgoing(
              {"type": "busy", "message": str(e), "queued": getattr(e, "queued", None),
               "max_queue": worker.max_queue, "retry_after_s": getattr(
                   e, "retry_after_s", worker.retry_after())}))
          continue
        outq.put_nowait(Outgoing({}, start_clock=True))
        outq.put_nowait(Outgoing({"type": "session.queued", "session_id": session.id,
                                  "position": ahead}))
      elif kind == "prompt.update":
        if not active:
          outq.put_nowait(_error("no_session", "prompt.update needs a running session; send "
                                 "session.start first"))
          continue
        try:
          prompt = validation.parse_prompt(event, limits)
        except validation.RequestError as e:
          outq.put_nowait(_error("invalid_request", str(e), e.param))
          continue
        session.update_prompt(prompt)
        outq.put_nowait(Outgoing({"type": "prompt.accepted", "session_id": session.id,
                                  "prompt": prompt}))
      else:  # session.stop
        if not active:
          outq.put_nowait(_error("no_session", "session.stop: no session is running"))
          continue
        _end(session, worker, "stopped")
  except WebSocketDisconnect:
    pass
  finally:
    if session is not None and not session.finished.is_set():
      _end(session, worker, "client disconnected")
    outq.put_nowait(None)
    try:
      await asyncio.wait_for(sender, SENDER_DRAIN_TIMEOUT_S)
    except (asyncio.TimeoutError, asyncio.CancelledError):
      sender.cancel()


def _end(session: RealtimeSession, worker: GenerationWorker, reason: str) -> None:
  session.cancel(reason)
  if worker.remove(session):  # still waiting: it never runs
    session.skipped()
    session.finished.set()


def _parse_start(event: dict[str, Any], pipe: Any, config: SessionConfig
                 ) -> tuple[driver_lib.GenerationRequest, int, bool]:
  fields = {k: v for k, v in event.items() if k != "type"}
  request = validation.parse_request(fields, pipe, config.limits, realtime=True,
                                     default_size=config.default_size)
  max_chunks = validation.parse_int(fields, "max_chunks", config.limits.max_session_chunks,
                                   lo=1, hi=config.limits.max_session_chunks)
  latents = fields.get("include_latents", False)
  if not isinstance(latents, bool):
    raise validation.RequestError(f"include_latents={latents!r} must be true or false",
                                  "include_latents")
  return request, max_chunks, latents
