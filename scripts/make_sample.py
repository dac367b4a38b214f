"""Cut the shipped sample (the last 30 days of each symbol) from the shared history."""

from __future__ import annotations

import argparse
from pathlib import Path

from features.candles import load_candles

CANDLES_PER_DAY = 288


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("data/sample"))
    ap.add_argument("--days", type=int, default=30)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.source.glob("*_5m.parquet")):
        df = load_candles(path).iloc[-args.days * CANDLES_PER_DAY:]
        df.to_parquet(args.out / path.name, compression="zstd", index=False)
        print(f"{path.name}: {len(df)} candles")


if __name__ == "__main__":
    main()
