"""Interval calibration per decile of the predicted median (inference.transforms): pure functions."""

from __future__ import annotations

import json

import numpy as np

from inference.transforms import POOLED, apply_interval_calibration
from training.intervals import fit_interval_calibration


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Range outputs whose interval is too narrow for calm rows and too wide for wild ones (the
    miscoverage seen on the real folds), with labels drawn from the true distribution."""
    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.normal(-6.0, 0.5, n))                 # the row's true scale
    true_scale = sigma * np.where(sigma < np.exp(-6.0), 1.6, 0.7)  # calm rows move more than forecast, wild less
    y_high = np.abs(rng.normal(0.0, 1.0, n)) * true_scale
    y_low = -np.abs(rng.normal(0.0, 1.0, n)) * true_scale
    q = np.array([0.1257, 0.6745, 1.6449])                   # |N(0,1)| quantiles 10/50/90%
    out = np.column_stack([np.outer(sigma, q), -np.outer(sigma, q)[:, ::-1], sigma, -sigma])
    return out, y_high, y_low, np.where(rng.uniform(size=n) < 0.5, "BTCUSDT", "ETHUSDT").astype(object)


def _decile_coverage(pred: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    dec = np.minimum((np.argsort(np.argsort(pred[:, c + 1])) * 10) // len(y), 9)
    inside = (y >= pred[:, c]) & (y <= pred[:, c + 2])
    return np.array([inside[dec == k].mean() for k in range(10)])


def test_calibration_fixes_conditional_coverage_on_new_rows_and_keeps_medians():
    fit_rng, fit_hi, fit_lo, fit_sym = _rows(40_000, seed=1)
    doc = fit_interval_calibration(fit_rng, fit_hi, fit_lo, fit_sym)
    assert set(doc) == {"BTCUSDT", "ETHUSDT", POOLED}
    assert json.loads(json.dumps(doc)) == doc                  # a JSON document, nothing pickled
    new, y_hi, y_lo, sym = _rows(40_000, seed=2)               # rows the calibration never saw
    cal = apply_interval_calibration(doc, new, sym)
    for c, y in ((0, y_hi), (3, y_lo)):
        raw_cov, cal_cov = _decile_coverage(new, y, c), _decile_coverage(cal, y, c)
        assert raw_cov.min() < 0.72 and raw_cov.max() > 0.84     # the raw interval misses per decile
        assert np.abs(cal_cov - 0.8).max() < 0.03, cal_cov
    np.testing.assert_array_equal(cal[:, [1, 4, 6, 7]], new[:, [1, 4, 6, 7]])
    assert (cal[:, 0] <= cal[:, 1]).all() and (cal[:, 1] <= cal[:, 2]).all()
    assert (cal[:, 3] <= cal[:, 4]).all() and (cal[:, 4] <= cal[:, 5]).all()


def test_unknown_symbol_takes_the_pooled_table_and_no_document_changes_nothing():
    rng, y_hi, y_lo, sym = _rows(5_000, seed=3)
    doc = fit_interval_calibration(rng, y_hi, y_lo, sym)
    other = np.full(len(rng), "SOLUSDT", dtype=object)
    pooled = {POOLED: doc[POOLED]}
    np.testing.assert_array_equal(apply_interval_calibration(doc, rng, other),
                                  apply_interval_calibration(pooled, rng, other))
    assert apply_interval_calibration(None, rng, sym) is rng
    # too few rows for a bin: factor 1, the interval is served as the boosters gave it
    thin = fit_interval_calibration(rng[:150], y_hi[:150], y_lo[:150], sym[:150])
    np.testing.assert_allclose(apply_interval_calibration(thin, rng[:150], sym[:150]), rng[:150])


def test_many_symbols_at_once_equal_each_row_alone():
    """A close of hundreds of symbols (most unknown to the calibration: the pooled table) is
    calibrated in one pass per table; each row must come out as it would alone."""
    rng, y_hi, y_lo, sym = _rows(4_000, seed=4)
    doc = fit_interval_calibration(rng, y_hi, y_lo, sym)
    rows = rng[:300]
    names = np.array(["BTCUSDT", "ETHUSDT"] + [f"SYN{i:03d}USDT" for i in range(298)], dtype=object)
    np.random.default_rng(5).shuffle(names)
    together = apply_interval_calibration(doc, rows, names)
    alone = np.vstack([apply_interval_calibration(doc, rows[i:i + 1], names[i:i + 1]) for i in range(len(rows))])
    np.testing.assert_array_equal(together, alone)
    assert not np.array_equal(together, rows)
