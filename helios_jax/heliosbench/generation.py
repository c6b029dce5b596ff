"""HeliosBench generation: the prompt CSV through a Helios pipeline into upstream-named mp4s.

  summary = run_generate(GenerateOptions(model_dir="Helios-Distilled", out="videos/helios"))
  summary.timings["fps"]        # end-to-end FPS, the input of the Throughput Score

One video per CSV row (filtered by `ids` / `durations`), generated with `Pipeline.generate` at
`num_frames = duration` (or `min(duration, max_frames)`), so `frames` in the file name is what the
pipeline writes: `output_frames(ceil(n / 33))` = 1 + 4k frames (120 -> 129, 240 -> 261,
720 -> 725, 1440 -> 1449).
Each video gets the seed `seed + id`, so any subset, order or resumed run reproduces the same
videos. The run is resumable: a video whose file already exists is skipped, and files are
written to a temporary name and renamed (`media.write_video`), so a killed run never leaves a
half-written `*_ori*.mp4`. The output folder also holds

  generation_settings.json   the settings that determine the videos; a resumed run must match
  generation_log.jsonl       one JSON line per generated video (times, frames, seed, device)
  timings.json               summary of the log: end-to-end FPS and Throughput Score

End-to-end FPS follows the HeliosBench protocol (benchmark.md §1.5): frames / wall seconds of the
whole generation (prompt encoding + DiT chunks + VAE decode, not the mp4 encoding), with the
programs compiled beforehand by a warm-up generation (videos generated without warm-up are
marked cold and left out of the FPS when warm ones exist). `merge --fps-from DIR` reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

from helios_jax import sampling
from helios_jax import variants
from helios_jax.constants import CHUNK_FRAMES
from helios_jax.heliosbench import naming
from helios_jax.heliosbench import results as res

SETTINGS_FILE = "generation_settings.json"
LOG_FILE = "generation_log.jsonl"
TIMINGS_FILE = "timings.json"
LOCK_FILE = ".heliosbench-generate.lock"
TMP_GLOB = ".tmp-*.mp4"  # `media.write_video`'s temporary files

TINY_MODELS = tuple(variants.VARIANTS)
PROTOCOL_SIZE = (384, 640)  # benchmark.md §1.5: throughput is measured at 384x640

# Settings that change the generated pixels: a resumed run must use the same values.
COMPARED_SETTINGS = ("model", "height", "width", "dtype", "steps", "guidance_scale",
                     "amplify_first_chunk", "seed", "negative_prompt", "max_frames", "video_fps")


@dataclasses.dataclass
class GenerateOptions:
  """What `run_generate` generates, and how.

  Attributes:
    out: output folder (created).
    model_dir: pipeline folder (diffusers layout or our Orbax export); None runs the embedded
      tiny random preset (`presets.write_tiny_pipeline` into a temporary folder).
    prompts_csv: prompt CSV with columns id, prompt, duration.
    ids: prompt ids to generate (None: all).
    durations: duration buckets to generate (None: all), e.g. (120, 240).
    max_frames: cap on the frames generated per prompt (quick runs); the file name keeps the
      CSV duration and records the frames actually written.
    height, width: pixels (None: 384x640, or 128x128 for the tiny preset).
    steps: Base steps or steps per pyramid stage (None: the checkpoint's default).
    guidance_scale: CFG scale (None: 5.0, distilled 1.0).
    amplify_first_chunk: DMD first-chunk step doubling (None: on for DMD checkpoints).
    seed: base seed; video `id` uses `seed + id`.
    negative_prompt: None uses `pipeline.DEFAULT_NEGATIVE_PROMPT` (the official scripts').
    dtype: "bfloat16" or "float32" transformer / text-encoder dtype (None: bfloat16, float32
      for the tiny preset).
    tiny_model: which tiny preset runs without `model_dir` ("base", "mid", "distilled").
    video_fps: frame rate written into the mp4 files.
    warmup: compile every program with a throwaway generation before the timed videos.
    text_encoder_on_cpu: run umT5 on the host CPU (saves accelerator memory).
    release_text_encoder: free umT5 after each prompt encoding (reloaded from disk).
    progress: tqdm bar over the videos.
  """

  out: str
  model_dir: str | None = None
  prompts_csv: str = naming.DEFAULT_PROMPTS_CSV
  ids: Sequence[int] | None = None
  durations: Sequence[int] | None = None
  max_frames: int | None = None
  height: int | None = None
  width: int | None = None
  steps: Sequence[int] | None = None
  guidance_scale: float | None = None
  amplify_first_chunk: bool | None = None
  seed: int = 42
  negative_prompt: str | None = None
  dtype: str | None = None
  tiny_model: str = variants.DEFAULT_VARIANT
  video_fps: int = 24
  warmup: bool = True
  text_encoder_on_cpu: bool = False
  release_text_encoder: bool = False
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class VideoJob:
  """One video of the run: its prompt row, frames requested, file name and seed."""

  row: naming.PromptRow
  num_frames: int
  frames: int
  seed: int

  @property
  def video_name(self) -> str:
    return naming.format_video_name(self.row.id, self.row.duration, self.frames)


@dataclasses.dataclass
class GenerateSummary:
  """What `run_generate` did: files generated / found, and the `timings.json` content."""

  out: str
  written: list[str]
  skipped: list[str]
  timings: dict[str, Any]


# ------------------------------------------------------------------------------------------
# Pure helpers.


def frames_written(num_frames: int) -> int:
  """Frames the pipeline writes for `num_frames` requested: 1 + 4k of ceil(n / 33) chunks."""
  if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
    raise ValueError(f"num_frames={num_frames!r} must be an integer >= 1")
  return sampling.output_frames(sampling.num_chunks(num_frames))


def parse_ids(tokens: Sequence[str | int] | None) -> list[int] | None:
  """Parses id tokens: ints, comma lists and inclusive ranges ("1-10,15" -> 1..10, 15)."""
  if tokens is None:
    return None
  out: list[int] = []
  for token in tokens:
    for part in str(token).split(","):
      part = part.strip()
      if not part:
        continue
      try:
        if "-" in part[1:]:
          i = part.index("-", 1)
          lo, hi = int(part[:i]), int(part[i + 1:])
          if hi < lo:
            raise ValueError(f"id range {part!r} is empty")
          out += [v for v in range(lo, hi + 1) if v not in out]
        else:
          v = int(part)
          if v not in out:
            out.append(v)
      except ValueError as e:
        raise ValueError(f"bad id {part!r} in --ids ({e})") from None
  return out


def select_jobs(prompts: dict[int, naming.PromptRow], ids: Sequence[int] | None = None,
                durations: Sequence[int] | None = None, max_frames: int | None = None,
                seed: int = 42, csv_path: str = "the prompt CSV") -> list[VideoJob]:
  """The videos of a run, sorted by id.

  Args:
    prompts: {id: PromptRow} from `naming.load_prompts`.
    ids: ids to keep (None: all); every id must be in `prompts`.
    durations: duration buckets to keep (None: all); every value must occur in `prompts`.
    max_frames: cap on the requested frames (None: the CSV duration).
    seed: base seed (video seed = seed + id).
    csv_path: CSV name for error messages.

  Returns:
    One `VideoJob` per selected row.

  Raises:
    ValueError: unknown ids or durations, a bad `max_frames`, or an empty selection.
  """
  if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                 or max_frames < 1):
    raise ValueError(f"max_frames={max_frames!r} must be an integer >= 1")
  rows = sorted(prompts.values(), key=lambda r: r.id)
  if ids is not None:
    unknown = [i for i in ids if i not in prompts]
    if unknown:
      have = f"{rows[0].id}..{rows[-1].id}" if rows else "none"
      raise ValueError(f"unknown prompt id(s) {unknown}: {csv_path} has ids {have}")
    wanted = set(ids)
    rows = [r for r in rows if r.id in wanted]
  if durations is not None:
    available = sorted({r.duration for r in prompts.values()})
    bad = [d for d in durations if d not in available]
    if bad:
      raise ValueError(f"duration(s) {bad} not in {csv_path}; available durations {available}")
    rows = [r for r in rows if r.duration in set(durations)]
  if not rows:
    raise ValueError(f"no prompt of {csv_path} matches ids={list(ids) if ids else None} "
                     f"durations={list(durations) if durations else None}")
  jobs = []
  for r in rows:
    n = r.duration if max_frames is None else min(r.duration, max_frames)
    jobs.append(VideoJob(row=r, num_frames=n, frames=frames_written(n), seed=seed + r.id))
  return jobs


def read_log(out_dir: str) -> list[dict[str, Any]]:
  """Records of `generation_log.jsonl` (a line cut short by a killed run is ignored)."""
  path = os.path.join(out_dir, LOG_FILE)
  if not os.path.isfile(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and "video_name" in rec and "seconds" in rec:
        records.append(rec)
  return records


def summarize(records: Sequence[dict[str, Any]], out_dir: str | None = None) -> dict[str, Any]:
  """The `timings.json` content of a run's log records.

  The latest record of each video counts (a regenerated video replaces its old timing); when
  `out_dir` is given, records of videos no longer in it are dropped. `fps` is
  sum(frames) / sum(seconds) over warm videos (compiled programs), or over all videos with
  `includes_compilation: true` when none is warm.
  """
  from helios_jax.heliosbench import merge as merge_lib  # pylint: disable=g-import-not-at-top
  latest: dict[str, dict[str, Any]] = {}
  for rec in records:
    latest[rec["video_name"]] = rec
  if out_dir is not None:
    latest = {k: v for k, v in latest.items() if os.path.isfile(os.path.join(out_dir, k))}
  recs = sorted(latest.values(), key=lambda r: (r.get("id", 0), r["video_name"]))
  warm = [r for r in recs if r.get("warm")]
  used = warm or recs

  def fps(rs):
    secs = sum(r["seconds"] for r in rs)
    return sum(r["frames"] for r in rs) / secs if rs and secs > 0 else None

  value = fps(used)
  sizes = sorted({(r.get("height"), r.get("width")) for r in recs}, key=str)
  out = {
      "protocol": "end-to-end FPS = frames / wall seconds of the generation (prompt encoding + "
                  "DiT + VAE decode; mp4 encoding excluded), compiled programs (warm videos)",
      "fps": value,
      "throughput_score": None if value is None else merge_lib.throughput_score(value),
      "includes_compilation": bool(recs) and not warm,
      "num_videos": len(recs),
      "num_warm_videos": len(warm),
      "frames": sum(r["frames"] for r in used),
      "seconds": sum(r["seconds"] for r in used),
      "fps_all_videos": fps(recs),
      "dit_seconds": sum(r.get("dit_seconds", 0.0) for r in used),
      "decode_seconds": sum(r.get("decode_seconds", 0.0) for r in used),
      "sizes": [list(s) for s in sizes],
      "devices": sorted({str(r.get("device")) for r in recs}),
      "videos": {r["video_name"]: {"seconds": r["seconds"], "fps": r["fps"],
                                   "warm": bool(r.get("warm"))} for r in recs},
  }
  if recs and sizes != [PROTOCOL_SIZE]:
    out["note"] = (f"generated at {sizes}, not the protocol's {PROTOCOL_SIZE[0]}x"
                   f"{PROTOCOL_SIZE[1]}: the FPS is not comparable with published figures")
  return out


def read_timings(path: str | os.PathLike) -> dict[str, Any]:
  """`timings.json` of a generation folder (or the file itself), checked to hold an FPS.

  Raises:
    FileNotFoundError: no timings file.
    ValueError: the file holds no FPS (no video was timed) or does not parse.
  """
  path = os.fspath(path)
  file = os.path.join(path, TIMINGS_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {TIMINGS_FILE} at {path} (written by `heliosbench generate`)")
  try:
    data = res.read_json(file)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"unreadable timings file {file}: {e}") from e
  fps = data.get("fps") if isinstance(data, dict) else None
  if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps):
    raise ValueError(f"{file} has no end-to-end FPS (fps={fps!r}); generate at least one video")
  return data


def read_fps(path: str | os.PathLike) -> float:
  """End-to-end FPS from a generation folder or its `timings.json` (see `read_timings`)."""
  return float(read_timings(path)["fps"])


# ------------------------------------------------------------------------------------------
# Run folder bookkeeping.


class FolderBusyError(RuntimeError):
  """Another `heliosbench generate` process holds the output folder."""


@contextlib.contextmanager
def _locked(out_dir: str) -> Iterator[None]:
  """Exclusive lock on the output folder (released by the OS even when the process is killed)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out_dir, LOCK_FILE), "a+") as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise FolderBusyError(f"another `heliosbench generate` is writing to {out_dir}") from None
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_settings(out_dir: str, settings: dict[str, Any]) -> bool:
  """Checks a resumed run against `generation_settings.json`; False when there is none yet."""
  path = os.path.join(out_dir, SETTINGS_FILE)
  if not os.path.isfile(path):
    return False
  try:
    old = res.read_json(path)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"unreadable {path}: {e}; delete it to start over") from e
  diff = [f"{k}={old.get(k)!r} (now {settings.get(k)!r})" for k in COMPARED_SETTINGS
          if json.loads(json.dumps(old.get(k))) != json.loads(json.dumps(settings.get(k)))]
  if diff:
    raise ValueError(f"{out_dir} holds videos generated with other settings: "
                     f"{', '.join(diff)}; use another --out folder (or delete {SETTINGS_FILE} "
                     "and the videos)")
  return True


def _check_foreign(out_dir: str, jobs: Sequence[VideoJob]) -> None:
  """A video of a selected id under another name means other settings: refuse to mix them."""
  entries, _ = naming.list_videos(out_dir)
  expected = {j.row.id: j.video_name for j in jobs}
  for e in entries:
    want = expected.get(e.name.id)
    if want is not None and e.video_name != want:
      raise ValueError(f"{out_dir} already holds {e.video_name} for prompt id {e.name.id}, but "
                       f"this run writes {want} (different duration or frame settings); use "
                       "another --out folder or delete that file")


def _append_log(out_dir: str, record: dict[str, Any]) -> None:
  """Appends one JSON line (after a newline if a killed run left a line cut short)."""
  path = os.path.join(out_dir, LOG_FILE)
  sep = ""
  if os.path.isfile(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      sep = "" if f.read(1) == b"\n" else "\n"
  with open(path, "a", encoding="utf-8") as f:
    f.write(sep + json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _write_timings(out_dir: str) -> dict[str, Any]:
  timings = summarize(read_log(out_dir), out_dir)
  res.write_json(os.path.join(out_dir, TIMINGS_FILE), timings)
  return timings


# ------------------------------------------------------------------------------------------
# The run.


@contextlib.contextmanager
def _model_folder(opts: GenerateOptions, log: Callable[[str], None]) -> Iterator[str]:
  """The pipeline folder: `model_dir`, or the tiny preset written to a temporary folder."""
  if opts.model_dir is not None:
    if not os.path.isdir(opts.model_dir):
      raise FileNotFoundError(f"model folder not found: {opts.model_dir}")
    yield opts.model_dir
    return
  from helios_jax import presets  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="helios-tiny-") as tmp:
    path = os.path.join(tmp, f"tiny-{opts.tiny_model}")
    log(f"building the embedded tiny '{opts.tiny_model}' pipeline (random weights) in {path}")
    presets.write_tiny_pipeline(path, opts.tiny_model, seed=0)
    yield path


def _load_pipeline(path: str, dtype: str, opts: GenerateOptions):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from helios_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from helios_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  try:
    return Pipeline.from_pretrained(
        path, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
        text_encoder_device=jax.devices("cpu")[0] if opts.text_encoder_on_cpu else None,
        release_text_encoder=opts.release_text_encoder)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, CheckpointError) and path in str(e):
      raise
    raise CheckpointError(f"unreadable model folder {path}: {type(e).__name__}: {e}") from e


def _device_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def run_generate(opts: GenerateOptions, *,
                 after_video: Callable[[dict[str, Any]], None] | None = None,
                 log: Callable[[str], None] = print) -> GenerateSummary:
  """Generates the selected HeliosBench videos into `opts.out` (resumable).

  Args:
    opts: what to generate (see `GenerateOptions`).
    after_video: called with each video's log record once its file and record are written.
    log: printer for progress lines.

  Returns:
    A `GenerateSummary` (names written now, names already present, `timings.json` content).

  Raises:
    FileNotFoundError: missing prompt CSV or model folder.
    ValueError: unknown ids / durations, bad sizes or steps, an unreadable model folder
      (`CheckpointError`), or an output folder generated with other settings.
    FolderBusyError: another run holds the output folder.
  """
  if opts.tiny_model not in TINY_MODELS:
    raise ValueError(f"tiny_model={opts.tiny_model!r} must be one of {TINY_MODELS}")
  if opts.dtype not in (None, "bfloat16", "float32"):
    raise ValueError(f"dtype={opts.dtype!r} must be 'bfloat16' or 'float32'")
  if isinstance(opts.video_fps, bool) or not isinstance(opts.video_fps, int) or \
      opts.video_fps < 1:
    raise ValueError(f"video_fps={opts.video_fps!r} must be an integer >= 1")
  prompts = naming.load_prompts(opts.prompts_csv)
  jobs = select_jobs(prompts, opts.ids, opts.durations, opts.max_frames, opts.seed,
                     opts.prompts_csv)
  tiny = opts.model_dir is None
  default_size = variants.get_size("tiny").resolution if tiny else PROTOCOL_SIZE
  height = opts.height or default_size[0]
  width = opts.width or default_size[1]
  dtype = opts.dtype or ("float32" if tiny else "bfloat16")
  from helios_jax.pipeline import DEFAULT_NEGATIVE_PROMPT  # pylint: disable=g-import-not-at-top
  negative = DEFAULT_NEGATIVE_PROMPT if opts.negative_prompt is None else opts.negative_prompt
  settings = {
      "model": f"tiny:{opts.tiny_model}" if tiny else os.path.abspath(opts.model_dir),
      "height": height, "width": width, "dtype": dtype,
      "steps": None if opts.steps is None else [int(s) for s in opts.steps],
      "guidance_scale": opts.guidance_scale, "amplify_first_chunk": opts.amplify_first_chunk,
      "seed": opts.seed, "negative_prompt": negative, "max_frames": opts.max_frames,
      "video_fps": opts.video_fps, "prompts_csv": os.path.abspath(opts.prompts_csv),
      "seed_rule": "seed + id",
  }
  for name, v in (("height", height), ("width", width)):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16:
      raise ValueError(f"{name}={v!r} must be a positive multiple of 16")
  if opts.model_dir is not None and not os.path.isdir(opts.model_dir):
    raise FileNotFoundError(f"model folder not found: {opts.model_dir}")
  out_dir = os.path.abspath(opts.out)
  os.makedirs(out_dir, exist_ok=True)
  with _locked(out_dir):
    have_settings = _check_settings(out_dir, settings)
    _check_foreign(out_dir, jobs)
    for stale in glob.glob(os.path.join(out_dir, TMP_GLOB)):
      os.remove(stale)  # half-written videos of a killed run (we hold the folder's lock)
    done = [j for j in jobs if os.path.isfile(os.path.join(out_dir, j.video_name))]
    todo = [j for j in jobs if j not in done]
    log(f"{len(jobs)} videos selected: {len(done)} already in {out_dir}, {len(todo)} to "
        "generate")
    written: list[str] = []
    try:
      if todo:
        with _model_folder(opts, log) as model_path:
          _generate(model_path, dtype, height, width, negative, todo, out_dir, opts,
                    None if have_settings else settings, after_video, log, written)
    finally:
      timings = _write_timings(out_dir)  # also after a failure: the log holds what finished
  if timings["fps"] is not None:
    log(f"end-to-end FPS {timings['fps']:.3f} over {timings['frames']} frames of "
        f"{timings['num_warm_videos'] or timings['num_videos']} "
        f"{'warm' if timings['num_warm_videos'] else 'cold (incl. compilation)'} video(s) -> "
        f"Throughput Score {timings['throughput_score']} ({TIMINGS_FILE})")
  return GenerateSummary(out=out_dir, written=written, skipped=[j.video_name for j in done],
                         timings=timings)


def _generate(model_path: str, dtype: str, height: int, width: int, negative: str,
              todo: Sequence[VideoJob], out_dir: str, opts: GenerateOptions,
              new_settings: dict[str, Any] | None,
              after_video: Callable[[dict[str, Any]], None] | None,
              log: Callable[[str], None], written: list[str]) -> None:
  """Loads the pipeline and generates `todo` in order, appending each name to `written`.

  `new_settings` is written to `generation_settings.json` once the pipeline loaded and the
  sampler settings validated (so a failed start does not pin wrong settings on the folder).
  """
  from helios_jax import media  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  pipe = _load_pipeline(model_path, dtype, opts)
  steps = None if opts.steps is None else [int(s) for s in opts.steps]
  kwargs = dict(height=height, width=width, steps=steps, guidance_scale=opts.guidance_scale,
                amplify_first_chunk=opts.amplify_first_chunk, progress=False)
  pipe.sampler_config(height, width, steps=steps, guidance_scale=opts.guidance_scale,
                      amplify_first_chunk=opts.amplify_first_chunk)  # validates before work
  device = _device_name()
  if new_settings is not None:
    res.write_json(os.path.join(out_dir, SETTINGS_FILE), new_settings)
  log(f"loaded {model_path} in {time.perf_counter() - t0:.1f} s ({device}, {dtype}, "
      f"{height}x{width})")
  compiled = 0  # chunk programs compiled so far: 1 = chunk 0 only, 2 = all
  if opts.warmup:
    # Two chunks compile every program a video uses (chunk 0, chunks >= 1, decode, text).
    n = min(2 * CHUNK_FRAMES, max(j.num_frames for j in todo))
    t0 = time.perf_counter()
    pipe.generate(todo[0].row.prompt, negative, num_frames=n, seed=todo[0].seed, **kwargs)
    log(f"warm-up ({n} frames, compiles the programs): {time.perf_counter() - t0:.1f} s")
    compiled = min(2, sampling.num_chunks(n))
  bar = None
  if opts.progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(todo), desc="HeliosBench generate", unit="video")
    log = bar.write
  try:
    for job in todo:
      t0 = time.perf_counter()
      out = pipe.generate(job.row.prompt, negative, num_frames=job.num_frames, seed=job.seed,
                          **kwargs)
      seconds = time.perf_counter() - t0
      frames = out.frames
      if frames.shape[0] != job.frames:
        raise RuntimeError(f"prompt {job.row.id}: the pipeline returned {frames.shape[0]} "
                           f"frames, expected {job.frames}")
      t1 = time.perf_counter()
      media.write_video(os.path.join(out_dir, job.video_name), frames, fps=opts.video_fps)
      chunks = len(out.chunks)
      warm = 0 < min(2, chunks) <= compiled
      compiled = max(compiled, min(2, chunks))
      dit = sum(c.dit_seconds for c in out.chunks)
      dec = sum(c.decode_seconds for c in out.chunks)
      record = {
          "video_name": job.video_name, "id": job.row.id, "duration": job.row.duration,
          "num_frames": job.num_frames, "frames": job.frames, "chunks": chunks,
          "seed": job.seed, "height": height, "width": width, "seconds": seconds,
          "dit_seconds": dit, "decode_seconds": dec, "other_seconds": seconds - dit - dec,
          "fps": job.frames / seconds, "write_seconds": time.perf_counter() - t1,
          "warm": warm, "device": device,
          "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
      }
      _append_log(out_dir, record)
      written.append(job.video_name)
      _write_timings(out_dir)
      log(f"{job.video_name}: {job.frames} frames in {seconds:.2f} s = {record['fps']:.2f} FPS "
          f"(DiT {dit:.2f} s, decode {dec:.2f} s{'' if record['warm'] else ', incl. compile'})")
      if bar is not None:
        bar.update(1)
        bar.set_postfix(fps=f"{record['fps']:.2f}")
      if after_video is not None:
        after_video(record)
  finally:
    if bar is not None:
      bar.close()
