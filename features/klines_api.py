"""Binance spot klines over REST: the endpoint, bounded retries and paging (python-binance).

What ``features.download`` (resumable candle files) and the live feed's REST backfill
(``deployments``) share. Design choices, and why:

* **Own paging loop over** ``Client.get_klines`` rather than python-binance's
  ``get_historical_klines_generator``: a generator dies on its first exception, so a 429 on page
  300 of 400 would lose the whole run. Paging ourselves lets each page be retried on its own (and
  the download checkpoint its progress to disk).
* **Bounded retries** (:class:`RetryPolicy`): 429 after ``Retry-After``, 5xx and network errors
  with exponential backoff; anything else fails at once. Binance and network failures become
  :class:`MarketDataError` with the request and the last problem in the message, so callers (CLI,
  backfill jobs, the feed) handle one error type.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import requests
from binance import Client
from binance.exceptions import BinanceAPIException, BinanceRequestException

from configs.errors import ConfigError, MarketDataError

log = logging.getLogger(__name__)

T = TypeVar("T")

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
                f"({fmt_ms(cursor)})")
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


def fmt_ms(ms: int) -> str:
    """An open time for people: ``2024-01-01 00:05 UTC``."""
    return f"{pd.Timestamp(int(ms), unit='ms', tz='UTC'):%Y-%m-%d %H:%M} UTC"
