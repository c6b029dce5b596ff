"""Export back to diffusers/transformers: tiny PyTorch models -> convert -> export -> from_pretrained.

Every tensor must come back bit for bit (same key, dtype, values), so the reloaded PyTorch
model computes exactly what the original does. Also: whole pipelines, `training.merge` output,
atomicity and the CLI's one-line errors.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx

from conftest import rel_err
from helios_jax import checkpoint, convert, export, presets
from helios_jax.models import transformer as tr

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

DIT, VAE, UMT5 = (c.to_dict() for c in presets.tiny_configs())
UMT5 = {k: v for k, v in UMT5.items() if v is not None}  # transformers derives the None keys
# The DiT with every optional parameter group: memory stems, per-head history amplification.
DIT = dict(DIT, is_amplify_history=True, history_scale_mode="per_head")


def _perturb(model):
  """Non-default values for parameters that start as constants (norm weights, scales)."""
  g = torch.Generator().manual_seed(7)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("gamma", "layer_norm.weight", "history_key_scale", "norm_q.weight",
                        "norm_k.weight", "norm2.weight", "norm2.bias")):
        p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
  return model


def make_model(component):
  torch.manual_seed(0)
  if component == "transformer":
    return _perturb(diffusers.HeliosTransformer3DModel(**DIT).eval())
  if component == "vae":
    return _perturb(diffusers.AutoencoderKLWan(**VAE).eval())
  return _perturb(transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)).eval())


def load_exported(component, path):
  cls = {"transformer": diffusers.HeliosTransformer3DModel, "vae": diffusers.AutoencoderKLWan,
         "text_encoder": transformers.UMT5EncoderModel}[component]
  kw = {"dtype": "auto"} if component == "text_encoder" else {}
  model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def read_folder(path):
  """{key: tensor} of every safetensors file in a folder."""
  out = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      out.update(safetensors_torch.load_file(os.path.join(path, name)))
  return out


def assert_same_tensor(a, b, key):
  assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
  assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                     b.view(torch.uint8) if b.dtype == torch.bfloat16 else b), key


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, component, dtype):
  """save_pretrained -> convert (default: keep) -> export (default: keep) -> the same tensors."""
  model = make_model(component).to(getattr(torch, dtype))
  src, orbax, out = (str(tmp_path / n) for n in ("src", "orbax", "out"))
  model.save_pretrained(src)
  convert.convert(src, orbax, progress=False)
  export.export(orbax, out, max_shard_size="20KB", progress=False)
  stem = export.WEIGHTS_NAME[component]
  with open(os.path.join(out, f"{stem}.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
  assert len(shards) > 1 and sorted(set(weight_map.values())) == shards
  for name in shards:  # a shard exceeds the limit only when it holds one larger tensor
    tensors = safetensors_torch.load_file(os.path.join(out, name))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    assert size <= 20_000 or len(tensors) == 1, (name, size)
  source, exported = read_folder(src), read_folder(out)
  assert set(weight_map) == set(exported)
  if component == "text_encoder":  # one copy of the tied embedding, under its canonical name
    source.pop("encoder.embed_tokens.weight", None)
  assert set(exported) == set(source)
  for key, t in source.items():
    assert_same_tensor(exported[key], t, key)
  reloaded = load_exported(component, out)
  ref_sd, got_sd = model.state_dict(), reloaded.state_dict()
  assert set(ref_sd) == set(got_sd)
  for key in ref_sd:  # diffusers loads bf16 files as fp32 by default: an exact widening
    assert_same_tensor(got_sd[key].to(ref_sd[key].dtype), ref_sd[key], key)


def test_transformer_fp32_outputs_match_original(tmp_path):
  """The reloaded export computes what the original model computes (weights are identical)."""
  model = make_model("transformer")
  src, orbax, out = (str(tmp_path / n) for n in ("src", "orbax", "out"))
  model.save_pretrained(src, max_shard_size="30KB")
  convert.convert(src, orbax, progress=False)
  export.export(orbax, out, progress=False)
  # Under --max_shard_size: one file and no index, as save_pretrained writes it.
  assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  with open(os.path.join(src, "config.json")) as f1, open(os.path.join(out, "config.json")) as f2:
    assert json.load(f1) == json.load(f2)  # the original diffusers config, unchanged
  reloaded = load_exported("transformer", out)
  g = torch.Generator().manual_seed(1)
  args = {"hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g),
          "timestep": torch.tensor([731.25]),
          "encoder_hidden_states": torch.randn(1, 5, DIT["text_dim"], generator=g),
          "indices_hidden_states": torch.tensor([[20, 21]]),
          "latents_history_short": torch.randn(1, 16, 2, 8, 8, generator=g),
          "indices_latents_history_short": torch.tensor([[0, 19]])}
  with torch.no_grad():
    ref = model(**args).sample.numpy()
    got = reloaded(**args).sample.numpy()
  assert rel_err(got, ref) <= 1e-6
  np.testing.assert_array_equal(got, ref)


def test_bfloat16_export_applies_precision_policy(tmp_path):
  """--dtype bfloat16 downcasts, except the fp32-kept modules (diffusers' policy)."""
  src, orbax, out = (str(tmp_path / n) for n in ("src", "orbax", "out"))
  make_model("transformer").save_pretrained(src)
  convert.convert(src, orbax, progress=False)
  export.export(orbax, out, "bfloat16", progress=False)
  got = read_folder(out)
  assert got["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
  assert got["blocks.0.scale_shift_table"].dtype == torch.float32
  assert got["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32
  src_t = read_folder(src)["blocks.1.ffn.net.0.proj.weight"]
  assert torch.equal(got["blocks.1.ffn.net.0.proj.weight"], src_t.to(torch.bfloat16))


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
  return presets.write_tiny_pipeline(str(tmp_path_factory.mktemp("pipe") / "tiny"))


def test_pipeline_export_loads_in_diffusers(tiny_pipeline, tmp_path):
  out = str(tmp_path / "diffusers")
  done = export.export(tiny_pipeline, out, max_shard_size="50KB", progress=False)
  assert done == ["transformer", "vae", "text_encoder"]
  assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder",
                                     "tokenizer", "transformer", "vae"]
  for cls in (diffusers.HeliosPyramidPipeline, diffusers.HeliosPipeline):
    pipe = cls.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "HeliosDMDScheduler"
    assert pipe.tokenizer("A cat walks.").input_ids[-1] == 1
  # Read back through our (forward) converter: the same parameters as the Orbax source.
  a = checkpoint.flatten_tree(
      nnx.to_pure_dict(tr.load_transformer(os.path.join(tiny_pipeline, "transformer")).params))
  b = checkpoint.flatten_tree(
      nnx.to_pure_dict(tr.load_transformer(os.path.join(out, "transformer")).params))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), "/".join(k))
  with open(os.path.join(tiny_pipeline, "model_index.json")) as f1, open(
      os.path.join(out, "model_index.json")) as f2:
    assert json.load(f1) == json.load(f2)


def test_merge_output_exports(tmp_path, monkeypatch):
  """What `python -m helios_jax.training.merge` writes (here with random LoRA trainables in place
  of a trained checkpoint: the writing path is merge_run's own) exports and reloads exactly."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import stage1  # pylint: disable=g-import-not-at-top
  from helios_jax.training import lora, merge, runs, trainer  # pylint: disable=g-import-not-at-top
  from helios_jax.training import model as model_lib  # pylint: disable=g-import-not-at-top
  work = tmp_path / "run"
  work.mkdir()
  cfg = stage1.get_config("tiny")
  (work / trainer.CONFIG_FILE).write_text(cfg.to_json_best_effort())

  def fake_restore(workdir, step=None, ema=False):
    del step, ema
    st = runs.read_run(workdir)
    base = jax.tree.map(jax.numpy.asarray, model_lib.build_base(st.model)[2])
    tr_ = lora.init_trainables(base, st.trainable, jax.random.key(3))
    tr_["lora"] = jax.tree.map(lambda x: x + 0.05, tr_["lora"])  # B != 0: the merge moves W
    return tr_, 4

  monkeypatch.setattr(runs, "restore_trainables", fake_restore)
  merged = merge.merge_run(str(work), str(tmp_path / "merged"), ema=True)
  out = str(tmp_path / "exported")
  assert export.export(merged, out, progress=False) == ["transformer"]
  params = checkpoint.load_params(os.path.join(merged, checkpoint.PARAMS_DIR))
  reloaded = load_exported("transformer", out)
  # every exported tensor, read back through the forward mapping, is the merged leaf exactly
  plan = checkpoint.ConversionPlan(
      checkpoint.SafetensorsFolder(out), jax.eval_shape(lambda: params),
      tr.TRANSFORMER_SPEC.key_map(None), stacked_len=reloaded.config.num_layers)
  for path, leaf in checkpoint.flatten_tree(params).items():
    np.testing.assert_array_equal(plan.load_leaf(path), np.asarray(leaf), "/".join(path))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["_class_name"] == "HeliosTransformer3DModel"


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "helios_jax.export", *args],
                        capture_output=True, text=True, check=False)


def test_cli_errors_and_atomicity(tmp_path, monkeypatch):
  src, orbax = str(tmp_path / "src"), str(tmp_path / "orbax")
  make_model("vae").save_pretrained(src)
  convert.convert(src, orbax, progress=False)
  cases = [
      ([f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'o1'}"], "--src folder not found"),
      ([f"--src={src}", f"--dst={tmp_path / 'o2'}"], "not a helios_jax export"),
      ([f"--src={orbax}", f"--dst={src}"], "already exists"),
      ([f"--src={orbax}", f"--dst={tmp_path / 'o3'}", "--max_shard_size=lots"], "max_shard_size"),
  ]
  unknown = tmp_path / "unknown"
  (unknown / "params").mkdir(parents=True)
  (unknown / "params" / checkpoint.ORBAX_MARKER).write_text("{}")
  (unknown / "config.json").write_text('{"_class_name": "UNet2DModel"}')
  cases.append(([f"--src={unknown}", f"--dst={tmp_path / 'o4'}"], "UNet2DModel"))
  pipe = tmp_path / "pipe"
  pipe.mkdir()
  (pipe / "model_index.json").write_text('{"_class_name": "X", "image_encoder": ["a", "B"]}')
  cases.append(([f"--src={pipe}", f"--dst={tmp_path / 'o5'}"], "unknown component"))
  (tmp_path / "afile").write_text("")
  cases.append(([f"--src={orbax}", f"--dst={tmp_path / 'afile' / 'out'}"], "is not a folder"))
  for args, msg in cases:
    res = _cli(*args)
    assert res.returncode == 2, (args, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (args, lines)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(("o1", "o2", "o3", "o4", "o5"))]
  res = _cli(f"--src={orbax}", f"--dst={tmp_path / 'ok'}")
  assert res.returncode == 0 and "exported vae" in res.stdout, res.stderr
  assert _cli(f"--src={orbax}", f"--dst={tmp_path / 'ok'}", "--overwrite").returncode == 0

  # A failure midway (here: the 5th tensor write) leaves neither --dst nor a temporary folder.
  calls = []
  real_write = checkpoint.SafetensorsWriter.write

  def failing_write(self, key, x):
    calls.append(key)
    if len(calls) == 5:
      raise OSError("disk full")
    real_write(self, key, x)

  monkeypatch.setattr(checkpoint.SafetensorsWriter, "write", failing_write)
  with pytest.raises(OSError, match="disk full"):
    export.export(orbax, str(tmp_path / "fail"), max_shard_size="10KB", progress=False)
  assert not [n for n in os.listdir(tmp_path) if "fail" in n]
