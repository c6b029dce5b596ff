"""Runs the HeliosBench metrics over a folder of videos and writes the upstream result files.

Each metric family decodes a video at most once per decoder (video-reader-rs emulation or
OpenCV) and feeds every selected family from that one pass. Learned metrics are pluggable: when
their weights/endpoint are not configured (flags or environment variables) they are recorded as
skipped with the reason in `skipped_metrics.json`, never as a number. A video that cannot be
decoded or scored is recorded with its error (`failed_videos` in the metric file and
`failed_videos.json`) and the run goes on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

from helios_jax.heliosbench import drift as drift_lib
from helios_jax.heliosbench import motion as motion_lib
from helios_jax.heliosbench import naming
from helios_jax.heliosbench import proxies
from helios_jax.heliosbench import results as res
from helios_jax.heliosbench import video_io
from helios_jax.constants import CHUNK_FRAMES

ENV = {
    "clip_model": "HELIOS_BENCH_CLIP_MODEL",
    "aesthetic_head": "HELIOS_BENCH_AESTHETIC_HEAD",
    "upstream_eval": "HELIOS_BENCH_UPSTREAM_EVAL",
    "amt_ckpt": "HELIOS_BENCH_AMT_CKPT",
    "amt_config": "HELIOS_BENCH_AMT_CONFIG",
    "viclip_dir": "HELIOS_BENCH_VICLIP_DIR",
    "vlm_base_url": "HELIOS_BENCH_VLM_BASE_URL",
    "vlm_model": "HELIOS_BENCH_VLM_MODEL",
    "vlm_api_key": "HELIOS_BENCH_VLM_API_KEY",
}


@dataclasses.dataclass
class ScorerOptions:
  """Where the learned metrics find their weights / endpoint (flags override env vars).

  Attributes:
    clip_model: CLIP ViT-L/14 (transformers folder, Orbax export, or OpenAI `ViT-L-14.pt`).
    aesthetic_head: LAION head (`sa_0_4_vit_l_14_linear.pth`).
    upstream_eval: a copy of Helios' `eval/` folder (AMT-S and ViCLIP PyTorch code).
    amt_ckpt: `amt-s.pth`.
    amt_config: optional AMT YAML.
    viclip_dir: folder with `ViClip-InternVid-10M-FLT.pth` + `bpe_simple_vocab_16e6.txt.gz`.
    vlm_base_url: OpenAI-compatible endpoint root for Naturalness.
    vlm_model: judge model name.
    vlm_api_key: bearer token (read from the environment by default).
    dtype: parameter dtype of the JAX CLIP ("float32" or "bfloat16").
    chunk_frames: frames per chunk of the per-chunk curves.
  """

  clip_model: str | None = None
  aesthetic_head: str | None = None
  upstream_eval: str | None = None
  amt_ckpt: str | None = None
  amt_config: str | None = None
  viclip_dir: str | None = None
  vlm_base_url: str | None = None
  vlm_model: str | None = None
  vlm_api_key: str | None = None
  dtype: str = "float32"
  chunk_frames: int = CHUNK_FRAMES

  def resolved(self, environ: Mapping[str, str] | None = None) -> "ScorerOptions":
    """Fills unset fields from the HELIOS_BENCH_* environment variables."""
    environ = os.environ if environ is None else environ
    values = {k: getattr(self, k) or environ.get(v) or None for k, v in ENV.items()}
    return dataclasses.replace(self, **values)


def _missing(**paths: str | None) -> str | None:
  for name, p in paths.items():
    if not p:
      return f"{name} not given (flag --{name.replace('_', '-')} or env {ENV[name]})"
    if not os.path.exists(p):
      return f"{name} path does not exist: {p}"
  return None


# ------------------------------------------------------------------------------------------
# Metric families.


class Family:
  """A group of result keys computed from one pass over a video.

  Subclasses set `name`, `outputs`, `decoder` ("vrr", "cv2" or "none"), and implement
  `unavailable`, `setup`, `new`.
  """

  name = ""
  outputs: tuple[str, ...] = ()
  decoder = "vrr"
  needs_prompt = False

  def unavailable(self, opts: ScorerOptions) -> str | None:
    """Why this family cannot run with `opts` (None when it can)."""
    del opts
    return None

  def setup(self, opts: ScorerOptions) -> None:
    """Loads models once per run."""

  def new(self, entry: naming.VideoEntry, prompt: str | None, expected_frames: int):
    """An accumulator with `update(frame)`, `result(key) -> dict`, `curves() -> dict`."""
    raise NotImplementedError

  def top_keys(self, key: str) -> dict[str, Any]:
    del key
    return {}


class _ScoreAcc:
  """Adapts one metric accumulator (`update`, `score`, `drift`, `chunk_curve`) to the runner.

  The family's first output key is the score (`RESULT_SPECS[key].value_key`), the second its
  drift entry; `extra` fields (e.g. the prompt) join every result, and the per-chunk curve is
  reported under the score key when `chunk` is given.
  """

  def __init__(self, metric, outputs: Sequence[str], chunk: int | None = None,
               extra: dict[str, Any] | None = None):
    self.metric, self.score_key, self.chunk = metric, outputs[0], chunk
    self.extra = dict(extra or {})

  def update(self, frame):
    self.metric.update(frame)

  def result(self, key):
    if key == self.score_key:
      return {**self.extra, res.RESULT_SPECS[key].value_key: self.metric.score()}
    return {**self.extra, **res.drift_values(res.RESULT_SPECS[key], *self.metric.drift())}

  def curves(self):
    if self.chunk is None:
      return {}
    return {self.score_key: self.metric.chunk_curve(self.chunk)}


class MotionFamily(Family):
  name = "motion_amplitude"
  outputs = ("motion_amplitude", "drifting_motion_amplitude")

  def setup(self, opts):
    self.chunk = opts.chunk_frames

  def new(self, entry, prompt, expected_frames):
    return _ScoreAcc(motion_lib.MotionAmplitude(), self.outputs, self.chunk)


class _ColorAcc:

  def __init__(self, chunk):
    self.c, self.chunk = proxies.ColorStats(), chunk

  def update(self, frame):
    self.c.update(frame)

  def result(self, key):
    return self.c.drift()

  def curves(self):
    return self.c.chunk_curves(self.chunk)


class ColorProxyFamily(Family):
  name = "proxy_color"
  outputs = ("proxy_color_drift",)

  def setup(self, opts):
    self.chunk = opts.chunk_frames

  def new(self, entry, prompt, expected_frames):
    return _ColorAcc(self.chunk)


class SsimProxyFamily(Family):
  name = "proxy_ssim"
  outputs = ("proxy_temporal_ssim", "proxy_drifting_temporal_ssim")

  def setup(self, opts):
    self.chunk = opts.chunk_frames

  def new(self, entry, prompt, expected_frames):
    return _ScoreAcc(proxies.TemporalSSIM(), self.outputs, self.chunk)


class AestheticFamily(Family):
  name = "aesthetic"
  outputs = ("aesthetic", "drifting_aesthetic")

  def unavailable(self, opts):
    return _missing(clip_model=opts.clip_model, aesthetic_head=opts.aesthetic_head)

  def setup(self, opts):
    from helios_jax.heliosbench import aesthetic  # pylint: disable=g-import-not-at-top
    self.scorer = aesthetic.AestheticScorer(opts.clip_model, opts.aesthetic_head, opts.dtype)
    self.chunk = opts.chunk_frames

  def new(self, entry, prompt, expected_frames):
    from helios_jax.heliosbench import aesthetic  # pylint: disable=g-import-not-at-top
    return _ScoreAcc(aesthetic.AestheticAccumulator(self.scorer), self.outputs, self.chunk)


class SmoothnessFamily(Family):
  """AMT-S motion smoothness (upstream PyTorch network, user-provided code + weights)."""

  name = "motion_smoothness"
  outputs = ("motion_smoothness", "drifting_motion_smoothness")
  decoder = "cv2"

  def unavailable(self, opts):
    return _missing(upstream_eval=opts.upstream_eval, amt_ckpt=opts.amt_ckpt)

  def setup(self, opts):
    from helios_jax.heliosbench import smoothness  # pylint: disable=g-import-not-at-top
    self.interp = smoothness.AmtInterpolator(opts.upstream_eval, opts.amt_ckpt, opts.amt_config)

  def new(self, entry, prompt, expected_frames):
    from helios_jax.heliosbench import smoothness  # pylint: disable=g-import-not-at-top
    return _ScoreAcc(smoothness.SmoothnessAccumulator(self.interp, expected_frames), self.outputs)


class BlendSmoothnessFamily(SmoothnessFamily):
  """PROXY: the smoothness protocol with a linear-blend interpolator (no model)."""

  name = "proxy_blend_smoothness"
  outputs = ("proxy_blend_smoothness", "proxy_drifting_blend_smoothness")

  def unavailable(self, opts):
    return None

  def setup(self, opts):
    from helios_jax.heliosbench import smoothness  # pylint: disable=g-import-not-at-top
    self.interp = smoothness.BlendInterpolator()


class SemanticFamily(Family):
  name = "semantic"
  outputs = ("semantic", "drifting_semantic")
  needs_prompt = True

  def unavailable(self, opts):
    return _missing(upstream_eval=opts.upstream_eval, viclip_dir=opts.viclip_dir)

  def setup(self, opts):
    from helios_jax.heliosbench import semantic  # pylint: disable=g-import-not-at-top
    self.scorer = semantic.ViClipScorer(opts.upstream_eval, opts.viclip_dir)

  def new(self, entry, prompt, expected_frames):
    if prompt is None:
      raise ValueError(f"no prompt for id {entry.name.id}")
    from helios_jax.heliosbench import semantic  # pylint: disable=g-import-not-at-top
    return _ScoreAcc(semantic.SemanticAccumulator(self.scorer, prompt, expected_frames),
                     self.outputs, extra={"prompt": prompt})


class _NaturalAcc:

  def __init__(self, judge, path):
    self.judge, self.path = judge, path

  def update(self, frame):
    del frame

  def result(self, key):
    if key == "naturalness":
      score, raw = self.judge.score_video(self.path)
      return {"naturalness_score": score, "raw_score": raw}
    s, s_raw = self.judge.score_portion(self.path, "start")
    e, e_raw = self.judge.score_portion(self.path, "end")
    d, s, e = drift_lib.drift_entry(s, e)
    return {"drift_naturalness_score": d, "start_naturalness_score": s,
            "end_naturalness_score": e, "start_raw_score": s_raw, "end_raw_score": e_raw}

  def curves(self):
    return {}


class NaturalnessFamily(Family):
  """VLM judge behind an OpenAI-compatible endpoint."""

  name = "naturalness"
  outputs = ("naturalness", "drifting_naturalness")
  decoder = "none"

  def __init__(self, transport: Callable | None = None):
    self.transport = transport

  def unavailable(self, opts):
    if not opts.vlm_base_url:
      return (f"vlm_base_url not given (flag --vlm-base-url or env {ENV['vlm_base_url']}); "
              "Naturalness needs an OpenAI-compatible VLM endpoint")
    return None

  def setup(self, opts):
    from helios_jax.heliosbench import naturalness  # pylint: disable=g-import-not-at-top
    self.model = opts.vlm_model or naturalness.DEFAULT_MODEL
    self.judge = naturalness.VlmJudge(opts.vlm_base_url, opts.vlm_api_key or "", self.model,
                                      transport=self.transport)

  def new(self, entry, prompt, expected_frames):
    return _NaturalAcc(self.judge, entry.path)

  def top_keys(self, key):
    out = {"model_name": self.model}
    if key == "naturalness":
      out["num_frames_per_video"] = 16
    return out


def all_families(vlm_transport: Callable | None = None) -> list[Family]:
  return [AestheticFamily(), MotionFamily(), SmoothnessFamily(), SemanticFamily(),
          NaturalnessFamily(vlm_transport), ColorProxyFamily(), SsimProxyFamily(),
          BlendSmoothnessFamily()]


UPSTREAM_KEYS = ("aesthetic", "motion_amplitude", "motion_smoothness", "semantic", "naturalness",
                 "drifting_aesthetic", "drifting_motion_smoothness", "drifting_semantic",
                 "drifting_naturalness")
GROUPS = {
    "all": tuple(res.RESULT_SPECS),
    "upstream": UPSTREAM_KEYS,
    "model_free": ("motion_amplitude", "drifting_motion_amplitude", "proxy_color_drift",
                   "proxy_temporal_ssim", "proxy_drifting_temporal_ssim",
                   "proxy_blend_smoothness", "proxy_drifting_blend_smoothness"),
    "proxies": tuple(k for k, s in res.RESULT_SPECS.items() if s.proxy),
}


def select_metrics(names: Sequence[str]) -> list[str]:
  """Expands metric keys and group names ("all", "upstream", "model_free", "proxies")."""
  out = []
  for n in names:
    for part in str(n).split(","):
      part = part.strip()
      if not part:
        continue
      if part in GROUPS:
        keys = GROUPS[part]
      elif part in res.RESULT_SPECS:
        keys = (part,)
      else:
        raise ValueError(f"unknown metric {part!r}; known metrics {sorted(res.RESULT_SPECS)} "
                         f"and groups {sorted(GROUPS)}")
      out += [k for k in keys if k not in out]
  return out


# ------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class RunSummary:
  """What `run_metrics` did."""

  written: dict[str, str]
  averages: dict[str, float]
  skipped: dict[str, str]
  failed: dict[str, list[dict]]
  ignored_videos: list[tuple[str, str]]


def _error_text(entry: naming.VideoEntry, e: BaseException) -> str:
  msg = str(e) or type(e).__name__
  return msg if entry.video_name in msg else f"{entry.video_name}: {msg}"


def run_metrics(video_dir: str, out_dir: str, metrics: Sequence[str] = ("all",),
                opts: ScorerOptions | None = None, *, prompts_csv: str | None = None,
                families: Sequence[Family] | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> RunSummary:
  """Scores every `{id}_{duration}_ori{frames}.mp4` of `video_dir`.

  Args:
    video_dir: one model's videos.
    out_dir: results folder (created); existing per-video results are reused by id.
    metrics: metric keys and/or groups (see `select_metrics`).
    opts: scorer paths; unset fields come from HELIOS_BENCH_* env vars.
    prompts_csv: prompt CSV; videos whose id is not in it are skipped (upstream). Defaults to
      the repository copy of `helios_t2v_prompts.csv`.
    families: metric implementations (tests inject fakes).
    progress: show a tqdm bar over videos.
    log: printer for warnings and the skip list.

  Returns:
    A `RunSummary`.
  """
  opts = (opts or ScorerOptions()).resolved()
  keys = select_metrics(metrics)
  families = list(families) if families is not None else all_families()
  prompts = naming.load_prompts(prompts_csv or naming.DEFAULT_PROMPTS_CSV)
  entries, bad_names = naming.list_videos(video_dir)
  ignored = list(bad_names)
  usable = []
  for e in entries:
    if e.name.id not in prompts:
      ignored.append((e.video_name, f"id {e.name.id} not in the prompt CSV"))
      log(f"Warning: video {e.video_name} (id={e.name.id}) not found in CSV, skipping")
    else:
      usable.append(e)
  for name, why in bad_names:
    log(f"Warning: {name}: {why}, skipping")
  os.makedirs(out_dir, exist_ok=True)

  active: list[tuple[Family, tuple[str, ...]]] = []
  skipped: dict[str, str] = {}
  for fam in families:
    wanted = tuple(k for k in fam.outputs if k in keys)
    if not wanted:
      continue
    reason = fam.unavailable(opts)
    if reason is None:
      try:
        fam.setup(opts)
      except Exception as e:  # pylint: disable=broad-except
        reason = f"failed to load: {e}"
    if reason is not None:
      for k in wanted:
        skipped[k] = reason
        log(f"Skipping {k}: {reason}")
      continue
    active.append((fam, wanted))

  existing = {k: res.load_existing(out_dir, res.RESULT_SPECS[k])
              for _, ks in active for k in ks}
  per_key: dict[str, dict[int, dict]] = {k: {} for _, ks in active for k in ks}
  failed: dict[str, list[dict]] = {k: [] for k in per_key}
  curves_path = os.path.join(out_dir, res.CHUNKS_FILE)
  curves = res.read_json(curves_path) if os.path.isfile(curves_path) else {}
  curve_data: dict[str, dict[str, list]] = curves.get("curves", {})
  if curves.get("chunk_frames", opts.chunk_frames) != opts.chunk_frames:
    curve_data = {}

  iterator = usable
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    iterator = tqdm(usable, desc="HeliosBench metrics", unit="video")
  for entry in iterator:
    vid = entry.name.id
    todo = []
    for fam, ks in active:
      for k in ks:
        if vid in existing[k]:
          per_key[k][vid] = existing[k][vid]
      if any(vid not in existing[k] for k in ks):
        todo.append((fam, ks))
    if not todo:
      continue
    _score_video(entry, prompts[vid].prompt, todo, per_key, failed, curve_data)

  written, averages = {}, {}
  for fam, ks in active:
    for k in ks:
      spec = res.RESULT_SPECS[k]
      path = res.write_results(out_dir, spec, per_key[k].values(), failed[k], fam.top_keys(k))
      if path:
        written[k] = path
        vals = [e[spec.value_key] for e in per_key[k].values()]
        averages[k] = sum(vals) / len(vals)
  res.write_json(curves_path, {"chunk_frames": opts.chunk_frames, "curves": curve_data})
  skip_path = os.path.join(out_dir, res.SKIPPED_FILE)
  old_skips = res.read_json(skip_path) if os.path.isfile(skip_path) else {}
  old_skips = {k: v for k, v in old_skips.items() if k not in written}
  old_skips.update(skipped)
  res.write_json(skip_path, old_skips)
  res.write_json(os.path.join(out_dir, res.FAILED_FILE),
                 {k: v for k, v in failed.items() if v})
  return RunSummary(written, averages, skipped, {k: v for k, v in failed.items() if v}, ignored)


def _score_video(entry, prompt, todo, per_key, failed, curve_data) -> None:
  """Decodes one video once per decoder and fills `per_key` / `failed`."""
  vid = entry.name.id

  def fail(ks, e):
    for k in ks:
      failed[k].append({"id": vid, "video_name": entry.video_name,
                        "error": _error_text(entry, e)})

  try:
    expected = video_io.count_frames(entry.path)
    if expected < 1:
      raise video_io.VideoReadError(f"{entry.path}: video has no frames")
  except Exception as e:  # pylint: disable=broad-except
    fail([k for _, ks in todo for k in ks], e)
    return

  accs = []
  for fam, ks in todo:
    try:
      accs.append((fam, ks, fam.new(entry, prompt, expected)))
    except Exception as e:  # pylint: disable=broad-except
      fail(ks, e)
  for decoder, frames_fn in (("vrr", video_io.iter_frames), ("cv2", video_io.iter_frames_cv2)):
    group = [a for a in accs if a[0].decoder == decoder]
    if not group:
      continue
    try:
      n = 0
      for frame in frames_fn(entry.path):
        for a in list(group):
          try:
            a[2].update(frame)
          except Exception as e:  # pylint: disable=broad-except
            fail(a[1], ValueError(f"frame {n}: {e}"))
            group.remove(a)
            accs.remove(a)
        n += 1
      if n == 0:
        raise video_io.VideoReadError(f"{entry.path}: video has no decodable frames")
    except Exception as e:  # pylint: disable=broad-except
      for a in group:
        fail(a[1], e)
        accs.remove(a)
  for fam, ks, acc in accs:
    for k in ks:
      try:
        values = acc.result(k)
      except Exception as e:  # pylint: disable=broad-except
        fail([k], e)
        continue
      per_key[k][vid] = {"id": vid, "video_name": entry.video_name, **values}
    try:
      for name, curve in acc.curves().items():
        curve_data.setdefault(name, {})[entry.video_name] = curve
    except ValueError:
      pass  # No frame for a curve: the metric's own entry already records the failure.
