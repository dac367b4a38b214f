"""Packaging (issue 17, point 5): what the code imports is declared, in the extra that needs it, with a
floor the code runs on; the lock files pin every declared requirement inside its range; serving
imports neither scikit-learn nor matplotlib; every console script points at a real ``main``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCAL = {"features", "inference", "training", "deployments", "configs", "ml_engine_client", "scripts", "bench", "tests"}
# Which declared sets a folder's imports may come from. Serving code gets the base install only.
ALLOWED = {"features": ("base",), "configs": ("base",), "inference": ("base",), "deployments": ("base",), "ml_engine_client": ("base",),
           "training": ("base", "train", "report"), "scripts": ("base", "train", "dev"),
           "bench": ("base", "train", "dev"), "tests": ("base", "train", "report", "dev")}


def _declared(group: str) -> set[str]:
    reqs = PROJECT["dependencies"] if group == "base" else PROJECT["optional-dependencies"][group]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def _imports(folder: str) -> dict[str, str]:
    """Top-level module -> first file importing it (lazy imports inside functions included)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_every_imported_package_is_declared_where_that_code_is_installed(folder):
    dists = packages_distributions()
    allowed = set().union(*(_declared(g) for g in ALLOWED[folder]))
    undeclared = {}
    for module, where in _imports(folder).items():
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        assert names, f"{module} (imported by {where}) is not installed from any distribution"
        if not names & allowed:
            undeclared[module] = (where, sorted(names))
    assert undeclared == {}, f"imported by {folder}/ but not declared in {ALLOWED[folder]}: {undeclared}"


def test_training_and_report_packages_stay_out_of_the_base_install():
    base = _declared("base")
    assert {"scikit-learn", "matplotlib"}.isdisjoint(base)
    assert "scikit-learn" in _declared("train") and "matplotlib" in _declared("report")
    assert not any("train" in (Requirement(r).extras) for r in PROJECT["dependencies"])  # ray[train] too


def test_floors_the_code_needs():
    reqs = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PROJECT["dependencies"]}
    # configs/settings.py imports NoDecode, which pydantic-settings added in 2.7.0.
    assert "NoDecode" in (ROOT / "configs" / "settings.py").read_text()
    assert not reqs["pydantic-settings"].specifier.contains("2.6.1")
    assert reqs["pydantic-settings"].specifier.contains("2.7.0")
    for name in ("requests", "psutil"):  # imported (features/klines_api.py, scripts/drills.py), now declared
        assert name in _declared("base") | _declared("dev")


def _pins(lock: str) -> dict[str, list[tuple[str, str]]]:
    """name -> [(version, marker)] of a uv/pip-compile requirements file."""
    out: dict[str, list[tuple[str, str]]] = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            req = Requirement(line)
            [spec] = list(req.specifier)
            assert spec.operator == "==", line
            out.setdefault(canonicalize_name(req.name), []).append((spec.version, str(req.marker or "")))
    return out


@pytest.mark.parametrize("lock, groups", [("serve.txt", ("base",)), ("train.txt", ("base", "train")),
                                          ("dev.txt", ("base", "train", "report", "dev"))])
def test_each_lock_pins_every_declared_requirement_inside_its_range(lock, groups):
    pins = _pins(lock)
    env = default_environment()
    for group in groups:
        reqs = PROJECT["dependencies"] if group == "base" else PROJECT["optional-dependencies"][group]
        for text in reqs:
            req = Requirement(text)
            name = canonicalize_name(req.name)
            if name == "ml-engine":  # dev's self-reference to [train,report]
                continue
            assert name in pins, f"{lock} does not pin {text}"
            here = [v for v, marker in pins[name] if not marker or Requirement(f"x; {marker}").marker.evaluate(env)]
            assert here and all(req.specifier.contains(v, prereleases=True) for v in here), (lock, text, pins[name])
    if lock != "dev.txt":  # the narrower locks resolve inside dev's pins: one version per package everywhere
        dev = _pins("dev.txt")
        assert all(dev[name] == versions or set(versions) <= set(dev[name]) for name, versions in pins.items())


def test_serve_lock_has_no_training_or_report_packages():
    pins = _pins("serve.txt")
    assert {"scikit-learn", "matplotlib"}.isdisjoint(pins)
    assert "matplotlib" not in _pins("train.txt")


def test_the_image_and_make_install_the_locks():
    docker = (ROOT / "Dockerfile").read_text()
    assert "ARG REQUIREMENTS=requirements/train.txt" in docker
    assert 'pip install --no-cache-dir -r "${REQUIREMENTS}"' in docker
    make = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements/dev.txt" in make and "pip install --quiet -r $(LOCK)" in make
    assert "pip install --quiet --no-deps -e ." in make
    assert "$(STAMP): pyproject.toml $(LOCK)" in make


def test_serving_imports_without_training_or_report_packages():
    """Every module of deployments/, features/ and configs/ imports with sklearn, matplotlib and
    ray.train made unimportable (what a serving-only install from requirements/serve.txt lacks)."""
    code = r"""
import importlib, importlib.abc, pkgutil, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sklearn", "matplotlib") or name.startswith("ray.train"):
            raise ImportError("not in the serving install: " + name)
sys.meta_path.insert(0, Block())
failed = []
for pkg in ("configs", "features", "deployments"):
    for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        if not info.name.endswith("__main__"):
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                failed.append(f"{info.name}: {exc!r}")
print("\n".join(failed) or "ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "ok", out.stdout + out.stderr[-2000:]


def test_report_without_matplotlib_says_which_extra(monkeypatch, capsys):
    import importlib.util as iu

    from training import evaluate

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert evaluate.main(["--candles", "BTCUSDT=nowhere.parquet", "--report", "r"]) == 2
    assert "pip install 'ml-engine[report]'" in capsys.readouterr().err


@pytest.mark.parametrize("name, target", sorted(PROJECT["scripts"].items()))
def test_console_script_points_at_a_main(name, target):
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func)), name
