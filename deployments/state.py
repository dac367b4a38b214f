"""The market state the API serves from: per symbol, the newest candle, its features and feed clock.

The FeatureBuilder deployment owns it and hands immutable snapshots to every ingress replica
(long-polled, so a candle close reaches the ingress within one round trip, and the request path
needs no hop to learn the current candle, its data age or its features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from deployments.feed import FeedClock
from features.candles import FIVE_MINUTES_MS


@dataclass(frozen=True)
class FeatureRow:
    """The input of one forecast: a symbol's features at one candle."""

    symbol: str
    open_time: int
    close: float
    features: np.ndarray


@dataclass(frozen=True)
class SymbolState:
    symbol: str
    open_time: int | None = None           # newest candle received (open time, ms)
    close: float | None = None
    features: np.ndarray | None = None     # its feature row; None while warming up / after a gap
    feature_reason: str | None = None      # why ``features`` is None
    history: int = 0                       # contiguous candles held (WARMUP when ready)
    clock: FeedClock | None = None         # the feed's clock at that candle
    source: str | None = None
    gaps: int = 0
    published: bool = False                # its forecasts are in the cache (candle-close work done)
    publish_error: str | None = None       # why they are not (no model, ...)
    model_versions: dict[str, str] = field(default_factory=dict)
    updated_at: float = 0.0                # wall time of the last change

    def data_age_s(self, wall_s: float | None = None) -> float | None:
        """Feed seconds since the newest candle closed (None without data)."""
        if self.open_time is None or self.clock is None:
            return None
        return (self.clock.now_ms(wall_s) - (self.open_time + FIVE_MINUTES_MS)) / 1000.0

    def row(self) -> FeatureRow | None:
        if self.open_time is None or self.close is None or self.features is None:
            return None
        return FeatureRow(self.symbol, self.open_time, self.close, self.features)


@dataclass(frozen=True)
class MarketSnapshot:
    """``version`` counts publishes within one FeatureBuilder incarnation (``epoch``): a restarted
    FeatureBuilder starts again at 0 with a new epoch, and empty windows until the feed re-seeds them."""

    version: int
    symbols: dict[str, SymbolState]
    created_at: float = field(default_factory=time.time)
    epoch: str = ""

    def adopt(self, new: "MarketSnapshot") -> "MarketSnapshot":
        """What a reader should hold after receiving ``new``.

        Within one epoch, ``new`` itself. From a restarted FeatureBuilder (another epoch), per symbol
        the newer of the two: the restarted one knows nothing until the next candle re-seeds it, and
        meanwhile the candle this reader already holds is still the newest the market has produced
        (any newer one would have gone through the new FeatureBuilder) -- so answers keep flowing
        through a FeatureBuilder restart instead of turning into 503s.
        """
        if not self.epoch or new.epoch == self.epoch:
            return new
        return new.keeping(self.symbols)[0]

    def keeping(self, held: dict[str, SymbolState]) -> tuple["MarketSnapshot", dict[str, SymbolState]]:
        """This snapshot with, per symbol, ``held``'s state where it is newer (see :meth:`adopt`);
        and the held states still kept (a reader keeps offering those to the next snapshots of the
        new incarnation, until it has caught up with each of them)."""
        merged = dict(self.symbols)
        kept: dict[str, SymbolState] = {}
        for symbol, old in held.items():
            cur = merged.get(symbol)
            if old.open_time is None:
                continue
            if cur is None or cur.open_time is None or cur.open_time < old.open_time or (
                    cur.open_time == old.open_time and not cur.published and old.published):
                merged[symbol] = kept[symbol] = old
        if not kept:
            return self, kept
        return MarketSnapshot(self.version, merged, self.created_at, self.epoch), kept

    @classmethod
    def empty(cls, symbols: list[str] | tuple[str, ...] = ()) -> "MarketSnapshot":
        return cls(0, {s: SymbolState(s) for s in symbols})


def iso_time(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
