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
and ``rejected.log`` (lines PostgreSQL refused, kept for a human; never silently dropped).

Memory stays bounded however long an outage lasts: rows wait on disk, up to ``max_bytes``; past
that, appends are refused and counted (disk is finite too; the count shows in health).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from pathlib import Path

from deployments.db.rows import PredictionRow, SignalRow, decode

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 << 20
_SEG_PREFIX, _SEG_SUFFIX = "seg-", ".log"


class SpoolBusy(RuntimeError):
    """Another live process owns this spool directory."""


def _seg_name(n: int) -> str:
    return f"{_SEG_PREFIX}{n:08d}{_SEG_SUFFIX}"


def _seg_numbers(directory: Path) -> list[int]:
    out = []
    for p in directory.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}"):
        try:
            out.append(int(p.name[len(_SEG_PREFIX):-len(_SEG_SUFFIX)]))
        except ValueError:
            continue
    return sorted(out)


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
        segs = _seg_numbers(self.directory)
        self._sizes = {n: (self.directory / _seg_name(n)).stat().st_size for n in segs}
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
        if remove_if_empty and self.pending_bytes() == 0 and not (self.directory / "rejected.log").exists():
            shutil.rmtree(self.directory, ignore_errors=True)
            removed = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        return removed

    @staticmethod
    def pending_on_disk(directory: Path) -> int:
        """Unconfirmed bytes of a spool directory, read from disk (any process, no lock taken)."""
        try:
            sizes = {n: (directory / _seg_name(n)).stat().st_size for n in _seg_numbers(directory)}
            try:
                seg, off = (int(x) for x in (directory / "position").read_text().split())
            except (FileNotFoundError, ValueError):
                seg, off = (min(sizes), 0) if sizes else (0, 0)
        except OSError:
            return 0
        return max(0, sum(size for n, size in sizes.items() if n >= seg) - (off if seg in sizes else 0))

    def _open_active(self) -> None:
        path = self.directory / _seg_name(self._active)
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
        """Append whole lines with one write; False (nothing written) when the spool is full."""
        if not data:
            return True
        with self._lock:
            if self._fd is None:
                raise RuntimeError("spool is not open for appending")
            if self._pending() + len(data) > self.max_bytes:
                return False
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self._sizes[self._active] += len(data)
            self._dirty = True
            return True

    # ---- consumer (the writer thread) ----------------------------------------------------------
    def sync(self) -> None:
        """Group commit: make every appended line durable with one fsync; rotate a full segment."""
        with self._lock:
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
                    log.warning("spool %s: skipping a torn last line in %s", self.directory, _seg_name(seg))
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
                except (ValueError, TypeError):
                    self.reject([line])
            off += consumed
        return rows, (seg, off)

    def _reader(self, seg: int):
        if self._read_seg != seg:
            if self._read_file is not None:
                self._read_file.close()
            self._read_file = open(self.directory / _seg_name(seg), "rb")
            self._read_seg = seg
        return self._read_file

    def commit(self, position: tuple[int, int]) -> None:
        """Everything before ``position`` is in PostgreSQL: persist it, delete finished segments."""
        self._pos = position
        tmp = self.directory / "position.tmp"
        tmp.write_text(f"{position[0]} {position[1]}\n")
        os.replace(tmp, self.directory / "position")
        with self._lock:
            done = [n for n in self._sizes if n < position[0] and n != self._active]
            for n in done:
                del self._sizes[n]
        for n in done:
            if self._read_seg == n and self._read_file is not None:
                self._read_file.close()
                self._read_file, self._read_seg = None, -1
            (self.directory / _seg_name(n)).unlink(missing_ok=True)

    def reject(self, lines: list[bytes]) -> None:
        """Keep lines PostgreSQL (or the decoder) refused, for a human to inspect."""
        with open(self.directory / "rejected.log", "ab") as f:
            for line in lines:
                f.write(line if line.endswith(b"\n") else line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.rejected_lines += len(lines)
        log.error("spool %s: %d line(s) rejected, kept in rejected.log", self.directory, len(lines))


def orphans(root: Path, own: Path) -> list[Path]:
    """Spool directories under ``root`` whose owner has died (their flock is free), oldest first."""
    if not root.exists():
        return []
    found = []
    for d in root.iterdir():
        if not d.is_dir() or d == own or not (d / "lock").exists():
            continue
        fd = os.open(d / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            found.append(d)
        finally:
            os.close(fd)
    return sorted(found, key=lambda d: d.stat().st_mtime)
