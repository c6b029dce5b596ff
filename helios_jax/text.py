"""Prompt cleaning, tokenizer loading and `encode_prompt`, as the diffusers Helios pipelines."""

from __future__ import annotations

import html
import os
from typing import Any, Callable, Sequence

import ftfy
import jax
import jax.numpy as jnp
import numpy as np
import regex

# The pipelines' `__call__` default (spec architecture.md §7).
MAX_SEQUENCE_LENGTH = 512

_WHITESPACE = regex.compile(r"\s+")  # the `regex` module, as diffusers (Unicode White_Space)


def clean_prompt(text: str) -> str:
  """diffusers' `prompt_clean`: ftfy.fix_text, HTML-unescape twice, collapse whitespace, strip.

  Args:
    text: a prompt.

  Returns:
    The cleaned prompt.
  """
  if not isinstance(text, str):
    raise TypeError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(" ", text).strip()


def load_tokenizer(path: str | os.PathLike):
  """Loads the `tokenizer/` folder (T5 SentencePiece tokenizer) with transformers' AutoTokenizer.

  Args:
    path: folder written by `save_pretrained` (tokenizer.json and/or spiece.model + configs).

  Returns:
    A transformers tokenizer.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer folder not found: {path}")
  try:
    return AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot load a tokenizer ({e})") from e


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
  if isinstance(prompts, str):
    return [prompts]
  if not isinstance(prompts, (list, tuple)):
    raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
  if not prompts:
    raise ValueError("prompts is an empty list; pass at least one prompt")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}: {p!r}")
  return list(prompts)


@jax.jit
def _keep_valid_rows(hidden, seq_lens):
  """hidden [B, L, D], seq_lens [B] -> rows >= seq_len set to zero."""
  rows = jnp.arange(hidden.shape[1])[None, :, None]
  return jnp.where(rows < seq_lens[:, None, None], hidden, jnp.zeros((), hidden.dtype))


def tokenize(prompts: str | Sequence[str], tokenizer: Any,
             max_length: int = MAX_SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
  """Cleans and tokenizes prompts exactly as the pipelines' `_get_t5_prompt_embeds`.

  Args:
    prompts: a prompt or a non-empty list of prompts.
    tokenizer: a transformers tokenizer (see `load_tokenizer`).
    max_length: padded/truncated token count (EOS included).

  Returns:
    (input_ids [B, max_length] int64, attention_mask [B, max_length] int64).
  """
  prompts = _as_prompt_list(prompts)
  if not isinstance(max_length, (int, np.integer)) or max_length < 1:
    raise ValueError(f"max_length={max_length!r} must be an int >= 1")
  cleaned = [clean_prompt(p) for p in prompts]
  tokens = tokenizer(cleaned, padding="max_length", max_length=int(max_length), truncation=True,
                     add_special_tokens=True, return_attention_mask=True, return_tensors="np")
  ids = np.asarray(tokens["input_ids"], np.int64)
  mask = np.asarray(tokens["attention_mask"], np.int64)
  if ids.shape != (len(prompts), max_length):
    raise ValueError(f"tokenizer returned input_ids of shape {ids.shape}, expected "
                     f"{(len(prompts), max_length)}")
  return ids, mask


def encode_prompt(prompts: str | Sequence[str], tokenizer: Any,
                  text_encoder: Callable[[Any, Any], jax.Array],
                  max_length: int = MAX_SEQUENCE_LENGTH, dtype: Any = None) -> jax.Array:
  """Prompt embeddings as diffusers' Helios `encode_prompt` (one video per prompt).

  Steps: clean; tokenize (padding="max_length", truncation, EOS appended); run the encoder with
  the attention mask; cast to `dtype`; keep the first `sum(mask)` rows and zero the rest.

  Args:
    prompts: a prompt or a non-empty list of prompts.
    tokenizer: a transformers tokenizer (see `load_tokenizer`).
    text_encoder: `(input_ids [B, L], attention_mask [B, L]) -> [B, L, D]`, e.g. a
      `helios_jax.models.text_encoder.TextEncoder`.
    max_length: text length L (512 in the pipelines).
    dtype: output dtype (None -> the encoder's `dtype`, else its output dtype).

  Returns:
    [B, max_length, D] embeddings; rows past each prompt's tokens are zero.
  """
  ids, mask = tokenize(prompts, tokenizer, max_length)
  hidden = text_encoder(ids, mask)  # [B, L, D]
  if dtype is None:
    dtype = getattr(text_encoder, "dtype", None)
  if dtype is None:
    dtype = hidden.dtype
  hidden = jnp.asarray(hidden).astype(dtype)
  seq_lens = jax.device_put(jnp.asarray((mask > 0).sum(axis=1), jnp.int32),
                            next(iter(hidden.devices())))
  return _keep_valid_rows(hidden, seq_lens)
