"""Small pure functions shared by training and inference (numpy only).

Why a module of its own: the inference path (``inference/ensemble.py``) must not import training
code, yet it has to undo exactly the target scaling the trainer applied and build exactly the
meta-model input the trainer built. Keeping those definitions here, in one place, makes a silent
train/serve mismatch impossible.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from inference.layout import MODELS, RANGE_OUTPUTS, SIGNAL_OUTPUTS, TPSL_OUTPUTS

# The model input is the feature vector plus one column: the symbol's index in the model's symbol
# list (one model for all symbols; the features are scale-free, the symbol lets trees specialise).
SYMBOL_COLUMN = "symbol_id"

# Range targets are learnt in units of recent volatility: y / (ATR14/close x sqrt(h)). Raw ratios
# make the model chase the volatility regime of its training years; scaled targets transfer
# across regimes and are multiplied back at prediction time.
VOL_FEATURE = "atr_14"
VOL_FLOOR = 1e-4  # ATR/close below 0.01% only happens on frozen markets; keeps the division sane

# Regime features the meta-model sees next to the base models' outputs.
REGIME_FEATURES: tuple[str, ...] = ("atr_14", "rv_288", "vol_ratio", "adx_14", "range_pos_288", "volume_z_288",
                                    "h1_ret_24")

# Inputs the meta-model sees beside the base outputs: the proposed side (+1 BUY / -1 SELL), the
# round-trip cost in units of the stop (``cost_r``) and the predicted range (median high - median
# low) in round-trip costs.
PROPOSAL_FEATURES: tuple[str, ...] = ("side", "cost_r", "range_cost_ratio")


def model_columns(feature_names: Sequence[str]) -> tuple[str, ...]:
    """Column names of the base models' input matrix."""
    return (*feature_names, SYMBOL_COLUMN)


def meta_columns() -> tuple[str, ...]:
    """Column names of the meta-model's input matrix (see :func:`meta_matrix`)."""
    scaled = tuple(f"{c}_scaled" for c in RANGE_OUTPUTS)
    return (*scaled, *TPSL_OUTPUTS, *SIGNAL_OUTPUTS, *REGIME_FEATURES, SYMBOL_COLUMN, *PROPOSAL_FEATURES)


def proposed_side(signal_output: np.ndarray) -> np.ndarray:
    """The primary rule of the meta-labelling: the side the signal classifier ranks higher,
    +1 (BUY) where P(BUY) >= P(SELL), else -1 (SELL). It always proposes; the meta-model decides."""
    p = np.asarray(signal_output, dtype=np.float64)
    return np.where(p[:, 2] >= p[:, 0], 1.0, -1.0)


def meta_class_probs(side: np.ndarray, p_win: np.ndarray) -> np.ndarray:
    """(n, 3) SELL/HOLD/BUY scores of the meta-labelled call: the proposed side gets ``p_win``, HOLD
    ``1 - p_win``, the other side 0 (for accuracy / F1 against the 3-class label)."""
    side = np.asarray(side)
    p = np.asarray(p_win, dtype=np.float64)
    return np.column_stack([np.where(side < 0, p, 0.0), 1.0 - p, np.where(side > 0, p, 0.0)])


def range_cost_ratio(range_output_: np.ndarray, round_trip_cost: float) -> np.ndarray:
    """The predicted range (median high minus median low, fractions of close) in round-trip costs."""
    r = np.asarray(range_output_, dtype=np.float64)
    return (r[:, 1] - r[:, 4]) / max(float(round_trip_cost), 1e-12)


def range_scale(atr_fraction: np.ndarray, horizon: int) -> np.ndarray:
    """The volatility unit of a range target: ATR/close x sqrt(horizon), floored."""
    return np.sqrt(horizon) * np.maximum(np.asarray(atr_fraction, dtype=np.float64), VOL_FLOOR)


def meta_matrix(X: np.ndarray, columns: Sequence[str], base_outputs: Mapping[str, np.ndarray],
                horizon: int, sl_frac: np.ndarray, round_trip_cost: float) -> np.ndarray:
    """The meta-model's input: base outputs (range in volatility units) + regime features + symbol +
    the proposal (side, cost in R, range in costs).

    ``X`` is the base-model input (columns ``columns``); ``base_outputs`` holds the raw outputs of
    ``range_predictor`` (n, 6+), ``tpsl_classifier`` (n, 2) and ``signal_classifier`` (n, 3);
    ``sl_frac`` the stop distance of each row's barriers (``features.barriers``).
    """
    index = {c: i for i, c in enumerate(columns)}
    scale = range_scale(X[:, index[VOL_FEATURE]], horizon)
    width = len(RANGE_OUTPUTS)
    rng = np.asarray(base_outputs["range_predictor"], dtype=np.float64)[:, :width] / scale[:, None]
    parts = [rng, np.asarray(base_outputs["tpsl_classifier"], dtype=np.float64),
             np.asarray(base_outputs["signal_classifier"], dtype=np.float64),
             X[:, [index[c] for c in REGIME_FEATURES]], X[:, [index[SYMBOL_COLUMN]]]]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost_r = float(round_trip_cost) / np.asarray(sl_frac, dtype=np.float64)
    proposal = np.column_stack([proposed_side(base_outputs["signal_classifier"]), cost_r,
                                range_cost_ratio(base_outputs["range_predictor"], round_trip_cost)])
    return np.hstack([*parts, proposal])


def expected_net_r(p_win: np.ndarray, cost_r: np.ndarray, policy: Mapping[str, object]) -> np.ndarray:
    """Expected net R of a proposal: ``p x W + (1 - p) x L - cost_r``, with ``W``/``L`` the mean
    gross R (net R + cost_r) of winning / losing proposals of the meta-model's training rows
    (``policy['win_gross_r']``/``['loss_gross_r']``) and ``cost_r`` this row's round trip in R."""
    p = np.asarray(p_win, dtype=np.float64)
    w = float(policy["win_gross_r"])  # type: ignore[arg-type]
    l_ = float(policy["loss_gross_r"])  # type: ignore[arg-type]
    return p * w + (1.0 - p) * l_ - np.asarray(cost_r, dtype=np.float64)


def apply_calibration(calibration: Mapping[str, object], p: np.ndarray) -> np.ndarray:
    """Map raw confidences to calibrated ones with a calibrator saved as JSON (never pickled).

    ``isotonic``: a monotone step function given by its knots ``x``/``y`` (linear between knots,
    as scikit-learn's IsotonicRegression predicts); ``platt``: ``1 / (1 + exp(a*p + b))``;
    ``identity``: unchanged (recorded when there was too little data to fit one).
    """
    p = np.asarray(p, dtype=np.float64)
    method = calibration["method"]
    if method == "isotonic":
        x = np.asarray(calibration["x"], dtype=np.float64)
        y = np.asarray(calibration["y"], dtype=np.float64)
        return np.interp(p, x, y)
    if method == "platt":
        a = float(calibration["a"])  # type: ignore[arg-type]
        b = float(calibration["b"])  # type: ignore[arg-type]
        return 1.0 / (1.0 + np.exp(a * p + b))
    if method == "identity":
        return p.copy()
    raise ValueError(f"unknown calibration method {method!r}")


def range_output(raw_high: np.ndarray, raw_low: np.ndarray, atr_fraction: np.ndarray, horizon: int,
                 raw_high_mean: np.ndarray | None = None, raw_low_mean: np.ndarray | None = None) -> np.ndarray:
    """The range predictor's (n, 8) output from its boosters' raw outputs (volatility units):
    high q10/q50/q90, low q10/q50/q90 (``RANGE_OUTPUTS``), then the high and low mean forecasts
    (``RANGE_MEAN_OUTPUTS``; NaN when the model has no mean boosters).

    Each row's quantiles are sorted (quantile regressions trained separately can cross; sorting is
    the standard monotone rearrangement and never worsens pinball loss), then multiplied back by
    the volatility unit. Training (out-of-fold predictions) and inference both call this.
    """
    scale = range_scale(atr_fraction, horizon)[:, None]
    high = np.sort(np.asarray(raw_high, dtype=np.float64).reshape(len(scale), -1), axis=1) * scale
    low = np.sort(np.asarray(raw_low, dtype=np.float64).reshape(len(scale), -1), axis=1) * scale
    means = [np.full((len(scale), 1), np.nan) if m is None else np.asarray(m, dtype=np.float64).reshape(-1, 1) * scale
             for m in (raw_high_mean, raw_low_mean)]
    return np.hstack([high, low, *means])


def stage_output(model: str, raw: Mapping[str, np.ndarray | None], atr_fraction: np.ndarray, horizon: int,
                 calibration: Mapping[str, object] | None = None) -> np.ndarray:
    """One model's stage output (``inference.layout.OUTPUT_COLUMNS``) from its boosters' raw outputs.

    ``raw`` maps each booster target of ``inference.layout.MODELS[model]`` to its (n, width) raw
    prediction (None for a missing optional booster). The meta-model's output is its raw P(win) and
    that probability through ``calibration``. Training's out-of-fold predictions and the serving
    ensemble both call this, so the post-processing cannot differ between them.
    """
    missing = [b.target for b in MODELS[model] if not b.optional and raw.get(b.target) is None]
    if missing:
        raise ValueError(f"{model}: raw outputs missing for {missing}")
    if model == "range_predictor":
        return range_output(raw["high"], raw["low"], atr_fraction, horizon, raw.get("high_mean"), raw.get("low_mean"))
    if model == "meta_model":
        if calibration is None:
            raise ValueError("the meta-model's stage output needs its calibration")
        p_raw = np.asarray(raw["meta"], dtype=np.float64).reshape(-1, 1)
        p_win = np.clip(apply_calibration(calibration, p_raw[:, 0]), 0.0, 1.0)
        return np.hstack([p_raw, p_win[:, None]])
    return np.hstack([np.asarray(raw[b.target], dtype=np.float64).reshape(len(atr_fraction), b.width)
                      for b in MODELS[model]])


# ---- interval calibration per volatility decile (split conformal on out-of-fold rows) -------------------
# The 10-90% interval of the quantile boosters is too narrow in calm markets and too wide in wild ones
# (walk-forward, docs/models.md: BTC 6-candle high covers ~77% in its calmest decile). Per decile of the
# predicted median (the model's own volatility forecast, known at t), each side's distance from the
# median is stretched by the factor that leaves 10% of the out-of-fold rows beyond it. Fitting is
# learning-only (training/intervals.py); applying it is inference.
INTERVAL_DOCUMENT = "interval_calibration"
POOLED = "*"                      # the table for a symbol the calibration never saw


def apply_interval_calibration(doc: Mapping[str, Any] | None, rng: np.ndarray, symbols: Sequence[str]) -> np.ndarray:
    """``rng`` with each 10/90% bound moved to ``median -/+ factor x distance`` by its row's decile
    (``doc`` from ``training.intervals.fit_interval_calibration``; None: unchanged). Medians and means are kept."""
    if doc is None or len(rng) == 0:
        return rng
    out = np.array(rng, dtype=np.float64, copy=True)
    # One pass per table, not per symbol: every symbol the calibration never saw shares the pooled
    # table (at a close of 200 symbols, 3 passes instead of 200).
    tables = np.asarray([name if name in doc else POOLED for name in symbols], dtype=object)
    for name in dict.fromkeys(tables.tolist()):
        rows = tables == name
        table = doc[name]
        for side, c in (("high", 0), ("low", 3)):
            t = table[side]
            med = out[rows, c + 1]
            b = np.searchsorted(np.asarray(t["edges"]), med)
            out[rows, c] = med - np.asarray(t["lower"])[b] * (med - out[rows, c])
            out[rows, c + 2] = med + np.asarray(t["upper"])[b] * (out[rows, c + 2] - med)
    return out
