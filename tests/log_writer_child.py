"""A process that logs rows through a LogWriter, for the tests that kill it (``kill -9``) mid-batch.

``python -m tests.log_writer_child DATABASE_URL SPOOL_ROOT N CHUNK PAUSE_S`` submits prediction
rows with ids ``UUID(int=i)`` for i in 0..N-1, CHUNK rows per submit, PAUSE_S between submits,
printing ``SUBMITTED <count>`` after each submit returns and ``DONE`` at the end; then it waits to
be killed. Stdout is flushed every line so the parent knows what was logged before the kill.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

from configs.settings import load_settings
from deployments.db.rows import PredictionRow
from deployments.db.writer import LogWriter


def row(i: int) -> PredictionRow:
    t = 1_700_000_000_000 + i * 300_000
    return PredictionRow(str(uuid.UUID(int=i)), "BTCUSDT", 6, t, t + 1_800_000, "child", 100.0 + i % 7,
                         0.004, -0.003, 0.001, 0.008, -0.006, -0.001, 1_700_000_000_000 + i)


def main() -> None:
    url, spool_root, n, chunk, pause = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
        float(sys.argv[5])
    settings = load_settings(log_batch_size=500, log_flush_interval_s=0.02, log_retry_interval_s=0.2,
                             db_timeout_s=60)
    writer = LogWriter(settings, name="child", database_url=url, spool_root=spool_root).start()
    done = 0
    while done < n:
        k = min(chunk, n - done)
        accepted = writer.submit([row(i) for i in range(done, done + k)])
        assert accepted == k, (accepted, k)
        done += k
        print(f"SUBMITTED {done}", flush=True)
        if pause:
            time.sleep(pause)
    print("DONE", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
