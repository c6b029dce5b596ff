"""Layout constants of Helios' chunked generation, defined once (no dependencies).

One chunk (a training "section") is `CHUNK_LATENT_FRAMES` latent frames, decoded by the
Wan VAE (4x temporal compression, causal first frame) to `CHUNK_FRAMES` pixel frames. Every
chunk reads a fixed history of `NUM_HISTORY_FRAMES` latent frames split long / mid / newest by
`HISTORY_SIZES` (spec architecture.md §3, sampling.md §2).
"""

CHUNK_LATENT_FRAMES = 9                                  # latent frames per chunk / section
VAE_TEMPORAL_SCALE = 4                                   # pixel frames per latent frame
CHUNK_FRAMES = (CHUNK_LATENT_FRAMES - 1) * VAE_TEMPORAL_SCALE + 1   # 33 pixel frames
HISTORY_SIZES = (16, 2, 1)      # long, mid, newest ("1x"); sorted descending as the reference
NUM_HISTORY_FRAMES = sum(HISTORY_SIZES)                  # 19
