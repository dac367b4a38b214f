"""`windows_after` + `future_extremes` + `first_touch` (what the live resolver uses) equal `build_labels`.

The resolver looks up single logged forecasts in a candle history instead of labelling every row;
this proves the two paths give bit-identical labels on real candles, gaps included.
"""

from __future__ import annotations

import numpy as np

from configs.sections import LabelParams
from features.barriers import barrier_distances
from features.costs import Costs, round_trip_cost
from features.labels import (EXPIRED, SL, TP, build_labels, first_touch, future_extremes, naive_sigma,
                             windows_after)

H = (6, 18, 36, 72)


def _with_gaps(df):
    """Real candles with two holes cut out: a 16-candle halt and a single missing candle."""
    return df.drop(index=list(range(700, 716)) + [1500]).reset_index(drop=True)


def test_windows_after_equals_build_labels(real_candles):
    params = LabelParams()
    seen: set[int] = set()
    for symbol, full in real_candles.items():
        df = _with_gaps(full.iloc[-3000:].reset_index(drop=True))
        t = df["open_time"].to_numpy()
        high, low, close = (df[k].to_numpy() for k in ("high", "low", "close"))
        y = build_labels(df, H, params)
        index = np.arange(len(df))
        for h in H:
            hw, lw, complete = windows_after(t, high, low, index, h)
            fut_high, fut_low = future_extremes(hw, lw, close)
            want_defined = y[f"fut_high_{h}"].notna().to_numpy()
            assert np.array_equal(complete, want_defined), (symbol, h)
            assert (~complete).sum() == 3 * h  # the tail and the h rows before each gap
            assert np.array_equal(fut_high[complete], y[f"fut_high_{h}"].to_numpy()[complete])
            assert np.array_equal(fut_low[complete], y[f"fut_low_{h}"].to_numpy()[complete])

            sigma = naive_sigma(df, h)
            ok = complete & np.isfinite(sigma)
            tp_d, sl_d = barrier_distances(sigma[ok], params, float(round_trip_cost(Costs())))
            c0 = close[ok]
            for side, tp_px, sl_px in (("long", c0 * (1 + tp_d), c0 * (1 - sl_d)),
                                       ("short", c0 * (1 - tp_d), c0 * (1 + sl_d))):
                outcome, _ = first_touch(hw[ok], lw[ok], tp_px, sl_px, side)
                want = y[f"outcome_{side}_{h}"].to_numpy()[ok]
                assert np.array_equal(outcome.astype(np.float64), want), (symbol, h, side)
                seen.update(np.unique(outcome).tolist())
    assert seen == {TP, SL, EXPIRED}


def test_windows_after_rejects_rows_outside_the_history(real_candles):
    df = real_candles["BTCUSDT"].iloc[-100:].reset_index(drop=True)
    t, high, low = (df[k].to_numpy() for k in ("open_time", "high", "low"))
    _, _, complete = windows_after(t, high, low, np.array([-1, 0, 93, 94, 99]), 6)
    assert complete.tolist() == [False, True, True, False, False]
