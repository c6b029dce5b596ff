"""Real-time server benchmark: streaming overhead, time to first chunk, prompt switching, memory,
and a bounded load run — one process, the server on a local port (helios_jax/serve).

  python benchmarks/serve.py                                    # tiny preset on CPU, 64x64
  python benchmarks/serve.py --model_dir Helios-Distilled --height 384 --width 640 \
      --dtype bfloat16 --chunks 24                              # one GPU

Measured, in order, on the same pipeline (so every program is compiled before timing):
1. `Pipeline.stream` of --chunks chunks (uint8 frames): steady-state FPS = 33 x chunks / time
   over chunks >= 2 (chunks 0 and 1 are the first programs' calls).
2. One realtime WebSocket session of --chunks chunks with the same seed, through uvicorn and a
   `websockets` client on 127.0.0.1: time to first chunk (session.start sent -> first chunk's
   frames received, including conditioning and prompt encoding), streamed FPS over the same
   chunks as 1 (chunk arrival times at the client: generation + JPEG encoding + transport +
   the session's mp4 writing), its overhead vs 1, and the process RSS at every chunk (the
   history is static-shape: RSS must stay flat). A prompt update is sent when chunk
   --switch_after arrives; reported: chunks until its blend starts (the first chunk with the new
   prompt at weight > 0) and until it is fully in (weight 1).
3. Load: --jobs one-chunk jobs + --sessions one-chunk realtime sessions at once against a queue
   of --max_queue: done / rejected (429, busy) / lost counts and latencies.
Prints one table. Not a test: no assertions on time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def bench_stream(pipe, args) -> dict:
  t = []
  t0 = time.perf_counter()
  for _ in pipe.stream(args.prompt, num_frames=33 * args.chunks, height=args.height,
                       width=args.width, seed=args.seed, progress=False):
    t.append(time.perf_counter())
  steady = 33 * (len(t) - 2) / (t[-1] - t[1])
  return {"first_chunk_s": t[0] - t0, "steady_fps": steady}


def bench_session(srv, args) -> dict:
  from websockets.sync.client import connect  # pylint: disable=g-import-not-at-top
  arrivals, rss, weights = [], [], {}
  switch_sent_at = None
  new_prompt = "waves crash against dark rocks at dusk"
  with connect(srv.ws_url + "/v1/realtime/video", max_size=None) as ws:
    t0 = time.perf_counter()
    ws.send(json.dumps({"type": "session.start", "prompt": args.prompt, "seed": args.seed,
                        "height": args.height, "width": args.width,
                        "max_chunks": args.chunks}))
    while True:
      ev = json.loads(ws.recv(timeout=3600))
      if ev["type"] == "session.ended":
        break
      if ev["type"] == "error":
        raise RuntimeError(ev["message"])
      if ev["type"] != "chunk":
        continue
      ws.recv(timeout=3600)  # the frames
      arrivals.append(time.perf_counter())
      rss.append(rss_mb())
      weights[ev["index"]] = {p["prompt"]: p["weight"] for p in ev["prompts"]}
      if ev["index"] == args.switch_after:
        ws.send(json.dumps({"type": "prompt.update", "prompt": new_prompt}))
        switch_sent_at = ev["index"]
  first_in = next((k for k in sorted(weights) if weights[k].get(new_prompt, 0) > 0), None)
  full_in = next((k for k in sorted(weights) if weights[k].get(new_prompt, 0) >= 1), None)
  steady = 33 * (len(arrivals) - 2) / (arrivals[-1] - arrivals[1])
  return {"ttfc_s": arrivals[0] - t0, "steady_fps": steady, "rss_mb": rss,
          "switch_start_chunks": None if first_in is None else first_in - switch_sent_at,
          "switch_full_chunks": None if full_in is None else full_in - switch_sent_at,
          "chunks": len(arrivals)}


def bench_load(pipe, args, out_dir) -> dict:
  import httpx  # pylint: disable=g-import-not-at-top
  from websockets.sync.client import connect  # pylint: disable=g-import-not-at-top
  from helios_jax.serve import app as app_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.serve import validation  # pylint: disable=g-import-not-at-top
  app = app_lib.create_app(pipe, app_lib.ServerConfig(
      out_dir=out_dir, max_queue=args.max_queue, default_size=(args.height, args.width),
      limits=validation.Limits()))
  jobs, sessions = [], []
  with app_lib.ServerThread(app) as srv:
    def job(i):
      t0 = time.perf_counter()
      r = httpx.post(srv.url + "/v1/videos", json={"prompt": f"job {i}", "num_frames": 33,
                                                    "seed": i}, timeout=3600)
      if r.status_code != 200:
        jobs.append(("rejected", r.status_code, time.perf_counter() - t0))
        return
      jid = r.json()["id"]
      while (rec := httpx.get(f"{srv.url}/v1/videos/{jid}", timeout=3600).json())[
          "status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.05)
      jobs.append((rec["status"], 200, time.perf_counter() - t0))

    def session(i):
      t0 = time.perf_counter()
      with connect(srv.ws_url + "/v1/realtime/video", max_size=None) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": f"session {i}", "seed": i,
                            "max_chunks": 1}))
        while True:
          msg = ws.recv(timeout=3600)
          if isinstance(msg, bytes):
            continue
          ev = json.loads(msg)
          if ev["type"] in ("busy", "session.ended"):
            sessions.append(("rejected" if ev["type"] == "busy" else "completed",
                             time.perf_counter() - t0))
            return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=job, args=(i,)) for i in range(args.jobs)]
    threads += [threading.Thread(target=session, args=(i,)) for i in range(args.sessions)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    wall = time.perf_counter() - t0
    alive = httpx.get(srv.url + "/v1/health").json()["alive"]
  done = [s for s in jobs if s[0] == "completed"]
  return {"wall_s": wall, "jobs_done": len(done),
          "jobs_rejected": sum(s[0] == "rejected" for s in jobs),
          "jobs_lost": args.jobs - len(jobs) + sum(s[0] in ("failed", "cancelled") for s in jobs),
          "job_latency_mean_s": float(np.mean([s[2] for s in done])) if done else None,
          "job_latency_max_s": max((s[2] for s in done), default=None),
          "sessions_done": sum(s[0] == "completed" for s in sessions),
          "sessions_busy": sum(s[0] == "rejected" for s in sessions), "alive": alive}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model_dir", default=None, help="pipeline folder (default: tiny preset)")
  ap.add_argument("--height", type=int, default=64)
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                  help="default: float32 for the tiny preset, bfloat16 otherwise")
  ap.add_argument("--chunks", type=int, default=24, help="chunks of the timed stream/session")
  ap.add_argument("--switch_after", type=int, default=10)
  ap.add_argument("--seed", type=int, default=42)
  ap.add_argument("--prompt", default="A train window time-lapse of fields, towns and rivers.")
  ap.add_argument("--jobs", type=int, default=20)
  ap.add_argument("--sessions", type=int, default=3)
  ap.add_argument("--max_queue", type=int, default=8)
  args = ap.parse_args()
  if args.chunks < max(4, args.switch_after + 4):
    ap.error(f"--chunks={args.chunks} must be >= max(4, --switch_after + 4)")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from helios_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.presets import tiny_pipeline_dir  # pylint: disable=g-import-not-at-top
  from helios_jax.serve import app as app_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.serve import validation  # pylint: disable=g-import-not-at-top
  tiny = args.model_dir is None
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[
      args.dtype or ("float32" if tiny else "bfloat16")]
  model_dir = tiny_pipeline_dir("distilled") if tiny else args.model_dir
  pipe = pipeline_lib.Pipeline.from_pretrained(model_dir, dtype)
  print(f"model {model_dir} ({'tiny' if tiny else 'checkpoint'}), {args.height}x{args.width}, "
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)
  for _ in pipe.stream(args.prompt, num_frames=99, height=args.height, width=args.width,
                       seed=args.seed, progress=False):
    pass  # compiles chunk 0, chunk 1 and the decode
  stream = bench_stream(pipe, args)
  with tempfile.TemporaryDirectory() as out:
    app = app_lib.create_app(pipe, app_lib.ServerConfig(
        out_dir=os.path.join(out, "a"), default_size=(args.height, args.width),
        limits=validation.Limits(max_session_chunks=max(args.chunks, 1))))
    with app_lib.ServerThread(app) as srv:
      sess = bench_session(srv, args)
    load = bench_load(pipe, args, os.path.join(out, "b"))
  overhead = 100 * (stream["steady_fps"] / sess["steady_fps"] - 1)
  rss = sess["rss_mb"]
  rows = [
      ("Pipeline.stream steady FPS (chunks >= 2)", f"{stream['steady_fps']:.2f}"),
      ("streamed steady FPS at the client (chunks >= 2)", f"{sess['steady_fps']:.2f}"),
      ("streaming overhead (time per frame)", f"{overhead:+.1f} %"),
      ("time to first chunk (session.start -> frames)", f"{sess['ttfc_s']:.2f} s"),
      ("prompt switch: chunks until the blend starts",
       f"{sess['switch_start_chunks']} (update sent when chunk {args.switch_after} arrived)"),
      ("prompt switch: chunks until fully switched", f"{sess['switch_full_chunks']}"),
      (f"RSS over the session's {sess['chunks']} chunks (chunk 2 / last / max growth)",
       f"{rss[2]:.0f} / {rss[-1]:.0f} / {max(rss[2:]) - rss[2]:+.0f} MB"),
      (f"load: {args.jobs} jobs + {args.sessions} sessions, queue {args.max_queue}",
       f"{load['wall_s']:.1f} s wall"),
      ("load: jobs done / rejected (429) / lost",
       f"{load['jobs_done']} / {load['jobs_rejected']} / {load['jobs_lost']}"),
      ("load: job latency mean / max (done)",
       "n/a" if load["job_latency_mean_s"] is None else
       f"{load['job_latency_mean_s']:.1f} / {load['job_latency_max_s']:.1f} s"),
      ("load: sessions done / busy", f"{load['sessions_done']} / {load['sessions_busy']}"),
      ("load: server alive afterwards", str(load["alive"])),
  ]
  width = max(len(r[0]) for r in rows)
  print()
  for name, value in rows:
    print(f"{name:<{width}}  {value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
