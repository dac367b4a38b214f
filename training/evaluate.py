"""``python -m training.evaluate``: score the current models out of sample against naive baselines.

    python -m training.evaluate --models models --candles BTCUSDT_5m.parquet ETHUSDT_5m.parquet \\
        --start 2025-06-01 --json [--report reports/eval]

Candles before ``--start`` only warm the features up; every row from ``--start`` on with a defined
label is scored. ``--json`` prints exactly one object ``{"rows": [...]}``, one row per symbol and
horizon (keys documented in docs/models.md); ``--report DIR`` also writes ``report.md`` with PNG
plots. A row whose period overlaps the models' training data says so (``overlaps_training``):
such figures are in-sample and must not be quoted as out-of-sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from configs.settings import Settings, get_settings
from configs.errors import MLEngineError
from training.backtest.calibration import class_calibration_rows
from training.data import Prepared, load_histories, parse_candle_args, prepare, to_ms
from inference.ensemble import Ensemble
from training.extras import require
from training.har_baseline import HAR_DOCUMENT, fit_har_baseline, har_baseline_predictions
from training.scores import (BASELINE_VOL_FEATURE, baseline_predictions, ece, har_metrics, range_metrics,
                              reliability_curve, signal_metrics, tpsl_metrics)
from training.progress import log, progress, setup_logging
from inference.transforms import meta_class_probs, proposed_side
from training.uncertainty import coverage_by_group, decile_codes, r2_gain, range_intervals

HAR_KEYS = tuple(f"har_{m}_{s}" for m in ("mae", "r2", "pinball", "coverage") for s in ("high", "low"))


def _iso(ms: int) -> str:
    return pd.Timestamp(int(ms), unit="ms", tz="UTC").isoformat()


def predictions(ensemble: Ensemble, data: Prepared, horizon: int) -> dict[str, np.ndarray]:
    """Every stage's output for the prepared rows (features without the symbol code column)."""
    features = data.X[:, :-1].astype(np.float64)
    out = ensemble.predict_arrays(features, list(data.symbol), horizon)
    # score the interval the API serves (calibrated per decile), not the raw stage output
    out["range_predictor"] = ensemble.served_range(out["range_predictor"], data.symbol, horizon)
    return out


def trade_metrics(ensemble: Ensemble, data: Prepared, out: Mapping[str, np.ndarray], r: np.ndarray,
                  h: int) -> dict[str, Any]:
    """What the served signal does on these rows, every row a candidate (overlapping; the backtest
    adds the one-position rule and entry at the next open): ``trades`` (BUY/SELL rows),
    ``abstained_share``, ``mean_expected_r`` (the signal's ``expected_r``) vs ``mean_realised_r``
    (the label's net R of the side taken, after the same costs), ``p_win_ece`` over all proposals."""
    features = data.X[r, :-1].astype(np.float64)
    cols = ensemble.compose_columns(features, list(data.symbol[r]), data.close[r], data.open_time[r], h,
                                    {k: v[r] for k, v in out.items()})
    lab = data.labels
    sig = cols["signal_type"]
    realised = np.where(sig == "BUY", lab[f"r_long_{h}"].to_numpy()[r],
                        np.where(sig == "SELL", lab[f"r_short_{h}"].to_numpy()[r], np.nan))
    side = proposed_side(out["signal_classifier"][r])
    won = np.where(side > 0, lab[f"r_long_{h}"].to_numpy()[r] > 0, lab[f"r_short_{h}"].to_numpy()[r] > 0)
    traded = (sig != "HOLD") & np.isfinite(realised)
    defined = np.isfinite(cols["p_win"])
    n = int(traded.sum())

    def mean(x: np.ndarray) -> float | None:
        return round(float(x.mean()), 6) if len(x) else None

    return {"trades": n, "abstained_share": mean(1.0 - traded[defined]) if defined.any() else None,
            "mean_expected_r": mean(cols["expected_r"][traded]), "mean_realised_r": mean(realised[traded]),
            "total_realised_r": round(float(realised[traded].sum()), 4),
            "p_win_ece": ece(cols["p_win"][defined], won[defined].astype(float)) if defined.any() else None}


def training_end_ms(range_meta: Mapping[str, Any]) -> int:
    """First candle time the models never trained on: ``--end`` if given, else after the last row."""
    if range_meta.get("train_end"):
        end = to_ms(range_meta["train_end"])
        assert end is not None
        return end
    return int(pd.Timestamp(range_meta["data_range"]["end"]).value // 1_000_000) + 300_000


def har_document(ensemble: Ensemble, symbol: str, df: pd.DataFrame, end_ms: int,
                 settings: Settings) -> tuple[dict | None, str | None]:
    """The HAR baseline of ``symbol`` and where it came from: the one saved with the range predictor
    (``"model"``, fitted on its training candles), else fitted here on the candles before the
    training end (``"refit"``; model sets saved before the baseline existed). None: too little history."""
    saved = ensemble.models["range_predictor"].documents.get(HAR_DOCUMENT, {}).get(symbol)
    if saved is not None and all(str(h) in saved for h in ensemble.horizons):
        return saved, "model"
    try:
        return fit_har_baseline(df, ensemble.horizons, end_ms, settings.labels), "refit"
    except ValueError as exc:
        log.warning("no HAR baseline: %s", exc)
        return None, None


def uncertainty(y_high: np.ndarray, y_low: np.ndarray, pred: np.ndarray, t: np.ndarray,
                har: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """Block-bootstrap intervals of the headline figures and coverage per volatility decile (of the
    ex-ante HAR forecast) and per UTC hour of day."""
    out: dict[str, Any] = {}
    nan = np.full(len(t), np.nan)
    sigma = har["sigma"] if har is not None else nan
    deciles = decile_codes(sigma)
    hours = (t // 3_600_000) % 24
    for name, y, lo, med, hi, mean in (("high", y_high, 0, 1, 2, 6), ("low", y_low, 3, 4, 5, 7)):
        extra = {f"har_r2_{name}": har[f"{name}_mean"]} if har is not None else {}
        if pred.shape[1] > mean and np.isfinite(pred[:, mean]).all():
            extra[f"r2_mean_{name}"] = pred[:, mean]
        out.update({f"har_r2_{name}_ci": None, f"r2_mean_{name}_ci": None})
        out.update(range_intervals(y, pred[:, med], pred[:, lo], pred[:, hi], name, extra))
        # the mean forecast's R² over the HAR baseline's, with a paired interval (same resampled days)
        gain, gain_ci = (r2_gain(y, pred[:, mean], har[f"{name}_mean"]) if har is not None and pred.shape[1] > mean
                         else (None, None))
        out.update({f"r2_mean_gain_{name}": gain, f"r2_mean_gain_{name}_ci": gain_ci})
        out[f"coverage_{name}_by_vol_decile"] = coverage_by_group(y, pred[:, lo], pred[:, hi], deciles, 10)
        out[f"coverage_{name}_by_hour"] = coverage_by_group(y, pred[:, lo], pred[:, hi], hours, 24)
    return out


def evaluate(ensemble: Ensemble, candles: Mapping[str, pd.DataFrame], settings: Settings,
             start_ms: int | None = None, keep: dict | None = None) -> list[dict[str, Any]]:
    """One metrics row per symbol and horizon (``keep`` collects arrays for the report)."""
    range_meta = ensemble.metadata["range_predictor"]
    train_end = pd.Timestamp(range_meta["data_range"]["end"]).value // 1_000_000
    fit_end = training_end_ms(range_meta)
    rows: list[dict[str, Any]] = []
    with progress(len(candles) * len(ensemble.horizons), "evaluate") as bar:
        for symbol, df in candles.items():
            data = prepare({symbol: df}, settings, symbols=ensemble.symbols, start_ms=start_ms,
                           barrier_models=ensemble.barrier_models)
            if len(data) == 0:
                bar.update(len(ensemble.horizons))
                continue
            rv = data.X[:, data.columns.index(BASELINE_VOL_FEATURE)].astype(np.float64)
            baselines = range_meta["baselines"].get(symbol)
            har_doc, har_source = har_document(ensemble, symbol, df, fit_end, settings)
            har_all = har_baseline_predictions(har_doc, df, ensemble.horizons, data.open_time) if har_doc else None
            for h in ensemble.horizons:
                out = predictions(ensemble, data, h)
                lab = data.labels
                y_high, y_low = lab[f"fut_high_{h}"].to_numpy(), lab[f"fut_low_{h}"].to_numpy()
                scored = np.isfinite(y_high) & np.isfinite(y_low)
                r = np.flatnonzero(scored)
                row: dict[str, Any] = {"symbol": symbol, "horizon": int(h), "n": int(len(r)), "har_source": har_source}
                if baselines is None:  # a symbol the models never saw: no training baseline exists
                    base = {k: np.full(len(r), np.nan) for k in ("mean_high", "vol_high", "mean_low", "vol_low")}
                else:
                    base = baseline_predictions(baselines[str(h)], rv[r])
                quantiles = tuple(range_meta.get("quantiles", (0.1, 0.5, 0.9)))
                row.update(range_metrics(y_high[r], y_low[r], out["range_predictor"][r], base, quantiles))
                har = {k: v[r] for k, v in har_all[h].items()} if har_all else None
                row.update(har_metrics(y_high[r], y_low[r], har, quantiles) if har else dict.fromkeys(HAR_KEYS))
                row.update({k: v for k, v in tpsl_metrics(lab[f"tp_long_{h}"].to_numpy()[r],
                                                          lab[f"tp_short_{h}"].to_numpy()[r],
                                                          out["tpsl_classifier"][r]).items()})
                y_sig = lab[f"signal_{h}"].to_numpy()[r]
                side = proposed_side(out["signal_classifier"][r])
                p_win = out["meta_model"][r, 1]
                meta = meta_class_probs(side, p_win)
                row.update(signal_metrics(y_sig, meta, p_win, prefix="signal"))
                row.update(trade_metrics(ensemble, data, out, r, h))
                tpsl = out["tpsl_classifier"][r]  # issue 15 point 5: per-class ECE, direction AUC
                # Per class: p_win of the rows proposing that side (the meta-model says nothing of the other).
                row.update(class_calibration_rows(y_sig, np.where(side < 0, p_win, np.nan),
                                                  np.where(side > 0, p_win, np.nan), lab[f"tp_long_{h}"].to_numpy()[r],
                                                  lab[f"tp_short_{h}"].to_numpy()[r], tpsl[:, 0], tpsl[:, 1]))
                cls = signal_metrics(y_sig, out["signal_classifier"][r], prefix="classifier")
                row.update({k: v for k, v in cls.items() if k != "confidence_ece"})
                t = data.open_time[r]
                row.update(uncertainty(y_high[r], y_low[r], out["range_predictor"][r], t, har))
                row.update(start=_iso(t.min()) if len(t) else None, end=_iso(t.max()) if len(t) else None,
                           overlaps_training=bool(len(t) and t.min() <= train_end))
                rows.append(row)
                if keep is not None:
                    correct = np.where(side > 0, lab[f"r_long_{h}"].to_numpy()[r] > 0,
                                       lab[f"r_short_{h}"].to_numpy()[r] > 0).astype(float)
                    keep[(symbol, int(h))] = {"t": t, "y_high": y_high[r], "y_low": y_low[r],
                                              "pred": out["range_predictor"][r], "conf": p_win,
                                              "correct": correct, "row": row}
                bar.update(1)
    return rows


def conditional_coverage_plot(path: Path, row: Mapping[str, Any], title: str) -> None:
    """10-90% coverage per decile of the ex-ante volatility forecast and per UTC hour, with the 80%
    target and the ±6 point band: a conditional miscoverage the overall figure hides shows here."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    for ax, key, xs, label in ((axes[0], "by_vol_decile", range(1, 11), "HAR volatility decile (1 = calmest)"),
                               (axes[1], "by_hour", range(24), "hour of day (UTC)")):
        for name in ("high", "low"):
            vals = [np.nan if v is None else v for v in row.get(f"coverage_{name}_{key}") or []]
            if vals:
                ax.plot(list(xs)[:len(vals)], vals, "o-", label=name)
        ax.axhline(0.8, color="k", ls="--", lw=1)
        ax.axhspan(0.74, 0.86, color="grey", alpha=0.15)
        ax.set(title=f"{title}: coverage {key.replace('_', ' ')}", xlabel=label, ylim=(0.5, 1.0))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt4(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def write_report(out_dir: Path, rows: list[dict[str, Any]], kept: dict, ensemble: Ensemble) -> Path:
    """report.md with PNG plots: predicted vs actual, interval coverage over time, reliability,
    feature importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Model evaluation", "",
             f"Models: {', '.join(f'{m} {v}' for m, v in ensemble.versions.items())}", "",
             "| symbol | h | n | R² high | R² low | MAE high | mean | vol | MAE low | mean | vol | cov high | cov low "
             "| AUC long | AUC short | acc | F1 | ECE |", "|" + "---|" * 18]
    har_lines = ["", "## Against the HAR baseline (90% block-bootstrap intervals)", "",
                 "| symbol | h | R² high [CI] | mean | HAR | R² low [CI] | mean | HAR | MAE high [CI] | HAR "
                 "| MAE low [CI] | HAR | pinball high | HAR | pinball low | HAR | cov high [CI] | cov low [CI] |",
                 "|" + "---|" * 18]
    for r in rows:
        def f(k: str, d: int = 4) -> str:
            v = r.get(k)
            return "" if v is None else f"{v:.{d}f}"

        lines.append(f"| {r['symbol']} | {r['horizon']} | {r['n']} | {f('r2_high', 3)} | {f('r2_low', 3)} | "
                     f"{f('mae_high', 5)} | {f('mean_mae_high', 5)} | {f('vol_mae_high', 5)} | {f('mae_low', 5)} | "
                     f"{f('mean_mae_low', 5)} | {f('vol_mae_low', 5)} | {f('coverage_high', 3)} | "
                     f"{f('coverage_low', 3)} | {f('tpsl_auc_long', 3)} | {f('tpsl_auc_short', 3)} | "
                     f"{f('signal_accuracy', 3)} | {f('signal_macro_f1', 3)} | {f('confidence_ece', 3)} |")

        def ci(k: str, d: int) -> str:
            v = r.get(f"{k}_ci")
            return f"{f(k, d)} [{v[0]:.{d}f}, {v[1]:.{d}f}]" if v else f(k, d)

        har_lines.append(f"| {r['symbol']} | {r['horizon']} | {ci('r2_high', 3)} | {ci('r2_mean_high', 3)} | "
                         f"{ci('har_r2_high', 3)} | {ci('r2_low', 3)} | {ci('r2_mean_low', 3)} | {ci('har_r2_low', 3)} | "
                         f"{ci('mae_high', 5)} | {f('har_mae_high', 5)} | "
                         f"{ci('mae_low', 5)} | {f('har_mae_low', 5)} | {f('pinball_high', 6)} | "
                         f"{f('har_pinball_high', 6)} | {f('pinball_low', 6)} | {f('har_pinball_low', 6)} | "
                         f"{ci('coverage_high', 3)} | {ci('coverage_low', 3)} |")
    lines += har_lines
    lines += ["", "## Per class: calibration (equal-mass bins) and direction", "",
              "ECE of the meta-model's p(BUY) for label BUY and p(SELL) for label SELL over every row; direction AUC "
              "of p_tp_long − p_tp_short on the rows where one side's take-profit came first.", "",
              "| symbol | h | ECE BUY | ECE SELL | direction AUC | rows with a direction |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['symbol']} | {r['horizon']} | {_fmt4(r.get('ece_buy'))} | {_fmt4(r.get('ece_sell'))} "
              f"| {_fmt4(r.get('direction_auc'))} | {r.get('direction_n')} |" for r in rows]
    if any(r.get("overlaps_training") for r in rows):
        lines += ["", "**Warning: the evaluated period overlaps the models' training data (in-sample figures).**"]
    for (symbol, h), k in sorted(kept.items()):
        if len(k["t"]) == 0:
            continue
        stem = f"{symbol}_h{h}"
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, name, y, col in ((axes[0], "high", k["y_high"], 1), (axes[1], "low", k["y_low"], 4)):
            ax.scatter(k["pred"][:, col], y, s=2, alpha=0.3)
            lim = [np.nanpercentile(y, 0.5), np.nanpercentile(y, 99.5)]
            ax.plot(lim, lim, "k--", lw=1)
            ax.set(title=f"{symbol} h={h}: {name} (median) vs actual", xlabel="predicted", ylabel="actual")
        t = pd.to_datetime(k["t"], unit="ms")
        inside_h = (k["y_high"] >= k["pred"][:, 0]) & (k["y_high"] <= k["pred"][:, 2])
        inside_l = (k["y_low"] >= k["pred"][:, 3]) & (k["y_low"] <= k["pred"][:, 5])
        win = max(1, min(2016, len(t) // 20))  # about a week of 5-minute rows
        axes[2].plot(t, pd.Series(inside_h.astype(float)).rolling(win).mean(), label="high")
        axes[2].plot(t, pd.Series(inside_l.astype(float)).rolling(win).mean(), label="low")
        axes[2].axhline(0.8, color="k", ls="--", lw=1)
        axes[2].set(title=f"10-90% interval coverage (rolling {win} rows)", ylim=(0, 1))
        axes[2].legend()
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_range.png", dpi=80)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 5))
        curve = reliability_curve(k["conf"], k["correct"])
        ax.plot([c["confidence"] for c in curve], [c["accuracy"] for c in curve], "o-")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=f"{symbol} h={h}: reliability (calibrated confidence)", xlabel="confidence", ylabel="accuracy")
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_reliability.png", dpi=80)
        plt.close(fig)
        conditional_coverage_plot(out_dir / f"{stem}_coverage.png", k["row"], f"{symbol} h={h}")
        lines += ["", f"## {symbol}, horizon {h}", "", f"![range]({stem}_range.png)", "",
                  f"![coverage]({stem}_coverage.png)", "", f"![reliability]({stem}_reliability.png)"]
    # Feature importance (gain) of the shortest horizon's boosters.
    h = min(ensemble.horizons)
    fig, axes = plt.subplots(1, 3, figsize=(16, 6))
    for ax, (model, name) in zip(axes, (("range_predictor", f"high_h{h}"), ("tpsl_classifier", f"tp_long_h{h}"),
                                        ("signal_classifier", f"signal_h{h}"))):
        booster = ensemble.models[model].boosters.get(name)
        if booster is None:
            continue
        score = booster.get_score(importance_type="gain")
        names = ensemble.columns
        top = sorted(((v, names[int(k[1:])] if k.startswith("f") and k[1:].isdigit() else k)
                      for k, v in score.items()), reverse=True)[:15]
        ax.barh([n for _, n in top][::-1], [v for v, _ in top][::-1])
        ax.set(title=f"{model} {name}: gain")
    fig.tight_layout()
    fig.savefig(out_dir / "feature_importance.png", dpi=80)
    plt.close(fig)
    lines += ["", "## Feature importance", "", "![importance](feature_importance.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=None, help="registry folder (default: Settings.models_dir)")
    p.add_argument("--candles", nargs="+", required=True, help="SYMBOL_5m.parquet files or SYMBOL=path")
    p.add_argument("--start", default=None, help="score rows from this UTC date on (earlier candles warm up)")
    p.add_argument("--json", action="store_true", help='print exactly {"rows": [...]}')
    p.add_argument("--report", type=Path, default=None, help="also write report.md and PNG plots here")
    args = p.parse_args(argv)
    setup_logging()
    settings = get_settings()
    try:
        if args.report:
            require("matplotlib", "report", "--report")
        ensemble = Ensemble.load(args.models or settings.models_dir, settings)
        candles = load_histories(parse_candle_args(args.candles))
        kept: dict | None = {} if args.report else None
        rows = evaluate(ensemble, candles, settings, to_ms(args.start), kept)
        if args.report:
            path = write_report(args.report, rows, kept or {}, ensemble)
            print(f"report: {path}", file=sys.stderr)
    except MLEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"rows": rows}))
    else:
        for r in rows:
            print(f"{r['symbol']:<9} h={r['horizon']:<3} n={r['n']:<7} R² high {r['r2_high']} low {r['r2_low']} | "
                  f"MAE high {r['mae_high']} (mean {r['mean_mae_high']}, vol {r['vol_mae_high']}) "
                  f"low {r['mae_low']} (mean {r['mean_mae_low']}, vol {r['vol_mae_low']}) | "
                  f"cov {r['coverage_high']}/{r['coverage_low']} | AUC {r['tpsl_auc_long']}/{r['tpsl_auc_short']} | "
                  f"acc {r['signal_accuracy']} F1 {r['signal_macro_f1']} ECE {r['confidence_ece']} | "
                  f"HAR R² {r['har_r2_high']}/{r['har_r2_low']} MAE {r['har_mae_high']}/{r['har_mae_low']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
