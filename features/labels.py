"""Labels: what happened *after* candle t (rows t+1 … t+h only).

The same functions serve training (:func:`build_labels` over a history), the live outcome
resolver and the backtester (:func:`first_touch` on the candles after an entry), so a live
outcome and a training label can never disagree.

Barriers (``features.barriers``): TP/SL distances come from a horizon-matched volatility forecast
``sigma_h`` with a floor of ``min_stop_cost_multiple`` round-trip costs. The trade labels are cost
aware: ``r_long_h``/``r_short_h`` are the **net R after costs** (:func:`features.costs.net_return`
over the stop distance) of a trade entered at close[t] and left at its first barrier or at the
close of t+h, and the signal label is the side whose net R is positive (:func:`signal_from_r`),
not "take-profit before stop-loss".
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import talib
from numpy.lib.stride_tricks import sliding_window_view

from configs.sections import LabelParams
from features.barriers import barrier_distances
from features.candles import segment_ids
from features.costs import Costs, holding_hours, net_return, round_trip_cost

# Outcome codes of a barrier trade.
TP, SL, EXPIRED = 1, -1, 0
# Signal classes, in the order the signal classifier's probabilities use.
SIGNAL_CLASSES: tuple[str, ...] = ("SELL", "HOLD", "BUY")
SELL, HOLD, BUY = 0, 1, 2
FALLBACK_ATR_PERIOD = 14  # naive_sigma's ATR


def first_touch(highs: np.ndarray, lows: np.ndarray, take_profit: np.ndarray, stop_loss: np.ndarray,
                side: str) -> tuple[np.ndarray, np.ndarray]:
    """Which barrier each trade touches first.

    ``highs``/``lows`` are ``(n, h)``: the candles after entry, in order. ``take_profit`` and
    ``stop_loss`` are ``(n,)`` prices. Returns ``(outcome, bars)``: outcome is ``TP``, ``SL`` or
    ``EXPIRED``; ``bars`` is the 1-based candle of the exit (``h`` on expiry). A candle touching
    both barriers counts as the stop: inside one candle we cannot know which came first, and
    assuming the worst keeps labels and backtests honest.
    """
    if side == "long":
        hit_tp = highs >= take_profit[:, None]
        hit_sl = lows <= stop_loss[:, None]
    elif side == "short":
        hit_tp = lows <= take_profit[:, None]
        hit_sl = highs >= stop_loss[:, None]
    else:
        raise ValueError(f"side must be 'long' or 'short', not {side!r}")
    h = highs.shape[1]
    first_tp = np.where(hit_tp.any(axis=1), hit_tp.argmax(axis=1), h)
    first_sl = np.where(hit_sl.any(axis=1), hit_sl.argmax(axis=1), h)
    outcome = np.where(first_sl <= first_tp, np.where(first_sl < h, SL, EXPIRED), TP)
    bars = np.minimum(first_tp, first_sl) + 1
    bars = np.where(outcome == EXPIRED, h, bars)
    return outcome.astype(np.int8), bars.astype(np.int16)


def windows_after(open_time: np.ndarray, high: np.ndarray, low: np.ndarray, index: np.ndarray,
                  horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``horizon`` candles after each candle ``index``: ``(highs (n, h), lows (n, h), complete (n,))``.

    For resolving single logged forecasts against a candle history (the live resolver), where
    :func:`build_labels` would label every row. ``complete`` is False when ``t+1 … t+h`` runs past
    the history or crosses a gap, exactly where ``build_labels`` gives NaN (same segment rule);
    the windows of such rows hold arbitrary candles and must be ignored.
    """
    t = np.asarray(open_time, dtype=np.int64)
    idx = np.asarray(index, dtype=np.int64)
    n = len(t)
    seg = segment_ids(t)
    last = idx + horizon
    inside = (idx >= 0) & (last < n)
    complete = np.zeros(len(idx), dtype=bool)
    complete[inside] = seg[last[inside]] == seg[idx[inside]]
    cols = np.clip(idx[:, None] + np.arange(1, horizon + 1), 0, max(n - 1, 0))
    return np.asarray(high, dtype=np.float64)[cols], np.asarray(low, dtype=np.float64)[cols], complete


def future_extremes(highs: np.ndarray, lows: np.ndarray, close0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``fut_high``/``fut_low``: the extremes of the ``(n, h)`` candles after entry, as fractions of ``close0``.

    The one definition of the range labels: :func:`build_labels` and the live resolver both call it.
    """
    return highs.max(axis=1) / close0 - 1.0, lows.min(axis=1) / close0 - 1.0


def signal_from_r(r_long: np.ndarray, r_short: np.ndarray) -> np.ndarray:
    """BUY when only the long's net R is positive, SELL when only the short's is, else HOLD (both
    lose after costs; both winning cannot happen with tp > sl, it would be HOLD)."""
    long_wins = r_long > 0
    short_wins = r_short > 0
    return np.where(long_wins & ~short_wins, BUY, np.where(short_wins & ~long_wins, SELL, HOLD))


def exit_prices(outcome: np.ndarray, tp_price: np.ndarray, sl_price: np.ndarray, last_close: np.ndarray) -> np.ndarray:
    """Where a trade entered at close[t] leaves: its barrier, or the close of t+h on expiry."""
    return np.where(outcome == TP, tp_price, np.where(outcome == SL, sl_price, last_close))


def trade_r(side: str, entry: np.ndarray, exit_price: np.ndarray, sl_frac: np.ndarray, bars: np.ndarray,
            costs: Costs) -> np.ndarray:
    """Net R after costs: :func:`features.costs.net_return` (fees, slippage, borrow of spot shorts for
    the hours a trade of ``bars`` candles is charged) over the stop distance ``sl_frac``."""
    s = 1 if side == "long" else -1
    return net_return(s, entry, exit_price, costs, holding_hours(bars)) / sl_frac


def naive_sigma(candles: pd.DataFrame, horizon: int) -> np.ndarray:
    """``ATR14/close x sqrt(h)``: the barrier volatility when no fitted barrier model is given (short
    histories, tests of the label rules). Training always fits ``features.barriers`` models."""
    return atr_fraction(candles, FALLBACK_ATR_PERIOD) * np.sqrt(horizon)


def atr_fraction(candles: pd.DataFrame, period: int) -> np.ndarray:
    """ATR/close at each candle, computed per contiguous segment (never across a gap)."""
    t = candles["open_time"].to_numpy(np.int64)
    h, l, c = (candles[k].to_numpy(np.float64) for k in ("high", "low", "close"))
    seg = segment_ids(t)
    out = np.full(len(t), np.nan)
    bounds = np.flatnonzero(np.diff(seg)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(t)]])):
        if hi - lo > period:
            out[lo:hi] = talib.ATR(h[lo:hi], l[lo:hi], c[lo:hi], period) / c[lo:hi]
    return out


def build_labels(candles: pd.DataFrame, horizons: tuple[int, ...] | list[int] = (6, 18, 36, 72),
                 params: LabelParams = LabelParams(), sigma: Mapping[int, np.ndarray] | None = None,
                 costs: Costs = Costs()) -> pd.DataFrame:
    """Labels for every candle and horizon; NaN where ``t+1 … t+h`` runs past the data or a gap.

    ``sigma``: per horizon, the barrier volatility ``sigma_h`` of every candle (``features.barriers``;
    computed at t from candles <= t); None uses :func:`naive_sigma`. ``costs``: the fee profile.

    Per horizon ``h``: ``fut_high_h``/``fut_low_h`` (extremes of the next h candles relative to
    close[t]); ``outcome_long_h``/``outcome_short_h`` (TP=1, SL=-1, expired=0 for a trade entered
    at close[t]); ``tp_long_h``/``tp_short_h`` (1.0 when TP came first); ``r_long_h``/``r_short_h``
    (net R after costs); ``bars_long_h``/``bars_short_h`` (candle of the exit, 1-based);
    ``sl_frac_h`` (the stop distance); ``signal_h`` (0=SELL, 1=HOLD, 2=BUY from the net R's sign).
    """
    t = candles["open_time"].to_numpy(np.int64)
    high, low, close = (candles[k].to_numpy(np.float64) for k in ("high", "low", "close"))
    n = len(t)
    seg = segment_ids(t)
    cost = float(round_trip_cost(costs))
    cols: dict[str, np.ndarray] = {}
    for h in horizons:
        m = n - h  # rows with h candles after them
        fut_high = np.full(n, np.nan)
        fut_low = np.full(n, np.nan)
        sl_col = np.full(n, np.nan)
        out = {f"{k}_{s}": np.full(n, np.nan) for k in ("outcome", "r", "bars") for s in ("long", "short")}
        if m > 0:
            hw = sliding_window_view(high[1:], h)[:m]  # row t: high[t+1 .. t+h]
            lw = sliding_window_view(low[1:], h)[:m]
            same = seg[h:] == seg[:m]  # the whole window lies in t's contiguous segment
            c0 = close[:m]
            ext_high, ext_low = future_extremes(hw, lw, c0)
            fut_high[:m] = np.where(same, ext_high, np.nan)
            fut_low[:m] = np.where(same, ext_low, np.nan)
            sig = naive_sigma(candles, h) if sigma is None else np.asarray(sigma[h], dtype=np.float64)
            tp_d, sl_d = barrier_distances(sig[:m], params, cost)
            ok = same & np.isfinite(tp_d) & (sl_d > 0)
            idx = np.flatnonzero(ok)
            sl_col[idx] = sl_d[idx]
            for side, tp_px, sl_px in (("long", c0 * (1 + tp_d), c0 * (1 - sl_d)),
                                       ("short", c0 * (1 - tp_d), c0 * (1 + sl_d))):
                res, bars = first_touch(hw[idx], lw[idx], tp_px[idx], sl_px[idx], side)
                exit_px = exit_prices(res, tp_px[idx], sl_px[idx], close[idx + h])
                out[f"outcome_{side}"][idx] = res
                out[f"bars_{side}"][idx] = bars
                out[f"r_{side}"][idx] = trade_r(side, c0[idx], exit_px, sl_d[idx], bars, costs)
        cols[f"fut_high_{h}"] = fut_high
        cols[f"fut_low_{h}"] = fut_low
        for side in ("long", "short"):
            o = out[f"outcome_{side}"]
            cols[f"outcome_{side}_{h}"] = o
            cols[f"tp_{side}_{h}"] = np.where(np.isnan(o), np.nan, o == TP)
            cols[f"r_{side}_{h}"] = out[f"r_{side}"]
            cols[f"bars_{side}_{h}"] = out[f"bars_{side}"]
        cols[f"sl_frac_{h}"] = sl_col
        defined = ~np.isnan(out["outcome_long"])
        signal = signal_from_r(out["r_long"], out["r_short"]).astype(np.float64)
        cols[f"signal_{h}"] = np.where(defined, signal, np.nan)
    return pd.DataFrame(cols, index=candles.index)
