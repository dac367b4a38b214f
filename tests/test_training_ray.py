"""The Ray training path, submitted with `ray job submit`, gives the plain path's models (within 1%).

One Ray training run serves both checks (Ray Train's start-up is the expensive part on 2 cores):
the job trains with ``--engine ray`` on a small slice; this process trains the plain path on exactly
the same rows and settings; both are scored out of sample on candles after the training end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, SAMPLE_DATA, SYMBOLS

SLICE_CANDLES = 3000
HELD_OUT = 600          # newest candles per symbol never trained on
# Two horizons (the shortest and the embargo-defining longest), few rounds, two folds: passed to the
# job through MLE_* variables, and to this process through load_settings with the same values.
ENV = {"MLE_MARKET__HORIZONS": "[6,72]", "MLE_MODELS__NUM_BOOST_ROUND": "6", "MLE_MODELS__WALK_FORWARD_FOLDS": "2"}


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


def test_ray_job_submit_matches_plain_path(ray_cluster, slice_files, tmp_path, monkeypatch):
    from configs.settings import load_settings
    from inference.ensemble import Ensemble
    from training.data import load_histories, to_ms
    from training.engines import PlainEngine
    from training.evaluate import evaluate
    from training.train import train

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()
    assert settings.market.horizons == [6, 72] and settings.models.num_boost_round == 6
    hist = load_histories(slice_files)
    cut_ms = int(hist["BTCUSDT"]["open_time"].iloc[-HELD_OUT])
    end = pd.Timestamp(cut_ms, unit="ms", tz="UTC").isoformat()
    assert to_ms(end) == cut_ms

    # 1. The Ray path, as an operator runs it: `ray job submit --working-dir . -- python -m training.train`.
    ray_dir = tmp_path / "ray_models"
    env = " ".join(f"{k}='{v}'" for k, v in ENV.items())
    # The entrypoint runs in the uploaded copy of the repository: prove .venv and models were not uploaded.
    # --address: Ray's job supervisor resolves the driver's cluster through /tmp/ray/ray_current_cluster,
    # i.e. the most recently started cluster on the host; on a machine where other people start Ray
    # clusters that can be the wrong one, so the test names the suite cluster's GCS explicitly.
    entry = (f"test ! -e .venv && test ! -e models && test -e training/train.py && "
             f"{env} {sys.executable} -m training.train --engine ray --num-workers 1 --end {end} "
             f"--address {ray_cluster['gcs_address']} "
             f"--candles {slice_files['BTCUSDT']} {slice_files['ETHUSDT']} --out {ray_dir} --json")
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster["dashboard_url"],
           "--working-dir", ".", "--", "sh", "-c", entry]
    deadline = time.monotonic() + 120
    while True:  # a freshly started cluster's job agent may need a moment ("No available agent")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480,
                              env={k: v for k, v in os.environ.items() if not k.startswith("MLE_")})
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "succeeded" in proc.stdout
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"version"')))
    assert summary["engine"] == "ray" and summary["timings"]["trainer_run"] > 0
    ray_ens = Ensemble.load(ray_dir, settings)
    assert set(ray_ens.versions.values()) == {summary["version"]}
    assert all(m["engine"] == "ray" for m in ray_ens.metadata.values())

    # 2. The plain path on the same rows, through the same entry point as the command line.
    plain_dir = tmp_path / "plain_models"
    plain = train(settings, slice_files, PlainEngine(nthread=1), out=plain_dir, end=end)
    assert plain.rows == summary["rows"] and plain.engine == "plain"
    plain_ens = Ensemble.load(plain_dir, settings)
    assert set(plain_ens.versions.values()) == {plain.version}

    # 3. Same out-of-sample figures: walk-forward (Ray tasks vs in-process) ...
    checked = 0
    for model in ("range_predictor", "tpsl_classifier", "signal_classifier"):
        for a, b in zip(plain_ens.metadata[model]["metrics"]["walk_forward"],
                        ray_ens.metadata[model]["metrics"]["walk_forward"]):
            for k, v in a.items():
                if isinstance(v, float):
                    assert _rel_close(v, b[k]), (model, a["symbol"], a["horizon"], k, v, b[k])
                    checked += 1
    # ... and the final models (XGBoostTrainer vs in-process) on candles after the training end.
    start = cut_ms + 72 * 300_000
    ev_plain = evaluate(plain_ens, hist, settings, start_ms=start)
    ev_ray = evaluate(ray_ens, hist, settings, start_ms=start)
    for a, b in zip(ev_plain, ev_ray):
        assert (a["symbol"], a["horizon"]) == (b["symbol"], b["horizon"]) and a["n"] == b["n"] > 100
        assert not a["overlaps_training"] and not b["overlaps_training"]
        for k in ("r2_high", "r2_low", "mae_high", "mae_low", "coverage_high", "coverage_low", "tpsl_auc_long",
                  "tpsl_auc_short", "signal_accuracy", "confidence_ece"):
            assert _rel_close(a[k], b[k]), (a["symbol"], a["horizon"], k, a[k], b[k])
            checked += 1
    assert checked > 50
