"""benchmarks/e2e.py: argument checks, the diffusers-side hooks, the 14B dry run and a JAX smoke run."""

import functools
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from helios_jax import flops
from helios_jax import schedulers as hs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def e2e():
  spec = importlib.util.spec_from_file_location("bench_e2e", os.path.join(ROOT, "benchmarks",
                                                                            "e2e.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve their module by name
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("argv,message", [
    (["--height", "100"], "--height=100"),
    (["--width", "96"], "--width=96"),              # pyramid needs multiples of 64
    (["--steps", "2,2"], "--steps=2,2"),            # distilled: 3 stages
    (["--model", "base", "--steps", "4,4"], "--steps=4,4"),
    (["--steps", "2,x,2"], "--steps='2,x,2'"),
    (["--chunks", "0"], "--chunks=0"),
    (["--warmup_chunks", "-1"], "--warmup_chunks=-1"),
    (["--model", "turbo"], "'turbo'"),              # choices: the variant registry
    (["--preset", "huge"], "'huge'"),               # choices: the model sizes
])
def test_bad_arguments(e2e, capsys, argv, message):
  with pytest.raises(SystemExit):
    e2e.parse_args(argv)
  assert message in capsys.readouterr().err


def test_defaults(e2e):
  args = e2e.parse_args(["--preset", "helios-14b", "--no_torch"])
  assert (args.height, args.width, args.side, args.steps) == (384, 640, "jax", None)
  assert args.peak_tflops == 989.0 and args.matmul_tflops == 800.0
  sc = e2e.sampler_config(args)
  assert sc.steps == (2, 2, 2) and sc.guidance == "none" and sc.amplify_first_chunk
  args = e2e.parse_args(["--model", "mid", "--steps", "3,3,3"])
  assert e2e.sampler_config(args).guidance == "cfg_zero_star"
  assert e2e.parse_args(["--model", "base", "--steps", "7"]).steps == (7,)


def test_cholesky_patch_gives_the_analytic_block_noise_factor(e2e):
  """On every CPU the reference gets the exact factor, whatever the host LAPACK would do."""
  orig = torch.linalg.cholesky
  spd = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
  with e2e._CholeskyPatch() as patch:  # pylint: disable=protected-access
    for gamma, k in ((1 / 3, 4), (0.2, 4), (0.25, 5)):
      # diffusers' sample_block_noise covariance, float32
      cov = (torch.eye(k) * (1 + gamma) - torch.ones(k, k) * gamma + torch.eye(k) * 1e-8).float()
      chol = torch.linalg.cholesky(cov)
      assert chol.dtype == torch.float32
      np.testing.assert_array_equal(chol.numpy(),
                                    np.asarray(hs.block_noise_cholesky(gamma, k), np.float32))
    np.testing.assert_array_equal(torch.linalg.cholesky(cov).numpy(),
                                  np.asarray(hs.block_noise_cholesky(0.25, 5), np.float32))
    np.testing.assert_allclose(torch.linalg.cholesky(spd).numpy(), orig(spd).numpy())
    with pytest.raises(RuntimeError):  # other failing matrices still fail
      torch.linalg.cholesky(-torch.eye(3))
  assert torch.linalg.cholesky is orig
  assert patch.patched == 4
  np.testing.assert_array_equal(np.asarray(hs.block_noise_cholesky(1 / 3, 4)), hs.BLOCK_NOISE_L)


def test_torch_timer_splits_chunks(e2e):
  """Hooks on a stand-in pipeline: per-chunk wall = DiT + decode + host, calls counted.

  A simulated clock (each stand-in advances it by a fixed amount) makes the split exact and
  independent of how loaded the machine is.
  """
  now = [0.0]

  def work(seconds):
    def run():
      now[0] += seconds
    return run

  pipe = types.SimpleNamespace(
      prepare_latents=lambda: None,
      vae=types.SimpleNamespace(decode=work(0.02)),
      transformer=types.SimpleNamespace(forward=work(0.01)),
      video_processor=types.SimpleNamespace(postprocess_video=work(0.015)))
  timer = e2e._TorchTimer(pipe, sync=lambda: None, clock=lambda: now[0])  # pylint: disable=protected-access
  calls = (4, 2, 2)

  def run():
    for n in calls:
      work(0.005)()  # history bookkeeping before prepare_latents
      pipe.prepare_latents()
      for _ in range(n):
        pipe.transformer.forward()
      pipe.vae.decode()
      work(0.003)()  # appending the decoded frames
    pipe.video_processor.postprocess_video()  # the whole video, at the end
    work(0.001)()

  run()  # disabled: nothing recorded
  assert not timer.events
  timer.enabled = True
  start = now[0]
  run()
  chunks, finalize = timer.chunks(start, now[0])
  assert [c["transformer_calls"] for c in chunks] == list(calls)
  approx = functools.partial(pytest.approx, abs=1e-12)
  for k, (c, n) in enumerate(zip(chunks, calls)):
    assert c["wall_s"] == approx(c["dit_s"] + c["decode_s"] + c["host_s"])
    assert c["transformer_s"] == approx(0.01 * n)
    assert c["dit_s"] == approx(0.01 * n + (0.005 if k == 0 else 0.0))
    assert c["decode_s"] == approx(0.02)
    assert c["host_s"] == approx(0.003 + (0.005 if k + 1 < len(calls) else 0.0))
  assert finalize == approx(0.016)


def test_dry_run_14b(e2e, tmp_path):
  out = tmp_path / "dry.json"
  res = e2e.main(["--preset", "helios-14b", "--model", "mid", "--dry_run", "--json", str(out)])
  dry = res["dry_run"]
  assert dry["param_bytes"]["text_encoder"] == 2 * 5_680_910_336  # umT5-XXL, all bf16
  assert dry["param_bytes"]["vae"] == 4 * 126_892_531             # Wan 2.1 VAE, fp32
  # 14,312,427,584 params in bf16 except the fp32-kept modules (time_embedder, tables, norm2).
  assert 2 * 14_312_427_584 < dry["param_bytes"]["transformer"] < 2 * 14_312_427_584 + 0.2e9
  progs = dry["programs"]
  assert progs["chunk_step"]["latents"] == [1, 9, 48, 80, 16]
  assert progs["chunk_step(first)"]["history"] == [1, 19, 48, 80, 16]
  assert progs["decode_step"]["frames"] == [1, 33, 384, 640, 3]
  assert progs["umt5_encode"]["embeddings"] == [2, 512, 4096]  # prompt + negative (CFG)
  assert json.loads(out.read_text())["dry_run"]["param_bytes"] == dry["param_bytes"]


@pytest.mark.slow
def test_dry_run_compile_reports_buffers(e2e, capsys):
  res = e2e.main(["--preset", "tiny", "--dry_run", "--dry_run_compile", "--dtype", "float32"])
  progs = res["dry_run"]["programs"]
  assert all(p["temp_bytes"] > 0 and p["argument_bytes"] > 0 for p in progs.values())
  assert "estimated device peak" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    e2e.parse_args(["--dry_run_compile"])


@pytest.mark.slow
@pytest.mark.heavy
def test_jax_smoke_run(e2e, tmp_path, capsys):
  out = tmp_path / "e2e.json"
  res = e2e.main(["--preset", "tiny", "--chunks", "2", "--no_torch", "--height", "64",
                  "--width", "64", "--warmup_chunks", "0", "--text_repeats", "1",
                  "--no-compile_cache", "--json", str(out)])
  assert "torch" not in res
  jax_res = res["jax"]
  chunks = jax_res["chunks"]
  assert [c["index"] for c in chunks] == [0, 1]
  for c in chunks:
    assert c["wall_s"] == pytest.approx(c["dit_s"] + c["decode_s"] + c["host_s"])
    assert c["dit_s"] > 0 and c["decode_s"] > 0
  summary = jax_res["summary"]
  assert summary["fps"] == pytest.approx(33 / chunks[1]["wall_s"])
  assert summary["output_frames"] == 65
  total = jax_res["text_encode_s"] + sum(c["wall_s"] for c in chunks)
  assert summary["e2e_fps"] == pytest.approx(65 / total)
  # FLOPs come from the FLOP model for the same sampler settings (6 / 12 DMD forwards).
  dit_cfg, vae_cfg, _ = e2e.preset_configs("tiny")
  sc = flops.model_sampler_config("distilled", 64, 64)
  assert res["flops"]["dit_chunk"] == flops.sampler_chunk_flops(dit_cfg, sc).total
  assert (res["flops"]["dit_calls_chunk"], res["flops"]["dit_calls_first_chunk"]) == (6, 12)
  assert res["flops"]["vae_decode_chunk"] == flops.vae_decode_flops(vae_cfg, 9, 8, 8).total
  assert summary["dit_tflops"] == pytest.approx(
      res["flops"]["dit_chunk"] / chunks[1]["dit_s"] / 1e12)
  saved = json.loads(out.read_text())
  assert saved["jax"]["chunks"] == chunks and saved["settings"]["chunks"] == 2
  report = capsys.readouterr().out
  assert "| steady chunk s |" in report and "JAX per chunk" in report
