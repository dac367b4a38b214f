"""Issue 15: volatility-forecast barriers (serving == training, no look-ahead) and meta-labelling
(uniqueness weights, targets of the proposal, the trade policy chosen on out-of-fold rows)."""

from __future__ import annotations

import numpy as np
import pytest

from configs.sections import LabelParams
from features import WARMUP, FeatureBuilder, build_features
from features.barriers import BARRIER_INPUTS, barrier_distances, barrier_inputs, barrier_sigma, fit_barrier_model
from features.candles import FIVE_MINUTES_MS
from features.indicators import feature_names
from features.volatility import har_target
from training.meta_label import choose_policy, policy_takes, proposal_targets, uniqueness_weights
from inference.transforms import expected_net_r, proposed_side

NAMES = feature_names()


def _fitted(df, h: int) -> dict:
    feats = build_features(df).to_numpy()
    t = df["open_time"].to_numpy()
    y = har_target(t, df["high"].to_numpy(), df["low"].to_numpy(), df["close"].to_numpy(), h)
    return fit_barrier_model(barrier_inputs(feats, NAMES), y)


def test_barrier_forecast_is_the_same_in_serving_and_training_and_never_looks_ahead(real_candles):
    df = real_candles["BTCUSDT"].iloc[-4000:].reset_index(drop=True)
    model = _fitted(df.iloc[:3000], 6)
    assert model["inputs"] == list(BARRIER_INPUTS) and model["rows"] > 1000
    batch = barrier_sigma(model, build_features(df).to_numpy(), NAMES)
    rng = np.random.default_rng(5)
    for t in rng.integers(WARMUP + 10, len(df) - 10, size=5):
        row = FeatureBuilder().extend("BTCUSDT", df.iloc[t - WARMUP + 1: t + 1])  # what serving holds
        np.testing.assert_allclose(barrier_sigma(model, row[None, :], NAMES), batch[t], rtol=1e-9)
        tampered = df.copy()
        tampered.loc[t + 1:, ["open", "high", "low", "close"]] *= 1.3  # the future changes...
        again = barrier_sigma(model, build_features(tampered).to_numpy(), NAMES)
        assert again[t] == batch[t]  # ... the barrier at t does not
    ok = np.isfinite(batch)
    assert ok.sum() > 2000 and (batch[ok] > 0).all()
    with pytest.raises(ValueError, match="inputs differ"):
        barrier_sigma({**model, "inputs": model["inputs"][:-1]}, build_features(df).to_numpy(), NAMES)


def test_barrier_model_learns_the_horizon():
    """A longer horizon forecasts a larger move (sigma_72 / sigma_6 near sqrt(12) on a random walk)."""
    from tests.test_features import synthetic

    df = synthetic(6000, seed=3)
    s6 = barrier_sigma(_fitted(df, 6), build_features(df).to_numpy(), NAMES)
    s72 = barrier_sigma(_fitted(df, 72), build_features(df).to_numpy(), NAMES)
    ok = np.isfinite(s6) & np.isfinite(s72)
    assert 2.5 < np.median(s72[ok] / s6[ok]) < 4.5
    tp, sl = barrier_distances(s6[ok], LabelParams(), 0.0019)
    assert (sl >= 3 * 0.0019 - 1e-15).all() and np.allclose(tp / sl, 1.2 / 0.8)


def test_uniqueness_weights_count_overlapping_labels_once():
    t = np.arange(10, dtype=np.int64) * FIVE_MINUTES_MS
    sym = np.array(["A"] * 10, dtype=object)
    # Ten labels each spanning the next 4 candles: the middle ones share every candle with 3 others.
    w = uniqueness_weights(t, sym, np.full(10, 4.0))
    assert w[4] == pytest.approx(0.25) and w[0] > w[4] and w[9] > w[4]
    assert w.sum() == pytest.approx(13 / 4, rel=0.3)  # about the 13 candles they span / 4
    # A label alone is unique; another symbol's labels do not overlap it; no label -> weight 0.
    sym2 = np.array(["A"] + ["B"] * 9, dtype=object)
    bars = np.full(10, 4.0)
    bars[5] = np.nan
    w2 = uniqueness_weights(t, sym2, bars)
    assert w2[0] == pytest.approx(1.0) and w2[5] == 0.0


def test_proposal_targets_follow_the_proposed_side():
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.4, 0.2, 0.4]])
    side = proposed_side(probs)
    assert side.tolist() == [1.0, -1.0, 1.0]  # a tie proposes BUY
    labels = {"r_long_6": np.array([0.5, 0.7, np.nan]), "r_short_6": np.array([-1.1, -0.2, 0.3]),
              "bars_long_6": np.array([3.0, 6.0, np.nan]), "bars_short_6": np.array([1.0, 2.0, 4.0])}
    win, r, bars = proposal_targets(labels, side, 6)
    assert win[:2].tolist() == [1.0, 0.0] and np.isnan(win[2])
    assert r[:2].tolist() == [0.5, -0.2] and bars[:2].tolist() == [3.0, 2.0]


def test_policy_trades_only_where_the_block_made_money_and_abstains_without_edge():
    rng = np.random.default_rng(0)
    n = 4000
    p = rng.uniform(0.2, 0.8, n)
    win = rng.uniform(size=n) < p  # calibrated by construction
    cost_r = np.full(n, 0.2)
    r = np.where(win, 1.3, -1.0) - cost_r
    ratio = rng.uniform(1, 10, n)
    w = np.full(n, 0.1)
    payoffs = {"win_gross_r": 1.5, "loss_gross_r": -0.8}
    pol = choose_policy(p, cost_r, ratio, r, w, payoffs)
    assert pol["trade"] and pol["block_total_r"] > 0 and pol["min_expected_r"] >= 0
    exp = expected_net_r(p, cost_r, pol)
    take = policy_takes(pol, exp, ratio)
    assert take.any() and (exp[take] > pol["min_expected_r"]).all() and r[take].mean() > r.mean()
    # The same rows with every trade losing: no threshold makes money, the horizon abstains.
    none = choose_policy(p, cost_r, ratio, np.full(n, -0.5), w, payoffs)
    assert not none["trade"] and not policy_takes(none, exp, ratio).any()
    # A "gain" within noise (mean +0.01 R, sd 1 R, 400 weighted trades) is no edge either.
    noise = choose_policy(p, cost_r, ratio, rng.normal(0.01, 1.0, n), w, payoffs)
    assert not noise["trade"] and noise["best_untested"]["block_total_r"] > 0 > noise["best_untested"]["block_t"] - 2
