"""What a forecast looks like on the wire: /predictions and /signals bodies and pub/sub messages.

Pure functions of ``Forecast.to_dict()`` (the form cached in Redis), shared by the API and the
candle-close publisher so a subscriber and a caller see the same fields. Prices are absolute,
``*_pct`` fields are percent of the candle's close (0.4 = +0.4%).
"""

from __future__ import annotations

import json
import math
from typing import Any

from deployments.state import iso_time
from configs.errors import FeatureError
from features.indicators import FEATURE_GROUPS, feature_group

GROUP_TITLES = {
    "volatility": "Volatility (ATR, realised and range-based volatility)",
    "momentum": "Momentum (RSI, MACD, stochastic, rate of change)",
    "trend": "Trend (EMA distance and slope, ADX, regression slope, position in range)",
    "volume": "Volume (volume z-score, on-balance flow, distance to VWAP)",
    "time": "Time of day and week (cyclical encodings)",
    "higher_timeframes": "Higher timeframes (1-hour and 4-hour returns, volatility, trend)",
    "data_quality": "Data quality (candles bridging a short gap among the last day's)",
}


def _pct(frac: float) -> float:
    return frac * 100.0


def _means(f: dict[str, Any], price) -> dict[str, Any]:
    """The mean forecasts as prices and percent (None when the model set has none)."""
    out: dict[str, Any] = {}
    for side in ("high", "low"):
        v = f.get(f"pred_{side}_mean_pct")
        ok = v is not None and math.isfinite(v)
        out[f"predicted_{side}_mean"] = price(v) if ok else None
        out[f"predicted_{side}_mean_pct"] = _pct(v) if ok else None
    return out


def prediction_body(f: dict[str, Any], coverage: float) -> dict[str, Any]:
    """The /predictions answer for one forecast; FeatureError (503) when the range is undefined."""
    needed = ("pred_high_pct", "pred_low_pct", "high_lower", "high_upper", "low_lower", "low_upper")
    if any(f.get(k) is None for k in needed) or not f.get("close"):
        raise FeatureError(f"no prediction for {f['symbol']} at candle {iso_time(f['candle_open_time'])}: "
                           f"{f.get('reason_detail') or f.get('reason') or 'model output undefined'}")
    close = float(f["close"])

    def price(frac: float) -> float:
        return close * (1.0 + frac)

    versions = f.get("model_versions") or {}
    return {
        "symbol": f["symbol"],
        "horizon": f["horizon"],
        "horizon_minutes": f["horizon"] * 5,
        "candle_open_time": f["candle_open_time"],
        "candle_time": iso_time(f["candle_open_time"]),
        "close": close,
        "predicted_high": price(f["pred_high_pct"]),
        "predicted_high_pct": _pct(f["pred_high_pct"]),
        "predicted_low": price(f["pred_low_pct"]),
        "predicted_low_pct": _pct(f["pred_low_pct"]),
        **_means(f, price),
        "interval": {
            "coverage": coverage,
            "high": {"lower": price(f["high_lower"]), "upper": price(f["high_upper"]),
                     "lower_pct": _pct(f["high_lower"]), "upper_pct": _pct(f["high_upper"])},
            "low": {"lower": price(f["low_lower"]), "upper": price(f["low_upper"]),
                    "lower_pct": _pct(f["low_lower"]), "upper_pct": _pct(f["low_upper"])},
        },
        "model_version": versions.get("range_predictor"),
        "model_versions": versions,
    }


def signal_body(f: dict[str, Any]) -> dict[str, Any]:
    """The /signals answer (and the ``signals:{symbol}`` message) for one forecast."""
    probs = f.get("signal_probs") or [None, None, None]
    return {
        "symbol": f["symbol"],
        "horizon": f["horizon"],
        "horizon_minutes": f["horizon"] * 5,
        "signal_type": f["signal_type"],
        "confidence": f["confidence"],
        "entry_price": f.get("entry_price"),
        "take_profit": f.get("take_profit"),
        "stop_loss": f.get("stop_loss"),
        "reason": f.get("reason"),
        "reason_detail": f.get("reason_detail"),
        "probabilities": {"SELL": probs[0], "HOLD": probs[1], "BUY": probs[2]},
        "p_tp_long": f.get("p_tp_long"),
        "p_tp_short": f.get("p_tp_short"),
        "expected_r": f.get("expected_r"),
        "cost_r": f.get("cost_r"),
        "p_win": f.get("p_win"),
        "fee_profile": f.get("fee_profile"),
        "close": f["close"],
        "candle_open_time": f["candle_open_time"],
        "candle_time": iso_time(f["candle_open_time"]),
        "model_versions": f.get("model_versions") or {},
    }


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
