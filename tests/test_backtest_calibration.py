"""Per-class calibration with equal-mass bins and the direction AUC (issue 15 point 5), by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.labels import BUY, HOLD, SELL
from training.backtest.calibration import (class_calibration, class_calibration_rows, direction_from_outcomes, ece_equal_mass,
                                           rank_auc, reliability_equal_mass)


def test_equal_mass_bins_and_ece():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.3, 0.45, 20_000)  # a narrow band, as BUY/SELL confidences are
    event = rng.uniform(size=p.size) < p
    curve = reliability_equal_mass(p, event)
    assert [b["n"] for b in curve] == [2000] * 10  # every bin the same number of rows
    assert all(b["p_lo"] <= b["mean_p"] <= b["p_hi"] for b in curve)
    assert ece_equal_mass(p, event) < 0.02  # calibrated: only sampling noise
    assert ece_equal_mass(p + 0.1, event) == pytest.approx(0.1, abs=0.02)  # 10 points over-confident
    assert ece_equal_mass(np.zeros(0), np.zeros(0)) is None


def test_rank_auc_and_direction():
    assert rank_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert rank_auc(np.array([0, 0, 1, 1]), np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert rank_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert rank_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    # Only the long's take-profit first: up; only the short's: down; both or neither: unknown.
    lo = np.array(["tp", "sl", "tp", "expiry", "sl"], dtype=object)
    sh = np.array(["sl", "tp", "tp", "expiry", "sl"], dtype=object)
    assert list(direction_from_outcomes(lo, sh)) == [1, -1, 0, 0, 0]


def test_class_calibration_scores_each_probability_against_its_event():
    trades = pd.DataFrame({"side": [1, 1, -1, -1], "confidence": [0.6, 0.4, 0.7, 0.3],
                           "outcome": ["tp", "sl", "tp", "expiry"], "r": [1.2, -1.1, 1.4, 0.2],
                           "p_tp_long": [0.6, 0.3, 0.2, 0.5], "p_tp_short": [0.2, 0.5, 0.6, 0.3]})
    c = class_calibration(trades, np.array([1, -1, -1, 0]))
    assert (c["probability"], c["event"]) == ("confidence", "take_profit_first")
    assert c["BUY"]["n"] == 2 and c["SELL"]["n"] == 2 and c["BUY"]["rate"] == 0.5
    assert c["direction_n"] == 3 and c["direction_auc"] == 1.0  # the up row scores above the down rows
    # With p_win (P(net R > 0)) the event is a positive net R: the SELL expiry at +0.2 R is a win.
    c = class_calibration(trades.assign(p_win=[0.5, 0.5, 0.5, 0.5]))
    assert (c["probability"], c["event"]) == ("p_win", "net_r_positive") and c["SELL"]["rate"] == 1.0
    # Labelled rows (training.evaluate): one-vs-rest per class, direction where one side's TP came first.
    y = np.array([BUY, SELL, HOLD, BUY])
    rows = class_calibration_rows(y, np.array([0.1, 0.8, 0.2, 0.1]), np.array([0.7, 0.1, 0.2, 0.9]),
                                  np.array([1, 0, 1, 1]), np.array([0, 1, 1, 0]), np.array([0.6, 0.2, 0.5, 0.7]),
                                  np.array([0.3, 0.6, 0.5, 0.2]))
    assert rows["direction_n"] == 3 and rows["direction_auc"] == 1.0
    assert rows["ece_buy"] is not None and len(rows["reliability_sell"]) == 4
