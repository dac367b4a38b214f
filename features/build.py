"""Batch features for a whole candle history (the training path)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from configs.settings import FeatureParams
from features.candles import segment_ids
from features.indicators import WARMUP, compute_features, feature_names


def build_features(candles: pd.DataFrame, params: FeatureParams = FeatureParams()) -> pd.DataFrame:
    """One feature row per candle, same index, float columns.

    The series is split at gaps and each contiguous segment is computed on its own; the first
    ``WARMUP - 1`` rows of every segment are NaN. So a row is defined exactly when ``WARMUP``
    contiguous candles end at it, which is also what the incremental :class:`FeatureBuilder`
    holds — that is why the two paths agree. Nothing is forward-filled across a gap.
    """
    names = feature_names(params)
    n = len(candles)
    out = np.full((n, len(names)), np.nan)
    t = candles["open_time"].to_numpy(np.int64)
    arrays = [candles[k].to_numpy(np.float64) for k in ("open", "high", "low", "close", "volume")]
    seg = segment_ids(t)
    bounds = np.flatnonzero(np.diff(seg)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])):
        if hi - lo < WARMUP:
            continue
        block = compute_features(t[lo:hi], *(a[lo:hi] for a in arrays), params=params)
        block[: WARMUP - 1] = np.nan
        out[lo:hi] = block
    return pd.DataFrame(out, index=candles.index, columns=list(names))
