"""Tests of the HeliosBench generation half (`heliosbench generate`, bench.generation)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil

import numpy as np
import pytest

from helios_jax import media
from helios_jax import presets
from helios_jax.heliosbench import generation
from helios_jax.heliosbench import cli as heliosbench
from helios_jax.heliosbench import merge as merge_lib
from helios_jax.heliosbench import naming
from helios_jax.heliosbench import runner
from helios_jax.heliosbench import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(REPO, "data", "helios_bench", "helios_t2v_prompts.csv")

# 64x64 keeps the tiny VAE decode at ~1 s per chunk on a CPU; 33 frames = one chunk per video.
SMALL = ["--height", "64", "--width", "64", "--no-progress"]


@pytest.fixture(autouse=True)
def _no_scorer_env(monkeypatch):
  for name in runner.ENV.values():
    monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """The embedded tiny distilled pipeline, written once for the module."""
  return presets.write_tiny_pipeline(str(tmp_path_factory.mktemp("pipe") / "tiny"), "distilled")


class _Killed(Exception):
  """Stands in for the process dying after the first video."""


def _stat(path):
  st = os.stat(path)
  return st.st_ino, st.st_mtime_ns, st.st_size


def _mp4s(folder):
  return sorted(n for n in os.listdir(folder) if n.endswith(".mp4"))


@pytest.mark.slow
def test_generate_resume_naming_metrics_and_fps(tiny_dir, tmp_path, capsys):
  out = str(tmp_path / "videos")
  # ids 1 and 3 are 1440-frame prompts, filtered out by --durations.
  argv = ["generate", "--model_dir", tiny_dir, "--out", out, "--ids", "1-3,181", "182",
          "--durations", "120", "240", "--max_frames", "33"] + SMALL
  names = ["2_240_ori33.mp4", "181_120_ori33.mp4", "182_120_ori33.mp4"]

  # 1) A run that dies right after its first video is written.
  def die(record):
    raise _Killed(record["video_name"])

  opts = generation.GenerateOptions(
      out=out, model_dir=tiny_dir, ids=[1, 2, 3, 181, 182], durations=[120, 240], max_frames=33,
      height=64, width=64, progress=False)
  with pytest.raises(_Killed, match="2_240_ori33.mp4"):
    generation.run_generate(opts, after_video=die)
  assert _mp4s(out) == ["2_240_ori33.mp4"]
  first = _stat(os.path.join(out, names[0]))
  log = generation.read_log(out)
  assert [r["video_name"] for r in log] == [names[0]] and log[0]["seed"] == 42 + 2
  assert log[0]["warm"] and log[0]["frames"] == 33 and log[0]["chunks"] == 1
  settings = json.loads((tmp_path / "videos" / generation.SETTINGS_FILE).read_text())
  assert (settings["height"], settings["width"], settings["seed"]) == (64, 64, 42)
  # A video half-written by a killed process is left as a temporary file (never *_ori*.mp4).
  (tmp_path / "videos" / ".tmp-killed.mp4").write_bytes(b"\x00" * 100)
  with open(os.path.join(out, generation.LOG_FILE), "a") as f:
    f.write('{"video_name": "181_120_o')  # a log line cut short by the kill

  # 2) The resumed run (CLI) skips the finished video and writes the rest.
  assert heliosbench.main(argv) == 0
  text = capsys.readouterr().out
  assert "1 already in" in text and "generated 2 video(s), 1 already present" in text
  assert _mp4s(out) == sorted(names)
  assert _stat(os.path.join(out, names[0])) == first, "the finished video was regenerated"
  assert not (tmp_path / "videos" / ".tmp-killed.mp4").exists()

  # Naming contract: strict names; duration from the CSV; frames = frames in the file.
  rows = naming.load_prompts(PROMPTS)
  for name in names:
    vn = naming.parse_video_name(name)
    assert vn.duration == rows[vn.id].duration
    assert video_io.count_frames(os.path.join(out, name)) == vn.frames == 33
  frames = media.read_video_frames(os.path.join(out, names[1]))
  assert frames.shape[1:] == (64, 64, 3), frames.shape

  # Timings: one record per video, all warm (warm-up on), FPS = frames / seconds.
  log = generation.read_log(out)
  assert sorted(r["video_name"] for r in log) == sorted(names)
  timings = json.loads((tmp_path / "videos" / generation.TIMINGS_FILE).read_text())
  assert timings["num_videos"] == 3 and timings["num_warm_videos"] == 3
  assert timings["frames"] == 99 and not timings["includes_compilation"]
  assert timings["fps"] == pytest.approx(99 / sum(r["seconds"] for r in log), rel=1e-12)
  assert timings["throughput_score"] == merge_lib.throughput_score(timings["fps"])
  assert "not the protocol's 384x640" in timings["note"]
  assert all(r["dit_seconds"] + r["decode_seconds"] <= r["seconds"] for r in log)

  # 3) Rerunning a finished folder generates nothing.
  assert heliosbench.main(argv) == 0
  assert "generated 0 video(s), 3 already present" in capsys.readouterr().out
  assert _stat(os.path.join(out, names[0])) == first

  # 4) Seeds are per video (seed + id): a run of id 181 alone reproduces its frames.
  solo = str(tmp_path / "solo")
  assert heliosbench.main(["generate", "--model_dir", tiny_dir, "--out", solo, "--ids", "181",
                           "--max_frames", "33", "--no-warmup"] + SMALL) == 0
  np.testing.assert_array_equal(media.read_video_frames(os.path.join(solo, names[1])), frames)
  solo_t = generation.read_timings(solo)
  assert solo_t["includes_compilation"] and solo_t["num_warm_videos"] == 0
  assert generation.read_log(solo)[0]["warm"] is False  # no warm-up: counted as cold
  capsys.readouterr()

  # 5) Other settings on the same folder are refused, naming the difference.
  assert heliosbench.main(argv + ["--seed", "7"]) == 2
  err = capsys.readouterr().err
  assert "seed=42 (now 7)" in err and out in err

  # 6) `metrics` scores the folder; `merge --fps-from` turns the FPS into the score.
  results = str(tmp_path / "results" / "tiny")
  assert heliosbench.main(["metrics", "--videos", out, "--out", results, "--metrics",
                           "motion_amplitude", "proxy_color_drift", "--no-progress"]) == 0
  capsys.readouterr()
  motion = json.loads(open(os.path.join(results, "motion_amplitude_results.json")).read())
  assert motion["num_videos"] == 3
  assert [e["video_name"] for e in motion["per_video_results"]] == names
  assert all(np.isfinite(e["motion_fb"]) and e["motion_fb"] >= 0
             for e in motion["per_video_results"])
  assert heliosbench.main(["merge", "--results", results, "--short", "--fps-from", out,
                           "--no-plots"]) == 0
  assert f"end-to-end FPS {timings['fps']:.3f}" in capsys.readouterr().out
  with open(os.path.join(results, "summary.csv")) as f:
    by = {r["metric"]: r for r in csv.DictReader(f)}
  assert float(by["throughput_score"]["raw_score"]) == pytest.approx(timings["fps"])
  assert int(by["throughput_score"]["rating"]) == timings["throughput_score"]
  assert heliosbench.main(["merge", "--results", results, "--fps", "3", "--fps-from", out,
                           "--no-plots"]) == 2
  assert "not both" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.heavy
def test_default_tiny_preset_two_chunks(tiny_dir, tmp_path, monkeypatch, capsys):
  """Without --model_dir the CLI builds the tiny preset in a temp dir; a 2-chunk video."""
  built = []

  def fake_write(dst, model="distilled", seed=0, **kw):
    del kw
    built.append((os.path.basename(dst), model, seed))
    shutil.copytree(tiny_dir, dst)  # the module's copy: same function, built once
    return dst

  monkeypatch.setattr(presets, "write_tiny_pipeline", fake_write)
  out = tmp_path / "videos"
  assert heliosbench.main(["generate", "--out", str(out), "--ids", "181", "--max_frames", "34"]
                          + SMALL) == 0
  assert built == [("tiny-distilled", "distilled", 0)]
  # 34 frames -> 2 chunks = 66 decoded -> 65 written (1 + 4k), as the name records.
  assert _mp4s(out) == ["181_120_ori65.mp4"]
  assert video_io.count_frames(str(out / "181_120_ori65.mp4")) == 65
  settings = json.loads((out / generation.SETTINGS_FILE).read_text())
  assert settings["model"] == "tiny:distilled" and settings["dtype"] == "float32"
  from helios_jax.pipeline import DEFAULT_NEGATIVE_PROMPT  # pylint: disable=g-import-not-at-top
  assert settings["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
  rec = generation.read_log(str(out))[0]
  assert rec["chunks"] == 2 and rec["warm"] and rec["seed"] == 42 + 181
  assert "Throughput Score" in capsys.readouterr().out


def test_frame_counts_ids_and_selection():
  assert [generation.frames_written(n) for n in (1, 33, 34, 66, 120, 240, 720, 1440)] == [
      33, 33, 65, 65, 129, 261, 725, 1449]
  with pytest.raises(ValueError, match="num_frames=0"):
    generation.frames_written(0)
  assert generation.parse_ids(["1-3,7", "5", "3"]) == [1, 2, 3, 7, 5]
  assert generation.parse_ids(None) is None
  with pytest.raises(ValueError, match="'x'"):
    generation.parse_ids(["x"])
  with pytest.raises(ValueError, match="'5-2'"):
    generation.parse_ids(["5-2"])
  prompts = naming.load_prompts(PROMPTS)
  jobs = generation.select_jobs(prompts, durations=[120], seed=10)
  assert len(jobs) == 60 and {j.row.duration for j in jobs} == {120}
  assert jobs[0].video_name == "181_120_ori129.mp4" and jobs[0].seed == 191
  jobs = generation.select_jobs(prompts, ids=[3, 2], max_frames=99)
  assert [j.video_name for j in jobs] == ["2_240_ori97.mp4", "3_1440_ori97.mp4"]
  with pytest.raises(ValueError, match=r"unknown prompt id\(s\) \[999\]"):
    generation.select_jobs(prompts, ids=[2, 999])
  with pytest.raises(ValueError, match=r"duration\(s\) \[33\].*\[120, 240, 720, 1440\]"):
    generation.select_jobs(prompts, durations=[33])
  with pytest.raises(ValueError, match="no prompt"):
    generation.select_jobs(prompts, ids=[2], durations=[120])
  with pytest.raises(ValueError, match="max_frames=0"):
    generation.select_jobs(prompts, max_frames=0)


def test_timings_summary_and_read_fps(tmp_path):
  def rec(name, frames, seconds, warm, vid=1):
    return {"video_name": name, "id": vid, "frames": frames, "seconds": seconds,
            "fps": frames / seconds, "warm": warm, "height": 384, "width": 640,
            "device": "gpu:H100"}
  records = [rec("1_240_ori33.mp4", 33, 10.0, False), rec("2_240_ori33.mp4", 33, 5.0, True, 2),
             rec("3_240_ori66.mp4", 66, 2.0, True, 3), rec("2_240_ori33.mp4", 33, 1.0, True, 2)]
  t = generation.summarize(records)
  assert t["num_videos"] == 3 and t["num_warm_videos"] == 2  # the latest record of id 2 counts
  assert t["fps"] == pytest.approx(99 / 3.0) and t["throughput_score"] == 10
  assert t["fps_all_videos"] == pytest.approx(132 / 13.0)
  assert "note" not in t and t["devices"] == ["gpu:H100"]
  cold = generation.summarize(records[:1])
  assert cold["includes_compilation"] and cold["fps"] == pytest.approx(3.3)
  assert cold["throughput_score"] == 2
  assert generation.summarize([])["fps"] is None
  # With out_dir, videos deleted from the folder drop out of the summary.
  (tmp_path / "3_240_ori66.mp4").write_bytes(b"")
  assert generation.summarize(records, str(tmp_path))["num_videos"] == 1

  (tmp_path / generation.TIMINGS_FILE).write_text(json.dumps(t))
  assert generation.read_fps(tmp_path) == pytest.approx(33.0)
  assert generation.read_fps(tmp_path / generation.TIMINGS_FILE) == pytest.approx(33.0)
  with pytest.raises(FileNotFoundError, match="timings.json"):
    generation.read_fps(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / generation.TIMINGS_FILE).write_text(json.dumps({"fps": None}))
  with pytest.raises(ValueError, match="fps=None"):
    generation.read_fps(tmp_path / "empty")


def test_generate_errors(tmp_path, capsys):
  out = str(tmp_path / "out")

  def fails(argv, *needles):
    assert heliosbench.main(["generate", "--out", out] + argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    for n in needles:
      assert n in err, (n, err)

  fails(["--ids", "999"], "unknown prompt id(s) [999]")
  fails(["--durations", "33"], "duration(s) [33]", "[120, 240, 720, 1440]")
  fails(["--prompts", str(tmp_path / "nope.csv")], "prompt CSV not found", "nope.csv")
  fails(["--model_dir", str(tmp_path / "missing"), "--ids", "2"], "model folder not found",
        "missing")
  (tmp_path / "empty_model").mkdir()
  fails(["--model_dir", str(tmp_path / "empty_model"), "--ids", "2"], "empty_model",
        "'transformer/'")
  broken = tmp_path / "broken_model"
  for sub in ("transformer", "vae", "scheduler"):
    (broken / sub).mkdir(parents=True)
  (broken / "scheduler" / "scheduler_config.json").write_text("{not json")
  fails(["--model_dir", str(broken), "--ids", "2"], "broken_model")
  fails(["--ids", "2", "--height", "100"], "height=100")
  # Nothing was pinned on the folder by the failed starts.
  assert not os.path.exists(os.path.join(out, generation.SETTINGS_FILE))
  # A second process writing to the same folder is refused.
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, generation.LOCK_FILE), "a+") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    fails(["--ids", "2"], "another `heliosbench generate` is writing to")
  # A video of a selected id under another name (other settings) is not mixed in.
  (tmp_path / "out" / "2_240_ori33.mp4").write_bytes(b"")
  fails(["--ids", "2"], "already holds 2_240_ori33.mp4", "2_240_ori261.mp4")
