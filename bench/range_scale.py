"""Walk-forward study of the range targets' volatility unit (issue 14, points 1-3), before 2025-07-01.

    .venv/bin/python bench/range_scale.py [--folds 2] [--horizons 6 72] [--rounds 300]

On folds that end before 2025-07-01 (nothing after it is loaded), for each horizon and fold:
- ``atr``: the shipped unit, ATR14/close x sqrt(h), the shipped features;
- ``har``: the HAR volatility forecast (features/volatility.py) fitted on the fold's fit rows only;
- ``har+x``: that unit, plus the HAR inputs and log sigma as extra features;
- ``atr+cross``: the shipped unit, plus the other symbol's volatility and returns (``CROSS``);
- ``raw``: no unit (raw fractions of close), the objective squared error rewards as is.
Each variant's mean is also combined with the HAR baseline's mean (equal weights, ``⊕HAR``).
Each variant fits the high/low quantile boosters and squared-error mean boosters, early-stopped on
the fold's validation tail, and is scored on the fold's test block beside the HAR baseline
(sigma x fit-row quantiles). Prints one line per (variant, horizon, side), fold-averaged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.settings import get_settings  # noqa: E402
from features.volatility import apply_har, fit_har, har_inputs, har_target  # noqa: E402
from training.data import load_histories, prepare, subsample_stride, to_ms, walk_forward_splits  # noqa: E402
from training.metrics import coverage, mae, pinball, r2  # noqa: E402
from training.models import TargetSpec, fit_booster, predict_raw, xgb_params  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def har_columns(data, histories, horizons):
    """HAR inputs and targets at the prepared rows, per horizon."""
    X = {h: np.full((len(data), 11), np.nan) for h in horizons}
    y = {h: np.full(len(data), np.nan) for h in horizons}
    for symbol, df in histories.items():
        cols = (df["open_time"].to_numpy(np.int64), df["high"].to_numpy(), df["low"].to_numpy(), df["close"].to_numpy())
        rows = np.flatnonzero(data.symbol == symbol)
        idx = np.searchsorted(cols[0], data.open_time[rows])
        inputs = har_inputs(*cols, horizons)
        for h in horizons:
            X[h][rows] = inputs[h][idx]
            y[h][rows] = har_target(*cols, h)[idx]
    return X, y


CROSS = ("rv_12", "rv_48", "rv_288", "parkinson_48", "roc_1", "roc_6", "roc_36", "h1_ret_1", "volume_z_48")


def cross_asset(data) -> np.ndarray:
    """The other symbol's ``CROSS`` features at the same candle (NaN where it has no row)."""
    cols = [data.columns.index(c) for c in CROSS]
    out = np.full((len(data), len(cols)), np.nan, dtype=np.float32)
    for s in data.symbols:
        for o in data.symbols:
            if o == s:
                continue
            rs, ro = np.flatnonzero(data.symbol == s), np.flatnonzero(data.symbol == o)
            idx = np.searchsorted(data.open_time[ro], data.open_time[rs])
            hit = (idx < len(ro)) & (data.open_time[ro[np.minimum(idx, len(ro) - 1)]] == data.open_time[rs])
            out[rs[hit]] = data.X[ro[idx[hit]]][:, cols]
    return out


def sigma_for(data, Xh, yh, fit_rows):
    """HAR fitted per symbol on ``fit_rows``, applied to every row."""
    sigma = np.full(len(data), np.nan)
    for symbol in data.symbols:
        fr = fit_rows[data.symbol[fit_rows] == symbol]
        model = fit_har(Xh[fr], yh[fr])
        rows = np.flatnonzero(data.symbol == symbol)
        sigma[rows] = apply_har(model, Xh[rows])
    return sigma


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--horizons", type=int, nargs="+", default=[6, 72])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--end", default="2025-07-01")
    p.add_argument("--variants", nargs="+", default=["atr", "har", "har+x", "atr+cross"])
    args = p.parse_args()
    settings = get_settings()
    cfg = settings.models
    histories = load_histories({s: SHARED / f"{s}_5m.parquet" for s in ("BTCUSDT", "ETHUSDT")})
    end = to_ms(args.end)
    histories = {s: df[df["open_time"] < end].reset_index(drop=True) for s, df in histories.items()}
    data = prepare(histories, settings)
    HX, Hy = har_columns(data, histories, args.horizons)
    folds = walk_forward_splits(data.open_time, args.folds, 72, 0.6, cfg.validation_fraction)
    atr = data.X[:, data.columns.index("atr_14")].astype(np.float64)
    cross = cross_asset(data)
    results: dict[tuple, list] = {}
    q = np.asarray(cfg.quantiles)
    for fold in folds:
        fit = subsample_stride(data.open_time, fold.fit, cfg.max_train_rows)
        val = subsample_stride(data.open_time, fold.val, cfg.max_train_rows)
        for h in args.horizons:
            sigma = sigma_for(data, HX[h], Hy[h], fold.fit)
            extra = np.column_stack([HX[h], np.log(sigma)]).astype(np.float32)
            atr_scale = np.sqrt(h) * np.maximum(atr, 1e-4)
            make = {"atr": lambda: (atr_scale, data.X), "har": lambda: (sigma, data.X),
                    "har+x": lambda: (sigma, np.hstack([data.X, extra])),
                    "atr+cross": lambda: (atr_scale, np.hstack([data.X, cross])),
                    "raw": lambda: (np.ones(len(data)), data.X)}
            variants = {v: make[v]() for v in args.variants}
            for side in ("high", "low"):
                y = data.labels[f"fut_{side}_{h}"].to_numpy(np.float64)
                test = fold.test[np.isfinite(y[fold.test]) & np.isfinite(sigma[fold.test])]
                u = y[fit] / sigma[fit]
                u = u[np.isfinite(u)]
                har_q = sigma[test, None] * np.quantile(u, q)[None, :]
                har_m = sigma[test] * u.mean()
                results.setdefault(("HAR", h, side), []).append(
                    (r2(y[test], har_m), r2(y[test], har_q[:, 1]), mae(y[test], har_q[:, 1]),
                     pinball(y[test], har_q, q), coverage(y[test], har_q[:, 0], har_q[:, 2])))
                for name, (scale, X) in variants.items():
                    target = y / scale
                    preds = {}
                    for kind in ("quantile", "mean"):
                        spec = TargetSpec("range_predictor", side, h, kind, f"fut_{side}_{h}")
                        f_ok, v_ok = fit[np.isfinite(target[fit])], val[np.isfinite(target[val])]
                        booster, _ = fit_booster(xgb_params(spec, cfg, 2), args.rounds, X[f_ok], target[f_ok],
                                                 X[v_ok], target[v_ok], cfg.early_stopping_rounds)
                        preds[kind] = predict_raw(booster, X[test], spec.width) * scale[test, None]
                    qs = np.sort(preds["quantile"], axis=1)
                    results.setdefault((name, h, side), []).append(
                        (r2(y[test], preds["mean"][:, 0]), r2(y[test], qs[:, 1]), mae(y[test], qs[:, 1]),
                         pinball(y[test], qs, q), coverage(y[test], qs[:, 0], qs[:, 2])))
                    # forecast combination: the booster's mean and the HAR baseline's mean, equal weights
                    combo = 0.5 * (preds["mean"][:, 0] + har_m)
                    results.setdefault((f"{name}⊕HAR", h, side), []).append(
                        (r2(y[test], combo), np.nan, np.nan, np.nan, np.nan))
                print(f"fold {fold.index} h={h} {side}: " + "  ".join(
                    f"{k[0]} R²mean {v[-1][0]:.3f}" for k, v in results.items() if k[1:] == (h, side)), flush=True)
    print("\nvariant  h  side  R²(mean)  R²(median)  MAE(median)  pinball  coverage   (mean of folds)")
    for (name, h, side), vals in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        m = np.mean(vals, axis=0)
        print(f"{name:<7} {h:>3} {side:<4}  {m[0]:.4f}  {m[1]:.4f}  {m[2]:.6f}  {m[3]:.7f}  {m[4]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
