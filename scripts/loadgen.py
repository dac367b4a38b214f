"""A steady, bounded HTTP load on loopback, counting every request: the yardstick of rollouts and drills.

Why open-loop at a fixed rate (not "as fast as possible"): a rollout or a fault drill is judged by
what happens to requests that arrive while it runs, so requests must keep arriving at the same pace
whatever the server does; a closed loop would simply stop sending while the server stalls and hide
the failures. Every request has a timeout, and the run stops by itself after ``duration_s`` or
``max_requests`` (loopback only: the target URL must be 127.0.0.1/localhost).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Outcome:
    t: float            # seconds since the load started (send time)
    status: int         # HTTP status, or 0 for a transport error / timeout
    latency_s: float
    error: str | None = None


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)

    def window(self, start: float, end: float = float("inf")) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.t < end]

    @staticmethod
    def failed(outcomes: list[Outcome]) -> list[Outcome]:
        """Failures: transport errors, timeouts and any 5xx (4xx would be the load's own bug, counted too)."""
        return [o for o in outcomes if not (200 <= o.status < 300)]

    def summary(self, start: float = 0.0, end: float = float("inf")) -> dict[str, Any]:
        win = self.window(start, end)
        bad = self.failed(win)
        lat = sorted(o.latency_s for o in win if 200 <= o.status < 300)
        return {"requests": len(win), "failed": len(bad),
                "failed_pct": round(100.0 * len(bad) / len(win), 4) if win else 0.0,
                "statuses": dict(sorted(Counter(o.status for o in win).items())),
                "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
                "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None,
                "errors": sorted({o.error or f"HTTP {o.status}" for o in bad})[:5]}


def _check_loopback(url: str, allowed: Callable[[str], bool] | None = None) -> None:
    """Loopback, or an address ``allowed`` accepts (a lab network's namespaces on this machine)."""
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK and not (allowed is not None and allowed(host)):
        raise ValueError(f"load is only ever sent to loopback or this machine's lab network, not {host!r}")


async def run_load(url: str, *, rate: float, duration_s: float, requests: list[dict[str, Any]],
                   headers: dict[str, str] | None = None, timeout_s: float = 10.0, max_requests: int = 100_000,
                   stop: asyncio.Event | None = None, allowed: Callable[[str], bool] | None = None) -> LoadResult:
    """Send ``rate`` requests per second (cycling through ``requests``: {"method", "path", "json"}).

    Stops after ``duration_s`` seconds, ``max_requests`` requests or when ``stop`` is set, then
    waits for the requests in flight. Returns every outcome.
    """
    _check_loopback(url, allowed)
    result = LoadResult()
    interval = 1.0 / rate
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        tasks: list[asyncio.Task] = []

        async def one(spec: dict[str, Any], t_send: float) -> None:
            start = time.perf_counter()
            try:
                resp = await client.request(spec.get("method", "GET"), spec["path"], json=spec.get("json"))
                result.outcomes.append(Outcome(t_send, resp.status_code, time.perf_counter() - start,
                                               None if resp.status_code < 300 else resp.text[:200]))
            except httpx.HTTPError as exc:
                result.outcomes.append(Outcome(t_send, 0, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"))

        i = 0
        while i < max_requests:
            now = time.perf_counter() - t0
            if now >= duration_s or (stop is not None and stop.is_set()):
                break
            tasks.append(asyncio.create_task(one(requests[i % len(requests)], now)))
            i += 1
            next_at = i * interval
            delay = next_at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
        if tasks:
            await asyncio.gather(*tasks)
    result.outcomes.sort(key=lambda o: o.t)
    return result
