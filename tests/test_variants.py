"""The variant registry (helios_jax/variants.py): published defaults, its readers agree, one tiny set."""

from __future__ import annotations

import inspect
import json
import os

import jax.numpy as jnp
import pytest

from helios_jax import flops
from helios_jax import presets
from helios_jax import schedulers as hs
from helios_jax import variants
from helios_jax.config import TRANSFORMER_PRESETS, ConfigError, HeliosTransformerConfig
from helios_jax.models.text_encoder import UMT5_PRESETS, UMT5Config
from helios_jax.models.vae import VAE_PRESETS, WanVAEConfig
from helios_jax.pipeline import Pipeline

MODELS = ("base", "mid", "distilled")


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  return {m: presets.write_tiny_pipeline(root / m, model=m) for m in MODELS}


def test_registry_holds_the_published_defaults():
  """sampling.md §7: Base 50 UniPC steps CFG 5; Mid 3x20 CFG-Zero* 5; Distilled 3x2 DMD."""
  assert tuple(variants.VARIANTS) == MODELS
  got = {m: (v.pipeline_class, v.pyramid, v.scheduler_config.solver, v.default_steps,
             v.default_guidance_scale, v.amplify_first_chunk, v.is_cfg_zero_star,
             v.is_distilled)
         for m, v in variants.VARIANTS.items()}
  assert got == {
      "base": ("HeliosPipeline", False, "unipc", (50,), 5.0, False, False, False),
      "mid": ("HeliosPyramidPipeline", True, "unipc", (20, 20, 20), 5.0, False, True, False),
      "distilled": ("HeliosPyramidPipeline", True, "dmd", (2, 2, 2), 1.0, True, False, True),
  }
  modes = {m: hs.guidance_mode(v.flags, v.default_guidance_scale, v.pyramid)
           for m, v in variants.VARIANTS.items()}
  assert modes == {"base": "cfg", "mid": "cfg_zero_star", "distilled": "none"}
  assert variants.get_variant(variants.DEFAULT_VARIANT) is variants.VARIANTS["distilled"]


@pytest.mark.parametrize("model", MODELS)
def test_files_match_the_diffusers_classes(model):
  """model_index flags and scheduler keys are arguments of the diffusers 0.42.1 classes."""
  diffusers = pytest.importorskip("diffusers")
  v = variants.get_variant(model)
  pipe_args = inspect.signature(getattr(diffusers, v.pipeline_class).__init__).parameters
  index = v.model_index()
  flags = {k for k, e in index.items() if not k.startswith("_") and not isinstance(e, list)}
  components = {k for k, e in index.items() if isinstance(e, list)}
  assert flags <= set(pipe_args) and components <= set(pipe_args)
  assert flags == (set() if model == "base" else {"is_distilled", "is_cfg_zero_star"})
  sched_kw = dict(v.scheduler)
  cls = getattr(diffusers, sched_kw.pop("_class_name"))
  assert set(sched_kw) <= set(inspect.signature(cls.__init__).parameters)
  assert index["scheduler"] == ["diffusers", cls.__name__]


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_defaults_of_each_variant_are_its_own(model):
  v = variants.get_variant(model)
  assert variants.checkpoint_defaults(v.flags, v.scheduler_config) == variants.SamplingDefaults(
      pyramid=v.pyramid, steps=v.default_steps, guidance_scale=v.default_guidance_scale,
      amplify_first_chunk=v.amplify_first_chunk, distilled=model == "distilled")


def _flags(pipeline_class="HeliosPyramidPipeline", **kw):
  return hs.PipelineFlags(pipeline_class=pipeline_class, **kw)


def _sched(cls="HeliosScheduler", **kw):
  return hs.SchedulerConfig.from_dict({"_class_name": cls, **kw})


@pytest.mark.parametrize("flags,scheduler,want", [
    # DMD scheduler without the is_distilled flag: Distilled's sampling defaults.
    (_flags(), _sched("HeliosDMDScheduler", stages=3), (True, (2, 2, 2), 1.0, True, True)),
    # is_distilled on a UniPC pyramid: Mid's steps, Distilled's guidance, no amplification.
    (_flags(is_distilled=True), _sched(stages=3), (True, (20, 20, 20), 1.0, False, True)),
    # Stage counts other than 3 repeat the per-stage default.
    (_flags(), _sched(stages=2), (True, (20, 20), 5.0, False, False)),
    (_flags(), _sched("HeliosDMDScheduler", stages=2, stage_range=[0, 0.5, 1]),
     (True, (2, 2), 1.0, True, True)),
    # The single-resolution pipeline (or one stage) samples as Base whatever the scheduler.
    (_flags("HeliosPipeline"), _sched(stages=3), (False, (50,), 5.0, False, False)),
    (_flags(), _sched(stages=1), (False, (50,), 5.0, False, False)),
    (_flags("HeliosPipeline"), _sched("HeliosDMDScheduler", stages=3),
     (False, (50,), 1.0, True, True)),
])
def test_checkpoint_defaults_off_the_registry(flags, scheduler, want):
  """Checkpoints that match no variant keep the pipeline's historical rules."""
  d = variants.checkpoint_defaults(flags, scheduler)
  assert (d.pyramid, d.steps, d.guidance_scale, d.amplify_first_chunk, d.distilled) == want


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_pipeline_flops_and_presets_agree(tiny_pipelines, model):
  """The written tiny folder loads as the variant, and Pipeline == flops' sampler config."""
  v = variants.get_variant(model)
  path = tiny_pipelines[model]
  with open(os.path.join(path, "model_index.json")) as f:
    assert json.load(f) == v.model_index()
  with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
    assert json.load(f) == dict(v.scheduler)
  pipe = Pipeline.from_pretrained(path, jnp.float32, load_text_encoder=False)
  assert pipe.flags == v.flags and pipe.scheduler == v.scheduler_config
  assert (pipe.is_pyramid, pipe.default_steps, pipe.default_guidance_scale) == (
      v.pyramid, v.default_steps, v.default_guidance_scale)
  patch = pipe.transformer.config.patch_size
  h, w = variants.get_size("tiny").resolution
  assert pipe.sampler_config(h, w) == flops.model_sampler_config(model, h, w, patch_size=patch)
  assert pipe.sampler_config(h, w).amplify_first_chunk == v.amplify_first_chunk
  kw = dict(steps=(3,) * len(v.default_steps), guidance_scale=1.0, amplify_first_chunk=False)
  assert pipe.sampler_config(h, w, **kw) == flops.model_sampler_config(
      model, h, w, patch_size=patch, **kw)
  assert (pipe.transformer.config, pipe.vae.config) == presets.tiny_configs()[:2]


def test_tiny_presets_are_one_set():
  dit, vae, text = presets.tiny_configs()
  assert dit == TRANSFORMER_PRESETS["tiny"] == HeliosTransformerConfig.from_preset("tiny")
  assert vae == VAE_PRESETS["tiny"] == WanVAEConfig.from_preset("tiny")
  assert text == UMT5_PRESETS["tiny"] == UMT5Config.from_preset("tiny")
  assert vae.z_dim == dit.in_channels and text.d_model == dit.text_dim
  assert len(presets.tiny_tokenizer()) <= text.vocab_size
  dit14, vae14, text14 = variants.get_size("helios-14b").configs()
  assert (dit14, vae14, text14) == (TRANSFORMER_PRESETS["helios-14b"], VAE_PRESETS["wan2.1"],
                                    UMT5_PRESETS["umt5-xxl"])
  assert vae14.z_dim == dit14.in_channels and text14.d_model == dit14.text_dim


def test_bad_names_are_rejected(tmp_path):
  for call in (lambda: variants.get_variant("turbo"),
               lambda: flops.model_sampler_config("turbo")):
    with pytest.raises(ValueError, match=r"model='turbo'.*'base', 'mid', 'distilled'"):
      call()
  with pytest.raises(ValueError, match=r"size='huge'.*'helios-14b', 'tiny'"):
    variants.get_size("huge")
  with pytest.raises(ValueError, match="model='turbo'"):
    presets.write_tiny_pipeline(tmp_path / "p", model="turbo")
  assert not (tmp_path / "p").exists()
  with pytest.raises(ConfigError, match="HeliosPipeline has no is_distilled"):
    variants.ModelVariant(name="x", pipeline_class="HeliosPipeline",
                          scheduler=variants.VARIANTS["base"].scheduler, is_distilled=True,
                          is_cfg_zero_star=False, steps_per_stage=1,
                          default_guidance_scale=1.0, amplify_first_chunk=False)
  with pytest.raises(ConfigError, match="pipeline_class='WanPipeline'"):
    variants.ModelVariant(name="x", pipeline_class="WanPipeline",
                          scheduler=variants.VARIANTS["base"].scheduler, is_distilled=False,
                          is_cfg_zero_star=False, steps_per_stage=1,
                          default_guidance_scale=1.0, amplify_first_chunk=False)
