"""The feed-side half of outcome resolution: closed candles handed to the resolver actor, in order.

Runs in each MarketData actor (``DbServingLog.candles_closed``, role ``feed``), next to the one
candle history of the engine (:class:`deployments.feed.CandleWindow`); kept apart from the resolver
actor because it lives in another process and never blocks the candle pipeline it is called from.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

Candle = tuple[int, float, float, float]  # open_time, high, low, close: what the resolver scores with


class CandleForwarder:
    """The feed's side: hands closed candles to the resolver actor in order, never blocking the feed.

    An async Ray actor may run calls out of submission order, and a candle that overtakes its
    predecessor would make the resolver see a hole. So one call is in flight at a time: ``push``
    only queues (O(1)), and a background task sends everything queued for a symbol in one
    ``on_candles`` call, awaits it, then sends the next — a fast replay is batched, not reordered.

    It keeps no copy of what it sent: a resolver that restarted (empty history; its reply carries a
    new ``instance``) is refilled from ``history(symbol)`` -- the feed's own candles of the symbol
    (``CandleWindow.outcome_candles``) -- so rows logged before the restart can still be resolved.
    A failed call is retried. Memory: what is queued and not yet sent, at most ``keep`` per symbol.
    """

    def __init__(self, get_resolver: Callable[[], Any], keep: int = 14 * 288, retry_s: float = 1.0,
                 history: Callable[[str], list[Candle]] | None = None) -> None:
        self.get_resolver = get_resolver  # returns the actor handle; called again after a failed call
        self.history = history            # the owner's candles of a symbol (None: a restart is not refilled)
        self.actor: Any = None
        self.keep = keep
        self.retry_s = retry_s
        self._queued: dict[str, list[Candle]] = {}
        self._instance: dict[str, str] = {}
        self._task: asyncio.Task | None = None
        self.sent = 0
        self.refills = 0
        self.failures = 0
        self.last_error: str | None = None

    def push(self, symbol: str, open_time: int, high: float, low: float, close: float) -> None:
        q = self._queued.setdefault(symbol, [])
        q.append((int(open_time), float(high), float(low), float(close)))
        if len(q) > self.keep:
            del q[: len(q) - self.keep]
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while any(self._queued.values()):
            for symbol in list(self._queued):
                batch = self._queued[symbol]
                if not batch:
                    continue
                self._queued[symbol] = []
                try:
                    reply = await self._call(symbol, batch)
                    known = self._instance.get(symbol)
                    if known is not None and reply["instance"] != known:  # the resolver restarted
                        reply = await self._refill(symbol, batch) or reply
                    self._instance[symbol] = reply["instance"]
                except Exception as exc:  # resolver unreachable for now: keep the candles, retry
                    self.actor = None  # look it up (or start it) again
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("candle forwarder: resolver call failed (%s); retrying", self.last_error)
                    self._queued[symbol] = (batch + self._queued[symbol])[-self.keep:]
                    await asyncio.sleep(self.retry_s)
                    continue
                self.sent += len(batch)

    async def _refill(self, symbol: str, batch: list[Candle]) -> dict[str, Any] | None:
        """Send a restarted resolver the feed's candles of ``symbol`` (the batch just sent included)."""
        held = self.history(symbol) if self.history is not None else []
        if not held:
            return None
        newer = [c for c in batch if c[0] > held[-1][0]]
        self.refills += 1
        return await self._call(symbol, (held + newer)[-self.keep:])

    async def _call(self, symbol: str, candles: list[Candle]) -> dict[str, Any]:
        t, h, lo, c = (list(x) for x in zip(*candles))
        if self.actor is None:
            self.actor = self.get_resolver()
        return await self.actor.on_candles.remote(symbol, t, h, lo, c)

    async def drain(self) -> None:
        """Wait until every pushed candle has been handed over (tests, shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

