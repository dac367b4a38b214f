"""One connection to Binance for many symbols: combined kline streams and weight-paced REST.

Why: one websocket per symbol and unpaced REST do not scale to hundreds of pairs. Binance serves up
to 1024 streams on one combined connection (``/stream?streams=a@kline_5m/b@kline_5m``, messages
wrapped as ``{"stream": ..., "data": ...}``), and limits REST by *request weight* per IP and
window: every answer carries the weight used so far in the window
(``X-MBX-USED-WEIGHT-1M``; the suffix is the window: ``<n><S|M|H|D>``), a client that goes over
gets 429 with ``Retry-After``, and one that keeps going gets 418 (an IP ban, also with
``Retry-After``). So:

* :class:`WeightPacer` admits a request only while the weight the exchange reports for the current
  window, plus what is in flight, stays within a budget (``binance_weight_budget``, below Binance's
  6000/min so downloads and other clients of the IP keep room); otherwise it waits for the
  window's end on the exchange's clock. After a 429/418 nothing is sent until ``Retry-After`` has
  passed. The header is the truth: other processes on the same IP count too.
* :class:`CombinedStream` holds one websocket per ``streams_per_connection`` symbols and forwards
  each symbol's *closed* klines to that symbol's queue; a drop puts an ``error`` message in every
  queue of the connection (each symbol then backfills over REST on its own) and a reconnect a
  ``reconnected`` one (each backfills what closed meanwhile).
* :class:`BinanceHub` is what a :class:`deployments.binance_feed.BinanceSource` talks to:
  ``get_klines`` / ``get_server_time`` (paced REST) and ``subscribe`` / ``recv`` (its queue). In
  serving one hub per MarketFeed replica runs in a Ray actor (``deployments.market_data``); a
  source without a hub makes a private one for its symbol.

No Ray in this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from configs.errors import MarketDataError

log = logging.getLogger(__name__)

# Request weights of the endpoints the feed uses (Binance spot API docs).
KLINES_WEIGHT = 2
TIME_WEIGHT = 1
BINANCE_WEIGHT_LIMIT = 6000  # per minute per IP (exchangeInfo rateLimits REQUEST_WEIGHT)
_WEIGHT_HEADER = re.compile(r"^x-mbx-used-weight-(\d+)([smhd])$", re.IGNORECASE)
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
QUEUE_SIZE = 64  # closed klines kept per symbol for a consumer that is not reading (then: resync)


def used_weight(headers: Mapping[str, str]) -> tuple[int, int] | None:
    """(weight used in the window, window length in ms) from ``X-MBX-USED-WEIGHT-<n><unit>``."""
    for name, value in headers.items():
        m = _WEIGHT_HEADER.match(name)
        if m:
            try:
                return int(value), int(m[1]) * _UNIT_MS[m[2].lower()]
            except ValueError:
                return None
    return None


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None  # the HTTP-date form: the caller's default applies


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


class BinanceHTTPError(MarketDataError):
    """A REST answer that is not 200 (``status`` 0: no answer at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message[:200]}")
        self.status = status


class WeightPacer:
    """Admits REST requests within a weight budget per exchange window (see the module docstring).

    ``now_ms``: the exchange's time (windows start on multiples of their length of it).
    """

    def __init__(self, budget: int, now_ms: Callable[[], float], *, window_ms: int = 60_000,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        if budget < 1:
            raise ValueError("the weight budget must be at least 1")
        self.budget = int(budget)
        self.now_ms = now_ms
        self.window_ms = int(window_ms)
        self.sleep = sleep
        self.used = 0            # weight the exchange reported for window ``window``
        self.window = -1
        self.in_flight = 0
        self.blocked_until_ms = 0.0
        self.waits = 0           # admissions that had to wait for the next window
        self.rate_limited = 0    # 429 answers
        self.banned = 0          # 418 answers
        self.max_used = 0        # the most weight the exchange reported in one window
        self._lock = asyncio.Lock()

    def _used_now(self, now: float) -> int:
        return self.used if int(now // self.window_ms) == self.window else 0

    async def acquire(self, weight: int) -> None:
        """Wait until ``weight`` more fits in the current window (FIFO: one admission at a time)."""
        async with self._lock:
            while True:
                now = self.now_ms()
                if now < self.blocked_until_ms:
                    await self.sleep((self.blocked_until_ms - now) / 1000.0)
                    continue
                if self._used_now(now) + self.in_flight + weight <= self.budget or (
                        self.in_flight == 0 and self._used_now(now) == 0):
                    self.in_flight += weight
                    return
                self.waits += 1
                window_end = (now // self.window_ms + 1) * self.window_ms
                await self.sleep(max(0.001, (window_end - now) / 1000.0 + 0.01))

    def settle(self, weight: int, status: int, headers: Mapping[str, str]) -> None:
        """Record a request's answer: the exchange's used weight, a 429/418's ``Retry-After``."""
        now = self.now_ms()
        self.in_flight = max(0, self.in_flight - weight)
        reported = used_weight(headers)
        if reported is not None:
            value, self.window_ms = reported
            window = int(now // self.window_ms)
            # The highest report of the window wins (answers of concurrent requests come in any order).
            self.used = value if window != self.window else max(self.used, value)
            self.window = window
        elif status:  # answered without the header: count our own estimate
            window = int(now // self.window_ms)
            self.used = (self.used if window == self.window else 0) + weight
            self.window = window
        self.max_used = max(self.max_used, self._used_now(now))
        if status in (429, 418):
            self.rate_limited += status == 429
            self.banned += status == 418
            default = (now // self.window_ms + 1) * self.window_ms - now if status == 429 else 60_000.0
            wait = retry_after_s(headers)
            until = now + (default if wait is None else wait * 1000.0)
            self.blocked_until_ms = max(self.blocked_until_ms, until)
            log.warning("Binance answered %d: no REST request for %.1f s (Retry-After)", status,
                        (self.blocked_until_ms - now) / 1000.0)

    @property
    def idle(self) -> bool:
        """No request in flight and none waiting to be admitted."""
        return self.in_flight == 0 and not self._lock.locked()

    def status(self) -> dict[str, Any]:
        now = self.now_ms()
        return {"budget": self.budget, "window_s": self.window_ms / 1000.0, "used": self._used_now(now),
                "max_used": self.max_used, "in_flight": self.in_flight, "waits": self.waits,
                "rate_limited": self.rate_limited, "banned": self.banned,
                "blocked_for_s": round(max(0.0, self.blocked_until_ms - now) / 1000.0, 3)}


class BinanceRest:
    """``GET /api/v3/klines`` and ``/api/v3/time`` over one aiohttp session, paced by a
    :class:`WeightPacer` (python-binance's client keeps only the last response, so its weight
    headers cannot be read per request when many symbols share it)."""

    def __init__(self, api_url: str, pacer: WeightPacer, timeout_s: float = 15.0) -> None:
        from features.download import api_root

        self.root = api_root(api_url)
        self.pacer = pacer
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def _get(self, path: str, params: Mapping[str, Any], weight: int) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        await self.pacer.acquire(weight)
        status, headers, text = 0, {}, ""
        try:
            self.requests += 1
            async with self._session.get(f"{self.root}{path}", params=dict(params)) as response:
                status, headers = response.status, dict(response.headers)
                text = await response.text()
        finally:
            self.pacer.settle(weight, status, headers)
        if status != 200:
            raise BinanceHTTPError(status, text)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise MarketDataError(f"GET {path}: not JSON: {text[:200]!r}") from exc

    async def get_klines(self, *, symbol: str, interval: str, startTime: int, limit: int) -> list:
        """One page of klines (python-binance's ``get_klines`` signature)."""
        return await self._get("/v3/klines", {"symbol": symbol, "interval": interval, "startTime": int(startTime),
                                              "limit": int(limit)}, KLINES_WEIGHT)

    async def get_server_time(self) -> dict[str, Any]:
        return await self._get("/v3/time", {}, TIME_WEIGHT)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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

