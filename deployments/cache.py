"""Redis: the prediction cache, signal pub/sub and the shared rate-limit state, behind a breaker.

Why a breaker: Redis is optional at run time. When it is down every call would otherwise wait for
a connect timeout (and redis-py's default retries with backoff), turning an outage of the cache
into an outage of the API. After a failure the gateway answers :class:`CacheUnavailable` at once
for ``retry_s`` seconds, then lets one call probe again; callers degrade (compute instead of
reading, rate-limit per replica) and ``/health/detailed`` shows the state.

Keys (documented in docs/architecture.md):
- ``prediction:{symbol}:{horizon}:{candle_open_time}``: the forecast JSON (a :class:`CacheEntry`),
  expiring when the next candle closes (``Settings.prediction_ttl_s`` overrides);
- channel ``signals:{symbol}``: one JSON message per signal at every candle close;
- ``ratelimit:{key_id}``: the rate limiter's state (GCRA "theoretical arrival time", ms);
- ``authfail:{address}``: the same for failed authentication per client address.

Why entries are checked before they are served: Redis outlives deployments, so it may hold an
entry written by an older engine (other fields, other models, other features), and anyone who
can write to it can plant one. :func:`read_entry` turns any entry that is unreadable, not
signed with this deployment's secret, not of the schema, not for the key it is stored under, or
made with other models or another feature set into a miss with a reason (counted in
``ml_cache_rejected_total{reason}``), never into an answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from typing import Any, Literal, Optional

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from configs.settings import redact_url, scrub

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

    def __init__(self, url: str | SecretStr, timeout_s: float = 0.25, retry_s: float = 1.0) -> None:
        self._plain_url = url.get_secret_value() if isinstance(url, SecretStr) else url
        self.url = redact_url(self._plain_url)  # what logs and health show
        self.retry_s = retry_s
        self._redis = aioredis.Redis.from_url(
            self._plain_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
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
        self.last_error = scrub(f"{type(exc).__name__}: {exc}", self._plain_url)[:300]
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

    async def set_many(self, items: list[tuple[str, bytes | str, float]],
                       messages: list[tuple[str, bytes | str]] = ()) -> None:
        """SET each ``(key, value, ttl_s)``, then PUBLISH each ``(channel, message)``, in one round
        trip (the SETs first: a subscriber that reads the key on the message finds it)."""

        async def run() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for key, value, ttl in items:
                pipe.set(key, value, px=max(1, int(ttl * 1000)))
            for channel, msg in messages:
                pipe.publish(channel, msg)
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
        return {"status": "up" if self.up else "down", "url": self.url, "last_error": self.last_error,
                "failures": self.failures}

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:  # closing a broken connection must not fail shutdown
            pass



# ---- prediction cache entries ------------------------------------------------------------------
RejectReason = Literal["unreadable", "signature", "schema", "identity", "feature_set", "model_versions"]


class CacheEntry(BaseModel):
    """A ``prediction:*`` value: ``Forecast.to_dict()`` plus what it was made with and its signature
    (tests/test_hardening_state.py keeps its fields equal to Forecast's)."""

    model_config = ConfigDict(extra="forbid")

    symbol: str
    horizon: int
    candle_open_time: int
    close: float = Field(gt=0, allow_inf_nan=False)
    pred_high_pct: Optional[float] = Field(allow_inf_nan=False)
    pred_low_pct: Optional[float] = Field(allow_inf_nan=False)
    high_lower: Optional[float] = Field(allow_inf_nan=False)
    high_upper: Optional[float] = Field(allow_inf_nan=False)
    low_lower: Optional[float] = Field(allow_inf_nan=False)
    low_upper: Optional[float] = Field(allow_inf_nan=False)
    p_tp_long: Optional[float] = Field(allow_inf_nan=False)
    p_tp_short: Optional[float] = Field(allow_inf_nan=False)
    signal_probs: list[Optional[float]] = Field(min_length=3, max_length=3)
    signal_type: Literal["BUY", "SELL", "HOLD"]
    confidence: Optional[float] = Field(ge=0, le=1, allow_inf_nan=False)
    entry_price: Optional[float] = Field(allow_inf_nan=False)
    take_profit: Optional[float] = Field(allow_inf_nan=False)
    stop_loss: Optional[float] = Field(allow_inf_nan=False)
    reason: Optional[str]
    model_versions: dict[str, str]
    reason_detail: Optional[str] = None
    pred_high_mean_pct: Optional[float] = Field(default=None, allow_inf_nan=False)
    pred_low_mean_pct: Optional[float] = Field(default=None, allow_inf_nan=False)
    expected_r: Optional[float] = Field(default=None, allow_inf_nan=False)
    cost_r: Optional[float] = Field(default=None, allow_inf_nan=False)
    p_win: Optional[float] = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    fee_profile: Optional[str] = None
    feature_set_hash: str
    sig: str

    @field_validator("signal_probs")
    @classmethod
    def _probs(cls, v: list[Optional[float]]) -> list[Optional[float]]:
        if any(p is not None and not (math.isfinite(p) and 0 <= p <= 1) for p in v):
            raise ValueError("probabilities must be in [0, 1]")
        return v


def _signature(body: dict[str, Any], secret: bytes) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hmac.new(secret, canonical.encode(), hashlib.sha256).hexdigest()


def make_entry(forecast: dict[str, Any], feature_set_hash: str, secret: bytes) -> str:
    """The Redis value of a forecast (``Forecast.to_dict()``): tagged and signed."""
    body = {**forecast, "feature_set_hash": feature_set_hash}
    return json.dumps({**body, "sig": _signature(body, secret)}, allow_nan=False)


def read_entry(raw: bytes | str, *, symbol: str, horizon: int, candle_open_time: int,
               model_versions: dict[str, str], feature_set_hash: str,
               secret: bytes) -> tuple[dict[str, Any] | None, RejectReason | None]:
    """``(forecast, None)`` for an entry this engine may serve for that key, else ``(None, reason)``.

    ``model_versions`` is the model set the market snapshot says the candle was published with;
    an entry of any other set (or of none) is stale."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, "unreadable"
    if not isinstance(data, dict) or not isinstance(data.get("sig"), str):
        return None, "signature"
    body = {k: v for k, v in data.items() if k != "sig"}
    try:
        expected = _signature(body, secret)
    except (TypeError, ValueError):  # NaN, Infinity or a non-JSON value: nothing this engine signed
        return None, "signature"
    if not hmac.compare_digest(expected, data["sig"]):
        return None, "signature"
    try:
        entry = CacheEntry.model_validate(data)
    except ValidationError:
        return None, "schema"
    if (entry.symbol, entry.horizon, entry.candle_open_time) != (symbol, horizon, candle_open_time):
        return None, "identity"
    if entry.feature_set_hash != feature_set_hash:
        return None, "feature_set"
    if not model_versions or entry.model_versions != model_versions:
        return None, "model_versions"
    return entry.model_dump(exclude={"feature_set_hash", "sig"}), None
