"""Closed 5-minute candles as events, from a replay file or from Binance (no Ray in this module).

A source is an async iterator of :class:`CandleEvent`. Each event carries the candles it delivers
(oldest first) and the feed's clock, so everything downstream measures data age against the time
of the feed, not against the wall: a replay at 60x ages 60 feed-seconds per wall-second, and a
paused or finished replay goes stale exactly like a dead exchange connection.

The sources are pure asyncio (tested without a cluster); :mod:`deployments.market_data` runs them
in Ray actors and delivers the events to the graph.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from features.candles import FIVE_MINUTES_MS, load_candles
from features.errors import MarketDataError

log = logging.getLogger(__name__)

EventKind = Literal["history", "backfill", "live"]
_FIELDS = ("open", "high", "low", "close", "volume")


@dataclass(frozen=True)
class FeedClock:
    """Maps wall time to feed time: ``feed_ms + (wall - wall_s) * rate * 1000``.

    Live feeds run at rate 1 anchored on the wall clock; a replay at speed N runs at rate N from
    the close of its last candle. Data age is ``now_ms() - close time of the newest candle``.
    """

    wall_s: float
    feed_ms: float
    rate: float = 1.0

    def now_ms(self, wall_s: float | None = None) -> float:
        wall = time.time() if wall_s is None else wall_s
        return self.feed_ms + (wall - self.wall_s) * self.rate * 1000.0

    def wall_seconds_until(self, feed_ms: float, wall_s: float | None = None) -> float:
        """Wall seconds until the feed clock reaches ``feed_ms`` (0 when it already has)."""
        if self.rate <= 0:
            return math.inf
        return max(0.0, (feed_ms - self.now_ms(wall_s)) / 1000.0 / self.rate)



@dataclass(frozen=True)
class CandleEvent:
    """Closed candles of one symbol, oldest first, strictly increasing open times.

    ``kind``: ``history`` (loaded at start), ``backfill`` (REST catch-up after a disconnect or
    a hole in the stream) or ``live`` (one candle as it closes). ``gaps`` lists the holes this
    event contains or opens, as ``(previous_open_time, next_open_time)`` pairs: the exchange had
    no candle there (a halt) or the source could not get it; features restart after a gap.
    """

    symbol: str
    open_time: np.ndarray  # int64 ms, candle open
    ohlcv: np.ndarray      # (n, 5) float64: open, high, low, close, volume
    kind: EventKind
    clock: FeedClock
    source: str
    gaps: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if len(self.open_time) == 0 or len(self.open_time) != len(self.ohlcv):
            raise MarketDataError(f"{self.symbol}: a candle event needs matching, non-empty arrays")

    @property
    def last_open_time(self) -> int:
        return int(self.open_time[-1])

    @property
    def last_close_ms(self) -> int:
        return self.last_open_time + FIVE_MINUTES_MS

    @property
    def expires_in_s(self) -> float:
        """Wall seconds until the next candle closes: how long this candle's predictions are current."""
        seconds = self.clock.wall_seconds_until(self.last_close_ms + FIVE_MINUTES_MS)
        return FIVE_MINUTES_MS / 1000.0 if math.isinf(seconds) else seconds

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.ohlcv, columns=list(_FIELDS))
        df.insert(0, "open_time", self.open_time.astype(np.int64))
        return df


class CandleWindow:
    """The newest ``size`` candles a MarketData actor has delivered, back to the last long gap.

    A restarted FeatureBuilder has empty windows; re-seeding it from here lets it answer at the next
    candle instead of after a 1000-candle warm-up. Short gaps (at most ``max_bridge`` missing slots)
    stay in the window -- the FeatureBuilder bridges them exactly as it did the first time -- and a
    longer gap restarts the window, as it restarts features.
    """

    def __init__(self, symbol: str, size: int, max_bridge: int = 0) -> None:
        self.symbol = symbol
        self.size = int(size)
        self.max_bridge = int(max_bridge)
        self.open_time = np.empty(0, dtype=np.int64)
        self.ohlcv = np.empty((0, len(_FIELDS)), dtype=np.float64)

    def __len__(self) -> int:
        return len(self.open_time)

    def _breaks(self, steps: np.ndarray) -> np.ndarray:
        """Which steps between consecutive candles are gaps too long to bridge."""
        return steps > (self.max_bridge + 1) * FIVE_MINUTES_MS

    def remember(self, event: CandleEvent) -> None:
        t, v = event.open_time, event.ohlcv
        if len(self.open_time):
            new = t > self.open_time[-1]
            t, v = t[new], v[new]
            if len(t) and self._breaks(np.array([t[0] - self.open_time[-1]]))[0]:
                self.open_time, self.ohlcv = self.open_time[:0], self.ohlcv[:0]
        steps = np.flatnonzero(self._breaks(np.diff(t)))
        if len(steps):  # keep only the tail of this event after its last long gap
            t, v = t[steps[-1] + 1:], v[steps[-1] + 1:]
        self.open_time = np.concatenate([self.open_time, t])[-self.size:]
        self.ohlcv = np.concatenate([self.ohlcv, v])[-self.size:]

    def history_event(self, clock: FeedClock, source: str) -> CandleEvent:
        return CandleEvent(self.symbol, self.open_time.copy(), self.ohlcv.copy(), "history", clock, source)


def find_gaps(open_time: np.ndarray, previous: int | None) -> tuple[tuple[int, int], ...]:
    """Holes in ``open_time`` (and between ``previous`` and its first element)."""
    times = np.asarray(open_time, dtype=np.int64)
    if previous is not None:
        times = np.concatenate([[previous], times])
    jumps = np.flatnonzero(np.diff(times) != FIVE_MINUTES_MS)
    return tuple((int(times[i]), int(times[i + 1])) for i in jumps)


def _event(symbol: str, df: pd.DataFrame, kind: EventKind, clock: FeedClock, source: str,
           previous: int | None) -> CandleEvent:
    t = df["open_time"].to_numpy(np.int64)
    return CandleEvent(symbol, t.copy(), df[list(_FIELDS)].to_numpy(np.float64).copy(), kind, clock, source,
                       find_gaps(t, previous))


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------

@dataclass
class FeedStatus:
    """What a source reports about itself (shown by /health/detailed)."""

    symbol: str
    source: str
    state: str = "starting"  # starting | streaming | paused | finished | reconnecting | backfilling | error
    candles: int = 0          # closed candles delivered
    last_open_time: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)
    reconnects: int = 0
    backfills: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "source": self.source, "state": self.state, "candles": self.candles,
                "last_open_time": self.last_open_time, "gaps": [list(g) for g in self.gaps[-20:]],
                "gap_count": len(self.gaps), "reconnects": self.reconnects, "backfills": self.backfills,
                "last_error": self.last_error}


class ReplaySource:
    """Replays a candle file: ``history`` candles at once, then one candle per 5 minutes / ``speed``.

    ``speed`` 0 streams as fast as the consumer takes candles (the clock then runs at real time
    from the last candle's close, so a finished replay goes stale). The replay can be paused,
    resumed and stepped one candle at a time (for operators and tests); while paused its clock
    keeps running, so the engine sees the data age, as it would for a stalled exchange feed.
    A resumed replay continues its schedule from the moment of resuming.
    """

    def __init__(self, symbol: str, candles: pd.DataFrame, *, speed: float = 0.0, history: int = 1000,
                 source: str = "replay", wall: Callable[[], float] = time.time) -> None:
        if speed < 0:
            raise MarketDataError(f"replay speed must be >= 0, got {speed}")
        self.symbol = symbol
        self.speed = float(speed)
        self._df = candles.reset_index(drop=True)
        self._history = min(int(history), len(self._df))
        self._wall = wall
        self._paused = False
        self._resumed = False
        self._steps = 0
        self._streamed = 0
        self._changed = asyncio.Event()
        self._clock = FeedClock(wall(), 0.0, 1.0)
        self.status = FeedStatus(symbol, source)

    @classmethod
    def from_file(cls, symbol: str, path: str | Path, **kwargs: Any) -> "ReplaySource":
        df = load_candles(path)
        if df.empty:
            raise MarketDataError(f"{symbol}: replay file {path} holds no candles")
        return cls(symbol, df, source=f"replay:{Path(path).name}", **kwargs)

    # ---- control ---------------------------------------------------------------------------
    def pause(self) -> None:
        self._paused = True
        self._changed.set()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._resumed = True
        self._changed.set()

    def step(self, n: int = 1) -> None:
        """Deliver the next ``n`` candles now, whether paused or not."""
        self._steps += max(0, int(n))
        self._changed.set()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def remaining(self) -> int:
        return len(self._df) - self._history - self._streamed

    # ---- stream ----------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[CandleEvent]:
        df = self._df
        rate = self.speed or 1.0
        previous: int | None = None
        if self._history:
            head = df.iloc[: self._history]
            last_close = int(head["open_time"].iloc[-1]) + FIVE_MINUTES_MS
            self._clock = FeedClock(self._wall(), float(last_close), rate)
            ev = _event(self.symbol, head, "history", self._clock, self.status.source, None)
            self._delivered(ev)
            previous = ev.last_open_time
            yield ev
        times = df["open_time"].to_numpy(np.int64)
        for i in range(self._history, len(df)):
            close_ms = int(times[i]) + FIVE_MINUTES_MS
            if previous is None:  # nothing loaded before: the stream starts now, at this candle's open
                self._clock = FeedClock(self._wall(), float(close_ms - FIVE_MINUTES_MS), rate)
            stepped = await self._wait_turn(close_ms)
            now = self._wall()
            if self.speed == 0 or stepped or self._clock.now_ms(now) > close_ms + FIVE_MINUTES_MS:
                # As fast as possible, stepped, or fell behind: the feed's time is this candle's close.
                self._clock = FeedClock(now, float(close_ms), rate)
            ev = _event(self.symbol, df.iloc[i:i + 1], "live", self._clock, self.status.source, previous)
            self._streamed += 1
            self._delivered(ev)
            previous = ev.last_open_time
            yield ev
        self.status.state = "finished"

    async def _wait_turn(self, close_ms: int) -> bool:
        """Wait until the candle closing at ``close_ms`` is due; True when released by :meth:`step`."""
        while True:
            if self._steps > 0:
                self._steps -= 1
                return True
            timeout: float | None = None
            if self._paused:
                self.status.state = "paused"
            else:
                if self._resumed:  # the schedule restarts: the next candle closes one interval from now
                    self._clock = FeedClock(self._wall(), float(close_ms - FIVE_MINUTES_MS), self.speed or 1.0)
                    self._resumed = False
                timeout = 0.0 if self.speed == 0 else self._clock.wall_seconds_until(close_ms, self._wall())
                if timeout <= 0:
                    return False
                self.status.state = "streaming"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=timeout)
            except asyncio.TimeoutError:
                pass

    def _delivered(self, ev: CandleEvent) -> None:
        st = self.status
        st.candles += len(ev.open_time)
        st.last_open_time = ev.last_open_time
        st.gaps.extend(ev.gaps)
        if st.state == "starting":
            st.state = "streaming"


# --------------------------------------------------------------------------------------------
# Binance
# --------------------------------------------------------------------------------------------

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


class BinanceSource:
    """Closed 5-minute klines of one symbol from Binance: REST history, then the kline websocket.

    No closed candle is missed: at start, after every disconnect, whenever the stream skips a
    candle, and when no candle closes for longer than expected, the missing range is fetched
    over REST before anything newer is delivered. Candles are delivered once each, in order;
    holes the exchange itself has (a trading halt) are delivered as flagged gaps.

    The websocket is python-binance's ``BinanceSocketManager.kline_socket`` (which reconnects by
    itself and reports drops as ``{"e": "error"}`` messages); REST is ``AsyncClient.get_klines``.
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
        self._wall = wall
        self._last: int | None = None
        self.status = FeedStatus(symbol, "binance")

    def _client(self):  # python-binance AsyncClient pointed at ``api_url``
        from binance import AsyncClient

        from features.download import api_root

        client = AsyncClient()
        client.API_URL = api_root(self.api_url)
        return client

    # ---- REST ------------------------------------------------------------------------------
    async def _fetch_closed(self, client, start_ms: int) -> pd.DataFrame:
        """Every closed candle with open_time >= start_ms, paging forward; retried until it works."""
        from features.download import PAGE_LIMIT, klines_to_frame

        pages: list[pd.DataFrame] = []
        cursor = start_ms
        delay = self.retry_s
        while True:
            now_ms = int(self._wall() * 1000)
            try:
                rows = await asyncio.wait_for(
                    client.get_klines(symbol=self.symbol, interval=self.interval, startTime=cursor, limit=PAGE_LIMIT),
                    timeout=self.request_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # network, HTTP 5xx/429, bad JSON: retry with backoff
                self.status.last_error = f"REST klines: {type(exc).__name__}: {exc}"[:300]
                log.warning("%s: %s; retrying in %.1fs", self.symbol, self.status.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_s)
                continue
            delay = self.retry_s
            if not rows:
                break
            page = klines_to_frame(rows)
            page = page[page["close_time"] < now_ms]  # the newest row may be the still-open candle
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
        if self._last is None:
            now_ms = int(self._wall() * 1000)
            start = now_ms - now_ms % FIVE_MINUTES_MS - self.history * FIVE_MINUTES_MS
        else:
            start = self._last + FIVE_MINUTES_MS
        self.status.backfills += 1
        df = await self._fetch_closed(client, start)
        if self._last is not None:
            df = df[df["open_time"] > self._last]
        if df.empty:
            return None
        return self._emit(df, kind)

    def _emit(self, df: pd.DataFrame, kind: EventKind) -> CandleEvent:
        now = self._wall()
        ev = _event(self.symbol, df, kind, FeedClock(now, now * 1000.0, 1.0), "binance", self._last)
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
            ev = await self._catch_up(client, "history")
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
            # Expect a close every 5 minutes; if none arrives by then (+ grace), ask REST.
            due = (self._last or 0) + 2 * FIVE_MINUTES_MS
            wait_s = max(1.0, due / 1000.0 + self.grace_s - self._wall())
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
            open_time, row, closed = kline_message_candle(msg)
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

