"""Training, registry and ensemble: small slices of the shipped sample, few boosting rounds."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, SAMPLE_DATA, SYMBOLS

FIVE_MIN = 300_000
SLICE_CANDLES = 3400  # per symbol: 1000 warm-up + ~2400 rows


@pytest.fixture(scope="session")
def candle_slices(tmp_path_factory) -> dict[str, Path]:
    """The newest SLICE_CANDLES candles of each shipped sample, as SYMBOL_5m.parquet files."""
    from features.candles import load_candles

    d = tmp_path_factory.mktemp("candles")
    out = {}
    for s in SYMBOLS:
        df = load_candles(SAMPLE_DATA / f"{s}_5m.parquet").iloc[-SLICE_CANDLES:].reset_index(drop=True)
        out[s] = d / f"{s}_5m.parquet"
        df.to_parquet(out[s], index=False)
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, candle_slices) -> Path:
    """A complete model set trained by the CLI's plain path (default settings, 8 rounds, 2 folds)."""
    from training.train import main

    out = tmp_path_factory.mktemp("registry") / "models"
    rc = main(["--candles", *map(str, candle_slices.values()), "--out", str(out), "--rounds", "6", "--folds", "2"])
    assert rc == 0
    return out


@pytest.fixture()
def registry_copy(trained, tmp_path) -> Path:
    dst = tmp_path / "models"
    shutil.copytree(trained, dst)
    return dst


def _prepared(candle_slices, settings=None):
    from configs.settings import get_settings
    from training.data import load_histories, prepare

    return prepare(load_histories(candle_slices), settings or get_settings())


# ---- registry ---------------------------------------------------------------------------------------
def test_registry_round_trip(trained, candle_slices):
    from configs.settings import get_settings
    from features.indicators import feature_set_hash
    from inference.ensemble import Ensemble
    from inference.registry import MODEL_NAMES, ModelRegistry, sha256_bytes

    reg = ModelRegistry(trained)
    assert reg.models() == sorted(MODEL_NAMES)
    settings = get_settings()
    for name in MODEL_NAMES:
        version = reg.current(name)
        assert reg.versions(name) == [version]
        m = reg.load(name)
        meta = m.metadata
        assert meta["feature_set_hash"] == feature_set_hash(settings.features)
        assert meta["feature_names"] and meta["data_range"]["rows"] > 0
        assert meta["xgboost_version"] and meta["code_commit"] and meta["created"]
        assert meta["walk_forward"]["embargo_candles"] == max(settings.market.horizons)
        assert meta["metrics"], f"{name} has no walk-forward metrics"
        for fname, digest in meta["files"].items():
            assert sha256_bytes((trained / name / version / fname).read_bytes()) == digest
        assert all(f.endswith(".ubj") or f.endswith(".json") for f in meta["files"])
        assert not list((trained / name / version).glob("*.pkl"))
    # The ensemble built from the registry predicts exactly what the saved boosters predict.
    ens = Ensemble.load(trained, settings)
    data = _prepared(candle_slices)
    feats = data.X[:50, :-1].astype(np.float64)
    X = ens.model_input(feats, list(data.symbol[:50]))
    raw = ens.models["tpsl_classifier"].boosters["tp_long_h6"].inplace_predict(X)
    np.testing.assert_allclose(ens.predict_stage("tpsl_classifier", X, 6)[:, 0], raw)
    fc = ens.forecast(feats, list(data.symbol[:50]), data.close[:50], data.open_time[:50], 18)
    # Every row is defined: BUY/SELL carry no reason, a HOLD the models chose says so (never a forced code).
    assert len(fc) == 50 and all((f.reason is None) == (f.signal_type != "HOLD") for f in fc)
    assert all(f.reason in (None, "edge_below_costs") for f in fc)
    k = settings.labels.min_stop_cost_multiple
    for f in fc:
        assert f.high_lower <= f.pred_high_pct <= f.high_upper and f.low_lower <= f.pred_low_pct <= f.low_upper
        assert f.signal_type in ("BUY", "SELL", "HOLD") and 0 <= f.confidence <= 1
        # The trade's economics: p_win is the confidence, costs are at most 1/k R, expected R is net of them.
        assert f.p_win == f.confidence and 0 < f.cost_r <= 1 / k + 1e-9 and f.fee_profile == settings.fee_profile
        assert math.isfinite(f.expected_r) and (f.signal_type == "HOLD" or f.expected_r > 0)
        assert abs(sum(f.signal_probs) - 1) < 1e-5 and f.model_versions == ens.versions
        json.dumps(f.model_dump(mode="json"), allow_nan=False)


def test_tampered_file_refused(registry_copy):
    from configs.errors import ModelLoadError
    from inference.registry import ModelRegistry

    reg = ModelRegistry(registry_copy)
    version = reg.current("range_predictor")
    booster = registry_copy / "range_predictor" / version / "high_h6.ubj"
    data = bytearray(booster.read_bytes())
    data[len(data) // 2] ^= 0xFF
    booster.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum mismatch for high_h6.ubj"):
        reg.load("range_predictor")
    with pytest.raises(ModelLoadError):  # promote refuses it too
        reg.promote("range_predictor", version)
    # An unlisted file slipped into a version folder is refused as well.
    version = reg.current("tpsl_classifier")
    (registry_copy / "tpsl_classifier" / version / "extra.ubj").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not in metadata.json"):
        reg.load("tpsl_classifier")
    # A deleted booster file is refused with its name.
    version = reg.current("signal_classifier")
    (registry_copy / "signal_classifier" / version / "signal_h6.ubj").unlink()
    with pytest.raises(ModelLoadError, match="signal_h6.ubj is missing"):
        reg.load("signal_classifier")


def test_feature_hash_mismatch_refused(trained):
    from configs.sections import FeatureParams
    from configs.settings import load_settings
    from configs.errors import ModelLoadError
    from inference.ensemble import Ensemble
    from inference.registry import ModelRegistry

    with pytest.raises(ModelLoadError, match="feature set"):
        ModelRegistry(trained, feature_hash="0123456789abcdef").load("meta_model")
    other = load_settings(features=FeatureParams(rsi_periods=(7, 14)))
    with pytest.raises(ModelLoadError, match="feature set"):
        Ensemble.load(trained, other)


def test_promote_and_rollback(registry_copy, capsys):
    from configs.errors import ModelNotFoundError
    from inference.registry import ModelRegistry, main

    reg = ModelRegistry(registry_copy)
    old = reg.current("signal_classifier")
    loaded = reg.load("signal_classifier")
    meta = {k: v for k, v in loaded.metadata.items() if k not in ("files", "version", "model")}
    new = "29990101T000000Z-beef"
    reg.save("signal_classifier", new, loaded.boosters, meta, promote=True)
    assert reg.current("signal_classifier") == new
    assert reg.versions("signal_classifier") == [old, new]
    assert (registry_copy / "signal_classifier" / "current").read_text().strip() == new
    # Rollback through the operator CLI.
    assert main(["--root", str(registry_copy), "promote", "signal_classifier", old]) == 0
    assert reg.current("signal_classifier") == old
    capsys.readouterr()
    assert main(["--root", str(registry_copy), "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    cur = {r["version"]: r["current"] for r in rows if r["model"] == "signal_classifier"}
    assert cur == {old: True, new: False}
    # Unknown versions are refused with a clear error and leave the pointer alone.
    with pytest.raises(ModelNotFoundError):
        reg.promote("signal_classifier", "nope")
    assert main(["--root", str(registry_copy), "promote", "signal_classifier", "nope"]) == 2
    assert reg.current("signal_classifier") == old
    with pytest.raises(FileExistsError):  # versions are immutable
        reg.save("signal_classifier", new, loaded.boosters, meta)


def test_ensemble_refuses_mixed_versions(registry_copy):
    """The meta-model was stacked on specific base versions; a mixed set is refused."""
    from configs.settings import get_settings
    from configs.errors import ModelLoadError
    from inference.ensemble import Ensemble
    from inference.registry import ModelRegistry

    reg = ModelRegistry(registry_copy)
    loaded = reg.load("range_predictor")
    meta = {k: v for k, v in loaded.metadata.items() if k not in ("files", "version", "model")}
    reg.save("range_predictor", "29990101T000000Z-0001", loaded.boosters, meta, promote=True)
    with pytest.raises(ModelLoadError, match="stacked on"):
        Ensemble.load(registry_copy, get_settings())


def test_missing_model_errors(tmp_path, registry_copy):
    from configs.settings import get_settings
    from configs.errors import ModelNotFoundError
    from inference.ensemble import Ensemble
    from inference.registry import ModelRegistry

    reg = ModelRegistry(tmp_path / "empty")
    assert reg.models() == []
    with pytest.raises(ModelNotFoundError, match="no model 'range_predictor'"):
        reg.load("range_predictor")
    with pytest.raises(ModelNotFoundError):
        reg.current("meta_model")
    with pytest.raises(ModelNotFoundError):
        Ensemble.load(tmp_path / "empty", get_settings())
    reg = ModelRegistry(registry_copy)
    with pytest.raises(ModelNotFoundError, match="no version"):
        reg.load("range_predictor", "19990101T000000Z-0000")
    shutil.rmtree(registry_copy / "meta_model")
    with pytest.raises(ModelNotFoundError, match="meta_model"):
        Ensemble.load(registry_copy, get_settings())


# ---- walk-forward -------------------------------------------------------------------------------------
def test_walk_forward_is_purged_and_embargoed(candle_slices):
    from training.data import walk_forward_splits

    data = _prepared(candle_slices)
    # Punch a real-looking gap into the timeline: splits are by time, gaps must not break them.
    t = data.open_time.copy()
    t[len(t) // 3:] += 500 * FIVE_MIN
    folds = walk_forward_splits(t, n_folds=3, embargo=72, min_train_fraction=0.5, validation_fraction=0.2)
    assert len(folds) == 3
    prev_test_end = None
    for f in folds:
        assert len(f.fit) and len(f.val) and len(f.test)
        assert not (set(f.fit) & set(f.val)) and not (set(f.fit) & set(f.test)) and not (set(f.val) & set(f.test))
        test_start = t[f.test].min()
        # No training row's label window (t+1 .. t+72 candles) reaches the first test candle.
        assert (t[f.fit] + 72 * FIVE_MIN < test_start).all()
        assert (t[f.val] + 72 * FIVE_MIN < test_start).all()
        # Gap in candles between the newest train/val row and the first test row: >= 72.
        assert (test_start - max(t[f.fit].max(), t[f.val].max())) // FIVE_MIN - 1 >= 72
        # The early-stopping tail is separated from the fit rows by the embargo too, and lies after them.
        assert (t[f.fit] + 72 * FIVE_MIN < t[f.val].min()).all()
        # Expanding windows, consecutive test blocks.
        if prev_test_end is not None:
            assert test_start > prev_test_end
        prev_test_end = t[f.test].max()
    assert set(folds[0].fit) < set(folds[1].fit) < set(folds[2].fit)
    assert folds[-1].test.max() == len(t) - 1  # the last fold runs to the end of the data


def test_labels_never_cross_the_training_end(candle_slices):
    from configs.settings import get_settings
    from training.data import load_histories, prepare

    hist = load_histories(candle_slices)
    end = int(hist["BTCUSDT"]["open_time"].iloc[-500])
    data = prepare(hist, get_settings(), end_ms=end)
    assert data.open_time.max() < end
    for h in get_settings().market.horizons:
        defined = np.isfinite(data.labels[f"fut_high_{h}"].to_numpy())
        assert (data.open_time[defined] + h * FIVE_MIN < end).all()
        assert not defined[data.open_time + h * FIVE_MIN >= end].any()


# ---- stacking -----------------------------------------------------------------------------------------
def test_meta_model_trained_only_on_out_of_fold_predictions(candle_slices):
    """Record every fit: the meta-model's rows are all out-of-fold, its inputs are the fold models'
    predictions (never the final in-sample models'), and calibration rows are unseen by it."""
    from configs.settings import get_settings
    from inference.transforms import meta_columns
    from training.engines import PlainEngine
    from training.pipeline import fit_models
    from training.train import with_overrides

    class Recording(PlainEngine):
        def __init__(self):
            super().__init__(nthread=1)
            self.calls = []

        def fit_many(self, jobs, matrices, targets, cfg, desc):
            out = super().fit_many(jobs, matrices, targets, cfg, desc)
            self.calls.append((desc, list(jobs), dict(matrices), out))
            return out

        fit_final = fit_many

    base = get_settings()
    settings = with_overrides(base.model_copy(update={"market": base.market.model_copy(update={"horizons": [6, 72]})}),
                              rounds=5, folds=2)
    data = _prepared(candle_slices, settings)
    eng = Recording()
    res = fit_models(data, settings, eng)
    (wf_desc, wf_jobs, _, wf_out), (meta_desc, meta_jobs, meta_mats, _), (final_desc, final_jobs, _, _) = eng.calls
    assert (wf_desc, meta_desc, final_desc) == ("walk-forward", "meta-model", "final refit")
    oof = res.oof_rows
    first_test = min(f.test.min() for f in res.folds)
    assert oof.min() == first_test and len(oof) == sum(len(f.test) for f in res.folds)
    embargo = max(settings.market.horizons)
    for key, M in meta_mats.items():
        assert M.shape == (len(oof), len(meta_columns()))  # one meta row per OOF row, nothing else
    # The range inputs of the meta-model are exactly the fold models' test predictions.
    h = settings.market.horizons[0]
    from inference.transforms import range_output, range_scale

    raw = {}
    for job, out in zip(wf_jobs, wf_out):
        if job.spec.horizon == h and job.spec.target in ("high", "low"):
            arr = raw.setdefault(job.spec.target, np.full((len(data), 3), np.nan))
            arr[job.predict_rows] = out.predictions
            # A fold model never predicts rows it was fit or early-stopped on, and they are embargoed.
            assert not set(job.predict_rows) & (set(job.fit_rows) | set(job.val_rows))
            assert (data.open_time[job.fit_rows] + embargo * FIVE_MIN < data.open_time[job.predict_rows].min()).all()
    atr = data.X[:, 0].astype(np.float64)
    expected = range_output(raw["high"], raw["low"], atr, h)[oof, :6] / range_scale(atr[oof], h)[:, None]
    np.testing.assert_allclose(meta_mats[f"meta_{h}"][:, :6], expected, rtol=1e-6)
    # Meta fit/val rows and calibration rows are disjoint, time-ordered and embargoed.
    mt = data.open_time[oof]
    for job in meta_jobs:
        seen = np.concatenate([job.fit_rows, job.val_rows])
        calib = job.predict_rows
        assert len(calib) and not set(seen) & set(calib)
        assert (mt[seen] + embargo * FIVE_MIN < mt[calib].min()).all()
    # Meta-labelling: the target is "the proposed side's net R > 0", fit with uniqueness weights.
    from training.meta_label import proposal_targets
    from inference.transforms import proposed_side

    sig_oof = np.full((len(data), 3), np.nan)
    for job, out in zip(wf_jobs, wf_out):
        if job.spec.horizon == h and job.spec.target == "signal":
            sig_oof[job.predict_rows] = out.predictions
    lab = {c: data.labels[c].to_numpy()[oof] for c in data.labels.columns}
    win, _, _ = proposal_targets(lab, proposed_side(sig_oof[oof]), h)
    meta_targets = eng.calls[1][3]
    assert all(job.weight == f"meta_{job.spec.horizon}:weight" and job.spec.kind == "binary" for job in meta_jobs)
    side_col = meta_columns().index("side")
    np.testing.assert_array_equal(meta_mats[f"meta_{h}"][:, side_col], proposed_side(sig_oof[oof]))
    assert len(meta_targets) == len(meta_jobs) and np.isfinite(win).sum() > 100
    # The calibrators and trade policies are JSON, stored beside the meta boosters.
    docs = res.documents["meta_model"]
    assert all(docs[f"calibration_h{x}"]["method"] in ("isotonic", "identity") for x in settings.market.horizons)
    for x in settings.market.horizons:
        pol = docs[f"policy_h{x}"]
        assert isinstance(pol["trade"], bool) and "first half" in pol["chosen_on"]
        assert pol["win_gross_r"] > 0 > pol["loss_gross_r"]
    # The interval calibration is fit on the same out-of-fold predictions, nothing in-sample.
    from inference.transforms import INTERVAL_DOCUMENT
    from training.intervals import fit_interval_calibration

    labels = data.labels
    refit = fit_interval_calibration(range_output(raw["high"], raw["low"], atr, h)[oof],
                                     labels[f"fut_high_{h}"].to_numpy()[oof], labels[f"fut_low_{h}"].to_numpy()[oof],
                                     data.symbol[oof], settings.models.quantiles)
    assert res.documents["range_predictor"][INTERVAL_DOCUMENT][str(h)] == refit


# ---- ensemble behaviour ---------------------------------------------------------------------------------
def test_ensemble_holds_with_reason_on_bad_rows(trained, candle_slices):
    from configs.settings import get_settings
    from inference.ensemble import Ensemble

    ens = Ensemble.load(trained, get_settings())
    data = _prepared(candle_slices)
    feats = data.X[:4, :-1].astype(np.float64)
    feats[0, 3] = np.nan            # a gap/warm-up row
    symbols = ["BTCUSDT", "BTCUSDT", "DOGEUSDT", "ETHUSDT"]
    closes = data.close[:4].copy()
    closes[3] = np.nan
    fc = ens.forecast(feats, symbols, closes, data.open_time[:4], 6)
    assert fc[0].signal_type == "HOLD" and fc[0].confidence == 0 and fc[0].reason == "features_unavailable"
    assert "features undefined" in fc[0].reason_detail
    assert math.isnan(fc[0].pred_high_pct) and fc[0].take_profit is None
    assert fc[1].reason in (None, "edge_below_costs") and math.isfinite(fc[1].pred_high_pct)
    assert (fc[1].take_profit is not None) and (fc[1].reason is None) == (fc[1].signal_type != "HOLD")
    # A symbol the models do not know is forecast with the default symbol_id (configs.symbols.model_symbol).
    assert fc[2].symbol == "DOGEUSDT" and math.isfinite(fc[2].pred_high_pct) and fc[2].reason != "unknown_symbol"
    assert fc[3].signal_type == "HOLD" and fc[3].reason == "market_data_invalid" and "close" in fc[3].reason_detail
    d = fc[0].model_dump(mode="json")
    json.dumps(d, allow_nan=False)
    assert d["pred_high_pct"] is None and d["signal_type"] == "HOLD" and d["reason"]
    # Staged calls give exactly what forecast() gives (what serving relies on).
    X = ens.model_input(feats, symbols)
    outs = {m: ens.predict_stage(m, X, 6) for m in ("range_predictor", "tpsl_classifier", "signal_classifier")}
    outs["meta_model"] = ens.predict_stage("meta_model", ens.meta_input(X, outs, 6), 6)
    staged = ens.compose(feats, symbols, closes, data.open_time[:4], 6, outs)
    assert json.dumps([f.model_dump(mode="json") for f in staged]) == json.dumps([f.model_dump(mode="json") for f in fc])


def _trading(ens, min_expected_r=None):
    """The ensemble with a trading policy at every horizon (the few-round test models rarely find an
    edge after costs, so their own policies mostly abstain): payoffs W = 3, L = -1 and the floor
    ``min_expected_r[h]`` (default: -10, every proposal trades)."""
    import dataclasses

    from inference.ensemble import Ensemble

    meta = ens.models["meta_model"]
    docs = dict(meta.documents)
    for h in ens.horizons:
        docs[f"policy_h{h}"] = {**docs[f"policy_h{h}"], "trade": True,
                                "min_expected_r": (min_expected_r or {}).get(h, -10.0),
                                "min_range_cost_ratio": 0.0, "win_gross_r": 3.0, "loss_gross_r": -1.0}
    return Ensemble({**ens.models, "meta_model": dataclasses.replace(meta, documents=docs)}, ens.settings)


def test_forecast_columns_equal_the_forecast_objects(trained, candle_slices):
    """Backtests read columns (``Ensemble.forecast_columns``), serving reads Forecast objects: one
    definition, so the two must agree on every field, defined rows and every kind of HOLD alike."""
    from configs.settings import get_settings
    from training.backtest.signals import forecast_frame, forecasts_to_frame
    from inference.ensemble import Ensemble

    data = _prepared(candle_slices)
    n = min(3000, len(data.close))
    feats = data.X[:n, :-1].astype(np.float64)
    feats[10, 3] = np.nan
    symbols = [("BTCUSDT", "ETHUSDT")[i % 2] for i in range(n)]
    symbols[11] = "DOGEUSDT"
    closes = data.close[:n].copy()
    closes[12], closes[13] = np.nan, -1.0
    # A policy that trades the half of the proposals with the higher expected net R.
    every = _trading(Ensemble.load(trained, get_settings()))
    median = {h: float(np.nanmedian(every.forecast_columns(feats, symbols, closes, data.open_time[:n],
                                                           h)["expected_r"])) for h in every.horizons}
    ens = _trading(every, median)
    for h in (6, 72):
        objects = forecasts_to_frame(ens.forecast(feats, symbols, closes, data.open_time[:n], h))
        columns = forecast_frame(ens, feats, symbols, closes, data.open_time[:n], h)
        pd.testing.assert_frame_equal(columns, objects)
        assert set(objects["signal_type"]) >= {"HOLD"} and objects["reason"].notna().sum() >= 4
    # Reasons too, with a confidence floor that turns some BUY/SELLs into low_confidence HOLDs:
    # every HOLD has a code (forced ones and the models' own), BUY/SELL none, in both paths.
    plain = ens.forecast_columns(feats, symbols, closes, data.open_time[:n], 72)
    trades = plain["confidence"][np.isin(plain["signal_type"], ["BUY", "SELL"])]
    assert len(trades) > 0, "the test models give no BUY/SELL to put a floor under"
    levels = np.unique(trades)  # a floor between two confidences that occur: some trades fall under it
    floor = float((levels[len(levels) // 2 - 1] + levels[len(levels) // 2]) / 2) if len(levels) > 1 \
        else float(np.nextafter(levels[0], 1.0))
    floored = Ensemble(ens.models, get_settings().model_copy(update={"signal_min_confidence": floor}))
    # A policy that finds no edge holds every proposal with edge_below_costs.
    plain_models = Ensemble.load(trained, get_settings())
    docs = {**plain_models.models["meta_model"].documents, "policy_h72": {"trade": False, "win_gross_r": 1.0,
                                                                          "loss_gross_r": -1.0}}
    import dataclasses

    silent = Ensemble({**plain_models.models, "meta_model": dataclasses.replace(
        plain_models.models["meta_model"], documents=docs)}, get_settings())
    quiet = silent.forecast_columns(feats, symbols, closes, data.open_time[:n], 72)
    defined = np.isfinite(quiet["p_win"])
    assert defined.sum() > 100 and set(quiet["reason"][defined]) == {"edge_below_costs"}
    for h in (6, 72):
        objects = floored.forecast(feats, symbols, closes, data.open_time[:n], h)
        columns = floored.forecast_columns(feats, symbols, closes, data.open_time[:n], h)
        assert [f.reason for f in objects] == columns["reason"].tolist()
        assert [f.reason_detail for f in objects] == columns["reason_detail"].tolist()
        assert [f.signal_type for f in objects] == columns["signal_type"].tolist()
        pd.testing.assert_frame_equal(forecast_frame(floored, feats, symbols, closes, data.open_time[:n], h),
                                      forecasts_to_frame(objects))
        assert all((f.reason is None) == (f.signal_type != "HOLD") for f in objects)
        assert {f.reason for f in objects} >= {"edge_below_costs", "features_unavailable", "market_data_invalid"}
    assert any(f.reason == "low_confidence" for h in (6, 72)
               for f in floored.forecast(feats, symbols, closes, data.open_time[:n], h))


def test_evaluate_cli_json(trained, candle_slices):
    start = pd.Timestamp(int(pd.read_parquet(candle_slices["BTCUSDT"])["open_time"].iloc[-1500]), unit="ms",
                         tz="UTC").strftime("%Y-%m-%d %H:%M")
    out = subprocess.run([sys.executable, "-m", "training.evaluate", "--models", str(trained), "--candles",
                          *map(str, candle_slices.values()), "--start", start, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert list(doc) == ["rows"]
    keys = {"symbol", "horizon", "n", "r2_high", "r2_low", "mae_high", "mae_low", "mean_mae_high", "mean_mae_low",
            "vol_mae_high", "vol_mae_low", "coverage_high", "coverage_low", "tpsl_auc_long", "tpsl_auc_short",
            "signal_accuracy", "signal_macro_f1", "confidence_ece"}
    assert {(r["symbol"], r["horizon"]) for r in doc["rows"]} == {(s, h) for s in SYMBOLS for h in (6, 18, 36, 72)}
    keys |= {f"{p}_{s}" for p in ("har_mae", "har_r2", "pinball", "har_pinball") for s in ("high", "low")}
    keys |= {f"{m}_{s}" for m in ("r2_mean", "r2_mean_gain") for s in ("high", "low")}
    intervals = {f"{m}_{s}_ci" for m in ("r2", "mae", "coverage", "har_r2", "r2_mean", "r2_mean_gain")
                 for s in ("high", "low")}
    for r in doc["rows"]:
        assert keys | intervals <= set(r)
        assert r["n"] > 1000 and 0 <= r["coverage_high"] <= 1 and r["mae_high"] > 0 and r["mean_mae_low"] > 0
        assert r["overlaps_training"] is True  # evaluated on its own training period: flagged in-sample
        assert r["har_source"] == "model"  # the baseline saved with the models, not a refit
        for k in keys - {"symbol", "horizon", "n"}:
            assert isinstance(r[k], float), (k, r[k])  # the HAR baseline is fitted on the slice's own history
        for k in ("mae_low", "coverage_high", "coverage_low"):  # means: their bootstrap centres on them
            lo, hi = r[f"{k}_ci"]
            assert lo <= r[k] <= hi, (k, lo, r[k], hi)
        for k in ("r2_high", "r2_mean_low", "har_r2_low"):  # ratios over ~5 day blocks: well-formed
            lo, hi = r[f"{k}_ci"]
            assert lo < hi and lo - 0.2 < r[k] < hi + 0.2, (k, lo, r[k], hi)
        assert r["pinball_high"] > 0 and r["har_pinball_low"] > 0
        assert {"ece_buy", "ece_sell", "reliability_buy", "reliability_sell", "direction_auc", "direction_n"} <= set(r)
        # The served signal on these rows: trades, share abstained, expected vs realised net R.
        assert isinstance(r["trades"], int) and 0 <= r["abstained_share"] <= 1 and 0 <= r["p_win_ece"] <= 1
        assert (r["trades"] == 0) == (r["mean_expected_r"] is None) == (r["mean_realised_r"] is None)
        for s in ("high", "low"):  # the gain is on the rows both forecasts cover (HAR needs a week's history)
            lo, hi = r[f"r2_mean_gain_{s}_ci"]
            assert lo < hi
        for s in ("high", "low"):
            assert len(r[f"coverage_{s}_by_vol_decile"]) == 10 and len(r[f"coverage_{s}_by_hour"]) == 24
            assert all(v is None or 0 <= v <= 1 for v in r[f"coverage_{s}_by_hour"])


def test_har_baseline_is_saved_with_the_range_predictor_as_json(trained, candle_slices):
    """training.train saves each symbol's HAR baseline (coefficients and scaled-target quantiles) as a
    JSON side document of the range predictor, equal to a refit on the same candles."""
    from configs.settings import get_settings
    from features.candles import load_candles
    from training.har_baseline import HAR_DOCUMENT, fit_har_baseline
    from inference.registry import ModelRegistry
    from features.indicators import feature_set_hash

    settings = get_settings()
    model = ModelRegistry(trained, feature_set_hash(settings.features)).load("range_predictor")
    assert (model.path / f"{HAR_DOCUMENT}.json").exists() and not list(model.path.glob("*.pkl"))
    saved = model.documents[HAR_DOCUMENT]
    assert set(saved) == set(SYMBOLS)
    for s in SYMBOLS:
        refit = fit_har_baseline(load_candles(candle_slices[s]), settings.market.horizons, None, settings.labels)
        for h in settings.market.horizons:
            d, r = saved[s][str(h)], refit[str(h)]
            assert d["har"]["inputs"] == r["har"]["inputs"] and d["har"]["rows"] == r["har"]["rows"] > 200
            np.testing.assert_allclose(d["har"]["coef"], r["har"]["coef"], rtol=1e-12)
            np.testing.assert_allclose(d["high"]["q"], r["high"]["q"], rtol=1e-12)
            assert d["low"]["q"][0] < d["low"]["q"][1] < d["low"]["q"][2] < 0 < d["high"]["q"][2]


def test_served_interval_is_the_calibrated_one(trained, candle_slices):
    """The range predictor's set carries interval_calibration.json; forecasts (and evaluate) serve the
    10/90% bounds moved by it, the medians and the meta-model's input stay the raw stage output; a
    set without the document serves the raw bounds."""
    from configs.settings import get_settings
    from inference.ensemble import Ensemble
    from training.evaluate import predictions
    from inference.transforms import INTERVAL_DOCUMENT, apply_interval_calibration

    ens = Ensemble.load(trained, get_settings())
    doc = ens.models["range_predictor"].documents[INTERVAL_DOCUMENT]
    assert set(doc) == {str(h) for h in ens.horizons}
    data = _prepared(candle_slices)
    rows = np.flatnonzero(np.isfinite(data.X).all(axis=1))[:300]
    feats, syms = data.X[rows, :-1].astype(np.float64), list(data.symbol[rows])
    for h in ens.horizons:
        raw = ens.predict_stage("range_predictor", ens.model_input(feats, syms), h)
        expected = apply_interval_calibration(doc[str(h)], raw, syms)
        cols = ens.forecast_columns(feats, syms, data.close[rows], data.open_time[rows], h)
        np.testing.assert_allclose(cols["high_lower"], expected[:, 0], rtol=1e-12)
        np.testing.assert_allclose(cols["low_upper"], expected[:, 5], rtol=1e-12)
        np.testing.assert_allclose(cols["pred_high_pct"], raw[:, 1], rtol=1e-12)
        assert not np.allclose(expected[:, [0, 2, 3, 5]], raw[:, [0, 2, 3, 5]])
    sub = type(data)(X=data.X[rows], columns=data.columns, feature_names=data.feature_names,
                     labels=data.labels.iloc[rows].reset_index(drop=True), open_time=data.open_time[rows],
                     symbol=data.symbol[rows], close=data.close[rows], symbols=data.symbols)
    np.testing.assert_allclose(predictions(ens, sub, 6)["range_predictor"],
                               apply_interval_calibration(doc["6"], ens.predict_stage(
                                   "range_predictor", ens.model_input(feats, syms), 6), syms), rtol=1e-12)
    del ens.models["range_predictor"].documents[INTERVAL_DOCUMENT]
    bare = Ensemble(ens.models, get_settings())  # a set saved before the calibration existed
    cols = bare.forecast_columns(feats, syms, data.close[rows], data.open_time[rows], 6)
    raw = bare.predict_stage("range_predictor", bare.model_input(feats, syms), 6)
    np.testing.assert_allclose(cols["high_lower"], raw[:, 0], rtol=1e-12)


def test_mean_forecast_beside_the_quantiles(trained, candle_slices):
    """The range predictor has squared-error mean boosters; their forecasts reach Forecast and the
    evaluate JSON; a model set without them (trained before they existed) still serves, mean = NaN."""
    from configs.settings import get_settings
    from inference.ensemble import Ensemble

    ens = Ensemble.load(trained, get_settings())
    data = _prepared(candle_slices)
    rows = np.flatnonzero(np.isfinite(data.X).all(axis=1))[:300]
    feats, syms = data.X[rows, :-1].astype(np.float64), list(data.symbol[rows])
    closes, times = data.close[rows], data.open_time[rows]
    X = ens.model_input(feats, syms)
    for h in ens.horizons:
        assert {f"high_mean_h{h}", f"low_mean_h{h}"} <= set(ens.models["range_predictor"].boosters)
        out = ens.predict_stage("range_predictor", X, h)
        assert out.shape == (len(rows), 8) and np.isfinite(out).all()
        raw = ens.models["range_predictor"].boosters[f"high_mean_h{h}"].inplace_predict(X)
        scale = np.sqrt(h) * np.maximum(feats[:, ens.feature_names.index("atr_14")], 1e-4)
        np.testing.assert_allclose(out[:, 6], np.asarray(raw) * scale, rtol=1e-6)
    with_mean = ens.forecast(feats, syms, closes, times, 6)
    assert all(math.isfinite(f.pred_high_mean_pct) and math.isfinite(f.pred_low_mean_pct) for f in with_mean)
    for h in ens.horizons:
        for t in ("high_mean", "low_mean"):
            del ens.models["range_predictor"].boosters[f"{t}_h{h}"]
    without = ens.forecast(feats, syms, closes, times, 6)
    assert [f.reason for f in without] == [f.reason for f in with_mean]
    assert [f.pred_high_pct for f in without] == [f.pred_high_pct for f in with_mean]
    assert all(math.isnan(f.pred_high_mean_pct) and f.model_dump(mode="json")["pred_low_mean_pct"] is None for f in without)


def test_per_symbol_models_route_rows_by_symbol(candle_slices, tmp_path):
    """models.per_symbol trains one booster per symbol; the ensemble sends each row to its symbol's."""
    from configs.settings import get_settings
    from inference.ensemble import Ensemble
    from inference.registry import ModelRegistry
    from training.engines import PlainEngine
    from training.pipeline import fit_models
    from training.train import save_models, with_overrides

    base = get_settings()
    settings = with_overrides(base.model_copy(update={"market": base.market.model_copy(update={"horizons": [6]})}),
                              rounds=3, folds=2, per_symbol=True)
    data = _prepared(candle_slices, settings)
    out = fit_models(data, settings, PlainEngine(nthread=1))
    assert set(out.boosters["range_predictor"]) == {f"{t}_h6__{s}" for t in ("high", "low", "high_mean", "low_mean")
                                                        for s in SYMBOLS}
    save_models(out, ModelRegistry(tmp_path), settings, {
        "data_range": data.data_range(), "symbols": list(data.symbols), "horizons": [6], "per_symbol": True,
        "feature_names": list(data.feature_names), "model_columns": list(data.columns)}, "plain")
    ens = Ensemble.load(tmp_path, settings)
    rows = np.arange(0, len(data), 97)
    X = ens.model_input(data.X[rows, :-1].astype(np.float64), list(data.symbol[rows]))
    got = ens.predict_stage("tpsl_classifier", X, 6)[:, 0]
    for s in SYMBOLS:
        m = data.symbol[rows] == s
        want = ens.models["tpsl_classifier"].boosters[f"tp_long_h6__{s}"].inplace_predict(X[m])
        np.testing.assert_allclose(got[m], want)
