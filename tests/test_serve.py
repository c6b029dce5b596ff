"""The real-time server (helios_jax/serve): protocol, parity, jobs, limits, the page, load.

Everything runs on the tiny distilled preset at 64x64 on CPU, against uvicorn servers on free
ports of 127.0.0.1 (`ServerThread`) with real clients (websockets, httpx, headless Chromium).
One pipeline is shared by every server of the module, so each program compiles once.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time

import numpy as np
import pytest

from conftest import LOCAL_HTTP_TIMEOUT_S

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from websockets.sync.client import connect  # pylint: disable=g-import-not-at-top

from helios_jax import media  # pylint: disable=g-import-not-at-top
from helios_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
from helios_jax import presets  # pylint: disable=g-import-not-at-top
from helios_jax.serve import app as app_lib  # pylint: disable=g-import-not-at-top
from helios_jax.serve import driver as driver_lib  # pylint: disable=g-import-not-at-top
from helios_jax.serve import jobs as jobs_lib  # pylint: disable=g-import-not-at-top
from helios_jax.serve import validation  # pylint: disable=g-import-not-at-top

# ffmpeg (the mp4 writer) starts as a subprocess of a process running JAX threads: harmless.
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
SIZE = 64
UPLOAD_LIMIT = 64 * 1024
# Generous limits that only stop a hung run (no assertion on time).
WS_RECV_TIMEOUT_S = LOCAL_HTTP_TIMEOUT_S
JOB_WAIT_S = 600
BROWSER_WAIT_MS = 600_000
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  path = presets.write_tiny_pipeline(str(tmp_path_factory.mktemp("pipe") / "tiny"), "distilled")
  return pipeline_lib.Pipeline.from_pretrained(path, jnp.float32)


def _config(out_dir, max_queue=2, **limits):
  limits = {"max_upload_bytes": UPLOAD_LIMIT, "max_frames": 33 * 3, "max_session_chunks": 40,
            **limits}
  return app_lib.ServerConfig(out_dir=str(out_dir), max_queue=max_queue,
                              default_size=(SIZE, SIZE), limits=validation.Limits(**limits))


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
  app = app_lib.create_app(pipe, _config(tmp_path_factory.mktemp("serve_out")))
  with app_lib.ServerThread(app) as srv:
    yield srv


# ------------------------------------------------------------------------------ clients


class Client:
  """A realtime WebSocket client: JSON events, each chunk's binary messages attached."""

  def __init__(self, srv):
    self.ws = connect(srv.ws_url + "/v1/realtime/video", max_size=None,
                      open_timeout=WS_RECV_TIMEOUT_S)

  def send(self, event):
    self.ws.send(event if isinstance(event, str) else json.dumps(event))

  def recv(self):
    """The next event; a chunk event gets `_jpegs` (list of bytes) and `_latents`."""
    msg = self.ws.recv(timeout=WS_RECV_TIMEOUT_S)
    assert isinstance(msg, str), "binary message without its chunk event"
    ev = json.loads(msg)
    if ev["type"] == "chunk":
      media_bytes = self.ws.recv(timeout=WS_RECV_TIMEOUT_S)
      assert isinstance(media_bytes, bytes) and len(media_bytes) == sum(ev["sizes"])
      offsets = np.cumsum([0] + ev["sizes"])
      ev["_jpegs"] = [media_bytes[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
      if ev.get("latents_bytes"):
        raw = self.ws.recv(timeout=WS_RECV_TIMEOUT_S)
        assert len(raw) == ev["latents_bytes"]
        ev["_latents"] = np.load(io.BytesIO(raw))
    return ev

  def until(self, kind):
    """Events up to and including the first of type `kind`."""
    out = []
    while True:
      out.append(self.recv())
      if out[-1]["type"] == kind:
        return out

  def close(self):
    self.ws.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _start(**fields):
  return {"type": "session.start", "prompt": "a cat walks on the grass", "height": SIZE,
          "width": SIZE, "seed": 3, **fields}


def _wait_job(srv, job_id):
  deadline = time.monotonic() + JOB_WAIT_S
  while time.monotonic() < deadline:
    rec = httpx.get(f"{srv.url}/v1/videos/{job_id}", timeout=LOCAL_HTTP_TIMEOUT_S).json()
    if rec["status"] in jobs_lib.FINAL:
      return rec
    time.sleep(0.1)
  raise AssertionError(f"job {job_id} did not finish")


def _png(height=SIZE, width=SIZE) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  arr = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def _short_video(tmp_path, frames=8) -> bytes:
  path = tmp_path / "short.mp4"
  media.write_video(path, np.full((frames, SIZE, SIZE, 3), 128, np.uint8))
  return path.read_bytes()


# ------------------------------------------------------------------------------ parity


def test_driver_matches_generate_with_a_prompt_switch(pipe):
  """The per-chunk driver with an update before chunk 4 == generate(interpolate_time=[4, 4])."""
  prompts = ["a cat walks on the grass", "waves crash against dark rocks"]
  ref = pipe.generate(prompts, num_frames=33, height=SIZE, width=SIZE, seed=3,
                      interpolate_prompts=True, interpolate_time=[4, 4],
                      interpolation_steps=3, output_type="latent", progress=False)
  drv = driver_lib.ChunkDriver(pipe, driver_lib.GenerationRequest(
      prompt=prompts[0], seed=3, height=SIZE, width=SIZE))
  chunks = []
  for k in range(8):
    if k == 4:
      drv.update_prompt(prompts[1])
    chunks.append(drv.step(decode=False))
  np.testing.assert_array_equal(np.concatenate([c.latents for c in chunks], axis=2),
                                ref.latents)
  assert [c.blend_weight for c in chunks[3:8]] == [None, 0.0, 0.5, 1.0, None]
  assert chunks[5].prompts == [(prompts[0], 0.5), (prompts[1], 0.5)]
  assert chunks[7].prompts == [(prompts[1], 1.0)]


def test_streamed_latents_and_frames_equal_generate(server, pipe):
  """A realtime session with a prompt update == Pipeline.generate with that schedule.

  The update is sent after chunk 3 arrives; the chunk where its blend starts (k0 >= 4, read
  from the events) fixes the equivalent schedule interpolate_time=[k0, 4].
  """
  new = "waves crash against dark rocks"
  with Client(server) as c:
    c.send(_start(include_latents=True, interpolation_steps=3))
    chunks = []
    k0 = None
    for ev in iter(c.recv, None):
      if ev["type"] != "chunk":
        assert ev["type"] in ("session.queued", "session.started", "prompt.accepted"), ev
        continue
      chunks.append(ev)
      if ev["index"] == 3:
        c.send({"type": "prompt.update", "prompt": new})
      if k0 is None and ev["blend_weight"] == 0.0:
        k0 = ev["index"]
      if k0 is not None and ev["index"] == k0 + 3:
        break
    c.send({"type": "session.stop"})
    ended = c.until("session.ended")[-1]
  assert ended["reason"] == "stopped" and ended["video_url"]
  assert k0 >= 4
  assert [ch["index"] for ch in chunks] == list(range(k0 + 4))
  ref = pipe.generate([chunks[0]["prompts"][0]["prompt"], new], num_frames=33, height=SIZE,
                      width=SIZE, seed=3, interpolate_prompts=True, interpolate_time=[k0, 4],
                      interpolation_steps=3, progress=False)
  streamed = np.concatenate([ch["_latents"] for ch in chunks], axis=2)
  np.testing.assert_array_equal(streamed, ref.latents)
  assert [ch["blend_weight"] for ch in chunks[k0:k0 + 4]] == [0.0, 0.5, 1.0, None]
  assert [p["prompt"] for p in chunks[k0 - 1]["prompts"]] == [chunks[0]["prompts"][0]["prompt"]]
  assert {p["prompt"]: p["weight"] for p in chunks[k0 + 1]["prompts"]}[new] == 0.5
  assert chunks[k0 + 2]["prompts"] == [{"prompt": new, "weight": 1.0}]
  # The JPEG frames are the decoded frames (up to JPEG loss).
  from PIL import Image  # pylint: disable=g-import-not-at-top
  first = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in chunks[0]["_jpegs"]])
  assert first.shape == (33, SIZE, SIZE, 3)
  assert np.abs(first.astype(int) - ref.frames[:33].astype(int)).mean() < 8
  # The session's mp4 record: every streamed chunk, trimmed to 1 + 4k frames.
  got = httpx.get(server.url + ended["video_url"], timeout=LOCAL_HTTP_TIMEOUT_S)
  assert got.status_code == 200 and got.headers["content-type"] == "video/mp4"
  rec = httpx.get(f"{server.url}/v1/videos/{ended['session_id']}").json()
  assert rec["kind"] == "realtime" and rec["status"] == "completed"
  assert rec["frames"] == (33 * rec["chunks_done"] - 1) // 4 * 4 + 1


# ------------------------------------------------------------------------------ bad input


def test_bad_realtime_events_get_clear_errors_and_the_server_keeps_serving(server, tmp_path):
  big = base64.b64encode(b"\x89PNG" + bytes(UPLOAD_LIMIT + 10)).decode()
  cases = [
      ("{not json", "invalid_json", "not valid JSON"),
      ({"type": "bogus"}, "unknown_event", "'bogus'"),
      ([1, 2], "unknown_event", "not an event object"),
      ({"type": "session.start"}, "invalid_request", "missing 'prompt'"),
      (_start(height=72), "invalid_request", "height=72 must be a multiple of 16"),
      (_start(width="wide"), "invalid_request", "width='wide' must be an integer"),
      (_start(image=base64.b64encode(b"definitely not an image").decode()),
       "invalid_request", "not a readable image"),
      (_start(image="@@@"), "invalid_request", "not valid base64"),
      (_start(image=big), "upload_too_large", "exceeds the limit"),
      (_start(video=base64.b64encode(_short_video(tmp_path)).decode()), "invalid_request",
       "video has 8 frames; video-to-video needs at least 33"),
      (_start(video=base64.b64encode(b"\x00\x00\x00\x18ftypmp42 junk").decode()),
       "invalid_request", "not a readable video"),
      ({"type": "prompt.update", "prompt": "x"}, "no_session", "session.start first"),
      ({"type": "session.stop"}, "no_session", "no session"),
      (_start(nope=1), "invalid_request", "unknown field(s) ['nope']"),
  ]
  with Client(server) as c:
    for event, code, text in cases:
      c.send(event)
      ev = c.recv()
      assert ev["type"] == "error" and ev["code"] == code and text in ev["message"], (event, ev)
    c.ws.send(b"\x00binary")
    assert c.recv()["code"] == "binary_not_accepted"
    # The same connection still runs a session; a bad prompt.update mid-session is an error
    # event and the session goes on.
    c.send(_start(max_chunks=2))
    c.until("session.started")
    c.send({"type": "prompt.update", "prompt": ""})
    events = c.until("session.ended")
    assert any(e["type"] == "error" and "'prompt' is empty" in e["message"] for e in events)
    assert [e["index"] for e in events if e["type"] == "chunk"] == [0, 1]
    assert events[-1]["reason"] == "chunk limit"


def test_bad_job_requests_get_4xx_naming_the_problem(server, tmp_path):
  url = server.url + "/v1/videos"
  post = lambda **kw: httpx.post(url, timeout=LOCAL_HTTP_TIMEOUT_S, **kw)
  r = post(content=b"{oops", headers={"content-type": "application/json"})
  assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
  r = post(json={"num_frames": 33})
  assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
  r = post(json={"prompt": "x", "width": 70})
  assert r.status_code == 400 and "width=70 must be a multiple of 16" in r.text
  r = post(json={"prompt": "x", "num_frames": 10_000})
  assert r.status_code == 400 and "num_frames=10000 exceeds" in r.text
  r = post(json={"prompt": "x", "steps": "a,b"})
  assert r.status_code == 400 and r.json()["error"]["param"] == "steps"
  r = post(data={"prompt": "x"}, files={"image": ("a.png", b"not an image", "image/png")})
  assert r.status_code == 400 and "not a readable image" in r.text
  r = post(data={"prompt": "x"}, files={"image": ("a.png", bytes(UPLOAD_LIMIT + 1), "image/png")})
  assert r.status_code == 413 and "exceeds the limit" in r.text
  r = post(data={"prompt": "x"}, files={"video": ("v.mp4", _short_video(tmp_path), "video/mp4")})
  assert r.status_code == 400 and "video has 8 frames" in r.text
  r = post(content=b"prompt=x", headers={"content-type": "text/plain"})
  assert r.status_code == 415
  assert httpx.get(server.url + "/v1/videos/video_nope").status_code == 404
  assert httpx.get(server.url + "/v1/health").json()["alive"]


# ------------------------------------------------------------------------------ jobs


def test_jobs_api_multipart_image_and_restart(pipe, tmp_path):
  out = tmp_path / "out"
  with app_lib.ServerThread(app_lib.create_app(pipe, _config(out))) as srv:
    r = httpx.post(srv.url + "/v1/videos", json={"prompt": "a dog", "num_frames": 40,
                                                  "seed": 5, "steps": "2,2,2"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] in ("queued", "in_progress") and job["chunks_total"] == 2
    i2v = httpx.post(srv.url + "/v1/videos", data={"prompt": "a dog", "num_frames": "33"},
                     files={"image": ("first.png", _png(), "image/png")}).json()
    rec = _wait_job(srv, job["id"])
    assert rec["status"] == "completed" and rec["chunks_done"] == 2 and rec["frames"] == 65
    assert len(rec["timings"]["dit_s"]) == 2 and rec["timings"]["first_chunk_s"] > 0
    content = httpx.get(f"{srv.url}/v1/videos/{job['id']}/content")
    assert content.status_code == 200
    (tmp_path / "job.mp4").write_bytes(content.content)
    assert media.read_video_frames(tmp_path / "job.mp4").shape == (65, SIZE, SIZE, 3)
    # The same request as the library call: the job's video is Pipeline.generate's frames.
    ref = pipe.generate("a dog", pipeline_lib.DEFAULT_NEGATIVE_PROMPT, num_frames=40,
                        height=SIZE, width=SIZE, seed=5, steps=[2, 2, 2], progress=False)
    media.write_video(tmp_path / "ref.mp4", ref.frames)  # the same encoder settings
    np.testing.assert_array_equal(media.read_video_frames(tmp_path / "job.mp4"),
                                  media.read_video_frames(tmp_path / "ref.mp4"))
    rec = _wait_job(srv, i2v["id"])
    assert rec["status"] == "completed" and rec["params"]["task"] == "i2v", rec
  # A record left in progress by a server that died (written by a store of its own).
  crashed = jobs_lib.JobStore(out).create(
      "job", driver_lib.GenerationRequest(prompt="lost", height=SIZE, width=SIZE, num_frames=33),
      1)
  jobs_lib.JobStore(out).update(crashed["id"], status="in_progress")
  with app_lib.ServerThread(app_lib.create_app(pipe, _config(out))) as srv:
    listed = {r["id"]: r for r in httpx.get(srv.url + "/v1/videos").json()["data"]}
    assert listed[job["id"]]["status"] == "completed"
    assert httpx.get(f"{srv.url}/v1/videos/{job['id']}/content").status_code == 200
    lost = listed[crashed["id"]]
    assert lost["status"] == "failed" and "stopped while" in lost["error"]["message"]
    # DELETE of a finished job removes it and its video.
    assert httpx.delete(f"{srv.url}/v1/videos/{job['id']}").json()["deleted"]
    assert httpx.get(f"{srv.url}/v1/videos/{job['id']}").status_code == 404
  assert not [p for p in os.listdir(out / "videos") if p.startswith(".")]


# ------------------------------------------------------------------------------ queue, disconnect


def test_queue_full_is_429_and_busy_and_delete_cancels(server):
  with Client(server) as running:
    running.send(_start(max_chunks=40))
    running.until("chunk")  # the session holds the device
    queued = [httpx.post(server.url + "/v1/videos", json={"prompt": f"job {i}",
                                                          "num_frames": 33}) for i in range(2)]
    assert [r.status_code for r in queued] == [200, 200]
    full = httpx.post(server.url + "/v1/videos", json={"prompt": "one too many"})
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert "busy" in full.json()["error"]["message"]
    with Client(server) as other:
      other.send(_start())
      busy = other.recv()
      assert busy["type"] == "busy" and busy["queued"] == 2 and busy["retry_after_s"] >= 1
    for r in queued:
      rec = httpx.delete(f"{server.url}/v1/videos/{r.json()['id']}").json()
      assert rec["status"] == "cancelled"
    running.send({"type": "session.stop"})
    assert running.until("session.ended")[-1]["reason"] == "stopped"


def test_disconnect_mid_chunk_frees_the_worker(server):
  a = Client(server)
  a.send(_start(max_chunks=40))
  started = a.until("session.started")[-1]
  a.close()  # mid-chunk: chunk 0 is being generated
  with Client(server) as b:
    b.send(_start(max_chunks=1))
    events = b.until("session.ended")
    assert [e["index"] for e in events if e["type"] == "chunk"] == [0]
  rec = httpx.get(f"{server.url}/v1/videos/{started['session_id']}").json()
  assert rec["end_reason"] == "client disconnected" and rec["status"] in ("completed",
                                                                          "cancelled")
  assert rec["chunks_done"] <= 3
  assert httpx.get(server.url + "/v1/health").json()["running"] is None


def test_session_ends_at_its_duration_limit(pipe, tmp_path):
  app = app_lib.create_app(pipe, _config(tmp_path / "out", max_session_seconds=0.5))
  with app_lib.ServerThread(app) as srv, Client(srv) as c:
    c.send(_start())  # no max_chunks: only the duration limit ends it
    ended = c.until("session.ended")[-1]
    assert ended["reason"] == "duration limit" and ended["chunks"] <= 2, ended


# ------------------------------------------------------------------------------ the page


@pytest.mark.slow
def test_page_in_headless_chromium(server):
  """The page plays >= 3 chunks, switches the prompt mid-stream, stops, offers the mp4."""
  sync_api = pytest.importorskip("playwright.sync_api")
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not installed (.ci/run installs Debian's chromium)")
  os.makedirs(ARTIFACTS, exist_ok=True)
  new = "waves crash against dark rocks"
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    try:
      page = browser.new_page()
      errors = []
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.goto(server.url + "/")
      page.wait_for_function("document.getElementById('height').value !== ''")
      page.click("summary")  # open "Negative prompt and settings"
      page.fill("#height", str(SIZE))
      page.fill("#width", str(SIZE))
      page.click("#start")
      page.wait_for_function("Number(document.getElementById('chunks-received').textContent) >= 3",
                             timeout=BROWSER_WAIT_MS)
      shown = int(page.text_content("#frames-shown"))
      page.wait_for_function(f"Number(document.getElementById('frames-shown').textContent) > "
                             f"{shown + 33}", timeout=BROWSER_WAIT_MS)  # playback advances
      page.fill("#next-prompt", new)
      page.click("#update")
      page.wait_for_function(
          f"document.getElementById('last-prompt').textContent === {json.dumps(new)}",
          timeout=BROWSER_WAIT_MS)
      page.click("#stop")
      page.wait_for_selector("#download:not([hidden])", timeout=BROWSER_WAIT_MS)
      page.screenshot(path=os.path.join(ARTIFACTS, "serve_page.png"), full_page=True)
      status = page.text_content("#status")
      assert "ended (stopped" in status and "time to first chunk" in status
      assert "-" not in status.split("time to first chunk")[1].split("s")[0]
      log = page.text_content("#log")
      assert f"{new} (1.00)" in log and "blends in from the next chunk" in log
      href = page.get_attribute("#download", "href")
      assert httpx.get(server.url + href).status_code == 200
      assert int(page.text_content("#frames-shown")) > 3 * 33 - 33
      assert not errors, errors
    finally:
      browser.close()


# ------------------------------------------------------------------------------ load


@pytest.mark.slow
def test_bounded_load_every_request_done_or_rejected(pipe, tmp_path):
  """20 jobs + 3 concurrent realtime sessions (1 chunk each) against a queue of 6."""
  app = app_lib.create_app(pipe, _config(tmp_path / "out", max_queue=6))
  results, sessions = [], []
  with app_lib.ServerThread(app) as srv:

    def submit(i):
      r = httpx.post(srv.url + "/v1/videos", json={"prompt": f"job {i}", "num_frames": 33,
                                                    "seed": i}, timeout=LOCAL_HTTP_TIMEOUT_S)
      results.append(r)

    def session(i):
      with Client(srv) as c:
        c.send(_start(max_chunks=1, seed=100 + i))
        first = c.recv()
        sessions.append([first] if first["type"] == "busy" else [first] + c.until(
            "session.ended"))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    threads += [threading.Thread(target=session, args=(i,)) for i in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(JOB_WAIT_S)
    assert len(results) == 20 and len(sessions) == 3
    accepted = [r.json()["id"] for r in results if r.status_code == 200]
    rejected = [r for r in results if r.status_code != 200]
    assert all(r.status_code == 429 and r.headers["retry-after"] for r in rejected)
    assert accepted and len(accepted) <= 6 + 1
    assert all(_wait_job(srv, j)["status"] == "completed" for j in accepted)
    for events in sessions:
      kinds = [e["type"] for e in events]
      assert kinds == ["busy"] or (kinds[-1] == "session.ended" and "chunk" in kinds), kinds
    listed = {r["id"] for r in httpx.get(srv.url + "/v1/videos").json()["data"]}
    assert set(accepted) <= listed
    health = httpx.get(srv.url + "/v1/health").json()
    assert health["alive"] and health["queued"] == 0 and health["failed"] == 0
    # Still serving afterwards.
    r = httpx.post(srv.url + "/v1/videos", json={"prompt": "after", "num_frames": 1})
    assert _wait_job(srv, r.json()["id"])["status"] == "completed"
  print(f"load: {len(accepted)} jobs done, {len(rejected)} rejected with 429, sessions "
        f"{[e[-1]['type'] for e in sessions]}")


@pytest.mark.heavy
def test_session_memory_is_flat_over_25_chunks(server):
  """RSS after chunk 5 vs after chunk 25 of one session (the history is static-shape)."""
  rss = []
  with Client(server) as c:
    c.send(_start(max_chunks=25))
    for ev in c.until("session.ended"):
      if ev["type"] == "chunk" and ev["index"] in (5, 24):
        rss.append(_rss_bytes())
  assert len(rss) == 2
  assert rss[1] - rss[0] < 64 * 2**20, rss


def _rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise AssertionError("no VmRSS in /proc/self/status")

