"""Walk-forward study of the range targets' unit, features and intervals (issue 14), before 2025-07-01.

    .venv/bin/python bench/range_scale.py [--folds 3] [--horizons 6 18] [--rounds 300] [--variants ...]
        [--kinds quantile mean] [--cache /tmp/range_scale.npz] [--fold-index 0 1] [--json out.json]
    .venv/bin/python bench/range_scale.py --report a.json b.json [--baseline atr atr~seed atr~seed2]

On folds that end before 2025-07-01 (nothing after it is loaded), for each horizon and fold, each
variant fits the high/low quantile and/or squared-error mean boosters (``--kinds``), early-stopped on
the fold's validation tail, and is scored on the fold's test block beside the HAR baseline (sigma x
fit-row quantiles). A variant is named ``unit[+group...][-dow][~seedN]`` (``parse_variant``):
- unit ``atr`` (shipped: ATR14/close x sqrt(h)), ``har`` (the HAR forecast of features/volatility.py
  fitted on the fold's fit rows), ``raw`` (none), ``floor`` (ATR floored at its 20% quantile over
  the fit rows, per symbol);
- groups (``GROUPS``, candidates in bench/range_candidates.py): ``x`` (HAR inputs and log sigma),
  ``cross`` (the other symbol's volatility and returns), ``ny`` (New York local time of day / day of
  week, DST flag), ``prof`` / ``nyprof`` / ``prof3`` (trailing 30-day UTC / 30-day New-York keyed /
  3-day profile of the next h slots), ``long3`` / ``longw`` (3-day; 1-week and 30-day variances),
  ``volx`` (volume surprises);
- ``-dow`` drops the shipped UTC day of week; ``~seedN`` refits with XGBoost seed + N (noise floor).
With ``quantile`` fitted, ``atr+cqr`` / ``atr+cqr288`` are the ``atr`` interval calibrated per decile
of its predicted median / of ``parkinson_288`` on the fold's early-stopping tail (``conformal``).
Each variant's mean is also combined with the HAR baseline's mean (equal weights, ``⊕HAR``).
Prints fold means (symbols pooled), the change of the mean forecast's R² against ``atr`` in every
(fold, symbol, h, side) cell, and coverage per volatility decile (deciles of the HAR sigma over the
test rows, as training.evaluate) for the interval variants (bench/range_report.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import range_candidates as rc  # noqa: E402
from bench.range_report import print_report  # noqa: E402
from configs.settings import get_settings  # noqa: E402
from features.volatility import apply_har, fit_har, har_inputs, har_target  # noqa: E402
from training.data import load_histories, prepare, subsample_stride, to_ms, walk_forward_splits  # noqa: E402
from training.scores import coverage, mae, pinball, r2  # noqa: E402
from training.boosters import TargetSpec, fit_booster, predict_raw, xgb_params  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CROSS = ("rv_12", "rv_48", "rv_288", "parkinson_48", "roc_1", "roc_6", "roc_36", "h1_ret_1", "volume_z_48")
# Feature groups a variant name may add after its unit ("atr+ny+prof3"); "-dow" drops the UTC day of
# week; "~seedN" changes the XGBoost seed by N.
GROUPS = {"x": "harx", "cross": "cross", "ny": "ny", "prof": "prof_utc", "nyprof": "prof_ny", "prof3": "prof3",
          "long3": "long3", "longw": "longw", "volx": "volx"}
UNITS = ("atr", "har", "raw", "floor")


def parse_variant(name: str) -> tuple[str, tuple[str, ...], tuple[str, ...], int]:
    """``name`` -> (unit, extra column groups, dropped feature columns, seed offset)."""
    base, _, seed = name.partition("~seed")
    seed_offset = int(seed or 1) if "~seed" in name else 0
    drop = ("dow_sin", "dow_cos") if base.endswith("-dow") else ()
    unit, *groups = base.removesuffix("-dow").split("+")
    if unit not in UNITS or any(g not in GROUPS for g in groups):
        raise ValueError(f"unknown variant {name!r}")
    return unit, tuple(GROUPS[g] for g in groups), drop, seed_offset


def per_symbol(data, histories, fn) -> np.ndarray:
    """Columns ``fn(history) -> dict`` per candle, aligned to the prepared rows."""
    out = None
    for symbol, df in histories.items():
        cols = fn(df)
        rows = np.flatnonzero(data.symbol == symbol)
        idx = np.searchsorted(df["open_time"].to_numpy(np.int64), data.open_time[rows])
        block = np.column_stack(list(cols.values()))[idx]
        if out is None:
            out = np.full((len(data), block.shape[1]), np.nan)
        out[rows] = block
    return out


def ohlc(df):
    return (df["open_time"].to_numpy(np.int64), df["high"].to_numpy(), df["low"].to_numpy(), df["close"].to_numpy())


def har_columns(data, histories, horizons):
    """HAR inputs and targets at the prepared rows, per horizon."""
    X, y = {}, {}
    for h in horizons:
        X[h] = per_symbol(data, histories, lambda df: dict(enumerate(har_inputs(*ohlc(df), [h])[h].T)))
        y[h] = per_symbol(data, histories, lambda df: {0: har_target(*ohlc(df), h)})[:, 0]
    return X, y


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


def extra_columns(group, h, data, histories, log_atr2):
    """One candidate feature group at the prepared rows (volatility groups relative to the ATR unit)."""
    if group == "ny":
        return per_symbol(data, histories, lambda df: rc.ny_calendar(df["open_time"].to_numpy(np.int64)))
    if group in ("prof_utc", "prof_ny", "prof3"):
        key, days = ("ny", 30) if group == "prof_ny" else ("utc", 3 if group == "prof3" else 30)
        col = per_symbol(data, histories, lambda df: {0: rc.log_profile_keyed(*ohlc(df), h, key, days)})
        return col - log_atr2[:, None]
    if group in ("long3", "longw"):
        wins = ("3d",) if group == "long3" else ("1w", "30d")
        return per_symbol(data, histories, lambda df: rc.long_memory(*ohlc(df), wins)) - log_atr2[:, None]
    if group == "volx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return per_symbol(data, histories, lambda df: rc.volume_surprise(
                df["open_time"].to_numpy(np.int64), df["volume"].to_numpy()))
    if group == "cross":
        return cross_asset(data)
    raise KeyError(group)


def sigma_for(data, Xh, yh, fit_rows):
    """HAR fitted per symbol on ``fit_rows``, applied to every row."""
    sigma = np.full(len(data), np.nan)
    for symbol in data.symbols:
        fr = fit_rows[data.symbol[fit_rows] == symbol]
        model = fit_har(Xh[fr], yh[fr])
        rows = np.flatnonzero(data.symbol == symbol)
        sigma[rows] = apply_har(model, Xh[rows])
    return sigma


class Context:
    """The prepared rows and every column a variant may need, computed once per horizon."""

    def __init__(self, data, histories, horizons):
        self.data, self.histories = data, histories
        self.atr = data.X[:, data.columns.index("atr_14")].astype(np.float64)
        self.log_atr2 = 2.0 * np.log(np.maximum(self.atr, 1e-4))
        self.HX, self.Hy = har_columns(data, histories, horizons)
        self._extra: dict = {}

    def extra(self, group, h):
        key = (group, h if group.startswith("prof") else None)
        if key not in self._extra:
            self._extra[key] = extra_columns(group, h, self.data, self.histories, self.log_atr2)
        return self._extra[key]

    def inputs(self, name, h, sigma, fit_rows):
        """(unit per row, input matrix, seed offset) of one variant."""
        unit, groups, drop, seed = parse_variant(name)
        data = self.data
        if unit == "atr":
            scale = np.sqrt(h) * np.maximum(self.atr, 1e-4)
        elif unit == "floor":
            scale = np.sqrt(h) * self.floored_atr(fit_rows)
        elif unit == "har":
            scale = sigma
        else:
            scale = np.ones(len(data))
        keep = [j for j, c in enumerate(data.columns) if c not in drop]
        parts = [data.X[:, keep]]
        for g in groups:
            parts.append(np.column_stack([self.HX[h], np.log(sigma)]) if g == "harx" else self.extra(g, h))
        return scale, np.hstack(parts).astype(np.float32), seed

    def floored_atr(self, fit_rows):
        out = np.maximum(self.atr, 1e-4)
        for s in self.data.symbols:
            rows = self.data.symbol == s
            floor = np.quantile(self.atr[fit_rows[self.data.symbol[fit_rows] == s]], 0.2)
            out[rows] = np.maximum(out[rows], floor)
        return out


def fit_predict(kind, side, h, cfg, rounds, seed, X, target, fit, val, predict_rows):
    spec = TargetSpec("range_predictor", side, h, kind, f"fut_{side}_{h}")
    f_ok, v_ok = fit[np.isfinite(target[fit])], val[np.isfinite(target[val])]
    params = xgb_params(spec, cfg, 2)
    params["seed"] += seed
    booster, _ = fit_booster(params, rounds, X[f_ok], target[f_ok], X[v_ok], target[v_ok], cfg.early_stopping_rounds)
    return [predict_raw(booster, X[r], spec.width) for r in predict_rows]


def conformal(q_val, y_val, key_val, q_test, key_test, n_bins=10):
    """Per decile of ``key`` (calibration rows' edges): widen or narrow each side of the interval by
    the factor that puts 10% of the calibration rows beyond it (distances from the median in units
    of that side's half-width; never below 1/2)."""
    edges = np.quantile(key_val, np.linspace(0, 1, n_bins + 1)[1:-1])
    bv, bt = np.searchsorted(edges, key_val), np.searchsorted(edges, key_test)
    out = q_test.copy()
    for b in range(n_bins):
        m, mt = bv == b, bt == b
        lo_w = np.maximum(q_val[m, 1] - q_val[m, 0], 1e-12)
        hi_w = np.maximum(q_val[m, 2] - q_val[m, 1], 1e-12)
        a = max(np.quantile((q_val[m, 1] - y_val[m]) / lo_w, 0.9), 0.5)
        c = max(np.quantile((y_val[m] - q_val[m, 1]) / hi_w, 0.9), 0.5)
        out[mt, 0] = q_test[mt, 1] - a * (q_test[mt, 1] - q_test[mt, 0])
        out[mt, 2] = q_test[mt, 1] + c * (q_test[mt, 2] - q_test[mt, 1])
    return out


# conformal interval variants of ``atr`` -> the decile key: its predicted median, or the 1-day Parkinson
# volatility (closer to the HAR sigma that training.evaluate's deciles use; both known at t)
CONFORMAL = {"atr+cqr": "median", "atr+cqr288": "parkinson_288"}


def conformal_by_symbol(ctx, name, q_val, y, val, q_test, test):
    """``conformal`` per symbol, calibrated on the fold's early-stopping tail ``val``."""
    data = ctx.data
    out = np.empty_like(q_test)
    col = CONFORMAL[name]
    key = None if col == "median" else data.X[:, data.columns.index(col)]
    for s in data.symbols:
        mv = (data.symbol[val] == s) & np.isfinite(y[val])
        mt = data.symbol[test] == s
        kv = q_val[mv, 1] if key is None else key[val][mv]
        kt = q_test[mt, 1] if key is None else key[test][mt]
        out[mt] = conformal(q_val[mv], y[val][mv], kv, q_test[mt], kt)
    return out


def score(data, y, test, sigma, mean=None, qs=None, q=(0.1, 0.5, 0.9)):
    """Pooled metrics and, per symbol, the mean's R² and coverage per HAR-sigma decile."""
    nan = float("nan")
    rec = {"pooled": (r2(y[test], mean) if mean is not None else nan,
                      r2(y[test], qs[:, 1]) if qs is not None else nan,
                      mae(y[test], qs[:, 1]) if qs is not None else nan,
                      pinball(y[test], qs, q) if qs is not None else nan,
                      coverage(y[test], qs[:, 0], qs[:, 2]) if qs is not None else nan), "sym": {}}
    for s in data.symbols:
        m = data.symbol[test] == s
        d = {"r2m": r2(y[test][m], mean[m]) if mean is not None else nan}
        if qs is not None:
            ys, qq = y[test][m], qs[m]
            dec = np.minimum((np.argsort(np.argsort(sigma[test][m])) * 10) // m.sum(), 9)
            d["dec"] = [coverage(ys[dec == k], qq[dec == k, 0], qq[dec == k, 2]) for k in range(10)]
            calm = dec == 0
            d["calm_miss"] = (float(np.mean(ys[calm] < qq[calm, 0])), float(np.mean(ys[calm] > qq[calm, 2])))
        rec["sym"][s] = d
    return rec


def load(end: str, cache: Path | None):
    """Histories before ``end`` and the prepared rows (from ``cache`` when it exists: prepare is slow)."""
    import pandas as pd

    from training.data import Prepared

    settings = get_settings()
    histories = load_histories({s: SHARED / f"{s}_5m.parquet" for s in ("BTCUSDT", "ETHUSDT")})
    end_ms = to_ms(end)
    histories = {s: df[df["open_time"] < end_ms].reset_index(drop=True) for s, df in histories.items()}
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        if int(z["end_ms"]) == end_ms:
            labels = pd.DataFrame({c: z[f"label_{c}"] for c in z["label_names"]})
            return histories, Prepared(X=z["X"], columns=tuple(z["columns"]), feature_names=tuple(z["feature_names"]),
                                       labels=labels, open_time=z["open_time"], symbol=z["symbol"].astype(object),
                                       close=z["close"], symbols=tuple(z["symbols"]))
    data = prepare(histories, settings)
    if cache is not None:
        np.savez(cache, end_ms=end_ms, X=data.X, columns=np.array(data.columns),
                 feature_names=np.array(data.feature_names), label_names=np.array(list(data.labels.columns)),
                 open_time=data.open_time, symbol=data.symbol.astype(str), close=data.close,
                 symbols=np.array(data.symbols), **{f"label_{c}": data.labels[c].to_numpy() for c in data.labels})
    return histories, data


def run_fold(ctx, fold, args, cfg, results):
    data = ctx.data
    q = np.asarray(cfg.quantiles)
    fit = subsample_stride(data.open_time, fold.fit, args.max_rows)
    val = subsample_stride(data.open_time, fold.val, args.max_rows)
    for h in args.horizons:
        sigma = sigma_for(data, ctx.HX[h], ctx.Hy[h], fold.fit)
        for side in ("high", "low"):
            y = data.labels[f"fut_{side}_{h}"].to_numpy(np.float64)
            test = fold.test[np.isfinite(y[fold.test]) & np.isfinite(sigma[fold.test])]
            u = y[fit] / sigma[fit]
            u = u[np.isfinite(u)]
            har_q = sigma[test, None] * np.quantile(u, q)[None, :]
            har_m = sigma[test] * u.mean()
            results.setdefault(("HAR", h, side), {})[fold.index] = score(data, y, test, sigma, har_m, har_q)
            for name in args.variants:
                if name in CONFORMAL:
                    continue
                scale, X, seed = ctx.inputs(name, h, sigma, fold.fit)
                target = y / scale
                preds = {}
                for kind in args.kinds:
                    rows = [test, val] if (kind == "quantile" and name == "atr") else [test]
                    out = fit_predict(kind, side, h, cfg, args.rounds, seed, X, target, fit, val, rows)
                    preds[kind] = [p * scale[r, None] for p, r in zip(out, rows)]
                mean = preds["mean"][0][:, 0] if "mean" in preds else None
                qs = np.sort(preds["quantile"][0], axis=1) if "quantile" in preds else None
                results.setdefault((name, h, side), {})[fold.index] = score(data, y, test, sigma, mean, qs)
                if mean is not None:
                    results.setdefault((f"{name}⊕HAR", h, side), {})[fold.index] = score(
                        data, y, test, sigma, 0.5 * (mean + har_m))
                if qs is not None and name == "atr":
                    qv = np.sort(preds["quantile"][1], axis=1)
                    for cq in (c for c in args.variants if c in CONFORMAL):
                        adj = conformal_by_symbol(ctx, cq, qv, y, val, qs, test)
                        results.setdefault((cq, h, side), {})[fold.index] = score(data, y, test, sigma, mean, adj)
            print(f"fold {fold.index} h={h} {side}: " + "  ".join(
                f"{k[0]} {v[fold.index]['pooled'][0]:.4f}" for k, v in results.items()
                if k[1:] == (h, side) and fold.index in v), flush=True)
            if args.json:
                save_results(args.json, results)


def save_results(path: Path, results: dict) -> None:
    rows = [{"variant": k[0], "h": k[1], "side": k[2], "fold": f, **rec}
            for k, folds in results.items() for f, rec in folds.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(path)


def load_results(path: Path) -> dict:
    out: dict = {}
    for r in json.loads(path.read_text()):
        out.setdefault((r["variant"], r["h"], r["side"]), {})[r["fold"]] = {"pooled": r["pooled"], "sym": r["sym"]}
    return out


def merge(into: dict, other: dict) -> None:
    """Add ``other``'s cells; a cell in both keeps every figure either run measured (a mean-only and
    a quantile-only run of one variant complete each other)."""
    for k, folds in other.items():
        mine = into.setdefault(k, {})
        for f, rec in folds.items():
            old = mine.get(f)
            if old is None:
                mine[f] = rec
                continue
            pooled = [b if b == b else a for a, b in zip(old["pooled"], rec["pooled"])]
            sym = {s: {**old["sym"].get(s, {}), **{n: v for n, v in d.items() if v == v}} for s, d in rec["sym"].items()}
            mine[f] = {"pooled": pooled, "sym": sym}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--horizons", type=int, nargs="+", default=[6, 72])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--end", default="2025-07-01")
    p.add_argument("--variants", nargs="+", default=["atr", "har", "har+x", "atr+cross"],
)
    p.add_argument("--kinds", nargs="+", default=["quantile", "mean"], choices=["quantile", "mean"])
    p.add_argument("--max-rows", type=int, default=None, help="rows per fit (default: configs/models.yaml)")
    p.add_argument("--fold-index", type=int, nargs="+", default=None, help="run only these folds")
    p.add_argument("--json", type=Path, default=None, help="write the results here after every cell (merged)")
    p.add_argument("--report", type=Path, nargs="+", default=None, help="print the report of these JSON files only")
    p.add_argument("--baseline", nargs="+", default=["atr"],
                   help="variants whose mean the gains are measured against (e.g. atr atr~seed atr~seed2)")
    p.add_argument("--cache", type=Path, default=None, help="npz of the prepared rows (written once, reused)")
    args = p.parse_args()
    if args.end > "2025-07-01":
        p.error("the study must not load the final test months (2025-07-01 and later)")
    if args.report:
        results = {}
        for path in args.report:
            merge(results, load_results(path))
        print_report(results, ("BTCUSDT", "ETHUSDT"), baseline=tuple(args.baseline))
        return 0
    for name in args.variants:
        if name not in CONFORMAL:
            parse_variant(name)
    cfg = get_settings().models
    args.max_rows = args.max_rows or cfg.max_train_rows
    histories, data = load(args.end, args.cache)
    ctx = Context(data, histories, args.horizons)
    folds = walk_forward_splits(data.open_time, args.folds, 72, 0.6, cfg.validation_fraction)
    results: dict[tuple, dict] = {}
    for fold in folds:
        if args.fold_index is not None and fold.index not in args.fold_index:
            continue
        run_fold(ctx, fold, args, cfg, results)
    print_report(results, data.symbols, baseline=tuple(args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
