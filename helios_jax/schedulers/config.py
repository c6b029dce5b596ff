"""Scheduler configs (`scheduler/scheduler_config.json`) and pipeline flags (`model_index.json`)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Mapping

from helios_jax.config import ConfigError, JsonConfig

_SHIFT_TYPES = ("exponential", "linear")
_SCHEDULER_TYPES = ("euler", "unipc", "dmd")
# diffusers' HeliosScheduler silently maps these legacy UniPC solver types to "bh2".
_BH2_ALIASES = ("midpoint", "heun", "logrho")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(JsonConfig):
  """Keys shared by diffusers' `HeliosScheduler` and `HeliosDMDScheduler` configs.

  Do not instantiate directly: `SchedulerConfig.from_json` / `from_dict` dispatch on the
  file's `_class_name` to `HeliosSchedulerConfig` or `HeliosDMDSchedulerConfig`, whose fields
  are exactly the `__init__` arguments (= JSON keys) of the matching diffusers 0.42.1 class.
  """

  CONFIG_NAME: ClassVar[str] = "scheduler_config.json"
  CLASS_NAME: ClassVar[str] = ""

  num_train_timesteps: int = 1000
  shift: float = 1.0
  stages: int = 3
  stage_range: tuple[float, ...] = (0, 1 / 3, 2 / 3, 1)
  gamma: float = 1 / 3
  prediction_type: str = "flow_prediction"
  use_flow_sigmas: bool = True
  use_dynamic_shifting: bool = False
  time_shift_type: str = "exponential"

  def __post_init__(self):
    if type(self) is SchedulerConfig:  # pylint: disable=unidiomatic-typecheck
      raise ConfigError("SchedulerConfig is abstract; use HeliosSchedulerConfig or "
                        "HeliosDMDSchedulerConfig (or SchedulerConfig.from_json)")
    if int(self.num_train_timesteps) < 2:
      raise ConfigError(f"num_train_timesteps={self.num_train_timesteps} must be >= 2")
    if int(self.stages) < 1:
      raise ConfigError(f"stages={self.stages} must be >= 1")
    if len(self.stage_range) < int(self.stages) + 1:  # extra entries are unused
      raise ConfigError(f"stage_range={list(self.stage_range)} needs at least stages + 1 = "
                        f"{int(self.stages) + 1} entries")
    r = [float(v) for v in self.stage_range]
    if r[0] < 0 or r[-1] > 1 or any(b <= a for a, b in zip(r, r[1:])):
      raise ConfigError(f"stage_range={list(self.stage_range)} must increase within [0, 1]")
    if not 0 < float(self.gamma) < 1:
      raise ConfigError(f"gamma={self.gamma} must lie in (0, 1)")
    if float(self.shift) <= 0:
      raise ConfigError(f"shift={self.shift} must be > 0")
    if self.time_shift_type not in _SHIFT_TYPES:
      raise ConfigError(f"time_shift_type={self.time_shift_type!r} must be one of {_SHIFT_TYPES}")
    if self.prediction_type != "flow_prediction":
      raise ConfigError(f"prediction_type={self.prediction_type!r} is not supported; Helios "
                        "schedulers here implement 'flow_prediction' only")
    if self.use_dynamic_shifting and float(self.shift) != 1.0:
      raise ConfigError(f"use_dynamic_shifting=True requires shift=1.0, got shift={self.shift} "
                        "(the reference asserts this in set_timesteps)")

  @property
  def is_dmd(self) -> bool:
    """Whether the sampler takes DMD x0 / re-noise steps."""
    return self.solver == "dmd"

  @property
  def solver(self) -> str:
    """'euler', 'unipc' or 'dmd'."""
    raise NotImplementedError

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>"):
    """Parses a scheduler config dict; on the base class, dispatches on `_class_name`.

    Args:
      d: the JSON object.
      source: file name used in error messages.

    Returns:
      A `HeliosSchedulerConfig` or `HeliosDMDSchedulerConfig`.

    Raises:
      ConfigError: unknown or missing `_class_name`, unknown key, bad value.
    """
    if not isinstance(d, Mapping):
      raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    name = d.get("_class_name")
    if cls is SchedulerConfig:
      if name is None:
        raise ConfigError(f"{source}: scheduler config has no '_class_name'; expected one of "
                          f"{sorted(SCHEDULER_CONFIGS)}")
      if name not in SCHEDULER_CONFIGS:
        raise ConfigError(f"{source}: unsupported scheduler _class_name={name!r}; expected one "
                          f"of {sorted(SCHEDULER_CONFIGS)}")
      return SCHEDULER_CONFIGS[name].from_dict(d, source=source)
    if name is not None and name != cls.CLASS_NAME:
      raise ConfigError(f"{source}: _class_name={name!r} does not match {cls.__name__} "
                        f"({cls.CLASS_NAME!r})")
    return super().from_dict(cls._preprocess(dict(d), source), source=source)

  @classmethod
  def _preprocess(cls, d: dict[str, Any], source: str) -> dict[str, Any]:
    del source
    return d

  def to_json(self, path: str | os.PathLike, **extra: Any) -> None:
    """Writes the config with its `_class_name` (diffusers can read the file back)."""
    super().to_json(path, _class_name=self.CLASS_NAME, **extra)


@dataclasses.dataclass(frozen=True)
class HeliosSchedulerConfig(SchedulerConfig):
  """diffusers `HeliosScheduler` (UniPC / Euler; also DMD when `scheduler_type='dmd'`, as the
  official Helios repository's scheduler does)."""

  CLASS_NAME: ClassVar[str] = "HeliosScheduler"

  thresholding: bool = False
  solver_order: int = 2
  predict_x0: bool = True
  solver_type: str = "bh2"
  lower_order_final: bool = True
  disable_corrector: tuple[int, ...] = ()
  solver_p: Any = None
  scheduler_type: str = "unipc"

  def __post_init__(self):
    super().__post_init__()
    if self.solver_type in _BH2_ALIASES:
      object.__setattr__(self, "solver_type", "bh2")
    if self.solver_type not in ("bh1", "bh2"):
      raise ConfigError(f"solver_type={self.solver_type!r} must be 'bh1' or 'bh2'")
    if self.scheduler_type not in _SCHEDULER_TYPES:
      raise ConfigError(f"scheduler_type={self.scheduler_type!r} must be one of "
                        f"{_SCHEDULER_TYPES}")
    if int(self.solver_order) < 1:
      raise ConfigError(f"solver_order={self.solver_order} must be >= 1")
    if self.thresholding:
      raise ConfigError("thresholding=True is not supported (no Helios config uses it)")
    if self.solver_p is not None:
      raise ConfigError(f"solver_p={self.solver_p!r} is not supported; it must be null")
    if not self.predict_x0:
      raise ConfigError("predict_x0=False is not supported with prediction_type="
                        "'flow_prediction' (the reference raises for it too)")
    if any(int(i) != i for i in self.disable_corrector):
      raise ConfigError(f"disable_corrector={list(self.disable_corrector)} must hold step "
                        "indices (ints)")

  @property
  def solver(self) -> str:
    return self.scheduler_type


@dataclasses.dataclass(frozen=True)
class HeliosDMDSchedulerConfig(SchedulerConfig):
  """diffusers `HeliosDMDScheduler` (Helios-Distilled). Its default shift type is 'linear'.

  The official Helios repository writes `scheduler_type` into the scheduler config it loads
  with its own class; that key is accepted here only with the value 'dmd' (anything else would
  silently change the solver there) and dropped.
  """

  CLASS_NAME: ClassVar[str] = "HeliosDMDScheduler"

  time_shift_type: str = "linear"

  @property
  def solver(self) -> str:
    return "dmd"

  @classmethod
  def _preprocess(cls, d: dict[str, Any], source: str) -> dict[str, Any]:
    if "scheduler_type" in d:
      if d["scheduler_type"] != "dmd":
        raise ConfigError(f"{source}: HeliosDMDScheduler config has scheduler_type="
                          f"{d['scheduler_type']!r}; only 'dmd' is consistent with this class")
      d.pop("scheduler_type")
    return d


SCHEDULER_CONFIGS: dict[str, type[SchedulerConfig]] = {
    HeliosSchedulerConfig.CLASS_NAME: HeliosSchedulerConfig,
    HeliosDMDSchedulerConfig.CLASS_NAME: HeliosDMDSchedulerConfig,
}


def _find_file(path: str | os.PathLike, subfolder: str | None, name: str, what: str) -> str:
  path = os.fspath(path)
  if path.endswith(".json"):
    candidates = [path]
  else:
    candidates = [os.path.join(path, name)]
    if subfolder:
      candidates.insert(0, os.path.join(path, subfolder, name))
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise ConfigError(f"{what} not found: tried {candidates}")


def load_scheduler_config(path: str | os.PathLike) -> SchedulerConfig:
  """Reads a checkpoint's scheduler config.

  Args:
    path: the checkpoint root (holding `scheduler/scheduler_config.json`), the `scheduler`
      folder, or the JSON file itself.

  Returns:
    A `HeliosSchedulerConfig` or `HeliosDMDSchedulerConfig` (chosen by `_class_name`).

  Raises:
    ConfigError: missing file, invalid JSON, unknown class or key, unsupported value.
  """
  f = _find_file(path, "scheduler", SchedulerConfig.CONFIG_NAME, "scheduler config")
  return SchedulerConfig.from_json(f)


@dataclasses.dataclass(frozen=True)
class PipelineFlags(JsonConfig):
  """`model_index.json` of a Helios checkpoint: pipeline class, flags and component entries.

  Every non-bookkeeping key is either a component entry (a `[library, class]` pair, e.g.
  `"scheduler": ["diffusers", "HeliosDMDScheduler"]`) or one of the pipeline flags below;
  anything else is an error naming the key.
  """

  CONFIG_NAME: ClassVar[str] = "model_index.json"
  FLAG_KEYS: ClassVar[tuple[str, ...]] = ("is_cfg_zero_star", "is_distilled")

  pipeline_class: str = "HeliosPyramidPipeline"
  is_cfg_zero_star: bool = False
  is_distilled: bool = False
  # ((name, library, class), ...) sorted by name; library/class may be None (absent component).
  components: tuple[tuple[str, str | None, str | None], ...] = ()

  def __post_init__(self):
    for k in self.FLAG_KEYS:
      if not isinstance(getattr(self, k), bool):
        raise ConfigError(f"{k}={getattr(self, k)!r} must be a bool")

  def component(self, name: str) -> tuple[str | None, str | None]:
    """The `(library, class)` entry of component `name`; ConfigError if absent."""
    for n, lib, klass in self.components:
      if n == name:
        return lib, klass
    raise ConfigError(f"model_index.json has no component {name!r}; components: "
                      f"{[c[0] for c in self.components]}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>") -> "PipelineFlags":
    """Parses a `model_index.json` object.

    Args:
      d: the JSON object.
      source: file name used in error messages.

    Returns:
      The flags.

    Raises:
      ConfigError: a key that is neither bookkeeping (`_...`), a flag, nor a component entry.
    """
    if not isinstance(d, Mapping):
      raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    flags: dict[str, Any] = {}
    comps = []
    unknown = []
    for k, v in d.items():
      if k.startswith("_"):
        continue
      if k in cls.FLAG_KEYS:
        flags[k] = v
      elif (isinstance(v, (list, tuple)) and len(v) == 2
            and all(e is None or isinstance(e, str) for e in v)):
        comps.append((k, v[0], v[1]))
      else:
        unknown.append(k)
    if unknown:
      raise ConfigError(f"{source}: unknown model_index key(s) {sorted(unknown)}; pipeline "
                        f"flags are {list(cls.FLAG_KEYS)}, components are [library, class] "
                        "pairs")
    name = d.get("_class_name", cls.pipeline_class)
    if not isinstance(name, str):
      raise ConfigError(f"{source}: _class_name={name!r} must be a string")
    return cls(pipeline_class=name, components=tuple(sorted(comps)), **flags)

  def to_dict(self) -> dict[str, Any]:
    d: dict[str, Any] = {"_class_name": self.pipeline_class}
    d.update({k: getattr(self, k) for k in self.FLAG_KEYS})
    d.update({n: [lib, klass] for n, lib, klass in self.components})
    return d

  def to_json(self, path: str | os.PathLike, **extra: Any) -> None:
    with open(path, "w") as f:
      json.dump({**extra, **self.to_dict()}, f, indent=2, sort_keys=True)


def load_pipeline_flags(path: str | os.PathLike) -> PipelineFlags:
  """Reads `model_index.json` from a checkpoint root (or the file itself)."""
  f = _find_file(path, None, PipelineFlags.CONFIG_NAME, "model_index.json")
  return PipelineFlags.from_json(f)
