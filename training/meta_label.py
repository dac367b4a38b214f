"""Meta-labelling (López de Prado): targets, overlap weights and the trade policy. Pure numpy.

A primary rule proposes a side (``inference.transforms.proposed_side``: the side the signal
classifier ranks higher); the meta-model predicts ``P(net R > 0 | this proposal)``. This module
defines, once, what the meta-model learns and when a calibrated probability becomes a trade:

- :func:`proposal_targets`: the proposal's net R after costs (``r_long_h``/``r_short_h`` of
  ``features.labels``), win = net R > 0, and its holding period in candles;
- :func:`uniqueness_weights`: labels of neighbouring candles share most of their window, so a row
  is weighted by its average uniqueness ``mean over its window of 1 / (labels alive at that candle)``
  (per symbol, on the actual holding period t+1 .. exit);
- :func:`choose_policy`: the abstain threshold on expected net R and the predicted-range / cost
  floor, chosen on an out-of-fold block the meta-model never fitted (the first half of the
  calibration block), by the uniqueness-weighted total net R they would have made there, among pairs
  whose mean net R is at least ``MIN_POLICY_T`` standard errors above zero. When no threshold makes
  money there beyond noise, the horizon does not trade (``trade: false``; its signals are HOLD
  ``edge_below_costs``);
- :func:`policy_figures`: what a policy does on rows (trades, expected vs realised net R, share
  abstained), for the held-out second half of the block and for reports.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from features.candles import FIVE_MINUTES_MS
from inference.transforms import expected_net_r

# Candidate thresholds. Expected net R floor (in R) and range/cost floor (quantiles of the block).
MIN_EXPECTED_R_GRID: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
RANGE_COST_QUANTILES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)
MIN_POLICY_TRADES = 30.0  # uniqueness-weighted trades a threshold needs on the block to be considered
# ... and its mean net R must be this many standard errors above zero (weighted, n = weighted trades):
# the best of ~35 threshold pairs on one block is optimistic, so a gain within noise is no edge.
MIN_POLICY_T = 2.0


def proposal_targets(labels: Mapping[str, np.ndarray], side: np.ndarray, horizon: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(win, net_r, bars)`` of the proposed side per row (NaN where the label is undefined)."""
    long = np.asarray(side) > 0
    r = np.where(long, labels[f"r_long_{horizon}"], labels[f"r_short_{horizon}"]).astype(np.float64)
    bars = np.where(long, labels[f"bars_long_{horizon}"], labels[f"bars_short_{horizon}"]).astype(np.float64)
    win = np.where(np.isfinite(r), (r > 0).astype(np.float64), np.nan)
    return win, r, bars


def uniqueness_weights(open_time: np.ndarray, symbol: np.ndarray, bars: np.ndarray) -> np.ndarray:
    """Average uniqueness of each row's label over candles t+1 .. t+bars, among rows of its symbol
    (rows without a label get weight 0). A sum of them counts trades as if they did not overlap
    (n labels spanning the same h candles sum to about one)."""
    t = np.asarray(open_time, dtype=np.int64)
    b = np.nan_to_num(np.asarray(bars, dtype=np.float64), nan=0.0).astype(np.int64)
    out = np.zeros(len(t))
    for s in np.unique(symbol):
        rows = np.flatnonzero((symbol == s) & (b > 0))
        if len(rows) == 0:
            continue
        slot = (t[rows] - t[rows].min()) // FIVE_MINUTES_MS
        start, stop = slot + 1, slot + b[rows] + 1  # [start, stop): the candles the label spans
        size = int(stop.max()) + 1
        alive = np.zeros(size + 1)
        np.add.at(alive, start, 1.0)
        np.add.at(alive, stop, -1.0)
        conc = np.cumsum(alive)[:size]
        inv = np.concatenate([[0.0], np.cumsum(np.where(conc > 0, 1.0 / np.maximum(conc, 1.0), 0.0))])
        out[rows] = (inv[stop] - inv[start]) / b[rows]
    return out


def gross_payoffs(win: np.ndarray, net_r: np.ndarray, cost_r: np.ndarray, weight: np.ndarray) -> dict[str, float]:
    """Mean gross R (net R + cost in R) of winning and of losing proposals (uniqueness-weighted)."""
    ok = np.isfinite(net_r) & np.isfinite(cost_r) & (weight > 0)
    gross = net_r + cost_r
    out = {}
    for key, sel in (("win_gross_r", ok & (win == 1)), ("loss_gross_r", ok & (win == 0))):
        out[key] = float(np.average(gross[sel], weights=weight[sel])) if sel.any() else 0.0
    return out


def _passing(expected: np.ndarray, ratio: np.ndarray, min_er: float, min_ratio: float) -> np.ndarray:
    return (expected > min_er) & (ratio >= min_ratio)


def _t_stat(r: np.ndarray, w: np.ndarray) -> float:
    """Weighted mean net R over its standard error, with the weighted trade count as sample size."""
    n = float(w.sum())
    if n <= 1:
        return 0.0
    mean = float(np.average(r, weights=w))
    sd = float(np.sqrt(np.average((r - mean) ** 2, weights=w)))
    return mean / (sd / np.sqrt(n)) if sd > 0 else 0.0


def choose_policy(p_win: np.ndarray, cost_r: np.ndarray, ratio: np.ndarray, net_r: np.ndarray,
                  weight: np.ndarray, payoffs: Mapping[str, float]) -> dict[str, Any]:
    """The (expected-R floor, range/cost floor) pair with the largest weighted total net R on these
    rows, among pairs with at least ``MIN_POLICY_TRADES`` weighted trades and a mean net R at least
    ``MIN_POLICY_T`` standard errors above zero; ``trade`` False when none qualifies (the horizon
    abstains). JSON-ready; ``expected_net_r`` uses ``payoffs``. ``best_untested`` records the best
    pair without the significance requirement (what it would have traded)."""
    ok = np.isfinite(p_win) & np.isfinite(cost_r) & np.isfinite(ratio) & np.isfinite(net_r)
    p, c, q, r, w = (x[ok] for x in (p_win, cost_r, ratio, net_r, weight))
    expected = expected_net_r(p, c, payoffs)
    best: dict[str, Any] = {"trade": False, "min_expected_r": None, "min_range_cost_ratio": None,
                            "block_total_r": 0.0, "block_trades": 0.0, "block_t": None}
    untested: dict[str, Any] | None = None
    floors = sorted({float(np.quantile(q, a)) for a in RANGE_COST_QUANTILES}) if len(q) else [0.0]
    for min_er in MIN_EXPECTED_R_GRID:
        for min_ratio in floors:
            take = _passing(expected, q, min_er, min_ratio)
            trades = float(w[take].sum())
            total = float((w[take] * r[take]).sum())
            if trades < MIN_POLICY_TRADES or total <= 0:
                continue
            pair = {"trade": True, "min_expected_r": min_er, "min_range_cost_ratio": min_ratio,
                    "block_total_r": total, "block_trades": trades, "block_t": _t_stat(r[take], w[take])}
            if untested is None or total > untested["block_total_r"]:
                untested = pair
            if pair["block_t"] >= MIN_POLICY_T and total > best["block_total_r"]:
                best = pair
    return {**best, **payoffs, "block_rows": int(ok.sum()), "min_t": MIN_POLICY_T, "best_untested": untested}


def policy_takes(policy: Mapping[str, Any], expected: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Which rows the policy trades (none when the horizon abstains)."""
    if not policy.get("trade"):
        return np.zeros(len(expected), dtype=bool)
    with np.errstate(invalid="ignore"):
        return _passing(expected, ratio, float(policy["min_expected_r"]), float(policy["min_range_cost_ratio"]))


def policy_figures(policy: Mapping[str, Any], p_win: np.ndarray, cost_r: np.ndarray, ratio: np.ndarray,
                   net_r: np.ndarray, weight: np.ndarray) -> dict[str, Any]:
    """Trades (rows and uniqueness-weighted), mean expected vs realised net R of the trades, share abstained."""
    ok = np.isfinite(p_win) & np.isfinite(cost_r) & np.isfinite(ratio) & np.isfinite(net_r)
    expected = expected_net_r(p_win[ok], cost_r[ok], policy)
    take = policy_takes(policy, expected, ratio[ok])
    r, w = net_r[ok][take], weight[ok][take]
    n = int(take.sum())
    return {"rows": int(ok.sum()), "trades": n, "weighted_trades": float(w.sum()),
            "abstained_share": float(1 - n / ok.sum()) if ok.any() else None,
            "mean_expected_r": float(expected[take].mean()) if n else None,
            "mean_realised_r": float(r.mean()) if n else None,
            "weighted_total_r": float((w * r).sum()) if n else 0.0}
