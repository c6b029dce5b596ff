"""Qwix PTQ of the DiT (helios_jax/quantize.py): error bounds on the tiny preset, kept layers,
bad modes. Bounds are the measured CPU errors (benchmarks/quant_quality.py) times ~2.5."""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from conftest import dit_inputs
from helios_jax import quantize as quant
from helios_jax.config import HeliosTransformerConfig
from helios_jax.models import transformer as transformer_lib

# Measured (jax 0.10.2 CPU): forward fp8 0.059 / fp8+keep 0.028 / int8w 0.010 / int8w+keep
# 0.007; 3-chunk Distilled latents fp8 0.046 / 0.027, int8w 0.011 / 0.008.
FORWARD_BOUNDS = {("fp8", False): 0.15, ("fp8", True): 0.07, ("int8w", False): 0.03,
                  ("int8w", True): 0.02}
PIPELINE_BOUNDS = {("fp8", True): 0.07}  # int8w: benchmarks/quant_quality.py (time budget)


@pytest.fixture(scope="module")
def tiny():
  cfg = HeliosTransformerConfig.PRESETS["tiny"]
  model = transformer_lib.init_transformer(cfg, jnp.bfloat16, seed=0)
  inputs = dit_inputs(cfg, jnp.bfloat16)
  return model, inputs, np.asarray(model(**inputs), np.float32)


def _rel(x, ref):
  x = np.asarray(x, np.float32)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("mode,kept", sorted(FORWARD_BOUNDS))
def test_forward_error_bounded(tiny, mode, kept):
  model, inputs, ref = tiny
  q = quant.quantize_transformer(model, mode, quant.DEFAULT_KEEP if kept else ())
  err = _rel(q(**inputs), ref)
  assert 1e-4 < err < FORWARD_BOUNDS[mode, kept], err  # quantized (not a no-op), and close


def test_kept_layers_stay_bf16_and_blocks_are_quantized(tiny):
  model, _, _ = tiny
  before = quant.kernel_dtypes(model)
  for mode, qdtype in (("fp8", "float8_e4m3fn"), ("int8w", "int8")):
    q = quant.quantize_transformer(model, mode)
    after = quant.kernel_dtypes(q)
    assert set(after) == set(before)
    for path, dt in after.items():
      if any(re.fullmatch(p, path) for p in quant.DEFAULT_KEEP):
        assert dt == before[path], (path, dt)  # bf16 (fp32 for the time embedder)
      else:
        assert path.startswith("blocks/") and dt == qdtype, (path, dt)
    assert set(q.quantized_paths) == {p for p in after if p.startswith("blocks/")}
    assert quant.param_bytes(q.params) < quant.param_bytes(model.params)
  # The input model is untouched.
  assert quant.kernel_dtypes(model) == before
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(model.params))


def test_keep_everything_but_one_layer(tiny):
  model, inputs, ref = tiny
  keep = (r"condition_embedder/.*", r"proj_out", r"blocks/attn\d/.*", r"blocks/ffn/proj_out")
  q = quant.quantize_transformer(model, "int8w", keep)
  assert q.quantized_paths == ("blocks/ffn/proj_in",)
  assert 0 < _rel(q(**inputs), ref) < FORWARD_BOUNDS["int8w", True]


def test_bad_mode_and_patterns_are_named(tiny):
  model, _, _ = tiny
  with pytest.raises(ValueError, match=r"'fp4'.*\['fp8', 'int8w'\]"):
    quant.quantize_transformer(model, "fp4")
  with pytest.raises(ValueError, match="blocks/nope"):
    quant.quantize_transformer(model, "int8w", ("blocks/nope",))
  q = quant.quantize_transformer(model, "int8w")
  with pytest.raises(ValueError, match="already quantized"):
    quant.quantize_transformer(q, "int8w")


def test_fp8_unsupported_platform_error(monkeypatch, tiny):
  model, _, _ = tiny
  monkeypatch.setattr(quant, "fp8_supported", lambda platform=None: (False, "no fp8 here"))
  with pytest.raises(RuntimeError, match="fp8.*no fp8 here.*int8w"):
    quant.quantize_transformer(model, "fp8")


def test_cpu_runs_fp8_dots():
  assert quant.fp8_supported("cpu") == (True, "")


def test_abstract_model_quantizes_by_shape():
  cfg = HeliosTransformerConfig.PRESETS["tiny"]
  graphdef, abstract = transformer_lib.TRANSFORMER_SPEC.abstract(cfg, jnp.bfloat16)
  q = quant.quantize_transformer(
      transformer_lib.HeliosTransformer(cfg, nnx.merge(graphdef, abstract)), "fp8")
  leaves = jax.tree.leaves(q.params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert any(x.dtype == jnp.float8_e4m3fn for x in leaves)


def test_three_chunk_distilled_latents(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "quant_quality", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                    "quant_quality.py"))
  qq = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(qq)
  from helios_jax import pipeline as pl  # pylint: disable=g-import-not-at-top
  from helios_jax import presets  # pylint: disable=g-import-not-at-top
  folder = presets.write_tiny_pipeline(tmp_path / "tiny", "distilled")
  with pytest.raises(ValueError, match="'fp4'"):
    pl.Pipeline.from_pretrained(folder, dtype=jnp.bfloat16, quantize="fp4")
  q = pl.Pipeline.from_pretrained(folder, dtype=jnp.bfloat16, load_text_encoder=False,
                                  quantize="int8w")
  assert quant.kernel_dtypes(q.transformer)["blocks/ffn/proj_in"] == "int8"
  assert quant.kernel_dtypes(q.transformer)["proj_out"] == "bfloat16"
  pipe = pl.Pipeline.from_pretrained(folder, dtype=jnp.bfloat16, load_text_encoder=False)
  rows = qq.pipeline_errors(pipe, [(m, quant.DEFAULT_KEEP) for m, _ in sorted(PIPELINE_BOUNDS)])
  for (mode, _), (_, err, _) in zip(sorted(PIPELINE_BOUNDS), rows[1:]):
    assert 1e-4 < err < PIPELINE_BOUNDS[mode, True], (mode, err)


def test_keep_blocks_segments_the_stack(tiny):
  """Kept blocks stay bf16 (their own stacked segment), the rest quantized; the forward is the
  segmented program, and keeping blocks never moves it further from bf16 on this model."""
  model, inputs, ref = tiny
  n = model.config.num_layers
  for mode, qdtype in (("fp8", "float8_e4m3fn"), ("int8w", "int8")):
    q = quant.quantize_transformer(model, mode, keep_blocks="first:1")
    assert q.keep_blocks == (0,)
    dt = quant.kernel_dtypes(q)
    assert dt["blocks/0/ffn/proj_in"] == "bfloat16" and dt["blocks/1/ffn/proj_in"] == qdtype
    assert all(p.startswith("blocks/1/") for p in q.quantized_paths)
    # The kept segment holds exactly the original weights of block 0.
    np.testing.assert_array_equal(
        np.asarray(q.params["blocks"][0]["ffn"]["proj_in"]["kernel"][...], np.float32),
        np.asarray(model.params["blocks"]["ffn"]["proj_in"]["kernel"][...][:1], np.float32))
    err = _rel(q(**inputs), ref)
    full = _rel(quant.quantize_transformer(model, mode)(**inputs), ref)
    assert 1e-4 < err <= full, (mode, err, full)
  with pytest.raises(ValueError, match="keeps all"):
    quant.quantize_transformer(model, "int8w", keep_blocks=f"first:{n}")


def test_parse_blocks_forms_and_errors():
  assert quant.parse_blocks("first:3,last:3", 40) == (0, 1, 2, 37, 38, 39)
  assert quant.parse_blocks("5-7, 9", 40) == (5, 6, 7, 9)
  assert quant.parse_blocks([0, -1], 40) == (0, 39)
  assert quant.parse_blocks("", 40) == ()
  for bad, msg in (("first:0", "first:0"), ("3-1", "3-1"), ("40", "40"), ("top:2", "top:2"),
                   ("-41", "-41")):
    with pytest.raises(ValueError, match=msg):
      quant.parse_blocks(bad, 40)
