"""Candle loading, validation, resampling and gap reporting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.candles import (FIVE_MINUTES_MS, ONE_MINUTE_MS, gap_report, load_candles, resample, segment_ids,
                              validate_candles)
from configs.errors import CandleDataError, MLEngineError

from tests.conftest import SAMPLE_DATA


def _candles(n: int = 50, start: int = 1_700_000_100_000 // FIVE_MINUTES_MS * FIVE_MINUTES_MS) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.concatenate([[100.0], close[:-1]])
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.002, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.002, n))
    return pd.DataFrame({"open_time": start + FIVE_MINUTES_MS * np.arange(n, dtype=np.int64), "open": open_,
                         "high": high, "low": low, "close": close, "volume": rng.uniform(1, 10, n)})


def test_error_is_part_of_the_hierarchy():
    assert issubclass(CandleDataError, MLEngineError)


def test_sample_loads_and_is_valid():
    df = load_candles(SAMPLE_DATA / "BTCUSDT_5m.parquet")
    assert list(df.columns[:6]) == ["open_time", "open", "high", "low", "close", "volume"]
    assert df["open_time"].dtype == np.int64
    assert len(df) == 30 * 288
    assert (np.diff(df["open_time"]) == FIVE_MINUTES_MS).all()


def test_real_history_gaps_are_reported(real_candles, has_shared_data):
    """The shared history's two known holes; where it is absent, the shipped sample, which has none."""
    if not has_shared_data:
        for symbol, df in real_candles.items():
            report = gap_report(df["open_time"])
            assert (report.gap_count, report.missing_candles) == (0, 0), symbol
            assert segment_ids(df["open_time"]).max() == 0
        return
    for symbol, df in real_candles.items():
        report = gap_report(df["open_time"])
        assert report.gap_count == 2, symbol
        assert report.missing_candles == 16 + 288
        assert report.longest_gap_candles == 288
        assert pd.Timestamp(report.longest_gap_start_ms, unit="ms") == pd.Timestamp("2023-12-31 00:00")
        seg = segment_ids(df["open_time"])
        assert seg.max() == 2


def test_gap_report_and_segments_on_synthetic_gap():
    df = _candles(20).drop(index=[5, 6, 7, 12]).reset_index(drop=True)
    report = gap_report(df["open_time"])
    assert (report.missing_candles, report.gap_count, report.longest_gap_candles) == (4, 2, 3)
    assert report.longest_gap_start_ms == _candles(20)["open_time"][5]
    assert segment_ids(df["open_time"]).tolist() == [0] * 5 + [1] * 4 + [2] * 7
    assert "4 missing candles in 2 gaps" in str(report)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.drop(columns=["volume"]), "missing columns: volume"),
    (lambda d: d.assign(close=d["close"].where(d.index != 7, np.nan)), "row 7"),
    (lambda d: d.assign(high=d["high"].where(d.index != 3, np.inf)), "row 3"),
    (lambda d: d.assign(low=d["low"].where(d.index != 4, -1.0)), "row 4"),
    (lambda d: d.assign(open=d["open"].where(d.index != 4, 0.0)), "open is not positive"),
    (lambda d: d.assign(volume=d["volume"].where(d.index != 9, -5.0)), "row 9"),
    (lambda d: d.assign(high=d["high"].where(d.index != 10, d["low"])), "high is below max(open, close)"),
    (lambda d: d.assign(low=d["low"].where(d.index != 11, d["high"])), "low is above min(open, close)"),
    (lambda d: d.iloc[[0, 2, 1, 3]], "not sorted"),
    (lambda d: pd.concat([d.iloc[:5], d.iloc[4:6]]), "duplicate open_time"),
    (lambda d: d.assign(open_time=d["open_time"] + 60_000), "not aligned"),
])
def test_validation_names_row_and_problem(mutate, message):
    df = mutate(_candles())
    with pytest.raises(CandleDataError) as exc:
        validate_candles(df)
    assert message in str(exc.value)


def test_negative_volume_message():
    df = _candles()
    df.loc[9, "volume"] = -5.0
    with pytest.raises(CandleDataError, match=r"row 9 .*volume is negative"):
        validate_candles(df)


def test_wrong_interval_is_refused():
    df = _candles()
    df.loc[10:, "open_time"] += 150_000  # 2.5 minutes off the grid
    with pytest.raises(CandleDataError, match="row 10"):
        validate_candles(df)


def test_csv_plain_and_binance_layout(tmp_path):
    df = _candles(30)
    plain = tmp_path / "plain.csv"
    df.to_csv(plain, index=False)
    pd.testing.assert_frame_equal(load_candles(plain), validate_candles(df))

    kl = tmp_path / "BTCUSDT-5m-2025-01.csv"
    raw = pd.DataFrame({"open_time": df["open_time"] * 1000,  # 2025+ dumps are in microseconds
                        "open": df["open"], "high": df["high"], "low": df["low"], "close": df["close"],
                        "volume": df["volume"], "close_time": (df["open_time"] + FIVE_MINUTES_MS - 1) * 1000,
                        "quote_volume": df["volume"] * df["close"], "trades": 10, "tb": 0.0, "tq": 0.0, "ig": 0})
    raw.to_csv(kl, index=False, header=False)
    got = load_candles(kl)
    np.testing.assert_array_equal(got["open_time"], df["open_time"])
    np.testing.assert_allclose(got["close"], df["close"])
    assert {"quote_volume", "trades"} <= set(got.columns)


def test_resample_one_minute_to_five(tmp_path):
    rng = np.random.default_rng(1)
    n = 25
    t0 = 1_700_000_000_000 // FIVE_MINUTES_MS * FIVE_MINUTES_MS
    close = 100 + np.cumsum(rng.normal(0, 0.1, n))
    open_ = np.concatenate([[100.0], close[:-1]])
    one = pd.DataFrame({"open_time": t0 + ONE_MINUTE_MS * np.arange(n), "open": open_,
                        "high": np.maximum(open_, close) + 0.05, "low": np.minimum(open_, close) - 0.05,
                        "close": close, "volume": np.arange(1, n + 1, dtype=float)})
    one = one.drop(index=[17])  # the 4th 5-minute bucket is incomplete: it must be dropped, not guessed
    path = tmp_path / "one.parquet"
    one.to_parquet(path)
    five = load_candles(path, resample_from="1m")
    assert five["open_time"].tolist() == [t0 + FIVE_MINUTES_MS * i for i in (0, 1, 2, 4)]
    first = one.iloc[:5]
    row = five.iloc[0]
    assert row["open"] == first["open"].iloc[0] and row["close"] == first["close"].iloc[-1]
    assert row["high"] == first["high"].max() and row["low"] == first["low"].min()
    assert row["volume"] == first["volume"].sum()
    assert gap_report(five["open_time"]).missing_candles == 1
    with pytest.raises(CandleDataError):
        resample(validate_candles(one, ONE_MINUTE_MS), FIVE_MINUTES_MS, 7 * ONE_MINUTE_MS)


def test_unknown_file_and_missing_file(tmp_path):
    with pytest.raises(CandleDataError, match="no such file"):
        load_candles(tmp_path / "nope.parquet")
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(CandleDataError, match="unknown file type"):
        load_candles(bad)
