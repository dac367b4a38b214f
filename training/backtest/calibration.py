"""Calibration that covers the trades (issue 15 point 5): per-class ECE, reliability, direction AUC.

A confidence that is calibrated on average can still be off for BUY and SELL separately (the two
classes see different regimes), and a TP/SL AUC mostly ranks "a barrier was hit" against "expiry".
So, per class, on out-of-sample rows:

* **reliability curve with equal-mass bins** (each bin the same number of rows, so every point of
  the curve means something; BUY/SELL confidences crowd into a narrow band where equal-width bins
  would leave most bins empty) and the **ECE** over the same bins: the row-weighted mean of
  ``|observed rate - mean probability|``;
* **direction AUC** of ``p_tp_long - p_tp_short`` on rows whose direction is known (with the row's
  barriers, only the long's or only the short's take-profit came first): does the model rank "up"
  above "down"? 0.5 = no skill.

Pure numpy (no scikit-learn: the backtest runs without the training extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from training.backtest.trade_stats import _f

BINS = 10
CLASSES = {"BUY": 1, "SELL": -1}


def reliability_equal_mass(p: np.ndarray, event: np.ndarray, bins: int = BINS) -> list[dict[str, Any]]:
    """Rows sorted by ``p``, cut into ``bins`` bins of equal count: probability range, mean, observed rate."""
    p = np.asarray(p, np.float64)
    event = np.asarray(event, np.float64)
    ok = np.isfinite(p) & np.isfinite(event)
    p, event = p[ok], event[ok]
    if len(p) == 0:
        return []
    order = np.argsort(p, kind="stable")
    out = []
    for part in np.array_split(order, min(bins, len(order))):
        out.append({"p_lo": _f(p[part].min()), "p_hi": _f(p[part].max()), "mean_p": _f(p[part].mean()),
                    "rate": _f(event[part].mean()), "n": int(len(part))})
    return out


def ece_equal_mass(p: np.ndarray, event: np.ndarray, bins: int = BINS) -> float | None:
    """Expected calibration error over equal-mass bins (``None`` without rows)."""
    curve = reliability_equal_mass(p, event, bins)
    n = sum(b["n"] for b in curve)
    if not n:
        return None
    return _f(sum(b["n"] / n * abs(b["rate"] - b["mean_p"]) for b in curve))


def rank_auc(label: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC (Mann-Whitney with average ranks for ties) of ``score`` for ``label`` in {0, 1}."""
    label = np.asarray(label, bool)
    score = np.asarray(score, np.float64)
    ok = np.isfinite(score)
    label, score = label[ok], score[ok]
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return _f((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def direction_from_outcomes(outcome_long: np.ndarray, outcome_short: np.ndarray) -> np.ndarray:
    """+1 when only a long with these barriers reached its take-profit first, -1 when only a short did,
    else 0 (the definition of the ``tp_long``/``tp_short`` labels that ``p_tp_long``/``p_tp_short``
    predict). Why not the trade's own outcome: with a take-profit 1.5x the stop, a stop comes first
    more often than a take-profit even for a random side, so "a BUY was stopped" would count as
    "down" far more often than chance and bias the AUC below 0.5."""
    lo = np.asarray(outcome_long, dtype=object) == "tp"
    sh = np.asarray(outcome_short, dtype=object) == "tp"
    return np.where(lo & ~sh, 1, np.where(sh & ~lo, -1, 0))


def direction_auc(p_tp_long: np.ndarray, p_tp_short: np.ndarray, direction: np.ndarray) -> dict[str, Any]:
    """AUC of ``p_tp_long - p_tp_short`` for direction +1 vs -1 (rows with direction 0 left out)."""
    direction = np.asarray(direction)
    known = direction != 0
    score = (np.asarray(p_tp_long, np.float64) - np.asarray(p_tp_short, np.float64))[known]
    return {"direction_auc": rank_auc(direction[known] > 0, score), "direction_n": int(known.sum()),
            "direction_up_share": _f((direction[known] > 0).mean()) if known.any() else None}


def probability_and_event(trades: pd.DataFrame) -> tuple[str, str, np.ndarray, np.ndarray]:
    """Which probability is scored against which event: ``p_win`` (calibrated P(net R > 0), issue 15's
    meta-label) against net R > 0 when the signals carry it, else ``confidence`` (the probability that
    the signal's take-profit is hit first) against outcome ``tp``."""
    if "p_win" in trades.columns and np.isfinite(trades["p_win"].to_numpy(np.float64)).any():
        return "p_win", "net_r_positive", trades["p_win"].to_numpy(np.float64), (trades["r"] > 0).to_numpy()
    return "confidence", "take_profit_first", trades["confidence"].to_numpy(np.float64), \
        (trades["outcome"] == "tp").to_numpy()


def class_calibration(trades: pd.DataFrame, direction: np.ndarray | None = None, bins: int = BINS) -> dict[str, Any]:
    """Per class (BUY, SELL): ECE and the equal-mass reliability curve; and, given each trade's
    ``direction`` (:func:`direction_from_outcomes`), the direction AUC, of a table of resolved trades
    (simulator columns; ``p_tp_long``/``p_tp_short`` when present)."""
    if trades.empty:
        return {"probability": None, "event": None, "BUY": None, "SELL": None, "direction_auc": None,
                "direction_n": 0, "direction_up_share": None}
    prob_name, event_name, p, event = probability_and_event(trades)
    side = trades["side"].to_numpy(np.int64)
    out: dict[str, Any] = {"probability": prob_name, "event": event_name}
    for name, s in CLASSES.items():
        m = side == s
        out[name] = {"n": int(m.sum()), "ece": ece_equal_mass(p[m], event[m], bins),
                     "mean_p": _f(p[m].mean()) if m.any() else None,
                     "rate": _f(event[m].mean()) if m.any() else None,
                     "reliability": reliability_equal_mass(p[m], event[m], bins)}
    if direction is not None and {"p_tp_long", "p_tp_short"} <= set(trades.columns):
        out.update(direction_auc(trades["p_tp_long"], trades["p_tp_short"], direction))
    else:
        out.update({"direction_auc": None, "direction_n": 0, "direction_up_share": None})
    return out


def class_calibration_rows(y_signal: np.ndarray, p_sell: np.ndarray, p_buy: np.ndarray, y_tp_long: np.ndarray,
                           y_tp_short: np.ndarray, p_tp_long: np.ndarray, p_tp_short: np.ndarray,
                           bins: int = BINS) -> dict[str, Any]:
    """The same figures on labelled rows (``training.evaluate``): ECE and reliability of ``p_buy`` for
    label BUY and of ``p_sell`` for label SELL (one-vs-rest, every row), and the direction AUC on the
    rows where exactly one side's take-profit came first (``tp_long_h`` xor ``tp_short_h``)."""
    from features.labels import BUY, SELL

    y = np.asarray(y_signal, np.float64)
    out: dict[str, Any] = {}
    for name, code, p in (("buy", BUY, p_buy), ("sell", SELL, p_sell)):
        ok = np.isfinite(y) & np.isfinite(p)
        out[f"ece_{name}"] = ece_equal_mass(p[ok], y[ok] == code, bins)
        out[f"reliability_{name}"] = reliability_equal_mass(p[ok], y[ok] == code, bins)
    lo, sh = np.asarray(y_tp_long, np.float64), np.asarray(y_tp_short, np.float64)
    direction = np.where((lo == 1) & (sh == 0), 1, np.where((sh == 1) & (lo == 0), -1, 0))
    out.update(direction_auc(p_tp_long, p_tp_short, direction))
    return out
