"""Baselines that isolate the model and the portfolio Sharpe (issue 15 point 4), on small crafted data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from configs.strategies import FeatureFilter, Strategy
from features.candles import FIVE_MINUTES_MS
from training.backtest.controls import all_pools, control_baseline, control_signals, filter_pools
from training.backtest.portfolio import daily_sharpe, portfolio_summary, step_increments
from training.backtest.simulate import Costs, simulate

T0 = 1_735_689_600_000  # 2025-01-01 00:00 UTC
N = 6 * 288  # six days


def _candles(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, N)))
    open_ = np.concatenate([[100.0], close[:-1]])
    wiggle = np.abs(rng.normal(0, 0.001, N)) * close
    return pd.DataFrame({"open_time": T0 + np.arange(N) * FIVE_MINUTES_MS, "open": open_, "close": close,
                         "high": np.maximum(open_, close) + wiggle, "low": np.minimum(open_, close) - wiggle,
                         "volume": 1.0})


def _trades(candles: pd.DataFrame, symbol: str, every: int = 40) -> pd.DataFrame:
    slots = np.arange(0, N - 40, every)
    sig = pd.DataFrame({"open_time": candles.open_time.to_numpy()[slots], "symbol": symbol,
                        "side": np.where(slots % 80 == 0, 1, -1), "confidence": 0.5, "tp_frac": 0.006,
                        "sl_frac": 0.004, "horizon": 36, "atr_14": 0.002})
    return simulate({symbol: candles}, sig, Costs())


def test_filter_only_draws_each_side_from_the_candles_passing_its_filters():
    c = _candles()
    t = c.open_time.to_numpy()
    slope = np.where((np.arange(N) // 100) % 2 == 0, 0.5, -0.5)  # trend up, then down, in blocks of 100
    feats = {"X": pd.DataFrame({"ema_slope_50": slope, "atr_14": 0.002})}
    strat = Strategy(description="trend", horizon=36, filters=(FeatureFilter(feature="ema_slope_50", min=0.0,
                                                                             with_side=True),))
    pools = filter_pools(strat, {"X": t}, feats)
    trades = _trades(c, "BTCUSDT").assign(symbol="X")
    sig = control_signals(trades, pools, np.random.default_rng(1))
    up = dict(zip(t, slope > 0))
    assert all(up[x] for x in sig.open_time[sig.side == 1]) and not any(up[x] for x in sig.open_time[sig.side == -1])
    for side in (1, -1):  # three candidates per strategy trade of that side
        assert (sig.side == side).sum() == 3 * (trades.side == side).sum()
    forced = control_signals(trades, all_pools({"X": t}, {"X": np.full(N, 0.002)}), np.random.default_rng(1),
                             force_side=-1)
    assert (forced.side == -1).all() and len(forced) == 3 * len(trades)
    res = control_baseline({"X": c}, trades, pools, Costs(), "filter_only", seeds=4)
    assert res["seeds"] == 4 and res["pool_candles"]["X"] == {"BUY": int((slope > 0).sum()), "SELL": int((slope < 0).sum())}
    assert res["total_r"]["std"] > 0 and 0 <= res["strategy_beats_share"] <= 1 and res["strategy_sd_above"] is not None


def test_portfolio_counts_simultaneous_positions_as_one_correlated_bet():
    c = _candles()
    one = _trades(c, "BTCUSDT")
    inc = step_increments(c, one)
    assert inc.sum() == pytest.approx(one.r.sum())  # marked to market, every trade's R booked once
    single = portfolio_summary({"BTCUSDT": c}, one, T0, None, None)
    # ETHUSDT moving exactly like BTCUSDT, the same trades: twice the daily R, the same Sharpe ...
    both = pd.concat([one, one.assign(symbol="ETHUSDT")], ignore_index=True)
    pair = portfolio_summary({"BTCUSDT": c, "ETHUSDT": c}, both, T0, None, 0.1)
    assert pair["total_r"] == pytest.approx(2 * single["total_r"])
    assert pair["sharpe_daily"] == pytest.approx(single["sharpe_daily"])
    assert pair["daily_r_corr_between_symbols"] == pytest.approx(1.0) and pair["overlap_share"] == 1.0
    assert pair["max_open_positions"] == 2 and pair["days"] == 6
    # ... whereas treating the 2 x trades as independent would promise sqrt(2) x the per-day Sharpe.
    assert pair["sharpe_daily_if_independent"] == pytest.approx(0.1 * np.sqrt(len(both) / 6), abs=1e-6)


def test_daily_sharpe_interval_brackets_the_point():
    daily = np.random.default_rng(3).normal(0.5, 1.0, 300)
    point, ci = daily_sharpe(daily)
    assert point == pytest.approx(daily.mean() / daily.std(ddof=1), abs=1e-6)
    assert ci[0] < point < ci[1] and ci[1] - ci[0] < 0.4
    assert daily_sharpe(np.zeros(10)) == (None, None)


def test_seed_claim_variants_loosen_the_definitions():
    from training.backtest.seed_claim import variants

    c = _candles()
    sig = pd.DataFrame({"open_time": c.open_time.to_numpy()[:N - 40:5], "symbol": "BTCUSDT", "side": 1,
                        "confidence": 0.5, "tp_frac": 0.006, "sl_frac": 0.004, "horizon": 36})
    v = variants({"BTCUSDT": c}, sig, Costs())
    assert v["signals"] == len(sig) and v["every_signal"]["trades"] == len(sig)  # overlapping: every signal
    assert v["engine"]["trades"] < len(sig)  # one position: a new trade only after the last exit
    assert v["engine"]["trades"] == v["no_costs"]["trades"]
    assert v["no_costs"]["total_r"] > v["engine"]["total_r"]
    assert v["every_signal_no_costs"]["total_r"] > v["every_signal"]["total_r"]
