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

from configs.settings import Settings
from deployments.db.drain import SpoolDrain
from deployments.db.rows import PredictionRow, SignalRow, encode, rows_from_forecast
from deployments.db.spool import Spool, SpoolWriteError
from deployments.db.spool_files import node_pending_bytes
from inference.forecast import Forecast

log = logging.getLogger(__name__)


class LogWriter(SpoolDrain):
    """Per-process writer of prediction and signal logs. ``start()`` once, ``close()`` at shutdown.

    This class is the request-path half (submit, dedupe, status, lifecycle); the thread that drains
    the spool into PostgreSQL is :class:`~deployments.db.drain.SpoolDrain`.
    """

    DEDUPE_KEYS = 65_536  # recent forecasts remembered, so a cached one served again costs a dict lookup

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
    def log_forecasts(self, forecasts: Iterable[Forecast]) -> int:
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
