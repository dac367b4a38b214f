"""Binance REST paced by request weight: what the exchange says it used, not what we think we sent.

Binance limits REST by *request weight* per IP and window: every answer carries the weight used so
far in the window (``X-MBX-USED-WEIGHT-1M``; the suffix is the window: ``<n><S|M|H|D>``), a client
that goes over gets 429 with ``Retry-After``, and one that keeps going gets 418 (an IP ban, also
with ``Retry-After``). :class:`WeightPacer` admits a request only while the reported weight plus
what is in flight stays within the budget, waits for the window's end on the exchange's clock
otherwise, and sends nothing after a 429/418 until ``Retry-After`` has passed; :class:`BinanceRest`
is the ``klines`` / ``time`` client that goes through it. One pacer per hub
(:mod:`deployments.binance_hub`), so every symbol of a feed shares one budget.

No Ray in this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from configs.errors import MarketDataError

log = logging.getLogger("deployments.binance_hub")  # the feed's one logger name, as before the split

# Request weights of the endpoints the feed uses (Binance spot API docs).
KLINES_WEIGHT = 2
TIME_WEIGHT = 1
BINANCE_WEIGHT_LIMIT = 6000  # per minute per IP (exchangeInfo rateLimits REQUEST_WEIGHT)
_WEIGHT_HEADER = re.compile(r"^x-mbx-used-weight-(\d+)([smhd])$", re.IGNORECASE)
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


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
        from features.klines_api import api_root

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
