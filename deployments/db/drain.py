"""The log writer's thread: drains this process's spool (and dead processes' spools) into PostgreSQL.

Why a module of its own: :class:`~deployments.db.writer.LogWriter` is two halves that share only
counters and the spool -- the request path (any thread, one ``write()``, never raises) and this
daemon thread with its own asyncio loop, which group-commits the spool, (re)connects, applies the
migrations, writes batches in order, sorts out rows PostgreSQL refuses, and adopts orphaned
spools. :class:`SpoolDrain` is that thread, a mixin of ``LogWriter`` (like
:class:`deployments.close.CandleClose` of the router); the module docstring of
:mod:`deployments.db.writer` tells the whole story.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import asyncpg

from configs.settings import scrub
from deployments.db.insert import UNAVAILABLE, _close_quietly, insert_or_sort_out, is_unavailable
from deployments.db.migrate import apply_migrations
from deployments.db.rows import PredictionRow, SignalRow, encode
from deployments.db.spool import Spool, adopt_orphans

log = logging.getLogger("deployments.db.writer")  # one logger name for the writer's two halves


class SpoolDrain:
    """Mixin of :class:`~deployments.db.writer.LogWriter`: the writer thread. Needs ``settings``,
    ``database_url``, ``spool_root``, ``_spool``, ``_open_spool``, ``_stop``, ``_stop_deadline``,
    ``_submit_lock``, ``_unread``, ``_done`` and the counters ``LogWriter.__init__`` sets."""

    PROBE_INTERVAL_S = 5.0  # an idle writer checks the connection this often
    NODE_USAGE_INTERVAL_S = 1.0  # how often the other spools of the node are measured (the node-wide bound)

    def _thread_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._wake = asyncio.Event()
        ready.set()
        try:
            loop.run_until_complete(self._run())
        except Exception:
            log.exception("log writer thread died; rows stay in the spool for the next start")
        finally:
            self._loop = None
            loop.close()

    async def _run(self) -> None:
        adopted: list[Spool] = []
        state = {"conn": None, "next_connect": 0.0, "next_adopt": 0.0}
        try:
            while True:
                try:
                    if not await self._step(state, adopted):
                        break
                except Exception as exc:  # a bug or a local disk error: keep the thread alive, retry
                    log.exception("log writer: unexpected error; retrying")
                    self.last_error = scrub(f"{type(exc).__name__}: {exc}", self.database_url)
                    await self._sleep(self.settings.log_retry_interval_s)
        finally:
            for sp in adopted:
                sp.close()
            if self._spool is not None:
                self._spool.close()
            if state["conn"] is not None:
                await _close_quietly(state["conn"])
            with self._done:
                self._done.notify_all()

    async def _step(self, state: dict[str, Any], adopted: list[Spool]) -> bool:
        """One round: sync the spool, (re)connect if due, write one batch. False when it is time to stop."""
        s = self.settings
        stopping = self._stop.is_set()
        if stopping and (time.monotonic() >= self._stop_deadline or
                         (state["conn"] is not None and self._idle(adopted))):
            return False
        if not self._maintain_spool(state):
            if stopping:
                return False
            await self._sleep(s.log_retry_interval_s)
            return True
        if state["conn"] is None and time.monotonic() >= state["next_connect"]:
            state["conn"] = await self._connect()
            if state["conn"] is None:
                if stopping:
                    return False  # nothing more can be written now; the spool keeps the rest
                state["next_connect"] = time.monotonic() + s.log_retry_interval_s
        conn = state["conn"]
        if conn is None:  # wake every flush interval anyway: the spool is fsynced at that pace in an outage too
            await self._sleep(max(0.01, min(s.log_flush_interval_s, state["next_connect"] - time.monotonic())))
            return True
        if not stopping and time.monotonic() >= state["next_adopt"]:
            adopted.extend(self._adopt())
            state["next_adopt"] = time.monotonic() + 30.0
        source = adopted[0] if adopted else self._spool
        written = await self._write_next(conn, source, state)
        if written is None:  # the connection was lost; the rows stay in the spool
            return True
        if source is not self._spool:
            if source.pending_bytes() == 0:
                source.close()
                adopted.remove(source)
            return True
        if not written and time.monotonic() - self._contact_at > self.PROBE_INTERVAL_S:
            # Idle: check the server is still there, so health tells the truth before rows pile up.
            try:
                await conn.fetchval("SELECT 1", timeout=s.db_timeout_s)
                self._contact_at = time.monotonic()
            except UNAVAILABLE as exc:
                await self._drop_connection(state, exc)
                return True
        if written < s.log_batch_size:
            await self._sleep(0 if stopping else s.log_flush_interval_s)
        return True

    async def _write_next(self, conn: asyncpg.Connection, source: Spool, state: dict[str, Any]) -> int | None:
        """Write the next batch of ``source``; rows written, or None when PostgreSQL went away."""
        rows, pos = source.read(self.settings.log_batch_size)
        if source is self._spool:
            with self._submit_lock:
                self._unread = max(0, self._unread - len(rows))
        if not rows:
            return 0
        try:
            await self._write(conn, source, rows)
        except Exception as exc:
            if not is_unavailable(exc):
                raise  # a local disk error or a bug: retried by _run, the rows stay in the spool
            await self._drop_connection(state, exc)
            return None
        source.commit(pos)
        self._count_written(source, len(rows))
        self.last_write_at = time.time()
        self._contact_at = time.monotonic()
        return len(rows)

    async def _drop_connection(self, state: dict[str, Any], exc: BaseException) -> None:
        self._mark_down(exc)
        if state["conn"] is not None:
            await _close_quietly(state["conn"])
        state["conn"], state["next_connect"] = None, time.monotonic() + self.settings.log_retry_interval_s

    def _maintain_spool(self, state: dict[str, Any]) -> bool:
        """Group-commit the spool, re-measure the node's other spools now and then, and reopen a
        spool that could not be opened. False while there is no spool."""
        if self._spool is None and not self._open_spool():
            return False
        assert self._spool is not None
        self._spool.sync()
        if time.monotonic() >= state.get("next_usage", 0.0):
            self._spool.refresh_node_usage()
            state["next_usage"] = time.monotonic() + self.NODE_USAGE_INTERVAL_S
        return True

    def _idle(self, adopted: list[Spool]) -> bool:
        return not adopted and self._spool is not None and self._spool.pending_bytes() == 0

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    async def _connect(self) -> asyncpg.Connection | None:
        timeout = self.settings.db_timeout_s
        try:
            conn = await asyncpg.connect(self.database_url, timeout=timeout, command_timeout=timeout)
        except Exception as exc:  # refused, timed out, no such database, bad URL: all mean "down"
            self._mark_down(exc)
            return None
        try:
            await apply_migrations(conn)
        except Exception as exc:
            self._mark_down(exc)
            await _close_quietly(conn)
            return None
        if not self.postgres_up:
            log.info("log writer: PostgreSQL is up (%s pending bytes in the spool)", self._spool.pending_bytes())
        self.postgres_up, self.down_since = True, None
        self._contact_at = time.monotonic()
        return conn

    def _mark_down(self, exc: BaseException) -> None:
        error = scrub(f"{type(exc).__name__}: {exc}", self.database_url)
        if self.postgres_up or self.last_error is None:
            log.warning("log writer: PostgreSQL unavailable, spooling (%s)", error)
        self.postgres_up = False
        self.down_since = self.down_since or time.time()
        self.last_error = error

    async def _write(self, conn: asyncpg.Connection, source: Spool, rows: list[PredictionRow | SignalRow]) -> None:
        """Insert a batch; rows refused for what they hold go to ``rejected.log`` with the reason."""
        bad = await insert_or_sort_out(conn, rows, self.settings.db_timeout_s)
        for row, reason in bad:
            source.reject([encode([row])], reason)
        if bad:
            self.rejected += len(bad)
            self.last_rejected_at = time.time()
            log.error("log writer: %d of %d rows refused, kept in rejected.log: %s", len(bad), len(rows), bad[0][1])

    def _count_written(self, source: Spool, n: int) -> None:
        with self._done:
            if source is self._spool:
                self.written += n
            else:
                self.adopted += n
            self._done.notify_all()

    def _adopt(self) -> list[Spool]:
        assert self._spool is not None
        return adopt_orphans(self.spool_root, self._spool.directory, self.settings.spool_max_bytes)
