"""The training pipeline, identical for both engines: walk-forward, stacking, calibration, refit.

An *engine* only decides where fits run (``PlainEngine``: in this process; ``RayEngine``: Ray tasks
and a Ray Train ``XGBoostTrainer``). Jobs, data, targets and the post-processing are defined here
once, so both engines produce the same models from the same rows.

Steps:
1. walk-forward (``training.data.walk_forward_splits``): every base booster is fit on each fold's
   fit rows, early-stopped on the fold's validation tail, and predicts the fold's test rows; those
   predictions are the out-of-fold (OOF) predictions and the walk-forward metrics;
2. meta-model: fit on the OOF predictions (+ regime features) of the older OOF rows, early-stopped
   on their tail; the newest ``calibration_fraction`` of OOF rows (after an embargo) is never seen by
   it and calibrates its confidence (isotonic). ECE is measured on the second half of that block
   with a calibrator fit on the first half only;
3. final refit of every base booster on all rows (rounds: median of the folds' early-stopped rounds).
The range predictor's interval calibration (``training.intervals.fit_interval_calibration``) is fit
on the OOF rows of step 1; the walk-forward metrics are of the raw intervals (the calibrated ones
would be scored on the rows they were fit on).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from configs.settings import ModelConfig, Settings
from features.costs import Costs, round_trip_cost
from inference.layout import BASE_MODELS, MODEL_NAMES, MODELS
from inference.transforms import (INTERVAL_DOCUMENT, VOL_FEATURE, apply_calibration, meta_matrix, proposed_side,
                                  range_cost_ratio, stage_output)
from training.data import Fold, Prepared, split_tail, subsample_stride, walk_forward_splits
from training.intervals import fit_interval_calibration
from training.meta_label import choose_policy, gross_payoffs, policy_figures, proposal_targets, uniqueness_weights
from training.metrics import (BASELINE_VOL_FEATURE, auc, baseline_predictions, ece, fit_baselines, fit_isotonic,
                              range_metrics, reliability_curve, signal_metrics, tpsl_metrics)
from training.models import FitOutcome, TargetSpec, base_specs, fit_booster, meta_specs, predict_raw, \
    target_values, xgb_params
from training.progress import log, progress


@dataclass(frozen=True)
class FitJob:
    """One booster fit: which rows of which matrix, which target, how many rounds, what to predict."""

    key: str
    spec: TargetSpec
    matrix: str
    target: str
    fit_rows: np.ndarray
    val_rows: np.ndarray
    predict_rows: np.ndarray
    rounds: int
    early_stopping: int | None
    weight: str | None = None  # key of the sample weights in the targets mapping (meta-model: uniqueness)


def job_weights(job: FitJob, targets: Mapping[str, np.ndarray]) -> np.ndarray | None:
    return None if job.weight is None else targets[job.weight]


def run_fit_job(job: FitJob, X: np.ndarray, y: np.ndarray, cfg: ModelConfig, nthread: int,
                weights: np.ndarray | None = None) -> FitOutcome:
    """Fit one booster (rows with an undefined target are skipped) and predict ``predict_rows``."""
    fit = job.fit_rows[np.isfinite(y[job.fit_rows])]
    val = job.val_rows[np.isfinite(y[job.val_rows])]
    if len(fit) == 0:
        raise ValueError(f"{job.key}: no training rows with a defined target")
    w_fit = None if weights is None else weights[fit]
    w_val = None if weights is None else weights[val]
    booster, kept = fit_booster(xgb_params(job.spec, cfg, nthread), job.rounds, X[fit], y[fit],
                                X[val] if len(val) else None, y[val] if len(val) else None,
                                job.early_stopping if len(val) else None, w_fit, w_val)
    preds = predict_raw(booster, X[job.predict_rows], job.spec.width) if len(job.predict_rows) else None
    return FitOutcome(job.key, bytes(booster.save_raw("ubj")), kept, preds)


class Engine(Protocol):
    name: str
    timings: dict[str, float]

    def fit_many(self, jobs: Sequence[FitJob], matrices: Mapping[str, np.ndarray],
                 targets: Mapping[str, np.ndarray], cfg: ModelConfig, desc: str) -> list[FitOutcome]: ...

    def fit_final(self, jobs: Sequence[FitJob], matrices: Mapping[str, np.ndarray],
                  targets: Mapping[str, np.ndarray], cfg: ModelConfig, desc: str) -> list[FitOutcome]: ...


class PlainEngine:
    """Every fit in this process: independent fits run concurrently on a thread pool.

    XGBoost releases the GIL while it trains, so ``cpu_count`` single-threaded fits side by side
    use the cores better than one fit at a time with ``cpu_count`` threads (measured on 2 cores:
    XGBoost's per-node thread synchronisation wastes much of the second core on 80k-row fits, and
    more so when other processes compete for it). ``nthread`` sets threads per fit; the pool then
    runs ``cpu_count // nthread`` fits at once. Results do not depend on the pool (each fit is
    deterministic and single-threaded by default, like the Ray engine's tasks).
    """

    name = "plain"

    def __init__(self, nthread: int | None = None, parallel: int | None = None) -> None:
        cpus = os.cpu_count() or 1
        self.nthread = max(1, nthread or 1)
        self.parallel = max(1, parallel or cpus // self.nthread)
        self.timings: dict[str, float] = {}

    def fit_many(self, jobs: Sequence[FitJob], matrices: Mapping[str, np.ndarray],
                 targets: Mapping[str, np.ndarray], cfg: ModelConfig, desc: str) -> list[FitOutcome]:
        def one(job: FitJob) -> FitOutcome:
            return run_fit_job(job, matrices[job.matrix], targets[job.target], cfg, self.nthread,
                               job_weights(job, targets))

        with progress(len(jobs), desc) as bar:
            if self.parallel == 1:
                out = []
                for job in jobs:
                    out.append(one(job))
                    bar.update(1)
                return out
            from concurrent.futures import ThreadPoolExecutor, as_completed

            results: list[FitOutcome | None] = [None] * len(jobs)
            with ThreadPoolExecutor(self.parallel, thread_name_prefix="fit") as pool:
                futures = {pool.submit(one, job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
            return [r for r in results if r is not None]

    fit_final = fit_many


@dataclass
class TrainOutput:
    """What the pipeline produced; ``training.train`` adds the common metadata and saves it."""

    boosters: dict[str, dict[str, bytes]]
    documents: dict[str, dict[str, Any]]
    metadata: dict[str, dict[str, Any]]
    folds: list[Fold]
    oof_rows: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def _rows_for(spec: TargetSpec, rows: np.ndarray, symbol_of_row: np.ndarray) -> np.ndarray:
    return rows if spec.symbol is None else rows[symbol_of_row[rows] == spec.symbol]


def _median_rounds(outcomes: Sequence[FitOutcome], jobs: Sequence[FitJob]) -> dict[str, int]:
    kept: dict[str, list[int]] = {}
    for job, out in zip(jobs, outcomes):
        kept.setdefault(job.spec.name, []).append(out.best_iteration)
    return {name: max(1, int(np.median(v))) for name, v in kept.items()}


def _assemble(jobs: Sequence[FitJob], outcomes: Sequence[FitOutcome], n: int) -> dict[tuple[str, int], np.ndarray]:
    """Stitch per-job predictions into one array per (target, horizon) over all ``n`` rows."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for job, res in zip(jobs, outcomes):
        key = (job.spec.target, job.spec.horizon)
        arr = out.setdefault(key, np.full((n, job.spec.width), np.nan))
        if res.predictions is not None:
            arr[job.predict_rows] = res.predictions
    return out


def model_outputs(raw: Mapping[tuple[str, int], np.ndarray], atr: np.ndarray, horizon: int) -> dict[str, np.ndarray]:
    """Base models' stage outputs from raw booster outputs keyed (target, horizon): the serving
    ensemble's own post-processing (``inference.transforms.stage_output``)."""
    return {m: stage_output(m, {b.target: raw.get((b.target, horizon)) for b in MODELS[m]}, atr, horizon)
            for m in BASE_MODELS}


def _metric_rows(data: Prepared, rows: np.ndarray, outputs: Mapping[str, np.ndarray], horizon: int,
                 baseline_preds: Mapping[str, np.ndarray],
                 quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> list[dict[str, Any]]:
    out = []
    lab = data.labels
    for symbol in data.symbols:
        r = rows[data.symbol[rows] == symbol]
        if len(r) == 0:
            continue
        row: dict[str, Any] = {"symbol": symbol, "horizon": horizon, "n": int(len(r))}
        row.update(range_metrics(lab[f"fut_high_{horizon}"].to_numpy()[r], lab[f"fut_low_{horizon}"].to_numpy()[r],
                                 outputs["range_predictor"][r], {k: v[r] for k, v in baseline_preds.items()},
                                 quantiles))
        row.update(tpsl_metrics(lab[f"tp_long_{horizon}"].to_numpy()[r], lab[f"tp_short_{horizon}"].to_numpy()[r],
                                outputs["tpsl_classifier"][r]))
        row.update(signal_metrics(lab[f"signal_{horizon}"].to_numpy()[r], outputs["signal_classifier"][r],
                                  prefix="classifier"))
        out.append(row)
    return out


def _calibrate_meta(raw_meta: Mapping[tuple[str, int], np.ndarray], prop: Mapping[int, Mapping[str, np.ndarray]],
                    mt: np.ndarray, head: np.ndarray, calib: np.ndarray, embargo: int,
                    horizons: Sequence[int]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Calibrators and trade policies of the meta-model, from the calibration block it never fitted.

    The block is split in time (c1 | embargo | c2). Honest figures: a calibrator fit on c1, a policy
    chosen on c1 (thresholds, ``training.meta_label.choose_policy``), both scored on c2. Shipped: the
    calibrator refit on the whole block and the policy chosen on c1 (``policy_h``), with payoffs
    (mean gross R of winners / losers) from the meta-model's training rows.
    """
    docs: dict[str, dict[str, Any]] = {}
    metrics: dict[str, Any] = {}
    c1, c2 = split_tail(mt, calib, 0.5, embargo)
    for h in horizons:
        pr = prop[h]
        p_raw = raw_meta[("meta", h)][:, 0]
        y = pr["win"]

        def ok(rows: np.ndarray) -> np.ndarray:
            return rows[np.isfinite(y[rows]) & np.isfinite(p_raw[rows])]

        a, b, c = ok(c1), ok(c2), ok(calib)
        payoffs = gross_payoffs(y[head], pr["net_r"][head], pr["cost_r"][head], pr["weight"][head])
        holdout_cal = fit_isotonic(p_raw[a], y[a])
        p1 = apply_calibration(holdout_cal, p_raw[a])
        policy = choose_policy(p1, pr["cost_r"][a], pr["ratio"][a], pr["net_r"][a], pr["weight"][a], payoffs)
        p2 = apply_calibration(holdout_cal, p_raw[b])
        docs[f"calibration_h{h}"] = fit_isotonic(p_raw[c], y[c])
        docs[f"policy_h{h}"] = {**policy, "chosen_on": "first half of the meta-model's calibration block "
                                "(out-of-fold rows it never fitted), calibrator fitted on the same half"}
        holdout = policy_figures(policy, p2, pr["cost_r"][b], pr["ratio"][b], pr["net_r"][b], pr["weight"][b])
        per_h: dict[str, Any] = {"calibration_rows": int(len(c)), "holdout_rows": int(len(b)),
                                 "base_rate": float(y[b].mean()) if len(b) else None,
                                 "ece_raw": ece(p_raw[b], y[b]), "ece_calibrated": ece(p2, y[b]),
                                 "auc": auc(y[b], p2) if len(np.unique(y[b])) == 2 else None,
                                 "reliability": reliability_curve(p2, y[b]), "policy": policy,
                                 "holdout_policy": holdout}
        metrics[str(h)] = per_h
        log.info("meta h=%d: win rate %.3f, ECE raw %.4f -> calibrated %.4f on %d held-out rows; policy %s; "
                 "held out: %d trades, expected %.3f R vs realised %.3f R", h, per_h["base_rate"] or 0,
                 per_h["ece_raw"], per_h["ece_calibrated"], len(b),
                 "abstain" if not policy["trade"] else
                 f"E[R] > {policy['min_expected_r']}, range/cost >= {policy['min_range_cost_ratio']:.2f}",
                 holdout["trades"], holdout["mean_expected_r"] or 0, holdout["mean_realised_r"] or 0)
    return docs, metrics


def train(data: Prepared, settings: Settings, engine: Engine) -> TrainOutput:
    """Walk-forward, stack, calibrate and refit; see the module docstring."""
    cfg = settings.models
    horizons = list(settings.market.horizons)
    embargo = max(horizons)
    n = len(data)
    X = data.X
    vol_col = data.columns.index(VOL_FEATURE)
    atr = X[:, vol_col].astype(np.float64)
    rv = X[:, data.columns.index(BASELINE_VOL_FEATURE)].astype(np.float64)
    timings: dict[str, float] = {}

    specs = base_specs(settings, data.symbols)
    targets = {spec.name: target_values(spec, data.labels, atr) for spec in specs}
    folds = walk_forward_splits(data.open_time, cfg.walk_forward_folds, embargo, cfg.min_train_fraction,
                                cfg.validation_fraction)

    # 1. walk-forward
    t0 = time.perf_counter()
    jobs: list[FitJob] = []
    for fold in folds:
        fit = subsample_stride(data.open_time, fold.fit, cfg.max_train_rows)
        val = subsample_stride(data.open_time, fold.val, cfg.max_train_rows)
        for spec in specs:
            jobs.append(FitJob(f"fold{fold.index}/{spec.name}", spec, "base", spec.name,
                               _rows_for(spec, fit, data.symbol), _rows_for(spec, val, data.symbol),
                               _rows_for(spec, fold.test, data.symbol), cfg.num_boost_round,
                               cfg.early_stopping_rounds))
    log.info("walk-forward: %d folds x %d boosters on %d rows (embargo %d candles)", len(folds), len(specs), n,
             embargo)
    outcomes = engine.fit_many(jobs, {"base": X}, targets, cfg, "walk-forward")
    timings["fit_walk_forward"] = time.perf_counter() - t0
    final_rounds = _median_rounds(outcomes, jobs)
    raw_oof = _assemble(jobs, outcomes, n)
    oof = {h: model_outputs(raw_oof, atr, h) for h in horizons}

    # Walk-forward metrics: naive baselines are fit on each fold's fit rows, scored on its test rows.
    lab = data.labels
    fold_rows: list[dict[str, Any]] = []
    base_pred = {h: {k: np.full(n, np.nan) for k in ("mean_high", "vol_high", "mean_low", "vol_low")}
                 for h in horizons}
    for fold in folds:
        for h in horizons:
            for symbol in data.symbols:
                fr = fold.fit[data.symbol[fold.fit] == symbol]
                tr = fold.test[data.symbol[fold.test] == symbol]
                b = fit_baselines(lab[f"fut_high_{h}"].to_numpy()[fr], lab[f"fut_low_{h}"].to_numpy()[fr], rv[fr])
                for k, v in baseline_predictions(b, rv[tr]).items():
                    base_pred[h][k][tr] = v
            for row in _metric_rows(data, fold.test, oof[h], h, base_pred[h], cfg.quantiles):
                fold_rows.append({"fold": fold.index, **row})
    oof_rows = np.sort(np.concatenate([f.test for f in folds]))
    intervals = {str(h): fit_interval_calibration(oof[h]["range_predictor"][oof_rows],
                                                  lab[f"fut_high_{h}"].to_numpy()[oof_rows],
                                                  lab[f"fut_low_{h}"].to_numpy()[oof_rows], data.symbol[oof_rows],
                                                  cfg.quantiles) for h in horizons}
    wf_rows = [r for h in horizons for r in _metric_rows(data, oof_rows, oof[h], h, base_pred[h], cfg.quantiles)]

    # 2. meta-model on out-of-fold predictions only (meta-labelling, training.meta_label)
    t0 = time.perf_counter()
    mt = data.open_time[oof_rows]
    pos = np.arange(len(oof_rows))
    msym = data.symbol[oof_rows]
    head, calib = split_tail(mt, pos, cfg.calibration_fraction, embargo)
    mfit, mval = split_tail(mt, head, cfg.validation_fraction, embargo)
    mfit = subsample_stride(mt, mfit, cfg.max_train_rows)
    cost = float(round_trip_cost(Costs.from_settings(settings)))
    oof_lab = {c: lab[c].to_numpy(np.float64)[oof_rows] for c in lab.columns}
    meta_X: dict[str, np.ndarray] = {}
    meta_y: dict[str, np.ndarray] = {}
    prop: dict[int, dict[str, np.ndarray]] = {}
    for h in horizons:
        base_h = {m: oof[h][m][oof_rows] for m in oof[h]}
        sl_frac = oof_lab[f"sl_frac_{h}"]
        meta_X[f"meta_{h}"] = meta_matrix(X[oof_rows].astype(np.float64), data.columns, base_h, h, sl_frac, cost)
        side = proposed_side(base_h["signal_classifier"])
        win, net_r, bars = proposal_targets(oof_lab, side, h)
        weight = uniqueness_weights(mt, msym, bars)
        # Fit weights: uniqueness rescaled to mean 1 (min_child_weight keeps its meaning).
        meta_y[f"meta_{h}"] = win
        meta_y[f"meta_{h}:weight"] = weight / max(float(weight[weight > 0].mean()) if (weight > 0).any() else 1.0,
                                                  1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            prop[h] = {"win": win, "net_r": net_r, "weight": weight, "cost_r": cost / sl_frac,
                       "ratio": range_cost_ratio(base_h["range_predictor"], cost)}
    mspecs = meta_specs(settings, data.symbols)
    mjobs = [FitJob(f"meta/{s.name}", s, f"meta_{s.horizon}", f"meta_{s.horizon}", _rows_for(s, mfit, msym),
                    _rows_for(s, mval, msym), _rows_for(s, calib, msym), cfg.num_boost_round,
                    cfg.early_stopping_rounds, f"meta_{s.horizon}:weight") for s in mspecs]
    moutcomes = engine.fit_many(mjobs, meta_X, meta_y, cfg, "meta-model")
    raw_meta = _assemble(mjobs, moutcomes, len(oof_rows))
    timings["fit_meta"] = time.perf_counter() - t0

    calibrations, meta_metrics = _calibrate_meta(raw_meta, prop, mt, head, calib, embargo, horizons)

    # 3. final refit of the base models on all rows
    t0 = time.perf_counter()
    all_rows = subsample_stride(data.open_time, np.arange(n), cfg.max_train_rows)
    empty = np.empty(0, dtype=np.int64)
    final_jobs = [FitJob(f"final/{s.name}", s, "base", s.name, _rows_for(s, all_rows, data.symbol), empty, empty,
                         final_rounds[s.name], None) for s in specs]
    final = engine.fit_final(final_jobs, {"base": X}, targets, cfg, "final refit")
    timings["fit_final"] = time.perf_counter() - t0

    baselines = {symbol: {str(h): fit_baselines(lab[f"fut_high_{h}"].to_numpy()[data.symbol == symbol],
                                                lab[f"fut_low_{h}"].to_numpy()[data.symbol == symbol],
                                                rv[data.symbol == symbol]) for h in horizons}
                 for symbol in data.symbols}

    boosters: dict[str, dict[str, bytes]] = {m: {} for m in MODEL_NAMES}
    for job, res in zip(final_jobs, final):
        boosters[job.spec.model][job.spec.name] = res.booster
    for job, res in zip(mjobs, moutcomes):
        boosters["meta_model"][job.spec.name] = res.booster

    fold_info = [{"fold": f.index, "fit_rows": int(len(f.fit)), "val_rows": int(len(f.val)),
                  "test_rows": int(len(f.test)),
                  "fit_end": int(data.open_time[f.fit].max()) if len(f.fit) else None,
                  "val_start": int(data.open_time[f.val].min()) if len(f.val) else None,
                  "val_end": int(data.open_time[f.val].max()) if len(f.val) else None,
                  "test_start": int(data.open_time[f.test].min()), "test_end": int(data.open_time[f.test].max())}
                 for f in folds]
    walk_forward = {"folds": fold_info, "embargo_candles": embargo, "scheme": "expanding, purged, embargoed",
                    "max_train_rows": cfg.max_train_rows}

    def by_model(prefixes: tuple[str, ...], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep = ("symbol", "horizon", "n", "fold")
        return [{k: v for k, v in r.items() if k in keep or k.startswith(prefixes)} for r in rows]

    range_prefixes = ("r2_", "mae_", "mean_mae_", "vol_mae_", "coverage_", "pinball_")
    metadata = {
        "range_predictor": {"quantiles": list(cfg.quantiles), "target_scaling": f"{VOL_FEATURE} x sqrt(h)",
                            "baselines": baselines, "baseline_vol_feature": BASELINE_VOL_FEATURE,
                            "metrics": {"walk_forward": by_model(range_prefixes, wf_rows),
                                        "folds": by_model(range_prefixes, fold_rows)}},
        "tpsl_classifier": {"metrics": {"walk_forward": by_model(("tpsl_",), wf_rows),
                                        "folds": by_model(("tpsl_",), fold_rows)}},
        "signal_classifier": {"metrics": {"walk_forward": by_model(("classifier_",), wf_rows),
                                          "folds": by_model(("classifier_",), fold_rows)}},
        "meta_model": {"metrics": {"calibration_holdout": meta_metrics},
                       "meta_rows": {"fit": int(len(mfit)), "val": int(len(mval)), "calibration": int(len(calib))}},
    }
    rounds_by_model: dict[str, dict[str, int]] = {}
    for job, res in zip(final_jobs, final):
        rounds_by_model.setdefault(job.spec.model, {})[job.spec.name] = res.best_iteration
    for job, res in zip(mjobs, moutcomes):
        rounds_by_model.setdefault("meta_model", {})[job.spec.name] = res.best_iteration
    costs = dataclasses.asdict(Costs.from_settings(settings))  # what the labels charged (the ensemble checks)
    for m, md in metadata.items():
        md["walk_forward"] = walk_forward
        md["rounds"] = rounds_by_model.get(m, {})
        md["barrier_models"] = data.barrier_models  # the labels' barriers: serving recomputes them
        md["costs"] = costs
    return TrainOutput(boosters, {"meta_model": calibrations, "range_predictor": {INTERVAL_DOCUMENT: intervals}},
                       metadata, folds, oof_rows, timings)
