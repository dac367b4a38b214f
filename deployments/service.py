"""The request logic behind the HTTP API, independent of how forecasts are computed.

The Serve ingress runs it with a backend that calls the EnsembleRouter through a
DeploymentHandle; the plain FastAPI baseline (bench/baseline_fastapi.py) runs the very same code
with an in-process Ensemble, so the benchmark compares only what Serve adds.

Request path of POST /predictions (and /signals):

1. the market snapshot (pushed by the FeatureBuilder) names the symbol's newest candle and its
   data age: no data -> 503, older than ``max_data_age_s`` -> 503 with the age;
2. the ingress's own memory holds rendered answers for that candle: a hit is answered without
   leaving the process (no Redis, no hop);
3. else Redis ``prediction:{symbol}:{horizon}:{candle_open_time}`` (written at candle close);
4. else compute through the graph, write Redis (expiring when the next candle closes) and memory.
   Concurrent misses for the same key share one computation. ``Cache-Control: no-cache`` skips
   2-3 and always computes (and refreshes the cache).

Redis down: step 3 is skipped, the answer is computed, health says the cache is down. A Redis
entry is served only if :func:`~deployments.cache.read_entry` accepts it (signed by this
deployment, of the schema, made with the snapshot's models and feature set); anything else is a
miss, counted. Every call to the backend (DeploymentHandle calls in Serve) has a deadline,
``Settings.handle_timeout_s``: a hung graph answers 503 ``prediction_unavailable``, it does not
hold requests open.

Missing data (docs/api.md "When data is missing"): no candle for longer than ``max_data_age_s`` is a
``market_data_gap`` while the gap is short enough to be bridged (``features.max_bridge_candles``;
an exchange halt), else ``stale_market_data``; features undefined (warm-up after a long gap) is
``features_unavailable``. /predictions answers those with a 503 naming the problem; /signals with a
HOLD carrying the same code as its ``reason`` (confidence 0, no trade): bad or missing data is never
a guess, and a backend polling signals always gets an answer it can act on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Literal, Protocol, Sequence

from configs.settings import Settings
from deployments import health
from deployments.auth import ApiKeys, RateLimiter, deployment_secret
from deployments.cache import CacheUnavailable, RedisGateway, make_entry, prediction_key, read_entry
from deployments.errors import MarketDataGap, StaleMarketData, status_for
from deployments.hooks import NullServingLog, RequestRecord, ServingLog
from deployments.prometheus import EngineMetrics
from deployments.render import body_prefix, finish, indicators_body, prediction_body, signal_body
from deployments.state import FeatureRow, MarketSnapshot, SymbolState, iso_time
from features.candles import FIVE_MINUTES_MS
from configs.errors import FeatureError, MarketDataError, MLEngineError, PredictionError
from features.indicators import feature_names, feature_set_hash
from inference.forecast import Forecast

log = logging.getLogger(__name__)

Endpoint = Literal["predictions", "signals"]


class Backend(Protocol):
    """How the service computes forecasts and learns about models and the runtime."""

    async def forecast(self, rows: Sequence[FeatureRow], horizon: int) -> list[Forecast]: ...

    async def models_status(self) -> dict[str, Any]: ...

    async def runtime_status(self) -> dict[str, Any]: ...


class PredictionService:
    """Answers the API's questions from the market snapshot, the caches and a :class:`Backend`."""

    def __init__(self, settings: Settings, backend: Backend, *, redis: RedisGateway | None,
                 metrics: EngineMetrics, serving_log: ServingLog | None = None,
                 settings_sources: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.settings_sources = settings_sources or {}  # configs.settings.setting_sources: shown by health
        self.backend = backend
        self.redis = redis
        self.metrics = metrics
        self.log = serving_log or NullServingLog()
        self._log_enabled = not isinstance(self.log, NullServingLog)
        self.symbols = list(settings.market.symbols)
        self.horizons = list(settings.market.horizons)
        self.signal_horizon = settings.signal_horizon or min(self.horizons)
        q = settings.models.quantiles
        self.coverage = round(q[2] - q[0], 6)
        self.feature_names = tuple(feature_names(settings.features))
        self.feature_hash = feature_set_hash(settings.features)
        self.secret = deployment_secret(settings)
        self.keys = ApiKeys(settings.api_keys, self.secret)  # ConfigError without keys: never serve open
        self.limiter = RateLimiter(settings.rate_limit_per_minute, redis)
        self.auth_failures = RateLimiter(settings.auth_failures_per_minute, redis, prefix="authfail")
        self.market = MarketSnapshot.empty(self.symbols)
        self.started_at = time.time()
        # (endpoint, symbol, horizon) -> (candle, rendered body prefix, the Forecast it renders, for the log)
        self._local: dict[tuple[str, str, int], tuple[int, bytes, Forecast]] = {}
        self._inflight: dict[tuple[str, int, int], asyncio.Task] = {}

    def set_rate_limit(self, per_minute: int) -> None:
        """A new per-key limit (Serve ``user_config`` of the ingress, applied live)."""
        if per_minute != self.limiter.limit:
            self.settings = self.settings.model_copy(update={"rate_limit_per_minute": per_minute})
            self.limiter = RateLimiter(per_minute, self.redis)

    # ---- market state ----------------------------------------------------------------------
    def set_market(self, snapshot: MarketSnapshot) -> None:
        """Adopt a newer snapshot; rendered answers of older candles (or models) are dropped."""
        if snapshot.version != self.market.version or snapshot.epoch != self.market.epoch:
            self.market = self.market.adopt(snapshot)
            self._local.clear()

    def record_ages(self) -> None:
        """Update the market-data-age gauge (called periodically: the age grows between candles)."""
        for symbol, st in self.market.symbols.items():
            age = st.data_age_s()
            if age is not None:
                self.metrics.market_data_age(symbol, age)

    def current(self, symbol: str) -> tuple[SymbolState, float]:
        """The symbol's state and data age; 503 errors when there is none or it is stale."""
        st = self.market.symbols.get(symbol)
        if st is None or st.open_time is None:
            raise MarketDataError(f"no market data for {symbol} yet: the feed is starting or down")
        age = st.data_age_s() or 0.0
        if age > self.settings.max_data_age_s:
            raise self._missing_data(st, age)
        return st, age

    def _missing_data(self, st: SymbolState, age: float) -> StaleMarketData:
        """A gap (bridgeable: predictions resume with the next candle) or stale data (the feed is down)."""
        missing = int(age * 1000 // FIVE_MINUTES_MS)  # candles that should have closed since the newest
        limit = self.settings.features.max_bridge_candles
        since = iso_time(st.open_time + FIVE_MINUTES_MS) if st.open_time is not None else "?"
        if missing <= limit:
            return MarketDataGap(f"no candle for {st.symbol} since {since}: {missing} candles missing "
                                 f"({age / 60:.0f} min; an exchange halt or a lost candle). Gaps of up to {limit} "
                                 "candles are bridged: predictions resume with the next candle", age, missing)
        return StaleMarketData(f"market data for {st.symbol} is {age:.0f} s old (the limit is "
                               f"{self.settings.max_data_age_s:.0f} s; {missing} candles missing, more than the "
                               f"{limit} a gap may bridge): the feed is stalled or down", age, missing)

    def ttl_s(self, st: SymbolState) -> float:
        """How long a forecast of ``st``'s candle is current: until the next candle closes."""
        if self.settings.prediction_ttl_s > 0:
            return self.settings.prediction_ttl_s
        if st.clock is None or st.open_time is None:
            return FIVE_MINUTES_MS / 1000
        seconds = st.clock.wall_seconds_until(st.open_time + 2 * FIVE_MINUTES_MS)
        return FIVE_MINUTES_MS / 1000 if math.isinf(seconds) else max(1.0, seconds)

    # ---- predictions and signals -----------------------------------------------------------
    async def answer(self, endpoint: Endpoint, symbol: str, horizon: int, *, fresh: bool, kid: str) -> bytes:
        """The JSON body for /predictions or /signals (raises engine errors -> 4xx/5xx JSON)."""
        t0 = time.perf_counter()
        arrived = time.time()
        status, source, open_time = 500, "cache", None
        served: Forecast | None = None  # what the answer rendered: the log hook's forecast
        try:
            st, age = self.current(symbol)
            open_time = st.open_time
            key = (endpoint, symbol, horizon)
            entry = None if fresh else self._local.get(key)
            if entry is not None and entry[0] == open_time:
                self.metrics.cache_hit("local")
                prefix, served = entry[1], entry[2]
            else:
                if not fresh:
                    self.metrics.cache_miss("local")
                forecast = None if fresh else await self._from_redis(st, horizon)
                if forecast is None:
                    source = "computed"
                    forecast = await self._compute(st, horizon, fresh)
                prefix = body_prefix(prediction_body(forecast, self.coverage) if endpoint == "predictions"
                                     else signal_body(forecast))
                served = forecast
                if self.market.symbols.get(symbol) is st:  # the candle did not move on meanwhile
                    self._local[key] = (open_time, prefix, forecast)
            body = finish(prefix, source == "cache", age)
            status = 200
            self.metrics.prediction_served(symbol, horizon, endpoint, source, time.perf_counter() - t0)
            return body
        except (StaleMarketData, FeatureError) as exc:
            if endpoint != "signals":
                status = status_for(exc)[0]
                raise
            status, source = 200, "forced_hold"
            self.metrics.prediction_served(symbol, horizon, endpoint, source, time.perf_counter() - t0)
            return self._forced_hold(symbol, horizon, exc)
        except MLEngineError as exc:
            status = status_for(exc)[0]
            raise
        finally:
            if self._log_enabled:
                self._log_request(arrived, endpoint, kid, symbol, horizon, status, time.perf_counter() - t0, source,
                                  open_time, served)

    def _forced_hold(self, symbol: str, horizon: int, exc: MLEngineError) -> bytes:
        """The /signals answer while data is missing: HOLD, confidence 0, no trade, the error code as reason."""
        st = self.market.symbols.get(symbol) or SymbolState(symbol)
        nan = float("nan")
        f = Forecast.model_construct(
            symbol=symbol, horizon=horizon, candle_open_time=st.open_time, close=nan if st.close is None else st.close,
            pred_high_pct=nan, pred_low_pct=nan, high_lower=nan, high_upper=nan, low_lower=nan, low_upper=nan,
            p_tp_long=nan, p_tp_short=nan, signal_probs=(nan, nan, nan), signal_type="HOLD", confidence=0.0,
            entry_price=nan, take_profit=None, stop_loss=None, reason=status_for(exc)[1], reason_detail=str(exc),
            model_versions=dict(st.model_versions or {}), fee_profile=self.settings.fee_profile)
        return finish(body_prefix(signal_body(f)), False, st.data_age_s() or 0.0)

    def _log_request(self, arrived: float, endpoint: str, kid: str, symbol: str, horizon: int, status: int,
                     latency: float, source: str, open_time: int | None, forecast: Forecast | None) -> None:
        try:
            self.log.request_served(RequestRecord(arrived, f"/{endpoint}", kid, symbol, horizon, status, latency,
                                                  source, open_time), forecast)
        except Exception:  # the log must never break an answer
            log.exception("serving log hook failed")

    async def _from_redis(self, st: SymbolState, horizon: int) -> Forecast | None:
        """The Redis entry, or None -- a ``redis`` miss however it came about (none, down, refused)."""
        forecast = await self._redis_entry(st, horizon)
        if forecast is None:
            self.metrics.cache_miss("redis")
        else:
            self.metrics.cache_hit("redis")
        return forecast

    async def _redis_entry(self, st: SymbolState, horizon: int) -> Forecast | None:
        if self.redis is None or st.open_time is None:
            return None
        key = prediction_key(st.symbol, horizon, st.open_time)
        try:
            raw = await self.redis.get(key)
        except CacheUnavailable:
            return None
        if raw is None:
            return None
        forecast, reason = read_entry(raw, symbol=st.symbol, horizon=horizon, candle_open_time=st.open_time,
                                      model_versions=st.model_versions, feature_set_hash=self.feature_hash,
                                      secret=self.secret)
        if forecast is None:
            self.metrics.cache_rejected(reason or "unreadable")
            log.warning("cache entry %s refused (%s): computing instead", key, reason)
            return None
        return forecast

    async def _compute(self, st: SymbolState, horizon: int, fresh: bool) -> Forecast:
        row = st.row()
        if row is None:
            raise FeatureError(f"{st.symbol}: {st.feature_reason or 'features are not available yet'}")
        key = (st.symbol, horizon, row.open_time)
        task = None if fresh else self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._compute_and_cache(st, row, horizon))
            if not fresh:
                self._inflight[key] = task
                task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        return await asyncio.shield(task)

    async def _compute_and_cache(self, st: SymbolState, row: FeatureRow, horizon: int) -> Forecast:
        timeout = self.settings.handle_timeout_s
        try:
            forecasts = await asyncio.wait_for(self.backend.forecast([row], horizon), timeout)
        except asyncio.TimeoutError:
            log.warning("forecast through the graph: no answer within %.1f s", timeout)
            raise PredictionError(f"the model graph did not answer within {timeout:g} s; retry shortly") from None
        except MLEngineError as exc:
            raise _engine_cause(exc) from None
        except Exception as exc:  # a replica died, backpressure, ...: the client can retry
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MLEngineError):
                raise cause from None
            log.warning("forecast through the graph failed: %s", exc)
            raise PredictionError(f"the model graph could not answer ({type(exc).__name__}); retry shortly") from None
        forecast = forecasts[0]
        if self.redis is not None:
            try:
                await self.redis.set_many([(prediction_key(row.symbol, horizon, row.open_time),
                                            make_entry(forecast, self.feature_hash, self.secret), self.ttl_s(st))])
            except CacheUnavailable:
                pass
        return forecast

    # ---- other endpoints -------------------------------------------------------------------
    def indicators(self, symbol: str) -> dict[str, Any]:
        st, age = self.current(symbol)
        if st.features is None:
            raise FeatureError(f"{symbol}: {st.feature_reason or 'features are not available yet'}")
        body = indicators_body(symbol, st.open_time, st.close, self.feature_names, st.features)
        body["data_age_s"] = round(age, 3)
        return body

    async def models_status(self) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.backend.models_status(), self.settings.handle_timeout_s)
        except asyncio.TimeoutError:
            raise PredictionError(f"the model graph did not answer within {self.settings.handle_timeout_s:g} s; "
                                  "retry shortly") from None

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this engine can answer: models loaded, market data for every symbol, the graph up."""
        checks: dict[str, Any] = {}
        try:
            status = await asyncio.wait_for(self.backend.models_status(), min(5.0, self.settings.handle_timeout_s))
            checks["graph"] = {"ok": True}
            checks["models"] = {"ok": bool(status.get("loaded")), "versions": status.get("versions") or {}}
        except Exception as exc:  # readiness answers whatever the graph does
            checks["graph"] = {"ok": False, "error": type(exc).__name__}
            checks["models"] = {"ok": False, "detail": "unknown: the graph did not answer"}
        missing = [s for s in self.symbols if (self.market.symbols.get(s) or SymbolState(s)).open_time is None]
        checks["market"] = {"ok": not missing, "missing": missing}
        return all(c["ok"] for c in checks.values()), checks

    def feed_config(self) -> dict[str, Any]:
        """The feed this deployment was configured with, and where each per-environment choice came from."""
        s = self.settings
        return {"feed": s.feed, "replay_speed": s.replay_speed if s.feed == "replay" else None,
                "binance_api_url": s.binance_api_url if s.feed == "binance" else None,
                "sources": dict(self.settings_sources)}

    def market_status(self) -> dict[str, Any]:
        out = {}
        for symbol in self.symbols:
            st = self.market.symbols.get(symbol) or SymbolState(symbol)
            age = st.data_age_s()
            out[symbol] = {
                "candle_open_time": st.open_time, "data_age_s": None if age is None else round(age, 3),
                **clock_status(st),
                "stale": age is None or age > self.settings.max_data_age_s,
                "features_ready": st.features is not None, "feature_reason": st.feature_reason,
                "history": st.history, "source": st.source, "gaps": st.gaps,
                "predictions_published": st.published, "publish_error": st.publish_error,
            }
        return out

    async def health_detailed(self, database: dict[str, Any]) -> dict[str, Any]:
        models: dict[str, Any]
        try:
            models = await asyncio.wait_for(self.backend.models_status(), min(5.0, self.settings.handle_timeout_s))
            models = {"status": "up" if models.get("loaded") else "down", **models}
        except Exception as exc:  # health must answer even when the graph does not
            models = {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:300]}
        if self.redis is not None:
            await self.redis.ping()
            cache = self.redis.status()
        else:
            cache = {"status": "disabled"}
        try:
            runtime = await asyncio.wait_for(self.backend.runtime_status(), min(5.0, self.settings.handle_timeout_s))
        except Exception as exc:
            runtime = {"status": "unknown", "error": f"{type(exc).__name__}: {exc}"[:300]}
        market = self.market_status()
        components = {"models": health.models_state(models), "cache": str(cache.get("status")),
                      "database": str(database.get("status")), "log": health.log_state(database),
                      "market": health.market_state(market), "feed": health.feed_state(runtime.get("feed"))}
        return {"status": health.overall(components), "components": components, "models": models, "cache": cache,
                "database": database,
                "market": {"max_data_age_s": self.settings.max_data_age_s, "symbols": market,
                           "feed": runtime.get("feed"), "config": self.feed_config()},
                "serve": runtime.get("serve"), "uptime_s": round(time.time() - self.started_at, 1)}


def clock_status(st: SymbolState, wall_s: float | None = None) -> dict[str, Any]:
    """Which clock ``data_age_s`` is measured on, and the age against wall time as well.

    A replay's clock runs ``rate`` times faster than the wall from old candles, so its data age says
    nothing about how current the data is; ``data_age_wall_s`` does (years, for the shipped sample).
    """
    if st.clock is None or st.open_time is None:
        return {"clock": None, "clock_rate": None, "clock_offset_s": None, "data_age_wall_s": None}
    wall = time.time() if wall_s is None else wall_s
    replay = str(st.source or "").startswith("replay")
    # A live feed's clock is the exchange's (server time, deployments/binance_feed.py): its offset from
    # this host's clock is shown; a replay's clock has no meaningful offset.
    offset = None if replay else round((st.clock.now_ms(wall) - wall * 1000.0) / 1000.0, 3)
    return {"clock": "replay" if replay else "exchange", "clock_rate": st.clock.rate, "clock_offset_s": offset,
            "data_age_wall_s": round(wall - (st.open_time + FIVE_MINUTES_MS) / 1000.0, 3)}


def _engine_cause(exc: MLEngineError) -> MLEngineError:
    """The engine error a remote replica raised, without Ray's wrapping (its traceback text)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MLEngineError) else exc
