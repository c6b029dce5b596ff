"""media: video/image reading errors and the progressive, atomic, checked mp4 writer;
runtime.check_writable (output paths checked before the work)."""

import os
import subprocess
import tempfile

import numpy as np
import pytest

from helios_jax import media
from helios_jax import runtime


def _frames(n=12, h=32, w=48, seed=0):
  return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


def test_progressive_writer_equals_one_shot(tmp_path):
  frames = _frames(20)
  one = media.write_video(tmp_path / "one.mp4", frames)
  with media.VideoWriter(tmp_path / "parts.mp4") as w:
    for part in np.split(frames, [7, 11]):
      w.write(part)
      assert not os.path.exists(tmp_path / "parts.mp4")  # only renamed when complete
  a, b = media.read_video_frames(one), media.read_video_frames(tmp_path / "parts.mp4")
  assert a.shape == (20, 32, 48, 3)
  np.testing.assert_array_equal(a, b)
  assert sorted(os.listdir(tmp_path)) == ["one.mp4", "parts.mp4"]


def _dev_full_tmp(monkeypatch):
  """Makes the writer's temporary file a link to /dev/full: every write fails with ENOSPC."""
  real = tempfile.mkstemp

  def mkstemp(prefix="", suffix="", dir=None):  # pylint: disable=redefined-builtin
    fd, path = real(prefix=prefix, suffix=suffix, dir=dir)
    os.close(fd)
    os.remove(path)
    os.symlink("/dev/full", path)
    return os.open(os.devnull, os.O_RDONLY), path

  monkeypatch.setattr(media.tempfile, "mkstemp", mkstemp)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
  _dev_full_tmp(monkeypatch)
  with pytest.raises(media.VideoWriteError, match="nothing was written|unreadable"):
    media.write_video(tmp_path / "x.mp4", _frames(40, 64, 96))
  assert os.listdir(tmp_path) == []


def test_full_small_filesystem(tmp_path):
  """A real 24 KB tmpfs (root only): the trailer cannot be written; the error says so."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)],
                    capture_output=True, check=False).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    with pytest.raises(media.VideoWriteError, match="MB free"):
      media.write_video(mnt / "x.mp4", _frames(40, 64, 96))
    assert os.listdir(mnt) == []
  finally:
    subprocess.run(["umount", str(mnt)], check=False)


def test_keep_partial_on_failure(tmp_path):
  frames = _frames(10)
  with pytest.raises(RuntimeError, match="boom"):
    with media.VideoWriter(tmp_path / "v.mp4", keep_partial=True) as w:
      w.write(frames[:6])
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == ["v.partial.mp4"]
  np.testing.assert_array_equal(media.read_video_frames(tmp_path / "v.partial.mp4"),
                                media.read_video_frames(media.write_video(
                                    tmp_path / "ref.mp4", frames[:6])))
  with pytest.raises(RuntimeError):
    with media.VideoWriter(tmp_path / "w.mp4") as w:  # default: nothing kept
      w.write(frames[:3])
      raise RuntimeError("boom")
  assert not [f for f in os.listdir(tmp_path) if f.startswith(("w.", ".tmp-"))]


def test_unwritable_targets_fail_before_work(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file
      target = tmp_path / "file" / "x.mp4"
      (tmp_path / "file").write_text("")
      with pytest.raises(runtime.OutputPathError, match="is not a folder"):
        runtime.check_writable(target)
    else:
      with pytest.raises(runtime.OutputPathError, match="not writable"):
        runtime.check_writable(ro / "x.mp4")
  finally:
    ro.chmod(0o755)
  with pytest.raises(runtime.OutputPathError, match="is a folder"):
    runtime.check_writable(tmp_path)
  with pytest.raises(runtime.OutputPathError, match="MB needed"):
    runtime.check_writable(tmp_path / "big.mp4", need_bytes=1 << 62)
  assert runtime.check_writable(tmp_path / "new" / "x.mp4") == str(tmp_path / "new" / "x.mp4")


def test_bad_frames_and_sizes(tmp_path):
  with pytest.raises(ValueError, match=r"\[T, H, W, 3\] uint8"):
    media.write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32))
  with media.VideoWriter(tmp_path / "b.mp4") as w:
    w.write(_frames(2, 16, 16))
    with pytest.raises(ValueError, match="16x16"):
      w.write(_frames(2, 32, 16))


def test_unreadable_video_is_one_line(tmp_path):
  bad = tmp_path / "bad.mp4"
  bad.write_text("not a video")
  with pytest.raises(ValueError) as e:
    media.read_video_frames(bad)
  msg = str(e.value)
  assert msg.startswith(f"unreadable video {bad}: ") and "\n" not in msg
  assert "ffmpeg version" not in msg
