"""The deployed engine logs what it serves and the resolver scores it (hook: the default PostgreSQL one).

An app of its own (``serving_app`` uses the JSON-lines hook; its models are reused) replays the sample's last candles as
fast as the graph takes them into a fresh database: every fresh candle leaves one prediction and
one signal row per symbol x horizon, equal to a direct ``Ensemble.forecast`` of that candle; rows
whose window has closed are resolved, equal to ``build_labels`` and to a scalar walk of the
signal's barriers; ``/models/status`` shows the same live figures, ``/health/detailed`` the writer,
the resolver and the drift verdict, and ``/metrics`` the ``ml_model_accuracy``/``ml_model_drift`` gauges.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from types import SimpleNamespace

import asyncpg
import httpx
import numpy as np
import pytest

from configs.settings import load_settings
from deployments.auth import write_api_keys_file
from features.labels import build_labels
from tests.conftest import SAMPLE_DATA, SYMBOLS, free_port
from scripts.lab.services import fresh_database
from scripts.lab.services import PrivateRedis
from tests.test_db_resolver import _by_hand_trade

pytestmark = pytest.mark.timeout(600)
APP, PREFIX = "ml-engine-outcomes", "/outcomes"
HORIZONS = (6, 18, 36, 72)
HISTORY, STREAM = 1100, 12


def _fetch(url: str, sql: str, *args):
    async def go():
        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()
    return asyncio.run(go())


@pytest.fixture(scope="module")
def outcomes_app(ray_cluster, serving_app, tmp_path_factory):
    """Deployed beside ``serving_app`` (whose small model set it reuses: no second training run)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from deployments.app import build_app, start_serve
    from features import load_candles

    root = tmp_path_factory.mktemp("outcomes")
    models_dir = serving_app.models_dir
    redis = PrivateRedis(root)
    redis.start()
    frames, files = {}, {}
    for s in SYMBOLS:
        frames[s] = load_candles(SAMPLE_DATA / f"{s}_5m.parquet").iloc[-(HISTORY + STREAM):].reset_index(drop=True)
        files[s] = str(root / f"{s}_5m.parquet")
        frames[s].to_parquet(files[s])
    key = secrets.token_urlsafe(24)
    with fresh_database() as url:
        overrides = {"models_dir": str(models_dir), "api_keys_file": str(write_api_keys_file(root / "api_keys", [key])),
                     "redis_url": redis.url, "database_url": url,
                     "spool_dir": str(root / "spool"), "replay_speed": 0.0, "replay_history": HISTORY,
                     "replay_files": files}
        start_serve("127.0.0.1", free_port())
        port = _get_global_client().http_config.port  # Serve may already run in this cluster
        serve.run(build_app(overrides), name=APP, route_prefix=PREFIX, blocking=False)
        try:
            feed = serve.get_deployment_handle("MarketFeed", app_name=APP)
            deadline = time.monotonic() + 300
            while True:
                try:
                    states = {s: st["state"] for s, st in feed.status.remote().result(timeout_s=30)["symbols"].items()}
                except Exception as exc:  # still deploying
                    states = {"error": str(exc)}
                if set(states) == set(SYMBOLS) and all(v == "finished" for v in states.values()):
                    break
                assert time.monotonic() < deadline, f"the replay did not finish: {states}"
                time.sleep(1.0)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}{PREFIX}", headers={"X-API-Key": key},
                                  timeout=30)
            yield SimpleNamespace(url=url, models_dir=models_dir, frames=frames, client=client)
            client.close()
        finally:
            serve.delete(APP)
            redis.stop()


def _wait_resolved(url: str, want: int, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _fetch(url, "SELECT * FROM ml.prediction_logs WHERE resolved_at IS NOT NULL")
        if len(rows) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_engine_logs_every_forecast_once_and_resolves_it_against_the_market(outcomes_app):
    from features import build_features
    from inference.ensemble import Ensemble

    settings = load_settings()
    assert settings.serving_log == "deployments.db.serving_log:make_serving_log"  # the engine's default
    ens = Ensemble.load(outcomes_app.models_dir, settings)
    url = outcomes_app.url
    fresh = np.arange(HISTORY - 1, HISTORY + STREAM)  # the history's newest candle, then each streamed one
    due = sum(int(i + h < HISTORY + STREAM) for i in fresh for h in HORIZONS)
    resolved = _wait_resolved(url, len(SYMBOLS) * due)
    preds = _fetch(url, "SELECT * FROM ml.prediction_logs")
    sigs = _fetch(url, "SELECT * FROM ml.signal_logs")
    assert len(sigs) == len(SYMBOLS) * len(fresh) * len(HORIZONS)
    assert len(resolved) == len({r["id"] for r in resolved}) == len(SYMBOLS) * due
    direct_mae, direct_cov = [], []
    for symbol in SYMBOLS:
        df = outcomes_app.frames[symbol]
        t = df["open_time"].to_numpy(np.int64)
        high, low, close = (df[k].to_numpy() for k in ("high", "low", "close"))
        feats = build_features(df, settings.features).to_numpy()
        labels = build_labels(df, HORIZONS)
        for table in (preds, sigs):  # each forecast exactly once
            keys = [(r["candle_open_time"], r["horizon"]) for r in table if r["symbol"] == symbol]
            assert sorted(keys) == sorted((int(t[i]), h) for i in fresh for h in HORIZONS)
        index = {int(x): i for i, x in enumerate(t)}
        for p in (r for r in preds if r["symbol"] == symbol):
            i, h = index[p["candle_open_time"]], p["horizon"]
            f = ens.forecast(feats[i][None, :], [symbol], [float(close[i])], [int(t[i])], h)[0]
            assert p["predicted_high"] == pytest.approx(f.pred_high_pct, rel=1e-9, abs=1e-12)
            assert p["predicted_low"] == pytest.approx(f.pred_low_pct, rel=1e-9, abs=1e-12)
            assert p["low_lower"] == pytest.approx(f.low_lower, rel=1e-9, abs=1e-12)
            assert p["model_version"] == ens.versions["range_predictor"]
            if i + h >= len(df):
                assert p["resolved_at"] is None  # its window has not closed
                continue
            fh, fl = labels[f"fut_high_{h}"].iloc[i], labels[f"fut_low_{h}"].iloc[i]
            assert (p["resolve_status"], p["actual_high"], p["actual_low"]) == ("ok", fh, fl)
            mae = (abs(p["predicted_high"] - fh) + abs(p["predicted_low"] - fl)) / 2
            assert p["mae"] == pytest.approx(mae, rel=1e-12)
            hi_in, lo_in = p["high_lower"] <= fh <= p["high_upper"], p["low_lower"] <= fl <= p["low_upper"]
            assert (p["high_inside"], p["low_inside"], p["inside_interval"]) == (hi_in, lo_in, hi_in and lo_in)
            direct_mae.append(mae)
            direct_cov.append((int(hi_in) + int(lo_in)) / 2)  # (numpy bools would add as "or")
        for s in (r for r in sigs if r["symbol"] == symbol):
            i, h = index[s["candle_open_time"]], s["horizon"]
            f = ens.forecast(feats[i][None, :], [symbol], [float(close[i])], [int(t[i])], h)[0]
            assert s["signal_type"] == f.signal_type and s["model_version"] == ens.versions["meta_model"]
            if i + h >= len(df):
                assert s["resolved_at"] is None
            elif s["signal_type"] == "HOLD":
                assert (s["resolve_status"], s["outcome"]) == ("not_traded", None)
            else:
                w = slice(i + 1, i + h + 1)
                want = _by_hand_trade(s["signal_type"] == "BUY", s["entry_price"], s["take_profit"],
                                      s["stop_loss"], high[w], low[w], close[w])
                assert (s["outcome"], s["resolve_status"]) == (want[0], "ok")
                assert s["exit_price"] == pytest.approx(want[1], rel=1e-12)
                assert s["pnl_percent"] == pytest.approx(want[2], rel=1e-9)

    client = outcomes_app.client
    deadline = time.monotonic() + 60
    while True:  # the resolver refreshes its figures at most once a second
        live = client.get("/models/status").json().get("live", {})
        figures = live.get("models", {}).get("range_predictor", {}).get(ens.versions["range_predictor"])
        if figures and figures["all"]["n"] == len(direct_mae):
            break
        assert time.monotonic() < deadline, live
        time.sleep(0.5)
    assert figures["all"]["mae"] == pytest.approx(np.mean(direct_mae), rel=1e-9)
    assert figures["all"]["interval_coverage"] == pytest.approx(np.mean(direct_cov), rel=1e-9)
    assert figures["all"]["walk_forward_mae"] > 0  # from the model's metadata.json
    assert figures["drift"]["window"] == settings.drift_window and isinstance(figures["drift"]["flag"], bool)
    # The resolver's gauges reach Prometheus through Ray's metrics agent (exported every few seconds).
    deadline = time.monotonic() + 90
    while True:
        text = client.get("/metrics").text
        gauges = {line.split("{")[0]: line for line in text.splitlines()
                  if line.startswith(("ml_model_accuracy{", "ml_model_drift{")) and 'model_name="range_predictor"' in line}
        if len(gauges) == 2:
            break
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(2.0)
    assert 0.0 <= float(gauges["ml_model_accuracy"].rsplit(" ", 1)[1]) <= 1.0  # 24 h interval coverage
    assert float(gauges["ml_model_drift"].rsplit(" ", 1)[1]) in (0.0, 1.0)
    log = client.get("/health/detailed").json()["database"]["log"]
    assert log["status"] == "up" and log["writer"]["rows_dropped"] == 0
    assert log["resolver"]["postgres"] == "up" and log["resolver"]["resolved"]["predictions"] == len(resolved)
    assert log["drift"]["model_name"] == "range_predictor" and isinstance(log["drift"]["drift"], bool)
