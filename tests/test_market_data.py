"""MarketData actors in the suite's Ray cluster, delivering to a stand-in router actor: a feed task
that dies (here during the initial history fetch) is restarted with backoff; a new actor resumes
after the newest candle the graph holds (replay); a feed that delivers nothing for two candle
intervals says ``stale`` (status, /health/detailed's feed component)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from deployments import health
from features.candles import FIVE_MINUTES_MS, load_candles
from tests.conftest import SAMPLE_DATA
from scripts.lab.fake_binance import FakeBinance, load_test_candles


def _router(newest: int | None = None):
    """A stand-in EnsembleRouter actor recording every event it is given (defined here so Ray ships
    it by value)."""
    import ray

    @ray.remote(num_cpus=0)
    class Router:
        def __init__(self, newest):
            self.newest, self.events = newest, []

        async def on_candles(self, event):
            self.events.append((event.kind, [int(x) for x in event.open_time], event.ohlcv.tolist()))
            return {"needs_history": False}

        async def newest_candle(self, symbol):
            return self.newest

        def seen(self):
            return self.events

    return Router.remote(newest)


def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_a_feed_that_dies_in_its_history_fetch_is_restarted_and_loses_nothing(ray_cluster):
    import ray

    from deployments.market_data import MarketData

    candles = load_test_candles("BTCUSDT", 1100)
    t = candles["open_time"].to_numpy(np.int64)
    now = int(t[1050]) + 100_000  # candle 1050 is open on the exchange
    with FakeBinance({"BTCUSDT": candles}, server_time_ms=lambda: now) as fake:
        fake.inject(200, body=[[1, 2]])  # a klines answer the client cannot parse: the task dies
        router = _router()
        md = MarketData.remote("BTCUSDT", router, {"feed": "binance", "binance_api_url": fake.base_url,
                                                   "binance_ws_url": f"ws://127.0.0.1:{fake.port}/ws"})
        ray.get(md.start.remote())
        try:
            events = _until(lambda: ray.get(router.seen.remote()), 60, "history after the restart")
            status = ray.get(md.status.remote())
        finally:
            ray.kill(md)
            ray.kill(router)
    assert status["restarts"] == 1 and status["running"], status
    assert len(events) == 1 and events[0][0] == "history"
    times = events[0][1]
    assert times == [int(x) for x in t[1050 - len(times):1050]] and len(times) >= 1000  # up to 1049, closed
    np.testing.assert_array_equal(np.array(events[0][2])[-1], candles.loc[1049, ["open", "high", "low", "close",
                                                                                 "volume"]].to_numpy(float))


@pytest.mark.timeout(180)
def test_a_new_replay_actor_resumes_after_the_graphs_newest_candle_and_goes_stale_when_paused(ray_cluster):
    import ray

    from deployments.market_data import MarketData

    t = load_candles(SAMPLE_DATA / "BTCUSDT_5m.parquet")["open_time"].to_numpy(np.int64)
    newest = int(t[1019])  # what the FeatureBuilder holds when the actor (re)starts
    router = _router(newest)
    md = MarketData.remote("BTCUSDT", router, {"feed": "replay", "replay_speed": 300.0, "replay_history": 1000})
    ray.get(md.start.remote())
    try:
        events = _until(lambda: (e := ray.get(router.seen.remote())) and len(e) >= 3 and e, 60, "live candles")
        ray.get(md.pause.remote())
        stale = _until(lambda: (s := ray.get(md.status.remote()))["stale"] and s, 30, "stale while paused")
        ray.get(md.resume.remote())
        delivered = stale["delivered"]
        fresh = _until(lambda: (s := ray.get(md.status.remote()))["delivered"] > delivered and s, 30, "resumed")
    finally:
        ray.kill(md)
        ray.kill(router)
    kind, times, _ = events[0]
    assert kind == "history" and times[-1] == newest and len(times) == 1000  # the window before the resume point
    live = [ts[0] for k, ts, _ in events[1:]]
    assert live[:2] == [newest + FIVE_MINUTES_MS, newest + 2 * FIVE_MINUTES_MS]  # the next candle: none skipped
    assert stale["resumed_after"] == newest and stale["state"] == "paused"
    assert health.feed_state({"symbols": {"BTCUSDT": stale}}) == "stale"
    assert health.overall({"models": "up", "market": "ok", "feed": "stale"}) == "degraded"
    assert fresh["stale"] is False and health.feed_state({"symbols": {"BTCUSDT": fresh}}) == "ok"
