"""HeliosBench video naming contract `{id}_{duration}_ori{frames}.mp4` and the prompt CSV."""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import os
import re

# The glob every upstream metric script uses to find a model's videos.
VIDEO_GLOB = "*_*_ori*.mp4"
_STRICT = re.compile(r"^(\d+)_(\d+)_ori(\d+)\.mp4$")
_LEADING_ID = re.compile(r"^(\d+)_")

# The upstream prompt set (`eval/playground/helios_t2v_prompts.csv`): in a checkout, a symlink to
# data/helios_bench/helios_t2v_prompts.csv; in an installed wheel, the file itself.
DEFAULT_PROMPTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "helios_t2v_prompts.csv")


class NamingError(ValueError):
  """A file name does not follow `{id}_{duration}_ori{frames}.mp4`."""


@dataclasses.dataclass(frozen=True)
class VideoName:
  """The three integers of a HeliosBench video file name.

  Attributes:
    id: prompt id (the CSV `id` column).
    duration: target frame count of the prompt's bucket (120, 240, 720, 1440), or None when the
      name only carries an id (upstream accepts any `{id}_*_ori*.mp4`).
    frames: actual frame count written after `ori`, or None (see `duration`).
  """

  id: int
  duration: int | None = None
  frames: int | None = None

  @property
  def filename(self) -> str:
    if self.duration is None or self.frames is None:
      raise NamingError(f"VideoName(id={self.id}) has no duration/frames to format")
    return format_video_name(self.id, self.duration, self.frames)


def format_video_name(video_id: int, duration: int, frames: int) -> str:
  """Returns `{id}_{duration}_ori{frames}.mp4`.

  Args:
    video_id: prompt id (>= 0).
    duration: target frame count of the prompt (>= 1).
    frames: number of frames actually written (>= 1).

  Returns:
    The file name, e.g. `format_video_name(2, 240, 264) == "2_240_ori264.mp4"`.
  """
  for name, v in (("video_id", video_id), ("duration", duration), ("frames", frames)):
    if not isinstance(v, (int,)) or isinstance(v, bool):
      raise NamingError(f"{name}={v!r} must be an int")
  if video_id < 0:
    raise NamingError(f"video_id={video_id} must be >= 0")
  if duration < 1 or frames < 1:
    raise NamingError(f"duration={duration} and frames={frames} must be >= 1")
  return f"{video_id}_{duration}_ori{frames}.mp4"


def parse_video_name(name: str, *, strict: bool = True) -> VideoName:
  """Parses a HeliosBench file name (a bare name or a path).

  Args:
    name: file name or path.
    strict: require exactly `{int}_{int}_ori{int}.mp4`. With `strict=False` any name matching
      the upstream glob `*_*_ori*.mp4` whose text before the first `_` is an integer is accepted
      (upstream reads only that id); `duration`/`frames` are filled when they parse.

  Returns:
    The parsed `VideoName`.

  Raises:
    NamingError: the name does not follow the contract; the message names it.
  """
  base = os.path.basename(os.fspath(name))
  m = _STRICT.match(base)
  if m:
    return VideoName(int(m.group(1)), int(m.group(2)), int(m.group(3)))
  if strict:
    raise NamingError(
        f"video file name {base!r} does not match '{{id}}_{{duration}}_ori{{frames}}.mp4'")
  if not fnmatch.fnmatchcase(base, VIDEO_GLOB):
    raise NamingError(f"video file name {base!r} does not match the glob {VIDEO_GLOB!r}")
  m = _LEADING_ID.match(base)
  if not m:
    raise NamingError(f"video file name {base!r} does not start with an integer id")
  return VideoName(int(m.group(1)))


def short_clip_name(name: str, num_frames: int = 81) -> str:
  """Name of the first-`num_frames` cut of a long video (upstream `extract_short_from_long.py`).

  The text after the last `_ori` is replaced by `num_frames`: `2_240_ori264.mp4` ->
  `2_240_ori81.mp4`.
  """
  base = os.path.basename(name)
  if "_ori" not in base:
    raise NamingError(f"video file name {base!r} has no '_ori' field")
  head = base[:base.rindex("_ori")]
  return f"{head}_ori{num_frames}.mp4"


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  """One video of a model folder: its path, file name and parsed name."""

  path: str
  name: VideoName

  @property
  def video_name(self) -> str:
    return os.path.basename(self.path)


def list_videos(video_dir: str | os.PathLike) -> tuple[list[VideoEntry], list[tuple[str, str]]]:
  """Lists a model folder's videos the way the upstream scripts do, sorted by id.

  Args:
    video_dir: folder with `{id}_{duration}_ori{frames}.mp4` files.

  Returns:
    (entries sorted by (id, name), [(file name, reason)] for glob matches whose id is unusable).

  Raises:
    FileNotFoundError: `video_dir` is not a folder.
  """
  video_dir = os.fspath(video_dir)
  if not os.path.isdir(video_dir):
    raise FileNotFoundError(f"video folder not found: {video_dir}")
  entries, bad = [], []
  for base in sorted(os.listdir(video_dir)):
    if not fnmatch.fnmatchcase(base, VIDEO_GLOB):
      continue
    path = os.path.join(video_dir, base)
    if not os.path.isfile(path):
      continue
    try:
      entries.append(VideoEntry(path, parse_video_name(base, strict=False)))
    except NamingError as e:
      bad.append((base, str(e)))
  entries.sort(key=lambda e: (e.name.id, e.video_name))
  return entries, bad


@dataclasses.dataclass(frozen=True)
class PromptRow:
  """One row of `helios_t2v_prompts.csv`."""

  id: int
  prompt: str
  duration: int


def load_prompts(csv_path: str | os.PathLike = DEFAULT_PROMPTS_CSV) -> dict[int, PromptRow]:
  """Reads the HeliosBench prompt CSV (columns `id`, `prompt`, `duration`).

  Args:
    csv_path: path of the CSV.

  Returns:
    {id: PromptRow}.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: a required column is missing or a row does not parse (the row is named).
  """
  csv_path = os.fspath(csv_path)
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"prompt CSV not found: {csv_path}")
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    cols = reader.fieldnames or []
    missing = [c for c in ("id", "prompt", "duration") if c not in cols]
    if missing:
      raise ValueError(f"{csv_path}: missing column(s) {missing}; found {cols}")
    rows = {}
    for line, row in enumerate(reader, start=2):
      try:
        r = PromptRow(int(row["id"]), row["prompt"], int(row["duration"]))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{csv_path}:{line}: bad row {row!r} ({e})") from e
      if r.id in rows:
        raise ValueError(f"{csv_path}:{line}: duplicate id {r.id}")
      rows[r.id] = r
  return rows
