"""Model configurations: frozen dataclasses that mirror the checkpoint `config.json` files.

Every config here is a frozen dataclass whose fields are exactly the keys of the matching
PyTorch `config.json` (diffusers or transformers), so a released checkpoint loads 1:1 and an
unknown key is an error that names it. Keys that start with `_` (`_class_name`,
`_diffusers_version`, `_name_or_path`) are bookkeeping and are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Mapping


class ConfigError(ValueError):
  """A config file or dict is malformed: unknown key, bad value, missing file."""


def _freeze(value: Any) -> Any:
  """JSON lists become tuples (configs are hashable: they are static jit arguments)."""
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


class JsonConfig:
  """Mixin for frozen dataclass configs loaded from a checkpoint's JSON file.

  Subclasses may set `IGNORED_KEYS`: keys that a library writes into every config file but that
  do not describe the model (e.g. transformers' `architectures`); they are accepted and dropped.
  """

  IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset()
  CONFIG_NAME: ClassVar[str] = "config.json"
  # Named configs of a subclass (e.g. "tiny"), set once its module defines them.
  PRESETS: ClassVar[Mapping[str, Any]] = {}

  @classmethod
  def from_preset(cls, name: str):
    """The named config; an unknown name raises `ConfigError` listing the known ones."""
    if name not in cls.PRESETS:
      raise ConfigError(f"unknown preset {name!r} of {cls.__name__}; known: "
                        f"{sorted(cls.PRESETS)}")
    return cls.PRESETS[name]

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>"):
    """Builds the config from a dict; unknown keys raise `ConfigError` naming them."""
    if not isinstance(d, Mapping):
      raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    names = set(cls.field_names())
    unknown = sorted(k for k in d if k not in names and not k.startswith("_")
                     and k not in cls.IGNORED_KEYS)
    if unknown:
      raise ConfigError(
          f"{source}: unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _freeze(v) for k, v in d.items() if k in names}
    try:
      return cls(**kwargs)  # type: ignore[call-arg]
    except TypeError as e:  # a required field is missing
      raise ConfigError(f"{source}: {e}") from e

  @classmethod
  def read_json(cls, path: str | os.PathLike) -> tuple[Any, str]:
    """(parsed JSON, file path) of `path` (a JSON file, or a folder holding `CONFIG_NAME`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, cls.CONFIG_NAME)
    if not os.path.isfile(path):
      raise ConfigError(f"config file not found: {path}")
    try:
      with open(path) as f:
        return json.load(f), path
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from e

  @classmethod
  def from_json(cls, path: str | os.PathLike):
    """Reads `path` (a JSON file, or a folder holding `CONFIG_NAME`)."""
    d, path = cls.read_json(path)
    return cls.from_dict(d, source=path)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)  # type: ignore[call-overload]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  def to_json(self, path: str | os.PathLike, **extra: Any) -> None:
    with open(path, "w") as f:
      json.dump({**extra, **self.to_dict()}, f, indent=2, sort_keys=True)

  def replace(self, **changes: Any):
    return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class HeliosTransformerConfig(JsonConfig):
  """`HeliosTransformer3DModel` hyper-parameters; field names are the diffusers config keys.

  Defaults are the diffusers class defaults, which are the released 14B values
  (spec architecture.md §1).
  """

  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int | None = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str | None = "rms_norm_across_heads"  # ignored by the reference: always RMSNorm
  eps: float = 1e-6
  added_kv_proj_dim: int | None = None  # creates add_k/add_v params that the forward never uses
  rope_dim: tuple[int, int, int] = (44, 42, 42)
  rope_theta: float = 10000.0
  guidance_cross_attn: bool = True
  zero_history_timestep: bool = True
  has_multi_term_memory_patch: bool = True
  is_amplify_history: bool = False
  history_scale_mode: str = "per_head"

  def __post_init__(self):
    if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
      raise ConfigError(f"patch_size must be 3 positive ints, got {self.patch_size}")
    if len(self.rope_dim) != 3 or any(d % 2 for d in self.rope_dim):
      raise ConfigError(f"rope_dim must be 3 even ints, got {self.rope_dim}")
    if sum(self.rope_dim) != self.attention_head_dim:
      raise ConfigError(
          f"sum(rope_dim)={sum(self.rope_dim)} must equal attention_head_dim="
          f"{self.attention_head_dim}")
    if self.freq_dim % 2:
      raise ConfigError(f"freq_dim must be even, got {self.freq_dim}")
    if self.history_scale_mode not in ("scalar", "per_head"):
      raise ConfigError(
          f"history_scale_mode must be 'scalar' or 'per_head', got {self.history_scale_mode!r}")
    for name in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim",
                 "ffn_dim", "num_layers"):
      if int(getattr(self, name)) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def out_dim(self) -> int:
    return self.out_channels or self.in_channels


TRANSFORMER_PRESETS: dict[str, HeliosTransformerConfig] = {
    # The released Helios-Base / -Mid / -Distilled transformer (14,312,427,584 parameters).
    "helios-14b": HeliosTransformerConfig(),
    # A CPU-sized model with every structural flag of the 14B model: the DiT of the tiny set
    # (`helios_jax.variants.SIZES["tiny"]`; in_channels = the tiny VAE's z_dim, text_dim = the
    # tiny umT5's d_model).
    "tiny": HeliosTransformerConfig(
        num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=96,
        num_layers=2, rope_dim=(12, 10, 10)),
}
HeliosTransformerConfig.PRESETS = TRANSFORMER_PRESETS
