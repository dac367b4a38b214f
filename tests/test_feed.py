"""Market data sources: the replay (pacing, pause/step, data age) and the Binance source against a
fake exchange on loopback (REST history, kline websocket, a connection dropped mid-candle, gaps)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pandas as pd
import pytest

from deployments.binance_feed import BinanceSource, closed_rows, stream_root
from deployments.feed import CandleEvent, ReplaySource, find_gaps
from features.candles import FIVE_MINUTES_MS
from scripts.lab.fake_binance import FakeBinance, load_test_candles


async def _collect(source, into: list[CandleEvent], until: int) -> None:
    async for ev in source.events():
        into.append(ev)
        if sum(len(e.open_time) for e in into) >= until:
            return


async def _wait(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


def _times(events: list[CandleEvent]) -> list[int]:
    return [int(t) for e in events for t in e.open_time]


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------

def test_replay_as_fast_as_possible_delivers_history_then_every_candle_in_order():
    candles = load_test_candles("BTCUSDT", 1300)
    src = ReplaySource("BTCUSDT", candles, speed=0, history=1000)
    events: list[CandleEvent] = []
    asyncio.run(_collect(src, events, 10**9))  # runs until the replay ends
    assert events[0].kind == "history" and len(events[0].open_time) == 1000
    assert all(e.kind == "live" and len(e.open_time) == 1 for e in events[1:])
    assert _times(events) == candles["open_time"].tolist()
    np.testing.assert_array_equal(events[5].ohlcv[0], candles.loc[1004, ["open", "high", "low", "close", "volume"]])
    # As fast as possible: the feed's clock is the close of the newest candle, then real time.
    last = events[-1]
    assert last.clock.rate == 1.0
    assert abs(last.clock.now_ms() - last.last_close_ms) < 5_000
    assert src.status.state == "finished" and src.status.candles == 1300


def test_replay_paces_at_speed_and_pause_step_resume():
    candles = load_test_candles("ETHUSDT", 1100)
    speed = 3000.0  # one 5-minute candle every 0.1 s
    src = ReplaySource("ETHUSDT", candles, speed=speed, history=1000)

    async def scenario():
        events: list[CandleEvent] = []
        task = asyncio.create_task(_collect(src, events, 1100))
        await _wait(lambda: len(events) >= 1)
        t0 = time.monotonic()
        await _wait(lambda: len(events) >= 4)
        paced = time.monotonic() - t0
        src.pause()
        n = len(events)
        await asyncio.sleep(0.5)
        paused_count = len(events) - n
        clock = events[-1].clock
        age_s = (clock.now_ms() - events[-1].last_close_ms) / 1000
        src.step(2)
        await _wait(lambda: len(events) >= n + 2)
        await asyncio.sleep(0.3)
        after_step = len(events) - n
        stepped = events[-1]
        src.resume()
        await _wait(lambda: len(events) >= n + 4)
        task.cancel()
        return events, paced, paused_count, age_s, after_step, stepped

    events, paced, paused_count, age_s, after_step, stepped = asyncio.run(scenario())
    assert 0.2 <= paced <= 1.5  # three candles at 0.1 s each (generous for a loaded machine)
    assert paused_count <= 1    # at most the one already due when pause() was called
    assert age_s >= 0.4 * speed  # the paused feed's data ages at the replay's rate (feed seconds)
    assert after_step == 2
    # A stepped candle is fresh: the clock is re-anchored at its close.
    assert abs(stepped.clock.now_ms(stepped.clock.wall_s) - stepped.last_close_ms) < 1
    assert _times(events) == candles["open_time"].tolist()[: len(_times(events))]


def test_replay_flags_gaps_in_the_file():
    candles = load_test_candles("BTCUSDT", 1200)
    holed = candles.drop(index=range(1050, 1053)).reset_index(drop=True)
    events: list[CandleEvent] = []
    asyncio.run(_collect(ReplaySource("BTCUSDT", holed, speed=0, history=1000), events, len(holed)))
    gaps = [g for e in events for g in e.gaps]
    assert gaps == [(int(candles.open_time[1049]), int(candles.open_time[1053]))]
    assert find_gaps(np.array([10, 20]) * 0 + np.array([0, FIVE_MINUTES_MS]), None) == ()


# --------------------------------------------------------------------------------------------
# Binance
# --------------------------------------------------------------------------------------------

def test_stream_root_accepts_binance_spellings():
    assert stream_root("wss://stream.binance.com:9443/ws") == "wss://stream.binance.com:9443/"
    assert stream_root("ws://127.0.0.1:1234/") == "ws://127.0.0.1:1234/"


def _row(candles: pd.DataFrame, i: int) -> dict:
    return candles.iloc[i].to_dict()


@pytest.mark.timeout(120)
def test_binance_source_backfills_after_a_drop_mid_candle_and_flags_gaps():
    candles = load_test_candles("BTCUSDT", 1010)
    t = candles["open_time"].to_numpy(np.int64)
    now = {"ms": int(t[999]) + FIVE_MINUTES_MS + 1_000}  # one second after candle 999 closed

    def advance_to_close_of(i: int) -> None:
        now["ms"] = int(t[i]) + FIVE_MINUTES_MS + 1_000

    with FakeBinance({"BTCUSDT": candles.iloc[:1000]}, server_time_ms=lambda: now["ms"]) as fake:
        src = BinanceSource("BTCUSDT", api_url=fake.base_url, ws_url=f"ws://127.0.0.1:{fake.port}/ws",
                            history=1000, wall=lambda: now["ms"] / 1000)

        async def scenario() -> list[CandleEvent]:
            events: list[CandleEvent] = []
            task = asyncio.create_task(_collect(src, events, 10_000))
            await _wait(lambda: len(events) >= 1)
            await asyncio.to_thread(fake.wait_for_ws, "BTCUSDT", 1)

            # Candle 1000: updates while open (ignored), then its close.
            fake.push_kline("BTCUSDT", {**_row(candles, 1000), "close": candles.close[1000] * 1.001,
                                        "high": candles.high[1000] * 1.002}, closed=False)
            advance_to_close_of(1000)
            fake.add_candles("BTCUSDT", candles.iloc[1000:1001])
            fake.push_kline("BTCUSDT", _row(candles, 1000), closed=True)
            await _wait(lambda: _times(events)[-1] == t[1000])

            # Candle 1001 is open when the connection drops; it closes during the outage.
            fake.push_kline("BTCUSDT", _row(candles, 1001), closed=False)
            advance_to_close_of(1001)
            fake.add_candles("BTCUSDT", candles.iloc[1001:1002])
            assert fake.drop_websockets("BTCUSDT") == 1
            await _wait(lambda: _times(events)[-1] == t[1001])  # caught up over REST at once

            # Candle 1002 closes while still disconnected; 1003 is the first close the new socket sees.
            advance_to_close_of(1003)
            fake.add_candles("BTCUSDT", candles.iloc[1002:1004])
            await asyncio.to_thread(fake.wait_for_ws, "BTCUSDT", 2)
            fake.push_kline("BTCUSDT", _row(candles, 1003), closed=True)
            await _wait(lambda: _times(events)[-1] == t[1003])

            # The exchange has no candles 1004-1005 (a halt): 1006 arrives with a flagged gap.
            advance_to_close_of(1006)
            fake.add_candles("BTCUSDT", candles.iloc[1006:1007])
            fake.push_kline("BTCUSDT", _row(candles, 1006), closed=True)
            await _wait(lambda: _times(events)[-1] == t[1006])
            # A duplicate close (e.g. re-sent after a reconnect) is not delivered twice.
            advance_to_close_of(1007)
            fake.add_candles("BTCUSDT", candles.iloc[1007:1008])
            fake.push_kline("BTCUSDT", _row(candles, 1006), closed=True)
            fake.push_kline("BTCUSDT", _row(candles, 1007), closed=True)
            await _wait(lambda: _times(events)[-1] == t[1007])
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return events

        events = asyncio.run(scenario())
        delivered = _times(events)
        expected = [*t[:1004], t[1006], t[1007]]
        assert delivered == [int(x) for x in expected]  # every closed candle once, in order
        assert events[0].kind == "history" and len(events[0].open_time) == 1000
        kinds = [(e.kind, len(e.open_time)) for e in events[1:]]
        assert ("backfill", 1) in kinds  # 1001, right after the drop
        assert ("backfill", 2) in kinds  # 1002 + 1003, when the stream skipped 1002
        gapped = [e for e in events if e.gaps]
        assert len(gapped) == 1 and gapped[0].gaps == ((int(t[1003]), int(t[1006])),)
        assert src.status.gaps == [(int(t[1003]), int(t[1006]))]
        assert src.status.reconnects >= 1
        # Candle values are the exchange's, bit for bit (Binance sends decimal strings).
        ev = next(e for e in events if e.last_open_time == t[1000])
        np.testing.assert_array_equal(ev.ohlcv[0], candles.loc[1000, ["open", "high", "low", "close", "volume"]])
        # The REST catch-up after the drop asked for exactly the candle after the last delivered one.
        starts = [r.int_param("startTime") for r in fake.klines_requests()]
        assert int(t[1001]) in starts and int(t[1002]) in starts


# --------------------------------------------------------------------------------------------
# Exchange time, not the local clock
# --------------------------------------------------------------------------------------------

def test_closed_rows_trusts_a_newer_row_or_the_exchange_clock():
    page = pd.DataFrame({"open_time": [0, FIVE_MINUTES_MS, 2 * FIVE_MINUTES_MS]})
    page["close_time"] = page["open_time"] + FIVE_MINUTES_MS - 1
    last_close = int(page["close_time"].iloc[-1])
    assert closed_rows(page, None)["open_time"].tolist() == [0, FIVE_MINUTES_MS]  # clock unknown
    assert len(closed_rows(page, last_close)) == 2       # the exchange says the newest is still open
    assert len(closed_rows(page, last_close + 1)) == 3   # ... and now it has closed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("skew_s", [60, -60])
def test_binance_source_uses_exchange_time_with_the_local_clock_skewed(skew_s):
    """The fake exchange serves the candle open at its own time as it stands then (partial) and
    answers GET /api/v3/time; the source's local clock is ``skew_s`` off. Every candle is delivered
    once, in order, with the exchange's final values: no open candle is stored, no closed one lost."""
    candles = load_test_candles("BTCUSDT", 1010)
    t = candles["open_time"].to_numpy(np.int64)
    ex = {"ms": int(t[1000]) + FIVE_MINUTES_MS - 30_000}  # 30 s before candle 1000 closes

    def at(i: int, into_s: float) -> None:
        ex["ms"] = int(t[i]) + int(into_s * 1000)

    with FakeBinance({"BTCUSDT": candles}, server_time_ms=lambda: ex["ms"]) as fake:
        src = BinanceSource("BTCUSDT", api_url=fake.base_url, ws_url=f"ws://127.0.0.1:{fake.port}/ws",
                            history=1000, wall=lambda: ex["ms"] / 1000 + skew_s)

        async def scenario() -> list[CandleEvent]:
            events: list[CandleEvent] = []
            task = asyncio.create_task(_collect(src, events, 10_000))
            await _wait(lambda: len(events) >= 1)
            await asyncio.to_thread(fake.wait_for_ws, "BTCUSDT", 1)
            # Candle 1000 closes: the stream says so.
            fake.push_kline("BTCUSDT", _row(candles, 1000), closed=False)
            at(1001, 1)
            fake.push_kline("BTCUSDT", _row(candles, 1000), closed=True)
            await _wait(lambda: _times(events)[-1] == t[1000])
            # The connection drops 30 s before 1001 closes: the REST catch-up sees 1001 still open.
            at(1001, 270)
            assert fake.drop_websockets("BTCUSDT") == 1
            await asyncio.to_thread(fake.wait_for_ws, "BTCUSDT", 2)
            await _wait(lambda: src.status.backfills >= 3)
            at(1002, 1)
            fake.push_kline("BTCUSDT", _row(candles, 1001), closed=True)
            await _wait(lambda: _times(events)[-1] == t[1001])
            # The stream skips 1002: REST fills it in (with 1004 open on the exchange by then).
            at(1004, 1)
            fake.push_kline("BTCUSDT", _row(candles, 1003), closed=True)
            await _wait(lambda: _times(events)[-1] == t[1003])
            at(1005, 1)
            fake.push_kline("BTCUSDT", _row(candles, 1004), closed=True)
            await _wait(lambda: _times(events)[-1] == t[1004])
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return events

        events = asyncio.run(scenario())
    assert _times(events) == [int(x) for x in t[:1005]]  # each candle once, in order, none lost
    got = np.vstack([e.ohlcv for e in events])
    np.testing.assert_array_equal(got, candles.loc[:1004, ["open", "high", "low", "close", "volume"]].to_numpy())
    assert events[0].kind == "history" and events[0].last_open_time == t[999]
    assert not any(e.gaps for e in events)
    # The offset to the exchange was measured (lower bound: at most the round trip behind).
    assert -skew_s * 1000 - 1_000 <= src.status.clock_offset_ms <= -skew_s * 1000 + 1
    # Data age is on the exchange's clock: the feed time at delivery is the exchange's time then.
    last = events[-1]
    assert abs(last.clock.now_ms(last.clock.wall_s) - (int(t[1005]) + 1_000)) < 1_000


def test_binance_source_resumed_after_a_candle_continues_with_the_next_one():
    """A restarted source (a new actor, a restarted task) asks REST for exactly the candle after the
    last one the graph took, and delivers it as a backfill."""
    candles = load_test_candles("BTCUSDT", 1010)
    t = candles["open_time"].to_numpy(np.int64)
    now = int(t[1005]) + FIVE_MINUTES_MS + 1_000  # 1005 has closed, 1006 is open
    with FakeBinance({"BTCUSDT": candles}, server_time_ms=lambda: now) as fake:
        src = BinanceSource("BTCUSDT", api_url=fake.base_url, ws_url=f"ws://127.0.0.1:{fake.port}/ws",
                            history=1000, wall=lambda: now / 1000)
        src.resume_after(int(t[1000]))
        events: list[CandleEvent] = []
        asyncio.run(_collect(src, events, 5))
        starts = [r.int_param("startTime") for r in fake.klines_requests()]
    assert events[0].kind == "backfill" and _times(events) == [int(x) for x in t[1001:1006]]
    assert starts[0] == int(t[1001])
