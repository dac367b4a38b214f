"""Candles of synthetic replay symbols: time-shifted copies of real candles (names: configs/symbols.py).

Copy ``k`` of a source keeps the source's timestamps (so every symbol of a replay closes the same
candle at the same time, as real pairs do) and takes its values ``lag = k x SYNTHETIC_LAG`` candles
later: row ``i`` is source row ``(i + lag) mod n``. The part that wraps around (the source's
first ``lag`` rows, now at the end) is rescaled in price so that its first open equals the close
before it: a copy has no price jump a real market would not have, and its price level differs from
the source's. Features are scale-free, so a rescaled stretch has exactly the source's features.
Base-asset volume is unchanged. Timestamps with holes (a halt) keep their holes: values move, times do not.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from configs.symbols import SYNTHETIC_LAG, parse_synthetic
from configs.errors import MarketDataError

PRICE_COLUMNS = ("open", "high", "low", "close", "quote_volume")  # quote volume is volume x price


def synthetic_candles(symbol: str, source: pd.DataFrame) -> pd.DataFrame:
    """The candles of synthetic ``symbol`` made from its source's candles ``source`` (loaded, sorted)."""
    parsed = parse_synthetic(symbol)
    if parsed is None:
        raise MarketDataError(f"{symbol!r} is not a synthetic symbol (SYN<copy><SOURCE>, configs/symbols.py)")
    n = len(source)
    if n < 2:
        raise MarketDataError(f"{symbol}: its source {parsed[0]} has {n} candles, too few to copy")
    lag = (parsed[1] * SYNTHETIC_LAG) % n
    src = source.reset_index(drop=True)
    order = (np.arange(n) + lag) % n
    out = src.iloc[order].reset_index(drop=True)
    out["open_time"] = src["open_time"].to_numpy()
    if lag:
        head = n - lag  # rows before the wrap; rows from here on come from the source's start
        scale = float(out["close"].iloc[head - 1]) / float(out["open"].iloc[head])
        for col in (c for c in PRICE_COLUMNS if c in out.columns):
            values = out[col].to_numpy(dtype=np.float64).copy()
            values[head:] *= scale
            out[col] = values
    return out
