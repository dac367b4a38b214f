"""Closed 5-minute klines from Binance (REST history, then the kline websocket), judged by exchange time.

Why exchange time: whether a candle is closed is the exchange's fact, not the host's. A host clock
that runs fast would take the still-open candle the REST endpoint returns last for a closed one (and
then drop the real close as already seen); a slow one would wait for candles long closed. So:

* on the websocket a candle is closed when the kline message says so (``k.x``);
* over REST a row is closed when a newer row follows it, or when its close time is before the
  exchange's time: the local clock plus the offset measured against ``GET /api/v3/time`` before
  every catch-up (a lower bound: the server's answer counts from when it reached us). Until one
  measurement succeeds, only the "a newer row follows" rule is trusted.

No Ray in this module; :mod:`deployments.market_data` runs it in an actor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pandas as pd
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from deployments.feed import _FIELDS, CandleEvent, EventKind, FeedClock, FeedStatus, _event
from features.candles import FIVE_MINUTES_MS
from features.errors import MarketDataError

log = logging.getLogger(__name__)


def stream_root(ws_url: str) -> str:
    """python-binance appends ``ws/<stream>`` to its stream root; accept the root or ``.../ws``."""
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

    @property
    def synced(self) -> bool:
        return self.offset_ms is not None

    def now_ms(self) -> float:
        return self.local() * 1000.0 + (self.offset_ms or 0.0)

    async def sync(self, client, timeout_s: float) -> None:
        t0 = self.local()
        answer = await asyncio.wait_for(client.get_server_time(), timeout=timeout_s)
        t1 = self.local()
        self.offset_ms = float(int(answer["serverTime"])) - t1 * 1000.0
        self.round_trip_ms = (t1 - t0) * 1000.0

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

    The websocket is python-binance's ``BinanceSocketManager.kline_socket`` (which reconnects by
    itself and reports drops as ``{"e": "error"}`` messages); REST is ``AsyncClient.get_klines``.
    ``wall`` is the local clock (tests run the source with it skewed against the exchange's).
    """

    def __init__(self, symbol: str, *, api_url: str, ws_url: str, history: int = 1000, interval: str = "5m",
                 grace_s: float = 10.0, retry_s: float = 1.0, max_retry_s: float = 30.0,
                 request_timeout_s: float = 15.0, wall: Callable[[], float] = time.time) -> None:
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
        self._last: int | None = None
        self.status = FeedStatus(symbol, "binance")

    def resume_after(self, open_time: int | None) -> None:
        """Continue after candle ``open_time`` (the REST catch-up starts with the one after it)."""
        if open_time is not None:
            self._last = int(open_time)

    def _client(self):  # python-binance AsyncClient pointed at ``api_url``
        from binance import AsyncClient

        from features.download import api_root

        client = AsyncClient()
        client.API_URL = api_root(self.api_url)
        return client

    # ---- REST ------------------------------------------------------------------------------
    async def _sync_clock(self, client) -> float | None:
        """Measure the exchange's time; on failure keep the last offset (None if there never was one)."""
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
        from features.download import PAGE_LIMIT

        def note(state) -> None:
            exc = state.outcome.exception()
            self.status.last_error = f"REST klines: {type(exc).__name__}: {exc}"[:300]
            log.warning("%s: %s; retrying in %.1fs", self.symbol, self.status.last_error, state.upcoming_sleep)

        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Exception), before_sleep=note, reraise=True,
                wait=wait_exponential(multiplier=self.retry_s, min=self.retry_s, max=self.max_retry_s)):
            with attempt:
                return await asyncio.wait_for(
                    client.get_klines(symbol=self.symbol, interval=self.interval, startTime=start_ms,
                                      limit=PAGE_LIMIT), timeout=self.request_timeout_s)
        raise AssertionError("unreachable: the retry never stops")

    async def _fetch_closed(self, client, start_ms: int, exchange_now: float | None) -> pd.DataFrame:
        """Every closed candle with open_time >= start_ms, paging forward (``exchange_now``: see
        :func:`closed_rows`)."""
        from features.download import PAGE_LIMIT, klines_to_frame

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
        from binance import BinanceSocketManager

        client = self._client()
        delay = self.retry_s
        try:
            ev = await self._catch_up(client, "history" if self._last is None else "backfill")
            if ev is not None:
                yield ev
            while True:
                manager = BinanceSocketManager(client)
                manager.STREAM_URL = stream_root(self.ws_url)
                socket = manager.kline_socket(self.symbol, self.interval)
                try:
                    async with socket as stream:
                        self.status.state = "streaming"
                        # Candles that closed while we were (re)connecting.
                        ev = await self._catch_up(client, "backfill")
                        if ev is not None:
                            yield ev
                        delay = self.retry_s
                        async for ev in self._read(client, stream):
                            yield ev
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the socket gave up (python-binance stops after 5 retries)
                    self.status.last_error = f"websocket: {type(exc).__name__}: {exc}"[:300]
                    log.warning("%s: %s; reconnecting in %.1fs", self.symbol, self.status.last_error, delay)
                self.status.state = "reconnecting"
                self.status.reconnects += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_s)
        finally:
            await client.close_connection()

    async def _read(self, client, stream) -> AsyncIterator[CandleEvent]:
        while True:
            # Expect a close every 5 minutes (exchange time); if none arrives by then (+ grace), ask REST.
            due = (self._last or 0) + 2 * FIVE_MINUTES_MS
            wait_s = max(1.0, (due - self.clock.now_ms()) / 1000.0 + self.grace_s)
            try:
                msg = await asyncio.wait_for(stream.recv(), timeout=wait_s)
            except asyncio.TimeoutError:
                ev = await self._catch_up(client, "backfill")
                if ev is not None:
                    yield ev
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("e") == "error":
                # The connection dropped; python-binance reconnects by itself. Catch up over REST now,
                # and again when the next closed candle shows a hole.
                self.status.state = "reconnecting"
                self.status.reconnects += 1
                self.status.last_error = f"websocket: {msg.get('type')}: {msg.get('m')}"[:300]
                if msg.get("type") in ("BinanceWebsocketUnableToConnect", "BinanceWebsocketQueueOverflow"):
                    raise MarketDataError(self.status.last_error)
                ev = await self._catch_up(client, "backfill")
                if ev is not None:
                    yield ev
                continue
            if msg.get("e") != "kline":
                continue
            open_time, row, closed = kline_message_candle(msg)  # closed: the exchange's own flag
            self.status.state = "streaming"
            if not closed or (self._last is not None and open_time <= self._last):
                continue  # an update of the open candle, or one we already delivered
            if self._last is not None and open_time > self._last + FIVE_MINUTES_MS:
                ev = await self._catch_up(client, "backfill")  # the stream skipped candles
                if ev is not None:
                    yield ev
                if self._last is not None and open_time <= self._last:
                    continue
            df = pd.DataFrame([[open_time, *row]], columns=["open_time", *_FIELDS])
            yield self._emit(df, "live")
