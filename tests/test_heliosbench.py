"""Tests of the HeliosBench metrics half (helios_jax.heliosbench)."""

from __future__ import annotations

import csv
import http.server
import json
import os
import threading

import numpy as np
import pytest

from conftest import LOCAL_HTTP_TIMEOUT_S
from helios_jax.heliosbench import drift as drift_lib
from helios_jax.heliosbench import cli as heliosbench
from helios_jax.heliosbench import merge as merge_lib
from helios_jax.heliosbench import motion as motion_lib
from helios_jax.heliosbench import naming
from helios_jax.heliosbench import naturalness as nat
from helios_jax.heliosbench import proxies
from helios_jax.heliosbench import results as res
from helios_jax.heliosbench import runner
from helios_jax.heliosbench import semantic as sem
from helios_jax.heliosbench import smoothness as smooth
from helios_jax.heliosbench import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "data", "toy_data", "videos")
PROMPTS = os.path.join(REPO, "data", "helios_bench", "helios_t2v_prompts.csv")

# Published per-video Motion Amplitude of the toy clips (upstream results/toy-video, spec §1.2).
TOY_MOTION = {"2_240_ori81.mp4": 0.19912056624889374, "239_120_ori129.mp4": 0.05887579917907715}

# Inputs of the worked example (upstream eval/playground/results/toy-video, spec §1.4).
WORKED_AVERAGES = {
    "aesthetic": 0.6564263701438904,
    "motion_amplitude": 0.12899818271398544,
    "motion_smoothness": 0.9922347277689807,
    "naturalness": 0.5,
    "semantic": 0.2817579507827759,
    "drifting_aesthetic": 0.027865678071975708,
    "drifting_motion_smoothness": 0.0009624073235373065,
    "drifting_naturalness": 0.0,
    "drifting_semantic": 0.006637156009674072,
}
WORKED_RATINGS = {
    "aesthetic": 9, "motion_amplitude": 3, "motion_smoothness": 10, "naturalness": 7,
    "semantic": 8, "drifting_aesthetic": 8, "drifting_motion_smoothness": 10,
    "drifting_naturalness": 10, "drifting_semantic": 10,
}


@pytest.fixture(autouse=True)
def _no_scorer_env(monkeypatch):
  for name in runner.ENV.values():
    monkeypatch.delenv(name, raising=False)


_FAKE_AMT = """
import torch
class Model(torch.nn.Module):
  def __init__(self, corr_radius=3, corr_lvls=4, num_flows=3):
    super().__init__()
    self.w = torch.nn.Parameter(torch.ones(1))
  def forward(self, a, b, embt, scale_factor=1.0, eval=False):
    assert a.shape[-1] % 16 == 0 and a.shape[-2] % 16 == 0
    return {'imgt_pred': self.w * (a + b) / 2}
"""

_FAKE_VICLIP = """
import torch
class ViCLIP(torch.nn.Module):
  def __init__(self, tokenizer=None, pretrain=None):
    super().__init__()
    assert tokenizer.path.endswith('bpe_simple_vocab_16e6.txt.gz') and pretrain.endswith('.pth')
  def encode_vision(self, image, test=False):
    assert image.shape[1:] == (8, 3, 224, 224) and test
    return image.mean(dim=(1, 3, 4))
  def encode_text(self, text):
    return torch.tensor([[1.0, -2.0, float(len(text) % 7)]])
"""

_FAKE_TOKENIZER = """
class SimpleTokenizer:
  def __init__(self, bpe_path):
    self.path = bpe_path
"""


@pytest.fixture(scope="module")
def fake_upstream(tmp_path_factory):
  """A stand-in for Helios' eval/ folder: AMT-S and ViCLIP modules at upstream's paths, with
  trivial networks (blend / channel means), plus weight files with upstream's names."""
  root = tmp_path_factory.mktemp("upstream")
  amt = root / "eval" / "utils" / "third_party" / "amt" / "networks"
  amt.mkdir(parents=True)
  (amt / "AMT-S.py").write_text(_FAKE_AMT)
  vic = root / "eval" / "utils" / "third_party" / "ViCLIP"
  vic.mkdir(parents=True)
  (vic / "viclip.py").write_text(_FAKE_VICLIP)
  (vic / "simple_tokenizer.py").write_text(_FAKE_TOKENIZER)
  import torch
  torch.save({"state_dict": {"w": torch.ones(1)}}, str(root / "amt-s.pth"))
  weights = root / "ViCLIP"
  weights.mkdir()
  (weights / sem.VICLIP_WEIGHTS).write_bytes(b"x")
  (weights / sem.VICLIP_VOCAB).write_bytes(b"x")
  return {"eval": str(root / "eval"), "amt": str(root / "amt-s.pth"), "viclip": str(weights)}


def _write_worked_example(folder: str, averages=None) -> None:
  os.makedirs(folder, exist_ok=True)
  for key, avg in (averages or WORKED_AVERAGES).items():
    spec = res.RESULT_SPECS[key]
    entries = [{"id": 2, "video_name": "2_240_ori81.mp4", spec.value_key: avg},
               {"id": 239, "video_name": "239_120_ori129.mp4", spec.value_key: avg}]
    if spec.drift:
      for e in entries:
        e.update(res.drift_values(spec, avg, 0.5, 0.5 + avg))
    res.write_results(folder, spec, entries)
    # Put the exact published average back (2 equal values average to themselves anyway).
    data = res.read_json(os.path.join(folder, spec.filename))
    data["average_drift_score" if spec.drift else "average_score"] = avg
    res.write_json(os.path.join(folder, spec.filename), data)


def _textured_frames(n, height, width, dx, dy, seed=0):
  """A blurred-noise texture translated by (dx, dy) px per frame (cyclic)."""
  import cv2
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (height, width, 3)).astype(np.float32)
  base = cv2.GaussianBlur(base, (0, 0), 4.0)
  base = (base - base.min()) / (base.max() - base.min()) * 255
  base = base.astype(np.uint8)
  return [np.roll(base, (i * dy, i * dx), axis=(0, 1)) for i in range(n)]


def _write_mp4(path, frames, fps=24):
  import imageio.v2 as imageio
  imageio.mimwrite(path, frames, fps=fps, codec="libx264", quality=9, macro_block_size=16)
  return path


# ------------------------------------------------------------------------------------------
# Merge: ratings, totals, throughput.


def test_worked_example_long_and_short_totals(tmp_path):
  folder = str(tmp_path / "toy-video")
  _write_worked_example(folder)
  merged = merge_lib.merge_model(folder, is_long=True)
  got = {**merged["summary"]["non_drifting"], **merged["summary"]["drifting"]}
  assert {k: v["rating"] for k, v in got.items()} == WORKED_RATINGS
  assert merged["summary"]["total_weighted_rating"] == 8.247
  assert got["motion_amplitude"]["name"] == "Motion Amplitude"
  assert got["drifting_naturalness"]["raw_score"] == 0.0  # drift 0.0 is rated 10, not missing
  assert list(merged["summary"]["non_drifting"]) == [
      "aesthetic", "motion_amplitude", "motion_smoothness", "naturalness", "semantic"]
  on_disk = res.read_json(os.path.join(folder, "merged_results.json"))
  assert on_disk["summary"]["total_weighted_rating"] == 8.247 and on_disk["per_video"] == {}
  short = merge_lib.merge_model(folder, is_long=False, write=False)
  assert short["summary"]["drifting"] == {}
  assert short["summary"]["total_weighted_rating"] == 7.45


def test_rating_rules_and_quirks():
  long_up = merge_lib.rules(True)
  long_fix = merge_lib.rules(True, "fixed")
  short = merge_lib.rules(False)
  # Upstream long-Aesthetic typo: ratings 3 and 2 unreachable; "fixed" restores them.
  assert merge_lib.rate(0.36, long_up["aesthetic"]) == 1
  assert merge_lib.rate(0.36, long_fix["aesthetic"]) == 3
  assert merge_lib.rate(0.36, short["aesthetic"]) == 3
  assert merge_lib.rate(0.42, long_up["aesthetic"]) == 4
  # Thresholds are inclusive; below the last one is 1.
  assert merge_lib.rate(0.45, short["motion_amplitude"]) == 10
  assert merge_lib.rate(0.0499, short["motion_amplitude"]) == 1
  assert merge_lib.rate(0.35, short["naturalness"]) == 4  # no 0.35 step
  assert merge_lib.rate(0.01, long_up["drifting_semantic"]) == 10
  assert merge_lib.rate(0.0901, long_up["drifting_semantic"]) == 1
  assert merge_lib.rate(0.21, long_up["drifting_naturalness"]) == 2
  assert merge_lib.normalize(1.7) == 1.0 and merge_lib.normalize(-0.2) == 0.0
  assert merge_lib.weighted_total({"semantic": 10}, is_long=False) == 3.5
  with pytest.raises(ValueError, match="long_aesthetic='typo'"):
    merge_lib.rules(True, "typo")


def test_zero_average_is_missing_quirk(tmp_path):
  folder = str(tmp_path / "m")
  _write_worked_example(folder, {**WORKED_AVERAGES, "naturalness": 0.0})
  merged = merge_lib.merge_model(folder, is_long=True)
  assert merged["summary"]["non_drifting"]["naturalness"]["rating"] is None
  assert merged["summary"]["total_weighted_rating"] == round(8.247 - 7 * 0.255, 4)


def test_throughput_score():
  published = {19.53: 7, 21.20: 7, 22.13: 7, 20.7: 7, 13.24: 5, 6.74: 3, 5.37: 2, 0.54: 1,
               1.05: 1, 3.2: 1, 32.0: 10, 40.0: 10}
  for fps, want in published.items():
    assert merge_lib.throughput_score(fps) == want, fps
  with pytest.raises(ValueError, match="fps=-1"):
    merge_lib.throughput_score(-1)


def test_merge_cli_end_to_end(tmp_path, capsys):
  root = tmp_path / "results"
  _write_worked_example(str(root / "toy-video"))
  _write_worked_example(str(root / "other"), {**WORKED_AVERAGES, "semantic": 0.305})
  curves = {"chunk_frames": 33, "curves": {"motion_amplitude": {"2_240_ori81.mp4": [0.2, 0.1]}}}
  res.write_json(str(root / "toy-video" / res.CHUNKS_FILE), curves)
  res.write_json(str(root / "toy-video" / res.SKIPPED_FILE), {})
  out = tmp_path / "summary"
  rc = heliosbench.main(["merge", "--results", str(root), "--out", str(out), "--fps", "19.53",
                         "--rules", "long"])  # upstream's run_metrics.sh always merges long
  assert rc == 0
  text = capsys.readouterr().out
  assert "HeliosBench summary: toy-video" in text and "8.2470" in text
  allm = json.loads((out / "all_models_merged.json").read_text())
  assert allm["num_models"] == 2 and allm["score_type"] == "rating"
  assert allm["models"]["toy-video"]["total_weighted_rating"] == 8.247
  assert allm["models"]["other"]["semantic"] == 10
  assert allm["models"]["other"]["total_weighted_rating"] == round(8.247 + 2 * 0.255, 4)
  assert allm["metrics"][-1] == "total_weighted_rating" and allm["rating_scale"] == 10
  with open(out / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  by = {(r["model"], r["metric"]): r for r in rows}
  assert by[("toy-video", "throughput_score")]["rating"] == "7"
  assert by[("toy-video", "semantic")]["rating"] == "8"
  assert float(by[("toy-video", "total_weighted_rating")]["raw_score"]) == 8.247
  for name in ("metric_ratings.png", "toy-video_drift_start_end.png",
               "toy-video_chunk_curves.png"):
    png = out / "plots" / name
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert (root / "other" / "merged_results.json").is_file()
  # A folder without results is a clear error, not a traceback.
  (tmp_path / "empty").mkdir()
  assert heliosbench.main(["merge", "--results", str(tmp_path / "empty")]) == 2
  assert "no *_results.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Naming contract.


def test_naming_contract(tmp_path):
  assert naming.format_video_name(2, 240, 264) == "2_240_ori264.mp4"
  name = naming.parse_video_name("/x/239_120_ori129.mp4")
  assert (name.id, name.duration, name.frames) == (239, 120, 129)
  assert name.filename == "239_120_ori129.mp4"
  assert naming.short_clip_name("2_240_ori264.mp4") == "2_240_ori81.mp4"
  lenient = naming.parse_video_name("7_240_ori81_seed3.mp4", strict=False)
  assert lenient.id == 7 and lenient.duration is None
  with pytest.raises(naming.NamingError, match="7_240_ori81_seed3.mp4"):
    naming.parse_video_name("7_240_ori81_seed3.mp4")
  with pytest.raises(naming.NamingError, match="video_id=-1"):
    naming.format_video_name(-1, 240, 81)
  with pytest.raises(naming.NamingError, match="x_1_ori2.mp4"):
    naming.parse_video_name("x_1_ori2.mp4", strict=False)
  for f in ("10_240_ori81.mp4", "2_240_ori81.mp4", "x_1_ori2.mp4", "3_240.mp4", "notes.txt"):
    (tmp_path / f).write_bytes(b"")
  entries, bad = naming.list_videos(tmp_path)
  assert [e.video_name for e in entries] == ["2_240_ori81.mp4", "10_240_ori81.mp4"]
  assert [b[0] for b in bad] == ["x_1_ori2.mp4"]
  prompts = naming.load_prompts(PROMPTS)
  assert len(prompts) == 240 and prompts[2].duration == 240
  assert sorted({p.duration for p in prompts.values()}) == [120, 240, 720, 1440]
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    naming.load_prompts(tmp_path / "nope.csv")


def test_target_size_and_windows():
  assert video_io.target_size(832, 480) == (368, 640)
  assert video_io.target_size(640, 384) == (384, 640)
  assert video_io.target_size(384, 640) == (1066, 640)
  assert drift_lib.drift_windows(81) == ((0, 12), (69, 81))
  assert drift_lib.drift_window_len(1452) == 217
  assert drift_lib.drift_windows(10, minimum=4) == ((0, 4), (6, 10))
  assert drift_lib.drift_windows(3, minimum=4) == ((0, 3), (0, 3))
  assert drift_lib.chunk_bounds(70, 33) == [(0, 33), (33, 66), (66, 70)]


def test_yuv_crate_conversion_values():
  y = np.array([[16, 235], [128, 0]], np.uint8)
  u = np.array([[128]], np.uint8)
  v = np.array([[128]], np.uint8)
  rgb = video_io.yuv420_to_rgb(y, u, v)
  assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]
  assert rgb[1, 1].tolist() == [0, 0, 0]
  # 112 * 255 / 219 = 130.4 in floats; the crate's 10-bit widening + pmulhrsw gives 131.
  assert rgb[1, 0].tolist() == [131, 131, 131]
  red = video_io.yuv420_to_rgb(np.full((2, 2), 81, np.uint8), np.full((1, 1), 90, np.uint8),
                               np.full((1, 1), 240, np.uint8))
  assert red[0, 0].tolist() == [255, 0, 0]
  with pytest.raises(ValueError, match="bt999"):
    video_io.yuv420_to_rgb(y, u, v, "bt999")


# ------------------------------------------------------------------------------------------
# Motion Amplitude.


def test_motion_amplitude_synthetic_translation(tmp_path):
  # Recorded at 1280 px width, moved 2k px/frame -> k px/frame after the 640-wide decode.
  k = 2
  diag = _write_mp4(str(tmp_path / "1_120_ori9.mp4"),
                    _textured_frames(9, 736, 1280, 2 * k, 2 * k))
  horiz = _write_mp4(str(tmp_path / "2_120_ori9.mp4"), _textured_frames(9, 736, 1280, 2 * k, 0))
  scores = {}
  for path in (diag, horiz):
    m = motion_lib.MotionAmplitude()
    for frame in video_io.iter_frames(path):
      assert frame.shape == (368, 640, 3)
      m.update(frame)
    assert m.num_frames == 9 and len(m.maps) == 8 and m.maps[0].shape == (9, 16, 2)
    scores[path] = m.score()
  # dx and dy are averaged together: a diagonal (k, k) shift gives k, a horizontal one k / 2.
  assert scores[diag] == pytest.approx(k, rel=0.08)
  assert scores[horiz] == pytest.approx(k / 2, rel=0.08)
  static = motion_lib.MotionAmplitude()
  frame = _textured_frames(1, 64, 96, 0, 0)[0]
  for _ in range(3):
    static.update(frame)
  assert static.score() == pytest.approx(0.0, abs=1e-3)
  one = motion_lib.MotionAmplitude()
  one.update(frame)
  assert one.score() == 0.0  # upstream: fewer than 2 frames -> 0.0, not a failure


def test_motion_amplitude_toy_clip_81():
  path = os.path.join(TOY, "2_240_ori81.mp4")
  m = motion_lib.MotionAmplitude()
  for frame in video_io.iter_frames(path):
    m.update(frame)
  assert m.num_frames == 81
  assert m.score() == pytest.approx(TOY_MOTION["2_240_ori81.mp4"], rel=1e-6, abs=0)


@pytest.mark.slow
def test_motion_amplitude_toy_clips_published_file(tmp_path):
  out = str(tmp_path / "toy-video")
  summary = runner.run_metrics(TOY, out, ["motion_amplitude"], prompts_csv=PROMPTS,
                               progress=False, log=lambda s: None)
  data = res.read_json(summary.written["motion_amplitude"])
  assert data["metric"] == "motion_fb" and data["num_videos"] == 2
  got = {e["video_name"]: e["motion_fb"] for e in data["per_video_results"]}
  for name, want in TOY_MOTION.items():
    assert got[name] == pytest.approx(want, rel=1e-6, abs=0), name
  assert data["average_score"] == pytest.approx(0.12899818271398544, rel=1e-6)
  assert [e["id"] for e in data["per_video_results"]] == [2, 239]


# ------------------------------------------------------------------------------------------
# Unreadable / empty videos and skipped learned metrics.


def test_unreadable_and_empty_videos_are_recorded(tmp_path):
  videos = tmp_path / "videos"
  videos.mkdir()
  _write_mp4(str(videos / "1_120_ori6.mp4"), _textured_frames(6, 96, 160, 1, 1))
  (videos / "2_240_ori81.mp4").write_bytes(b"")
  (videos / "3_240_ori81.mp4").write_bytes(b"this is not an mp4 file" * 20)
  (videos / "99999_240_ori81.mp4").write_bytes(b"")  # id not in the CSV: skipped, as upstream
  with pytest.raises(video_io.VideoReadError, match="2_240_ori81.mp4.*empty"):
    video_io.read_frames(str(videos / "2_240_ori81.mp4"))
  with pytest.raises(video_io.VideoReadError, match="3_240_ori81.mp4"):
    video_io.read_frames(str(videos / "3_240_ori81.mp4"))
  out = tmp_path / "out"
  rc = heliosbench.main(["metrics", "--videos", str(videos), "--out", str(out), "--prompts",
                         PROMPTS, "--metrics", "motion_amplitude", "proxy_color_drift",
                         "aesthetic", "naturalness", "--no-progress"])
  assert rc == 0
  data = res.read_json(str(out / "motion_amplitude_results.json"))
  assert [e["video_name"] for e in data["per_video_results"]] == ["1_120_ori6.mp4"]
  assert data["per_video_results"][0]["motion_fb"] > 0.0
  errors = {f["video_name"]: f["error"] for f in data["failed_videos"]}
  assert set(errors) == {"2_240_ori81.mp4", "3_240_ori81.mp4"}
  assert "2_240_ori81.mp4" in errors["2_240_ori81.mp4"]
  failed = res.read_json(str(out / res.FAILED_FILE))
  assert {f["video_name"] for f in failed["proxy_color_drift"]} == set(errors)
  skipped = res.read_json(str(out / res.SKIPPED_FILE))
  assert "clip_model not given" in skipped["aesthetic"]
  assert "vlm_base_url not given" in skipped["naturalness"]
  assert not (out / "aesthetic_results.json").exists()
  assert not (out / "naturalness_results.json").exists()
  with pytest.raises(ValueError, match="unknown metric 'nope'"):
    runner.select_metrics(["nope"])


# ------------------------------------------------------------------------------------------
# Proxies, smoothness protocol, semantic / naturalness sampling.


def test_proxies():
  frames = _textured_frames(20, 48, 64, 1, 0)
  ssim = proxies.TemporalSSIM()
  color = proxies.ColorStats()
  for f in frames:
    ssim.update(f)
    color.update(f)
  assert proxies.ssim(frames[0], frames[0]) == pytest.approx(1.0)
  assert 0.0 < ssim.score() < 1.0
  assert color.drift()["drift_proxy_color_score"] == pytest.approx(0.0, abs=1e-12)  # cyclic roll
  tinted = [f if i < 10 else np.clip(f.astype(int) + [40, 40, -60], 0, 255).astype(np.uint8)
            for i, f in enumerate(frames)]
  c2 = proxies.ColorStats()
  for f in tinted:
    c2.update(f)
  d = c2.drift()
  assert d["drift_proxy_color_score"] > 0.3
  assert d["end_mean_blue"] < d["start_mean_blue"] - 40
  assert len(c2.chunk_curves(5)["proxy_luma_mean"]) == 4


def test_smoothness_protocol_and_amt_adapter(tmp_path, fake_upstream):
  frames = _textured_frames(9, 32, 48, 2, 1, seed=3)
  blend = smooth.BlendInterpolator()
  # Direct transcription of upstream: inputs 0,2,4,6,8; references 1,3,5,7.
  diffs = []
  for i in range(4):
    a, b = frames[2 * i].astype(np.float32) / 255, frames[2 * i + 2].astype(np.float32) / 255
    pred = ((a + b) / 2 * 255).clip(0, 255).astype(np.uint8)
    diffs.append(np.mean(np.abs(frames[2 * i + 1].astype(int) - pred.astype(int))))
  want = (255 - np.mean(diffs)) / 255
  assert smooth.smoothness_of_frames(frames, blend) == pytest.approx(want, rel=1e-12)
  acc = smooth.SmoothnessAccumulator(blend, expected_frames=9)
  for f in frames:
    acc.update(f)
  assert acc.score() == pytest.approx(want, rel=1e-12)
  d, s, e = acc.drift()  # windows of max(4, int(1.35)) = 4 frames
  assert s == pytest.approx(smooth.smoothness_of_frames(frames[:4], blend, window=True))
  assert e == pytest.approx(smooth.smoothness_of_frames(frames[-4:], blend, window=True))
  assert d == pytest.approx(abs(s - e))
  assert smooth.smoothness_of_frames(frames[:3], blend, window=True) == 0.0
  with pytest.raises(ValueError, match="Need more than one frame"):
    smooth.smoothness_of_frames(frames[:2], blend)
  # The AMT adapter loads upstream's module layout; a stand-in network that blends the inputs.
  amt = smooth.AmtInterpolator(fake_upstream["eval"], fake_upstream["amt"], device="cpu")
  assert smooth.smoothness_of_frames(frames, amt) == pytest.approx(want, abs=2e-4)
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    smooth.AmtInterpolator(fake_upstream["eval"], str(tmp_path / "missing.pth"))


def test_semantic_and_naturalness_frame_sampling():
  assert sem.middle_frame_indices(81) == [4, 14, 24, 34, 44, 54, 64, 75]
  start, end = sem.drift_frame_indices(81)
  assert start == [0, 1, 3, 4, 6, 7, 9, 10]
  assert end == [68, 69, 71, 72, 74, 76, 77, 79]
  s20, e20 = sem.drift_frame_indices(20)  # 3-frame windows are widened to 8 frames
  assert s20 == list(range(8)) and e20 == list(range(12, 20))
  assert sem.middle_frame_indices(5) == [0, 1, 2, 3, 4, 4, 4, 4]
  assert nat.full_video_indices(81) == list(range(0, 80, 5))
  assert nat.portion_indices(81, "start") == list(range(12))
  assert nat.portion_indices(129, "start") == list(range(16))
  assert nat.portion_indices(129, "end") == list(range(110, 126))
  assert nat.portion_indices(1452, "end")[:2] == [1235, 1248]
  assert nat.parse_reply(" 4\n") == 0.75 and nat.parse_reply("7") == 1.0
  with pytest.raises(ValueError, match="'probably AI'"):
    nat.parse_reply("probably AI")


def test_semantic_viclip_adapter_and_runner(tmp_path, fake_upstream):
  videos = tmp_path / "videos"
  videos.mkdir()
  path = _write_mp4(str(videos / "2_240_ori30.mp4"), _textured_frames(30, 96, 160, 3, 0))
  scorer = sem.ViClipScorer(fake_upstream["eval"], fake_upstream["viclip"], device="cpu")
  prompt = naming.load_prompts(PROMPTS)[2].prompt
  text = np.array([1.0, -2.0, float(len(prompt) % 7)])
  text /= np.linalg.norm(text)

  def cosine(idx):
    v = sem.viclip_pixels(video_io.read_frames(path, indices=idx)).mean(axis=(0, 2, 3))
    return float(v @ text / np.linalg.norm(v))

  acc = sem.SemanticAccumulator(scorer, prompt, expected_frames=30)
  for f in video_io.iter_frames(path):
    acc.update(f)
  assert len(acc._frames) <= 24  # pylint: disable=protected-access
  assert acc.score() == pytest.approx(cosine(sem.middle_frame_indices(30)), rel=1e-3)
  start, end = sem.drift_frame_indices(30)
  d, s, e = acc.drift()
  assert (s, e) == pytest.approx((cosine(start), cosine(end)), rel=1e-3)
  out = tmp_path / "out"
  opts = runner.ScorerOptions(upstream_eval=fake_upstream["eval"],
                              amt_ckpt=fake_upstream["amt"], viclip_dir=fake_upstream["viclip"])
  summary = runner.run_metrics(str(videos), str(out), ["semantic", "drifting_semantic",
                                                       "motion_smoothness"], opts,
                               prompts_csv=PROMPTS, progress=False, log=lambda s: None)
  entry = res.read_json(summary.written["semantic"])["per_video_results"][0]
  assert list(entry) == ["id", "video_name", "prompt", "semantic_score"]
  assert entry["prompt"] == prompt and entry["semantic_score"] == pytest.approx(acc.score())
  drift_file = res.read_json(summary.written["drifting_semantic"])
  assert drift_file["description"] == ("Start-end contrast of semantic consistency "
                                       "(first/last 15% frames)")
  assert drift_file["average_drift_score"] == pytest.approx(d)
  smooth_entry = res.read_json(summary.written["motion_smoothness"])["per_video_results"][0]
  assert 0.9 < smooth_entry["motion_smoothness_score"] <= 1.0


def test_vlm_judge_over_local_http(tmp_path):
  seen = {}

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_POST(self):  # noqa: N802
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      seen["path"], seen["auth"], seen["body"] = self.path, self.headers["Authorization"], body
      reply = json.dumps({"choices": [{"message": {"content": " 4 "}}]}).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(reply)))
      self.end_headers()
      self.wfile.write(reply)

    def log_message(self, *args):
      del args

  server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    path = _write_mp4(str(tmp_path / "4_120_ori40.mp4"), _textured_frames(40, 96, 160, 1, 0))
    judge = nat.VlmJudge(f"http://127.0.0.1:{server.server_port}/v1", "k3y", "judge-x",
                         timeout=LOCAL_HTTP_TIMEOUT_S, max_retries=0)
    score, raw = judge.score_video(path)
  finally:
    server.shutdown()
    server.server_close()
  assert (score, raw) == (0.75, "4")
  body = seen["body"]
  assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer k3y"
  assert body["model"] == "judge-x" and body["temperature"] == 0.0
  content = body["messages"][0]["content"]
  assert len(content) == 17 and content[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
  assert content[-1]["text"].startswith("Your task is to analyze 16 frames")


# ------------------------------------------------------------------------------------------
# CLIP ViT port + LAION head: parity with transformers / torch (fp32, tiny random weights).


def _tiny_clip(tmp_path):
  import torch
  import transformers
  cfg = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu")
  torch.manual_seed(0)
  model = transformers.CLIPVisionModelWithProjection(cfg).eval()
  folder = str(tmp_path / "clip")
  model.save_pretrained(folder)
  return model, folder


def _rel(ours, ref):
  ref = np.asarray(ref)
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def test_clip_vision_parity_with_transformers(tmp_path):
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from helios_jax import checkpoint as ckpt_lib
  from helios_jax.models import clip as clip_lib
  hf, folder = _tiny_clip(tmp_path)
  x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = hf(pixel_values=x)
  pixels = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  config, model = clip_lib.load_clip_vision(folder)
  assert config == clip_lib.CLIP_PRESETS["tiny"]
  graphdef, state = nnx.split(model)
  embeds, hidden = clip_lib.encode_images(graphdef, state, pixels)
  assert _rel(embeds, ref.image_embeds) <= 1e-5
  assert _rel(hidden, ref.last_hidden_state) <= 1e-5
  # Orbax export -> reload gives the same parameters.
  export = str(tmp_path / "clip_orbax")
  ckpt_lib.export_model(clip_lib.ClipVisionSpec(), folder, export, progress=False)
  _, reloaded = clip_lib.load_clip_vision(export)
  again, _ = clip_lib.encode_images(*nnx.split(reloaded), pixels)
  assert _rel(again, ref.image_embeds) <= 1e-5
  # OpenAI checkpoint layout (`ViT-L-14.pt` names): rebuilt from the HF tensors.
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  pre = "vision_model.encoder.layers."
  oa = {"visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T.copy()}
  for i in range(2):
    for kind in ("weight", "bias"):
      oa[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = np.concatenate(
          [sd[f"{pre}{i}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
      for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                   ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        oa[f"visual.transformer.resblocks.{i}.{a}.{kind}"] = sd[f"{pre}{i}.{b}.{kind}"]
  torch.save({k: torch.from_numpy(v) for k, v in oa.items()}, str(tmp_path / "tiny-openai.pt"))
  oa_config, oa_model = clip_lib.load_clip_vision(str(tmp_path / "tiny-openai.pt"), num_heads=4)
  assert oa_config == config
  oa_embeds, _ = clip_lib.encode_images(*nnx.split(oa_model), pixels)
  assert _rel(oa_embeds, ref.image_embeds) <= 1e-5
  with pytest.raises(ValueError, match="pixels shape"):
    clip_lib.encode_images(graphdef, state, pixels[:, :16])
  bad = dict(json.loads(open(os.path.join(folder, "config.json")).read()), bogus_key=1)
  with pytest.raises(ValueError, match="bogus_key"):
    clip_lib.ClipVisionConfig.from_dict(bad)


def test_aesthetic_pipeline_matches_torch_reference(tmp_path):
  import torch
  import torch.nn.functional as F
  from helios_jax.heliosbench import aesthetic
  from helios_jax.models import clip as clip_lib
  from helios_jax.heliosbench import preprocess
  hf, folder = _tiny_clip(tmp_path)
  torch.manual_seed(2)
  head = torch.nn.Linear(16, 1)
  torch.save(head.state_dict(), str(tmp_path / "head.pth"))
  mlp = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Dropout(0.2),
                            torch.nn.Linear(24, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 6),
                            torch.nn.Dropout(0.1), torch.nn.Linear(6, 4), torch.nn.Linear(4, 1))
  torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, str(tmp_path / "mlp.pth"))
  frames = np.random.default_rng(5).integers(0, 256, (5, 46, 80, 3), dtype=np.uint8)
  # Reference: upstream clip_transform on float frames, CLIP, F.normalize, head, / 10.
  x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
  rh, rw = preprocess.resized_shape(46, 80, 32)
  top, left = preprocess.center_crop_offsets(rh, rw, 32)
  x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=False)
  x = x[..., top:top + 32, left:left + 32] / 255.0
  mean = torch.tensor(clip_lib.CLIP_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(clip_lib.CLIP_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    feats = F.normalize(hf(pixel_values=(x - mean) / std).image_embeds, dim=-1, p=2)
    want = (head(feats).squeeze(-1) / 10.0).numpy()
    want_mlp = (mlp.eval()(feats).squeeze(-1) / 10.0).numpy()
  scorer = aesthetic.AestheticScorer(folder, str(tmp_path / "head.pth"), batch_size=4)
  assert _rel(scorer.frame_scores(frames), want) <= 1e-5
  acc = aesthetic.AestheticAccumulator(scorer)
  for f in frames:
    acc.update(f)
  assert acc.score() == pytest.approx(float(np.mean(want)), rel=1e-5)
  d, s, e = acc.drift()  # windows of max(1, int(0.75)) = 1 frame
  assert (s, e) == pytest.approx((want[0], want[-1]), rel=1e-5)
  cfg, _ = clip_lib.load_aesthetic_head(str(tmp_path / "mlp.pth"))
  assert cfg.hidden_dims == (24, 8, 6, 4)
  mlp_scorer = aesthetic.AestheticScorer(folder, str(tmp_path / "mlp.pth"))
  assert _rel(mlp_scorer.frame_scores(frames), want_mlp) <= 1e-5
  with pytest.raises(ValueError, match="input_dim=7"):
    torch.save(torch.nn.Linear(7, 1).state_dict(), str(tmp_path / "bad.pth"))
    aesthetic.AestheticScorer(folder, str(tmp_path / "bad.pth"))
  # The metric is wired through the CLI flags.
  videos = tmp_path / "videos"
  videos.mkdir()
  _write_mp4(str(videos / "5_120_ori4.mp4"), _textured_frames(4, 96, 160, 1, 0))
  out = tmp_path / "out"
  summary = runner.run_metrics(
      str(videos), str(out), ["aesthetic", "drifting_aesthetic"],
      runner.ScorerOptions(clip_model=folder, aesthetic_head=str(tmp_path / "head.pth")),
      prompts_csv=PROMPTS, progress=False, log=lambda s: None)
  entry = res.read_json(summary.written["aesthetic"])["per_video_results"][0]
  decoded = video_io.read_frames(str(videos / "5_120_ori4.mp4"))
  assert entry["aesthetic_score"] == pytest.approx(float(np.mean(scorer.frame_scores(decoded))),
                                                   rel=1e-5)
  drift_entry = res.read_json(summary.written["drifting_aesthetic"])["per_video_results"][0]
  assert set(drift_entry) == {"id", "video_name", "drift_aesthetic_score",
                              "start_aesthetic_score", "end_aesthetic_score"}


def test_clip_preprocess_matches_torch_bicubic():
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F
  from helios_jax.heliosbench import preprocess
  frames = np.random.default_rng(0).integers(0, 256, (2, 368, 640, 3), dtype=np.uint8)
  assert preprocess.resized_shape(368, 640) == (224, 389)
  assert preprocess.center_crop_offsets(224, 389) == (0, 82)
  x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
  r = F.interpolate(x, size=(224, 389), mode="bicubic", align_corners=False, antialias=False)
  r = r[..., :, 82:82 + 224] / 255.0
  from helios_jax.models.clip import CLIP_MEAN, CLIP_STD
  want = ((r - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) /
          torch.tensor(CLIP_STD).view(1, 3, 1, 1)).numpy()
  got = np.asarray(preprocess.clip_preprocess(jnp.asarray(frames))).transpose(0, 3, 1, 2)
  assert _rel(got, want) <= 1e-5


def test_merge_picks_rules_from_frame_counts_and_states_coverage(tmp_path, capsys):
  """81/129-frame videos get the short rules unless asked; a total over missing metrics says
  so; skipped metrics draw as n/a; chunk axes are integers."""
  short_dir = tmp_path / "short"
  _write_worked_example(str(short_dir))  # videos of 81 and 129 frames
  assert merge_lib.infer_rules(str(short_dir))[0] is False
  out = merge_lib.run_merge(str(short_dir), plots=False, log=lambda *_: None)
  assert out["merged"]["short"]["summary"]["total_weighted_rating"] == 7.45
  assert out["merged"]["short"]["summary"]["drifting"] == {}
  total = [r for r in out["rows"]["short"] if r["kind"] == "total"][0]
  assert "short rules: the longest video has 129 frames" in total["note"]
  assert "covers 5 of 5 rated metrics" in total["note"]
  # A long video and only one rated metric: long rules, coverage and a warning.
  long_dir = tmp_path / "long"
  spec = res.RESULT_SPECS["semantic"]
  res.write_results(str(long_dir), spec, [
      {"id": 1, "video_name": "1_1440_ori1452.mp4", spec.value_key: 0.3}])
  res.write_json(str(long_dir / res.SKIPPED_FILE), {"aesthetic": "clip_model not given"})
  res.write_json(str(long_dir / res.CHUNKS_FILE),
                 {"chunk_frames": 33, "curves": {"motion_amplitude": {
                     "1_1440_ori1452.mp4": [0.3, 0.2, 0.25]}}})
  lines = []
  plots_out = tmp_path / "summary"
  out = merge_lib.run_merge(str(long_dir), str(plots_out), log=lines.append)
  total = [r for r in out["rows"]["long"] if r["kind"] == "total"][0]
  assert "long rules: the longest video has 1452 frames" in total["note"]
  assert "covers 1 of 9 rated metrics" in total["note"]
  assert any(ln.startswith("warning: long: total_weighted_rating covers 1 of 9") for ln in lines)
  assert [r["note"] for r in out["rows"]["long"] if r["metric"] == "aesthetic"] == [
      "skipped: clip_model not given"]
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from helios_jax.heliosbench import plots  # pylint: disable=g-import-not-at-top
  captured = {}
  real_save = plots._save  # pylint: disable=protected-access

  def save(fig, path):
    captured[os.path.basename(path)] = fig
    real_save(fig, path)

  plots._save = save  # pylint: disable=protected-access
  try:
    plots.metric_bars(str(tmp_path / "bars.png"), out["rows"])
    plots.chunk_curves(str(tmp_path / "curves.png"), str(long_dir))
  finally:
    plots._save = real_save  # pylint: disable=protected-access
  assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
  texts = [t.get_text() for t in captured["bars.png"].axes[0].texts]
  assert texts.count("n/a") == 8  # every rated metric but semantic
  ticks = captured["curves.png"].axes[0].get_xticks()
  shown = [t for t in ticks if 0 <= t <= 2]
  assert shown and all(float(t).is_integer() for t in shown)
