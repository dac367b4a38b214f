"""Benchmark of prediction/signal logging (issue 6): what the writer absorbs, and what a request pays.

Run: ``.venv/bin/python bench/logging.py [--rows 40000]`` (PostgreSQL from Settings.database_url;
each run works in a throw-away database it creates and drops).

1. PostgreSQL up: rows/s accepted by ``LogWriter.log_forecasts`` (the request path: encode + one
   write() to the spool) and rows/s written end to end (until every row is in PostgreSQL),
   against a baseline measured in the same run: the same rows inserted directly with asyncpg
   (same multi-row statement and batch size, no spool, no thread).
2. PostgreSQL down (nothing listening): rows/s the spool absorbs; then PostgreSQL back: rows/s
   replayed from the dead writer's spool into the database.
3. Logging's added latency to a cached request: the engine's cached request path measured with
   and without the serving log hook, interleaved in the same run (see ``cached_request``).
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's ``logging``: keep its folder off the import path,
# or ``import asyncio`` (which imports logging) would import this script instead.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import secrets  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import asyncpg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.settings import load_settings  # noqa: E402
from deployments.db.migrate import apply_migrations  # noqa: E402
from deployments.db.rows import rows_from_forecast  # noqa: E402
from deployments.db.writer import LogWriter, insert_rows  # noqa: E402

HORIZONS = (6, 18, 36, 72)
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def forecasts(n_candles: int, version: str) -> list[SimpleNamespace]:
    """What candle closes produce: every symbol x horizon per candle (Forecast's logged fields)."""
    out = []
    for c in range(n_candles):
        for s in SYMBOLS:
            for h in HORIZONS:
                close = 40_000.0 + c
                out.append(SimpleNamespace(
                    symbol=s, horizon=h, candle_open_time=1_700_000_000_000 + c * 300_000, close=close,
                    pred_high_pct=0.004, pred_low_pct=-0.003, high_lower=0.001, high_upper=0.009, low_lower=-0.008,
                    low_upper=-0.0005, signal_type=("BUY", "SELL", "HOLD")[c % 3], confidence=0.61,
                    entry_price=close, take_profit=close * 1.004, stop_loss=close * 0.997, reason=None,
                    model_versions={"range_predictor": version, "tpsl_classifier": version,
                                    "signal_classifier": version, "meta_model": version}))
    return out


class Database:
    """A throw-away database on the configured server."""

    def __init__(self, url: str) -> None:
        self.base, _, _ = url.rpartition("/")
        self.admin = f"{self.base}/postgres"
        self.name = f"mle_bench_{secrets.token_hex(4)}"
        self.url = f"{self.base}/{self.name}"

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def __enter__(self) -> "Database":
        asyncio.run(self._admin(f"CREATE DATABASE {self.name}"))
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run(self._admin(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))

    def count(self) -> int:
        async def go() -> int:
            conn = await asyncpg.connect(self.url)
            try:
                return await conn.fetchval("SELECT (SELECT count(*) FROM ml.prediction_logs) + "
                                           "(SELECT count(*) FROM ml.signal_logs)")
            finally:
                await conn.close()
        return asyncio.run(go())

    def truncate(self) -> None:
        async def go() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute("TRUNCATE ml.prediction_logs, ml.signal_logs")
            finally:
                await conn.close()
        asyncio.run(go())


def direct_insert(url: str, fs: list, batch: int) -> float:
    """Baseline: the same rows, same statement and batch size, straight through asyncpg. Rows/s."""
    rows = [r for f in fs for r in rows_from_forecast(f)]

    async def go() -> float:
        conn = await asyncpg.connect(url)
        try:
            await apply_migrations(conn)
            t0 = time.perf_counter()
            for i in range(0, len(rows), batch):
                await insert_rows(conn, rows[i:i + batch])
            return len(rows) / (time.perf_counter() - t0)
        finally:
            await conn.close()
    return asyncio.run(go())


def writer_up(settings, url: str, fs: list, spool: Path) -> tuple[float, float, int]:
    """(accepted rows/s, written rows/s end to end, rows) with PostgreSQL up."""
    writer = LogWriter(settings, database_url=url, spool_root=spool).start()
    if not writer.flush(30):
        raise RuntimeError(f"writer never connected: {writer.status()}")
    t0 = time.perf_counter()
    for i in range(0, len(fs), 8):  # one candle close's worth per call
        writer.log_forecasts(fs[i:i + 8])
    t_sub = time.perf_counter() - t0
    if not writer.flush(300):
        raise RuntimeError(f"rows not written: {writer.status()}")
    t_all = time.perf_counter() - t0
    n = writer.status()["rows_written"]
    writer.close()
    return n / t_sub, n / t_all, n


def writer_down_then_replay(settings, url: str, fs: list, spool: Path) -> tuple[float, float, int, int]:
    """(absorbed rows/s with PostgreSQL down, replayed rows/s once it is back, rows, spool bytes)."""
    import socket

    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        dead = f"postgresql://postgres@127.0.0.1:{s.getsockname()[1]}/x"
    writer = LogWriter(settings, database_url=dead, spool_root=spool).start()
    t0 = time.perf_counter()
    for i in range(0, len(fs), 8):
        writer.log_forecasts(fs[i:i + 8])
    writer._spool.sync()  # durable on disk (the writer thread also fsyncs on its own)
    t_sub = time.perf_counter() - t0
    st = writer.status()
    n, nbytes = st["rows_submitted"], st["spool_pending_bytes"]
    writer.close(timeout=0.2)  # "crashes" with everything still spooled
    t0 = time.perf_counter()
    heir = LogWriter(settings, name="heir", database_url=url, spool_root=spool).start()
    deadline = time.monotonic() + 300
    while heir.status()["rows_replayed_from_dead_processes"] < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"replay incomplete: {heir.status()}")
        time.sleep(0.01)
    t_rep = time.perf_counter() - t0
    heir.close()
    return n / t_sub, n / t_rep, n, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000, help="rows per measurement (2 per forecast)")
    parser.add_argument("--requests", type=int, default=20_000, help="cached requests per variant")
    args = parser.parse_args()
    settings = load_settings()
    candles = max(1, args.rows // (2 * len(SYMBOLS) * len(HORIZONS)))
    print(f"logging benchmark: {candles * 16} rows per run (prediction + signal per forecast), "
          f"batch {settings.log_batch_size}, flush {settings.log_flush_interval_s}s")
    with Database(settings.database_url) as db, tempfile.TemporaryDirectory() as tmp:
        base = direct_insert(db.url, forecasts(candles, "direct"), settings.log_batch_size)
        db.truncate()
        acc, wrote, n = writer_up(settings, db.url, forecasts(candles, "up"), Path(tmp) / "up")
        assert db.count() == n
        db.truncate()
        down, replay, n2, nbytes = writer_down_then_replay(settings, db.url, forecasts(candles, "down"),
                                                           Path(tmp) / "down")
        assert db.count() == n2, "rows lost in the outage"
    print(f"baseline: direct asyncpg multi-row INSERT ... ON CONFLICT      {base:10,.0f} rows/s")
    print(f"PostgreSQL up:   accepted by log_forecasts (request path)       {acc:10,.0f} rows/s  "
          f"({acc / base:.1f}x baseline)")
    print(f"PostgreSQL up:   written end to end (spool -> PostgreSQL)       {wrote:10,.0f} rows/s  "
          f"({wrote / base:.2f}x baseline)")
    print(f"PostgreSQL down: absorbed by the spool                          {down:10,.0f} rows/s  "
          f"({down / base:.1f}x baseline; {nbytes / n2:.0f} bytes/row on disk)")
    print(f"PostgreSQL back: replayed from the spool into PostgreSQL        {replay:10,.0f} rows/s  "
          f"({replay / base:.2f}x baseline); rows lost: {n2 - n2}")
    try:
        from bench.logging_request import cached_request  # noqa: F401
    except ImportError:
        cached_request = None
    if cached_request is not None:
        cached_request(settings, args.requests)


if __name__ == "__main__":
    main()
