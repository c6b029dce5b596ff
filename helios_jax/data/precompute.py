"""Precomputes Stage 1/2 training latents: `python -m helios_jax.data.precompute ...`.

  python -m helios_jax.data.precompute --metadata=data/toy_data/toy_filter.json \
      --encoders=/ckpt/Helios-Base --data_dir=/data/latents --height=384 --width=640

`--encoders` is a pipeline folder with `vae/`, `text_encoder/` and `tokenizer/` (a diffusers
Helios/Wan checkpoint or our Orbax export; `helios_jax.presets.write_tiny_pipeline` writes a
random tiny one). The dataset lands in `<data_dir>/helios_latents/1.0.0/` (TFDS, ArrayRecord)
and is what `--config.data.data_dir=<data_dir>` of the trainer reads. See `latents.py`.
"""

from __future__ import annotations

from absl import app
from absl import flags

from helios_jax import runtime
from helios_jax.data import clips
from helios_jax.data import latents

_METADATA = flags.DEFINE_string("metadata", None, "Upstream-format clip metadata JSON.")
_ENCODERS = flags.DEFINE_string("encoders", None, "Pipeline folder with vae/, text_encoder/, "
                                "tokenizer/.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data root to write.")
_HEIGHT = flags.DEFINE_integer("height", 384, "Training height (pixels).")
_WIDTH = flags.DEFINE_integer("width", 640, "Training width (pixels).")
_MIN_FRAMES = flags.DEFINE_integer("min_frames", clips.MIN_FRAMES, "Skip shorter clips.")
_MAX_SECTIONS = flags.DEFINE_integer("max_sections", None, "Cap on sections per clip.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 512, "umT5 sequence length.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of start frames and posterior samples.")
_TEXT_DTYPE = flags.DEFINE_string("text_dtype", None, "Text encoder dtype (default float32).")


def main(argv):
  del argv
  for name, flag in (("metadata", _METADATA), ("encoders", _ENCODERS), ("data_dir", _DATA_DIR)):
    if not flag.value:
      raise app.UsageError(f"--{name} is required")
  options = latents.PrecomputeOptions(
      metadata=_METADATA.value, height=_HEIGHT.value, width=_WIDTH.value,
      min_frames=_MIN_FRAMES.value, max_sections=_MAX_SECTIONS.value, text_len=_TEXT_LEN.value,
      seed=_SEED.value)
  encoders = latents.load_encoders(_ENCODERS.value, _TEXT_DTYPE.value)
  folder = latents.precompute(_DATA_DIR.value, options, encoders)
  print(f"latents written to {folder}", flush=True)


if __name__ == "__main__":
  runtime.run_cli(main)
