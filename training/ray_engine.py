"""The Ray training engine: the same jobs as the plain engine, run on a Ray cluster.

- Walk-forward and meta-model fits (dozens of small, independent boosters) are fanned out as Ray
  tasks. The data matrix and every target column are put in the object store ONCE per phase and
  shared zero-copy by all tasks, so the fixed costs (serialisation, worker start, imports) are paid
  once, not per model.
- The final boosters are refit in ONE ``ray.train.xgboost.XGBoostTrainer`` run: the data arrives
  through ``ray.data`` (one dataset holding the features and every target), the training function
  fits every final booster on its shard (XGBoost's collective all-reduces histograms when
  ``num_workers`` > 1) and reports once at the end with a single checkpoint holding all of them.
  Reporting per boosting round (``RayTrainReportCallback``) costs ~2 s per round here, and one
  trainer run per booster would pay Ray Train's ~10 s start-up 20 times.

Nothing here changes what is learnt: jobs, rows, parameters and post-processing come from
``training.pipeline`` (the jobs: ``training.engines``); only where the fits run differs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from configs.sections import ModelConfig
from configs.errors import ConfigError
from training.boosters import FitOutcome, fit_booster, xgb_params
from training.engines import FitJob, job_weights, run_fit_job
from training.progress import log, progress

# Worker processes inherit this: passive OpenMP waiting (see training/__init__.py).
_RUNTIME_ENV = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "RAY_USAGE_STATS_ENABLED": "0"}}


def _fit_chunk(jobs: Sequence[FitJob], X: np.ndarray, targets: Mapping[str, np.ndarray], cfg: ModelConfig,
               nthread: int) -> list[FitOutcome]:
    """A Ray task: several fits on the shared (zero-copy) matrix, in order."""
    return [run_fit_job(job, X, targets[job.target], cfg, nthread, job_weights(job, targets)) for job in jobs]


def _cost(job: FitJob) -> float:
    """Rough relative cost of a fit (rows x trees per round x rounds) for balancing chunks."""
    return float(len(job.fit_rows) + len(job.val_rows)) * job.spec.width * (4 if job.spec.kind == "quantile" else 1) \
        * job.rounds


def chunk_jobs(jobs: Sequence[FitJob], n_chunks: int) -> list[list[int]]:
    """Split job indices into ``n_chunks`` groups of similar total cost (longest first, greedy)."""
    groups: list[list[int]] = [[] for _ in range(max(1, min(n_chunks, len(jobs))))]
    load = [0.0] * len(groups)
    for i in sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i])):
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += _cost(jobs[i])
    return [g for g in groups if g]


def _final_train_loop(config: dict[str, Any]) -> None:
    """Ray Train training function: fit every final booster on this worker's shard, report once."""
    import ray.train
    from ray.train import Checkpoint

    t0 = time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    df = shard.materialize().to_pandas().sort_values("row", kind="stable")
    rows = df["row"].to_numpy(np.int64)
    X = df[config["x_columns"]].to_numpy(np.float32)
    t_load = time.perf_counter() - t0
    cfg: ModelConfig = config["cfg"]
    t0 = time.perf_counter()
    fitted: dict[str, tuple[bytes, int]] = {}
    for job in config["jobs"]:
        y = df[f"y:{job.target}"].to_numpy(np.float64)
        mask = np.isin(rows, job.fit_rows) & np.isfinite(y)
        booster, kept = fit_booster(xgb_params(job.spec, cfg, config["nthread"]), job.rounds, X[mask], y[mask])
        fitted[job.key] = (bytes(booster.save_raw("ubj")), kept)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = {"boosters": len(fitted), "worker_data_load_s": t_load, "worker_fit_s": t_fit}
    if ray.train.get_context().get_world_rank() == 0:
        tmp = Path(tempfile.mkdtemp(prefix="mle-final-"))
        manifest = {}
        for i, (key, (raw, kept)) in enumerate(fitted.items()):
            (tmp / f"{i}.ubj").write_bytes(raw)
            manifest[key] = {"file": f"{i}.ubj", "rounds": kept}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        metrics["worker_checkpoint_s"] = time.perf_counter() - t0
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        ray.train.report(metrics)


class RayEngine:
    """Connects to (or starts) a Ray cluster; see the module docstring for what runs where."""

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int = 1, cpus_per_fit: float = 1.0,
                 storage_path: str | None = None) -> None:
        import ray

        t0 = time.perf_counter()
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"configure_logging": False}
            address = address or os.environ.get("RAY_ADDRESS")
            if address is None:
                # A private local cluster. ray.init() without an address would join whatever cluster
                # another user started on this machine; "local" never does.
                address = "local"
                kwargs.update(include_dashboard=False, runtime_env=_RUNTIME_ENV)
            # Joining a cluster (e.g. inside `ray job submit`): keep the job's runtime env as submitted.
            ray.init(address=address, **kwargs)
            self._started = True
        self.num_workers = max(1, int(num_workers))
        self.cpus_per_fit = cpus_per_fit
        self.storage_path = storage_path
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if storage_path is None and len(alive) > 1:
            raise ConfigError(f"the Ray cluster has {len(alive)} nodes: give --storage-path a folder every node can "
                              "reach (NFS, a shared disk or s3://...); a temporary folder exists on one node only")
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self.cluster_cpus = cluster_cpus
        # XGBoost threads per trainer worker: the final refit runs alone, so the node's cores are shared
        # by the workers (their Ray reservation stays 1 CPU each, leaving room for Ray Data).
        self.worker_cpus = max(1.0, float(os.cpu_count() or 1) // self.num_workers)
        self.timings: dict[str, float] = {"cluster_start": time.perf_counter() - t0, "data_load": 0.0,
                                          "checkpoint": 0.0}
        log.info("ray: %s CPUs in the cluster, %d XGBoostTrainer worker(s)", cluster_cpus, self.num_workers)

    def close(self) -> None:
        """Shut down the cluster only if this engine started it (never someone else's)."""
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False

    def fit_many(self, jobs: Sequence[FitJob], matrices: Mapping[str, np.ndarray],
                 targets: Mapping[str, np.ndarray], cfg: ModelConfig, desc: str) -> list[FitOutcome]:
        import ray

        t0 = time.perf_counter()
        xrefs = {k: ray.put(np.ascontiguousarray(v)) for k, v in matrices.items()}
        by_matrix: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_matrix.setdefault(job.matrix, []).append(i)
        self.timings["data_load"] += time.perf_counter() - t0
        task = ray.remote(num_cpus=self.cpus_per_fit, max_retries=1)(_fit_chunk)
        nthread = max(1, int(self.cpus_per_fit))
        # A few tasks per CPU, each running a balanced chunk of fits: enough to keep every core busy
        # and balance uneven fits, few enough that per-task overhead does not matter.
        n_chunks = max(1, int(2 * self.cluster_cpus))
        pending: dict[Any, list[int]] = {}
        for matrix, idx in by_matrix.items():
            sub = [jobs[i] for i in idx]
            keys = {j.target for j in sub} | {j.weight for j in sub if j.weight is not None}
            tref = ray.put({k: targets[k] for k in keys})
            for group in chunk_jobs(sub, n_chunks):
                ref = task.remote([sub[g] for g in group], xrefs[matrix], tref, cfg, nthread)
                pending[ref] = [idx[g] for g in group]
        results: list[FitOutcome | None] = [None] * len(jobs)
        with progress(len(jobs), f"{desc} (ray tasks)") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    where = pending.pop(ref)
                    for i, outcome in zip(where, ray.get(ref)):
                        results[i] = outcome
                    bar.update(len(where))
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def fit_final(self, jobs: Sequence[FitJob], matrices: Mapping[str, np.ndarray],
                  targets: Mapping[str, np.ndarray], cfg: ModelConfig, desc: str) -> list[FitOutcome]:
        import pyarrow as pa
        import ray.data
        from ray.train import RunConfig, ScalingConfig
        from ray.train.xgboost import XGBoostTrainer

        t0 = time.perf_counter()
        ray.data.DataContext.get_current().enable_progress_bars = False  # log noise in CI and job logs
        X = matrices["base"]
        x_columns = [f"x{i}" for i in range(X.shape[1])]
        columns: dict[str, Any] = {"row": np.arange(len(X), dtype=np.int64)}
        columns.update({c: X[:, i] for i, c in enumerate(x_columns)})
        columns.update({f"y:{k}": targets[k] for k in sorted({j.target for j in jobs})})
        dataset = ray.data.from_arrow(pa.table(columns))
        self.timings["data_load"] += time.perf_counter() - t0

        # Ray Train writes the run and its checkpoint under storage_path from whichever node holds the
        # rank-0 worker, and this driver reads the checkpoint back: the folder must be one every node
        # sees. A temporary folder is only that on a single-node cluster (checked in __init__).
        own_storage = self.storage_path is None
        storage = tempfile.mkdtemp(prefix="mle-ray-train-") if own_storage else self.storage_path
        t0 = time.perf_counter()
        trainer = XGBoostTrainer(
            _final_train_loop,
            train_loop_config={"jobs": list(jobs), "cfg": cfg, "x_columns": x_columns,
                               "nthread": max(1, int(self.worker_cpus))},
            # SPREAD: one worker per node where the cluster has the nodes (each brings its own cores);
            # on one node it packs as before.
            scaling_config=ScalingConfig(num_workers=self.num_workers, resources_per_worker={"CPU": 1},
                                         placement_strategy="SPREAD"),
            run_config=RunConfig(name=f"final-refit-{uuid.uuid4().hex[:8]}", storage_path=storage),
            datasets={"train": dataset})
        log.info("%s: one XGBoostTrainer run, %d boosters, %d worker(s)", desc, len(jobs), self.num_workers)
        result = trainer.fit()
        fit_wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        with result.checkpoint.as_directory() as d:
            manifest = json.loads((Path(d) / "manifest.json").read_text())
            raw = {k: ((Path(d) / v["file"]).read_bytes(), int(v["rounds"])) for k, v in manifest.items()}
        if own_storage:
            shutil.rmtree(storage, ignore_errors=True)
        metrics = result.metrics or {}
        self.timings["checkpoint"] += time.perf_counter() - t1 + float(metrics.get("worker_checkpoint_s", 0.0))
        self.timings["trainer_run"] = fit_wall
        self.timings["trainer_worker_fit"] = float(metrics.get("worker_fit_s", float("nan")))
        self.timings["trainer_worker_data_load"] = float(metrics.get("worker_data_load_s", float("nan")))
        return [FitOutcome(job.key, raw[job.key][0], raw[job.key][1], None) for job in jobs]
