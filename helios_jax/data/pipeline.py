"""Grain input pipeline for Stages 1-2: bucketing, per-epoch shuffling, process sharding (spec §3.3).

Records (precomputed `latents.LatentSource` or `synthetic.SyntheticLatents`) are grouped by
bucket key (num_sections, height, width). Each epoch e, with one RNG seeded by seed + e:
every bucket is shuffled and cut into global batches (drop_last), and the list of all batches
is shuffled (the reference's "pick buckets at random"). All processes compute the same plan;
process p reads the contiguous slice [p * B/P, (p + 1) * B/P) of every global batch, so every
process has the same number of batches per epoch (the reference's strided sharding can give
ranks different counts, spec §3.3) and the global batch of P processes is exactly the batch a
single process would read.

Each sample is built on the host (`data.sections`): section c drawn with the seed
seed + 1e6 * epoch + record index, history / anchor / target cut from the zero-padded time
line, the text embedding zero-padded to `text_len`. Batch element g of the grain `MapDataset`
is global batch g (epoch g // batches_per_epoch), so the iterator state is one integer and
`get_state()` / `set_state()` (or Orbax via `grain.checkpoint`) resume exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from helios_jax.data.clips import DataError
from helios_jax.constants import CHUNK_LATENT_FRAMES
from helios_jax.data import sections as sections_lib

MAX_EPOCHS = 1_000_000


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Static input-pipeline settings.

  Attributes:
    global_batch_size: samples per optimizer step over all processes.
    seed: shuffling and section-choice seed.
    text_len: text rows per sample (512 for umT5 in the released models).
    num_threads: grain read threads per process.
    prefetch: grain prefetch buffer (batches).
  """

  global_batch_size: int
  seed: int = 0
  text_len: int = 512
  num_threads: int = 2
  prefetch: int = 2

  def __post_init__(self):
    if self.global_batch_size < 1:
      raise DataError(f"global_batch_size={self.global_batch_size} must be >= 1")
    if self.text_len < 1:
      raise DataError(f"text_len={self.text_len} must be >= 1")


class BatchPlan:
  """Which records form each global batch of each epoch (identical on every process).

  Args:
    keys: `[N, 3]` bucket key per record.
    global_batch: B.
    seed: shuffling seed.
  """

  def __init__(self, keys: np.ndarray, global_batch: int, seed: int):
    keys = np.asarray(keys)
    self.global_batch = int(global_batch)
    self.seed = int(seed)
    if keys.shape[0] == 0:
      raise DataError("the dataset is empty (0 records)")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, k in enumerate(map(tuple, keys.tolist())):
      groups.setdefault(k, []).append(i)
    self.buckets = {k: np.asarray(v, np.int64) for k, v in sorted(groups.items())}
    self.batches_per_epoch = sum(len(v) // self.global_batch for v in self.buckets.values())
    if self.batches_per_epoch == 0:
      sizes = {k: len(v) for k, v in self.buckets.items()}
      raise DataError(f"no full batch of global_batch_size={self.global_batch} fits in any bucket "
                      f"(records per (num_sections, height, width) bucket: {sizes}); lower the "
                      "batch size or add data")
    self._cache: dict[int, np.ndarray] = {}

  def epoch(self, e: int) -> np.ndarray:
    """`[batches_per_epoch, B]` record indices of epoch e."""
    if e not in self._cache:
      rng = np.random.default_rng(self.seed + int(e))
      batches = []
      for idx in self.buckets.values():
        perm = idx[rng.permutation(len(idx))]
        n = len(perm) // self.global_batch
        batches += list(perm[:n * self.global_batch].reshape(n, self.global_batch))
      order = rng.permutation(len(batches))
      if len(self._cache) >= 2:
        self._cache.pop(min(self._cache))
      self._cache[e] = np.stack([batches[i] for i in order])
    return self._cache[e]

  def batch(self, g: int) -> tuple[int, np.ndarray]:
    """(epoch, `[B]` record indices) of global batch g."""
    e, j = divmod(int(g), self.batches_per_epoch)
    return e, self.epoch(e)[j]


def build_sample(record: dict[str, Any], index: int, epoch: int, seed: int,
                 text_len: int) -> dict[str, np.ndarray]:
  """One training sample (spec §4 steps 1-4, 8) from a record.

  Args:
    record: {"latents" `[N, 9, h, w, C]`, "prompt_embed" `[n, D]`, ...}.
    index: the record's dataset index.
    epoch: the epoch.
    seed: data seed.
    text_len: padded text length.

  Returns:
    {"history" `[19, h, w, C]`, "anchor" `[1, h, w, C]`, "target" `[9, h, w, C]`,
     "text" `[text_len, D]`, "index", "section", "epoch"} as numpy arrays.
  """
  latents = np.asarray(record["latents"], np.float32)
  if latents.ndim != 5 or latents.shape[1] != CHUNK_LATENT_FRAMES:
    raise DataError(f"record {index} ({record.get('uttid', '?')}): latents shape {latents.shape} "
                    f"is not [N, {CHUNK_LATENT_FRAMES}, h, w, C]")
  if latents.shape[0] < 1:
    raise DataError(f"record {index} ({record.get('uttid', '?')}) has no section: the clip is "
                    "shorter than one 33-frame section")
  c = sections_lib.choose_section(latents.shape[0], seed, epoch, index)
  history, anchor, target = sections_lib.sample_from_sections(latents, c)
  emb = np.asarray(record["prompt_embed"], np.float32)
  if emb.ndim != 2:
    raise DataError(f"record {index}: prompt_embed shape {emb.shape} is not [n, D]")
  if emb.shape[0] > text_len:
    raise DataError(f"record {index} ({record.get('uttid', '?')}) has {emb.shape[0]} text rows, "
                    f"more than text_len={text_len}")
  text = np.zeros((text_len, emb.shape[1]), np.float32)
  text[:emb.shape[0]] = emb
  return {"history": history, "anchor": anchor, "target": target, "text": text,
          "index": np.int32(index), "section": np.int32(c), "epoch": np.int32(epoch)}


class _LoadBatch:
  """Global batch number -> this process's stacked samples (a picklable grain map)."""

  def __init__(self, source, plan: BatchPlan, cfg: InputConfig, process_index: int,
               process_count: int):
    self.source, self.plan, self.cfg = source, plan, cfg
    self.local = cfg.global_batch_size // process_count
    self.offset = process_index * self.local

  def __call__(self, g: int) -> dict[str, np.ndarray]:
    epoch, idx = self.plan.batch(g)
    # Sources with their own sample format (Stage 3 ODE pairs) provide `build_sample`.
    build = getattr(self.source, "build_sample", build_sample)
    samples = [build(self.source[int(i)], int(i), epoch, self.cfg.seed, self.cfg.text_len)
               for i in idx[self.offset:self.offset + self.local]]
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def make_dataset(source, cfg: InputConfig, process_index: int = 0, process_count: int = 1):
  """The grain `MapDataset` of this process's batches (element g = global batch g).

  Args:
    source: random-access records with `bucket_keys()`.
    cfg: pipeline settings.
    process_index, process_count: this process and the number of processes.

  Returns:
    (grain.MapDataset, BatchPlan).
  """
  import grain  # pylint: disable=g-import-not-at-top
  if cfg.global_batch_size % process_count:
    raise DataError(f"global_batch_size={cfg.global_batch_size} is not divisible by "
                    f"process_count={process_count}")
  if len(source) == 0:
    raise DataError("the dataset is empty (0 records)")
  plan = BatchPlan(source.bucket_keys(), cfg.global_batch_size, cfg.seed)
  total = plan.batches_per_epoch * MAX_EPOCHS
  ds = grain.MapDataset.range(total).map(
      _LoadBatch(source, plan, cfg, process_index, process_count))
  return ds, plan


def make_iterator(dataset, cfg: InputConfig):
  """A checkpointable grain iterator (`get_state` / `set_state`) with read threads + prefetch."""
  import grain  # pylint: disable=g-import-not-at-top
  it_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                    prefetch_buffer_size=cfg.prefetch))
  return iter(it_ds)
