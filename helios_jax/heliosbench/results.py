"""Per-metric result files in the upstream HeliosBench JSON format (spec benchmark.md §1.7)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

from helios_jax import runtime
from helios_jax.heliosbench import drift as drift_lib

SKIPPED_FILE = "skipped_metrics.json"
CHUNKS_FILE = "per_chunk_results.json"
FAILED_FILE = "failed_videos.json"


@dataclasses.dataclass(frozen=True)
class ResultSpec:
  """How one metric's `{key}_results.json` is written.

  Attributes:
    key: file key (`{key}_results.json`), also the merge's metric key.
    metric: value of the JSON `metric` field (upstream writes "motion_fb" for motion amplitude).
    value_key: per-video key holding the value that is averaged.
    drift: drift layout (`description`, `average_drift_score`, start/end per video).
    subject: the X of the description "Start-end contrast of X (first/last 15% frames)".
    upstream: one of the nine upstream metric files (the merge rates only those).
    proxy: a model-free stand-in, never rated.
  """

  key: str
  metric: str
  value_key: str
  drift: bool = False
  subject: str = ""
  upstream: bool = True
  proxy: bool = False

  @property
  def filename(self) -> str:
    return f"{self.key}_results.json"

  @property
  def description(self) -> str:
    pct = f"{drift_lib.DRIFT_RATIO * 100:.0f}"
    return f"Start-end contrast of {self.subject} (first/last {pct}% frames)"


def _drift(key, subject, stem, **kw):
  return ResultSpec(key, key, f"drift_{stem}", drift=True, subject=subject, **kw)


RESULT_SPECS: dict[str, ResultSpec] = {s.key: s for s in [
    ResultSpec("aesthetic", "aesthetic", "aesthetic_score"),
    ResultSpec("motion_amplitude", "motion_fb", "motion_fb"),
    ResultSpec("motion_smoothness", "motion_smoothness", "motion_smoothness_score"),
    ResultSpec("semantic", "semantic", "semantic_score"),
    ResultSpec("naturalness", "naturalness", "naturalness_score"),
    _drift("drifting_aesthetic", "aesthetic", "aesthetic_score"),
    _drift("drifting_motion_smoothness", "motion smoothness", "motion_smoothness_score"),
    _drift("drifting_semantic", "semantic consistency", "semantic_score"),
    _drift("drifting_naturalness", "naturalness", "naturalness_score"),
    # Extensions (not in upstream, not rated by the merge).
    _drift("drifting_motion_amplitude", "motion amplitude", "motion_fb", upstream=False),
    # Model-free proxies (never rated).
    _drift("proxy_color_drift", "colour histograms", "proxy_color_score", upstream=False,
           proxy=True),
    ResultSpec("proxy_temporal_ssim", "proxy_temporal_ssim", "proxy_temporal_ssim_score",
               upstream=False, proxy=True),
    _drift("proxy_drifting_temporal_ssim", "temporal SSIM", "proxy_temporal_ssim_score",
           upstream=False, proxy=True),
    ResultSpec("proxy_blend_smoothness", "proxy_blend_smoothness",
               "proxy_blend_smoothness_score", upstream=False, proxy=True),
    _drift("proxy_drifting_blend_smoothness", "blend-interpolation smoothness",
           "proxy_blend_smoothness_score", upstream=False, proxy=True),
]}


def drift_values(spec: ResultSpec, drift: float, start: float, end: float) -> dict[str, float]:
  """{drift_X, start_X, end_X} per-video keys of a drift spec (X = value key without drift_)."""
  stem = spec.value_key[len("drift_"):]
  return {spec.value_key: drift, f"start_{stem}": start, f"end_{stem}": end}


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_json(path: str, data: Any) -> None:
  """Writes JSON with indent=2 atomically (`runtime.atomic_write`: a full disk leaves the
  previous file or none, and the error propagates)."""
  with runtime.atomic_write(path) as f:
    json.dump(data, f, indent=2)


def load_existing(out_dir: str, spec: ResultSpec) -> dict[int, dict]:
  """Per-video entries of an existing result file, by id ({} if none)."""
  path = os.path.join(out_dir, spec.filename)
  if not os.path.isfile(path):
    return {}
  try:
    data = read_json(path)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable existing result file ({e})") from e
  return {int(item["id"]): item for item in data.get("per_video_results", [])
          if spec.value_key in item}


def write_results(out_dir: str, spec: ResultSpec, entries: Iterable[Mapping[str, Any]],
                  failed: Iterable[Mapping[str, Any]] = (),
                  extra_top: Mapping[str, Any] | None = None) -> str | None:
  """Writes `{key}_results.json` in upstream key order.

  Args:
    out_dir: results folder.
    spec: the metric.
    entries: per-video dicts starting with `id` and `video_name`.
    failed: [{"id", "video_name", "error"}] videos that could not be scored (extension key
      `failed_videos`, after `per_video_results`; upstream drops them silently).
    extra_top: keys inserted after `num_videos` (Naturalness: `model_name`, ...).

  Returns:
    The path written, or None when no video was scored (no file, as upstream).
  """
  entries = sorted((dict(e) for e in entries), key=lambda e: (e["id"], e["video_name"]))
  failed = sorted((dict(f) for f in failed), key=lambda e: (e["id"], e["video_name"]))
  path = os.path.join(out_dir, spec.filename)
  if not entries:
    return None
  values = [e[spec.value_key] for e in entries]
  avg = sum(values) / len(values)
  out: dict[str, Any] = {"metric": spec.metric}
  if spec.drift:
    out["description"] = spec.description
    out["average_drift_score"] = avg
  else:
    out["average_score"] = avg
  out["num_videos"] = len(values)
  out.update(extra_top or {})
  out["per_video_results"] = entries
  if failed:
    out["failed_videos"] = failed
  os.makedirs(out_dir, exist_ok=True)
  write_json(path, out)
  return path
