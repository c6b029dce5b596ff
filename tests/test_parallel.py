"""Sharding (`helios_jax.sharding`): the logical-axis rules, meshes, and multi-device inference
on 4 forced host devices equal to the single-device result."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from helios_jax import sharding
from helios_jax.config import HeliosTransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    from helios_jax import sampling, sharding
    from helios_jax import schedulers as hs
    from helios_jax import pipeline as pl
    from helios_jax.config import HeliosTransformerConfig
    from helios_jax.models.transformer import init_transformer
    from helios_jax.models.attention import KernelConfig

    assert len(jax.devices()) == 4, jax.devices()
    cfg = HeliosTransformerConfig.from_preset("tiny").replace(num_attention_heads=4,
                                                              attention_head_dim=16,
                                                              rope_dim=(6, 6, 4), ffn_dim=64)
    k = iter(jax.random.split(jax.random.key(0), 8))
    rnd = lambda *s: jax.random.normal(next(k), s, jnp.float32)
    b, h, w = 2, 10, 12   # token counts not divisible by 4 (uneven context split)
    inputs = dict(hidden_states=rnd(b, 16, 3, h, w), timestep=jnp.array([700.0, 20.0]),
                  encoder_hidden_states=rnd(b, 5, cfg.text_dim),
                  indices_hidden_states=jnp.tile(jnp.arange(20, 23)[None], (b, 1)),
                  latents_history_short=rnd(b, 16, 2, h, w),
                  indices_latents_history_short=jnp.tile(jnp.array([[0, 19]]), (b, 1)),
                  latents_history_mid=rnd(b, 16, 2, h, w),
                  indices_latents_history_mid=jnp.tile(jnp.array([[17, 18]]), (b, 1)),
                  latents_history_long=rnd(b, 16, 5, h, w),
                  indices_latents_history_long=jnp.tile(jnp.arange(1, 6)[None], (b, 1)))
    model = init_transformer(cfg, jnp.float32, seed=0, kernels=KernelConfig("xla", "xla"))
    ref = np.asarray(model.forward(model.params, inputs))
    errs = {}
    for name, sizes in {"tensor4": dict(tensor=4), "context4": dict(context=4),
                        "data2_context2": dict(data=2, context=2),
                        "context2_tensor2": dict(context=2, tensor=2)}.items():
      mesh = sharding.make_mesh("inference", **sizes)
      sharded = init_transformer(cfg, jnp.float32, seed=0, kernels=KernelConfig("xla", "xla"))
      sharding.shard_transformer(sharded, mesh)
      out = sharded.forward(sharded.params, inputs, constrain=sharding.token_constraint(mesh))
      n_dev = len(out.sharding.device_set) if hasattr(out, "sharding") else 1
      errs[name] = (float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()), n_dev)
    # A whole pyramid chunk (DMD sampler with history) through chunk_step.
    sched = hs.HeliosDMDSchedulerConfig(stages=3, use_dynamic_shifting=True)
    sc = sampling.SamplerConfig(scheduler=sched, pyramid=True, steps=(1, 1, 1),
                                latent_height=16, latent_width=16)
    state = sampling.empty_history(1, 16, 16)
    state = sampling.HistoryState(latents=rnd(1, 19, 16, 16, 16), anchor=rnd(1, 1, 16, 16, 16))
    noise = sampling.draw_chunk_noise(jax.random.key(3), sc, 1)
    text = rnd(1, 5, cfg.text_dim)
    _, ref_chunk, _ = pl.chunk_step(model.graphdef, sc, True, model.params, text, None, state,
                                    noise, jnp.asarray(False))
    mesh = sharding.make_mesh("inference", context=2, tensor=2)
    sharding.shard_transformer(model, mesh)
    args = jax.device_put((text, state, noise, jnp.asarray(False)), sharding.replicated(mesh))
    _, chunk, _ = pl.chunk_step(model.graphdef, sc, True, model.params, args[0], None, args[1],
                                args[2], args[3], constrain=sharding.token_constraint(mesh))
    errs["chunk_context2_tensor2"] = (
        float(np.abs(np.asarray(chunk) - np.asarray(ref_chunk)).max()
              / np.abs(np.asarray(ref_chunk)).max()), len(chunk.sharding.device_set))
    # The Pipeline with a sharded DiT (VAE on one device) generates the same video.
    from helios_jax import presets
    from helios_jax.models.vae import init_vae
    _, vae_cfg, _ = presets.tiny_configs()
    vae = init_vae(vae_cfg, seed=1)
    flags = hs.PipelineFlags(is_distilled=True)
    single = init_transformer(cfg, jnp.float32, seed=0, kernels=KernelConfig("xla", "xla"))
    kw = dict(prompt_embeds=np.asarray(text), num_frames=66, height=64, width=64, seed=4,
              steps=(1, 1, 1), progress=False)
    a = pl.Pipeline(single, vae, sched, flags).generate(**kw)
    multi = init_transformer(cfg, jnp.float32, seed=0, kernels=KernelConfig("xla", "xla"))
    b = pl.Pipeline(multi, vae, sched, flags).shard(
        sharding.make_mesh("inference", data=2, tensor=2))
    b = b.generate(**kw)
    errs["pipeline_data2_tensor2"] = (
        float(np.abs(b.latents - a.latents).max() / np.abs(a.latents).max()),
        len(multi.params["blocks"]["attn1"]["to_q"]["kernel"].sharding.device_set))
    print("RESULT", json.dumps(errs))
""")


@pytest.mark.slow
@pytest.mark.heavy
def test_sharded_inference_equals_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")  # keeps e.g. a forced --xla_cpu_max_isa
                        + " --xla_force_host_platform_device_count=4").strip())
  res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       check=False, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-4000:]
  import json  # pylint: disable=g-import-not-at-top
  line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")][-1]
  errs = json.loads(line[len("RESULT"):])
  assert set(errs) == {"tensor4", "context4", "data2_context2", "context2_tensor2",
                       "chunk_context2_tensor2", "pipeline_data2_tensor2"}
  for name, (err, n_dev) in errs.items():
    assert err <= 1e-5, (name, err)
    assert n_dev == 4, (name, n_dev)  # the computation really ran on the mesh


def test_mesh_and_spec_errors():
  with pytest.raises(ValueError, match="only 1 available"):
    sharding.make_mesh("inference", tensor=8)
  with pytest.raises(ValueError, match="tensor=3"):
    sharding.transformer_param_specs({}, HeliosTransformerConfig.from_preset("helios-14b"),
                                     {"data": 1, "context": 1, "tensor": 3})
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.mesh_shape("training", 4, data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="sizes must be >= 1 or -1"):
    sharding.mesh_shape("inference", 4, tensor=0)
  with pytest.raises(ValueError, match="does not divide 4 devices"):
    sharding.mesh_shape("training", 4, data=3, fsdp=-1)
  with pytest.raises(ValueError, match="has 2 devices, but 4 are present"):
    sharding.mesh_shape("training", 4, data=2, fsdp=1)
  with pytest.raises(ValueError, match=r"\['fsdp'\] are not inference axes"):
    sharding.mesh_shape("inference", 4, fsdp=2)
  with pytest.raises(ValueError, match="unknown sharding use 'serving'"):
    sharding.mesh_shape("serving", 4)


def test_mesh_shapes():
  assert sharding.mesh_shape("training", 8, **dataclasses.asdict(sharding.MeshConfig())) == (
      1, 8, 1)
  assert sharding.mesh_shape("training", 8, data=2, fsdp=-1, context=2) == (2, 2, 2)
  assert sharding.mesh_shape("inference", 8, tensor=4) == (1, 1, 4)  # a subset of the devices
  assert sharding.mesh_shape("inference", 8, context=-1, tensor=2) == (1, 4, 2)
  mesh = sharding.make_mesh("training")
  assert mesh.axis_names == ("data", "fsdp", "context") and sharding.rules_of(mesh).fsdp == "fsdp"
  assert sharding.token_constraint(mesh) is None  # one device: nothing to split
  assert sharding.token_constraint(sharding.make_mesh("inference")) is None


def _dit_params():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from helios_jax.models.transformer import TRANSFORMER_SPEC  # pylint: disable=g-import-not-at-top
  cfg = HeliosTransformerConfig.from_preset("tiny")
  return cfg, TRANSFORMER_SPEC.abstract(cfg, jnp.float32)[1]


def test_inference_param_specs_are_megatron():
  cfg, params = _dit_params()
  specs = sharding.transformer_param_specs(params, cfg, {"data": 1, "context": 2, "tensor": 2})
  blocks = specs["blocks"]
  for attn in ("attn1", "attn2"):
    for name in ("to_q", "to_k", "to_v"):
      assert blocks[attn][name]["kernel"] == P(None, None, "tensor")  # column-parallel
      assert blocks[attn][name]["bias"] == P(None, "tensor")
    assert blocks[attn]["norm_q"]["weight"] == P(None, "tensor")
    assert blocks[attn]["norm_k"]["weight"] == P(None, "tensor")
    assert blocks[attn]["to_out"]["kernel"] == P(None, "tensor", None)  # row-parallel
    assert blocks[attn]["to_out"]["bias"] == P()
  assert blocks["ffn"]["proj_in"]["kernel"] == P(None, None, "tensor")
  assert blocks["ffn"]["proj_in"]["bias"] == P(None, "tensor")
  assert blocks["ffn"]["proj_out"]["kernel"] == P(None, "tensor", None)
  assert blocks["ffn"]["proj_out"]["bias"] == P()
  assert blocks["scale_shift_table"] == P()
  rest = [s for k, s in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, P)) if "blocks" not in jax.tree_util.keystr(k)]
  assert rest and all(s == P() for s in rest)  # everything outside the blocks is replicated


def test_training_fsdp_rule():
  rules = sharding.RULES["training"]
  sizes = {"data": 1, "fsdp": 4, "context": 1}
  spec = lambda path, shape, s=sizes: sharding.param_spec(
      [jax.tree_util.DictKey(k) for k in path], shape, rules, s)
  assert spec(("proj_out", "kernel"), (64, 256)) == P(None, "fsdp")    # the largest axis
  assert spec(("proj_out", "kernel"), (256, 66)) == P("fsdp", None)    # the largest divisible
  assert spec(("proj_out", "bias"), (256,)) == P()                     # < MIN_SHARD_SIZE
  assert spec(("x",), (1023, 3)) == P()                                # nothing divisible
  # Never the stacked layer axis of blocks/..., even when it is the largest.
  assert spec(("blocks", "attn1", "to_q", "kernel"), (4096, 8, 8)) == P(None, "fsdp", None)
  assert spec(("lora", "blocks", "ffn", "lora_a"), (8, 512, 4)) == P(None, "fsdp", None)
  assert spec(("proj_out", "kernel"), (64, 256), {**sizes, "fsdp": 1}) == P()
  # The DiT's logical axes map to nothing in training: the FSDP rule alone decides.
  cfg, params = _dit_params()
  specs = sharding.param_specs(params, rules, sizes)
  assert specs["blocks"]["ffn"]["proj_in"]["kernel"] == P(None, None, "fsdp")
  assert all("tensor" not in s for s in jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, P)))
