"""Process-level JAX settings shared by the command-line tools."""

from __future__ import annotations

import os

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
