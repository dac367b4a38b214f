"""A spool directory as files on disk, read by any process without taking its lock.

Why apart from :class:`deployments.db.spool.Spool`: the node-wide bound (every writer measures the
others' spools), the health figure of all the node's spools and the search for dead processes'
spools read directories that belong to other processes; they need the layout (segment names, the
``position`` file, the ``lock`` file: :mod:`deployments.db.spool` describes it), not a ``Spool``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_SEG_PREFIX, _SEG_SUFFIX = "seg-", ".log"


def seg_name(n: int) -> str:
    return f"{_SEG_PREFIX}{n:08d}{_SEG_SUFFIX}"


def seg_numbers(directory: Path) -> list[int]:
    out = []
    for p in directory.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}"):
        try:
            out.append(int(p.name[len(_SEG_PREFIX):-len(_SEG_SUFFIX)]))
        except ValueError:
            continue
    return sorted(out)


def pending_on_disk(directory: Path) -> int:
    """Unconfirmed bytes of a spool directory, read from disk (any process, no lock taken)."""
    try:
        sizes = {n: (directory / seg_name(n)).stat().st_size for n in seg_numbers(directory)}
        try:
            seg, off = (int(x) for x in (directory / "position").read_text().split())
        except (FileNotFoundError, ValueError):
            seg, off = (min(sizes), 0) if sizes else (0, 0)
    except OSError:
        return 0
    return max(0, sum(size for n, size in sizes.items() if n >= seg) - (off if seg in sizes else 0))


def node_pending_bytes(root: Path) -> int:
    """Bytes not yet confirmed in PostgreSQL in every spool under ``root`` (all writers of this node,
    the router's included, dead ones' too), from their segment sizes and saved read positions."""
    total = 0
    try:
        for d in root.iterdir():
            total += pending_on_disk(d)
    except OSError:
        pass
    return total


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
