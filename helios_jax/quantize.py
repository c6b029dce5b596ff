"""Post-training quantization of the DiT with Qwix: fp8 (e4m3) weights + activations, int8 weights.

`quantize_transformer(transformer, mode)` returns a new `HeliosTransformer` whose `Linear`
kernels are Qwix `QArray`s (per-output-channel absmax scales) and whose forward is intercepted by
a `qwix.PtqProvider`: every `jnp.dot` of a quantized `Linear` becomes `qwix.dot_general` on the
quantized operands (fp8: the activation is quantized per token on the fly, dynamic range; int8w:
weight-only, the activation stays bf16). Nothing else changes: norms, RoPE, attention
(softmax(QK^T)V), modulation arithmetic and the fp32 residual stream keep their dtypes.

How the scanned blocks are handled: Qwix's NNX PTQ replaces a weight by its quantized form the
first time the op runs inside the module, which cannot reach the stacked block weights (the block
scan merges a fresh per-layer module from a slice of the stacked state in every iteration). So
the weights are quantized here, ahead of any forward (`skip_nnx_init`): a stacked kernel
`[L, in, out]` is quantized layer by layer (vmapped `qwix.quantize`, the same `HowToQuantize` that
Qwix derives for `jnp.dot`), stored as `WithAux(QArray)` on the stacked module, and the scan
slices the `QArray` leaves like any other layer state. Qwix then matches its rules by module path
inside the scan body (`blocks/attn1/to_q`, ...), one path for all layers.

Consequence: one scanned block stack is one program, so a rule applies to every layer of the
stack; per-block exceptions (ModelOpt's "first/last 3 blocks in bf16") are not expressible
without cutting the stack into separately-stacked segments. `keep_bf16` therefore names module
paths, and a block path keeps (or quantizes) that layer type in all blocks.

Works on abstract models too (`jax.ShapeDtypeStruct` leaves, e.g. `TRANSFORMER_SPEC.abstract`):
the quantized shapes come from `jax.eval_shape` (benchmarks/memory_plan.py).
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

import qwix
from qwix._src.core import dot_general as qwix_dot_general
from qwix._src.core import qarray as qwix_qarray
from qwix._src.providers import ptq as qwix_ptq
from qwix._src.utils import flax_util as qwix_flax_util

from helios_jax.models import layers
from helios_jax.models import transformer as transformer_lib

# mode -> (weight qtype, activation qtype or None = weight-only).
MODES = {
    "fp8": (jnp.float8_e4m3fn, jnp.float8_e4m3fn),
    "int8w": (jnp.int8, None),
}

# Module paths (regexes, full match on the '/'-joined NNX path of a `Linear`) whose matmuls
# stay in the model dtype by default:
#   condition_embedder/*: text projection, timestep MLP (fp32-kept) and time_proj (the adaLN
#     modulation of every block);
#   proj_out: the output head.
# Never quantized (not `Linear`s, no pattern needed): the patch embeddings (`patch_embedding`,
# `memory/*`, 3D convs), norms, scale-shift tables, RoPE, the attention core.
# Not expressible: first/last N blocks (the scanned stack shares one rule; see module doc).
DEFAULT_KEEP: tuple[str, ...] = (
    r"condition_embedder/.*",
    r"proj_out",
)

CALL_METHOD = "forward_channels_last"  # what the sampler calls; __call__ goes through it.


@functools.cache
def fp8_supported(platform: str | None = None) -> tuple[bool, str]:
  """Whether the backend compiles and runs a float8_e4m3fn dot (probed once per platform).

  Returns:
    (ok, reason): reason is the compiler/runtime error when not ok.
  """
  platform = platform or jax.default_backend()
  try:
    dev = jax.devices(platform)[0]
    a = jax.device_put(jnp.ones((16, 16), jnp.float8_e4m3fn), dev)
    y = jax.jit(lambda u, v: jnp.dot(u, v, preferred_element_type=jnp.float32))(a, a)
    ok = float(y[0, 0]) == 16.0
    return ok, "" if ok else f"fp8 dot returned {float(y[0, 0])}, expected 16"
  except Exception as e:  # pylint: disable=broad-except
    return False, f"{type(e).__name__}: {e}"


def check_mode(mode: str):
  """Raises for an unknown mode (ValueError) or fp8 where it cannot run (RuntimeError)."""
  if mode not in MODES:
    raise ValueError(f"quantize mode {mode!r} not in {sorted(MODES)}")
  if mode == "fp8":
    ok, reason = fp8_supported()
    if not ok:
      raise RuntimeError(
          f"quantize='fp8' cannot run on platform {jax.default_backend()!r} ({reason}); fp8 "
          "(e4m3) dots need an NVIDIA GPU with fp8 tensor cores (Ada/Hopper/Blackwell, sm_89+), "
          "a TPU, or XLA CPU; use quantize='int8w' (weight-only, runs everywhere)")


def _kernel_how(qtype) -> qwix_qarray.HowToQuantize:
  """What `PtqProvider.dot_general` derives for `jnp.dot(x[..., in], kernel[in, out])`."""
  return qwix_dot_general.get_how_to_quantize(
      dimension_numbers=(((1,), (0,)), ((), ())), ndims=(2, 2), for_lhs=False,
      qtype=qtype, calibration_method="absmax", tile_size=None)


def _quantize_value(value, how: qwix_qarray.HowToQuantize, stacked: bool):
  fn = functools.partial(qwix_qarray.quantize, how=how)
  if stacked:
    fn = jax.vmap(fn)
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.eval_shape(fn, value)
  return jax.jit(fn)(value)


def linear_paths(model: nnx.Module) -> list[tuple[str, layers.Linear]]:
  """('/'-joined NNX path, module) of every `Linear` in the model (stacked blocks included)."""
  return [("/".join(map(str, p)), m) for p, m in model.iter_modules()
          if isinstance(m, layers.Linear)]


def _matches(path: str, patterns: Iterable[str]) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


def quantize_transformer(transformer: transformer_lib.HeliosTransformer, mode: str,
                         keep_bf16: Iterable[str] = DEFAULT_KEEP
                         ) -> transformer_lib.HeliosTransformer:
  """Quantizes a loaded DiT with Qwix PTQ (the input is left untouched).

  Args:
    transformer: a `HeliosTransformer` (`load_transformer` / `init_transformer`; bf16 for the
      intended use; abstract `ShapeDtypeStruct` params are accepted).
    mode: "fp8" (e4m3 weights and activations, per-channel weight / per-token activation
      scales) or "int8w" (int8 weights, bf16 activations).
    keep_bf16: module-path regexes (full match on e.g. "blocks/ffn/proj_in", "proj_out")
      whose matmuls stay in the model dtype; `DEFAULT_KEEP` by default, () quantizes every
      `Linear`.

  Returns:
    A new `HeliosTransformer` with the same config; `params` hold `WithAux(QArray)` kernels.

  Raises:
    ValueError: unknown mode, a keep pattern that matches no `Linear`, or an already
      quantized model.
    RuntimeError: fp8 on a platform that cannot run fp8 dots.
  """
  check_mode(mode)
  keep = tuple(keep_bf16)
  for p in keep:
    re.compile(p)
  model = transformer.module()
  if hasattr(type(model), "_unquantized_type"):
    raise ValueError("the transformer is already quantized")
  paths = linear_paths(model)
  unused = [p for p in keep if not any(re.fullmatch(p, path) for path, _ in paths)]
  if unused:
    raise ValueError(f"keep_bf16 pattern(s) {unused} match no Linear; known paths: "
                     f"{[path for path, _ in paths]}")
  weight_qtype, act_qtype = MODES[mode]
  quantized = [path for path, _ in paths if not _matches(path, keep)]
  rules = [qwix.QuantizationRule(module_path=re.escape(path), op_names=("dot_general",),
                                 weight_qtype=weight_qtype, act_qtype=act_qtype)
           for path in quantized]
  provider = qwix.PtqProvider(rules)
  # Intercepts `forward_channels_last` and sets each module's `qwix_path`; no forward is run.
  qmodel = qwix.quantize_model(model, provider, methods=(CALL_METHOD,), skip_nnx_init=True)
  how = _kernel_how(weight_qtype)
  for path, lin in linear_paths(qmodel):
    if path not in quantized:
      continue
    param = lin.kernel
    stacked = path.startswith("blocks/")
    q = _quantize_value(param[...] if not isinstance(param.value, jax.ShapeDtypeStruct)
                        else param.value, how, stacked)
    boxed = jax.tree.map(lambda v, p=param: qwix_flax_util.update_boxed(p, value=v), q)
    lin.kernel = qwix_ptq.WithAux(boxed, how)
  out = transformer_lib.HeliosTransformer(transformer.config, qmodel)
  out.quantize_mode = mode
  out.quantized_paths = tuple(quantized)
  return out


def kernel_dtypes(transformer: transformer_lib.HeliosTransformer) -> dict[str, str]:
  """'/'-joined path -> storage dtype of each `Linear` kernel (quantized: the qvalue dtype)."""
  out = {}
  for path, lin in linear_paths(transformer.module()):
    k = lin.kernel
    if isinstance(k, qwix_ptq.WithAux):
      out[path] = str(jnp.dtype(qwix_flax_util.unbox(k.array).qvalue.dtype))
    else:
      out[path] = str(jnp.dtype(k.value.dtype if hasattr(k, "value") else k.dtype))
  return out


def param_bytes(params) -> int:
  """Bytes of a params pytree (arrays or ShapeDtypeStructs; QArray leaves count qvalue+scale)."""
  return int(sum(l.size * jnp.dtype(l.dtype).itemsize for l in jax.tree.leaves(params)))
