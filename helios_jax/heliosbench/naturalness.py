"""Naturalness metric (upstream `4_get_naturalness.py` / `8_get_drifting_naturalness.py`).

A VLM judge behind an OpenAI-compatible `POST {base_url}/chat/completions` endpoint (upstream
default model `gpt-5.2-2025-12-11`, temperature 0) sees up to 16 JPEG frames and upstream's
rubric, and answers one integer 1 (definitely AI) ... 5 (definitely real); the score is
(clamp(float(reply), 1, 5) - 1) / 4. Frames are OpenCV seeks at native resolution, resized with
INTER_AREA so the long side is 512, JPEG-encoded with `cv2.imencode` defaults (quality 95).
The HTTP call uses the standard library only (no `openai` package).
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

import numpy as np

from helios_jax.heliosbench import drift as drift_lib
from helios_jax.heliosbench import video_io

DEFAULT_MODEL = "gpt-5.2-2025-12-11"
NUM_FRAMES = 16

# Upstream `PROMPT_VIDEO_DETECTION` (identical in scripts 4 and 8), verbatim.
# pylint: disable=line-too-long
RUBRIC = """
Your task is to analyze ##NUM_FRAMES## frames sampled across a long video (e.g., ~1500 frames) to determine if it is AI-generated.

### CONTEXT:
Frames are sampled at wide intervals. Scene changes or camera movements are expected. Focus on individual frame integrity and local physical logic rather than global consistency.

### EVALUATION CRITERIA:
1. **Single-Frame Technical Flaws**: Look for AI-specific rendering "hallucinations":
   - **Textures**: "Melting" surfaces, plastic-like skin, or chaotic patterns in complex areas (e.g., water ripples, foliage, fire).
   - **Edges**: Unnatural blurring or "auras" around moving subjects where they meet the background.
2. **Local Physical Logic**: Within any given frame or small cluster of frames:
   - Do shadows and reflections align with the visible light sources?
   - Are objects interacting naturally with their environment (e.g., feet touching the ground properly, hands grasping objects correctly)?
3. **Biological Anomalies**: If humans appear, inspect for:
   - Anatomical errors: Extra fingers, asymmetric eyes, or "fused" teeth.
   - Unnatural micro-expressions or "dead" eyes lacking specular highlights.
4. **Transient Artifacts**: Even in sparse samples, look for "ghosting" or objects that seem to be partially transparent or merging with other objects (common in AI diffusion).

### SCORING SCALE:
- 1 (Definitely AI): Clear anatomical deformities, "melting" textures, or impossible physical interactions.
- 2 (Likely AI): Presence of "uncanny valley" effects, suspicious texture smoothing, or minor physical illogic.
- 3 (Uncertain): Ambiguous; could be low-quality real-world footage, heavy motion blur, or high-end AI.
- 4 (Likely Real): Consistent organic details, natural motion blur, and logical lighting.
- 5 (Definitely Real): Perfect high-frequency details (pores, fabric, grain), flawless physics, and natural anatomy.

### OUTPUT INSTRUCTION:
Return ONLY the integer score (1-5). No explanation.
""".strip()
# pylint: enable=line-too-long


def full_video_indices(total: int, num_frames: int = NUM_FRAMES) -> list[int]:
  """Upstream `extract_frames`: stride max(N // 16, 1), frames 0, d, ..., 15 d."""
  d = max(total // num_frames, 1)
  return [i * d for i in range(num_frames)]


def portion_indices(total: int, portion: str, num_frames: int = NUM_FRAMES) -> list[int]:
  """Upstream `extract_frames_from_portion` for `portion` in {"start", "end"}."""
  n = drift_lib.drift_window_len(total, minimum=1)
  if portion == "start":
    start, end = 0, n
  elif portion == "end":
    start, end = total - n, total
  else:
    raise ValueError(f"portion={portion!r} must be 'start' or 'end'")
  d = max((end - start) // num_frames, 1)
  return [start + i * d for i in range(num_frames) if start + i * d < end]


def resize_long_side(image: np.ndarray, target_long: int = 512) -> np.ndarray:
  """Upstream `resize_long_side` (INTER_AREA, int() sizes)."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  if h >= w:
    new_h, new_w = target_long, int(w * target_long / h)
  else:
    new_w, new_h = target_long, int(h * target_long / w)
  return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def jpeg_base64(image_bgr: np.ndarray) -> str:
  import cv2  # pylint: disable=g-import-not-at-top
  ok, buf = cv2.imencode(".jpg", image_bgr)
  if not ok:
    raise ValueError(f"JPEG encoding failed for an image of shape {image_bgr.shape}")
  return base64.b64encode(buf).decode("utf-8")


def build_messages(frames_b64: Sequence[str], num_frames: int = NUM_FRAMES) -> list[dict]:
  """One user message: the images, then the rubric (with `##NUM_FRAMES##` filled in)."""
  content = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{f}"}}
             for f in frames_b64]
  content.append({"type": "text", "text": RUBRIC.replace("##NUM_FRAMES##", str(num_frames))})
  return [{"role": "user", "content": content}]


def parse_reply(reply: str) -> float:
  """Upstream parsing: float(reply.strip()), clamp to [1, 5], (s - 1) / 4.

  Raises:
    ValueError: the reply is not a number (the reply is quoted).
  """
  try:
    s = float(reply.strip())
  except ValueError:
    raise ValueError(f"VLM reply {reply!r} is not a number") from None
  if not np.isfinite(s):
    raise ValueError(f"VLM reply {reply!r} is not finite")
  return (max(1.0, min(5.0, s)) - 1.0) / 4.0


Transport = Callable[[str, dict, dict, float], dict]


def _http_post(url: str, payload: dict, headers: dict, timeout: float) -> dict:
  req = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), headers=headers,
                               method="POST")
  with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (user endpoint)
    return json.loads(resp.read().decode("utf-8"))


class VlmJudge:
  """OpenAI-compatible chat-completions client for the Naturalness rubric.

  Args:
    base_url: endpoint root, e.g. `https://api.openai.com/v1` (the `/chat/completions` path is
      appended).
    api_key: bearer token (may be empty for local servers).
    model: model name sent in the request.
    temperature: sampling temperature (upstream 0).
    timeout: seconds per HTTP request.
    max_retries: retries on connection errors, HTTP 408/409/429/5xx (the `openai` client's
      default is 2), with exponential back-off.
    transport: replaces the HTTP POST (tests).
  """

  def __init__(self, base_url: str, api_key: str = "", model: str = DEFAULT_MODEL,
               temperature: float = 0.0, timeout: float = 600.0, max_retries: int = 2,
               transport: Transport | None = None):
    if not base_url:
      raise ValueError("VLM base_url is empty")
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.api_key = api_key
    self.model = model
    self.temperature = temperature
    self.timeout = timeout
    self.max_retries = max_retries
    self.transport = transport or _http_post

  def ask(self, frames_bgr: Sequence[np.ndarray], num_frames: int = NUM_FRAMES) -> str:
    """Sends the frames and the rubric; returns the stripped reply text."""
    if not frames_bgr:
      raise ValueError("no frame could be read for the VLM judge")
    b64 = [jpeg_base64(resize_long_side(f, 512)) for f in frames_bgr]
    payload = {"model": self.model, "stream": False, "temperature": self.temperature,
               "messages": build_messages(b64, num_frames)}
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    for attempt in range(self.max_retries + 1):
      try:
        data = self.transport(self.url, payload, headers, self.timeout)
        return str(data["choices"][0]["message"]["content"]).strip()
      except urllib.error.HTTPError as e:
        retryable = e.code in (408, 409, 429) or e.code >= 500
        if not retryable or attempt == self.max_retries:
          raise RuntimeError(f"VLM endpoint {self.url} answered HTTP {e.code}") from None
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        if attempt == self.max_retries:
          raise RuntimeError(f"VLM endpoint {self.url} unreachable ({e})") from None
      except (KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"VLM endpoint {self.url} sent an unexpected reply ({e})") from None
      time.sleep(min(8.0, 0.5 * 2 ** attempt))
    raise AssertionError("unreachable")

  def score_video(self, path: str | os.PathLike, num_frames: int = NUM_FRAMES
                  ) -> tuple[float, str]:
    """Upstream Naturalness of a whole video: (score in [0, 1], raw reply)."""
    total = video_io.cv2_frame_count(path)
    frames = video_io.read_frames_cv2_at(path, full_video_indices(total, num_frames))
    raw = self.ask(frames, num_frames)
    return parse_reply(raw), raw

  def score_portion(self, path: str | os.PathLike, portion: str, num_frames: int = NUM_FRAMES
                    ) -> tuple[float, str]:
    """Upstream Drifting Naturalness of the first/last 15%: (score, raw reply)."""
    total = video_io.cv2_frame_count(path)
    frames = video_io.read_frames_cv2_at(path, portion_indices(total, portion, num_frames))
    raw = self.ask(frames, num_frames)
    return parse_reply(raw), raw
