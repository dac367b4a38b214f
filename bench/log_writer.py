"""Benchmark of prediction/signal logging (issue 6): what the writer absorbs, and what a request pays.

Run: ``.venv/bin/python bench/log_writer.py [--rows 40000]`` (PostgreSQL from Settings.database_url;
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

# Run as a script, Python puts bench/ first on sys.path: take it off (the project root goes on below).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import secrets  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import asyncpg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.settings import load_settings  # noqa: E402
from deployments.db.migrate import apply_migrations  # noqa: E402
from deployments.db.rows import rows_from_forecast  # noqa: E402
from deployments.db.insert import insert_rows  # noqa: E402
from deployments.db.writer import LogWriter  # noqa: E402
from inference.forecast import Forecast  # noqa: E402

HORIZONS = (6, 18, 36, 72)
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def forecasts(n_candles: int, version: str) -> list[Forecast]:
    """What candle closes produce: every symbol x horizon per candle."""
    out = []
    for c in range(n_candles):
        for s in SYMBOLS:
            for h in HORIZONS:
                close = 40_000.0 + c
                out.append(Forecast(
                    symbol=s, horizon=h, candle_open_time=1_700_000_000_000 + c * 300_000, close=close,
                    pred_high_pct=0.004, pred_low_pct=-0.003, high_lower=0.001, high_upper=0.009, low_lower=-0.008,
                    low_upper=-0.0005, p_tp_long=0.55, p_tp_short=0.4, signal_probs=(0.2, 0.5, 0.3),
                    signal_type=("BUY", "SELL", "HOLD")[c % 3], confidence=0.61,
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
    parser.add_argument("--requests", type=int, default=500, help="cached requests per variant and round")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds of the request measurement")
    args = parser.parse_args()
    settings = load_settings()
    candles = max(1, args.rows // (2 * len(SYMBOLS) * len(HORIZONS)))
    print(f"logging benchmark: {candles * 16} rows per run (prediction + signal per forecast), "
          f"batch {settings.log_batch_size}, flush {settings.log_flush_interval_s}s")
    with Database(settings.database_url.get_secret_value()) as db, tempfile.TemporaryDirectory() as tmp:
        base = direct_insert(db.url, forecasts(candles, "direct"), settings.log_batch_size)
        db.truncate()
        acc, wrote, n = writer_up(settings, db.url, forecasts(candles, "up"), Path(tmp) / "up")
        assert db.count() == n
        db.truncate()
        down, replay, n2, nbytes = writer_down_then_replay(settings, db.url, forecasts(candles, "down"),
                                                           Path(tmp) / "down")
        lost = n2 - db.count()
        print(f"baseline: direct asyncpg multi-row INSERT ... ON CONFLICT      {base:10,.0f} rows/s")
        print(f"PostgreSQL up:   accepted by log_forecasts (request path)       {acc:10,.0f} rows/s  "
              f"({acc / base:.1f}x baseline)")
        print(f"PostgreSQL up:   written end to end (spool -> PostgreSQL)       {wrote:10,.0f} rows/s  "
              f"({wrote / base:.2f}x baseline)")
        print(f"PostgreSQL down: absorbed by the spool                          {down:10,.0f} rows/s  "
              f"({down / base:.1f}x baseline; {nbytes / n2:.0f} bytes/row on disk)")
        print(f"PostgreSQL back: replayed from the spool into PostgreSQL        {replay:10,.0f} rows/s  "
              f"({replay / base:.2f}x baseline); rows lost: {lost}")
        db.truncate()
        cached_request(settings, db.url, Path(tmp) / "requests", args.requests, args.rounds)


# ---- 3. a cached request with and without the log hook -----------------------------------------------
def _models(settings, tmp: Path) -> Path:
    """The configured model set if it loads, else a tiny one trained on the shipped sample."""
    from inference.ensemble import Ensemble

    try:
        Ensemble.load(settings.models_dir, settings)
        return settings.models_dir
    except Exception:
        from training.engines import PlainEngine
        from training.train import train, with_overrides

        out = tmp / "models"
        print(f"(no loadable model set in {settings.models_dir}: training a tiny one on the sample)")
        train(with_overrides(settings, rounds=2, folds=2), {s: settings.sample_dir / f"{s}_5m.parquet" for s in SYMBOLS},
              PlainEngine(nthread=1), out=out)
        return out


def cached_request(settings, url: str, tmp: Path, n: int, rounds: int) -> None:
    """The engine's request code (``PredictionService`` in the FastAPI app of ``deployments.api``) with
    an in-process Ensemble, answering from its memory cache: once with no log hook, once with the
    PostgreSQL hook of ``make serve`` (``request_served`` for every answer), interleaved."""
    import httpx
    import numpy as np

    from deployments.api import create_app
    from deployments.db.serving_log import DbServingLog
    from deployments.market_state import MarketState
    from deployments.feed import CandleEvent, FeedClock
    from deployments.prometheus import EngineMetrics
    from deployments.service import PredictionService
    from features.candles import FIVE_MINUTES_MS, load_candles
    from inference.ensemble import Ensemble

    tmp.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    models_dir = _models(settings, tmp)
    s = load_settings(models_dir=str(models_dir), api_keys=[key], rate_limit_per_minute=10**9, database_url=url,
                      spool_dir=str(tmp / "spool"))
    ens = Ensemble.load(models_dir, s)

    class InProcess:
        """Forecasts computed in this process (only the first request of each key computes)."""

        async def forecast(self, rows, horizon):
            return ens.forecast(np.vstack([r.features for r in rows]), [r.symbol for r in rows],
                                [r.close for r in rows], [r.open_time for r in rows], horizon)

        async def models_status(self):
            return {"loaded": True, "versions": ens.versions, "models": {}}

        async def runtime_status(self):
            return {}

    state = MarketState(s.model_dump(include={"models_dir"}))
    for symbol in SYMBOLS:
        c = load_candles(s.sample_dir / f"{symbol}_5m.parquet").iloc[-1100:]
        t = c["open_time"].to_numpy(np.int64)
        clock = FeedClock(time.time(), float(t[-1] + FIVE_MINUTES_MS), 1.0)
        state.ingest(CandleEvent(symbol, t, c[["open", "high", "low", "close", "volume"]].to_numpy(), "history",
                                 clock, "bench"))
        state.publish(symbol, int(t[-1]), ens.versions, None)
    hook = DbServingLog(s, "ingress")

    async def measure() -> dict[str, list[float]]:
        await hook.start()
        variants = {}
        for name, log_hook in (("no log", None), ("no-op hook", NoOpHook()), ("with log", hook)):
            svc = PredictionService(s, InProcess(), redis=None, metrics=EngineMetrics(use_ray=False),
                                    serving_log=log_hook)
            svc.set_market(state.snapshot())
            app = create_app(svc, database_health=_up, metrics_text=_empty, serving_log=log_hook)
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench",
                                       headers={"X-API-Key": key})
            for symbol in SYMBOLS:  # fill the memory cache: every later request is a cached one
                for h in HORIZONS:
                    r = await client.post("/predictions", json={"symbol": symbol, "horizon": h})
                    assert r.status_code == 200, r.text
            variants[name] = (svc, client)
        per_request: dict[str, list[float]] = {name: [] for name in variants}
        direct: dict[str, list[float]] = {name: [] for name in variants}
        bodies = [{"symbol": sym, "horizon": h} for sym in SYMBOLS for h in HORIZONS]
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                svc, client = variants[name]
                t0 = time.perf_counter()
                for i in range(n):
                    resp = await client.post("/predictions", json=bodies[i % len(bodies)])
                    if resp.status_code != 200:
                        raise RuntimeError(resp.text)
                per_request[name].append((time.perf_counter() - t0) / n)
                t0 = time.perf_counter()
                for i in range(n):
                    b = bodies[i % len(bodies)]
                    await svc.answer("predictions", b["symbol"], b["horizon"], fresh=False, kid="bench")
                direct[name].append((time.perf_counter() - t0) / n)
        for _, client in variants.values():
            await client.aclose()
        await hook.close()
        return {"http": per_request, "service": direct}

    import logging as std_logging

    std_logging.getLogger("httpx").setLevel(std_logging.WARNING)  # training's CLI turned INFO on
    res = asyncio.run(measure())
    st = hook.writer.status()
    print(f"cached request, {rounds} interleaved rounds x {n} requests per variant "
          f"(median of the rounds' mean latency):")
    med = {level: {k: statistics.median(v) for k, v in r.items()} for level, r in res.items()}
    for level, label in (("http", "FastAPI app (ASGI, auth, rate limit, render)"),
                         ("service", "PredictionService.answer (request logic only)")):
        base = med[level]["no log"]
        cells = "   ".join(f"{k} {v * 1e6:7.1f} us ({100 * (v - base) / base:+.1f}%)" for k, v in med[level].items())
        spread = max(max(v) / min(v) for v in res[level].values())
        print(f"  {label:48s} {cells}   [rounds vary up to {100 * (spread - 1):.0f}%: machine noise]")
    # Costs are resolved precisely where nothing else varies (the request logic); the HTTP figures
    # carry the machine's noise. Their share of a cached HTTP request is the figure to judge.
    http = med["http"]["no log"]
    total = med["service"]["with log"] - med["service"]["no log"]
    plumbing = med["service"]["no-op hook"] - med["service"]["no log"]
    ours = med["service"]["with log"] - med["service"]["no-op hook"]
    print(f"  added to a cached HTTP request of {http * 1e6:.0f} us: logging in all {total * 1e6:+.1f} us = "
          f"{100 * total / http:+.2f}% (goal < 1%), of which the serving hook's plumbing (RequestRecord "
          f"and the hook call) {plumbing * 1e6:+.1f} us = {100 * plumbing / http:+.2f}% and the "
          f"PostgreSQL log itself {ours * 1e6:+.1f} us = {100 * ours / http:+.2f}%")
    print(f"  (the hook logged {st['rows_submitted']} rows for {2 * rounds * n + len(SYMBOLS) * len(HORIZONS)} "
          f"answers: a cached forecast served again is recognised, not re-logged; dropped {st['rows_dropped']})")


class NoOpHook:
    """A log hook that does nothing: what the serving code's hook plumbing costs by itself."""

    async def start(self) -> None: ...

    def candle_closed(self, forecasts) -> None: ...

    def request_served(self, record, forecast) -> None: ...

    def candles_closed(self, event, window=None) -> None: ...

    async def live_metrics(self) -> dict:
        return {}

    async def health(self) -> dict:
        return {}

    async def close(self) -> None: ...


async def _up() -> dict:
    return {"status": "up"}


async def _empty() -> str:
    return ""


if __name__ == "__main__":
    main()
