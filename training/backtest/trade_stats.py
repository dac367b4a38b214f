"""Summary statistics of a trade table, in R (multiples of the planned risk) after costs.

Definitions (docs/backtests.md):

* ``win_rate``: share of trades with net R > 0 (after fees a take-profit is a win; an expiry may
  be either).
* ``profit_factor``: sum of winning R / |sum of losing R| (``None`` with no losing trade).
* ``expectancy_r``: ``win_rate x avg_win_r + (1 - win_rate) x avg_loss_r`` — the mean R per
  trade, written the way traders quote it.
* ``max_drawdown_r``: largest fall of the cumulative R curve from a running peak, trades
  ordered by exit time (the curve starts at 0, so a losing first trade is a drawdown).
* ``sharpe_per_trade``: mean / standard deviation of per-trade R (not annualised).
* ``exposure``: share of the backtested candles (all symbols together) spent in a position.
* ``return_pct_1x``: the mean over symbols of the summed net return of its trades with the full
  notional per trade (no compounding) — comparable to buy-and-hold of the same symbols.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

MONTH_KEY = "%Y-%m"


def _f(x: float | np.floating | None, nd: int = 6) -> float | None:
    """JSON-safe float: ``None`` for NaN/inf, rounded for readability."""
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


def max_drawdown(r: np.ndarray) -> float:
    """Largest peak-to-trough fall of ``cumsum(r)``, starting from 0 (a positive number, in R)."""
    if len(r) == 0:
        return 0.0
    equity = np.concatenate([[0.0], np.cumsum(r)])
    return float((np.maximum.accumulate(equity) - equity).max())


def drawdown_curve(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative R and its drawdown (<= 0) after each trade."""
    equity = np.cumsum(r)
    peak = np.maximum.accumulate(np.concatenate([[0.0], equity]))[1:]
    return equity, equity - peak


def summarize(trades: pd.DataFrame, candles_in_period: int | None = None, n_symbols: int | None = None) -> dict[str, Any]:
    """The headline metrics of a trade table (see module docstring)."""
    r = trades.sort_values("exit_time", kind="stable")["r"].to_numpy(np.float64) if len(trades) else np.zeros(0)
    n = len(r)
    wins, losses = r[r > 0], r[r <= 0]
    win_rate = len(wins) / n if n else None
    avg_win = wins.mean() if len(wins) else 0.0
    avg_loss = losses.mean() if len(losses) else 0.0
    loss_sum = -losses.sum()
    outcomes = trades["outcome"].value_counts().to_dict() if n else {}
    exposure = None
    if candles_in_period:
        exposure = float(trades["bars"].sum()) / candles_in_period if n else 0.0
    return_pct = None
    if n_symbols:
        return_pct = 100.0 * float(trades["ret"].sum()) / n_symbols if n else 0.0
    return {
        "trades": n,
        "long": int((trades["side"] == 1).sum()) if n else 0,
        "short": int((trades["side"] == -1).sum()) if n else 0,
        "win_rate": _f(win_rate),
        "avg_r": _f(r.mean()) if n else None,
        "total_r": _f(r.sum()),
        "avg_gross_r": _f(trades["gross_r"].mean()) if n else None,
        "avg_win_r": _f(avg_win) if len(wins) else None,
        "avg_loss_r": _f(avg_loss) if len(losses) else None,
        "profit_factor": _f(wins.sum() / loss_sum) if n and loss_sum > 0 else None,
        "expectancy_r": _f(win_rate * avg_win + (1 - win_rate) * avg_loss) if n else None,
        "max_drawdown_r": _f(max_drawdown(r)),
        "sharpe_per_trade": _f(r.mean() / r.std(ddof=1)) if n > 1 and r.std(ddof=1) > 0 else None,
        "exposure": _f(exposure),
        "avg_bars_held": _f(trades["bars"].mean()) if n else None,
        "return_pct_1x": _f(return_pct),
        "outcomes": {k: int(outcomes.get(k, 0)) for k in ("tp", "sl", "expiry", "gap", "end")},
    }


def per_month(trades: pd.DataFrame) -> list[dict[str, Any]]:
    """Trades, win rate, total and mean R per calendar month of entry (UTC)."""
    if trades.empty:
        return []
    month = pd.to_datetime(trades["entry_time"].astype(np.int64), unit="ms", utc=True).dt.strftime(MONTH_KEY)
    rows = []
    for key, g in trades.groupby(month.to_numpy(), sort=True):
        r = g["r"].to_numpy(np.float64)
        rows.append({"month": key, "trades": len(r), "win_rate": _f((r > 0).mean()), "total_r": _f(r.sum()),
                     "avg_r": _f(r.mean())})
    return rows


def calibration(trades: pd.DataFrame, bins: int = 10) -> list[dict[str, Any]]:
    """Confidence vs realised hit rate (share of trades that reached their take-profit), by bin.

    Equal-count bins (quantiles of confidence) so every bin has enough trades to mean something.
    A calibrated model's ``hit_rate`` tracks ``mean_confidence``.
    """
    if trades.empty:
        return []
    conf = trades["confidence"].to_numpy(np.float64)
    hit = (trades["outcome"] == "tp").to_numpy()
    order = np.argsort(conf, kind="stable")
    rows = []
    for part in np.array_split(order, min(bins, len(order))):
        if len(part) == 0:
            continue
        rows.append({"confidence_lo": _f(conf[part].min()), "confidence_hi": _f(conf[part].max()),
                     "mean_confidence": _f(conf[part].mean()), "hit_rate": _f(hit[part].mean()),
                     "avg_r": _f(trades["r"].to_numpy(np.float64)[part].mean()), "trades": int(len(part))})
    return rows
