"""The FeatureBuilder deployment: one shard's market state (``deployments.market_state``) in Serve.

Sharded by symbol (:mod:`deployments.sharding`): ``Settings.feature_shards`` deployments
``FeatureBuilder``, ``FeatureBuilder1``, ... of one replica each, every one holding the windows of
the symbols the rendezvous hash gives it (the windows are state: a second replica of one shard
would hold other windows). A killed shard is restarted by Serve and re-seeded symbol by symbol
from the MarketData actors' windows; the other shards never notice. Each shard's
:class:`~deployments.market_state.MarketState` computes the newest candle's feature row and keeps,
per symbol, what the API needs to answer without a hop. Ingress replicas long-poll
:meth:`FeatureBuilderDeployment.snapshot`; a new snapshot is published once the EnsembleRouter
has written a candle's forecasts to the cache (:meth:`publish`), so the ingress switches to a
candle when its answers are ready.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from configs.errors import MLEngineError
from deployments.feed import CandleEvent
from deployments.market_state import IngestResult, MarketState
from deployments.state import FeatureRow, MarketSnapshot


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
