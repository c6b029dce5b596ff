"""Embedded tiny pipelines: random-weight Helios pipelines small enough for a CPU.

`write_tiny_pipeline(dst, model="distilled")` writes a complete pipeline folder in our export
layout (the same one `python -m helios_jax.convert` produces for the released checkpoints):

  dst/model_index.json                     the variant's pipeline class and flags (variants.py)
  dst/scheduler/scheduler_config.json      the variant's scheduler config
  dst/transformer/{config.json, params/}   tiny DiT (every structural flag of the 14B model)
  dst/vae/{config.json, params/}           tiny Wan VAE (z_dim 16, 8x spatial, 4x temporal)
  dst/text_encoder/{config.json, params/}  tiny umT5
  dst/tokenizer/                           a unigram tokenizer trained on a built-in corpus

The three models are the "tiny" presets (`variants.SIZES["tiny"]`), so
`Pipeline.from_pretrained(dst)` exercises exactly the loading path of a real checkpoint.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from helios_jax import checkpoint
from helios_jax import variants

TOKENIZER_CORPUS = (
    "A cat walks on the grass in the morning sun.",
    "A drone shot over a snowy mountain range at dusk, cinematic lighting.",
    "Close-up of a chef chopping vegetables in a small kitchen.",
    "Waves crash against dark rocks; slow motion, golden hour.",
    "A train window time-lapse of fields, towns and rivers passing by.",
    "Bright tones, overexposed, static, blurred details, subtitles, worst quality.",
)


def tiny_tokenizer():
  """A ~96-piece unigram tokenizer (pad id 0, eos id 1 appended) as a transformers tokenizer."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.Unigram())
  tok.normalizer = tokenizers.normalizers.NFKC()
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tok.decoder = tokenizers.decoders.Metaspace()
  trainer = tokenizers.trainers.UnigramTrainer(
      vocab_size=96, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
      show_progress=False)
  tok.train_from_iterator(list(TOKENIZER_CORPUS) * 3, trainer)
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_configs():
  """(transformer, vae, text encoder) configs of the tiny pipeline: the "tiny" presets."""
  return variants.get_size("tiny").configs()


def write_tiny_pipeline(dst: str | os.PathLike, model: str = variants.DEFAULT_VARIANT,
                        seed: int = 0, *, overwrite: bool = False) -> str:
  """Writes a random tiny Helios pipeline folder of variant `model` (see module docstring).

  Args:
    dst: the folder to create.
    model: "base" | "mid" | "distilled" (`variants.VARIANTS`).
    seed: parameter init seed.
    overwrite: replace an existing `dst`.

  Returns:
    The folder's path.
  """
  from helios_jax.models.text_encoder import TEXT_ENCODER_SPEC  # pylint: disable=g-import-not-at-top
  from helios_jax.models.transformer import TRANSFORMER_SPEC  # pylint: disable=g-import-not-at-top
  from helios_jax.models.vae import VAE_SPEC  # pylint: disable=g-import-not-at-top
  variant = variants.get_variant(model)
  dst = os.fspath(dst)
  dit_cfg, vae_cfg, text_cfg = tiny_configs()
  with checkpoint.atomic_directory(dst, overwrite=overwrite) as tmp:
    for name, spec, cfg, extra in (
        ("transformer", TRANSFORMER_SPEC, dit_cfg, {"_class_name": "HeliosTransformer3DModel"}),
        ("vae", VAE_SPEC, vae_cfg, {"_class_name": "AutoencoderKLWan"}),
        ("text_encoder", TEXT_ENCODER_SPEC, text_cfg,
         {"architectures": ["UMT5EncoderModel"], "model_type": "umt5"})):
      module = spec.init(cfg, jnp.float32, seed)
      checkpoint.save_model(spec, cfg, module, os.path.join(tmp, name), **extra)
    tiny_tokenizer().save_pretrained(os.path.join(tmp, "tokenizer"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(dict(variant.scheduler), f, indent=2)
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
      json.dump(variant.model_index(), f, indent=2)
  return dst


def tiny_pipeline_dir(model: str = "distilled") -> str:
  """The embedded tiny pipeline of a variant, written once into the helios-jax cache (the CLIs'
  model when no --model_dir is given)."""
  from helios_jax import runtime  # pylint: disable=g-import-not-at-top
  variants.get_variant(model)
  path = os.path.join(runtime.cache_dir("presets"), f"tiny-{model}-v1")
  if not os.path.isdir(path):
    print(f"building the embedded tiny '{model}' pipeline in {path} (once)")
    write_tiny_pipeline(path, model, seed=0)
  return path
