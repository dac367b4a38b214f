"""Delivery of a MarketData actor's candle events to the EnsembleRouter, coalesced per close.

Why: with hundreds of symbols, a Ray call per symbol per close costs more than the forecasts it
carries; the symbols one actor streams close together, so their events travel together.
"""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.feed import CandleEvent
from configs.errors import MarketDataError

DELIVERY_TIMEOUT_S = 30.0  # one delivery attempt (the router computes every horizon); then it is retried


class Outbox:
    """Coalesces an actor's concurrent deliveries (its symbols' candles of one close) into one
    ``router.on_close`` call instead of a Ray call per symbol; a lone event goes by ``on_candles``.

    Each event still succeeds or fails on its own: a failed one raises in its symbol's
    :meth:`SymbolFeed._deliver`, which retries it. One attempt is bounded by ``DELIVERY_TIMEOUT_S``
    (a router replica that died mid-call must not hold the symbols forever).
    """

    def __init__(self, router) -> None:
        self.router = router
        self._pending: list[tuple[CandleEvent, asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def send(self, event: CandleEvent) -> dict[str, Any]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((event, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the other symbols released in this loop iteration join the call
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                if len(batch) == 1:
                    outs = [await asyncio.wait_for(self.router.on_candles.remote(batch[0][0]), DELIVERY_TIMEOUT_S)]
                else:
                    outs = await asyncio.wait_for(self.router.on_close.remote([e for e, _ in batch]),
                                                  DELIVERY_TIMEOUT_S)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), out in zip(batch, outs):
                if fut.done():
                    continue
                if "failed" in out:
                    fut.set_exception(MarketDataError(out["failed"]))
                else:
                    fut.set_result(out)
