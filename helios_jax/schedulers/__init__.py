"""Helios samplers' schedules and steps: host-side tables + jittable Euler / UniPC / DMD steps.

Layout: latents are channels-last `[B, T, H, W, C]`. Host-side code (`tables.py`,
`pyramid.py` constants) runs in numpy float64 once per shape and returns static per-step
arrays; the step functions (`steps.py`, `guidance.py`, `pyramid.py` transforms) are pure
`jax.numpy` and run inside the jitted sampler. Every random draw is an argument: the chunk
noise `eps` and each transition's block-noise draw `z`. Reference RNG order (diffusers 0.42.1,
spec sampling.md §9): per chunk `randn(B, 16, 9, h, w)` (torch layout, at full resolution),
then for a pyramid model `randn(B*16*9*(h/4)*(w/4), 4)` for the stage-1 block noise and
`randn(B*16*9*(h/2)*(w/2), 4)` for stage 2 (convert with `block_noise_z_from_reference`);
the official `infer_helios.py` draws block noise from a fresh default-seeded generator instead.

Usage (one chunk of Helios-Mid: pyramid + UniPC + CFG-Zero*; `model(x, t, text)` -> v):

  import jax, jax.numpy as jnp
  from helios_jax import schedulers as hs

  cfg = hs.load_scheduler_config(ckpt)           # <ckpt>/scheduler/scheduler_config.json
  flags = hs.load_pipeline_flags(ckpt)           # <ckpt>/model_index.json
  stages = hs.pyramid_schedules(cfg, (20, 20, 20), num_frames=9, height=48, width=80)
  tables = [hs.unipc_table(cfg, s) for s in stages]          # numpy, static per step
  zero = [hs.zero_init_mask(s.num_steps, s.stage_index, zero_steps=1) for s in stages]

  @jax.jit
  def chunk(eps, z1, z2, text, neg):             # eps [B, 9, 48, 80, 16] fp32
    x = hs.noise_pyramid_start(eps, 3)           # [B, 9, 12, 20, 16]
    for k, (table, zmask) in enumerate(zip(tables, zero)):
      if k:
        x = hs.stage_transition(x, (z1, z2)[k - 1], k)   # fp32 stage start (bf16 noise)
      def denoise(x, step, zmask=jnp.asarray(zmask)):
        xb = x.astype(jnp.bfloat16)
        vc, vu = model(xb, step.model_timestep, text), model(xb, step.model_timestep, neg)
        return hs.cfg_zero_star(vc, vu, 5.0, zmask[step.index])
      x = hs.run_unipc(x, table, denoise)        # one jax.lax.scan over the stage's steps
    return x                                     # [B, 9, 48, 80, 16] chunk latents

`run_unipc` is this scan (state = fixed-shape `UniPCState` history):

  def body(carry, step):
    x, state = carry
    state, x = hs.unipc_step(state, x, denoise(x, step), step)
    return (x, state), None
  x = jax.lax.scan(body, (x, hs.unipc_init(x, cfg.solver_order)), table)[0][0]

Distilled: `hs.dmd_table(s)` per stage (`amplify=True` in `pyramid_schedules` for chunk 0)
and `hs.run_dmd(start, table, denoise)`; the stage output (bf16) feeds `stage_transition` with
`noise_dtype=jnp.bfloat16`. Base: `hs.base_schedule(cfg, 50, 9, 48, 80)`, `hs.unipc_table`,
plain `hs.cfg` and `step.timestep` (float) as the model timestep instead of the truncated
`step.model_timestep` that the pyramid pipelines use.
"""

from helios_jax.schedulers.config import HeliosDMDSchedulerConfig
from helios_jax.schedulers.config import HeliosSchedulerConfig
from helios_jax.schedulers.config import load_pipeline_flags
from helios_jax.schedulers.config import load_scheduler_config
from helios_jax.schedulers.config import PipelineFlags
from helios_jax.schedulers.config import SchedulerConfig
from helios_jax.schedulers.guidance import cfg
from helios_jax.schedulers.guidance import cfg_zero_star
from helios_jax.schedulers.guidance import guidance_mode
from helios_jax.schedulers.guidance import optimized_scale
from helios_jax.schedulers.guidance import zero_init_mask
from helios_jax.schedulers.pyramid import BLOCK_NOISE_L
from helios_jax.schedulers.pyramid import block_noise
from helios_jax.schedulers.pyramid import block_noise_cholesky
from helios_jax.schedulers.pyramid import block_noise_z_from_reference
from helios_jax.schedulers.pyramid import downsample_2x
from helios_jax.schedulers.pyramid import HELIOS_PYRAMID
from helios_jax.schedulers.pyramid import noise_pyramid_start
from helios_jax.schedulers.pyramid import pyramid_constants
from helios_jax.schedulers.pyramid import PyramidConstants
from helios_jax.schedulers.pyramid import renoise
from helios_jax.schedulers.pyramid import stage_latent_sizes
from helios_jax.schedulers.pyramid import stage_shift_seq_lens
from helios_jax.schedulers.pyramid import stage_transition
from helios_jax.schedulers.pyramid import upsample_nearest_2x
from helios_jax.schedulers.steps import dmd_step
from helios_jax.schedulers.steps import euler_step
from helios_jax.schedulers.steps import run_dmd
from helios_jax.schedulers.steps import run_euler
from helios_jax.schedulers.steps import run_unipc
from helios_jax.schedulers.steps import unipc_init
from helios_jax.schedulers.steps import unipc_step
from helios_jax.schedulers.steps import UniPCState
from helios_jax.schedulers.tables import base_schedule
from helios_jax.schedulers.tables import calculate_shift
from helios_jax.schedulers.tables import dmd_table
from helios_jax.schedulers.tables import DMDTable
from helios_jax.schedulers.tables import euler_table
from helios_jax.schedulers.tables import EulerTable
from helios_jax.schedulers.tables import pyramid_schedules
from helios_jax.schedulers.tables import Schedule
from helios_jax.schedulers.tables import set_timesteps
from helios_jax.schedulers.tables import time_shift
from helios_jax.schedulers.tables import unipc_table
from helios_jax.schedulers.tables import UniPCTable
