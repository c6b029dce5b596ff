"""Whole-pipeline parity with diffusers' HeliosPipeline / HeliosPyramidPipeline (CPU, fp32).

Tiny random diffusers pipelines are saved in the released layout and loaded by
`Pipeline.from_pretrained`. The reference's random draws (per-chunk noise, block noise, VAE
posterior samples, conditioning sigmas/noise) are recorded and injected into ours in the
reference's order (spec sampling.md §9); the latents of >= 3 chunks must agree to 1e-4.
"""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import rel_err
from helios_jax import pipeline as pl
from helios_jax import sampling
from helios_jax import schedulers as hs

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders import vae as dvae  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusers.pipelines.helios import pipeline_helios as pbase  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusers.pipelines.helios import pipeline_helios_pyramid as ppyr  # pylint: disable=g-import-not-at-top,wrong-import-position

H = W = 64             # pixels -> 8x8 latents, pyramid 2x2 / 4x4 / 8x8
# diffusers' CFG-Zero* path `.view`s the velocity, which fails when a stage-0 token grid has a
# size-1 axis (2x2 latents); the Mid cases therefore run at 128x128.
SIZE = {"base": 64, "mid": 128, "distilled": 64}
NUM_FRAMES = 99        # 3 chunks
TEXT_DIM = 16
L_TEXT = 12
TOL = 1e-4

TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=32,
                   text_dim=TEXT_DIM, freq_dim=16, rope_dim=(6, 6, 4))
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
           temperal_downsample=[False, True, True])
SCHEDULERS = {
    "base": ("HeliosScheduler", dict(stages=1, use_dynamic_shifting=True,
                                     time_shift_type="exponential")),
    "mid": ("HeliosScheduler", dict(stages=3, use_dynamic_shifting=True,
                                    time_shift_type="linear")),
    "distilled": ("HeliosDMDScheduler", dict(stages=3, use_dynamic_shifting=True,
                                             time_shift_type="linear")),
}


def _components(seed=0):
  torch.manual_seed(seed)
  tr = diffusers.HeliosTransformer3DModel(**TRANSFORMER).eval()
  vae = diffusers.AutoencoderKLWan(**VAE).eval()
  return tr, vae


@pytest.fixture(scope="module")
def reference_pipelines(tmp_path_factory):
  """model kind -> (diffusers pipeline, saved folder)."""
  tr, vae = _components()
  out = {}
  for kind, (cls_name, kw) in SCHEDULERS.items():
    sched = getattr(diffusers, cls_name)(**kw)
    if kind == "base":
      pipe = diffusers.HeliosPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                      scheduler=sched, transformer=tr)
    else:
      pipe = diffusers.HeliosPyramidPipeline(
          tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=tr,
          is_cfg_zero_star=kind == "mid", is_distilled=kind == "distilled")
    pipe.set_progress_bar_config(disable=True)
    folder = str(tmp_path_factory.mktemp(f"helios_{kind}"))
    pipe.save_pretrained(folder)
    out[kind] = (pipe, folder)
  return out


@pytest.fixture(scope="module")
def ours(reference_pipelines):
  return {kind: pl.Pipeline.from_pretrained(folder, dtype=jnp.float32, load_text_encoder=False)
          for kind, (_, folder) in reference_pipelines.items()}


def _embeds(seed, batch=1):
  g = torch.Generator().manual_seed(seed)
  e = torch.randn(batch, L_TEXT, TEXT_DIM, generator=g)
  e[:, 7:] = 0  # zero-filled rows past the prompt, as encode_prompt produces
  return e


@contextlib.contextmanager
def record_draws(monkeypatch, pipe):
  """Records every random draw of a reference run, tagged, in order."""
  log = []
  in_prepare = [False]
  orig_randn = ppyr.randn_tensor

  def pipe_randn(*a, **k):
    x = orig_randn(*a, **k)
    log.append(("chunk_eps" if in_prepare[0] else "cond_eps", x.clone()))
    return x

  def vae_randn(*a, **k):
    x = orig_randn(*a, **k)
    log.append(("posterior", x.clone()))
    return x

  orig_rand = torch.rand

  def rand(*a, **k):
    x = orig_rand(*a, **k)
    log.append(("sigma", x.clone()))
    return x

  orig_prepare = type(pipe).prepare_latents

  def prepare(self, *a, **k):
    in_prepare[0] = True
    try:
      return orig_prepare(self, *a, **k)
    finally:
      in_prepare[0] = False

  chol = torch.tensor(np.asarray(hs.BLOCK_NOISE_L), dtype=torch.float32)

  def block_noise(self, batch_size, channel, num_frames, height, width, patch_size=(1, 2, 2),
                  device=None, generator=None):
    del device
    _, ph, pw = patch_size
    n = batch_size * channel * num_frames * (height // ph) * (width // pw)
    z = torch.randn(n, ph * pw, generator=generator)
    log.append(("block", z.clone()))
    noise = (z @ chol.T).view(batch_size, channel, num_frames, height // ph, width // pw, ph, pw)
    return noise.permute(0, 1, 2, 3, 5, 4, 6).reshape(batch_size, channel, num_frames, height,
                                                       width)

  for mod in (ppyr, pbase):
    monkeypatch.setattr(mod, "randn_tensor", pipe_randn)
  monkeypatch.setattr(dvae, "randn_tensor", vae_randn)
  monkeypatch.setattr(torch, "rand", rand)
  monkeypatch.setattr(type(pipe), "prepare_latents", prepare)
  if hasattr(type(pipe), "sample_block_noise"):
    monkeypatch.setattr(type(pipe), "sample_block_noise", block_noise)
  yield log
  monkeypatch.undo()


def _chunk_noise(log, stages):
  chunks, cur = [], None
  for tag, x in log:
    if tag == "chunk_eps":
      cur = {"eps": x.numpy(), "block": []}
      chunks.append(cur)
    elif tag == "block":
      cur["block"].append(x.numpy())
  assert all(len(c["block"]) == stages - 1 for c in chunks)
  return chunks


def _cond_noise(log, task):
  cond = [(t, x.numpy()) for t, x in log if t in ("posterior", "cond_eps", "sigma")]
  if task == "i2v":
    (_, p_img), (_, p_fake), (_, s_i), (_, e_i), (_, s_f), (_, e_f) = cond
    return {"image_posterior": p_img, "fake_posterior": p_fake, "image_uniform": s_i,
            "image_eps": e_i, "fake_uniform": s_f, "fake_eps": e_f}
  posts = [x for t, x in cond if t == "posterior"]
  rest = [(t, x) for t, x in cond if t != "posterior"]
  (_, s_a), (_, e_a) = rest[:2]
  blocks = rest[2:]
  return {"first_posterior": posts[0], "block_posteriors": posts[1:], "anchor_uniform": s_a,
          "anchor_eps": e_a, "block_uniforms": [x for t, x in blocks if t == "sigma"],
          "block_eps": [x for t, x in blocks if t == "cond_eps"]}


def _test_image(seed=0, size=H):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
  return Image.fromarray(np.kron(base, np.ones((size // 8, size // 8, 1), np.uint8)))


def _test_video(frames=40, size=H):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = np.asarray(_test_image(1, size))
  return [Image.fromarray(np.roll(img, 3 * i, axis=1)) for i in range(frames)]


CASES = {
    # name: (kind, task, call kwargs for both pipelines)
    "base_t2v": ("base", "t2v", dict(num_inference_steps=6, guidance_scale=5.0)),
    "mid_t2v": ("mid", "t2v", dict(pyramid_num_inference_steps_list=[3, 3, 3],
                                   guidance_scale=5.0, use_zero_init=True, zero_steps=1)),
    "distilled_t2v": ("distilled", "t2v", dict(pyramid_num_inference_steps_list=[2, 2, 2],
                                               guidance_scale=1.0, is_amplify_first_chunk=True)),
    "distilled_i2v_skip_first": ("distilled", "i2v", dict(
        pyramid_num_inference_steps_list=[2, 2, 2], guidance_scale=1.0,
        is_amplify_first_chunk=True, is_skip_first_chunk=True)),
    "distilled_v2v": ("distilled", "v2v", dict(pyramid_num_inference_steps_list=[1, 1, 1],
                                               guidance_scale=1.0)),
}


def _our_kwargs(kind, call):
  kw = {"guidance_scale": call["guidance_scale"]}
  if kind == "base":
    kw["steps"] = call["num_inference_steps"]
  else:
    kw["steps"] = call["pyramid_num_inference_steps_list"]
  for k in ("use_zero_init", "zero_steps", "is_skip_first_chunk"):
    if k in call:
      kw[k] = call[k]
  kw["amplify_first_chunk"] = call.get("is_amplify_first_chunk", False)
  return kw


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_latent_parity(case, reference_pipelines, ours, monkeypatch):
  kind, task, call = CASES[case]
  ref, _ = reference_pipelines[kind]
  text, neg = _embeds(1), _embeds(2)
  size = SIZE[kind]
  inputs = {}
  if task == "i2v":
    inputs["image"] = _test_image(size=size)
  if task == "v2v":
    inputs["video"] = _test_video(size=size)
  cfg_on = call["guidance_scale"] > 1
  with record_draws(monkeypatch, ref) as log:
    with torch.no_grad():
      ref_out = ref(prompt_embeds=text, negative_prompt_embeds=neg if cfg_on else None,
                    num_frames=NUM_FRAMES, height=size, width=size, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **inputs, **call).frames
  ref_lat = ref_out.float().numpy()
  stages = 1 if kind == "base" else 3
  noise = {"chunks": _chunk_noise(log, stages)}
  assert len(noise["chunks"]) == 3
  if task != "t2v":
    noise.update(_cond_noise(log, task))
  if task == "v2v":
    inputs["video"] = np.stack([np.asarray(f) for f in inputs["video"]])
  out = ours[kind].generate(
      prompt_embeds=text.numpy(), negative_prompt_embeds=neg.numpy() if cfg_on else None,
      num_frames=NUM_FRAMES, height=size, width=size, noise=noise, progress=False, **inputs,
      **_our_kwargs(kind, call))
  assert out.latents.shape == ref_lat.shape, (out.latents.shape, ref_lat.shape)
  err = rel_err(out.latents, ref_lat)
  assert err <= TOL, f"{case}: latent rel err {err:.2e}"
  assert out.frames.shape == (97, size, size, 3) and out.frames.dtype == np.uint8


def test_stream_equals_generate_and_compiles_once(ours):
  pipe = ours["distilled"]
  text = _embeds(3).numpy()
  counts = {}
  orig = sampling.sample_chunk

  def counting(*a, **k):  # runs at trace time only
    key = (a[3],)  # first_chunk
    counts[key] = counts.get(key, 0) + 1
    return orig(*a, **k)

  pl.chunk_step.clear_cache() if hasattr(pl.chunk_step, "clear_cache") else None
  sampling.sample_chunk = counting
  try:
    kw = dict(prompt_embeds=text, num_frames=33 * 3, height=H, width=W, seed=5, progress=False)
    gen = pipe.generate(**kw)
    chunks = list(pipe.stream(**kw))
  finally:
    sampling.sample_chunk = orig
  # 3 chunks twice: the amplified first chunk and the normal chunk each traced once.
  assert counts == {(True,): 1, (False,): 1}
  frames = np.concatenate([c.frames for c in chunks], axis=1)[0, :gen.frames.shape[0]]
  np.testing.assert_array_equal(frames, gen.frames)
  assert gen.frames.shape[0] == sampling.output_frames(3) == 97
  np.testing.assert_array_equal(np.concatenate([c.latents for c in chunks], axis=2), gen.latents)


def test_interactive_schedule_matches_spec_example():
  k, plan = pl.interactive_schedule(44, 6, 7, 3)
  assert k == 44
  assert all(p == (0, 0, 0.0) for p in plan[:7])
  assert plan[7] == (0, 1, 0.0) and plan[8] == (0, 1, 0.5) and plan[9] == (0, 1, 1.0)
  assert all(p == (1, 1, 0.0) for p in plan[10:14])
  assert plan[15] == (1, 2, 0.5) and plan[36] == (4, 5, 0.5)
  assert all(p == (5, 5, 0.0) for p in plan[38:42])
  assert plan[42] == (0, 0, 0.0) and plan[43] == (0, 0, 0.0)
  k5, plan5 = pl.interactive_schedule(44, 5, 7, 3)
  assert all(p == (0, 0, 0.0) for p in plan5[35:44])
  assert pl.interactive_schedule(10, 6, 7, 3)[0] == 42
  with pytest.raises(ValueError, match="interpolation_steps"):
    pl.interactive_schedule(44, 6, 3, 3)


def test_lerp_matches_torch_bf16():
  g = torch.Generator().manual_seed(0)
  a, b = torch.randn(4, 8, generator=g).bfloat16(), torch.randn(4, 8, generator=g).bfloat16()
  for w in (0.0, 0.25, 0.5, 1.0):
    ref = torch.lerp(a, b, torch.tensor(w, dtype=torch.bfloat16)).float().numpy()
    ours = pl.lerp_embeddings(jnp.asarray(a.float().numpy(), jnp.bfloat16),
                              jnp.asarray(b.float().numpy(), jnp.bfloat16), w)
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), ref)


def test_bad_inputs(ours, tmp_path):
  pipe = ours["distilled"]
  text = _embeds(3).numpy()
  with pytest.raises(ValueError, match="num_frames=0"):
    pipe.generate(prompt_embeds=text, num_frames=0, height=H, width=W, progress=False)
  with pytest.raises(ValueError, match="height=120"):
    pipe.generate(prompt_embeds=text, num_frames=33, height=120, width=W, progress=False)
  with pytest.raises(ValueError, match="divisible by 8"):  # 3-stage pyramid needs 64-px steps
    pipe.generate(prompt_embeds=text, num_frames=33, height=96, width=W, progress=False)
  with pytest.raises(ValueError, match="prompt list is empty"):
    pipe.generate(prompt=[], num_frames=33, height=H, width=W, progress=False)
  with pytest.raises(FileNotFoundError, match="nope.png"):
    pipe.generate(prompt_embeds=text, image=str(tmp_path / "nope.png"), num_frames=33, height=H,
                  width=W, progress=False)
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"not a video")
  with pytest.raises(ValueError, match="bad.mp4"):
    pipe.generate(prompt_embeds=text, video=str(bad), num_frames=33, height=H, width=W,
                  progress=False)
  with pytest.raises(ValueError, match="at least 33"):
    pipe.generate(prompt_embeds=text, video=np.zeros((20, H, W, 3), np.uint8), num_frames=33,
                  height=H, width=W, progress=False)
  with pytest.warns(UserWarning, match="distilled"):
    pipe.sampler_config(H, W, guidance_scale=3.0)
  with pytest.raises(ValueError, match="negative"):
    list(pipe.stream(prompt_embeds=text, num_frames=33, height=H, width=W, guidance_scale=2.0,
                     negative_prompt_embeds=None, progress=False))


def test_nan_latents_are_caught(ours):
  pipe = ours["distilled"]
  text = _embeds(3).numpy()
  text[0, 0, 0] = np.nan
  with pytest.raises(FloatingPointError, match="chunk 0"):
    pipe.generate(prompt_embeds=text, num_frames=33, height=H, width=W, progress=False)


def test_missing_scheduler_config(reference_pipelines, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  src = reference_pipelines["distilled"][1]
  dst = str(tmp_path / "broken")
  shutil.copytree(src, dst)
  os.remove(os.path.join(dst, "scheduler", "scheduler_config.json"))
  with pytest.raises(Exception, match="scheduler_config.json"):
    pl.Pipeline.from_pretrained(dst, load_text_encoder=False)


def test_generate_fn_matches_generate(ours):
  pipe = ours["distilled"]
  text = _embeds(4).numpy()
  out = pipe.generate(prompt_embeds=text, num_frames=99, height=H, width=W, seed=11,
                      progress=False)
  fn, inputs = pipe.generate_fn(num_frames=99, height=H, width=W, prompt_embeds=text)
  res = fn(pipe.params, inputs, jax.random.key(11))
  assert rel_err(np.moveaxis(np.asarray(res["latents"]), -1, 1), out.latents) <= 1e-6
  np.testing.assert_array_equal(np.asarray(res["frames"])[0], out.frames)
