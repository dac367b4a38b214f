"""Progress reporting: a tqdm bar on a terminal, plain log lines elsewhere (CI, Ray job logs)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("training")


class _LogProgress:
    """Logs ``desc: i/total`` about every 10% (and at the end) instead of redrawing a bar."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = time.perf_counter()
        self._next = max(1, total // 10)
        log.info("%s: 0/%d", desc, total)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n >= self._next or self.n == self.total:
            log.info("%s: %d/%d (%.1fs)", self.desc, self.n, self.total, time.perf_counter() - self.t0)
            self._next = self.n + max(1, self.total // 10)

    def close(self) -> None:
        pass


@contextmanager
def progress(total: int, desc: str) -> Iterator:
    """A progress object with ``update(k)``: tqdm when stderr is a terminal, log lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="fit", leave=False)
    else:
        bar = _LogProgress(total, desc)
    try:
        yield bar
    finally:
        bar.close()


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
