"""Feature benchmark: batch build over the whole history, incremental latency per new candle.

Prints, for the shared history of both symbols (or the shipped sample when it is absent):
- the batch build time (goal: under 2 s per 200k candles) beside a baseline measured in the same
  run: recomputing the batch path on a WARMUP-candle window for every candle, extrapolated;
- FeatureBuilder latency per new candle, p50/p99 in µs (goal: under 1 ms), beside the baseline of
  the batch path (``build_features``, DataFrame in and out) recomputed on the last WARMUP candles.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features import WARMUP, FeatureBuilder, build_features, load_candles  # noqa: E402

SYMBOLS = ("BTCUSDT", "ETHUSDT")


def candle_file(symbol: str) -> Path:
    shared = ROOT.parent / "shared" / "data" / f"{symbol}_5m.parquet"
    return shared if shared.exists() else ROOT / "data" / "sample" / f"{symbol}_5m.parquet"


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--updates", type=int, default=2000, help="incremental updates per symbol")
    ap.add_argument("--baseline-updates", type=int, default=200, help="batch-on-window recomputations per symbol")
    args = ap.parse_args()

    candles = {s: load_candles(candle_file(s)) for s in SYMBOLS}
    total = sum(len(df) for df in candles.values())
    print(f"data: {', '.join(f'{s} {len(df):,}' for s, df in candles.items())} candles ({candle_file(SYMBOLS[0]).parent})")

    # Batch path over the whole history.
    build_features(candles[SYMBOLS[0]].iloc[:5000])  # warm imports and caches
    t0 = time.perf_counter()
    for df in candles.values():
        build_features(df)
    batch_s = time.perf_counter() - t0
    per_200k = batch_s / total * 200_000

    # Incremental path: replay the last candles one at a time after a warm-up window.
    inc: list[float] = []
    base: list[float] = []
    for s, df in candles.items():
        n_up = min(args.updates, len(df) - WARMUP)
        start = len(df) - n_up
        fb = FeatureBuilder()
        fb.extend(s, df.iloc[start - WARMUP:start])
        rows = df[["open_time", "open", "high", "low", "close", "volume"]].to_numpy()[start:]
        for r in rows:
            t = time.perf_counter()
            fb.update(s, int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5]))
            inc.append(time.perf_counter() - t)
        # Baseline: the batch path recomputed on the last WARMUP candles for each new candle.
        for i in range(len(df) - args.baseline_updates, len(df)):
            t = time.perf_counter()
            build_features(df.iloc[i - WARMUP + 1:i + 1]).iloc[-1]
            base.append(time.perf_counter() - t)

    inc_p50, inc_p99 = percentiles(inc)
    base_p50, base_p99 = percentiles(base)
    naive_batch_s = base_p50 * 1e-6 * total
    print()
    print(f"{'measure':<46}{'value':>14}{'baseline':>14}{'ratio':>10}")
    print(f"{'batch build, whole history (s)':<46}{batch_s:>14.2f}{naive_batch_s:>14.1f}{naive_batch_s / batch_s:>9.0f}x")
    print(f"{'batch build per 200k candles (s), goal < 2':<46}{per_200k:>14.2f}")
    print(f"{'batch throughput (candles/s)':<46}{total / batch_s:>14,.0f}")
    print(f"{'incremental update p50 (µs), goal < 1000':<46}{inc_p50:>14.0f}{base_p50:>14.0f}{base_p50 / inc_p50:>9.1f}x")
    print(f"{'incremental update p99 (µs), goal < 1000':<46}{inc_p99:>14.0f}{base_p99:>14.0f}{base_p99 / inc_p99:>9.1f}x")
    print(f"\nbaseline: batch: build_features on a {WARMUP}-candle window per candle, extrapolated to the history;")
    print(f"incremental: build_features on the last {WARMUP} candles per new candle ({len(base)} samples);")
    print(f"incremental samples: {len(inc)} updates over {len(candles)} symbols")


if __name__ == "__main__":
    main()
