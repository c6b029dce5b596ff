"""The diffusers-style API of `Pipeline`: `pipe(...)` against diffusers' HeliosPipeline /
HeliosPyramidPipeline (CPU, fp32, tiny random models, 64x64).

Every option is called with the same diffusers argument names on both pipelines; the
reference's random draws are recorded and replayed through `noise=` (helpers of
test_pipeline.py), so latents must agree to 1e-4 and decoded frames to 1e-3. Also: the
per-step callback path (recording and modifying callbacks, equal to the fused path), the strict
`noise=` dict, seed reporting and the output containers.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import helios_jax
from conftest import rel_err
from helios_jax import pipeline as pl
from helios_jax import presets
from test_pipeline import _chunk_noise, _components, _cond_noise, _embeds, _test_image
from test_pipeline import record_draws, SCHEDULERS, TEXT_DIM

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

S = 64                 # pixels: 8x8 latents, pyramid 2x2 / 4x4 / 8x8
TOL = 1e-4             # latents (the project's whole-pipeline bound)
FRAME_TOL = 1e-3       # decoded frames in [0, 1]
DISTILLED = dict(pyramid_num_inference_steps_list=[1, 1, 1], guidance_scale=1.0,
                 is_amplify_first_chunk=True)
PROMPTS = ["A cat walks on the grass in the morning sun.", "Waves crash against dark rocks."]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
  """kind -> (diffusers pipeline, ours). Distilled carries a tiny umT5 + tokenizer."""
  tr, vae = _components()
  out = {}
  cls, kw = SCHEDULERS["base"]
  base = diffusers.HeliosPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                  scheduler=getattr(diffusers, cls)(**kw), transformer=tr)
  torch.manual_seed(1)
  enc = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=96, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
      relative_attention_num_buckets=8, relative_attention_max_distance=20)).eval()
  cls, kw = SCHEDULERS["distilled"]
  dist = diffusers.HeliosPyramidPipeline(
      tokenizer=presets.tiny_tokenizer(), text_encoder=enc, vae=vae,
      scheduler=getattr(diffusers, cls)(**kw), transformer=tr, is_distilled=True)
  for kind, ref in (("base", base), ("distilled", dist)):
    ref.set_progress_bar_config(disable=True)
    folder = str(tmp_path_factory.mktemp(f"api_{kind}"))
    ref.save_pretrained(folder)
    ours = pl.Pipeline.from_pretrained(folder, dtype=jax.numpy.float32,
                                       load_text_encoder=kind == "distilled")
    out[kind] = (ref, ours)
  return out


def _reference(ref, monkeypatch, task="t2v", **call):
  """Runs diffusers; returns (its frames, its draws as our `noise=` dict)."""
  with record_draws(monkeypatch, ref) as log:
    with torch.no_grad():
      frames = ref(height=S, width=S, generator=torch.Generator().manual_seed(0), **call).frames
  stages = 3 if isinstance(ref, diffusers.HeliosPyramidPipeline) else 1
  noise = {"chunks": _chunk_noise(log, stages)}
  if task != "t2v":
    noise.update(_cond_noise(log, task))
  return (frames.float().numpy() if hasattr(frames, "float") else frames), noise


def _ours(pipe, noise, **call):
  return pipe(height=S, width=S, noise=noise, progress=False, **call)


# ------------------------------------------------------------------------------------------
# Options against diffusers.


@pytest.mark.slow
def test_output_types_np_and_latent(pipes, monkeypatch):
  ref, ours = pipes["distilled"]
  call = dict(prompt_embeds=_embeds(1), num_frames=66, **DISTILLED)
  ref_np, noise = _reference(ref, monkeypatch, output_type="np", **call)
  out = _ours(ours, noise, output_type="np", **call)
  assert isinstance(out.frames, np.ndarray) and out.frames.dtype == np.float32
  assert out.frames.shape == ref_np.shape == (1, 65, S, S, 3)
  assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0
  err = rel_err(out.frames, ref_np)
  assert err <= FRAME_TOL, f"np frames rel err {err:.2e}"
  ref_lat, noise2 = _reference(ref, monkeypatch, output_type="latent", **call)
  lat = _ours(ours, noise2, output_type="latent", **call)
  assert lat.frames.shape == ref_lat.shape == (1, 16, 18, 8, 8)
  assert rel_err(lat.frames, ref_lat) <= TOL
  np.testing.assert_array_equal(lat.frames, lat.latents)
  assert rel_err(out.latents, ref_lat) <= TOL  # the np run's latents: the same video


@pytest.mark.slow
def test_num_videos_per_prompt_and_max_sequence_length(pipes, monkeypatch):
  # diffusers 0.42.1 repeats the encoded embeddings but not the latents (its batch stays
  # len(prompt)), so its own num_videos_per_prompt > 1 cannot run: the reference is diffusers
  # given its encode_prompt's repeated embeddings, the argument's meaning.
  ref, ours = pipes["distilled"]
  with torch.no_grad():
    embeds, _ = ref.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                  num_videos_per_prompt=2, max_sequence_length=16,
                                  device="cpu", dtype=torch.float32)
  assert embeds.shape == (4, 16, TEXT_DIM)
  ref_lat, noise = _reference(ref, monkeypatch, prompt_embeds=embeds, num_frames=33,
                              output_type="latent", **DISTILLED)
  out = _ours(ours, noise, prompt=PROMPTS, num_videos_per_prompt=2, max_sequence_length=16,
              num_frames=33, output_type="latent", **DISTILLED)
  assert out.latents.shape == ref_lat.shape == (4, 16, 9, 8, 8)
  assert rel_err(out.latents, ref_lat) <= TOL
  # the 512-token default is a different conditioning: max_sequence_length is honoured
  full = _ours(ours, noise, prompt=PROMPTS, num_videos_per_prompt=2, num_frames=33,
               output_type="latent", **DISTILLED)
  assert rel_err(full.latents, ref_lat) > 1e-3


@pytest.mark.slow
def test_base_custom_sigmas(pipes, monkeypatch):
  ref, ours = pipes["base"]
  sigmas = np.array([0.999, 0.75, 0.4, 0.15])
  call = dict(prompt_embeds=_embeds(1), negative_prompt_embeds=_embeds(2), num_frames=33,
              guidance_scale=5.0, output_type="latent")
  ref_lat, noise = _reference(ref, monkeypatch, sigmas=sigmas, num_inference_steps=4, **call)
  out = _ours(ours, noise, sigmas=list(sigmas), **call)  # steps = len(sigmas)
  assert out.latents.shape == ref_lat.shape == (1, 16, 9, 8, 8)
  assert rel_err(out.latents, ref_lat) <= TOL
  default_lat, _ = _reference(ref, monkeypatch, num_inference_steps=4, **call)
  assert rel_err(default_lat, ref_lat) > 1e-3  # the custom table mattered
  with pytest.raises(ValueError, match="sigmas has 4 entries but steps=\\(3,\\)"):
    _ours(ours, noise, sigmas=sigmas, num_inference_steps=3, **call)
  with pytest.raises(ValueError, match="sigmas= is a Base"):
    pipes["distilled"][1](prompt_embeds=_embeds(1), height=S, width=S, sigmas=sigmas)


@pytest.mark.slow
def test_i2v_noise_sigma_ranges(pipes, monkeypatch):
  ref, ours = pipes["distilled"]
  call = dict(prompt_embeds=_embeds(1), image=_test_image(), num_frames=33,
              output_type="latent", image_noise_sigma_min=0.3, image_noise_sigma_max=0.4,
              video_noise_sigma_min=0.55, video_noise_sigma_max=0.6, **DISTILLED)
  ref_lat, noise = _reference(ref, monkeypatch, task="i2v", **call)
  out = _ours(ours, noise, **call)
  assert out.latents.shape == ref_lat.shape == (1, 16, 10, 8, 8)  # fake frame + one chunk
  assert rel_err(out.latents, ref_lat) <= TOL
  default = _ours(ours, noise, **{k: v for k, v in call.items() if "sigma" not in k})
  assert rel_err(default.latents[:, :, :1], ref_lat[:, :, :1]) > 1e-2  # the ranges mattered


class _Recorder:
  """A callback for both pipelines: records (step, t, latents); optionally modifies them."""

  def __init__(self, modify: bool = False):
    self.calls, self.modify = [], modify

  def __call__(self, pipe, i, t, kwargs):
    del pipe
    n = len(self.calls)
    self.calls.append((int(i), float(t), np.asarray(kwargs["latents"], np.float32)))
    if not self.modify:
      return {}
    out = {}
    if n in (1, 4):
      out["latents"] = kwargs["latents"] * 0.9
    if n == 2:
      out["prompt_embeds"] = kwargs["prompt_embeds"] * 0.5
    return out


@pytest.mark.slow
def test_callback_records_every_step_and_equals_fused_path(pipes, monkeypatch):
  ref, ours = pipes["distilled"]
  call = dict(prompt_embeds=_embeds(1), num_frames=66, output_type="latent", **DISTILLED)
  ref_rec = _Recorder()
  _, noise = _reference(ref, monkeypatch, callback_on_step_end=ref_rec, **call)
  rec = _Recorder()
  out = _ours(ours, noise, callback_on_step_end=rec,
              callback_on_step_end_tensor_inputs=["latents"], **call)
  assert len(rec.calls) == len(ref_rec.calls) == 2 * 3 + 3  # amplified chunk 0, then chunk 1
  for (i, t, lat), (ri, rt, rlat) in zip(rec.calls, ref_rec.calls):
    assert i == ri and t == pytest.approx(rt, rel=1e-6)
    assert lat.shape == rlat.shape and rel_err(lat, rlat) <= TOL
  fused = _ours(ours, noise, **call)
  assert rel_err(out.latents, fused.latents) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["base", "distilled"])
def test_callback_modifies_latents_and_embeddings(pipes, monkeypatch, kind):
  ref, ours = pipes[kind]
  if kind == "base":
    call = dict(prompt_embeds=_embeds(1), negative_prompt_embeds=_embeds(2), num_frames=33,
                num_inference_steps=5, guidance_scale=5.0)
  else:
    call = dict(prompt_embeds=_embeds(1), num_frames=66, **DISTILLED)
  call.update(output_type="latent", callback_on_step_end_tensor_inputs=["latents",
                                                                        "prompt_embeds"])
  ref_lat, noise = _reference(ref, monkeypatch, callback_on_step_end=_Recorder(True), **call)
  out = _ours(ours, noise, callback_on_step_end=_Recorder(True), **call)
  assert rel_err(out.latents, ref_lat) <= TOL
  plain = _ours(ours, noise, **{k: v for k, v in call.items() if "callback" not in k})
  assert rel_err(plain.latents, ref_lat) > 1e-3  # the modifications mattered


# ------------------------------------------------------------------------------------------
# The replay dict, seeds, containers and argument checks (no reference run needed).


def test_noise_dict_is_strict(pipes):
  _, ours = pipes["distilled"]
  kw = dict(prompt_embeds=_embeds(1).numpy(), height=S, width=S, num_frames=66,
            output_type="latent", progress=False, **DISTILLED)
  eps = np.zeros((1, 16, 9, 8, 8), np.float32)
  blocks = [np.zeros((1 * 16 * 9 * 2 * 2, 4), np.float32), np.zeros((16 * 9 * 4 * 4, 4))]
  good = {"eps": eps, "block": blocks}
  with pytest.raises(ValueError, match=r"noise\['chunk'\] is not a known draw; did you mean "
                                       r"'chunks'"):
    ours(noise={"chunk": [good, good]}, **kw)
  with pytest.raises(ValueError, match=r"noise\['image_eps'\] belongs to I2V runs, but this run "
                                       r"is T2V"):
    ours(noise={"image_eps": eps[:, :, :1]}, **kw)
  with pytest.raises(ValueError, match=r"noise\['chunks'\] has 1 entries for 2 chunks"):
    ours(noise={"chunks": [good]}, **kw)
  with pytest.raises(ValueError, match=r"noise\['chunks'\]\[0\]\['eps'\] has shape "
                                       r"\(1, 16, 9, 4, 4\)"):
    ours(noise={"chunks": [dict(good, eps=eps[..., :4, :4]), good]}, **kw)
  with pytest.raises(ValueError, match=r"noise\['chunks'\]\[0\]\['block'\] has 1 block draws"):
    ours(noise={"chunks": [dict(good, block=blocks[:1]), good]}, **kw)
  with pytest.raises(ValueError, match=r"noise\['chunks'\]\[0\]\['block'\]\[1\]"):
    ours(noise={"chunks": [dict(good, block=[blocks[0], blocks[0]]), good]}, **kw)
  with pytest.raises(ValueError, match=r"noise\['chunks'\]\[0\] has keys \['eps', 'blocks'\]"):
    ours(noise={"chunks": [{"eps": eps, "blocks": blocks}, good]}, **kw)
  i2v = dict(kw, image=_test_image(), num_frames=33)
  with pytest.raises(ValueError, match=r"noise\['image_uniform'\] has shape \(2,\)"):
    ours(noise={"image_uniform": np.zeros(2, np.float32)}, **i2v)
  with pytest.raises(ValueError, match=r"noise\['fake_eps'\] has shape"):
    ours(noise={"fake_eps": eps}, **i2v)
  with pytest.raises(ValueError, match=r"noise\['image_posterior'\] has shape"):
    ours(noise={"image_posterior": eps}, **i2v)
  assert set(pl.NOISE_KEYS) >= {"chunks", "image_eps", "block_uniforms"}


@pytest.mark.slow
def test_seed_reporting(pipes):
  _, ours = pipes["distilled"]
  kw = dict(prompt_embeds=_embeds(1).numpy(), height=S, width=S, num_frames=33,
            output_type="latent", progress=False, **DISTILLED)
  a, b = ours(**kw), ours(**kw)
  assert isinstance(a.seed, int) and isinstance(b.seed, int) and a.seed != b.seed
  assert rel_err(a.latents, b.latents) > 1e-3  # fresh seeds: different videos
  again = ours(generator=a.seed, **kw)
  assert again.seed == a.seed
  np.testing.assert_array_equal(again.latents, a.latents)
  key = jax.random.key(a.seed)
  by_key = ours(generator=key, **kw)
  assert by_key.seed is None
  np.testing.assert_array_equal(by_key.latents, a.latents)
  gen = ours.generate(prompt_embeds=kw["prompt_embeds"], num_frames=33, height=S, width=S,
                      amplify_first_chunk=True, steps=[1, 1, 1], seed=a.seed,
                      output_type="latent", progress=False)
  assert gen.seed == a.seed and gen.frames is None
  np.testing.assert_array_equal(gen.latents, a.latents)
  with pytest.raises(TypeError, match="int seed or a jax.random.key"):
    ours(generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.slow
def test_output_containers_and_argument_checks(pipes):
  _, ours = pipes["distilled"]
  kw = dict(prompt_embeds=_embeds(1).numpy(), height=S, width=S, num_frames=33, generator=0,
            progress=False, **DISTILLED)
  pil = ours(output_type="pil", **kw)
  assert len(pil.frames) == 1 and len(pil.frames[0]) == 33 and pil.frames[0][0].size == (S, S)
  np_out = ours(output_type="np", **kw)
  np.testing.assert_array_equal(np.asarray(pil.frames[0][5]),
                                np.round(np_out.frames[0, 5] * 255).astype(np.uint8))
  (frames,) = ours(output_type="np", return_dict=False, **kw)
  np.testing.assert_array_equal(frames, np_out.frames)
  assert np_out[0] is np_out.frames and np_out.latents.shape == (1, 16, 9, 8, 8)
  with pytest.warns(UserWarning, match="latents= is ignored"):
    ignored = ours(output_type="latent", latents=np.ones((1, 16, 9, 8, 8), np.float32), **kw)
  np.testing.assert_array_equal(ignored.latents, np_out.latents)
  assert helios_jax.Pipeline is pl.Pipeline
  with pytest.raises(ValueError, match="num_inference_steps=4 is HeliosPipeline's"):
    ours(num_inference_steps=4, **kw)
  with pytest.raises(ValueError, match="attention_kwargs"):
    ours(attention_kwargs={"scale": 1.0}, **kw)
  with pytest.raises(TypeError, match="'num_frame'; did you mean 'num_frames'"):
    ours(num_frame=33, **{k: v for k, v in kw.items() if k != "num_frames"})
  with pytest.raises(TypeError, match="use generator="):
    ours(seed=3, **kw)
  with pytest.raises(ValueError, match="output_type='pt'"):
    ours(output_type="pt", **kw)
  with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs has \['noise'\]"):
    ours(callback_on_step_end=_Recorder(), callback_on_step_end_tensor_inputs=["noise"], **kw)
  with pytest.raises(ValueError, match=r"returned \['sigma'\]"):
    ours(callback_on_step_end=lambda p, i, t, k: {"sigma": 1}, **kw)
  with pytest.raises(ValueError, match="latents of shape"):
    ours(callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"][:, :, :1]}, **kw)
