"""A typed HTTP client of the engine (httpx), retrying 429 and 503 as the engine asks.

Why retries live here: the engine answers 429 ``rate_limited`` (the per-key budget) and 503 (stale
market data, a model graph that did not answer in time, not ready yet) with a ``Retry-After``
header saying when to come back. A caller that retries at once only spends more of its budget;
one that honours the header gets its answer as soon as the engine can give it. Every other error
(401, 413, 422, ...) is the caller's to fix and is raised at once as :class:`MLEngineError`.

Answers are parsed into the API's own response models (:mod:`ml_engine_client.models`, the
classes FastAPI documents), so a client is typed exactly as the OpenAPI schema says::

    from ml_engine_client import MLEngineClient

    with MLEngineClient("http://127.0.0.1:8000", api_key="...") as engine:
        signal = engine.signal("BTCUSDT")
        print(signal.signal_type, signal.confidence, signal.take_profit)

:class:`AsyncMLEngineClient` has the same methods as coroutines.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt

from ml_engine_client.models import (ErrorBody, HealthDetailedResponse, HealthResponse, IndicatorsResponse,
                                     ModelsStatusResponse, PredictionResponse, ReadinessResponse, SignalResponse)

M = TypeVar("M", bound=BaseModel)
RETRIED_STATUSES = frozenset({429, 503})
API_KEY_HEADER = "X-API-Key"


class MLEngineError(Exception):
    """An error answer: ``status``, the engine's ``code`` and message, and ``retry_after_s`` if sent."""

    def __init__(self, status: int, body: Optional[ErrorBody], text: str, retry_after_s: Optional[float]) -> None:
        self.status = status
        self.body = body
        self.code = body.error if body else None
        self.retry_after_s = retry_after_s
        super().__init__(f"{status} {self.code or ''}: {body.message if body else text[:200]}".replace("  ", " "))


@dataclass(frozen=True)
class Operation:
    """One route of the API, named by its OpenAPI ``operationId``."""

    method: str
    path: str
    model: type[BaseModel]


# operationId -> route; tests/test_client.py checks these against the app's OpenAPI document.
OPERATIONS: dict[str, Operation] = {
    "get_prediction": Operation("POST", "/predictions", PredictionResponse),
    "get_signal": Operation("POST", "/signals", SignalResponse),
    "get_indicators": Operation("GET", "/indicators", IndicatorsResponse),
    "get_models_status": Operation("GET", "/models/status", ModelsStatusResponse),
    "get_health": Operation("GET", "/health", HealthResponse),
    "get_readiness": Operation("GET", "/health/ready", ReadinessResponse),
    "get_health_detailed": Operation("GET", "/health/detailed", HealthDetailedResponse),
}


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error(response: httpx.Response) -> MLEngineError:
    try:
        body: Optional[ErrorBody] = ErrorBody.model_validate_json(response.content)
    except ValidationError:
        body = None
    return MLEngineError(response.status_code, body, response.text,
                         parse_retry_after(response.headers.get("Retry-After")))


class _Policy:
    """What is retried and how long to wait: ``Retry-After`` when given (capped), else backoff."""

    def __init__(self, attempts: int, max_wait_s: float, backoff_s: float) -> None:
        self.attempts = attempts
        self.max_wait_s = max_wait_s
        self.backoff_s = backoff_s
        self.waits: list[float] = []  # the pause before each retry this client made (observability, tests)

    @staticmethod
    def retryable(exc: BaseException) -> bool:
        return ((isinstance(exc, MLEngineError) and exc.status in RETRIED_STATUSES)
                or isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError)))

    def wait(self, state) -> float:
        exc = state.outcome.exception()
        hinted = exc.retry_after_s if isinstance(exc, MLEngineError) else None
        seconds = hinted if hinted is not None else self.backoff_s * 2 ** (state.attempt_number - 1)
        seconds = min(seconds, self.max_wait_s)
        self.waits.append(seconds)
        return seconds

    def kwargs(self) -> dict[str, Any]:
        return {"retry": retry_if_exception(self.retryable), "wait": self.wait,
                "stop": stop_after_attempt(self.attempts), "reraise": True}


def _request_args(op_id: str, *, json: Any = None, params: Any = None, fresh: bool = False) -> dict[str, Any]:
    op = OPERATIONS[op_id]
    headers = {"Cache-Control": "no-cache"} if fresh else {}
    return {"method": op.method, "url": op.path, "json": json, "params": params, "headers": headers}


def _parse(op_id: str, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error(response)
    return OPERATIONS[op_id].model.model_validate_json(response.content)


def _signal_json(symbol: str, horizon: Optional[int]) -> dict[str, Any]:
    return {"symbol": symbol} if horizon is None else {"symbol": symbol, "horizon": horizon}


class MLEngineClient:
    """Synchronous client. ``attempts`` bounds tries per call (1 = no retry); a ``Retry-After``
    longer than ``max_wait_s`` is cut to it. ``transport`` is httpx's (tests, proxies, ASGI apps)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, *, timeout: float = 10.0, attempts: int = 4,
                 max_wait_s: float = 30.0, backoff_s: float = 0.5, transport: Optional[httpx.BaseTransport] = None):
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        self.policy = _Policy(attempts, max_wait_s, backoff_s)

    def _call(self, op_id: str, **kw: Any) -> Any:
        for attempt in Retrying(**self.policy.kwargs()):
            with attempt:
                return _parse(op_id, self.http.request(**_request_args(op_id, **kw)))

    def prediction(self, symbol: str, horizon: int, *, fresh: bool = False) -> PredictionResponse:
        """POST /predictions; ``fresh`` computes now instead of reading the cache."""
        return self._call("get_prediction", json={"symbol": symbol, "horizon": horizon}, fresh=fresh)

    def signal(self, symbol: str, horizon: Optional[int] = None, *, fresh: bool = False) -> SignalResponse:
        """POST /signals (the engine's signal horizon when ``horizon`` is None)."""
        return self._call("get_signal", json=_signal_json(symbol, horizon), fresh=fresh)

    def indicators(self, symbol: str) -> IndicatorsResponse:
        return self._call("get_indicators", params={"symbol": symbol})

    def models_status(self) -> ModelsStatusResponse:
        return self._call("get_models_status")

    def health(self) -> HealthResponse:
        return self._call("get_health")

    def ready(self) -> ReadinessResponse:
        """GET /health/ready; retried while the engine answers 503 not_ready (within ``attempts``)."""
        return self._call("get_readiness")

    def health_detailed(self) -> HealthDetailedResponse:
        return self._call("get_health_detailed")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "MLEngineClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncMLEngineClient:
    """The same as :class:`MLEngineClient`, for asyncio callers."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, *, timeout: float = 10.0, attempts: int = 4,
                 max_wait_s: float = 30.0, backoff_s: float = 0.5,
                 transport: Optional[httpx.AsyncBaseTransport] = None):
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        self.policy = _Policy(attempts, max_wait_s, backoff_s)

    async def _call(self, op_id: str, **kw: Any) -> Any:
        async for attempt in AsyncRetrying(**self.policy.kwargs()):
            with attempt:
                return _parse(op_id, await self.http.request(**_request_args(op_id, **kw)))

    async def prediction(self, symbol: str, horizon: int, *, fresh: bool = False) -> PredictionResponse:
        return await self._call("get_prediction", json={"symbol": symbol, "horizon": horizon}, fresh=fresh)

    async def signal(self, symbol: str, horizon: Optional[int] = None, *, fresh: bool = False) -> SignalResponse:
        return await self._call("get_signal", json=_signal_json(symbol, horizon), fresh=fresh)

    async def indicators(self, symbol: str) -> IndicatorsResponse:
        return await self._call("get_indicators", params={"symbol": symbol})

    async def models_status(self) -> ModelsStatusResponse:
        return await self._call("get_models_status")

    async def health(self) -> HealthResponse:
        return await self._call("get_health")

    async def ready(self) -> ReadinessResponse:
        return await self._call("get_readiness")

    async def health_detailed(self) -> HealthDetailedResponse:
        return await self._call("get_health_detailed")

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncMLEngineClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
