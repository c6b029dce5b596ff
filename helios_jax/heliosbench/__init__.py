"""HeliosBench metrics: decoding, metric families, drift, merge/ratings and the CLI."""

from helios_jax.heliosbench.naming import (VideoName, format_video_name, list_videos, load_prompts,
                                     parse_video_name, short_clip_name)
from helios_jax.heliosbench.video_io import VideoReadError, iter_frames, read_frames, target_size
from helios_jax.heliosbench.motion import MotionAmplitude
from helios_jax.heliosbench.merge import rate, rules, run_merge, throughput_score, weighted_total
from helios_jax.heliosbench.runner import ScorerOptions, run_metrics, select_metrics
from helios_jax.heliosbench.generation import GenerateOptions, read_fps, run_generate

__all__ = [
    "GenerateOptions", "read_fps", "run_generate",
    "MotionAmplitude", "ScorerOptions", "VideoName", "VideoReadError", "format_video_name",
    "iter_frames", "list_videos", "load_prompts", "parse_video_name", "rate", "read_frames",
    "rules", "run_merge", "run_metrics", "select_metrics", "short_clip_name", "target_size",
    "throughput_score", "weighted_total",
]
