"""Parity of the Flax Helios DiT with diffusers' HeliosTransformer3DModel (CPU, fp32)."""

import decimal
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import rel_err
from helios_jax import checkpoint
from helios_jax.config import ConfigError, HeliosTransformerConfig
from helios_jax.models import memory, rope
from helios_jax.models import transformer as tr
from helios_jax.models.attention import KernelConfig

KERNELS_XLA = KernelConfig("xla", "xla")

diffusers = pytest.importorskip("diffusers")

# Three configs that flip every flag of the diffusers class between them.
CONFIGS = {
    # released flags, 3 heads, uneven rope split, batch 2, all history groups, sharded files.
    "released_flags": dict(num_attention_heads=3, attention_head_dim=16, num_layers=2,
                           ffn_dim=40, text_dim=24, freq_dim=16, rope_dim=(6, 6, 4)),
    # every boolean flipped, per-head amplification, unused added-KV params, 5 heads.
    "flipped_flags": dict(num_attention_heads=5, attention_head_dim=8, num_layers=3, ffn_dim=24,
                          text_dim=12, freq_dim=8, rope_dim=(4, 2, 2), cross_attn_norm=False,
                          guidance_cross_attn=False, zero_history_timestep=False,
                          is_amplify_history=True, history_scale_mode="per_head",
                          added_kv_proj_dim=12, qk_norm="rms_norm"),
    # no memory patches, scalar amplification (inactive without history), patch (2,2,2).
    "no_memory": dict(num_attention_heads=2, attention_head_dim=12, num_layers=1, ffn_dim=16,
                      text_dim=8, freq_dim=6, rope_dim=(4, 4, 4), patch_size=(2, 2, 2),
                      has_multi_term_memory_patch=False, is_amplify_history=True,
                      history_scale_mode="scalar", out_channels=8, in_channels=8),
}


def make_reference(tmp_path, name, seed=0, shard="60KB"):
  torch.manual_seed(seed)
  model = diffusers.HeliosTransformer3DModel(**CONFIGS[name]).eval()
  with torch.no_grad():  # non-trivial amplification scales
    for mod in model.modules():
      if hasattr(mod, "history_key_scale"):
        mod.history_key_scale.normal_()
  path = os.path.join(tmp_path, name)
  model.save_pretrained(path, max_shard_size=shard)
  return model, path


def make_inputs(cfg, batch, groups=("short", "mid", "long"), hw=(12, 10), t_noisy=3, seed=1,
                int_timestep=False):
  g = torch.Generator().manual_seed(seed)
  c = cfg.get("in_channels", 16)
  h, w = hw
  pt = cfg.get("patch_size", (1, 2, 2))[0]
  args = {
      "hidden_states": torch.randn(batch, c, t_noisy * pt, h, w, generator=g),
      "timestep": (torch.tensor([999, 3][:batch]) if int_timestep
                   else torch.tensor([731.25, 12.5][:batch])),
      "encoder_hidden_states": torch.randn(batch, 7, cfg["text_dim"], generator=g),
      "indices_hidden_states": torch.arange(20, 20 + t_noisy).repeat(batch, 1),
  }
  frames = {"short": (2, [0, 19]), "mid": (2, [17, 18]), "long": (5, list(range(1, 6)))}
  for grp in groups:
    n, idx = frames[grp]
    args[f"latents_history_{grp}"] = torch.randn(batch, c, n, h, w, generator=g)
    args[f"indices_latents_history_{grp}"] = torch.tensor([idx] * batch)
  return args


def to_np(args):
  return {k: v.numpy() for k, v in args.items()}


@pytest.mark.parametrize("name,batch,groups,int_t", [
    ("released_flags", 2, ("short", "mid", "long"), False),
    ("released_flags", 1, ("short",), True),
    ("released_flags", 1, ("short", "mid"), False),
    ("flipped_flags", 1, ("short", "mid", "long"), False),
    ("flipped_flags", 2, (), True),
    ("no_memory", 2, (), False),
])
def test_forward_parity(tmp_path, name, batch, groups, int_t):
  ref_model, path = make_reference(tmp_path, name)
  args = make_inputs(CONFIGS[name], batch, groups, int_timestep=int_t)
  with torch.no_grad():
    ref = ref_model(**args).sample.numpy()
  ours = tr.load_transformer(path, kernels=KERNELS_XLA)
  out = np.asarray(ours(**to_np(args)))
  assert out.shape == ref.shape
  assert rel_err(out, ref) <= 1e-5


def test_sharded_checkpoint_is_read_from_many_files(tmp_path):
  _, path = make_reference(tmp_path, "released_flags", shard="30KB")
  shards = [n for n in os.listdir(path) if n.endswith(".safetensors")]
  assert len(shards) >= 5
  assert any(n.endswith(".index.json") for n in os.listdir(path))


def test_orbax_round_trip(tmp_path):
  ref_model, path = make_reference(tmp_path, "released_flags")
  dst = os.path.join(tmp_path, "orbax_transformer")
  checkpoint.export_model(tr.TRANSFORMER_SPEC, path, dst, progress=False)
  assert checkpoint.is_orbax_export(dst)
  args = make_inputs(CONFIGS["released_flags"], 2)
  with torch.no_grad():
    ref = ref_model(**args).sample.numpy()
  a = np.asarray(tr.load_transformer(path, kernels=KERNELS_XLA)(**to_np(args)))
  b = np.asarray(tr.load_transformer(dst, kernels=KERNELS_XLA)(**to_np(args)))
  np.testing.assert_array_equal(a, b)
  assert rel_err(b, ref) <= 1e-5
  # readable with orbax alone, blocks stacked on a leading layer axis.
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top
  raw = ocp.load(os.path.join(dst, checkpoint.PARAMS_DIR))
  assert raw["blocks"]["attn1"]["to_q"]["kernel"].shape == (2, 48, 48)
  np.testing.assert_array_equal(
      raw["blocks"]["attn1"]["to_q"]["kernel"][1],
      ref_model.blocks[1].attn1.to_q.weight.detach().numpy().T)


def test_bf16_dtype_policy(tmp_path):
  _, path = make_reference(tmp_path, "flipped_flags")
  ours = tr.load_transformer(path, dtype=jnp.bfloat16)
  flat = checkpoint.flatten_tree(jax.tree.map(lambda a: a.dtype, dict(
      __import__("flax").nnx.to_pure_dict(ours.params))))
  for path_, dt in flat.items():
    keep = any(m in path_ for m in tr.FP32_MODULES)
    assert dt == (jnp.float32 if keep else jnp.bfloat16), (path_, dt)


def test_bf16_close_to_reference_bf16(tmp_path):
  """bf16 forward against diffusers loaded with torch_dtype=bf16 (fp32-kept modules real).

  Both bf16 forwards are compared with the fp32 model on the same (bf16-representable) inputs.
  Tolerances are in units of bf16's unit roundoff u = 2^-8 relative to the output's scale: our
  forward stays within 3u of fp32 (measured 1.6u), so it is within 6u of any reference bf16
  forward that is as accurate. No bit-identity is asserted: torch's bf16 CPU kernels round
  differently on different CPUs (AVX-512 / AMX / AVX2 paths).
  """
  ref_model32, path = make_reference(tmp_path, "released_flags")
  ref_model = diffusers.HeliosTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
  args = make_inputs(CONFIGS["released_flags"], 1)
  targs = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v)
           for k, v in args.items()}
  # The math SDPA backend: torch's fused CPU bf16 kernel needs AVX-512 at run time.
  with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
    ref = ref_model(**targs).sample.float().numpy()
    exact = ref_model32(**{k: (v.float() if v.dtype == torch.bfloat16 else v)
                           for k, v in targs.items()}).sample.double().numpy()
  ours = tr.load_transformer(path, dtype=jnp.bfloat16, kernels=KERNELS_XLA)
  out = ours(**{k: (jnp.asarray(v.float().numpy(), jnp.bfloat16) if v.dtype == torch.bfloat16
                    else v.numpy()) for k, v in targs.items()})
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out.astype(jnp.float32))
  u = 2.0 ** -8
  assert rel_err(out, exact) <= 3 * u
  assert rel_err(out, ref) <= 6 * u


# ------------------------------------------------------------------------------------------
# Intermediate parity: RoPE, memory patch embedding, one block.


def test_rope_tables_match_reference():
  from diffusers.models.transformers import transformer_helios as th  # pylint: disable=g-import-not-at-top
  ref = th.HeliosRotaryPosEmbed(rope_dim=(44, 42, 42), theta=10000.0)
  idx = torch.tensor([[17, 18], [3, 40]])
  for pool in (None, 2, 4):
    h, w = 6, 10
    table = ref(frame_indices=idx, height=h, width=w, device="cpu")  # [B, 256, T, H, W]
    if pool:
      table = th.pad_for_3d_conv(table, (pool,) * 3)
      table = th.center_down_sample_3d(table, (pool,) * 3)
      cos, sin = rope.pooled_rope_tables(jnp.asarray(idx.numpy()), h, w, pool, (44, 42, 42),
                                         10000.0)
    else:
      cos, sin = rope.rope_tables(jnp.asarray(idx.numpy()), h, w, (44, 42, 42), 10000.0)
    table = table.permute(0, 2, 3, 4, 1).numpy()  # [B, T, H, W, 256]
    np.testing.assert_allclose(np.asarray(cos), table[..., 0:128:2], atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), table[..., 129:256:2], atol=2e-6, rtol=0)
    np.testing.assert_array_equal(table[..., 0:128:2], table[..., 1:128:2])


def test_rope_inv_freqs_bits():
  """Correctly rounded against an exact (50-digit) evaluation; within 2 ulp of torch's fp32.

  The reference rounds the exponent k/d to fp32 (exact IEEE division, the same everywhere), then
  evaluates pow and the reciprocal in fp32: each rounds once (<= 0.5 ulp), and a vectorised
  `powf` adds up to 1 ulp, so any host's reference is within 2 ulp of the exact value.
  """
  decimal.getcontext().prec = 50
  for d, theta in ((44, 10000.0), (42, 10000.0), (16, 10000.0), (128, 500000.0)):
    e = np.arange(0, d, 2, dtype=np.float32)[: d // 2] / np.float32(d)
    exact = np.array([float(1 / decimal.Decimal(float(np.float32(theta))) ** decimal.Decimal(
        float(x))) for x in e])
    ours = rope.inv_freqs(d, theta)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, exact.astype(np.float32))
    ref = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32)[: d // 2] / d))
    ulp = np.spacing(np.abs(ours))
    assert np.all(np.abs(ref.numpy().astype(np.float64) - ours) <= 2 * ulp)


def test_compressed_rope_is_damped_rotation():
  """Closed-form oracle of the pooled table (spec §3.4): cos(omega c) * a(omega)."""
  idx = jnp.asarray([[17, 18]])
  cos, _ = rope.pooled_rope_tables(idx, 4, 4, 2, (44, 42, 42), 10000.0)
  om = rope.inv_freqs(44, 10000.0).astype(np.float64)
  want = np.cos(om * 17.5) * np.cos(om / 2)
  np.testing.assert_allclose(np.asarray(cos)[0, 0, 0, 0, :22], want, atol=1e-6)


def test_memory_patch_embedding_matches_conv3d():
  torch.manual_seed(0)
  for kernel, t, h, w in (((1, 2, 2), 2, 6, 10), ((2, 4, 4), 3, 6, 10), ((4, 8, 8), 5, 12, 10)):
    conv = torch.nn.Conv3d(16, 24, kernel, stride=kernel)
    x = torch.randn(2, 16, t, h, w)
    from diffusers.models.transformers import transformer_helios as th  # pylint: disable=g-import-not-at-top
    ref = conv(th.pad_for_3d_conv(x, kernel)).detach().permute(0, 2, 3, 4, 1).numpy()
    mod = memory.PatchEmbed3D(16, 24, kernel, dtype=jnp.float32,
                              rngs=__import__("flax").nnx.Rngs(0))
    mod.kernel[...] = jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 4, 1, 0))
    mod.bias[...] = jnp.asarray(conv.bias.detach().numpy())
    xp = rope.replicate_pad_to_multiple(jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)), kernel,
                                        (1, 2, 3))
    assert rel_err(mod(xp), ref) <= 1e-5


def test_memory_init_from_patch_embedding_equals_pooled_patch_embed():
  rng = np.random.default_rng(0)
  kern = rng.standard_normal((1, 2, 2, 16, 8)).astype(np.float32)
  bias = rng.standard_normal(8).astype(np.float32)
  stems = memory.init_memory_patches_from_patch_embedding(kern, bias, 16)
  x = rng.standard_normal((1, 4, 8, 8, 16)).astype(np.float32)
  nnx = __import__("flax").nnx
  base = memory.PatchEmbed3D(16, 8, (1, 2, 2), dtype=jnp.float32, rngs=nnx.Rngs(0))
  base.kernel[...], base.bias[...] = jnp.asarray(kern), jnp.asarray(bias)
  for name, r in (("patch_mid", 2), ("patch_long", 4)):
    stem = memory.PatchEmbed3D(16, 8, (r, 2 * r, 2 * r), dtype=jnp.float32, rngs=nnx.Rngs(0))
    stem.kernel[...], stem.bias[...] = (jnp.asarray(a) for a in stems[name])
    pooled = x.reshape(1, 4 // r, r, 8 // r, r, 8 // r, r, 16).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(np.asarray(stem(jnp.asarray(x))), np.asarray(base(pooled)),
                               atol=1e-5)


def test_one_block_matches_reference(tmp_path):
  """Block 0 alone, with a per-token (history t=0 / noisy t) modulation as the model builds it."""
  ref_model, path = make_reference(tmp_path, "released_flags")
  ours = tr.load_transformer(path, kernels=KERNELS_XLA).module()
  nnx = __import__("flax").nnx
  blk_ref = ref_model.blocks[0]
  g = torch.Generator().manual_seed(3)
  d, hist, n = 48, 5, 7
  x = torch.randn(1, hist + n, d, generator=g)
  text = torch.randn(1, 4, d, generator=g)
  tp_h, tp_n = torch.randn(1, 6, d, generator=g), torch.randn(1, 6, d, generator=g)
  per_tok = torch.cat([tp_h[:, None].expand(1, hist, 6, d), tp_n[:, None].expand(1, n, 6, d)], 1)
  cos = torch.rand(1, hist + n, 8, generator=g)
  sin = torch.rand(1, hist + n, 8, generator=g)
  rot = torch.cat([cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)], -1)
  with torch.no_grad():
    ref = blk_ref(x, text, per_tok, rot, n).numpy()
  block = nnx.merge(*nnx.split(ours.blocks))  # stacked; take layer 0 of its state
  graphdef, state = nnx.split(block)
  layer0 = jax.tree.map(lambda a: a[0], state)
  blk = nnx.merge(graphdef, layer0)
  ctx = tr.BlockContext(text=jnp.asarray(text.numpy()), mod_hist=jnp.asarray(tp_h.numpy()),
                        mod_noisy=jnp.asarray(tp_n.numpy()),
                        rope=(jnp.asarray(cos.numpy()), jnp.asarray(sin.numpy())),
                        num_history=hist, mod_split=hist)
  out = np.asarray(blk(jnp.asarray(x.numpy()), ctx))
  assert rel_err(out, ref) <= 1e-6


# ------------------------------------------------------------------------------------------
# Config and bad input.


def test_param_count_14b_by_eval_shape():
  assert tr.count_params(HeliosTransformerConfig.from_preset("helios-14b")) == 14_312_427_584


def test_config_round_trip_and_unknown_key(tmp_path):
  _, path = make_reference(tmp_path, "flipped_flags")
  cfg = HeliosTransformerConfig.from_json(path)
  assert cfg.added_kv_proj_dim == 12 and cfg.rope_dim == (4, 2, 2)
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  raw["num_atention_heads"] = 3
  with pytest.raises(ConfigError, match="num_atention_heads"):
    HeliosTransformerConfig.from_dict(raw)
  with pytest.raises(ConfigError, match="rope_dim"):
    HeliosTransformerConfig(rope_dim=(44, 42, 40))
  with pytest.raises(ConfigError, match="unknown preset"):
    HeliosTransformerConfig.from_preset("helios-1b")


def test_unknown_config_key_on_load(tmp_path):
  _, path = make_reference(tmp_path, "released_flags")
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    raw = json.load(f)
  raw["window_size"] = [-1, -1]
  with open(cfg_path, "w") as f:
    json.dump(raw, f)
  with pytest.raises(ConfigError, match="window_size"):
    tr.load_transformer(path)


def test_bad_inputs_name_the_value(tmp_path):
  _, path = make_reference(tmp_path, "released_flags")
  ours = tr.load_transformer(path, kernels=KERNELS_XLA)
  good = to_np(make_inputs(CONFIGS["released_flags"], 1))
  bad = dict(good, hidden_states=good["hidden_states"][:, :8])
  with pytest.raises(ValueError, match="8 channels"):
    ours(**bad)
  bad = dict(good, indices_latents_history_long=good["indices_latents_history_long"][:, :3])
  with pytest.raises(ValueError, match="indices_latents_history_long has 3 frames"):
    ours(**bad)
  bad = dict(good, indices_latents_history_short=np.array([[0, 1, 19]]))
  with pytest.raises(ValueError, match="indices_latents_history_short has 3 frames"):
    ours(**bad)
  bad = {k: v for k, v in good.items() if not k.endswith("short")}
  with pytest.raises(ValueError, match="need latents_history_short"):
    ours(**bad)
  bad = {k: v for k, v in good.items() if k != "indices_latents_history_mid"}
  with pytest.raises(ValueError, match="only latents given"):
    ours(**bad)
  bad = dict(good, hidden_states=good["hidden_states"][..., :5])
  with pytest.raises(ValueError, match="W=5"):
    ours(**bad)
  with pytest.raises(TypeError, match="latents_history_longg"):
    ours(**good, latents_history_longg=None)


def test_missing_and_corrupt_checkpoints(tmp_path):
  _, path = make_reference(tmp_path, "released_flags")
  shard = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))[1]
  os.rename(os.path.join(path, shard), os.path.join(tmp_path, shard))
  with pytest.raises(checkpoint.CheckpointError, match=shard):
    tr.load_transformer(path)
  os.rename(os.path.join(tmp_path, shard), os.path.join(path, shard))
  with open(os.path.join(path, shard), "r+b") as f:
    f.truncate(100)
  with pytest.raises(checkpoint.CheckpointError, match=shard):
    tr.load_transformer(path)
  with pytest.raises(checkpoint.CheckpointError, match="not found"):
    tr.load_transformer(os.path.join(tmp_path, "nope"))


def test_missing_and_unexpected_keys_are_named(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model, path = make_reference(tmp_path, "released_flags", shard="10GB")
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  for drop, extra, match in (("blocks.1.ffn.net.2.bias", None, r"ffn/proj_out/bias\[layer 1\]"),
                             (None, "blocks.0.attn1.bogus.weight", "blocks.0.attn1.bogus.weight")):
    d = dict(sd)
    if drop:
      d.pop(drop)
    if extra:
      d[extra] = np.zeros(3, np.float32)
    save_file(d, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=match):
      tr.load_transformer(path)
  d = dict(sd)
  d["proj_out.weight"] = np.zeros((3, 3), np.float32)
  save_file(d, os.path.join(path, "diffusion_pytorch_model.safetensors"))
  with pytest.raises(checkpoint.CheckpointError, match="proj_out.weight"):
    tr.load_transformer(path)


@pytest.mark.parametrize("name", ["released_flags"])
def test_pallas_kernels_interpret_match_xla(tmp_path, name):
  """Whole-DiT parity of the Pallas kernel path (interpret mode on CPU) with the XLA path."""
  _, path = make_reference(tmp_path, name)
  args = to_np(make_inputs(CONFIGS[name], 1))
  xla = tr.load_transformer(path, kernels=KernelConfig("xla", "xla"))
  pallas = tr.load_transformer(path, kernels=KernelConfig("pallas", "pallas", interpret=True))
  assert rel_err(pallas(**args), xla(**args)) <= 1e-5
  xla16 = tr.load_transformer(path, jnp.bfloat16, kernels=KernelConfig("xla", "xla"))
  pal16 = tr.load_transformer(path, jnp.bfloat16,
                              kernels=KernelConfig("pallas", "pallas", interpret=True))
  a = np.asarray(xla16(**args).astype(jnp.float32))
  b = np.asarray(pal16(**args).astype(jnp.float32))
  assert rel_err(b, a) < 2e-2


def test_explicit_pallas_without_gpu_raises(tmp_path):
  from pallas_kernels.dispatch import ImplementationUnavailableError  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  _, path = make_reference(tmp_path, "released_flags")
  model = tr.load_transformer(path, kernels=KernelConfig(attention="pallas"))
  with pytest.raises(ImplementationUnavailableError, match="interpret=True"):
    model(**to_np(make_inputs(CONFIGS["released_flags"], 1)))
  with pytest.raises(ValueError, match="not in"):
    KernelConfig(attention="flash")
