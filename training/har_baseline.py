"""The HAR baseline of the range predictor: a volatility forecast times training-window quantiles.

Per symbol and horizon, fitted on the candles before the models' training end only:
1. the HAR regression of ``features.volatility`` gives ``sigma_h`` at every candle;
2. the scaled targets ``fut_high_h / sigma_h`` and ``fut_low_h / sigma_h`` of the training rows give
   their 10/50/90% quantiles and their mean;
3. the baseline's prediction at ``t`` is ``sigma_h(t)`` times those constants: quantiles for the
   interval, MAE and pinball loss, the mean for R² (the best squared-error point forecast of that
   family). No boosters: this is what a linear volatility model alone achieves.

The document is JSON (``{symbol: {h: {"har": ..., "high": {...}, "low": {...}}}}``); nothing is pickled.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from configs.sections import LabelParams
from features.labels import build_labels
from features.volatility import apply_har, fit_har, har_inputs, har_target

QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)
# The range predictor's side document holding the baseline fitted on its training candles.
HAR_DOCUMENT = "har_baseline"


def _columns(df: pd.DataFrame) -> tuple[np.ndarray, ...]:
    return tuple(df[k].to_numpy(np.float64) if k != "open_time" else df[k].to_numpy(np.int64)
                 for k in ("open_time", "high", "low", "close"))


def fit_har_baseline(candles: pd.DataFrame, horizons: Sequence[int], end_ms: int | None,
                     label_params: LabelParams = LabelParams()) -> dict[str, Any]:
    """``{h: {"har": model, "high": {"q": [...], "mean": m}, "low": ...}}`` from candles before ``end_ms``
    (labels and HAR targets of the last rows become NaN there, so nothing after it is used)."""
    df = candles if end_ms is None else candles[candles["open_time"] < end_ms]
    t, high, low, close = _columns(df)
    X = har_inputs(t, high, low, close, horizons)
    labels = build_labels(df, tuple(horizons), label_params)
    out: dict[str, Any] = {}
    for h in horizons:
        model = fit_har(X[h], har_target(t, high, low, close, h))
        sigma = apply_har(model, X[h])
        doc: dict[str, Any] = {"har": model}
        for side in ("high", "low"):
            u = labels[f"fut_{side}_{h}"].to_numpy() / sigma
            u = u[np.isfinite(u)]
            doc[side] = {"q": [float(v) for v in np.quantile(u, QUANTILES)], "mean": float(u.mean()),
                         "rows": int(len(u))}
        out[str(h)] = doc
    return out


def har_baseline_predictions(doc: Mapping[str, Any], candles: pd.DataFrame, horizons: Sequence[int],
                             open_time: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """Per horizon, at the candles ``open_time``: ``sigma``, ``high``/``low`` (n, 3) quantile
    predictions and ``high_mean``/``low_mean`` (fractions of close; NaN where HAR is undefined)."""
    t, high, low, close = _columns(candles)
    X = har_inputs(t, high, low, close, horizons)
    idx = np.searchsorted(t, np.asarray(open_time, dtype=np.int64))
    found = (idx < len(t)) & (t[np.minimum(idx, len(t) - 1)] == open_time)
    if not found.all():
        raise ValueError("har_baseline_predictions: some rows are not candles of this history")
    out: dict[int, dict[str, np.ndarray]] = {}
    for h in horizons:
        d = doc[str(h)]
        sigma = apply_har(d["har"], X[h][idx])
        res = {"sigma": sigma}
        for side in ("high", "low"):
            res[side] = sigma[:, None] * np.asarray(d[side]["q"])[None, :]
            res[f"{side}_mean"] = sigma * float(d[side]["mean"])
        out[int(h)] = res
    return out
