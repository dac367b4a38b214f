"""Uncertainty of headline figures: moving-block bootstrap intervals, conditional coverage.

Why blocks: neighbouring 5-minute rows share almost their whole label window and volatility
clusters for days, so rows are far from independent; resampling single rows would give intervals
that are much too narrow. A moving-block bootstrap resamples whole days (``BLOCK`` = 288 rows,
starting anywhere), which keeps that dependence inside a block; the horizons (<= 72 candles) are
shorter than a block.

Every statistic here is a function of row sums (R² from sums of y, y² and squared errors, MAE
from absolute errors, coverage from inside-counts), so a replicate is a sum of block sums read off
prefix sums: thousands of replicates cost milliseconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCK = 288          # one day of 5-minute rows
REPLICATES = 1000
LEVEL = 0.90
SEED = 20251119


def block_sums(parts: np.ndarray, block: int = BLOCK, replicates: int = REPLICATES,
               seed: int = SEED) -> np.ndarray:
    """``(replicates, k)`` sums of the row components ``parts`` (n, k) over resampled blocks.

    Each replicate concatenates ``n // block`` blocks of ``block`` consecutive rows with starts drawn
    uniformly (the same draws for every component, so paired statistics stay paired); also returns
    the rows per replicate.
    """
    parts = np.asarray(parts, dtype=np.float64)
    n = len(parts)
    block = max(1, min(block, n))
    blocks = max(1, n // block)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - block + 1, size=(replicates, blocks))
    cs = np.vstack([np.zeros((1, parts.shape[1])), np.cumsum(parts, axis=0)])
    per_block = cs[starts + block] - cs[starts]          # (replicates, blocks, k)
    return per_block.sum(axis=1), blocks * block


def _interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    a = (1 - level) / 2
    return [round(float(np.quantile(values, a)), 6), round(float(np.quantile(values, 1 - a)), 6)]


def _r2_interval(y: np.ndarray, p: np.ndarray, **kw: Any) -> list[float] | None:
    ok = np.isfinite(y) & np.isfinite(p)
    if ok.sum() < 2:
        return None
    yy = y[ok]
    sums, m = block_sums(np.column_stack([yy, yy * yy, (yy - p[ok]) ** 2]), **kw)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _interval(1 - sums[:, 2] / (sums[:, 1] - sums[:, 0] ** 2 / m))


def r2_gain(y: np.ndarray, p: np.ndarray, base: np.ndarray, **kw: Any) -> tuple[float | None, list[float] | None]:
    """R² of ``p`` minus R² of ``base`` on the rows where both are defined, and its paired 90%
    interval: both forecasts are scored on the same resampled days, so the interval of the gain is
    much narrower than the two R² intervals side by side suggest."""
    ok = np.isfinite(y) & np.isfinite(p) & np.isfinite(base)
    if ok.sum() < 2:
        return None, None
    yy = y[ok]
    sst = float(np.sum((yy - yy.mean()) ** 2))
    point = (float(np.sum((yy - base[ok]) ** 2)) - float(np.sum((yy - p[ok]) ** 2))) / sst if sst > 0 else None
    sums, m = block_sums(np.column_stack([yy, yy * yy, (yy - p[ok]) ** 2, (yy - base[ok]) ** 2]), **kw)
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = _interval((sums[:, 3] - sums[:, 2]) / (sums[:, 1] - sums[:, 0] ** 2 / m))
    return (None if point is None else round(point, 6)), ci


def range_intervals(y: np.ndarray, point: np.ndarray, lower: np.ndarray, upper: np.ndarray, name: str,
                    extra_points: dict[str, np.ndarray] | None = None, **kw: Any) -> dict[str, Any]:
    """90% intervals of ``r2_<name>``, ``mae_<name>``, ``coverage_<name>`` (and ``<key>_ci`` for the R²
    of each ``extra_points`` forecast, e.g. the mean forecast or the HAR baseline) as ``[lo, hi]``.

    ``point`` is the forecast scored by R² and MAE (the median), ``lower``/``upper`` the interval.
    Each interval uses the rows its point estimate uses (finite label and forecast), so an interval
    always describes the figure printed beside it.
    """
    out = {f"{k}_ci": _r2_interval(y, p, **kw) for k, p in (extra_points or {}).items()}
    ok = np.isfinite(y) & np.isfinite(point) & np.isfinite(lower) & np.isfinite(upper)
    if ok.sum() < 2:
        return {**out, **{f"{k}_ci": None for k in (f"r2_{name}", f"mae_{name}", f"coverage_{name}")}}
    yy, p = y[ok], point[ok]
    parts = [yy, yy * yy, (yy - p) ** 2, np.abs(yy - p), ((yy >= lower[ok]) & (yy <= upper[ok])).astype(float)]
    sums, m = block_sums(np.column_stack(parts), **kw)
    sst = sums[:, 1] - sums[:, 0] ** 2 / m
    with np.errstate(invalid="ignore", divide="ignore"):
        out.update({f"r2_{name}_ci": _interval(1 - sums[:, 2] / sst), f"mae_{name}_ci": _interval(sums[:, 3] / m),
                    f"coverage_{name}_ci": _interval(sums[:, 4] / m)})
    return out


def coverage_by_group(y: np.ndarray, lower: np.ndarray, upper: np.ndarray, group: np.ndarray,
                      groups: int) -> list[float | None]:
    """Share of ``y`` inside ``[lower, upper]`` per group code 0 .. groups-1 (None for an empty group)."""
    inside = (y >= lower) & (y <= upper)
    out: list[float | None] = []
    for g in range(groups):
        m = group == g
        out.append(round(float(inside[m].mean()), 4) if m.any() else None)
    return out


def decile_codes(x: np.ndarray) -> np.ndarray:
    """Decile 0..9 of each value among ``x`` (NaN rows get -1)."""
    codes = np.full(len(x), -1)
    ok = np.isfinite(x)
    if ok.sum() >= 10:
        edges = np.quantile(x[ok], np.linspace(0.1, 0.9, 9))
        codes[ok] = np.searchsorted(edges, x[ok], side="right")
    return codes
