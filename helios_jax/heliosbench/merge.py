"""HeliosBench merge (upstream `9_merge_all_scores.py` / `10_merge_all_results.py`) + summary.

Ratings: each metric's average is clipped to [0, 1] and mapped to an integer 1-10 by fixed
thresholds (>= for higher-is-better, <= for lower-is-better); totals are the weighted sums of the
ratings (short: 5 basic metrics; long: plus 4 drift metrics, weights summing to 0.996), rounded to
4 decimals. Upstream quirks are kept by default and documented:

* Long-rule Aesthetic thresholds end `..., 0.40, 0.45, 0.40` (ratings 3 and 2 unreachable).
  `long_aesthetic="fixed"` uses `..., 0.40, 0.35, 0.30` instead.
* The average is read as `average_score or average_drift_score`, so a non-drift average of
  exactly 0.0 counts as missing (no rating, contributes 0).
* A missing metric drops out of the total (no re-normalisation of the weights).

The Throughput Score (README: 1 if FPS <= 3.2, ceil(FPS / 3.2) below 32, else 10) is reported
next to the total but, as upstream, not added to it.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Mapping

from helios_jax import runtime
from helios_jax.heliosbench import naming
from helios_jax.heliosbench import results as res

RATING_SCALE = 10
# `--rules auto`: short rules when no video is longer than the 120-frame bucket as Helios
# writes it (132 frames: four 33-frame chunks; the 81-frame short clips too), long otherwise.
SHORT_MAX_FRAMES = 132

WEIGHTS_SHORT = {
    "aesthetic": 0.10, "motion_amplitude": 0.10, "motion_smoothness": 0.10,
    "semantic": 0.35, "naturalness": 0.35,
}
WEIGHTS_LONG = {
    "aesthetic": 0.03, "motion_amplitude": 0.03, "motion_smoothness": 0.03,
    "semantic": 0.255, "naturalness": 0.255,
    "drifting_aesthetic": 0.099, "drifting_motion_smoothness": 0.099,
    "drifting_semantic": 0.099, "drifting_naturalness": 0.099,
}

_HIGHER = "higher_better"
_LOWER = "lower_better"
_STEP01 = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]
RULES_SHORT = {
    "aesthetic": (_HIGHER, [0.70, 0.65, 0.60, 0.55, 0.50, 0.45, 0.40, 0.35, 0.30]),
    "motion_amplitude": (_HIGHER, [0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15, 0.10, 0.05]),
    "motion_smoothness": (_HIGHER, [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91]),
    "semantic": (_HIGHER, [0.30, 0.29, 0.28, 0.27, 0.26, 0.25, 0.24, 0.23, 0.22]),
    "naturalness": (_HIGHER, [0.65, 0.60, 0.55, 0.50, 0.45, 0.40, 0.30, 0.25, 0.20]),
}
LONG_AESTHETIC_UPSTREAM = [0.70, 0.65, 0.60, 0.55, 0.50, 0.45, 0.40, 0.45, 0.40]
LONG_AESTHETIC_FIXED = [0.70, 0.65, 0.60, 0.55, 0.50, 0.45, 0.40, 0.35, 0.30]


def rules(is_long: bool, long_aesthetic: str = "upstream") -> dict[str, tuple[str, list[float]]]:
  """The rating rules of the short or long table.

  Args:
    is_long: long rules (with the four drift metrics).
    long_aesthetic: "upstream" (the duplicated thresholds, default) or "fixed".
  """
  if long_aesthetic not in ("upstream", "fixed"):
    raise ValueError(f"long_aesthetic={long_aesthetic!r} must be 'upstream' or 'fixed'")
  if not is_long:
    return dict(RULES_SHORT)
  out = dict(RULES_SHORT)
  out["aesthetic"] = (_HIGHER, LONG_AESTHETIC_UPSTREAM if long_aesthetic == "upstream"
                      else LONG_AESTHETIC_FIXED)
  for k in ("drifting_aesthetic", "drifting_motion_smoothness", "drifting_semantic"):
    out[k] = (_LOWER, list(_STEP01))
  out["drifting_naturalness"] = (_LOWER, [0.06, 0.08, 0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22])
  return out


def normalize(score: Any) -> float | None:
  """Upstream `normalize_score`: every range is [0, 1], so clip (None for non-numbers)."""
  if score is None or isinstance(score, bool) or not isinstance(score, (int, float)):
    return None
  return max(0.0, min(1.0, float(score)))


def rate(value: float | None, rule: tuple[str, list[float]]) -> int | None:
  """Integer rating 10..1 of a normalised value (None stays None)."""
  if value is None:
    return None
  kind, thresholds = rule
  for i, t in enumerate(thresholds):
    if (value >= t) if kind == _HIGHER else (value <= t):
      return RATING_SCALE - i
  return 1


def throughput_score(fps: float) -> int:
  """README Throughput Score: 1 if FPS <= 3.2; ceil(FPS / 3.2) if < 32; 10 if >= 32."""
  if fps is None or not math.isfinite(fps) or fps < 0:
    raise ValueError(f"fps={fps} must be a finite number >= 0")
  if fps <= 3.2:
    return 1
  if fps >= 32:
    return 10
  return int(math.ceil(fps / 3.2))


def weighted_total(ratings: Mapping[str, int | None], is_long: bool) -> float:
  """Upstream `calculate_weighted_rating`: sum of rating x weight, missing ones dropped."""
  weights = WEIGHTS_LONG if is_long else WEIGHTS_SHORT
  total = 0.0
  for metric, w in weights.items():
    r = ratings.get(metric)
    if r is not None:
      total += r * w
  return round(total, 4)


def video_frames(results_dir: str) -> list[int]:
  """Frame counts (the `ori{frames}` field) of the videos a results folder scored."""
  frames = set()
  for name in sorted(os.listdir(results_dir)):
    if not name.endswith("_results.json") or name == "merged_results.json":
      continue
    data = res.read_json(os.path.join(results_dir, name))
    for entry in data.get("per_video_results", []) + data.get("failed_videos", []):
      try:
        n = naming.parse_video_name(str(entry.get("video_name", "")), strict=False).frames
      except naming.NamingError:
        continue
      if n is not None:
        frames.add((entry.get("video_name"), n))
  return [n for _, n in sorted(frames)]


def infer_rules(results_dir: str) -> tuple[bool, str]:
  """(is_long, why): long rules when a scored video is longer than `SHORT_MAX_FRAMES`."""
  frames = video_frames(results_dir)
  if not frames:
    return True, "long rules (no video lengths in the results; the upstream default)"
  longest = max(frames)
  is_long = longest > SHORT_MAX_FRAMES
  return is_long, (f"{'long' if is_long else 'short'} rules: the longest video has {longest} "
                   f"frames (short up to {SHORT_MAX_FRAMES})")


def merge_model(results_dir: str, is_long: bool, long_aesthetic: str = "upstream",
                write: bool = True) -> dict[str, Any]:
  """Builds (and writes) one model's `merged_results.json` from its `*_results.json` files.

  Args:
    results_dir: folder with the metric result files.
    is_long: long rules (upstream `--is_long`).
    long_aesthetic: see `rules`.
    write: write `merged_results.json` into `results_dir`.

  Returns:
    The upstream `merged_results.json` structure.

  Raises:
    FileNotFoundError: `results_dir` has no `*_results.json`.
  """
  if not os.path.isdir(results_dir):
    raise FileNotFoundError(f"results folder not found: {results_dir}")
  files = sorted(f for f in os.listdir(results_dir) if f.endswith("_results.json"))
  if not files:
    raise FileNotFoundError(f"no *_results.json in {results_dir}")
  active = rules(is_long, long_aesthetic)
  merged: dict[str, Any] = {"rating_scale": RATING_SCALE,
                            "summary": {"non_drifting": {}, "drifting": {}}, "per_video": {}}
  for name in files:
    key = name[:-len("_results.json")]
    if key not in active:
      continue
    data = res.read_json(os.path.join(results_dir, name))
    score = data.get("average_score") or data.get("average_drift_score")
    norm = normalize(score)
    entry = {"name": key.replace("_", " ").title(), "raw_score": score,
             "normalized_score": norm, "rating": rate(norm, active[key]),
             "num_videos": data.get("num_videos", 0)}
    group = "drifting" if key.startswith("drifting_") else "non_drifting"
    merged["summary"][group][key] = entry
  all_entries = {**merged["summary"]["non_drifting"], **merged["summary"]["drifting"]}
  merged["summary"]["total_weighted_rating"] = weighted_total(
      {k: v["rating"] for k, v in all_entries.items()}, is_long)
  if write:
    res.write_json(os.path.join(results_dir, "merged_results.json"), merged)
  return merged


def collect_models(merged: Mapping[str, Mapping[str, Any]], score_type: str = "rating"
                   ) -> dict[str, Any]:
  """Upstream `all_models_merged.json` from {model: merged_results}."""
  field = {"raw": "raw_score", "normalized": "normalized_score", "rating": "rating"}
  if score_type not in field:
    raise ValueError(f"score_type={score_type!r} must be one of {sorted(field)}")
  models, metrics = {}, set()
  for model, data in merged.items():
    summary = data.get("summary", {})
    scores = {}
    for group in ("non_drifting", "drifting"):
      for k, info in summary.get(group, {}).items():
        scores[k] = info.get(field[score_type])
    if "total_weighted_rating" in summary:
      scores["total_weighted_rating"] = summary["total_weighted_rating"]
    models[model] = scores
    metrics.update(scores)
  ordered = sorted(m for m in metrics if m != "total_weighted_rating")
  if "total_weighted_rating" in metrics:
    ordered.append("total_weighted_rating")
  out = {"num_models": len(models), "score_type": score_type, "metrics": ordered,
         "models": models}
  if score_type == "rating":
    out["rating_scale"] = RATING_SCALE
  return out


def summary_rows(results_dir: str, merged: Mapping[str, Any], is_long: bool,
                 fps: float | None = None, rules_note: str | None = None
                 ) -> list[dict[str, Any]]:
  """One row per metric: rated ones with weight and contribution, then extensions/proxies,
  skipped metrics with their reason, the total (with the rules used and how many of the rated
  metrics it covers) and the throughput score."""
  rules_note = rules_note or ("long rules" if is_long else "short rules")
  weights = WEIGHTS_LONG if is_long else WEIGHTS_SHORT
  entries = {**merged["summary"]["non_drifting"], **merged["summary"]["drifting"]}
  rows = []
  for k, w in weights.items():
    e = entries.get(k)
    r = e["rating"] if e else None
    rows.append({"metric": k, "kind": "rated", "raw_score": e["raw_score"] if e else None,
                 "rating": r, "weight": w, "contribution": round(r * w, 4) if r else None,
                 "num_videos": e["num_videos"] if e else 0, "note": "" if e else "missing"})
  skip_path = os.path.join(results_dir, res.SKIPPED_FILE)
  skipped = res.read_json(skip_path) if os.path.isfile(skip_path) else {}
  for row in rows:
    if row["metric"] in skipped and row["raw_score"] is None:
      row["note"] = f"skipped: {skipped[row['metric']]}"
  for name in sorted(os.listdir(results_dir)):
    if not name.endswith("_results.json"):
      continue
    key = name[:-len("_results.json")]
    spec = res.RESULT_SPECS.get(key)
    if key in weights or spec is None or key == "merged":
      continue
    data = res.read_json(os.path.join(results_dir, name))
    score = data.get("average_score", data.get("average_drift_score"))
    rows.append({"metric": key, "kind": "proxy" if spec.proxy else "extension",
                 "raw_score": score, "rating": None, "weight": None, "contribution": None,
                 "num_videos": data.get("num_videos", 0),
                 "note": "model-free proxy, not rated" if spec.proxy else "not rated"})
  rated = [r["metric"] for r in rows if r["kind"] == "rated" and r["rating"] is not None]
  rows.append({"metric": "total_weighted_rating", "kind": "total",
               "raw_score": merged["summary"]["total_weighted_rating"], "rating": None,
               "weight": round(sum(weights.values()), 4), "contribution": None,
               "num_videos": None,
               "note": f"{rules_note}; covers {len(rated)} of {len(weights)} rated metrics"})
  if fps is not None:
    rows.append({"metric": "throughput_score", "kind": "throughput", "raw_score": fps,
                 "rating": throughput_score(fps), "weight": None, "contribution": None,
                 "num_videos": None, "note": "FPS; not part of the total (as upstream)"})
  return rows


def format_table(model: str, rows: list[dict[str, Any]]) -> str:
  """Plain-text summary table."""
  def f(v, spec):
    return "-" if v is None else format(v, spec)
  lines = [f"HeliosBench summary: {model}",
           f"{'metric':<34}{'raw':>12}{'rating':>8}{'weight':>8}{'contrib':>9}{'videos':>8}  note"]
  for r in rows:
    lines.append(f"{r['metric']:<34}{f(r['raw_score'], '.4f'):>12}{f(r['rating'], 'd'):>8}"
                 f"{f(r['weight'], '.3f'):>8}{f(r['contribution'], '.4f'):>9}"
                 f"{f(r['num_videos'], 'd'):>8}  {r['note']}")
  return "\n".join(lines)


CSV_FIELDS = ("model", "metric", "kind", "raw_score", "rating", "weight", "contribution",
              "num_videos", "note")


def write_summary(out_dir: str, per_model_rows: Mapping[str, list[dict[str, Any]]]
                  ) -> tuple[str, str]:
  """Writes `summary.json` and `summary.csv` (one row per model x metric)."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "summary.json")
  res.write_json(json_path, {m: rows for m, rows in per_model_rows.items()})
  csv_path = os.path.join(out_dir, "summary.csv")
  with runtime.atomic_write(csv_path, newline="") as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    w.writeheader()
    for model, rows in per_model_rows.items():
      for r in rows:
        w.writerow({"model": model, **{k: ("" if r.get(k) is None else r.get(k))
                                       for k in CSV_FIELDS[1:]}})
  return json_path, csv_path


def find_model_dirs(results: str) -> dict[str, str]:
  """{model name: folder}: `results` itself when it holds `*_results.json`, else its
  sub-folders that do."""
  if not os.path.isdir(results):
    raise FileNotFoundError(f"results folder not found: {results}")
  has = lambda d: any(n.endswith("_results.json") and n != "merged_results.json"
                      for n in os.listdir(d))
  if has(results):
    return {os.path.basename(os.path.normpath(results)): results}
  out = {}
  for name in sorted(os.listdir(results)):
    d = os.path.join(results, name)
    if os.path.isdir(d) and has(d):
      out[name] = d
  if not out:
    raise FileNotFoundError(f"no *_results.json in {results} or its sub-folders")
  return out


def run_merge(results: str, out_dir: str | None = None, *, is_long: bool | None = None,
              long_aesthetic: str = "upstream", fps: float | None = None,
              score_type: str = "rating", plots: bool = True, log=print) -> dict[str, Any]:
  """Merges one model folder or a root of model folders; writes summaries and plots.

  Args:
    results: a model's results folder, or a folder of model results folders.
    out_dir: where `summary.{json,csv}`, `all_models_merged.json` and `plots/` go (default
      `results`). Each model's `merged_results.json` is written into its own folder (upstream).
    is_long: long or short rules; None (default): per model from its videos' frame counts
      (`infer_rules`; upstream's `run_metrics.sh` always passes long).
    long_aesthetic: "upstream" (keep the duplicated long-Aesthetic thresholds) or "fixed".
    fps: measured end-to-end FPS for the Throughput Score row (optional).
    score_type: view of `all_models_merged.json` ("rating", "raw", "normalized").
    plots: write the PNG plots.
    log: printer for the summary table.

  Returns:
    {"merged": {model: merged_results}, "rows": {model: rows}, "files": [paths written]}.
  """
  out_dir = out_dir or results
  os.makedirs(out_dir, exist_ok=True)
  model_dirs = find_model_dirs(results)
  merged, rows, files = {}, {}, []
  for model, d in model_dirs.items():
    if is_long is None:
      model_long, note = infer_rules(d)
    else:
      model_long, note = is_long, f"{'long' if is_long else 'short'} rules (as asked)"
    merged[model] = merge_model(d, model_long, long_aesthetic)
    files.append(os.path.join(d, "merged_results.json"))
    rows[model] = summary_rows(d, merged[model], model_long, fps, note)
    log(format_table(model, rows[model]))
    missing = [r["metric"] for r in rows[model] if r["kind"] == "rated" and r["rating"] is None]
    if missing:
      n = len(WEIGHTS_LONG if model_long else WEIGHTS_SHORT)
      log(f"warning: {model}: total_weighted_rating covers {n - len(missing)} of {n} rated "
          f"metrics; missing {', '.join(missing)} (they add 0, so totals are not comparable "
          "with complete runs)")
  all_path = os.path.join(out_dir, "all_models_merged.json")
  res.write_json(all_path, collect_models(merged, score_type))
  files.append(all_path)
  files += list(write_summary(out_dir, rows))
  if plots:
    from helios_jax.heliosbench import plots as plots_lib  # pylint: disable=g-import-not-at-top
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    files.append(plots_lib.metric_bars(os.path.join(plot_dir, "metric_ratings.png"), rows))
    for model, d in model_dirs.items():
      for fn, stem in ((plots_lib.drift_start_end, "drift_start_end"),
                       (plots_lib.chunk_curves, "chunk_curves")):
        p = fn(os.path.join(plot_dir, f"{model}_{stem}.png"), d)
        if p:
          files.append(p)
  return {"merged": merged, "rows": rows, "files": files}
