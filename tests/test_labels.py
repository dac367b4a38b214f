"""Labels checked by hand on real candles, plus the rules: t+1..t+h only, gaps, both-touch = stop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import talib

from configs.sections import LabelParams
from features.barriers import barrier_distances
from features.costs import Costs
from features.labels import BUY, EXPIRED, HOLD, SELL, SL, TP, build_labels, first_touch

H = (6, 18, 36, 72)


def _by_hand(df: pd.DataFrame, t: int, h: int, params: LabelParams) -> dict[str, float]:
    """Scalar loops, written independently of the vectorised code."""
    c0 = df["close"].iloc[t]
    highs = df["high"].iloc[t + 1: t + h + 1].tolist()
    lows = df["low"].iloc[t + 1: t + h + 1].tolist()
    atr = talib.ATR(df["high"].to_numpy()[: t + 1], df["low"].to_numpy()[: t + 1],
                    df["close"].to_numpy()[: t + 1], 14)[-1] / c0
    sigma = atr * h ** 0.5
    fee, slip = 7.5e-4, 2e-4  # Costs(): 7.5 bps fee + 2 bps slippage per fill, no borrow
    widen = max(1.0, params.min_stop_cost_multiple * 2 * (fee + slip) / (params.sl_vol_mult * sigma))
    tp = params.tp_vol_mult * sigma * widen
    sl = params.sl_vol_mult * sigma * widen

    def walk(tp_px: float, sl_px: float, long: bool) -> tuple[int, float]:
        for hi, lo in zip(highs, lows):
            hit_tp = hi >= tp_px if long else lo <= tp_px
            hit_sl = lo <= sl_px if long else hi >= sl_px
            if hit_sl:
                return SL, sl_px  # includes a candle touching both
            if hit_tp:
                return TP, tp_px
        return EXPIRED, df["close"].iloc[t + h]

    def net_r(exit_px: float, side: int) -> float:
        e_fill, x_fill = c0 * (1 + side * slip), exit_px * (1 - side * slip)
        return (side * (x_fill - e_fill) - fee * (e_fill + x_fill)) / c0 / sl

    out_long, x_long = walk(c0 * (1 + tp), c0 * (1 - sl), True)
    out_short, x_short = walk(c0 * (1 - tp), c0 * (1 + sl), False)
    r_long, r_short = net_r(x_long, 1), net_r(x_short, -1)
    signal = BUY if r_long > 0 else SELL if r_short > 0 else HOLD
    return {"fut_high": max(highs) / c0 - 1, "fut_low": min(lows) / c0 - 1, "long": out_long,
            "short": out_short, "signal": signal, "r_long": r_long, "r_short": r_short, "sl": sl}


def test_labels_by_hand_on_real_candles(real_candles):
    params = LabelParams()
    rng = np.random.default_rng(3)
    seen_outcomes: set[int] = set()
    for symbol, full in real_candles.items():
        df = full.iloc[-5000:].reset_index(drop=True)
        y = build_labels(df, H, params)
        for t in rng.integers(100, len(df) - 100, size=12):
            for h in H:
                want = _by_hand(df, int(t), h, params)
                assert y[f"fut_high_{h}"][t] == pytest.approx(want["fut_high"], rel=1e-12)
                assert y[f"fut_low_{h}"][t] == pytest.approx(want["fut_low"], rel=1e-12)
                assert y[f"outcome_long_{h}"][t] == want["long"], (symbol, t, h)
                assert y[f"outcome_short_{h}"][t] == want["short"], (symbol, t, h)
                assert y[f"tp_long_{h}"][t] == float(want["long"] == TP)
                assert y[f"signal_{h}"][t] == want["signal"]
                assert y[f"r_long_{h}"][t] == pytest.approx(want["r_long"], rel=1e-9)
                assert y[f"r_short_{h}"][t] == pytest.approx(want["r_short"], rel=1e-9)
                assert y[f"sl_frac_{h}"][t] == pytest.approx(want["sl"], rel=1e-12)
                seen_outcomes.update((want["long"], want["short"]))
    assert seen_outcomes == {TP, SL, EXPIRED}  # the sample exercised every branch


def test_labels_use_only_the_next_h_candles(real_candles):
    df = real_candles["ETHUSDT"].iloc[-2000:].reset_index(drop=True)
    y = build_labels(df, (6,))
    t = 1000
    changed = df.copy()
    changed.loc[t + 7:, ["high"]] *= 1.2  # beyond t+6
    changed.loc[: t - 1, ["high", "low"]] *= 1.0  # (history before t shapes only ATR)
    y2 = build_labels(changed, (6,))
    assert y2["fut_high_6"][t] == y["fut_high_6"][t]
    changed.loc[t + 6, "high"] *= 1.2  # the last candle of the window does count
    assert build_labels(changed, (6,))["fut_high_6"][t] > y["fut_high_6"][t]


def test_labels_are_nan_past_the_end_and_across_gaps(real_candles):
    df = real_candles["BTCUSDT"].iloc[-600:].reset_index(drop=True)
    y = build_labels(df, (6,))
    assert y["fut_high_6"].iloc[-6:].isna().all() and y["fut_high_6"].iloc[-7:-6].notna().all()
    gapped = df.drop(index=range(300, 316)).reset_index(drop=True)  # a 16-candle halt after row 299
    yg = build_labels(gapped, (6,))
    assert yg["fut_high_6"].iloc[294:300].isna().all()  # windows that would cross the gap
    assert yg["fut_high_6"].iloc[293] == pytest.approx(y["fut_high_6"].iloc[293])
    assert yg[["outcome_long_6", "signal_6"]].iloc[294:300].isna().all().all()


def test_first_touch_rules():
    highs = np.array([[101.0, 103.0], [100.5, 100.5], [102.0, 100.0], [100.5, 100.5]])
    lows = np.array([[99.5, 99.5], [98.0, 99.0], [98.5, 99.0], [99.5, 99.5]])
    tp = np.full(4, 102.0)
    sl = np.full(4, 99.0)
    outcome, bars = first_touch(highs, lows, tp, sl, "long")
    # TP at bar 2; SL at bar 1; both in bar 1 -> stop; neither -> expired at h.
    assert outcome.tolist() == [TP, SL, SL, EXPIRED]
    assert bars.tolist() == [2, 1, 1, 2]
    out_s, _ = first_touch(highs, lows, np.full(4, 98.0), np.full(4, 101.0), "short")
    assert out_s.tolist() == [SL, TP, SL, EXPIRED]
    with pytest.raises(ValueError):
        first_touch(highs, lows, tp, sl, "sideways")


def test_barrier_distances_scale_with_sigma_and_floor_the_stop_at_k_costs():
    p = LabelParams(tp_vol_mult=1.5, sl_vol_mult=1.0, min_stop_cost_multiple=3.0)
    cost = 0.0019
    tp, sl = barrier_distances(np.array([0.01, 0.02, 0.001]), p, cost)
    assert tp[:2] == pytest.approx([0.015, 0.03]) and sl[:2] == pytest.approx([0.01, 0.02])  # above the floor
    assert sl[2] == pytest.approx(3 * cost) and tp[2] / sl[2] == pytest.approx(1.5)  # widened, same geometry
    assert cost / sl[2] <= 1 / 3 + 1e-12  # costs are at most 1/k R
    tp0, sl0 = barrier_distances(0.001, p.model_copy(update={"min_stop_cost_multiple": 0.0}), cost)
    assert sl0 == pytest.approx(0.001)  # k = 0: no floor


def test_signal_label_is_the_side_with_positive_net_r(real_candles):
    """A costly profile turns winning gross trades into HOLD labels; a free one labels by the sign of the move."""
    df = real_candles["BTCUSDT"].iloc[-3000:].reset_index(drop=True)
    free = build_labels(df, (6,), costs=Costs(0.0, 0.0))
    dear = build_labels(df, (6,), costs=Costs(30.0, 10.0))
    ok = free["signal_6"].notna()
    assert ((free["signal_6"] == BUY) == (free["r_long_6"] > 0))[ok].all()
    assert ((dear["signal_6"] == SELL) == (dear["r_short_6"] > 0))[ok].all()
    assert (dear["signal_6"][ok] == HOLD).mean() > (free["signal_6"][ok] == HOLD).mean()
    assert (dear["sl_frac_6"][ok] >= 3 * 2 * 40e-4 - 1e-15).all()  # the stop is at least 3 round trips
