"""Trade simulation: a table of signals plus candles in, one row per trade out (numpy, no per-candle loop).

The simulator knows nothing about models: it takes a signal table (see :data:`SIGNAL_COLUMNS`),
so crafted signals in tests, ensemble forecasts and random entries all go through the same code.

Rules (docs/backtests.md says why):

* A signal at candle ``t`` (features from candles <= t, known once t has closed) is entered at the
  **open of candle t+1**. No t+1 in the same contiguous segment (a gap or the end of the data)
  -> not traded.
* Take-profit and stop-loss come from the signal as **fractions** of the signal candle's close
  and are re-anchored to the actual entry price by the same fractions: a signal that says
  "+0.6% / -0.4%" means the same geometry whatever the next open is.
* The barrier walk is :func:`features.labels.first_touch` over candles t+1 ... t+h (the entry
  candle counts: we are in from its open). A candle touching both barriers counts as the stop.
  A stop whose candle *opens* beyond it fills at that open (a stop cannot fill at a price the
  market skipped); a take-profit fills at its price.
* No barrier by candle t+h -> exit at the close of t+h (expiry).
* **Gaps**: a trade is never held across missing candles. If the path t+1 ... t+h runs into a gap
  (or the end of the data), it is closed at the close of the last candle before it (outcome
  ``gap``). Not opening such trades would need to know of the gap in advance — a look-ahead.
* One open position per symbol: a signal is taken only when the previous trade of that symbol
  has exited at or before the signal candle (the trade exits inside candle e, so a signal at e
  may enter at e+1). Among signals at the same candle, the most confident is taken.
* Costs on both sides (:func:`features.costs.net_return`, the definition labels and live outcomes
  share): the entry fills at ``open x (1 + side x slippage)``, the exit at
  ``exit x (1 - side x slippage)``, and a fee of ``fee_bps`` of the filled notional is paid on
  each fill. A short on a spot profile pays borrow interest for the hours charged from the entry
  candle's open to the exit candle's close (:func:`features.costs.borrow_hours`).
* R: net profit per unit divided by the planned risk ``entry x sl_frac``. A stop hit without
  costs is exactly -1R; costs make every trade a little worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from features.candles import FIVE_MINUTES_MS, segment_ids
from features.costs import Costs, borrow_hours, net_return  # Costs: re-exported (its old home)
from features.labels import EXPIRED, SL, TP, first_touch

# The simulator's input: one row per signal.
SIGNAL_COLUMNS: tuple[str, ...] = ("open_time", "symbol", "side", "confidence", "tp_frac", "sl_frac", "horizon")
# Exit reasons in the trade table.
OUTCOMES: tuple[str, ...] = ("tp", "sl", "expiry", "gap", "end")
_CHUNK = 65_536  # rows per first_touch call: bounds the (rows x horizon) window copies


def validate_signals(signals: pd.DataFrame) -> pd.DataFrame:
    """Check the signal table; raise ``ValueError`` naming the first problem."""
    missing = [c for c in SIGNAL_COLUMNS if c not in signals.columns]
    if missing:
        raise ValueError(f"signal table lacks columns: {', '.join(missing)}")
    side = signals["side"].to_numpy()
    if len(side) and not np.isin(side, (1, -1)).all():
        raise ValueError("side must be +1 (long) or -1 (short)")
    for c in ("confidence", "tp_frac", "sl_frac"):
        if not np.isfinite(signals[c].to_numpy(np.float64)).all():
            raise ValueError(f"{c} must be finite (a signal without barriers is not a trade)")
    for c in ("tp_frac", "sl_frac"):
        v = signals[c].to_numpy(np.float64)
        if len(v) and ((v <= 0) | (v >= 1)).any():
            raise ValueError(f"{c} must be in (0, 1): a fraction of the entry price")
    if len(signals) and (signals["horizon"].to_numpy() < 1).any():
        raise ValueError("horizon must be at least 1 candle")
    return signals


@dataclass(frozen=True)
class _Market:
    """One symbol's candles as arrays."""

    t: np.ndarray
    o: np.ndarray
    h: np.ndarray
    l: np.ndarray
    c: np.ndarray
    seg: np.ndarray

    @classmethod
    def of(cls, candles: pd.DataFrame) -> "_Market":
        t = candles["open_time"].to_numpy(np.int64)
        return cls(t, *(candles[k].to_numpy(np.float64) for k in ("open", "high", "low", "close")), segment_ids(t))


def _walk(m: _Market, sig_idx: np.ndarray, side: np.ndarray, tp_frac: np.ndarray, sl_frac: np.ndarray,
          horizon: int) -> dict[str, np.ndarray]:
    """Barrier outcome of every candidate (all with the same horizon), as if each were taken."""
    n = len(m.t)
    k = len(sig_idx)
    entry_idx = sig_idx + 1
    pad = horizon
    # Padding beyond the data never touches a barrier and belongs to no segment.
    hw = sliding_window_view(np.concatenate([m.h, np.full(pad, -np.inf)]), horizon)
    lw = sliding_window_view(np.concatenate([m.l, np.full(pad, np.inf)]), horizon)
    sw = sliding_window_view(np.concatenate([m.seg, np.full(pad, -1)]), horizon)
    outcome = np.zeros(k, np.int8)
    bars = np.zeros(k, np.int64)
    valid_len = np.zeros(k, np.int64)
    entry = m.o[np.minimum(entry_idx, n - 1)]
    tp_px = entry * (1 + side * tp_frac)
    sl_px = entry * (1 - side * sl_frac)
    for lo in range(0, k, _CHUNK):
        sl_ = slice(lo, lo + _CHUNK)
        e = entry_idx[sl_]
        inside = sw[e] == m.seg[e][:, None]  # candles of the entry's segment (a prefix of the window)
        highs = np.where(inside, hw[e], -np.inf)
        lows = np.where(inside, lw[e], np.inf)
        valid_len[sl_] = inside.sum(axis=1)
        for s, name in ((1, "long"), (-1, "short")):
            rows = np.flatnonzero(side[sl_] == s)
            if len(rows):
                res, b = first_touch(highs[rows], lows[rows], tp_px[sl_][rows], sl_px[sl_][rows], name)
                outcome[lo + rows] = res
                bars[lo + rows] = b
    gap = (outcome == EXPIRED) & (valid_len < horizon)
    bars = np.where(outcome == EXPIRED, valid_len, bars)
    exit_idx = entry_idx + bars - 1
    exit_open = m.o[exit_idx]
    stop_fill = np.where(side == 1, np.minimum(sl_px, exit_open), np.maximum(sl_px, exit_open))
    exit_px = np.where(outcome == TP, tp_px, np.where(outcome == SL, stop_fill, m.c[exit_idx]))
    at_end = exit_idx == n - 1  # truncated by the end of the data rather than by missing candles
    reason = np.where(outcome == TP, 0, np.where(outcome == SL, 1, np.where(gap, np.where(at_end, 4, 3), 2)))
    return {"entry_idx": entry_idx, "exit_idx": exit_idx, "entry_price": entry, "tp_price": tp_px,
            "sl_price": sl_px, "exit_price": exit_px, "reason": reason, "bars": bars}


def _one_position(sig_idx: np.ndarray, exit_idx: np.ndarray) -> np.ndarray:
    """Greedy chain: take a candidate, skip every later one signalled before its exit candle.

    Candidates are sorted by signal candle. Iterates over *taken* trades only (searchsorted jumps
    over the blocked ones), so it costs O(trades x log n), not a loop over candles.
    """
    taken = []
    i, k = 0, len(sig_idx)
    while i < k:
        taken.append(i)
        i = max(int(np.searchsorted(sig_idx, exit_idx[i], side="left")), i + 1)
    return np.asarray(taken, dtype=np.int64)


def simulate(candles: Mapping[str, pd.DataFrame], signals: pd.DataFrame, costs: Costs = Costs(),
             one_position: bool = True) -> pd.DataFrame:
    """Trades (one row each, by entry time) from a signal table over validated candles per symbol.

    Extra signal columns (probabilities, features) are carried into the trade table. Signals for a
    candle that is not in ``candles`` raise ``ValueError``; signals on the last candle of a segment
    (no next open) are dropped. ``one_position=False`` resolves every signal as if it alone were
    traded (overlapping trades: for calibration of every signal, never for P&L).
    """
    validate_signals(signals)
    out: list[pd.DataFrame] = []
    extra = [c for c in signals.columns if c not in SIGNAL_COLUMNS]
    for symbol, sig in signals.groupby("symbol", sort=True):
        if symbol not in candles:
            raise ValueError(f"signals for {symbol} but no candles for it")
        m = _Market.of(candles[symbol])
        ot = sig["open_time"].to_numpy(np.int64)
        idx = np.searchsorted(m.t, ot)
        bad = (idx >= len(m.t)) | (m.t[np.minimum(idx, len(m.t) - 1)] != ot)
        if bad.any():
            raise ValueError(f"{symbol}: signal at open_time {int(ot[np.argmax(bad)])} is not a candle of the data")
        # Enterable: a next candle exists in the same contiguous segment.
        nxt = np.minimum(idx + 1, len(m.t) - 1)
        ok = (idx + 1 < len(m.t)) & (m.seg[nxt] == m.seg[idx])
        sig = sig.assign(_idx=idx)[ok]
        if sig.empty:
            continue
        # Most confident first among signals at the same candle, then chronological.
        sig = sig.sort_values(["_idx", "confidence"], ascending=[True, False], kind="stable")
        side = sig["side"].to_numpy(np.int64)
        tp_frac = sig["tp_frac"].to_numpy(np.float64)
        sl_frac = sig["sl_frac"].to_numpy(np.float64)
        hz = sig["horizon"].to_numpy(np.int64)
        sidx = sig["_idx"].to_numpy(np.int64)
        cols: dict[str, np.ndarray] = {}
        for h in np.unique(hz):
            rows = np.flatnonzero(hz == h)
            res = _walk(m, sidx[rows], side[rows], tp_frac[rows], sl_frac[rows], int(h))
            for key, v in res.items():
                cols.setdefault(key, np.zeros(len(sig), v.dtype))[rows] = v
        take = _one_position(sidx, cols["exit_idx"]) if one_position else np.arange(len(sidx))
        cand = sig.iloc[take]
        c = {k: v[take] for k, v in cols.items()}
        s = side[take]
        entry_fill = c["entry_price"] * (1 + s * costs.slippage)
        exit_fill = c["exit_price"] * (1 - s * costs.slippage)
        hours = borrow_hours(m.t[c["entry_idx"]], m.t[c["exit_idx"]] + FIVE_MINUTES_MS - 1)
        pnl = net_return(s, c["entry_price"], c["exit_price"], costs, hours) * c["entry_price"]
        risk = c["entry_price"] * sl_frac[take]
        gross = s * (c["exit_price"] - c["entry_price"])
        trades = pd.DataFrame({
            "symbol": symbol,
            "signal_time": m.t[sidx[take]],
            "entry_time": m.t[c["entry_idx"]],
            "exit_time": m.t[c["exit_idx"]],
            "side": s.astype(np.int8),
            "horizon": hz[take],
            "confidence": cand["confidence"].to_numpy(np.float64),
            "tp_frac": tp_frac[take],
            "sl_frac": sl_frac[take],
            "entry_price": c["entry_price"],
            "tp_price": c["tp_price"],
            "sl_price": c["sl_price"],
            "exit_price": c["exit_price"],
            "entry_fill": entry_fill,
            "exit_fill": exit_fill,
            "outcome": np.asarray(OUTCOMES, dtype=object)[c["reason"]],
            "bars": c["bars"],
            "gross_r": gross / risk,
            "r": pnl / risk,
            "ret": pnl / entry_fill,
        })
        for col in extra:
            if col != "symbol":
                trades[col] = cand[col].to_numpy()
        out.append(trades)
    if not out:
        return empty_trades(extra)
    return pd.concat(out, ignore_index=True).sort_values(["entry_time", "symbol"], kind="stable").reset_index(drop=True)


def empty_trades(extra: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """A trade table with no rows but every column (so summaries of "no trades" still work)."""
    cols = ["symbol", "signal_time", "entry_time", "exit_time", "side", "horizon", "confidence", "tp_frac",
            "sl_frac", "entry_price", "tp_price", "sl_price", "exit_price", "entry_fill", "exit_fill", "outcome",
            "bars", "gross_r", "r", "ret", *[c for c in extra if c != "symbol"]]
    return pd.DataFrame({c: pd.Series(dtype=object if c in ("symbol", "outcome") else np.float64) for c in cols})
