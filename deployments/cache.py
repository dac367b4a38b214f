"""Redis: the prediction cache, signal pub/sub and the shared rate-limit state, behind a breaker.

Why a breaker: Redis is optional at run time. When it is down every call would otherwise wait for
a connect timeout (and redis-py's default retries with backoff), turning an outage of the cache
into an outage of the API. After a failure the gateway answers :class:`CacheUnavailable` at once
for ``retry_s`` seconds, then lets one call probe again; callers degrade (compute instead of
reading, rate-limit per replica) and ``/health/detailed`` shows the state.

Keys (documented in docs/architecture.md):
- ``prediction:{symbol}:{horizon}:{candle_open_time}``: the forecast JSON, expiring when the next
  candle closes (``Settings.prediction_ttl_s`` overrides);
- channel ``signals:{symbol}``: one JSON message per signal at every candle close;
- ``ratelimit:{key_id}``: the rate limiter's state (GCRA "theoretical arrival time", ms).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class CacheUnavailable(Exception):
    """Redis is down (or was down less than ``retry_s`` ago)."""


def prediction_key(symbol: str, horizon: int, candle_open_time: int) -> str:
    return f"prediction:{symbol}:{horizon}:{candle_open_time}"


def signal_channel(symbol: str) -> str:
    return f"signals:{symbol}"


# GCRA in one round trip: allow a request if the bucket's "theoretical arrival time" is not more
# than (limit - 1) intervals ahead of now. Redis's own clock keeps replicas consistent.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local ahead = tat - now
if ahead > burst then
  return {0, ahead - burst}
end
tat = tat + interval
redis.call('SET', KEYS[1], tat, 'PX', math.ceil(tat - now) + 1000)
return {1, 0}
"""


class RedisGateway:
    """The engine's Redis client with a circuit breaker (see the module docstring)."""

    def __init__(self, url: str, timeout_s: float = 0.25, retry_s: float = 1.0) -> None:
        self.url = url
        self.retry_s = retry_s
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, max_connections=64)
        self._down_until = 0.0
        self.last_error: str | None = None
        self.last_ok: float | None = None
        self.failures = 0
        self._gcra = self._redis.register_script(_GCRA)

    # ---- breaker ---------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        """Whether the last call succeeded (or no call failed within ``retry_s``)."""
        return time.monotonic() >= self._down_until

    def _check(self) -> None:
        if time.monotonic() < self._down_until:
            raise CacheUnavailable(self.last_error or "redis down")

    def _fail(self, exc: BaseException) -> CacheUnavailable:
        self.failures += 1
        first = self.up
        self._down_until = time.monotonic() + self.retry_s
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if first:
            log.warning("redis %s unavailable (%s); degrading for %.1fs", self.url, self.last_error, self.retry_s)
        return CacheUnavailable(self.last_error)

    def _ok(self) -> None:
        if self._down_until:
            self._down_until = 0.0
        self.last_ok = time.time()

    async def _call(self, coro_fn, *args: Any) -> Any:
        self._check()
        try:
            out = await coro_fn(*args)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise self._fail(exc) from None
        self._ok()
        return out

    # ---- operations ------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        return await self._call(self._redis.get, key)

    async def set_many(self, items: list[tuple[str, bytes | str, float]]) -> None:
        """SET each ``(key, value, ttl_s)`` in one round trip."""

        async def run() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for key, value, ttl in items:
                pipe.set(key, value, px=max(1, int(ttl * 1000)))
            await pipe.execute()

        await self._call(run)

    async def publish(self, messages: list[tuple[str, bytes | str]]) -> None:
        """PUBLISH each ``(channel, message)`` in one round trip."""

        async def run() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for channel, msg in messages:
                pipe.publish(channel, msg)
            await pipe.execute()

        await self._call(run)

    async def rate_limit(self, key: str, limit_per_minute: int) -> float:
        """0 when the request is allowed, else seconds until one is (GCRA, shared by all replicas)."""
        interval = 60_000.0 / limit_per_minute
        allowed, wait_ms = await self._call(self._gcra, [key], [interval, interval * (limit_per_minute - 1)])
        return 0.0 if int(allowed) else float(wait_ms) / 1000.0

    async def ping(self) -> bool:
        """Probe Redis even while the breaker is open (for health checks)."""
        try:
            await self._redis.ping()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._fail(exc)
            return False
        self._ok()
        return True

    def status(self) -> dict[str, Any]:
        return {"status": "up" if self.up else "down", "url": _redact(self.url), "last_error": self.last_error,
                "failures": self.failures}

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:  # closing a broken connection must not fail shutdown
            pass


def _redact(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://***@host``: never expose credentials in health output."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
