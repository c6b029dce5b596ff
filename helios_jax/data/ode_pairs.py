"""The ODE-pairs dataset on disk: writer and grain source (Stage 3a, spec training.md §7.4).

Recorded by `python -m helios_jax.training.ode_pairs` (the teacher trajectories), read by the
Stage 3a trainer. Layout: `<dir>/index.json` + one `<dir>/NNNNNN.npz` per prompt, each with
static shapes (S sections, stage k of size h_k x w_k, m_k = 2 n_k student steps in the
amplified section 0):

  "text"  [L, D] float32           the prompt embedding the teacher saw (zero padded)
  "xt{k}" [S, m_k, 9, h_k, w_k, C] float32  x_t at the recorded steps (zero padded: section 0
                                    holds 2 n_k, later sections n_k)
  "t{k}"  [S, m_k] float32         recorded teacher timesteps (padding -1)
  "n{k}"  [S] int32                valid steps per section
  "end{k}" [S, 9, h_k, w_k, C] float32  stage endpoints
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from helios_jax import checkpoint

FORMAT = "helios_jax.ode_pairs"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"


class OdePairsError(ValueError):
  """A missing / corrupt ODE-pairs dataset, or records with mismatched shapes."""


def record_keys(num_stages: int) -> tuple[str, ...]:
  """The array names of one record."""
  return ("text",) + tuple(f"{p}{k}" for k in range(num_stages)
                           for p in ("xt", "t", "n", "end"))


def _check_records(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[tuple, str]]:
  if not records:
    raise OdePairsError("no records to write")
  first = records[0]
  keys = set(first)
  if "text" not in keys or "xt0" not in keys:
    raise OdePairsError(f"record 0 has keys {sorted(keys)}; expected {record_keys(3)}")
  spec = {k: (tuple(np.shape(v)), np.asarray(v).dtype.str) for k, v in first.items()}
  for i, r in enumerate(records):
    if set(r) != keys:
      raise OdePairsError(f"record {i} has keys {sorted(r)}, record 0 has {sorted(keys)}")
    for k, v in r.items():
      got = (tuple(np.shape(v)), np.asarray(v).dtype.str)
      if got != spec[k]:
        raise OdePairsError(f"record {i} field {k!r}: shape/dtype {got} differs from record 0's "
                            f"{spec[k]} (records need static shapes)")
  return spec


def write_dataset(out_dir: str, records: Sequence[Mapping[str, Any]],
                  info: Mapping[str, Any] | None = None,
                  record_meta: Sequence[Mapping[str, Any]] | None = None,
                  overwrite: bool = False) -> str:
  """Writes records as `<out_dir>/NNNNNN.npz` + `index.json`, atomically.

  Everything is written into a temporary sibling directory that is renamed to `out_dir` only
  when complete, so a failure leaves nothing (or the previous dataset, with `overwrite`).

  Args:
    out_dir: destination folder (must not exist unless `overwrite`).
    records: dicts of arrays with identical keys, shapes and dtypes.
    info: teacher settings (`dataset_info`), stored in the index.
    record_meta: optional per-record JSON-able metadata (uttid, caption, ...).
    overwrite: replace an existing `out_dir`.

  Returns:
    `out_dir`.
  """
  spec = _check_records(records)
  if record_meta is not None and len(record_meta) != len(records):
    raise OdePairsError(f"record_meta has {len(record_meta)} entries for {len(records)} records")
  files = [f"{i:06d}.npz" for i in range(len(records))]
  index = {
      "format": FORMAT, "version": FORMAT_VERSION, "num_records": len(records),
      "fields": {k: {"shape": list(s), "dtype": d} for k, (s, d) in sorted(spec.items())},
      "info": dict(info or {}),
      "records": [{"file": f, **dict((record_meta or [{}] * len(records))[i])}
                  for i, f in enumerate(files)]}
  with checkpoint.atomic_directory(out_dir, overwrite=overwrite) as tmp:
    for f, r in zip(files, records):
      with open(os.path.join(tmp, f), "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in r.items()})
    with open(os.path.join(tmp, INDEX_FILE), "w") as fh:
      json.dump(index, fh, indent=1)
  return out_dir


class OdePairsSource:
  """Random-access view of a written ODE-pairs dataset (a grain `MapDataset` source).

  `len(source)`, `source[i]` -> dict of numpy arrays (see the module docstring); `info` holds
  the teacher settings and `fields` the per-key shape/dtype every record has.
  """

  def __init__(self, data_dir: str):
    self.data_dir = os.path.abspath(os.fspath(data_dir))
    if not os.path.isdir(self.data_dir):
      raise OdePairsError(f"ODE-pairs dataset not found: {self.data_dir}")
    path = os.path.join(self.data_dir, INDEX_FILE)
    if not os.path.isfile(path):
      raise OdePairsError(f"{self.data_dir} is not an ODE-pairs dataset (no {INDEX_FILE}; "
                          "write one with `python -m helios_jax.training.ode_pairs`)")
    try:
      with open(path) as fh:
        index = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
      raise OdePairsError(f"corrupt ODE-pairs index {path}: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
      raise OdePairsError(f"{path}: not an ODE-pairs index (format="
                          f"{index.get('format') if isinstance(index, dict) else None!r}, "
                          f"expected {FORMAT!r})")
    if index.get("version") != FORMAT_VERSION:
      raise OdePairsError(f"{path}: version {index.get('version')} is not the supported "
                          f"{FORMAT_VERSION}")
    try:
      self.fields = {k: (tuple(int(d) for d in v["shape"]), np.dtype(v["dtype"]))
                     for k, v in index["fields"].items()}
      self.files = [str(r["file"]) for r in index["records"]]
      self.records = list(index["records"])
    except (KeyError, TypeError, ValueError) as e:
      raise OdePairsError(f"{path}: malformed index ({type(e).__name__}: {e})") from e
    if len(self.files) != index.get("num_records"):
      raise OdePairsError(f"{path}: lists {len(self.files)} files for num_records="
                          f"{index.get('num_records')}")
    missing = [f for f in self.files if not os.path.isfile(os.path.join(self.data_dir, f))]
    if missing:
      raise OdePairsError(f"{self.data_dir}: {len(missing)} record file(s) missing, e.g. "
                          f"{os.path.join(self.data_dir, missing[0])}")
    self.info = dict(index.get("info", {}))

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self.files):
      raise IndexError(f"record {index} outside [0, {len(self.files)}) of {self.data_dir}")
    path = os.path.join(self.data_dir, self.files[index])
    try:
      with np.load(path, allow_pickle=False) as z:
        rec = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / format errors of a truncated or foreign file
      raise OdePairsError(f"corrupt ODE-pairs record {path}: {type(e).__name__}: {e}") from e
    if set(rec) != set(self.fields):
      raise OdePairsError(f"{path}: fields {sorted(rec)} differ from the index's "
                          f"{sorted(self.fields)}")
    for k, (shape, dtype) in self.fields.items():
      if rec[k].shape != shape or rec[k].dtype != dtype:
        raise OdePairsError(f"{path}: field {k!r} has shape {rec[k].shape} dtype {rec[k].dtype}, "
                            f"the index says {shape} {dtype}")
    return rec
