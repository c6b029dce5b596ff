"""helios-jax: a JAX/Flax NNX reimplementation of Helios, the real-time long-video DiT.

Top-level API (each loads a diffusers/transformers folder or our Orbax export):
  Pipeline.from_pretrained(path)  -> Pipeline            (text/image/video-to-video; also
                                                          callable as diffusers' pipelines)
  load_transformer(path, dtype)   -> HeliosTransformer   (the DiT denoiser)
  load_vae(path, dtype)           -> WanVAE              (Wan 2.1 causal video VAE)
  load_text_encoder(path, dtype)  -> TextEncoder         (umT5-XXL encoder)
  load_tokenizer(path), encode_prompt(prompts, tokenizer, text_encoder)
"""

from helios_jax.config import ConfigError
from helios_jax.config import HeliosTransformerConfig
from helios_jax.checkpoint import CheckpointError
from helios_jax.models.attention import KernelConfig
from helios_jax.models.text_encoder import load_text_encoder
from helios_jax.models.text_encoder import TextEncoder
from helios_jax.models.text_encoder import UMT5Config
from helios_jax.models.transformer import HeliosTransformer
from helios_jax.models.transformer import init_transformer
from helios_jax.models.transformer import load_transformer
from helios_jax.text import clean_prompt
from helios_jax.text import encode_prompt
from helios_jax.text import load_tokenizer
from helios_jax.models.vae import init_vae
from helios_jax.models.vae import load_vae
from helios_jax.models.vae import WanVAE
from helios_jax.models.vae import WanVAEConfig
from helios_jax import schedulers
from helios_jax import flops

# Imported on first use (`helios_jax.Pipeline`), so `import helios_jax` stays as cheap as before.
_LAZY = {"Pipeline": ("helios_jax.pipeline", "Pipeline"),
         "PipelineOutput": ("helios_jax.pipeline", "PipelineOutput"),
         "NOISE_KEYS": ("helios_jax.pipeline", "NOISE_KEYS")}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'helios_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
