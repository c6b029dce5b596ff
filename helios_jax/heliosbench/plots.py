"""PNG plots of HeliosBench results (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from helios_jax import runtime
from helios_jax.heliosbench import results as res


# Drift scatter plots label each point with its video id up to this many videos.
MAX_LABELLED_POINTS = 30


def _save(fig, path: str) -> None:
  """Saves a PNG atomically (a failed write leaves no partial file) and closes the figure."""
  try:
    with runtime.atomic_write(path, "wb") as f:
      fig.savefig(f, dpi=110, format="png")
  finally:
    _plt().close(fig)


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def metric_bars(path: str, per_model_rows: Mapping[str, list[dict[str, Any]]]) -> str:
  """Grouped bars of the 1-10 ratings per metric (one bar per model); total in the legend."""
  plt = _plt()
  models = list(per_model_rows)
  metrics = []
  for rows in per_model_rows.values():
    for r in rows:
      if r["kind"] == "rated" and r["metric"] not in metrics:
        metrics.append(r["metric"])
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(metrics) + 2), 4.5))
  width = 0.8 / max(len(models), 1)
  for i, m in enumerate(models):
    rows = {r["metric"]: r for r in per_model_rows[m]}
    ratings = [rows.get(k, {}).get("rating") for k in metrics]
    total_row = next((r for r in per_model_rows[m] if r["kind"] == "total"), None)
    label = m
    if total_row is not None and total_row["raw_score"] is not None:
      own = [r for r in per_model_rows[m] if r["kind"] == "rated"]  # this model's rules
      rated = sum(r["rating"] is not None for r in own)
      label = f"{m} (total {total_row['raw_score']:.3f}, {rated}/{len(own)} metrics)"
    xs = [j + i * width - 0.4 + width / 2 for j in range(len(metrics))]
    bars = ax.bar(xs, [r or 0 for r in ratings], width, label=label)
    for x, r, bar in zip(xs, ratings, bars):
      if r is None:  # skipped, missing or not in this model's rules: not an empty "0" bar
        ax.text(x, 0.15, "n/a", ha="center", va="bottom", fontsize=7, rotation=90,
                color=bar.get_facecolor())
  ax.set_xticks(range(len(metrics)))
  ax.set_xticklabels([k.replace("drifting_", "drift ").replace("_", " ") for k in metrics],
                     fontsize=7, rotation=30, ha="right")
  ax.set_ylim(0, 10.5)
  ax.set_ylabel("rating (1-10)")
  ax.set_title("HeliosBench ratings per metric")
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)
  return path


def drift_start_end(path: str, results_dir: str) -> str | None:
  """Per-video start vs end scores of every drift result file (one panel per metric)."""
  plt = _plt()
  panels = []
  for key, spec in res.RESULT_SPECS.items():
    f = os.path.join(results_dir, spec.filename)
    if not (spec.drift and os.path.isfile(f)):
      continue
    data = res.read_json(f)
    stem = spec.value_key[len("drift_"):]
    if all(f"start_{stem}" in e for e in data.get("per_video_results", [])):
      panels.append((key, spec, data))
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
  for ax, (key, spec, data) in zip(axes[0], panels):
    stem = spec.value_key[len("drift_"):]
    pv = data.get("per_video_results", [])
    s = [e[f"start_{stem}"] for e in pv]
    e = [e[f"end_{stem}"] for e in pv]
    ax.scatter(s, e, s=18)
    lo, hi = min(s + e, default=0), max(s + e, default=1)
    pad = 0.05 * (hi - lo or 1)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
    if len(pv) <= MAX_LABELLED_POINTS:  # ids beside their points, alternately above / below
      for j, (item, x, y) in enumerate(zip(pv, s, e)):
        ax.annotate(str(item["id"]), (x, y), xytext=(4, 5 if j % 2 == 0 else -9),
                    textcoords="offset points", fontsize=6)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(f"{key.replace('_', ' ')}\nmean drift "
                 f"{data.get('average_drift_score', 0):.4f} ({len(pv)} videos)", fontsize=8)
    ax.set_xlabel("start (first 15%)")
    ax.set_ylabel("end (last 15%)")
  fig.tight_layout()
  _save(fig, path)
  return path


def chunk_curves(path: str, results_dir: str) -> str | None:
  """Per-chunk metric curves of every video (one panel per curve)."""
  plt = _plt()
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  f = os.path.join(results_dir, res.CHUNKS_FILE)
  if not os.path.isfile(f):
    return None
  data = res.read_json(f)
  curves = {k: v for k, v in data.get("curves", {}).items() if v}
  if not curves:
    return None
  chunk = data.get("chunk_frames")
  fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False)
  for ax, (name, per_video) in zip(axes[0], sorted(curves.items())):
    for video, ys in sorted(per_video.items()):
      ax.plot(range(len(ys)), ys, marker="o", ms=3, lw=1, label=video)
    ax.set_title(name.replace("_", " "), fontsize=8)
    ax.set_xlabel(f"chunk ({chunk} frames)")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # chunks are whole numbers
    if len(per_video) <= 8:
      ax.legend(fontsize=6)
  fig.tight_layout()
  _save(fig, path)
  return path
