"""Printing for bench/range_scale.py: fold means, per-cell changes against a baseline, decile coverage.

``results[(variant, h, side)][fold] = {"pooled": (R² mean, R² median, MAE, pinball, coverage),
"sym": {symbol: {"r2m": ..., "dec": [10 coverages], "calm_miss": (below q10, above q90)}}}``.
"""

from __future__ import annotations

import numpy as np


def print_report(results: dict, symbols, baseline: tuple[str, ...] = ("atr",)) -> None:
    print("\nvariant  h  side  folds  R²(mean)  R²(median)  MAE(median)  pinball  coverage   (mean of folds, symbols pooled)")
    for (name, h, side), folds in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        m = np.mean([v["pooled"] for v in folds.values()], axis=0)
        print(f"{name:<16} {h:>3} {side:<4} {len(folds)}  {m[0]:.4f}  {m[1]:.4f}  {m[2]:.6f}  {m[3]:.7f}  {m[4]:.3f}")
    print_gains(results, symbols, baseline)
    print_deciles(results, symbols)


def _cell_gains(results, name, baseline, h, side, symbols, field):
    """``name`` minus the mean of the ``baseline`` variants, per (fold, symbol) all of them have."""
    a = results.get((name, h, side), {})
    bs = [results.get((b, h, side), {}) for b in baseline]
    out = []
    for f in sorted(set(a).intersection(*bs)):
        for s in symbols:
            x = a[f]["sym"].get(s, {}).get(field, np.nan)
            y = np.mean([b[f]["sym"].get(s, {}).get(field, np.nan) for b in bs])
            out.append(x - y)
    return out


def print_gains(results: dict, symbols, baseline: tuple[str, ...]) -> None:
    """R² of the mean forecast minus the baseline's (the mean of several seeds' when given), in every
    (fold, symbol) cell per h/side."""
    names = sorted({k[0] for k in results} - set(baseline))
    cells = sorted({k[1:] for k in results if k[0] == baseline[0]})
    print(f"\nR²(mean) − mean of {', '.join(baseline)}, per (fold × symbol) for each h/side [folds sorted; BTC, ETH];"
          " summary over all")
    for name in names:
        diffs, parts = [], []
        for h, side in cells:
            d = _cell_gains(results, name, baseline, h, side, symbols, "r2m")
            if d:
                diffs += d
                parts.append(f"{h}{side[0]} " + " ".join(f"{v:+.4f}" for v in d))
        diffs = np.asarray(diffs, dtype=float)
        if not len(diffs) or np.isnan(diffs).all():
            continue
        ok = diffs[np.isfinite(diffs)]
        print(f"{name:<16} mean {ok.mean():+.4f}  min {ok.min():+.4f}  max {ok.max():+.4f}  "
              f"positive {int((ok > 0).sum())}/{len(ok)}   | " + " | ".join(parts))


def print_deciles(results: dict, symbols) -> None:
    """Coverage per HAR-sigma decile (calmest first), per symbol, fold means; calmest decile's misses."""
    rows = [(k, v) for k, v in results.items() if any("dec" in r["sym"].get(symbols[0], {}) for r in v.values())]
    if not rows:
        return
    print("\ncoverage per volatility decile (fold means; calmest first) | calmest: below q10 / above q90"
          " | calmest per fold | decile farthest from 0.80 over folds")
    for (name, h, side), folds in sorted(rows, key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        for s in symbols:
            recs = [folds[f]["sym"][s] for f in sorted(folds) if "dec" in folds[f]["sym"][s]]
            dec = np.array([r["dec"] for r in recs])
            miss = np.mean([r["calm_miss"] for r in recs], axis=0)
            worst = dec.flat[np.argmax(np.abs(dec - 0.8))]
            print(f"{name:<8} {h:>3} {side:<4} {s:<8} " + " ".join(f"{c:.3f}" for c in dec.mean(axis=0))
                  + f" | {miss[0]:.3f} / {miss[1]:.3f} | " + " ".join(f"{c:.3f}" for c in dec[:, 0])
                  + f" | {worst:.3f}")
