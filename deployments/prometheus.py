"""The engine's Prometheus metrics, recorded through Ray's metrics inside the cluster.

Inside Ray every replica records with :mod:`ray.util.metrics`; the node's metrics agent
aggregates all replicas and exports them (Ray prefixes them ``ray_``: ``ray_ml_predictions_total``),
which is what the Ray dashboard's Grafana panels and a Prometheus scraping the node read. The
API's ``GET /metrics`` serves the same node export, limited to the engine's series and under their
own names (``ml_predictions_total``...), so a scraper pointed at the API needs no Ray knowledge.
Outside Ray (the plain FastAPI baseline) the same names go to a process-local prometheus_client
registry, so the two apps do the same bookkeeping work per request.

Series: :data:`deployments.prometheus_series.METRICS` defines each one (name, type, unit, labels, meaning);
both recorders are built from it, and docs/metrics.md is generated from it.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Callable

from deployments.prometheus_series import BY_NAME, MetricDef

LATENCY_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
ENGINE_PREFIX = "ml_"
# The series the request path and the router record (the resolver records the live-outcome ones).
ENGINE_METRICS = ("ml_predictions", "ml_precomputed_predictions", "ml_prediction_latency_seconds", "ml_cache_hits",
                  "ml_cache_misses", "ml_cache_rejected", "ml_market_data_age_seconds", "ml_model_accuracy",
                  "ml_pool_fallbacks", "ml_feed_stale", "ml_feed_restarts")


def make_metric(d: MetricDef, use_ray: bool, registry: Any = None) -> Any:
    """``d`` as a Ray metric (inside the cluster) or a prometheus_client one (in ``registry``)."""
    if use_ray:
        from ray.util import metrics as m

        if d.kind == "histogram":
            return m.Histogram(d.name, d.help, boundaries=LATENCY_BUCKETS, tag_keys=d.labels)
        return (m.Counter if d.kind == "counter" else m.Gauge)(d.name, d.help, tag_keys=d.labels)
    import prometheus_client as p

    if d.kind == "histogram":
        return p.Histogram(d.name, d.help, d.labels, buckets=LATENCY_BUCKETS, registry=registry)
    return (p.Counter if d.kind == "counter" else p.Gauge)(d.name, d.help, d.labels, registry=registry)


class EngineMetrics:
    """Thin wrapper so call sites do not care whether Ray or prometheus_client records."""

    def __init__(self, use_ray: bool) -> None:
        self.use_ray = use_ray
        self.registry = None
        if not use_ray:
            import prometheus_client as p

            self.registry = p.CollectorRegistry()
        made = {name: make_metric(BY_NAME[name], use_ray, self.registry) for name in ENGINE_METRICS}
        self._predictions, self._precomputed = made["ml_predictions"], made["ml_precomputed_predictions"]
        self._latency, self._hits = made["ml_prediction_latency_seconds"], made["ml_cache_hits"]
        self._misses, self._rejected = made["ml_cache_misses"], made["ml_cache_rejected"]
        self._age, self._accuracy = made["ml_market_data_age_seconds"], made["ml_model_accuracy"]
        self._fallbacks, self._stale = made["ml_pool_fallbacks"], made["ml_feed_stale"]
        self._restarts = made["ml_feed_restarts"]

    def prediction_served(self, symbol: str, horizon: int, endpoint: str, source: str, latency_s: float) -> None:
        if self.use_ray:
            self._predictions.inc(1, {"symbol": symbol, "horizon": str(horizon)})
            self._latency.observe(latency_s, {"endpoint": endpoint, "source": source})
        else:
            self._predictions.labels(symbol, str(horizon)).inc()
            self._latency.labels(endpoint, source).observe(latency_s)

    def precomputed(self, symbol: str, horizon: int, n: int = 1) -> None:
        if self.use_ray:
            self._precomputed.inc(n, {"symbol": symbol, "horizon": str(horizon)})
        else:
            self._precomputed.labels(symbol, str(horizon)).inc(n)

    def cache_hit(self, layer: str) -> None:
        if self.use_ray:
            self._hits.inc(1, {"layer": layer})
        else:
            self._hits.labels(layer).inc()

    def cache_miss(self, layer: str) -> None:
        if self.use_ray:
            self._misses.inc(1, {"layer": layer})
        else:
            self._misses.labels(layer).inc()

    def cache_rejected(self, reason: str) -> None:
        if self.use_ray:
            self._rejected.inc(1, {"reason": reason})
        else:
            self._rejected.labels(reason).inc()

    def market_data_age(self, symbol: str, age_s: float) -> None:
        if self.use_ray:
            self._age.set(age_s, {"symbol": symbol})
        else:
            self._age.labels(symbol).set(age_s)

    def model_accuracy(self, model_name: str, accuracy: float) -> None:
        """The seed's ``ml_model_accuracy`` (the resolver sets it beside the metrics it aliases)."""
        if self.use_ray:
            self._accuracy.set(accuracy, {"model_name": model_name})
        else:
            self._accuracy.labels(model_name).set(accuracy)

    def feed_stale(self, symbol: str, stale: bool) -> None:
        if self.use_ray:
            self._stale.set(float(stale), {"symbol": symbol})
        else:
            self._stale.labels(symbol).set(float(stale))

    def feed_restarted(self, symbol: str) -> None:
        if self.use_ray:
            self._restarts.inc(1, {"symbol": symbol})
        else:
            self._restarts.labels(symbol).inc()

    def pool_fallback(self, model: str) -> None:
        if self.use_ray:
            self._fallbacks.inc(1, {"model": model})
        else:
            self._fallbacks.labels(model).inc()

    def local_text(self) -> str:
        """Prometheus text of the process-local registry (outside Ray only)."""
        import prometheus_client as p

        return p.generate_latest(self.registry).decode() if not self.use_ray else ""


_RAY_ENGINE = re.compile(r"^(# (?:HELP|TYPE) )?ray_(ml_\w*)")


def engine_series(ray_export: str) -> str:
    """The engine's series from a Ray node's Prometheus export, renamed ``ray_ml_*`` -> ``ml_*``."""
    out = []
    for line in ray_export.splitlines():
        m = _RAY_ENGINE.match(line)
        if m:
            out.append(line.replace("ray_ml_", "ml_", 1))
    return "\n".join(out) + "\n"


class MetricsUnavailable(Exception):
    """The node's metrics agent did not answer (GET /metrics answers 503, not 500)."""


class NodeMetricsExport:
    """The engine's series from this node's metrics agent, fetched at most once per ``cache_s``.

    Why cached: a Ray node's export holds every series of every process on the node (thousands of
    lines); fetching and filtering it per request let any scraper -- or anyone, since the route
    needs no key from allowed networks -- make the ingress do that work at will. Concurrent
    requests share one fetch."""

    def __init__(self, cache_s: float = 5.0, url: Callable[[], str | None] = lambda: node_metrics_url(),
                 timeout_s: float = 5.0) -> None:
        self.cache_s = cache_s
        self._url_fn = url
        self._url: str | None = None
        self.timeout_s = timeout_s
        self._text: str | None = None
        self._at = -float("inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def __call__(self) -> str:
        if self._text is not None and time.monotonic() - self._at < self.cache_s:
            return self._text
        async with self._lock:
            if self._text is not None and time.monotonic() - self._at < self.cache_s:
                return self._text
            self._text, self._at = await self._fetch(), time.monotonic()
            return self._text

    async def _fetch(self) -> str:
        import httpx

        self._url = self._url or self._url_fn()
        if self._url is None:
            raise MetricsUnavailable("the Ray metrics agent of this node is not known yet")
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                r = await client.get(self._url)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            self._url = None  # the agent may come back on another port after a restart
            raise MetricsUnavailable(f"the Ray metrics agent did not answer ({type(exc).__name__})") from None
        return engine_series(r.text)


def node_metrics_url() -> str | None:
    """This node's metrics-agent export URL (inside a Ray worker), or None."""
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
                return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    except Exception:  # not in Ray, or the GCS is unreachable
        return None
    return None


def describe() -> dict[str, Any]:
    return {"series": [BY_NAME[name].exposed() for name in ENGINE_METRICS]}
