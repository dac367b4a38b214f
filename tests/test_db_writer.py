"""The log writer loses no row: PostgreSQL stopped mid-stream, the writer process killed mid-batch.

A private PostgreSQL server (initdb in a temp dir, its own port) is stopped and restarted at will;
every test checks the tables hold every logged row exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from configs.settings import load_settings
from deployments.db.rows import PredictionRow, encode, rows_from_forecast
from deployments.db.spool import Spool
from deployments.db.writer import LogWriter
from inference.forecast import Forecast
from tests.conftest import ROOT, free_port
from tests.forecast_util import make_forecast
from tests.log_writer_child import row as child_row
from scripts.lab.services import PrivatePostgres, fresh_database, wait_for


@pytest.fixture(scope="module")
def private_pg():
    pg = PrivatePostgres()
    pg.start()
    yield pg
    pg.destroy()


def _settings(**kw):
    base = dict(log_batch_size=200, log_flush_interval_s=0.02, log_retry_interval_s=0.2, db_timeout_s=3.0)
    base.update(kw)
    return load_settings(**base)


def _forecast(i: int, symbol: str = "BTCUSDT") -> Forecast:
    """A Forecast with the given logged fields."""
    close = 40_000.0 + i
    return make_forecast(symbol=symbol, horizon=(6, 18, 36, 72)[i % 4], candle_open_time=1_700_000_000_000 + i * 300_000,
                         close=close, pred_high_pct=0.004, pred_low_pct=-0.003, high_lower=0.001, high_upper=0.009,
                         low_lower=-0.008, low_upper=-0.0005, signal_type=("BUY", "SELL", "HOLD")[i % 3],
                         confidence=0.61, entry_price=close, take_profit=close * 1.004, stop_loss=close * 0.997,
                         reason=None, model_versions={"range_predictor": "r1", "meta_model": "m1"},
                         expected_r=0.001 * i, cost_r=0.25, p_win=0.61, fee_profile="spot_taker")


def _query(url: str, sql: str):
    async def go():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()
    return asyncio.run(go())


def _ids(url: str, table: str) -> list[str]:
    return [str(r["id"]) for r in _query(url, f"SELECT id FROM ml.{table}")]


def test_postgres_stopped_mid_stream_loses_nothing(private_pg, tmp_path):
    n = 2400
    forecasts = [_forecast(i) for i in range(n)]
    want_p, want_s = set(), set()
    for f in forecasts:
        for r in rows_from_forecast(f):
            (want_p if isinstance(r, PredictionRow) else want_s).add(r.id)
    with fresh_database(private_pg.url) as url:
        writer = LogWriter(_settings(), database_url=url, spool_root=tmp_path).start()
        idle = LogWriter(_settings(), name="idle", database_url=url, spool_root=tmp_path).start()
        assert idle.flush(30)
        seen_down = {}

        def outage() -> None:
            wait_for(lambda: writer.submitted >= len(want_p) * 2 // 3, 60, what="a third of the stream")
            private_pg.stop("immediate")  # like a crash: in-flight transactions are lost
            wait_for(lambda: writer.status()["postgres"] == "down", 30, what="the writer to notice")
            # A writer with nothing to write notices too (its idle probe), so health tells the truth.
            wait_for(lambda: idle.status()["postgres"] == "down", 30, what="the idle writer to notice")
            wait_for(lambda: writer.submitted >= len(want_p) * 4 // 3, 60, what="two thirds of the stream")
            seen_down.update(writer.status())
            seen_down["idle_sees_backlog"] = idle.status()["node_spool_pending_bytes"]
            private_pg.start()

        controller = threading.Thread(target=outage)
        controller.start()
        for i in range(0, n, 8):
            assert writer.log_forecasts(forecasts[i:i + 8]) == 16
            time.sleep(0.004)
        controller.join(120)
        assert writer.flush(60), writer.status()
        status = writer.status()
        writer.close()

        assert seen_down["postgres"] == "down" and seen_down["spool_pending_bytes"] > 0
        assert seen_down["idle_sees_backlog"] >= seen_down["spool_pending_bytes"]  # every writer's backlog
        idle.close()
        assert status["rows_dropped"] == 0 and status["rows_rejected"] == 0
        assert status["rows_written"] == status["rows_submitted"] == len(want_p) + len(want_s)
        for table, want in (("prediction_logs", want_p), ("signal_logs", want_s)):
            got = _ids(url, table)
            assert len(got) == len(want) and set(got) == want, table
        # Replayed rows keep the time they were logged, not the time they reached PostgreSQL.
        spread = _query(url, "SELECT min(created_at), max(created_at), min(candle_open_time) "
                             "FROM ml.prediction_logs")[0]
        assert (spread[1] - spread[0]).total_seconds() < 30
        # The signal's economics are logged with it (migration 0002).
        econ = _query(url, "SELECT count(*), sum(expected_r), min(cost_r), max(p_win), min(fee_profile) "
                           "FROM ml.signal_logs")[0]
        assert econ[0] == n and econ[1] == pytest.approx(0.001 * n * (n - 1) / 2)
        assert (econ[2], econ[3], econ[4]) == (0.25, 0.61, "spot_taker")
    assert not any(tmp_path.iterdir()), "a fully written spool is removed at close"


def _server_pids(pg: PrivatePostgres) -> list[int]:
    """The private server's postmaster and its children (from /proc: no extra dependency)."""
    master = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    pids = [master]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            pids.append(int(stat.parent.name))
    return pids


def test_a_hung_postgres_never_blocks_the_request_path(private_pg, tmp_path):
    """The server is frozen (SIGSTOP) with the writer's INSERT in flight: logging calls keep returning
    (they only append to the spool); once the server thaws, every row is written once."""
    rows = [child_row(i) for i in range(3000)]
    with fresh_database(private_pg.url) as url:
        writer = LogWriter(_settings(db_timeout_s=60.0), database_url=url, spool_root=tmp_path).start()
        writer.submit(rows[:10])
        assert writer.flush(30)
        pids = _server_pids(private_pg)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            writer.submit(rows[10:20])
            wait_for(lambda: writer.status()["rows_pending"] == 10, 10, what="a batch in flight")
            time.sleep(2 * writer.settings.log_flush_interval_s)  # the writer is inside its INSERT by now
            accepted = sum(writer.submit(rows[i:i + 10]) for i in range(20, len(rows), 10))
            frozen = writer.status()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert accepted == len(rows) - 20 and frozen["rows_written"] == 10  # nothing got through, all accepted
        assert writer.flush(60), writer.status()
        writer.close()
        assert sorted(uuid.UUID(i).int for i in _ids(url, "prediction_logs")) == list(range(len(rows)))


def _child(url: str, spool: Path, n: int, chunk: int, pause: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "tests.log_writer_child", url, str(spool), str(n), str(chunk),
                             str(pause)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def _read_progress(proc: subprocess.Popen, state: dict) -> None:
    for line in proc.stdout:
        if line.startswith("SUBMITTED"):
            state["submitted"] = int(line.split()[1])
        elif line.startswith("DONE"):
            state["done"] = True


def _replay_and_check(url: str, spool: Path, n_min: int, n_max: int) -> int:
    """Start a fresh writer on the same spool root; it adopts the dead writer's spool. Rows must be
    exactly ids 0..m-1 for one m in [n_min, n_max], each once."""
    writer = LogWriter(_settings(), name="heir", database_url=url, spool_root=spool).start()
    try:
        wait_for(lambda: not [d for d in spool.iterdir() if d.name.startswith("child.")], 120,
                 what="the dead writer's spool to be replayed and removed")
    finally:
        writer.close()
    got = sorted(uuid.UUID(i).int for i in _ids(url, "prediction_logs"))
    m = len(got)
    assert got == list(range(m)), "rows missing or duplicated"
    assert n_min <= m <= n_max, (n_min, m, n_max)
    return m


def test_writer_killed_mid_batch_replays_every_row_once(private_pg, tmp_path):
    """The child's INSERT is held inside its transaction by a table lock, then the child is killed -9."""
    n = 3000

    async def scenario(url: str) -> None:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE SCHEMA IF NOT EXISTS ml")
        from deployments.db.migrate import apply_migrations
        await apply_migrations(conn)
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE ml.prediction_logs IN ACCESS EXCLUSIVE MODE")
        proc = _child(url, tmp_path, n, 100, 0.0)
        state = {"submitted": 0, "done": False}
        reader = threading.Thread(target=_read_progress, args=(proc, state), daemon=True)
        reader.start()
        try:
            async def blocked_insert():
                # This connection is inside its transaction (the lock), where PostgreSQL reads
                # pg_stat_activity once and keeps that snapshot: without clearing it, a first look
                # taken before the child sent its INSERT is what every later look sees.
                await conn.execute("SELECT pg_stat_clear_snapshot()")
                return await conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO ml.prediction_logs%'")
            # Two waits, each with its own generous deadline (a loaded CI machine starts the child
            # slowly): every row submitted, then the child's INSERT waiting on the table lock.
            deadline = time.monotonic() + 300
            while not state["done"]:
                assert proc.poll() is None, f"the child exited ({proc.returncode}) after {state['submitted']} rows"
                assert time.monotonic() < deadline, f"the child submitted only {state['submitted']} of {n} rows"
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 300
            while not await blocked_insert():
                activity = await conn.fetch("SELECT pid, state, wait_event_type, left(query, 60) AS q "
                                            "FROM pg_stat_activity WHERE datname = current_database()")
                assert time.monotonic() < deadline, f"the child never got stuck mid-batch: {activity}"
                await asyncio.sleep(0.05)
            backend = await blocked_insert()
            proc.send_signal(signal.SIGKILL)  # mid-batch: its INSERT is inside an open transaction
            proc.wait(10)
            reader.join(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            await tx.rollback()
        # The orphaned backend notices its client is gone and rolls the batch back.
        deadline = time.monotonic() + 30
        while await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await conn.fetchval("SELECT count(*) FROM ml.prediction_logs") == 0
        await conn.close()
        assert state["submitted"] == n

    with fresh_database(private_pg.url) as url:
        asyncio.run(scenario(url))
        assert _replay_and_check(url, tmp_path, n, n) == n


def test_writer_killed_mid_stream_replays_every_row_once(private_pg, tmp_path):
    """No lock this time: a kill -9 at an arbitrary moment of a steady stream."""
    with fresh_database(private_pg.url) as url:
        proc = _child(url, tmp_path, 100_000, 40, 0.002)
        state = {"submitted": 0, "done": False}
        reader = threading.Thread(target=_read_progress, args=(proc, state), daemon=True)
        reader.start()
        wait_for(lambda: state["submitted"] >= 3000, 120, what="the child to stream")
        wait_for(lambda: _query(url, "SELECT count(*) FROM ml.prediction_logs")[0][0] > 0, 60,
                 what="the first batches in PostgreSQL")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        reader.join(30)  # every progress line the child printed before it died, not just those read so far
        assert not reader.is_alive()
        submitted = state["submitted"]
        # Whatever submit() returned for is on disk; one more chunk may have been written unannounced.
        _replay_and_check(url, tmp_path, submitted, submitted + 40)


def test_replaying_rows_already_in_postgres_duplicates_nothing(private_pg, tmp_path):
    """A crash after INSERT but before the spool position is saved replays a written batch: harmless."""
    rows = [child_row(i) for i in range(500)]
    with fresh_database(private_pg.url) as url:
        writer = LogWriter(_settings(), database_url=url, spool_root=tmp_path).start()
        writer.submit(rows)
        assert writer.flush(30)
        writer.close()
        orphan = Spool(tmp_path / "child.dead.1", 1 << 30).open()  # a dead process's spool holding the same rows
        orphan.append(encode(rows[:300]))
        orphan.append(b'["p","not a row"')  # and a torn last line from the crash
        orphan.sync()
        orphan.close(remove_if_empty=False)
        _replay_and_check(url, tmp_path, 500, 500)


def test_a_bad_row_is_set_aside_and_the_rest_written(private_pg, tmp_path):
    rows = [child_row(i) for i in range(50)]
    rows[17] = rows[17]._replace(symbol="BAD\x00SYMBOL")  # PostgreSQL text cannot hold NUL
    with fresh_database(private_pg.url) as url:
        writer = LogWriter(_settings(), database_url=url, spool_root=tmp_path).start()
        assert writer.submit(rows) == 50
        assert writer.flush(30)
        status = writer.status()
        spool_dir = writer._spool.directory
        writer.close()
        assert status["rows_rejected"] == 1
        got = sorted(uuid.UUID(i).int for i in _ids(url, "prediction_logs"))
        assert got == [i for i in range(50) if i != 17]
        assert "BAD\\u0000SYMBOL" in (spool_dir / "rejected.log").read_text()


def test_unreachable_postgres_spools_and_a_full_spool_counts_drops(tmp_path):
    dead_url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    writer = LogWriter(_settings(spool_max_bytes=1 << 20), database_url=dead_url, spool_root=tmp_path).start()
    try:
        per_row = len(encode([child_row(0)]))
        fits = (1 << 20) // per_row
        accepted = sum(writer.submit([child_row(i)]) for i in range(fits + 100))
        wait_for(lambda: writer.status()["last_error"] is not None, 10, what="a failed connection")
        status = writer.status()
        assert status["postgres"] == "down"
        assert accepted == status["rows_submitted"] and fits - 2 <= accepted <= fits
        assert status["rows_dropped"] == fits + 100 - accepted
        assert status["spool_pending_bytes"] == accepted * per_row
        assert writer.log_forecasts([object()]) == 0  # not a forecast: counted, never raised
    finally:
        writer.close(timeout=0.5)
    assert any(tmp_path.iterdir()), "unwritten rows stay on disk for the next start"
