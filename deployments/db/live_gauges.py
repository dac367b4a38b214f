"""What the outcome resolver exports besides rows: the live figures as gauges, and the baselines.

Why apart from :mod:`deployments.db.resolver`: these are views of the live metrics
(:mod:`deployments.db.live_metrics`) for Prometheus and the walk-forward baselines they are compared
with (from the model registry); the resolver actor only calls them after each refresh.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from configs.settings import Settings
from deployments.db.live_metrics import Baseline, walk_forward_baseline
from deployments.db.rows import RANGE_MODEL, SIGNAL_MODEL

log = logging.getLogger(__name__)


def registry_baselines(settings: Settings) -> Callable[[str], Mapping[tuple[str, int], Baseline]]:
    """Walk-forward baselines read from the model registry's metadata of each range-predictor version."""
    def load(version: str) -> Mapping[tuple[str, int], Baseline]:
        from inference.registry import ModelRegistry  # inference-side module: no training code on import

        return walk_forward_baseline(ModelRegistry(settings.models_dir).metadata(RANGE_MODEL, version))
    return load


class LiveGauges:
    """The live figures as Prometheus gauges, recorded with Ray's metrics (exported ``ray_``-prefixed by
    each node's agent; the API's ``/metrics`` serves them under their own names). What each one is
    exactly: :mod:`deployments.prometheus_series` (docs/metrics.md), per window (24h, 7d, all), of the
    version serving now: ``ml_interval_coverage_ratio`` and ``ml_signal_hit_ratio``, with the seed's
    ``ml_model_accuracy`` set to their 24 h values; ``ml_model_drift``, ``ml_model_live_mae_ratio``,
    ``ml_model_mae_vs_walk_forward_ratio``, ``ml_signal_cumulative_r``.
    """

    def __init__(self) -> None:
        from deployments.prometheus_series import BY_NAME
        from deployments.prometheus import EngineMetrics, make_metric

        self.engine = EngineMetrics(use_ray=True)
        gauge = {name: make_metric(BY_NAME[name], use_ray=True) for name in (
            "ml_interval_coverage_ratio", "ml_signal_hit_ratio", "ml_model_drift", "ml_model_live_mae_ratio",
            "ml_model_mae_vs_walk_forward_ratio", "ml_signal_cumulative_r")}
        self.coverage, self.hit = gauge["ml_interval_coverage_ratio"], gauge["ml_signal_hit_ratio"]
        self.drift, self.mae = gauge["ml_model_drift"], gauge["ml_model_live_mae_ratio"]
        self.ratio, self.cum_r = gauge["ml_model_mae_vs_walk_forward_ratio"], gauge["ml_signal_cumulative_r"]

    @classmethod
    def create(cls) -> "LiveGauges | None":
        try:
            import ray

            return cls() if ray.is_initialized() else None
        except Exception as exc:  # metrics are a view; resolution goes on without them
            log.warning("resolver: live gauges unavailable: %s", exc)
            return None

    def export(self, metrics: Mapping[str, Any]) -> None:
        current = metrics["current"]
        models = metrics["models"]
        rv, sv = current.get(RANGE_MODEL), current.get(SIGNAL_MODEL)
        if rv in models[RANGE_MODEL]:
            entry = models[RANGE_MODEL][rv]
            if entry["24h"]["interval_coverage"] is not None:
                self.engine.model_accuracy(RANGE_MODEL, entry["24h"]["interval_coverage"])
            self.drift.set(1.0 if entry["drift"]["flag"] else 0.0, {"model_name": RANGE_MODEL})
            for w in ("24h", "7d", "all"):
                tags = {"model_name": RANGE_MODEL, "window": w}
                for gauge, key in ((self.coverage, "interval_coverage"), (self.mae, "mae"), (self.ratio, "mae_ratio")):
                    if entry[w][key] is not None:
                        gauge.set(entry[w][key], tags)
        if sv in models[SIGNAL_MODEL]:
            entry = models[SIGNAL_MODEL][sv]
            if entry["24h"]["hit_rate"] is not None:
                self.engine.model_accuracy(SIGNAL_MODEL, entry["24h"]["hit_rate"])
            for w in ("24h", "7d", "all"):
                tags = {"model_name": SIGNAL_MODEL, "window": w}
                if entry[w]["hit_rate"] is not None:
                    self.hit.set(entry[w]["hit_rate"], tags)
                self.cum_r.set(entry[w]["cumulative_r"], tags)
