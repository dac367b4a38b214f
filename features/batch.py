"""Batch features for a whole candle history (the training path)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from configs.sections import FeatureParams
from features.candles import bridge_gaps, segment_ids
from features.indicators import WARMUP, compute_features, feature_names

_FIELDS = ("open", "high", "low", "close", "volume")


def build_features(candles: pd.DataFrame, params: FeatureParams = FeatureParams()) -> pd.DataFrame:
    """One feature row per candle, same index, float columns.

    Short gaps are bridged first (:func:`features.candles.bridge_gaps`, at most
    ``params.max_bridge_candles`` slots); the series is then split at the remaining (long) gaps and
    each contiguous segment is computed on its own; the first ``WARMUP - 1`` rows of every segment
    are NaN. So a row is defined exactly when ``WARMUP`` contiguous (real or bridged) candles end at
    it, which is also what the incremental :class:`FeatureBuilder` holds — that is why the two paths
    agree. Rows are returned for the input's candles only, never for a bridged slot.
    """
    names = feature_names(params)
    b = bridge_gaps(candles["open_time"].to_numpy(np.int64), candles[list(_FIELDS)].to_numpy(np.float64),
                    params.max_bridge_candles)
    n = len(b.open_time)
    columns = [np.ascontiguousarray(b.ohlcv[:, j]) for j in range(len(_FIELDS))]  # TA-Lib wants contiguous
    out = np.full((n, len(names)), np.nan)
    seg = segment_ids(b.open_time)
    bounds = np.flatnonzero(np.diff(seg)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])):
        if hi - lo < WARMUP:
            continue
        block = compute_features(b.open_time[lo:hi], *(col[lo:hi] for col in columns), params=params,
                                 bridged=b.bridged[lo:hi])
        block[: WARMUP - 1] = np.nan
        out[lo:hi] = block
    return pd.DataFrame(out[b.real_index], index=candles.index, columns=list(names))
