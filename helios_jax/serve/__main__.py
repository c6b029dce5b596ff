"""Serves a Helios pipeline: realtime WebSocket streaming, a video job API and a page.

  python -m helios_jax.serve                          # the embedded tiny preset, on CPU
  python -m helios_jax.serve --model_dir Helios-Distilled --host 0.0.0.0 --port 8000
  python -m helios_jax.serve --out_dir outputs/serve --max_queue 8 --max_session_seconds 300
  python -m helios_jax.serve --model_dir DIR --quantize fp8 --low_memory     # smaller GPUs

Open http://HOST:PORT/ for the page (prompt, start / stop, live prompt changes, download). The
protocol of `/v1/realtime/video` is in helios_jax/serve/sessions.py, the job API in app.py.
Without --model_dir the tiny random preset (`presets.tiny_pipeline_dir`, --tiny_model)
is served at 128x128 by default. Finished videos and the job records live under --out_dir and
stay listed after a restart.
"""

from __future__ import annotations

import sys

from absl import flags

from helios_jax import presets
from helios_jax import runtime
from helios_jax import variants

FLAGS = flags.FLAGS
runtime.define_model_flags()  # the generate CLI's model flags (one definition)
flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
flags.DEFINE_integer("port", 8000, "port to listen on (0: a free one)")
flags.DEFINE_string("out_dir", "outputs/serve", "folder of the job records and finished videos")
flags.DEFINE_integer("max_queue", 8, "requests that may wait for the device (then 429 / busy)")
flags.DEFINE_integer("max_frames", 33 * 30, "frames one job may request")
flags.DEFINE_float("max_session_seconds", 600.0, "a realtime session ends after this long")
flags.DEFINE_integer("max_session_chunks", 10_000, "a realtime session ends after this many "
                     "chunks")
flags.DEFINE_integer("max_upload_mb", 32, "largest uploaded image / video, MiB")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top
  from helios_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.serve import app as app_lib  # pylint: disable=g-import-not-at-top
  from helios_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from helios_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from helios_jax.serve import validation  # pylint: disable=g-import-not-at-top
  tiny = FLAGS.model_dir is None
  try:
    model_dir = presets.tiny_pipeline_dir(FLAGS.tiny_model) if tiny else FLAGS.model_dir
    pipeline_lib.read_pipeline_settings(model_dir)
    pipeline_lib.check_model_options(
        model_dir, quantize=FLAGS.quantize, keep_blocks=FLAGS.keep_blocks,
        low_memory=FLAGS.low_memory, dtype="float32" if FLAGS.dtype == "float32" else None)
    runtime.check_writable(FLAGS.out_dir, folder=True)
    for name in ("max_queue", "max_frames", "max_session_chunks", "max_upload_mb"):
      if getattr(FLAGS, name) < 1:
        raise ValueError(f"--{name}={getattr(FLAGS, name)} must be >= 1")
  except (ValueError, RuntimeError, OSError, CheckpointError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if FLAGS.compile_cache:
    runtime.enable_compilation_cache()
  dtype = jnp.float32 if (tiny or FLAGS.dtype == "float32") else jnp.bfloat16
  pipe = pipeline_lib.Pipeline.from_pretrained(model_dir, dtype, **runtime.model_load_kwargs())
  config = app_lib.ServerConfig(
      out_dir=FLAGS.out_dir, max_queue=FLAGS.max_queue,
      default_size=variants.get_size("tiny" if tiny else "helios-14b").resolution,
      limits=validation.Limits(max_frames=FLAGS.max_frames,
                               max_session_seconds=FLAGS.max_session_seconds,
                               max_session_chunks=FLAGS.max_session_chunks,
                               max_upload_bytes=FLAGS.max_upload_mb * 2**20))
  app = app_lib.create_app(pipe, config)
  print(f"serving {model_dir} on http://{FLAGS.host}:{FLAGS.port}/ "
        f"(backend {jax.default_backend()}; videos in {FLAGS.out_dir})")
  uvicorn.run(app, host=FLAGS.host, port=FLAGS.port, log_level="warning",
              ws_max_size=config.ws_max_size)
  return 0


if __name__ == "__main__":
  runtime.run_cli(main)
