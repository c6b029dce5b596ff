"""Low-memory mode (helios_jax/offload.py): DiT block weights in host memory, streamed per block.

The streamed scan runs the same block arithmetic on the same weights as the device-resident
scan; only where the weights live and when they are copied changes. So outputs agree to a few
ulps of the compute dtype (reduction order is the one place a compiler could differ), and the
program must really keep the stack in host memory and copy layers inside the loop.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import dit_inputs
from conftest import rel_err
from helios_jax import offload
from helios_jax import presets
from helios_jax import quantize as quant
from helios_jax.config import HeliosTransformerConfig
from helios_jax.models import memory
from helios_jax.models import transformer as transformer_lib

F32_ULP = 2.0 ** -23


@pytest.fixture(scope="module")
def tiny():
  cfg = HeliosTransformerConfig.PRESETS["tiny"]
  return cfg, transformer_lib.init_transformer(cfg, jnp.float32, seed=0)


def _memory_kinds(tree) -> set[str]:
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def test_blocks_live_on_host_rest_on_device(tiny):
  _, model = tiny
  low = offload.offload_blocks(model)
  assert _memory_kinds(low.params["blocks"]) == {offload.HOST_MEMORY_KIND}
  rest = {k: v for k, v in low.params.items() if k != "blocks"}
  assert _memory_kinds(rest) == {"device"}
  assert offload.is_offloaded(low) and not offload.is_offloaded(model)
  # The input model is untouched (its own arrays and graph).
  assert _memory_kinds(model.params["blocks"]) == {"device"}
  assert offload.block_bytes(low.params) == offload.block_bytes(model.params) > 0


def test_forward_equals_device_resident(tiny):
  cfg, model = tiny
  x = dit_inputs(cfg, jnp.float32)
  ref = model(**x)
  out = offload.offload_blocks(model)(**x)
  # Same ops on the same weights: a few fp32 ulps at most (reduction order).
  assert rel_err(out, ref) <= 16 * F32_ULP


@pytest.mark.parametrize("mode", ["int8w", "fp8"])
def test_quantized_forward_equals_device_resident(tiny, mode):
  cfg, _ = tiny
  bf16 = transformer_lib.init_transformer(cfg, jnp.bfloat16, seed=0)
  x = dit_inputs(cfg, jnp.bfloat16)
  q = quant.quantize_transformer(bf16, mode)
  ref = np.asarray(q(**x), np.float32)
  # Quantize, then offload; and offload, then quantize (kernels quantized from host memory).
  for low in (offload.offload_blocks(q),
              quant.quantize_transformer(offload.offload_blocks(bf16), mode)):
    assert _memory_kinds(low.params["blocks"]) == {offload.HOST_MEMORY_KIND}
    out = np.asarray(low(**x), np.float32)
    # bf16 outputs: a few bf16 ulps (2^-8 relative) at most.
    assert rel_err(out, ref) <= 4 * 2.0 ** -8, mode


def _eqns(jaxpr):
  """Every equation of a (closed) jaxpr, nested jaxprs included, with its enclosing primitives."""
  stack = [(jaxpr, ())]
  while stack:
    j, outer = stack.pop()
    j = getattr(j, "jaxpr", j)
    for e in j.eqns:
      yield e, outer
      for v in e.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
            stack.append((sub, outer + (e.primitive.name,)))


def test_program_copies_one_layer_at_a_time_inside_the_scan(tiny):
  cfg, model = tiny
  low = offload.offload_blocks(model)
  jaxpr = jax.make_jaxpr(low.forward)(low.params, dit_inputs(cfg, jnp.float32))
  to_device = [(e, outer) for e, outer in _eqns(jaxpr) if e.primitive.name == "device_put"
               and jax.memory.Space.Device in e.params.get("devices", ())]
  assert to_device, "no host->device copy in the program"
  in_scan = [e for e, outer in to_device if "scan" in outer]
  assert in_scan, "the layer copies are not inside the block scan"
  # Each copy inside the loop moves one layer (no leading layer axis), never the whole stack.
  n = cfg.num_layers
  stacked_shapes = {tuple(x.shape) for x in jax.tree.leaves(low.params["blocks"])}
  layer_shapes = {s[1:] for s in stacked_shapes}
  for e in in_scan:
    shapes = {tuple(v.aval.shape) for v in e.invars}
    assert shapes <= layer_shapes and not shapes & stacked_shapes, (shapes, n)
  # The device-resident model has no such copy.
  plain = jax.make_jaxpr(model.forward)(model.params, dit_inputs(cfg, jnp.float32))
  assert not [e for e, _ in _eqns(plain) if e.primitive.name == "device_put"
              and jax.memory.Space.Device in e.params.get("devices", ())]


def test_capture_path_matches(tiny):
  """The GAN feature capture (the scan cut into segments) streams too, with the same features."""
  cfg, model = tiny
  x = dit_inputs(cfg, jnp.float32)
  noisy = jnp.moveaxis(x["hidden_states"], 1, -1)
  hist = memory.HistoryInputs(short=jnp.moveaxis(x["latents_history_short"], 1, -1),
                              idx_short=x["indices_latents_history_short"])

  def run(t):
    return t.module().forward_channels_last(noisy, x["timestep"], x["encoder_hidden_states"],
                                            x["indices_hidden_states"], hist,
                                            capture_blocks=(0,))

  (ref, ref_f), (out, out_f) = run(model), run(offload.offload_blocks(model))
  assert rel_err(out, ref) <= 16 * F32_ULP
  assert rel_err(out_f[0], ref_f[0]) <= 16 * F32_ULP


def test_load_places_blocks_in_host_memory(tmp_path):
  path = presets.write_tiny_pipeline(tmp_path / "p")
  t = transformer_lib.load_transformer(os.path.join(path, "transformer"), jnp.bfloat16,
                                       placement=offload.load_placement())
  assert _memory_kinds(t.params["blocks"]) == {offload.HOST_MEMORY_KIND}
  assert _memory_kinds({k: v for k, v in t.params.items() if k != "blocks"}) == {"device"}
  ref = transformer_lib.load_transformer(os.path.join(path, "transformer"), jnp.bfloat16)
  for a, b in zip(jax.tree.leaves(t.params), jax.tree.leaves(ref.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unsupported_device_is_named(monkeypatch):
  monkeypatch.setattr(offload, "host_memory_kinds", lambda device=None: ["device"])
  with pytest.raises(RuntimeError, match="pinned_host.*memory kinds: \\['device'\\]"):
    offload.check_supported()


# ------------------------------------------------------------------------------------------
# The pipeline: from_pretrained(low_memory=True), generate, the CLI.


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  return presets.write_tiny_pipeline(tmp_path_factory.mktemp("lowmem") / "tiny", "distilled")


def _latents(pipe):
  rng = np.random.default_rng(1)
  emb = rng.standard_normal((1, 16, pipe.transformer.config.text_dim)).astype(np.float32)
  return pipe.generate(prompt_embeds=emb, num_frames=99, height=64, width=64, seed=5,
                       output_type="latent").latents


@pytest.mark.parametrize("quantize", [None, "int8w"])
def test_pipeline_low_memory_equals_normal_path(tiny_folder, quantize):
  """3 Distilled chunks (history, pyramid stages, DMD) from the streamed DiT == the normal path."""
  from helios_jax import pipeline as pl  # pylint: disable=g-import-not-at-top
  kw = dict(dtype=jnp.float32 if quantize is None else jnp.bfloat16, load_text_encoder=False,
            quantize=quantize)
  ref = _latents(pl.Pipeline.from_pretrained(tiny_folder, **kw))
  low = pl.Pipeline.from_pretrained(tiny_folder, low_memory=True, **kw)
  assert low.low_memory and _memory_kinds(low.transformer.params["blocks"]) == {
      offload.HOST_MEMORY_KIND}
  out = _latents(low)
  assert out.shape == ref.shape and out.shape[2] == 27  # 3 chunks of 9 latent frames
  # Same arithmetic: a few ulps of the compute dtype (fp32 / bf16), amplified by nothing else.
  ulp = F32_ULP if quantize is None else 2.0 ** -8
  assert rel_err(out, ref) <= 16 * ulp, rel_err(out, ref)


def test_low_memory_text_encoder_released_and_shard_refused(tiny_folder):
  from helios_jax import pipeline as pl  # pylint: disable=g-import-not-at-top
  from helios_jax import sharding  # pylint: disable=g-import-not-at-top
  low = pl.Pipeline.from_pretrained(tiny_folder, low_memory=True)
  assert low.release_text_encoder  # umT5 released after each prompt by default
  cpu = pl.Pipeline.from_pretrained(tiny_folder, low_memory=True,
                                    text_encoder_device=jax.devices("cpu")[0])
  assert not cpu.release_text_encoder  # placed explicitly: kept
  assert not pl.Pipeline.from_pretrained(tiny_folder, load_text_encoder=False).low_memory
  mesh = sharding.make_mesh("inference", jax.devices()[:1], data=1, context=1, tensor=1)
  with pytest.raises(ValueError, match="low_memory"):
    low.shard(mesh)


def test_offload_refuses_params_on_several_devices():
  class Leaf:
    def __init__(self, d):
      self._d = d

    def devices(self):
      return {self._d}

  with pytest.raises(ValueError, match="span 2 devices"):
    offload._single_device([Leaf("a"), Leaf("b")])  # pylint: disable=protected-access


def test_generate_cli_low_memory_and_bad_keep_blocks(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import SUBPROCESS_TIMEOUT_S  # pylint: disable=g-import-not-at-top
  out = tmp_path / "v.mp4"
  base = [sys.executable, "-m", "helios_jax.generate", "--num_frames", "33", "--height", "64",
          "--width", "64", "--out", str(out)]
  bad = subprocess.run(base + ["--keep_blocks", "first:1"], capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S)
  assert bad.returncode == 2 and "keep_blocks='first:1' need quantize" in bad.stderr
  bad = subprocess.run(base + ["--quantize", "int8w", "--keep_blocks", "first:9"],
                       capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
  assert bad.returncode == 2 and "first:9" in bad.stderr and not out.exists()
  ok = subprocess.run(base + ["--low_memory", "--quantize", "int8w", "--keep_blocks", "last:1"],
                      capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert out.stat().st_size > 0


def test_serve_cli_checks_model_options_before_loading(tmp_path):
  """The server shares generate's model flags (runtime.define_model_flags) and their checks."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import SUBPROCESS_TIMEOUT_S  # pylint: disable=g-import-not-at-top
  res = subprocess.run([sys.executable, "-m", "helios_jax.serve", "--out_dir",
                        str(tmp_path / "s"), "--quantize", "int8w", "--keep_blocks", "7-9",
                        "--low_memory"], capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S)
  assert res.returncode == 2 and "'7-9'" in res.stderr, res.stderr[-2000:]
  assert "serving" not in res.stdout


def test_generate_fn_base_variant_low_memory(tmp_path):
  """The single jitted whole-video function (Base: UniPC + CFG, chunks in one lax.scan) with the
  streamed DiT == the device-resident one."""
  from helios_jax import pipeline as pl  # pylint: disable=g-import-not-at-top
  folder = presets.write_tiny_pipeline(tmp_path / "base", "base")
  emb = np.random.default_rng(0).standard_normal((1, 16, 32)).astype(np.float32)
  outs = []
  for low in (False, True):
    pipe = pl.Pipeline.from_pretrained(folder, jnp.float32, load_text_encoder=False,
                                       low_memory=low)
    fn, inputs = pipe.generate_fn(66, 64, 64, prompt_embeds=emb,
                                  negative_prompt_embeds=0.5 * emb, steps=3)
    outs.append(fn(pipe.params, inputs, jax.random.key(1))["latents"])
  assert outs[0].shape[1] == 18  # 2 chunks
  assert rel_err(outs[1], outs[0]) <= 16 * F32_ULP


def test_memory_plan_lowers_the_14b_step_with_host_blocks():
  """benchmarks/memory_plan.py at full size, lowered only (no compile): "+low" keeps exactly the
  block weights on the host, and the 14B chunk step lowers with them there."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "memory_plan", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                  "memory_plan.py"))
  mp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mp)
  rows = {m: mp.plan(m, "distilled", 384, 640, compile_it=False)
          for m in ("bf16", "bf16+low", "int8w+low")}
  assert rows["bf16"]["host_bytes"] == 0
  for m in ("bf16+low", "int8w+low"):
    r = rows[m]
    assert 0.95 * r["dit_bytes"] < r["host_bytes"] < r["dit_bytes"], (m, r)
    assert mp.peak_bytes(r, {}) == r["dit_bytes"] - r["host_bytes"] + r["vae_bytes"]
  assert rows["int8w+low"]["host_bytes"] < 0.51 * rows["bf16+low"]["host_bytes"]
