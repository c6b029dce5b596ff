"""The package installs as a wheel: built from the sources, installed into a fresh venv, it runs the
tiny demo from outside the repository, and its metadata declares the dependencies and extras.

The fresh venv gets the wheel only (`--no-deps`); the third-party packages come from this test
environment's site-packages through a `.pth` line, so no download is needed and the import of
`helios_jax` is the installed wheel's, never the repository's source tree.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("helios_jax", "pallas_kernels")
EXTRAS = ("cuda12", "test", "serve")


def _run(cmd, cwd, timeout=240):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
  assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
  return res


def _sources(pkg_root):
  return {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
          for d, _, files in os.walk(os.path.join(ROOT, pkg_root)) for f in files
          if f.endswith(".py")}


def _pinned(path):
  """{normalised name: Requirement} of a requirements file (following `-r`)."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top
  out = {}
  with open(path) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line.startswith("-r"):
        out.update(_pinned(os.path.join(os.path.dirname(path), line[2:].strip())))
      elif line:
        r = Requirement(line)
        out[canonicalize_name(r.name)] = r
  return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """A wheel built from a copy of the sources (the build leaves nothing in the repository)."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(os.path.join(ROOT, name), src / name)
  for pkg in PACKAGES:
    shutil.copytree(os.path.join(ROOT, pkg), src / pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(tmp / "dist"), str(src)], cwd=str(tmp))
  wheels = sorted((tmp / "dist").glob("helios_jax-*.whl"))
  assert len(wheels) == 1, wheels
  return str(wheels[0])


@pytest.mark.slow
def test_wheel_metadata_declares_dependencies_and_extras(wheel):
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = z.read(meta_name).decode()
  missing = sorted((_sources("helios_jax") | _sources("pallas_kernels")) - names)
  assert not missing, f"modules missing from the wheel: {missing}"
  requires = [Requirement(ln.split(":", 1)[1].strip()) for ln in meta.splitlines()
              if ln.startswith("Requires-Dist:")]
  extras = {ln.split(":", 1)[1].strip() for ln in meta.splitlines()
            if ln.startswith("Provides-Extra:")}
  assert set(EXTRAS) <= extras, extras
  runtime = {canonicalize_name(r.name): r for r in requires if r.marker is None}
  by_extra = {e: {canonicalize_name(r.name): r for r in requires
                  if r.marker is not None and r.marker.evaluate({"extra": e})} for e in EXTRAS}
  # Every pin of requirements.txt is a declared runtime dependency whose range it satisfies;
  # requirements-test.txt's own pins are the `test` extra.
  pins = _pinned(os.path.join(ROOT, "requirements.txt"))
  test_pins = {k: v for k, v in _pinned(os.path.join(ROOT, "requirements-test.txt")).items()
               if k not in pins}
  for group, declared, pinned in (("runtime", runtime, pins), ("test", by_extra["test"],
                                                                test_pins)):
    assert set(pinned) == set(declared), (group, sorted(set(pinned) ^ set(declared)))
    for name, pin in pinned.items():
      (version,) = [s.version for s in pin.specifier]
      assert declared[name].specifier.contains(version, prereleases=True), (name, version,
                                                                             declared[name])
  jax_pin = next(iter(pins["jax"].specifier)).version
  assert by_extra["cuda12"]["jax"].extras == {"cuda12"}
  assert by_extra["cuda12"]["jax"].specifier.contains(jax_pin)
  assert {"fastapi", "uvicorn"} <= set(by_extra["serve"])


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_outside_the_repo(wheel, tmp_path):
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=str(tmp_path))
  py = str(venv / "bin" / "python")
  _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q",
        wheel], cwd=str(tmp_path))
  site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              cwd=str(tmp_path)).stdout.strip()
  # Third-party packages from this environment, after the venv's own site-packages.
  with open(os.path.join(site, "zz_test_env.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  work = tmp_path / "elsewhere"
  work.mkdir()
  res = _run([py, "-c", "import helios_jax, pallas_kernels, helios_jax.export; "
              "print(helios_jax.__file__); print(pallas_kernels.__file__)"], cwd=str(work))
  for line in res.stdout.strip().splitlines():
    assert os.path.realpath(line).startswith(os.path.realpath(str(venv)) + os.sep), line
    assert not os.path.realpath(line).startswith(ROOT + os.sep), line
  # The HeliosBench prompt set ships in the wheel (the CLI's default --prompts).
  res = _run([py, "-c", "from helios_jax.heliosbench import naming; import os; "
              "print(os.path.islink(naming.DEFAULT_PROMPTS_CSV), "
              "len(naming.load_prompts()))"], cwd=str(work))
  assert res.stdout.split() == ["False", "240"], res.stdout
  out = work / "demo.mp4"
  res = _run([py, "-m", "helios_jax.generate", f"--out={out}", "--num_frames=33", "--height=64",
              "--width=64"], cwd=str(work), timeout=170)
  assert out.is_file() and out.stat().st_size > 0, res.stdout
