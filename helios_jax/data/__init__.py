"""Training data: upstream clip metadata, TFDS latent precompute, synthetic latents, grain pipeline."""
