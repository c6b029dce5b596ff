"""Parity tests of the Flax Wan 2.1 VAE against diffusers' AutoencoderKLWan (tiny, fp32, CPU)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flax import nnx  # pylint: disable=g-import-not-at-top
from helios_jax import checkpoint  # pylint: disable=g-import-not-at-top
from helios_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
from helios_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top

RTOL = 1e-5
H, W = 24, 40  # multiples of 8, not of 16: odd latent sizes 3 x 5

# Two tiny configs with different z_dim, dim_mult, temporal pattern, depth and decoder width.
CONFIGS = {
    "a": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
              temperal_downsample=[False, True, True],
              latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
              latents_std=[2.8184, 1.4541, 2.3275, 2.6558]),
    "b": dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 3, 2], num_res_blocks=2,
              temperal_downsample=[True, True, False], attn_scales=[3.0]),
}


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _torch_vae(kwargs, seed):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKLWan(**kwargs).eval()
  with torch.no_grad():  # norm gammas start at 1: perturb them so each one matters
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.add_(0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
  """name -> (torch model, folder with the diffusers save, our WanVAE loaded from it)."""
  out = {}
  for i, (name, kwargs) in enumerate(CONFIGS.items()):
    model = _torch_vae(kwargs, seed=i)
    folder = str(tmp_path_factory.mktemp(f"vae_{name}"))
    model.save_pretrained(folder)
    out[name] = (model, folder, vae_lib.load_vae(folder))
  return out


def _video(t, seed=0, b=1):
  g = torch.Generator().manual_seed(seed)
  return torch.rand(b, 3, t, H, W, generator=g) * 2 - 1


def _latents(z, t, seed=0, b=1):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(b, z, t, H // 8, W // 8, generator=g)


# ------------------------------------------------------------------------------------------
# Parity.

_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name,frames", [
    ("a", 1), ("a", 17), ("a", 33),
    pytest.param("b", 1, marks=_SLOW), pytest.param("b", 17, marks=_SLOW), ("b", 33)])
def test_encode_mean_parity(vaes, name, frames):
  model, _, vae = vaes[name]
  x = _video(frames, seed=frames)
  with torch.no_grad():
    ref = model.encode(x).latent_dist.mean.numpy()
  ours = vae.encode(x.numpy())
  assert ours.shape == (1, CONFIGS[name]["z_dim"], 1 + (frames - 1) // 4, H // 8, W // 8)
  assert ours.dtype == jnp.float32
  assert rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("name,latent_frames", [
    ("a", 1), ("a", 5), ("a", 9),
    pytest.param("b", 1, marks=_SLOW), pytest.param("b", 5, marks=_SLOW), ("b", 9)])
def test_decode_parity(vaes, name, latent_frames):
  model, _, vae = vaes[name]
  z = _latents(CONFIGS[name]["z_dim"], latent_frames, seed=latent_frames)
  with torch.no_grad():
    ref = model.decode(z).sample.numpy()
  ours = vae.decode(z.numpy())
  assert ours.shape == (1, 3, 1 + 4 * (latent_frames - 1), H, W)
  assert float(jnp.abs(ours).max()) <= 1.0
  assert rel_err(ours, ref) <= RTOL


def test_decode_stream_equals_decode(vaes):
  _, _, vae = vaes["a"]
  z = _latents(4, 9, seed=9).numpy()
  full = np.asarray(vae.decode(z))
  pieces = [np.asarray(p) for p in vae.decode_stream(z, chunk=5)]  # latents 0-4, then 5-8
  assert [p.shape[2] for p in pieces] == [17, 16]
  np.testing.assert_array_equal(pieces[0], vae.decode(z[:, :, :5]))  # same compiled program
  # Continuing from the carried caches equals the one-shot decode up to XLA fusion rounding.
  assert rel_err(np.concatenate(pieces, axis=2), full) <= RTOL
  with pytest.raises(ValueError, match="chunk=0"):
    next(vae.decode_stream(z, chunk=0))


def test_sampled_encode_replays_diffusers(vaes):
  model, _, vae = vaes["a"]
  x = _video(17, seed=17)
  with torch.no_grad():
    dist = model.encode(x).latent_dist
    ref = dist.sample(generator=torch.Generator().manual_seed(123)).numpy()
  eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(123)).numpy()
  ours = vae.encode(x.numpy(), sample=True, noise=eps)
  assert rel_err(ours, ref) <= RTOL
  # Exactly mean + exp(logvar / 2) * eps with logvar clamped to [-30, 20].
  mean, logvar = vae.encode_moments_fn(vae.params, x.numpy())
  assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0
  np.testing.assert_allclose(ours, mean + jnp.exp(logvar / 2) * eps, rtol=1e-6, atol=1e-6)
  # An rng key draws standard-normal eps: deterministic per key.
  s1 = vae.encode(x.numpy(), sample=True, rng=jax.random.key(0))
  s2 = vae.encode(x.numpy(), sample=True, rng=jax.random.key(0))
  np.testing.assert_array_equal(s1, s2)
  assert not np.allclose(s1, mean)


def test_logvar_clamp():
  mean = jnp.zeros((1, 2, 1, 1, 1))
  logvar = jnp.asarray([-100.0, 100.0]).reshape(1, 2, 1, 1, 1)
  out = vae_lib.sample_posterior(mean, jnp.clip(logvar, -30, 20), jnp.ones_like(mean))
  np.testing.assert_allclose(np.asarray(out).ravel(), [np.exp(-15.0), np.exp(10.0)], rtol=1e-6)


def test_jitted_pure_functions_compose(vaes):
  _, _, vae = vaes["a"]
  x = _video(1, seed=1).numpy()

  def roundtrip(params, video):
    return vae.decode_fn(params, vae.denormalize(vae.normalize(vae.encode_fn(params, video))))

  # Traces inside an outer jit (eval_shape: no compile, the numbers are checked above).
  out = jax.eval_shape(jax.jit(roundtrip), vae.params, x)
  assert out.shape == (1, 3, 1, H, W) and out.dtype == jnp.float32
  out = jax.eval_shape(jax.jit(vae.decode_fn), vae.params, jnp.zeros((2, 4, 9, 6, 10)))
  assert out.shape == (2, 3, 33, 48, 80)


def test_normalize_matches_pipeline_formula(vaes):
  _, _, vae = vaes["a"]
  cfg = CONFIGS["a"]
  z = _latents(4, 2, seed=5)
  mean_t = torch.tensor(cfg["latents_mean"]).view(1, 4, 1, 1, 1)
  inv_t = 1.0 / torch.tensor(cfg["latents_std"]).view(1, 4, 1, 1, 1)
  np.testing.assert_array_equal(vae.normalize(z.numpy()), ((z - mean_t) * inv_t).numpy())
  # XLA:CPU fp32 division may differ from IEEE (torch/numpy) by 1 ulp.
  assert rel_err(vae.denormalize(z.numpy()), (z / inv_t + mean_t).numpy()) <= 1e-6
  with pytest.raises(ValueError, match=r"\(1, 3, 2, 3, 5\)"):
    vae.normalize(np.zeros((1, 3, 2, 3, 5), np.float32))


def test_orbax_load_matches_safetensors(vaes, tmp_path):
  _, folder, vae = vaes["a"]
  dst = tmp_path / "vae_orbax"
  dst.mkdir()
  (dst / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  checkpoint.save_params(str(dst / "params"), nnx.to_pure_dict(vae.params))
  loaded = vae_lib.load_vae(dst)
  for a, b in zip(jax.tree.leaves(vae.params), jax.tree.leaves(loaded.params)):
    np.testing.assert_array_equal(a, b)
  z = _latents(4, 9, seed=9).numpy()
  np.testing.assert_array_equal(loaded.decode(z), vae.decode(z))


@pytest.mark.slow  # an Orbax export and reload of every VAE tensor
def test_orbax_export_roundtrip(vaes, tmp_path):
  _, folder, vae = vaes["a"]
  dst = tmp_path / "vae_orbax"
  checkpoint.export_model(vae_lib.VAE_SPEC, folder, dst, progress=False)
  assert checkpoint.is_orbax_export(dst)
  assert json.load(open(dst / "config.json"))["z_dim"] == 4
  exported = vae_lib.load_vae(dst)
  assert exported.config == vae.config
  for a, b in zip(jax.tree.leaves(vae.params), jax.tree.leaves(exported.params)):
    np.testing.assert_array_equal(a, b)
  z = _latents(4, 9, seed=9).numpy()
  np.testing.assert_array_equal(exported.decode(z), vae.decode(z))
  x = _video(33, seed=33).numpy()
  np.testing.assert_array_equal(exported.encode(x), vae.encode(x))
  with pytest.raises(FileExistsError):
    checkpoint.export_model(vae_lib.VAE_SPEC, folder, dst, progress=False)


def test_bfloat16_params(vaes):
  _, folder, vae = vaes["a"]
  assert {x.dtype for x in jax.tree.leaves(vae.params)} == {jnp.dtype(jnp.float32)}
  vae16 = vae_lib.load_vae(folder, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(vae16.params)} == {jnp.dtype(jnp.bfloat16)}
  out = jax.eval_shape(vae16.decode_fn, vae16.params, jnp.zeros((1, 4, 5, 3, 5)))
  assert out.dtype == jnp.bfloat16


@pytest.mark.slow
def test_bfloat16_decode_close_to_fp32(vaes):
  model, folder, vae = vaes["a"]
  vae16 = vae_lib.load_vae(folder, dtype=jnp.bfloat16)
  z = _latents(4, 1, seed=1)
  out = vae16.decode(z.numpy())
  assert out.dtype == jnp.bfloat16
  with torch.no_grad():
    ref16 = model.to(torch.bfloat16).decode(z.to(torch.bfloat16)).sample.float().numpy()
    model.to(torch.float32)
  ref32 = np.asarray(vae.decode(z.numpy()))
  # Our bf16 error is of the same size as diffusers' own bf16 error.
  assert rel_err(np.asarray(out, np.float32), ref32) <= 2 * rel_err(ref16, ref32) + 1e-2


@pytest.mark.slow
def test_batch_of_two_parity(vaes):
  model, _, vae = vaes["b"]
  x = _video(5, seed=3, b=2)
  z = _latents(6, 2, seed=4, b=2)
  with torch.no_grad():
    ref_mean = model.encode(x).latent_dist.mean.numpy()
    ref_video = model.decode(z).sample.numpy()
  assert rel_err(vae.encode(x.numpy()), ref_mean) <= RTOL
  assert rel_err(vae.decode(z.numpy()), ref_video) <= RTOL


@pytest.mark.slow
def test_temporal_factor_two_parity(tmp_path):
  # 3 levels: 4x spatial; one temporal downsample: 4-frame chunks -> 2 latent frames.
  kwargs = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                temperal_downsample=[True, False])
  model = _torch_vae(kwargs, seed=7)
  model.save_pretrained(tmp_path)
  vae = vae_lib.load_vae(tmp_path)
  assert (vae.config.spatial_factor, vae.config.temporal_factor) == (4, 2)
  x = _video(9, seed=2)
  with torch.no_grad():
    ref_mean = model.encode(x).latent_dist.mean
    ref_video = model.decode(ref_mean).sample.numpy()
  ours = vae.encode(x.numpy())
  assert ours.shape == (1, 4, 5, H // 4, W // 4)
  assert rel_err(ours, ref_mean.numpy()) <= RTOL
  assert rel_err(vae.decode(ref_mean.numpy()), ref_video) <= RTOL


# ------------------------------------------------------------------------------------------
# Config, key map, bad inputs.


def test_default_config_keys_and_parameter_count():
  with torch.device("meta"):
    ref = diffusers.AutoencoderKLWan()
  cfg = vae_lib.WanVAEConfig.from_dict(dict(ref.config))
  assert cfg == vae_lib.WanVAEConfig.from_preset("wan2.1")
  assert set(vae_lib.WanVAEConfig.field_names()) == {
      k for k in ref.config if not k.startswith("_")}
  assert (cfg.spatial_factor, cfg.temporal_factor) == (8, 4)
  _, abstract = vae_lib.VAE_SPEC.abstract(cfg, jnp.float32)
  flat = checkpoint.flatten_tree(abstract)
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == 126_892_531
  key_map = vae_lib.VAE_SPEC.key_map(cfg)
  state = ref.state_dict()
  assert len(state) == len(flat) == 194
  covered = set()
  for key, tensor in state.items():
    path, layer = key_map(key)
    assert layer is None and path in flat, key
    shape = tuple(tensor.shape)
    want = shape[2:] + shape[1::-1] if path[-1] == "kernel" else (shape[0],)
    assert tuple(flat[path].shape) == want, (key, shape, flat[path].shape)
    covered.add(path)
  assert covered == set(flat)


@pytest.mark.parametrize("change,match", [
    ({"is_residual": True}, "is_residual"),
    ({"patch_size": 2}, "patch_size=2"),
    ({"attn_scales": [0.5]}, r"attn_scales=\[0.5\]"),
    ({"temperal_downsample": [True, True]}, "temperal_downsample"),
    ({"temperal_downsample": [True, True, True]}, "more than 4x"),
    ({"latents_std": [1.0]}, "len"),
    ({"bogus_key": 1}, "bogus_key"),
])
def test_config_errors(change, match):
  with pytest.raises(ConfigError, match=match):
    vae_lib.WanVAEConfig.from_dict({**CONFIGS["a"], **change})


def test_bad_inputs(vaes):
  _, _, vae = vaes["a"]
  bad_videos = [
      (np.zeros((3, 5, H, W), np.float32), r"\(3, 5, 24, 40\) must be 5-D"),
      (np.zeros((1, 4, 5, H, W), np.float32), "channels=4"),
      (np.zeros((1, 3, 4, H, W), np.float32), "num_frames=4"),
      (np.zeros((1, 3, 5, 20, W), np.float32), "height=20"),
      (np.zeros((1, 3, 5, H, 36), np.float32), "width=36"),
  ]
  for video, match in bad_videos:
    with pytest.raises(ValueError, match=match):
      vae.encode(video)
  with pytest.raises(ValueError, match="5-D"):
    vae.decode(np.zeros((4, 2, 3, 5), np.float32))
  with pytest.raises(ValueError, match="channels=16"):
    vae.decode(np.zeros((1, 16, 2, 3, 5), np.float32))
  x = np.zeros((1, 3, 1, H, W), np.float32)
  with pytest.raises(ValueError, match="rng= or noise="):
    vae.encode(x, sample=True)
  with pytest.raises(ValueError, match=r"noise shape \(1, 4, 2, 3, 5\)"):
    vae.encode(x, sample=True, noise=np.zeros((1, 4, 2, 3, 5), np.float32))


def test_bad_checkpoints(vaes, tmp_path):
  _, folder, _ = vaes["a"]
  with pytest.raises(checkpoint.CheckpointError, match="not found"):
    vae_lib.load_vae(tmp_path / "missing")
  # Corrupt weights: truncated safetensors file.
  bad = tmp_path / "truncated"
  bad.mkdir()
  (bad / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  data = open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "rb").read()
  (bad / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
    vae_lib.load_vae(bad)
  # Weights of a different config: shape mismatch names the tensor.
  other = tmp_path / "other"
  other.mkdir()
  cfg = json.load(open(os.path.join(folder, "config.json")))
  cfg["base_dim"] = 16
  (other / "config.json").write_text(json.dumps(cfg))
  (other / "diffusion_pytorch_model.safetensors").write_bytes(data)
  with pytest.raises(checkpoint.CheckpointError, match="cannot become"):
    vae_lib.load_vae(other)
  # Unknown config key.
  unknown = tmp_path / "unknown"
  unknown.mkdir()
  (unknown / "config.json").write_text(json.dumps({**cfg, "base_dim": 8, "foo": 1}))
  with pytest.raises(ConfigError, match="foo"):
    vae_lib.load_vae(unknown)


def test_module_tree_is_channels_last_nnx(vaes):
  _, _, vae = vaes["a"]
  model = vae.model
  assert isinstance(model, nnx.Module)
  assert model.encoder.conv_in.kernel.shape == (3, 3, 3, 3, 8)
  assert model.decoder.up_blocks[0].upsamplers[0].time_conv.kernel.shape == (3, 1, 1, 16, 32)
