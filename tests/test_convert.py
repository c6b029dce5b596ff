"""The checkpoint converter CLI: component and pipeline folders, atomicity, errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helios_jax import checkpoint, convert
from helios_jax.models import transformer as tr

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=24, text_dim=16,
            freq_dim=8, rope_dim=(6, 6, 4))


def tiny_transformer(path):
  torch.manual_seed(0)
  model = diffusers.HeliosTransformer3DModel(**TINY).eval()
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


def test_auto_dtype_is_bf16_for_transformer(tmp_path):
  src, dst = str(tmp_path / "transformer"), str(tmp_path / "out")
  tiny_transformer(src)
  convert.convert(src, dst, "auto", progress=False)
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  meta = checkpoint.flatten_tree(ocp.metadata(os.path.join(dst, "params")).metadata)
  assert str(meta[("blocks", "attn1", "to_q", "kernel")].dtype) == "bfloat16"
  assert str(meta[("blocks", "scale_shift_table")].dtype) == "float32"
  assert str(meta[("condition_embedder", "time_embedder", "linear_1", "kernel")].dtype) == "float32"


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
