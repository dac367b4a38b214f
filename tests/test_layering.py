"""The package layering (issue 16): serving never imports training code, the serving contract
(``inference``) imports neither training, the deployments, Ray nor pandas, so a model pool loads only
what inference needs, ``configs`` (settings and the error hierarchy) is the bottom layer that
imports no other project package, and scripts and benchmarks never import the test suite (what
both need, the private services and the fake exchange, lives in ``scripts/lab/``). Checked on the source (every import, function-local ones
included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(folder: str) -> dict[str, str]:
    """Imported module (dotted) -> first file importing it, for every .py under ``folder``."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("configs", ("features", "training", "deployments", "inference", "scripts", "tests")),
    ("deployments", ("training",)),
    ("inference", ("training", "deployments", "ray", "pandas", "scripts", "tests")),
    ("features", ("training", "deployments", "inference", "scripts", "tests")),
    ("scripts", ("tests",)),  # the lab (scripts/lab/) serves both; tests may import scripts, not vice versa
    ("bench", ("tests",)),
])
def test_layer_does_not_import(folder, forbidden):
    bad = {m: where for m, where in _imported_modules(folder).items() if m.split(".")[0] in forbidden}
    assert bad == {}, f"{folder}/ imports {sorted(bad)} (first in {sorted(set(bad.values()))})"


def test_importing_the_serving_side_loads_no_training_module():
    """What a replica imports: the router, the pools and the ingress pull in no ``training`` module
    (so none of its import-time settings) — checked in a fresh interpreter."""
    code = ("import sys, deployments.router, deployments.model_pools, deployments.ingress, inference.ensemble;"
            "print(sorted(m for m in sys.modules if m == 'training' or m.startswith('training.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_router_and_the_ingress_import_no_xgboost():
    """They compose forecasts from a set's documents and never build a booster (the pools do, and the
    router only for a failed pool): XGBoost, with the scikit-learn and SciPy it imports, is about
    115 MiB per process -- so importing them, or loading a set without boosters, loads none of it."""
    code = ("import sys; import deployments.router, deployments.ingress, deployments.app;"
            "from configs.settings import get_settings; from deployments.launcher import SHIPPED_MODELS;"
            "from inference.ensemble import Ensemble; Ensemble.load(SHIPPED_MODELS, get_settings(), boosters=False);"
            "print(sorted(m for m in ('xgboost', 'sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
