"""LoRA adapters and partial-parameter files from the PyTorch ecosystem, fused into the DiT.

Formats read (what diffusers' `HeliosPipeline.load_lora_weights` reads, plus the official
training's partial file):

  * diffusers / PEFT LoRA safetensors (`pytorch_lora_weights.safetensors`): keys
    `transformer.<module>.lora_A.weight` `[r, in(, *k)]` and `.lora_B.weight` `[out, r(, 1..)]`,
    optional `.lora_B.bias` (PEFT `lora_bias`). The LoRA scale comes from the adapter metadata
    that `save_lora_weights(..., transformer_lora_adapter_metadata=...)` stores in the header
    (`lora_adapter_metadata`: PEFT `LoraConfig` fields `r`, `lora_alpha`, `rank_pattern`,
    `alpha_pattern`, `use_rslora`); without metadata it is 1 (diffusers: alpha = rank).
    Un-prefixed PEFT keys (`<module>.lora_A.weight`) and `lora_down` / `lora_up` names are
    accepted too.
  * original Wan names (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`, optional `.alpha`,
    `.diff_b` bias deltas) and musubi/kohya names (`lora_unet_blocks_0_self_attn_q.lora_down
    .weight`, `.alpha`): the two non-diffusers layouts the diffusers Helios loader converts;
    scale alpha / r where an `.alpha` is stored, else 1.
  * a partial-parameter file (`transformer_partial.pth`, `torch.load(weights_only=True)`, or
    `.safetensors`): fully trained tensors (the memory stems, `history_key_scale`, ...) in
    diffusers names that *replace* the base tensors, as `load_extra_components` of the official
    `tools/merge_lora_for_helios.py` does. PEFT-wrapped names (`patch_short.base_layer.weight`)
    are unwrapped; LoRA factors saved in it (they duplicate the LoRA file) and the critic-only
    GAN heads are skipped.

Fusion: for every adapted kernel `W += s * scaling * B @ A` (Linear; Conv3d stems: A a
kernel-sized conv, B a 1x1x1 conv, so `B @ A` on the flattened kernel), in fp32 on the
parameters' device, rounded once to the parameter dtype; several adapters on one kernel are
summed in one rank-concatenated product. Partial files are applied before the LoRA deltas
(the official merge loads the LoRA, replaces the partial tensors, then fuses). Torch names
reach Flax paths through the transformer's `key_map` (passed in by `load_transformer`), blocks
land in their layer slice of the stacked leaves.

Entries (`load_transformer(path, lora=[(path, scale), ...])`, CLI `--lora PATH[:SCALE]`):
a LoRA `.safetensors` file, a partial file, or a folder holding
`pytorch_lora_weights.safetensors` and/or `transformer_partial.{pth,safetensors}` (an official
`checkpoint-N/model_ema/` folder, or our `training.lora_export` output).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from helios_jax import checkpoint
from helios_jax.checkpoint import CheckpointError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PARTIAL_PTH_NAME = "transformer_partial.pth"
PARTIAL_SAFETENSORS_NAME = "transformer_partial.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry
PREFIX = "transformer."

# Partial-file entries that have no counterpart in the inference transformer (the official
# loader only loads them into a model that has them: the Stage 3 critic's GAN heads).
PARTIAL_SKIPPED_PREFIXES = ("gan_heads.", "gan_final_head.")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)"
                       r"\.(?P<leaf>weight|bias)$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
_DIFF_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>diff|diff_b)$")
_DOWN = ("lora_A", "lora_down")

# Original Wan module names -> diffusers names (what diffusers' Wan/Helios converter maps).
_WAN_NAMES = (
    (re.compile(r"^blocks\.(\d+)\.self_attn\.(q|k|v|o)$"), "blocks.{0}.attn1.{1}"),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.(q|k|v|o)$"), "blocks.{0}.attn2.{1}"),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.(k_img|v_img)$"), "blocks.{0}.attn2.{1}"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.(0|2)$"), "blocks.{0}.ffn.{1}"),
    (re.compile(r"^time_projection\.1$"), "condition_embedder.time_proj"),
    (re.compile(r"^head\.head$"), "proj_out"),
    (re.compile(r"^(text|time)_embedding\.(0|2)$"), "condition_embedder.{0}_embedder.{1}"),
    (re.compile(r"^img_emb\.proj\.(1|3)$"), "condition_embedder.image_embedder.{0}"),
)
_WAN_LEAVES = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj",
               "v_img": "add_v_proj"}
_WAN_FFN = {"0": "net.0.proj", "2": "net.2"}
_WAN_EMB = {"0": "linear_1", "2": "linear_2", "1": "ff.net.0.proj", "3": "ff.net.2"}
_MUSUBI_NAME = re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img)$|"
                          r"^blocks_(\d+)_ffn_(0|2)$")

log = logging.getLogger(__name__)


class LoraError(CheckpointError):
  """A LoRA / partial file that does not fit the model (names the bad key or value)."""


# ------------------------------------------------------------------------------------------
# Entries.


def parse_lora_arg(text: str) -> tuple[str, float]:
  """`PATH[:SCALE]` (the CLI's `--lora`) -> (path, scale); the scale defaults to 1.

  The suffix after the last ':' is a scale only when the path part is non-empty and the suffix
  holds no path separator (so `C:/x` and `dir:with:colons/file` stay paths).

  Raises:
    ValueError: empty path, or a suffix that is not a finite number.
  """
  text = str(text)
  path, sep, tail = text.rpartition(":")
  if not sep or not path or "/" in tail or os.sep in tail:
    path, tail = text, None
  if not path:
    raise ValueError(f"--lora {text!r}: empty path")
  if tail is None:
    return path, 1.0
  try:
    scale = float(tail)
  except ValueError:
    raise ValueError(f"--lora {text!r}: scale {tail!r} is not a number "
                     "(use PATH or PATH:SCALE, e.g. my_lora.safetensors:0.8)") from None
  if not math.isfinite(scale):
    raise ValueError(f"--lora {text!r}: scale {tail!r} is not finite")
  return path, scale


def normalize_entries(lora: Any) -> list[tuple[str, float]]:
  """`[(path, scale) | path, ...]` (or one of them) -> [(path, float scale)].

  Raises:
    ValueError: a scale that is not a finite number, or a malformed entry.
  """
  if lora is None:
    return []
  if isinstance(lora, (str, os.PathLike)) or (
      isinstance(lora, tuple) and len(lora) == 2 and isinstance(lora[0], (str, os.PathLike))
      and not isinstance(lora[1], (str, os.PathLike))):
    lora = [lora]
  out = []
  for entry in lora:
    if isinstance(entry, (str, os.PathLike)):
      path, scale = entry, 1.0
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
      path, scale = entry
    else:
      raise ValueError(f"lora entry {entry!r} must be a path or a (path, scale) pair")
    try:
      value = float(scale)
    except (TypeError, ValueError):
      raise ValueError(f"lora entry {os.fspath(path)!r}: scale {scale!r} is not a number") from None
    if isinstance(scale, bool) or not math.isfinite(value):
      raise ValueError(f"lora entry {os.fspath(path)!r}: scale {scale!r} is not a finite number")
    out.append((os.fspath(path), value))
  return out


def resolve_entry(path: str) -> tuple[str | None, str | None]:
  """(LoRA safetensors file | None, partial file | None) of one entry path.

  A folder gives its `pytorch_lora_weights.safetensors` and `transformer_partial.pth` (or
  `.safetensors`); a `.pth` file is a partial file; a `.safetensors` file is a LoRA when any
  key looks like one (`lora_A`/`lora_down`/`.alpha`/`lora_unet_`/`.diff_b`), else a partial.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    lora = os.path.join(path, LORA_WEIGHTS_NAME)
    partials = [os.path.join(path, n) for n in (PARTIAL_PTH_NAME, PARTIAL_SAFETENSORS_NAME)
                if os.path.isfile(os.path.join(path, n))]
    if len(partials) > 1:
      raise LoraError(f"{path}: both {PARTIAL_PTH_NAME} and {PARTIAL_SAFETENSORS_NAME}; keep one")
    lora = lora if os.path.isfile(lora) else None
    if lora is None and not partials:
      raise LoraError(f"{path}: no {LORA_WEIGHTS_NAME} or transformer_partial.{{pth,safetensors}}")
    return lora, (partials[0] if partials else None)
  if not os.path.isfile(path):
    raise LoraError(f"LoRA file not found: {path}")
  if path.endswith((".pth", ".pt", ".bin")):
    return None, path
  if not path.endswith(".safetensors"):
    raise LoraError(f"{path}: expected a .safetensors LoRA, a .pth partial file or a folder")
  keys = checkpoint._SafetensorsFile(path).keys()  # pylint: disable=protected-access
  is_lora = any(_LORA_KEY.match(k) or _ALPHA_KEY.match(k) or k.startswith("lora_unet_")
                or k.endswith(".diff_b") for k in keys)
  return (path, None) if is_lora else (None, path)


def check_entries(lora: Any) -> list[tuple[str | None, str | None, float]]:
  """Validates entries without reading tensors: [(LoRA file, partial file, scale)].

  Raises:
    ValueError: a malformed entry or scale.
    LoraError: a missing file, or a scale given to a partial-only entry.
  """
  out = []
  for path, scale in normalize_entries(lora):
    lora_file, partial_file = resolve_entry(path)
    if lora_file is None and scale != 1.0:
      raise LoraError(f"{path}: a partial-parameter file replaces tensors; scale {scale:g} has "
                      "no meaning for it (pass it without a scale)")
    out.append((lora_file, partial_file, scale))
  return out


# ------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class LoraModule:
  """One adapted module in diffusers naming, torch layouts.

  Attributes:
    name: diffusers module name, e.g. "blocks.0.attn1.to_q".
    down: lora_A weight `[r, in, *k]` (fp32).
    up: lora_B weight `[out, r, *1]` (fp32), or None for a pure bias / dense delta.
    scaling: the file's scale of `B @ A` (an `.alpha` tensor's alpha / r times the metadata's
      PEFT scale), multiplied by the user scale later.
    up_bias: lora_B bias `[out]` (fp32) or None.
    peft_scaling: the scale of `up_bias` and `dense`: PEFT scales the lora_B output, bias
      included, by the metadata's alpha / r; an `.alpha` tensor scales only the factors
      (diffusers folds it into A and B when converting Wan / musubi files).
    dense: a full weight delta in the torch layout (Wan `head.head.diff`) or None.
    source: the file key that names this module in errors.
  """

  name: str
  down: np.ndarray | None
  up: np.ndarray | None
  scaling: float
  up_bias: np.ndarray | None = None
  peft_scaling: float = 1.0
  dense: np.ndarray | None = None
  source: str = ""

  @property
  def rank(self) -> int:
    return 0 if self.down is None else int(self.down.shape[0])


def read_metadata(path: str) -> dict[str, Any] | None:
  """The transformer's PEFT `LoraConfig` fields from a diffusers LoRA header, or None."""
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise LoraError(f"{path}: unreadable safetensors header ({e})") from e
  raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
  if not raw:
    return None
  try:
    meta = json.loads(raw)
  except json.JSONDecodeError as e:
    raise LoraError(f"{path}: corrupt {METADATA_KEY} ({e})") from e
  if any(k.startswith(PREFIX) for k in meta):
    meta = {k[len(PREFIX):]: v for k, v in meta.items() if k.startswith(PREFIX)}
  return meta or None


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's `rank_pattern` / `alpha_pattern` lookup (`get_pattern_key` semantics)."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def _wan_name(name: str) -> str:
  for pattern, template in _WAN_NAMES:
    m = pattern.match(name)
    if not m:
      continue
    g = list(m.groups())
    if template.startswith("blocks.{0}.attn"):
      g[1] = _WAN_LEAVES[g[1]]
    elif template.startswith("blocks.{0}.ffn"):
      g[1] = _WAN_FFN[g[1]]
    elif "embedder" in template:
      g[-1] = _WAN_EMB[g[-1]]
    return template.format(*g)
  return name  # left as is: reported as unmatched by the fuse step


def _musubi_name(name: str) -> str:
  m = _MUSUBI_NAME.match(name)
  if not m:
    return name
  if m.group(1) is not None:
    return _wan_name(f"blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}")
  return _wan_name(f"blocks.{m.group(4)}.ffn.{m.group(5)}")


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  f = checkpoint._SafetensorsFile(path)  # pylint: disable=protected-access
  return {k: f.get(k) for k in f.keys()}


def read_lora(path: str) -> dict[str, LoraModule]:
  """Reads one LoRA safetensors file -> {diffusers module name: LoraModule}.

  Raises:
    LoraError: DoRA, a factor without its partner, or a rank that disagrees with the metadata
      or between lora_A and lora_B (each names the tensor).
  """
  raw = _read_tensors(path)
  fmt = "diffusers"
  if any(k.startswith("diffusion_model.") for k in raw):
    fmt = "wan"
    raw = {k[len("diffusion_model."):]: v for k, v in raw.items()
           if k.startswith("diffusion_model.")}
  elif any(k.startswith("lora_unet_") for k in raw):
    fmt = "musubi"
    raw = {k[len("lora_unet_"):]: v for k, v in raw.items() if k.startswith("lora_unet_")}
  elif any(k.startswith(PREFIX) for k in raw):
    others = [k for k in raw if not k.startswith(PREFIX)]
    if others:
      raise LoraError(f"{path}: key {others[0]!r} is not a transformer LoRA key (Helios LoRAs "
                      f"adapt only the transformer: keys start with {PREFIX!r})")
    raw = {k[len(PREFIX):]: v for k, v in raw.items()}
  elif any(k.startswith("base_model.model.") for k in raw):  # PEFT's own adapter files
    raw = {k.removeprefix("base_model.model."): v for k, v in raw.items()}
  raw = {k: v for k, v in raw.items() if "dora_scale" not in k}
  if any("lora_magnitude_vector" in k for k in raw):
    key = next(k for k in raw if "lora_magnitude_vector" in k)
    raise LoraError(f"{path}: DoRA adapters are not supported (key {key!r})")
  meta = read_metadata(path)
  if meta and meta.get("use_dora"):
    raise LoraError(f"{path}: DoRA adapters (use_dora=true) are not supported")

  groups: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  for key, value in raw.items():
    m = _LORA_KEY.match(key)
    if m:
      kind = "down" if m.group("kind") in _DOWN else "up"
      slot = kind if m.group("leaf") == "weight" else f"{kind}_bias"
      module = m.group("module")
    elif _ALPHA_KEY.match(key):
      module, slot = _ALPHA_KEY.match(key).group("module"), "alpha"
    elif fmt == "wan" and _DIFF_KEY.match(key):
      m = _DIFF_KEY.match(key)
      module, slot = m.group("module"), m.group("kind")
    else:
      raise LoraError(f"{path}: key {key!r} is not a LoRA tensor (expected "
                      "<module>.lora_A.weight / .lora_B.weight / .alpha)")
    if slot == "down_bias":
      raise LoraError(f"{path}: {key!r}: a lora_A bias is not a LoRA layout diffusers loads")
    if fmt == "musubi":
      module = _musubi_name(module)
    elif fmt == "wan":
      module = _wan_name(module)
    if slot in groups.setdefault(module, {}):
      raise LoraError(f"{path}: {key!r} and {groups[module][slot][0]!r} name the same tensor")
    groups[module][slot] = (key, np.asarray(value, np.float32))

  meta = meta or {}
  out = {}
  for name, g in groups.items():
    if fmt == "wan":
      if "norm" in name and set(g) <= {"diff", "diff_b", "alpha"}:
        continue  # diffusers drops norm diffs (zeros in the files it knows)
      if name == "condition_embedder.time_proj" and "down" not in g and "up" not in g:
        continue  # bias-only time projection diffs: diffusers drops them too
      if "diff" in g and name != "proj_out":
        log.warning("%s: ignoring the full-weight diff %r (diffusers ignores it too)", path,
                    g["diff"][0])
        del g["diff"]
      if "diff_b" in g:
        g["up_bias"] = g.pop("diff_b")
    source = next(iter(g.values()))[0]
    down = g.get("down", (None, None))[1]
    up = g.get("up", (None, None))[1]
    if (down is None) != (up is None):
      have, miss = ("lora_A", "lora_B") if up is None else ("lora_B", "lora_A")
      raise LoraError(f"{path}: {source!r} has {have} but no {miss} for module {name!r}")
    scaling = peft_scaling = 1.0
    if down is not None:
      if down.ndim < 2 or up.ndim < 2:
        raise LoraError(f"{path}: {g['down'][0]!r} {down.shape} / {g['up'][0]!r} {up.shape}: "
                        "LoRA factors must be at least 2-D")
      r = down.shape[0]
      if up.shape[1] != r or any(s != 1 for s in up.shape[2:]):
        raise LoraError(f"{path}: rank mismatch: {g['down'][0]!r} {down.shape} has rank {r} but "
                        f"{g['up'][0]!r} is {up.shape} (expected [out, {r}, 1...])")
      if "alpha" in g:
        scaling = float(np.asarray(g["alpha"][1]).reshape(())) / r
      if meta:
        mr = int(_pattern_value(meta.get("rank_pattern"), name, meta.get("r", 8)))
        ma = float(_pattern_value(meta.get("alpha_pattern"), name, meta.get("lora_alpha", 8)))
        if mr != r:
          raise LoraError(f"{path}: {g['down'][0]!r} has rank {r} but the adapter metadata "
                          f"says r={mr} for {name!r}")
        peft_scaling = ma / (math.sqrt(mr) if meta.get("use_rslora") else mr)
        scaling *= peft_scaling
    dense = None
    if "diff" in g:  # Wan head.head.diff: diffusers loads it as lora_A with an identity lora_B
      dense = g["diff"][1]
    out[name] = LoraModule(name=name, down=down, up=up, scaling=scaling,
                           up_bias=g.get("up_bias", (None, None))[1],
                           peft_scaling=peft_scaling, dense=dense,
                           source=source)
  if not out:
    raise LoraError(f"{path}: no LoRA tensors found")
  return out


def read_partial(path: str) -> dict[str, np.ndarray]:
  """A partial-parameter file -> {diffusers name: fp32 array} (`.pth` needs torch).

  `transformer.` prefixes and PEFT's `.base_layer` are removed; LoRA factors and the GAN
  heads (see module docstring) are dropped.
  """
  if path.endswith(".safetensors"):
    raw = _read_tensors(path)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise LoraError(f"{path}: reading a .pth partial file needs torch (pip install torch), "
                      "or convert it to .safetensors") from e
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except  (pickle / zip errors vary)
      raise LoraError(f"{path}: unreadable partial file ({type(e).__name__}: {e})") from e
    if not isinstance(sd, Mapping):
      raise LoraError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    raw = {}
    for k, v in sd.items():
      if not isinstance(v, torch.Tensor):
        raise LoraError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
      raw[str(k)] = v.detach().to(torch.float32).cpu().numpy()
  out = {}
  for key, value in raw.items():
    name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
    if ".lora_A." in name or ".lora_B." in name or name.startswith(PARTIAL_SKIPPED_PREFIXES):
      continue
    out[name] = np.asarray(value, np.float32)
  if not out:
    raise LoraError(f"{path}: no transformer tensors in the partial file")
  return out


# ------------------------------------------------------------------------------------------
# Names.


def torch_key(path: Sequence[str], layer: int | None, key_map: checkpoint.KeyMap) -> str:
  """Inverse of the transformer's `key_map`: (Flax leaf path, layer) -> diffusers key.

  Args:
    path: Flax leaf path, e.g. ("blocks", "attn1", "to_out", "kernel").
    layer: block index for stacked leaves (`blocks/...`), else None.
    key_map: the transformer's torch -> Flax map (`TRANSFORMER_SPEC.key_map(config)`), which
      must give (path, layer) back.

  Raises:
    CheckpointError: when the forward map does not give (path, layer) back.
  """
  stacked = path[0] == "blocks"
  name = checkpoint.INVERSE_KEY_MAPS["transformer"].torch_key(tuple(path),
                                                              layer if stacked else None)
  if key_map(name) != (tuple(path), layer if stacked else None):
    raise CheckpointError(f"no diffusers name for {'/'.join(path)}[{layer}] (tried {name!r})")
  return name


def _target(name: str, leaf: str, flat: Mapping[tuple[str, ...], Any],
            key_map: checkpoint.KeyMap, source: str,
            path: str) -> tuple[tuple[str, ...], int | None]:
  """diffusers `<module>.<leaf>` -> (Flax path, layer); errors name `source`."""
  mapped = key_map(f"{name}.{leaf}")
  fpath = None if mapped is None else mapped[0]
  if mapped is None or fpath not in flat:
    raise LoraError(f"{path}: key {source!r} matches no parameter of the Helios transformer "
                    f"(module {name!r}); is it a LoRA for another model?")
  layer = mapped[1]
  if layer is not None and layer >= flat[fpath].shape[0]:
    raise LoraError(f"{path}: key {source!r} is for block {layer} but the model has "
                    f"{flat[fpath].shape[0]} blocks")
  return fpath, layer


# ------------------------------------------------------------------------------------------
# Fusing.


def _fuse_fn():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def one(kernel, a, b):
    d = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + d.reshape(kernel.shape)).astype(kernel.dtype)

  @jax.jit
  def fuse(kernel, a, b):
    if a.ndim == 3:  # stacked: one layer at a time (bounded fp32 temporaries)
      return jax.lax.map(lambda t: one(*t), (kernel, a, b))
    return one(kernel, a, b)

  return fuse


def _flax_factors(mod: LoraModule, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """(A `[fan_in, r]` with the scale folded in, B `[r, out]`) on the flattened Flax kernel."""
  r = mod.rank
  down = mod.down.reshape((r, mod.down.shape[1], -1))  # [r, in, prod(k)]
  a = np.transpose(down, (2, 1, 0)).reshape(-1, r)       # rows ordered (*k, in) like Flax
  b = mod.up.reshape(mod.up.shape[0], r).T
  return (scale * mod.scaling * a).astype(np.float32), b.astype(np.float32)


def fuse(params: Mapping[str, Any], key_map: checkpoint.KeyMap, lora: Any) -> dict[str, Any]:
  """Parameters with the entries' partial tensors replaced and LoRA deltas added.

  Args:
    params: nested dict of the transformer's parameters (arrays; blocks stacked `[L, ...]`).
    key_map: the transformer's torch -> Flax key map (`TRANSFORMER_SPEC.key_map(config)`).
    lora: `[(path, scale), ...]` (see `normalize_entries` / `resolve_entry`).

  Returns:
    A new nested dict (same structure and dtypes); untouched leaves are shared.

  Raises:
    LoraError: unmatched keys, shape / rank mismatches, a scale on a partial-only entry.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  flat = dict(checkpoint.flatten_tree(params))
  loras, partials = [], []
  for lora_file, partial_file, scale in check_entries(lora):
    if partial_file is not None:
      partials.append(partial_file)
    if lora_file is not None:
      loras.append((lora_file, scale, read_lora(lora_file)))

  # 1. Partial files: replace tensors (torch layout -> Flax leaf layout).
  for pfile in partials:
    for name, value in read_partial(pfile).items():
      module, _, leaf = name.rpartition(".")
      fpath, layer = _target(module, leaf, flat, key_map, name, pfile)
      target = flat[fpath]
      shape = target.shape[1:] if layer is not None else target.shape
      try:
        x = checkpoint.torch_to_flax(value, fpath[-1], shape)
      except CheckpointError as e:
        raise LoraError(f"{pfile}: tensor {name!r} {value.shape} does not fit "
                        f"{'/'.join(fpath)} {tuple(shape)}: {e}") from None
      x = jnp.asarray(x, target.dtype)
      flat[fpath] = x if layer is None else jnp.asarray(target).at[layer].set(x)

  # 2. LoRA deltas, grouped per leaf: {path: [(layer, a, b)]}.
  terms: dict[tuple[str, ...], list[tuple[int | None, np.ndarray, np.ndarray]]] = {}
  additive: dict[tuple[str, ...], list[tuple[int | None, np.ndarray]]] = {}
  for lfile, scale, modules in loras:
    for name, mod in modules.items():
      fpath, layer = _target(name, "weight", flat, key_map, mod.source, lfile)
      if fpath[-1] != "kernel":
        raise LoraError(f"{lfile}: key {mod.source!r}: {name!r} is not a Linear/Conv weight "
                        f"({'/'.join(fpath)}); LoRA adapts only kernels")
      kshape = tuple(flat[fpath].shape[1:] if layer is not None else flat[fpath].shape)
      want = (kshape[-1], kshape[-2]) + kshape[:-2]  # the torch weight shape [out, in, *k]
      if mod.down is not None:
        got = (mod.up.shape[0],) + tuple(mod.down.shape[1:])
        if got != want:
          raise LoraError(f"{lfile}: shape mismatch: {mod.source!r} (lora_A {mod.down.shape}, "
                          f"lora_B {mod.up.shape}) gives a {got} delta but {name}.weight is "
                          f"{want}")
        terms.setdefault(fpath, []).append((layer, *_flax_factors(mod, scale)))
      if mod.dense is not None:
        if tuple(mod.dense.shape) != want:
          raise LoraError(f"{lfile}: shape mismatch: {name}.diff is {mod.dense.shape}, "
                          f"{name}.weight is {want}")
        delta = checkpoint.torch_to_flax(mod.dense, "kernel", kshape)
        additive.setdefault(fpath, []).append((layer, scale * mod.peft_scaling * delta))
      if mod.up_bias is not None:
        bpath, blayer = _target(name, "bias", flat, key_map, mod.source, lfile)
        bshape = tuple(flat[bpath].shape[1:] if blayer is not None else flat[bpath].shape)
        if tuple(mod.up_bias.shape) != bshape:
          raise LoraError(f"{lfile}: shape mismatch: lora_B bias of {name!r} is "
                          f"{mod.up_bias.shape}, {name}.bias is {bshape}")
        additive.setdefault(bpath, []).append((blayer, scale * mod.peft_scaling * mod.up_bias))

  fuse_fn = _fuse_fn() if terms else None
  for fpath, items in terms.items():
    kernel = flat[fpath]
    if items[0][0] is None:  # unstacked: concatenate the ranks of every adapter
      a = np.concatenate([t[1] for t in items], axis=1)
      b = np.concatenate([t[2] for t in items], axis=0)
    else:
      n_layers = kernel.shape[0]
      per_layer: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
      for layer, a_, b_ in items:
        per_layer.setdefault(layer, []).append((a_, b_))
      rank = max(sum(x[0].shape[1] for x in v) for v in per_layer.values())
      fan_in, fan_out = items[0][1].shape[0], items[0][2].shape[1]
      a = np.zeros((n_layers, fan_in, rank), np.float32)
      b = np.zeros((n_layers, rank, fan_out), np.float32)
      for layer, v in per_layer.items():
        off = 0
        for a_, b_ in v:
          a[layer, :, off:off + a_.shape[1]] = a_
          b[layer, off:off + a_.shape[1]] = b_
          off += a_.shape[1]
    flat[fpath] = fuse_fn(jnp.asarray(kernel), a, b)
  for fpath, items in additive.items():
    leaf = flat[fpath]
    total = np.asarray(leaf, np.float32).copy()
    for layer, delta in items:
      if layer is None:
        total += delta
      else:
        total[layer] += delta
    flat[fpath] = jnp.asarray(total, leaf.dtype)
  return checkpoint.unflatten_tree(flat)


def fuse_into_module(model: Any, key_map: checkpoint.KeyMap, lora: Any) -> None:
  """`fuse` applied in place to an NNX module's parameters."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  state = nnx.state(model)
  new = fuse(nnx.to_pure_dict(state), key_map, lora)
  nnx.replace_by_pure_dict(state, new)
  nnx.update(model, state)
