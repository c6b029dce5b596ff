"""Real-time serving: streamed chunks over a WebSocket, live prompt switching, a job API, a page.

  python -m helios_jax.serve                                # embedded tiny preset (CPU ok)
  python -m helios_jax.serve --model_dir Helios-Distilled --host 0.0.0.0 --port 8000

Modules:
  driver.py      ChunkDriver: one chunk per call with the pipeline's programs; PromptMixer (live
                 prompt updates blended as the interactive schedule)
  worker.py      GenerationWorker: the one thread that owns the device; bounded queue (Busy)
  validation.py  Limits, request fields and uploaded media -> GenerationRequest / RequestError
  jobs.py        JobStore (persistent JSON records + mp4 files), JobItem (a POST /v1/videos job)
  sessions.py    the /v1/realtime/video protocol and RealtimeSession
  app.py         create_app (FastAPI routes), ServerConfig, ServerThread (uvicorn on a thread)
  __main__.py    the CLI
  static/        the page (index.html, app.js; no build step)
"""
