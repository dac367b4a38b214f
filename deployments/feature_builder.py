"""The FeatureBuilder deployment: the rolling candle windows of its symbols, and their market state.

Sharded by symbol (:mod:`deployments.sharding`): ``Settings.feature_shards`` deployments
``FeatureBuilder``, ``FeatureBuilder1``, ... of one replica each, every one holding the windows of
the symbols the rendezvous hash gives it (the windows are state: a second replica of one shard
would hold other windows). A killed shard is restarted by Serve and re-seeded symbol by symbol
from the MarketData actors' windows; the other shards never notice. Each shard computes the
newest candle's feature row with :class:`features.FeatureBuilder` -- the same code as the batch
path, proven equal by tests -- and keeps, per symbol, what the API needs to answer without a hop:
the newest candle, its features and the feed's clock. Ingress replicas long-poll
:meth:`FeatureBuilderDeployment.snapshot`; a new snapshot is published once the EnsembleRouter
has written a candle's forecasts to the cache (:meth:`publish`), so the ingress switches to a
candle when its answers are ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from ray import serve

from configs.settings import load_settings
from deployments.feed import CandleEvent
from deployments.sharding import assign, shard_count, shard_name
from deployments.state import FeatureRow, MarketSnapshot, SymbolState
from features.builder import FeatureBuilder
from configs.errors import CandleDataError, MLEngineError
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


def _frame(times: np.ndarray, values: np.ndarray):
    import pandas as pd

    df = pd.DataFrame(values, columns=["open", "high", "low", "close", "volume"])
    df.insert(0, "open_time", times.astype(np.int64))
    return df


@serve.deployment(name="FeatureBuilder", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0.1})
class FeatureBuilderDeployment:
    """Serve wrapper of :class:`MarketState` (one shard) with a long-poll for ingress replicas."""

    def __init__(self, settings_overrides: dict[str, Any] | None = None, shard: int = 0) -> None:
        self.state = MarketState(settings_overrides, shard)
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def ingest(self, event: CandleEvent) -> IngestResult:
        return self.state.ingest(event)

    async def ingest_many(self, events: list[CandleEvent]) -> list[IngestResult | MLEngineError]:
        """One candle close of many symbols in one call; a refused event (a symbol of another shard,
        bad candles) is returned as its error, so it does not fail the others."""
        out: list[IngestResult | MLEngineError] = []
        for event in events:
            try:
                out.append(self.state.ingest(event))
            except MLEngineError as exc:
                out.append(exc)
        return out

    async def publish(self, symbol: str, open_time: int, model_versions: dict[str, str],
                      error: str | None = None) -> bool:
        return (await self.publish_many([(symbol, open_time, model_versions, error)]))[0]

    async def publish_many(self, items: list[tuple[str, int, dict[str, str], str | None]]) -> list[bool]:
        """Mark candles published (``(symbol, open_time, model_versions, error)`` each); readers are
        woken once for all of them."""
        changed = [self.state.publish(*item) for item in items]
        if any(changed):
            async with self._cond():
                self._cond().notify_all()
        return changed

    async def refresh(self, model_versions: dict[str, str]) -> int:
        """New models: re-publish every symbol's state (ingress replicas drop what they rendered)."""
        for symbol, st in list(self.state.states.items()):
            if st.open_time is not None and st.published:
                self.state.publish(symbol, st.open_time, model_versions, None)
        async with self._cond():
            self._cond().notify_all()
        return self.state.version

    async def snapshot(self, after: int = -1, timeout_s: float = 10.0, epoch: str | None = None) -> MarketSnapshot:
        """The state once its version exceeds ``after`` (or after ``timeout_s``, unchanged).

        A caller holding another incarnation's ``epoch`` gets the state at once: its ``after``
        counts publishes of a FeatureBuilder that no longer exists."""
        if epoch is not None and epoch != self.state.epoch:
            return self.state.snapshot()
        if self.state.version <= after and timeout_s > 0:
            cond = self._cond()
            async with cond:
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: self.state.version > after), timeout_s)
                except asyncio.TimeoutError:
                    pass
        return self.state.snapshot()

    async def latest_rows(self) -> list[FeatureRow]:
        return self.state.latest_rows()
