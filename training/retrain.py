"""``python -m training.retrain``: scheduled retraining with a champion/challenger gate.

    ray job submit --address http://127.0.0.1:8265 -- python -m training.retrain
    python -m training.retrain --no-download            # offline: the candle files already on disk

One run: (1) pull the latest closed candles for every configured symbol (resumable download into
``Settings.data_dir``); (2) choose the evaluation window, the most recent walk-forward fold (or the
last ``retrain_holdout_days``); (3) train a challenger on the candles *before* that window with the
training pipeline, saved but not promoted; (4) score the challenger and the current champion on the
window's rows that neither model has seen; (5) promote the challenger only if it is better by the
configured margin; (6) append the decision with every figure to ``Settings.retrain_log`` (one JSON
line) and print it. The serving graph watches the registry's ``current`` pointers
(``Settings.model_poll_s``), so a promotion reaches it with no restart.

Why the challenger stops where the window starts (and not at the last candle): the window must be
unseen by both models for the comparison to mean anything, and what gets promoted is exactly the
model that was measured. The window starts at ``max(last-fold start, the champion's last training
candle + 1)``, so a champion trained more recently than the fold began is never scored on rows it
learnt from; too few unseen rows and the champion is kept with that reason (retry later).

The gate (figures per symbol and horizon, then averaged as relative changes so no horizon dominates):
- range predictor: mean absolute error of the median high and low (fractions of close) must drop by
  at least ``retrain_margin`` (0.01 = 1%);
- TP/SL classifier (Brier score) and the final signal (meta-model accuracy) may not get worse by
  more than ``retrain_tolerance`` (relative).
The figures are ``training.evaluate``'s, the same the model cards and backtests quote.
A missing or unloadable champion (none yet, or trained on another feature set) is replaced by the
challenger without comparison, and the record says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from configs.settings import Settings, get_settings, load_settings
from features.candles import FIVE_MINUTES_MS
from features.download import candle_path, download_klines
from configs.errors import MLEngineError, ModelLoadError, ModelNotFoundError
from features.indicators import feature_set_hash
from training.data import load_histories, parse_candle_args, prepare, walk_forward_splits
from inference.ensemble import Ensemble
from training.evaluate import evaluate
from training.progress import log, setup_logging
from inference.registry import MODEL_NAMES, ModelRegistry
from training.train import train, training_engine, with_overrides

DAY_MS = 86_400_000
# The figures the gate reads: two losses (lower is better) and the final signal's accuracy.
RANGE_KEY, TPSL_KEY, SIGNAL_KEY = "range_mae", "tpsl_brier", "signal_accuracy"


# ---------------------------------------------------------------------------------------------
# 1. Candles
# ---------------------------------------------------------------------------------------------

def pull_candles(settings: Settings, symbols: Sequence[str], data_dir: Path, *, download: bool,
                 base_url: str | None = None, now_ms: int | None = None) -> dict[str, Path]:
    """Bring ``{data_dir}/{SYMBOL}_5m.parquet`` up to the last closed candle (resumes existing files).

    Offline (``download=False``) the files must already exist: retraining on a silently stale or
    missing history would be worse than failing.
    """
    paths: dict[str, Path] = {}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    for symbol in symbols:
        path = candle_path(data_dir, symbol, settings.market.interval)
        if download:
            start = now_ms - settings.retrain_history_days * DAY_MS
            path = download_klines(symbol, settings.market.interval, start, None, data_dir,
                                   base_url or settings.binance_api_url, progress=False,
                                   clock=lambda: now_ms / 1000)
        elif not path.exists():
            raise MLEngineError(f"--no-download: no candle file {path} for {symbol}")
        paths[symbol] = path
    return paths


# ---------------------------------------------------------------------------------------------
# 2. The evaluation window
# ---------------------------------------------------------------------------------------------

def last_fold_start(open_time: np.ndarray, settings: Settings) -> int:
    """Open time of the first row of the most recent walk-forward fold (the training pipeline's own split)."""
    cfg = settings.models
    folds = walk_forward_splits(open_time, cfg.walk_forward_folds, max(settings.market.horizons),
                                cfg.min_train_fraction, cfg.validation_fraction)
    return int(open_time[folds[-1].test].min())


def champion_last_candle(registry: ModelRegistry) -> int | None:
    """Open time (ms) of the newest candle any current model was trained on; None without a champion."""
    last: list[int] = []
    for name in MODEL_NAMES:
        try:
            meta = registry.metadata(name)
        except (ModelNotFoundError, ModelLoadError):
            return None
        end = (meta.get("data_range") or {}).get("end")
        if end is None:
            return None
        last.append(int(pd.Timestamp(end).value // 1_000_000))
    return max(last)


def evaluation_start(open_time: np.ndarray, settings: Settings, champion_last: int | None) -> tuple[int, int]:
    """(window start, the unrestricted holdout start): rows at or after the start are unseen by both."""
    end = int(open_time.max())
    if settings.retrain_holdout_days is not None:
        holdout = end - int(settings.retrain_holdout_days * DAY_MS) + FIVE_MINUTES_MS
    else:
        holdout = last_fold_start(open_time, settings)
    start = holdout if champion_last is None else max(holdout, champion_last + FIVE_MINUTES_MS)
    return start, holdout


# ---------------------------------------------------------------------------------------------
# 3./4. Scoring
# ---------------------------------------------------------------------------------------------

def score(ensemble: Ensemble, histories: Mapping[str, pd.DataFrame], settings: Settings,
          start_ms: int) -> dict[str, dict[str, Any]]:
    """Figures of one model set from ``start_ms`` on, per ``"SYMBOL/h"`` (``training.evaluate``'s rows).

    ``range_mae``: mean of the median high and low MAE; ``tpsl_brier``: mean Brier score of the long
    and short TP/SL probabilities; ``signal_accuracy``: accuracy of the final (meta-model) signal.
    Rows whose label is undefined (the window's last h candles, gaps) are not scored.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in evaluate(ensemble, histories, settings, start_ms=start_ms):
        figures = (row.get("mae_high"), row.get("mae_low"), row.get("tpsl_brier_long"),
                   row.get("tpsl_brier_short"), row.get("signal_accuracy"))
        if row["n"] == 0 or any(f is None for f in figures):
            continue
        if row["overlaps_training"]:  # the window is chosen so this cannot happen; refuse rather than trust it
            raise MLEngineError(f"{row['symbol']}/{row['horizon']}: evaluation rows overlap the training data of "
                                f"{ensemble.versions['range_predictor']}")
        out[f"{row['symbol']}/{row['horizon']}"] = {
            "rows": row["n"], RANGE_KEY: (row["mae_high"] + row["mae_low"]) / 2,
            TPSL_KEY: (row["tpsl_brier_long"] + row["tpsl_brier_short"]) / 2,
            SIGNAL_KEY: row["signal_accuracy"], "coverage_high": row.get("coverage_high"),
            "coverage_low": row.get("coverage_low"), "start": row.get("start"), "end": row.get("end")}
    return out


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str
    changes: dict[str, float]  # mean relative change challenger vs champion per figure


def compare(champion: Mapping[str, Mapping[str, float]], challenger: Mapping[str, Mapping[str, float]],
            margin: float, tolerance: float) -> Verdict:
    """The promotion gate on per-(symbol, horizon) losses (pure; see the module docstring)."""
    cells = sorted(set(champion) & set(challenger))
    if not cells:
        return Verdict(False, "no (symbol, horizon) scored for both models", {})
    changes: dict[str, float] = {}
    for key in (RANGE_KEY, TPSL_KEY, SIGNAL_KEY):
        rel = [(challenger[c][key] - champion[c][key]) / champion[c][key] for c in cells
               if champion[c][key] and math.isfinite(champion[c][key]) and math.isfinite(challenger[c][key])]
        changes[key] = float(np.mean(rel)) if rel else float("nan")
    if not math.isfinite(changes[RANGE_KEY]):
        return Verdict(False, "range MAE could not be compared", changes)
    if changes[RANGE_KEY] > -margin:
        return Verdict(False, f"range MAE change {changes[RANGE_KEY]:+.2%} does not beat the required "
                              f"-{margin:.2%}", changes)
    if math.isfinite(changes[TPSL_KEY]) and changes[TPSL_KEY] > tolerance:
        return Verdict(False, f"TP/SL Brier worse by {changes[TPSL_KEY]:+.2%} (tolerance {tolerance:.2%}) although "
                              f"range MAE improved {changes[RANGE_KEY]:+.2%}", changes)
    if math.isfinite(changes[SIGNAL_KEY]) and changes[SIGNAL_KEY] < -tolerance:
        return Verdict(False, f"signal accuracy worse by {changes[SIGNAL_KEY]:+.2%} (tolerance {tolerance:.2%}) "
                              f"although range MAE improved {changes[RANGE_KEY]:+.2%}", changes)
    return Verdict(True, f"range MAE {changes[RANGE_KEY]:+.2%} (required -{margin:.2%}), TP/SL Brier "
                         f"{changes[TPSL_KEY]:+.2%}, signal accuracy {changes[SIGNAL_KEY]:+.2%} "
                         f"(tolerance {tolerance:.2%})", changes)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _iso(ms: int | None) -> str | None:
    return None if ms is None else pd.Timestamp(int(ms), unit="ms", tz="UTC").isoformat()


def _load_version(registry: ModelRegistry, version: Mapping[str, str], settings: Settings) -> Ensemble:
    return Ensemble({name: registry.load(name, version[name]) for name in MODEL_NAMES}, settings)


def _current_versions(registry: ModelRegistry) -> dict[str, str] | None:
    try:
        return registry.current_versions()
    except ModelNotFoundError:
        return None


def write_decision(record: Mapping[str, Any], path: Path) -> None:
    """Append one JSON line (the audit trail of every decision; never rewritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def _settings(args: argparse.Namespace) -> Settings:
    """Settings with the command line's gate and model overrides, validated (bounds) like the YAML and
    MLE_* values."""
    overrides = {f"retrain_{k}": getattr(args, k) for k in ("margin", "tolerance", "min_eval_rows", "holdout_days")
                 if getattr(args, k) is not None}
    base = load_settings(**overrides) if overrides else get_settings()
    return with_overrides(base, args.rounds, args.folds, args.max_rows)


def _candle_files(args: argparse.Namespace, settings: Settings) -> dict[str, Path]:
    """Step 1: the fixed ``--candles`` files, else every real symbol's file brought up to date."""
    if args.candles:
        if not args.no_download:
            raise MLEngineError("--candles names fixed files: combine it with --no-download")
        return parse_candle_args(args.candles)
    return pull_candles(settings, settings.market.real_symbols, Path(args.data_dir or settings.data_dir),
                        download=not args.no_download, base_url=args.base_url)


def _champion(registry: ModelRegistry, settings: Settings) -> tuple[dict[str, str] | None, Ensemble | None, str | None]:
    """The current set: (its versions, the loaded ensemble, why there is none to compare with)."""
    versions = _current_versions(registry)
    if versions is None:
        return None, None, "no champion in the registry"
    try:
        return versions, _load_version(registry, versions, settings), None
    except (ModelLoadError, ModelNotFoundError) as exc:
        return versions, None, f"champion {versions['range_predictor']} cannot be loaded: {exc}"


def _judge(champion: Ensemble | None, champion_problem: str | None, challenger: Ensemble,
           histories: Mapping[str, pd.DataFrame], settings: Settings, start: int,
           record: dict[str, Any]) -> Verdict:
    """Step 4: score both sets on the window from ``start`` (into ``record``) and apply the gate."""
    challenger_scores = score(challenger, histories, settings, start)
    record["challenger"]["scores"] = challenger_scores
    if champion is None:
        verdict = Verdict(True, f"{champion_problem}: the challenger is promoted without comparison", {})
    else:
        champion_scores = score(champion, histories, settings, start)
        record["champion"]["scores"] = champion_scores
        verdict = compare(champion_scores, challenger_scores, settings.retrain_margin, settings.retrain_tolerance)
    record["changes"] = verdict.changes
    return verdict


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One retraining round (steps 1-6 of the module docstring); returns the logged decision."""
    t_start = time.perf_counter()
    settings = _settings(args)
    models_dir = Path(args.out) if args.out else settings.models_dir
    log_path = Path(args.log) if args.log else settings.retrain_log
    registry = ModelRegistry(models_dir, feature_set_hash(settings.features))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    paths = _candle_files(args, settings)  # 1. candles
    histories = load_histories(paths)
    timings["candles"] = time.perf_counter() - t0

    t0 = time.perf_counter()  # 2. window
    data = prepare(histories, settings)
    champion_versions, champion, champion_problem = _champion(registry, settings)
    champ_last = champion_last_candle(registry) if champion is not None else None
    start, holdout = evaluation_start(data.open_time, settings, champ_last)
    eval_rows = np.flatnonzero(data.open_time >= start)
    timings["prepare"] = time.perf_counter() - t0
    record: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(), "models_dir": str(models_dir),
        "candles": {s: {"file": str(p), "rows": int(len(h)), "last": _iso(int(h["open_time"].iloc[-1]))}
                    for (s, p), h in zip(paths.items(), histories.values())},
        "window": {"holdout_start": _iso(holdout), "start": _iso(start), "end": _iso(int(data.open_time.max())),
                   "rows": int(len(eval_rows)),
                   "source": "retrain_holdout_days" if settings.retrain_holdout_days else "last walk-forward fold"},
        "champion": {"versions": champion_versions, "last_training_candle": _iso(champ_last),
                     "problem": champion_problem},
        "margin": settings.retrain_margin, "tolerance": settings.retrain_tolerance,
    }
    if champion is not None and len(eval_rows) < settings.retrain_min_eval_rows:
        return _finish(record, "keep", f"only {len(eval_rows)} rows unseen by the champion (trained up to "
                       f"{_iso(champ_last)}); need {settings.retrain_min_eval_rows}: no challenger trained, retry "
                       "when more candles have closed", log_path, timings, t_start)

    # 3. challenger: candles before the window only (labels never cross it), saved, not promoted
    t0 = time.perf_counter()
    with training_engine(args.engine, nthread=args.nthread, address=args.address) as engine:
        trained = train(settings, paths, engine, out=models_dir, end=_iso(start), promote=False)
    challenger_version = {name: trained.version for name in MODEL_NAMES}
    timings["train_challenger"] = time.perf_counter() - t0
    record["challenger"] = {"versions": challenger_version, "trained_until": _iso(start), "train_rows": trained.rows}

    t0 = time.perf_counter()  # 4. score both on the unseen window
    verdict = _judge(champion, champion_problem, _load_version(registry, challenger_version, settings), histories,
                     settings, start, record)
    timings["evaluate"] = time.perf_counter() - t0

    # 5. promote (all four together: the serving graph swaps on the `current` pointers)
    if verdict.promote and not args.dry_run:
        registry.promote_set(challenger_version)  # all four in one atomic step
    decision = "promote" if verdict.promote and not args.dry_run else "keep"
    reason = verdict.reason + (" (dry run: not promoted)" if verdict.promote and args.dry_run else "")
    return _finish(record, decision, reason, log_path, timings, t_start)


def _finish(record: dict[str, Any], decision: str, reason: str, log_path: Path, timings: dict[str, float],
            t_start: float) -> dict[str, Any]:
    timings["total"] = time.perf_counter() - t_start
    record.update(decision=decision, reason=reason, timings={k: round(v, 3) for k, v in timings.items()})
    write_decision(record, log_path)
    log.info("retrain decision: %s — %s (logged to %s)", decision, reason, log_path)
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-download", action="store_true", help="use the candle files on disk (offline)")
    p.add_argument("--data-dir", default=None, help="candle folder (default: Settings.data_dir)")
    p.add_argument("--candles", nargs="+", default=None,
                   help="explicit SYMBOL_5m.parquet files or SYMBOL=path (with --no-download)")
    p.add_argument("--base-url", default=None, help="Binance REST root (default: Settings.binance_api_url)")
    p.add_argument("--out", default=None, help="registry folder (default: Settings.models_dir)")
    p.add_argument("--log", default=None, help="decision log (default: Settings.retrain_log)")
    p.add_argument("--margin", type=float, default=None, help="override retrain_margin")
    p.add_argument("--tolerance", type=float, default=None, help="override retrain_tolerance")
    p.add_argument("--min-eval-rows", type=int, default=None, help="override retrain_min_eval_rows")
    p.add_argument("--holdout-days", type=float, default=None, help="override retrain_holdout_days")
    p.add_argument("--dry-run", action="store_true", help="decide and log, never promote")
    p.add_argument("--engine", choices=("plain", "ray"), default="plain", help="training engine (training.train)")
    p.add_argument("--address", default=None, help="Ray address for --engine ray")
    p.add_argument("--nthread", type=int, default=None, help="plain engine: XGBoost threads")
    p.add_argument("--rounds", type=int, default=None, help="override models.num_boost_round")
    p.add_argument("--folds", type=int, default=None, help="override models.walk_forward_folds")
    p.add_argument("--max-rows", type=int, default=None, help="override models.max_train_rows")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        record = run(args)
    except MLEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
