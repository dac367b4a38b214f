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

from configs.symbols import is_synthetic
from features.candles import FIVE_MINUTES_MS, load_candles
from configs.errors import MarketDataError
from features.synthetic import synthetic_candles

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


# The candles a MarketData actor keeps per symbol: the longest any reader needs -- the outcome
# resolver scores forecasts up to 14 days old (a PostgreSQL outage delays resolution), the
# FeatureBuilder's re-seed takes the last 2 x the feature warm-up of them.
HISTORY_CANDLES = 14 * 288


class CandleWindow:
    """One symbol's candle history in the engine: the newest ``keep`` candles its MarketData actor
    delivered, and the one place they are kept.

    Why one owner: the FeatureBuilder's windows and the outcome resolver's history are both lost
    when their process restarts, and both are refilled from here (the feed outlives neither and
    needs the candles anyway); a copy per reader would be memory and one more thing to get wrong.
    Readers take the range they need:

    - :meth:`history_event` (``open_time`` / ``ohlcv`` / ``len``): the FeatureBuilder's re-seed, the
      newest ``size`` candles back to the last long gap -- short gaps (at most ``max_bridge``
      missing slots) stay in it, and the FeatureBuilder bridges them exactly as it did the first
      time; a longer gap restarts features, so the re-seed starts after it;
    - :meth:`outcome_candles`: the outcome resolver's refill, every candle kept (across long gaps:
      a forecast made before a halt is still scored against the candles before it).

    Memory: ``keep`` candles per symbol (5 float64 + 1 int64 each, 48 bytes: 189 KiB at 14 days).
    """

    def __init__(self, symbol: str, size: int, max_bridge: int = 0, keep: int | None = None) -> None:
        self.symbol = symbol
        self.size = int(size)
        self.max_bridge = int(max_bridge)
        self.keep = max(self.size, int(keep) if keep is not None else self.size)
        self._times = np.empty(0, dtype=np.int64)
        self._values = np.empty((0, len(_FIELDS)), dtype=np.float64)
        self._start = 0  # index in the arrays of the first candle after the last long gap

    @property
    def _reseed_from(self) -> int:
        return max(self._start, len(self._times) - self.size)

    @property
    def open_time(self) -> np.ndarray:
        """Open times of the re-seed range (see the class docstring)."""
        return self._times[self._reseed_from:]

    @property
    def ohlcv(self) -> np.ndarray:
        return self._values[self._reseed_from:]

    def __len__(self) -> int:
        return len(self._times) - self._reseed_from

    def _breaks(self, steps: np.ndarray) -> np.ndarray:
        """Which steps between consecutive candles are gaps too long to bridge."""
        return steps > (self.max_bridge + 1) * FIVE_MINUTES_MS

    def remember(self, event: CandleEvent) -> None:
        """Add the event's candles newer than the newest kept (a resent history adds nothing)."""
        t, v = event.open_time, event.ohlcv
        base = len(self._times)
        if base:
            new = t > self._times[-1]
            t, v = t[new], v[new]
            if len(t) and self._breaks(np.array([t[0] - self._times[-1]]))[0]:
                self._start = base
        steps = np.flatnonzero(self._breaks(np.diff(t)))
        if len(steps):  # the re-seed starts after this event's last long gap
            self._start = base + int(steps[-1]) + 1
        self._times = np.concatenate([self._times, t])
        self._values = np.concatenate([self._values, v])
        drop = len(self._times) - self.keep
        if drop > 0:
            self._times, self._values = self._times[drop:], self._values[drop:]
            self._start = max(0, self._start - drop)

    def history_event(self, clock: FeedClock, source: str) -> CandleEvent:
        """The re-seed range as one ``history`` event (for a FeatureBuilder that lost its windows)."""
        return CandleEvent(self.symbol, self.open_time.copy(), self.ohlcv.copy(), "history", clock, source)

    def outcome_candles(self) -> list[tuple[int, float, float, float]]:
        """Every candle kept as ``(open_time, high, low, close)``: what the outcome resolver scores with."""
        return list(zip(self._times.tolist(), self._values[:, 1].tolist(), self._values[:, 2].tolist(),
                        self._values[:, 3].tolist()))


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
    clock_offset_ms: float | None = None  # exchange time - local clock (Binance: from GET /api/v3/time)

    def as_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "source": self.source, "state": self.state, "candles": self.candles,
                "last_open_time": self.last_open_time, "gaps": [list(g) for g in self.gaps[-20:]],
                "gap_count": len(self.gaps), "reconnects": self.reconnects, "backfills": self.backfills,
                "last_error": self.last_error, "clock_offset_ms": self.clock_offset_ms}


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
        self._next = self._history  # index of the next candle to stream
        self._resume_after: int | None = None
        self._changed = asyncio.Event()
        self._clock = FeedClock(wall(), 0.0, 1.0)
        self.status = FeedStatus(symbol, source)

    @classmethod
    def from_file(cls, symbol: str, path: str | Path, **kwargs: Any) -> "ReplaySource":
        """Replay ``path``; for a synthetic symbol (SYN001BTCUSDT) its time-shifted copy
        (features/synthetic.py), with the source named ``replay:<file>+<symbol>``."""
        df = load_candles(path)
        if df.empty:
            raise MarketDataError(f"{symbol}: replay file {path} holds no candles")
        if is_synthetic(symbol):
            return cls(symbol, synthetic_candles(symbol, df), source=f"replay:{Path(path).name}+{symbol}", **kwargs)
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
        return len(self._df) - self._next

    def resume_after(self, open_time: int | None) -> None:
        """Make the next :meth:`events` continue after candle ``open_time`` (None: from the start).

        Why: a restarted MarketData actor (or feed task) must deliver the candle after the last one
        the graph took -- starting the file again would stall the symbol until the replay caught up
        with it, skipping ahead would lose candles. The ``history`` candles before it are sent first
        (the FeatureBuilder ignores those it has; the actor's re-seed window needs them).
        """
        self._resume_after = None if open_time is None else int(open_time)

    # ---- stream ----------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[CandleEvent]:
        df = self._df
        rate = self.speed or 1.0
        times = df["open_time"].to_numpy(np.int64)
        start = self._history if self._resume_after is None else int(
            np.searchsorted(times, self._resume_after, side="right"))
        previous: int | None = self._resume_after
        head = df.iloc[max(0, start - self._history):start] if self._history else df.iloc[:0]
        if len(head):
            last_close = int(head["open_time"].iloc[-1]) + FIVE_MINUTES_MS
            self._clock = FeedClock(self._wall(), float(last_close), rate)
            ev = _event(self.symbol, head, "history", self._clock, self.status.source, None)
            self._delivered(ev)
            previous = ev.last_open_time
            yield ev
        elif previous is not None:  # resumed without history: the next candle is due one interval on
            self._clock = FeedClock(self._wall(), float(previous + FIVE_MINUTES_MS), rate)
        for i in range(start, len(df)):
            self._next = i
            close_ms = int(times[i]) + FIVE_MINUTES_MS
            if previous is None:  # nothing loaded before: the stream starts now, at this candle's open
                self._clock = FeedClock(self._wall(), float(close_ms - FIVE_MINUTES_MS), rate)
            stepped = await self._wait_turn(close_ms)
            now = self._wall()
            if self.speed == 0 or stepped or self._clock.now_ms(now) > close_ms + FIVE_MINUTES_MS:
                # As fast as possible, stepped, or fell behind: the feed's time is this candle's close.
                self._clock = FeedClock(now, float(close_ms), rate)
            ev = _event(self.symbol, df.iloc[i:i + 1], "live", self._clock, self.status.source, previous)
            self._next = i + 1
            self._delivered(ev)
            previous = ev.last_open_time
            yield ev
        self._next = len(df)
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
