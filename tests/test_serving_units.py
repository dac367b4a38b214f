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
from features.errors import (ConfigError, FeatureError, MarketDataError, ModelLoadError, ModelNotFoundError,
                             PredictionError)
from features.indicators import WARMUP
from tests.conftest import free_port
from tests.fake_binance import load_test_candles

ROOT = Path(__file__).resolve().parents[1]


def test_api_keys_identify_only_configured_keys():
    keys = ApiKeys(["alpha-key", "beta-key"])
    assert keys.identify("beta-key") == key_id("beta-key") != key_id("alpha-key")
    for bad in (None, "", "alpha", "alpha-key ", "x" * 10_000):
        assert keys.identify(bad) is None
    assert len(key_id("alpha-key")) == 12 and "alpha" not in key_id("alpha-key")


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
    from deployments.feature_builder import MarketState

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
    # A bad candle is refused and the next one starts a new segment (features undefined again).
    bad = candles.iloc[WARMUP: WARMUP + 1].copy()
    bad["low"] = -1.0
    res = state.ingest(_event(bad))
    assert res.rejected and res.open_time == int(candles.open_time[WARMUP - 1])
    res = state.ingest(_event(candles.iloc[WARMUP + 1: WARMUP + 2]))
    assert res.process and res.row is None and state.snapshot().symbols["BTCUSDT"].history == 1
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
    from deployments.feed import BinanceSource, ReplaySource
    from deployments.market_data import make_source

    src = make_source(load_settings(feed="binance", binance_api_url="http://127.0.0.1:1",
                                    binance_ws_url="ws://127.0.0.1:1/ws"), "ETHUSDT")
    assert isinstance(src, BinanceSource) and src.history >= WARMUP and src.api_url == "http://127.0.0.1:1"
    rep = make_source(load_settings(replay_speed=5, replay_history=1200), "BTCUSDT")
    assert isinstance(rep, ReplaySource) and rep.speed == 5 and rep.status.source == "replay:BTCUSDT_5m.parquet"


def test_serve_config_yaml_deploys_the_app_builder_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import build_app
    from deployments.models import POOL_NAMES

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "deployments.app:build_app" and app.route_prefix == "/"
    names = {d.name for d in app.deployments}
    assert names == {"ApiIngress", "EnsembleRouter", "FeatureBuilder", "MarketFeed", *POOL_NAMES.values()}
    assert all(d.autoscaling_config for d in app.deployments if d.name in POOL_NAMES.values())
    assert build_app(app.args) is not None
    with pytest.raises(ConfigError, match="replay_sped"):
        build_app({"replay_sped": 3})
