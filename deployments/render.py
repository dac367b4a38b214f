"""What a forecast looks like on the wire: /predictions and /signals bodies and pub/sub messages.

Pure functions of a :class:`~inference.forecast.Forecast` (the object cached in Redis), shared by
the API and the candle-close publisher so a subscriber and a caller see the same fields. Prices are
absolute, ``*_pct`` fields are percent of the candle's close (0.4 = +0.4%).

The bodies' fields are the response models' (``ml_engine_client.models``, the schema of
docs/openapi.json): a signal takes every field :class:`SignalBody` shares with the forecast by name,
as the forecast's JSON has it, and derives the rest (:data:`SIGNAL_DERIVED`); a prediction is all
derived (prices and percent from the forecast's fractions). tests/test_forecast_contract.py keeps
both equal to the models.
"""

from __future__ import annotations

import json
import math
from typing import Any

from deployments.state import iso_time
from configs.errors import FeatureError
from features.indicators import FEATURE_GROUPS, feature_group
from inference.forecast import Forecast
from ml_engine_client.models import SignalBody

GROUP_TITLES = {
    "volatility": "Volatility (ATR, realised and range-based volatility)",
    "momentum": "Momentum (RSI, MACD, stochastic, rate of change)",
    "trend": "Trend (EMA distance and slope, ADX, regression slope, position in range)",
    "volume": "Volume (volume z-score, on-balance flow, distance to VWAP)",
    "time": "Time of day and week (cyclical encodings)",
    "higher_timeframes": "Higher timeframes (1-hour and 4-hour returns, volatility, trend)",
    "data_quality": "Data quality (candles bridging a short gap among the last day's)",
}

# The signal body's fields that are the forecast's own, and those derived from it.
SIGNAL_FROM_FORECAST: frozenset[str] = frozenset(SignalBody.model_fields) & frozenset(Forecast.model_fields)
SIGNAL_DERIVED: tuple[str, ...] = ("horizon_minutes", "probabilities", "candle_time")
_SIGNAL_ORDER = tuple(SignalBody.model_fields)
_SIGNAL_DUMP = SIGNAL_FROM_FORECAST | {"signal_probs"}  # the source of ``probabilities``
# What a prediction needs defined (finite), or there is no prediction to give.
_RANGE_FIELDS = ("pred_high_pct", "pred_low_pct", "high_lower", "high_upper", "low_lower", "low_upper")


def _pct(frac: float) -> float:
    return frac * 100.0


def _means(f: Forecast, price) -> dict[str, Any]:
    """The mean forecasts as prices and percent (None when the model set has none)."""
    out: dict[str, Any] = {}
    for side in ("high", "low"):
        v = getattr(f, f"pred_{side}_mean_pct")
        ok = math.isfinite(v)
        out[f"predicted_{side}_mean"] = price(v) if ok else None
        out[f"predicted_{side}_mean_pct"] = _pct(v) if ok else None
    return out


def prediction_body(f: Forecast, coverage: float) -> dict[str, Any]:
    """The /predictions answer for one forecast; FeatureError (503) when the range is undefined."""
    close = f.close
    if not all(math.isfinite(getattr(f, k)) for k in _RANGE_FIELDS) or not (math.isfinite(close) and close):
        raise FeatureError(f"no prediction for {f.symbol} at candle {iso_time(f.candle_open_time)}: "
                           f"{f.reason_detail or f.reason or 'model output undefined'}")

    def price(frac: float) -> float:
        return close * (1.0 + frac)

    versions = f.model_versions
    return {
        "symbol": f.symbol,
        "horizon": f.horizon,
        "horizon_minutes": f.horizon * 5,
        "candle_open_time": f.candle_open_time,
        "candle_time": iso_time(f.candle_open_time),
        "close": close,
        "predicted_high": price(f.pred_high_pct),
        "predicted_high_pct": _pct(f.pred_high_pct),
        "predicted_low": price(f.pred_low_pct),
        "predicted_low_pct": _pct(f.pred_low_pct),
        **_means(f, price),
        "interval": {
            "coverage": coverage,
            "high": {"lower": price(f.high_lower), "upper": price(f.high_upper),
                     "lower_pct": _pct(f.high_lower), "upper_pct": _pct(f.high_upper)},
            "low": {"lower": price(f.low_lower), "upper": price(f.low_upper),
                    "lower_pct": _pct(f.low_lower), "upper_pct": _pct(f.low_upper)},
        },
        "model_version": versions.get("range_predictor"),
        "model_versions": dict(versions),
    }


def signal_body(f: Forecast) -> dict[str, Any]:
    """The /signals answer (and the ``signals:{symbol}`` message) for one forecast: the forecast's
    own fields as its JSON has them (undefined numbers null), then the derived ones."""
    own = f.model_dump(mode="json", include=_SIGNAL_DUMP)
    sell, hold, buy = own.pop("signal_probs")
    own.update(horizon_minutes=f.horizon * 5, probabilities={"SELL": sell, "HOLD": hold, "BUY": buy},
               candle_time=iso_time(f.candle_open_time))
    return {k: own[k] for k in _SIGNAL_ORDER}


def signal_message(f: Forecast, published_at: float) -> bytes:
    """One ``signals:{symbol}`` message (``SignalMessage``): the signal body and when it was published."""
    return b"%s,\"published_at\":%s}" % (body_prefix(signal_body(f)), repr(float(published_at)).encode())


def body_prefix(body: dict[str, Any]) -> bytes:
    """The JSON of ``body`` without its closing brace, so per-request fields can be appended cheaply."""
    raw = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return raw[:-1]


def finish(prefix: bytes, cached: bool, data_age_s: float) -> bytes:
    return b"%s,\"cached\":%s,\"data_age_s\":%.3f}" % (prefix, b"true" if cached else b"false", data_age_s)


def indicators_body(symbol: str, open_time: int, close: float, names: tuple[str, ...], row) -> dict[str, Any]:
    groups: dict[str, dict[str, float | None]] = {g: {} for g in FEATURE_GROUPS}
    for name, value in zip(names, row):
        v = float(value)
        groups[feature_group(name)][name] = v if math.isfinite(v) else None
    return {
        "symbol": symbol,
        "candle_open_time": open_time,
        "candle_time": iso_time(open_time),
        "close": close,
        "groups": {g: {"title": GROUP_TITLES.get(g, g), "values": vals} for g, vals in groups.items()},
    }


def describe_models(ens: Any, loaded_at: float | None, error: str | None) -> dict[str, Any]:
    """What GET /models/status shows: per model its version, training range, walk-forward metrics."""
    from inference.registry import MODEL_NAMES

    models: dict[str, Any] = {}
    if ens is not None:
        for name in MODEL_NAMES:
            meta = ens.metadata[name]
            models[name] = {
                "version": ens.versions[name],
                "created": meta.get("created"),
                "training_range": meta.get("data_range"),
                "walk_forward_metrics": {k: v for k, v in (meta.get("metrics") or {}).items() if k != "folds"},
                "walk_forward_setup": {k: v for k, v in (meta.get("walk_forward") or {}).items() if k != "folds"},
                "xgboost_version": meta.get("xgboost_version"),
                "code_commit": meta.get("code_commit"),
                "feature_set_hash": meta.get("feature_set_hash"),
                "loaded_at": iso_time(int(loaded_at * 1000)) if loaded_at else None,
            }
    return {"loaded": ens is not None, "versions": dict(ens.versions) if ens else {}, "models": models,
            "horizons": list(ens.horizons) if ens else [], "symbols": list(ens.symbols) if ens else [],
            "error": error}
