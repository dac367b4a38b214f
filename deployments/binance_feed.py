"""Closed 5-minute klines from Binance (REST history, then the kline websocket), judged by exchange time.

Why exchange time: whether a candle is closed is the exchange's fact, not the host's. A host clock
that runs fast would take the still-open candle the REST endpoint returns last for a closed one (and
then drop the real close as already seen); a slow one would wait for candles long closed. So:

* on the websocket a candle is closed when the kline message says so (``k.x``);
* over REST a row is closed when a newer row follows it, or when its close time is before the
  exchange's time: the local clock plus the offset measured against ``GET /api/v3/time`` before
  a catch-up, unless measured within the last minute (a lower bound: the server's answer counts
  from when it reached us). Until one
  measurement succeeds, only the "a newer row follows" rule is trusted.

No Ray in this module; :mod:`deployments.market_data` runs it in an actor.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pandas as pd
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from deployments.binance_hub import bounded
from deployments.feed import _FIELDS, CandleEvent, EventKind, FeedClock, FeedStatus, _event
from features.candles import FIVE_MINUTES_MS
from configs.errors import MarketDataError

log = logging.getLogger(__name__)

RESYNC_S = 60.0  # a clock offset measured less than this long ago (local time) is reused by a catch-up


def stream_root(ws_url: str) -> str:
    """The stream root of ``binance_ws_url`` (the root or its ``.../ws`` spelling): combined streams
    live at ``<root>stream?streams=...`` (deployments/binance_hub.py), single ones at ``<root>ws/<stream>``."""
    url = ws_url.strip().rstrip("/")
    if url.endswith("/ws"):
        url = url[: -len("/ws")]
    return url + "/"


def kline_message_candle(msg: dict[str, Any]) -> tuple[int, np.ndarray, bool]:
    """(open_time, [o, h, l, c, v], closed) from a Binance kline stream message."""
    try:
        k = msg["k"]
        row = np.array([float(k["o"]), float(k["h"]), float(k["l"]), float(k["c"]), float(k["v"])])
        return int(k["t"]), row, bool(k["x"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MarketDataError(f"malformed kline message: {msg!r:.200}") from exc


class ExchangeClock:
    """The exchange's time as the local clock plus a measured offset.

    ``sync`` asks ``GET /api/v3/time``; the offset is ``serverTime - local time when the answer
    arrived``, so ``now_ms`` never runs ahead of the exchange (it may lag by the request's round trip,
    which only delays judging a candle closed).
    """

    def __init__(self, local: Callable[[], float] = time.time) -> None:
        self.local = local
        self.offset_ms: float | None = None
        self.round_trip_ms: float | None = None
        self.synced_at = -float("inf")  # local time of the last measurement

    @property
    def synced(self) -> bool:
        return self.offset_ms is not None

    def now_ms(self) -> float:
        return self.local() * 1000.0 + (self.offset_ms or 0.0)

    async def sync(self, client, timeout_s: float) -> None:
        t0 = self.local()
        answer = await bounded(client.get_server_time(), timeout_s)
        t1 = self.local()
        self.offset_ms = float(int(answer["serverTime"])) - t1 * 1000.0
        self.round_trip_ms = (t1 - t0) * 1000.0
        self.synced_at = t1

    def feed_clock(self) -> FeedClock:
        """A feed clock at the exchange's time now (data age is measured on the exchange's clock)."""
        wall = self.local()
        return FeedClock(wall, wall * 1000.0 + (self.offset_ms or 0.0), 1.0)


def closed_rows(page: pd.DataFrame, exchange_now_ms: float | None) -> pd.DataFrame:
    """The rows of a klines page that have closed: followed by a newer row, or with a close time
    before the exchange's time (``None``: not known, only the first rule applies)."""
    followed = np.zeros(len(page), dtype=bool)
    followed[:-1] = True
    closed = followed if exchange_now_ms is None else followed | (page["close_time"].to_numpy() < exchange_now_ms)
    return page[closed]


class BinanceSource:
    """Closed 5-minute klines of one symbol from Binance: REST history, then the kline websocket.

    No closed candle is missed: at start, after every disconnect, whenever the stream skips a
    candle, and when no candle closes for longer than expected, the missing range is fetched
    over REST before anything newer is delivered. Candles are delivered once each, in order;
    holes the exchange itself has (a trading halt) are delivered as flagged gaps. ``resume_after``
    makes a restarted source continue after the last candle the graph took.

    Stream and REST go through a :class:`deployments.binance_hub.BinanceHub` (``hub``): one combined
    websocket for many symbols, which reports drops and reconnects as messages in this symbol's
    queue, and REST paced by the exchange's request-weight headers. A source without a hub makes a
    private one for each run of :meth:`events`.
    ``wall`` is the local clock (tests run the source with it skewed against the exchange's).
    """

    def __init__(self, symbol: str, *, api_url: str, ws_url: str, history: int = 1000, interval: str = "5m",
                 grace_s: float = 10.0, retry_s: float = 1.0, max_retry_s: float = 30.0,
                 request_timeout_s: float = 15.0, wall: Callable[[], float] = time.time, hub=None) -> None:
        if interval != "5m":
            raise MarketDataError(f"the engine trades 5-minute candles, not {interval!r}")
        self.symbol = symbol
        self.interval = interval
        self.api_url = api_url
        self.ws_url = ws_url
        self.history = int(history)
        self.grace_s = grace_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.request_timeout_s = request_timeout_s
        self.clock = ExchangeClock(wall)
        self.hub = hub  # a shared BinanceHub (or its Ray actor's proxy); None: a private one per run
        self._last: int | None = None
        self.status = FeedStatus(symbol, "binance")

    def resume_after(self, open_time: int | None) -> None:
        """Continue after candle ``open_time`` (the REST catch-up starts with the one after it)."""
        if open_time is not None:
            self._last = int(open_time)

    def _private_hub(self):
        """A hub of this symbol alone (a source run without the MarketFeed's shared hub: tests, tools)."""
        from deployments.binance_hub import BinanceHub

        return BinanceHub([self.symbol], api_url=self.api_url, ws_url=self.ws_url, interval=self.interval,
                          retry_s=self.retry_s, max_retry_s=self.max_retry_s,
                          request_timeout_s=self.request_timeout_s)

    # ---- REST ------------------------------------------------------------------------------
    async def _sync_clock(self, client) -> float | None:
        """Measure the exchange's time; on failure keep the last offset (None if there never was one)."""
        if self.clock.synced and self.clock.local() - self.clock.synced_at < RESYNC_S:
            return self.clock.now_ms()  # measured a moment ago: hundreds of symbols need not ask again
        try:
            await self.clock.sync(client, self.request_timeout_s)
            self.status.clock_offset_ms = round(self.clock.offset_ms or 0.0, 1)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.status.last_error = f"REST time: {type(exc).__name__}: {exc}"[:300]
            log.warning("%s: %s; judging closed candles by %s", self.symbol, self.status.last_error,
                        "the last offset" if self.clock.synced else "the next row only")
        return self.clock.now_ms() if self.clock.synced else None

    async def _get_klines(self, client, start_ms: int) -> list:
        """One page of klines, retried with backoff until it works (network, 5xx/429, bad JSON)."""
        from features.klines_api import PAGE_LIMIT

        def note(state) -> None:
            exc = state.outcome.exception()
            self.status.last_error = f"REST klines: {type(exc).__name__}: {exc}"[:300]
            log.warning("%s: %s; retrying in %.1fs", self.symbol, self.status.last_error, state.upcoming_sleep)

        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Exception), before_sleep=note, reraise=True,
                wait=wait_exponential(multiplier=self.retry_s, min=self.retry_s, max=self.max_retry_s)):
            with attempt:
                return await bounded(
                    client.get_klines(symbol=self.symbol, interval=self.interval, startTime=start_ms,
                                      limit=PAGE_LIMIT), self.request_timeout_s)
        raise AssertionError("unreachable: the retry never stops")

    async def _fetch_closed(self, client, start_ms: int, exchange_now: float | None) -> pd.DataFrame:
        """Every closed candle with open_time >= start_ms, paging forward (``exchange_now``: see
        :func:`closed_rows`)."""
        from features.klines_api import PAGE_LIMIT, klines_to_frame

        pages: list[pd.DataFrame] = []
        cursor = start_ms
        while True:
            rows = await self._get_klines(client, cursor)
            if not rows:
                break
            page = closed_rows(klines_to_frame(rows), exchange_now)
            if not page.empty:
                pages.append(page)
            if len(rows) < PAGE_LIMIT or page.empty:
                break
            cursor = int(page["open_time"].iloc[-1]) + FIVE_MINUTES_MS
        if not pages:
            return pd.DataFrame(columns=["open_time", *_FIELDS])
        df = pd.concat(pages, ignore_index=True).drop_duplicates("open_time").sort_values("open_time")
        return df[["open_time", *_FIELDS]].reset_index(drop=True)

    async def _catch_up(self, client, kind: EventKind) -> CandleEvent | None:
        """The closed candles after the last delivered one (or the last ``history`` at start)."""
        exchange_now = await self._sync_clock(client)
        if self._last is None:
            now_ms = int(self.clock.now_ms())
            start = now_ms - now_ms % FIVE_MINUTES_MS - self.history * FIVE_MINUTES_MS
        else:
            start = self._last + FIVE_MINUTES_MS
        self.status.backfills += 1
        df = await self._fetch_closed(client, start, exchange_now)
        if self._last is not None:
            df = df[df["open_time"] > self._last]
        if df.empty:
            return None
        return self._emit(df, kind)

    def _emit(self, df: pd.DataFrame, kind: EventKind) -> CandleEvent:
        ev = _event(self.symbol, df, kind, self.clock.feed_clock(), "binance", self._last)
        for gap in ev.gaps:
            log.warning("%s: no candles between %d and %d (flagged as a gap)", self.symbol, *gap)
        self._last = ev.last_open_time
        st = self.status
        st.candles += len(df)
        st.last_open_time = self._last
        st.gaps.extend(ev.gaps)
        return ev

    # ---- stream ----------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[CandleEvent]:
        private = self.hub is None
        client = self._private_hub() if private else self.hub
        try:
            ev = await self._catch_up(client, "history" if self._last is None else "backfill")
            if ev is not None:
                yield ev
            token, connected = await client.subscribe(self.symbol)
            self.status.state = "streaming"
            if connected:  # candles that closed while we were subscribing (else: at the connect notice)
                ev = await self._catch_up(client, "backfill")
                if ev is not None:
                    yield ev
            async for ev in self._read(client, token):
                yield ev
        finally:
            if private:
                await client.close()

    async def _read(self, client, token: int) -> AsyncIterator[CandleEvent]:
        poll_at = -math.inf  # exchange ms before which a silent stream is not polled over REST again
        while True:
            # Expect a close every 5 minutes (exchange time); if none arrives by then (+ grace), ask
            # REST -- whatever else the queue brings (a stream that keeps failing sends notices) --
            # and, while REST has nothing newer either (a halt), again every ``grace_s``.
            due = max((self._last or 0) + 2 * FIVE_MINUTES_MS + self.grace_s * 1000.0, poll_at)
            wait_s = (due - self.clock.now_ms()) / 1000.0
            messages = await client.recv(self.symbol, token, wait_s) if wait_s > 0 else []
            if not messages and self.clock.now_ms() >= due:
                ev = await self._catch_up(client, "backfill")
                if ev is not None:
                    yield ev
                poll_at = self.clock.now_ms() + self.grace_s * 1000.0
                continue
            for msg in messages:
                async for ev in self._handle(client, msg):
                    yield ev

    async def _handle(self, client, msg: dict[str, Any]) -> AsyncIterator[CandleEvent]:
        """One message of this symbol's queue on the hub's combined stream."""
        kind = msg.get("e")
        if kind == "error":
            if msg.get("type") == "superseded":  # a newer consumer of this symbol took over
                raise MarketDataError(f"{self.symbol}: another consumer subscribed to the stream")
            # The combined connection dropped; the hub reconnects by itself (with backoff) and says
            # so. Catching up now as well would double every symbol's REST load on each drop; if the
            # stream stays down, the timer of _read asks REST when the next candle is due.
            self.status.state = "reconnecting"
            self.status.reconnects += 1
            self.status.last_error = f"websocket: {msg.get('type')}: {msg.get('m')}"[:300]
            return
        if kind == "reconnected":  # (re)connected: what closed meanwhile, over REST
            self.status.state = "streaming"
            ev = await self._catch_up(client, "backfill")
            if ev is not None:
                yield ev
            return
        if kind != "kline":
            return
        open_time, row, closed = kline_message_candle(msg)  # closed: the exchange's own flag
        self.status.state = "streaming"
        if not closed or (self._last is not None and open_time <= self._last):
            return  # an update of the open candle, or one we already delivered
        if self._last is not None and open_time > self._last + FIVE_MINUTES_MS:
            ev = await self._catch_up(client, "backfill")  # the stream skipped candles
            if ev is not None:
                yield ev
            if self._last is not None and open_time <= self._last:
                return
        df = pd.DataFrame([[open_time, *row]], columns=["open_time", *_FIELDS])
        yield self._emit(df, "live")
