"""Throughput of the model-free HeliosBench Motion Amplitude metric on CPU (videos/min).

  python benchmarks/heliosbench_metrics.py [--videos data/toy_data/videos] [--repeat 1]

Per video: decode (video-reader-rs emulation through FFmpeg, 640 px wide) and Farneback flow
timed separately; the table ends with frames/s and videos/min for the folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helios_jax.heliosbench import motion  # pylint: disable=g-import-not-at-top,wrong-import-position
from helios_jax.heliosbench import naming  # pylint: disable=g-import-not-at-top,wrong-import-position
from helios_jax.heliosbench import video_io  # pylint: disable=g-import-not-at-top,wrong-import-position


def bench_video(path: str) -> dict:
  """Times decode and flow for one video."""
  t0 = time.perf_counter()
  frames = list(video_io.iter_frames(path))
  t1 = time.perf_counter()
  m = motion.MotionAmplitude()
  for f in frames:
    m.update(f)
  score = m.score()
  t2 = time.perf_counter()
  return {"video": os.path.basename(path), "frames": len(frames),
          "size": f"{frames[0].shape[1]}x{frames[0].shape[0]}", "decode_s": t1 - t0,
          "flow_s": t2 - t1, "total_s": t2 - t0, "motion_fb": score}


def main() -> int:
  default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                         "toy_data", "videos")
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--videos", default=default)
  p.add_argument("--repeat", type=int, default=1)
  args = p.parse_args()
  entries, _ = naming.list_videos(args.videos)
  if not entries:
    print(f"no {naming.VIDEO_GLOB} in {args.videos}", file=sys.stderr)
    return 2
  import cv2  # pylint: disable=g-import-not-at-top
  print(f"cpu cores: {os.cpu_count()}, opencv threads: {cv2.getNumThreads()}, "
        f"opencv {cv2.__version__}")
  rows = [bench_video(e.path) for _ in range(args.repeat) for e in entries]
  print(f"{'video':<24}{'frames':>7}{'size':>10}{'decode s':>10}{'flow s':>9}{'total s':>9}"
        f"{'fps':>8}  motion_fb")
  for r in rows:
    print(f"{r['video']:<24}{r['frames']:>7}{r['size']:>10}{r['decode_s']:>10.2f}"
          f"{r['flow_s']:>9.2f}{r['total_s']:>9.2f}{r['frames'] / r['total_s']:>8.1f}"
          f"  {r['motion_fb']:.17g}")
  total = sum(r["total_s"] for r in rows)
  frames = sum(r["frames"] for r in rows)
  print(f"{'ALL':<24}{frames:>7}{'':>10}{sum(r['decode_s'] for r in rows):>10.2f}"
        f"{sum(r['flow_s'] for r in rows):>9.2f}{total:>9.2f}{frames / total:>8.1f}")
  per_video = total / len(rows)
  print(f"throughput: {60.0 / per_video:.2f} videos/min (mean {frames / len(rows):.0f} frames/"
        f"video), {frames / total:.1f} frames/s; a 1452-frame Helios video ~ "
        f"{1452 / (frames / total):.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
