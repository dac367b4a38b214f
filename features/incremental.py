"""Incremental features: one new candle at a time (the serving path)."""

from __future__ import annotations

import numpy as np

from configs.sections import FeatureParams
from features.candles import FIVE_MINUTES_MS
from configs.errors import CandleDataError, FeatureError
from features.indicators import WARMUP, compute_features, feature_names

_FIELDS = ("open", "high", "low", "close", "volume")


class _Window:
    """The last ``WARMUP`` contiguous candles of one symbol, oldest first.

    Stored column-wise in buffers twice the window long: appending is a write, and once a
    buffer is full the newest ``WARMUP - 1`` rows move to the front (amortised O(1)). The window
    is always a contiguous slice, which TA-Lib needs to avoid copying.
    """

    def __init__(self) -> None:
        self.open_time = np.zeros(2 * WARMUP, np.int64)
        self.cols = np.zeros((5, 2 * WARMUP))
        self.bridged = np.zeros(2 * WARMUP, dtype=bool)
        self.end = 0   # one past the newest row
        self.size = 0  # rows in the current contiguous run, at most WARMUP

    @property
    def last_time(self) -> int | None:
        return int(self.open_time[self.end - 1]) if self.size else None

    def reset(self) -> None:
        self.end = self.size = 0

    def push(self, t: int, row: np.ndarray, bridged: bool = False) -> None:
        if self.end == len(self.open_time):
            keep = WARMUP - 1
            self.open_time[:keep] = self.open_time[self.end - keep:self.end]
            self.cols[:, :keep] = self.cols[:, self.end - keep:self.end]
            self.bridged[:keep] = self.bridged[self.end - keep:self.end]
            self.end = keep
        self.open_time[self.end] = t
        self.cols[:, self.end] = row
        self.bridged[self.end] = bridged
        self.end += 1
        self.size = min(self.size + 1, WARMUP)

    def advance(self, t: int, row: np.ndarray, max_bridge: int) -> None:
        """Append the candle after the newest one: bridge a short gap first, reset on a long one
        (exactly what :func:`features.candles.bridge_gaps` and the batch segments do)."""
        last = self.last_time
        if last is not None and t != last + FIVE_MINUTES_MS:
            missing = (t - last) // FIVE_MINUTES_MS - 1
            if 0 < missing <= max_bridge:
                close = self.newest()[3]
                flat = np.array([close, close, close, close, 0.0])
                for k in range(1, missing + 1):
                    self.push(last + k * FIVE_MINUTES_MS, flat, bridged=True)
            else:
                self.reset()
        self.push(t, row)

    def newest(self) -> np.ndarray:
        return self.cols[:, self.end - 1]

    def view(self) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """(open_time, open, high, low, close, volume) of the window, and its bridged marks."""
        s = slice(self.end - WARMUP, self.end)
        return (self.open_time[s], *(self.cols[i, s] for i in range(5))), self.bridged[s]


class FeatureBuilder:
    """Keeps the last ``WARMUP`` candles per symbol and returns the newest candle's feature row.

    It calls the same :func:`compute_features` as the batch path on exactly the window that
    defines a row, so its output equals :func:`build_features` (to ~1e-12, proven by tests).
    A short gap (at most ``params.max_bridge_candles`` missing slots) is bridged with no-trade
    candles, as the batch path bridges it; a longer gap resets the symbol's window, like a new
    segment in batch, and the row is undefined (``None``) until ``WARMUP`` contiguous candles have
    arrived again.
    """

    def __init__(self, params: FeatureParams = FeatureParams()) -> None:
        self.params = params
        self.names = feature_names(params)
        self._windows: dict[str, _Window] = {}
        self._last_row: dict[str, np.ndarray | None] = {}

    def history(self, symbol: str) -> int:
        """How many contiguous candles are held for ``symbol`` (``WARMUP`` when ready)."""
        w = self._windows.get(symbol)
        return w.size if w else 0

    def last_open_time(self, symbol: str) -> int | None:
        w = self._windows.get(symbol)
        return w.last_time if w else None

    def ready(self, symbol: str) -> bool:
        return self.history(symbol) == WARMUP

    def update(self, symbol: str, open_time: int, open: float, high: float, low: float, close: float,
               volume: float) -> np.ndarray | None:
        """Add one closed candle; return its feature row, or ``None`` while warming up.

        Re-sending the newest candle is idempotent if it is identical; an older candle, or a
        different candle for the newest slot, is refused (closed candles never change).
        """
        row = np.array([open, high, low, close, volume], dtype=np.float64)
        _check_candle(symbol, open_time, row)
        w = self._windows.setdefault(symbol, _Window())
        last = w.last_time
        if last is not None:
            if open_time == last:
                if np.array_equal(w.newest(), row):
                    return self._last_row.get(symbol)
                raise CandleDataError(f"{symbol}: candle {open_time} differs from the one already received")
            if open_time < last:
                raise CandleDataError(f"{symbol}: candle {open_time} is older than the newest one ({last})")
        w.advance(int(open_time), row, self.params.max_bridge_candles)
        out = self._compute(w) if w.size == WARMUP else None
        self._last_row[symbol] = out
        return out

    def extend(self, symbol: str, candles) -> np.ndarray | None:  # candles: pandas.DataFrame
        """Feed many candles (a backfill); returns the newest row. Only the last window is computed."""
        t = candles["open_time"].to_numpy(np.int64)
        values = candles[list(_FIELDS)].to_numpy(np.float64)
        out = None
        for i in range(len(t)):
            w = self._windows.setdefault(symbol, _Window())
            if w.last_time is not None and t[i] <= w.last_time:
                continue
            _check_candle(symbol, int(t[i]), values[i])
            w.advance(int(t[i]), values[i], self.params.max_bridge_candles)
        w = self._windows.get(symbol)
        if w is not None and w.size == WARMUP:
            out = self._compute(w)
        self._last_row[symbol] = out
        return out

    def latest(self, symbol: str) -> np.ndarray | None:
        """The newest candle's feature row (``None`` while warming up)."""
        return self._last_row.get(symbol)

    def require(self, symbol: str) -> np.ndarray:
        """Like :meth:`latest` but raises :class:`FeatureError` with the reason when undefined."""
        row = self._last_row.get(symbol)
        if row is None:
            raise FeatureError(f"{symbol}: features need {WARMUP} contiguous candles, have {self.history(symbol)}")
        return row

    def _compute(self, w: _Window) -> np.ndarray:
        candles, bridged = w.view()
        return compute_features(*candles, params=self.params, tail=1, bridged=bridged)[0]


def _check_candle(symbol: str, open_time: int, row: np.ndarray) -> None:
    o, h, l, c, v = row
    problem = None
    if not np.isfinite(row).all():
        problem = "NaN/inf value"
    elif min(o, h, l, c) <= 0:
        problem = "non-positive price"
    elif v < 0:
        problem = "negative volume"
    elif h < max(o, c) or l > min(o, c):
        problem = "high/low inconsistent with open/close"
    elif open_time % FIVE_MINUTES_MS:
        problem = "open_time not aligned to 5 minutes"
    if problem:
        raise CandleDataError(f"{symbol} candle {open_time}: {problem}")
