"""LoRA round trip with the PyTorch ecosystem (CPU, fp32, tiny models).

LoRA in: adapters built with PEFT on a tiny diffusers `HeliosTransformer3DModel` (random
lora_B so they are not no-ops), saved with `HeliosPipeline.save_lora_weights` + the adapter
metadata (the official training's format), fused by `load_transformer(lora=...)`; the
reference is diffusers' `load_lora_weights` + `set_adapters` (unfused: base(x) + s B(A(x))).
Fusing `W + s B A` first changes only the fp32 rounding, so the parity bound is the suite's
fp32 module bound 1e-5. Partial-parameter files are applied to the reference as the official
`load_extra_components` does (module `load_state_dict`, `history_key_scale.data`).

LoRA out: a 2-step `experiments/stage1.py:tiny` run (LoRA on linears + patch_embedding, memory
stems trained in full) on a diffusers base folder, exported by `training.lora_export`; diffusers
with the exported LoRA + partial file equals `training.merge`'s output loaded by us.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import SUBPROCESS_TIMEOUT_S, rel_err
from helios_jax.models import lora as lora_lib
from helios_jax.models import transformer as tr
from helios_jax.models.attention import KernelConfig

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
get_peft_model_state_dict = peft.get_peft_model_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_XLA = KernelConfig("xla", "xla")
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TOL = 1e-5

# Memory stems on, per-head history amplification (a `history_key_scale` to replace), 2 blocks.
CFG = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, ffn_dim=24, text_dim=12,
           freq_dim=8, rope_dim=(4, 2, 2), is_amplify_history=True, history_scale_mode="per_head")
LINEARS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out",
           "time_proj", "linear_1", "linear_2"]


def _inputs(cfg, seed=1):
  g = torch.Generator().manual_seed(seed)
  c = cfg.get("in_channels", 16)
  args = {"hidden_states": torch.randn(1, c, 3, 12, 10, generator=g),
          "timestep": torch.tensor([731.25]),
          "encoder_hidden_states": torch.randn(1, 7, cfg["text_dim"], generator=g),
          "indices_hidden_states": torch.arange(20, 23)[None]}
  for grp, (n, idx) in {"short": (2, [0, 19]), "mid": (2, [17, 18]),
                        "long": (5, list(range(1, 6)))}.items():
    args[f"latents_history_{grp}"] = torch.randn(1, c, n, 12, 10, generator=g)
    args[f"indices_latents_history_{grp}"] = torch.tensor([idx])
  return args


def _ours(transformer, args):
  return np.asarray(transformer(**{k: v.numpy() for k, v in args.items()}))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  torch.manual_seed(0)
  model = diffusers.HeliosTransformer3DModel(**CFG).eval()
  with torch.no_grad():
    for mod in model.modules():
      if hasattr(mod, "history_key_scale"):
        mod.history_key_scale.normal_()
  path = str(tmp_path_factory.mktemp("base") / "transformer")
  model.save_pretrained(path)
  return path


def _load_reference(path):
  return diffusers.HeliosTransformer3DModel.from_pretrained(path).eval()


def _pipeline(model):
  return diffusers.HeliosPipeline(transformer=model, vae=None, text_encoder=None,
                                  tokenizer=None, scheduler=None)


def make_lora(base_path, folder, *, r, alpha, targets, seed, rank_pattern=None,
              alpha_pattern=None, lora_bias=False):
  """A PEFT adapter with random A and B, saved as the official training saves it."""
  model = _load_reference(base_path)
  model.add_adapter(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                    rank_pattern=rank_pattern or {},
                                    alpha_pattern=alpha_pattern or {}, lora_bias=lora_bias))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  diffusers.HeliosPipeline.save_lora_weights(
      folder, transformer_lora_layers=get_peft_model_state_dict(model),
      transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
  return os.path.join(folder, lora_lib.LORA_WEIGHTS_NAME), model


def _reference_out(base_path, adapters, partial=None, args=None):
  """diffusers: load_lora_weights per adapter, set_adapters, partial as the official merge."""
  model = _load_reference(base_path)
  pipe = _pipeline(model)
  for file, name, _ in adapters:
    pipe.load_lora_weights(file, adapter_name=name)
  if adapters:
    pipe.set_adapters([a[1] for a in adapters], adapter_weights=[a[2] for a in adapters])
  if partial is not None:
    apply_partial_like_official(model, partial)
  with torch.no_grad():
    return model(**args).sample.numpy()


def apply_partial_like_official(model, sd):
  """`load_extra_components`: per-stem `load_state_dict(strict=False)`, history scales by
  `.data` assignment; other keys (GAN heads) only when the model has them."""
  for p in ("patch_short", "patch_mid", "patch_long"):
    sub = {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
    if sub:
      getattr(model, p).load_state_dict(sub, strict=False)
  for i, block in enumerate(model.blocks):
    key = f"blocks.{i}.attn1.history_key_scale"
    if key in sd:
      block.attn1.history_key_scale.data = sd[key]


def test_single_adapter_matches_diffusers(base, tmp_path):
  targets = LINEARS + ["patch_embedding"]
  file, _ = make_lora(base, str(tmp_path / "a"), r=4, alpha=8, targets=targets, seed=1)
  args = _inputs(CFG)
  plain = _reference_out(base, [], args=args)
  ref = _reference_out(base, [(file, "a", 0.8)], args=args)
  assert rel_err(ref, plain) > 1e-2  # the adapter is not a no-op
  ours = tr.load_transformer(base, kernels=KERNELS_XLA, lora=[(file, 0.8)])
  assert rel_err(_ours(ours, args), ref) <= TOL
  # The folder form and a bare path (scale 1) read the same file.
  ref1 = _reference_out(base, [(file, "a", 1.0)], args=args)
  ours1 = tr.load_transformer(base, kernels=KERNELS_XLA, lora=[str(tmp_path / "a")])
  assert rel_err(_ours(ours1, args), ref1) <= TOL


def test_two_stacked_adapters_with_patterns_and_conv(base, tmp_path):
  # a: attention + stems (Conv3d LoRA), per-module rank / alpha patterns.
  fa, _ = make_lora(base, str(tmp_path / "a"), r=4, alpha=4,
                    targets=["to_q", "to_k", "to_v", "to_out.0", "patch_short", "patch_mid"],
                    seed=2, rank_pattern={"blocks.1.attn1.to_q": 2},
                    alpha_pattern={"patch_mid": 12.0})
  # b: overlaps a on to_q, adds FFN / output linears with a LoRA bias.
  fb, _ = make_lora(base, str(tmp_path / "b"), r=2, alpha=6,
                    targets=["to_q", "ffn.net.0.proj", "ffn.net.2", "proj_out"], seed=3,
                    lora_bias=True)
  meta = lora_lib.read_metadata(fa)
  assert meta["rank_pattern"] == {"blocks.1.attn1.to_q": 2}
  args = _inputs(CFG)
  ref = _reference_out(base, [(fa, "a", 0.7), (fb, "b", -1.3)], args=args)
  only_a = _reference_out(base, [(fa, "a", 0.7)], args=args)
  assert rel_err(ref, only_a) > 1e-2
  ours = tr.load_transformer(base, kernels=KERNELS_XLA, lora=[(fa, 0.7), (fb, -1.3)])
  assert rel_err(_ours(ours, args), ref) <= TOL


def test_official_checkpoint_folder_with_partial_file(base, tmp_path):
  """A Stage-3-like `model_ema/` folder: LoRA on linears + memory stems, and a
  transformer_partial.pth holding PEFT-wrapped stem weights, history scales and GAN heads."""
  folder = str(tmp_path / "model_ema")
  file, peft_model = make_lora(base, folder, r=4, alpha=4,
                               targets=["to_q", "to_v", "ffn.net.2", "patch_short"], seed=4)
  g = torch.Generator().manual_seed(5)
  sd = {f"patch_short.{k}": v.detach().clone()  # base_layer.*, lora_A/B.default.* (as saved)
        for k, v in peft_model.patch_short.state_dict().items()}
  sd["patch_short.base_layer.weight"] = torch.randn(sd["patch_short.base_layer.weight"].shape,
                                                    generator=g) * 0.05
  sd.update({f"patch_mid.{k}": torch.randn(v.shape, generator=g) * 0.05
             for k, v in peft_model.patch_mid.state_dict().items()})
  for i in range(CFG["num_layers"]):
    sd[f"blocks.{i}.attn1.history_key_scale"] = torch.randn(2, generator=g)
  sd["gan_heads.block_1.conv.weight"] = torch.randn(3, 3)  # critic-only: skipped
  torch.save(sd, os.path.join(folder, lora_lib.PARTIAL_PTH_NAME))
  args = _inputs(CFG)
  ref = _reference_out(base, [(file, "default", 1.0)], partial=sd, args=args)
  lora_only = _reference_out(base, [(file, "default", 1.0)], args=args)
  assert rel_err(ref, lora_only) > 1e-2  # the partial file matters
  ours = tr.load_transformer(base, kernels=KERNELS_XLA, lora=[folder])
  assert rel_err(_ours(ours, args), ref) <= TOL
  # The same partial tensors as .safetensors give the same weights.
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  st_file = str(tmp_path / "partial.safetensors")
  save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("gan")}, st_file)
  ours2 = tr.load_transformer(base, kernels=KERNELS_XLA, lora=[file, st_file])
  np.testing.assert_array_equal(_ours(ours2, args), _ours(ours, args))


def _wan_names(i):
  names = {f"self_attn.{o}": f"attn1.{c}" for o, c in
           zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"])}
  names.update({f"cross_attn.{o}": f"attn2.{c}" for o, c in
                zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"])})
  names.update({"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"})
  return {f"blocks.{i}.{k}": f"blocks.{i}.{v}" for k, v in names.items()}


@pytest.mark.parametrize("fmt", ["wan", "musubi"])
def test_non_diffusers_layouts_match_diffusers(base, tmp_path, fmt):
  """`diffusion_model.` (with alphas and diff_b bias deltas) and musubi `lora_unet_` names."""
  model = _load_reference(base)
  mods = dict(model.named_modules())
  g = torch.Generator().manual_seed(6)
  sd = {}
  r = 3
  for i in range(CFG["num_layers"]):
    for wan, ours in _wan_names(i).items():
      w = mods[ours].weight
      if fmt == "wan":
        stem, down, up = f"diffusion_model.{wan}", "lora_down", "lora_up"
      else:
        stem, down, up = "lora_unet_" + wan.replace(".", "_"), "lora_down", "lora_up"
      sd[f"{stem}.{down}.weight"] = 0.3 * torch.randn(r, w.shape[1], generator=g)
      sd[f"{stem}.{up}.weight"] = 0.3 * torch.randn(w.shape[0], r, generator=g)
      sd[f"{stem}.alpha"] = torch.tensor(float(1 + i + len(sd) % 4))
      if fmt == "wan":  # diffusers needs diff_b on every module once one has it
        sd[f"{stem}.diff_b"] = 0.1 * torch.randn(w.shape[0], generator=g)
  if fmt == "wan":
    sd["diffusion_model.head.head.lora_down.weight"] = 0.3 * torch.randn(
        r, mods["proj_out"].weight.shape[1], generator=g)
    sd["diffusion_model.head.head.lora_up.weight"] = 0.3 * torch.randn(
        mods["proj_out"].weight.shape[0], r, generator=g)
    sd["diffusion_model.head.head.diff_b"] = 0.1 * torch.randn(
        mods["proj_out"].weight.shape[0], generator=g)
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(CFG["num_attention_heads"] * 8)
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  file = str(tmp_path / f"{fmt}.safetensors")
  save_file(sd, file)
  args = _inputs(CFG)
  ref = _reference_out(base, [(file, "x", 0.6)], args=args)
  ours = tr.load_transformer(base, kernels=KERNELS_XLA, lora=[(file, 0.6)])
  assert rel_err(_ours(ours, args), ref) <= TOL


def _save(tmp_path, name, sd, metadata=None):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / name)
  save_file(sd, path, metadata=metadata)
  return path


def test_bad_inputs_name_the_offender(base, tmp_path):
  other = _save(tmp_path, "sdxl.safetensors", {
      "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 16),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 2),
      "transformer.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 16),
      "transformer.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(16, 2)})
  with pytest.raises(lora_lib.LoraError, match=r"down_blocks\.0\.attentions\.0\.proj_in"):
    tr.load_transformer(base, lora=[other])
  unet = _save(tmp_path, "unet.safetensors", {
      "unet.mid_block.lora_A.weight": torch.zeros(2, 16)})
  with pytest.raises(lora_lib.LoraError, match=r"unet\.mid_block\.lora_A\.weight"):
    tr.load_transformer(base, lora=[unet])
  rank = _save(tmp_path, "rank.safetensors", {
      "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 16),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 3)})
  with pytest.raises(lora_lib.LoraError, match=r"rank mismatch.*blocks\.0\.attn1\.to_q\.lora_A"):
    tr.load_transformer(base, lora=[rank])
  shape = _save(tmp_path, "shape.safetensors", {
      "transformer.blocks.1.ffn.net.2.lora_A.weight": torch.zeros(4, 16),  # in is 24
      "transformer.blocks.1.ffn.net.2.lora_B.weight": torch.zeros(16, 4)})
  with pytest.raises(lora_lib.LoraError, match=r"shape mismatch.*blocks\.1\.ffn\.net\.2"):
    tr.load_transformer(base, lora=[shape])
  meta = _save(tmp_path, "meta.safetensors", {
      "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 16),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 4)},
      metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 8,
                                                     "transformer.lora_alpha": 8})})
  with pytest.raises(lora_lib.LoraError, match=r"to_q\.lora_A\.weight' has rank 4.*r=8"):
    tr.load_transformer(base, lora=[meta])
  partial = str(tmp_path / "p.pth")
  torch.save({"patch_mid.bias": torch.zeros(16)}, partial)
  with pytest.raises(lora_lib.LoraError, match=r"scale 0\.5"):
    tr.load_transformer(base, lora=[(partial, 0.5)])
  with pytest.raises(lora_lib.LoraError, match="not found"):
    tr.load_transformer(base, lora=[str(tmp_path / "missing.safetensors")])
  with pytest.raises(ValueError, match=r"scale 'abc' is not a number"):
    lora_lib.parse_lora_arg("x.safetensors:abc")
  with pytest.raises(ValueError, match=r"scale 'abc'"):
    lora_lib.normalize_entries([("x.safetensors", "abc")])
  assert lora_lib.parse_lora_arg("/a/b.safetensors:-0.5") == ("/a/b.safetensors", -0.5)
  assert lora_lib.parse_lora_arg("/a/b.safetensors") == ("/a/b.safetensors", 1.0)
  assert lora_lib.parse_lora_arg("C:/x/l.safetensors") == ("C:/x/l.safetensors", 1.0)


def test_pipeline_from_pretrained_fuses_the_lora(tmp_path):
  """`Pipeline.from_pretrained(lora=...)` on the tiny preset (our Orbax layout): the one adapted
  layer moves by exactly s * (B @ A)^T, everything else is untouched."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from helios_jax import pipeline, presets  # pylint: disable=g-import-not-at-top
  path = presets.write_tiny_pipeline(str(tmp_path / "tiny"))
  cfg = presets.tiny_configs()[0]
  dim = cfg.num_attention_heads * cfg.attention_head_dim
  g = torch.Generator().manual_seed(7)
  a, b = torch.randn(2, dim, generator=g), torch.randn(dim, 2, generator=g)
  file = _save(tmp_path, "l.safetensors", {"transformer.blocks.1.attn1.to_q.lora_A.weight": a,
                                            "transformer.blocks.1.attn1.to_q.lora_B.weight": b})
  plain = pipeline.Pipeline.from_pretrained(path, jnp.float32, load_text_encoder=False)
  pipe = pipeline.Pipeline.from_pretrained(path, jnp.float32, load_text_encoder=False,
                                           lora=[(file, 0.5)])
  before = nnx.to_pure_dict(plain.transformer.params)
  after = nnx.to_pure_dict(pipe.transformer.params)
  k0, k1 = before["blocks"]["attn1"]["to_q"]["kernel"], after["blocks"]["attn1"]["to_q"]["kernel"]
  want = np.asarray(k0[1], np.float64) + 0.5 * (b.double() @ a.double()).numpy().T
  assert rel_err(k1[1], want) <= 1e-6  # one fp32 rounding of W + delta
  np.testing.assert_array_equal(k1[0], k0[0])
  np.testing.assert_array_equal(after["blocks"]["attn1"]["to_k"]["kernel"],
                                before["blocks"]["attn1"]["to_k"]["kernel"])


def test_cli_rejects_a_bad_scale_before_loading(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, "-m", "helios_jax.generate",
                        f"--model_dir={tmp_path / 'nonexistent'}", f"--out={tmp_path / 'o.mp4'}",
                        "--lora", f"{tmp_path / 'x.safetensors'}:abc"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
  assert res.returncode == 2
  err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and "'abc' is not a number" in err[0], res.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# LoRA out.

# The stage-1 tiny DiT (`HeliosTransformerConfig` preset "tiny") in diffusers' terms.
TINY = dict(num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=96,
            num_layers=2, rope_dim=(12, 10, 10))


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
  """A 2-step stage-1 tiny run (synthetic latents) on a diffusers base folder."""
  root = tmp_path_factory.mktemp("lora_out")
  torch.manual_seed(3)
  base = str(root / "base")
  diffusers.HeliosTransformer3DModel(**TINY).save_pretrained(base)
  work = str(root / "work")
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(root / "xla")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=cache,
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA}".strip())
  res = subprocess.run([sys.executable, "-m", "helios_jax.train",
                        f"--config=experiments/stage1.py:tiny,init={base},steps=2",
                        "--config.train.checkpoint_every=2", f"--workdir={work}"],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S)
  assert res.returncode == 0, res.stderr[-4000:]
  return base, work, root


def test_exported_lora_loads_in_diffusers_like_our_merge(stage1_run):
  from helios_jax.training import lora_export  # pylint: disable=g-import-not-at-top
  from helios_jax.training import merge  # pylint: disable=g-import-not-at-top
  base, work, root = stage1_run
  out = str(root / "exported")
  info = lora_export.export_run(work, out)
  assert info["step"] == 2 and info["files"] == [lora_lib.LORA_WEIGHTS_NAME,
                                                 lora_lib.PARTIAL_PTH_NAME]
  assert info["partial_tensors"] == [f"patch_{g}.{p}" for g in ("long", "mid", "short")
                                     for p in ("bias", "weight")]
  merged = merge.merge_run(work, str(root / "merged"))
  args = _inputs(TINY, seed=4)
  ours_merged = _ours(tr.load_transformer(merged, kernels=KERNELS_XLA), args)
  # diffusers: base + exported LoRA (scale from its metadata) + partial file, official way.
  model = _load_reference(base)
  pipe = _pipeline(model)
  pipe.load_lora_weights(os.path.join(out, lora_lib.LORA_WEIGHTS_NAME), adapter_name="s1")
  n_adapted = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.s1"))
  assert n_adapted == info["lora_modules"] == 2 * 10 + 6 + 1  # blocks, embedders + proj_out, stem
  partial = torch.load(os.path.join(out, lora_lib.PARTIAL_PTH_NAME), weights_only=True)
  apply_partial_like_official(model, partial)
  with torch.no_grad():
    ref = model(**args).sample.numpy()
    plain = _load_reference(base)(**args).sample.numpy()
  assert rel_err(ref, plain) > 1e-4  # two AdamW steps at lr 2e-3 moved the output
  assert rel_err(ours_merged, ref) <= TOL
  # And our loader reads the export back onto the base: the same merged model.
  ours_lora = _ours(tr.load_transformer(base, kernels=KERNELS_XLA, lora=[out]), args)
  assert rel_err(ours_lora, ours_merged) <= TOL


def test_export_cli(stage1_run):
  _, work, root = stage1_run
  out = str(root / "cli_export")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, "-m", "helios_jax.training.lora_export",
                        f"--workdir={work}", f"--out={out}", "--partial_format=safetensors"],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT_S)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "step 2: LoRA on 27 module(s) (r=8, alpha=8)" in res.stdout
  assert sorted(os.listdir(out)) == [lora_lib.LORA_WEIGHTS_NAME,
                                     lora_lib.PARTIAL_SAFETENSORS_NAME]
  meta = lora_lib.read_metadata(os.path.join(out, lora_lib.LORA_WEIGHTS_NAME))
  assert meta["r"] == 8 and meta["lora_alpha"] == 8.0 and len(meta["target_modules"]) == 27
