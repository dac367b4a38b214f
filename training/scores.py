"""Out-of-sample metrics and naive baselines, shared by the walk-forward and ``training.evaluate``.

One implementation on purpose: the numbers stored in model metadata during training and the
numbers the evaluator prints are computed by the same functions, so they can be compared.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, roc_auc_score

# Baseline regressor: the range a linear fit on recent realised volatility predicts.
BASELINE_VOL_FEATURE = "rv_48"


def _f(x: float) -> float | None:
    """JSON-safe float (NaN -> None), rounded to keep reports readable."""
    x = float(x)
    return None if not math.isfinite(x) else round(x, 6)


def mae(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(y - p))) if len(y) else float("nan")


def r2(y: np.ndarray, p: np.ndarray) -> float:
    if len(y) < 2:
        return float("nan")
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - p) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def pinball(y: np.ndarray, q: np.ndarray, alphas: Sequence[float]) -> float:
    """Mean pinball (quantile) loss of the columns of ``q`` at levels ``alphas``, averaged over levels:
    the proper score of a quantile forecast (MAE/2 for the median)."""
    if len(y) == 0:
        return float("nan")
    d = np.asarray(y, dtype=np.float64)[:, None] - np.asarray(q, dtype=np.float64)
    a = np.asarray(alphas, dtype=np.float64)[None, :]
    return float(np.mean(np.maximum(a * d, (a - 1) * d)))


def coverage(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    return float(np.mean((y >= lower) & (y <= upper))) if len(y) else float("nan")


def auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(brier_score_loss(y, p)) if len(y) else float("nan")


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |accuracy - confidence|
    weighted by the bin's share of rows."""
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(float(correct[m].mean()) - float(confidence[m].mean()))
    return total


def reliability_curve(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per confidence bin: mean confidence, observed accuracy, row count (for plots and reports)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append({"confidence": float(confidence[m].mean()), "accuracy": float(correct[m].mean()),
                        "count": int(m.sum())})
    return out


def fit_isotonic(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """An isotonic calibrator as JSON knots (``inference.transforms.apply_calibration`` applies it)."""
    if len(confidence) < 50 or len(np.unique(correct)) < 2:
        return {"method": "identity", "rows": int(len(confidence))}
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(confidence, correct.astype(float))
    return {"method": "isotonic", "x": [float(v) for v in iso.X_thresholds_],
            "y": [float(v) for v in iso.y_thresholds_], "rows": int(len(confidence))}


# ---- baselines -------------------------------------------------------------------------------------
def fit_baselines(y_high: np.ndarray, y_low: np.ndarray, vol: np.ndarray) -> dict[str, dict[str, float]]:
    """Naive baselines of one (symbol, horizon) fitted on training rows: the training mean, and a
    least-squares line on recent realised volatility (``rv_48``)."""
    out = {}
    for name, y in (("high", y_high), ("low", y_low)):
        ok = np.isfinite(y) & np.isfinite(vol)
        if ok.sum() < 10:
            out[name] = {"mean": float("nan"), "vol_a": float("nan"), "vol_b": float("nan")}
            continue
        b, a = np.polyfit(vol[ok], y[ok], 1)
        out[name] = {"mean": float(y[ok].mean()), "vol_a": float(a), "vol_b": float(b)}
    return out


def baseline_predictions(baseline: Mapping[str, Mapping[str, float]], vol: np.ndarray) -> dict[str, np.ndarray]:
    """``mean_high``, ``vol_high``, ``mean_low``, ``vol_low`` predictions for rows with ``vol``."""
    out = {}
    for name in ("high", "low"):
        b = baseline[name]
        out[f"mean_{name}"] = np.full(len(vol), b["mean"])
        out[f"vol_{name}"] = b["vol_a"] + b["vol_b"] * vol
    return out


# ---- metric rows ---------------------------------------------------------------------------------------
def range_metrics(y_high: np.ndarray, y_low: np.ndarray, pred: np.ndarray,
                  baselines: Mapping[str, np.ndarray],
                  quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> dict[str, Any]:
    """R², MAE (median), baselines' MAE, pinball loss of the three quantiles, 10-90% coverage, and R²
    and MAE of the mean forecast (``r2_mean_*``, None without one) of the high and the low.

    ``pred`` is the range predictor's (n, 6) output; rows with an undefined label are ignored.
    """
    out: dict[str, Any] = {}
    for name, y, lo, med, hi in (("high", y_high, 0, 1, 2), ("low", y_low, 3, 4, 5)):
        ok = np.isfinite(y) & np.isfinite(pred[:, med])
        yy = y[ok]
        out[f"r2_{name}"] = _f(r2(yy, pred[ok, med]))
        out[f"mae_{name}"] = _f(mae(yy, pred[ok, med]))
        out[f"mean_mae_{name}"] = _f(mae(yy, baselines[f"mean_{name}"][ok]))
        out[f"vol_mae_{name}"] = _f(mae(yy, baselines[f"vol_{name}"][ok]))
        out[f"coverage_{name}"] = _f(coverage(yy, pred[ok, lo], pred[ok, hi]))
        out[f"pinball_{name}"] = _f(pinball(yy, pred[ok, lo:hi + 1], quantiles))
        mean_col = 6 if name == "high" else 7  # the mean forecast (inference.transforms.RANGE_MEAN_OUTPUTS)
        has_mean = pred.shape[1] > mean_col and np.isfinite(pred[ok, mean_col]).all() and ok.any()
        out[f"r2_mean_{name}"] = _f(r2(yy, pred[ok, mean_col])) if has_mean else None
        out[f"mae_mean_{name}"] = _f(mae(yy, pred[ok, mean_col])) if has_mean else None
    return out


def har_metrics(y_high: np.ndarray, y_low: np.ndarray, har: Mapping[str, np.ndarray],
                quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> dict[str, Any]:
    """The HAR baseline's ``har_mae_*`` (median), ``har_r2_*`` (its mean forecast), ``har_pinball_*``
    and ``har_coverage_*`` (see ``training.har_baseline``); rows where it is undefined are ignored."""
    out: dict[str, Any] = {}
    for name, y in (("high", y_high), ("low", y_low)):
        q, m = har[name], har[f"{name}_mean"]
        ok = np.isfinite(y) & np.isfinite(m)
        yy = y[ok]
        out[f"har_mae_{name}"] = _f(mae(yy, q[ok, 1]))
        out[f"har_r2_{name}"] = _f(r2(yy, m[ok]))
        out[f"har_pinball_{name}"] = _f(pinball(yy, q[ok], quantiles))
        out[f"har_coverage_{name}"] = _f(coverage(yy, q[ok, 0], q[ok, 2]))
    return out


def tpsl_metrics(y_long: np.ndarray, y_short: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for j, (name, y) in enumerate((("long", y_long), ("short", y_short))):
        ok = np.isfinite(y) & np.isfinite(p[:, j])
        out[f"tpsl_auc_{name}"] = _f(auc(y[ok], p[ok, j]))
        out[f"tpsl_brier_{name}"] = _f(brier(y[ok], p[ok, j]))
        out[f"tpsl_base_rate_{name}"] = _f(float(np.mean(y[ok])) if ok.any() else float("nan"))
    return out


def signal_metrics(y: np.ndarray, probs: np.ndarray, confidence: np.ndarray | None = None,
                   prefix: str = "signal") -> dict[str, Any]:
    """Accuracy and macro-F1 of the argmax; ECE of ``confidence`` (default: the max probability)."""
    ok = np.isfinite(y) & np.isfinite(probs).all(axis=1)
    yy = y[ok].astype(int)
    pred = probs[ok].argmax(axis=1)
    conf = (confidence[ok] if confidence is not None else probs[ok].max(axis=1))
    if not ok.any():
        return {f"{prefix}_accuracy": None, f"{prefix}_macro_f1": None, "confidence_ece": None}
    return {f"{prefix}_accuracy": _f(accuracy_score(yy, pred)),
            f"{prefix}_macro_f1": _f(f1_score(yy, pred, average="macro", labels=[0, 1, 2], zero_division=0)),
            "confidence_ece": _f(ece(conf, pred == yy))}
