"""The router's batched candle-close pass (deployments/close.py) without a cluster: real FeatureBuilder
shards (the deployment class, called directly), the model and Redis steps recorded instead of run.

One pass over a close of four symbols on two shards is one ingest call per shard, one forecast
pass with every row for every horizon, one Redis pipeline and one publish call per shard; a shard that
does not answer holds up only its own symbols; no model publishes the candles with the error."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from deployments import close as close_module
from deployments.feed import CandleEvent, FeedClock
from deployments.hooks import NullServingLog
from deployments.prometheus import EngineMetrics
from deployments.sharding import assign
from features.candles import load_candles
from configs.errors import ModelNotFoundError
from tests.conftest import SAMPLE_DATA

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SYN001BTCUSDT", "SYN001ETHUSDT"]
OVERRIDES = {"market": {"symbols": SYMBOLS}, "feature_shards": 2}


class _Remote:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class Shard:
    """A FeatureBuilder shard as a handle sees it, counting calls (``hang``: never answers)."""

    def __init__(self, shard: int, hang: bool = False) -> None:
        from deployments.feature_builder import FeatureBuilderDeployment

        self.dep = FeatureBuilderDeployment.func_or_class(OVERRIDES, shard)
        self.calls: list[tuple[str, int]] = []
        self.hang = hang
        self.ingest_many = _Remote(self._ingest)
        self.publish_many = _Remote(self._publish)
        self.snapshot = _Remote(self._snapshot)

    async def _ingest(self, events):
        self.calls.append(("ingest_many", len(events)))
        if self.hang:
            await asyncio.sleep(3600)
        return await self.dep.ingest_many(events)

    async def _snapshot(self, after, timeout_s):
        self.calls.append(("snapshot", 1))
        return await self.dep.snapshot(after, timeout_s)

    async def _publish(self, items):
        self.calls.append(("publish_many", len(items)))
        return await self.dep.publish_many(items)


def _router(shards: list[Shard], ensemble=None):
    from configs.settings import load_settings
    from deployments.router import EnsembleRouter

    router = object.__new__(EnsembleRouter.func_or_class)  # the real methods, without Serve
    router.settings = load_settings(**OVERRIDES)
    router.fbs, router.log, router.metrics, router.candles = shards, NullServingLog(), EngineMetrics(False), 0
    router.forecasts, router.cached = [], []
    versions = {"range_predictor": "v1"}
    router._require = lambda: ensemble if ensemble is not None else SimpleNamespace(versions=versions)

    async def forecast(ens, rows):  # every horizon in one pass (one call per pool: deployments/pool_forecast.py)
        horizons = tuple(router.settings.market.horizons)
        router.forecasts.append((horizons, sorted(r.symbol for r in rows)))
        return [SimpleNamespace(symbol=r.symbol, horizon=h) for h in horizons for r in rows]

    async def cache(forecasts, rows, *, publish, ttl_s=None):
        router.cached.append((len(forecasts), publish, sorted(ttl_s)))

    router._forecast, router._cache = forecast, cache
    return router


def _history(symbol: str, n: int = 1100) -> CandleEvent:
    from configs.symbols import real_symbol
    from features.synthetic import synthetic_candles

    df = load_candles(SAMPLE_DATA / f"{real_symbol(symbol)}_5m.parquet")
    if symbol != real_symbol(symbol):
        df = synthetic_candles(symbol, df)
    df = df.iloc[:n]
    return CandleEvent(symbol, df["open_time"].to_numpy(np.int64),
                       df[["open", "high", "low", "close", "volume"]].to_numpy(np.float64), "history",
                       FeedClock(0.0, float(df["open_time"].iloc[-1]) + 300_000), "test")


def test_one_pass_is_one_call_per_shard_and_one_forecast_pass_for_every_horizon():
    shards = [Shard(0), Shard(1)]
    router = _router(shards)
    out = asyncio.run(router.close_candles([_history(s) for s in SYMBOLS]))
    assert all(o["published"] and o["error"] is None for o in out), out
    owned = assign(SYMBOLS, 2)
    for shard, mine in zip(shards, owned):
        assert shard.calls == [("ingest_many", len(mine)), ("publish_many", len(mine))]
    assert router.forecasts == [(tuple(router.settings.market.horizons), sorted(SYMBOLS))]
    assert router.cached == [(4 * len(router.settings.market.horizons), True, sorted(SYMBOLS))]
    assert router.candles == 4


def test_a_shard_that_does_not_answer_holds_up_only_its_own_symbols(monkeypatch):
    monkeypatch.setattr(close_module, "SHARD_CALL_TIMEOUT_S", 0.2)
    shards = [Shard(0), Shard(1, hang=True)]
    router = _router(shards)
    events = [_history(s) for s in SYMBOLS]
    out = asyncio.run(router.close_candles(events))
    owned = assign(SYMBOLS, 2)
    for e, o in zip(events, out):
        if e.symbol in owned[0]:
            assert isinstance(o, dict) and o["published"], o
        else:
            assert isinstance(o, TimeoutError) and "shard 1" in str(o)  # its actor retries it
    assert router.forecasts[0][1] == sorted(owned[0])


def test_no_model_publishes_the_candles_with_the_error():
    shards = [Shard(0), Shard(1)]

    def missing():
        raise ModelNotFoundError("no model to serve")

    router = _router(shards)
    router._require = missing
    out = asyncio.run(router.close_candles([_history(s) for s in SYMBOLS]))
    assert all("no model to serve" in o["error"] for o in out), out
    states = {s: st for sh in shards for s, st in sh.dep.state.states.items()}
    assert all(not st.published and "no model" in st.publish_error for st in states.values())


def test_a_symbol_no_shard_holds_fails_only_its_event():
    router = _router([Shard(0), Shard(1)])
    out = asyncio.run(router.close_candles([_history("BTCUSDT"), _history("SYN002BTCUSDT")]))
    assert out[0]["published"]
    with pytest.raises(Exception, match="not one of the engine's symbols"):
        raise out[1]


def test_a_start_of_every_feed_at_once_asks_each_shard_once_for_the_newest_candles():
    """Every symbol's feed asks the router where to resume at once (deployments/market_data.py): one
    snapshot per shard answers them all, not one whole-shard snapshot per symbol."""
    shards = [Shard(0), Shard(1)]
    router = _router(shards)
    events = [_history(s) for s in SYMBOLS]

    async def go():
        await router.close_candles(events)
        for shard in shards:
            shard.calls.clear()
        return await router.newest_candles([*SYMBOLS, "NOTHELDUSDT"])  # what one batch of concurrent asks runs

    newest = asyncio.run(go())
    assert newest == [int(e.open_time[-1]) for e in events] + [None]
    assert [shard.calls for shard in shards] == [[("snapshot", 1)], [("snapshot", 1)]]
