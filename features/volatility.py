"""A HAR-style volatility forecast: pure fit / apply functions, coefficients as JSON.

Why: 5-minute volatility clusters over hours, days and weeks (HAR models of realised volatility,
Corsi 2009) and has a strong time-of-day profile, so a linear model on log volatilities over
several horizons forecasts the size of the next ``h`` candles' moves well. It is the quant's
baseline for the range predictor (``training.evaluate``) and the candidate volatility unit of the
range targets, so the definition lives here once, beside the other features.

Inputs at candle ``t`` (only candles ``<= t``; missing 5-minute slots are skipped, never filled):
- ``log_rv_W`` / ``log_pk_W``: log of the mean squared close-to-close log return / Parkinson
  variance ``ln(high/low)^2 / (4 ln 2)`` per candle over the last W candles, W = 12 (1 h), 48 (4 h),
  288 (1 day), 2016 (1 week), 8640 (30 days);
- ``log_profile``: log of the expected Parkinson variance of the *next* ``h`` time-of-day slots:
  for every slot ``t+k`` (k = 1..h) the mean of the same slot over the last ``PROFILE_DAYS`` days
  (UTC time of day; those candles all lie before ``t``).

Target at ``t`` for horizon ``h``: log of the Parkinson variance summed over ``t+1 .. t+h`` (NaN
when a slot in that window is missing, like the labels). The forecast of the horizon's volatility
is ``sigma_h = sqrt(exp(mu + s2 / 2))`` with ``mu`` the regression's prediction and ``s2`` its
residual variance (the lognormal mean of the variance), a fraction of the price over ``h`` candles.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

FIVE_MINUTES_MS = 300_000
SLOTS_PER_DAY = 288
HAR_WINDOWS: tuple[int, ...] = (12, 48, 288, 2016, 8640)
PROFILE_DAYS = 30
MIN_PROFILE_DAYS = 5
MIN_WINDOW_SHARE = 0.25  # a window longer than a day is defined once a quarter of its slots exist
VAR_FLOOR = 1e-12        # a frozen market has zero variance; keep the logarithm finite
_PK = 1.0 / (4.0 * math.log(2.0))


def har_input_names() -> tuple[str, ...]:
    return (*(f"log_rv_{w}" for w in HAR_WINDOWS), *(f"log_pk_{w}" for w in HAR_WINDOWS), "log_profile")


def _grid(open_time: np.ndarray) -> tuple[np.ndarray, int]:
    """Position of every candle on the complete 5-minute grid from the first candle, and its length."""
    t = np.asarray(open_time, dtype=np.int64)
    pos = (t - t[0]) // FIVE_MINUTES_MS
    return pos, int(pos[-1]) + 1


def candle_variances(open_time: np.ndarray, high: np.ndarray, low: np.ndarray,
                     close: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per grid slot: squared log return against the previous slot's close, Parkinson variance.

    Missing slots are NaN; the first candle after missing slots takes its return from the last
    close before them (the move over the gap is real, it is counted once). Returns ``(pos, r2, pk)`` with ``pos`` each
    candle's grid slot.
    """
    pos, n = _grid(open_time)
    c = np.full(n, np.nan)
    c[pos] = np.log(np.asarray(close, dtype=np.float64))
    pk = np.full(n, np.nan)
    pk[pos] = _PK * np.log(np.asarray(high, dtype=np.float64) / np.asarray(low, dtype=np.float64)) ** 2
    prev = pd.Series(c).ffill().shift(1).to_numpy()
    r2 = (c - prev) ** 2
    return pos, r2, pk


def _trailing_mean(x: np.ndarray, w: int) -> np.ndarray:
    """Mean of the finite values among the last ``w`` slots (itself included). Windows up to a day
    need one value (so the candle after a gap is defined), longer ones ``MIN_WINDOW_SHARE * w``
    (a week or a month is not guessed from a day). Causal: a forward pass."""
    need = 1 if w <= SLOTS_PER_DAY else int(MIN_WINDOW_SHARE * w)
    return pd.Series(x).rolling(w, min_periods=need).mean().to_numpy()


def _profile(pk: np.ndarray, horizon: int) -> np.ndarray:
    """Expected Parkinson variance per candle over the next ``horizon`` slots from the same slots of
    the last ``PROFILE_DAYS`` days: slot t+k, d days back, is t+k-288d <= t (k <= h < 288)."""
    if horizon >= SLOTS_PER_DAY:
        raise ValueError(f"horizon {horizon} must be shorter than a day")
    n = len(pk)
    # mean per candle of pk over the h slots ending at j (NaN when none of them exists)
    per = pd.Series(pk).rolling(horizon, min_periods=1).mean().to_numpy()
    total = np.zeros(n)
    count = np.zeros(n)
    for d in range(1, PROFILE_DAYS + 1):
        lag = SLOTS_PER_DAY * d - horizon  # row t reads per[t + h - 288 d]
        if lag >= n:
            break
        v = per[: n - lag]
        ok = np.isfinite(v)
        total[lag:] += np.where(ok, v, 0.0)
        count[lag:] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count >= MIN_PROFILE_DAYS, total / np.maximum(count, 1), np.nan)


def har_inputs(open_time: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
               horizons: tuple[int, ...] | list[int]) -> dict[int, np.ndarray]:
    """``{h: (n_candles, len(har_input_names()))}`` HAR inputs per candle (rows <= t only; NaN where
    a window has too little history)."""
    pos, r2, pk = candle_variances(open_time, high, low, close)
    # np.maximum keeps NaN: a window without enough history stays NaN, never the floor
    base = [np.log(np.maximum(_trailing_mean(x, w), VAR_FLOOR)) for x in (r2, pk) for w in HAR_WINDOWS]
    common = np.column_stack(base)[pos]
    out = {}
    for h in horizons:
        prof = _profile(pk, int(h))
        lp = np.log(np.maximum(prof, VAR_FLOOR))[pos]
        out[int(h)] = np.column_stack([common, lp])
    return out


def har_target(open_time: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
               horizon: int) -> np.ndarray:
    """Log of the Parkinson variance summed over candles ``t+1 .. t+h`` (NaN when a slot is missing
    or the window runs past the data)."""
    pos, _, pk = candle_variances(open_time, high, low, close)
    n = len(pk)
    fut = np.full(n, np.nan)
    if n > horizon:
        s = pd.Series(pk).rolling(horizon, min_periods=horizon).sum().to_numpy()  # sum of pk[j-h+1 .. j]
        fut[: n - horizon] = s[horizon:]
    return np.log(np.maximum(fut, VAR_FLOOR))[pos]


def fit_har(X: np.ndarray, y: np.ndarray, min_rows: int = 200) -> dict[str, Any]:
    """Least squares of the log target on the inputs (rows with any NaN skipped). JSON-ready."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(X).all(axis=1) & np.isfinite(y)
    if ok.sum() < min_rows:
        raise ValueError(f"HAR fit needs {min_rows} complete rows, has {int(ok.sum())}")
    A = np.column_stack([np.ones(int(ok.sum())), X[ok]])
    beta, *_ = np.linalg.lstsq(A, y[ok], rcond=None)
    resid = y[ok] - A @ beta
    return {"inputs": list(har_input_names()), "intercept": float(beta[0]), "coef": [float(b) for b in beta[1:]],
            "resid_var": float(resid.var()), "rows": int(ok.sum())}


def apply_har(model: Mapping[str, Any], X: np.ndarray) -> np.ndarray:
    """The horizon's volatility forecast ``sigma_h`` (fraction of price) per row; NaN where an input is."""
    if list(model["inputs"]) != list(har_input_names()):
        raise ValueError("HAR model inputs differ from this code's definition; refit it")
    mu = float(model["intercept"]) + np.asarray(X, dtype=np.float64) @ np.asarray(model["coef"], dtype=np.float64)
    return np.sqrt(np.exp(mu + 0.5 * float(model["resid_var"])))
