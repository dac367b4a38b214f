"""What the request guard (deployments/guard.py) costs a cached request, against the same app without it.

    .venv/bin/python bench/guard.py [--requests 20000] [--rounds 10]

The guard runs on every request before FastAPI: it scans the headers, checks Content-Length,
identifies the key (one HMAC) and, for bodies, wraps ``receive`` to count bytes. This measures the
hot path the issue cares about -- a cached POST /predictions answered from the ingress's memory
-- by calling the real app's ASGI entry point in-process (no network, no proxy: they cost the same
with and without the guard and would only add noise), alternating rounds with and without the
guard in the same run. The rate limiter runs per process (no Redis) for the same reason, so the
request is cheaper than in production and the guard's share is an upper bound.

Prints microseconds per request for both apps, the difference (the guard's cost) and the ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

KEY = "bench-guard-key-0123456789abcdefghij"
BODY = json.dumps({"symbol": "BTCUSDT", "horizon": 6}).encode()


class FixedBackend:
    """Answers the one miss each app has (the first request); every other request is a cache hit."""

    async def forecast(self, rows, horizon):
        from inference.forecast import Forecast

        r = rows[0]
        return [Forecast(symbol=r.symbol, horizon=horizon, candle_open_time=r.open_time, close=r.close,
                         pred_high_pct=0.004, pred_low_pct=-0.003, high_lower=0.001, high_upper=0.008,
                         low_lower=-0.007, low_upper=-0.001, p_tp_long=0.5, p_tp_short=0.4,
                         signal_probs=(0.2, 0.5, 0.3), signal_type="HOLD", confidence=0.5, entry_price=r.close,
                         take_profit=r.close * 1.004, stop_loss=r.close * 0.997, reason=None,
                         model_versions={"range_predictor": "v1"})]

    async def models_status(self):
        return {"loaded": True, "versions": {}, "models": {}}

    async def runtime_status(self):
        return {}


def build(guarded: bool):
    from configs.settings import load_settings
    from deployments.api import create_app
    from deployments.market_state import MarketState
    from deployments.feed import CandleEvent, FeedClock
    from deployments.guard import RequestGuard
    from deployments.prometheus import EngineMetrics
    from deployments.service import PredictionService
    from features.candles import FIVE_MINUTES_MS, load_candles
    from features.indicators import WARMUP

    settings = load_settings(api_keys=[KEY], serving_log="", rate_limit_per_minute=10**9, _env_file=None)
    service = PredictionService(settings, FixedBackend(), redis=None, metrics=EngineMetrics(use_ray=False))
    candles = load_candles(settings.sample_dir / "BTCUSDT_5m.parquet").iloc[-(WARMUP + 5):]
    t = candles["open_time"].to_numpy(np.int64)
    state = MarketState()
    res = state.ingest(CandleEvent("BTCUSDT", t, candles[["open", "high", "low", "close", "volume"]].to_numpy(),
                                   "history", FeedClock(time.time(), float(t[-1] + FIVE_MINUTES_MS), 1.0), "bench"))
    state.publish("BTCUSDT", res.open_time, {"range_predictor": "v1"}, None)
    service.set_market(state.snapshot())
    app = create_app(service, database_health=None, metrics_text=None)
    if not guarded:  # the same app without the guard (the middleware stack is built on first call)
        app.user_middleware = [m for m in app.user_middleware if m.cls is not RequestGuard]
    return app


async def run(app, n: int) -> float:
    """Seconds per request over ``n`` cached POST /predictions."""
    headers = [(b"host", b"engine"), (b"content-type", b"application/json"), (b"x-api-key", KEY.encode()),
               (b"content-length", str(len(BODY)).encode())]
    message = {"type": "http.request", "body": BODY, "more_body": False}
    statuses = []

    async def receive():
        return message

    async def send(m):
        if m["type"] == "http.response.start":
            statuses.append(m["status"])

    t0 = time.perf_counter()
    for _ in range(n):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/predictions", "raw_path": b"/predictions", "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000), "server": ("engine", 80)}
        await app(scope, receive, send)
    elapsed = time.perf_counter() - t0
    assert set(statuses) == {200}, set(statuses)
    return elapsed / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20000, help="requests per round")
    p.add_argument("--rounds", type=int, default=10, help="rounds per app, alternating")
    args = p.parse_args(argv)
    apps = {"with guard": build(True), "without guard": build(False)}

    async def measure() -> dict[str, list[float]]:
        for app in apps.values():
            await run(app, 2000)  # warm-up (the first request of each app is its one miss)
        out: dict[str, list[float]] = {name: [] for name in apps}
        for _ in range(args.rounds):
            for name, app in apps.items():
                out[name].append(await run(app, args.requests))
        return out

    times = asyncio.run(measure())
    med = {name: statistics.median(v) * 1e6 for name, v in times.items()}
    cost = med["with guard"] - med["without guard"]
    print(f"cached POST /predictions in-process (ASGI), {args.rounds} x {args.requests} requests per app, "
          f"alternating; load average {os.getloadavg()[0]:.1f}")
    for name, us in med.items():
        spread = (min(times[name]) * 1e6, max(times[name]) * 1e6)
        print(f"  {name:<14} {us:8.1f} us/request (rounds {spread[0]:.1f} .. {spread[1]:.1f})")
    print(f"  guard cost     {cost:8.1f} us/request = {med['with guard'] / med['without guard']:.3f}x the "
          f"request without it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
