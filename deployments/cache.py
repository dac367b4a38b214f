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
import time
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from pydantic import Field, SecretStr, ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from configs.settings import redact_url, scrub
from inference.forecast import Forecast

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


class CacheEntry(Forecast):
    """A ``prediction:*`` value: the :class:`~inference.forecast.Forecast` JSON plus what it was made
    with and its signature (the fields are Forecast's, so the two cannot drift apart). Stricter than
    a Forecast where serving needs it: a forecast without a positive close is never served from here."""

    close: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    feature_set_hash: str
    sig: str

    def forecast(self) -> Forecast:
        """The entry without its provenance (fields already validated)."""
        values = {k: v for k, v in self.__dict__.items() if k not in _PROVENANCE}
        return Forecast.model_construct(**values)


_PROVENANCE = frozenset({"feature_set_hash", "sig"})
# The signature closes the value: ``{…forecast…,"feature_set_hash":"…","sig":"<64 hex>"}``. It is the
# HMAC of the exact bytes before it (closed with ``}``), so verifying needs neither a parse nor a
# canonical re-serialisation; re-encoding an entry in any way breaks it.
_SIG_OPEN, _SIG_LEN = b',"sig":"', 64
_SIG_TAIL = len(_SIG_OPEN) + _SIG_LEN + 2


def _signature(body: bytes, secret: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def sign_entry(body: bytes, feature_set_hash: str, secret: bytes) -> bytes:
    """A JSON object's bytes, tagged with the feature set and signed (see ``_SIG_OPEN``)."""
    tagged = b"%s,\"feature_set_hash\":%s}" % (body.rstrip()[:-1], json.dumps(feature_set_hash).encode())
    return b"%s%s%s\"}" % (tagged[:-1], _SIG_OPEN, _signature(tagged, secret).encode())


def make_entry(forecast: Forecast, feature_set_hash: str, secret: bytes) -> bytes:
    """The Redis value of a forecast (its JSON, ``Forecast.to_json``): tagged and signed."""
    return sign_entry(forecast.to_json(), feature_set_hash, secret)


def _signed_body(raw: bytes) -> tuple[bytes, bytes] | None:
    """``(signed bytes, signature)`` of a value shaped like :func:`sign_entry`'s, else None."""
    if len(raw) <= _SIG_TAIL or raw[-_SIG_TAIL:-_SIG_TAIL + len(_SIG_OPEN)] != _SIG_OPEN or not raw.endswith(b'"}'):
        return None
    return raw[:-_SIG_TAIL] + b"}", raw[-_SIG_LEN - 2:-2]


def read_entry(raw: bytes | str, *, symbol: str, horizon: int, candle_open_time: int,
               model_versions: dict[str, str], feature_set_hash: str,
               secret: bytes) -> tuple[Forecast | None, RejectReason | None]:
    """``(forecast, None)`` for an entry this engine may serve for that key, else ``(None, reason)``.

    ``model_versions`` is the model set the market snapshot says the candle was published with;
    an entry of any other set (or of none) is stale."""
    raw = raw.encode() if isinstance(raw, str) else bytes(raw)
    signed = _signed_body(raw)
    if signed is None:
        return None, "signature" if _is_json_object(raw) else "unreadable"
    body, sig = signed
    if not hmac.compare_digest(_signature(body, secret).encode(), sig):
        return None, "signature"
    try:
        entry = CacheEntry.model_validate_json(raw)
    except ValidationError:
        return None, "schema"
    if (entry.symbol, entry.horizon, entry.candle_open_time) != (symbol, horizon, candle_open_time):
        return None, "identity"
    if entry.feature_set_hash != feature_set_hash:
        return None, "feature_set"
    if not model_versions or entry.model_versions != model_versions:
        return None, "model_versions"
    return entry.forecast(), None


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
