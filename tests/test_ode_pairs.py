"""Stage 3a ODE pairs: teacher schedule (spec training.md §2.4, §7.4), recording, storage, CLI."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from absl import flags
from flax import nnx

from helios_jax import checkpoint
from helios_jax import sampling
from helios_jax import schedulers as hs
from helios_jax.training import model as model_lib
from helios_jax.data import ode_pairs as opd
from helios_jax.training import ode_pairs as op

# Spec §2.4: the student timesteps (hard-coded in get_ode-pairs.py) at 48x80.
SPEC_AMPLIFIED = [[998.534, 902.218, 833.964, 783.066], [742.822, 640.004, 547.193, 462.995],
                  [385.414, 328.625, 253.991, 151.531]]
SPEC_TWO = [[998.534, 833.964], [742.822, 547.193], [385.414, 253.991]]
# The reference's pre-shift student targets (pipeline_helios_ode.py).
PRE_SHIFT_AMPLIFIED = [[999.0, 935.1279, 871.2559, 807.3838], [743.2560, 653.9349, 564.6138,
                       475.2927], [385.6140, 289.5564, 193.4988, 97.4412]]

HW = 16
TEXT_LEN = 8
OC = op.OdeConfig(teacher_steps=3, student_steps=(2, 2, 2), guidance_scale=5.0,
                  latent_height=HW, latent_width=HW)


def test_teacher_schedule_matches_spec_at_48x80():
  for amplify, spec, n_steps in ((True, SPEC_AMPLIFIED, 23), (False, SPEC_TWO, 21)):
    stages = op.teacher_stage_schedules(20, (2, 2, 2), 48, 80, amplify)
    for k, st in enumerate(stages):
      assert st.num_steps == n_steps
      rec = st.recorded_timesteps
      np.testing.assert_allclose(st.student_timesteps, spec[k], atol=1e-3)
      np.testing.assert_allclose(rec, spec[k], atol=0.25)
      assert st.record_index[0] == 0 and rec[0] == st.schedule.timesteps[0]
      assert np.all(np.diff(st.schedule.timesteps) < 0) and st.schedule.sigmas[-1] == 0
      hs.unipc_table(op.TEACHER_SCHEDULER, st.schedule)  # usable by the UniPC solver
  amp = op.teacher_stage_schedules(20, (2, 2, 2), 48, 80, True)
  assert abs(amp[0].recorded_timesteps[2] - 834.08) < 0.01   # spec: 834.08 vs 833.96
  assert abs(amp[1].recorded_timesteps[2] - 547.02) < 0.01   # spec: 547.02 vs 547.19
  # Pre-shift: the reference's targets were merged in with table-snapped sigmas.
  const = hs.HELIOS_PYRAMID
  for k, st in enumerate(amp):
    mu = st.schedule.mu
    pre_sig = st.schedule.sigmas / (mu - (mu - 1) * st.schedule.sigmas)  # inverse linear shift
    targets = np.asarray(PRE_SHIFT_AMPLIFIED[k])
    snap = np.argmin(np.abs(const.stage_timesteps[k][None] - targets[:, None]), axis=1)
    np.testing.assert_allclose(pre_sig[st.record_index[1:]], const.stage_sigmas[snap[1:]],
                               rtol=1e-12)
    np.testing.assert_allclose(pre_sig[0], 0.999, rtol=1e-12)
  with pytest.raises(ValueError, match="linear"):
    op.teacher_stage_schedules(20, (2, 2, 2), 48, 80, False,
                               scheduler=hs.HeliosSchedulerConfig(use_dynamic_shifting=True))
  with pytest.raises(ValueError, match="teacher_steps"):
    op.teacher_stage_schedules((20, 20), (2, 2, 2), 48, 80)


@pytest.fixture(scope="module")
def tiny():
  cfg = model_lib.BaseModelConfig(preset="tiny", param_dtype="float32", remat="none",
                                  attention="xla", seed=0)
  config, graphdef, params = model_lib.build_base(cfg)
  return config, graphdef, jax.tree.map(jnp.asarray, params)


def _text(key, b=1):
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, (b, TEXT_LEN, 32)), jax.random.normal(k2, (b, TEXT_LEN, 32)))


def _reference_denoise(graphdef, params, text, neg, state):
  """An independent CFG denoiser written from the transformer API."""
  hist = sampling.history_inputs(state, 2)
  idx = jnp.broadcast_to(jnp.arange(20, 29, dtype=jnp.int32)[None], (2, 9))

  def denoise(x, step):
    model = nnx.merge(graphdef, params)
    t = jnp.trunc(jnp.asarray(step.timestep)).astype(jnp.int32)
    v = model.forward_channels_last(jnp.concatenate([x, x]), t, jnp.concatenate([text, neg]),
                                    idx, hist)
    return v[1:] + 5.0 * (v[:1] - v[1:])

  return denoise


def test_record_section_matches_independent_loop(tiny):
  _, graphdef, params = tiny
  text, neg = _text(jax.random.key(1))
  state = sampling.empty_history(1, HW, HW)
  noise = op.section_noise(OC, 42, 0, 0)
  rec = op.record_section(graphdef, OC, True, params, text, neg, state, noise)
  stages = OC.stages(True)
  start = hs.noise_pyramid_start(noise.eps, 3)
  # x_t at step 0 of stage 0 is the pyramid start noise.
  np.testing.assert_array_equal(np.asarray(rec.xt[0][:, 0]), np.asarray(start))
  for k, (h, w) in enumerate(OC.stage_sizes()):
    assert rec.xt[k].shape == (1, 4, 9, h, w, 16) and rec.end[k].shape == (1, 9, h, w, 16)
    np.testing.assert_array_equal(np.asarray(rec.t[k]),
                                  stages[k].recorded_timesteps.astype(np.float32))

  # Stage starts: stage k > 0 starts from the transition of stage k-1's endpoint.
  for k in (1, 2):
    want = hs.stage_transition(rec.end[k - 1], noise.block[k - 1], k, noise_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(rec.xt[k][:, 0]), np.asarray(want), rtol=0,
                               atol=1e-6 * float(np.abs(want).max()))   # fusion rounding

  # The last stage step by step in a Python loop over the same table (independent of the
  # recording scan): its endpoint and the states before the recorded steps.
  denoise = _reference_denoise(graphdef, params, text, neg, state)
  step_fn = jax.jit(lambda st, x, step: hs.unipc_step(st, x, denoise(x, step), step))
  table = hs.unipc_table(op.TEACHER_SCHEDULER, stages[2].schedule)
  x = rec.xt[2][:, 0]
  st, before = hs.unipc_init(x, 2), []
  for i in range(stages[2].num_steps):
    before.append(x)
    st, x = step_fn(st, x, jax.tree.map(lambda a, i=i: a[i], table))
  scale = float(np.abs(np.asarray(x)).max())
  np.testing.assert_allclose(np.asarray(rec.end[2]), np.asarray(x), rtol=0, atol=1e-5 * scale)
  want = np.stack([np.asarray(before[i]) for i in stages[2].record_index], axis=1)
  np.testing.assert_allclose(np.asarray(rec.xt[2]), want, rtol=0, atol=1e-5 * scale)
  assert np.all(np.isfinite(np.asarray(rec.end[-1])))


def test_section_noise_quirk12():
  a, b = op.section_noise(OC, 42, 0, 1), op.section_noise(OC, 42, 5, 1)
  np.testing.assert_array_equal(np.asarray(a.eps), np.asarray(b.eps))        # same per prompt
  np.testing.assert_array_equal(np.asarray(a.block[1]), np.asarray(b.block[1]))
  assert not np.array_equal(np.asarray(a.eps), np.asarray(op.section_noise(OC, 42, 0, 0).eps))
  c = op.section_noise(OC, 42, 5, 1, same_noise_per_prompt=False)
  assert not np.array_equal(np.asarray(a.eps), np.asarray(c.eps))


@pytest.fixture(scope="module")
def records(tiny):
  _, graphdef, params = tiny
  text, neg = _text(jax.random.key(2), 2)
  recs = op.record_trajectory(graphdef, params, text, neg[0], num_sections=2, config=OC)
  return text, neg, recs


def test_record_trajectory(tiny, records):
  _, graphdef, params = tiny
  text, neg, recs = records
  assert len(recs) == 2
  for r in recs:
    assert set(r) == set(opd.record_keys(3))
    assert r["text"].shape == (TEXT_LEN, 32)
    for k, (h, w) in enumerate(OC.stage_sizes()):
      assert r[f"xt{k}"].shape == (2, 4, 9, h, w, 16) and r[f"xt{k}"].dtype == np.float32
      assert r[f"end{k}"].shape == (2, 9, h, w, 16)
      np.testing.assert_array_equal(r[f"n{k}"], [4, 2])
      assert r[f"t{k}"].shape == (2, 4) and np.all(r[f"t{k}"][1, 2:] == -1)
      assert np.all(r[f"xt{k}"][1, 2:] == 0) and np.any(r[f"xt{k}"][1, :2] != 0)
      np.testing.assert_array_equal(r[f"t{k}"][1, :2],
                                    OC.stages(False)[k].recorded_timesteps.astype(np.float32))
  # Quirk 12: both prompts start from the same noise, their trajectories differ by the text.
  np.testing.assert_array_equal(recs[0]["xt0"][:, 0], recs[1]["xt0"][:, 0])
  assert not np.allclose(recs[0]["end2"], recs[1]["end2"])
  # Section 1 reads the history of section 0's output (anchor = its first latent).
  state = sampling.advance(sampling.empty_history(1, HW, HW),
                           jnp.asarray(recs[1]["end2"][:1]), True)
  rec = op.record_section(graphdef, OC, False, params, text[1:], neg[:1], state,
                          op.section_noise(OC, 42, 1, 1))
  np.testing.assert_allclose(np.asarray(rec.end[2][0]), recs[1]["end2"][1], rtol=0,
                             atol=1e-5 * float(np.abs(recs[1]["end2"][1]).max()))


def test_dataset_round_trip_and_atomicity(tmp_path, records, monkeypatch):
  _, _, recs = records
  info = op.dataset_info(OC, 2, 42, True)
  out = str(tmp_path / "pairs")
  opd.write_dataset(out, recs, info, [{"uttid": "a"}, {"uttid": "b"}])
  src = opd.OdePairsSource(out)
  assert len(src) == 2 and src.info["num_sections"] == 2 and src.info["max_steps"] == [4, 4, 4]
  assert src.records[1]["uttid"] == "b"
  for i in range(2):
    got = src[i]
    assert set(got) == set(recs[i])
    for k, v in recs[i].items():
      assert got[k].dtype == v.dtype
      np.testing.assert_array_equal(got[k], v)
  with pytest.raises(IndexError):
    src[2]
  ds = grain.MapDataset.source(src)   # usable as a grain source
  np.testing.assert_array_equal(ds[1]["end1"], recs[1]["end1"])
  with pytest.raises(FileExistsError):
    opd.write_dataset(out, recs)
  # A failure half way leaves nothing behind.
  calls = []

  real_savez = np.savez

  def failing_savez(*a, **kw):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return real_savez(*a, **kw)

  monkeypatch.setattr(np, "savez", failing_savez)
  with pytest.raises(OSError, match="disk full"):
    opd.write_dataset(str(tmp_path / "half"), recs)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["pairs"]
  # Records must share shapes.
  bad = [recs[0], dict(recs[1], text=recs[1]["text"][:4])]
  with pytest.raises(opd.OdePairsError, match="record 1 field 'text'"):
    opd.write_dataset(str(tmp_path / "bad"), bad)


def test_dataset_errors(tmp_path, records):
  _, _, recs = records
  with pytest.raises(opd.OdePairsError, match="not found"):
    opd.OdePairsSource(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(opd.OdePairsError, match="no index.json"):
    opd.OdePairsSource(str(tmp_path / "empty"))
  out = tmp_path / "ds"
  opd.write_dataset(str(out), recs[:1])
  index = json.loads((out / "index.json").read_text())
  (out / "index.json").write_text("{not json")
  with pytest.raises(opd.OdePairsError, match="corrupt ODE-pairs index"):
    opd.OdePairsSource(str(out))
  (out / "index.json").write_text(json.dumps(dict(index, format="other")))
  with pytest.raises(opd.OdePairsError, match="not an ODE-pairs index"):
    opd.OdePairsSource(str(out))
  bad_shape = dict(index, fields=dict(index["fields"], text={"shape": [3, 32],
                                                               "dtype": "<f4"}))
  (out / "index.json").write_text(json.dumps(bad_shape))
  with pytest.raises(opd.OdePairsError, match=r"field 'text' has shape \(8, 32\)"):
    opd.OdePairsSource(str(out))[0]
  (out / "index.json").write_text(json.dumps(index))
  (out / "000000.npz").write_bytes(b"truncated")
  with pytest.raises(opd.OdePairsError, match="corrupt ODE-pairs record .*000000.npz"):
    opd.OdePairsSource(str(out))[0]
  os.remove(out / "000000.npz")
  with pytest.raises(opd.OdePairsError, match="missing"):
    opd.OdePairsSource(str(out))


def test_cli_synthetic(tmp_path, tiny):
  config, _, params = tiny
  teacher = tmp_path / "teacher"
  with checkpoint.atomic_directory(str(teacher)) as tmp:
    config.to_json(os.path.join(tmp, "config.json"), _class_name="HeliosTransformer3DModel")
    checkpoint.save_params(os.path.join(tmp, checkpoint.PARAMS_DIR),
                           jax.tree.map(np.asarray, params))
  neg = tmp_path / "neg.npy"
  np.save(neg, np.ones((3, 32), np.float32))
  out = tmp_path / "pairs"
  fv = flags.FlagValues()
  op.define_flags(fv)
  fv(["ode_pairs", f"--teacher={teacher}", f"--out={out}", "--data_source=synthetic",
      "--num_prompts=2", "--num_sections=2", "--teacher_steps=3", f"--text_len={TEXT_LEN}",
      f"--negative_text={neg}", "--param_dtype=float32", "--attention=xla",
      f"--latent_height={HW}", f"--latent_width={HW}"])
  assert op.run(fv) == str(out)
  with pytest.raises(app.UsageError, match="exists"):
    op.run(fv)
  src = opd.OdePairsSource(str(out))
  assert len(src) == 2
  assert src.info["teacher_steps"] == [3, 3, 3] and src.info["negative_text"] == str(neg)
  assert src.records[0]["uttid"] == "synthetic_0"
  r = src[1]
  assert r["xt2"].shape == (2, 4, 9, HW, HW, 16) and r["text"].shape == (TEXT_LEN, 32)
  np.testing.assert_array_equal(r["n0"], [4, 2])
  assert np.all(np.isfinite(r["end2"]))
