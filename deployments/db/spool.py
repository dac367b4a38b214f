"""A durable, append-only local journal of log rows not yet confirmed in PostgreSQL.

Every row passes through it (write-ahead): the request path appends encoded lines with one
``write()`` — in the page cache, so a killed process loses nothing it logged — the writer thread
fsyncs in groups (an OS crash loses at most one flush interval), reads rows back in order, inserts
them, and only then advances the persisted read position. A crash between insert and position
update replays a batch that is already in PostgreSQL; ids are deterministic and inserts are
``ON CONFLICT DO NOTHING``, so that costs nothing. The position file is therefore replaced
atomically but not fsynced.

Layout of a spool directory: ``lock`` (flock held by the owning process, released by the kernel
when it dies, which is how an orphan is recognised), ``seg-NNNNNNNN.log`` (JSON lines, see
:mod:`deployments.db.rows`), ``position`` (``<segment> <offset>`` of the first unconfirmed line),
and ``rejected.log`` (rows PostgreSQL or the decoder refused, one JSON object per line with the
time, the reason and the row, kept for a human; never silently dropped).

Memory stays bounded however long an outage lasts: rows wait on disk, up to ``max_bytes`` for all
the spools of the node together (every directory under the same root: each replica, each
crash-restart and each dead process's leftovers); past that, appends are refused and counted.

A failing disk must not corrupt the journal: a write that fails part-way (a short write, then
``ENOSPC``) is truncated back to the last complete line before the error is reported, so the next
row never lands glued onto a fragment, and a directory is deleted only when its files on disk --
not this process's counters -- say every byte was confirmed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from deployments.db.rows import PredictionRow, SignalRow, decode
from deployments.db.spool_files import orphans, pending_on_disk, seg_name, seg_numbers

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 << 20


class SpoolBusy(RuntimeError):
    """Another live process owns this spool directory."""


class SpoolWriteError(RuntimeError):
    """The local disk refused a write (``errno`` tells which: ENOSPC = full). Not an OSError on
    purpose: the writer treats OSErrors of its database connection as "PostgreSQL is down"."""

    def __init__(self, what: str, exc: OSError) -> None:
        super().__init__(f"{what}: {exc.strerror or exc}")
        self.errno = exc.errno

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class Spool:
    """One directory's journal. ``append`` may be called from any thread; everything else from one
    consumer thread (the writer's), which alone closes file descriptors — so ``sync`` never races
    a close."""

    def __init__(self, directory: Path, max_bytes: int, *, append: bool = True,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.appendable = append
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._fd: int | None = None  # active segment, append only
        self._active = 0
        self._dirty = False
        self._sizes: dict[int, int] = {}
        self._pos = (0, 0)  # first unconfirmed line: (segment, byte offset)
        self._read_file = None
        self._read_seg = -1
        self.torn_lines = 0
        self.rejected_lines = 0
        self.others_pending = 0  # other spools of the node (refreshed by the writer thread)
        self.position_error: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def open(self) -> "Spool":
        """Take ownership (flock) and recover the read position; raises :class:`SpoolBusy` if owned."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(str(self.directory)) from None
        self._lock_fd = fd
        segs = seg_numbers(self.directory)
        self._sizes = {n: (self.directory / seg_name(n)).stat().st_size for n in segs}
        self._pos = self._load_position(segs)
        if self.appendable:
            # Always a fresh segment: the last one may end in a torn line from a crash, and
            # appending after it would glue a good line onto the torn one.
            self._active = (segs[-1] + 1) if segs else 1
            self._open_active()
            if not segs:
                self._pos = (self._active, 0)
        else:
            self._active = (segs[-1] + 1) if segs else 1  # nothing is appended: all segments are sealed
        return self

    def close(self, remove_if_empty: bool = True) -> bool:
        """Fsync and release; delete the directory when every row is confirmed. True if deleted."""
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._read_file is not None:
            self._read_file.close()
            self._read_file = None
        removed = False
        if (remove_if_empty and self.pending_bytes() == 0 and Spool.pending_on_disk(self.directory) == 0
                and not (self.directory / "rejected.log").exists()):
            shutil.rmtree(self.directory, ignore_errors=True)
            removed = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        return removed

    def refresh_node_usage(self) -> int:
        """Re-read what the other spools under this one's root hold (the node-wide bound)."""
        total = 0
        try:
            for d in self.directory.parent.iterdir():
                if d != self.directory and d.is_dir():
                    total += Spool.pending_on_disk(d)
        except OSError:
            pass
        self.others_pending = total
        return total

    pending_on_disk = staticmethod(pending_on_disk)  # unconfirmed bytes of any spool directory, from disk

    def _open_active(self) -> None:
        path = self.directory / seg_name(self._active)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._sizes[self._active] = os.fstat(self._fd).st_size

    def _load_position(self, segs: list[int]) -> tuple[int, int]:
        try:
            seg, off = (int(x) for x in (self.directory / "position").read_text().split())
        except (FileNotFoundError, ValueError):
            return (segs[0], 0) if segs else (1, 0)
        if segs and seg < segs[0]:
            return segs[0], 0
        return seg, off

    # ---- producer (any thread) -----------------------------------------------------------------
    def append(self, data: bytes) -> bool:
        """Append whole lines with one write; False (nothing written) when the node's spools are full.

        :class:`SpoolWriteError` when the disk refuses: whatever part was written is cut off again."""
        if not data:
            return True
        with self._lock:
            if self._fd is None:
                raise SpoolWriteError("spool segment is not open", OSError(errno.EBADF, "no open segment"))
            if self._pending() + self.others_pending + len(data) > self.max_bytes:
                return False
            good = self._sizes[self._active]
            view = memoryview(data)
            try:
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError as exc:
                self._cut_back(good)
                raise SpoolWriteError("spool append refused", exc) from None
            self._sizes[self._active] += len(data)
            self._dirty = True
            return True

    def _cut_back(self, good: int) -> None:
        """Drop a partial write (under the lock). If even that fails, seal the segment at its real
        size (the reader skips a sealed segment's torn tail) and append to a fresh one."""
        try:
            os.ftruncate(self._fd, good)
            return
        except OSError as exc:
            log.error("spool %s: cannot cut a partial write (%s); sealing the segment", self.directory, exc)
        try:
            self._sizes[self._active] = os.fstat(self._fd).st_size
            os.close(self._fd)
        except OSError:
            pass
        self._fd = None
        self._active += 1
        try:
            self._open_active()
        except OSError as exc:  # retried by sync(); appends are refused (and counted) meanwhile
            self._fd = None
            self._sizes.pop(self._active, None)
            log.error("spool %s: cannot open a new segment: %s", self.directory, exc)

    # ---- consumer (the writer thread) ----------------------------------------------------------
    def sync(self) -> None:
        """Group commit: make every appended line durable with one fsync; rotate a full segment."""
        with self._lock:
            if self._fd is None and self.appendable and self._lock_fd is not None:
                try:  # a segment lost to a disk error: try again (space may be back)
                    self._open_active()
                except OSError:
                    self._sizes.pop(self._active, None)
                    self._fd = None
            fd, dirty = self._fd, self._dirty
            self._dirty = False
            old = None
            if fd is not None and self._sizes[self._active] >= self.segment_bytes:
                old = fd
                self._active += 1
                self._open_active()
        if fd is not None and dirty:
            os.fsync(fd)
        if old is not None:
            if not dirty:
                os.fsync(old)
            os.close(old)

    def pending_bytes(self) -> int:
        """Bytes appended but not yet confirmed in PostgreSQL (safe from any thread)."""
        with self._lock:
            return self._pending()

    def _pending(self) -> int:
        seg, off = self._pos
        return max(0, sum(size for n, size in self._sizes.items() if n >= seg) - off)

    def read(self, max_rows: int, chunk_bytes: int = 1 << 20) -> tuple[list[PredictionRow | SignalRow], tuple[int, int]]:
        """Up to ``max_rows`` rows from the read position, in order, and the position after them.

        Only complete lines are taken. A sealed segment's incomplete last line (a write torn by a
        crash) is skipped; a complete line that does not decode is set aside in ``rejected.log``.
        """
        rows: list[PredictionRow | SignalRow] = []
        seg, off = self._pos
        while len(rows) < max_rows:
            size = self._sizes.get(seg)
            sealed = seg != self._active or not self.appendable
            if size is None:
                later = [n for n in self._sizes if n > seg]
                if not later:
                    break
                seg, off = min(later), 0
                continue
            if off >= size:
                if sealed and any(n > seg for n in self._sizes):
                    seg, off = min(n for n in self._sizes if n > seg), 0
                    continue
                break
            f = self._reader(seg)
            f.seek(off)
            buf = f.read(min(chunk_bytes, size - off))
            end = buf.rfind(b"\n")
            if end < 0:
                if sealed and off + len(buf) >= size:  # torn tail of a dead writer's segment
                    self.torn_lines += 1
                    log.warning("spool %s: skipping a torn last line in %s", self.directory, seg_name(seg))
                    off = size
                    continue
                if len(buf) >= chunk_bytes:
                    chunk_bytes *= 2  # a line longer than the chunk
                    continue
                break  # the producer is mid-write: wait for the rest of the line
            consumed = 0
            for line in buf[:end + 1].splitlines(keepends=True):
                if len(rows) >= max_rows:
                    break
                consumed += len(line)
                try:
                    rows.append(decode(line))
                except (ValueError, TypeError) as exc:
                    self.reject([line], f"undecodable: {exc}")
            off += consumed
        return rows, (seg, off)

    def _reader(self, seg: int):
        if self._read_seg != seg:
            if self._read_file is not None:
                self._read_file.close()
            self._read_file = open(self.directory / seg_name(seg), "rb")
            self._read_seg = seg
        return self._read_file

    def commit(self, position: tuple[int, int]) -> None:
        """Everything before ``position`` is in PostgreSQL: persist it, delete finished segments.

        A position that cannot be saved (disk full) is kept in memory and saved with the next
        commit: at worst a restart replays rows PostgreSQL already holds, which costs nothing."""
        self._pos = position
        tmp = self.directory / "position.tmp"
        try:
            tmp.write_text(f"{position[0]} {position[1]}\n")
            os.replace(tmp, self.directory / "position")
            self.position_error = None
        except OSError as exc:
            self.position_error = f"position not saved: {exc.strerror or exc}"
        with self._lock:
            done = [n for n in self._sizes if n < position[0] and n != self._active]
            for n in done:
                del self._sizes[n]
        for n in done:
            if self._read_seg == n and self._read_file is not None:
                self._read_file.close()
                self._read_file, self._read_seg = None, -1
            (self.directory / seg_name(n)).unlink(missing_ok=True)

    def reject(self, lines: list[bytes], reason: str) -> None:
        """Keep lines PostgreSQL (or the decoder) refused, with why, for a human to inspect (and
        replay: each ``row`` is a spool line's JSON). :class:`SpoolWriteError` if the disk refuses."""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out = []
        for line in lines:
            try:
                entry = {"rejected_at": at, "reason": reason, "row": json.loads(line)}
            except ValueError:
                entry = {"rejected_at": at, "reason": reason, "line": line.decode("utf-8", "replace").rstrip("\n")}
            out.append(json.dumps(entry) + "\n")
        try:
            with open(self.directory / "rejected.log", "ab") as f:
                f.write("".join(out).encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise SpoolWriteError("rejected.log not written", exc) from None
        self.rejected_lines += len(lines)
        log.error("spool %s: %d line(s) rejected (%s), kept in rejected.log", self.directory, len(lines), reason)


def adopt_orphans(root: Path, own: Path, max_bytes: int) -> list[Spool]:
    """Open (read-only) the spools of dead processes under ``root`` for replay, oldest first."""
    found = []
    for d in orphans(root, own):
        try:
            sp = Spool(d, max_bytes, append=False).open()
        except SpoolBusy:  # another live writer adopted it first
            continue
        log.info("log writer: replaying the spool of a dead process: %s (%d bytes)", d, sp.pending_bytes())
        found.append(sp)
    return found
