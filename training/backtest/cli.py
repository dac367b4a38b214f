"""``python -m training.backtest``: would these signals have made money — out of sample, after costs?

    python -m training.backtest --models models --candles BTCUSDT_5m.parquet ETHUSDT_5m.parquet \\
        --start 2025-01-01 [--strategy aggressive_filter] [--fee-profile spot_taker] [--fee-bps 7.5] \\
        [--slippage-bps 2] --json \\
        [--report reports/bt] [--walk-forward]

Signals come from ``inference.ensemble.Ensemble.forecast`` (the code serving runs). Without
``--strategy`` every strategy of ``configs/strategies.yaml`` is run on the same forecasts. The
JSON says whether the period is out of sample for the models (their training data end is read
from their metadata); a warning goes to stderr when it is not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from features.costs import profile_costs
from configs.settings import Settings, load_settings
from configs.strategies import Strategy
from training.backtest.strategy import load_strategies
from features.batch import build_features
from features.candles import FIVE_MINUTES_MS
from configs.errors import ConfigError, MLEngineError
from training.backtest.engine import run_strategies
from training.backtest.signals import count_rows_to_forecast, signal_table
from training.backtest.simulate import Costs
from training.backtest.walkforward import make_periods, plain_engine_fit, trained_until, walk_forward_table
from training.data import load_histories, parse_candle_args, to_ms
from training.extras import require


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.backtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=None, help="model registry (default: Settings.models_dir)")
    p.add_argument("--candles", nargs="+", required=True,
                   help="candle files SYMBOL_5m.parquet (symbol = name up to the first _) or SYMBOL=path")
    p.add_argument("--start", default=None, help="first traded candle, UTC date (e.g. 2025-01-01); default: all")
    p.add_argument("--end", default=None, help="trade candles opening before this UTC date; default: to the end")
    p.add_argument("--strategy", action="append", default=None,
                   help="strategy name from configs/strategies.yaml (repeatable); default: all of them")
    p.add_argument("--strategies-file", type=Path, default=None, help="another strategies YAML file")
    p.add_argument("--fee-profile", default=None,
                   help="fee profile of configs/fees.yaml: spot_taker, spot_maker, futures_taker, futures_maker "
                        "(default: Settings.fee_profile with its MLE_FEE_RATE/... overrides)")
    p.add_argument("--fee-bps", type=float, default=None,
                   help="fee per fill, basis points of notional (default: the fee profile's; spot_taker 7.5)")
    p.add_argument("--slippage-bps", type=float, default=None,
                   help="slippage per fill, basis points (default: the fee profile's; spot_taker 2)")
    p.add_argument("--random-seeds", type=int, default=100, help="seeds of the random-entry baseline (100)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the random-entry baseline")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("--report", type=Path, default=None, help="write report.md, PNG plots, trades CSVs here")
    p.add_argument("--walk-forward", action="store_true",
                   help="refit models on an expanding window; each period traded by models that never saw it")
    p.add_argument("--wf-months", type=int, default=3, help="walk-forward period length in months (3)")
    p.add_argument("--wf-dir", type=Path, default=None, help="where walk-forward models go (default: a temp dir)")
    p.add_argument("--wf-rounds", type=int, default=None, help="walk-forward fits: override models.num_boost_round")
    p.add_argument("--wf-folds", type=int, default=None, help="walk-forward fits: override models.walk_forward_folds")
    return p.parse_args(argv)


def _iso(ms: int | None) -> str | None:
    return None if ms is None else pd.Timestamp(ms, unit="ms", tz="UTC").isoformat()


def _pick_strategies(args: argparse.Namespace, settings: Settings) -> dict[str, Strategy]:
    all_s = load_strategies(args.strategies_file, settings)
    if not args.strategy:
        return all_s
    unknown = [s for s in args.strategy if s not in all_s]
    if unknown:
        raise ConfigError(f"unknown strategy {unknown[0]!r}; configs/strategies.yaml has {sorted(all_s)}")
    return {s: all_s[s] for s in dict.fromkeys(args.strategy)}


def backtest_costs(args: argparse.Namespace, settings: Settings) -> Costs:
    """Costs of this run: ``--fee-profile`` as configs/fees.yaml defines it (else Settings' profile with its
    overrides), then ``--fee-bps``/``--slippage-bps`` on top (the most explicit choice wins)."""
    if args.fee_profile is not None:
        try:
            costs = profile_costs(args.fee_profile, settings.config_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    else:
        costs = Costs.from_settings(settings)
    changes = {k: v for k, v in (("fee_bps", args.fee_bps), ("slippage_bps", args.slippage_bps)) if v is not None}
    return replace(costs, **changes) if changes else costs


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False, disable=not sys.stderr.isatty())


def run(args: argparse.Namespace, settings: Settings | None = None) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """The whole backtest as data: ``(json_result, trades_by_strategy)``."""
    settings = settings or load_settings()
    t0 = time.perf_counter()
    strategies = _pick_strategies(args, settings)
    costs = backtest_costs(args, settings)
    start_ms, end_ms = to_ms(args.start), to_ms(args.end)
    candles = load_histories(parse_candle_args(args.candles))
    horizons = sorted({s.horizon for s in strategies.values()})
    feature_columns = list(dict.fromkeys(c for s in strategies.values() for c in s.feature_columns))
    features = {s: build_features(c, settings.features) for s, c in candles.items()}
    n_forecasts = count_rows_to_forecast(candles, features, horizons, start_ms, end_ms, strategies)
    models_dir = args.models or settings.models_dir
    config: dict[str, Any] = {"models": str(models_dir), "candles": list(args.candles), "symbols": sorted(candles),
                              "start": args.start, "end": args.end, "fee_bps": costs.fee_bps,
                              "slippage_bps": costs.slippage_bps, "fee_profile": costs.profile,
                              "borrow_rate_annual": costs.borrow_rate_annual, "random_seeds": args.random_seeds,
                              "seed": args.seed, "walk_forward": bool(args.walk_forward),
                              "strategies": list(strategies)}
    wf_info = None
    with _progress(n_forecasts, "forecast") as bar:
        if args.walk_forward:
            if start_ms is None:
                raise ConfigError("--walk-forward needs --start (models are fitted on the data before it)")
            last = max(int(c["open_time"].iloc[-1]) for c in candles.values()) + FIVE_MINUTES_MS
            embargo = max(settings.market.horizons)
            periods = make_periods(start_ms, end_ms or last, pd.DateOffset(months=args.wf_months), embargo)
            work = args.wf_dir or Path(tempfile.mkdtemp(prefix="mle-walkforward-"))
            fit = plain_engine_fit(parse_candle_args(args.candles), settings, work, rounds=args.wf_rounds or None,
                                   folds=args.wf_folds or None)
            table, wf_info = walk_forward_table(candles, features, fit, periods, horizons, embargo,
                                                feature_columns, bar, strategies)
            config["walk_forward_dir"] = str(work)
            out_of_sample = True  # check_unseen has verified every row
        else:
            from inference.ensemble import Ensemble

            ensemble = Ensemble.load(models_dir, settings)
            unknown = sorted(set(candles) - set(ensemble.symbols))
            if unknown:
                raise ConfigError(f"the models know {list(ensemble.symbols)}, not {unknown}")
            config["model_versions"] = ensemble.versions
            last_trained = trained_until(ensemble.metadata)
            config["models_trained_until"] = _iso(last_trained)
            first = start_ms if start_ms is not None else min(int(c["open_time"].iloc[0]) for c in candles.values())
            out_of_sample = last_trained is not None and last_trained < first
            if not out_of_sample:
                print(f"warning: the models were trained on data up to {_iso(last_trained) or 'an unknown date'}; "
                      f"a backtest from {_iso(first)} is NOT out of sample", file=sys.stderr)
            table = signal_table(ensemble, candles, features, horizons, start_ms, end_ms, feature_columns, bar,
                                 strategies=strategies)
    n_random = args.random_seeds * len(strategies)
    with _progress(n_random, "random entries") as bar:
        body, runs = run_strategies(strategies, candles, table, costs, start_ms, end_ms, args.random_seeds,
                                    args.seed, bar)
    result = {"config": config, "out_of_sample": out_of_sample, **body}
    if wf_info is not None:
        result["walk_forward"] = wf_info
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return result, {name: r.trades for name, r in runs.items()}


def _text(result: dict[str, Any]) -> str:
    lines = [f"backtest {result['config']['start'] or 'all'} .. {result['config']['end'] or 'end'}"
             f" ({'out of sample' if result['out_of_sample'] else 'NOT out of sample'}), "
             f"buy-and-hold {result['buy_and_hold']['return_pct']} %"]
    for name, s in result["strategies"].items():
        m, rnd = s["metrics"], s["random_entry"]
        rt = (rnd.get("total_r") or {})
        lines.append(f"  {name:18s} trades {m['trades']:6d}  win {m['win_rate']}  avg R {m['avg_r']}  "
                     f"total R {m['total_r']}  PF {m['profit_factor']}  maxDD {m['max_drawdown_r']} R  "
                     f"| random total R {rt.get('mean')} ± {rt.get('std')}  beats {rnd.get('strategy_beats_share')}")
        fo = (s.get("baselines") or {}).get("filter_only") or {}
        pf = s.get("portfolio") or {}
        lines.append(f"  {'':18s} filter-only total R {(fo.get('total_r') or {}).get('mean')} ± "
                     f"{(fo.get('total_r') or {}).get('std')} (strategy {fo.get('strategy_sd_above')} sd above)  "
                     f"Sharpe/day {pf.get('sharpe_daily')} {pf.get('sharpe_daily_ci')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.walk_forward and argv is None:  # a real command line; fits take minutes: log them to stderr
        from training.progress import setup_logging

        setup_logging()
    try:
        if args.report is not None:
            require("matplotlib", "report", "--report")
        result, trades = run(args)
    except (MLEngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report is not None:
        from training.backtest.report import write_report

        path = write_report(result, trades, args.report)
        print(f"report: {path}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else _text(result))
    return 0
