"""The shipped model set (issue 17 point 6): ``data/models``, trained on the full history by
``make shipped-models``, is what ``make serve`` installs on a fresh clone.

1. It loads with this code: every checksum, the feature-set hash (equal to the one the code computes
   now: a feature change without ``make shipped-models`` fails here) and the ensemble's consistency
   checks (horizons, labels, feature list).
2. ``ensure_models`` installs it into an empty models folder (a verified copy, promoted as one set);
   a shipped set that does not match the code is refused with the reason, and nothing is promoted.
3. The shipped sample replayed through it gives BUYs and SELLs where the horizon's policy found an
   edge after costs (HOLD ``edge_below_costs`` everywhere where it found none), and every HOLD says
   why (``edge_below_costs``, ``low_confidence`` under a confidence floor, ``features_unavailable``).

In-process (no Ray, no services): a few seconds.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from configs.settings import get_settings
from deployments.launcher import SHIPPED_MODELS, ensure_models, install_shipped_models, shipped_set_problem
from features.indicators import feature_set_hash
from inference.ensemble import Ensemble
from inference.forecast import FORCED_HOLD_REASONS, HOLD_REASONS, MODEL_HOLD_REASONS
from inference.registry import CURRENT_SET_FILE, MODEL_NAMES, ModelRegistry

SETTINGS = get_settings()


def test_the_shipped_set_loads_with_this_code_and_has_the_codes_feature_set_hash():
    code_hash = feature_set_hash(SETTINGS.features)
    registry = ModelRegistry(SHIPPED_MODELS, code_hash)
    versions = registry.current_versions()
    assert set(versions) == set(MODEL_NAMES) and len(set(versions.values())) == 1, versions
    for model, version in versions.items():
        meta = registry.verify(model, version)  # every file's sha256 and the feature-set hash
        assert meta["feature_set_hash"] == code_hash, (
            f"data/models {model} was trained on feature set {meta['feature_set_hash']}, the code computes "
            f"{code_hash}: rebuild the shipped set with `make shipped-models`")
    ens = Ensemble.load(SHIPPED_MODELS, SETTINGS)
    assert set(SETTINGS.market.horizons) <= set(ens.horizons) and set(ens.symbols) == set(SETTINGS.market.symbols)
    assert shipped_set_problem(SETTINGS) is None
    # Trained on the full history, not the sample: years of candles, a few MB.
    assert ens.metadata["range_predictor"]["data_range"]["rows"] > 500_000  # the sample has ~17,000
    size = sum(p.stat().st_size for p in SHIPPED_MODELS.rglob("*") if p.is_file())
    assert size < 20 << 20, f"data/models is {size / 2**20:.1f} MB"
    summary = json.loads((SHIPPED_MODELS / "train.json").read_text())
    assert summary["version"] == versions["meta_model"] and summary["rows"] > 500_000


def _settings_for(models_dir: Path):
    return SETTINGS.model_copy(update={"models_dir": models_dir})


def test_ensure_models_installs_the_shipped_set_into_an_empty_folder(tmp_path, capsys):
    target = tmp_path / "models"
    ensure_models(_settings_for(target))
    out = capsys.readouterr().out
    assert "installed the shipped set" in out and "training" not in out, out
    shipped = ModelRegistry(SHIPPED_MODELS).current_versions()
    assert ModelRegistry(target).current_versions() == shipped
    for model, version in shipped.items():
        for f in (SHIPPED_MODELS / model / version).iterdir():
            assert (target / model / version / f.name).read_bytes() == f.read_bytes()
        assert not [p for p in (target / model).iterdir() if p.name.startswith(".incoming")]
    Ensemble.load(target, SETTINGS)
    ensure_models(_settings_for(target))  # a registry with a current set is left as it is
    assert "installed" not in capsys.readouterr().out


def test_a_shipped_set_that_does_not_match_the_code_is_not_installed(tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(SHIPPED_MODELS, shipped)
    version = ModelRegistry(SHIPPED_MODELS).current("signal_classifier")
    meta_path = shipped / "signal_classifier" / version / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["feature_set_hash"] = "0123456789abcdef"  # what a feature change without a retrain looks like
    meta_path.write_text(json.dumps(meta))
    target = tmp_path / "models"
    problem = install_shipped_models(_settings_for(target), shipped)
    assert problem and "does not match this code" in problem and "make shipped-models" in problem, problem
    assert not (target / CURRENT_SET_FILE).exists()
    assert "no shipped model set" in install_shipped_models(_settings_for(target), tmp_path / "absent")


def _replay(settings, horizon: int) -> dict[str, np.ndarray]:
    """Every candle of the shipped sample, both symbols, through the shipped ensemble (columns)."""
    from features.batch import build_features
    from features.candles import load_candles

    ens = Ensemble.load(SHIPPED_MODELS, settings)
    parts = []
    for symbol in settings.market.symbols:
        candles = load_candles(settings.sample_dir / f"{symbol}_5m.parquet")
        feats = build_features(candles, settings.features)[list(ens.feature_names)].to_numpy(np.float64)
        parts.append(ens.forecast_columns(feats, [symbol] * len(feats), candles["close"].to_numpy(),
                                          candles["open_time"].to_numpy(), horizon))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("horizon", [6, 72])
def test_the_sample_through_the_shipped_models_gives_trades_or_an_honest_no_trade(horizon):
    """Where the horizon's policy (chosen on out-of-fold data) found an edge, the sample gives BUYs and
    SELLs, each with a positive expected net R; where it found none, every defined row is HOLD
    ``edge_below_costs``. Every HOLD says why either way."""
    c = _replay(SETTINGS, horizon)
    policy = Ensemble.load(SHIPPED_MODELS, SETTINGS).models["meta_model"].documents[f"policy_h{horizon}"]
    kinds = Counter(c["signal_type"].tolist())
    reasons = Counter(c["reason"].tolist())
    print(f"h{horizon}: {dict(kinds)}; reasons {dict(reasons)}; policy trades: {policy['trade']}")
    hold = c["signal_type"] == "HOLD"
    assert all(r in HOLD_REASONS for r in c["reason"][hold]), reasons
    assert all(d for d in c["reason_detail"][hold])
    assert all(r is None for r in c["reason"][~hold]) and all(d is None for d in c["reason_detail"][~hold])
    assert reasons["edge_below_costs"] > 0 and reasons["features_unavailable"] > 0  # the sample's warm-up
    # A model HOLD is a defined forecast (range, p_win, expected R, the would-be long's TP/SL); a forced one is not.
    model_hold = np.isin(c["reason"], MODEL_HOLD_REASONS)
    for k in ("pred_high_pct", "take_profit", "p_win", "expected_r", "cost_r"):
        assert np.isfinite(c[k][model_hold]).all(), k
    forced = np.isin(c["reason"], FORCED_HOLD_REASONS)
    assert np.isnan(c["take_profit"][forced]).all() and (c["confidence"][forced] == 0).all()
    assert set(c["fee_profile"]) == {SETTINGS.fee_profile}
    if not policy["trade"]:
        assert kinds["BUY"] == kinds["SELL"] == 0 and set(c["reason"][~forced]) == {"edge_below_costs"}
        return
    assert kinds["BUY"] + kinds["SELL"] > 0, kinds
    trades = ~hold
    assert (c["expected_r"][trades] > policy["min_expected_r"]).all() and (c["expected_r"][trades] > 0).all()
    # With a confidence floor at the median BUY/SELL p_win, the weaker half become low_confidence HOLDs.
    floor = float(np.median(c["confidence"][trades]))
    f = _replay(SETTINGS.model_copy(update={"signal_min_confidence": floor}), horizon)
    low = f["reason"] == "low_confidence"
    assert (f["signal_type"][low] == "HOLD").all() and (f["confidence"][low] < floor).all()
    assert np.array_equal(low, trades & (c["confidence"] < floor))
    assert all(f"below the confidence floor {floor:g}" in d for d in f["reason_detail"][low])
    kept = f["signal_type"] != "HOLD"
    assert kept.sum() > 0 and (f["confidence"][kept] >= floor).all()
    assert np.array_equal(f["signal_type"][kept], c["signal_type"][kept])
