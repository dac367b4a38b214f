"""Download Binance spot klines into the engine's candle Parquet schema, resumably.

``python -m features.download --symbol BTCUSDT --interval 5m --start 2024-01-01 --out data/``
writes ``data/BTCUSDT_5m.parquet``. The same code path (:func:`download_klines`) serves backfills.

Requests, retries and paging are ``features.klines_api``'s. Design choices here, and why:

* **Resumable**: an existing file is extended from its last candle (never re-downloaded, never
  overlapped), and candles fetched so far are saved even when a run fails, so rerunning the same
  command picks up where it stopped.
* **Only closed candles** are stored: the candle that is still forming would otherwise be frozen
  into history with a partial volume and a close that never happened.
* **Atomic writes** (temp file in the same directory + ``os.replace``): a crash mid-write must
  never leave a truncated Parquet file that the next resume would then refuse to read.
* **The whole file is validated** with :func:`features.candles.validate_candles` before every
  write, so a bad page cannot silently corrupt history that training later trusts.
* Binance and network failures are :class:`MarketDataError` (``features.klines_api``), bad data
  :class:`CandleDataError`, bad arguments :class:`ConfigError`: callers handle the engine's errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from binance import Client
from tqdm import tqdm

from configs.errors import CandleDataError, ConfigError, MarketDataError, MLEngineError
from features.candles import validate_candles
from features.klines_api import (BASE_URL_ENV, SUPPORTED_INTERVALS, RetryPolicy, exchange_time_ms, fmt_ms, interval_ms,
                                 iter_kline_pages, make_client, normalise_symbol, parse_time_ms)

log = logging.getLogger("features.download")  # not __main__ under -m

DEFAULT_OUT_DIR = Path("data")


def candle_path(out_dir: str | Path, symbol: str, interval: str) -> Path:
    """Where the candles of ``symbol``/``interval`` live: ``{out_dir}/{SYMBOL}_{interval}.parquet``."""
    return Path(out_dir) / f"{normalise_symbol(symbol)}_{interval}.parquet"


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _read_existing(path: Path, step_ms: int) -> pd.DataFrame | None:
    """The stored candles, validated, or None when there is no file yet."""
    if not path.exists():
        return None
    try:
        return validate_candles(pd.read_parquet(path), step_ms)
    except CandleDataError as exc:
        raise CandleDataError(f"{path}: existing file is invalid, refusing to append: {exc}") from None


def write_candles_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` via a temp file in the same directory and ``os.replace``.

    Same directory so the rename is atomic (same filesystem); readers see the old or the new
    file, never a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _merge(existing: pd.DataFrame | None, new: list[pd.DataFrame], step_ms: int) -> pd.DataFrame:
    """Existing + new candles as one validated frame.

    If the existing file lacks the optional columns (e.g. it came from another source), the new
    candles are trimmed to match: NaNs in old rows would make the whole file invalid.
    """
    fresh = pd.concat(new, ignore_index=True).drop(columns="close_time")
    if existing is not None:
        missing = [c for c in fresh.columns if c not in existing.columns]
        if missing:
            log.warning("existing file has no %s column(s); not storing them", ", ".join(missing))
            fresh = fresh.drop(columns=missing)
        fresh = pd.concat([existing, fresh], ignore_index=True)
    return validate_candles(fresh, step_ms)


# --------------------------------------------------------------------------------------------
# The download
# --------------------------------------------------------------------------------------------

class _Progress:
    """tqdm bar on a terminal; periodic log lines otherwise (CI logs hate carriage returns)."""

    def __init__(self, label: str, total: int, enabled: bool | None, log_every_s: float = 10.0):
        self._bar = tqdm(total=total, unit="candle", desc=label, unit_scale=True) \
            if (sys.stderr.isatty() if enabled is None else enabled) else None
        self._label, self._total, self._done = label, total, 0
        self._every, self._last_log = log_every_s, time.monotonic()

    def update(self, n: int, last_open_ms: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last_log >= self._every:
            self._last_log = time.monotonic()
            log.info("%s: %d/~%d candles, up to %s", self._label, self._done, self._total,
                     fmt_ms(last_open_ms))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _resume_start(existing: pd.DataFrame | None, start_ms: int, step_ms: int, path: Path) -> int:
    """Where to start: ``start_ms`` for a new file, one interval after the last stored candle
    otherwise (``start_ms`` is then ignored so the file never gets duplicates or a gap we made)."""
    if existing is None:
        return start_ms
    last = int(existing["open_time"].iloc[-1])
    resume = last + step_ms
    if start_ms > resume:
        log.warning("%s ends at %s; resuming from there, not from the requested start %s",
                    path, fmt_ms(last), fmt_ms(start_ms))
    log.info("%s: %d candles stored up to %s; resuming", path, len(existing), fmt_ms(last))
    return resume


def download_klines(symbol: str, interval: str, start_ms: int, end_ms: int | None = None,
                    out_dir: str | Path = DEFAULT_OUT_DIR, base_url: str | None = None, *,
                    retry: RetryPolicy = RetryPolicy(), timeout_s: float = 10.0,
                    checkpoint_pages: int = 100, progress: bool | None = None,
                    clock: Callable[[], float] | None = None) -> Path:
    """Download closed spot candles of ``symbol`` into ``{out_dir}/{SYMBOL}_{interval}.parquet``.

    Candles with ``start_ms <= open_time < end_ms`` (``end_ms`` None: up to now) are fetched; if
    the file exists, the download resumes after its last candle and appends. Pages are saved
    every ``checkpoint_pages`` pages and when the run fails, so a rerun resumes. ``base_url``
    (default ``$MLE_BINANCE_API_URL``, else api.binance.com) picks the REST endpoint. Which candles
    are closed is decided by the exchange's clock (``GET /api/v3/time``), not this machine's: a
    local clock running ahead would store a candle that is still forming as if it were final.
    ``clock`` (seconds since epoch) replaces it in tests. Returns the file's path.

    Raises :class:`MarketDataError` (Binance/network), :class:`CandleDataError` (bad data),
    :class:`ConfigError` (bad arguments).
    """
    symbol, step = normalise_symbol(symbol), interval_ms(interval)
    path = candle_path(out_dir, symbol, interval)
    existing = _read_existing(path, step)
    start = _resume_start(existing, int(start_ms), step, path)
    client = make_client(base_url, timeout_s)
    try:
        if end_ms is not None and start >= int(end_ms):
            now_ms = int(end_ms)  # nothing to fetch: no need to ask the exchange what time it is
        else:
            now_ms = int(clock() * 1000) if clock is not None else exchange_time_ms(client, retry)
        stop = now_ms if end_ms is None else min(int(end_ms), now_ms)
        if start >= stop:
            if existing is None:
                raise ConfigError(f"{symbol} {interval}: empty time range {fmt_ms(start)} .. {fmt_ms(stop)}")
            log.info("%s: up to date (nothing between %s and %s)", path, fmt_ms(start), fmt_ms(stop))
            return path
        log.info("downloading %s %s from %s to %s via %s", symbol, interval, fmt_ms(start), fmt_ms(stop),
                 client.API_URL)
        existing, pending, fetched = _fetch_closed(client, symbol, interval, start, stop, now_ms, existing, path,
                                                   retry, checkpoint_pages, progress)
    finally:
        client.session.close()

    if not pending:
        if existing is None:
            raise MarketDataError(f"Binance returned no closed {symbol} {interval} candles "
                                  f"between {fmt_ms(start)} and {fmt_ms(stop)}")
        log.info("%s: no new closed candles", path)
        return path
    existing = _merge(existing, pending, step)
    write_candles_atomic(existing, path)
    log.info("%s: +%d candles, %d in total, last %s", path, fetched, len(existing),
             fmt_ms(int(existing["open_time"].iloc[-1])))
    return path


def _fetch_closed(client: Client, symbol: str, interval: str, start: int, stop: int, now_ms: int,
                  existing: pd.DataFrame | None, path: Path, retry: RetryPolicy, checkpoint_pages: int,
                  progress: bool | None) -> tuple[pd.DataFrame | None, list[pd.DataFrame], int]:
    """Page through ``[start, stop)`` keeping the candles closed before ``now_ms``; every
    ``checkpoint_pages`` pages are merged into the file. Returns (what the file holds now, the pages
    not yet written, candles fetched); on any failure what was fetched is saved first."""
    step = interval_ms(interval)
    bar = _Progress(f"{symbol} {interval}", max(1, (stop - start) // step), progress)
    pending: list[pd.DataFrame] = []
    fetched = 0
    try:
        for page in iter_kline_pages(client, symbol, interval, start, stop, retry):
            closed = page[page["close_time"] < now_ms]
            if len(closed):
                pending.append(closed)
                fetched += len(closed)
                bar.update(len(closed), int(closed["open_time"].iloc[-1]))
            if len(closed) < len(page):
                break  # the rest is the candle still forming
            if len(pending) >= checkpoint_pages:
                existing, pending = _merge(existing, pending, step), []
                write_candles_atomic(existing, path)
    except BaseException:
        _save_partial(existing, pending, step, path)
        raise
    finally:
        bar.close()
    return existing, pending, fetched


def _save_partial(existing: pd.DataFrame | None, pending: list[pd.DataFrame], step: int,
                  path: Path) -> None:
    """On failure, keep what was fetched so a rerun resumes; never mask the original error."""
    if not pending:
        return
    try:
        merged = _merge(existing, pending, step)
        write_candles_atomic(merged, path)
        log.warning("download interrupted; saved %d candles up to %s in %s; rerun to resume",
                    len(merged), fmt_ms(int(merged["open_time"].iloc[-1])), path)
    except Exception as exc:  # the original error matters more than this one
        log.error("download interrupted and saving partial progress failed: %s", exc)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m features.download",
        description="Download closed Binance spot candles into {out}/{SYMBOL}_{interval}.parquet "
                    "(resumes an existing file).")
    p.add_argument("--symbol", required=True, help="e.g. BTCUSDT")
    p.add_argument("--interval", default="5m", choices=list(SUPPORTED_INTERVALS))
    p.add_argument("--start", required=True,
                   help="first candle open time: 2024-01-01, ISO datetime (UTC) or epoch ms")
    p.add_argument("--end", help="exclusive end (same formats); default: now")
    p.add_argument("--out", default=str(DEFAULT_OUT_DIR), help="output directory (default: data/)")
    p.add_argument("--base-url", default=None,
                   help=f"REST endpoint root, e.g. http://127.0.0.1:8080 (default: ${BASE_URL_ENV} "
                        "or https://api.binance.com)")
    p.add_argument("--max-attempts", type=int, default=RetryPolicy.max_attempts,
                   help="attempts per request before giving up (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success, 1 on an engine error (message on stderr), 130 on Ctrl-C."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.max_attempts < 1:
            raise ConfigError("--max-attempts must be at least 1")
        path = download_klines(
            args.symbol, args.interval, parse_time_ms(args.start),
            parse_time_ms(args.end) if args.end else None, args.out, args.base_url,
            retry=RetryPolicy(max_attempts=args.max_attempts), timeout_s=args.timeout,
            progress=False if args.no_progress else None)
    except MLEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
