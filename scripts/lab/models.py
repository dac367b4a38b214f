"""A small model set for runs that check the serving graph, not model quality."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from configs.settings import get_settings
from training.engines import PlainEngine
from training.train import train, with_overrides

SMALL_ROUNDS = 2
SMALL_FOLDS = 2


def train_small_models(out: Path, symbols: Sequence[str] = ("BTCUSDT", "ETHUSDT")) -> Path:
    """A complete model set on the shipped sample of ``symbols`` (``Settings.sample_dir``), two
    boosting rounds per booster and two folds (seconds, not minutes), promoted in the registry ``out``."""
    settings = get_settings()
    candles = {s: settings.sample_dir / f"{s}_5m.parquet" for s in symbols}
    train(with_overrides(settings, rounds=SMALL_ROUNDS, folds=SMALL_FOLDS), candles, PlainEngine(nthread=1), out=out)
    return out
