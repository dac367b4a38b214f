"""The engine's Prometheus metrics, recorded through Ray's metrics inside the cluster.

Inside Ray every replica records with :mod:`ray.util.metrics`; the node's metrics agent
aggregates all replicas and exports them (Ray prefixes them ``ray_``: ``ray_ml_predictions_total``),
which is what the Ray dashboard's Grafana panels and a Prometheus scraping the node read. The
API's ``GET /metrics`` serves the same node export, limited to the engine's series and under their
own names (``ml_predictions_total``...), so a scraper pointed at the API needs no Ray knowledge.
Outside Ray (the plain FastAPI baseline) the same names go to a process-local prometheus_client
registry, so the two apps do the same bookkeeping work per request.

Series:
- ``ml_predictions_total{symbol,horizon}``: predictions served over the API (/predictions, /signals);
- ``ml_precomputed_predictions_total{symbol,horizon}``: predictions computed at candle close;
- ``ml_prediction_latency_seconds{endpoint,source}``: request latency, ``source`` = cache | computed;
- ``ml_cache_hits_total{layer}`` (``local`` = the ingress's memory, ``redis``) and ``ml_cache_misses_total``;
- ``ml_cache_rejected_total{reason}``: Redis entries not served (unreadable, unsigned, stale models, ...);
- ``ml_market_data_age_seconds{symbol}``: age of the newest candle, in feed seconds;
- ``ml_model_accuracy{model_name}``: live accuracy, set by outcome tracking (issue 6) via
  :meth:`EngineMetrics.model_accuracy`.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Callable

LATENCY_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
ENGINE_PREFIX = "ml_"


class EngineMetrics:
    """Thin wrapper so call sites do not care whether Ray or prometheus_client records."""

    def __init__(self, use_ray: bool) -> None:
        self.use_ray = use_ray
        if use_ray:
            from ray.util import metrics as m

            self._predictions = m.Counter("ml_predictions", "predictions served over the API",
                                          tag_keys=("symbol", "horizon"))
            self._precomputed = m.Counter("ml_precomputed_predictions", "predictions computed at candle close",
                                          tag_keys=("symbol", "horizon"))
            self._latency = m.Histogram("ml_prediction_latency_seconds", "request latency of /predictions and "
                                        "/signals", boundaries=LATENCY_BUCKETS, tag_keys=("endpoint", "source"))
            self._hits = m.Counter("ml_cache_hits", "prediction cache hits", tag_keys=("layer",))
            self._misses = m.Counter("ml_cache_misses", "prediction cache misses (computed through the graph)")
            self._rejected = m.Counter("ml_cache_rejected", "Redis cache entries refused (served as a miss)",
                                       tag_keys=("reason",))
            self._age = m.Gauge("ml_market_data_age_seconds", "age of the newest candle (feed seconds)",
                                tag_keys=("symbol",))
            self._accuracy = m.Gauge("ml_model_accuracy", "live accuracy of a model (outcome tracking)",
                                     tag_keys=("model_name",))
        else:
            import prometheus_client as p

            self.registry = p.CollectorRegistry()
            self._predictions = p.Counter("ml_predictions", "predictions served over the API",
                                          ("symbol", "horizon"), registry=self.registry)
            self._precomputed = p.Counter("ml_precomputed_predictions", "predictions computed at candle close",
                                          ("symbol", "horizon"), registry=self.registry)
            self._latency = p.Histogram("ml_prediction_latency_seconds", "request latency", ("endpoint", "source"),
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
            self._hits = p.Counter("ml_cache_hits", "prediction cache hits", ("layer",), registry=self.registry)
            self._misses = p.Counter("ml_cache_misses", "prediction cache misses", registry=self.registry)
            self._rejected = p.Counter("ml_cache_rejected", "Redis cache entries refused (served as a miss)",
                                       ("reason",), registry=self.registry)
            self._age = p.Gauge("ml_market_data_age_seconds", "age of the newest candle", ("symbol",),
                                registry=self.registry)
            self._accuracy = p.Gauge("ml_model_accuracy", "live accuracy of a model", ("model_name",),
                                     registry=self.registry)

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

    def cache_miss(self) -> None:
        self._misses.inc(1) if self.use_ray else self._misses.inc()

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
        """Entry point for live outcome tracking (issue 6)."""
        if self.use_ray:
            self._accuracy.set(accuracy, {"model_name": model_name})
        else:
            self._accuracy.labels(model_name).set(accuracy)

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
    return {"series": ["ml_predictions_total", "ml_precomputed_predictions_total", "ml_prediction_latency_seconds",
                       "ml_cache_hits_total", "ml_cache_misses_total", "ml_cache_rejected_total",
                       "ml_market_data_age_seconds",
                       "ml_model_accuracy"]}
