"""Candle schema, loading, validation, resampling and gap reporting.

One schema everywhere (training, replay, serving): ``open_time`` (int64, ms UTC, candle open),
``open``, ``high``, ``low``, ``close``, ``volume`` (float64), optional ``quote_volume`` and
``trades``. Validation refuses bad data loudly instead of letting it reach features: a model fed a
corrupt candle produces a confident wrong answer, which is worse than no answer.

Gaps (missing 5-minute slots) are *not* errors — real exchanges halt. The one gap policy
(docs/features.md "Gaps"): for *features*, a short gap (at most ``FeatureParams.max_bridge_candles``
missing slots) is bridged with no-trade candles (:func:`bridge_gaps`) and marked, so a halt does not
restart the warm-up; a longer gap starts a new contiguous segment (:func:`segment_ids`). *Labels*
never use bridged candles: a label window that touches a missing slot is undefined.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from configs.errors import CandleDataError

log = logging.getLogger(__name__)

FIVE_MINUTES_MS = 5 * 60 * 1000
ONE_MINUTE_MS = 60 * 1000
REQUIRED_COLUMNS: tuple[str, ...] = ("open_time", "open", "high", "low", "close", "volume")
OPTIONAL_COLUMNS: tuple[str, ...] = ("quote_volume", "trades")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
INTERVALS_MS: dict[str, int] = {"1m": ONE_MINUTE_MS, "5m": FIVE_MINUTES_MS}

# Binance kline CSV layout (data.binance.vision and the REST API), no header.
BINANCE_KLINE_COLUMNS: tuple[str, ...] = (
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume",
    "trades", "taker_buy_base", "taker_buy_quote", "ignore",
)


@dataclass(frozen=True)
class GapReport:
    """Missing slots in a candle series: how many, how many separate gaps, the longest one."""

    missing_candles: int
    gap_count: int
    longest_gap_candles: int
    longest_gap_start_ms: int | None  # open_time of the first missing candle of the longest gap

    def __str__(self) -> str:
        if not self.gap_count:
            return "no gaps"
        start = pd.Timestamp(self.longest_gap_start_ms, unit="ms", tz="UTC")
        return (f"{self.missing_candles} missing candles in {self.gap_count} gaps; longest "
                f"{self.longest_gap_candles} candles from {start:%Y-%m-%d %H:%M} UTC")


def _fail(row: int, open_time: int | None, problem: str) -> CandleDataError:
    when = ""
    if open_time is not None:
        when = f" (open_time={open_time}, {pd.Timestamp(int(open_time), unit='ms', tz='UTC'):%Y-%m-%d %H:%M} UTC)"
    return CandleDataError(f"row {row}{when}: {problem}")


def validate_candles(df: pd.DataFrame, interval_ms: int = FIVE_MINUTES_MS) -> pd.DataFrame:
    """Check ``df`` against the schema and return it with canonical dtypes and column order.

    Raises :class:`CandleDataError` naming the first offending row and the problem.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CandleDataError(f"missing columns: {', '.join(missing)} (have: {', '.join(map(str, df.columns))})")
    cols = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in df.columns]
    out = df[cols].reset_index(drop=True).copy()
    try:
        out["open_time"] = out["open_time"].astype("int64")
        for c in cols[1:]:
            out[c] = out[c].astype("float64")
    except (TypeError, ValueError) as exc:
        raise CandleDataError(f"non-numeric value: {exc}") from exc
    if len(out) == 0:
        raise CandleDataError("no candles")
    t = out["open_time"].to_numpy()

    def first(mask: np.ndarray, problem: str) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise _fail(i, int(t[i]), problem)

    values = out[cols[1:]].to_numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise _fail(int(i), int(t[i]), f"{cols[1 + j]} is {values[i, j]} (NaN/inf not allowed)")
    o, h, l, c, v = (out[k].to_numpy() for k in ("open", "high", "low", "close", "volume"))
    for name, arr in (("open", o), ("high", h), ("low", l), ("close", c)):
        first(arr <= 0, f"{name} is not positive")
    first(v < 0, "volume is negative")
    first(h < np.maximum(o, c), "high is below max(open, close)")
    first(l > np.minimum(o, c), "low is above min(open, close)")
    first(t % interval_ms != 0, f"open_time is not aligned to the {interval_ms // 60000}-minute interval")
    if len(t) > 1:
        d = np.diff(t)
        if (d == 0).any():
            i = int(np.argmax(d == 0)) + 1
            raise _fail(i, int(t[i]), "duplicate open_time")
        if (d < 0).any():
            i = int(np.argmax(d < 0)) + 1
            raise _fail(i, int(t[i]), "open_time is not sorted ascending")
        if (d % interval_ms != 0).any():
            i = int(np.argmax(d % interval_ms != 0)) + 1
            raise _fail(i, int(t[i]), f"wrong interval: {d[i - 1]} ms after the previous candle")
    return out


def gap_report(open_time: np.ndarray | pd.Series, interval_ms: int = FIVE_MINUTES_MS) -> GapReport:
    """Count missing slots between consecutive candles (the series must be validated)."""
    t = np.asarray(open_time, dtype=np.int64)
    if len(t) < 2:
        return GapReport(0, 0, 0, None)
    missing = np.diff(t) // interval_ms - 1
    idx = np.flatnonzero(missing > 0)
    if not len(idx):
        return GapReport(0, 0, 0, None)
    k = idx[np.argmax(missing[idx])]
    return GapReport(int(missing[idx].sum()), int(len(idx)), int(missing[k]), int(t[k] + interval_ms))


def segment_ids(open_time: np.ndarray | pd.Series, interval_ms: int = FIVE_MINUTES_MS) -> np.ndarray:
    """Label each candle with the index of its contiguous segment (a new one starts after a gap)."""
    t = np.asarray(open_time, dtype=np.int64)
    if len(t) == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.concatenate([[0], (np.diff(t) != interval_ms).astype(np.int64)])
    return np.cumsum(breaks)


@dataclass(frozen=True)
class BridgedCandles:
    """A candle series with its short gaps bridged (see :func:`bridge_gaps`)."""

    open_time: np.ndarray   # int64 ms, the input's times plus the bridged slots
    ohlcv: np.ndarray       # (n, 5) float64
    bridged: np.ndarray     # bool: True for a no-trade candle inserted into a gap
    real_index: np.ndarray  # position of each input candle in the bridged series


def bridge_gaps(open_time: np.ndarray, ohlcv: np.ndarray, max_missing: int,
                interval_ms: int = FIVE_MINUTES_MS) -> BridgedCandles:
    """Fill every run of at most ``max_missing`` missing slots with no-trade candles.

    A bridged candle is what a halted market shows: open = high = low = close = the previous
    close, volume 0. It is a pure function of the candles *before* it (no look-ahead: the slots
    are known missing only once the next real candle arrives, and nothing of that candle is
    used). Longer gaps are left as they are; :func:`segment_ids` splits the series there.
    """
    t = np.asarray(open_time, dtype=np.int64)
    values = np.asarray(ohlcv, dtype=np.float64)
    n = len(t)
    missing = np.diff(t) // interval_ms - 1 if n > 1 else np.zeros(0, dtype=np.int64)
    fill = np.where((missing > 0) & (missing <= max_missing), missing, 0)
    offset = np.concatenate([[0], np.cumsum(fill)]).astype(np.int64)
    real_index = np.arange(n, dtype=np.int64) + offset
    if not fill.any():
        return BridgedCandles(t, values, np.zeros(n, dtype=bool), real_index)
    size = n + int(offset[-1])
    out_t = np.empty(size, dtype=np.int64)
    out_v = np.empty((size, values.shape[1]), dtype=np.float64)
    bridged = np.ones(size, dtype=bool)
    out_t[real_index], out_v[real_index], bridged[real_index] = t, values, False
    before = np.repeat(np.arange(n - 1), fill)  # the real candle each bridged one follows
    step = np.arange(len(before)) - np.repeat(np.cumsum(fill) - fill, fill) + 1  # 1 .. run length
    slots = real_index[before] + step
    out_t[slots] = t[before] + step * interval_ms
    out_v[slots, :4] = values[before, 3:4]
    out_v[slots, 4] = 0.0
    return BridgedCandles(out_t, out_v, bridged, real_index)


def resample(df: pd.DataFrame, from_ms: int = ONE_MINUTE_MS, to_ms: int = FIVE_MINUTES_MS) -> pd.DataFrame:
    """Aggregate validated candles to a coarser interval.

    A coarse candle is emitted only when all of its fine candles are present: a 5-minute candle
    built from 3 of 5 minutes would understate its range and volume, so incomplete buckets are
    dropped (they become a reported gap) rather than guessed.
    """
    if to_ms % from_ms:
        raise CandleDataError(f"cannot resample {from_ms} ms candles to {to_ms} ms")
    k = to_ms // from_ms
    bucket = df["open_time"].to_numpy() // to_ms * to_ms
    agg: dict[str, tuple[str, str]] = {
        "open": ("open", "first"), "high": ("high", "max"), "low": ("low", "min"),
        "close": ("close", "last"), "volume": ("volume", "sum"), "n": ("open", "size"),
    }
    for c in OPTIONAL_COLUMNS:
        if c in df.columns:
            agg[c] = (c, "sum")
    g = df.assign(_bucket=bucket).groupby("_bucket", sort=True).agg(**agg)
    g = g[g["n"] == k].drop(columns="n")
    g.index.name = "open_time"
    return g.reset_index()


def _read_csv(path: Path) -> pd.DataFrame:
    with path.open(newline="") as fh:
        first_row = next(csv.reader(fh), [])
    if not first_row:
        raise CandleDataError(f"{path}: empty file")
    try:
        float(first_row[0])
        has_header = False
    except ValueError:
        has_header = True
    if has_header:
        df = pd.read_csv(path)
        if "open_time" not in df.columns:
            for alt in ("timestamp", "date", "time", "Open time"):
                if alt in df.columns:
                    df = df.rename(columns={alt: "open_time"})
                    break
        return df
    # Binance kline CSV: 12 columns, no header. Newer dumps use microseconds.
    df = pd.read_csv(path, header=None)
    if df.shape[1] != len(BINANCE_KLINE_COLUMNS):
        raise CandleDataError(f"{path}: headerless CSV with {df.shape[1]} columns; expected the "
                              f"{len(BINANCE_KLINE_COLUMNS)}-column Binance kline layout")
    df.columns = list(BINANCE_KLINE_COLUMNS)
    return df


def _normalise_time(df: pd.DataFrame) -> pd.DataFrame:
    col = df["open_time"]
    if pd.api.types.is_datetime64_any_dtype(col):
        ts = pd.to_datetime(col, utc=True)
        df["open_time"] = (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    elif pd.api.types.is_numeric_dtype(col) and len(col) and col.max() > 10**14:
        df["open_time"] = col // 1000  # microseconds (Binance dumps from 2025 on)
    return df


def load_candles(path: str | Path, interval: str = "5m", resample_from: str | None = None) -> pd.DataFrame:
    """Read candles from Parquet or CSV (plain or Binance kline layout) and validate them.

    ``resample_from="1m"`` aggregates 1-minute candles into ``interval`` candles. If the file's
    candles are 1-minute and ``interval`` is 5m, pass it explicitly: guessing would hide mistakes.
    Gaps are logged (count and longest span); :func:`gap_report` gives them to callers.
    """
    p = Path(path)
    if not p.exists():
        raise CandleDataError(f"{p}: no such file")
    if p.suffix in (".parquet", ".pq"):
        df = pd.read_parquet(p)
    elif p.suffix in (".csv", ".txt") or p.name.endswith(".csv.gz"):
        df = _read_csv(p)
    else:
        raise CandleDataError(f"{p}: unknown file type (expected .parquet or .csv)")
    if "open_time" not in df.columns and df.index.name in ("open_time", "date"):
        df = df.reset_index().rename(columns={df.index.name: "open_time"})
    if "date" in df.columns and "open_time" not in df.columns:
        df = df.rename(columns={"date": "open_time"})
    if "open_time" in df.columns:
        df = _normalise_time(df)
    target_ms = INTERVALS_MS.get(interval)
    if target_ms is None:
        raise CandleDataError(f"unsupported interval {interval!r} (supported: {', '.join(INTERVALS_MS)})")
    try:
        if resample_from:
            src_ms = INTERVALS_MS[resample_from]
            df = resample(validate_candles(df, src_ms), src_ms, target_ms)
        out = validate_candles(df, target_ms)
    except CandleDataError as exc:
        raise CandleDataError(f"{p}: {exc}") from None
    gaps = gap_report(out["open_time"], target_ms)
    if gaps.gap_count:
        log.warning("%s: %s", p.name, gaps)
    return out
