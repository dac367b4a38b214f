"""deployments.outbox.Outbox without a cluster: a MarketData actor's concurrent deliveries travel as
one ``on_close`` call, each event still succeeds or fails on its own, a lone one goes by ``on_candles``."""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.feed import CandleEvent, FeedClock
from deployments.outbox import Outbox
from configs.errors import MarketDataError


class _Call:
    """What ``handle.method.remote(...)`` gives: an awaitable."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def remote(self, *args):
        return self.fn(*args)


class StubRouter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.on_close = _Call(self._on_close)
        self.on_candles = _Call(self._on_candles)

    async def _on_close(self, events):
        self.calls.append(("on_close", [e.symbol for e in events]))
        return [{"symbol": e.symbol, "failed": "shard down"} if e.symbol == "BAD" else
                {"symbol": e.symbol, "needs_history": False} for e in events]

    async def _on_candles(self, event):
        self.calls.append(("on_candles", [event.symbol]))
        return {"symbol": event.symbol, "needs_history": False}


def _event(symbol: str) -> CandleEvent:
    return CandleEvent(symbol, np.array([0], dtype=np.int64), np.ones((1, 5)), "live", FeedClock(0.0, 300_000.0),
                       "test")


def test_concurrent_deliveries_are_one_call_and_fail_one_by_one():
    async def run():
        router = StubRouter()
        outbox = Outbox(router)
        symbols = ["A", "B", "BAD", "C"]
        results = await asyncio.gather(*(outbox.send(_event(s)) for s in symbols), return_exceptions=True)
        lone = await outbox.send(_event("D"))
        return router.calls, results, lone

    calls, results, lone = asyncio.run(run())
    assert calls == [("on_close", ["A", "B", "BAD", "C"]), ("on_candles", ["D"])]
    assert [r["symbol"] for r in results if isinstance(r, dict)] == ["A", "B", "C"]
    assert isinstance(results[2], MarketDataError) and "shard down" in str(results[2])
    assert lone["symbol"] == "D"


def test_a_failed_call_fails_every_event_of_it():
    async def run():
        router = StubRouter()

        async def down(events):
            raise ConnectionError("router restarting")

        router.on_close = _Call(down)
        outbox = Outbox(router)
        return await asyncio.gather(*(outbox.send(_event(s)) for s in "XY"), return_exceptions=True)

    results = asyncio.run(run())
    assert len(results) == 2 and all(isinstance(r, ConnectionError) for r in results)
