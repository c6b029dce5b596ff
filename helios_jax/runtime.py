"""Process-level settings shared by the command-line tools: quiet logs, compilation cache."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings

import jax

DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                             "helios_jax")


def cache_dir(*parts: str) -> str:
  """A folder under the helios-jax cache (`$XDG_CACHE_HOME/helios_jax`), created on demand."""
  path = os.path.join(os.environ.get("HELIOS_JAX_CACHE", DEFAULT_CACHE), *parts)
  os.makedirs(path, exist_ok=True)
  return path


def enable_compilation_cache(path: str | None = None) -> str:
  """Persists compiled XLA programs on disk so a restart does not recompile (returns the dir)."""
  path = path or cache_dir("xla")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


class OutputPathError(OSError):
  """An output path that cannot be written (checked before the work starts)."""


def check_writable(path: str | os.PathLike, need_bytes: int = 0, *,
                   folder: bool = False) -> str:
  """Fails early, before any work, when `path` cannot be written; returns the absolute path.

  Checks that the nearest existing parent folder is a writable folder and, when `need_bytes`
  is given, that its filesystem has that much free space. `folder=True`: `path` is an output
  folder (written beside it, then renamed; an existing folder is the caller's business).

  Raises:
    OutputPathError: naming the folder and the reason.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path) and not folder:
    raise OutputPathError(f"{path} is a folder, not a file path")
  folder = os.path.dirname(path)
  probe = folder
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise OutputPathError(f"cannot write {path}: {probe} is not a folder")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise OutputPathError(f"cannot write {path}: folder {probe} is not writable")
  if need_bytes:
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
      raise OutputPathError(f"cannot write {path}: {free / 1e6:.1f} MB free in {probe}, about "
                            f"{need_bytes / 1e6:.1f} MB needed")
  return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
  """Opens a hidden temporary file beside `path`; renames it to `path` only on success.

  The data is flushed and fsync'ed before the rename, so a full disk or a crash leaves either
  the previous file or none, never a truncated one; on any error the temporary file is removed
  and the error propagates.

    with runtime.atomic_write("out.json") as f:
      json.dump(data, f)
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual mode
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _quiet_parser(parse):
  """`parse` (absl's flag parsing by default), then WARNING as the default log level instead
  of app.run's INFO."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse_quietly(argv: list[str]) -> list[str]:
    args = (parse or app.parse_flags_with_usage)(argv)
    if flags.FLAGS["verbosity"].using_default_value:
      flags.FLAGS.verbosity = -1  # an explicit value: app.run then leaves it alone
    return args

  return parse_quietly


def define_model_flags() -> None:
  """The model flags every generation CLI shares (generate, serve): --model_dir, --tiny_model,
  --dtype, --text_encoder_on_cpu, --release_text_encoder, --quantize, --keep_blocks,
  --low_memory, --compile_cache (checked by `pipeline.check_model_options`, passed on by
  `model_load_kwargs`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from helios_jax import variants  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model_dir", None, "pipeline folder (diffusers layout or our Orbax "
                      "export); omitted: the embedded tiny random preset")
  flags.DEFINE_enum("tiny_model", variants.DEFAULT_VARIANT, list(variants.VARIANTS),
                    "which tiny preset to run when --model_dir is omitted")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                    "transformer/text encoder dtype")
  flags.DEFINE_bool("text_encoder_on_cpu", False, "run umT5 on the host CPU (saves GPU memory)")
  flags.DEFINE_bool("release_text_encoder", None, "free umT5 after encoding the prompts "
                    "(default: only with --low_memory)")
  flags.DEFINE_enum("quantize", None, ["fp8", "int8w"], "Qwix PTQ of the DiT after loading: "
                    "fp8 (e4m3 weights + activations) or int8w (int8 weights); bf16 if unset "
                    "(a `convert --quantize` pipeline loads pre-quantized without it)")
  flags.DEFINE_string("keep_blocks", "", "with --quantize: DiT blocks left unquantized, "
                      "comma-separated first:N, last:N, I or I-J (e.g. first:3,last:3)")
  flags.DEFINE_bool("low_memory", False, "keep the DiT block weights in host RAM and stream "
                    "them to the device one block at a time (device memory ~ 2 blocks + "
                    "activations; host RAM ~ the block weights; slower: every model call reads "
                    "all blocks over PCIe)")
  flags.DEFINE_bool("compile_cache", True, "persist compiled programs in the helios-jax cache")


def model_load_kwargs() -> dict:
  """`Pipeline.from_pretrained` keyword arguments from the `define_model_flags` flags."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  return dict(text_encoder_device=jax.devices("cpu")[0] if f.text_encoder_on_cpu else None,
              release_text_encoder=f.release_text_encoder, quantize=f.quantize,
              keep_blocks=f.keep_blocks, low_memory=f.low_memory)


def run_cli(main, flags_parser=None) -> None:
  """`absl.app.run(main)` with quiet logs by default (every helios_jax CLI starts this way).

  `flags_parser`: a custom parser (as `app.run` takes), run before the quiet default applies.

  Orbax / JAX INFO lines (one per checkpoint step, or every parameter key) only show with
  `--verbosity=0` (1 for debug); transformers' advisory warnings ("PyTorch was not found" in a
  tokenizer-only install) and the `os.fork()` RuntimeWarning JAX emits when a subprocess
  (ffmpeg, tokenizer workers) starts are silenced.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                          category=RuntimeWarning)
  app.run(main, flags_parser=_quiet_parser(flags_parser))
