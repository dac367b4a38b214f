"""The Binance feed at scale (issue 18 point 3): combined streams and weight-paced REST backfill.

Against the fake exchange on loopback (scripts/lab/fake_binance.py), which counts request weight per
window like Binance (``X-MBX-USED-WEIGHT-<window>`` on every answer, 429 with Retry-After over the
limit, 418 for a request sent before that Retry-After passed) and serves combined streams. The
exchange's window is one second here (``X-MBX-USED-WEIGHT-1S``) so that pacing across windows takes
seconds, not minutes; the pacer reads the window from the header's name, as it does for ``1M``.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from configs.symbols import synthetic_names
from deployments.binance_feed import BinanceSource
from deployments.binance_hub import BinanceHub
from deployments.binance_rest import WeightPacer, retry_after_s, used_weight
from features.candles import FIVE_MINUTES_MS
from features.synthetic import synthetic_candles
from scripts.lab.fake_binance import FakeBinance, load_test_candles

HISTORY = 20


def test_the_used_weight_header_names_its_window():
    assert used_weight({"Content-Type": "x", "X-MBX-USED-WEIGHT-1M": "42"}) == (42, 60_000)
    assert used_weight({"x-mbx-used-weight-1s": "7"}) == (7, 1000)
    assert used_weight({"X-MBX-USED-WEIGHT-1M": "many"}) is None and used_weight({}) is None
    assert retry_after_s({"Retry-After": "3"}) == 3.0 and retry_after_s({"Retry-After": "Wed, 21 Oct"}) is None


def test_the_pacer_waits_for_the_next_window_and_honours_retry_after():
    clock = {"ms": 60_000.0 * 1000 + 10_000}  # 10 s into a minute
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        clock["ms"] += s * 1000

    async def scenario() -> None:
        p = WeightPacer(10, lambda: clock["ms"], sleep=sleep)
        for used in (2, 4, 6, 8, 10):  # five requests of weight 2: the budget, no wait
            await p.acquire(2)
            p.settle(2, 200, {"X-MBX-USED-WEIGHT-1M": str(used)})
        assert slept == []
        await p.acquire(2)  # the sixth waits for the next minute on the exchange's clock
        assert slept and clock["ms"] >= 60_000.0 * 1001 and p.waits == 1
        p.settle(2, 200, {"X-MBX-USED-WEIGHT-1M": "2"})
        # Another client of the IP used most of the window: the header says so, the pacer waits.
        await p.acquire(2)
        p.settle(2, 200, {"X-MBX-USED-WEIGHT-1M": "9"})
        before = clock["ms"]
        await p.acquire(2)
        assert clock["ms"] >= (before // 60_000 + 1) * 60_000 and p.waits == 2
        p.settle(2, 200, {"X-MBX-USED-WEIGHT-1M": "2"})
        # A 429: nothing is sent until Retry-After has passed; a 418 likewise.
        await p.acquire(2)
        p.settle(2, 429, {"Retry-After": "7", "X-MBX-USED-WEIGHT-1M": "10"})
        t429 = clock["ms"]
        await p.acquire(1)
        assert clock["ms"] >= t429 + 7000 and p.rate_limited == 1
        p.settle(1, 418, {"Retry-After": "30"})
        t418 = clock["ms"]
        await p.acquire(1)
        assert clock["ms"] >= t418 + 30_000 and p.banned == 1
        assert p.status()["budget"] == 10 and p.status()["in_flight"] == 1

    asyncio.run(scenario())


def _exchange(n: int, now_ms: int) -> dict:
    """``n`` synthetic symbols of real candles, the newest closed one ending just before ``now_ms``."""
    base = load_test_candles("BTCUSDT", HISTORY + 2).copy()
    last_open = now_ms // FIVE_MINUTES_MS * FIVE_MINUTES_MS - FIVE_MINUTES_MS
    base["open_time"] = last_open - (len(base) - 2 - np.arange(len(base), dtype=np.int64)) * FIVE_MINUTES_MS
    return {s: synthetic_candles(s, base).reset_index(drop=True) for s in synthetic_names(["BTCUSDT", "ETHUSDT"], n)}


async def _until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


@pytest.mark.timeout(90)
def test_200_symbols_share_one_combined_stream_and_backfill_within_the_weight_limit():
    now = int(time.time() * 1000)
    candles = _exchange(200, now)
    symbols = list(candles)
    live = {s: df.iloc[:-1] for s, df in candles.items()}  # the last candle closes during the test
    with FakeBinance(live, weight_limit=400, weight_interval="1S") as fake:
        ws = f"ws://127.0.0.1:{fake.port}/ws"

        async def scenario() -> dict:
            hub = BinanceHub(symbols, api_url=fake.base_url, ws_url=ws, weight_budget=250, retry_s=0.2)
            sources = {s: BinanceSource(s, api_url=fake.base_url, ws_url=ws, history=HISTORY, hub=hub, retry_s=0.2)
                       for s in symbols}
            got: dict[str, list] = {s: [] for s in symbols}

            async def run(s: str) -> None:
                async for ev in sources[s].events():
                    got[s].append(ev)

            t0 = time.monotonic()
            tasks = [asyncio.create_task(run(s)) for s in symbols]
            try:
                await _until(lambda: all(got.values()) and sum(fake.ws_handshakes) == 200, 40, "history and stream")
                history_s = time.monotonic() - t0
                await _until(lambda: all(src.status.backfills >= 2 for src in sources.values()), 40, "connect backfill")
                await _until(lambda: hub.pacer.idle, 20, "the connect backfills answered")
                requests_after_start = len(fake.requests)
                # Every symbol's candle closes: one message per stream on the one connection (the
                # exchange's REST need not have it: nothing asks).
                t_push = time.monotonic()
                assert fake.push_klines({s: df.iloc[-1].to_dict() for s, df in candles.items()}, closed=True) == 200
                await _until(lambda: all(g[-1].last_open_time == int(candles[s].open_time.iloc[-1])
                                         for s, g in got.items()), 20, "the live close of every symbol")
                close_to_all_s = time.monotonic() - t_push
                live_requests = len(fake.requests) - requests_after_start
                # The connection drops: every symbol backfills on its own, then one connection again.
                backfills = {s: src.status.backfills for s, src in sources.items()}
                assert fake.drop_websockets() == 1
                await _until(lambda: len(fake.ws_handshakes) == 2, 20, "reconnect")
                await _until(lambda: all(src.status.backfills >= backfills[s] + 1 for s, src in sources.items()),
                             40, "backfill after the drop")
                return {"history_s": history_s, "close_to_all_s": close_to_all_s, "live_requests": live_requests, "got": got,
                        "status": await hub.status(), "reconnects": [src.status.reconnects for src in sources.values()]}
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await hub.close()

        out = asyncio.run(scenario())
        weight_log, rate_limited, banned, requests = fake.weight_log, fake.rate_limited, fake.banned, fake.requests
    assert fake.ws_handshakes == [200, 200]  # one websocket for 200 symbols, and one after the drop
    assert rate_limited == 0 and banned == 0, (rate_limited, banned)  # never over the exchange's limit
    per_window: dict[int, int] = {}
    for window, used in weight_log:
        per_window[window] = max(per_window.get(window, 0), used)
    # Within the exchange's limit in every window: the budget, plus what the exchange counted in its
    # next window of the requests let through at the end of ours (the margin below the limit is for that).
    assert max(per_window.values()) <= 400
    assert len(per_window) >= 3 and out["status"]["weight"]["waits"] > 0  # it had to pace across windows
    assert out["live_requests"] == 0  # the live close came over the stream: no REST for it
    assert all(r >= 1 for r in out["reconnects"]) and out["status"]["connections"] == 1
    for s, events in out["got"].items():  # every candle once, in order, per symbol
        times = [int(t) for e in events for t in e.open_time]
        assert times == [int(t) for t in candles[s].open_time.iloc[-(HISTORY + 1):]] or \
            times == [int(t) for t in candles[s].open_time], (s, times[:3])
    assert len(requests) < 200 * 16, len(requests)  # bounded: a handful of requests per symbol


@pytest.mark.timeout(60)
def test_a_429_stops_every_symbols_backfill_for_retry_after():
    now = int(time.time() * 1000)
    candles = _exchange(20, now)
    symbols = list(candles)
    with FakeBinance(candles) as fake:
        fake.inject(429, retry_after=1, path="/api/v3/klines")
        ws = f"ws://127.0.0.1:{fake.port}/ws"

        async def scenario() -> tuple[list, list]:
            hub = BinanceHub(symbols, api_url=fake.base_url, ws_url=ws, retry_s=0.05)
            sent: list[float] = []      # when each request was let through (monotonic)
            answered: list[tuple[float, int]] = []
            acquire, settle = hub.pacer.acquire, hub.pacer.settle

            async def logged_acquire(weight: int) -> None:
                await acquire(weight)
                sent.append(time.monotonic())

            def logged_settle(weight: int, status: int, headers) -> None:
                answered.append((time.monotonic(), status))
                settle(weight, status, headers)

            hub.pacer.acquire, hub.pacer.settle = logged_acquire, logged_settle
            sources = [BinanceSource(s, api_url=fake.base_url, ws_url=ws, history=HISTORY, hub=hub, retry_s=0.05)
                       for s in symbols]
            got: list = []

            async def first(src) -> None:
                async for ev in src.events():
                    got.append(ev)
                    return

            try:
                await asyncio.wait_for(asyncio.gather(*(first(src) for src in sources)), 30)
            finally:
                await hub.close()
            assert len(got) == 20 and hub.pacer.rate_limited == 1  # every symbol got its history
            return sent, answered

        sent, answered = asyncio.run(scenario())
    t429 = next(t for t, status in answered if status == 429)
    later = [t - t429 for t in sent if t > t429]
    # From the moment the 429 was read, nothing is sent until its Retry-After (1 s) has passed;
    # then the refused page is fetched again.
    assert later and min(later) >= 1.0 - 0.01, later[:5]
    assert fake.banned == 0 and fake.rate_limited == 0  # only the injected 429


def test_a_new_consumer_supersedes_the_old_one_and_an_overflow_asks_for_a_backfill():
    """A dead MarketData actor's long poll must not eat the candles of its successor; a consumer that
    stops reading loses nothing silently (its queue says "backfill" instead)."""
    from deployments.binance_hub import QUEUE_SIZE
    from tests.conftest import free_port

    async def scenario() -> None:
        port = free_port()  # nothing listens: the stream keeps reconnecting in the background
        hub = BinanceHub(["BTCUSDT", "ETHUSDT"], api_url=f"http://127.0.0.1:{port}", ws_url=f"ws://127.0.0.1:{port}/ws",
                         retry_s=5.0)
        try:
            old, connected = await hub.subscribe("BTCUSDT")
            assert connected is False
            pending = asyncio.create_task(hub.recv("BTCUSDT", old, 30))
            new, _ = await hub.subscribe("BTCUSDT")
            assert (await asyncio.wait_for(pending, 5))[0]["type"] == "superseded"
            q = hub.stream.queues["ETHUSDT"]
            for i in range(QUEUE_SIZE + 5):
                q.put({"e": "kline", "i": i})
            token, _ = await hub.subscribe("ETHUSDT")
            got = await hub.recv("ETHUSDT", token, 1)
            assert got[0]["e"] == "reconnected" and len(got) < QUEUE_SIZE + 5  # dropped, and said so
            assert [m for m in await hub.recv("BTCUSDT", new, 0.05) if m.get("type") == "superseded"] == []
        finally:
            await hub.close()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_while_the_stream_keeps_failing_rest_still_brings_every_candle():
    """The hub's failing connection sends a notice at every retry; the source's REST poll for a
    silent stream must fire all the same (a notice is not a candle)."""
    candles = load_test_candles("BTCUSDT", 1010)
    t = candles["open_time"].to_numpy(np.int64)
    now = {"ms": int(t[999]) + FIVE_MINUTES_MS + 1_000}
    with FakeBinance({"BTCUSDT": candles.iloc[:1000]}, server_time_ms=lambda: now["ms"]) as fake:
        fake.refuse_websockets()
        src = BinanceSource("BTCUSDT", api_url=fake.base_url, ws_url=f"ws://127.0.0.1:{fake.port}/ws",
                            history=1000, retry_s=0.1, max_retry_s=0.2, grace_s=1.0, wall=lambda: now["ms"] / 1000)

        async def scenario() -> list:
            events: list = []

            async def run() -> None:
                async for ev in src.events():
                    events.append(ev)

            task = asyncio.create_task(run())
            try:
                await _until(lambda: len(events) == 1, 20, "history")
                fake.add_candles("BTCUSDT", candles.iloc[1000:1003])
                now["ms"] = int(t[1002]) + FIVE_MINUTES_MS + 2_000  # 1001 and 1002 are overdue on the stream
                await _until(lambda: events[-1].last_open_time == int(t[1002]), 20, "REST while the stream is down")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return events

        events = asyncio.run(scenario())
    assert [int(x) for e in events for x in e.open_time] == [int(x) for x in t[:1003]]
    assert src.status.reconnects >= 1 and src.status.state == "reconnecting"

