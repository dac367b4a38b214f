"""HAR volatility forecast (features/volatility.py), its baseline, bootstrap intervals, pinball loss."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from features.volatility import (HAR_WINDOWS, apply_har, fit_har, har_input_names, har_inputs, har_target)
from tests.test_features import synthetic
from training.scores import pinball
from training.uncertainty import block_sums, coverage_by_group, decile_codes, r2_gain, range_intervals

HORIZONS = (6, 72)


def _cols(df: pd.DataFrame):
    return (df["open_time"].to_numpy(np.int64), df["high"].to_numpy(), df["low"].to_numpy(), df["close"].to_numpy())


def _clustered(n: int, seed: int) -> pd.DataFrame:
    """Synthetic candles whose volatility follows a slow random regime (so HAR has something to learn)."""
    rng = np.random.default_rng(seed)
    logvol = np.log(0.002) + np.cumsum(rng.normal(0, 0.02, n)) * 0.5
    vol = np.exp(np.clip(logvol, np.log(0.0003), np.log(0.02)))
    df = synthetic(n, seed)
    ret = rng.normal(0, 1, n) * vol
    close = 30_000 * np.exp(np.cumsum(ret))
    open_ = np.concatenate([[close[0]], close[:-1]])
    df["open"], df["close"] = open_, close
    df["high"] = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 1, n)) * vol / 2)
    df["low"] = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 1, n)) * vol / 2)
    return df


def test_har_inputs_have_no_look_ahead():
    """The inputs at t are bit-identical whether computed from candles[:t+1], from the full history
    or from a history whose candles after t were all changed."""
    df = _clustered(12_000, 1)
    full = har_inputs(*_cols(df), HORIZONS)
    for t in (3_000, 9_000, 11_998):
        prefix = har_inputs(*_cols(df.iloc[: t + 1]), HORIZONS)
        changed = df.copy()
        changed.loc[t + 1:, ["high", "low", "close"]] *= 1.37
        changed.loc[t + 1:, "high"] *= 1.05
        alt = har_inputs(*_cols(changed), HORIZONS)
        for h in HORIZONS:
            np.testing.assert_array_equal(prefix[h][t], full[h][t])
            np.testing.assert_array_equal(alt[h][: t + 1], full[h][: t + 1])
            assert np.isfinite(full[h][t]).all()
            assert full[h].shape == (len(df), len(har_input_names()))


def test_har_inputs_skip_missing_slots_and_need_history():
    df = _clustered(12_000, 2)
    gappy = df.drop(index=range(5_000, 5_030)).reset_index(drop=True)  # 30 missing slots
    x = har_inputs(*_cols(gappy), (6,))[6]
    assert np.isfinite(x[5_000]).all()           # the first candle after the gap is defined
    assert np.isnan(x[: HAR_WINDOWS[-1] // 4 - 2, len(HAR_WINDOWS) - 1]).all()  # 30-day window needs a week


def test_har_target_reads_only_the_next_h_candles():
    df = _clustered(3_000, 3)
    base = har_target(*_cols(df), 6)
    t = 1_000
    later = df.copy()
    later.loc[t + 7:, ["high"]] *= 1.1
    np.testing.assert_array_equal(har_target(*_cols(later), 6)[t], base[t])
    sooner = df.copy()
    sooner.loc[t + 3, "high"] *= 1.1
    assert har_target(*_cols(sooner), 6)[t] > base[t]
    assert np.isnan(base[-6:]).all() and np.isfinite(base[:-6]).all()
    gap = df.drop(index=[t + 4]).reset_index(drop=True)
    assert np.isnan(har_target(*_cols(gap), 6)[t])  # a window crossing a missing slot is undefined


def test_har_fit_is_json_and_forecasts_volatility():
    df = _clustered(20_000, 4)
    cols = _cols(df)
    X = har_inputs(*cols, (6,))[6]
    y = har_target(*cols, 6)
    model = json.loads(json.dumps(fit_har(X[:14_000], y[:14_000])))
    sigma = apply_har(model, X[14_000:])
    ok = np.isfinite(sigma) & np.isfinite(y[14_000:])
    realised = np.sqrt(np.exp(y[14_000:][ok]))
    # out of sample the forecast tracks the realised volatility of the next 6 candles
    assert np.corrcoef(np.log(sigma[ok]), np.log(realised))[0, 1] > 0.5
    assert 0.5 < np.median(realised / sigma[ok]) < 1.5


def test_pinball_loss():
    y = np.array([0.0, 1.0, 2.0])
    q = np.column_stack([y - 1, y, y + 1])
    # levels 0.1 (y above q by 1: 0.1), 0.5 (exact: 0), 0.9 (y below q by 1: 0.1)
    assert np.isclose(pinball(y, q, (0.1, 0.5, 0.9)), (0.1 + 0.0 + 0.1) / 3)
    assert np.isclose(pinball(y, np.zeros((3, 1)), (0.5,)), np.mean(np.abs(y)) / 2)


def test_block_bootstrap_sums_and_intervals():
    rng = np.random.default_rng(5)
    n = 288 * 40
    vol = np.repeat(np.exp(rng.normal(0, 0.5, 40)), 288)  # day-level regimes: rows are dependent
    y = rng.normal(0, 1, n) * vol
    p = 0.6 * y + rng.normal(0, 0.8, n) * vol
    lower, upper = p - 1.3 * vol, p + 1.3 * vol
    sums, m = block_sums(np.column_stack([np.ones(n), y]), replicates=50)
    assert m == n and np.allclose(sums[:, 0], n)
    out = range_intervals(y, p, lower, upper, "high", {"alt": 0.5 * y})
    r2 = 1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2)
    mae = np.mean(np.abs(y - p))
    cov = np.mean((y >= lower) & (y <= upper))
    for key, point in (("r2_high_ci", r2), ("mae_high_ci", mae), ("coverage_high_ci", cov)):
        lo, hi = out[key]
        assert lo <= point <= hi and hi - lo > 0, (key, lo, point, hi)
    alt = 1 - np.sum((0.5 * y) ** 2) / np.sum((y - y.mean()) ** 2)
    assert out["alt_ci"][0] <= alt <= out["alt_ci"][1]


def test_conditional_coverage_groups():
    x = np.arange(100, dtype=float)
    codes = decile_codes(x)
    assert list(np.bincount(codes)) == [10] * 10
    y = np.zeros(100)
    lower = np.where(codes == 0, 1.0, -1.0)  # the calmest decile misses every time
    assert coverage_by_group(y, lower, np.ones(100), codes, 10) == [0.0] + [1.0] * 9
    assert decile_codes(np.array([np.nan, 1.0]))[0] == -1


def test_each_interval_uses_the_rows_of_its_point_estimate():
    """A baseline undefined on some rows must not shift the model's interval onto a subset."""
    rng = np.random.default_rng(7)
    n = 288 * 30
    vol = np.repeat(np.exp(rng.normal(0, 0.5, 30)), 288)
    y = rng.normal(0, 1, n) * vol
    p = 0.6 * y + rng.normal(0, 0.8, n) * vol
    alt = 0.5 * y
    alt[: n // 2] = np.nan  # e.g. the HAR baseline before a month of history exists
    with_alt = range_intervals(y, p, p - vol, p + vol, "low", {"alt": alt})
    alone = range_intervals(y, p, p - vol, p + vol, "low")
    assert with_alt["r2_low_ci"] == alone["r2_low_ci"] and with_alt["mae_low_ci"] == alone["mae_low_ci"]
    half = range_intervals(y[n // 2:], alt[n // 2:], alt[n // 2:], alt[n // 2:], "x")
    assert with_alt["alt_ci"] == half["r2_x_ci"]


def test_paired_r2_gain_and_its_interval():
    rng = np.random.default_rng(8)
    n = 288 * 40
    vol = np.repeat(np.exp(rng.normal(0, 0.5, 40)), 288)
    y = rng.normal(0, 1, n) * vol
    signal = y + rng.normal(0, 1.0, n) * vol
    better, worse = 0.5 * signal, 0.4 * signal
    sst = np.sum((y - y.mean()) ** 2)
    expected = (np.sum((y - worse) ** 2) - np.sum((y - better) ** 2)) / sst
    gain, (lo, hi) = r2_gain(y, better, worse)
    assert np.isclose(gain, expected, atol=1e-6) and lo <= gain <= hi and lo > 0
    # paired: the gain's interval is narrower than either R² interval
    a = range_intervals(y, better, better - vol, better + vol, "a")["r2_a_ci"]
    assert hi - lo < a[1] - a[0]
    nan_base = worse.copy()
    nan_base[:100] = np.nan
    assert r2_gain(y, better, nan_base)[0] != gain  # computed on the rows both forecasts cover
