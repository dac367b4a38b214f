"""HTTP errors: the engine's error hierarchy mapped to status codes, always ``{error, message, path}``.

Why one place: every route, the auth layer and the exception handlers must agree on what a
client sees. A client can cause only 4xx answers; 503 means the engine cannot answer right now
(no model, stale market data, warming up) and says why; 500 is reserved for our own bugs.

What a body never carries: internal file paths (a 5xx message names ``<path>`` instead: the
registry's location is for operators, in /health/detailed and the logs) and text that cannot be
encoded (a lone surrogate from a hostile JSON key is replaced, not allowed to turn a 422 into a 500).
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from configs.errors import (CandleDataError, ConfigError, FeatureError, MarketDataError, MLEngineError,
                             ModelLoadError, ModelNotFoundError, PredictionError)
from ml_engine_client.models import ErrorBody  # the client parses error answers with the same class

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status and code; ``extra`` fields are added to the body."""

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}
        self.extra = extra


class StaleMarketData(MarketDataError):
    """Market data older than ``Settings.max_data_age_s`` (carries the age for the 503 body)."""

    code = "stale_market_data"

    def __init__(self, message: str, data_age_s: float | None, missing_candles: int | None = None) -> None:
        super().__init__(message)
        self.data_age_s = data_age_s
        self.missing_candles = missing_candles


class MarketDataGap(StaleMarketData):
    """No candle for longer than ``max_data_age_s``, but still short enough to be bridged
    (``features.max_bridge_candles``): an exchange halt or a lost candle. Predictions resume with
    the next candle, without a warm-up; meanwhile /predictions is a 503 naming the gap and
    /signals a HOLD with reason ``market_data_gap``."""

    code = "market_data_gap"


# Hierarchy -> (status, code). Checked in order: subclasses first.
_STATUS: tuple[tuple[type[MLEngineError], int, str], ...] = (
    (MarketDataGap, 503, "market_data_gap"),
    (StaleMarketData, 503, "stale_market_data"),
    (MarketDataError, 503, "market_data_unavailable"),
    (ModelNotFoundError, 503, "model_not_found"),
    (ModelLoadError, 503, "model_load_error"),
    (FeatureError, 503, "features_unavailable"),
    (PredictionError, 503, "prediction_unavailable"),
    (CandleDataError, 503, "market_data_invalid"),
    (ConfigError, 500, "configuration_error"),
)


def status_for(exc: MLEngineError) -> tuple[int, str]:
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal_error"


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 3)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.@+-]+/)+[\w.@+-]*")


def without_paths(message: str) -> str:
    """``message`` with absolute file paths (two components or more) replaced by ``<path>``."""
    return _ABSOLUTE_PATH.sub("<path>", message)


def _encodable(value: Any) -> Any:
    """Strings that UTF-8 can encode (lone surrogates become '?'), recursively."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    return value


def error_response(status: int, error: str, message: str, path: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    if status >= 500:
        message = without_paths(message)
    body: dict[str, Any] = {"error": error, "message": message, "path": path}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(_encodable(body), status_code=status, headers=headers)


def engine_error_response(exc: MLEngineError, path: str) -> JSONResponse:
    status, code = status_for(exc)
    extra: dict[str, Any] = {}
    if isinstance(exc, StaleMarketData):
        extra["data_age_s"] = _finite(exc.data_age_s)
        extra["missing_candles"] = exc.missing_candles
    headers = {"Retry-After": "5"} if status == 503 else None
    return error_response(status, code, str(exc), path, headers, **extra)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid"))
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, symbols: list[str], horizons: list[int]) -> None:
    """Make every error, including FastAPI's and Starlette's own, a ``{error, message, path}`` body."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.message, request.url.path, exc.headers, **exc.extra)

    @app.exception_handler(MLEngineError)
    async def _engine_error(request: Request, exc: MLEngineError) -> JSONResponse:
        status, _ = status_for(exc)
        if status >= 500 and status != 503:
            log.error("engine error on %s: %s", request.url.path, exc)
        return engine_error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = (f"{_describe_validation(exc)}. Supported symbols: {', '.join(symbols)}; "
                   f"horizons (5-minute candles): {', '.join(str(h) for h in horizons)}")
        return error_response(422, "validation_error", message, request.url.path,
                              supported_symbols=list(symbols), supported_horizons=list(horizons))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not even decode the body: a validation error too
            detail = exc.detail if isinstance(exc.detail, str) else "unreadable request body"
            return error_response(422, "validation_error",
                                  f"{detail} (send JSON). Supported symbols: {', '.join(symbols)}; horizons "
                                  f"(5-minute candles): {', '.join(str(h) for h in horizons)}", request.url.path,
                                  supported_symbols=list(symbols), supported_horizons=list(horizons))
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large",
                 415: "unsupported_media_type"}
        code = codes.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, code, detail, request.url.path, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the engine logs",
                              request.url.path)


def openapi_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses, all with :class:`ErrorBody`."""
    descriptions = {
        401: "missing or unknown X-API-Key",
        404: "no such resource",
        422: "invalid request: the body names the supported symbols and horizons",
        429: "rate limit exceeded; see the Retry-After header",
        503: "the engine cannot answer now: no model, stale market data (with its age), or warming up",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": descriptions.get(s, "error")}
        if s in (429, 503):
            entry["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                "schema": {"type": "integer"}}}
        out[s] = entry
    return out
