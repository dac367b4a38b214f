"""Fitting the range predictor's interval calibration (learning-only; applying it is
``inference.transforms.apply_interval_calibration``).

Split conformal per decile of the predicted median, on out-of-fold rows: each side's distance from
the median is stretched by the factor that leaves the quantile's share of rows beyond it, so the
served 10-90% interval covers ~80% in calm and wild markets alike (docs/models.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from inference.transforms import POOLED

INTERVAL_BINS = 10
INTERVAL_MIN_ROWS = 200           # rows per bin: fewer rows get fewer bins; under 200 in all, factor 1
INTERVAL_FACTOR_RANGE = (0.5, 3.0)


def _side_factors(lower: np.ndarray, median: np.ndarray, upper: np.ndarray, y: np.ndarray,
                  alphas: tuple[float, float], n_bins: int) -> dict[str, Any]:
    # fewer rows, fewer bins (each keeps INTERVAL_MIN_ROWS); below that one bin of factor 1
    n_bins = max(1, min(n_bins, len(median) // INTERVAL_MIN_ROWS))
    edges = np.quantile(median, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]) if len(median) else np.zeros(n_bins - 1)
    b = np.searchsorted(edges, median)
    lo_f, hi_f = np.ones(n_bins), np.ones(n_bins)
    for k in range(n_bins):
        m = b == k
        if m.sum() < INTERVAL_MIN_ROWS:
            continue
        below = (median[m] - y[m]) / np.maximum(median[m] - lower[m], 1e-12)
        above = (y[m] - median[m]) / np.maximum(upper[m] - median[m], 1e-12)
        lo_f[k] = np.quantile(below, 1.0 - alphas[0])
        hi_f[k] = np.quantile(above, alphas[1])
    lo_f, hi_f = (np.clip(f, *INTERVAL_FACTOR_RANGE) for f in (lo_f, hi_f))
    return {"edges": [float(e) for e in edges], "lower": [float(f) for f in lo_f], "upper": [float(f) for f in hi_f],
            "rows": int(len(median))}


def fit_interval_calibration(rng: np.ndarray, y_high: np.ndarray, y_low: np.ndarray, symbols: np.ndarray,
                             quantiles: Sequence[float] = (0.1, 0.5, 0.9), n_bins: int = INTERVAL_BINS) -> dict[str, Any]:
    """Per symbol (and pooled, ``POOLED``) and side: decile edges of the predicted median and the
    factors of the lower and upper distance from it. ``rng`` is the range predictor's output
    (``range_output``) on rows it was not fitted on (out of fold); JSON-ready."""
    alphas = (float(quantiles[0]), float(quantiles[-1]))
    out: dict[str, Any] = {}
    symbols = np.asarray(symbols, dtype=object)
    for name in [*sorted(set(symbols.tolist())), POOLED]:
        sel = np.ones(len(symbols), dtype=bool) if name == POOLED else symbols == name
        doc = {}
        for side, y, c in (("high", y_high, 0), ("low", y_low, 3)):
            ok = sel & np.isfinite(y) & np.isfinite(rng[:, c:c + 3]).all(axis=1)
            doc[side] = _side_factors(rng[ok, c], rng[ok, c + 1], rng[ok, c + 2], np.asarray(y)[ok], alphas, n_bins)
        out[name] = doc
    return out
