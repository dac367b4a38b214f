"""Where the pipeline's booster fits run: the jobs it hands out and the in-process engine.

``training.pipeline`` decides *what* is fit (``FitJob``: rows, target, rounds); an engine only
decides *where*. ``PlainEngine`` fits in this process; ``training.ray_engine.RayEngine`` runs the
same jobs as Ray tasks and one ``XGBoostTrainer``. Both call :func:`run_fit_job`, so both produce
the same boosters from the same jobs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np

from configs.sections import ModelConfig
from training.boosters import FitOutcome, TargetSpec, fit_booster, predict_raw, xgb_params
from training.progress import progress


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
    """Runs fit jobs; ``timings`` collects what the engine itself costs (cluster start, loading)."""

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
            results: list[FitOutcome | None] = [None] * len(jobs)
            with ThreadPoolExecutor(self.parallel, thread_name_prefix="fit") as pool:
                futures = {pool.submit(one, job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
            return [r for r in results if r is not None]

    fit_final = fit_many
