"""Strategy config validation, strategy selection, metrics and the random-entry baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from configs.settings import CONFIG_DIR, load_settings
from training.backtest.strategy import load_strategies
from features.candles import FIVE_MINUTES_MS
from configs.errors import ConfigError
from training.backtest.baselines import buy_and_hold, random_entry_baseline, random_signals, random_trades
from training.backtest.trade_stats import calibration, max_drawdown, per_month, summarize
from training.backtest.simulate import Costs, simulate
from training.backtest.strategy import select_signals

T0 = 1_735_689_600_000  # 2025-01-01 00:00 UTC


def test_shipped_strategies_load():
    s = load_strategies(CONFIG_DIR / "strategies.yaml", load_settings())
    assert {"all_signals", "aggressive_filter", "conservative"} <= set(s)
    assert s["all_signals"].filters == () and s["all_signals"].min_confidence == 0
    agg = s["aggressive_filter"]
    assert agg.min_confidence > 0 and {"adx_14", "atr_14"} <= set(agg.feature_columns)


@pytest.mark.parametrize("body, key", [
    ("strategies:\n  x:\n    description: d\n    horizon: 36\n    min_confidance: 0.5\n", r"strategies\.x\.min_confidance"),
    ("strategies:\n  x:\n    description: d\n    horizon: 36\n    filters:\n      - {feature: adx_14, minimum: 1}\n",
     r"strategies\.x\.filters\.0\.minimum"),
    ("strategies:\n  x:\n    description: d\n    horizon: 36\n    filters:\n      - {feature: adx_14}\n",
     r"strategies\.x\.filters\.0"),
    ("strategies:\n  x:\n    description: d\n    horizon: 36\n    min_confidence: 1.5\n", r"strategies\.x\.min_confidence"),
    ("strategies:\n  x:\n    description: d\n    horizon: 37\n", r"strategies\.x\.horizon"),
    ("strategies:\n  x:\n    description: d\n    horizon: 36\n    filters:\n      - {feature: adx_99, min: 1}\n",
     r"strategies\.x\.filters\.0\.feature.*adx_99"),
    ("strategies:\n  x:\n    description: d\n    horizon: 36\n    sides: [BUY, HOLD]\n", r"strategies\.x\.sides"),
    ("strategies:\n  x:\n    horizon: 36\n", r"strategies\.x\.description"),
    ("strategies: {}\n", r"strategies"),
    ("strategy:\n  x: {}\n", r"strategy"),
])
def test_bad_strategy_files_are_refused_naming_the_key(tmp_path, body, key):
    p = tmp_path / "strategies.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=key):
        load_strategies(p, load_settings())


def _table(**cols) -> pd.DataFrame:
    n = len(next(iter(cols.values())))
    base = {"open_time": T0 + np.arange(n) * FIVE_MINUTES_MS, "symbol": "BTCUSDT", "side": 1, "confidence": 0.9,
            "tp_frac": 0.01, "sl_frac": 0.005, "horizon": 36}
    return pd.DataFrame({**base, **cols})


def test_select_signals_applies_every_threshold(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("strategies:\n  t:\n    description: d\n    horizon: 36\n    sides: [BUY, SELL]\n"
                 "    min_confidence: 0.6\n    min_reward_risk: 1.5\n    filters:\n"
                 "      - {feature: ema_slope_50, min: 0.0, with_side: true}\n"
                 "      - {feature: atr_14, min: 0.001, max: 0.01}\n")
    strat = load_strategies(p, load_settings())["t"]
    sig = _table(side=[1, -1, 1, 1, -1, 1, 1, 1],
                 confidence=[0.9, 0.9, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9],
                 tp_frac=[0.01, 0.01, 0.01, 0.006, 0.01, 0.01, 0.01, 0.01],
                 ema_slope_50=[1e-4, -1e-4, 1e-4, 1e-4, 1e-4, 1e-4, np.nan, 1e-4],
                 atr_14=[0.002, 0.002, 0.002, 0.002, 0.002, 0.02, 0.002, 0.002],
                 horizon=[36, 36, 36, 36, 36, 36, 36, 72])
    kept = select_signals(sig, strat)
    # Row 0 long with the slope, row 1 short with a falling slope: kept. Row 2 low confidence, row 3
    # reward/risk 1.2, row 4 short against the slope, row 5 too volatile, row 6 NaN feature, row 7
    # another horizon: dropped.
    assert list(kept.index) == [0, 1]
    with pytest.raises(ValueError, match="atr_14"):
        select_signals(sig.drop(columns="atr_14"), strat)


def test_metrics_by_hand():
    tr = pd.DataFrame({"r": [2.0, -1.0, -1.0, 1.5, -0.5], "gross_r": [2.0, -1.0, -1.0, 1.5, -0.5],
                       "ret": [0.02, -0.01, -0.01, 0.015, -0.005], "side": [1, -1, 1, 1, -1],
                       "bars": [3, 2, 1, 4, 10], "confidence": [0.9, 0.5, 0.6, 0.8, 0.7],
                       "outcome": ["tp", "sl", "sl", "tp", "expiry"],
                       "entry_time": [T0, T0 + 10, T0 + 20, T0 + 86_400_000 * 40, T0 + 86_400_000 * 41],
                       "exit_time": [T0 + 5, T0 + 15, T0 + 25, T0 + 86_400_000 * 40 + 1, T0 + 86_400_000 * 41 + 1]})
    m = summarize(tr, candles_in_period=100, n_symbols=1)
    assert m["trades"] == 5 and m["long"] == 3 and m["short"] == 2
    assert m["win_rate"] == pytest.approx(0.4)
    assert m["total_r"] == pytest.approx(1.0) and m["avg_r"] == pytest.approx(0.2)
    assert m["profit_factor"] == pytest.approx(3.5 / 2.5)
    assert m["expectancy_r"] == pytest.approx(0.2)
    assert m["max_drawdown_r"] == pytest.approx(2.0)  # 2 -> 1 -> 0
    assert m["sharpe_per_trade"] == pytest.approx(0.2 / np.std([2, -1, -1, 1.5, -0.5], ddof=1))
    assert m["exposure"] == pytest.approx(0.2)
    assert m["return_pct_1x"] == pytest.approx(1.0)
    assert m["outcomes"] == {"tp": 2, "sl": 2, "expiry": 1, "gap": 0, "end": 0}
    assert max_drawdown(np.array([-1.0, 2.0])) == pytest.approx(1.0)
    months = per_month(tr)
    assert [x["month"] for x in months] == ["2025-01", "2025-02"]
    assert months[0]["trades"] == 3 and months[0]["total_r"] == pytest.approx(0.0)
    cal = calibration(tr, bins=5)
    assert sum(b["trades"] for b in cal) == 5 and [b["hit_rate"] for b in cal] == [0, 0, 0, 1, 1]
    empty = summarize(tr.iloc[:0], candles_in_period=100, n_symbols=1)
    assert empty["trades"] == 0 and empty["win_rate"] is None and empty["total_r"] == 0


def _real_slice(real_candles) -> dict[str, pd.DataFrame]:
    return {s: c.iloc[-4000:].reset_index(drop=True) for s, c in real_candles.items()}


def _some_trades(cands) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    for s, c in cands.items():
        for i in sorted(rng.choice(len(c) - 100, 60, replace=False)):
            rows.append({"open_time": int(c.open_time[i]), "symbol": s, "side": int(rng.choice([1, -1])),
                         "confidence": 0.6, "tp_frac": 0.006, "sl_frac": 0.004, "horizon": 36})
    return simulate(cands, pd.DataFrame(rows), Costs())


def test_random_entry_baseline_is_deterministic_by_seed(real_candles):
    cands = _real_slice(real_candles)
    trades = _some_trades(cands)
    eligible = {s: c.open_time.to_numpy()[:-1] for s, c in cands.items()}
    a = random_signals(trades, eligible, seed=3)
    pd.testing.assert_frame_equal(a, random_signals(trades, eligible, seed=3))
    assert not a.equals(random_signals(trades, eligible, seed=4))
    # Same geometry as the strategy's trades, only the timing differs.
    assert set(a.tp_frac) <= set(trades.tp_frac) and set(a.horizon) == {36}
    r1 = random_trades(cands, trades, eligible, Costs(), seed=3)
    pd.testing.assert_frame_equal(r1, random_trades(cands, trades, eligible, Costs(), seed=3))
    for s in cands:  # as many trades per symbol as the strategy made
        assert (r1.symbol == s).sum() == (trades.symbol == s).sum()
    b1 = random_entry_baseline(cands, trades, eligible, Costs(), seeds=5)
    b2 = random_entry_baseline(cands, trades, eligible, Costs(), seeds=5)
    assert b1 == b2 and b1["seeds"] == 5
    assert b1["total_r"]["std"] > 0 and b1["total_r"]["p05"] <= b1["total_r"]["mean"] <= b1["total_r"]["p95"]
    assert 0 <= b1["strategy_beats_share"] <= 1
    assert random_entry_baseline(cands, trades, eligible, Costs(), seeds=5, first_seed=100) != b1


def test_random_entries_keep_the_geometry_in_volatility_units(real_candles):
    from features.batch import build_features

    cands = _real_slice(real_candles)
    atr = {s: build_features(c)["atr_14"].to_numpy() for s, c in cands.items()}
    trades = _some_trades(cands)
    trades["atr_14"] = [atr[s][int(np.searchsorted(cands[s].open_time, t))] for s, t in
                        zip(trades.symbol, trades.signal_time)]
    trades = trades[np.isfinite(trades.atr_14)].reset_index(drop=True)
    ok = {s: np.isfinite(a) for s, a in atr.items()}
    eligible = {s: cands[s].open_time.to_numpy()[ok[s]] for s in cands}
    vol = {s: atr[s][ok[s]] for s in cands}
    sig = random_signals(trades, eligible, seed=1, volatility=vol)
    pd.testing.assert_frame_equal(sig, random_signals(trades, eligible, seed=1, volatility=vol))
    for s in cands:
        mine = sig[sig.symbol == s]
        here = vol[s][np.searchsorted(eligible[s], mine.open_time.to_numpy())]
        # tp in ATR units at the random candle is one of the strategy's tp-in-ATR-units
        k = mine.tp_frac.to_numpy() / here
        ref = (trades.tp_frac / trades.atr_14)[trades.symbol == s].to_numpy()
        assert np.isclose(k[:, None], ref[None, :]).any(axis=1).all()
        assert np.allclose(mine.tp_frac / mine.sl_frac, 1.5)  # reward/risk unchanged
    b = random_entry_baseline(cands, trades, eligible, Costs(), seeds=3, volatility=vol)
    assert b["geometry"] == "volatility-scaled" and b["trades"]["mean"] > 0


def test_buy_and_hold_by_hand():
    c = pd.DataFrame({"open_time": T0 + np.arange(4) * FIVE_MINUTES_MS, "open": [100.0, 110, 90, 95],
                      "high": [111.0, 111, 96, 121], "low": [99.0, 89, 89, 94], "close": [110.0, 90, 95, 120],
                      "volume": 1.0})
    bh = buy_and_hold({"X": c}, T0 + FIVE_MINUTES_MS, None, Costs(fee_bps=10, slippage_bps=0))
    # Bought at the open of candle 1 (110), sold at the last close (120), 0.1% fee on each side.
    assert bh["per_symbol"]["X"]["return_pct"] == pytest.approx(100 * (120 * 0.999 / (110 * 1.001) - 1))
    assert bh["per_symbol"]["X"]["max_drawdown_pct"] == pytest.approx(100 * (1 - 90 / 110))
    assert bh["return_pct"] == bh["per_symbol"]["X"]["return_pct"]


def test_candidate_rows_never_drop_a_tradable_signal():
    """Rows skipped before forecasting are exactly rows no side of the strategy could trade."""
    from training.backtest.strategy import candidate_rows

    rng = np.random.default_rng(0)
    n = 4000
    feats = pd.DataFrame({"adx_14": rng.uniform(0, 0.5, n), "ema_slope_50": rng.normal(0, 1e-4, n),
                          "h1_dist_sma_24": rng.normal(0, 1e-3, n), "h4_dist_sma_6": rng.normal(0, 1e-3, n),
                          "atr_14": rng.uniform(0, 0.01, n), "vol_ratio": rng.uniform(0, 3, n)})
    feats.loc[::97, "adx_14"] = np.nan
    for strat in load_strategies().values():
        cand = candidate_rows(feats, strat)
        for side in (1, -1):
            sig = _table(side=np.full(n, side), horizon=np.full(n, strat.horizon), tp_frac=0.02, sl_frac=0.01,
                         **{c: feats[c].to_numpy() for c in feats})
            kept = select_signals(sig, strat).index.to_numpy()
            assert cand[kept].all()
        if strat.filters:
            assert 0 < cand.sum() < n
            # a row passing for some side is kept by select_signals for that side
            any_side = np.zeros(n, bool)
            for side in (1, -1):
                sig = _table(side=np.full(n, side), horizon=np.full(n, strat.horizon), tp_frac=0.02, sl_frac=0.01,
                             **{c: feats[c].to_numpy() for c in feats})
                any_side[select_signals(sig, strat).index.to_numpy()] = True
            assert (any_side == cand).all()
