"""The EnsembleRouter: composes the model pools into forecasts, and does the candle-close work.

Forecast of n rows for one horizon: deployments/pool_forecast.py (model input and composition
here, each model's stage in its pool, at the version of the served set).

At each candle close (:meth:`EnsembleRouter.on_candles` / ``on_close``, called by the MarketData
actors; one batched pass for every symbol of the close, :mod:`deployments.close`): the FeatureBuilder
shards take the candles and return their feature rows; the router computes every horizon,
writes ``prediction:{symbol}:{horizon}:{candle_open_time}`` to Redis (expiring when the next
candle closes), publishes each signal on ``signals:{symbol}``, hands the forecasts to the serving
log hook, and finally tells the FeatureBuilder the candle is published (ingress replicas switch
to it). Redis down: forecasts are still computed and published to the ingress; only the Redis
writes are skipped.

Models: the router holds each set's metadata and documents only (what ``compose`` needs; every
file verified, the pools hold the boosters: deployments/model_pools.py) and names each model's
version in its pool calls. New models: a watcher polls the registry's ``current`` pointers every
``model_poll_s``; a new, consistent set is loaded beside the old one and swapped in atomically (requests in flight finish
on the set they started with), then the newest candles are recomputed so caches hold the new
models' answers. An inconsistent set (promotion half done) is retried, never served.

A current set that cannot be loaded (a truncated booster, an interrupted promotion, a pointer to
nowhere) never takes the engine down: the set already served stays, and a router starting
without one serves the newest older complete set that loads. ``fallback`` in /models/status and
/health/detailed says so (and health is degraded) until the current set loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Sequence

import numpy as np
from ray import serve

from configs.settings import load_settings
from deployments.auth import deployment_secret
from deployments.close import CandleClose
from deployments.cache import CacheUnavailable, RedisGateway, make_entry, prediction_key, signal_channel
from deployments.hooks import load_serving_log
from deployments.prometheus import EngineMetrics
from deployments.model_pools import ModelSets, fallback_sets
from deployments.pool_forecast import BatchedForecasts, Part, PoolHandles, forecast_horizons
from deployments.render import describe_models, signal_message
from deployments.sharding import shard_of
from deployments.state import FeatureRow
from deployments.tunables import ROUTER_TUNABLES, apply_tunables, replica_identity
from configs.errors import MLEngineError, ModelLoadError, ModelNotFoundError
from features.indicators import feature_set_hash
from inference.ensemble import Ensemble
from inference.forecast import Forecast
from inference.layout import MODEL_NAMES
from inference.registry import check_name

log = logging.getLogger("ray.serve")

ROUTER_AUTOSCALING: dict[str, Any] = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                                      "target_ongoing_requests": 32, "upscale_delay_s": 10,
                                      "downscale_delay_s": 120}


@serve.deployment(name="EnsembleRouter", ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=512,
                  autoscaling_config=ROUTER_AUTOSCALING)
class EnsembleRouter(CandleClose):
    async def __init__(self, feature_builder, range_predictor, tpsl_classifier, signal_classifier, meta_model,
                       settings_overrides: dict[str, Any] | None = None) -> None:
        self.overrides = dict(settings_overrides or {})
        self.settings = load_settings(**self.overrides)
        # One handle per FeatureBuilder shard (a list from deployments.app; a single handle is one shard).
        self.fbs = list(feature_builder) if isinstance(feature_builder, (list, tuple)) else [feature_builder]
        self.pools = {"range_predictor": range_predictor, "tpsl_classifier": tpsl_classifier,
                      "signal_classifier": signal_classifier, "meta_model": meta_model}
        self.models = ModelSets(self.settings)  # metadata and documents: the pools hold the boosters
        self.handles = PoolHandles(self.pools)
        self.batched = BatchedForecasts(self._stage, self.settings.handle_timeout_s)
        self.ensemble: Ensemble | None = None
        self.loaded_at: float | None = None
        self.load_error: str | None = None
        self.fallback: dict[str, Any] | None = None
        self.feature_hash = feature_set_hash(self.settings.features)
        self.secret = deployment_secret(self.settings)
        self.redis = RedisGateway(self.settings.redis_url, self.settings.redis_timeout_s, self.settings.redis_retry_s)
        self.metrics = EngineMetrics(use_ray=True)
        self.log = load_serving_log(self.settings, "router")
        await self.log.start()
        self.candles = 0
        self.fallbacks: dict[str, int] = {}  # pool calls computed here instead (see _stage)
        await self._check_models()
        self._watcher = asyncio.create_task(self._watch_models())

    # ---- models ----------------------------------------------------------------------------
    def _current_versions(self) -> dict[str, str]:
        pinned = getattr(self, "pinned_versions", None)
        if pinned:
            return {m: pinned[m] for m in MODEL_NAMES}
        return self.models.registry.current_versions()  # the set pointer, read once

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ops hook (issue 8): ``user_config: {model_versions: {model: version, ...} | null}`` in
        serve_config.yaml pins the served model set, so ``serve deploy`` alone rolls a version out or
        back (no restart: the watcher switches within ``model_poll_s``); null follows the registry's
        set pointer. A pin naming a missing version is refused like a bad promotion. ``model_poll_s``
        is a live tunable (deployments/tunables.py): the watcher uses a new value within a second."""
        pinned = (user_config or {}).get("model_versions")
        if pinned is not None and set(pinned) != set(MODEL_NAMES):
            raise ValueError(f"user_config.model_versions must name every model {list(MODEL_NAMES)}")
        for version in (pinned or {}).values():
            check_name("user_config.model_versions: version", version)
        self.settings = apply_tunables(getattr(self, "overrides", None), user_config, ROUTER_TUNABLES,
                                       also=("model_versions",))
        self.pinned_versions = dict(pinned) if pinned else None

    async def _check_models(self) -> bool:
        """Load the registry's current set if it differs from the served one; True when switched."""
        versions: dict[str, str] | None = None
        try:
            versions = await asyncio.to_thread(self._current_versions)
            if self.ensemble is not None and versions == self.ensemble.versions:
                self.fallback = self.load_error = None  # e.g. rolled back to the set being served
                return False
            ens = await self.models.get(versions)
        except (ModelNotFoundError, ModelLoadError) as exc:
            if self.ensemble is None or str(exc) != self.load_error:
                log.warning("models not (re)loaded: %s", exc)
            self.load_error = str(exc)
            return await self._fall_back(versions)
        old = self.ensemble.versions if self.ensemble else None
        self.ensemble, self.loaded_at, self.load_error, self.fallback = ens, time.time(), None, None
        log.info("serving models %s (before: %s)", ens.versions, old)
        return True

    async def _fall_back(self, wanted: dict[str, str] | None) -> bool:
        """The current set does not load: keep the served set, or start on the newest older one that
        loads (never 503 everything because a promotion was interrupted). True when switched."""
        switched = False
        if self.ensemble is None:
            candidates = await asyncio.to_thread(fallback_sets, self.models.registry, wanted)
            ens, _ = await self.models.first_loadable(candidates)
            if ens is None:
                return False
            self.ensemble, self.loaded_at, switched = ens, time.time(), True
            log.warning("serving the older model set %s: the current one does not load", ens.versions)
        self.fallback = {"serving": dict(self.ensemble.versions), "current": wanted, "error": self.load_error}
        return switched

    async def _watch_models(self) -> None:
        last = time.monotonic()
        while True:  # short sleeps: a model_poll_s changed by reconfigure applies within a second
            await asyncio.sleep(min(1.0, self.settings.model_poll_s))
            if time.monotonic() - last < self.settings.model_poll_s:
                continue
            last = time.monotonic()
            try:
                if await self._check_models():
                    await self._recompute_latest()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must survive anything
                log.exception("model watcher")

    async def _recompute_latest(self) -> None:
        """After a model switch: fresh forecasts of every symbol's newest candle into the cache."""
        parts = await asyncio.gather(*(fb.latest_rows.remote() for fb in self.fbs))
        rows: list[FeatureRow] = [r for part in parts for r in part]
        ens = self.ensemble
        if not rows or ens is None:
            return
        forecasts = await self._forecast(ens, rows)
        await self._cache(forecasts, rows, publish=False)
        await asyncio.gather(*(fb.refresh.remote(ens.versions) for fb in self.fbs))

    def _require(self) -> Ensemble:
        if self.ensemble is None:
            raise ModelNotFoundError(f"no model to serve: {self.load_error or 'the registry is empty'} "
                                     f"(train: python -m training.train --candles ... --out {self.settings.models_dir})")
        return self.ensemble

    # ---- forecasts -------------------------------------------------------------------------
    async def _forecast(self, ens: Ensemble, rows: Sequence[FeatureRow]) -> list[Forecast]:
        """Every horizon's forecasts of ``rows`` (one call per pool), horizon by horizon."""
        batches = await forecast_horizons(ens, self._stage, rows, self.settings.market.horizons)
        return [f for batch in batches for f in batch]

    async def _stage(self, ens: Ensemble, model: str, parts: Sequence[Part]) -> list[np.ndarray]:
        """One model's stage output from its pool, or computed here when the pool fails or does not
        answer within ``pool_call_timeout_s``.

        Why: a killed replica stays in the handle's routing table until Serve notices, and a pool
        whose only replica died has none until a new one starts; a candle close that waited for it
        would hold the feed (every symbol's next candle waits for this one) while data ages past
        ``max_data_age_s``. The router loads that model of the same set (``ens.versions``; its boosters on the
        first fallback only), so the answer is the same.
        Engine errors (a bad horizon, a model that cannot answer) are raised, not retried.
        """
        try:
            return await self.handles.stage(ens, model, parts, self.settings.pool_call_timeout_s)
        except MLEngineError:
            raise
        except Exception as exc:  # a dead or unavailable replica, a timeout, a lost connection
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MLEngineError):
                raise cause from None
            self.metrics.pool_fallback(model)
            counts = self.__dict__.setdefault("fallbacks", {})
            counts[model] = counts.get(model, 0) + 1
            log.warning("%s pool: %s; computing the stage in the router", model,
                        f"{type(exc).__name__}: {exc}"[:200])
            stage = await self.models.stage(model, ens.versions[model])  # boosters loaded on the first fallback
            return await asyncio.to_thread(lambda: [stage.predict(X, horizon) for X, horizon in parts])

    async def forecast(self, rows: list[FeatureRow], horizon: int) -> list[Forecast]:
        """Forecasts of ``rows`` for one horizon (the API's cache-miss path when the ingress's own
        pass through the pools fails or it holds no model set).

        Concurrent calls are batched: one pass through the pools (four model calls) for all the rows
        of a horizon, instead of four model calls per request.
        """
        self.forecast_calls = getattr(self, "forecast_calls", 0) + 1
        return await self.batched.forecast(self._require(), rows, horizon)

    # ---- candle close: deployments/close.py (CandleClose) ------------------------------------
    def _ttl(self, ttl_s: float | None) -> float:
        if self.settings.prediction_ttl_s > 0:
            return self.settings.prediction_ttl_s
        return max(1.0, ttl_s) if ttl_s is not None else 300.0

    async def _cache(self, forecasts: list[Forecast], rows: Sequence[FeatureRow], *, publish: bool,
                     ttl_s: dict[str, float] | None = None) -> None:
        """Every forecast's SET (and with ``publish`` its signal's PUBLISH) in one Redis pipeline;
        ``ttl_s``: per symbol, wall seconds until its next candle closes."""
        ttl_s = ttl_s or {}
        items, messages = [], []
        now = time.time()
        for f in forecasts:
            items.append((prediction_key(f.symbol, f.horizon, f.candle_open_time),
                          make_entry(f, self.feature_hash, self.secret), self._ttl(ttl_s.get(f.symbol))))
            if publish:
                messages.append((signal_channel(f.symbol), signal_message(f, now)))
        try:
            await self.redis.set_many(items, messages)
        except CacheUnavailable as exc:
            log.warning("cache down, %d forecasts not cached/published: %s", len(items), exc)

    async def newest_candle(self, symbol: str) -> int | None:
        """The newest candle of ``symbol`` the FeatureBuilder holds: where a new MarketData actor
        resumes (None: it holds none, e.g. a fresh deployment)."""
        return await self._newest_batched(symbol)

    @serve.batch(max_batch_size=512, batch_wait_timeout_s=0.01)  # 512: the router's max_ongoing_requests
    async def _newest_batched(self, symbols: list[str]) -> list[int | None]:
        """Concurrent asks as one :meth:`newest_candles`. Why: at a start every symbol's feed asks at
        once; a whole-shard snapshot per symbol (200 of them at 200 symbols) kept the router busy
        long enough for its autoscaler to add a replica."""
        return await self.newest_candles(symbols)

    async def newest_candles(self, symbols: list[str]) -> list[int | None]:
        """:meth:`newest_candle` of each of ``symbols``, from one snapshot per shard."""
        shards = sorted({shard_of(s, len(self.fbs)) for s in symbols})
        snaps = dict(zip(shards, await asyncio.gather(*(self.fbs[i].snapshot.remote(-1, 0.0) for i in shards))))
        out: list[int | None] = []
        for s in symbols:
            st = snaps[shard_of(s, len(self.fbs))].symbols.get(s)
            out.append(None if st is None else st.open_time)
        return out

    # ---- status ----------------------------------------------------------------------------
    async def tunables(self) -> dict[str, Any]:
        """The live tunables and which replica answers (a restart would change ``replica``)."""
        return {"model_poll_s": self.settings.model_poll_s, **replica_identity()}

    async def status(self) -> dict[str, Any]:
        status = describe_models(self.ensemble, self.loaded_at, self.load_error)
        status["candles_processed"] = self.candles
        status["pool_fallbacks"] = dict(getattr(self, "fallbacks", {}))
        status["fallback"] = self.fallback
        return status

    async def loaded_models(self) -> dict[str, Any]:
        """What this replica holds: the sets it composes with (metadata and documents) and the models
        it loaded with boosters -- none unless a pool failed (``pool_fallbacks``); and how many cache
        misses it answered (``forecast_calls``: the ingress asks only when its own pass fails)."""
        return {**self.models.loaded(), "forecast_calls": getattr(self, "forecast_calls", 0)}

    async def check_health(self) -> None:
        if self._watcher.done() and not self._watcher.cancelled():
            raise RuntimeError(f"model watcher stopped: {self._watcher.exception()}")

