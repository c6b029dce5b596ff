"""Multi-device inference on 4 forced host devices equals the single-device result."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    from helios_jax import parallel, sampling
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
      mesh = parallel.make_mesh(**sizes)
      sharded = init_transformer(cfg, jnp.float32, seed=0, kernels=KernelConfig("xla", "xla"))
      parallel.shard_transformer(sharded, mesh)
      with jax.set_mesh(mesh):
        out = sharded.forward(sharded.params, inputs)
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
    mesh = parallel.make_mesh(context=2, tensor=2)
    parallel.shard_transformer(model, mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = jax.device_put((text, state, noise, jnp.asarray(False)), rep)
    with jax.set_mesh(mesh):
      _, chunk, _ = pl.chunk_step(model.graphdef, sc, True, model.params, args[0], None,
                                  args[1], args[2], args[3])
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
    b = pl.Pipeline(multi, vae, sched, flags).shard(parallel.make_mesh(data=2, tensor=2))
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
  from helios_jax import parallel  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="only 1 available"):
    parallel.make_mesh(tensor=8)
  with pytest.raises(ValueError, match="tensor=3"):
    parallel.transformer_param_specs({}, heads=40, ffn_dim=13824, tensor_size=3)
