"""The feature definitions: pure numpy/TA-Lib over one contiguous run of candles.

This module is the single definition of every feature. The batch path (:func:`features.build_features`,
used by training) and the incremental path (:class:`features.FeatureBuilder`, used by serving) both
call :func:`compute_features`; they differ only in how many candles they pass in.

Rules that keep it honest:
- causal only: every value at row ``t`` is computed from rows ``<= t`` (TA-Lib indicators and
  trailing windows are causal; higher time frames use *completed* 1h/4h candles only);
- scale-free: returns, ratios, z-scores — never raw prices — so one model serves every symbol;
- the input is one contiguous run (no gaps): the caller splits at gaps, nothing is forward-filled;
- recursive indicators (EMA, Wilder smoothing) forget their seed within ``WARMUP`` candles, so a
  window of ``WARMUP`` candles gives the same last row as the whole history (to ~1e-12).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import talib

from configs.sections import MAX_FEATURE_WINDOW, FeatureParams

# Candles a row needs behind it (itself included) before it is defined. Chosen so the slowest
# recursive indicator allowed by FeatureParams (period 60) has decayed its seed below 1e-14.
WARMUP = 1000
# Bump when a definition changes without a name change: it changes the feature-set hash.
FEATURE_CODE_VERSION = 2  # 2: short gaps are bridged (features.candles.bridge_gaps), bridged_288
HOUR_MS = 3_600_000
H4_MS = 4 * HOUR_MS
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
# The epoch (1970-01-01) was a Thursday; shift so 0 is Monday.
_MONDAY_OFFSET_MS = 3 * DAY_MS
H1_WINDOW = 24  # completed hours
H4_WINDOW = 6   # completed 4-hour candles
BRIDGED_WINDOW = 288  # bridged_288: no-trade candles bridging a gap among the last day's candles

assert MAX_FEATURE_WINDOW + 2 * H4_MS // 300_000 <= WARMUP


@lru_cache(maxsize=16)
def feature_names(params: FeatureParams = FeatureParams()) -> tuple[str, ...]:
    """Column names, in order, for ``params`` (the order models are trained with)."""
    p = params
    names: list[str] = ["atr_14", "range_pct"]
    names += [f"rv_{w}" for w in p.rv_windows]
    names += [f"parkinson_{w}" for w in p.rv_windows]
    names += [f"garman_klass_{w}" for w in p.rv_windows]
    names += ["vol_ratio"]
    names += [f"rsi_{q}" for q in p.rsi_periods]
    names += ["macd", "macd_signal", "macd_hist", "stoch_k", "stoch_d"]
    names += [f"roc_{q}" for q in p.roc_periods]
    names += [f"ema_dist_{q}" for q in p.ema_periods]
    names += [f"ema_slope_{q}" for q in p.ema_periods]
    names += ["adx_14", "di_diff_14", "linreg_slope_20"]
    names += [f"range_pos_{w}" for w in p.range_windows]
    names += [f"volume_z_{w}" for w in p.volume_z_windows]
    names += [f"obv_flow_{w}" for w in p.flow_windows]
    names += [f"vwap_dist_{w}" for w in p.vwap_windows]
    names += ["hour_sin", "hour_cos", "dow_sin", "dow_cos"]
    names += ["h1_ret_1", "h1_ret_4", "h1_ret_24", "h1_rv_24", "h1_dist_sma_24"]
    names += ["h4_ret_1", "h4_ret_6", "h4_rv_6", "h4_dist_sma_6"]
    names += [f"bridged_{BRIDGED_WINDOW}"]
    return tuple(names)


# People-facing groups for /indicators and reports.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "volatility": ("atr_", "range_pct", "rv_", "parkinson_", "garman_klass_", "vol_ratio"),
    "momentum": ("rsi_", "macd", "stoch_", "roc_"),
    "trend": ("ema_", "adx_", "di_diff", "linreg_", "range_pos_"),
    "volume": ("volume_z_", "obv_flow_", "vwap_dist_"),
    "time": ("hour_", "dow_"),
    "higher_timeframes": ("h1_", "h4_"),
    "data_quality": ("bridged_",),
}


def feature_group(name: str) -> str:
    for group, prefixes in FEATURE_GROUPS.items():
        if name.startswith(prefixes):
            return group
    raise KeyError(name)


def feature_set_hash(params: FeatureParams = FeatureParams()) -> str:
    """Stable hash of the feature list, its parameters and the code version; models carry it."""
    payload = {"names": feature_names(params), "params": params.model_dump(), "warmup": WARMUP,
               "code_version": FEATURE_CODE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _div(a: np.ndarray, b: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """a / b, with ``fill`` where b is zero (flat markets, zero-volume candles): defined, not NaN."""
    zero = b == 0
    q = a / np.where(zero, 1.0, b)
    q[zero] = fill
    return q


def _shift(x: np.ndarray, k: int) -> np.ndarray:
    out = np.full_like(x, np.nan)
    if k < len(x):
        out[k:] = x[: len(x) - k]
    return out


class _HigherTimeframe:
    """Closes of higher-time-frame buckets, and which *completed* bucket each 5-minute row may see.

    A bucket's close is the close of its last 5-minute candle; the bucket counts as completed at
    row ``t`` only once that last candle is row ``t`` or earlier. Only closes are used, so a bucket
    cut by the start of the input is still exact. Values are produced for the last ``tail`` rows.
    """

    def __init__(self, open_time: np.ndarray, close: np.ndarray, bucket_ms: int, tail: int) -> None:
        n = len(close)
        bucket = open_time // bucket_ms
        ends = np.flatnonzero(bucket[1:] != bucket[:-1])  # last row of every bucket but the newest
        ends = np.append(ends, n - 1)
        self.closes = close[ends]
        self.log_closes = np.log(self.closes)
        rows = np.arange(n - tail, n)
        row_bucket = np.searchsorted(ends, rows)  # index of the bucket holding each row
        closes_bucket = (open_time[n - tail:] + 300_000) % bucket_ms == 0
        # Row t sees its own bucket if t is that bucket's final slot, else the previous bucket.
        ref = np.where(closes_bucket, row_bucket, row_bucket - 1)
        self._valid = ref >= 0
        self._ref = np.where(self._valid, ref, 0)

    def _at_rows(self, x: np.ndarray) -> np.ndarray:
        """Map a per-bucket series to the rows (NaN before the first completed bucket)."""
        return np.where(self._valid, x[self._ref], np.nan)

    def log_return(self, k: int) -> np.ndarray:
        return self._at_rows(self.log_closes - _shift(self.log_closes, k))

    def realised_vol(self, window: int) -> np.ndarray:
        r = np.concatenate([[np.nan], np.diff(self.log_closes)])
        return self._at_rows(np.sqrt(_mean_tail(r * r, window, len(r))))

    def sma(self, window: int) -> np.ndarray:
        return self._at_rows(_mean_tail(self.closes, window, len(self.closes)))


def _log_slope(logc: np.ndarray, window: int, tail: int) -> np.ndarray:
    """Least-squares slope of log close over the last ``window`` candles (log-return per candle)."""
    return _correlate_tail(logc, _slope_kernel(window), tail)


@lru_cache(maxsize=8)
def _slope_kernel(window: int) -> np.ndarray:
    x = np.arange(window, dtype=np.float64)
    return (x - x.mean()) / ((x - x.mean()) ** 2).sum()


def _correlate_tail(x: np.ndarray, kernel: np.ndarray, tail: int) -> np.ndarray:
    """Trailing-window dot products ``sum(x[t-w+1 .. t] * kernel)`` for the last ``tail`` rows.

    Every output sums exactly the same products in the same order whatever precedes its window,
    so the batch path and the incremental path agree to the last bit. Running sums (TA-Lib's SMA)
    drift with the length of the history and break that for small differences such as VWAP
    distance.
    """
    w = len(kernel)
    n = len(x)
    if tail == 1:  # the serving path: one dot product, no temporaries
        return np.array([x[n - w:] @ kernel if n >= w else np.nan])
    out = np.full(tail, np.nan)
    start = max(n - tail, w - 1)  # first row with a full window
    if start < n:
        out[start - (n - tail):] = np.correlate(x[start - w + 1:], kernel, mode="valid")
    return out


class _WindowMeans:
    """Trailing-window means of several series, for the last ``tail`` rows.

    In batch mode each (series, window) is one exact correlation over the history. In the serving
    mode (``tail == 1``) every series' mean over a window comes from one matrix-vector product, so
    a new candle costs a handful of numpy calls instead of dozens (the results agree to ~1e-16).
    """

    def __init__(self, series: dict[str, np.ndarray], tail: int) -> None:
        self._series = series
        self._tail = tail
        self._names = list(series)
        self._stack = np.vstack(list(series.values())) if tail == 1 else None
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def mean(self, name: str, w: int) -> np.ndarray:
        key = (name, w)
        if key not in self._cache:
            if self._stack is not None:
                n = self._stack.shape[1]
                means = (self._stack[:, n - w:] @ _kernel(w, True) if n >= w
                         else np.full(len(self._names), np.nan))
                for i, other in enumerate(self._names):
                    self._cache[(other, w)] = means[i:i + 1]
            else:
                self._cache[key] = _mean_tail(self._series[name], w, self._tail)
        return self._cache[key]


@lru_cache(maxsize=64)
def _kernel(w: int, mean: bool) -> np.ndarray:
    return np.full(w, 1.0 / w) if mean else np.ones(w)


def _mean_tail(x: np.ndarray, w: int, tail: int) -> np.ndarray:
    return _correlate_tail(x, _kernel(w, True), tail)


def _sum_tail(x: np.ndarray, w: int, tail: int) -> np.ndarray:
    return _correlate_tail(x, _kernel(w, False), tail)


def _lag_ratio(x: np.ndarray, tail: int) -> np.ndarray:
    """``x[t] / x[t - 1]`` for the last ``tail`` rows."""
    n = len(x)
    out = np.full(tail, np.nan)
    first = max(n - tail, 1)
    out[first - (n - tail):] = x[first:] / x[first - 1:n - 1]
    return out


def _lag_diff(x: np.ndarray, lag: int, tail: int) -> np.ndarray:
    """``x[t] - x[t - lag]`` for the last ``tail`` rows (NaN where t - lag is before the input)."""
    n = len(x)
    out = np.full(tail, np.nan)
    first = max(n - tail, lag)
    if first < n:
        out[first - (n - tail):] = x[first:] - x[first - lag:n - lag]
    return out


def finite_lookback(params: FeatureParams) -> int:
    """Rows behind the newest that any finite-window feature reads (incl. completed 4h candles)."""
    p = params
    longest = max(*p.roc_periods, *p.rv_windows, *p.volume_z_windows, *p.flow_windows, *p.vwap_windows,
                  *p.range_windows, 20, 14 + 3 + 3, BRIDGED_WINDOW)
    htf = max((H1_WINDOW + 2) * HOUR_MS, (H4_WINDOW + 2) * H4_MS) // 300_000
    return max(longest + 1, htf)


def compute_features(open_time: np.ndarray, o: np.ndarray, h: np.ndarray, l: np.ndarray, c: np.ndarray,
                     v: np.ndarray, params: FeatureParams = FeatureParams(), tail: int | None = None,
                     bridged: np.ndarray | None = None) -> np.ndarray:
    """Feature matrix for one contiguous run of candles: ``(tail or n, len(feature_names(params)))``.

    Inputs are float64 arrays (``open_time`` int64 ms); ``bridged`` marks the no-trade candles that
    bridge a short gap (:func:`features.candles.bridge_gaps`; None = none). ``tail`` returns only the last ``tail``
    rows: the serving path asks for one row, and trailing-window statistics are then computed for
    that row only (recursive indicators still run over the whole input, which they need). Rows
    early in the run may hold NaN; callers blank the first ``WARMUP - 1`` rows of every run so
    that defined rows are identical however much history precedes them.
    """
    p = params
    n = len(c)
    k = n if tail is None else min(tail, n)
    cols: list[np.ndarray] = []

    def last(x: np.ndarray) -> np.ndarray:
        return x[len(x) - k:]

    # Recursive indicators (EMA, Wilder smoothing) run over the whole input.
    atr = talib.ATR(h, l, c, 14)
    rsi = [talib.RSI(c, q) for q in p.rsi_periods]
    macd, macd_sig, macd_hist = talib.MACD(c, 12, 26, 9)
    emas = {q: talib.EMA(c, q) for q in p.ema_periods}
    adx = talib.ADX(h, l, c, 14)
    di = talib.PLUS_DI(h, l, c, 14) - talib.MINUS_DI(h, l, c, 14)

    # Finite-window statistics only need the last rows: slice once (no-op in batch mode).
    s0 = max(0, n - k - finite_lookback(p))
    bridged_f = np.zeros(n) if bridged is None else np.asarray(bridged, dtype=np.float64)
    t, o, h, l, c, v, bridged_f = (x[s0:] for x in (open_time, o, h, l, c, v, bridged_f))
    logc = np.log(c)
    r = np.concatenate([[np.nan], np.diff(logc)])
    c_t = last(c)

    # Trailing-window means of these series feed the volatility and volume groups.
    hl2 = np.log(h / l) ** 2
    lv = np.log1p(v)
    tp = (h + l + c) / 3.0
    win = _WindowMeans({
        "r2": r * r, "hl2": hl2, "gk": 0.5 * hl2 - (2.0 * np.log(2.0) - 1.0) * np.log(c / o) ** 2,
        "lv": lv, "lv2": lv * lv, "signed": np.sign(np.concatenate([[0.0], np.diff(c)])) * v,
        "v": v, "tpv": tp * v, "tp": tp}, k)

    # Volatility.
    cols += [last(atr) / c_t, last(h - l) / c_t]
    rv = {w: np.sqrt(np.maximum(win.mean("r2", w), 0.0)) for w in p.rv_windows}
    cols += [rv[w] for w in p.rv_windows]
    cols += [np.sqrt(np.maximum(win.mean("hl2", w), 0.0) / (4.0 * np.log(2.0))) for w in p.rv_windows]
    cols += [np.sqrt(np.maximum(win.mean("gk", w), 0.0)) for w in p.rv_windows]
    cols.append(_div(rv[p.rv_windows[0]], rv[p.rv_windows[-1]], 1.0))

    # Momentum.
    cols += [last(x) / 100.0 for x in rsi]
    cols += [last(macd) / c_t, last(macd_sig) / c_t, last(macd_hist) / c_t]
    sk, sd = talib.STOCH(h, l, c, 14, 3, 0, 3, 0)
    cols += [last(sk) / 100.0, last(sd) / 100.0]
    cols += [_lag_diff(logc, q, k) for q in p.roc_periods]

    # Trend.
    cols += [c_t / last(emas[q]) - 1.0 for q in p.ema_periods]
    cols += [_lag_ratio(emas[q], k) - 1.0 for q in p.ema_periods]
    cols += [last(adx) / 100.0, last(di) / 100.0, _log_slope(logc, 20, k)]
    for w in p.range_windows:
        lo, hi = last(talib.MIN(l, w)), last(talib.MAX(h, w))
        cols.append(_div(c_t - lo, hi - lo, 0.5))

    # Volume (ratios of window means equal ratios of window sums).
    for w in p.volume_z_windows:
        mean = win.mean("lv", w)
        var = np.maximum(win.mean("lv2", w) - mean * mean, 0.0)
        cols.append(_div(last(lv) - mean, np.sqrt(var), 0.0))
    for w in p.flow_windows:
        cols.append(_div(win.mean("signed", w), win.mean("v", w), 0.0))
    for w in p.vwap_windows:
        vwap = _div(win.mean("tpv", w), win.mean("v", w), np.nan)
        vwap = np.where(np.isnan(vwap), win.mean("tp", w), vwap)  # no volume at all: plain mean
        cols.append(c_t / vwap - 1.0)

    # Calendar.
    tt = last(t)
    day_phase = 2 * np.pi * (tt % DAY_MS) / DAY_MS
    week_phase = 2 * np.pi * ((tt + _MONDAY_OFFSET_MS) % WEEK_MS) / WEEK_MS
    cols += [np.sin(day_phase), np.cos(day_phase), np.sin(week_phase), np.cos(week_phase)]

    # Higher time frames, from completed candles only.
    h1 = _HigherTimeframe(t, c, HOUR_MS, k)
    cols += [h1.log_return(1), h1.log_return(4), h1.log_return(H1_WINDOW), h1.realised_vol(H1_WINDOW),
             c_t / h1.sma(H1_WINDOW) - 1.0]
    h4 = _HigherTimeframe(t, c, H4_MS, k)
    cols += [h4.log_return(1), h4.log_return(H4_WINDOW), h4.realised_vol(H4_WINDOW), c_t / h4.sma(H4_WINDOW) - 1.0]

    # Data quality: how many of the last day's candles were bridged (exact integer sums).
    cols.append(_sum_tail(bridged_f, BRIDGED_WINDOW, k))

    out = np.empty((k, len(cols)))
    for j, col in enumerate(cols):
        out[:, j] = col
    return out
