"""The HTTP API (FastAPI): routes, request/response schemas, auth and rate limiting.

``create_app`` builds the app around a :class:`~deployments.service.PredictionService`; the Serve
ingress (``@serve.ingress``) and the plain baseline both call it, so they serve identical routes.
Request models are built from the settings: the OpenAPI schema lists the supported symbols and
horizons as enums, and every response (200 and each error) is documented with its schema.

Hot-path note: /predictions and /signals return pre-rendered JSON bytes (``Response``), so
FastAPI does not re-validate and re-serialise the answer; the response models are for the docs.

Before any route runs, :class:`~deployments.guard.RequestGuard` refuses oversized bodies (413) and
requests without a valid key (401, throttled to 429 per address) on the headers alone: FastAPI
parses a body before dependencies, so the key check cannot live only in one.
"""


import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, Header, Query, Request, Response, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse
from fastapi.security import APIKeyHeader
from pydantic import ConfigDict, Field, SecretStr, create_model

from configs.settings import scrub
from deployments.auth import retry_after_header
from deployments.errors import ApiError, install_error_handlers, openapi_errors
from deployments.guard import API_KEY_HEADER, KID_STATE, MetricsAccess, RequestGuard
from deployments.hooks import ServingLog
from deployments.prometheus import MetricsUnavailable
from deployments.service import PredictionService
from ml_engine_client.models import (HealthDetailedResponse, HealthResponse, IndicatorsResponse, ModelsStatusResponse,
                                     PredictionResponse, ReadinessResponse, SignalResponse)


# ---- the app --------------------------------------------------------------------------------
def api_description(settings, symbols: list[str], horizons: list[int]) -> str:
    """The overview shown at the top of /docs and docs/api.md."""
    return f"""Price-range predictions and BUY/SELL/HOLD signals for {', '.join(symbols)} over \
{', '.join(str(h) for h in horizons)} five-minute candles ({', '.join(f"{h * 5} min" for h in horizons)}).

**Keys and limits.** Every route except `/health`, `/health/ready` and `/metrics` needs exactly one \
`{API_KEY_HEADER}` header with one of the keys in `MLE_API_KEYS` (a missing, unknown or repeated key is a \
401, answered before the request body is read). `/metrics` needs no key from loopback and the cluster's \
own nodes (`MLE_METRICS_NETWORKS`), a key from anywhere else. Each key may make \
{settings.rate_limit_per_minute} requests per minute, in bursts of up to as many; beyond that the answer \
is 429 with a `Retry-After` header (seconds). Each client address may fail authentication \
{settings.auth_failures_per_minute} times per minute; beyond that its 401s become 429s (requests with a \
valid key are never refused for their address). Both limits are shared by every ingress replica through \
Redis (each replica limits on its own while Redis is down). A request body over \
{settings.max_body_bytes} bytes is refused with 413 before it is read.

**Errors** are always JSON `{{"error": code, "message": text, "path": path}}`: 422 `validation_error` \
for a bad request (it names the supported symbols and horizons), 401 `unauthorized`, 413 \
`payload_too_large`, 429 `rate_limited`, 503 when the engine cannot answer right now: `market_data_gap` or \
`stale_market_data` (with `data_age_s`: no candle for more than {settings.max_data_age_s:g} s; see below), \
`market_data_unavailable`, `model_not_found`, `features_unavailable` (warming up: features need 1000 \
contiguous candles), `prediction_unavailable` (the model graph failed or did not answer within \
{settings.handle_timeout_s:g} s), `not_ready`, `metrics_unavailable`. A 503 carries `Retry-After`; its \
message names no file path.

**When data is missing** (an exchange halt, a lost candle, a feed outage, warm-up), the engine never \
guesses: `/signals` answers HOLD with confidence 0, no take-profit or stop-loss, and a `reason` code \
(`market_data_gap` while no candle has arrived for more than {settings.max_data_age_s:g} s but the gap is \
still short enough to be bridged -- up to {settings.features.max_bridge_candles} candles --, then \
`stale_market_data`; `features_unavailable` while warming up); `/predictions` answers 503 with the same \
code, `data_age_s` and `missing_candles`. A short gap is bridged with no-trade candles, so predictions \
resume with the first candle after it, without a warm-up.

**Every HOLD says why.** Besides those forced codes, a HOLD the models chose carries `edge_below_costs` \
(the proposed trade's expected net R after the costs of fee profile `{settings.fee_profile}` is below the \
floors chosen on out-of-fold data, or the horizon found no edge at all) or `low_confidence` (it clears \
them, but `p_win` is below `MLE_SIGNAL_MIN_CONFIDENCE`, now {settings.signal_min_confidence:g}); such a \
HOLD keeps the models' `p_win`, `expected_r` and the would-be long's take-profit and stop-loss. BUY and \
SELL have `reason` null.

**Reading a signal's economics.** R is profit in units of the stop distance (entry to `stop_loss`): a \
stop-out is about -1 R. `cost_r` is what the round trip's fees and slippage cost in R (e.g. 0.33: a \
third of the risk; the stop is never closer than three round-trip costs), `p_win` (= `confidence`) the \
calibrated probability that the trade ends with net R > 0 after those costs, and `expected_r` the \
expected net R after them: size a position from `stop_loss` and take the trade only when `expected_r` \
> 0, which is what BUY/SELL means. For a HOLD these describe the proposal the engine turned down (the \
larger of `probabilities` BUY/SELL). All of them assume `fee_profile` (configs/fees.yaml; \
`MLE_FEE_PROFILE`): on another venue or order type, costs and hence `expected_r` differ. \
`probabilities` are the signal classifier's class probabilities, the primary model whose proposal the \
meta-model judges; they are not the chance that the trade pays.

**Freshness.** Predictions refer to the newest closed candle (`candle_open_time`, ms UTC). They are \
computed when it closes, for every symbol and horizon, and cached (Redis \
`prediction:{{symbol}}:{{horizon}}:{{candle_open_time}}`, expiring when the next candle closes); each \
signal is also published as JSON on the Redis channel `signals:{{symbol}}`. An answer says whether it came \
from the cache (`cached`) and how old the market data is (`data_age_s`, seconds since the candle closed, \
in the feed's time). `Cache-Control: no-cache` computes the answer now through the model graph.

**Percentages** (`*_pct`) are percent of the candle's close: 0.4 means +0.4 %.

**Clients.** Every route has a stable `operationId` (`get_prediction`, `get_signal`, ...: the method names \
of generated clients) and a response model. The Python client `ml_engine_client` (in this repository) \
parses answers into these very models and retries 429 and 503 as their `Retry-After` says. `GET /` \
redirects to this page's interactive form, `/docs`."""


def create_app(service: PredictionService, *, database_health: Callable[[], Awaitable[dict[str, Any]]],
               metrics_text: Callable[[], Awaitable[str]], serving_log: ServingLog | None = None,
               title: str = "ML Engine", metrics_access: MetricsAccess | None = None) -> FastAPI:
    """The engine's FastAPI app: the guard and CORS, then the routes in the order OpenAPI lists them."""
    settings = service.settings
    Symbol, PredictionRequest, SignalRequest = request_models(service)
    app = FastAPI(title=title, version="1.0.0",
                  description=api_description(settings, service.symbols, service.horizons))
    install_error_handlers(app, service.symbols, service.horizons)
    authorized = key_check(service)
    app.add_middleware(RequestGuard, routes_of=app, key_check=authorized, keys=service.keys,
                       failures=service.auth_failures, max_body_bytes=settings.max_body_bytes,
                       metrics=metrics_access or MetricsAccess(settings.metrics_networks))
    if settings.cors_origins:  # added last: outermost, so a preflight never meets the guard's 401
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_credentials=settings.cors_allow_credentials, allow_methods=["GET", "POST"],
                           allow_headers=[API_KEY_HEADER, "Content-Type", "Cache-Control"],
                           expose_headers=["Retry-After"], max_age=600)
    _prediction_routes(app, service, authorized, PredictionRequest, SignalRequest)
    _status_routes(app, service, authorized, Symbol, serving_log)
    _health_routes(app, service, authorized, database_health, serving_log)
    _metrics_route(app, metrics_text)
    return app


def request_models(service: PredictionService) -> tuple[Any, type, type]:
    """``(Symbol, PredictionRequest, SignalRequest)`` built from the settings: OpenAPI lists the
    supported symbols and horizons as enums, and anything else is a 422 naming them."""
    symbols, horizons = service.symbols, service.horizons
    Symbol = Literal[tuple(symbols)]  # type: ignore[valid-type]
    Horizon = Literal[tuple(horizons)]  # type: ignore[valid-type]
    strict = ConfigDict(extra="forbid")
    PredictionRequest = create_model(
        "PredictionRequest", __config__=strict,
        symbol=(Symbol, Field(description="exchange symbol", examples=[symbols[0]])),
        horizon=(Horizon, Field(description="horizon in 5-minute candles", examples=[horizons[0]])))
    SignalRequest = create_model(
        "SignalRequest", __config__=strict,
        symbol=(Symbol, Field(description="exchange symbol", examples=[symbols[0]])),
        horizon=(Optional[Horizon], Field(None, description=f"horizon in 5-minute candles (default "
                                                            f"{service.signal_horizon})")))
    return Symbol, PredictionRequest, SignalRequest


def key_check(service: PredictionService) -> Callable[..., Awaitable[str]]:
    """The dependency that identifies the key (the guard usually has already) and rate-limits it."""
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="one of the keys in MLE_API_KEYS")

    async def authorized(request: Request, key: Optional[str] = Security(key_header)) -> str:
        kid = request.scope.get("state", {}).get(KID_STATE)  # the guard identified the key already
        kid = kid or service.keys.identify(key)
        if kid is None:
            raise ApiError(401, "unauthorized", f"missing or unknown {API_KEY_HEADER} header")
        wait, _scope = await service.limiter.check(kid)
        if wait > 0:
            raise ApiError(429, "rate_limited",
                           f"more than {service.limiter.limit} requests per minute for this API key",
                           headers={"Retry-After": retry_after_header(wait)}, retry_after_s=round(wait, 3))
        return kid

    return authorized


def json_bytes(body: bytes) -> Response:
    """A pre-rendered answer as it is: FastAPI neither re-validates nor re-serialises it."""
    return Response(content=body, media_type="application/json")


def no_cache(value: Optional[str]) -> bool:
    return bool(value) and "no-cache" in value.lower()


AUTH_ERRORS = openapi_errors(401, 413, 422, 429, 503)
CACHE_CONTROL_DOC = ("`no-cache` computes the answer now through the model graph instead of reading the cache "
                     "(and refreshes the cache)")


def _prediction_routes(app: FastAPI, service: PredictionService, authorized: Callable[..., Awaitable[str]],
                       PredictionRequest: type, SignalRequest: type) -> None:
    """``POST /predictions`` and ``POST /signals``."""
    @app.post("/predictions", operation_id="get_prediction",
              response_model=PredictionResponse, responses=AUTH_ERRORS, tags=["predictions"],
              summary="Predicted high and low over the horizon, with the 10-90% interval")
    async def predictions(req: PredictionRequest,  # type: ignore[valid-type]
                          kid: str = Depends(authorized),
                          cache_control: Optional[str] = Header(None, description=CACHE_CONTROL_DOC)) -> Response:
        """The median predicted highest and lowest price over the next `horizon` candles, as prices and
        percent of the last close, with the 10%-90% interval of each (`interval.coverage` = 0.8), for the
        newest closed candle. 503 `features_unavailable` when the candle's features are undefined (warm-up,
        a data gap): the engine does not guess.

        Which field for what: `predicted_high`/`predicted_low` (medians) are the typical extremes and the
        best forecast for absolute error — use them for a "likely" level, and the `interval` bounds for
        stops and position sizing (10% / 90% quantiles, 80% of outcomes inside). `predicted_high_mean`/
        `predicted_low_mean` are the expected extremes (the best forecast for squared error, hence for R²):
        use them where an average over many trades matters (expected-value and P&L models). The future
        high is right-skewed, so the mean lies above the median (and the mean low below the median low)."""
        return json_bytes(await service.answer("predictions", req.symbol, req.horizon,
                                               fresh=no_cache(cache_control), kid=kid))

    @app.post("/signals", operation_id="get_signal",
              response_model=SignalResponse, responses=AUTH_ERRORS, tags=["predictions"],
              summary="BUY/SELL/HOLD with confidence, entry, take-profit and stop-loss")
    async def signals(req: SignalRequest,  # type: ignore[valid-type]
                      kid: str = Depends(authorized),
                      cache_control: Optional[str] = Header(None, description=CACHE_CONTROL_DOC)) -> Response:
        """BUY, SELL or HOLD for the newest closed candle, with the trade: `entry_price` (the close),
        `take_profit` and `stop_loss` (barriers from the horizon's volatility forecast, the stop at least
        three round-trip costs; SELL uses the short's), and its economics after the costs of `fee_profile`:
        `p_win` (= `confidence`, the calibrated probability of net R > 0), `expected_r` (expected net R, in
        units of the stop distance) and `cost_r` (the round trip in the same units). `probabilities` are the
        signal classifier's (the side it ranks higher is the proposal the meta-model judges). BUY/SELL only
        when `expected_r` clears the floors chosen on out-of-fold data; otherwise HOLD `edge_below_costs`
        (or `low_confidence` under `MLE_SIGNAL_MIN_CONFIDENCE`), with the would-be long's barriers; a forced
        code with null barriers and confidence 0 when the data is bad or missing. Without `horizon`, the
        engine's signal horizon (the shortest unless configured)."""
        horizon = req.horizon if req.horizon is not None else service.signal_horizon
        return json_bytes(await service.answer("signals", req.symbol, horizon, fresh=no_cache(cache_control),
                                               kid=kid))


def _status_routes(app: FastAPI, service: PredictionService, authorized: Callable[..., Awaitable[str]],
                   Symbol: Any, serving_log: ServingLog | None) -> None:
    """``GET /indicators`` and ``GET /models/status``."""
    @app.get("/indicators", operation_id="get_indicators",
             response_model=IndicatorsResponse, responses=AUTH_ERRORS, tags=["market"],
             summary="The latest indicator values (the model's features), by group")
    async def indicators(symbol: Symbol = Query(description="exchange symbol"),  # type: ignore[valid-type]
                         kid: str = Depends(authorized)) -> dict[str, Any]:
        """The newest candle's indicator values -- exactly the features the models see -- grouped for
        people (volatility, momentum, trend, volume, time, higher timeframes). Volatility and distances are
        scale-free (fractions of the close)."""
        return service.indicators(symbol)

    @app.get("/models/status", operation_id="get_models_status",
             response_model=ModelsStatusResponse, responses=openapi_errors(401, 429, 503),
             tags=["operations"], summary="Each model's version, training range, walk-forward metrics, load time")
    async def models_status(kid: str = Depends(authorized)) -> dict[str, Any]:
        """The served version of each model (range predictor, TP/SL classifier, signal classifier,
        meta-model), its training data range, walk-forward metrics and when this engine loaded it. A new
        version promoted in the registry is served within seconds, without a restart. `live`: the
        accuracy measured on resolved outcomes per model version (24 h, 7 d, all) and the drift verdict."""
        status = await service.models_status()
        if serving_log is not None:
            try:
                status = {**status, "live": await asyncio.wait_for(serving_log.live_metrics(), timeout=5)}
            except Exception as exc:  # the figures are a view: the status answers without them
                status = {**status, "live": {"status": "unknown", "error": f"{type(exc).__name__}: {exc}"[:300]}}
        return status


def _health_routes(app: FastAPI, service: PredictionService, authorized: Callable[..., Awaitable[str]],
                   database_health: Callable[[], Awaitable[dict[str, Any]]], serving_log: ServingLog | None) -> None:
    """``GET /`` (to the docs), ``/health``, ``/health/ready`` and ``/health/detailed``."""
    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        """A browser opening the engine's address lands on the interactive API docs."""
        return RedirectResponse("/docs", status_code=307)

    @app.get("/health", operation_id="get_health",
             response_model=HealthResponse, tags=["operations"], summary="Liveness (no key needed)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", operation_id="get_readiness",
             response_model=ReadinessResponse, responses=openapi_errors(503), tags=["operations"],
             summary="Readiness for load balancers: 503 until models, market data and the graph are up (no key)")
    async def health_ready() -> dict[str, Any]:
        """200 once this engine can answer: the models are loaded, every symbol has market data and the
        model graph answers. Staleness does not make it unready (every replica shares the feed: pulling
        them all would turn a clear 503 `stale_market_data` into refused connections)."""
        ready, checks = await service.readiness()
        if not ready:
            failing = ", ".join(name for name, check in checks.items() if not check["ok"])
            raise ApiError(503, "not_ready", f"not ready: {failing}", headers={"Retry-After": "5"}, checks=checks)
        return {"status": "ready", "checks": checks}

    @app.get("/health/detailed", operation_id="get_health_detailed",
             response_model=HealthDetailedResponse, responses=openapi_errors(401, 429),
             tags=["operations"], summary="Models, cache, database, market feed (with data age), Serve replicas")
    async def health_detailed(kid: str = Depends(authorized)) -> dict[str, Any]:
        """`status` is `ok`, `degraded` (the cache or database is down, or a symbol's data is stale) or
        `down` (no model, or every symbol stale). Also: each model's version, the cache (Redis), the
        database (PostgreSQL) and the prediction log, per symbol the market data age and feed state, and the
        Serve deployments with their replicas."""
        database = await database_health()
        if serving_log is not None:
            try:
                database = {**database, "log": await asyncio.wait_for(serving_log.health(), timeout=3)}
            except Exception as exc:
                database = {**database, "log": {"status": "unknown", "error": scrub(f"{type(exc).__name__}: {exc}")}}
        return await service.health_detailed(database)


def _metrics_route(app: FastAPI, metrics_text: Callable[[], Awaitable[str]]) -> None:
    """``GET /metrics`` (the guard decides who may read it)."""
    @app.get("/metrics", operation_id="get_metrics",
             tags=["operations"], summary="Prometheus metrics of the engine (no key needed)",
             response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}, **openapi_errors(401, 503)})
    async def metrics() -> Response:
        """Prometheus text: the engine's series (`ml_predictions_total{symbol,horizon}`,
        `ml_prediction_latency_seconds{endpoint,source}`, `ml_cache_hits_total{layer}`,
        `ml_cache_misses_total{layer}`, `ml_market_data_age_seconds{symbol}`, the live
        `ml_interval_coverage_ratio{model_name,window}` and `ml_signal_hit_ratio{model_name,window}`, ...;
        every one in docs/metrics.md), aggregated over every replica of the node (Ray's metrics agent; Ray
        itself exports them with a `ray_` prefix)."""
        try:
            text = await metrics_text()
        except MetricsUnavailable as exc:
            raise ApiError(503, "metrics_unavailable", str(exc), headers={"Retry-After": "5"}) from None
        return Response(content=text, media_type="text/plain; version=0.0.4")


class DatabaseProbe:
    """Is PostgreSQL reachable? One short connect + SELECT 1, remembered for ``interval_s``."""

    def __init__(self, url: str | SecretStr, timeout_s: float = 2.0, interval_s: float = 5.0) -> None:
        self.url = url.get_secret_value() if isinstance(url, SecretStr) else url
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._last: tuple[float, dict[str, Any]] | None = None

    async def __call__(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval_s:
            return self._last[1]
        import asyncpg

        try:
            conn = await asyncpg.connect(self.url, timeout=self.timeout_s)
            try:
                await conn.fetchval("SELECT 1", timeout=self.timeout_s)
            finally:
                await conn.close(timeout=self.timeout_s)
            result: dict[str, Any] = {"status": "up"}
        except Exception as exc:  # any failure means "down" for health purposes
            result = {"status": "down", "error": scrub(f"{type(exc).__name__}: {exc}", self.url)[:300]}
        self._last = (now, result)
        return result
