"""``python -m training.backtest.seed_claim``: one strategy under looser definitions than the engine's.

The seed platform claimed "+176.71R with aggressive_filter" without saying how it counted. This
prints the strategy's result under the engine's definitions and with each loosening a backtest can
quietly make: no costs, every signal counted as a trade (overlapping positions, no one-position
rule), both — on any period, so an in-sample period (one the models were trained on) can be put
beside an out-of-sample one (docs/backtests.md "The seed's +176.71 R").

    python -m training.backtest.seed_claim --models M --candles BTCUSDT_5m.parquet ETHUSDT_5m.parquet \\
        --start 2025-01-01 [--end 2025-07-01] [--strategy aggressive_filter]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping, Sequence

import pandas as pd

from configs.settings import load_settings
from training.backtest.strategy import load_strategies
from features.batch import build_features
from features.costs import Costs
from training.backtest.simulate import simulate
from training.backtest.strategy import select_signals

VARIANTS = (("engine", True, True), ("no_costs", False, True), ("every_signal", True, False),
            ("every_signal_no_costs", False, False))


def variants(candles: Mapping[str, pd.DataFrame], chosen: pd.DataFrame, costs: Costs) -> dict[str, Any]:
    """The strategy's selected signals simulated under each of :data:`VARIANTS` (costs?, one position?)."""
    out: dict[str, Any] = {"signals": int(len(chosen))}
    for name, with_costs, one in VARIANTS:
        t = simulate(candles, chosen, costs if with_costs else Costs(0.0, 0.0), one_position=one)
        n = len(t)
        out[name] = {"trades": n, "total_r": round(float(t.r.sum()), 2),
                     "avg_r": round(float(t.r.mean()), 4) if n else None,
                     "win_rate": round(float((t.r > 0).mean()), 4) if n else None,
                     "tp_rate": round(float((t.outcome == "tp").mean()), 4) if n else None,
                     "avg_gross_r": round(float(t.gross_r.mean()), 4) if n else None}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from training.backtest.cli import backtest_costs
    from training.backtest.signals import signal_table
    from training.data import load_histories, parse_candle_args, to_ms
    from inference.ensemble import Ensemble

    p = argparse.ArgumentParser(prog="python -m training.backtest.seed_claim", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True)
    p.add_argument("--candles", nargs="+", required=True)
    p.add_argument("--start", required=True)
    p.add_argument("--end", default=None)
    p.add_argument("--strategy", default="aggressive_filter")
    p.add_argument("--fee-profile", default=None)
    args = p.parse_args(argv)
    settings = load_settings()
    strat = load_strategies(settings=settings)[args.strategy]
    costs = backtest_costs(argparse.Namespace(fee_profile=args.fee_profile, fee_bps=None, slippage_bps=None), settings)
    candles = load_histories(parse_candle_args(args.candles))
    features = {s: build_features(c, settings.features) for s, c in candles.items()}
    table = signal_table(Ensemble.load(args.models, settings), candles, features, [strat.horizon], to_ms(args.start),
                         to_ms(args.end), list(strat.feature_columns), strategies={args.strategy: strat})
    out = {"strategy": args.strategy, "start": args.start, "end": args.end, "fee_profile": costs.profile,
           **variants(candles, select_signals(table.signals, strat), costs)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
