"""Typed training settings <-> ml_collections ConfigDicts, one strict converter for all groups.

Every config group of an experiment (`optim`, `trainable`, `model`, `stage3`, `stage3.gan`, ...)
is a frozen dataclass; its defaults are the only definition of the group's keys. The experiment
files derive their ConfigDicts from those defaults (`to_configdict(OptimConfig())`) and set the
released values; the trainer reads them back with `from_configdict`, which casts every value by
the dataclass field's type and rejects unknown keys, naming the full key and the closest known
ones:

  unknown config key 'optim.lrr'; did you mean 'optim.lr'?

Supported field types: int, float, bool, str, `tuple[T, ...]` / `tuple[T1, T2]` of those,
nested frozen dataclasses (a sub-group; `X | None` makes the group optional: absent -> None),
`tuple[tuple[str, T], ...]` (a free-form mapping {name: value} in the ConfigDict, stored as
sorted pairs) and `Any` (taken as is, lists turned into tuples). Fields declared with
`derived(...)` are not config keys: the code fills them from other groups.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Mapping

import ml_collections

from helios_jax.config import ConfigError

_DERIVED = "helios_jax.settings.derived"


def derived(default: Any) -> Any:
  """A dataclass field that is not a config key (filled from other groups by the code)."""
  return dataclasses.field(default=default, metadata={_DERIVED: True})


def config_fields(cls) -> list[dataclasses.Field]:
  """The fields of a settings dataclass that are config keys (not `derived`)."""
  return [f for f in dataclasses.fields(cls) if not f.metadata.get(_DERIVED)]


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _join(path: str, key: str) -> str:
  return f"{path}.{key}" if path else key


def _optional(tp: Any) -> tuple[Any, bool]:
  """(T, True) for `T | None`, else (tp, False)."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2:
      return args[0], True
  return tp, False


def _is_pairs(tp: Any) -> bool:
  """`tuple[tuple[str, T], ...]`: a mapping stored as sorted (name, value) pairs."""
  if typing.get_origin(tp) is not tuple:
    return False
  args = typing.get_args(tp)
  if len(args) != 2 or args[1] is not Ellipsis or typing.get_origin(args[0]) is not tuple:
    return False
  inner = typing.get_args(args[0])
  return len(inner) == 2 and inner[0] is str


def _plain(value: Any) -> Any:
  """Lists -> tuples, ConfigDicts -> dicts, recursively (for `Any` fields)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def unknown_key_message(key: str, group: str, known: list[str]) -> str:
  """"unknown config key 'optim.lrr'; did you mean 'optim.lr'?".

  Args:
    key: the full unknown key.
    group: the path of the group where the lookup failed ("" for the top level).
    known: the keys of that group; difflib picks the closest to the failing component.
  """
  name = key[len(group) + 1:] if group else key
  name = name.split(".")[0]
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  if close:
    return (f"unknown config key {key!r}; did you mean "
            f"{' or '.join(repr(_join(group, c)) for c in close)}?")
  return (f"unknown config key {key!r}; known keys: "
          f"{', '.join(_join(group, k) for k in sorted(known))}")


def _cast(tp: Any, value: Any, key: str) -> Any:
  """`value` as type `tp` (strict: no silent truncation, no str <-> number)."""
  tp, optional = _optional(tp)
  if value is None:
    if optional:
      return None
    raise ConfigError(f"config key {key!r} is None; expected {getattr(tp, '__name__', tp)}")
  if dataclasses.is_dataclass(tp):
    return from_configdict(tp, value, key)
  if tp is Any:
    return _plain(value)
  bad = lambda what: ConfigError(f"config key {key}={value!r} is not {what}")
  if tp is bool:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
      return bool(value)
    raise bad("a bool")
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()):
      raise bad("an int")
    return int(value)
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad("a float")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise bad("a str")
    return value
  if _is_pairs(tp):
    value = _plain(value)
    if not isinstance(value, Mapping):
      raise bad("a mapping {name: value}")
    value_tp = typing.get_args(typing.get_args(tp)[0])[1]
    return tuple(sorted((str(k), _cast(value_tp, v, _join(key, str(k))))
                        for k, v in value.items()))
  if typing.get_origin(tp) is tuple:
    if not isinstance(value, (list, tuple)):
      raise bad("a tuple")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_cast(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise bad(f"a tuple of {len(args)}")
    return tuple(_cast(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
  raise TypeError(f"config key {key!r}: unsupported settings field type {tp!r}")


def from_configdict(cls, group: Mapping[str, Any], path: str = "", **derived_values: Any):
  """The dataclass `cls` from a config group; missing keys take the dataclass defaults.

  Args:
    cls: a settings dataclass.
    group: the ConfigDict (or any mapping) of the group.
    path: the group's key in the full config ("optim", "stage3.gan"; "" for the top level),
      used in error messages.
    **derived_values: values of `derived` fields.

  Returns:
    An instance of `cls`.

  Raises:
    ConfigError: an unknown key (with the closest known keys), a value of the wrong type, a
      missing key without default, or a value the dataclass rejects (prefixed by `path`).
  """
  if isinstance(group, ml_collections.ConfigDict):
    items = dict(group.items())
  elif isinstance(group, Mapping):
    items = dict(group)
  else:
    raise ConfigError(f"config key {path!r}={group!r} is not a group of settings")
  fields = {f.name: f for f in config_fields(cls)}
  for key in items:
    if key not in fields:
      raise ConfigError(unknown_key_message(_join(path, key), path, list(fields)))
  hints = _hints(cls)
  kwargs = {name: _cast(hints[name], items[name], _join(path, name))
            for name in fields if name in items}
  for name, f in fields.items():
    if name not in kwargs and f.default is dataclasses.MISSING and (
        f.default_factory is dataclasses.MISSING):
      raise ConfigError(f"config key {_join(path, name)!r} is missing")
  try:
    return cls(**kwargs, **derived_values)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{path}: {e}" if path else str(e)) from e


def _to_value(value: Any) -> Any:
  if dataclasses.is_dataclass(value):
    return to_configdict(value)
  return value


def to_configdict(instance: Any) -> ml_collections.ConfigDict:
  """The ConfigDict of a settings dataclass (its config keys, sub-groups as ConfigDicts).

  Optional sub-groups that are None are left out; `tuple[tuple[str, T], ...]` fields become
  {name: value} ConfigDicts.
  """
  out = ml_collections.ConfigDict()
  hints = _hints(type(instance))
  for f in config_fields(type(instance)):
    value = getattr(instance, f.name)
    if value is None:
      continue
    if _is_pairs(_optional(hints[f.name])[0]):
      out[f.name] = ml_collections.ConfigDict(dict(value))
    else:
      out[f.name] = _to_value(value)
  return out


def check_override(config: ml_collections.ConfigDict, key: str) -> str | None:
  """None if the dotted `key` names a field of `config`, else the unknown-key message."""
  node, done = config, []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      return unknown_key_message(key, ".".join(done), known)
    node = node[part]
    done.append(part)
  return None
