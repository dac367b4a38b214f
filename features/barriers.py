"""Trade barriers from a horizon-matched volatility forecast, with a cost floor (issue 15).

Why not ATR14 x sqrt(h): a 70-minute ATR is a noisy, wrong-horizon scale for 36 and 72 candles,
and cost-blind barriers make the stop smallest in quiet hours, where the same round-trip cost is
the largest share of it — the labels then teach the classifiers to trade where costs eat the most.

**The forecast.** ``sigma_h`` (a fraction of the price over ``h`` candles) is a HAR-style linear
regression of the log Parkinson variance summed over candles ``t+1 .. t+h``
(:func:`features.volatility.har_target`, the issue-14 target) on the logs of *feature columns*:
realised / Parkinson / ATR volatility over 1 h, 4 h and 1 day, the hourly and 4-hourly realised
volatility of the last day, and a two-harmonic time-of-day and a one-harmonic day-of-week profile
(``BARRIER_INPUTS``). Why feature columns and not the issue-14 HAR inputs (which reach back a
week and a month): serving holds a ~1,000-candle window per symbol (``features.indicators.WARMUP``),
and every feature column is already computed identically in training (``build_features``) and
serving (``FeatureBuilder``) — proven equal by tests/test_features.py — so the barrier of a live
signal is exactly the barrier its training label used, with no second definition and no longer
warm-up. The coefficients are fitted once per training run (``training.data.prepare``) on the
rows before the first walk-forward test block and saved with the models as JSON
(``barrier_models`` in every model's metadata); nothing is pickled.

``sigma_h = sqrt(exp(mu + s2 / 2))``: ``mu`` the regression's prediction, ``s2`` its residual
variance (the lognormal mean of the variance), as in :func:`features.volatility.apply_har`.

**The barriers** (:func:`barrier_distances`): ``tp = tp_vol_mult x sigma_h x f`` and
``sl = sl_vol_mult x sigma_h x f`` with ``f = max(1, k x cost / (sl_vol_mult x sigma_h))``,
``k = min_stop_cost_multiple`` and ``cost`` the round-trip cost of the fee profile
(:func:`features.costs.round_trip_cost`). Both barriers widen together, so the reward:risk of the
geometry is kept and the costs are never more than ``1/k`` R.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from configs.sections import LabelParams

# Feature columns whose logarithm enters the regression, then those entering as they are.
BARRIER_LOG_INPUTS: tuple[str, ...] = ("atr_14", "rv_12", "rv_48", "rv_288", "parkinson_12", "parkinson_48",
                                       "parkinson_288", "h1_rv_24", "h4_rv_6")
BARRIER_RAW_INPUTS: tuple[str, ...] = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
BARRIER_INPUTS: tuple[str, ...] = (*(f"log_{c}" for c in BARRIER_LOG_INPUTS), *BARRIER_RAW_INPUTS,
                                   "hour_sin2", "hour_cos2")
_VOL_FLOOR = 1e-6  # a frozen market's volatility is 0; keep the logarithm finite


def barrier_inputs(features: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``(n, len(BARRIER_INPUTS))`` regression inputs from feature rows (columns ``names``; NaN stays NaN)."""
    X = np.asarray(features, dtype=np.float64)
    index = {c: i for i, c in enumerate(names)}
    missing = [c for c in (*BARRIER_LOG_INPUTS, *BARRIER_RAW_INPUTS) if c not in index]
    if missing:
        raise ValueError(f"barrier inputs need feature columns {missing}")
    logs = np.log(np.maximum(X[:, [index[c] for c in BARRIER_LOG_INPUTS]], _VOL_FLOOR))
    s, c = X[:, index["hour_sin"]], X[:, index["hour_cos"]]
    raw = X[:, [index[k] for k in BARRIER_RAW_INPUTS]]
    return np.column_stack([logs, raw, 2 * s * c, c * c - s * s])


def fit_barrier_model(inputs: np.ndarray, log_target: np.ndarray, min_rows: int = 200) -> dict[str, Any]:
    """Least squares of the log variance target on :func:`barrier_inputs` (rows with NaN skipped). JSON-ready."""
    X = np.asarray(inputs, dtype=np.float64)
    y = np.asarray(log_target, dtype=np.float64)
    ok = np.isfinite(X).all(axis=1) & np.isfinite(y)
    if ok.sum() < min_rows:
        raise ValueError(f"barrier model needs {min_rows} complete rows, has {int(ok.sum())}")
    A = np.column_stack([np.ones(int(ok.sum())), X[ok]])
    beta, *_ = np.linalg.lstsq(A, y[ok], rcond=None)
    resid = y[ok] - A @ beta
    return {"inputs": list(BARRIER_INPUTS), "intercept": float(beta[0]), "coef": [float(b) for b in beta[1:]],
            "resid_var": float(resid.var()), "rows": int(ok.sum())}


def barrier_sigma(model: Mapping[str, Any], features: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The horizon's volatility forecast ``sigma_h`` per feature row (fraction of price; NaN where a feature is)."""
    if list(model["inputs"]) != list(BARRIER_INPUTS):
        raise ValueError("barrier model inputs differ from this code's definition; retrain")
    X = barrier_inputs(features, names)
    # Column by column, not ``X @ coef``: a BLAS product may sum in another order for 1 row than for
    # many, and a signal must not depend on whether it was computed alone (serving) or in a batch.
    mu = np.full(len(X), float(model["intercept"]))
    for j, c in enumerate(model["coef"]):
        mu = mu + X[:, j] * float(c)
    return np.sqrt(np.exp(mu + 0.5 * float(model["resid_var"])))


def barrier_distances(sigma: np.ndarray | float, params: LabelParams, round_trip_cost: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Take-profit and stop-loss distances (fractions of the entry price) from ``sigma_h``, both widened
    together until the stop is at least ``min_stop_cost_multiple`` round-trip costs."""
    sigma = np.asarray(sigma, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        base_sl = params.sl_vol_mult * sigma
        widen = np.maximum(1.0, params.min_stop_cost_multiple * float(round_trip_cost) / base_sl)
    return params.tp_vol_mult * sigma * widen, base_sl * widen
