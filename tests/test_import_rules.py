"""Import rules of the code base, checked from the source (AST), so layering cannot rot.

- `pallas_kernels` is a leaf: it imports jax (and numpy / the standard library) only.
- `helios_jax.models` imports no sampler, scheduler, pipeline, training, data, HeliosBench or
  sharding code: networks are plain modules that callers configure.
- `helios_jax.schedulers` imports no model.
- Nothing in the library imports a CLI entry module or a benchmark script.
- No import cycles, between modules or between the library's sub-packages.

Every import counts, including the ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("helios_jax", "pallas_kernels")
# Modules run as programs (`python -m ...`): importing them would run flag definitions etc.
CLI_MODULES = {
    "helios_jax.generate", "helios_jax.convert", "helios_jax.train",
    "helios_jax.data.precompute", "helios_jax.training.merge",
    "helios_jax.training.lora_export", "helios_jax.export",
    "helios_jax.heliosbench.cli", "helios_jax.heliosbench.__main__",
}
# Library code may not reach into these from helios_jax.models.
MODEL_FORBIDDEN = ("helios_jax.sampling", "helios_jax.schedulers", "helios_jax.pipeline",
                   "helios_jax.training", "helios_jax.data", "helios_jax.heliosbench",
                   "helios_jax.sharding", "helios_jax.parallel", "helios_jax.presets",
                   "helios_jax.variants", "helios_jax.flops")
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  """{module name: file path} of every library module."""
  out = {}
  for pkg in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(folder, f)
          out[_module_name(path)] = path
  return out


def _imports(name: str, path: str, known: set[str]) -> set[str]:
  """Absolute names imported by a module (a `from pkg import sub` counts as pkg.sub)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  is_pkg = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = name.split(".")
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module
      out.add(mod)
      for a in node.names:
        if f"{mod}.{a.name}" in known:
          out.add(f"{mod}.{a.name}")
  return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
  mods = _modules()
  return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _owner(mod: str, known) -> str | None:
  """The library module an imported name resolves to (the longest known prefix)."""
  parts = mod.split(".")
  for n in range(len(parts), 0, -1):
    cand = ".".join(parts[:n])
    if cand in known:
      return cand
  return None


def _under(mod: str, prefix: str) -> bool:
  return mod == prefix or mod.startswith(prefix + ".")


def test_pallas_kernels_import_only_jax(graph):
  bad = {(m, i) for m, imps in graph.items() if _under(m, "pallas_kernels")
         for i in imps if i.split(".")[0] not in STDLIB | {"jax", "jaxlib", "numpy",
                                                            "pallas_kernels"}}
  assert not bad, sorted(bad)


def test_models_import_no_higher_layer(graph):
  bad = {(m, i) for m, imps in graph.items() if _under(m, "helios_jax.models")
         for i in imps if any(_under(i, f) for f in MODEL_FORBIDDEN)}
  assert not bad, sorted(bad)


def test_schedulers_import_no_model(graph):
  bad = {(m, i) for m, imps in graph.items() if _under(m, "helios_jax.schedulers")
         for i in imps if _under(i, "helios_jax.models") or _under(i, "helios_jax.pipeline")}
  assert not bad, sorted(bad)


def test_nothing_imports_a_cli_or_a_benchmark_script(graph):
  bad = {(m, i) for m, imps in graph.items() for i in imps
         if (_owner(i, graph) in CLI_MODULES and m != _owner(i, graph)
             and not m.endswith("__main__")) or i.split(".")[0] in ("benchmarks", "bench")}
  assert not bad, sorted(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component with more than one node (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_no_module_import_cycles(graph):
  edges = {m: {o for i in imps if (o := _owner(i, graph)) and o != m
               and not m.startswith(o + ".")}  # a package's own __init__ is not an edge back
           for m, imps in graph.items()}
  assert not _cycles(edges), _cycles(edges)


def _package(mod: str) -> str:
  """helios_jax.training.lora -> helios_jax.training; helios_jax's top-level modules stand for
  themselves; pallas_kernels is one package."""
  parts = mod.split(".")
  return ".".join(parts[:2]) if parts[0] == "helios_jax" else parts[0]


def test_no_package_import_cycles(graph):
  edges: dict[str, set[str]] = {}
  for m, imps in graph.items():
    for i in imps:
      o = _owner(i, graph)
      if o and _package(o) != _package(m) and _package(o) != "helios_jax":
        edges.setdefault(_package(m), set()).add(_package(o))
  assert not _cycles(edges), _cycles(edges)


def test_checker_sees_the_layers(graph):
  """The rules above are not vacuous: the graph has the expected shape."""
  assert "helios_jax.pipeline" in graph and "pallas_kernels.dispatch" in graph
  assert "helios_jax.sampling" in graph["helios_jax.pipeline"]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
