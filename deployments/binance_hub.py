"""One connection to Binance for many symbols: combined kline streams and weight-paced REST.

Why: one websocket per symbol and unpaced REST do not scale to hundreds of pairs. Binance serves up
to 1024 streams on one combined connection (``/stream?streams=a@kline_5m/b@kline_5m``, messages
wrapped as ``{"stream": ..., "data": ...}``), and limits REST by *request weight* per IP and
window: every answer carries the weight used so far in the window
(``X-MBX-USED-WEIGHT-1M``; the suffix is the window: ``<n><S|M|H|D>``), a client that goes over
gets 429 with ``Retry-After``, and one that keeps going gets 418 (an IP ban, also with
``Retry-After``). So:

* :class:`~deployments.binance_rest.WeightPacer` (:mod:`deployments.binance_rest`, with the REST
  client :class:`~deployments.binance_rest.BinanceRest`) admits a request only while the weight the
  exchange reports for the current window, plus what is in flight, stays within a budget
  (``binance_weight_budget``, below Binance's 6000/min so downloads and other clients of the IP
  keep room); otherwise it waits for the window's end on the exchange's clock. After a 429/418
  nothing is sent until ``Retry-After`` has passed. The header is the truth: other processes on the
  same IP count too.
* :class:`CombinedStream` holds one websocket per ``streams_per_connection`` symbols and forwards
  each symbol's *closed* klines to that symbol's queue; a drop puts an ``error`` message in every
  queue of the connection (each symbol then backfills over REST on its own) and a reconnect a
  ``reconnected`` one (each backfills what closed meanwhile).
* :class:`BinanceHub` is what a :class:`deployments.binance_feed.BinanceSource` talks to:
  ``get_klines`` / ``get_server_time`` (paced REST) and ``subscribe`` / ``recv`` (its queue). In
  serving one hub per MarketFeed replica runs in a Ray actor (``deployments.binance_actor``); a
  source without a hub makes a private one for its symbol.

No Ray in this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from configs.errors import MarketDataError
from deployments.binance_rest import BinanceRest, WeightPacer

log = logging.getLogger(__name__)

QUEUE_SIZE = 64  # closed klines kept per symbol for a consumer that is not reading (then: resync)


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set or ``timeout_s`` passed. Not ``asyncio.wait_for``: before Python
    3.12 it swallows a cancellation that arrives as the event is set, and a cancelled consumer
    then long-polls on for minutes."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()


async def bounded(awaitable: Any, timeout_s: float) -> Any:
    """``await awaitable`` for at most ``timeout_s`` (TimeoutError), like ``asyncio.wait_for`` but
    never swallowing a cancellation that arrives as the awaitable completes (see :func:`wait_event`)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError(f"no answer within {timeout_s:g} s")
    return task.result()


class _Queue:
    """One symbol's closed klines and connection notices, bounded (overflow: a ``reconnected``
    notice replaces what was dropped, so the consumer backfills over REST)."""

    def __init__(self) -> None:
        self.items: deque[dict[str, Any]] = deque()
        self.changed = asyncio.Event()
        self.token = 0

    def put(self, msg: dict[str, Any]) -> None:
        if len(self.items) >= QUEUE_SIZE:
            self.items.clear()
            self.items.append({"e": "reconnected", "reason": "queue overflow"})
        self.items.append(msg)
        self.changed.set()


def stream_name(symbol: str, interval: str) -> str:
    return f"{symbol.lower()}@kline_{interval}"


class CombinedStream:
    """Closed klines of many symbols over combined-stream websockets (see the module docstring)."""

    def __init__(self, symbols: Sequence[str], ws_root: str, *, interval: str = "5m",
                 streams_per_connection: int = 200, retry_s: float = 1.0, max_retry_s: float = 30.0) -> None:
        self.symbols = list(dict.fromkeys(symbols))
        self.ws_root = ws_root
        self.interval = interval
        self.per_connection = max(1, int(streams_per_connection))
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.queues = {s: _Queue() for s in self.symbols}
        self._by_stream = {stream_name(s, interval): s for s in self.symbols}
        self.chunks = [self.symbols[i:i + self.per_connection]
                       for i in range(0, len(self.symbols), self.per_connection)]
        self.connected = [False] * len(self.chunks)
        self.connects = [0] * len(self.chunks)
        self.reconnects = 0
        self.last_error: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None

    def url(self, chunk: Sequence[str]) -> str:
        return f"{self.ws_root}stream?streams=" + "/".join(stream_name(s, self.interval) for s in chunk)

    def start(self) -> None:
        if not self._tasks:
            self._session = aiohttp.ClientSession()
            self._tasks = [asyncio.create_task(self._run(i)) for i in range(len(self.chunks))]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _notify(self, chunk: Sequence[str], msg: dict[str, Any]) -> None:
        for symbol in chunk:
            self.queues[symbol].put(dict(msg))

    async def _run(self, i: int) -> None:
        """Keep connection ``i`` up: connect, forward, and after a drop reconnect with backoff."""
        chunk, delay = self.chunks[i], self.retry_s
        assert self._session is not None
        while True:
            try:
                async with self._session.ws_connect(self.url(chunk), heartbeat=None, autoping=True,
                                                    max_msg_size=0) as ws:
                    self.connected[i] = True
                    self.connects[i] += 1
                    delay = self.retry_s
                    # Every (re)connect: each symbol backfills what closed while it was not connected.
                    self._notify(chunk, {"e": "reconnected"})
                    async for frame in ws:
                        if frame.type == aiohttp.WSMsgType.TEXT:
                            self._forward(frame.data)
                        elif frame.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                            break
                problem = "connection closed"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            self.connected[i] = False
            self.reconnects += 1
            self.last_error = f"websocket {i}: {problem}"[:300]
            log.warning("Binance %s (%d streams); reconnecting in %.1fs", self.last_error, len(chunk), delay)
            self._notify(chunk, {"e": "error", "type": "disconnected", "m": problem[:200]})
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_retry_s)

    def _forward(self, text: str) -> None:
        try:
            msg = json.loads(text)
            symbol = self._by_stream.get(msg.get("stream", ""))
            data = msg.get("data") or {}
            closed = data.get("e") == "kline" and bool(data["k"]["x"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("Binance stream: malformed message %.200r", text)
            return
        if symbol is not None and closed:  # open-candle updates are many and tell the engine nothing
            self.queues[symbol].put(data)

    def is_connected(self, symbol: str) -> bool:
        return self.connected[self.symbols.index(symbol) // self.per_connection]

    def status(self) -> dict[str, Any]:
        return {"connections": len(self.chunks), "connected": sum(self.connected), "streams": len(self.symbols),
                "reconnects": self.reconnects, "last_error": self.last_error}


class BinanceHub:
    """Paced REST and combined streams for ``symbols``: what every BinanceSource of a process (or,
    through a Ray actor, of a MarketFeed) shares. ``now_ms``: the exchange's time for the pacer
    (default: the local clock plus the offset the last ``GET /api/v3/time`` measured)."""

    def __init__(self, symbols: Sequence[str], *, api_url: str, ws_url: str, interval: str = "5m",
                 weight_budget: int = 4800, streams_per_connection: int = 200, retry_s: float = 1.0,
                 max_retry_s: float = 30.0, request_timeout_s: float = 15.0,
                 local: Callable[[], float] = time.time) -> None:
        from deployments.binance_feed import stream_root

        self.local = local
        self.offset_ms = 0.0
        self.pacer = WeightPacer(weight_budget, self.exchange_ms)
        self.rest = BinanceRest(api_url, self.pacer, request_timeout_s)
        self.stream = CombinedStream(symbols, stream_root(ws_url), interval=interval,
                                     streams_per_connection=streams_per_connection, retry_s=retry_s,
                                     max_retry_s=max_retry_s)

    def exchange_ms(self) -> float:
        return self.local() * 1000.0 + self.offset_ms

    async def get_klines(self, *, symbol: str, interval: str, startTime: int, limit: int) -> list:
        return await self.rest.get_klines(symbol=symbol, interval=interval, startTime=startTime, limit=limit)

    async def get_server_time(self) -> dict[str, Any]:
        t0 = self.local()
        answer = await self.rest.get_server_time()
        # The pacer's windows: the server's time at the middle of the round trip (the sources keep
        # their own lower-bound clocks for judging candles closed).
        self.offset_ms = float(int(answer["serverTime"])) - (t0 + self.local()) * 500.0
        return answer

    async def subscribe(self, symbol: str) -> tuple[int, bool]:
        """Start delivering ``symbol``'s closed klines to a new consumer: (its token, whether the
        symbol's connection is up now; if not, a ``reconnected`` message follows when it is). An
        older consumer of the symbol -- a dead actor's long poll -- is told it was superseded."""
        if symbol not in self.stream.queues:
            raise MarketDataError(f"{symbol} is not among this hub's {len(self.stream.queues)} streams")
        self.stream.start()
        q = self.stream.queues[symbol]
        q.token += 1
        q.changed.set()
        return q.token, self.stream.is_connected(symbol)

    async def recv(self, symbol: str, token: int, timeout_s: float) -> list[dict[str, Any]]:
        """The messages queued for ``symbol`` (closed klines, ``error`` / ``reconnected`` notices),
        waiting up to ``timeout_s`` for one; [] on timeout."""
        q = self.stream.queues[symbol]
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if q.token != token:
                return [{"e": "error", "type": "superseded", "m": "another consumer subscribed"}]
            if q.items:
                items = list(q.items)
                q.items.clear()
                return items
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            q.changed.clear()
            await wait_event(q.changed, left)

    async def status(self) -> dict[str, Any]:
        return {**self.stream.status(), "rest_requests": self.rest.requests, "weight": self.pacer.status()}

    async def close(self) -> None:
        await self.stream.close()
        await self.rest.close()

