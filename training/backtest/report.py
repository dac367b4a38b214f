"""Markdown report with PNG plots (matplotlib, headless): what people look at after a backtest.

Per strategy: equity curve in R with its drawdown, the distribution of per-trade R, the monthly
table, and confidence against the realised take-profit rate. A summary table puts every strategy
beside its random-entry baseline and buy-and-hold, so an edge that is only geometry shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from training.backtest.trade_stats import drawdown_curve  # noqa: E402

REPORT_FILE = "report.md"


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _equity_png(trades: pd.DataFrame, path: Path, title: str) -> None:
    t = trades.sort_values("exit_time", kind="stable")
    when = pd.to_datetime(t["exit_time"].astype(np.int64), unit="ms", utc=True)
    equity, dd = drawdown_curve(t["r"].to_numpy(np.float64))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax1.plot(when, equity, lw=1.2, color="tab:blue")
    ax1.axhline(0, color="grey", lw=0.6)
    ax1.set_ylabel("cumulative R (after costs)")
    ax1.set_title(title)
    ax2.fill_between(when, dd, 0, color="tab:red", alpha=0.5, step="post")
    ax2.set_ylabel("drawdown (R)")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _r_hist_png(trades: pd.DataFrame, path: Path, title: str) -> None:
    r = trades["r"].to_numpy(np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(r, bins=min(60, max(10, len(r) // 5)), color="tab:blue", alpha=0.8)
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(r.mean(), color="tab:orange", lw=1.2, label=f"mean {r.mean():.3f} R")
    ax.set_xlabel("R per trade (after costs)")
    ax.set_ylabel("trades")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _calibration_png(bins: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    x = [b["mean_confidence"] for b in bins]
    y = [b["hit_rate"] for b in bins]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    ax.plot(x, y, marker="o", color="tab:blue", label="take-profit hit rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean of bin)")
    ax.set_ylabel("realised take-profit rate")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _mean_sd(b: Mapping[str, Any] | None) -> str:
    t = (b or {}).get("total_r") or {}
    if not t:
        return "–"
    return f"{_fmt(t.get('mean'), 1)} ± {_fmt(t.get('std'), 1)} ({_fmt((b or {}).get('strategy_sd_above'), 1)} sd)"


def _baselines_table(result: Mapping[str, Any]) -> list[str]:
    """Total R against the baselines that isolate the model, and the portfolio's per-day Sharpe."""
    lines = ["Baselines that isolate the model: random entries among the candles passing the strategy's filters "
             "on the same side (filter-only), always-long / always-short at random candles with the same "
             "barriers; `(x sd)` is how far the strategy's total R lies above the baseline's mean. Portfolio: "
             "positions marked to market per 5-minute step (simultaneous symbols together), per-day Sharpe "
             "with a moving-block bootstrap interval.", "",
             "| strategy | total R | filter-only total R | always-long | always-short | beats buy-and-hold "
             "| Sharpe/day [interval] | Sharpe/day if trades were independent |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in result.get("strategies", {}).items():
        b, pf = s.get("baselines") or {}, s.get("portfolio") or {}
        ci = pf.get("sharpe_daily_ci") or [None, None]
        lines.append(f"| {name} | {_fmt(s['metrics']['total_r'], 1)} | {_mean_sd(b.get('filter_only'))} "
                     f"| {_mean_sd(b.get('always_long'))} | {_mean_sd(b.get('always_short'))} "
                     f"| {_fmt((b.get('buy_and_hold') or {}).get('strategy_beats'))} "
                     f"| {_fmt(pf.get('sharpe_daily'))} [{_fmt(ci[0])}, {_fmt(ci[1])}] "
                     f"| {_fmt(pf.get('sharpe_daily_if_independent'))} |")
    return lines + [""]


def _class_calibration_table(result: Mapping[str, Any]) -> list[str]:
    """Per-class ECE (equal-mass bins) and direction AUC: every signal per horizon, and each strategy's trades."""
    rows = [(f"all signals, h = {h}", c) for h, c in (result.get("calibration_by_horizon") or {}).items()]
    rows += [(name, s.get("calibration_by_class") or {}) for name, s in result.get("strategies", {}).items()]
    if not rows:
        return []
    lines = ["Calibration per class (10 equal-mass bins; each probability against the event it states) and the "
             "direction AUC of p_tp_long − p_tp_short on trades that hit a barrier.", "",
             "| rows | probability → event | BUY n | BUY ECE | SELL n | SELL ECE | direction AUC (n) |",
             "|---|---|---|---|---|---|---|"]
    for label, c in rows:
        b, sl = c.get("BUY") or {}, c.get("SELL") or {}
        lines.append(f"| {label} | {c.get('probability')} → {c.get('event')} | {_fmt(b.get('n'))} "
                     f"| {_fmt(b.get('ece'))} | {_fmt(sl.get('n'))} | {_fmt(sl.get('ece'))} "
                     f"| {_fmt(c.get('direction_auc'))} ({c.get('direction_n')}) |")
    return lines + [""]


def write_report(result: Mapping[str, Any], trades: Mapping[str, pd.DataFrame], out_dir: str | Path) -> Path:
    """Write ``report.md``, one PNG per plot, ``result.json`` and ``trades_<strategy>.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    cfg = result.get("config", {})
    bh = result.get("buy_and_hold", {})
    lines = [
        "# Backtest report", "",
        f"- period: {cfg.get('start') or 'start of data'} to {cfg.get('end') or 'end of data'} "
        f"({'walk-forward, ' if cfg.get('walk_forward') else ''}{'OUT-OF-SAMPLE' if result.get('out_of_sample') else 'NOT out-of-sample: the models saw part of this period'})",
        f"- symbols: {', '.join(cfg.get('symbols', []))}; costs per side: fee {cfg.get('fee_bps')} bps, "
        f"slippage {cfg.get('slippage_bps')} bps",
        (f"- models: one set per walk-forward period, trained by the plain engine (table at the end)"
         if result.get("walk_forward") else f"- models: {json.dumps(cfg.get('model_versions', {}))}"
         f" (trained on data up to {cfg.get('models_trained_until')})"),
        f"- buy-and-hold (equal weight, after costs): {_fmt(bh.get('return_pct'), 2)} %",
        "",
        "R is profit divided by the planned risk (entry x stop distance), after fees and slippage. The random-entry",
        "baseline trades the same geometry (sides, TP/SL distances in ATR units, horizons, trade count per symbol)",
        "at random candles; `beats` is the share of random seeds whose total R the strategy beats.", "",
        "| strategy | trades | win rate | avg R | avg R before costs | total R | profit factor | max DD (R) "
        "| Sharpe/trade | exposure | return 1x % | random total R (mean ± sd) | random avg R | random avg R before costs "
        "| beats |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result.get("strategies", {}).items():
        m, rnd = s["metrics"], s["random_entry"]
        rt = rnd.get("total_r") or {}
        ra = rnd.get("avg_r") or {}
        rg = rnd.get("avg_gross_r") or {}
        lines.append(
            f"| {name} | {m['trades']} | {_fmt(m['win_rate'])} | {_fmt(m['avg_r'])} | {_fmt(m['avg_gross_r'])} "
            f"| {_fmt(m['total_r'], 1)} "
            f"| {_fmt(m['profit_factor'])} | {_fmt(m['max_drawdown_r'], 1)} | {_fmt(m['sharpe_per_trade'])} "
            f"| {_fmt(m['exposure'])} | {_fmt(m['return_pct_1x'], 2)} | {_fmt(rt.get('mean'), 1)} ± {_fmt(rt.get('std'), 1)} "
            f"| {_fmt(ra.get('mean'))} | {_fmt(rg.get('mean'))} | {_fmt(rnd.get('strategy_beats_share'), 2)} |")
    lines.append("")
    lines += _baselines_table(result)
    lines += _class_calibration_table(result)
    for name, s in result.get("strategies", {}).items():
        tr = trades.get(name)
        lines += [f"## {name}", "", s["definition"]["description"], "",
                  f"Signals passing the filters: {s['signals']}; trades (one position per symbol): "
                  f"{s['metrics']['trades']}; exits: {json.dumps(s['metrics']['outcomes'])}.", ""]
        if tr is None or tr.empty:
            lines += ["No trades.", ""]
            continue
        tr.to_csv(out / f"trades_{name}.csv", index=False)
        files = {"equity": f"{name}_equity.png", "r_hist": f"{name}_r_hist.png",
                 "calibration": f"{name}_calibration.png"}
        _equity_png(tr, out / files["equity"], f"{name}: equity in R, drawdown")
        _r_hist_png(tr, out / files["r_hist"], f"{name}: R per trade")
        _calibration_png(s["calibration"], out / files["calibration"], f"{name}: confidence vs hit rate")
        lines += [f"![equity]({files['equity']})", "", f"![R distribution]({files['r_hist']})", "",
                  f"![calibration]({files['calibration']})", "",
                  "| month | trades | win rate | total R | avg R |", "|---|---|---|---|---|"]
        lines += [f"| {row['month']} | {row['trades']} | {_fmt(row['win_rate'])} | {_fmt(row['total_r'], 2)} "
                  f"| {_fmt(row['avg_r'])} |" for row in s["per_month"]]
        lines += ["", "| confidence | trades | TP hit rate | avg R |", "|---|---|---|---|"]
        lines += [f"| {_fmt(b['confidence_lo'])}–{_fmt(b['confidence_hi'])} | {b['trades']} | {_fmt(b['hit_rate'])} "
                  f"| {_fmt(b['avg_r'])} |" for b in s["calibration"]]
        lines.append("")
    wf = result.get("walk_forward")
    if wf:
        lines += ["## Walk-forward periods", "",
                  "| period | trades from | to | model trained on candles before | last training candle | models |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['index']} | {p['test_start']} | {p['test_end']} | {p['train_candles_before']} "
                  f"| {p.get('last_train_candle')} | {', '.join(sorted(set(p.get('model_versions', {}).values())))} |"
                  for p in wf]
        lines.append("")
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
