"""Candidate range features for the walk-forward study (bench/range_scale.py), issue 14 point 2.

Study code, not served: each function maps one symbol's candle history to columns per candle that
use candles ``<= t`` only (trailing windows on the complete 5-minute grid, missing slots skipped).
Volatility candidates are returned as log variances per candle; the study divides them by the
shipped unit (``log(prof) - 2 log atr_14``) so the boosters see scale-free ratios.

- ``ny_calendar``: time of day and day of week in New York local time (the US session moves by an
  hour in UTC twice a year; the shipped ``hour_*``/``dow_*`` are UTC) and a DST flag;
- ``log_profile_keyed``: the trailing ``PROFILE_DAYS`` mean Parkinson variance of the *next* h
  time-of-day slots, keyed by UTC or by New York local time (``features.volatility`` uses UTC);
- ``long_memory``: log Parkinson / realised variance over 3 days (inside the 1,000-candle warm-up),
  1 week and 30 days (these need 2,016 / 8,640 candles of history);
- ``volume_surprise``: activity against its own recent level and against the same time of day on
  the previous 3 days (the candle files hold OHLCV only: no trade counts).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.volatility import (FIVE_MINUTES_MS, MIN_PROFILE_DAYS, PROFILE_DAYS, SLOTS_PER_DAY, VAR_FLOOR,
                                 _grid, _trailing_mean, candle_variances)

NY = "America/New_York"
DAY_MS = 86_400_000


def ny_offset_slots(open_time: np.ndarray) -> np.ndarray:
    """New York's UTC offset at each time, in 5-minute slots (-60 in winter, -48 in summer)."""
    ts = pd.to_datetime(np.asarray(open_time, dtype=np.int64), unit="ms", utc=True).tz_convert(NY)
    off = ts.tz_localize(None).asi8 // 1_000_000 - np.asarray(open_time, dtype=np.int64)
    return (off // FIVE_MINUTES_MS).astype(np.int64)


def ny_calendar(open_time: np.ndarray) -> dict[str, np.ndarray]:
    t = np.asarray(open_time, dtype=np.int64)
    local = t + ny_offset_slots(t) * FIVE_MINUTES_MS
    day = 2 * np.pi * (local % DAY_MS) / DAY_MS
    week = 2 * np.pi * ((local + 3 * DAY_MS) % (7 * DAY_MS)) / (7 * DAY_MS)  # 0 = Monday 00:00 NY
    return {"ny_hour_sin": np.sin(day), "ny_hour_cos": np.cos(day), "ny_dow_sin": np.sin(week),
            "ny_dow_cos": np.cos(week), "ny_dst": (ny_offset_slots(t) == -48).astype(np.float64)}


def log_profile_keyed(open_time: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
                      horizon: int, key: str, days: int = PROFILE_DAYS) -> np.ndarray:
    """Log expected Parkinson variance per candle of the next ``horizon`` slots, from the same
    slots of the last ``days`` days (defined from ``min(days, MIN_PROFILE_DAYS)`` of them; 3 days fit
    in the 1,000-candle warm-up); ``key="ny"`` matches slots by New York local time.

    Row t reads the h-slot mean ending at ``t + h - 288 d + shift`` where ``shift`` = (NY offset at
    t) - (NY offset d days earlier): 0, or +-12 slots across a DST change. ``h + 12 < 288`` keeps
    every read at or before t."""
    pos, _, pk = candle_variances(open_time, high, low, close)
    n = len(pk)
    grid_t = np.asarray(open_time, dtype=np.int64)[0] + np.arange(n, dtype=np.int64) * FIVE_MINUTES_MS
    off = ny_offset_slots(grid_t) if key == "ny" else np.zeros(n, dtype=np.int64)
    per = pd.Series(pk).rolling(horizon, min_periods=1).mean().to_numpy()
    total, count = np.zeros(n), np.zeros(n)
    rows = np.arange(n)
    for d in range(1, days + 1):
        back = rows - SLOTS_PER_DAY * d
        shift = np.where(back >= 0, off - off[np.maximum(back, 0)], 0)
        src = rows + horizon - SLOTS_PER_DAY * d + shift
        assert (src <= rows).all()
        ok = src >= 0
        v = np.where(ok, per[np.maximum(src, 0)], np.nan)
        fin = np.isfinite(v)
        total += np.where(fin, v, 0.0)
        count += fin
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where(count >= min(days, MIN_PROFILE_DAYS), total / np.maximum(count, 1), np.nan)
    return np.log(np.maximum(prof, VAR_FLOOR))[pos]


LONG_WINDOWS = {"3d": 864, "1w": 2016, "30d": 8640}


def long_memory(open_time: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
                windows: tuple[str, ...]) -> dict[str, np.ndarray]:
    pos, r2, pk = candle_variances(open_time, high, low, close)
    out = {}
    for name in windows:
        w = LONG_WINDOWS[name]
        out[f"log_pk_{name}"] = np.log(np.maximum(_trailing_mean(pk, w), VAR_FLOOR))[pos]
        out[f"log_rv_{name}"] = np.log(np.maximum(_trailing_mean(r2, w), VAR_FLOOR))[pos]
    return out


def volume_surprise(open_time: np.ndarray, volume: np.ndarray, days: int = 3) -> dict[str, np.ndarray]:
    pos, n = _grid(open_time)
    lv = np.full(n, np.nan)
    lv[pos] = np.log1p(np.asarray(volume, dtype=np.float64))
    m12, m288 = _trailing_mean(lv, 12), _trailing_mean(lv, 288)
    same = [np.concatenate([np.full(SLOTS_PER_DAY * d, np.nan), x[: n - SLOTS_PER_DAY * d]])
            for d in range(1, days + 1) for x in (lv, m12)]
    with np.errstate(invalid="ignore"):
        tod_1 = np.nanmean(np.vstack(same[0::2]), axis=0)
        tod_12 = np.nanmean(np.vstack(same[1::2]), axis=0)
    return {"lv_12_vs_288": (m12 - m288)[pos], "lv_1_vs_tod": (lv - tod_1)[pos],
            "lv_12_vs_tod": (m12 - tod_12)[pos]}
