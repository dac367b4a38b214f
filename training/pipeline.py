"""The training pipeline, identical for both engines: walk-forward, stacking, calibration, refit.

An *engine* (``training.engines``) only decides where fits run (``PlainEngine``: in this process;
``RayEngine``: Ray tasks and a Ray Train ``XGBoostTrainer``). Jobs, data, targets and the
post-processing are defined here once, so both engines produce the same models from the same rows.
:func:`fit_models` runs the steps; ``training.train.train`` saves what it returns as one version.

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
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from configs.sections import ModelConfig

from configs.settings import Settings
from features.costs import Costs, round_trip_cost
from inference.layout import BASE_MODELS, MODEL_NAMES, MODELS
from inference.transforms import (INTERVAL_DOCUMENT, VOL_FEATURE, apply_calibration, meta_matrix, proposed_side,
                                  range_cost_ratio, stage_output)
from training.data import Fold, Prepared, split_tail, subsample_stride, walk_forward_splits
from training.engines import Engine, FitJob
from training.intervals import fit_interval_calibration
from training.meta_label import choose_policy, gross_payoffs, policy_figures, proposal_targets, uniqueness_weights
from training.scores import (BASELINE_VOL_FEATURE, auc, baseline_predictions, ece, fit_baselines, fit_isotonic,
                              range_metrics, reliability_curve, signal_metrics, tpsl_metrics)
from training.boosters import FitOutcome, TargetSpec, base_specs, meta_specs, target_values
from training.progress import log


@dataclass(frozen=True)
class Rows:
    """The prepared rows and what every step reads from them (volatility columns, horizons, embargo)."""

    data: Prepared
    cfg: ModelConfig
    horizons: list[int]
    embargo: int  # the longest horizon: no label of a fit row reaches into the rows after the gap
    atr: np.ndarray  # the target-scaling volatility feature (inference.transforms.VOL_FEATURE)
    rv: np.ndarray  # the naive baselines' volatility feature

    @classmethod
    def of(cls, data: Prepared, settings: Settings) -> "Rows":
        horizons = list(settings.market.horizons)
        X = data.X
        return cls(data, settings.models, horizons, max(horizons),
                   X[:, data.columns.index(VOL_FEATURE)].astype(np.float64),
                   X[:, data.columns.index(BASELINE_VOL_FEATURE)].astype(np.float64))


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


@dataclass
class WalkForward:
    """Step 1's result: the fold fits, their out-of-fold stage outputs per horizon and the scores."""

    jobs: list[FitJob]
    outcomes: list[FitOutcome]
    oof: dict[int, dict[str, np.ndarray]]  # horizon -> model -> stage output over all rows (NaN off-test)
    oof_rows: np.ndarray  # every fold's test rows, time-sorted
    fold_rows: list[dict[str, Any]]  # metrics per fold, symbol and horizon
    wf_rows: list[dict[str, Any]]  # metrics over all out-of-fold rows per symbol and horizon
    intervals: dict[str, Any]  # the range predictor's interval calibration per horizon


@dataclass
class MetaFit:
    """Step 2's result: the meta-model fits on out-of-fold rows and the split of those rows."""

    jobs: list[FitJob]
    outcomes: list[FitOutcome]
    calibrations: dict[str, dict[str, Any]]  # calibration_h*, policy_h* documents
    metrics: dict[str, Any]  # calibration-holdout figures per horizon
    rows: dict[str, int]  # fit / val / calibration row counts


def _walk_forward(r: Rows, specs: Sequence[TargetSpec], targets: Mapping[str, np.ndarray], folds: Sequence[Fold],
                  engine: Engine) -> WalkForward:
    """Fit every base booster on each fold, predict the fold's test rows, score them."""
    data, cfg = r.data, r.cfg
    jobs: list[FitJob] = []
    for fold in folds:
        fit = subsample_stride(data.open_time, fold.fit, cfg.max_train_rows)
        val = subsample_stride(data.open_time, fold.val, cfg.max_train_rows)
        for spec in specs:
            jobs.append(FitJob(f"fold{fold.index}/{spec.name}", spec, "base", spec.name,
                               _rows_for(spec, fit, data.symbol), _rows_for(spec, val, data.symbol),
                               _rows_for(spec, fold.test, data.symbol), cfg.num_boost_round,
                               cfg.early_stopping_rounds))
    log.info("walk-forward: %d folds x %d boosters on %d rows (embargo %d candles)", len(folds), len(specs),
             len(data), r.embargo)
    outcomes = engine.fit_many(jobs, {"base": data.X}, targets, cfg, "walk-forward")
    raw_oof = _assemble(jobs, outcomes, len(data))
    oof = {h: model_outputs(raw_oof, r.atr, h) for h in r.horizons}
    fold_rows, wf_rows, oof_rows, intervals = _walk_forward_scores(r, folds, oof)
    return WalkForward(jobs, outcomes, oof, oof_rows, fold_rows, wf_rows, intervals)


def _walk_forward_scores(r: Rows, folds: Sequence[Fold], oof: Mapping[int, Mapping[str, np.ndarray]]
                         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], np.ndarray, dict[str, Any]]:
    """Walk-forward metrics (naive baselines fit on each fold's fit rows, scored on its test rows)
    and the interval calibration fit on the out-of-fold rows."""
    data, cfg, lab, n = r.data, r.cfg, r.data.labels, len(r.data)
    fold_rows: list[dict[str, Any]] = []
    base_pred = {h: {k: np.full(n, np.nan) for k in ("mean_high", "vol_high", "mean_low", "vol_low")}
                 for h in r.horizons}
    for fold in folds:
        for h in r.horizons:
            for symbol in data.symbols:
                fr = fold.fit[data.symbol[fold.fit] == symbol]
                tr = fold.test[data.symbol[fold.test] == symbol]
                b = fit_baselines(lab[f"fut_high_{h}"].to_numpy()[fr], lab[f"fut_low_{h}"].to_numpy()[fr], r.rv[fr])
                for k, v in baseline_predictions(b, r.rv[tr]).items():
                    base_pred[h][k][tr] = v
            for row in _metric_rows(data, fold.test, oof[h], h, base_pred[h], cfg.quantiles):
                fold_rows.append({"fold": fold.index, **row})
    oof_rows = np.sort(np.concatenate([f.test for f in folds]))
    intervals = {str(h): fit_interval_calibration(oof[h]["range_predictor"][oof_rows],
                                                  lab[f"fut_high_{h}"].to_numpy()[oof_rows],
                                                  lab[f"fut_low_{h}"].to_numpy()[oof_rows], data.symbol[oof_rows],
                                                  cfg.quantiles) for h in r.horizons}
    wf_rows = [row for h in r.horizons
               for row in _metric_rows(data, oof_rows, oof[h], h, base_pred[h], cfg.quantiles)]
    return fold_rows, wf_rows, oof_rows, intervals


def _meta_inputs(r: Rows, wf: WalkForward, mt: np.ndarray, cost: float
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    """The meta-model's matrices, targets (+ uniqueness weights) and the proposals' figures per
    horizon, all over the out-of-fold rows (meta-labelling, ``training.meta_label``)."""
    data, oof_rows = r.data, wf.oof_rows
    msym = data.symbol[oof_rows]
    oof_lab = {c: data.labels[c].to_numpy(np.float64)[oof_rows] for c in data.labels.columns}
    meta_X: dict[str, np.ndarray] = {}
    meta_y: dict[str, np.ndarray] = {}
    prop: dict[int, dict[str, np.ndarray]] = {}
    for h in r.horizons:
        base_h = {m: wf.oof[h][m][oof_rows] for m in wf.oof[h]}
        sl_frac = oof_lab[f"sl_frac_{h}"]
        meta_X[f"meta_{h}"] = meta_matrix(data.X[oof_rows].astype(np.float64), data.columns, base_h, h, sl_frac, cost)
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
    return meta_X, meta_y, prop


def _meta_model(r: Rows, wf: WalkForward, settings: Settings, engine: Engine) -> MetaFit:
    """Fit the meta-model on the older out-of-fold rows (early-stopped on their tail), then calibrate
    it on the newest block it never saw (after an embargo)."""
    cfg, oof_rows = r.cfg, wf.oof_rows
    mt = r.data.open_time[oof_rows]
    msym = r.data.symbol[oof_rows]
    head, calib = split_tail(mt, np.arange(len(oof_rows)), cfg.calibration_fraction, r.embargo)
    mfit, mval = split_tail(mt, head, cfg.validation_fraction, r.embargo)
    mfit = subsample_stride(mt, mfit, cfg.max_train_rows)
    cost = float(round_trip_cost(Costs.from_settings(settings)))
    meta_X, meta_y, prop = _meta_inputs(r, wf, mt, cost)
    jobs = [FitJob(f"meta/{s.name}", s, f"meta_{s.horizon}", f"meta_{s.horizon}", _rows_for(s, mfit, msym),
                   _rows_for(s, mval, msym), _rows_for(s, calib, msym), cfg.num_boost_round,
                   cfg.early_stopping_rounds, f"meta_{s.horizon}:weight") for s in meta_specs(settings, r.data.symbols)]
    outcomes = engine.fit_many(jobs, meta_X, meta_y, cfg, "meta-model")
    raw_meta = _assemble(jobs, outcomes, len(oof_rows))
    calibrations, metrics = _calibrate_meta(raw_meta, prop, mt, head, calib, r.embargo, r.horizons)
    return MetaFit(jobs, outcomes, calibrations, metrics,
                   {"fit": int(len(mfit)), "val": int(len(mval)), "calibration": int(len(calib))})


def _final_refit(r: Rows, specs: Sequence[TargetSpec], targets: Mapping[str, np.ndarray],
                 final_rounds: Mapping[str, int], engine: Engine) -> tuple[list[FitJob], list[FitOutcome]]:
    """Refit every base booster on all rows with the folds' median early-stopped rounds."""
    data = r.data
    all_rows = subsample_stride(data.open_time, np.arange(len(data)), r.cfg.max_train_rows)
    empty = np.empty(0, dtype=np.int64)
    jobs = [FitJob(f"final/{s.name}", s, "base", s.name, _rows_for(s, all_rows, data.symbol), empty, empty,
                   final_rounds[s.name], None) for s in specs]
    return jobs, engine.fit_final(jobs, {"base": data.X}, targets, r.cfg, "final refit")


def _walk_forward_info(r: Rows, folds: Sequence[Fold]) -> dict[str, Any]:
    """The folds' row counts and time bounds (every model's metadata carries them)."""
    t = r.data.open_time
    fold_info = [{"fold": f.index, "fit_rows": int(len(f.fit)), "val_rows": int(len(f.val)),
                  "test_rows": int(len(f.test)),
                  "fit_end": int(t[f.fit].max()) if len(f.fit) else None,
                  "val_start": int(t[f.val].min()) if len(f.val) else None,
                  "val_end": int(t[f.val].max()) if len(f.val) else None,
                  "test_start": int(t[f.test].min()), "test_end": int(t[f.test].max())}
                 for f in folds]
    return {"folds": fold_info, "embargo_candles": r.embargo, "scheme": "expanding, purged, embargoed",
            "max_train_rows": r.cfg.max_train_rows}


def _by_model(prefixes: tuple[str, ...], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("symbol", "horizon", "n", "fold")
    return [{k: v for k, v in row.items() if k in keep or k.startswith(prefixes)} for row in rows]


_RANGE_PREFIXES = ("r2_", "mae_", "mean_mae_", "vol_mae_", "coverage_", "pinball_")


def _metadata(r: Rows, settings: Settings, folds: Sequence[Fold], wf: WalkForward, meta: MetaFit,
              final_jobs: Sequence[FitJob], final: Sequence[FitOutcome]) -> dict[str, dict[str, Any]]:
    """Per-model metadata: the walk-forward figures by model, the baselines, rounds, barriers, costs."""
    data, lab = r.data, r.data.labels
    baselines = {symbol: {str(h): fit_baselines(lab[f"fut_high_{h}"].to_numpy()[data.symbol == symbol],
                                                lab[f"fut_low_{h}"].to_numpy()[data.symbol == symbol],
                                                r.rv[data.symbol == symbol]) for h in r.horizons}
                 for symbol in data.symbols}
    metadata = {
        "range_predictor": {"quantiles": list(r.cfg.quantiles), "target_scaling": f"{VOL_FEATURE} x sqrt(h)",
                            "baselines": baselines, "baseline_vol_feature": BASELINE_VOL_FEATURE,
                            "metrics": {"walk_forward": _by_model(_RANGE_PREFIXES, wf.wf_rows),
                                        "folds": _by_model(_RANGE_PREFIXES, wf.fold_rows)}},
        "tpsl_classifier": {"metrics": {"walk_forward": _by_model(("tpsl_",), wf.wf_rows),
                                        "folds": _by_model(("tpsl_",), wf.fold_rows)}},
        "signal_classifier": {"metrics": {"walk_forward": _by_model(("classifier_",), wf.wf_rows),
                                          "folds": _by_model(("classifier_",), wf.fold_rows)}},
        "meta_model": {"metrics": {"calibration_holdout": meta.metrics}, "meta_rows": meta.rows},
    }
    rounds_by_model: dict[str, dict[str, int]] = {}
    for job, res in zip(final_jobs, final):
        rounds_by_model.setdefault(job.spec.model, {})[job.spec.name] = res.best_iteration
    for job, res in zip(meta.jobs, meta.outcomes):
        rounds_by_model.setdefault("meta_model", {})[job.spec.name] = res.best_iteration
    walk_forward = _walk_forward_info(r, folds)
    costs = dataclasses.asdict(Costs.from_settings(settings))  # what the labels charged (the ensemble checks)
    for m, md in metadata.items():
        md["walk_forward"] = walk_forward
        md["rounds"] = rounds_by_model.get(m, {})
        md["barrier_models"] = data.barrier_models  # the labels' barriers: serving recomputes them
        md["costs"] = costs
    return metadata


def fit_models(data: Prepared, settings: Settings, engine: Engine) -> TrainOutput:
    """Walk-forward, stack, calibrate and refit; see the module docstring."""
    r = Rows.of(data, settings)
    cfg = r.cfg
    timings: dict[str, float] = {}
    specs = base_specs(settings, data.symbols)
    targets = {spec.name: target_values(spec, data.labels, r.atr) for spec in specs}
    folds = walk_forward_splits(data.open_time, cfg.walk_forward_folds, r.embargo, cfg.min_train_fraction,
                                cfg.validation_fraction)

    t0 = time.perf_counter()
    wf = _walk_forward(r, specs, targets, folds, engine)  # 1.
    timings["fit_walk_forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta = _meta_model(r, wf, settings, engine)  # 2. on out-of-fold predictions only
    timings["fit_meta"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    final_jobs, final = _final_refit(r, specs, targets, _median_rounds(wf.outcomes, wf.jobs), engine)  # 3.
    timings["fit_final"] = time.perf_counter() - t0

    boosters: dict[str, dict[str, bytes]] = {m: {} for m in MODEL_NAMES}
    for job, res in zip(final_jobs, final):
        boosters[job.spec.model][job.spec.name] = res.booster
    for job, res in zip(meta.jobs, meta.outcomes):
        boosters["meta_model"][job.spec.name] = res.booster
    documents = {"meta_model": meta.calibrations, "range_predictor": {INTERVAL_DOCUMENT: wf.intervals}}
    return TrainOutput(boosters, documents, _metadata(r, settings, folds, wf, meta, final_jobs, final), list(folds),
                       wf.oof_rows, timings)
