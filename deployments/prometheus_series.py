"""Every Prometheus series of the engine, defined once: name, type, unit, labels and meaning.

Why one table: the recorders (:class:`deployments.prometheus.EngineMetrics`, the resolver's
:class:`~deployments.db.live_gauges.LiveGauges`) construct their metrics from it, docs/metrics.md is
generated from it (``python -m scripts.gen_metrics_docs``), and tests/test_metrics_docs.py checks
that every series and label the alert rules, the Grafana dashboard and the docs name is in it. A
renamed metric or a label added to one series and not its sibling cannot drift out of sight.

Conventions (Prometheus' own): one metric per meaning; the unit in the name (``_seconds``,
``_ratio`` for fractions 0..1, ``_total`` for counters, which Prometheus appends); the same labels on
series that are read together (cache hits and misses both carry ``layer``). Names here are as
recorded; Prometheus sees counters with ``_total`` and, from a Ray node's agent, ``ray_`` in front.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]
WINDOWS = "`24h`, `7d`, `all` (resolved outcomes of that age)"


@dataclass(frozen=True)
class MetricDef:
    name: str                      # as recorded (no ``_total``, no ``ray_``)
    kind: Kind
    unit: str                      # for people: what one unit of the value is
    help: str                      # the HELP line
    labels: tuple[str, ...] = ()
    label_values: dict[str, str] = field(default_factory=dict)  # label -> what its values are
    meaning: str = ""              # docs/metrics.md: exactly what the value is, and who records it

    def series(self) -> tuple[str, ...]:
        """The series names Prometheus stores for it (before Ray's ``ray_`` prefix)."""
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        return (self.name,)

    def exposed(self) -> str:
        """The main series name (counters with ``_total``)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


METRICS: tuple[MetricDef, ...] = (
    # ---- requests (the API ingress) ----
    MetricDef("ml_predictions", "counter", "answers", "predictions served over the API", ("symbol", "horizon"),
              {"horizon": "in 5-minute candles"},
              "answers of POST /predictions and POST /signals with status 200 (forced HOLDs included)"),
    MetricDef("ml_prediction_latency_seconds", "histogram", "seconds", "request latency of /predictions and "
              "/signals", ("endpoint", "source"),
              {"endpoint": "`predictions`, `signals`", "source": "`cache` (local or Redis), `computed` (through the "
               "model graph), `forced_hold` (data missing: HOLD with a reason)"},
              "time in the ingress from the route's start to the rendered answer"),
    MetricDef("ml_cache_hits", "counter", "lookups", "prediction cache hits", ("layer",),
              {"layer": "`local` (the ingress replica's memory), `redis`"},
              "lookups answered by that cache layer; hits{layer} + misses{layer} = lookups of the layer"),
    MetricDef("ml_cache_misses", "counter", "lookups", "prediction cache misses", ("layer",),
              {"layer": "`local`, `redis` (also counted when Redis is down or the entry was refused)"},
              "lookups the layer could not answer: a `local` miss goes on to Redis, a `redis` miss is computed "
              "through the graph. Requests with `Cache-Control: no-cache` look nothing up"),
    MetricDef("ml_cache_rejected", "counter", "entries", "Redis cache entries refused (served as a miss)",
              ("reason",), {"reason": "`unreadable`, `signature`, `schema`, `identity`, `feature_set`, "
                                      "`model_versions` (docs/operations.md section 8)"},
              "Redis entries found but not trusted; each is also a `redis` miss"),
    MetricDef("ml_market_data_age_seconds", "gauge", "seconds", "age of the newest candle (feed seconds)",
              ("symbol",), {}, "feed seconds since the newest candle closed, per ingress replica, every second"),
    # ---- candle close (the router) ----
    MetricDef("ml_precomputed_predictions", "counter", "forecasts", "predictions computed at candle close",
              ("symbol", "horizon"), {}, "forecasts computed and cached when a candle closes"),
    MetricDef("ml_pool_fallbacks", "counter", "calls", "model-pool calls computed in the router instead",
              ("model",), {"model": "`range_predictor`, `tpsl_classifier`, `signal_classifier`, `meta_model`"},
              "model-pool calls (candle close or cache miss) that failed or did not answer within "
              "`pool_call_timeout_s` -- a dead or stuck replica -- and were computed by the router with the "
              "same model set"),
    # ---- the feed (MarketData actors) ----
    MetricDef("ml_feed_stale", "gauge", "flag (0 or 1)", "1 while the feed delivered no candle for two intervals",
              ("symbol",), {}, "1 while the symbol's MarketData actor has delivered no candle for two candle "
              "intervals of feed time (10 minutes live), else 0; set by the actor every few seconds"),
    MetricDef("ml_feed_restarts", "counter", "restarts", "feed tasks restarted after dying", ("symbol",), {},
              "times the symbol's feed task died (any exception, the initial history fetch included) and was "
              "restarted with backoff after the last delivered candle"),
    # ---- live outcomes (the outcome resolver, docs/outcomes.md) ----
    MetricDef("ml_interval_coverage_ratio", "gauge", "ratio", "share of actual highs and lows inside the "
              "predicted 10-90% interval", ("model_name", "window"),
              {"model_name": "`range_predictor`", "window": WINDOWS},
              "of resolved predictions of the serving version: the share of actual highs and lows that fell "
              "inside the predicted interval (nominal 0.8)"),
    MetricDef("ml_signal_hit_ratio", "gauge", "ratio", "share of resolved BUY/SELL signals that reached "
              "take-profit first", ("model_name", "window"), {"model_name": "`meta_model`", "window": WINDOWS},
              "of resolved BUY and SELL signals of the serving version: the share that reached take-profit "
              "first (before the stop-loss or the end of the horizon)"),
    MetricDef("ml_model_accuracy", "gauge", "ratio", "the seed's live accuracy: interval coverage "
              "(range_predictor) or signal hit ratio (meta_model), 24 h", ("model_name",),
              {"model_name": "`range_predictor`, `meta_model`"},
              "the seed platform's name, kept for its dashboards: exactly `ml_interval_coverage_ratio"
              "{window=\"24h\"}` for `range_predictor` and `ml_signal_hit_ratio{window=\"24h\"}` for "
              "`meta_model` -- two meanings under one name, so prefer those two"),
    MetricDef("ml_model_drift", "gauge", "flag (0 or 1)", "1 when live MAE is worse than walk-forward MAE "
              "beyond the margin", ("model_name",), {"model_name": "`range_predictor`"},
              "the drift verdict of docs/outcomes.md (drift_mae_margin, drift_min_samples, drift_window)"),
    MetricDef("ml_model_live_mae_ratio", "gauge", "ratio (of the close)", "live MAE of the range forecasts, "
              "as a fraction of the close", ("model_name", "window"),
              {"model_name": "`range_predictor`", "window": WINDOWS},
              "mean absolute error of predicted high and low on resolved predictions, in fractions of the close"),
    MetricDef("ml_model_mae_vs_walk_forward_ratio", "gauge", "ratio", "live MAE / walk-forward MAE on the same "
              "symbol-horizon mix", ("model_name", "window"),
              {"model_name": "`range_predictor`", "window": WINDOWS},
              "above 1: the model does worse live than in its walk-forward validation"),
    MetricDef("ml_signal_cumulative_r", "gauge", "R (multiples of the stop distance)", "cumulative R multiple "
              "of resolved signals", ("model_name", "window"), {"model_name": "`meta_model`", "window": WINDOWS},
              "sum over resolved BUY/SELL signals of each one's result in units of its stop-loss distance"),
)

BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name Prometheus can see (with and without Ray's prefix) -> its labels
    (histogram buckets add ``le``)."""
    out: dict[str, frozenset[str]] = {}
    for m in METRICS:
        if m.kind == "histogram":  # the family's own name, as docs and HELP lines write it
            out[m.name] = out[f"ray_{m.name}"] = frozenset(m.labels)
        for s in m.series():
            labels = frozenset(m.labels) | ({"le"} if s.endswith("_bucket") else set())
            out[s] = out[f"ray_{s}"] = labels
    return out
