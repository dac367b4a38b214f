"""Backtest throughput on the whole shared history of both symbols: candles/s, with baselines.

The candles default to ``../shared/data`` beside the checkout, else the shipped 30-day sample
(``data/sample``), so the command runs on a fresh clone too (smaller figures: compare ratios).

    .venv/bin/python bench/backtest.py [--models models] [--candles F ...] [--naive-slice 20000]

Times the stages of ``python -m training.backtest`` (load, features, batch forecasts through
``Ensemble.forecast_columns``, every strategy's selection + numpy trade walk, and the random-entry
baseline) over every candle of the given files, and prints candles/s. Baselines measured in the
same run, on the same machine state:

* ``naive loop``: a per-candle Python loop over a slice of candles (flat? signal? then walk the
  barriers of that one trade with ``first_touch``), extrapolated to the whole history. Its trades
  must equal the vectorised simulator's on the slice (printed as ``agree``).
* ``per-row forecast``: ``Ensemble.forecast`` one row at a time (what a naive replay of the serving
  call would do) over a small slice, extrapolated.
* ``features alone``: the feature build, the floor any backtest of these models pays.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path: put the repository root there instead, so
# the project packages import without an install.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from configs.settings import get_settings  # noqa: E402
from training.backtest.strategy import load_strategies  # noqa: E402
from features.batch import build_features  # noqa: E402
from features.labels import EXPIRED, SL, TP, first_touch  # noqa: E402
from training.backtest.engine import run_strategies  # noqa: E402
from training.backtest.signals import signal_table  # noqa: E402
from training.backtest.simulate import Costs, simulate  # noqa: E402
from training.backtest.strategy import select_signals  # noqa: E402
from training.data import load_histories, parse_candle_args  # noqa: E402
from inference.ensemble import Ensemble  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "data" / "sample"


def default_candles() -> list[str]:
    """The shared history when this machine has it, else the shipped sample."""
    folder = SHARED if all((SHARED / f"{s}_5m.parquet").exists() for s in ("BTCUSDT", "ETHUSDT")) else SAMPLE
    return [str(folder / f"{s}_5m.parquet") for s in ("BTCUSDT", "ETHUSDT")]


def naive_loop(c: pd.DataFrame, signals: pd.DataFrame, costs: Costs) -> list[tuple[int, int, float]]:
    """Per-candle Python loop (the baseline): returns (entry_time, exit_time, r) per trade."""
    t = c["open_time"].to_numpy(np.int64)
    o, h, lo, cl = (c[k].to_numpy(np.float64) for k in ("open", "high", "low", "close"))
    by_time = {}
    for row in signals.sort_values("confidence", ascending=False, kind="stable").itertuples():
        by_time.setdefault(int(row.open_time), row)
    out = []
    busy_until = -1
    for i in range(len(t) - 1):
        if i < busy_until or t[i] not in by_time:
            continue
        if t[i + 1] - t[i] != 300_000:
            continue
        s = by_time[t[i]]
        e = i + 1
        n = 0
        while n < s.horizon and e + n < len(t) and t[e + n] - t[e] == n * 300_000:
            n += 1
        entry = o[e]
        tp = entry * (1 + s.side * s.tp_frac)
        sl = entry * (1 - s.side * s.sl_frac)
        pad = s.horizon - n
        hw = np.concatenate([h[e:e + n], np.full(pad, -np.inf)])[None, :]
        lw = np.concatenate([lo[e:e + n], np.full(pad, np.inf)])[None, :]
        res, bars = first_touch(hw, lw, np.array([tp]), np.array([sl]), "long" if s.side == 1 else "short")
        res, bars = int(res[0]), int(bars[0]) if res[0] != EXPIRED else n
        x = e + bars - 1
        px = tp if res == TP else (min(sl, o[x]) if s.side == 1 else max(sl, o[x])) if res == SL else cl[x]
        ef, xf = entry * (1 + s.side * costs.slippage), px * (1 - s.side * costs.slippage)
        pnl = s.side * (xf - ef) - costs.fee * (ef + xf)
        out.append((int(t[e]), int(t[x]), pnl / (entry * s.sl_frac)))
        busy_until = x
    return out


def crafted_signals(c: pd.DataFrame, horizon: int, every: int = 7, seed: int = 0) -> pd.DataFrame:
    """Entries on every ``every``-th candle with a seeded random side and barriers of 1.2 / 0.8 x the
    slice's median candle range x sqrt(h): for the naive-vs-vectorised check when the models abstain
    (a check over zero trades would prove nothing)."""
    rng = np.random.default_rng(seed)
    t = c["open_time"].to_numpy(np.int64)[::every]
    scale = float(np.median((c["high"] - c["low"]) / c["close"])) * np.sqrt(horizon)
    return pd.DataFrame({"open_time": t, "symbol": c.attrs.get("symbol", ""), "side": rng.choice([-1, 1], len(t)),
                         "confidence": rng.random(len(t)), "tp_frac": 1.2 * scale, "sl_frac": 0.8 * scale,
                         "horizon": horizon})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=None)
    p.add_argument("--candles", nargs="+", default=None,
                   help="candle files (default: ../shared/data, else the shipped sample)")
    p.add_argument("--naive-slice", type=int, default=20_000, help="candles per symbol for the naive loop")
    p.add_argument("--row-slice", type=int, default=500, help="rows for the per-row forecast baseline")
    p.add_argument("--random-seeds", type=int, default=20)
    p.add_argument("--breakdown-rows", type=int, default=100_000, help="rows for the forecast time breakdown")
    args = p.parse_args()
    args.candles = args.candles or default_candles()
    print(f"candles: {', '.join(args.candles)}")
    settings = get_settings()
    strategies = load_strategies(settings=settings)
    horizons = sorted({s.horizon for s in strategies.values()})
    cols = sorted({c for s in strategies.values() for c in s.feature_columns})
    costs = Costs()
    ens = Ensemble.load(args.models or settings.models_dir, settings)

    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def stage(name: str, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        timings[name], cpu[name] = time.perf_counter() - w0, time.process_time() - c0
        return out

    candles = stage("load", lambda: load_histories(parse_candle_args(args.candles)))
    n = sum(len(c) for c in candles.values())
    feats = stage("features", lambda: {s: build_features(c, settings.features) for s, c in candles.items()})
    table = stage("forecast", lambda: signal_table(ens, candles, feats, horizons, None, None, cols,
                                                   strategies=strategies))
    body0, _ = stage("strategies+simulate", lambda: run_strategies(strategies, candles, table, costs, None, None,
                                                                   random_seeds=0))
    stage(f"random baseline ({args.random_seeds} seeds)",
          lambda: run_strategies(strategies, candles, table, costs, None, None, random_seeds=args.random_seeds))
    main_stages = ("load", "features", "forecast", "strategies+simulate")
    backtest = sum(timings[k] for k in main_stages)
    backtest_cpu = sum(cpu[k] for k in main_stages)

    # Baseline 1: per-candle Python loop over a slice of each symbol, all_signals (densest) strategy.
    strat = strategies["all_signals"]
    naive_s, vec_s, agree, sliced, crafted, checked = 0.0, 0.0, True, 0, False, 0
    for s, c in candles.items():
        sl = c.iloc[len(c) // 2: len(c) // 2 + args.naive_slice].reset_index(drop=True)
        sliced += len(sl)
        sig = select_signals(table.signals, strat)
        sig = sig[(sig.symbol == s) & sig.open_time.isin(sl.open_time)]
        if sig.empty:
            sig, crafted = crafted_signals(sl, strat.horizon).assign(symbol=s), True
        t0 = time.perf_counter()
        ref = naive_loop(sl, sig, costs)
        naive_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        vec = simulate({s: sl}, sig, costs)
        vec_s += time.perf_counter() - t0
        mine = list(zip(vec.entry_time.astype(int), vec.exit_time.astype(int), vec.r))
        checked += len(ref)
        agree &= len(mine) == len(ref) and all(a[:2] == b[:2] and abs(a[2] - b[2]) < 1e-9 for a, b in zip(mine, ref))
    naive_full = naive_s * n / sliced

    # Baseline 2: Ensemble.forecast one row at a time.
    s0 = next(iter(candles))
    F = feats[s0].to_numpy()
    rows = np.flatnonzero(np.isfinite(F).all(axis=1))[: args.row_slice]
    c0 = candles[s0]
    t0 = time.perf_counter()
    for i in rows:
        ens.forecast(F[i:i + 1], [s0], c0.close.to_numpy()[i:i + 1], c0.open_time.to_numpy()[i:i + 1], horizons[0])
    per_row = (time.perf_counter() - t0) / len(rows)
    per_row_full = per_row * n * len(horizons)

    # Where the batch forecast's time goes (one slice, CPU seconds): model stages, then the columns the
    # backtest reads (compose_columns + frame) beside the object path (compose + forecasts_to_frame).
    from training.backtest.signals import forecasts_to_frame

    rows = np.flatnonzero(np.isfinite(F).all(axis=1))[: args.breakdown_rows]
    X, syms, cl, tt = F[rows], [s0] * len(rows), c0.close.to_numpy()[rows], c0.open_time.to_numpy()[rows]
    c_0 = time.process_time()
    outs = ens.predict_arrays(X, syms, horizons[0])
    c_1 = time.process_time()
    fcs = ens.compose(X, syms, cl, tt, horizons[0], outs)
    c_2 = time.process_time()
    forecasts_to_frame(fcs)
    c_3 = time.process_time()
    ens.compose_columns(X, syms, cl, tt, horizons[0], outs)
    c_4 = time.process_time()
    split = {"predict_arrays (xgboost stages)": c_1 - c_0, "compose (Forecast objects)": c_2 - c_1,
             "forecasts_to_frame": c_3 - c_2}
    columns_s = c_4 - c_3

    print(f"backtest bench: {n:,} candles ({', '.join(f'{s} {len(c):,}' for s, c in candles.items())}), "
          f"{len(strategies)} strategies, horizons {horizons}, models {ens.versions['meta_model']}")
    rows_forecast = {h: sum(v.values()) for h, v in table.counts.items()}
    print(f"  rows forecast per horizon: {rows_forecast}")
    print(f"  {'stage':38s} {'wall':>8s}   {'cpu (all threads)':>17s}")
    for k, v in timings.items():
        print(f"  {k:38s} {v:8.2f} s {cpu[k]:10.2f} s")
    print(f"  {'backtest total (load..simulate)':38s} {backtest:8.2f} s {backtest_cpu:10.2f} s   "
          f"{n / backtest:,.0f} candles/s wall, {n / backtest_cpu:,.0f} candles/cpu-s   "
          f"goal < 10 s: {'met' if backtest < 10 else 'NOT met'}")
    trades = {k: v["metrics"]["trades"] for k, v in body0["strategies"].items()}
    print("  trades: " + ", ".join(f"{k} {v}" for k, v in trades.items())
          + ("  (the models abstain everywhere: strategies+simulate walked no trade; the naive-loop check "
             "below uses crafted entries)" if not any(trades.values()) else ""))
    print("baselines (same run):")
    print(f"  features alone                         {timings['features']:8.2f} s   {n / timings['features']:12,.0f} candles/s"
          f"   backtest / features = {backtest / timings['features']:.2f}x wall, "
          f"{backtest_cpu / cpu['features']:.2f}x cpu")
    print(f"  naive per-candle loop, {sliced:,} candles: {naive_s:6.2f} s (vectorised on the same slice "
          f"{vec_s:.3f} s, {naive_s / vec_s:.0f}x), agree: {agree} over {checked:,} trades"
          + (" (crafted entries: the models emit no signal on the slice)" if crafted else ""))
    print(f"  naive loop extrapolated to {n:,}       {naive_full:8.1f} s   {n / naive_full:12,.0f} candles/s"
          f"   vectorised simulate is {naive_full / (timings['strategies+simulate'] / len(strategies)):.0f}x faster per strategy")
    print(f"  per-row Ensemble.forecast, extrapolated {per_row_full:8.1f} s   ({per_row * 1e3:.2f} ms/row; batch forecast "
          f"{per_row_full / timings['forecast']:.0f}x faster)")
    print(f"forecast breakdown, {len(rows):,} rows at h={horizons[0]} (cpu s, all threads): "
          + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
          + f"  -> objects+frame are {(split['compose (Forecast objects)'] + split['forecasts_to_frame']) / sum(split.values()):.0%}")
    objects_s = split["compose (Forecast objects)"] + split["forecasts_to_frame"]
    print(f"  the backtest's path, compose_columns: {columns_s:.3f} cpu s "
          f"({objects_s / max(columns_s, 1e-3):.0f}x less than Forecast objects + forecasts_to_frame; same frame, "
          "tests/test_training.py)")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
