"""features.download against a fake Binance serving real candles (see scripts/lab/fake_binance.py).

The candles come from the shared real data (a window around the 2023-03-24 Binance halt, so a
real gap crosses the paging), else from data/sample, else synthetic.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from binance.exceptions import BinanceAPIException

from features.candles import REQUIRED_COLUMNS, gap_report, load_candles
from features.download import download_klines, main
from features.klines_api import BASE_URL_ENV, PAGE_LIMIT, RetryPolicy, api_root, make_client, parse_time_ms
from configs.errors import ConfigError, MarketDataError
from scripts.lab.fake_binance import REPO_ROOT, FakeBinance, load_test_candles

STEP = 5 * 60 * 1000
SYMBOL = "BTCUSDT"
FAST = RetryPolicy(max_attempts=4, backoff_base_s=0.02, backoff_max_s=0.1)


@pytest.fixture(scope="module")
def source() -> pd.DataFrame:
    return load_test_candles(SYMBOL, count=2500, start="2023-03-20")


@pytest.fixture
def fake(source: pd.DataFrame) -> Iterator[FakeBinance]:
    with FakeBinance({SYMBOL: source}, interval="5m") as server:
        yield server


def t(source: pd.DataFrame, i: int) -> int:
    return int(source["open_time"].iloc[i])


def end_of(source: pd.DataFrame) -> int:
    """Exclusive end just after the last source candle."""
    return t(source, -1) + STEP


def download(fake: FakeBinance, out: Path, start: int, end: int | None, **kw) -> Path:
    kw.setdefault("retry", FAST)
    return download_klines(SYMBOL, "5m", start, end, out_dir=out, base_url=fake.base_url,
                           progress=False, **kw)


def assert_same_candles(path: Path, expected: pd.DataFrame) -> None:
    got = pd.read_parquet(path)
    pd.testing.assert_frame_equal(got, expected.reset_index(drop=True), check_exact=True)


# ---- happy path ---------------------------------------------------------------------------

def test_full_download_equals_source_exactly(fake: FakeBinance, source: pd.DataFrame,
                                             tmp_path: Path) -> None:
    path = download(fake, tmp_path, t(source, 0), None)

    assert path == tmp_path / "BTCUSDT_5m.parquet"
    assert_same_candles(path, fake.candles(SYMBOL))
    got = pd.read_parquet(path)
    assert list(got.columns) == [*REQUIRED_COLUMNS, "quote_volume", "trades"]
    assert got["open_time"].dtype == "int64"
    pd.testing.assert_frame_equal(got[list(REQUIRED_COLUMNS)], source[list(REQUIRED_COLUMNS)],
                                  check_exact=True)
    loaded = load_candles(path)
    assert gap_report(loaded["open_time"]) == gap_report(source["open_time"])  # kept, not filled
    assert not list(tmp_path.glob("*.tmp"))


def test_pages_continue_after_the_last_candle(fake: FakeBinance, source: pd.DataFrame,
                                              tmp_path: Path) -> None:
    end = end_of(source)
    download(fake, tmp_path, t(source, 0), end)

    reqs = fake.klines_requests()
    assert len(reqs) == math.ceil(len(source) / PAGE_LIMIT) > 1
    assert all(r.path == "/api/v3/klines" and r.status == 200 for r in reqs)
    assert [r.int_param("startTime") for r in reqs] == [
        t(source, 0), *(t(source, k * PAGE_LIMIT - 1) + STEP for k in range(1, len(reqs)))]
    assert {r.int_param("endTime") for r in reqs} == {end - 1}
    assert {r.int_param("limit") for r in reqs} == {PAGE_LIMIT}
    assert {(r.params["symbol"], r.params["interval"]) for r in reqs} == {(SYMBOL, "5m")}


def test_only_closed_candles_are_stored(fake: FakeBinance, source: pd.DataFrame,
                                        tmp_path: Path) -> None:
    now_s = (t(source, 1500) + 2 * 60_000) / 1000  # candle 1500 is two minutes old: still open
    path = download(fake, tmp_path, t(source, 0), None, clock=lambda: now_s)

    got = pd.read_parquet(path)
    assert len(got) == 1500
    assert int(got["open_time"].iloc[-1]) == t(source, 1499)


def test_the_exchanges_clock_decides_which_candles_are_closed(source: pd.DataFrame, tmp_path: Path) -> None:
    """This machine's clock runs a day ahead; the exchange says candle 1500 is two minutes old (open):
    only candles 0..1499 are stored. With the local clock deciding, the open one was stored too."""
    server_now_ms = t(source, 1500) + 2 * 60_000
    with FakeBinance({SYMBOL: source}, interval="5m", server_time_ms=lambda: server_now_ms) as fake:
        path = download(fake, tmp_path, t(source, 0), None)
        assert [r.path for r in fake.requests][0] == "/api/v3/time"

    got = pd.read_parquet(path)
    assert len(got) == 1500
    assert int(got["open_time"].iloc[-1]) == t(source, 1499)


# ---- resume -------------------------------------------------------------------------------

def test_resume_appends_after_last_stored_candle(fake: FakeBinance, source: pd.DataFrame,
                                                 tmp_path: Path) -> None:
    path = download(fake, tmp_path, t(source, 0), t(source, 1234))
    assert len(pd.read_parquet(path)) == 1234
    fake.clear_requests()

    download(fake, tmp_path, t(source, 0), end_of(source))

    first = fake.klines_requests()[0]
    assert first.int_param("startTime") == t(source, 1233) + STEP
    got = pd.read_parquet(path)
    assert got["open_time"].is_unique
    assert_same_candles(path, fake.candles(SYMBOL))


def test_up_to_date_file_makes_no_request(fake: FakeBinance, source: pd.DataFrame,
                                          tmp_path: Path) -> None:
    path = download(fake, tmp_path, t(source, 0), end_of(source))
    mtime = path.stat().st_mtime_ns
    fake.clear_requests()

    assert download(fake, tmp_path, t(source, 0), end_of(source)) == path

    assert fake.requests == []
    assert path.stat().st_mtime_ns == mtime


def test_failure_mid_download_keeps_progress_and_rerun_resumes(
        fake: FakeBinance, source: pd.DataFrame, tmp_path: Path) -> None:
    first_start = t(source, 0)
    fake.inject(500, times=100, match=lambda q: int(q["startTime"]) > first_start)

    with pytest.raises(MarketDataError, match="gave up after 4 attempts"):
        download(fake, tmp_path, first_start, end_of(source))

    path = tmp_path / "BTCUSDT_5m.parquet"
    assert len(pd.read_parquet(path)) == PAGE_LIMIT  # the first page survived the failure
    fake.clear_injections()
    fake.clear_requests()
    download(fake, tmp_path, first_start, end_of(source))
    assert fake.klines_requests()[0].int_param("startTime") == t(source, PAGE_LIMIT - 1) + STEP
    assert_same_candles(path, fake.candles(SYMBOL))


# ---- retries and errors -------------------------------------------------------------------

def test_429_honours_retry_after(fake: FakeBinance, source: pd.DataFrame, tmp_path: Path) -> None:
    fake.inject(429, retry_after=1)

    path = download(fake, tmp_path, t(source, 0), end_of(source))

    reqs = fake.klines_requests()
    assert [r.status for r in reqs[:2]] == [429, 200]
    assert reqs[0].params == reqs[1].params  # the same page, asked again
    waited = reqs[1].at - reqs[0].at
    assert 0.95 <= waited < 5, waited
    assert_same_candles(path, fake.candles(SYMBOL))


def test_retry_after_beyond_the_limit_fails_fast(fake: FakeBinance, source: pd.DataFrame,
                                                 tmp_path: Path) -> None:
    fake.inject(429, retry_after=3600)
    started = time.monotonic()

    with pytest.raises(MarketDataError, match="Retry-After"):
        download(fake, tmp_path, t(source, 0), end_of(source))

    assert time.monotonic() - started < 5
    assert len(fake.klines_requests()) == 1


def test_5xx_is_retried_with_exponential_backoff(fake: FakeBinance, source: pd.DataFrame,
                                                 tmp_path: Path) -> None:
    for status in (500, 503, 502):
        fake.inject(status)
    retry = RetryPolicy(max_attempts=4, backoff_base_s=0.05, backoff_max_s=1.0)

    path = download(fake, tmp_path, t(source, 0), end_of(source), retry=retry)

    reqs = fake.klines_requests()
    assert [r.status for r in reqs[:4]] == [500, 503, 502, 200]
    gaps = [b.at - a.at for a, b in zip(reqs[:3], reqs[1:4])]
    assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] >= 0.19, gaps
    assert_same_candles(path, fake.candles(SYMBOL))


def test_persistent_5xx_fails_after_bounded_attempts(fake: FakeBinance, source: pd.DataFrame,
                                                     tmp_path: Path) -> None:
    fake.inject(503, times=100)

    with pytest.raises(MarketDataError, match=r"gave up after 4 attempts.*HTTP 503"):
        download(fake, tmp_path, t(source, 0), end_of(source))

    assert len(fake.klines_requests()) == 4
    assert not (tmp_path / "BTCUSDT_5m.parquet").exists()


def test_client_error_is_reported_without_retry(fake: FakeBinance, source: pd.DataFrame,
                                                tmp_path: Path) -> None:
    with pytest.raises(MarketDataError, match="Invalid symbol"):
        download_klines("DOGEUSDT", "5m", t(source, 0), end_of(source), out_dir=tmp_path,
                        base_url=fake.base_url, retry=FAST, progress=False)
    assert len(fake.klines_requests()) == 1


def test_dropped_connection_is_retried(fake: FakeBinance, source: pd.DataFrame,
                                       tmp_path: Path) -> None:
    fake.inject(disconnect=True)

    path = download(fake, tmp_path, t(source, 0), end_of(source))

    assert [r.status for r in fake.klines_requests()[:2]] == [0, 200]
    assert_same_candles(path, fake.candles(SYMBOL))


def test_unreachable_server_is_a_market_data_error(source: pd.DataFrame, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MarketDataError, match="gave up after 4 attempts.*network error"):
        download_klines(SYMBOL, "5m", t(source, 0), end_of(source), out_dir=tmp_path,
                        base_url=f"http://127.0.0.1:{port}", retry=FAST, timeout_s=2,
                        progress=False)


# ---- configuration and CLI ----------------------------------------------------------------

def test_base_url_from_environment(fake: FakeBinance, source: pd.DataFrame, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BASE_URL_ENV, fake.base_url)
    download_klines(SYMBOL, "5m", t(source, 0), t(source, 10), out_dir=tmp_path, progress=False)
    assert len(fake.klines_requests()) == 1


def test_inputs_are_parsed_strictly() -> None:
    assert parse_time_ms("2024-01-01") == 1_704_067_200_000
    assert parse_time_ms("2024-01-01T01:00:00+01:00") == 1_704_067_200_000
    assert parse_time_ms("1704067200000") == 1_704_067_200_000
    assert api_root("http://127.0.0.1:8080/") == api_root("http://127.0.0.1:8080/api") \
        == "http://127.0.0.1:8080/api"
    with pytest.raises(ConfigError):
        api_root("127.0.0.1:8080")
    with pytest.raises(ConfigError):
        download_klines(SYMBOL, "1w", 0, out_dir="unused")


def test_cli_writes_a_file_load_candles_accepts(fake: FakeBinance, source: pd.DataFrame,
                                                tmp_path: Path) -> None:
    iso = lambda ms: pd.Timestamp(ms, unit="ms", tz="UTC").isoformat()  # noqa: E731
    env = {k: v for k, v in os.environ.items() if k != BASE_URL_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "features.download", "--symbol", "btcusdt", "--interval", "5m",
         "--start", iso(t(source, 0)), "--end", iso(end_of(source)), "--out", str(tmp_path),
         "--base-url", fake.base_url],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "BTCUSDT_5m.parquet"
    assert proc.stdout.strip().splitlines()[-1] == str(path)
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal
    loaded = load_candles(path)
    assert len(loaded) == len(source)
    assert_same_candles(path, fake.candles(SYMBOL))


def test_cli_reports_errors_with_exit_code_1(fake: FakeBinance, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--symbol", "DOGEUSDT", "--start", "2023-03-20", "--end", "2023-03-21",
               "--out", str(tmp_path), "--base-url", fake.base_url, "--max-attempts", "2"])
    assert rc == 1
    assert capsys.readouterr().err.startswith("error: ")


# ---- the fake itself speaks what python-binance expects -----------------------------------

def test_fake_server_serves_python_binance(fake: FakeBinance, source: pd.DataFrame) -> None:
    client = make_client(fake.base_url)
    assert client.ping() == {}
    assert "serverTime" in client.get_server_time()
    assert [s["symbol"] for s in client.get_exchange_info()["symbols"]] == [SYMBOL]

    last = client.get_klines(symbol=SYMBOL, interval="5m", endTime=t(source, 99), limit=10)
    assert [k[0] for k in last] == [t(source, i) for i in range(90, 100)]
    assert len(last[0]) == 12 and isinstance(last[0][1], str)
    assert last[0][6] == t(source, 90) + STEP - 1

    everything = list(client.get_historical_klines_generator(SYMBOL, "5m", t(source, 0)))
    assert [k[0] for k in everything] == source["open_time"].tolist()

    with pytest.raises(BinanceAPIException) as info:
        client.get_klines(symbol=SYMBOL, interval="5m", limit=PAGE_LIMIT + 1)
    assert info.value.status_code == 400
