"""Parity of the umT5 text encoder and `encode_prompt` with transformers / diffusers (CPU, fp32)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helios_jax import checkpoint
from helios_jax.config import ConfigError
from helios_jax.models import text_encoder as te
from helios_jax import text

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# Two tiny configs: different head counts, d_kv != d_model / num_heads, layers, bucket settings.
TINY_CONFIGS = {
    "h4_kv12_l2_b32": dict(vocab_size=100, d_model=32, d_kv=12, d_ff=48, num_layers=2,
                           num_heads=4, relative_attention_num_buckets=32,
                           relative_attention_max_distance=128),
    "h3_kv5_l3_b8": dict(vocab_size=90, d_model=24, d_kv=5, d_ff=40, num_layers=3, num_heads=3,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20),
}
SEQ_LENS = (40, 23, 7)  # one row per sequence, padded to 40 tokens
TOL = 1e-5

PROMPTS = [
    "A cat\n  walks.",
    "  Waves &amp;amp; rocks; slow motion, cafÃ© lights\x1c at dusk  ",
    "A drone shot over a snowy mountain range at dusk, cinematic lighting and a long "
    "tracking shot of a chef chopping vegetables in a small kitchen while waves crash.",
]
TOKENIZER_CORPUS = [
    "A cat walks on the grass in the morning sun.",
    "A drone shot over a snowy mountain range at dusk.",
    "Close-up of a chef chopping vegetables, cinematic lighting.",
    "Waves crash against rocks & cafe lights; slow motion, 4k.",
] * 3


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _make_torch_encoder(name: str, seed: int = 0):
  torch.manual_seed(seed)
  cfg = transformers.UMT5Config(**TINY_CONFIGS[name])
  model = transformers.UMT5EncoderModel(cfg).eval()
  with torch.no_grad():  # non-trivial norm weights, so the scale mapping is exercised
    for n, p in model.named_parameters():
      if "layer_norm" in n:
        p.uniform_(0.5, 1.5)
  return model


def _batch(vocab_size: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab_size, size=(len(SEQ_LENS), max(SEQ_LENS)))
  mask = np.zeros_like(ids)
  for i, n in enumerate(SEQ_LENS):
    mask[i, :n] = 1
  ids = np.where(mask == 1, ids, 0)  # pad id 0 after the tokens, as the tokenizer writes
  return ids, mask


def _torch_hidden(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state
  return out.float().numpy()


def _valid_rows_err(ours, ref, mask) -> float:
  valid = mask.astype(bool)
  return _rel_err(np.asarray(ours)[valid], ref[valid])


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
  """(config name, torch model, single-file safetensors folder, ids, mask, reference output)."""
  name = request.param
  model = _make_torch_encoder(name)
  folder = tmp_path_factory.mktemp(f"umt5_{name}")
  model.save_pretrained(folder)
  ids, mask = _batch(TINY_CONFIGS[name]["vocab_size"])
  return name, model, str(folder), ids, mask, _torch_hidden(model, ids, mask)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
  """A 64-piece unigram tokenizer in the HF layout: pad id 0, eos id 1 appended."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.Unigram())
  tok.normalizer = tokenizers.normalizers.NFKC()
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tok.decoder = tokenizers.decoders.Metaspace()
  trainer = tokenizers.trainers.UnigramTrainer(
      vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
  tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  folder = tmp_path_factory.mktemp("tokenizer")
  fast.save_pretrained(folder)
  loaded = text.load_tokenizer(folder)
  assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
  assert loaded.vocab_size <= min(c["vocab_size"] for c in TINY_CONFIGS.values())
  return loaded


# ------------------------------------------------------------------------------------------
# Encoder parity.


def test_relative_position_buckets_match_transformers():
  from transformers.models.umt5.modeling_umt5 import UMT5Attention
  length = 400
  rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  for buckets, max_distance in [(32, 128), (8, 20), (16, 64), (12, 50), (6, 7)]:
    cfg = transformers.UMT5Config(d_model=8, d_kv=4, num_heads=2,
                                  relative_attention_num_buckets=buckets,
                                  relative_attention_max_distance=max_distance)
    ref = UMT5Attention(cfg, has_relative_attention_bias=True)._relative_position_bucket(rel)
    ours = te.relative_position_buckets(length, length, buckets, max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_key_map_covers_umt5_xxl():
  """Every tensor of the real 24-layer checkpoint maps to a parameter of the right shape."""
  cfg = te.UMT5Config.from_preset("umt5-xxl")
  with torch.device("meta"):
    ref = transformers.UMT5EncoderModel(
        transformers.UMT5Config(**{k: v for k, v in cfg.to_dict().items() if v is not None}))
  shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert {"shared.weight", "encoder.embed_tokens.weight"} <= set(shapes)

  class MetaReader:
    folder = "<meta umt5-xxl>"
    keys = shapes.keys
    __contains__ = shapes.__contains__
    info = lambda self, key: (np.dtype(np.float32), shapes[key])

  _, abstract = te.TEXT_ENCODER_SPEC.abstract(cfg, jnp.bfloat16)
  plan = checkpoint.ConversionPlan(
      MetaReader(), abstract, te.TEXT_ENCODER_SPEC.key_map(cfg),
      stacked_len=te.TEXT_ENCODER_SPEC.stacked_len(cfg), tied=te.TEXT_ENCODER_SPEC.tied_keys(cfg))
  for path, sources in plan.sources.items():
    target = plan.targets[path]
    for layer, key in sources.items():
      want = target.shape if layer is None else target.shape[1:]
      got = shapes[key][::-1] if path[-1] == "kernel" else shapes[key]
      assert tuple(got) == tuple(want), (key, got, want)
  n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
  assert n_params == 5_680_910_336  # spec architecture.md §7
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}


def test_config_loads_transformers_file(tiny):
  _, model, folder, *_ = tiny
  cfg = te.UMT5Config.from_json(folder)
  for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance"):
    assert getattr(cfg, key) == getattr(model.config, key), key
  assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act


def test_config_accepts_legacy_umt5_xxl_keys():
  """A google/umt5-xxl-style file (transformers 4.x keys) parses to the preset."""
  legacy = {
      "_name_or_path": "google/umt5-xxl", "architectures": ["UMT5EncoderModel"],
      "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096,
      "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
      "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
      "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
      "model_type": "umt5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
      "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
      "relative_attention_num_buckets": 32, "scalable_attention": True,
      "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer", "torch_dtype": "float32",
      "transformers_version": "4.48.0", "use_cache": True, "vocab_size": 256384,
  }
  cfg = te.UMT5Config.from_dict(legacy)
  preset = te.UMT5Config.from_preset("umt5-xxl")
  for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance",
              "layer_norm_epsilon"):
    assert getattr(cfg, key) == getattr(preset, key), key
  with pytest.raises(ConfigError, match="dense_act_fn='relu'"):
    te.UMT5Config.from_dict({**legacy, "dense_act_fn": "relu"})
  with pytest.raises(ConfigError, match="is_decoder=True"):
    te.UMT5Config.from_dict({**legacy, "is_decoder": True})


def test_parity_fp32_single_file(tiny):
  name, _, folder, ids, mask, ref = tiny
  enc = te.load_text_encoder(folder)
  out = enc(ids, mask)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  valid_err, all_err = _valid_rows_err(out, ref, mask), _rel_err(out, ref)
  print(f"[{name}] fp32 relative error: valid rows {valid_err:.2e}, all rows {all_err:.2e}")
  assert valid_err <= TOL
  assert all_err <= TOL  # padded query rows are computed the same way too


def test_parity_sharded_safetensors(tmp_path):
  name = "h4_kv12_l2_b32"
  model = _make_torch_encoder(name, seed=3)
  model.save_pretrained(tmp_path, max_shard_size="8KB")
  files = os.listdir(tmp_path)
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  ids, mask = _batch(TINY_CONFIGS[name]["vocab_size"], seed=4)
  err = _valid_rows_err(te.load_text_encoder(tmp_path)(ids, mask),
                        _torch_hidden(model, ids, mask), mask)
  print(f"[{name}] sharded fp32 relative error {err:.2e}")
  assert err <= TOL


def test_orbax_export_round_trip(tiny, tmp_path):
  name, _, folder, ids, mask, ref = tiny
  dst = tmp_path / "text_encoder"
  checkpoint.export_model(te.TEXT_ENCODER_SPEC, folder, dst, progress=False)
  assert checkpoint.is_orbax_export(dst)
  assert te.UMT5Config.from_json(dst) == te.UMT5Config.from_json(folder)
  from_orbax = te.load_text_encoder(dst)
  from_st = te.load_text_encoder(folder)
  for a, b in zip(jax.tree.leaves(from_orbax.params), jax.tree.leaves(from_st.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out = from_orbax(ids, mask)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(from_st(ids, mask)))
  assert _valid_rows_err(out, ref, mask) <= TOL
  cpu = jax.devices("cpu")[0]
  on_host = te.load_text_encoder(dst, device=cpu)
  assert all(leaf.devices() == {cpu} for leaf in jax.tree.leaves(on_host.params))


def test_tied_embedding_keys(tmp_path):
  name = "h3_kv5_l3_b8"
  model = _make_torch_encoder(name, seed=5)
  sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
  shared = sd.pop("shared.weight")
  sd.pop("encoder.embed_tokens.weight", None)
  ids, mask = _batch(TINY_CONFIGS[name]["vocab_size"], seed=6)
  ref = _torch_hidden(model, ids, mask)
  variants = {
      "both": {"shared.weight": shared, "encoder.embed_tokens.weight": shared.clone()},
      "encoder_only": {"encoder.embed_tokens.weight": shared},
      "shared_only": {"shared.weight": shared},
  }
  for label, emb in variants.items():
    folder = tmp_path / label
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    safetensors_torch.save_file({**sd, **emb}, str(folder / "model.safetensors"))
    assert _valid_rows_err(te.load_text_encoder(folder)(ids, mask), ref, mask) <= TOL, label
  # Tied tensors of different shapes are an error.
  folder = tmp_path / "bad_tie"
  folder.mkdir()
  model.config.to_json_file(folder / "config.json")
  safetensors_torch.save_file(
      {**sd, "shared.weight": shared, "encoder.embed_tokens.weight": shared[:-1].clone()},
      str(folder / "model.safetensors"))
  with pytest.raises(checkpoint.CheckpointError, match="encoder.embed_tokens.weight"):
    te.load_text_encoder(folder)


def test_bf16_dtype_policy_and_parity(tiny):
  name, _, folder, ids, mask, _ = tiny
  enc = te.load_text_encoder(folder, jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(enc.params)} == {jnp.dtype(jnp.bfloat16)}
  ref_model = transformers.UMT5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
  ref = _torch_hidden(ref_model, ids, mask)
  out = enc(ids, mask)
  assert out.dtype == jnp.bfloat16
  err = _valid_rows_err(out.astype(jnp.float32), ref, mask)
  print(f"[{name}] bf16 relative error vs transformers bf16: {err:.2e}")
  assert err <= 3e-2


def test_release_reload_and_host_device(tiny):
  _, _, folder, ids, mask, ref = tiny
  cpu = jax.devices("cpu")[0]
  enc = te.load_text_encoder(folder, device=cpu, lazy=True)
  assert not enc.loaded
  first = enc(ids, mask)
  assert enc.loaded and first.devices() == {cpu}
  assert all(leaf.devices() == {cpu} for leaf in jax.tree.leaves(enc.params))
  leaves = jax.tree.leaves(enc.params)
  enc.release()
  assert not enc.loaded and all(leaf.is_deleted() for leaf in leaves)
  second = enc(ids, mask)  # reloads from the checkpoint
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  assert _valid_rows_err(second, ref, mask) <= TOL


# ------------------------------------------------------------------------------------------
# Prompt path.


def test_clean_prompt_matches_diffusers():
  from diffusers.pipelines.helios import pipeline_helios, pipeline_helios_pyramid
  for p in PROMPTS + ["", "  \t\n ", "&lt;b&gt;bold&lt;/b&gt;", "naÃ¯ve\u00a0text\u3000end"]:
    assert text.clean_prompt(p) == pipeline_helios.prompt_clean(p), p
    assert text.clean_prompt(p) == pipeline_helios_pyramid.prompt_clean(p), p


def test_encode_prompt_matches_pipeline(tiny, tiny_tokenizer):
  _check_encode_prompt(tiny, tiny_tokenizer, max_length=16)


@pytest.mark.parametrize("tiny", ["h4_kv12_l2_b32"], indirect=True)
def test_encode_prompt_matches_pipeline_512(tiny, tiny_tokenizer):
  _check_encode_prompt(tiny, tiny_tokenizer, max_length=512)


def _check_encode_prompt(tiny, tiny_tokenizer, max_length: int):
  name, model, folder, *_ = tiny
  from diffusers import HeliosPipeline
  pipe = HeliosPipeline(tokenizer=tiny_tokenizer, text_encoder=model, vae=None, scheduler=None,
                        transformer=None)
  with torch.no_grad():
    ref, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                max_sequence_length=max_length, device="cpu",
                                dtype=torch.float32)
  ref = ref.numpy()
  enc = te.load_text_encoder(folder)
  ours = text.encode_prompt(PROMPTS, tiny_tokenizer, enc, max_length=max_length)
  assert ours.shape == ref.shape == (len(PROMPTS), max_length, model.config.d_model)
  assert ours.dtype == jnp.float32
  zero_rows = ~np.any(ref != 0, axis=-1)
  np.testing.assert_array_equal(~np.any(np.asarray(ours) != 0, axis=-1), zero_rows)
  assert zero_rows[:, -1].any() and not zero_rows[:, 0].any()  # padding exists, tokens exist
  err = _rel_err(ours, ref)
  print(f"[{name}] encode_prompt max_length={max_length} relative error {err:.2e}")
  assert err <= TOL
  single = text.encode_prompt(PROMPTS[1], tiny_tokenizer, enc, max_length=max_length,
                              dtype=jnp.bfloat16)
  assert single.shape == (1, max_length, model.config.d_model) and single.dtype == jnp.bfloat16
  assert _rel_err(single.astype(jnp.float32), ref[1:2]) <= 1e-2
  plain = text.encode_prompt(PROMPTS, tiny_tokenizer, lambda i, m: enc(i, m),
                             max_length=max_length)  # any callable; dtype from its output
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(ours))


# ------------------------------------------------------------------------------------------
# Bad input.


def test_bad_prompts(tiny, tiny_tokenizer):
  _, _, folder, *_ = tiny
  enc = te.load_text_encoder(folder, lazy=True)
  with pytest.raises(ValueError, match="empty"):
    text.encode_prompt([], tiny_tokenizer, enc, max_length=8)
  with pytest.raises(TypeError, match=r"prompts\[1\].*int"):
    text.encode_prompt(["a cat", 3], tiny_tokenizer, enc, max_length=8)
  with pytest.raises(TypeError, match="bytes"):
    text.encode_prompt(b"a cat", tiny_tokenizer, enc, max_length=8)
  with pytest.raises(ValueError, match="max_length=0"):
    text.encode_prompt("a cat", tiny_tokenizer, enc, max_length=0)
  assert not enc.loaded  # nothing was encoded
  with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
    text.load_tokenizer(os.path.join(folder, "no_such_tokenizer"))


def test_bad_encoder_inputs(tiny):
  name, _, folder, ids, mask, _ = tiny
  vocab = TINY_CONFIGS[name]["vocab_size"]
  enc = te.load_text_encoder(folder, lazy=True)
  bad_ids = ids.copy()
  bad_ids[0, 3] = vocab
  with pytest.raises(ValueError, match=f"{vocab}.*outside"):
    enc(bad_ids, mask)
  bad_ids[0, 3] = -1
  with pytest.raises(ValueError, match="-1"):
    enc(bad_ids, mask)
  with pytest.raises(ValueError, match=r"attention_mask shape \(3, 39\)"):
    enc(ids, mask[:, :-1])
  with pytest.raises(ValueError, match=r"shape \(40,\)"):
    enc(ids[0], mask[0])
  with pytest.raises(TypeError, match="float"):
    enc(ids.astype(np.float32), mask)
  with pytest.raises(ValueError, match="0/1"):
    enc(ids, mask * 2)
  assert not enc.loaded
  with pytest.raises(ValueError, match="float16"):
    te.load_text_encoder(folder, jnp.float16)


def test_bad_checkpoints(tiny, tmp_path):
  _, model, folder, *_ = tiny
  with open(os.path.join(folder, "config.json")) as f:
    raw = json.load(f)
  with pytest.raises(checkpoint.CheckpointError, match="missing_dir"):
    te.load_text_encoder(tmp_path / "missing_dir")

  def write(label, config, tensors=None, blob=None):
    d = tmp_path / label
    d.mkdir()
    with open(d / "config.json", "w") as f:
      json.dump(config, f)
    if tensors is not None:
      safetensors_torch.save_file(tensors, str(d / "model.safetensors"))
    if blob is not None:
      (d / "model.safetensors").write_bytes(blob)
    return d

  sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()
        if k != "encoder.embed_tokens.weight"}
  with pytest.raises(ConfigError, match="bogus_key"):
    te.load_text_encoder(write("unknown_key", {**raw, "bogus_key": 1}, sd))
  with pytest.raises(ConfigError, match="model_type='t5'"):
    te.load_text_encoder(write("t5", {**raw, "model_type": "t5"}, sd))
  with pytest.raises(ConfigError, match="feed_forward_proj='relu'"):
    te.load_text_encoder(write("relu", {**raw, "feed_forward_proj": "relu"}, sd))
  with pytest.raises(ConfigError, match="config file not found"):
    te.load_text_encoder(tmp_path)
  missing = dict(sd)
  missing.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
  with pytest.raises(checkpoint.CheckpointError, match=r"ffn/wo/kernel\[layer 1\]"):
    te.load_text_encoder(write("missing_tensor", raw, missing))
  with pytest.raises(checkpoint.CheckpointError, match="lm_head.weight"):
    te.load_text_encoder(
        write("extra_tensor", raw, {**sd, "lm_head.weight": sd["shared.weight"].clone()}))
  extra_layer = {**sd, f"encoder.block.{raw['num_layers']}.layer.0.layer_norm.weight":
                 sd["encoder.final_layer_norm.weight"].clone()}
  with pytest.raises(checkpoint.CheckpointError, match=f"block.{raw['num_layers']}"):
    te.load_text_encoder(write("extra_layer", raw, extra_layer))
  wrong_shape = {**sd, "encoder.final_layer_norm.weight": torch.ones(7)}
  with pytest.raises(checkpoint.CheckpointError, match="final_layer_norm"):
    te.load_text_encoder(write("wrong_shape", raw, wrong_shape))
  with open(os.path.join(folder, "model.safetensors"), "rb") as f:
    blob = f.read()
  with pytest.raises(checkpoint.CheckpointError, match="corrupt|truncated"):
    te.load_text_encoder(write("truncated", raw, blob=blob[: len(blob) // 2]))
