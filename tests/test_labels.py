"""Labels checked by hand on real candles, plus the rules: t+1..t+h only, gaps, both-touch = stop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import talib

from configs.settings import LabelParams
from features.labels import BUY, EXPIRED, HOLD, SELL, SL, TP, barrier_distances, build_labels, first_touch

H = (6, 18, 36, 72)


def _by_hand(df: pd.DataFrame, t: int, h: int, params: LabelParams) -> dict[str, float]:
    """Scalar loops, written independently of the vectorised code."""
    c0 = df["close"].iloc[t]
    highs = df["high"].iloc[t + 1: t + h + 1].tolist()
    lows = df["low"].iloc[t + 1: t + h + 1].tolist()
    atr = talib.ATR(df["high"].to_numpy()[: t + 1], df["low"].to_numpy()[: t + 1],
                    df["close"].to_numpy()[: t + 1], params.atr_period)[-1] / c0
    tp = params.tp_atr_mult * atr * h ** 0.5
    sl = params.sl_atr_mult * atr * h ** 0.5

    def walk(tp_px: float, sl_px: float, long: bool) -> int:
        for hi, lo in zip(highs, lows):
            hit_tp = hi >= tp_px if long else lo <= tp_px
            hit_sl = lo <= sl_px if long else hi >= sl_px
            if hit_sl:
                return SL  # includes a candle touching both
            if hit_tp:
                return TP
        return EXPIRED

    out_long = walk(c0 * (1 + tp), c0 * (1 - sl), True)
    out_short = walk(c0 * (1 - tp), c0 * (1 + sl), False)
    signal = BUY if out_long == TP and out_short != TP else SELL if out_short == TP and out_long != TP else HOLD
    return {"fut_high": max(highs) / c0 - 1, "fut_low": min(lows) / c0 - 1, "long": out_long,
            "short": out_short, "signal": signal}


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


def test_barrier_distances_scale_with_sqrt_horizon():
    tp6, sl6 = barrier_distances(0.002, 6)
    tp24, sl24 = barrier_distances(0.002, 24)
    assert tp24 == pytest.approx(2 * tp6) and sl24 == pytest.approx(2 * sl6)
    assert tp6 / sl6 == pytest.approx(LabelParams().tp_atr_mult / LabelParams().sl_atr_mult)
