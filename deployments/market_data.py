"""MarketData Ray actors (a group of symbols each); the MarketFeed deployment that owns them is
:mod:`deployments.market_feed`.

A MarketData actor runs a :class:`SymbolFeed` per symbol of its group (``feed_symbols_per_actor``:
a process per symbol would not fit hundreds of symbols), each with one source (:mod:`deployments.feed`:
replay, :mod:`deployments.binance_feed`: Binance), delivering each closed-candle event to the
EnsembleRouter, in order, retrying until it is accepted (the router batches a close's concurrent
deliveries into one pass, deployments/close.py): while the graph restarts a candle waits instead of being lost. The MarketFeed deployment
(one replica) creates the actors when the application starts -- so ``serve deploy`` alone brings
the feed up -- restarts them if they die, and offers pause / resume / step for replays (operators,
tests).

Continuity: a source that dies for any reason (the initial history fetch included) is restarted
with exponential backoff (tenacity) after the last candle the graph took, and a new actor (after
a kill, or a new MarketFeed replica) resumes after the newest candle the FeatureBuilder holds --
replay or live, never from the start of the file and never skipping. A symbol whose actor has
delivered nothing for two candle intervals (feed time) reports ``stale`` (``/health/detailed``,
``ml_feed_stale``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import ray
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from configs.settings import Settings, load_settings
from configs.symbols import real_symbol
from deployments.binance_actor import RemoteHub
from deployments.binance_feed import BinanceSource
from deployments.feed import HISTORY_CANDLES, CandleEvent, CandleWindow, FeedClock, ReplaySource
from deployments.hooks import NullServingLog, ServingLog, load_serving_log
from deployments.prometheus import EngineMetrics
from deployments.outbox import Outbox
from features.candles import FIVE_MINUTES_MS
from configs.errors import MarketDataError
from features.indicators import WARMUP

log = logging.getLogger("ray.serve")

STALE_INTERVALS = 2     # no candle for this many intervals (feed time): the symbol's feed is stale
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0   # backoff between restarts of a dead feed task
# Running states a stale feed's state replaces (paused, finished and error say more than "stale").
_STALE_REPLACES = frozenset({"starting", "streaming", "backfilling", "reconnecting"})


def replay_file(settings: Settings, symbol: str):
    """The candle file ``symbol`` replays: ``replay_files``, else the sample of its real symbol (a
    synthetic symbol replays a time-shifted copy of its source's file: configs/symbols.py)."""
    source = real_symbol(symbol)
    return (settings.replay_files.get(symbol) or settings.replay_files.get(source)
            or settings.sample_dir / f"{source}_5m.parquet")


def make_source(settings: Settings, symbol: str, hub=None) -> ReplaySource | BinanceSource:
    """The source ``Settings.feed`` names, for one symbol (``hub``: the MarketFeed's Binance hub
    actor, deployments/binance_actor.py; None: the source makes a private one)."""
    if settings.feed == "binance":
        return BinanceSource(symbol, api_url=settings.binance_api_url, ws_url=settings.binance_ws_url,
                             history=WARMUP + 12, hub=None if hub is None else RemoteHub(hub))
    return ReplaySource.from_file(symbol, replay_file(settings, symbol), speed=settings.replay_speed,
                                  history=settings.replay_history)


class SymbolFeed:
    """Streams one symbol's closed candles into the graph (see the module docstring); a MarketData
    actor runs one per symbol of its group.

    ``resume_after``: the newest candle the caller knows was delivered (a hint; the FeatureBuilder's
    own newest candle, asked through the router at start, wins when it is newer).
    """

    def __init__(self, symbol: str, router, settings: Settings, metrics: EngineMetrics,
                 resume_after: int | None = None, outbox: Outbox | None = None, hub=None,
                 serving_log: ServingLog | None = None) -> None:
        self.symbol = symbol
        self.router = router
        self.outbox = outbox or Outbox(router)
        self.log = serving_log or NullServingLog()  # the outcome resolver's candles (role "feed")
        self.settings = settings
        self.source = make_source(self.settings, symbol, hub)
        self.delivered = 0
        self.delivery_failures = 0
        self.last_delivery_error: str | None = None
        self.last_delivered_at: float | None = None
        self.last_open_time: int | None = resume_after  # the newest candle the graph has taken
        self.resumed_after: int | None = None
        self._clock: FeedClock | None = None            # the feed clock of the newest delivered event
        self._started = time.time()
        self.restarts = 0
        self.metrics = metrics
        self._task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._delivered_event = asyncio.Event()
        # The engine's one candle history of this symbol (delivered candles, plus the one being
        # delivered): a restarted FeatureBuilder is re-seeded from it, so it answers at the next
        # candle, not 1000 candles later, and a restarted outcome resolver is refilled from it.
        self.window = CandleWindow(symbol, 2 * WARMUP, self.settings.features.max_bridge_candles,
                                   keep=HISTORY_CANDLES)
        self.reseeds = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
            self._watch = asyncio.create_task(self._watch_stale())

    async def _resume_point(self) -> int | None:
        """Where to continue: the FeatureBuilder's newest candle of this symbol, or the hint."""
        try:
            async for attempt in AsyncRetrying(stop=stop_after_delay(60), wait=wait_exponential(max=5), reraise=True):
                with attempt:
                    newest = await asyncio.wait_for(self.router.newest_candle.remote(self.symbol), timeout=10)
        except Exception as exc:  # the graph does not answer: the hint is the best there is
            log.warning("%s: newest candle unknown (%s); resuming after %s", self.symbol, exc, self.last_open_time)
            newest = None
        known = [t for t in (newest, self.last_open_time) if t is not None]
        return max(known) if known else None

    async def _run(self) -> None:
        """Run the source to its end (a replay's last candle); a source that dies for any reason is
        restarted with backoff, after the last candle delivered."""
        self.last_open_time = self.resumed_after = await self._resume_point()
        async for attempt in AsyncRetrying(retry=retry_if_exception_type(Exception), before_sleep=self._restarting,
                                           wait=wait_exponential(min=RESTART_MIN_S, max=RESTART_MAX_S)):
            with attempt:
                self.source.resume_after(self.last_open_time)
                async for event in self.source.events():
                    await self._deliver(event)

    def _restarting(self, state) -> None:
        exc = state.outcome.exception()
        self.restarts += 1
        self.source.status.state = "error"
        self.source.status.last_error = f"{type(exc).__name__}: {exc}"[:300]
        self.metrics.feed_restarted(self.symbol)
        log.warning("%s market data stopped (%s); restart %d in %.1fs, after candle %s", self.symbol,
                    self.source.status.last_error, self.restarts, state.upcoming_sleep, self.last_open_time)

    # ---- staleness -------------------------------------------------------------------------
    def is_stale(self) -> bool:
        """Nothing delivered for ``STALE_INTERVALS`` candle intervals of feed time."""
        limit = STALE_INTERVALS * FIVE_MINUTES_MS
        if self._clock is None or self.last_open_time is None:  # nothing yet: count from the start
            rate = getattr(self.source, "speed", 0.0) or 1.0
            return (time.time() - self._started) * 1000.0 * rate > limit
        return self._clock.now_ms() - (self.last_open_time + FIVE_MINUTES_MS) > limit

    async def _watch_stale(self) -> None:
        rate = getattr(self.source, "speed", 0.0) or 1.0
        period = max(0.2, min(5.0, FIVE_MINUTES_MS / 1000.0 / rate / 4))
        while True:
            try:
                self.metrics.feed_stale(self.symbol, self.is_stale())
            except Exception:  # the watch must outlive a metrics hiccup
                log.exception("%s: feed staleness", self.symbol)
            await asyncio.sleep(period)

    async def _deliver(self, event: CandleEvent) -> None:
        self.window.remember(event)
        candles = len(event.open_time)  # a re-seed resends old candles: count the event's own only
        delay = 0.2
        while True:
            try:  # bounded: a router replica that died mid-call must not hold the symbol forever
                summary = await self.outbox.send(event)
                if summary["needs_history"] and len(self.window):
                    self.reseeds += 1
                    log.warning("%s: the FeatureBuilder lost its windows; re-seeding it with %d candles",
                                self.symbol, len(self.window))
                    event = self.window.history_event(event.clock, event.source)
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the graph is (re)starting: wait, never drop the candle
                self.delivery_failures += 1
                self.last_delivery_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("%s: delivery failed (%s), retrying in %.1fs", self.symbol, self.last_delivery_error,
                            delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._taken(event)
            self.delivered += candles
            self.last_delivered_at = time.time()
            self.last_open_time = max(event.last_open_time, self.last_open_time or event.last_open_time)
            self._clock = event.clock
            self._delivered_event.set()
            return

    def _taken(self, event: CandleEvent) -> None:
        """The graph took ``event``: its candles go on to the outcome resolver (never into delivery)."""
        try:
            self.log.candles_closed(event, self.window)
        except Exception:
            log.exception("%s: serving log hook failed", self.symbol)

    async def wait_done(self) -> None:
        """Returns when the source has ended (a finished replay); MarketFeed's watcher waits on it."""
        while self._task is None:
            await asyncio.sleep(0.1)
        await asyncio.shield(self._task)

    # ---- control (replay only) -------------------------------------------------------------
    def _replay(self) -> ReplaySource:
        if not isinstance(self.source, ReplaySource):
            raise MarketDataError(f"{self.symbol}: only a replay can be paused or stepped")
        return self.source

    async def pause(self) -> dict[str, Any]:
        self._replay().pause()
        return self.status()

    async def resume(self) -> dict[str, Any]:
        self._replay().resume()
        return self.status()

    async def step(self, n: int = 1, wait_s: float = 30.0) -> dict[str, Any]:
        """Deliver the next ``n`` candles; returns once the graph has processed them."""
        target = self.delivered + n
        self._replay().step(n)
        deadline = time.monotonic() + wait_s
        while self.delivered < target and time.monotonic() < deadline:
            self._delivered_event.clear()
            try:
                await asyncio.wait_for(self._delivered_event.wait(), timeout=max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        return self.status()

    def status(self) -> dict[str, Any]:
        st = self.source.status.as_dict()
        stale = self.is_stale()
        if stale and st["state"] in _STALE_REPLACES:
            st["state"] = "stale"
        st.update(delivered=self.delivered, delivery_failures=self.delivery_failures, reseeds=self.reseeds,
                  last_delivery_error=self.last_delivery_error, last_delivered_at=self.last_delivered_at,
                  last_delivered_open_time=self.last_open_time, resumed_after=self.resumed_after,
                  stale=stale, restarts=self.restarts, pid=os.getpid(),
                  running=self._task is not None and not self._task.done())
        if isinstance(self.source, ReplaySource):
            st.update(speed=self.source.speed, remaining=self.source.remaining, paused=self.source.paused)
        return st


def feed_groups(symbols: list[str], per_actor: int) -> list[list[str]]:
    """The symbols of each MarketData actor, ``per_actor`` at most (in the configured order)."""
    return [symbols[i:i + per_actor] for i in range(0, len(symbols), per_actor)]


@ray.remote(num_cpus=0, max_restarts=0)
class MarketData:
    """One process streaming a group of symbols (``Settings.feed_symbols_per_actor``), one
    :class:`SymbolFeed` each: a Ray worker per symbol would cost hundreds of MiB per symbol.

    ``resume_after``: per symbol (or for a single symbol) the newest candle the caller knows was
    delivered. The per-symbol methods take ``symbol``; None means the actor's only symbol.
    """

    def __init__(self, symbols: str | list[str], router, settings_overrides: dict[str, Any] | None = None,
                 resume_after: int | dict[str, int] | None = None, hub=None) -> None:
        symbols = [symbols] if isinstance(symbols, str) else list(symbols)
        settings = load_settings(**(settings_overrides or {}))
        metrics = EngineMetrics(use_ray=True)
        hints = resume_after if isinstance(resume_after, dict) else {symbols[0]: resume_after}
        outbox = Outbox(router)
        self.log = load_serving_log(settings, "feed")  # candles to the outcome resolver
        self.feeds = {s: SymbolFeed(s, router, settings, metrics, hints.get(s), outbox, hub, self.log)
                      for s in symbols}

    def _feed(self, symbol: str | None) -> SymbolFeed:
        if symbol is None:
            if len(self.feeds) != 1:
                raise MarketDataError(f"this MarketData actor streams {list(self.feeds)}: name the symbol")
            return next(iter(self.feeds.values()))
        if symbol not in self.feeds:
            raise MarketDataError(f"no feed for {symbol} in this MarketData actor ({list(self.feeds)})")
        return self.feeds[symbol]

    async def start(self) -> None:
        await self.log.start()
        for feed in self.feeds.values():
            await feed.start()

    async def wait_done(self) -> None:
        """Returns when every source has ended (finished replays); MarketFeed's watcher waits on it."""
        await asyncio.gather(*(feed.wait_done() for feed in self.feeds.values()))

    async def pause(self, symbol: str | None = None) -> dict[str, Any]:
        return await self._feed(symbol).pause()

    async def resume(self, symbol: str | None = None) -> dict[str, Any]:
        return await self._feed(symbol).resume()

    async def step(self, n: int = 1, wait_s: float = 30.0, symbol: str | None = None) -> dict[str, Any]:
        return await self._feed(symbol).step(n, wait_s)

    async def step_all(self, n: int = 1, wait_s: float = 30.0) -> dict[str, Any]:
        """Every symbol's next ``n`` candles at once (a close of the whole group); returns once the
        graph has processed them."""
        feeds = list(self.feeds.values())
        done = await asyncio.gather(*(f.step(n, wait_s) for f in feeds))
        return {f.symbol: st for f, st in zip(feeds, done)}

    def status(self, symbol: str | None = None) -> dict[str, Any]:
        return self._feed(symbol).status()

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {s: feed.status() for s, feed in self.feeds.items()}
