"""Pre-quantized DiT export (`convert --quantize`, quantize.export_quantized) and its loaders.

The source is the tiny random pipeline (presets.write_tiny_pipeline) exported to the diffusers
safetensors layout (helios_jax.export), i.e. what `convert` reads for a released checkpoint.
The export must hold exactly the arrays that quantize-on-load computes (same `_quantize_value`
on the same bf16 leaves), so params and outputs are compared for exact equality.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import dit_inputs
from helios_jax import checkpoint, convert, export, presets
from helios_jax import pipeline as pl
from helios_jax import quantize as quant
from helios_jax.models import transformer as tr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QDTYPE = {"fp8": "float8_e4m3fn", "int8w": "int8"}
MODES = sorted(QDTYPE)
PIPE_MODE = "fp8"  # the pipeline-mode conversion (activation quantization included)


@pytest.fixture(scope="module")
def st_pipeline(tmp_path_factory):
  """A tiny distilled pipeline in the diffusers safetensors layout."""
  root = tmp_path_factory.mktemp("qexport")
  orbax = presets.write_tiny_pipeline(root / "orbax", "distilled")
  export.export(orbax, str(root / "st"), progress=False)
  return str(root / "st")


@pytest.fixture(scope="module")
def exports(st_pipeline, tmp_path_factory):
  """mode -> (export folder, quantize-on-load reference, its forward output); the source copy
  each export was made from is deleted afterwards."""
  root = tmp_path_factory.mktemp("exports")
  out = {}
  for mode in MODES:
    src, dst = str(root / f"src_{mode}"), str(root / f"q_{mode}")
    shutil.copytree(os.path.join(st_pipeline, "transformer"), src)
    info = quant.export_quantized(src, dst, mode, progress=False)
    ref = quant.quantize_transformer(tr.load_transformer(src, jnp.bfloat16), mode)
    shutil.rmtree(src)
    inputs = dit_inputs(ref.config, jnp.bfloat16)
    out[mode] = (dst, info, ref, inputs, np.asarray(ref(**inputs), np.float32))
  return out


@pytest.fixture(scope="module")
def converted(st_pipeline, tmp_path_factory):
  """The whole tiny pipeline converted with --quantize PIPE_MODE."""
  dst = str(tmp_path_factory.mktemp("converted") / "pipe")
  done = convert.convert(st_pipeline, dst, quantize=PIPE_MODE, progress=False)
  assert done == ["transformer", "vae", "text_encoder"]
  return dst


def _flat(t):
  return checkpoint.flatten_tree(nnx.to_pure_dict(t.params))


def _assert_bit_identical(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), "/".join(k))


def _stored_meta(folder):
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  return checkpoint.flatten_tree(ocp.metadata(os.path.join(folder, "params")).metadata)


def _dir_bytes(folder):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def _edit_json(folder, **changes):
  path = os.path.join(folder, checkpoint.QUANTIZATION_FILE)
  with open(path) as f:
    info = json.load(f)
  for k, v in changes.items():
    if v is None:
      del info[k]
    else:
      info[k] = v
  with open(path, "w") as f:
    json.dump(info, f)


# ------------------------------------------------------------------------------------------
# Round trip and storage.


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_is_bit_identical_without_the_source(exports, mode):
  dst, _, ref, inputs, ref_out = exports[mode]
  assert quant.is_quantized_export(dst) and not os.path.exists(dst.replace("q_", "src_"))
  got = quant.load_quantized_transformer(dst)
  assert got.quantize_mode == mode and got.quantized_paths == ref.quantized_paths
  assert got.dtype == jnp.bfloat16
  _assert_bit_identical(got, ref)
  np.testing.assert_array_equal(np.asarray(got(**inputs), np.float32), ref_out)
  assert quant.kernel_dtypes(got) == quant.kernel_dtypes(ref)


def test_stored_dtypes_schema_and_size(exports, st_pipeline, tmp_path):
  bf16 = str(tmp_path / "bf16")
  convert.convert(os.path.join(st_pipeline, "transformer"), bf16, "bfloat16", progress=False)
  for mode in MODES:
    dst, info, ref, _, _ = exports[mode]
    meta = _stored_meta(dst)
    for path in ref.quantized_paths:
      base = tuple(path.split("/")) + ("kernel", "array")
      assert str(meta[base + ("qvalue",)].dtype) == QDTYPE[mode], path
      assert str(meta[base + ("scale",)].dtype) == "bfloat16", path
      assert meta[base + ("scale",)].shape[1] == 1  # [L, 1, out]: per output channel
      assert tuple(path.split("/")) + ("kernel",) not in meta  # no bf16 copy of the kernel
    assert str(meta[("proj_out", "kernel")].dtype) == "bfloat16"  # kept (DEFAULT_KEEP)
    assert str(meta[("condition_embedder", "time_proj", "kernel")].dtype) == "bfloat16"
    assert str(meta[("condition_embedder", "time_embedder", "linear_1", "kernel")].dtype) == \
        "float32"  # fp32-kept module
    assert str(meta[("blocks", "scale_shift_table")].dtype) == "float32"
    # Array bytes: each quantized kernel's 2 B/element become 1 B + a bf16 [L, 1, out] scale;
    # the files shrink accordingly.
    nbytes = lambda m: int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
    plain = _stored_meta(bf16)
    saved = sum(nbytes(plain[tuple(p.split("/")) + ("kernel",)]) // 2 -
                nbytes(meta[tuple(p.split("/")) + ("kernel", "array", "scale")])
                for p in ref.quantized_paths)
    assert saved > 0
    assert sum(map(nbytes, meta.values())) == sum(map(nbytes, plain.values())) - saved
    assert _dir_bytes(os.path.join(dst, "params")) < _dir_bytes(os.path.join(bf16, "params"))
    with open(os.path.join(dst, checkpoint.QUANTIZATION_FILE)) as f:
      stored = json.load(f)
    assert stored == info
    assert stored["format"] == quant.EXPORT_FORMAT and stored["format_version"] == 1
    assert stored["mode"] == mode and stored["weight_qtype"] == QDTYPE[mode]
    assert stored["activation_qtype"] == ("float8_e4m3fn" if mode == "fp8" else None)
    assert stored["keep_bf16"] == list(quant.DEFAULT_KEEP)
    assert stored["quantized_paths"] == list(ref.quantized_paths)
    assert stored["requires"] == {"jax": "0.10.2", "qwix": "0.1.8"}
    assert stored["written_with"]["jax"] == jax.__version__
    assert set(stored["written_with"]) == {"jax", "jaxlib", "qwix", "orbax-checkpoint"}


def test_requires_matches_declared_lower_bounds():
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    text = f.read()
  for package, version in quant.REQUIRES.items():
    assert re.search(rf'"{package}>={re.escape(version)},', text), (package, version)


# ------------------------------------------------------------------------------------------
# Pipelines.


def test_pipeline_from_converted_equals_quantize_on_load(st_pipeline, converted):
  assert quant.is_quantized_export(os.path.join(converted, "transformer"))
  for c in ("vae", "text_encoder"):  # converted as without --quantize
    assert checkpoint.is_orbax_export(os.path.join(converted, c))
    assert not quant.is_quantized_export(os.path.join(converted, c))
  kw = dict(num_frames=33, height=64, width=64, seed=3)
  pre = pl.Pipeline.from_pretrained(converted)
  assert pre.transformer.quantize_mode == PIPE_MODE
  got = pre.generate("A cat walks on the grass.", **kw)
  ref_pipe = pl.Pipeline.from_pretrained(st_pipeline, quantize=PIPE_MODE)
  _assert_bit_identical(pre.transformer, ref_pipe.transformer)
  ref = ref_pipe.generate("A cat walks on the grass.", **kw)
  assert got.frames.shape == (33, 64, 64, 3)
  np.testing.assert_array_equal(got.latents, ref.latents)
  np.testing.assert_array_equal(got.frames, ref.frames)
  # The same mode asked again is accepted.
  same = pl.Pipeline.from_pretrained(converted, quantize=PIPE_MODE, load_text_encoder=False)
  assert same.transformer.quantize_mode == PIPE_MODE


def test_kept_blocks_round_trip_and_low_memory_load(st_pipeline, tmp_path):
  """keep_blocks: stored per segment, bit-identical to quantize-on-load, and loadable straight
  into host memory (low-memory mode) with the same output."""
  from helios_jax import offload  # pylint: disable=g-import-not-at-top
  src = os.path.join(st_pipeline, "transformer")
  dst = str(tmp_path / "q")
  info = quant.export_quantized(src, dst, "int8w", keep_blocks="last:1", progress=False)
  assert info["keep_blocks"] == [1]
  meta = _stored_meta(dst)
  assert meta[("blocks", "1", "ffn", "proj_in", "kernel")].dtype == np.dtype(jnp.bfloat16)
  assert meta[("blocks", "0", "ffn", "proj_in", "kernel", "array", "qvalue")].dtype == np.int8
  ref = quant.quantize_transformer(tr.load_transformer(src, jnp.bfloat16), "int8w",
                                   keep_blocks=[1])
  got = quant.load_quantized_transformer(dst)
  assert got.quantized_paths == ref.quantized_paths
  _assert_bit_identical(got, ref)
  low = offload.offload_blocks(
      quant.load_quantized_transformer(dst, placement=offload.load_placement()))
  assert {x.sharding.memory_kind for x in jax.tree.leaves(low.params["blocks"])} == {
      offload.HOST_MEMORY_KIND}
  inputs = dit_inputs(ref.config, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(low(**inputs), np.float32),
                                np.asarray(ref(**inputs), np.float32))


def test_from_pretrained_refuses_other_mode_lora_and_dtype(converted):
  with pytest.raises(ValueError, match=f"'{PIPE_MODE}'.*'int8w'"):
    pl.Pipeline.from_pretrained(converted, quantize="int8w")
  with pytest.raises(ValueError, match="LoRA must be fused before quantizing"):
    pl.Pipeline.from_pretrained(converted, lora=[("adapter.safetensors", 1.0)])
  with pytest.raises(ValueError, match="dtype=float32"):
    pl.Pipeline.from_pretrained(converted, dtype=jnp.float32)
  with pytest.raises(ValueError, match="pre-quantized.*drop keep_bf16 / keep_blocks"):
    pl.Pipeline.from_pretrained(converted, keep_blocks="first:1")


def test_generate_cli_checks_a_quantized_pipeline_before_loading(converted, tmp_path):
  out = tmp_path / "v.mp4"
  res = subprocess.run([sys.executable, "-m", "helios_jax.generate", f"--model_dir={converted}",
                        "--quantize=int8w", f"--out={out}", "--num_frames=33", "--height=64",
                        "--width=64"], capture_output=True, text=True, check=False, cwd=ROOT)
  assert res.returncode == 2, res.stderr[-2000:]
  assert f"pre-quantized with mode '{PIPE_MODE}'" in res.stderr and "loaded " not in res.stdout
  assert not out.exists()


# ------------------------------------------------------------------------------------------
# Errors.


def test_too_old_packages_are_named(exports, tmp_path):
  dst = str(tmp_path / "q")
  shutil.copytree(exports["int8w"][0], dst)
  _edit_json(dst, requires={"jax": "99.0", "qwix": "0.1.8"})
  with pytest.raises(RuntimeError, match=rf"needs jax >= 99\.0, installed jax "
                                         rf"{re.escape(jax.__version__)}"):
    quant.load_quantized_transformer(dst)
  _edit_json(dst, requires={"jax": "0.10.2", "qwix": "7.1"})
  with pytest.raises(RuntimeError, match=r"needs qwix >= 7\.1, installed qwix 0\.1\.8"):
    quant.load_quantized_transformer(dst)
  _edit_json(dst, requires={"jax": "0.9.0", "qwix": "0.1"})  # older requirements load fine
  _assert_bit_identical(quant.load_quantized_transformer(dst), exports["int8w"][2])


@pytest.mark.parametrize("packaging", [True, False])
def test_versions_compare_numerically(monkeypatch, packaging):
  if not packaging:  # the fallback parser (packaging is not a declared dependency)
    monkeypatch.setattr(quant, "_packaging_version", None)
  key = quant._version_key  # pylint: disable=protected-access
  assert key("0.10.2") > key("0.9.10") and key("0.10.10") > key("0.10.9")
  assert key("0.10") == key("0.10.0") and key("1.0.0") > key("0.99")
  assert key("0.11.0") > key("0.10.2") and not key("0.10.2") < key("0.10.2")
  with pytest.raises(ValueError):
    key("x.y")


@pytest.mark.parametrize("changes,match", [
    (dict(format_version=2), r"'format_version' is 2; this helios-jax reads version 1.*newer"),
    (dict(format_version="1"), r"'format_version' is '1'"),
    (dict(format="other"), r"'format' is 'other'"),
    (dict(mode="int4"), r"'mode' is 'int4'"),
    (dict(mode=None), r"'mode' is missing"),
    (dict(weight_qtype="float8_e4m3fn"), r"'weight_qtype' is 'float8_e4m3fn'; mode 'int8w'"),
    (dict(requires={"jax": "x.y"}), r"'requires'"),
    (dict(quantized_paths=["blocks/ffn/proj_in"]), r"'quantized_paths'.*model only"),
    (dict(keep_bf16=["nothing/here"]), r"'keep_bf16'.*nothing/here"),
])
def test_bad_quantization_json_is_named(exports, tmp_path, changes, match):
  dst = str(tmp_path / "q")
  shutil.copytree(exports["int8w"][0], dst)
  _edit_json(dst, **changes)
  with pytest.raises(checkpoint.CheckpointError, match=match) as e:
    quant.load_quantized_transformer(dst)
  assert checkpoint.QUANTIZATION_FILE in str(e.value)


def test_bf16_loaders_refuse_and_non_exports_are_named(exports, st_pipeline):
  dst = exports["int8w"][0]
  with pytest.raises(checkpoint.CheckpointError, match="load_quantized_transformer"):
    tr.load_transformer(dst, jnp.bfloat16)
  with pytest.raises(checkpoint.CheckpointError, match="load_quantized_transformer"):
    checkpoint.load_model(tr.TRANSFORMER_SPEC, dst)
  plain = os.path.join(st_pipeline, "transformer")
  assert not quant.is_quantized_export(plain)
  with pytest.raises(checkpoint.CheckpointError, match="quantization.json not found"):
    quant.load_quantized_transformer(plain)


def test_convert_argument_errors_before_work(st_pipeline, tmp_path):
  dst = str(tmp_path / "out")
  dit = os.path.join(st_pipeline, "transformer")
  for dtype in ("float32", "float16"):
    with pytest.raises(ValueError, match=f"--dtype={dtype}.*--quantize=int8w"):
      convert.convert(st_pipeline, dst, dtype, quantize="int8w", progress=False)
  with pytest.raises(ValueError, match="transformer only.*the vae"):
    convert.convert(os.path.join(st_pipeline, "vae"), dst, quantize="int8w", progress=False)
  with pytest.raises(ValueError, match="'fp4'"):
    convert.convert(dit, dst, quantize="fp4", progress=False)
  for kw in (dict(keep_bf16=["proj_out"]), dict(keep_blocks="first:1")):
    with pytest.raises(ValueError, match="--keep_bf16 / --keep_blocks apply only with --quantize"):
      convert.convert(dit, dst, progress=False, **kw)
  with pytest.raises(ValueError, match="'last:7'"):
    convert.convert(dit, dst, quantize="int8w", keep_blocks="last:7", progress=False)
  with pytest.raises(ValueError, match=r"'\('"):
    convert.convert(dit, dst, quantize="int8w", keep_bf16=["("], progress=False)
  with pytest.raises(ValueError, match="blocks/nope"):
    convert.convert(dit, dst, quantize="int8w", keep_bf16=["blocks/nope"], progress=False)
  assert os.listdir(tmp_path) == []


def test_failed_export_leaves_nothing(st_pipeline, tmp_path, monkeypatch):
  calls = []
  real = quant._quantize_value  # pylint: disable=protected-access

  def failing(value, how, stacked):
    if not isinstance(value, jax.ShapeDtypeStruct):  # the streamed leaves, not the planning
      calls.append(stacked)
      if len(calls) == 3:
        raise RuntimeError("disk on fire")
    return real(value, how, stacked)

  monkeypatch.setattr(quant, "_quantize_value", failing)
  monkeypatch.setattr(checkpoint, "GROUP_BYTES", 1)  # one Orbax partial save per leaf
  saves = []
  real_save = checkpoint.save_params_streaming

  def counting_save(path, groups):
    return real_save(path, (saves.append(path) or g for g in groups))

  monkeypatch.setattr(checkpoint, "save_params_streaming", counting_save)
  dst = str(tmp_path / "q")
  with pytest.raises(RuntimeError, match="disk on fire"):
    quant.export_quantized(os.path.join(st_pipeline, "transformer"), dst, "int8w",
                           progress=False)
  assert len(calls) == 3 and len(saves) > 3  # failed midway, after partial saves
  assert os.listdir(tmp_path) == []
  pipe_dst = str(tmp_path / "pipe")
  calls.clear()
  with pytest.raises(RuntimeError, match="disk on fire"):
    convert.convert(st_pipeline, pipe_dst, quantize="int8w", progress=False)
  assert os.listdir(tmp_path) == []


def test_cli_quantize_int8w_with_keep_bf16(st_pipeline, tmp_path):
  src, dst = os.path.join(st_pipeline, "transformer"), str(tmp_path / "q")
  keep = ("condition_embedder/.*", "proj_out", "blocks/ffn/proj_out")
  cmd = [sys.executable, "-m", "helios_jax.convert", f"--src={src}", f"--dst={dst}",
         "--quantize=int8w", f"--keep_bf16={','.join(keep)}"]
  res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-2000:]
  assert f"converted transformer -> {dst}" in res.stdout
  got = quant.load_quantized_transformer(dst)
  assert got.quantize_mode == "int8w" and "blocks/ffn/proj_out" not in got.quantized_paths
  ref = quant.quantize_transformer(tr.load_transformer(src, jnp.bfloat16), "int8w", keep)
  _assert_bit_identical(got, ref)
  res = subprocess.run(cmd[:4] + [f"--dst={tmp_path / 'bad'}", "--quantize=int8w",
                                  "--dtype=float32"],
                       capture_output=True, text=True, check=False, cwd=ROOT)
  assert res.returncode == 2 and "--dtype=float32" in res.stderr, res.stderr[-2000:]
  assert not (tmp_path / "bad").exists()
