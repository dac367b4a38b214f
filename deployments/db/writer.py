"""The asynchronous batched log writer: logging never slows or fails a request, and loses no row.

``log_forecasts``/``submit`` (any thread, never raises) dedupe the forecast, encode its rows and
append them to this process's :class:`~deployments.db.spool.Spool` with one ``write()``; that is
all the request path pays. A daemon thread with its own asyncio loop (so the host's loop — a Ray
Serve replica's, a FastAPI app's — never waits on it) fsyncs in groups, reads rows back in order
in batches of ``Settings.log_batch_size``, and inserts them with one multi-row
``INSERT … SELECT FROM unnest(…) ON CONFLICT (id) DO NOTHING`` per table, in one transaction.

PostgreSQL unreachable (refused, stopped, hung past ``db_timeout_s``): the rows simply stay in the
spool, the thread retries every ``log_retry_interval_s`` and, once connected, applies the
migrations and replays the backlog in order. Spools left by dead processes (their flock is free)
are adopted and replayed too. Rows refused for what they contain (by PostgreSQL, or by asyncpg
encoding them: :mod:`deployments.db.insert` tells that from an outage) are inserted one by one so
a single bad row cannot block the rest; the refused ones are kept in ``rejected.log`` with their
reason and counted.

Local disk trouble degrades logging, never serving: a spool that cannot be opened (read-only or
missing disk) or a full disk makes ``submit`` refuse rows -- counted, and shown as ``spool:
unavailable`` / ``disk_full`` in ``status()`` -- while the thread keeps retrying; the node's spools
together stay under ``spool_max_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import asyncpg

from configs.settings import Settings, scrub
from deployments.db.insert import (UNAVAILABLE, _close_quietly, insert_or_sort_out, insert_rows,  # noqa: F401
                                   is_unavailable)
from deployments.db.migrate import apply_migrations
from deployments.db.rows import ForecastLike, PredictionRow, SignalRow, encode, rows_from_forecast
from deployments.db.spool import Spool, SpoolWriteError, adopt_orphans, node_pending_bytes

log = logging.getLogger(__name__)


class LogWriter:
    """Per-process writer of prediction and signal logs. ``start()`` once, ``close()`` at shutdown."""

    DEDUPE_KEYS = 65_536  # recent forecasts remembered, so a cached one served again costs a dict lookup
    PROBE_INTERVAL_S = 5.0  # an idle writer checks the connection this often
    NODE_USAGE_INTERVAL_S = 1.0  # how often the other spools of the node are measured (the node-wide bound)

    def __init__(self, settings: Settings, *, name: str = "engine", database_url: str | None = None,
                 spool_root: Path | None = None) -> None:
        self.settings = settings
        self.database_url = database_url or settings.database_url.get_secret_value()
        self.spool_root = Path(spool_root or settings.spool_dir)
        self.name = name
        self._spool: Spool | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop = threading.Event()
        self._stop_deadline = 0.0
        self._submit_lock = threading.Lock()
        self._recent: OrderedDict[Any, None] = OrderedDict()
        self._done = threading.Condition()
        # Counters (rows). submitted/written are for this process's own spool; adopted for orphans.
        self.submitted = 0
        self.written = 0
        self.adopted = 0
        self.dropped = 0
        self.rejected = 0
        self.last_rejected_at: float | None = None
        self.spool_state = "ok"  # ok | full (node bound) | disk_full | write_error | unavailable (cannot open)
        self.spool_open_failures = 0
        self._spool_dir: Path | None = None
        self._unread = 0
        self.postgres_up = False
        self.last_error: str | None = None
        self.last_write_at: float | None = None
        self.down_since: float | None = time.time()
        self._contact_at = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "LogWriter":
        if self._thread is not None:
            return self
        self._spool_dir = self.spool_root / f"{self.name}.{os.getpid()}.{secrets.token_hex(4)}"
        self._open_spool()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name=f"log-writer-{self.name}",
                                        daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def _open_spool(self) -> bool:
        """Open this process's spool; a disk that refuses degrades logging (counted, retried by the
        writer thread) instead of failing the replica that logs."""
        assert self._spool_dir is not None
        try:
            spool = Spool(self._spool_dir, self.settings.spool_max_bytes).open()
        except OSError as exc:
            self.spool_open_failures += 1
            if self.spool_state != "unavailable":
                log.error("log writer: cannot open the spool %s (%s); rows are dropped (counted) until it opens",
                          self._spool_dir, exc)
            self.spool_state, self.last_error = "unavailable", f"spool unavailable: {exc}"
            return False
        spool.refresh_node_usage()
        self._spool, self.spool_state = spool, "ok"
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what can be written within ``timeout``; the rest stays in the spool for the next start."""
        if self._thread is None:
            return
        self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        self._poke()
        self._thread.join(timeout + 2.0)
        self._thread = None

    # ---- request path --------------------------------------------------------------------------
    def log_forecasts(self, forecasts: Iterable[ForecastLike]) -> int:
        """Log forecasts (prediction + signal rows each); returns rows accepted. Never raises."""
        try:
            rows: list[PredictionRow | SignalRow] = []
            now_ms = 0
            for f in forecasts:
                key = (f.symbol, f.horizon, f.candle_open_time, tuple(sorted(f.model_versions.items())))
                if key in self._recent:  # the common case (a cached forecast served again): no lock, no work
                    continue
                with self._submit_lock:
                    if key in self._recent:
                        continue
                    self._remember(key)
                now_ms = now_ms or int(time.time() * 1000)
                rows.extend(rows_from_forecast(f, now_ms))
            return self.submit(rows) if rows else 0
        except Exception as exc:  # logging must never fail a request
            self._count_drop(1, exc)
            return 0

    def submit(self, rows: Sequence[PredictionRow | SignalRow]) -> int:
        """Append rows to the spool (one write); returns rows accepted. Never raises."""
        if not rows:
            return 0
        try:
            data = encode(rows)
            spool = self._spool
            if spool is None:
                reason = "the spool could not be opened" if self._spool_dir else "LogWriter.start() was not called"
                self._count_drop(len(rows), reason)
                return 0
            with self._submit_lock:
                try:
                    appended = spool.append(data)
                except SpoolWriteError as exc:
                    self.spool_state = "disk_full" if exc.disk_full else "write_error"
                    self._count_drop(len(rows), exc)
                    return 0
                if not appended:
                    self.spool_state = "full"
                    self._count_drop(len(rows), "the node's spools are full (Settings.spool_max_bytes)")
                    return 0
                self.spool_state = "ok"
                self.submitted += len(rows)
                self._unread += len(rows)
                wake = self._unread >= self.settings.log_batch_size
            if wake:
                self._poke()
            return len(rows)
        except Exception as exc:
            self._count_drop(len(rows), exc)
            return 0

    def _remember(self, key: Any) -> None:
        self._recent[key] = None
        if len(self._recent) > self.DEDUPE_KEYS:
            self._recent.popitem(last=False)

    def _count_drop(self, n: int, why: Any) -> None:
        self.dropped += n
        self.last_error = f"dropped {n} row(s): {why}"
        log.error("log writer: %s", self.last_error)

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # loop already closed
                pass

    # ---- observation ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For ``/health/detailed``: is PostgreSQL reachable, what waits in the spool, what was lost."""
        spool = self._spool
        return {
            "postgres": "up" if self.postgres_up else "down",
            "rows_submitted": self.submitted,
            "rows_written": self.written,
            "rows_replayed_from_dead_processes": self.adopted,
            "rows_pending": max(0, self.submitted - self.written),
            "spool_pending_bytes": spool.pending_bytes() if spool else 0,
            "node_spool_pending_bytes": node_pending_bytes(self.spool_root),  # every writer on this node
            "rows_dropped": self.dropped,
            "rows_rejected": self.rejected,
            "last_rejected_at": self.last_rejected_at,
            "spool": self.spool_state,
            "spool_open_failures": self.spool_open_failures,
            "down_for_s": None if self.down_since is None else round(time.time() - self.down_since, 1),
            "last_error": self.last_error,
        }

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far is in PostgreSQL (tests, benchmarks, shutdown)."""
        target = self.submitted
        deadline = time.monotonic() + timeout
        self._poke()
        with self._done:
            while self.written < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(min(left, 0.05))
                self._poke()
        return True

    # ---- the writer thread ---------------------------------------------------------------------
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
