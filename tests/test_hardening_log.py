"""Issue 13, the logging path (points 7-9): no row lost, none stuck, none duplicated.

A row of the wrong type in the middle of a batch goes to rejected.log with its reason while the
rest is written; a disk that fills up mid-write (a real, small tmpfs made here) leaves no glued
line, refuses and counts what it cannot hold, says ``disk_full``, and loses or duplicates nothing
once space is back; the spools of a node share one bound; a spool that cannot be opened degrades
logging instead of failing the replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest

from deployments.db.rows import encode
from deployments.db.serving_log import log_status
from deployments.db.spool import Spool
from deployments.db.writer import LogWriter
from tests.conftest import free_port
from tests.hardening_report import record
from tests.log_writer_child import row
from scripts.lab.services import fresh_database, wait_for
from tests.test_db_writer import _settings, private_pg  # noqa: F401 (a fixture)


def _ids(url: str) -> list[int]:
    async def go():
        conn = await asyncpg.connect(url)
        try:
            return [uuid.UUID(str(r["id"])).int for r in await conn.fetch("SELECT id FROM ml.prediction_logs")]
        finally:
            await conn.close()
    return asyncio.run(go())


# ---- point 7: a bad row must not block the writer --------------------------------------------

def test_a_row_of_the_wrong_type_is_rejected_with_its_reason_and_the_batch_written(private_pg, tmp_path):
    rows = [row(i) for i in range(60)]
    rows[23] = rows[23]._replace(close="not a number")  # asyncpg's client-side DataError (an InterfaceError)
    rows[41] = rows[41]._replace(horizon=2**40)  # out of int4's range: the same, from another encoder
    with fresh_database(private_pg.url) as url:
        writer = LogWriter(_settings(), database_url=url, spool_root=tmp_path).start()
        try:
            assert writer.submit(rows[:30]) == 30 and writer.submit(rows[30:]) == 30
            written = writer.flush(15)
            status = writer.status()
        finally:
            writer.close(timeout=2)
        assert written, status
        assert sorted(_ids(url)) == [i for i in range(60) if i not in (23, 41)]
    assert status["postgres"] == "up" and status["rows_rejected"] == 2 and status["rows_written"] == 60
    assert log_status(status) == "rejected"  # health: someone should look at rejected.log
    (rejected,) = tmp_path.glob("*/rejected.log")
    entries = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert [e["row"][1] for e in entries] == [str(uuid.UUID(int=23)), str(uuid.UUID(int=41))]
    assert all(e["reason"] and e["rejected_at"].endswith("Z") for e in entries), entries
    record("bad rows", "60 rows in 2 batches, one with text in a float column and one with 2^40 in an int4 column",
           60, [] if written else ["the batch did not drain"])


def test_data_errors_are_told_from_outages_whatever_asyncpg_subclasses_them_from():
    """asyncpg documents its client-side ``DataError`` as an ``InterfaceError`` (and a ``ValueError``);
    0.32 raises the SQLSTATE class-22 ``DataError`` (a ``PostgresError``) for bad arguments instead.
    Either must send the row to rejected.log; a lost connection must keep it in the spool."""
    from asyncpg.exceptions import _base

    from deployments.db.insert import is_row_error, is_unavailable

    data = [_base.DataError("invalid input for query argument $7"), asyncpg.exceptions.DataError("bad"),
            asyncpg.exceptions.CharacterNotInRepertoireError("NUL"), ValueError("x"), OverflowError("x")]
    outages = [asyncpg.InterfaceError("connection is closed"), ConnectionRefusedError(), asyncio.TimeoutError(),
               asyncpg.exceptions.UndefinedTableError("no table"), asyncpg.exceptions.CannotConnectNowError("x")]
    assert [is_unavailable(e) for e in data] == [False] * len(data)
    assert [is_row_error(e) for e in data] == [True] * len(data)
    assert [is_unavailable(e) for e in outages] == [True] * len(outages)
    assert not any(is_row_error(e) for e in outages)


# ---- point 8: disk full ------------------------------------------------------------------------

@contextmanager
def small_filesystem(size: str):
    """A tmpfs of ``size`` mounted for this test (named mle13-*), unmounted whatever happens."""
    mount = Path(f"/tmp/mle13-spool-{secrets.token_hex(4)}")
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", f"mle13-{mount.name[-8:]}",
                               str(mount)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"the disk-full test mounts a tmpfs (needs root): {done.stderr.strip()}")
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=False)
            if os.path.ismount(mount):
                subprocess.run(["umount", "-l", str(mount)], check=False)
    finally:
        mount.rmdir()


def _fill(path: Path, leave: int) -> None:
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_full_disk_loses_no_accepted_row_and_duplicates_none(private_pg):
    chunk = 7
    accepted, refused, i = [], 0, 0
    with fresh_database(private_pg.url) as url, small_filesystem("512k") as mount:
        writer = LogWriter(_settings(), database_url=url, spool_root=mount).start()
        try:
            for _ in range(10):  # before
                assert writer.submit([row(i + k) for k in range(chunk)]) == chunk
                accepted += range(i, i + chunk)
                i += chunk
            assert writer.flush(30)
            private_pg.stop("fast")  # rows now stay in the spool ...
            _fill(mount, leave=24 << 10)  # ... on a disk with 24 KiB left
            while refused < 15 * chunk:  # during: until the disk refuses, then some more
                if writer.submit([row(i + k) for k in range(chunk)]) == chunk:
                    accepted += range(i, i + chunk)
                else:
                    refused += chunk
                i += chunk
            during = writer.status()
            segment = max(mount.glob("*/seg-*.log"))
            tail = segment.read_bytes()[-1:]
            (mount / "filler").unlink()  # after: space is back, then the database
            for _ in range(10):
                assert writer.submit([row(i + k) for k in range(chunk)]) == chunk
                accepted += range(i, i + chunk)
                i += chunk
            private_pg.start()
            flushed = writer.flush(60)
            status = writer.status()
        finally:
            writer.close(timeout=2)
        got = _ids(url)
    assert during["spool"] == "disk_full" and log_status(during) == "disk_full", during
    assert tail == b"\n", "a partial write was left in the segment"
    assert flushed, status
    assert sorted(got) == accepted and len(got) == len(set(got))  # none lost, none duplicated
    assert status["rows_dropped"] == refused and status["rows_rejected"] == 0 and status["spool"] == "ok"
    record("disk full", f"a 512 KiB tmpfs: {len(accepted)} rows accepted before, during and after the disk filled "
           f"(PostgreSQL stopped meanwhile), {refused} refused and counted", len(accepted) + refused,
           [] if sorted(got) == accepted else [f"{len(set(accepted) - set(got))} lost"])


def test_a_spool_folder_with_unread_bytes_on_disk_is_never_deleted(tmp_path):
    spool = Spool(tmp_path / "w.1.ab", 1 << 30).open()
    assert spool.append(encode([row(1)]))
    spool.sync()
    rows, pos = spool.read(10)
    spool.commit(pos)
    segment = next((tmp_path / "w.1.ab").glob("seg-*.log"))
    with open(segment, "ab") as f:  # bytes this process's counters do not know about
        f.write(encode([row(2)]))
    assert spool.pending_bytes() == 0 and not spool.close()
    assert segment.exists(), "a spool whose counters read 0 was deleted with an unread row in it"


# ---- point 9: the node's spools share one bound; a failed open degrades ------------------------

def test_spools_of_a_node_share_one_bound(tmp_path):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    size = {i: len(encode([row(i)])) for i in range(12_000)}
    settings = _settings(spool_max_bytes=1 << 20)
    first = LogWriter(settings, name="replica-a", database_url=dead, spool_root=tmp_path).start()
    second = LogWriter(settings, name="replica-b", database_url=dead, spool_root=tmp_path).start()
    try:
        a = [i for i in range(3000) if first.submit([row(i)])]  # ~450 KiB
        wait_for(lambda: second._spool.others_pending >= sum(size[i] for i in a), 10,
                 what="the second writer to see the first")
        b = [i for i in range(3000, 12_000) if second.submit([row(i)])]  # tries ~1.3 MiB more
        on_disk = sum(Spool.pending_on_disk(d) for d in tmp_path.iterdir())
        status = second.status()
    finally:
        first.close(timeout=0.5)
        second.close(timeout=0.5)
    assert on_disk == sum(size[i] for i in a + b) <= (1 << 20), on_disk  # one bound for the node
    assert len(a) == 3000 and (1 << 20) - on_disk < 2 * max(size.values())  # the second got what was left
    assert status["spool"] == "full" and status["rows_dropped"] == 9000 - len(b) and log_status(status) == "spool_full"
    record("spool bound", f"two writers on one node with a 1 MiB bound: {len(a)} + {len(b)} rows accepted, "
           f"{status['rows_dropped']} refused and counted", 12_000)


def test_a_spool_that_cannot_be_opened_degrades_logging_instead_of_failing(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool folder should be")
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    writer = LogWriter(_settings(), database_url=dead, spool_root=blocker / "spool").start()  # must not raise
    try:
        assert writer.submit([row(1), row(2)]) == 0
        status = writer.status()
        assert status["spool"] == "unavailable" and status["rows_dropped"] == 2
        assert status["spool_open_failures"] >= 1 and log_status(status) == "spool_unavailable"
        blocker.unlink()
        wait_for(lambda: writer.status()["spool"] == "ok", 10, what="the writer to open its spool")
        assert writer.submit([row(3)]) == 1 and writer.status()["spool_pending_bytes"] > 0
    finally:
        writer.close(timeout=0.5)
    record("spool open", "a spool folder that cannot be created, then can", 3)
