"""The API ingress: the FastAPI app of :mod:`deployments.api` behind ``@serve.ingress``.

It answers cached requests itself -- no DeploymentHandle call on the hot path (one extra hop cost
about 4x throughput here) -- from the market snapshot that the FeatureBuilder pushes to it
(long-poll) and the answers it has rendered for the current candle. Only cache misses go to the
model pools (directly, with the set the candle was published with; the EnsembleRouter when that
fails: :class:`ServeBackend`), and only /health/detailed and /models/status ask other deployments
anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ray import serve

from configs.precedence import setting_sources
from configs.settings import Settings, load_settings
from deployments.api import DatabaseProbe, create_app
from deployments.cache import RedisGateway
from deployments.guard import MetricsAccess
from deployments.hooks import load_serving_log
from deployments.prometheus import EngineMetrics, NodeMetricsExport
from deployments.model_pools import ModelSets
from deployments.pool_forecast import BatchedForecasts, Part, PoolHandles
from deployments.service import PredictionService
from deployments.sharding import ShardedMarket
from deployments.state import FeatureRow
from deployments.tunables import INGRESS_TUNABLES, apply_tunables, replica_identity
from configs.errors import PredictionError
from inference.ensemble import Ensemble

log = logging.getLogger("ray.serve")

APP_NAME = "ml-engine"


class ServeBackend:
    """The service's backend inside Serve: the model pools (and the router) for forecasts, the feed
    and Serve for status.

    A cache miss goes through the pools from here (deployments/pool_forecast.py) with the model set
    the market snapshot says the symbol's candle was published with -- the router's served set --
    so it costs one hop fewer than through the router. Without a set (no model yet, a publish error)
    or when that pass fails (a pool replica died, the set no longer loads) the router answers: it
    decides the served set and computes a failed pool's stage itself."""

    def __init__(self, router, market_feed, pools: Mapping[str, Any] | None = None,
                 settings: Settings | None = None) -> None:
        self.router = router
        self.market_feed = market_feed
        self.versions_of: Callable[[str], dict[str, str]] = lambda symbol: {}
        self.fast: BatchedForecasts | None = None
        if pools is not None and settings is not None:
            self.sets = ModelSets(settings)
            self.handles = PoolHandles(pools)
            self.pool_timeout_s = settings.pool_call_timeout_s
            self.fast = BatchedForecasts(self._stage, settings.handle_timeout_s)
        self.fast_failures = 0

    async def _stage(self, ens: Ensemble, model: str, parts: Sequence[Part]) -> list[np.ndarray]:
        return await self.handles.stage(ens, model, parts, self.pool_timeout_s)

    async def forecast(self, rows: Sequence[FeatureRow], horizon: int) -> list[Any]:
        versions = self.versions_of(rows[0].symbol) if self.fast is not None and rows else {}
        if versions and all(self.versions_of(r.symbol) == versions for r in rows):
            try:
                return await self.fast.forecast(await self.sets.get(versions), rows, horizon)
            except PredictionError:
                raise  # the request's own problem (a horizon the models lack): the router would say the same
            except Exception as exc:  # a dead pool replica, a set that no longer loads: the router decides
                self.fast_failures += 1
                log.warning("forecast through the pools failed (%s); asking the router",
                            f"{type(exc).__name__}: {exc}"[:200])
        return await self.router.forecast.remote(list(rows), horizon)

    async def models_status(self) -> dict[str, Any]:
        return await self.router.status.remote()

    async def runtime_status(self) -> dict[str, Any]:
        feed = await self.market_feed.status.remote()
        try:
            serve_status = await asyncio.to_thread(_serve_status)
        except Exception as exc:
            serve_status = {"status": "unknown", "error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"feed": feed, "serve": serve_status}


def _serve_status() -> dict[str, Any]:
    """Applications, deployments and replica counts per state (from the Serve controller)."""
    status = serve.status()
    apps: dict[str, Any] = {}
    for name, app in status.applications.items():
        deployments = {}
        for dname, dep in app.deployments.items():
            deployments[dname] = {"status": str(getattr(dep.status, "value", dep.status)),
                                  "replicas": {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}}
        apps[name] = {"status": str(getattr(app.status, "value", app.status)), "deployments": deployments}
    return {"applications": apps}


@serve.deployment(name="ApiIngress", num_replicas=1, max_ongoing_requests=2000,
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class ApiIngress:
    async def __init__(self, router, feature_builder, market_feed,
                       settings_overrides: dict[str, Any] | None = None,
                       pools: Mapping[str, Any] | None = None) -> None:
        self.overrides = dict(settings_overrides or {})
        self.settings = load_settings(**self.overrides)
        # One handle per FeatureBuilder shard; each is long-polled, their snapshots combined.
        self.fbs = list(feature_builder) if isinstance(feature_builder, (list, tuple)) else [feature_builder]
        self.market = ShardedMarket(len(self.fbs))
        redis = RedisGateway(self.settings.redis_url, self.settings.redis_timeout_s, self.settings.redis_retry_s)
        self.metrics = EngineMetrics(use_ray=True)
        self.serving_log = load_serving_log(self.settings, "ingress")
        await self.serving_log.start()
        backend = ServeBackend(router, market_feed, pools, self.settings)
        self.service = PredictionService(self.settings, backend, redis=redis,
                                         metrics=self.metrics, serving_log=self.serving_log,
                                         settings_sources=setting_sources(settings_overrides or {}))
        backend.versions_of = self._served_versions
        self.database = DatabaseProbe(self.settings.database_url, timeout_s=min(2.0, self.settings.db_timeout_s))
        self.metrics_export = NodeMetricsExport(self.settings.metrics_cache_s)
        # Serve's HAProxy mode connects to this replica itself: every client's address is the proxy's.
        behind_proxy = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") not in ("", "0")
        if behind_proxy and self.settings.metrics_networks:
            log.warning("HAProxy mode: client addresses are the proxy's, so GET /metrics needs an API key from "
                        "everywhere (metrics_networks is ignored); scrape the Ray metrics agent for keyless access")
        self.metrics_access = MetricsAccess(self.settings.metrics_networks, behind_proxy=behind_proxy)
        for shard, fb in enumerate(self.fbs):  # start with the current market state, if the feed has one
            try:
                self.service.set_market(self.market.update(
                    shard, await asyncio.wait_for(fb.snapshot.remote(-1, 0.0), timeout=30)))
            except Exception as exc:
                log.warning("no market snapshot yet from shard %d: %s", shard, exc)
        self._tasks = [*(asyncio.create_task(self._follow_market(i)) for i in range(len(self.fbs))),
                       asyncio.create_task(self._tick()), asyncio.create_task(self._follow_nodes())]

    def _served_versions(self, symbol: str) -> dict[str, str]:
        """The model set the symbol's newest candle was published with (the router's served set)."""
        st = self.service.market.symbols.get(symbol)
        return st.model_versions if st is not None and st.published else {}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config: {rate_limit_per_minute}`` (deployments/tunables.py): the next request is limited
        by the new figure, nothing restarts."""
        tuned = apply_tunables(self.overrides, user_config, INGRESS_TUNABLES)
        self.service.set_rate_limit(tuned.rate_limit_per_minute)

    async def tunables(self) -> dict[str, Any]:
        """The live tunables of this replica and its identity (a restart would change ``replica``)."""
        return {"rate_limit_per_minute": self.service.limiter.limit, **replica_identity()}

    def __serve_build_asgi_app__(self):
        return create_app(self.service, database_health=self.database, metrics_text=self.metrics_export,
                          serving_log=self.serving_log, metrics_access=self.metrics_access)

    async def _follow_market(self, shard: int) -> None:
        """Long-poll one FeatureBuilder shard: a published candle reaches this replica in one round trip."""
        fb = self.fbs[shard]
        while True:
            try:
                held = self.market.parts[shard]
                snap = await fb.snapshot.remote(held.version, 10.0, held.epoch or None)
                self.service.set_market(self.market.update(shard, snap))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the shard is restarting
                log.warning("market snapshot (shard %d): %s", shard, exc)
                await asyncio.sleep(1.0)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.service.record_ages()

    async def _follow_nodes(self) -> None:
        """The cluster's node addresses, for /metrics' ``cluster`` network (nodes join and leave)."""
        import ray

        while True:
            try:
                nodes = await asyncio.to_thread(ray.nodes)
                self.metrics_access.set_cluster_addresses(n["NodeManagerAddress"] for n in nodes if n.get("Alive"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the GCS is briefly unreachable: keep the last known nodes
                log.warning("cluster nodes: %s", exc)
            await asyncio.sleep(30.0)

    async def check_health(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled():
                raise RuntimeError(f"background task stopped: {task.exception()}")
