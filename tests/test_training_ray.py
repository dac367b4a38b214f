"""The Ray training path: same models as the plain path, and `ray job submit` end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE_DATA, SYMBOLS

SLICE_CANDLES = 3000


@pytest.fixture(scope="module")
def small_settings():
    """Two horizons (the shortest and the embargo-defining longest), few rounds, two folds."""
    from configs.settings import get_settings
    from training.train import with_overrides

    base = get_settings()
    market = base.market.model_copy(update={"horizons": [6, 72]})
    return with_overrides(base.model_copy(update={"market": market}), rounds=6, folds=2)


@pytest.fixture(scope="module")
def slice_files(tmp_path_factory) -> dict[str, Path]:
    from features.candles import load_candles

    d = tmp_path_factory.mktemp("ray_candles")
    out = {}
    for s in SYMBOLS:
        df = load_candles(SAMPLE_DATA / f"{s}_5m.parquet").iloc[-SLICE_CANDLES:].reset_index(drop=True)
        out[s] = d / f"{s}_5m.parquet"
        df.to_parquet(out[s], index=False)
    return out


def _rel_close(a: float | None, b: float | None, tol: float = 0.01) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-12)


def test_plain_and_ray_paths_agree_within_one_percent(ray_cluster, slice_files, small_settings, tmp_path):
    """Same rows, same jobs: walk-forward (Ray tasks) and final refit (XGBoostTrainer) metrics of the
    two engines agree within 1% on data the final models never saw."""
    from training.data import load_histories, prepare
    from training.ensemble import Ensemble
    from training.evaluate import evaluate
    from training.pipeline import PlainEngine, train
    from training.ray_engine import RayEngine
    from training.registry import ModelRegistry
    from training.train import save_models

    hist = load_histories(slice_files)
    cut = int(hist["BTCUSDT"]["open_time"].iloc[-600])  # the last ~2 days are never trained on
    data = prepare(hist, small_settings, end_ms=cut)
    results = {}
    for name, engine in (("plain", PlainEngine(nthread=1)), ("ray", RayEngine(num_workers=1))):
        out = train(data, small_settings, engine)
        reg_dir = tmp_path / name
        save_models(out, ModelRegistry(reg_dir), small_settings, {
            "data_range": data.data_range(), "symbols": list(data.symbols), "horizons": [6, 72],
            "per_symbol": False, "feature_names": list(data.feature_names), "model_columns": list(data.columns)},
            engine.name)
        ens = Ensemble.load(reg_dir, small_settings)
        assert ens.metadata["meta_model"]["engine"] == name
        results[name] = (out.metadata, evaluate(ens, hist, small_settings, start_ms=cut + 72 * 300_000))
    (m_plain, ev_plain), (m_ray, ev_ray) = results["plain"], results["ray"]
    checked = 0
    for model in ("range_predictor", "tpsl_classifier", "signal_classifier"):
        for a, b in zip(m_plain[model]["metrics"]["walk_forward"], m_ray[model]["metrics"]["walk_forward"]):
            for k, v in a.items():
                if isinstance(v, float):
                    assert _rel_close(v, b[k]), (model, a["symbol"], a["horizon"], k, v, b[k])
                    checked += 1
    for a, b in zip(ev_plain, ev_ray):
        assert (a["symbol"], a["horizon"]) == (b["symbol"], b["horizon"]) and a["n"] == b["n"] > 100
        assert not a["overlaps_training"]
        for k in ("r2_high", "r2_low", "mae_high", "mae_low", "coverage_high", "coverage_low", "tpsl_auc_long",
                  "tpsl_auc_short", "signal_accuracy"):
            assert _rel_close(a[k], b[k]), (a["symbol"], a["horizon"], k, a[k], b[k])
            checked += 1
    assert checked > 50


def test_ray_job_submit_end_to_end(ray_cluster, slice_files, tmp_path):
    """`ray job submit --working-dir .` runs the Ray training path on the suite's cluster; the upload
    excludes .venv and models (.rayignore/.gitignore), and the result is a loadable model set."""
    ray_cli = Path(sys.executable).with_name("ray")
    out_dir = tmp_path / "models"
    # Runs in the uploaded copy of the repository: prove the heavy folders were not uploaded.
    entry = (f"test ! -e .venv && test ! -e models && test -e training/train.py && "
             f"{sys.executable} -m training.train --engine ray --num-workers 1 --rounds 4 --folds 2 "
             f"--candles {slice_files['BTCUSDT']} {slice_files['ETHUSDT']} --out {out_dir} --json")
    cmd = [str(ray_cli), "job", "submit", "--address", ray_cluster["dashboard_url"], "--working-dir", ".", "--",
           "sh", "-c", entry]
    deadline = time.monotonic() + 120
    while True:  # a freshly started cluster's job agent may need a moment ("No available agent")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "succeeded" in proc.stdout
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"version"')))
    assert summary["engine"] == "ray" and summary["timings"]["trainer_run"] > 0

    from configs.settings import get_settings
    from training.ensemble import Ensemble

    ens = Ensemble.load(out_dir, get_settings())
    assert set(ens.versions.values()) == {summary["version"]}
    assert all(ens.metadata[m]["engine"] == "ray" for m in ens.metadata)
    shutil.rmtree(out_dir)
