"""Checkpoint exporter: our Orbax export -> diffusers/transformers safetensors (the inverse of convert).

  python -m helios_jax.export --src DIR --dst DIR [--dtype keep|float32|bfloat16|float16]
      [--max_shard_size 5GB] [--overwrite]

`--src` is one component folder in our export layout (`config.json` + `params/`: a
`python -m helios_jax.convert` output, `presets.write_tiny_pipeline` component, or what
`python -m helios_jax.training.merge [--ema]` writes), or a whole pipeline folder
(`model_index.json` + `transformer/ vae/ text_encoder/` in that layout + `tokenizer/
scheduler/`). The result is what `save_pretrained` writes: `config.json` plus
`diffusion_pytorch_model.safetensors` (diffusers; `model.safetensors` for the umT5 text
encoder), split into `*-0000i-of-0000n.safetensors` shards of at most `--max_shard_size` with a
`*.safetensors.index.json` (`weight_map`) when larger; for a pipeline also `model_index.json`,
`tokenizer/` and `scheduler/`, copied. It loads unchanged with
`diffusers.HeliosTransformer3DModel` / `AutoencoderKLWan` / `transformers.UMT5EncoderModel` /
`diffusers.HeliosPyramidPipeline.from_pretrained`.

`--dtype keep` (default) writes every tensor in its stored dtype, bit for bit; another dtype
applies the model's precision policy (fp32-kept transformer modules stay fp32).

Memory: one Orbax leaf (all stacked layers of it, or a batch of small leaves up to 256 MB) is
read at a time and each PyTorch tensor is sliced, transposed and written straight into its
shard (the safetensors header is computed up front from the metadata), so peak host RAM is
about the process baseline (~1 GB) + max(256 MB, the largest stored leaf) + two copies of the
largest per-layer tensor, independent of `--max_shard_size`: for the 14B bf16 DiT, the stacked
FFN kernels (40 x 5120 x 13824 x 2 B = 5.7 GB) + 2 x 141 MB, about 7 GB in all
(benchmarks/convert_memory.py --mode export measures it). `--dst` is written atomically (a
failure leaves nothing behind) after a free-space check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Any

from absl import flags

from helios_jax import checkpoint
from helios_jax import components
from helios_jax import runtime

COMPONENTS = components.COMPONENTS
COPIED = components.COPIED
DTYPES = ("keep", "float32", "bfloat16", "float16")
# save_pretrained's weight file stem per component (diffusers models vs transformers models).
WEIGHTS_NAME = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model"}
DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
  """Bytes of a size like "5GB" (decimal units, as diffusers), "500MiB" or 1000000."""
  if isinstance(size, int):
    n = size
  else:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if m is None or m.group(2).upper() not in _UNITS:
      raise ValueError(f"--max_shard_size={size!r}: expected a size like 5GB, 500MB or 2GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if n <= 0:
    raise ValueError(f"--max_shard_size={size!r} must be positive")
  return n


class ComponentExport:
  """The plan for one component: source folder, config, `checkpoint.ExportPlan`.

  Reads only metadata; `write(dst)` does the work.

  Args:
    src: component folder in our export layout (`config.json` + `params/`).
    dtype: one of `DTYPES`.
  """

  def __init__(self, src: str, dtype: str = "keep"):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
    if dtype not in DTYPES:
      raise ValueError(f"--dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    self.src = src
    if not os.path.isdir(src):
      raise checkpoint.CheckpointError(f"--src folder not found: {src}")
    if not checkpoint.is_orbax_export(src):
      hint = (" (it is already a safetensors folder)" if checkpoint.is_safetensors_folder(src)
              else "")
      raise checkpoint.CheckpointError(
          f"{src}: not a helios_jax export (no {checkpoint.PARAMS_DIR}/"
          f"{checkpoint.ORBAX_MARKER}){hint}")
    self.component = components.detect_component(src)
    self.spec = components.get_spec(self.component)
    self.config = self.spec.read_config(src)
    self.params = os.path.join(src, checkpoint.PARAMS_DIR)
    try:
      meta = checkpoint.flatten_tree(ocp.metadata(self.params).metadata)
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoint.CheckpointError(f"{self.params}: unreadable Orbax metadata ({e})") from e
    policy = None if dtype == "keep" else jnp.dtype(dtype)
    _, abstract = self.spec.abstract(self.config, policy or jnp.float32)
    want = checkpoint.flatten_tree(abstract)
    missing = sorted("/".join(p) for p in want if p not in meta)
    extra = sorted("/".join(p) for p in meta if p not in want)
    if missing or extra:
      raise checkpoint.CheckpointError(
          f"{self.params}: parameter tree does not match the {self.component} config: missing "
          f"{missing[:10]}, unexpected {extra[:10]}")
    bad = [f"{'/'.join(p)}: {tuple(meta[p].shape)} vs {tuple(want[p].shape)}"
           for p in want if tuple(meta[p].shape) != tuple(want[p].shape)]
    if bad:
      raise checkpoint.CheckpointError(f"{self.params}: shape mismatch {bad[:10]}")
    self.meta = {p: meta[p] for p in want}  # the model's leaf order
    dtypes = None if policy is None else {p: want[p].dtype for p in want}
    self.plan = checkpoint.ExportPlan(
        {p: (m.shape, m.dtype) for p, m in self.meta.items()}, self.spec.key_map(self.config),
        checkpoint.INVERSE_KEY_MAPS[self.spec.name],
        stacked_len=self.spec.stacked_len(self.config), dtypes=dtypes)

  @property
  def nbytes(self) -> int:
    return self.plan.nbytes

  def library_config(self) -> dict[str, Any]:
    """The stored config.json (the original library keys), made loadable by that library."""
    with open(os.path.join(self.src, self.spec.config_cls.CONFIG_NAME)) as f:
      cfg = json.load(f)
    if self.component == "text_encoder":
      # transformers derives these (dense_act_fn, is_gated_act, ...) when absent; a null breaks
      # it. The weights' dtype is what `from_pretrained(dtype="auto")` loads them in.
      cfg = {k: v for k, v in cfg.items() if v is not None and k != "torch_dtype"}
      cfg.setdefault("architectures", ["UMT5EncoderModel"])
      cfg.setdefault("model_type", "umt5")
      by_dtype: dict[str, int] = {}
      for t in self.plan.tensors:
        by_dtype[t.dtype.name] = by_dtype.get(t.dtype.name, 0) + t.nbytes
      cfg["dtype"] = max(by_dtype, key=by_dtype.get)
    else:
      cfg.setdefault("_class_name", {"transformer": "HeliosTransformer3DModel",
                                     "vae": "AutoencoderKLWan"}[self.component])
    return cfg

  def write(self, dst: str, max_shard_bytes: int, progress: bool = False) -> list[str]:
    """Writes config.json + safetensors shards (+ index) into the existing folder `dst`."""
    cfg = self.library_config()
    with open(os.path.join(dst, self.spec.config_cls.CONFIG_NAME), "w") as f:
      json.dump(cfg, f, indent=2, sort_keys=True)
    stem = WEIGHTS_NAME[self.component]
    shards = self.plan.shards(max_shard_bytes)
    names = ([f"{stem}.safetensors"] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    shard_of = {t.key: i for i, shard in enumerate(shards) for t in shard}
    order = list(dict.fromkeys(t.path for t in self.plan.tensors))
    by_path: dict[checkpoint.FlaxPath, list[checkpoint.TorchTensor]] = {}
    for t in self.plan.tensors:
      by_path.setdefault(t.path, []).append(t)
    leaves = checkpoint.iter_orbax_leaves(self.params, self.meta, order)
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      leaves = tqdm(leaves, total=len(order), desc=f"export {self.component}", unit="tensor")
    writer, current = None, -1
    try:
      for path, value in leaves:
        for t in by_path[path]:
          if shard_of[t.key] != current:
            if writer is not None:
              writer.close()
            current = shard_of[t.key]
            writer = checkpoint.SafetensorsWriter(
                os.path.join(dst, names[current]),
                [(s.key, s.shape, s.dtype) for s in shards[current]])
          writer.write(t.key, self.plan.convert(t, value))
        del value
      if writer is not None:
        writer.close()
    except BaseException:
      if writer is not None:
        writer.__exit__(*sys.exc_info())
      raise
    if len(shards) > 1:
      index = {"metadata": {"total_size": self.plan.nbytes},
               "weight_map": {t.key: names[shard_of[t.key]] for t in self.plan.tensors}}
      with open(os.path.join(dst, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return names


def _pipeline_components(src: str) -> tuple[dict[str, Any], list[str]]:
  """(model_index, components present) of a pipeline folder; unknown/missing ones are errors."""
  index = os.path.join(src, "model_index.json")
  try:
    with open(index) as f:
      model_index = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise checkpoint.CheckpointError(f"{index}: unreadable ({e})") from e
  listed = [k for k, v in model_index.items() if not k.startswith("_")
            and isinstance(v, list) and len(v) == 2 and None not in v]
  unknown = [k for k in listed if k not in COMPONENTS + COPIED]
  if unknown:
    raise checkpoint.CheckpointError(f"{index}: unknown component(s) {unknown}; this exporter "
                                     f"handles {COMPONENTS + COPIED}")
  missing = [k for k in listed if not os.path.isdir(os.path.join(src, k))]
  if missing:
    raise checkpoint.CheckpointError(f"{src}: model_index.json lists {missing} but the "
                                     "folder(s) are missing")
  return model_index, [c for c in COMPONENTS if c in listed]


def _tree_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def export(src: str, dst: str, dtype: str = "keep", *,
           max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
           progress: bool = True) -> list[str]:
  """Exports a component or pipeline folder to the diffusers layout; returns the components.

  Args:
    src: our export of a component (`config.json` + `params/`) or of a pipeline.
    dst: output folder (must not exist unless `overwrite`; written atomically).
    dtype: one of `DTYPES` ("keep": every tensor in its stored dtype).
    max_shard_size: largest safetensors shard ("5GB", "500MB", bytes).
    overwrite: replace an existing `dst`.
    progress: show a progress bar per component.

  Raises:
    checkpoint.CheckpointError: `src` is missing, not our export, or holds an unknown component.
    FileExistsError: `dst` exists and not `overwrite`.
    runtime.OutputPathError: `dst` cannot be written or the disk is too small.
  """
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  max_bytes = parse_size(max_shard_size)
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: use one of {', '.join(DTYPES)}")
  if not os.path.isdir(src):
    raise checkpoint.CheckpointError(f"--src folder not found: {src}")
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"--dst already exists: {dst} (pass --overwrite)")
  is_pipeline = os.path.isfile(os.path.join(src, "model_index.json"))
  if is_pipeline:
    _, present = _pipeline_components(src)
    jobs = {c: ComponentExport(os.path.join(src, c), dtype) for c in present}
    for c, job in jobs.items():
      if job.component != c:
        raise checkpoint.CheckpointError(f"{src}/{c} holds a {job.component}, not a {c}")
    extra = sum(_tree_bytes(os.path.join(src, c)) for c in COPIED
                if os.path.isdir(os.path.join(src, c)))
  else:
    job = ComponentExport(src, dtype)
    jobs, extra = {job.component: job}, 0
  need = sum(j.nbytes for j in jobs.values()) + extra + (1 << 20)  # + configs and indexes
  runtime.check_writable(dst, need, folder=True)
  with checkpoint.atomic_directory(dst, overwrite=overwrite) as tmp:
    if not is_pipeline:
      job.write(tmp, max_bytes, progress)
      return [job.component]
    for c, j in jobs.items():
      os.makedirs(os.path.join(tmp, c))
      j.write(os.path.join(tmp, c), max_bytes, progress)
    for name in COPIED:
      if os.path.isdir(os.path.join(src, name)):
        shutil.copytree(os.path.join(src, name), os.path.join(tmp, name))
    shutil.copy2(os.path.join(src, "model_index.json"), os.path.join(tmp, "model_index.json"))
  return list(jobs)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI flags (defined only when run as a program, so modules can import this one)."""
  flags.DEFINE_string("src", None, "our export of a component or pipeline (config.json + params/, "
                      "or model_index.json + components)", required=True)
  flags.DEFINE_string("dst", None, "output folder (must not exist unless --overwrite)",
                      required=True)
  flags.DEFINE_enum("dtype", "keep", list(DTYPES),
                    "written dtype (keep: each tensor's stored dtype, lossless)")
  flags.DEFINE_string("max_shard_size", DEFAULT_MAX_SHARD_SIZE,
                      "largest safetensors shard (e.g. 5GB, 500MB, 2GiB)")
  flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


def main(argv):
  del argv
  return components.run_cli_action(
      lambda: export(FLAGS.src, FLAGS.dst, FLAGS.dtype, max_shard_size=FLAGS.max_shard_size,
                     overwrite=FLAGS.overwrite),
      "exported", FLAGS.dst)


if __name__ == "__main__":
  define_flags()
  runtime.run_cli(main)
