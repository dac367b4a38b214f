"""API keys (X-API-Key), the per-key rate limit and the throttle on failed authentication.

Keys come from ``Settings.api_keys`` (``MLE_API_KEYS=k1,k2``, or ``MLE_API_KEYS_FILE``). Settings
refuses keys shorter than 24 characters and :class:`ApiKeys` refuses an empty key list, so a
serving engine never runs open or with a guessable key. A presented key is hashed once and
compared with every configured key's hash using :func:`hmac.compare_digest`, without stopping at a
match, so the time taken says nothing about which key (or how much of one) matched.

Keys are never logged or stored: logs, Redis and metrics see only the key id, an HMAC of the key
under the deployment secret (``Settings.deployment_secret``, else derived from the whole key
set). A plain hash would let anyone who reads Redis or a log test guesses offline; the HMAC
needs the secret first.

The rate limit is a GCRA bucket per key (``Settings.rate_limit_per_minute`` requests per minute,
bursts up to the same number), kept in Redis so every ingress replica shares it. Failed
authentication is throttled the same way per client address (``auth_failures_per_minute``):
beyond it a 401 becomes a 429. Only failures are throttled -- a valid key is never refused for its
address, so a proxy that hides client addresses cannot be used to lock legitimate clients out;
what stops guessing is the key length. When Redis is down each replica limits on its own (so N
replicas allow up to N times the limit until Redis is back); a request is never refused because
the limiter's store is down.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr

from deployments.cache import CacheUnavailable, RedisGateway
from configs.errors import ConfigError

KEY_ID_CHARS = 16


def new_api_key() -> str:
    """A fresh key for ``make serve`` when none is configured: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def write_api_keys_file(path: Path, keys: Sequence[str]) -> Path:
    """Keys for ``api_keys_file``, one per line, readable by the owner only (tools and tests that
    deploy: keys never travel in Serve args)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{k}\n" for k in keys))
    return path


def deployment_secret(settings) -> bytes:
    """The HMAC key of key ids and cache entries: ``Settings.deployment_secret``, else derived from
    every configured key (the same on every replica of a deployment; it changes when keys rotate,
    which only resets rate-limit buckets and the cache)."""
    if settings.deployment_secret is not None:
        return settings.deployment_secret.get_secret_value().encode()
    keys = sorted(k.get_secret_value() for k in settings.api_keys)
    return hashlib.sha256(b"ml-engine deployment secret\0" + "\0".join(keys).encode()).digest()


def key_id(key: str, secret: bytes) -> str:
    """A stable id for a key (logs, metrics, rate-limit state) that reveals nothing without ``secret``."""
    return hmac.new(secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:KEY_ID_CHARS]


class ApiKeys:
    """The configured keys as HMAC digests (the plain keys are not kept)."""

    def __init__(self, keys: Sequence[SecretStr | str], secret: bytes) -> None:
        plain = [k.get_secret_value() if isinstance(k, SecretStr) else str(k) for k in keys]
        plain = [k for k in plain if k]
        if not plain:
            raise ConfigError("no API key configured: set MLE_API_KEYS (comma-separated keys of at least 24 "
                              "characters) or MLE_API_KEYS_FILE; the engine does not serve without keys")
        self._secret = secret
        self._digests = [self._digest(k) for k in plain]
        self._ids = [key_id(k, secret) for k in plain]

    @classmethod
    def from_settings(cls, settings) -> "ApiKeys":
        return cls(settings.api_keys, deployment_secret(settings))

    def _digest(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def __len__(self) -> int:
        return len(self._digests)

    def key_id(self, key: str) -> str:
        """The id this deployment gives ``key`` (tests and tools that look up a key's state)."""
        return key_id(key, self._secret)

    def identify(self, presented: str | None) -> str | None:
        """The key id of ``presented`` if it is a configured key, else None (constant time)."""
        if not presented or len(presented) > 512:
            return None
        digest = self._digest(presented)
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
    """A GCRA limit per id, shared through Redis (``{prefix}:{id}``), per replica while Redis is down."""

    def __init__(self, limit_per_minute: int, redis: RedisGateway | None, prefix: str = "ratelimit") -> None:
        self.limit = limit_per_minute
        self.redis = redis
        self.prefix = prefix
        self.local = LocalLimiter(limit_per_minute)

    async def check(self, ident: str) -> tuple[float, str]:
        """``(retry_after_s, scope)``: 0 when allowed; scope is "shared" or "replica"."""
        if self.redis is not None:
            try:
                return await self.redis.rate_limit(f"{self.prefix}:{ident}", self.limit), "shared"
            except CacheUnavailable:
                pass
        return self.local.check(ident), "replica"


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; never 0 for a refused request."""
    return str(max(1, math.ceil(seconds)))
