"""The ASGI application (FastAPI): realtime WebSocket, video jobs, the page.

  app = create_app(pipe, ServerConfig(out_dir="outputs/serve"))
  uvicorn.run(app, host="127.0.0.1", port=8000)        # or `python -m helios_jax.serve`

Routes:
  GET  /                          the page (static/index.html)
  GET  /v1/health                 worker state and queue
  GET  /v1/config                 defaults and limits (the page reads them)
  WS   /v1/realtime/video         realtime sessions (protocol: sessions.py)
  POST /v1/videos                 a job: JSON, or multipart with an `image` / `video` file
                                  -> {id, status, ...}; 429 + Retry-After when the queue is full
  GET  /v1/videos                 every record, newest first
  GET  /v1/videos/{id}            status, chunks done / total, timings, error
  GET  /v1/videos/{id}/content    the finished mp4
  DELETE /v1/videos/{id}          cancels a queued / running job; deletes a finished one

All device work runs on one `GenerationWorker` thread (started and stopped with the app).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
import time
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from helios_jax import pipeline as pipeline_lib
from helios_jax.serve import driver as driver_lib
from helios_jax.serve import jobs as jobs_lib
from helios_jax.serve import sessions
from helios_jax.serve import validation
from helios_jax.serve.worker import Busy, GenerationWorker

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# Multipart overhead allowed on top of the upload limit (boundaries, the other fields).
FORM_OVERHEAD_BYTES = 1 << 20
# How long `ServerThread` waits for uvicorn to bind or to stop.
SERVER_START_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """Settings of a server.

  Attributes:
    out_dir: records (`jobs/`) and finished videos (`videos/`).
    max_queue: requests waiting for the device (beyond it: 429 / `busy`).
    limits: per-request limits (`validation.Limits`).
    default_size: (height, width) of a request that names none.
    jpeg_quality: quality of the streamed JPEG frames.
  """

  out_dir: str = "outputs/serve"
  max_queue: int = 8
  limits: validation.Limits = validation.Limits()
  default_size: tuple[int, int] = (384, 640)
  jpeg_quality: int = 85

  @property
  def ws_max_size(self) -> int:
    """Largest WebSocket message: a base64 upload at the limit plus the other fields."""
    return (self.limits.max_upload_bytes + 2) // 3 * 4 + FORM_OVERHEAD_BYTES


def _error(status: int, message: str, param: str | None = None,
           headers: dict[str, str] | None = None, kind: str = "invalid_request_error"):
  return JSONResponse({"error": {"message": message, "type": kind, "param": param}},
                      status_code=status, headers=headers)


def create_app(pipe: pipeline_lib.Pipeline, config: ServerConfig = ServerConfig()):
  """The FastAPI app serving `pipe` (see the module docstring)."""
  store = jobs_lib.JobStore(config.out_dir)
  worker = GenerationWorker(pipe, config.max_queue)
  session_config = sessions.SessionConfig(config.limits, tuple(config.default_size),
                                          config.jpeg_quality)
  items: dict[str, Any] = {}  # live work items by id (for DELETE)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    worker.start()
    try:
      yield
    finally:
      await asyncio.to_thread(worker.stop, "the server shut down")

  app = FastAPI(title="helios-jax", lifespan=lifespan)
  app.state.worker, app.state.store, app.state.config = worker, store, config
  app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

  @app.get("/", include_in_schema=False)
  async def index():
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

  @app.get("/v1/health")
  async def health():
    return {"status": "ok", **worker.status()}

  @app.get("/v1/config")
  async def server_config():
    return {"default_height": config.default_size[0], "default_width": config.default_size[1],
            "default_steps": list(pipe.default_steps), "pyramid": pipe.is_pyramid,
            "interpolation_steps": driver_lib.DEFAULT_INTERPOLATION_STEPS, "chunk_frames": pipeline_lib.CHUNK_FRAMES,
            "fps": jobs_lib.VIDEO_FPS, "max_queue": config.max_queue,
            "limits": dataclasses.asdict(config.limits)}

  @app.websocket("/v1/realtime/video")
  async def realtime(ws: WebSocket):
    await sessions.realtime_endpoint(ws, worker, store, session_config)

  @app.post("/v1/videos")
  async def create_video(request: Request):
    limits = config.limits
    ctype = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > (
        (limits.max_upload_bytes + 2) // 3 * 4 + FORM_OVERHEAD_BYTES):
      return _error(413, f"the request body of {length} bytes exceeds the upload limit of "
                    f"{limits.max_upload_bytes} bytes", None)
    image = video = None
    try:
      if ctype.startswith("multipart/form-data"):
        try:
          form = await request.form(max_files=2, max_fields=32)
        except Exception as e:  # pylint: disable=broad-except  (malformed multipart)
          return _error(400, f"unreadable multipart body: {e}")
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
          if hasattr(value, "read"):  # an uploaded file
            if key not in ("image", "video"):
              return _error(400, f"unexpected file field '{key}' (use image or video)", key)
            data = await value.read(limits.max_upload_bytes + 1)
            validation.check_upload_size(len(data), key, limits)
            image, video = (data, video) if key == "image" else (image, data)
          else:
            fields[key] = value
      elif ctype.startswith("application/json") or not ctype:
        body = await request.body()
        try:
          fields = json.loads(body)
        except ValueError as e:
          return _error(400, f"the body is not valid JSON ({e})")
        if not isinstance(fields, dict):
          return _error(400, f"the body must be a JSON object, got {type(fields).__name__}")
      else:
        return _error(415, f"unsupported content type {ctype!r}: send application/json or "
                      "multipart/form-data")
      req = await asyncio.to_thread(
          validation.parse_request, fields, pipe, limits, realtime=False,
          default_size=config.default_size, image=image, video=video)
    except validation.RequestError as e:
      return _error(e.status, str(e), e.param)
    item = jobs_lib.JobItem(store, req)
    try:
      worker.submit(item)
    except (Busy, RuntimeError) as e:
      store.delete(item.id)  # rejected before it was queued: no record
      retry = getattr(e, "retry_after_s", worker.retry_after())
      return _error(429 if isinstance(e, Busy) else 503, str(e), None,
                    headers={"Retry-After": str(retry)}, kind="rate_limit_error")
    for old in [k for k, v in items.items() if v.finished.is_set()]:
      items.pop(old)
    items[item.id] = item
    return store.get(item.id)

  @app.get("/v1/videos")
  async def list_videos():
    return {"object": "list", "data": store.list()}

  @app.get("/v1/videos/{video_id}")
  async def get_video(video_id: str):
    rec = store.get(video_id)
    if rec is None:
      return _error(404, f"no video {video_id!r}", "video_id")
    return rec

  @app.get("/v1/videos/{video_id}/content")
  async def get_content(video_id: str):
    rec = store.get(video_id)
    if rec is None:
      return _error(404, f"no video {video_id!r}", "video_id")
    path = store.video_path(video_id)
    if rec["status"] != "completed" or not os.path.isfile(path):
      return _error(409, f"video {video_id} is {rec['status']}; its content exists once it is "
                    "completed", "video_id")
    return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

  @app.delete("/v1/videos/{video_id}")
  async def delete_video(video_id: str):
    rec = store.get(video_id)
    if rec is None:
      return _error(404, f"no video {video_id!r}", "video_id")
    if rec["status"] in jobs_lib.FINAL:
      store.delete(video_id)
      return {**rec, "deleted": True}
    item = items.get(video_id)
    if item is None:  # a realtime session: ended by its connection (session.stop)
      return _error(409, f"{video_id} is a running realtime session; stop it from its "
                    "connection", "video_id")
    item.cancel()
    if worker.remove(item):
      item.skipped()
      item.finished.set()
    else:
      await asyncio.to_thread(item.finished.wait, SERVER_START_TIMEOUT_S)
    return store.get(video_id)

  return app


class ServerThread:
  """A uvicorn server for `app` on a background thread (tests, benchmarks).

    with ServerThread(app) as server:        # port 0: a free port on 127.0.0.1
      httpx.get(server.url + "/v1/health")
  """

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, ws_max_size: int | None = None):
    import uvicorn  # pylint: disable=g-import-not-at-top
    cfg = app.state.config
    self.server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on",
        ws_max_size=ws_max_size or cfg.ws_max_size))
    self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
    self.host = host
    self.port = None

  def start(self) -> "ServerThread":
    self.thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not self.server.started:
      if not self.thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError("the server did not start")
      time.sleep(0.02)
    self.port = self.server.servers[0].sockets[0].getsockname()[1]
    return self

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  @property
  def ws_url(self) -> str:
    return f"ws://{self.host}:{self.port}"

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(SERVER_START_TIMEOUT_S)

  def __enter__(self) -> "ServerThread":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
