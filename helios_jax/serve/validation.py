"""Request validation for the server: limits, field parsing and uploaded media.

Every check runs before a request is queued, so a bad request costs no device time and its
error names the field and the bad value (`RequestError`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import tempfile
from typing import Any, Mapping

import numpy as np

from helios_jax import pipeline as pipeline_lib
from helios_jax.config import ConfigError
from helios_jax.constants import CHUNK_FRAMES
from helios_jax.serve import driver as driver_lib
from helios_jax.serve.driver import GenerationRequest

# The fields of a job (named as the `python -m helios_jax.generate` flags) and of a realtime
# `session.start` event (the same, without num_frames, with interpolation_steps).
JOB_FIELDS = ("prompt", "negative_prompt", "num_frames", "height", "width", "seed", "steps",
              "guidance_scale", "image", "video")
SESSION_FIELDS = ("prompt", "negative_prompt", "height", "width", "seed", "steps",
                  "guidance_scale", "image", "video", "interpolation_steps", "include_latents",
                  "max_chunks")


class RequestError(ValueError):
  """A bad request; `param` names the field (None when it is the request as a whole)."""

  def __init__(self, message: str, param: str | None = None, status: int = 400):
    super().__init__(message)
    self.param = param
    self.status = status

  def to_json(self) -> dict[str, Any]:
    return {"message": str(self), "type": "invalid_request_error", "param": self.param}


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-request limits of a server.

  Attributes:
    max_frames: frames one job may request.
    max_session_seconds: wall time after which a realtime session ends ("duration limit").
    max_session_chunks: chunks after which a realtime session ends ("chunk limit").
    max_upload_bytes: size of an uploaded image or video (decoded bytes).
    max_pixels: height x width of a request.
    max_video_frames: frames of an uploaded V2V video.
    max_prompt_chars: characters of a prompt.
  """

  max_frames: int = 33 * 30
  max_session_seconds: float = 600.0
  max_session_chunks: int = 10_000
  max_upload_bytes: int = 32 * 2**20
  max_pixels: int = 720 * 1280
  max_video_frames: int = 33 * 8
  max_prompt_chars: int = 4000


def parse_int(fields: Mapping[str, Any], name: str, default: int | None, lo: int | None = None,
         hi: int | None = None) -> int | None:
  v = fields.get(name)
  if v is None or v == "":
    return default
  if isinstance(v, bool):
    raise RequestError(f"{name}={v!r} must be an integer", name)
  if isinstance(v, str):
    try:
      v = int(v.strip())
    except ValueError:
      raise RequestError(f"{name}={v!r} must be an integer", name) from None
  if isinstance(v, float) and v.is_integer():
    v = int(v)
  if not isinstance(v, int):
    raise RequestError(f"{name}={v!r} must be an integer", name)
  if lo is not None and v < lo:
    raise RequestError(f"{name}={v} must be >= {lo}", name)
  if hi is not None and v > hi:
    raise RequestError(f"{name}={v} exceeds this server's limit of {hi}", name)
  return v


def _float(fields: Mapping[str, Any], name: str) -> float | None:
  v = fields.get(name)
  if v is None or v == "":
    return None
  try:
    if isinstance(v, bool):
      raise ValueError
    out = float(v)
  except (TypeError, ValueError):
    raise RequestError(f"{name}={v!r} must be a number", name) from None
  if not np.isfinite(out) or out < 0:
    raise RequestError(f"{name}={v!r} must be a finite number >= 0", name)
  return out


def _text(fields: Mapping[str, Any], name: str, limits: Limits, required: bool,
          default: str | None = None) -> str | None:
  v = fields.get(name)
  if v is None:
    if required:
      raise RequestError(f"missing '{name}' (a non-empty string)", name)
    return default
  if not isinstance(v, str):
    raise RequestError(f"{name} must be a string, got {type(v).__name__}", name)
  if required and not v.strip():
    raise RequestError(f"'{name}' is empty", name)
  if len(v) > limits.max_prompt_chars:
    raise RequestError(f"{name} has {len(v)} characters; the limit is "
                       f"{limits.max_prompt_chars}", name)
  return v


def parse_prompt(fields: Mapping[str, Any], limits: Limits) -> str:
  """The `prompt` of a `prompt.update` event."""
  return _text(fields, "prompt", limits, required=True)


def _steps(v: Any) -> tuple[int, ...] | None:
  if v is None or v == "":
    return None
  try:
    if isinstance(v, str):
      out = tuple(int(s) for s in v.replace(" ", "").split(","))
    elif isinstance(v, (list, tuple)):
      if any(isinstance(s, bool) or not isinstance(s, int) for s in v):
        raise ValueError
      out = tuple(v)
    elif isinstance(v, int) and not isinstance(v, bool):
      out = (v,)
    else:
      raise ValueError
  except ValueError:
    raise RequestError(f"steps={v!r} must be an integer or a list of integers, e.g. 2,2,2",
                       "steps") from None
  if not out or min(out) < 1 or max(out) > 1000:
    raise RequestError(f"steps={v!r}: every entry must be in 1..1000", "steps")
  return out


def decode_base64(value: Any, name: str, limits: Limits) -> bytes:
  """A base64 field (a `data:...;base64,` URL prefix is allowed) -> bytes, size-checked."""
  if not isinstance(value, str):
    raise RequestError(f"{name} must be a base64 string, got {type(value).__name__}", name)
  if value.startswith("data:") and "," in value:
    value = value.split(",", 1)[1]
  if len(value) > (limits.max_upload_bytes + 2) // 3 * 4 + 4:
    raise RequestError(f"{name}: the upload of about {len(value) * 3 // 4} bytes exceeds the "
                       f"limit of {limits.max_upload_bytes} bytes", name, status=413)
  try:
    data = base64.b64decode(value, validate=True)
  except (binascii.Error, ValueError):
    raise RequestError(f"{name} is not valid base64", name) from None
  check_upload_size(len(data), name, limits)
  return data


def check_upload_size(n: int, name: str, limits: Limits) -> None:
  if n > limits.max_upload_bytes:
    raise RequestError(f"{name}: the upload of {n} bytes exceeds the limit of "
                       f"{limits.max_upload_bytes} bytes", name, status=413)
  if n == 0:
    raise RequestError(f"{name} is empty (0 bytes)", name)


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
  """Image file bytes (PNG, JPEG, ...) -> `[H, W, 3]` uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  (Pillow raises many kinds)
    raise RequestError(f"{name}: {len(data)} bytes that are not a readable image "
                       f"({type(e).__name__}: {e})", name) from None


def decode_video(data: bytes, limits: Limits, name: str = "video") -> np.ndarray:
  """Video file bytes (mp4, webm, ...) -> `[T, H, W, 3]` uint8, CHUNK_FRAMES <= T."""
  from helios_jax import media  # pylint: disable=g-import-not-at-top
  fd, path = tempfile.mkstemp(prefix="helios_upload_", suffix=".mp4")  # ffmpeg probes the content
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    try:
      frames = media.read_video_frames(path)
    except ValueError as e:
      raise RequestError(f"{name}: {len(data)} bytes that are not a readable video "
                         f"({str(e).replace(path, 'upload')})", name) from None
  finally:
    os.remove(path)
  if len(frames) < CHUNK_FRAMES:
    raise RequestError(f"{name} has {len(frames)} frames; video-to-video needs at least "
                       f"{CHUNK_FRAMES}", name)
  if len(frames) > limits.max_video_frames:
    raise RequestError(f"{name} has {len(frames)} frames; this server's limit is "
                       f"{limits.max_video_frames}", name, status=413)
  return frames


def parse_request(fields: Mapping[str, Any], pipe: pipeline_lib.Pipeline, limits: Limits, *,
                  realtime: bool, default_size: tuple[int, int],
                  image: bytes | None = None, video: bytes | None = None
                  ) -> GenerationRequest:
  """Validates a job / `session.start` and decodes its media (base64 fields or raw bytes).

  Args:
    fields: the request's fields (JSON object or form fields).
    pipe: the served pipeline (its sampler settings check size / steps / guidance).
    limits: the server's limits.
    realtime: a realtime session (no num_frames) rather than a job.
    default_size: (height, width) when the request names none.
    image, video: raw uploaded file bytes (multipart), instead of base64 fields.

  Raises:
    RequestError: naming the field and the problem.
  """
  allowed = SESSION_FIELDS if realtime else JOB_FIELDS
  unknown = sorted(k for k in fields if k not in allowed and k != "type")
  if unknown:
    raise RequestError(f"unknown field(s) {unknown}; allowed: {list(allowed)}", unknown[0])
  prompt = _text(fields, "prompt", limits, required=True)
  negative = _text(fields, "negative_prompt", limits, required=False,
                   default=pipeline_lib.DEFAULT_NEGATIVE_PROMPT)
  height = parse_int(fields, "height", default_size[0], lo=16)
  width = parse_int(fields, "width", default_size[1], lo=16)
  for name, v in (("height", height), ("width", width)):
    if v % 16:
      raise RequestError(f"{name}={v} must be a multiple of 16", name)
  if height * width > limits.max_pixels:
    raise RequestError(f"height x width = {height}x{width} exceeds this server's limit of "
                       f"{limits.max_pixels} pixels", "height")
  seed = parse_int(fields, "seed", 42, lo=0, hi=2**32 - 1)
  steps = _steps(fields.get("steps"))
  guidance = _float(fields, "guidance_scale")
  num_frames = None
  interp = driver_lib.DEFAULT_INTERPOLATION_STEPS
  if realtime:
    interp = parse_int(fields, "interpolation_steps", interp, lo=1, hi=64)
  else:
    num_frames = parse_int(fields, "num_frames", CHUNK_FRAMES * 3, lo=1, hi=limits.max_frames)
  try:
    pipe.sampler_config(height, width, steps=steps, guidance_scale=guidance)
  except (ValueError, ConfigError) as e:
    msg = str(e)
    param = next((p for p in ("height", "width", "steps", "guidance_scale") if p in msg), None)
    raise RequestError(msg, param) from None
  if image is None and fields.get("image") is not None:
    image = decode_base64(fields["image"], "image", limits)
  if video is None and fields.get("video") is not None:
    video = decode_base64(fields["video"], "video", limits)
  if image is not None and video is not None:
    raise RequestError("pass image (image-to-video) or video (video-to-video), not both",
                       "video")
  image_arr = video_arr = None
  if image is not None:
    check_upload_size(len(image), "image", limits)
    image_arr = decode_image(image)
  if video is not None:
    check_upload_size(len(video), "video", limits)
    video_arr = decode_video(video, limits)
  return GenerationRequest(prompt=prompt, negative_prompt=negative, seed=seed, height=height,
                           width=width, steps=steps, guidance_scale=guidance,
                           num_frames=num_frames, image=image_arr, video=video_arr,
                           interpolation_steps=interp)
