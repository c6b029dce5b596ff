"""Precomputed training latents as a TFDS dataset in ArrayRecord format (spec §3.2 "short latents").

`HeliosLatents` is a TFDS builder: `_generate_examples` reads the clips of an upstream-format
metadata file (`clips.py`), VAE-encodes each 33-frame section **independently** (every
section's first latent is image-like, matching chunk-wise decoding), takes a posterior
*sample* (not the mean) normalised per channel as (z - mean_c) / std_c, and embeds the first
caption with umT5 (`encode_prompt`). One example per clip:

  latents       [N, 9, h, w, C] float32   N sections, channels-last
  prompt_embed  [n, D] float32            the n valid umT5 rows (zero rows are not stored;
                                          the input pipeline pads to the text length)
  caption       text
  uttid         text
  num_frames    int32  the clip's length bucket (N * 33 <= num_frames)
  num_sections, height, width  int32  (the bucket key; height/width in latent pixels)

Written with `file_format="array_record"`, read back without TensorFlow through
`load_source(data_dir)` (a random-access `ArrayRecordDataSource` for grain).

Command line (see `precompute.py`):
  python -m helios_jax.data.precompute --metadata data/toy_data/toy_filter.json \
      --encoders /path/to/Helios-Base --data_dir /data/helios_latents --height 384 --width 640
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from helios_jax.data import clips as clips_lib
from helios_jax.data.clips import DataError

NAME = "helios_latents"
DATASET_VERSION = "1.0.0"
DESCRIPTION = "Helios Stage 1/2 training latents: section-wise Wan VAE latents + umT5 embeddings."


@dataclasses.dataclass(frozen=True)
class PrecomputeOptions:
  """What the precompute step reads and at which resolution.

  Attributes:
    metadata: upstream-format JSON metadata file.
    height, width: training resolution in pixels (384 x 640 released; divisible by 16).
    min_frames: clips shorter than this are skipped (121 for Stages 1-2).
    max_sections: optional cap on sections per clip (None: all).
    text_len: umT5 sequence length (512).
    seed: seeds the start frames and the VAE posterior samples.
  """

  metadata: str
  height: int = 384
  width: int = 640
  min_frames: int = clips_lib.MIN_FRAMES
  max_sections: int | None = None
  text_len: int = 512
  seed: int = 0

  def __post_init__(self):
    if self.height % 16 or self.width % 16:
      raise DataError(f"resolution {self.height}x{self.width} must be divisible by 16 "
                      "(8x VAE downsampling, 2x2 patches)")


@dataclasses.dataclass
class Encoders:
  """The frozen encoders of the precompute step.

  Attributes:
    vae: a `helios_jax.models.vae.WanVAE`.
    tokenizer: a transformers tokenizer (`load_tokenizer`).
    text_encoder: `(input_ids, attention_mask) -> [B, L, D]` (e.g. a `TextEncoder`).
  """

  vae: Any
  tokenizer: Any
  text_encoder: Callable[[Any, Any], Any]


def load_encoders(folder: str, dtype: Any = None) -> Encoders:
  """VAE, tokenizer and text encoder from a pipeline folder (diffusers layout or our export)."""
  from helios_jax.models.text_encoder import load_text_encoder  # pylint: disable=g-import-not-at-top
  from helios_jax.models.vae import load_vae  # pylint: disable=g-import-not-at-top
  from helios_jax.text import load_tokenizer  # pylint: disable=g-import-not-at-top
  for sub in ("vae", "text_encoder", "tokenizer"):
    if not os.path.isdir(os.path.join(folder, sub)):
      raise DataError(f"encoder folder {folder} has no '{sub}/' sub-folder")
  return Encoders(vae=load_vae(os.path.join(folder, "vae")),
                  tokenizer=load_tokenizer(os.path.join(folder, "tokenizer")),
                  text_encoder=load_text_encoder(os.path.join(folder, "text_encoder"), dtype))


def encode_sections(vae: Any, sections: np.ndarray, key) -> np.ndarray:
  """Normalised posterior samples of independently encoded sections.

  Args:
    vae: `WanVAE`.
    sections: `[N, 3, 33, H, W]` float32 in [-1, 1].
    key: PRNG key for the posterior samples.

  Returns:
    `[N, 9, H/8, W/8, C]` float32 (channels-last).
  """
  import jax  # pylint: disable=g-import-not-at-top
  out = []
  for i, video in enumerate(sections):
    z = vae.encode(video[None], sample=True, rng=jax.random.fold_in(key, i))
    z = vae.normalize(z)                                   # [1, C, 9, h, w]
    out.append(np.transpose(np.asarray(z[0], np.float32), (1, 2, 3, 0)))
  return np.stack(out)


def embed_caption(encoders: Encoders, caption: str, text_len: int) -> np.ndarray:
  """The caption's valid umT5 rows `[n, D]` float32."""
  from helios_jax import text as text_lib  # pylint: disable=g-import-not-at-top
  _, mask = text_lib.tokenize([caption], encoders.tokenizer, text_len)
  emb = text_lib.encode_prompt([caption], encoders.tokenizer, encoders.text_encoder,
                               max_length=text_len)
  n = int(mask[0].sum())
  return np.asarray(emb[0, :n], np.float32)


def _builder_class():
  """Defines the TFDS builder lazily (importing TFDS costs ~1 s)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class HeliosLatents(tfds.core.GeneratorBasedBuilder):
    """Helios Stage 1/2 training latents (one example per clip)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Section-wise VAE latents + umT5 embeddings."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      # This file; TFDS's own lookup needs the optional `importlib_resources` package.
      from etils import epath  # pylint: disable=g-import-not-at-top
      return epath.Path(os.path.abspath(__file__))

    def __init__(self, *, options: PrecomputeOptions | None = None,
                 encoders: Encoders | None = None, **kwargs):
      self._options = options
      self._encoders = encoders
      super().__init__(**kwargs)

    def _info(self):
      f = tfds.features
      return tfds.core.DatasetInfo(
          builder=self,
          description=DESCRIPTION,
          features=f.FeaturesDict({
              "latents": f.Tensor(shape=(None, 9, None, None, None), dtype=np.float32,
                                  encoding=f.Encoding.ZLIB),
              "prompt_embed": f.Tensor(shape=(None, None), dtype=np.float32,
                                       encoding=f.Encoding.ZLIB),
              "caption": f.Text(),
              "uttid": f.Text(),
              "num_frames": np.int32,
              "num_sections": np.int32,
              "height": np.int32,
              "width": np.int32,
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      if self._options is None or self._encoders is None:
        raise DataError("HeliosLatents needs options= and encoders= to be prepared")
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      import jax  # pylint: disable=g-import-not-at-top
      opts, enc = self._options, self._encoders
      clips = clips_lib.select_clips(clips_lib.load_metadata(opts.metadata), opts.min_frames)
      if not clips:
        raise DataError(f"{opts.metadata}: no clip has >= min_frames={opts.min_frames} frames")
      key = jax.random.key(opts.seed)
      for i, clip in enumerate(clips):
        rng = np.random.default_rng(opts.seed + i)
        sections = clips_lib.clip_sections(clip, opts.height, opts.width, rng,
                                           opts.max_sections)
        lat = encode_sections(enc.vae, sections, jax.random.fold_in(key, i))
        emb = embed_caption(enc, clip.caption, opts.text_len)
        yield clip.uttid, {
            "latents": lat, "prompt_embed": emb, "caption": clip.caption, "uttid": clip.uttid,
            "num_frames": np.int32(clips_lib.length_bucket(clip.num_frames)),
            "num_sections": np.int32(lat.shape[0]), "height": np.int32(lat.shape[2]),
            "width": np.int32(lat.shape[3])}

  return HeliosLatents


def precompute(data_dir: str, options: PrecomputeOptions, encoders: Encoders) -> str:
  """Runs the TFDS preparation; returns the dataset's versioned folder.

  Args:
    data_dir: TFDS data root (the dataset lands in `data_dir/helios_latents/1.0.0`).
    options: what to read and how.
    encoders: VAE + text encoder + tokenizer.

  Returns:
    The prepared dataset folder.
  """
  cls = _builder_class()
  builder = cls(options=options, encoders=encoders, data_dir=data_dir,
                file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def dataset_folder(data_dir: str) -> str:
  """`data_dir/helios_latents/1.0.0` if it holds a prepared dataset, else raises `DataError`."""
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f"data dir not found: {data_dir}")
  folder = os.path.join(data_dir, NAME, DATASET_VERSION)
  if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
    raise DataError(f"{data_dir} holds no prepared {NAME} dataset (expected {folder}/"
                    "dataset_info.json; run `python -m helios_jax.data.precompute`)")
  return folder


class LatentSource:
  """Random-access view of the prepared latents (TFDS ArrayRecord, read without TensorFlow).

  `source[i]` -> {"latents" [N, 9, h, w, C], "prompt_embed" [n, D], "caption", "uttid",
  "num_frames", "num_sections", "height", "width"} (numpy); `bucket_keys()` -> [len, 3].
  """

  def __init__(self, data_dir: str, split: str = "train"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    folder = dataset_folder(data_dir)
    self.folder = folder
    self.split = split
    self._builder = tfds.builder_from_directory(folder)
    if split not in self._builder.info.splits:
      raise DataError(f"{folder}: no split {split!r} (have {sorted(self._builder.info.splits)})")
    self._source = self._builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rec = dict(self._source[int(index)])
    for k in ("caption", "uttid"):
      if isinstance(rec.get(k), bytes):
        rec[k] = rec[k].decode("utf-8")
    return rec

  def bucket_keys(self) -> np.ndarray:
    """`[N, 3]` (num_sections, height, width) per record, decoding only those fields."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    skip = tfds.decode.SkipDecoding()
    light = self._builder.as_data_source(
        split=self.split, decoders={"latents": skip, "prompt_embed": skip})
    out = np.zeros((len(light), 3), np.int64)
    for i in range(len(light)):
      r = light[i]
      out[i] = (int(r["num_sections"]), int(r["height"]), int(r["width"]))
    return out


def load_source(data_dir: str, split: str = "train") -> LatentSource:
  """The prepared latents of `data_dir` (see `LatentSource`); raises `DataError` if absent."""
  return LatentSource(data_dir, split)
