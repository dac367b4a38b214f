"""The candle close as one batched pass (the EnsembleRouter's candle-close work, issue 18).

Why batched: at a close every symbol's candle arrives at once, and the fixed costs (a Ray hop to a
FeatureBuilder shard, a call into each model pool, a Redis round trip, a log write) are paid once
per *pass* instead of once per symbol -- XGBoost predicts 200 rows in about the time of a few. So:

1. concurrent deliveries (``on_candles`` per symbol, ``on_close`` for many) queue into one
   ``@serve.batch``: what arrives while the previous pass runs (or within ``CLOSE_BATCH_WAIT_S``)
   is the next pass;
2. each FeatureBuilder shard gets its symbols' events in one ``ingest_many`` call;
3. the new feature rows go through the ensemble as one pass: each model pool gets one request
   with every row for every horizon (deployments/pool_forecast.py);
4. Redis: every ``prediction:...`` SET and every ``signals:{symbol}`` PUBLISH in one pipeline;
5. the serving log gets every forecast in one ``candle_closed`` call (one spool write; the writer
   inserts them with one multi-row statement per table);
6. each shard gets one ``publish_many``: ingress replicas then switch to the new candles.

An event's own problem (a symbol no shard holds, a shard that does not answer) fails that event
only: its MarketData actor retries it. An engine error (no model) publishes the candles with the
error, as a single symbol's close always did; any other failure fails the pass, nothing is marked
published, and the actors' retries recompute it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from deployments.feed import CandleEvent
from deployments.sharding import shard_of
from deployments.state import iso_time
from configs.errors import MLEngineError

log = logging.getLogger("ray.serve")

CLOSE_BATCH_MAX = 4096      # events in one pass (a close of every symbol, with room for retries)
CLOSE_BATCH_WAIT_S = 0.01   # how long the first event of a pass waits for the rest of its close
# One call to a shard: a dead shard's calls wait for its replacement; the pass must not (the other
# shards' symbols go on, the dead one's are retried by their actors).
SHARD_CALL_TIMEOUT_S = 5.0


class CandleClose:
    """Mixin of the EnsembleRouter: needs ``fbs`` (one handle per shard), ``settings``, ``log``,
    ``metrics``, ``candles``, ``_require``, ``_forecast`` and ``_cache``."""

    async def on_candles(self, event: CandleEvent) -> dict[str, Any]:
        """A MarketData actor delivers one symbol's closed candles; see the module docstring."""
        out = await self._close_batched(event)
        if isinstance(out, BaseException):
            raise out
        return out

    async def on_close(self, events: list[CandleEvent]) -> list[dict[str, Any]]:
        """Many symbols' events in one call; an event that failed has ``failed`` (retry it)."""
        outs = await asyncio.gather(*(self._close_batched(e) for e in events))
        return [o if not isinstance(o, BaseException) else
                {"symbol": e.symbol, "failed": f"{type(o).__name__}: {o}"[:300], "needs_history": False}
                for e, o in zip(events, outs)]

    @serve.batch(max_batch_size=CLOSE_BATCH_MAX, batch_wait_timeout_s=CLOSE_BATCH_WAIT_S)
    async def _close_batched(self, events: list[CandleEvent]) -> list[Any]:
        try:
            return await self.close_candles(events)
        except Exception as exc:  # returned, not raised: each caller raises its own copy
            return [exc] * len(events)

    async def _ingest(self, events: list[CandleEvent]) -> list[Any]:
        """Each shard's events in one call; per event its IngestResult or the error."""
        by_shard: dict[int, list[int]] = {}
        for i, e in enumerate(events):
            by_shard.setdefault(shard_of(e.symbol, len(self.fbs)), []).append(i)
        out: list[Any] = [None] * len(events)

        async def one(shard: int, idx: list[int]) -> None:
            try:
                res = await asyncio.wait_for(self.fbs[shard].ingest_many.remote([events[i] for i in idx]),
                                             SHARD_CALL_TIMEOUT_S)
            except Exception as exc:  # a shard restarting: its events are retried by their actors
                res = [exc if not isinstance(exc, asyncio.TimeoutError) else
                       TimeoutError(f"FeatureBuilder shard {shard} did not answer within {SHARD_CALL_TIMEOUT_S} s")
                       ] * len(idx)
            for i, r in zip(idx, res):
                out[i] = r

        await asyncio.gather(*(one(s, idx) for s, idx in by_shard.items()))
        return out

    async def close_candles(self, events: list[CandleEvent]) -> list[Any]:
        """One pass over the events of a close (see the module docstring); per event its summary or
        the exception its actor should retry on."""
        results = await self._ingest(events)
        out: list[Any] = [None] * len(events)
        todo: dict[str, int] = {}  # symbol -> the event whose candle is computed (the newest, if sent twice)
        for i, (event, res) in enumerate(zip(events, results)):
            if isinstance(res, BaseException):
                out[i] = res
                continue
            out[i] = {"symbol": res.symbol, "open_time": res.open_time, "accepted": res.accepted,
                      "rejected": res.rejected, "published": False, "needs_history": res.needs_history}
            if res.needs_history:  # a restarted shard: the actor resends its window, then this event
                out[i]["open_time"] = None
                continue
            if res.process:
                todo[res.symbol] = i
        if todo:
            await self._compute_and_publish(events, results, out, list(todo.values()))
        return out

    async def _compute_and_publish(self, events: list[CandleEvent], results: list[Any], out: list[Any],
                                   todo: list[int]) -> None:
        ready = [i for i in todo if results[i].row is not None]
        errors = {i: results[i].reason for i in todo if results[i].row is None}
        versions: dict[str, str] = {}
        try:
            if ready:
                ens = self._require()
                versions = ens.versions
                rows = [results[i].row for i in ready]
                forecasts = await self._forecast(ens, rows)
                await self._cache(forecasts, rows, publish=True,
                                  ttl_s={events[i].symbol: events[i].expires_in_s for i in ready})
                self.candles += len(rows)
                for f in forecasts:
                    self.metrics.precomputed(f.symbol, f.horizon)
                try:
                    self.log.candle_closed(forecasts)
                except Exception:  # the log must not stop the pipeline
                    log.exception("serving log hook failed")
        except MLEngineError as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("%d symbols, candle %s: no forecasts: %s", len(ready), iso_time(results[ready[0]].open_time),
                        error)
            errors.update({i: error for i in ready})
        await self._publish(results, out, todo, versions, errors)

    async def _publish(self, results: list[Any], out: list[Any], todo: list[int], versions: dict[str, str],
                       errors: dict[int, str | None]) -> None:
        """Each shard marks its candles published (one call per shard)."""
        by_shard: dict[int, list[int]] = {}
        for i in todo:
            by_shard.setdefault(shard_of(results[i].symbol, len(self.fbs)), []).append(i)

        async def one(shard: int, idx: list[int]) -> None:
            items = [(results[i].symbol, results[i].open_time, versions if i not in errors else {}, errors.get(i))
                     for i in idx]
            try:
                done = await asyncio.wait_for(self.fbs[shard].publish_many.remote(items), SHARD_CALL_TIMEOUT_S)
            except Exception as exc:  # a shard died meanwhile: it is re-seeded at the next candle
                log.warning("shard %d: candles not marked published: %s", shard, exc)
                done = [False] * len(idx)
            for i, ok in zip(idx, done):
                out[i]["published"] = ok
                out[i]["error"] = errors.get(i)

        await asyncio.gather(*(one(s, idx) for s, idx in by_shard.items()))
