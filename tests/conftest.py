"""Shared fixtures: real candles (the shared history when present, else the shipped sample)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_DATA = ROOT / "data" / "sample"
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def candle_path(symbol: str) -> Path:
    """The shared history for ``symbol`` if this machine has it, else the shipped sample."""
    shared = SHARED_DATA / f"{symbol}_5m.parquet"
    return shared if shared.exists() else SAMPLE_DATA / f"{symbol}_5m.parquet"


@pytest.fixture(scope="session")
def real_candles() -> dict[str, pd.DataFrame]:
    from features.candles import load_candles

    return {s: load_candles(candle_path(s)) for s in SYMBOLS}


@pytest.fixture(scope="session")
def has_shared_data() -> bool:
    return all((SHARED_DATA / f"{s}_5m.parquet").exists() for s in SYMBOLS)
