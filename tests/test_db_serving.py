"""The serving graph logs what it serves and the resolver scores it (the app of ``serving_app``).

Candles stepped through the deployed engine (replayed real candles) leave one prediction and one
signal row per symbol x horizon x candle in PostgreSQL, equal to a direct ``Ensemble.forecast`` of
the same candle; once the following candles have closed the rows are resolved, equal to
``build_labels`` and to a scalar walk of the signal's barriers; ``/models/status`` shows the live
metrics and ``/health/detailed`` the writer, the resolver and the drift verdict.

The app logs to the suite's shared database (``Settings.database_url``); rows are told apart by
the model versions this session trained.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import numpy as np
import pytest

from configs.settings import load_settings
from features.labels import build_labels
from tests.conftest import SAMPLE_DATA, SYMBOLS
from tests.test_db_resolver import FEE, _by_hand_trade

pytestmark = pytest.mark.timeout(300)
HORIZONS = (6, 18, 36, 72)
STEPS = 8


def _fetch(url: str, sql: str, *args):
    async def go():
        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()
    return asyncio.run(go())


def test_candle_closes_are_logged_and_resolved_against_the_market(serving_app):
    from features import build_features, load_candles
    from training.ensemble import Ensemble

    settings = load_settings()
    assert settings.serving_log == "deployments.db.serving_log:make_serving_log"  # on by default
    assert settings.fee_rate == FEE
    key = serving_app.new_key()
    ensemble = Ensemble.load(serving_app.models_dir, settings)
    stepped: dict[str, list[int]] = {}
    serving_app.pause()
    try:
        for symbol in SYMBOLS:
            stepped[symbol] = [serving_app.step(symbol, 1)["last_open_time"] for _ in range(STEPS)]
        serving_app.wait_for_candle(key, SYMBOLS[0], stepped[SYMBOLS[0]][-1])
        with serving_app.client(key) as c:  # requests served from the cache log the same forecasts again
            for h in HORIZONS:
                assert c.post("/predictions", json={"symbol": SYMBOLS[0], "horizon": h}).status_code == 200
    finally:
        serving_app.resume()

    url = settings.database_url
    rows = {}
    for symbol in SYMBOLS:
        candles = load_candles(SAMPLE_DATA / f"{symbol}_5m.parquet")
        times = stepped[symbol]
        first = int(np.flatnonzero(candles["open_time"].to_numpy() == times[0])[0])
        upto = candles.iloc[: first + STEPS]
        features = build_features(upto, settings.features).to_numpy()
        labels = build_labels(candles, HORIZONS)
        # Wait until the forecasts of the first stepped candle are resolved for h=6 (its window has closed).
        deadline = time.monotonic() + 90
        sql = ("SELECT * FROM ml.prediction_logs WHERE symbol = $1 AND candle_open_time = ANY($2::bigint[]) "
               "AND model_version = $3 ORDER BY candle_open_time, horizon")
        while True:
            preds = _fetch(url, sql, symbol, times, ensemble.versions["range_predictor"])
            done = [p for p in preds if p["horizon"] == 6 and p["candle_open_time"] == times[0] and p["resolved_at"]]
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done, f"{symbol}: no resolved h=6 prediction of candle {times[0]}: {preds[:2]}"
        sigs = _fetch(url, sql.replace("prediction_logs", "signal_logs"), symbol, times, ensemble.versions["meta_model"])
        versions = {p["model_version"] for p in preds}
        # Exactly one row per candle x horizon of this session's models, in both tables (the shared
        # database also holds other runs' rows of the same replayed candles, under other versions).
        for table in (preds, sigs):
            keys = [(r["candle_open_time"], r["horizon"]) for r in table]
            assert len(keys) == len(set(keys)) == STEPS * len(HORIZONS), (symbol, len(keys))
        for p in preds:
            i = first + times.index(p["candle_open_time"])
            f = ensemble.forecast(features[i][None, :], [symbol], [float(candles["close"].iloc[i])],
                                  [p["candle_open_time"]], p["horizon"])[0]
            assert p["predicted_high"] == pytest.approx(f.pred_high_pct, rel=1e-9, abs=1e-12)
            assert p["predicted_low"] == pytest.approx(f.pred_low_pct, rel=1e-9, abs=1e-12)
            assert p["high_upper"] == pytest.approx(f.high_upper, rel=1e-9, abs=1e-12)
            assert p["close"] == float(candles["close"].iloc[i])
            if p["resolved_at"] is not None:
                assert p["resolve_status"] == "ok"
                assert p["actual_high"] == labels[f"fut_high_{p['horizon']}"].iloc[i]
                assert p["actual_low"] == labels[f"fut_low_{p['horizon']}"].iloc[i]
                want = (abs(p["predicted_high"] - p["actual_high"]) + abs(p["predicted_low"] - p["actual_low"])) / 2
                assert p["mae"] == pytest.approx(want, rel=1e-12)
        high, low, close = (candles[k].to_numpy() for k in ("high", "low", "close"))
        for s in sigs:
            i = first + times.index(s["candle_open_time"])
            if s["resolved_at"] is None:
                continue
            if s["signal_type"] == "HOLD":
                assert s["resolve_status"] == "not_traded" and s["outcome"] is None
                continue
            w = slice(i + 1, i + s["horizon"] + 1)
            want = _by_hand_trade(s["signal_type"] == "BUY", s["entry_price"], s["take_profit"], s["stop_loss"],
                                  high[w], low[w], close[w])
            assert (s["outcome"], s["resolve_status"]) == (want[0], "ok")
            assert s["exit_price"] == pytest.approx(want[1], rel=1e-12)
            assert s["pnl_percent"] == pytest.approx(want[2], rel=1e-9)
            assert s["r_multiple"] == pytest.approx(want[3], rel=1e-9)
        rows[symbol] = (preds, versions)

    with serving_app.client(key) as c:
        deadline = time.monotonic() + 30
        while True:
            status = c.get("/models/status").json()
            live = status["live"]["models"]["range_predictor"] if "models" in status.get("live", {}) else {}
            if any(v in live and live[v]["all"]["n"] > 0 for _, vs in rows.values() for v in vs):
                break
            assert time.monotonic() < deadline, status.get("live")
            time.sleep(0.5)
        health = c.get("/health/detailed").json()
    version = next(v for _, vs in rows.values() for v in vs if v in live)
    figures = live[version]
    assert set(figures) == {"24h", "7d", "all", "drift"}
    assert figures["all"]["mae"] > 0 and 0 <= figures["all"]["interval_coverage"] <= 1
    assert figures["all"]["walk_forward_mae"] > 0  # read from the model's metadata.json
    assert "flag" in figures["drift"] and figures["drift"]["window"] == settings.drift_window
    resolved = _fetch(url, "SELECT count(*) AS n FROM ml.prediction_logs WHERE model_version = $1 AND mae IS NOT NULL",
                      version)[0]["n"]
    assert 0 < figures["all"]["n"] <= resolved
    log = health["database"]["log"]
    assert log["status"] == "up" and log["writer"]["postgres"] == "up" and log["writer"]["rows_dropped"] == 0
    assert log["resolver"]["postgres"] == "up" and log["resolver"]["resolved"]["predictions"] > 0
    assert log["drift"]["model_name"] == "range_predictor" and isinstance(log["drift"]["drift"], bool)
