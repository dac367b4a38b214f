"""Baselines that keep a backtest honest: random entries with the same geometry, and buy-and-hold.

An R-multiple edge can come from the barrier geometry alone (a 1.5:1 take-profit/stop in a
trending period, a volatility regime) rather than from knowing *when* to trade. The random-entry
baseline keeps everything but the timing: the same symbols, number of trades, sides, take-profit
and stop distances and horizons (resampled from the strategy's own trades), the same simulator,
costs and one-position rule — only the entry candles are random. Repeated over many seeds it gives
the spread a strategy must beat.

Distances are carried in volatility units when the volatility is known: a trade's ``tp_frac`` and
``sl_frac`` divided by ATR/close at its signal candle, times ATR/close at the random candle. The
engine's barriers are ATR multiples, so this *is* the same geometry; copying raw fractions would
put a quiet-hour random entry under barriers drawn for a volatile hour (mostly expiries) and make
the baseline differ for a reason that has nothing to do with timing.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from training.backtest.trade_stats import _f, summarize
from training.backtest.simulate import Costs, simulate

VOL_COLUMN = "atr_14"  # ATR(14)/close of the signal candle (a feature column)
# avg_gross_r (before costs) separates timing from costs: costs in R are larger where barriers are
# tighter, so a strategy that trades in quieter hours pays more R per trade than random entries do.
RANDOM_KEYS: tuple[str, ...] = ("trades", "win_rate", "avg_r", "avg_gross_r", "total_r", "profit_factor",
                                "max_drawdown_r", "sharpe_per_trade")


def random_signals(trades: pd.DataFrame, eligible: Mapping[str, np.ndarray], seed: int,
                   oversample: int = 3, volatility: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Random-entry signals mimicking ``trades``: per symbol ``oversample x`` as many candidates.

    Entry candles are drawn uniformly (without replacement) from ``eligible[symbol]`` (open times
    where the strategy could have signalled); each gets the (side, tp_frac, sl_frac, horizon) of a
    trade of the strategy drawn with replacement. With ``volatility[symbol]`` (ATR/close aligned
    with ``eligible[symbol]``) and a ``VOL_COLUMN`` in ``trades``, the distances are rescaled to
    the random candle's volatility. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for symbol in sorted(trades["symbol"].unique()):
        mine = trades[trades["symbol"] == symbol]
        times = np.asarray(eligible.get(symbol, ()), dtype=np.int64)
        if len(mine) == 0 or len(times) == 0:
            continue
        k = min(len(times), oversample * len(mine))
        at = np.sort(rng.choice(len(times), size=k, replace=False))
        pick = rng.integers(0, len(mine), size=k)
        tp = mine["tp_frac"].to_numpy(np.float64)[pick]
        sl = mine["sl_frac"].to_numpy(np.float64)[pick]
        if volatility is not None and symbol in volatility and VOL_COLUMN in mine.columns:
            scale = np.asarray(volatility[symbol], dtype=np.float64)[at] / mine[VOL_COLUMN].to_numpy(np.float64)[pick]
            ok = np.isfinite(scale) & (scale > 0)
            tp = np.where(ok, tp * scale, tp)
            sl = np.where(ok, sl * scale, sl)
            keep = (tp < 1) & (sl < 1)
        else:
            keep = np.ones(k, bool)
        parts.append(pd.DataFrame({
            "open_time": times[at][keep], "symbol": symbol,
            "side": mine["side"].to_numpy(np.int64)[pick][keep],
            "confidence": 0.0,
            "tp_frac": tp[keep],
            "sl_frac": sl[keep],
            "horizon": mine["horizon"].to_numpy(np.int64)[pick][keep],
        }))
    if not parts:
        return pd.DataFrame({c: [] for c in ("open_time", "symbol", "side", "confidence", "tp_frac", "sl_frac",
                                             "horizon")})
    return pd.concat(parts, ignore_index=True)


def random_trades(candles: Mapping[str, pd.DataFrame], trades: pd.DataFrame, eligible: Mapping[str, np.ndarray],
                  costs: Costs, seed: int, volatility: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One random-entry backtest: simulate oversampled random signals, then keep as many trades per
    symbol as the strategy made (a random subset, so the kept ones are still non-overlapping)."""
    rng = np.random.default_rng([seed, 1])
    sim = simulate(candles, random_signals(trades, eligible, seed, volatility=volatility), costs)
    keep = []
    for symbol, g in sim.groupby("symbol", sort=True):
        n = int((trades["symbol"] == symbol).sum())
        idx = g.index.to_numpy()
        keep.append(np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False)))
    return sim.loc[np.concatenate(keep)] if keep else sim


def seed_statistics(per_seed: list[dict[str, Any]], strategy_total_r: float) -> dict[str, Any]:
    """Mean, sd and 5-95% range of each :data:`RANDOM_KEYS` metric over seeds, the share of seeds the
    strategy's total R beats (an empirical percentile: 0.5 = no better than the baseline) and how many
    sd the strategy's total R lies above the baseline's mean (issue 15's goal: >= 2 over filter-only)."""
    out: dict[str, Any] = {}
    for key in RANDOM_KEYS:
        v = np.array([p[key] for p in per_seed if p[key] is not None], dtype=np.float64)
        out[key] = ({"mean": _f(v.mean()), "std": _f(v.std(ddof=1)) if len(v) > 1 else None,
                     "p05": _f(np.percentile(v, 5)), "p95": _f(np.percentile(v, 95))} if len(v) else None)
    totals = np.array([p["total_r"] for p in per_seed], dtype=np.float64)
    out["strategy_beats_share"] = _f((totals < strategy_total_r).mean())
    sd = totals.std(ddof=1) if len(totals) > 1 else 0.0
    out["strategy_sd_above"] = _f((strategy_total_r - totals.mean()) / sd, 3) if sd > 0 else None
    return out


def add_avg_r_comparison(out: dict[str, Any], per_seed: list[dict[str, Any]], strategy_avg_r: float | None) -> None:
    """Mean R per trade against the seeds too: a baseline that cannot place as many non-overlapping
    trades as the strategy (its pool is small, the one-position rule) has a total R that is not comparable."""
    v = np.array([p["avg_r"] for p in per_seed if p["avg_r"] is not None], dtype=np.float64)
    if strategy_avg_r is None or len(v) < 2 or v.std(ddof=1) == 0:
        out["strategy_avg_r_beats_share"], out["strategy_avg_r_sd_above"] = None, None
        return
    out["strategy_avg_r_beats_share"] = _f((v < strategy_avg_r).mean())
    out["strategy_avg_r_sd_above"] = _f((strategy_avg_r - v.mean()) / v.std(ddof=1), 3)


def random_entry_baseline(candles: Mapping[str, pd.DataFrame], trades: pd.DataFrame,
                          eligible: Mapping[str, np.ndarray], costs: Costs, seeds: int = 100,
                          first_seed: int = 0, progress: Any = None,
                          volatility: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Mean, spread and 5-95% range of the random-entry metrics over ``seeds`` seeds.

    ``strategy_beats_share`` is the share of seeds whose total R the strategy's beats — an
    empirical percentile (0.5 = no better than random timing).
    """
    if trades.empty or seeds < 1:
        return {"seeds": 0, "note": "no strategy trades to mimic"}
    per_seed = []
    for s in range(first_seed, first_seed + seeds):
        per_seed.append(summarize(random_trades(candles, trades, eligible, costs, s, volatility)))
        if progress is not None:
            progress.update(1)
    out: dict[str, Any] = {"seeds": seeds, "first_seed": first_seed,
                           "geometry": "volatility-scaled" if volatility is not None and VOL_COLUMN in trades.columns
                           else "same fractions"}
    return {**out, **seed_statistics(per_seed, float(trades["r"].sum()))}


def buy_and_hold(candles: Mapping[str, pd.DataFrame], start_ms: int | None, end_ms: int | None,
                 costs: Costs) -> dict[str, Any]:
    """Buy at the first open of the period, sell at its last close, costs on both fills, per symbol
    and the equal-weighted mean. Max drawdown from the running peak of closes."""
    per: dict[str, Any] = {}
    for symbol, c in sorted(candles.items()):
        t = c["open_time"].to_numpy(np.int64)
        m = np.ones(len(t), bool)
        if start_ms is not None:
            m &= t >= start_ms
        if end_ms is not None:
            m &= t < end_ms
        if not m.any():
            continue
        o = c["open"].to_numpy(np.float64)[m]
        close = c["close"].to_numpy(np.float64)[m]
        entry = o[0] * (1 + costs.slippage)
        exit_ = close[-1] * (1 - costs.slippage)
        ret = (exit_ * (1 - costs.fee)) / (entry * (1 + costs.fee)) - 1
        path = np.concatenate([[1.0], close / o[0]])  # from the entry price on
        dd = float((1 - path / np.maximum.accumulate(path)).max())
        per[symbol] = {"return_pct": _f(100 * ret), "max_drawdown_pct": _f(100 * dd),
                       "from": int(t[m][0]), "to": int(t[m][-1]), "first_open": _f(o[0]), "last_close": _f(close[-1])}
    mean = float(np.mean([p["return_pct"] for p in per.values()])) if per else None
    return {"return_pct": _f(mean), "per_symbol": per}
