"""Baselines that isolate the model (issue 15 point 4): what is left of an edge when the model is replaced.

The random-entry baseline of :mod:`training.backtest.baselines` draws entries from *all* candles,
so a strategy beating it may owe that to its feature filters (trend, volatility band) rather than
to the model. These controls each keep everything but one ingredient — the strategy's number of
trades per symbol and side, its barrier geometry (in volatility units), horizon, the simulator,
costs and the one-position rule:

* ``filter_only``: random entries drawn only among the candles whose features pass the strategy's
  filters **for the same side** as the trade they replace. Beating it is the model's own merit.
* ``always_long`` / ``always_short``: random entries among all candles, every trade on one side
  with the strategy's barriers. Beating them says the model's choice of side is worth something
  beyond the period's drift.
* ``buy_and_hold`` of the same period (deterministic): the strategy's ``return_pct_1x`` against it.

Each seeded control reports mean ± sd (and 5-95 %) over seeds of the same metrics as the random
baseline, ``strategy_beats_share`` and ``strategy_sd_above``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from configs.strategies import Strategy
from training.backtest.baselines import VOL_COLUMN, add_avg_r_comparison, seed_statistics
from training.backtest.trade_stats import _f, summarize
from training.backtest.simulate import Costs, simulate
from training.backtest.strategy import passes_filters

# Pools: symbol -> side -> (open times, ATR/close at them) that random entries of that side draw from.
Pools = Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]]
_STREAM = {"filter_only": 2, "always_long": 3, "always_short": 4}  # independent seed streams per control


def filter_pools(strategy: Strategy, eligible: Mapping[str, np.ndarray],
                 eligible_features: Mapping[str, pd.DataFrame]) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per symbol and side, the eligible candles whose features pass the strategy's filters for that side."""
    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for symbol, times in eligible.items():
        feats = eligible_features[symbol]
        vol = feats[VOL_COLUMN].to_numpy(np.float64)
        out[symbol] = {}
        for side in (1, -1):
            ok = passes_filters(feats, strategy, side)
            out[symbol][side] = (np.asarray(times, np.int64)[ok], vol[ok])
    return out


def all_pools(eligible: Mapping[str, np.ndarray], volatility: Mapping[str, np.ndarray]) -> Pools:
    """Every eligible candle, for both sides."""
    return {s: {side: (np.asarray(t, np.int64), np.asarray(volatility[s], np.float64)) for side in (1, -1)}
            for s, t in eligible.items()}


def control_signals(trades: pd.DataFrame, pools: Pools, rng: np.random.Generator, oversample: int = 3,
                    force_side: int | None = None) -> pd.DataFrame:
    """Random signals replacing each (symbol, side) group of ``trades``: ``oversample x`` its size drawn
    from that group's pool, each with the geometry of a random trade of the group rescaled to the
    ATR/close of its candle. ``force_side`` puts every trade on one side (the group is then the symbol)."""
    parts = []
    side_of = np.full(len(trades), force_side) if force_side else trades["side"].to_numpy(np.int64)
    for (symbol, side), g in trades.assign(_side=side_of).groupby(["symbol", "_side"], sort=True):
        times, vol = pools.get(symbol, {}).get(int(side), (np.zeros(0, np.int64), np.zeros(0)))
        if len(times) == 0:
            continue
        k = min(len(times), oversample * len(g))
        at = np.sort(rng.choice(len(times), size=k, replace=False))
        pick = rng.integers(0, len(g), size=k)
        scale = vol[at] / g[VOL_COLUMN].to_numpy(np.float64)[pick] if VOL_COLUMN in g else np.ones(k)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        tp = g["tp_frac"].to_numpy(np.float64)[pick] * scale
        sl = g["sl_frac"].to_numpy(np.float64)[pick] * scale
        keep = (tp < 1) & (sl < 1)
        parts.append(pd.DataFrame({"open_time": times[at][keep], "symbol": symbol, "side": int(side),
                                   "confidence": 0.0, "tp_frac": tp[keep], "sl_frac": sl[keep],
                                   "horizon": g["horizon"].to_numpy(np.int64)[pick][keep]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["open_time", "symbol", "side", "confidence", "tp_frac", "sl_frac", "horizon"])


def control_trades(candles: Mapping[str, pd.DataFrame], trades: pd.DataFrame, pools: Pools, costs: Costs,
                   seed: int, stream: int, force_side: int | None = None) -> pd.DataFrame:
    """One seed of a control: simulate the random signals, keep as many trades per (symbol, side) as the
    strategy made (a random subset of non-overlapping trades stays non-overlapping)."""
    rng = np.random.default_rng([seed, stream])
    sim = simulate(candles, control_signals(trades, pools, rng, force_side=force_side), costs)
    if sim.empty:
        return sim
    side_of = np.full(len(trades), force_side) if force_side else trades["side"].to_numpy(np.int64)
    wanted = pd.Series(side_of).groupby([trades["symbol"].to_numpy(), side_of]).size()
    keep = []
    for (symbol, side), g in sim.groupby(["symbol", "side"], sort=True):
        n = int(wanted.get((symbol, int(side)), 0))
        keep.append(np.sort(rng.choice(g.index.to_numpy(), size=min(n, len(g)), replace=False)))
    return sim.loc[np.concatenate(keep)] if keep else sim.iloc[:0]


def control_baseline(candles: Mapping[str, pd.DataFrame], trades: pd.DataFrame, pools: Pools, costs: Costs,
                     name: str, seeds: int, first_seed: int = 0, force_side: int | None = None) -> dict[str, Any]:
    """Seed statistics of one control (see module docstring)."""
    if trades.empty or seeds < 1:
        return {"seeds": 0, "note": "no strategy trades to mimic"}
    per_seed = [summarize(control_trades(candles, trades, pools, costs, s, _STREAM[name], force_side))
                for s in range(first_seed, first_seed + seeds)]
    pool_size = {s: {("BUY" if k == 1 else "SELL"): int(len(v[0])) for k, v in p.items()} for s, p in pools.items()}
    out = {"seeds": seeds, "first_seed": first_seed, "pool_candles": pool_size,
           **seed_statistics(per_seed, float(trades["r"].sum()))}
    add_avg_r_comparison(out, per_seed, float(trades["r"].mean()))
    return out


def isolating_baselines(strategy: Strategy, candles: Mapping[str, pd.DataFrame], trades: pd.DataFrame,
                        eligible: Mapping[str, np.ndarray], volatility: Mapping[str, np.ndarray],
                        eligible_features: Mapping[str, pd.DataFrame], costs: Costs, seeds: int,
                        first_seed: int, buy_and_hold_pct: float | None, strategy_return_pct: float | None,
                        ) -> dict[str, Any]:
    """``filter_only``, ``always_long``, ``always_short`` and ``buy_and_hold`` of one strategy."""
    everything = all_pools(eligible, volatility)
    out: dict[str, Any] = {}
    if all(s in eligible_features for s in eligible):
        pools = filter_pools(strategy, eligible, eligible_features)
        out["filter_only"] = control_baseline(candles, trades, pools, costs, "filter_only", seeds, first_seed)
    else:
        out["filter_only"] = {"seeds": 0, "note": "the signal table has no filter features"}
    out["always_long"] = control_baseline(candles, trades, everything, costs, "always_long", seeds, first_seed, 1)
    out["always_short"] = control_baseline(candles, trades, everything, costs, "always_short", seeds, first_seed, -1)
    beats = None if buy_and_hold_pct is None or strategy_return_pct is None else strategy_return_pct > buy_and_hold_pct
    out["buy_and_hold"] = {"return_pct": _f(buy_and_hold_pct), "strategy_return_pct_1x": _f(strategy_return_pct),
                           "strategy_beats": beats}
    return out
