"""Features: shape, warm-up, gaps, scale-freedom, no look-ahead, batch == incremental."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs.sections import FeatureParams
from features import FEATURE_NAMES, WARMUP, FeatureBuilder, build_features, feature_set_hash
from features.candles import FIVE_MINUTES_MS, bridge_gaps, segment_ids
from configs.errors import CandleDataError, FeatureError
from features.indicators import FEATURE_GROUPS, feature_group

RTOL, ATOL = 1e-9, 1e-12


def synthetic(n: int, seed: int, start_ms: int = 1_704_067_200_000, vol: float = 0.002) -> pd.DataFrame:
    """A random-walk candle series with plausible OHLCV (used where real data cannot vary)."""
    rng = np.random.default_rng(seed)
    close = 30_000 * np.exp(np.cumsum(rng.normal(0, vol, n)))
    open_ = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, vol / 2, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, vol / 2, n)))
    volume = rng.lognormal(3, 1, n) * (rng.uniform(size=n) > 0.01)  # some zero-volume candles
    return pd.DataFrame({"open_time": start_ms + FIVE_MINUTES_MS * np.arange(n, dtype=np.int64),
                         "open": open_, "high": high, "low": low, "close": close, "volume": volume})


@pytest.fixture(scope="module")
def batch(real_candles) -> dict[str, pd.DataFrame]:
    return {s: build_features(df) for s, df in real_candles.items()}


def test_shape_index_and_types(real_candles, batch):
    for s, df in real_candles.items():
        x = batch[s]
        assert x.index.equals(df.index)
        assert list(x.columns) == list(FEATURE_NAMES)
        assert all(dt == np.float64 for dt in x.dtypes)
        assert len(FEATURE_NAMES) >= 40


def test_nan_exactly_in_the_warmup_of_each_segment(real_candles, batch):
    """NaN only in the first WARMUP-1 rows of every contiguous segment once short gaps are bridged;
    a long gap restarts the warm-up (tests/test_gaps.py covers both kinds of gap in detail)."""
    for s, df in real_candles.items():
        b = bridge_gaps(df["open_time"].to_numpy(), df[["open", "high", "low", "close", "volume"]].to_numpy(),
                        FeatureParams().max_bridge_candles)
        seg = segment_ids(b.open_time)
        pos = pd.Series(seg).groupby(seg).cumcount().to_numpy()[b.real_index]
        expected_nan = pos < WARMUP - 1
        got_nan = batch[s].isna().any(axis=1).to_numpy()
        np.testing.assert_array_equal(got_nan, expected_nan)
        assert not batch[s][~expected_nan].isna().any().any()
        assert np.isfinite(batch[s][~expected_nan].to_numpy()).all()


def test_a_long_gap_is_never_bridged():
    """Candles before a gap longer than ``max_bridge_candles`` cannot influence features after it."""
    df = synthetic(3 * WARMUP, seed=3)
    gapped = df.drop(index=range(1500, 1500 + FeatureParams().max_bridge_candles + 1)).reset_index(drop=True)
    x = build_features(gapped)
    after = gapped.index[1500:]  # first row after the gap is index 1500 of the gapped frame
    assert x.loc[after[: WARMUP - 1]].isna().all().all()
    # The rows after the gap equal features computed on the post-gap candles alone.
    alone = build_features(gapped.iloc[1500:].reset_index(drop=True))
    np.testing.assert_allclose(x.iloc[1500:].to_numpy(), alone.to_numpy(), rtol=RTOL, atol=ATOL)


def test_scale_free(real_candles):
    """Multiplying every price by 1024 changes no feature (one model serves every price level).

    A power of two scales floats exactly; with 1000, rounding can flip a tie between +DM and -DM
    in the directional-movement indicators, which is a property of their definition, not a leak.
    """
    df = real_candles["BTCUSDT"].iloc[-3 * WARMUP:].reset_index(drop=True)
    scaled = df.copy()
    for c in ("open", "high", "low", "close"):
        scaled[c] *= 1024.0
    a, b = build_features(df), build_features(scaled)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-7, atol=1e-10, equal_nan=True)


def test_no_look_ahead_prefix_and_future_changes(real_candles, batch):
    rng = np.random.default_rng(7)
    for s, df in real_candles.items():
        full = batch[s].to_numpy()
        for t in rng.integers(WARMUP, len(df) - 100, size=4):
            window = df.iloc[max(0, t - 3 * WARMUP): t + 1]
            prefix = build_features(window).to_numpy()[-1]
            full_window = build_features(df.iloc[max(0, t - 3 * WARMUP):]).to_numpy()[len(window) - 1]
            np.testing.assert_array_equal(prefix, full_window)  # causal: bit-identical
            tampered = df.iloc[max(0, t - 3 * WARMUP):].copy()
            after = tampered.index > df.index[t]
            tampered.loc[after, ["open", "high", "low", "close"]] *= 1.5
            tampered.loc[after, "volume"] *= 3.0
            np.testing.assert_array_equal(build_features(tampered).to_numpy()[len(window) - 1], prefix)
            if np.isfinite(full[t]).all():
                np.testing.assert_allclose(prefix, full[t], rtol=RTOL, atol=ATOL)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), cut=st.integers(WARMUP - 1, WARMUP + 150),
       vol=st.floats(0.0005, 0.02), factor=st.floats(0.5, 2.0))
def test_no_look_ahead_property(seed, cut, vol, factor):
    """On generated candles, rows <= t never change when anything after t changes."""
    df = synthetic(WARMUP + 200, seed=seed, vol=vol)
    base = build_features(df).to_numpy()
    tampered = df.copy()
    rows = tampered.index > cut
    tampered.loc[rows, ["open", "high", "low", "close"]] *= factor
    tampered.loc[rows, "volume"] = tampered.loc[rows, "volume"][::-1].to_numpy()
    got = build_features(tampered).to_numpy()
    np.testing.assert_array_equal(got[: cut + 1], base[: cut + 1])
    prefix = build_features(df.iloc[: cut + 1]).to_numpy()
    np.testing.assert_array_equal(prefix, base[: cut + 1])


def test_incremental_equals_batch_at_random_points(real_candles, batch):
    """FeatureBuilder (serving) equals build_features (training) to 1e-9 at 200 points per symbol."""
    rng = np.random.default_rng(11)
    for s, df in real_candles.items():
        x = batch[s].to_numpy()
        defined = np.flatnonzero(~np.isnan(x).any(axis=1))
        points = rng.choice(defined, size=min(200, len(defined)), replace=False)
        for t in points:
            fb = FeatureBuilder()
            row = fb.extend(s, df.iloc[t - WARMUP + 1: t + 1])
            assert row is not None
            np.testing.assert_allclose(row, x[t], rtol=RTOL, atol=ATOL, err_msg=f"{s} row {t}")


def test_incremental_updates_across_a_gap_match_batch():
    df = synthetic(2 * WARMUP + 400, seed=5)
    gapped = df.drop(index=range(WARMUP + 100, WARMUP + 116)).reset_index(drop=True)  # a 16-candle halt
    x = build_features(gapped).to_numpy()
    fb = FeatureBuilder()
    for i, r in enumerate(gapped.itertuples(index=False)):
        row = fb.update("X", r.open_time, r.open, r.high, r.low, r.close, r.volume)
        if np.isnan(x[i]).any():
            assert row is None, i
            with pytest.raises(FeatureError, match="contiguous candles"):
                fb.require("X")
        else:
            np.testing.assert_allclose(row, x[i], rtol=RTOL, atol=ATOL)
    assert fb.ready("X")


def test_builder_refuses_bad_or_old_candles():
    df = synthetic(WARMUP + 2, seed=9)
    fb = FeatureBuilder()
    fb.extend("X", df)
    last = df.iloc[-1]
    again = fb.update("X", int(last.open_time), last.open, last.high, last.low, last.close, last.volume)
    np.testing.assert_array_equal(again, fb.latest("X"))  # identical re-send: idempotent
    with pytest.raises(CandleDataError, match="differs"):
        fb.update("X", int(last.open_time), last.open, last.high, last.low, last.close, last.volume + 1.0)
    with pytest.raises(CandleDataError, match="older"):
        old = df.iloc[-5]
        fb.update("X", int(old.open_time), old.open, old.high, old.low, old.close, old.volume)
    t = int(last.open_time) + FIVE_MINUTES_MS
    with pytest.raises(CandleDataError, match="non-positive"):
        fb.update("X", t, 1.0, 1.0, -1.0, 1.0, 1.0)
    with pytest.raises(CandleDataError, match="NaN"):
        fb.update("X", t, 1.0, float("nan"), 1.0, 1.0, 1.0)
    with pytest.raises(CandleDataError, match="high/low"):
        fb.update("X", t, 1.0, 0.9, 0.8, 1.0, 1.0)
    assert fb.ready("X")  # refused candles left the window intact


def test_higher_timeframes_use_completed_candles_only(real_candles):
    df = real_candles["BTCUSDT"].iloc[-2 * WARMUP:].reset_index(drop=True)
    x = build_features(df)
    t = df["open_time"].to_numpy()
    hour = 3_600_000
    for i in range(len(df) - 30, len(df)):
        closes_hour = (t[i] + FIVE_MINUTES_MS) % hour == 0
        last_complete_end = t[i] if closes_hour else (t[i] // hour) * hour - FIVE_MINUTES_MS
        j = int(np.flatnonzero(t == last_complete_end)[0])
        k = int(np.flatnonzero(t == last_complete_end - hour)[0])
        expected = np.log(df["close"][j] / df["close"][k])
        assert x["h1_ret_1"][i] == pytest.approx(expected, rel=1e-12)


def test_feature_set_hash_is_stable_and_sensitive():
    assert feature_set_hash() == feature_set_hash(FeatureParams())
    assert len(feature_set_hash()) == 16
    assert feature_set_hash(FeatureParams(rv_windows=(12, 48))) != feature_set_hash()


def test_every_feature_has_a_group():
    assert {feature_group(n) for n in FEATURE_NAMES} == set(FEATURE_GROUPS)
