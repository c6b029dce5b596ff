"""umT5 encoder on CPU: jitted JAX vs transformers eager on the same small config, side by side.

  python benchmarks/text_encoder.py [--layers 4] [--heads 4] [--d_kv 64] [--d_model 256]
                               [--batch 2] [--seq 512] [--repeats 5]

Both run in fp32 on the same weights (the transformers model is saved and loaded through
`load_text_encoder`), with the pipeline's text length (512) and half-padded prompts. Prints one
table row per implementation and the speed ratio. Not a test: no assertions on time.
"""

from __future__ import annotations

import argparse
import os
import sys
import statistics
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ helpers
from _timing import compile_and_time, torch_time  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import torch

from helios_jax.models.text_encoder import load_text_encoder


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--d_kv", type=int, default=64)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--vocab", type=int, default=1000)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  from transformers import UMT5Config, UMT5EncoderModel  # pylint: disable=g-import-not-at-top
  cfg = UMT5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_kv,
                   d_ff=int(2.5 * args.d_model), num_layers=args.layers, num_heads=args.heads)
  torch.manual_seed(0)
  ref = UMT5EncoderModel(cfg).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(2, args.vocab, size=(args.batch, args.seq))
  mask = np.zeros_like(ids)
  for i in range(args.batch):  # prompt lengths spread over [seq/4, seq]
    mask[i, : max(1, args.seq * (i + 1) // args.batch)] = 1
  ids = np.where(mask == 1, ids, 0)
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    ours = load_text_encoder(d)

  out, compile_s, jax_times = compile_and_time(lambda: ours(ids, mask).block_until_ready(),
                                               args.repeats)
  tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
  ref_res, torch_times = torch_time(lambda: ref(tids, tmask), args.repeats)
  ref_out = ref_res.last_hidden_state.numpy()
  valid = mask.astype(bool)
  err = float(np.abs(np.asarray(out)[valid] - ref_out[valid]).max()
              / np.abs(ref_out[valid]).max())
  jm, tm = statistics.median(jax_times), statistics.median(torch_times)
  print(f"umT5 encoder, CPU fp32, {args.layers} layers x {args.heads} heads x d_kv {args.d_kv}, "
        f"d_model {args.d_model}, batch {args.batch} x {args.seq} tokens; jax {jax.__version__}, "
        f"torch {torch.__version__}; {os.cpu_count()} cores; rel err {err:.2e}")
  print(f"{'impl':<26}{'median ms':>12}{'min ms':>10}")
  print(f"{'jax jit':<26}{jm * 1e3:>12.1f}{min(jax_times) * 1e3:>10.1f}"
        f"   (first call incl. compile {compile_s:.1f} s)")
  print(f"{'transformers eager':<26}{tm * 1e3:>12.1f}{min(torch_times) * 1e3:>10.1f}")
  print(f"speed ratio transformers/jax: {tm / jm:.2f}x")


if __name__ == "__main__":
  main()
