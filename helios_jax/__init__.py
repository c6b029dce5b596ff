"""helios-jax: a JAX/Flax NNX reimplementation of Helios, the real-time long-video DiT."""
