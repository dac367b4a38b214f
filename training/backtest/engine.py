"""One backtest run: signal table -> every strategy's trades, metrics and baselines (JSON-ready).

Kept apart from the CLI so the benchmark, the walk-forward and the tests drive exactly the code
the command runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from configs.strategies import Strategy
from training.backtest.baselines import buy_and_hold, random_entry_baseline
from training.backtest.calibration import class_calibration, direction_from_outcomes
from training.backtest.controls import isolating_baselines
from training.backtest.trade_stats import calibration, per_month, summarize
from training.backtest.portfolio import portfolio_summary
from training.backtest.signals import SignalTable, period_mask
from training.backtest.simulate import Costs, empty_trades, simulate
from training.backtest.strategy import select_signals


@dataclass
class StrategyRun:
    name: str
    strategy: Strategy
    trades: pd.DataFrame
    result: dict[str, Any]


def candles_in_period(candles: Mapping[str, pd.DataFrame], start_ms: int | None, end_ms: int | None) -> dict[str, int]:
    return {s: int(period_mask(c["open_time"].to_numpy(np.int64), start_ms, end_ms).sum()) for s, c in candles.items()}


def run_strategy(name: str, strategy: Strategy, candles: Mapping[str, pd.DataFrame], table: SignalTable,
                 costs: Costs, start_ms: int | None, end_ms: int | None, random_seeds: int = 100,
                 first_seed: int = 0, progress: Any = None, buy_and_hold_pct: float | None = None) -> StrategyRun:
    """Select, simulate and summarise one strategy, with its baselines and portfolio figures."""
    chosen = select_signals(table.signals, strategy) if len(table.signals) else table.signals
    trades = simulate(candles, chosen, costs) if len(chosen) else empty_trades()
    n_candles = candles_in_period(candles, start_ms, end_ms)
    per_symbol = {s: summarize(trades[trades["symbol"] == s], n_candles[s], 1) for s in sorted(candles)}
    result = {
        "definition": strategy.model_dump(mode="json"),
        "signals": int(len(chosen)),
        "metrics": summarize(trades, sum(n_candles.values()), len(candles)),
        "per_symbol": per_symbol,
        "per_month": per_month(trades),
        "calibration": calibration(trades),
        "random_entry": random_entry_baseline(candles, trades, table.eligible, costs, random_seeds, first_seed,
                                              progress, table.volatility or None),
    }
    result["baselines"] = isolating_baselines(strategy, candles, trades, table.eligible, table.volatility,
                                              table.eligible_features, costs, random_seeds, first_seed,
                                              buy_and_hold_pct, result["metrics"]["return_pct_1x"])
    result["calibration_by_class"] = class_calibration(trades, directions(candles, trades, costs))
    result["portfolio"] = portfolio_summary(candles, trades, start_ms, end_ms, result["metrics"]["sharpe_per_trade"])
    return StrategyRun(name, strategy, trades, result)


def directions(candles: Mapping[str, pd.DataFrame], trades: pd.DataFrame, costs: Costs) -> np.ndarray:
    """Per trade, which way the price went first with its barriers (a long and a short walked from the
    same signal candle: :func:`training.backtest.calibration.direction_from_outcomes`)."""
    if trades.empty:
        return np.zeros(0, np.int64)
    sig = pd.DataFrame({"open_time": trades["signal_time"].to_numpy(np.int64), "symbol": trades["symbol"].to_numpy(),
                        "confidence": 0.0, "tp_frac": trades["tp_frac"].to_numpy(np.float64),
                        "sl_frac": trades["sl_frac"].to_numpy(np.float64),
                        "horizon": trades["horizon"].to_numpy(np.int64), "_row": np.arange(len(trades))})
    outcome = {}
    for side in (1, -1):
        walked = simulate(candles, sig.assign(side=side), costs, one_position=False)
        outcome[side] = pd.Series(walked["outcome"].to_numpy(), index=walked["_row"].to_numpy()).reindex(
            np.arange(len(trades))).to_numpy()
    return direction_from_outcomes(outcome[1], outcome[-1])


def calibration_by_horizon(candles: Mapping[str, pd.DataFrame], table: SignalTable, costs: Costs) -> dict[str, Any]:
    """Per horizon, :func:`class_calibration` of every BUY/SELL signal the backtest forecast, each
    resolved as if it alone were traded (out of sample when the run is; more rows than any strategy)."""
    sig = table.signals
    if not len(sig):
        return {}
    out = {}
    for h, g in sig.groupby("horizon", sort=True):
        resolved = simulate(candles, g, costs, one_position=False)
        out[str(int(h))] = class_calibration(resolved, directions(candles, resolved, costs))
    return out


def run_strategies(strategies: Mapping[str, Strategy], candles: Mapping[str, pd.DataFrame], table: SignalTable,
                   costs: Costs, start_ms: int | None, end_ms: int | None, random_seeds: int = 100,
                   first_seed: int = 0, progress: Any = None) -> tuple[dict[str, Any], dict[str, StrategyRun]]:
    """Every strategy over one signal table, plus buy-and-hold of the same period: ``(json, runs)``."""
    bh = buy_and_hold(candles, start_ms, end_ms, costs)
    runs = {name: run_strategy(name, s, candles, table, costs, start_ms, end_ms, random_seeds, first_seed, progress,
                               bh["return_pct"])
            for name, s in strategies.items()}
    n_candles = candles_in_period(candles, start_ms, end_ms)
    out = {
        "candles": n_candles,
        "forecasts": table.counts,
        "hold_reasons": table.hold_reasons,
        "buy_and_hold": bh,
        "calibration_by_horizon": calibration_by_horizon(candles, table, costs),
        "strategies": {name: r.result for name, r in runs.items()},
    }
    return out, runs
