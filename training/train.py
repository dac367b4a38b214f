"""``python -m training.train``: train the four models and save them to the registry.

    python -m training.train --candles data/sample/BTCUSDT_5m.parquet data/sample/ETHUSDT_5m.parquet --out models
    python -m training.train --engine ray --num-workers 1 --candles ... --out /abs/path/models

The plain engine (default) fits everything in this process; ``--engine ray`` fans the walk-forward
fits out as Ray tasks and refits the final boosters in one ``ray.train.xgboost.XGBoostTrainer`` run
(see ``training/ray_engine.py``). Both call the same pipeline (``training/pipeline.py``) on the same
prepared rows (``training/data.py``), so they produce equivalent models.

In code, call :func:`train` (``train(settings, candles, engine) -> TrainedVersion``): the command
line, retraining, the walk-forward backtest and the tests all train through it, so none of them
rebuilds this command's argument list.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd
import xgboost as xgb

from configs.settings import Settings, get_settings
from configs.errors import ConfigError, MLEngineError
from features.indicators import feature_set_hash
from training.data import Prepared, load_histories, parse_candle_args, prepare, to_ms
from training.har_baseline import HAR_DOCUMENT, fit_har_baseline
from training.engines import Engine, PlainEngine
from training.pipeline import TrainOutput, fit_models
from training.progress import log, setup_logging
from inference.layout import BASE_MODELS, MODEL_NAMES
from inference.registry import ModelRegistry, new_version
from inference.transforms import REGIME_FEATURES, meta_columns


def code_commit() -> str:
    """The git commit of the code that trained the model ("unknown" outside a checkout, e.g. a Ray job)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def with_overrides(settings: Settings, rounds: int | None = None, folds: int | None = None,
                   max_rows: int | None = None, per_symbol: bool | None = None) -> Settings:
    """Settings with command-line overrides of the model section (validated like the YAML)."""
    update: dict[str, Any] = {}
    if rounds is not None:
        update["num_boost_round"] = rounds
    if folds is not None:
        update["walk_forward_folds"] = folds
    if max_rows is not None:
        update["max_train_rows"] = max_rows
    if per_symbol is not None:
        update["per_symbol"] = per_symbol
    if not update:
        return settings
    models = type(settings.models).model_validate({**settings.models.model_dump(), **update})
    return settings.model_copy(update={"models": models})


def save_models(out: TrainOutput, registry: ModelRegistry, settings: Settings, data_info: dict[str, Any],
                engine: str, promote: bool = True) -> str:
    """Write the four models as one version (same id for all) and promote them together."""
    version = new_version()
    common = {
        "created": datetime.now(timezone.utc).isoformat(), "engine": engine, "xgboost_version": xgb.__version__,
        "code_commit": code_commit(), "feature_set_hash": feature_set_hash(settings.features),
        "label_params": settings.labels.model_dump(), "model_config": settings.models.model_dump(), **data_info,
    }
    # Write every version first, promote afterwards: a reader never sees a mixed set for long, and a
    # failure while writing leaves the previous set current.
    for name in MODEL_NAMES:
        meta = {**common, **out.metadata[name]}
        if name == "meta_model":
            meta.update(base_versions={m: version for m in BASE_MODELS}, meta_columns=list(meta_columns()),
                        regime_features=list(REGIME_FEATURES))
        registry.save(name, version, out.boosters[name], meta, out.documents.get(name), promote=False)
    if promote:
        registry.promote_set(version)  # one atomic step: readers never see a mixed set
    return version


@contextmanager
def training_engine(kind: str = "plain", *, nthread: int | None = None, address: str | None = None,
                    num_workers: int = 1, storage_path: str | None = None) -> Iterator[Engine]:
    """The engine that runs the fits, closed afterwards (a Ray cluster it started, never one it joined).

    ``plain``: this process, ``nthread`` XGBoost threads per fit; ``ray``: Ray tasks and one
    ``XGBoostTrainer`` with ``num_workers`` workers (``address``, ``storage_path``: see the flags).
    """
    if kind == "plain":
        engine: Engine = PlainEngine(nthread)
    elif kind == "ray":
        from training.ray_engine import RayEngine  # Ray only when asked for

        engine = RayEngine(address=address, num_workers=num_workers, storage_path=storage_path)
    else:
        raise ConfigError(f"unknown training engine {kind!r} (plain or ray)")
    try:
        yield engine
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class TrainedVersion:
    """What :func:`train` saved: the version id shared by the four models, and the run's figures."""

    version: str
    out: Path  # the registry folder
    engine: str
    rows: int  # prepared training rows (all symbols)
    timings: dict[str, float]
    walk_forward: list[dict[str, Any]]  # the range predictor's walk-forward rows
    meta: dict[str, Any]  # the meta-model's calibration-holdout figures per horizon (no reliability curve)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` line of ``python -m training.train`` (and data/models/train.json)."""
        return {"version": self.version, "out": str(self.out), "engine": self.engine, "rows": self.rows,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}, "walk_forward": self.walk_forward,
                "meta": self.meta}


def train(settings: Settings, candles: Mapping[str, str | Path], engine: Engine, *, out: str | Path | None = None,
          start: str | None = None, end: str | None = None, promote: bool = True) -> TrainedVersion:
    """Train the four models on ``candles`` (symbol -> ``SYMBOL_5m.parquet``) with ``engine`` and save
    them as one version in the registry ``out`` (default ``settings.models_dir``).

    ``start``/``end`` (UTC dates): rows before ``start`` are dropped after the feature warm-up, and
    only candles opening before ``end`` are used, so no label crosses it. ``promote=False`` saves the
    version without making it current (a challenger). The model parameters are ``settings.models``
    (:func:`with_overrides` for the command line's). Deterministic: the same settings and candles give
    the same boosters with either engine's fits.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = dict(engine.timings)  # cluster start for Ray
    paths = {symbol: Path(path) for symbol, path in candles.items()}
    out_dir = Path(out) if out else settings.models_dir

    t0 = time.perf_counter()
    histories = load_histories(paths)
    data = prepare(histories, settings, start_ms=to_ms(start), end_ms=to_ms(end))
    timings["data_prepare"] = time.perf_counter() - t0
    log.info("prepared %d rows, %d symbols (%s), %s .. %s", len(data), len(data.symbols), ", ".join(data.symbols),
             data.data_range()["start"], data.data_range()["end"])

    result = fit_models(data, settings, engine)
    timings.update(result.timings)
    t0 = time.perf_counter()
    result.documents.setdefault("range_predictor", {})[HAR_DOCUMENT] = har_documents(histories, settings, to_ms(end))
    timings["har_baseline"] = time.perf_counter() - t0
    timings.update(engine.timings)  # Ray: cluster start, object store / ray.data loading, checkpoint

    t0 = time.perf_counter()
    data_info = {"data_range": data.data_range(), "data_by_symbol": {s: prepare_range(data, s) for s in data.symbols},
                 "candle_files": {s: str(p) for s, p in paths.items()}, "symbols": list(data.symbols),
                 "horizons": list(settings.market.horizons), "per_symbol": settings.models.per_symbol,
                 "feature_names": list(data.feature_names), "model_columns": list(data.columns),
                 "train_end": end, "train_start": start}
    registry = ModelRegistry(out_dir, feature_set_hash(settings.features))
    version = save_models(result, registry, settings, data_info, engine.name, promote=promote)
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    meta = {h: {k: v for k, v in m.items() if k != "reliability"}
            for h, m in result.metadata["meta_model"]["metrics"]["calibration_holdout"].items()}
    return TrainedVersion(version, out_dir, engine.name, len(data), timings,
                          result.metadata["range_predictor"]["metrics"]["walk_forward"], meta)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The command line: its flags mapped onto :func:`train`; returns the ``--json`` summary."""
    t_start = time.perf_counter()
    settings = with_overrides(get_settings(), args.rounds, args.folds, args.max_rows,
                              True if args.per_symbol else None)
    with training_engine(args.engine, nthread=args.nthread, address=args.address, num_workers=args.num_workers,
                         storage_path=args.storage_path) as engine:
        trained = train(settings, parse_candle_args(args.candles), engine, out=args.out, start=args.start,
                        end=args.end, promote=not args.no_promote)
    summary = trained.summary()
    summary["timings"]["total"] = round(time.perf_counter() - t_start, 3)  # the engine's start included
    return summary


def har_documents(histories: dict, settings: Settings, end_ms: int | None) -> dict[str, Any]:
    """The HAR baseline of every symbol, fitted on the training candles (before ``end_ms``), saved with
    the range predictor as JSON: ``training.evaluate`` scores against it, and serving can apply the
    same coefficients (``features.volatility.apply_har``)."""
    out: dict[str, Any] = {}
    for symbol, df in histories.items():
        try:
            out[symbol] = fit_har_baseline(df, settings.market.horizons, end_ms, settings.labels)
        except ValueError as exc:  # too little history for the week/month windows
            log.warning("%s: no HAR baseline saved: %s", symbol, exc)
    return out


def prepare_range(data: Prepared, symbol: str) -> dict[str, Any]:
    """First and last training candle and the row count of one symbol (its models' ``data_by_symbol``)."""
    rows = data.symbol == symbol
    t = data.open_time[rows]
    return {"start": pd.Timestamp(int(t.min()), unit="ms", tz="UTC").isoformat(),
            "end": pd.Timestamp(int(t.max()), unit="ms", tz="UTC").isoformat(), "rows": int(rows.sum())}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candles", nargs="+", required=True, help="SYMBOL_5m.parquet files or SYMBOL=path")
    p.add_argument("--out", help="registry folder (default: Settings.models_dir)")
    p.add_argument("--engine", choices=("plain", "ray"), default="plain")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--num-workers", type=int, default=1, help="XGBoostTrainer workers (ScalingConfig)")
    p.add_argument("--storage-path", default=None,
                   help="ray engine: where Ray Train keeps its run and checkpoint, reachable from every node "
                        "(a shared folder, NFS or s3://...; default: a temporary folder, single-node clusters only)")
    p.add_argument("--nthread", type=int, default=None,
                   help="plain engine: XGBoost threads per fit (default 1, with one fit per core in parallel)")
    p.add_argument("--start", default=None, help="ignore candles before this UTC date (after feature warm-up)")
    p.add_argument("--end", default=None, help="train only on candles before this UTC date (labels never cross it)")
    p.add_argument("--rounds", type=int, default=None, help="override models.num_boost_round")
    p.add_argument("--folds", type=int, default=None, help="override models.walk_forward_folds")
    p.add_argument("--max-rows", type=int, default=None, help="override models.max_train_rows")
    p.add_argument("--per-symbol", action="store_true", help="one model per symbol (models.per_symbol)")
    p.add_argument("--no-promote", action="store_true", help="save the version without making it current")
    p.add_argument("--json", action="store_true", help="print a JSON summary (version, timings, metrics)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        summary = run(args)
    except MLEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"saved version {summary['version']} of {', '.join(MODEL_NAMES)} to {summary['out']} "
              f"({summary['engine']} engine, {summary['rows']} rows, {summary['timings']['total']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
