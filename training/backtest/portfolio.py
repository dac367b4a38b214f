"""Portfolio R per time step and a per-day Sharpe with a block-bootstrap interval (issue 15 point 4).

Summing per-trade R treats every trade as an independent bet; a BTCUSDT and an ETHUSDT position
open at the same time are not (the two move together), so the spread of a strategy's result is
larger than the per-trade figures suggest. Here every open position is marked to market at each
5-minute close in R (1 R of risk per trade, the simulator's unit): the increments of all positions
are added per time step, so simultaneous positions win and lose together, and per UTC day. The
daily series (days without a position count as 0 R) gives the Sharpe ratio; its interval is a
moving-block bootstrap over days (``training.uncertainty.block_sums``: blocks of a week keep the
volatility clustering and the overlap of consecutive trades inside a block).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from training.backtest.trade_stats import _f, max_drawdown
from training.uncertainty import LEVEL, REPLICATES, SEED, block_sums

DAY_MS = 86_400_000
BLOCK_DAYS = 7


def step_increments(candles: pd.DataFrame, trades: pd.DataFrame) -> np.ndarray:
    """Per candle of ``candles`` (one symbol), the R its ``trades`` gain or lose at that candle's close.

    Marked at each close from the entry candle on (``side x (close - entry_fill) / risk``); the exit
    candle books the rest of the trade's net R, so the increments of a trade sum to exactly its ``r``
    (costs and borrow land on the exit candle).
    """
    t = candles["open_time"].to_numpy(np.int64)
    close = candles["close"].to_numpy(np.float64)
    inc = np.zeros(len(t))
    if trades.empty:
        return inc
    e_idx = np.searchsorted(t, trades["entry_time"].to_numpy(np.int64))
    x_idx = np.searchsorted(t, trades["exit_time"].to_numpy(np.int64))
    side = trades["side"].to_numpy(np.float64)
    fill = trades["entry_fill"].to_numpy(np.float64)
    risk = trades["entry_price"].to_numpy(np.float64) * trades["sl_frac"].to_numpy(np.float64)
    r = trades["r"].to_numpy(np.float64)
    for e, x, s, f, k, final in zip(e_idx, x_idx, side, fill, risk, r):
        marks = s * (close[e:x] - f) / k                      # open at the closes before the exit candle
        value = np.concatenate([marks, [final]])
        inc[e:x + 1] += np.diff(value, prepend=0.0)
    return inc


def _period(t: np.ndarray, start_ms: int | None, end_ms: int | None, last_exit: int | None) -> np.ndarray:
    """Candles of the period, extended to the last exit (a trade signalled before the end may exit after it)."""
    m = np.ones(len(t), bool) if start_ms is None else t >= start_ms
    if end_ms is not None:
        m &= t < max(end_ms, (last_exit or 0) + 1)
    return m


def _sharpe(sum1: np.ndarray, sum2: np.ndarray, m: int) -> np.ndarray:
    var = (sum2 - sum1 ** 2 / m) / max(m - 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, (sum1 / m) / np.sqrt(np.maximum(var, 0)), np.nan)


def daily_sharpe(daily: np.ndarray, block: int = BLOCK_DAYS, replicates: int = REPLICATES,
                 seed: int = SEED, level: float = LEVEL) -> tuple[float | None, list[float] | None]:
    """Mean / sd of the daily R series and its moving-block bootstrap interval (``level``, blocks of days)."""
    daily = np.asarray(daily, np.float64)
    if len(daily) < 2 or daily.std() == 0:
        return None, None
    point = float(_sharpe(np.array(daily.sum()), np.array((daily ** 2).sum()), len(daily)))
    block = max(1, min(block, len(daily) // 8))  # a short period still needs several blocks per replicate
    sums, m = block_sums(np.column_stack([daily, daily ** 2]), block=block, replicates=replicates, seed=seed)
    reps = _sharpe(sums[:, 0], sums[:, 1], m)
    reps = reps[np.isfinite(reps)]
    a = (1 - level) / 2
    ci = [_f(np.quantile(reps, a)), _f(np.quantile(reps, 1 - a))] if len(reps) else None
    return _f(point), ci


def portfolio_summary(candles: Mapping[str, pd.DataFrame], trades: pd.DataFrame, start_ms: int | None,
                      end_ms: int | None, per_trade_sharpe: float | None = None) -> dict[str, Any]:
    """Portfolio figures of one strategy's trades over the period (see module docstring).

    ``sharpe_daily_if_independent`` is what the per-trade Sharpe would promise per day if trades were
    independent (``sharpe_per_trade x sqrt(trades per day)``), for contrast with ``sharpe_daily``.
    """
    steps: list[pd.Series] = []
    daily_by_symbol: dict[str, pd.Series] = {}
    open_count: list[pd.Series] = []
    for symbol, c in sorted(candles.items()):
        t = c["open_time"].to_numpy(np.int64)
        mine = trades[trades["symbol"] == symbol] if len(trades) else trades
        m = _period(t, start_ms, end_ms, int(trades["exit_time"].max()) if len(trades) else None)
        inc = pd.Series(step_increments(c, mine)[m], index=t[m])
        steps.append(inc)
        daily_by_symbol[symbol] = inc.groupby(inc.index // DAY_MS).sum()
        held = np.zeros(len(t), np.int64)
        if len(mine):
            e = np.searchsorted(t, mine["entry_time"].to_numpy(np.int64))
            x = np.searchsorted(t, mine["exit_time"].to_numpy(np.int64))
            np.add.at(held, e, 1)
            np.add.at(held, x[x + 1 < len(t)] + 1, -1)  # open from the entry candle through the exit candle
            held = np.cumsum(held)
        open_count.append(pd.Series(held[m], index=t[m]))
    if not steps:
        return {"days": 0}
    step = pd.concat(steps, axis=1).fillna(0.0).sum(axis=1).sort_index()
    daily = step.groupby(step.index // DAY_MS).sum()
    opened = pd.concat(open_count, axis=1).fillna(0).sum(axis=1)
    sharpe, ci = daily_sharpe(daily.to_numpy())
    n_days = len(daily)
    indep = (per_trade_sharpe * np.sqrt(len(trades) / n_days)) if per_trade_sharpe is not None and n_days else None
    corr = None
    if len(daily_by_symbol) == 2:
        a, b = (s.reindex(daily.index, fill_value=0.0) for s in daily_by_symbol.values())
        corr = _f(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None
    in_pos = opened > 0
    return {
        "days": int(n_days),
        "total_r": _f(step.sum()),
        "mean_daily_r": _f(daily.mean()),
        "sd_daily_r": _f(daily.std(ddof=1)) if n_days > 1 else None,
        "sharpe_daily": sharpe,
        "sharpe_daily_ci": ci,
        "ci_level": LEVEL,
        "block_days": max(1, min(BLOCK_DAYS, n_days // 8)),
        "sharpe_annualized": _f(sharpe * np.sqrt(365)) if sharpe is not None else None,
        "sharpe_daily_if_independent": _f(indep),
        "max_drawdown_r": _f(max_drawdown(step.to_numpy())),
        "max_open_positions": int(opened.max()) if len(opened) else 0,
        "overlap_share": _f((opened[in_pos] > 1).mean()) if in_pos.any() else None,
        "daily_r_corr_between_symbols": corr,
    }
