"""The released Helios variants and model sizes: every per-variant fact, defined once.

A variant (Base / Mid / Distilled, spec sampling.md §1, §4, §7) is what a checkpoint folder
says about sampling: its pipeline class and `model_index.json` flags, its
`scheduler/scheduler_config.json`, and the published defaults (steps, guidance scale, DMD
first-chunk amplification). All three share the 14B transformer; a size names the component
presets of one set of shapes ("helios-14b", and the CPU-sized "tiny" set that
`presets.write_tiny_pipeline` writes).

  from helios_jax import variants
  v = variants.get_variant("mid")
  v.default_steps, v.default_guidance_scale          # (20, 20, 20), 5.0
  v.flags, v.scheduler_config                        # parsed PipelineFlags / SchedulerConfig
  variants.checkpoint_defaults(flags, scheduler)     # defaults of any loaded checkpoint
  dit, vae, text = variants.get_size("tiny").configs()

Readers: `Pipeline` (its defaults come from `checkpoint_defaults`), `flops.model_sampler_config`,
`presets.write_tiny_pipeline`, the CLIs' model choices and benchmarks/e2e.py.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from helios_jax.config import ConfigError, HeliosTransformerConfig
from helios_jax.models.text_encoder import UMT5Config
from helios_jax.models.vae import WanVAEConfig
from helios_jax.schedulers.config import PipelineFlags, SchedulerConfig

SINGLE_PIPELINE = "HeliosPipeline"          # diffusers' single-resolution pipeline (Base)
PYRAMID_PIPELINE = "HeliosPyramidPipeline"  # the pyramid pipeline (Mid, Distilled)

# `model_index.json` entries of every Helios pipeline folder besides the scheduler.
_COMPONENTS = (("transformer", "diffusers", "HeliosTransformer3DModel"),
               ("vae", "diffusers", "AutoencoderKLWan"),
               ("text_encoder", "transformers", "UMT5EncoderModel"),
               ("tokenizer", "transformers", "PreTrainedTokenizerFast"))


def is_pyramid(flags: PipelineFlags, scheduler: SchedulerConfig) -> bool:
  """Whether a checkpoint samples with the pyramid (multi-stage) pipeline."""
  return flags.pipeline_class != SINGLE_PIPELINE and int(scheduler.stages) > 1


@dataclasses.dataclass(frozen=True)
class ModelVariant:
  """One released Helios variant: checkpoint flags, scheduler config and sampling defaults.

  Attributes:
    name: "base" | "mid" | "distilled".
    pipeline_class: `model_index.json` `_class_name` (`SINGLE_PIPELINE` or `PYRAMID_PIPELINE`).
    scheduler: the `scheduler_config.json` object as the released checkpoint is understood
      (sampling.md §4, §12; read-only).
    is_distilled, is_cfg_zero_star: the pyramid pipeline's `model_index.json` flags (the
      single-resolution pipeline has neither: both False).
    steps_per_stage: default transformer steps of every stage (Base: of its single stage).
    default_guidance_scale: default CFG scale w (CFG is on when w > 1).
    amplify_first_chunk: DMD doubles chunk 0's steps by default.
  """

  name: str
  pipeline_class: str
  scheduler: Mapping[str, Any]
  is_distilled: bool
  is_cfg_zero_star: bool
  steps_per_stage: int
  default_guidance_scale: float
  amplify_first_chunk: bool

  def __post_init__(self):
    object.__setattr__(self, "scheduler", types.MappingProxyType(dict(self.scheduler)))
    if self.pipeline_class not in (SINGLE_PIPELINE, PYRAMID_PIPELINE):
      raise ConfigError(f"{self.name}: pipeline_class={self.pipeline_class!r} must be "
                        f"{SINGLE_PIPELINE!r} or {PYRAMID_PIPELINE!r}")
    if self.pipeline_class == SINGLE_PIPELINE and (self.is_distilled or self.is_cfg_zero_star):
      raise ConfigError(f"{self.name}: {SINGLE_PIPELINE} has no is_distilled / "
                        "is_cfg_zero_star flags; they must be False")

  @property
  def scheduler_config(self) -> SchedulerConfig:
    """The parsed scheduler config (`HeliosSchedulerConfig` or `HeliosDMDSchedulerConfig`)."""
    return SchedulerConfig.from_dict(self.scheduler, source=f"<{self.name} scheduler>")

  def model_index(self) -> dict[str, Any]:
    """The variant's `model_index.json` object (flags only on the pyramid pipeline)."""
    d: dict[str, Any] = {"_class_name": self.pipeline_class}
    d.update({name: [lib, klass] for name, lib, klass in _COMPONENTS})
    d["scheduler"] = ["diffusers", self.scheduler["_class_name"]]
    if self.pipeline_class == PYRAMID_PIPELINE:
      d.update(is_distilled=self.is_distilled, is_cfg_zero_star=self.is_cfg_zero_star)
    return d

  @property
  def flags(self) -> PipelineFlags:
    """`model_index()` parsed, as `Pipeline.from_pretrained` reads it from the folder."""
    return PipelineFlags.from_dict(self.model_index(), source=f"<{self.name} model_index>")

  @property
  def pyramid(self) -> bool:
    return is_pyramid(self.flags, self.scheduler_config)

  @property
  def default_steps(self) -> tuple[int, ...]:
    """Default steps: one entry (Base) or one per pyramid stage."""
    stages = int(self.scheduler_config.stages) if self.pyramid else 1
    return (int(self.steps_per_stage),) * stages


VARIANTS: dict[str, ModelVariant] = {
    # Helios-Base: single-resolution UniPC, 50 steps, CFG 5 (sampling.md §4.2, §7).
    "base": ModelVariant(
        name="base", pipeline_class=SINGLE_PIPELINE,
        scheduler={"_class_name": "HeliosScheduler", "stages": 1, "scheduler_type": "unipc",
                   "use_dynamic_shifting": True, "time_shift_type": "exponential"},
        is_distilled=False, is_cfg_zero_star=False, steps_per_stage=50,
        default_guidance_scale=5.0, amplify_first_chunk=False),
    # Helios-Mid: 3-stage pyramid UniPC, 3 x 20 steps, CFG-Zero* 5 (sampling.md §4.5, §7).
    "mid": ModelVariant(
        name="mid", pipeline_class=PYRAMID_PIPELINE,
        scheduler={"_class_name": "HeliosScheduler", "stages": 3, "scheduler_type": "unipc",
                   "use_dynamic_shifting": True, "time_shift_type": "linear"},
        is_distilled=False, is_cfg_zero_star=True, steps_per_stage=20,
        default_guidance_scale=5.0, amplify_first_chunk=False),
    # Helios-Distilled: 3-stage pyramid DMD, 3 x 2 steps, no CFG, amplified first chunk
    # (sampling.md §4.6, §7).
    "distilled": ModelVariant(
        name="distilled", pipeline_class=PYRAMID_PIPELINE,
        scheduler={"_class_name": "HeliosDMDScheduler", "stages": 3,
                   "use_dynamic_shifting": True, "time_shift_type": "linear"},
        is_distilled=True, is_cfg_zero_star=False, steps_per_stage=2,
        default_guidance_scale=1.0, amplify_first_chunk=True),
}
# The variant that CLIs and the embedded tiny pipeline use when none is named.
DEFAULT_VARIANT = "distilled"


def get_variant(name: str) -> ModelVariant:
  """The released variant `name` ("base" | "mid" | "distilled"); ValueError names the known ones."""
  if name not in VARIANTS:
    raise ValueError(f"model={name!r} is not a released Helios variant; known: "
                     f"{list(VARIANTS)}")
  return VARIANTS[name]


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
  """What a checkpoint samples with when the caller leaves a knob unset.

  Attributes:
    pyramid: multi-stage pyramid sampling (else single resolution).
    steps: default steps, one per stage.
    guidance_scale: default CFG scale.
    amplify_first_chunk: DMD first-chunk step doubling on by default.
    distilled: a distilled checkpoint (is_distilled flag or DMD solver): CFG (w > 1) doubles
      its cost for no published benefit.
  """

  pyramid: bool
  steps: tuple[int, ...]
  guidance_scale: float
  amplify_first_chunk: bool
  distilled: bool


def checkpoint_defaults(flags: PipelineFlags, scheduler: SchedulerConfig) -> SamplingDefaults:
  """The defaults of a loaded checkpoint, from its `model_index.json` flags and scheduler.

  A released variant's folder gets that variant's defaults. Any other combination takes each
  default from the released variant that shares the deciding fact: the steps per stage from
  the variant with the same sampler (single resolution: Base; pyramid: Distilled for a DMD
  solver, else Mid) over the checkpoint's own stages; guidance 1.0 (Distilled's) whenever the
  checkpoint is distilled by flag or by solver, else the sampler's variant's; amplification
  on for a DMD solver (Distilled's), else the sampler's variant's.

  Args:
    flags: the checkpoint's `model_index.json` flags.
    scheduler: its scheduler config.

  Returns:
    The `SamplingDefaults`.
  """
  dmd = VARIANTS["distilled"]
  pyramid = is_pyramid(flags, scheduler)
  sampler = (dmd if scheduler.is_dmd else VARIANTS["mid"]) if pyramid else VARIANTS["base"]
  distilled = bool(flags.is_distilled or scheduler.is_dmd)
  return SamplingDefaults(
      pyramid=pyramid,
      steps=(int(sampler.steps_per_stage),) * (int(scheduler.stages) if pyramid else 1),
      guidance_scale=float((dmd if distilled else sampler).default_guidance_scale),
      amplify_first_chunk=bool((dmd if scheduler.is_dmd else sampler).amplify_first_chunk),
      distilled=distilled)


# ------------------------------------------------------------------------------------------
# Sizes.


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """The component presets of one set of model shapes.

  Attributes:
    name: "helios-14b" | "tiny".
    transformer: `config.TRANSFORMER_PRESETS` key.
    vae: `models.vae.VAE_PRESETS` key.
    text_encoder: `models.text_encoder.UMT5_PRESETS` key.
    resolution: default (height, width) in pixels.
  """

  name: str
  transformer: str
  vae: str
  text_encoder: str
  resolution: tuple[int, int]

  def configs(self) -> tuple[HeliosTransformerConfig, WanVAEConfig, UMT5Config]:
    """(DiT, VAE, umT5) configs; ConfigError if they do not fit together."""
    dit = HeliosTransformerConfig.from_preset(self.transformer)
    vae = WanVAEConfig.from_preset(self.vae)
    text = UMT5Config.from_preset(self.text_encoder)
    if vae.z_dim != dit.in_channels or text.d_model != dit.text_dim:
      raise ConfigError(f"size {self.name!r}: VAE z_dim={vae.z_dim} / umT5 d_model="
                        f"{text.d_model} must equal the DiT's in_channels={dit.in_channels} / "
                        f"text_dim={dit.text_dim}")
    return dit, vae, text


SIZES: dict[str, ModelSize] = {
    # The released checkpoints (every variant): 14B DiT, Wan 2.1 VAE, umT5-XXL, 384x640.
    "helios-14b": ModelSize("helios-14b", transformer="helios-14b", vae="wan2.1",
                            text_encoder="umt5-xxl", resolution=(384, 640)),
    # The CPU-sized set of the embedded tiny pipelines (`presets.write_tiny_pipeline`).
    "tiny": ModelSize("tiny", transformer="tiny", vae="tiny", text_encoder="tiny",
                      resolution=(128, 128)),
}


def get_size(name: str) -> ModelSize:
  """The model size `name` ("helios-14b" | "tiny"); ValueError names the known ones."""
  if name not in SIZES:
    raise ValueError(f"size={name!r} is not a Helios model size; known: {list(SIZES)}")
  return SIZES[name]
