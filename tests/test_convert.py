"""The checkpoint converter CLI: component and pipeline folders, atomicity, errors."""

import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import rel_err
from helios_jax import checkpoint, convert
from helios_jax.models import transformer as tr

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=24, text_dim=16,
            freq_dim=8, rope_dim=(6, 6, 4))


def tiny_transformer(path, dtype=torch.float32):
  torch.manual_seed(0)
  model = diffusers.HeliosTransformer3DModel(**TINY).eval().to(dtype)
  model.save_pretrained(path, max_shard_size="30KB")
  return model


def test_cli_converts_sharded_transformer(tmp_path):
  src, dst = str(tmp_path / "transformer"), str(tmp_path / "out")
  tiny_transformer(src)
  res = subprocess.run([sys.executable, "-m", "helios_jax.convert", f"--src={src}",
                        f"--dst={dst}", "--dtype=float32"], capture_output=True, text=True,
                       check=False)
  assert res.returncode == 0, res.stderr
  assert "converted transformer" in res.stdout
  a = tr.load_transformer(src)
  b = tr.load_transformer(dst)
  la = checkpoint.flatten_tree(__import__("flax").nnx.to_pure_dict(a.params))
  lb = checkpoint.flatten_tree(__import__("flax").nnx.to_pure_dict(b.params))
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(np.asarray(la[k]), np.asarray(lb[k]))
  # an existing destination is refused unless --overwrite
  res = subprocess.run([sys.executable, "-m", "helios_jax.convert", f"--src={src}",
                        f"--dst={dst}"], capture_output=True, text=True, check=False)
  assert res.returncode != 0 and "already exists" in res.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_conversion_is_bit_exact(tmp_path, dtype):
  """--dtype keep (the default): every stored leaf is the safetensors tensor, dtype and bits."""
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  src, dst = str(tmp_path / "transformer"), str(tmp_path / "out")
  tiny_transformer(src, dtype)
  convert.convert(src, dst, progress=False)
  stored = checkpoint.flatten_tree(ocp.load(os.path.join(dst, "params")))
  reader = checkpoint.SafetensorsFolder(src)
  want_dtype = {torch.float32: np.float32, torch.bfloat16: ml_dtypes.bfloat16}[dtype]
  seen = set()
  for key in reader.keys():
    path, layer = tr.TRANSFORMER_SPEC.key_map(None)(key)
    leaf = np.asarray(stored[path])
    got = leaf if layer is None else leaf[layer]
    ref = checkpoint.torch_to_flax(reader.get(key), path[-1], got.shape)
    assert got.dtype == ref.dtype == want_dtype, (key, got.dtype, ref.dtype)
    np.testing.assert_array_equal(np.ascontiguousarray(got).view(np.uint8),
                                  np.ascontiguousarray(ref).view(np.uint8), key)
    seen.add(path)
  assert seen == set(stored)


def test_default_fp32_conversion_matches_diffusers(tmp_path):
  """The fp32 export loaded in fp32 computes what diffusers computes (parity tolerance)."""
  from test_transformer import make_inputs, to_np  # pylint: disable=g-import-not-at-top
  src, dst = str(tmp_path / "transformer"), str(tmp_path / "out")
  model = tiny_transformer(src)
  convert.convert(src, dst, progress=False)
  args = make_inputs(TINY, 1, ("short",), hw=(8, 8), t_noisy=2)
  with torch.no_grad():
    ref = model(**args).sample.numpy()
  out = np.asarray(tr.load_transformer(dst, jnp.float32, attention_impl="xla")(**to_np(args)))
  assert rel_err(out, ref) <= 1e-5


def test_downcast_is_opt_in(tmp_path):
  """--dtype bfloat16 (and auto, for the transformer) store bf16 under the precision policy."""
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  src = str(tmp_path / "transformer")
  tiny_transformer(src)
  for dtype in ("bfloat16", "auto"):
    dst = str(tmp_path / dtype)
    convert.convert(src, dst, dtype, progress=False)
    meta = checkpoint.flatten_tree(ocp.metadata(os.path.join(dst, "params")).metadata)
    assert str(meta[("blocks", "attn1", "to_q", "kernel")].dtype) == "bfloat16"
    assert str(meta[("blocks", "scale_shift_table")].dtype) == "float32"
    assert str(meta[("condition_embedder", "time_embedder", "linear_1", "kernel")].dtype) == \
        "float32"
  with pytest.raises(ValueError, match="int8"):
    convert.convert(src, str(tmp_path / "bad"), "int8", progress=False)


def test_failed_conversion_leaves_nothing(tmp_path):
  src, dst = str(tmp_path / "transformer"), str(tmp_path / "out")
  tiny_transformer(src)
  shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[-1]
  with open(os.path.join(src, shard), "r+b") as f:  # corrupt the data, keep the header
    f.truncate(os.path.getsize(os.path.join(src, shard)) - 8)
  with pytest.raises(checkpoint.CheckpointError, match=shard):
    convert.convert(src, dst, progress=False)
  assert not os.path.exists(dst)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp")]


def test_unrecognised_folder(tmp_path):
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
  with pytest.raises(checkpoint.CheckpointError, match="UNet2DModel"):
    convert.convert(str(tmp_path / "x"), str(tmp_path / "y"), progress=False)
  with pytest.raises(checkpoint.CheckpointError, match="not found"):
    convert.convert(str(tmp_path / "nope"), str(tmp_path / "y"), progress=False)


def test_cli_is_quiet_and_rejects_unwritable_dst_before_work(tmp_path):
  """Default output: a progress bar and one result line (no Orbax INFO flood); an output
  under a file, or on a full filesystem, is one error line before any tensor is read."""
  src = str(tmp_path / "transformer")
  tiny_transformer(src)
  cmd = [sys.executable, "-m", "helios_jax.convert", f"--src={src}"]
  res = subprocess.run(cmd + [f"--dst={tmp_path / 'ok'}"], capture_output=True, text=True,
                       check=False)
  assert res.returncode == 0, res.stderr
  assert not [ln for ln in res.stderr.splitlines() if ln.startswith(("I1", "I0", "W1", "W0"))]
  (tmp_path / "afile").write_text("")
  res = subprocess.run(cmd + [f"--dst={tmp_path / 'afile' / 'out'}"], capture_output=True,
                       text=True, check=False)
  assert res.returncode == 2
  assert res.stderr.strip().splitlines() == [
      f"error: cannot write {tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} is not a folder"]
  small = tmp_path / "small"
  small.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(small)],
                    capture_output=True, check=False).returncode:
    return  # mounting needs root; the free-space rule is tested in test_media.py
  try:
    res = subprocess.run(cmd + [f"--dst={small / 'out'}"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 2 and "MB needed" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and os.listdir(small) == []
  finally:
    subprocess.run(["umount", str(small)], check=False)
