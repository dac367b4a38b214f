"""Outcome resolution, pure: logged forecasts against the candles that followed them.

No I/O, no Ray. The window after a forecast, its range labels and the barrier walk come from
:mod:`features.labels` (``windows_after``, ``future_extremes``, ``first_touch``) — the code that
makes the training labels — so a live outcome can never disagree with a training label:

- predictions: ``actual_high``/``actual_low`` are exactly ``build_labels``' ``fut_high_h``/``fut_low_h``
  for the forecast candle; ``mae`` is the mean of the high and low absolute errors (the mean of
  training's ``mae_high`` and ``mae_low``);
- signals: the trade enters at the forecast candle's close; candles t+1 … t+h are walked with the
  signal's own take-profit and stop-loss (a candle touching both is a stop); the exit is the
  barrier price, or the close of candle t+h on expiry; pnl and R charge the fee profile's costs
  exactly as the labels do (:func:`trade_result`).

Statuses: ``ok``; ``gap`` (the window crosses missing candles — ``build_labels`` gives NaN there too,
so nothing is guessed); ``no_data`` (the forecast candle is older than the history the resolver
holds); ``not_traded`` (HOLD, or no barriers); ``invalid`` (barriers on the wrong side of the entry);
``pending`` (window incomplete but a late candle may still fill it: not written, tried again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from features.candles import FIVE_MINUTES_MS
from features.costs import Costs, holding_hours, net_return
from features.labels import EXPIRED, SL, TP, first_touch, future_extremes, windows_after

OUTCOME_NAMES = {TP: "tp", SL: "sl", EXPIRED: "expired"}


@dataclass
class CandleHistory:
    """One symbol's most recent closed candles, at most ``capacity`` (bounded memory).

    Capacity must cover the longest horizon plus however long rows may wait to be resolved
    (an outage of PostgreSQL delays resolution; rows older than the history become ``no_data``).
    """

    capacity: int = 14 * 288
    open_time: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    high: np.ndarray = field(default_factory=lambda: np.zeros(0))
    low: np.ndarray = field(default_factory=lambda: np.zeros(0))
    close: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.open_time)

    @property
    def last_open_time(self) -> int | None:
        return int(self.open_time[-1]) if len(self.open_time) else None

    def extend(self, open_time, high, low, close) -> int:
        """Add closed candles; returns how many were new.

        Candles already held are ignored (a feed replaying history after a restart is harmless)
        and late ones are merged into place: deliveries to an async actor may arrive out of order.
        Beyond ``capacity`` the oldest candles are forgotten.
        """
        t = np.atleast_1d(np.asarray(open_time, dtype=np.int64))
        cols = [np.atleast_1d(np.asarray(x, np.float64)) for x in (high, low, close)]
        if len(t) > 1 and np.any(np.diff(t) <= 0):
            order = np.argsort(t, kind="stable")
            t, cols = t[order], [c[order] for c in cols]
            keep = np.concatenate([[True], np.diff(t) > 0])
            t, cols = t[keep], [c[keep] for c in cols]
        last = self.last_open_time
        if last is None or t[0] > last:  # the usual case: newer candles, appended
            fresh = np.ones(len(t), dtype=bool)
        else:
            fresh = ~np.isin(t, self.open_time)
        if not fresh.any():
            return 0
        merged = [np.concatenate([old, new[fresh]]) for old, new in
                  zip((self.open_time, self.high, self.low, self.close), (t, *cols))]
        if last is not None and t[fresh][0] < last:
            order = np.argsort(merged[0], kind="stable")
            merged = [m[order] for m in merged]
        self.open_time, self.high, self.low, self.close = (m[-self.capacity:] for m in merged)
        return int(fresh.sum())

    def locate(self, candle_open_time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of each candle in the history, and whether it is there."""
        t = np.asarray(candle_open_time, dtype=np.int64)
        idx = np.searchsorted(self.open_time, t)
        found = idx < len(self.open_time)
        found[found] = self.open_time[idx[found]] == t[found]
        return idx, found


def _windows(history: CandleHistory, idx: np.ndarray, found: np.ndarray, horizon: np.ndarray):
    """Per row: the (h,) highs/lows after it (ragged, so grouped by horizon) and completeness."""
    groups = []
    for h in np.unique(horizon):
        sel = np.flatnonzero((horizon == h) & found)
        if len(sel):
            hw, lw, complete = windows_after(history.open_time, history.high, history.low, idx[sel], int(h))
            groups.append((int(h), sel, hw, lw, complete))
    return groups


def _status(history: CandleHistory, candle_open_time: np.ndarray, horizon: np.ndarray, found: np.ndarray,
            gap_grace_candles: int) -> np.ndarray:
    """Status of rows whose window is not complete (complete ones become ``ok`` afterwards).

    ``pending`` while the window's end is less than ``gap_grace_candles`` behind the newest candle:
    a missing candle may still arrive late. After that it is a ``gap``.
    """
    first = history.open_time[0] if len(history) else np.iinfo(np.int64).max
    last = history.last_open_time if len(history) else np.iinfo(np.int64).min
    cot = np.asarray(candle_open_time, np.int64)
    settled = cot + (np.asarray(horizon, np.int64) + gap_grace_candles) * FIVE_MINUTES_MS <= last
    status = np.where(settled, "gap", "pending").astype(object)
    status[~found & (cot < first)] = "no_data"
    return status


def resolve_predictions(history: CandleHistory, candle_open_time: np.ndarray, horizon: np.ndarray,
                        predicted_high: np.ndarray, predicted_low: np.ndarray,
                        high_lower: np.ndarray, high_upper: np.ndarray,
                        low_lower: np.ndarray, low_upper: np.ndarray,
                        gap_grace_candles: int = 0) -> dict[str, np.ndarray]:
    """Actual range, MAE and interval hits of due predictions (fractions of the forecast close).

    Bounds may be NaN (not given): the matching ``*_inside`` is then None, not a guess.
    """
    cot = np.asarray(candle_open_time, np.int64)
    horizon = np.asarray(horizon, np.int64)
    n = len(cot)
    idx, found = history.locate(cot)
    out = {"actual_high": np.full(n, np.nan), "actual_low": np.full(n, np.nan), "status": _status(history, cot, horizon, found, gap_grace_candles)}
    for h, sel, hw, lw, complete in _windows(history, idx, found, horizon):
        fut_high, fut_low = future_extremes(hw, lw, history.close[idx[sel]])
        rows = sel[complete]
        out["actual_high"][rows] = fut_high[complete]
        out["actual_low"][rows] = fut_low[complete]
        out["status"][rows] = "ok"
    ah, al = out["actual_high"], out["actual_low"]
    out["mae"] = (np.abs(np.asarray(predicted_high, np.float64) - ah) +
                  np.abs(np.asarray(predicted_low, np.float64) - al)) / 2.0
    out["high_inside"] = _inside(ah, high_lower, high_upper)
    out["low_inside"] = _inside(al, low_lower, low_upper)
    both = [None if a is None or b is None else bool(a and b) for a, b in zip(out["high_inside"], out["low_inside"])]
    out["inside_interval"] = np.array(both, dtype=object)
    return out


def _inside(actual: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    lower = np.asarray(lower, np.float64)
    upper = np.asarray(upper, np.float64)
    known = np.isfinite(actual) & np.isfinite(lower) & np.isfinite(upper)
    hit = (actual >= lower) & (actual <= upper)
    return np.array([bool(h) if k else None for h, k in zip(hit, known)], dtype=object)


def trade_result(long: np.ndarray, entry: np.ndarray, exit_price: np.ndarray, stop_loss: np.ndarray,
                 costs: Costs, bars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pnl_percent, r_multiple)`` of trades after the fee profile's costs (fees and slippage on both
    fills, borrow of spot shorts for the hours a trade of ``bars`` candles is charged).

    The same cost function as the training labels (``features.labels.trade_r`` →
    :func:`features.costs.net_return`): a resolved live signal's R equals its label's ``r_long_h`` /
    ``r_short_h``. R is the net result in units of the initial risk ``|entry - stop| / entry``, so a
    stop-out costs a little more than -1 R (the costs) and cumulative R compares barrier widths.
    """
    entry = np.asarray(entry, np.float64)
    exit_price = np.asarray(exit_price, np.float64)
    side = np.where(long, 1, -1)
    hours = holding_hours(np.nan_to_num(np.asarray(bars, np.float64), nan=0.0).astype(np.int64))
    net = net_return(side, entry, exit_price, costs, hours)
    risk = np.abs(entry - np.asarray(stop_loss, np.float64)) / entry
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(risk > 0, net / risk, np.nan)
    return 100.0 * net, r


def resolve_signals(history: CandleHistory, candle_open_time: np.ndarray, horizon: np.ndarray,
                    signal_type: np.ndarray, entry_price: np.ndarray, take_profit: np.ndarray,
                    stop_loss: np.ndarray, costs: Costs, gap_grace_candles: int = 0) -> dict[str, np.ndarray]:
    """Outcome (``tp``/``sl``/``expired``), exit price and bar, pnl % after the fee profile's costs and R
    of due signals."""
    cot = np.asarray(candle_open_time, np.int64)
    horizon = np.asarray(horizon, np.int64)
    sig = np.asarray(signal_type, dtype=object)
    entry, tp, sl = (np.asarray(x, np.float64) for x in (entry_price, take_profit, stop_loss))
    n = len(cot)
    long = sig == "BUY"
    traded = (long | (sig == "SELL")) & np.isfinite(entry) & np.isfinite(tp) & np.isfinite(sl)
    sane = np.where(long, (sl < entry) & (entry < tp), (tp < entry) & (entry < sl))
    idx, found = history.locate(cot)
    out = {"outcome": np.full(n, None, dtype=object), "exit_price": np.full(n, np.nan),
           "exit_bar": np.full(n, None, dtype=object),
           "status": _status(history, cot, horizon, found, gap_grace_candles)}
    for h, sel, hw, lw, complete in _windows(history, idx, found, horizon):
        go = complete & traded[sel] & sane[sel]
        for side, mask in (("long", long[sel]), ("short", ~long[sel])):
            pick = go & mask
            if not pick.any():
                continue
            rows = sel[pick]
            outcome, bars = first_touch(hw[pick], lw[pick], tp[rows], sl[rows], side)
            last_close = history.close[idx[rows] + h]
            out["exit_price"][rows] = np.where(outcome == TP, tp[rows], np.where(outcome == SL, sl[rows], last_close))
            out["outcome"][rows] = [OUTCOME_NAMES[int(o)] for o in outcome]
            out["exit_bar"][rows] = [int(b) for b in bars]
            out["status"][rows] = "ok"
    out["status"][~traded] = "not_traded"
    out["status"][traded & ~sane] = "invalid"
    bars = np.array([np.nan if b is None else b for b in out["exit_bar"]], dtype=np.float64)
    pnl, r = trade_result(long, entry, out["exit_price"], sl, costs, bars)
    ok = out["status"] == "ok"
    out["pnl_percent"] = np.where(ok, pnl, np.nan)
    out["r_multiple"] = np.where(ok, r, np.nan)
    return out
