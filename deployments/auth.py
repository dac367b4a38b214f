"""API keys (X-API-Key) and the per-key rate limit.

Keys come from ``Settings.api_keys`` (``MLE_API_KEYS=k1,k2``). A presented key is hashed once and
compared with every configured key's hash using :func:`hmac.compare_digest`, without stopping at
a match, so the time taken says nothing about which key (or how much of one) matched. Keys are
never logged or stored: logs, Redis and metrics see only the key id (a SHA-256 prefix).

The rate limit is a GCRA bucket per key (``Settings.rate_limit_per_minute`` requests per minute,
bursts up to the same number), kept in Redis so every ingress replica shares it. When Redis is
down each replica limits on its own (so N replicas allow up to N times the limit until Redis is
back); the request is never refused because the limiter's store is down.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Sequence

from pydantic import SecretStr

from deployments.cache import CacheUnavailable, RedisGateway


def key_id(key: str) -> str:
    """A stable, non-reversible id for a key (for logs, metrics and rate-limit state)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class ApiKeys:
    """The configured keys, as SHA-256 digests (the plain keys are not kept)."""

    def __init__(self, keys: Sequence[SecretStr | str]) -> None:
        plain = [k.get_secret_value() if isinstance(k, SecretStr) else str(k) for k in keys]
        self._digests = [hashlib.sha256(k.encode()).digest() for k in plain if k]
        self._ids = [key_id(k) for k in plain if k]

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, presented: str | None) -> str | None:
        """The key id of ``presented`` if it is a configured key, else None (constant time)."""
        if not presented or len(presented) > 512:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        for known, kid in zip(self._digests, self._ids):
            if hmac.compare_digest(digest, known):
                found = kid
        return found


class LocalLimiter:
    """The same GCRA as the Redis script, in this process (the fallback while Redis is down)."""

    def __init__(self, limit_per_minute: int, clock=time.monotonic) -> None:
        self.interval = 60.0 / limit_per_minute
        self.burst = self.interval * (limit_per_minute - 1)
        self._tat: dict[str, float] = {}
        self._clock = clock

    def check(self, key: str) -> float:
        now = self._clock()
        tat = max(self._tat.get(key, now), now)
        ahead = tat - now
        if ahead > self.burst:
            return ahead - self.burst
        self._tat[key] = tat + self.interval
        if len(self._tat) > 10_000:  # forget idle keys
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return 0.0


class RateLimiter:
    """Per-key limit shared through Redis, per replica while Redis is down."""

    def __init__(self, limit_per_minute: int, redis: RedisGateway | None) -> None:
        self.limit = limit_per_minute
        self.redis = redis
        self.local = LocalLimiter(limit_per_minute)

    async def check(self, kid: str) -> tuple[float, str]:
        """``(retry_after_s, scope)``: 0 when allowed; scope is "shared" or "replica"."""
        if self.redis is not None:
            try:
                return await self.redis.rate_limit(f"ratelimit:{kid}", self.limit), "shared"
            except CacheUnavailable:
                pass
        return self.local.check(kid), "replica"


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; never 0 for a refused request."""
    return str(max(1, math.ceil(seconds)))
