"""Download Binance spot klines into the engine's candle Parquet schema, resumably.

``python -m features.download --symbol BTCUSDT --interval 5m --start 2024-01-01 --out data/``
writes ``data/BTCUSDT_5m.parquet``. The same code path (:func:`download_klines`) serves backfills.

Design choices, and why:

* **Own paging loop over** ``Client.get_klines`` rather than python-binance's
  ``get_historical_klines_generator``: a generator dies on its first exception, so a 429 on page
  300 of 400 would lose the whole run. Paging ourselves lets each page be retried on its own and
  lets progress be checkpointed to disk.
* **Resumable**: an existing file is extended from its last candle (never re-downloaded, never
  overlapped), and candles fetched so far are saved even when a run fails, so rerunning the same
  command picks up where it stopped.
* **Only closed candles** are stored: the candle that is still forming would otherwise be frozen
  into history with a partial volume and a close that never happened.
* **Atomic writes** (temp file in the same directory + ``os.replace``): a crash mid-write must
  never leave a truncated Parquet file that the next resume would then refuse to read.
* **The whole file is validated** with :func:`features.candles.validate_candles` before every
  write, so a bad page cannot silently corrupt history that training later trusts.
* Binance and network failures become :class:`MarketDataError` with the request and the last
  problem in the message, so callers (CLI, backfill jobs) can handle one error type.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import requests
from binance import Client
from binance.exceptions import BinanceAPIException, BinanceRequestException
from tqdm import tqdm

from features.candles import validate_candles
from configs.errors import CandleDataError, ConfigError, MarketDataError, MLEngineError

log = logging.getLogger("features.download")  # not __main__ under -m

T = TypeVar("T")

DEFAULT_OUT_DIR = Path("data")
BASE_URL_ENV = "MLE_BINANCE_API_URL"
PAGE_LIMIT = 1000  # Binance's maximum klines per request

_MINUTE_MS = 60_000
# Only intervals whose candles open on multiples of their length since the epoch: that is what
# validate_candles checks. Weekly (Monday-aligned) and monthly candles are not, so they are refused.
SUPPORTED_INTERVALS: dict[str, int] = {
    "1m": _MINUTE_MS, "3m": 3 * _MINUTE_MS, "5m": 5 * _MINUTE_MS, "15m": 15 * _MINUTE_MS,
    "30m": 30 * _MINUTE_MS, "1h": 60 * _MINUTE_MS, "2h": 120 * _MINUTE_MS, "4h": 240 * _MINUTE_MS,
    "6h": 360 * _MINUTE_MS, "8h": 480 * _MINUTE_MS, "12h": 720 * _MINUTE_MS, "1d": 1440 * _MINUTE_MS,
}
_SYMBOL_RE = re.compile(r"^[A-Z0-9]{2,20}$")
_RETRYABLE_NETWORK_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one request before giving up.

    Bounded on purpose: a backfill that retries forever hides an outage; one that fails with a
    clear message after a few attempts can be rerun (it resumes) once the exchange is back.
    """

    max_attempts: int = 5
    backoff_base_s: float = 1.0  # 5xx / network: base * 2**(attempt-1), capped below
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0  # a 429 asking for a longer pause fails instead of hanging

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based) after a 5xx or network error."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def interval_ms(interval: str) -> int:
    """Length of ``interval`` in ms; refuses intervals whose candles are not epoch-aligned."""
    try:
        return SUPPORTED_INTERVALS[interval]
    except KeyError:
        raise ConfigError(f"unsupported interval {interval!r} "
                          f"(supported: {', '.join(SUPPORTED_INTERVALS)})") from None


def normalise_symbol(symbol: str) -> str:
    """Upper-case ``symbol`` and check it looks like a Binance spot symbol (it names the file)."""
    s = symbol.strip().upper()
    if not _SYMBOL_RE.match(s):
        raise ConfigError(f"invalid symbol {symbol!r} (expected e.g. BTCUSDT)")
    return s


def parse_time_ms(value: str | int) -> int:
    """Parse ``2024-01-01``, an ISO datetime (naive means UTC) or epoch milliseconds."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        ts = pd.Timestamp(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot parse time {value!r}: {exc}") from None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value // 1_000_000)


def api_root(base_url: str) -> str:
    """Turn ``http://host:port`` (or ``.../api``) into python-binance's ``API_URL``.

    python-binance builds request URLs as ``API_URL + "/v3/" + path``, so the root must end in
    ``/api``; accepting both spellings avoids a silent ``/api/api/v3`` misroute.
    """
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"invalid Binance base URL {base_url!r} (expected http(s)://host[:port])")
    return url if url.endswith("/api") else url + "/api"


def candle_path(out_dir: str | Path, symbol: str, interval: str) -> Path:
    """Where the candles of ``symbol``/``interval`` live: ``{out_dir}/{SYMBOL}_{interval}.parquet``."""
    return Path(out_dir) / f"{normalise_symbol(symbol)}_{interval}.parquet"


def make_client(base_url: str | None = None, timeout_s: float = 10.0) -> Client:
    """A key-less python-binance client, optionally pointed at another REST endpoint.

    ``base_url`` (default: ``Settings.binance_api_url``, i.e. ``$MLE_BINANCE_API_URL``) replaces
    ``https://api.binance.com``; tests and mirrors use it. ``ping=False`` because the constructor's
    ping would be an unretried request.
    """
    from configs.settings import load_settings

    client = Client(ping=False, requests_params={"timeout": timeout_s})
    client.API_URL = api_root(base_url or load_settings().binance_api_url)
    return client


# --------------------------------------------------------------------------------------------
# Requests with retries
# --------------------------------------------------------------------------------------------

def _retry_after_s(exc: BinanceAPIException) -> float | None:
    """The server's ``Retry-After`` in seconds, if it sent a numeric one."""
    headers = getattr(exc.response, "headers", None) or {}
    raw = headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


def _describe(exc: BinanceAPIException) -> str:
    msg = str(exc.message or "")[:200]
    return f"HTTP {exc.status_code} (Binance code {exc.code}): {msg}"


def _api_error_delay(exc: BinanceAPIException, attempt: int, retry: RetryPolicy, what: str) -> float:
    """Seconds to wait before retrying ``exc``; raises when it must not be retried."""
    status = exc.status_code
    if status == 429:
        wait = _retry_after_s(exc)
        if wait is None:
            return retry.backoff(attempt)
        if wait > retry.max_retry_after_s:
            raise MarketDataError(f"{what}: rate limited, Binance asks to wait {wait:.0f} s "
                                  f"(Retry-After), more than the {retry.max_retry_after_s:.0f} s "
                                  "allowed; rerun later (the download resumes)") from exc
        return wait
    if 500 <= status < 600:
        return retry.backoff(attempt)
    if status == 418:
        raise MarketDataError(f"{what}: this IP is banned by Binance for ignoring rate limits "
                              f"(Retry-After {_retry_after_s(exc)} s): {_describe(exc)}") from exc
    raise MarketDataError(f"{what}: {_describe(exc)}") from exc


def call_with_retry(fn: Callable[[], T], what: str, retry: RetryPolicy = RetryPolicy(),
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn``, retrying 429 (after ``Retry-After``), 5xx and network errors, boundedly.

    Anything else (4xx such as an invalid symbol, an unparseable body) is not transient and fails
    at once. Every failure surfaces as :class:`MarketDataError` naming ``what`` and the cause.
    """
    for attempt in range(1, retry.max_attempts + 1):
        try:
            return fn()
        except BinanceAPIException as exc:
            delay = _api_error_delay(exc, attempt, retry, what)
            problem, cause = _describe(exc), exc
        except _RETRYABLE_NETWORK_ERRORS as exc:
            delay = retry.backoff(attempt)
            problem, cause = f"network error: {type(exc).__name__}: {str(exc)[:300]}", exc
        except BinanceRequestException as exc:
            raise MarketDataError(f"{what}: invalid response from Binance: {exc.message}") from exc
        except requests.exceptions.RequestException as exc:
            raise MarketDataError(f"{what}: request failed: {type(exc).__name__}: {exc}") from exc
        if attempt == retry.max_attempts:
            raise MarketDataError(f"{what}: gave up after {attempt} attempts; last error: "
                                  f"{problem}") from cause
        log.warning("%s: %s; retry %d/%d in %.1f s", what, problem, attempt,
                    retry.max_attempts - 1, delay)
        sleep(delay)
    raise AssertionError("unreachable")  # max_attempts >= 1 returns or raises above


def exchange_time_ms(client: Client, retry: RetryPolicy = RetryPolicy()) -> int:
    """Binance's clock (``GET /api/v3/time``), retried like every other request."""
    answer = call_with_retry(client.get_server_time, f"GET {client.API_URL}/v3/time", retry)
    try:
        return int(answer["serverTime"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MarketDataError(f"GET {client.API_URL}/v3/time: no serverTime in {str(answer)[:200]}") from exc


# --------------------------------------------------------------------------------------------
# Paging and parsing
# --------------------------------------------------------------------------------------------

def klines_to_frame(rows: Sequence[Sequence[Any]]) -> pd.DataFrame:
    """Binance's 12-field kline rows → schema columns plus ``close_time`` (used to drop open candles)."""
    arr = np.asarray(rows, dtype=object)
    if arr.ndim != 2 or arr.shape[1] < 9:
        raise MarketDataError(f"unexpected kline layout from Binance: shape {arr.shape}, "
                              f"first row {rows[0] if len(rows) else None!r}")
    try:
        return pd.DataFrame({
            "open_time": arr[:, 0].astype(np.int64),
            "open": arr[:, 1].astype(np.float64),
            "high": arr[:, 2].astype(np.float64),
            "low": arr[:, 3].astype(np.float64),
            "close": arr[:, 4].astype(np.float64),
            "volume": arr[:, 5].astype(np.float64),
            "quote_volume": arr[:, 7].astype(np.float64),
            "trades": arr[:, 8].astype(np.float64),
            "close_time": arr[:, 6].astype(np.int64),
        })
    except (TypeError, ValueError) as exc:
        raise MarketDataError(f"non-numeric kline field from Binance: {exc}") from exc


def iter_kline_pages(client: Client, symbol: str, interval: str, start_ms: int, end_ms: int,
                     retry: RetryPolicy = RetryPolicy(),
                     limit: int = PAGE_LIMIT) -> Iterator[pd.DataFrame]:
    """Yield pages of candles with ``start_ms <= open_time < end_ms``, oldest first.

    Binance returns klines with ``startTime <= open_time <= endTime``; the next page starts one
    interval after the last candle received. A short page means there is nothing more yet.
    """
    step = interval_ms(interval)
    cursor = start_ms
    while cursor < end_ms:
        what = (f"GET {client.API_URL}/v3/klines {symbol} {interval} startTime={cursor} "
                f"({_fmt_ms(cursor)})")
        rows = call_with_retry(
            lambda c=cursor: client.get_klines(symbol=symbol, interval=interval, startTime=c,
                                               endTime=end_ms - 1, limit=limit),
            what, retry)
        if not rows:
            return
        page = klines_to_frame(rows)
        first, last = int(page["open_time"].iloc[0]), int(page["open_time"].iloc[-1])
        if first < cursor or last < first:
            raise MarketDataError(f"{what}: server returned candles out of order "
                                  f"(first {first}, last {last})")
        yield page
        if len(rows) < limit:
            return
        cursor = last + step


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


def _fmt_ms(ms: int) -> str:
    return f"{pd.Timestamp(int(ms), unit='ms', tz='UTC'):%Y-%m-%d %H:%M} UTC"


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
                     _fmt_ms(last_open_ms))

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
                    path, _fmt_ms(last), _fmt_ms(start_ms))
    log.info("%s: %d candles stored up to %s; resuming", path, len(existing), _fmt_ms(last))
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
    if end_ms is not None and start >= int(end_ms):
        now_ms = int(end_ms)  # nothing to fetch: no need to ask the exchange what time it is
    else:
        now_ms = int(clock() * 1000) if clock is not None else exchange_time_ms(client, retry)
    stop = now_ms if end_ms is None else min(int(end_ms), now_ms)
    if start >= stop:
        client.session.close()
        if existing is None:
            raise ConfigError(f"{symbol} {interval}: empty time range "
                              f"{_fmt_ms(start)} .. {_fmt_ms(stop)}")
        log.info("%s: up to date (nothing between %s and %s)", path, _fmt_ms(start), _fmt_ms(stop))
        return path

    log.info("downloading %s %s from %s to %s via %s", symbol, interval, _fmt_ms(start),
             _fmt_ms(stop), client.API_URL)
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
        client.session.close()

    if not pending:
        if existing is None:
            raise MarketDataError(f"Binance returned no closed {symbol} {interval} candles "
                                  f"between {_fmt_ms(start)} and {_fmt_ms(stop)}")
        log.info("%s: no new closed candles", path)
        return path
    existing = _merge(existing, pending, step)
    write_candles_atomic(existing, path)
    log.info("%s: +%d candles, %d in total, last %s", path, fetched, len(existing),
             _fmt_ms(int(existing["open_time"].iloc[-1])))
    return path


def _save_partial(existing: pd.DataFrame | None, pending: list[pd.DataFrame], step: int,
                  path: Path) -> None:
    """On failure, keep what was fetched so a rerun resumes; never mask the original error."""
    if not pending:
        return
    try:
        merged = _merge(existing, pending, step)
        write_candles_atomic(merged, path)
        log.warning("download interrupted; saved %d candles up to %s in %s; rerun to resume",
                    len(merged), _fmt_ms(int(merged["open_time"].iloc[-1])), path)
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
