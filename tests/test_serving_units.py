"""Serving parts that need no cluster: keys, the rate limiter (local and in the real Redis), the
Redis breaker, the FeatureBuilder's market state, the log hook loader, the error mapping, the
feed factory and serve_config.yaml."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from configs.settings import load_settings
from deployments.auth import ApiKeys, LocalLimiter, key_id, retry_after_header
from deployments.cache import CacheUnavailable, RedisGateway
from deployments.errors import StaleMarketData, status_for
from deployments.feed import CandleEvent, FeedClock, find_gaps
from features.candles import FIVE_MINUTES_MS
from configs.errors import (ConfigError, FeatureError, MarketDataError, ModelLoadError, ModelNotFoundError,
                             PredictionError)
from features.indicators import WARMUP
from tests.conftest import free_port
from scripts.lab.fake_binance import load_test_candles

ROOT = Path(__file__).resolve().parents[1]
UNIT_KEY = "unit-test-key-of-24-chars+"


def test_api_keys_identify_only_configured_keys():
    alpha, beta, secret = "alpha-key-" + "a" * 20, "beta-key-" + "b" * 20, b"deployment secret"
    keys = ApiKeys([alpha, beta], secret)
    assert keys.identify(beta) == key_id(beta, secret) != key_id(alpha, secret)
    for bad in (None, "", "alpha", alpha + " ", "x" * 10_000):
        assert keys.identify(bad) is None
    assert len(key_id(alpha, secret)) == 16 and "alpha" not in key_id(alpha, secret)


def test_local_limiter_is_a_gcra_bucket():
    now = [1000.0]
    lim = LocalLimiter(100, clock=lambda: now[0])
    assert [lim.check("k") for _ in range(100)] == [0.0] * 100
    wait = lim.check("k")
    assert wait == pytest.approx(0.6)
    assert lim.check("other") == 0.0
    now[0] += 0.6
    assert lim.check("k") == 0.0 and lim.check("k") > 0
    assert retry_after_header(0.01) == "1" and retry_after_header(1.2) == "2"


def test_redis_rate_limit_and_breaker():
    async def scenario():
        gw = RedisGateway("redis://127.0.0.1:6379/0", timeout_s=1.0, retry_s=0.5)
        key = f"ratelimit:test-{uuid.uuid4().hex}"
        waits = [await gw.rate_limit(key, 10) for _ in range(11)]
        await gw._redis.delete(key)
        await gw.close()
        down = RedisGateway(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.25, retry_s=30)
        t0 = time.perf_counter()
        with pytest.raises(CacheUnavailable):
            await down.get("x")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        with pytest.raises(CacheUnavailable):  # the breaker is open: no connection attempt at all
            await down.rate_limit("k", 10)
        second = time.perf_counter() - t0
        status = down.status()
        await down.close()
        return waits, first, second, status

    waits, first, second, status = asyncio.run(scenario())
    assert waits[:10] == [0.0] * 10 and 5.0 < waits[10] <= 6.0  # 10/min: one more in 6 s
    assert first < 1.0 and second < 0.01
    assert status["status"] == "down" and "Connection" in status["last_error"]


def _event(df, kind="live", previous=None) -> CandleEvent:
    t = df["open_time"].to_numpy(np.int64)
    return CandleEvent("BTCUSDT", t, df[["open", "high", "low", "close", "volume"]].to_numpy(np.float64), kind,
                       FeedClock(time.time(), float(t[-1] + FIVE_MINUTES_MS), 1.0), "test", find_gaps(t, previous))


def test_market_state_ingests_publishes_and_restarts_after_bad_candles():
    from deployments.market_state import MarketState

    candles = load_test_candles("BTCUSDT", WARMUP + 20)
    state = MarketState()
    res = state.ingest(_event(candles.iloc[: WARMUP - 1], "history"))
    assert res.process and res.row is None and "1000 contiguous candles" in res.reason
    res = state.ingest(_event(candles.iloc[WARMUP - 1: WARMUP]))
    assert res.process and res.row is not None and res.row.open_time == int(candles.open_time[WARMUP - 1])
    assert res.row.close == float(candles.close[WARMUP - 1])
    version = state.version
    assert state.publish("BTCUSDT", res.open_time, {"m": "v1"}, None) and state.version == version + 1
    snap = state.snapshot()
    assert snap.symbols["BTCUSDT"].published and snap.symbols["BTCUSDT"].model_versions == {"m": "v1"}
    # The same candle again (a delivery retried after a timeout): nothing to do.
    again = state.ingest(_event(candles.iloc[WARMUP - 1: WARMUP]))
    assert not again.process and again.accepted == 0
    # A bad candle is refused; the next one bridges its slot (a one-candle gap: no warm-up restart).
    bad = candles.iloc[WARMUP: WARMUP + 1].copy()
    bad["low"] = -1.0
    res = state.ingest(_event(bad))
    assert res.rejected and res.open_time == int(candles.open_time[WARMUP - 1])
    res = state.ingest(_event(candles.iloc[WARMUP + 1: WARMUP + 2]))
    assert res.process and res.row is not None and state.snapshot().symbols["BTCUSDT"].history == WARMUP
    assert res.row.features[list(state.builder.names).index("bridged_288")] == 1.0
    # An older publish (a newer candle arrived meanwhile) changes nothing.
    assert not state.publish("BTCUSDT", int(candles.open_time[WARMUP - 1]), {}, None)
    with pytest.raises(Exception, match="not one of the engine's symbols"):
        state.ingest(CandleEvent("DOGEUSDT", res.row.features[:1].astype(np.int64) if res.row else
                                 np.array([0]), np.ones((1, 5)), "live", FeedClock(0, 0), "t"))


def test_error_mapping():
    assert status_for(StaleMarketData("old", 1000.0)) == (503, "stale_market_data")
    assert status_for(MarketDataError("x"))[0] == 503
    assert status_for(ModelNotFoundError("x")) == (503, "model_not_found")
    assert status_for(ModelLoadError("x"))[0] == 503
    assert status_for(FeatureError("x"))[0] == 503
    assert status_for(PredictionError("x"))[0] == 503
    assert status_for(ConfigError("x"))[0] == 500


def test_serving_log_loader():
    from deployments.hooks import JsonLinesServingLog, NullServingLog, load_serving_log

    assert isinstance(load_serving_log(load_settings(serving_log=""), "router"), NullServingLog)
    s = load_settings(serving_log="deployments.hooks:JsonLinesServingLog", spool_dir="/tmp/mle-hook-test")
    assert isinstance(load_serving_log(s, "ingress"), JsonLinesServingLog)
    for bad in ("nocolon", "deployments.hooks:Missing", "no.such.module:x"):
        with pytest.raises(ConfigError, match="serving_log"):
            load_serving_log(load_settings(serving_log=bad), "router")


def test_feed_factory_builds_the_configured_source():
    from deployments.binance_feed import BinanceSource
    from deployments.feed import ReplaySource
    from deployments.market_data import make_source

    src = make_source(load_settings(feed="binance", binance_api_url="http://127.0.0.1:1",
                                    binance_ws_url="ws://127.0.0.1:1/ws"), "ETHUSDT")
    assert isinstance(src, BinanceSource) and src.history >= WARMUP and src.api_url == "http://127.0.0.1:1"
    rep = make_source(load_settings(replay_speed=5, replay_history=1200), "BTCUSDT")
    assert isinstance(rep, ReplaySource) and rep.speed == 5 and rep.status.source == "replay:BTCUSDT_5m.parquet"


def test_serve_config_yaml_deploys_the_app_builder_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import build_app
    from deployments.model_pools import POOL_NAMES

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "deployments.app:build_app" and app.route_prefix == "/"
    names = {d.name for d in app.deployments}
    assert names == {"ApiIngress", "EnsembleRouter", "FeatureBuilder", "MarketFeed", *POOL_NAMES.values()}
    assert all(d.autoscaling_config for d in app.deployments if d.name in POOL_NAMES.values())
    assert build_app(app.args) is not None
    with pytest.raises(ConfigError, match="replay_sped"):
        build_app({"replay_sped": 3})


def _service_app(backend, **overrides):
    """The real FastAPI app and request logic, with a stand-in backend (no cluster needed)."""
    from deployments.api import create_app
    from deployments.market_state import MarketState
    from deployments.prometheus import EngineMetrics
    from deployments.service import PredictionService

    settings = load_settings(api_keys=[UNIT_KEY], redis_url=f"redis://127.0.0.1:{free_port()}/0", serving_log="",
                             **overrides)
    service = PredictionService(settings, backend, redis=None, metrics=EngineMetrics(use_ray=False))
    state = MarketState()
    candles = load_test_candles("BTCUSDT", WARMUP + 5)
    t = candles["open_time"].to_numpy(np.int64)
    ev = CandleEvent("BTCUSDT", t, candles[["open", "high", "low", "close", "volume"]].to_numpy(np.float64),
                     "history", FeedClock(time.time(), float(t[-1] + FIVE_MINUTES_MS), 1.0), "test")
    res = state.ingest(ev)
    state.publish("BTCUSDT", res.open_time, {}, None)
    service.set_market(state.snapshot())

    async def db():
        return {"status": "up"}

    async def text():
        return ""

    return create_app(service, database_health=db, metrics_text=text), service


def _call(app, method: str, path: str, **kw):
    import httpx

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, headers={"X-API-Key": UNIT_KEY}, **kw)

    return asyncio.run(go())


def test_no_model_and_a_failing_graph_are_503_never_500():
    import ray.exceptions

    class NoModel:
        async def forecast(self, rows, horizon):
            raise ModelNotFoundError("no model to serve: the registry is empty")

        async def models_status(self):
            return {"loaded": False, "versions": {}, "models": {}}

        async def runtime_status(self):
            return {}

    class Broken(NoModel):
        async def forecast(self, rows, horizon):
            raise ray.exceptions.RayActorError()

    app, _ = _service_app(NoModel())
    r = _call(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 6})
    assert r.status_code == 503 and r.json()["error"] == "model_not_found" and "registry is empty" in r.json()["message"]
    # ETHUSDT has no market data at all in this app.
    r = _call(app, "POST", "/signals", json={"symbol": "ETHUSDT"})
    assert r.status_code == 503 and r.json()["error"] == "market_data_unavailable"
    app, _ = _service_app(Broken())
    r = _call(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 18})
    assert r.status_code == 503 and r.json()["error"] == "prediction_unavailable" and r.headers["Retry-After"]


def test_undefined_features_give_503_for_predictions_and_hold_with_a_reason_for_signals():
    from configs.settings import load_settings as ls
    from inference.forecast import Forecast

    nan = float("nan")

    class Undefined:
        async def forecast(self, rows, horizon):
            r = rows[0]
            return [Forecast(symbol=r.symbol, horizon=horizon, candle_open_time=r.open_time, close=r.close,
                             pred_high_pct=nan, pred_low_pct=nan, high_lower=nan, high_upper=nan, low_lower=nan,
                             low_upper=nan, p_tp_long=nan, p_tp_short=nan, signal_probs=(nan, nan, nan),
                             signal_type="HOLD", confidence=0.0, entry_price=r.close, take_profit=None,
                             stop_loss=None, reason="features_unavailable", model_versions={},
                             reason_detail="features undefined (warm-up or a long data gap): 3 of 54 "
                             "values missing")]

        async def models_status(self):
            return {"loaded": True, "versions": {}, "models": {}}

        async def runtime_status(self):
            return {}

    assert ls().signal_horizon is None
    app, _ = _service_app(Undefined())
    r = _call(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 6})
    assert r.status_code == 503 and r.json()["error"] == "features_unavailable" and "warm-up" in r.json()["message"]
    s = _call(app, "POST", "/signals", json={"symbol": "BTCUSDT"}).json()
    assert s["signal_type"] == "HOLD" and s["confidence"] == 0 and s["reason"] == "features_unavailable"
    assert "warm-up" in s["reason_detail"]
    assert s["take_profit"] is None and s["probabilities"] == {"SELL": None, "HOLD": None, "BUY": None}


def test_a_restarted_feature_builder_asks_for_history_and_answers_at_the_next_candle():
    """A FeatureBuilder replica restarted mid-stream must not sit out a 1000-candle warm-up: its
    empty windows ask the MarketData actor for the window it keeps (CandleWindow), and the row it
    then computes equals the one the old replica had."""
    from deployments.market_state import MarketState
    from deployments.feed import CandleWindow

    candles = load_test_candles("BTCUSDT", WARMUP + 40)
    window = CandleWindow("BTCUSDT", 2 * WARMUP)
    old = MarketState()
    for ev in (_event(candles.iloc[: WARMUP + 10], "history"), *(
            _event(candles.iloc[i: i + 1]) for i in range(WARMUP + 10, WARMUP + 30))):
        window.remember(ev)
        old.ingest(ev)
    live = _event(candles.iloc[WARMUP + 30: WARMUP + 31])
    window.remember(live)
    assert len(window) == WARMUP + 31 and window.open_time[-1] == live.last_open_time
    assert (np.diff(window.open_time) == FIVE_MINUTES_MS).all()
    expected = old.ingest(live).row

    restarted = MarketState()
    res = restarted.ingest(live)
    assert res.needs_history and not res.process and res.accepted == 0
    res = restarted.ingest(window.history_event(live.clock, "test"))
    assert not res.needs_history and res.process and res.open_time == live.last_open_time
    np.testing.assert_array_equal(res.row.features, expected.features)
    # A gap restarts the window: only the contiguous tail after it is kept.
    after_gap = _event(candles.iloc[WARMUP + 35: WARMUP + 38], previous=int(candles.open_time.iloc[WARMUP + 30]))
    window.remember(after_gap)
    assert list(window.open_time) == list(candles.open_time.iloc[WARMUP + 35: WARMUP + 38])
    small = CandleWindow("BTCUSDT", 5)
    small.remember(_event(candles.iloc[:20], "history"))
    assert list(small.open_time) == list(candles.open_time.iloc[15:20])


def test_readers_keep_their_candle_across_a_feature_builder_restart():
    from deployments.state import MarketSnapshot, SymbolState

    clock = FeedClock(time.time(), 0.0, 1.0)
    good = SymbolState("BTCUSDT", open_time=1000, close=1.0, features=np.ones(3), history=WARMUP, clock=clock,
                       published=True)
    held = MarketSnapshot(57, {"BTCUSDT": good, "ETHUSDT": SymbolState("ETHUSDT")}, epoch="a")
    # Same incarnation: the new snapshot, whatever it holds.
    assert held.adopt(MarketSnapshot(58, {"BTCUSDT": SymbolState("BTCUSDT")}, epoch="a")).symbols[
        "BTCUSDT"].open_time is None
    # A restarted FeatureBuilder (empty): the candle held is kept, under the new epoch and version.
    merged = held.adopt(MarketSnapshot(0, {"BTCUSDT": SymbolState("BTCUSDT"), "ETHUSDT": SymbolState("ETHUSDT")},
                                       epoch="b"))
    assert merged.epoch == "b" and merged.version == 0 and merged.symbols["BTCUSDT"] is good
    # ... until it has published a newer (or the same, published) candle.
    newer = SymbolState("BTCUSDT", open_time=1000 + FIVE_MINUTES_MS, close=2.0, features=np.ones(3), published=True)
    assert merged.adopt(MarketSnapshot(1, {"BTCUSDT": newer}, epoch="b")).symbols["BTCUSDT"] is newer
    unpublished = SymbolState("BTCUSDT", open_time=1000, close=1.0, features=np.ones(3), published=False)
    assert held.adopt(MarketSnapshot(1, {"BTCUSDT": unpublished}, epoch="c")).symbols["BTCUSDT"] is good
