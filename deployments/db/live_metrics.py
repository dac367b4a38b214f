"""Rolling live accuracy per model version (24 h, 7 d, all) and the drift flag.

The SQL (``fetch_live_metrics``) only aggregates resolved rows per model version, symbol and
horizon, through the covering ``*_metrics`` indexes; everything else is pure.

Windows are in market time — forecast candles within 24 h / 7 d of the latest candle the resolver
has seen — so a replayed day and a live day read the same, and an outage does not empty a window.

Live MAE is compared with the walk-forward MAE of the *same* model version on the *same* mix of
symbols and horizons: the baseline of a window is the walk-forward MAE of each (symbol, horizon)
weighted by how many live predictions that pair has in the window (a 72-candle range is far wider
than a 6-candle one, so comparing pooled figures would flag a change of mix as drift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import asyncpg

from deployments.db.rows import RANGE_MODEL, SIGNAL_MODEL

DAY_MS = 24 * 3600 * 1000
WINDOWS: dict[str, int | None] = {"24h": DAY_MS, "7d": 7 * DAY_MS, "all": None}


@dataclass(frozen=True)
class Baseline:
    """Walk-forward figures of one (symbol, horizon), from the range predictor's metadata."""

    mae: float
    coverage: float | None


def walk_forward_baseline(metadata: Mapping[str, Any]) -> dict[tuple[str, int], Baseline]:
    """``{(symbol, horizon): Baseline}`` from a range predictor's ``metadata.json``.

    ``metrics.walk_forward`` holds one row per symbol and horizon with ``mae_high``/``mae_low``
    (median forecast vs ``fut_high``/``fut_low``) and ``coverage_high``/``coverage_low``; the live
    MAE is the mean of the high and low errors, so the baseline is the mean of the two MAEs.
    """
    try:
        rows = metadata["metrics"]["walk_forward"]
    except (KeyError, TypeError):
        return {}
    out: dict[tuple[str, int], Baseline] = {}
    for r in rows:
        try:
            mae = (float(r["mae_high"]) + float(r["mae_low"])) / 2.0
        except (KeyError, TypeError, ValueError):
            continue
        if not math.isfinite(mae):
            continue
        cov = None
        if r.get("coverage_high") is not None and r.get("coverage_low") is not None:
            cov = (float(r["coverage_high"]) + float(r["coverage_low"])) / 2.0
        out[(str(r["symbol"]), int(r["horizon"]))] = Baseline(mae, cov)
    return out


def _window_filters(aggregates: dict[str, tuple[str, str | None]]) -> str:
    """``agg FILTER (WHERE candle_open_time >= $k [AND cond]) AS name_<window>`` for every window."""
    cols = []
    for w, p in zip(WINDOWS, ("$1", "$2", "$3")):
        for name, (agg, cond) in aggregates.items():
            where = f"candle_open_time >= {p}" + (f" AND {cond}" if cond else "")
            cols.append(f"{agg} FILTER (WHERE {where}) AS {name}_{w}")
    return ",\n  ".join(cols)


PREDICTION_METRICS_SQL = f"""
SELECT model_version, symbol, horizon,
  {_window_filters({"n": ("count(*)", None), "mae_sum": ("sum(mae)", None),
                    "cov_n": ("count((high_inside::int + low_inside::int))", None),
                    "cov_sum": ("sum((high_inside::int + low_inside::int) / 2.0)", None)})}
FROM ml.prediction_logs
WHERE mae IS NOT NULL
GROUP BY model_version, symbol, horizon
"""

SIGNAL_METRICS_SQL = f"""
SELECT model_version,
  {_window_filters({"n": ("count(*)", None), "tp": ("count(*)", "outcome = 'tp'"),
                    "sl": ("count(*)", "outcome = 'sl'"), "r_sum": ("sum(r_multiple)", None),
                    "pnl_sum": ("sum(pnl_percent)", None)})}
FROM ml.signal_logs
WHERE outcome IS NOT NULL
GROUP BY model_version
"""


def _bounds(now_ms: int) -> list[int]:
    # Forecast candles opened within the span before the latest candle: 288 candles for 24 h.
    very_old = -(2**62)
    return [now_ms - span + 1 if span is not None else very_old for span in WINDOWS.values()]


async def fetch_live_metrics(conn: asyncpg.Connection, now_ms: int,
                             timeout: float | None = None) -> tuple[list[dict], list[dict]]:
    """Raw aggregates: prediction rows per (version, symbol, horizon), signal rows per version."""
    b = _bounds(now_ms)
    preds = await conn.fetch(PREDICTION_METRICS_SQL, *b, timeout=timeout)
    sigs = await conn.fetch(SIGNAL_METRICS_SQL, *b, timeout=timeout)
    return [dict(r) for r in preds], [dict(r) for r in sigs]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarize(prediction_rows: Iterable[Mapping[str, Any]], signal_rows: Iterable[Mapping[str, Any]],
              baselines: Mapping[str, Mapping[tuple[str, int], Baseline]], *, drift_margin: float,
              drift_min_samples: int, drift_window: str) -> dict[str, dict[str, Any]]:
    """Per model name and version: the windows' figures and the drift verdict (pure).

    ``baselines`` maps a range-predictor version to its walk-forward baselines (may be empty:
    then no MAE comparison and no drift verdict, said so in ``drift.reason``).
    """
    ranges: dict[str, dict[str, Any]] = {}
    for r in prediction_rows:
        v = r["model_version"]
        base = baselines.get(v, {}).get((r["symbol"], int(r["horizon"])))
        acc = ranges.setdefault(v, {w: {"n": 0, "mae_sum": 0.0, "cov_n": 0, "cov_sum": 0.0, "base_n": 0,
                                        "base_mae_sum": 0.0, "base_cov_sum": 0.0, "base_cov_n": 0}
                                    for w in WINDOWS})
        for w in WINDOWS:
            n = int(r[f"n_{w}"] or 0)
            if not n:
                continue
            a = acc[w]
            a["n"] += n
            a["mae_sum"] += float(r[f"mae_sum_{w}"])
            a["cov_n"] += int(r[f"cov_n_{w}"] or 0)
            a["cov_sum"] += float(r[f"cov_sum_{w}"] or 0.0)
            if base is not None:
                a["base_n"] += n
                a["base_mae_sum"] += n * base.mae
                # Live MAE of the pairs that have a baseline, for a like-for-like ratio.
                a.setdefault("mae_sum_based", 0.0)
                a["mae_sum_based"] += float(r[f"mae_sum_{w}"])
                if base.coverage is not None:
                    a["base_cov_sum"] += n * base.coverage
                    a["base_cov_n"] += n
    range_out: dict[str, Any] = {}
    for v, acc in ranges.items():
        entry: dict[str, Any] = {}
        for w, a in acc.items():
            mae = a["mae_sum"] / a["n"] if a["n"] else None
            wf = a["base_mae_sum"] / a["base_n"] if a["base_n"] else None
            live_based = a.get("mae_sum_based", 0.0) / a["base_n"] if a["base_n"] else None
            entry[w] = {"n": a["n"], "mae": mae, "walk_forward_mae": wf, "mae_ratio": _ratio(live_based, wf),
                        "interval_coverage": a["cov_sum"] / a["cov_n"] if a["cov_n"] else None,
                        "walk_forward_coverage": a["base_cov_sum"] / a["base_cov_n"] if a["base_cov_n"] else None}
        entry["drift"] = drift_verdict(entry[drift_window], n=acc[drift_window]["base_n"], margin=drift_margin,
                                       min_samples=drift_min_samples, window=drift_window)
        range_out[v] = entry
    signal_out: dict[str, Any] = {}
    for r in signal_rows:
        entry = {}
        for w in WINDOWS:
            n = int(r[f"n_{w}"] or 0)
            entry[w] = {"n": n, "hit_rate": (int(r[f"tp_{w}"]) / n) if n else None,
                        "tp": int(r[f"tp_{w}"] or 0), "sl": int(r[f"sl_{w}"] or 0),
                        "expired": n - int(r[f"tp_{w}"] or 0) - int(r[f"sl_{w}"] or 0),
                        "cumulative_r": float(r[f"r_sum_{w}"]) if n and r[f"r_sum_{w}"] is not None else 0.0,
                        "mean_pnl_percent": float(r[f"pnl_sum_{w}"]) / n if n and r[f"pnl_sum_{w}"] is not None
                        else None}
        signal_out[r["model_version"]] = entry
    return {RANGE_MODEL: range_out, SIGNAL_MODEL: signal_out}


def drift_verdict(window_figures: Mapping[str, Any], *, n: int, margin: float, min_samples: int,
                  window: str) -> dict[str, Any]:
    """Drift when live MAE exceeds the walk-forward MAE by more than ``margin`` over ``min_samples`` rows.

    ``n`` counts the window's resolved predictions that have a walk-forward baseline.
    """
    ratio = window_figures["mae_ratio"]
    verdict = {"flag": False, "window": window, "margin": margin, "min_samples": min_samples, "n": n,
               "mae_ratio": ratio, "reason": None}
    if window_figures["walk_forward_mae"] is None:
        verdict["reason"] = "no walk-forward MAE for this model version"
    elif n < min_samples:
        verdict["reason"] = f"{n} resolved predictions in {window} < {min_samples}"
    elif ratio is not None and ratio > 1.0 + margin:
        verdict["flag"] = True
        verdict["reason"] = f"live MAE is {ratio:.2f}x the walk-forward MAE (> {1 + margin:.2f}x)"
    else:
        verdict["reason"] = f"live MAE is {ratio:.2f}x the walk-forward MAE"
    return verdict


def latest_version(versions_seen: Mapping[str, int]) -> str | None:
    """The version with the newest forecast candle: the one serving now."""
    return max(versions_seen, key=versions_seen.get) if versions_seen else None
