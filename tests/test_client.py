"""The Python client (ml_engine_client) and the signals subscriber, against the engine.

In-process: the client's operations are the app's operationIds and its models are the app's
response models (the same classes), and a 503 from the real app (a hung model graph) is retried
after the capped ``Retry-After``. Against the deployed app (``serving_app``): every route read
through the client loses no field, ``GET /`` redirects to ``/docs``, a spent rate limit (429) is
waited out as its ``Retry-After`` says, and the asyncio subscriber receives the candle's signals
equal to what POST /signals answers for it.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from ml_engine_client import OPERATIONS, AsyncMLEngineClient, MLEngineClient, MLEngineError, parse_retry_after
from ml_engine_client.models import (HealthDetailedResponse, ModelsStatusResponse, PredictionResponse, SignalBody,
                                     SignalMessage, SignalResponse)
from ml_engine_client.subscriber import subscribe_signals
from tests.conftest import SYMBOLS
from tests.hardening_util import KEY, StubBackend, make_app

pytestmark = pytest.mark.timeout(300)
HORIZONS = (6, 18, 36, 72)


# ---- in-process: the contract ---------------------------------------------------------------
def test_operation_ids_are_explicit_and_the_client_uses_the_apps_models():
    app, _ = make_app()
    spec = app.openapi()
    ops = {op["operationId"]: (method.upper(), path, op) for path, methods in spec["paths"].items()
           for method, op in methods.items()}
    assert set(ops) == set(OPERATIONS) | {"get_metrics"}, sorted(ops)
    for route in app.routes:
        if getattr(route, "include_in_schema", False):
            assert route.operation_id, f"{route.path}: no explicit operation_id"  # never FastAPI's generated one
            if route.operation_id in OPERATIONS:
                assert route.response_model is OPERATIONS[route.operation_id].model  # the same class, not a copy
    for op_id, op in OPERATIONS.items():
        method, path, doc = ops[op_id]
        assert (method, path) == (op.method, op.path)
        ref = doc["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        assert ref.endswith("/" + op.model.__name__) and schema.get("properties"), op_id  # typed, not a bare dict
    # The pub/sub message and the HTTP answer are one model's fields.
    assert issubclass(SignalMessage, SignalBody) and issubclass(SignalResponse, SignalBody)
    assert set(SignalMessage.model_fields) - set(SignalBody.model_fields) == {"published_at"}


def test_the_client_needs_neither_the_engine_nor_ray():
    """A backend installs the client next to its own code: importing it loads no engine module."""
    import subprocess
    import sys

    code = ("import sys, ml_engine_client, ml_engine_client.subscriber; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'deployments', 'configs', 'features', 'training', 'xgboost', 'fastapi')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_root_redirects_to_docs_in_process():
    app, _ = make_app()
    transport = httpx.ASGITransport(app=app)

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as c:
            return await c.get("/"), await c.get("/docs")

    root, docs = asyncio.run(go())
    assert root.status_code == 307 and root.headers["location"] == "/docs"
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_retry_after_is_parsed_as_seconds_or_http_date():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Wed, 01 Dec 2026 12:00:10 GMT", now=1796126400.0) == pytest.approx(10.0)
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


class HangsFirst(StubBackend):
    """A model graph that hangs its first ``n`` forecasts (the app answers 503 prediction_unavailable)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    async def forecast(self, rows, horizon):
        self.forecast_calls += 1
        if self.forecast_calls <= self.n:
            await asyncio.Event().wait()
        return await super().forecast(rows, horizon)


def test_a_503_is_retried_after_its_capped_retry_after_and_a_422_is_not():
    app, _ = make_app(HangsFirst(1), handle_timeout_s=0.2)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with AsyncMLEngineClient("http://engine", KEY, transport=transport, max_wait_s=0.05) as engine:
            p = await engine.prediction("BTCUSDT", 6)
            waits_after_503 = list(engine.policy.waits)
            with pytest.raises(MLEngineError) as bad:
                await engine.prediction("BTCUSDT", 7)
            return p, waits_after_503, bad.value, engine.policy.waits

    p, waits, bad, all_waits = asyncio.run(go())
    assert isinstance(p, PredictionResponse) and p.symbol == "BTCUSDT" and p.cached is False
    assert waits == [0.05]  # the app said Retry-After: 5; the client's cap is 0.05 s
    assert bad.status == 422 and bad.code == "validation_error" and bad.body.supported_horizons == list(HORIZONS)
    assert all_waits == [0.05]  # the 422 was not retried


# ---- against the deployed app ---------------------------------------------------------------
def test_client_reads_every_route_of_the_running_app_without_losing_a_field(serving_app):
    key = serving_app.new_key()
    with MLEngineClient(serving_app.base_url, key) as engine, serving_app.client(key) as raw:
        for symbol in SYMBOLS:
            for h in HORIZONS:
                p = engine.prediction(symbol, h)
                assert isinstance(p, PredictionResponse) and (p.symbol, p.horizon) == (symbol, h)
            s = engine.signal(symbol)
            assert isinstance(s, SignalResponse) and s.horizon == 6 and s.signal_type in ("BUY", "SELL", "HOLD")
            assert engine.indicators(symbol).groups
        assert engine.health().status == "ok" and engine.ready().checks["models"].ok
        status = engine.models_status()
        assert isinstance(status, ModelsStatusResponse) and status.loaded
        assert set(status.models) == set(status.versions) and status.models["meta_model"].version
        health = engine.health_detailed()
        assert isinstance(health, HealthDetailedResponse) and health.status == "ok"
        assert health.cache.status == "up" and all(not health.market.symbols[s].stale for s in SYMBOLS)
        # The typed models keep every field the engine sends (and invent none).
        for op_id, path in (("get_health_detailed", "/health/detailed"), ("get_models_status", "/models/status")):
            body = raw.get(path).json()
            assert OPERATIONS[op_id].model.model_validate(body).model_dump(mode="json", exclude_unset=True) == body
        body = raw.post("/signals", json={"symbol": "BTCUSDT", "horizon": 18}).json()
        assert SignalResponse.model_validate(body).model_dump(mode="json") == body
    with MLEngineClient(serving_app.base_url, "not-a-key-of-this-engine-at-all") as stranger:
        with pytest.raises(MLEngineError) as denied:
            stranger.signal("BTCUSDT")
    assert denied.value.status == 401 and denied.value.code == "unauthorized" and stranger.policy.waits == []


def test_root_of_the_running_app_redirects_to_docs(serving_app):
    with serving_app.client() as anon:
        r = anon.get("/")
        assert r.status_code == 307 and r.headers["location"] == "/docs"
        assert anon.get("/", follow_redirects=True).status_code == 200


def test_client_waits_out_a_spent_rate_limit_as_retry_after_says(serving_app):
    key = serving_app.new_key()
    with serving_app.client(key) as raw:
        for _ in range(400):
            r = raw.post("/signals", json={"symbol": "ETHUSDT"})
            if r.status_code == 429:
                break
            assert r.status_code == 200, r.text
        assert r.status_code == 429, "the rate limit was never reached"
        told = float(r.headers["Retry-After"])
    with MLEngineClient(serving_app.base_url, key, max_wait_s=10) as engine:
        t0 = time.monotonic()
        s = engine.signal("ETHUSDT")
        took = time.monotonic() - t0
    assert isinstance(s, SignalResponse) and s.symbol == "ETHUSDT"
    assert engine.policy.waits and 0 < engine.policy.waits[0] <= 10  # it waited as told, then got its answer
    assert took >= engine.policy.waits[0] and told > 0


def test_subscriber_receives_the_candles_signals_as_post_signals_answers_them(serving_app):
    key = serving_app.new_key()
    symbol = "ETHUSDT"

    async def collect(open_times: list[int]) -> dict[int, SignalMessage]:
        ready = asyncio.Event()
        received: list[SignalMessage] = []  # the candle's messages arrive while step() is still running

        async def consume():
            async for msg in subscribe_signals(serving_app.redis.url, [symbol], ready=ready):
                received.append(msg)

        task = asyncio.create_task(consume())
        try:
            await asyncio.wait_for(ready.wait(), 10)
            t = (await asyncio.to_thread(serving_app.step, symbol, 1))["last_open_time"]
            open_times.append(t)
            deadline = time.monotonic() + 30
            while {m.horizon for m in received if m.candle_open_time == t} != set(HORIZONS):
                assert time.monotonic() < deadline, [(m.candle_open_time, m.horizon) for m in received]
                await asyncio.sleep(0.1)
            return {m.horizon: m for m in received if m.candle_open_time == t}
        finally:
            task.cancel()

    serving_app.pause(symbol)
    try:
        open_times: list[int] = []
        messages = asyncio.run(collect(open_times))
        t = open_times[0]
        serving_app.wait_for_candle(key, symbol, t)
        with MLEngineClient(serving_app.base_url, key) as engine:
            for h, msg in messages.items():
                assert msg.symbol == symbol and msg.published_at > 0 and msg.model_fields_set == set(
                    SignalMessage.model_fields)  # every documented field was in the message
                answer = engine.signal(symbol, h)
                assert answer.candle_open_time == t
                assert msg.model_dump(exclude={"published_at"}) == answer.model_dump(exclude={"cached", "data_age_s"})
    finally:
        serving_app.resume(symbol)
