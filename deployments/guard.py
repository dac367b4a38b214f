"""The ASGI guard in front of every route: body limit, API key before the body, failed-auth throttle.

Why an ASGI middleware and not a FastAPI dependency: FastAPI reads and parses a request's whole
body before any dependency runs, so a key check in a dependency comes after an unauthenticated
client has made the ingress hold (and parse) whatever it sent. The guard runs first, on the
headers alone:

1. a ``Content-Length`` over ``Settings.max_body_bytes`` is answered 413 before a byte of the body
   is read; a body without one (chunked) is counted as it streams and refused (413) as soon as it
   passes the limit, so memory never holds more than the limit plus one chunk;
2. a route that needs a key (any route whose dependencies include the API's key check) is answered
   401 unless exactly one ``X-API-Key`` header names a configured key -- before the body is read;
3. a 401 counts against the client address's failure budget (``auth_failures_per_minute``, shared
   through Redis like the per-key limit); beyond it the answer is 429 with ``Retry-After``;
4. ``/metrics`` needs no key from the networks in ``Settings.metrics_networks``, a key from anywhere
   else (:class:`MetricsAccess`).

The key id found here is left in ``scope["state"]`` for the route's dependency (which applies the
per-key rate limit), so a request's key is hashed once. On the hot cached path the guard costs a
header scan, one HMAC and a dictionary lookup (bench/guard.py measures it).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

from starlette.exceptions import HTTPException

from deployments.auth import ApiKeys, RateLimiter, retry_after_header
from deployments.errors import error_response

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
_KEY = API_KEY_HEADER.lower().encode()
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KID_STATE = "api_key_id"


class BodyTooLarge(HTTPException):
    """A streamed body passed ``max_body_bytes`` (FastAPI re-raises HTTPExceptions from body parsing)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class MetricsAccess:
    """Who may read ``/metrics`` without a key: ``Settings.metrics_networks`` (CIDRs, ``loopback``,
    ``cluster`` = the Ray nodes' addresses, refreshed by the ingress).

    The address is the TCP peer the ingress sees. Behind a proxy that hides client addresses
    (Serve's HAProxy mode, a load balancer) that peer is the proxy, so the allow-list would let
    everyone in: with ``behind_proxy`` it is ignored and the key is needed from everywhere."""

    def __init__(self, networks: Iterable[str], behind_proxy: bool = False) -> None:
        self.behind_proxy = behind_proxy
        self.cluster = "cluster" in networks
        nets: list[Any] = []
        for net in networks:
            if net == "loopback":
                nets += [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
            elif net != "cluster":
                nets.append(ipaddress.ip_network(net, strict=False))
        self.networks = nets
        self.nodes: frozenset[Any] = frozenset()

    def set_cluster_addresses(self, addresses: Iterable[str]) -> None:
        found = set()
        for a in addresses:
            try:
                found.add(ipaddress.ip_address(a))
            except ValueError:
                continue
        self.nodes = frozenset(found)

    def allows(self, host: str | None) -> bool:
        if self.behind_proxy or not host:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return (self.cluster and addr in self.nodes) or any(addr in net for net in self.networks)


def _needs(dependant: Any, marker: Callable) -> bool:
    """Whether ``marker`` is anywhere in a route's dependency tree."""
    return any(d.call is marker or _needs(d, marker) for d in getattr(dependant, "dependencies", ()))


class RequestGuard:
    """Pure ASGI middleware (no per-request objects on the happy path); see the module docstring."""

    def __init__(self, app, *, routes_of, key_check: Callable, keys: ApiKeys, failures: RateLimiter,
                 max_body_bytes: int, metrics: MetricsAccess, metrics_path: str = "/metrics") -> None:
        self.app = app
        self._routes_of = routes_of  # the FastAPI app: its routes are known only once all are added
        self._key_check = key_check
        self.keys = keys
        self.failures = failures
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.metrics_path = metrics_path
        self._protected: frozenset[str] | None = None

    def protected_paths(self) -> frozenset[str]:
        if self._protected is None:
            self._protected = frozenset(
                r.path for r in self._routes_of.routes
                if _needs(getattr(r, "dependant", None), self._key_check))
        return self._protected

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        keys, length = [], None
        for name, value in scope["headers"]:
            if name == _KEY:
                keys.append(value)
            elif name == b"content-length":
                length = value
        refusal = self._too_large(length)
        if refusal is None:
            refusal = await self._authenticate(scope, keys)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] in _BODY_METHODS:
            await self._limited(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _too_large(self, length: bytes | None):
        if length is None:
            return None
        try:
            declared = int(length)
        except ValueError:
            return None  # the HTTP server refuses a malformed Content-Length itself
        if declared <= self.max_body_bytes:
            return None
        return self._error(413, "payload_too_large", f"request body of {declared} bytes is larger than the limit "
                                                     f"of {self.max_body_bytes} bytes")

    async def _authenticate(self, scope, keys: list[bytes]):
        """None when the request may go on (the key id is left in the scope), else the refusal."""
        path = scope["path"]
        if path == self.metrics_path:
            client = scope.get("client")
            if self.metrics.allows(client[0] if client else None):
                return None
        elif path not in self.protected_paths() or scope["method"] == "OPTIONS":
            return None  # public routes, 404s, CORS preflights
        kid = self.keys.identify(keys[0].decode("latin-1")) if len(keys) == 1 else None
        if kid is not None:
            scope.setdefault("state", {})[KID_STATE] = kid
            return None
        client = scope.get("client")
        address = client[0] if client else "unknown"
        wait, _ = await self.failures.check(address)
        if wait > 0:
            return self._error(429, "rate_limited", "too many requests with a missing or unknown API key from "
                                                    "this address", {"Retry-After": retry_after_header(wait)},
                               retry_after_s=round(wait, 3))
        why = "send exactly one" if len(keys) > 1 else "missing or unknown"
        return self._error(401, "unauthorized", f"{why} {API_KEY_HEADER} header")

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        async def respond(scope, receive, send) -> None:
            await error_response(status, code, message, scope["path"], headers, **extra)(scope, receive, send)
        return respond

    async def _limited(self, scope, receive, send) -> None:
        """Run the app with a ``receive`` that refuses the body once it passes the limit."""
        seen = 0
        started = False
        limit = self.max_body_bytes

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._error(413, "payload_too_large", f"request body larger than the limit of {limit} bytes")(
                scope, receive, send)
