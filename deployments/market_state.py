"""One FeatureBuilder shard's market state: the rolling candle windows of its symbols and what the
API needs per symbol (plain Python, no Ray; ``deployments.feature_builder`` serves it).

:class:`MarketState` takes candle events, computes the newest candle's feature row with
:class:`features.FeatureBuilder` -- the same code as the batch path, proven equal by tests -- and
keeps, per symbol, the newest candle, its features, the feed's clock and whether its forecasts are
published. Kept apart from the deployment so tests, benchmarks and the plain FastAPI baseline drive
the same state without Serve.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from configs.errors import CandleDataError
from configs.settings import load_settings
from deployments.feed import CandleEvent
from deployments.sharding import assign, shard_count, shard_name
from deployments.state import FeatureRow, MarketSnapshot, SymbolState
from features.incremental import FeatureBuilder
from features.indicators import WARMUP

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class IngestResult:
    """What the router must do after a candle event: compute and publish ``row``'s forecasts?"""

    symbol: str
    open_time: int | None
    process: bool            # the newest candle's forecasts are not published yet
    row: FeatureRow | None   # its features (None while warming up / after a gap)
    reason: str | None       # why ``row`` is None
    accepted: int            # new candles taken from the event
    rejected: list[str]      # candles refused as invalid (with the reason)
    needs_history: bool = False  # windows empty (a restarted replica): resend the feed's recent candles


class MarketState:
    """The windows and per-symbol state (plain Python; the deployment wraps it)."""

    def __init__(self, settings_overrides: dict[str, Any] | None = None, shard: int = 0) -> None:
        self.settings = load_settings(**(settings_overrides or {}))
        every = list(self.settings.market.symbols)
        self.shards = shard_count(self.settings.feature_shards, len(every))
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} of {self.shards}")
        self.shard = shard
        self.symbols = assign(every, self.shards)[shard]
        self.builder = FeatureBuilder(self.settings.features)
        self.states: dict[str, SymbolState] = {s: SymbolState(s) for s in self.symbols}
        self.version = 0
        self.epoch = uuid.uuid4().hex  # this incarnation: readers merge across a restart (MarketSnapshot.adopt)

    def ingest(self, event: CandleEvent) -> IngestResult:
        symbol = event.symbol
        if symbol not in self.states:
            if symbol in self.settings.market.symbols:
                raise CandleDataError(f"{symbol} belongs to another FeatureBuilder shard than {shard_name(self.shard)}")
            raise CandleDataError(f"{symbol} is not one of the engine's symbols {self.settings.market.symbols}")
        last = self.builder.last_open_time(symbol)
        if last is None and event.kind != "history":
            # Empty windows but a live feed: this replica was restarted. Taking the single candle
            # would start a 1000-candle warm-up; the MarketData actor holds the recent window and
            # resends it as history, after which this candle is processed as usual.
            return IngestResult(symbol, None, False, None, "feature windows empty: waiting for history", 0, [],
                                needs_history=True)
        keep = event.open_time > last if last is not None else np.ones(len(event.open_time), dtype=bool)
        times, values = event.open_time[keep], event.ohlcv[keep]
        rejected: list[str] = []
        if len(times) > 1:
            try:
                self.builder.extend(symbol, _frame(times, values))
            except CandleDataError:
                rejected = self._one_by_one(symbol, times, values)
        elif len(times) == 1:
            rejected = self._one_by_one(symbol, times, values)
        st = self.states[symbol]
        open_time = self.builder.last_open_time(symbol)
        fresh = open_time != st.open_time
        row = self.builder.latest(symbol)
        close = st.close
        if fresh and open_time is not None:
            idx = np.flatnonzero(times == open_time)
            close = float(values[idx[-1], 3]) if len(idx) else None
        reason = None
        if row is None:
            reason = (f"features need {WARMUP} contiguous candles, have {self.builder.history(symbol)} "
                      "(warming up, or restarting after a gap)")
        # The clock is the one of the event that brought the newest candle: an event of candles this
        # replica already has (a restarted feed resending history, a retried delivery) carries another
        # clock, and taking it would make the unchanged candle look fresh -- data age must keep growing.
        clock = event.clock if fresh or st.clock is None else st.clock
        st = replace(st, open_time=open_time, close=close, features=row, feature_reason=reason,
                     history=self.builder.history(symbol), clock=clock, source=event.source,
                     gaps=st.gaps + _new_gaps(event, last), published=st.published and not fresh,
                     publish_error=st.publish_error if not fresh else None, updated_at=time.time())
        self.states[symbol] = st
        return IngestResult(symbol, open_time, not st.published and open_time is not None, st.row(), reason,
                            int(len(times)) - len(rejected), rejected)

    def _one_by_one(self, symbol: str, times: np.ndarray, values: np.ndarray) -> list[str]:
        """Feed candles singly, skipping invalid ones (a skipped candle becomes a gap downstream)."""
        rejected = []
        for t, v in zip(times, values):
            try:
                self.builder.update(symbol, int(t), *map(float, v))
            except CandleDataError as exc:
                log.warning("rejected candle: %s", exc)
                rejected.append(str(exc))
        return rejected

    def publish(self, symbol: str, open_time: int, model_versions: dict[str, str], error: str | None) -> bool:
        st = self.states.get(symbol)
        if st is None or st.open_time != open_time:
            return False  # a newer candle arrived meanwhile; its own publish will follow
        self.states[symbol] = replace(st, published=error is None, publish_error=error,
                                      model_versions=dict(model_versions), updated_at=time.time())
        self.version += 1
        return True

    def snapshot(self) -> MarketSnapshot:
        return MarketSnapshot(self.version, dict(self.states), epoch=self.epoch)

    def latest_rows(self) -> list[FeatureRow]:
        return [r for r in (st.row() for st in self.states.values()) if r is not None]


def _new_gaps(event: CandleEvent, last: int | None) -> int:
    """Gaps of ``event`` that end after ``last``: a resent history (a restarted feed resuming, a
    retried delivery) does not count the gaps this replica has already seen again."""
    return sum(1 for _, after in event.gaps if last is None or after > last)


def _frame(times: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame(values, columns=["open", "high", "low", "close", "volume"])
    df.insert(0, "open_time", times.astype(np.int64))
    return df
