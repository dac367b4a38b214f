"""The real FastAPI app and request logic in-process, around a stand-in backend (no cluster).

The hardening tests (issue 13) drive the same ``create_app`` + ``PredictionService`` the Serve
ingress runs, through ``httpx.ASGITransport`` with a client address of their choosing, so a test
can be a hostile client from 203.0.113.7 or a load balancer on loopback. Only the model graph is
stood in for (``StubBackend``): what it answers, or that it hangs, is the test's to choose.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
import pytest

from configs.settings import load_settings
from deployments.feed import CandleEvent, FeedClock
from features.candles import FIVE_MINUTES_MS
from features.indicators import WARMUP
from scripts.lab.fake_binance import load_test_candles

KEY = "hardening-test-key-0123456789abcdef"
OTHER_KEY = "hardening-test-key-fedcba9876543210"
VERSIONS = {"range_predictor": "v1", "tpsl_classifier": "v1", "signal_classifier": "v1", "meta_model": "v1"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A private redis-server for one test module (tests/serving_app.py's, stopped at the end)."""
    from scripts.lab.services import PrivateRedis

    server = PrivateRedis(tmp_path_factory.mktemp("hardening-redis"))
    server.start()
    yield server
    server.stop()


def forecast_for(row, horizon: int, versions: dict[str, str] = VERSIONS, shift: float = 0.0):
    """A plausible Forecast of ``row`` (``shift`` moves the predicted range, to tell answers apart)."""
    from inference.forecast import Forecast

    close = float(row.close)
    return Forecast(symbol=row.symbol, horizon=horizon, candle_open_time=int(row.open_time), close=close,
                    pred_high_pct=0.004 + shift, pred_low_pct=-0.003 + shift, high_lower=0.001, high_upper=0.008,
                    low_lower=-0.007, low_upper=-0.001, p_tp_long=0.55, p_tp_short=0.4, signal_probs=(0.2, 0.5, 0.3),
                    signal_type="HOLD", confidence=0.5, entry_price=close, take_profit=close * 1.004,
                    stop_loss=close * 0.997, reason=None, model_versions=dict(versions))


class StubBackend:
    """Forecasts from :func:`forecast_for`; ``hang`` makes every call wait forever (a hung router)."""

    def __init__(self, loaded: bool = True, hang: bool = False, feed_state: str = "streaming") -> None:
        self.loaded, self.hang, self.feed_state = loaded, hang, feed_state
        self.forecast_calls = 0

    async def _maybe_hang(self) -> None:
        if self.hang:
            await asyncio.Event().wait()

    async def forecast(self, rows, horizon):
        self.forecast_calls += 1
        await self._maybe_hang()
        return [forecast_for(r, horizon) for r in rows]

    async def models_status(self):
        await self._maybe_hang()
        return {"loaded": self.loaded, "versions": dict(VERSIONS) if self.loaded else {}, "models": {}}

    async def runtime_status(self):
        return {"feed": {"feed": "replay", "symbols": {s: {"state": self.feed_state} for s in ("BTCUSDT", "ETHUSDT")}},
                "serve": None}


def market(symbols=("BTCUSDT",), versions: dict[str, str] = VERSIONS):
    """A FeatureBuilder state with ``symbols`` warmed up and published with ``versions``."""
    from deployments.market_state import MarketState

    state = MarketState()
    for symbol in symbols:
        candles = load_test_candles(symbol, WARMUP + 5)
        t = candles["open_time"].to_numpy(np.int64)
        ev = CandleEvent(symbol, t, candles[["open", "high", "low", "close", "volume"]].to_numpy(np.float64),
                         "history", FeedClock(time.time(), float(t[-1] + FIVE_MINUTES_MS), 1.0), "test")
        res = state.ingest(ev)
        state.publish(symbol, res.open_time, versions, None)
    return state.snapshot()


def make_app(backend=None, *, redis=None, serving_log=None, symbols=("BTCUSDT",), metrics_text=None,
             metrics_access=None, database_status: str = "up", **overrides):
    """``(app, service)``: the API exactly as the ingress builds it, with the given parts."""
    from deployments.api import create_app
    from deployments.prometheus import EngineMetrics
    from deployments.service import PredictionService

    settings = load_settings(**{"api_keys": [KEY, OTHER_KEY], "serving_log": "", **overrides})
    service = PredictionService(settings, backend or StubBackend(), redis=redis,
                                metrics=EngineMetrics(use_ray=False), serving_log=serving_log)
    service.set_market(market(symbols))

    async def database():
        return {"status": database_status}

    async def no_metrics():
        return "# no metrics here\n"

    app = create_app(service, database_health=database, metrics_text=metrics_text or no_metrics,
                     serving_log=serving_log, metrics_access=metrics_access)
    return app, service


async def acall(app, method: str, path: str, *, key: str | None = KEY, client=("127.0.0.1", 40000),
                headers: dict[str, str] | None = None, **kw) -> httpx.Response:
    hdrs = {**({"X-API-Key": key} if key else {}), **(headers or {})}
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as c:
        return await c.request(method, path, headers=hdrs, **kw)


def call(app, method: str, path: str, **kw) -> httpx.Response:
    return asyncio.run(acall(app, method, path, **kw))


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert body["error"] == code and {"error", "message", "path"} <= set(body), body
    return body
