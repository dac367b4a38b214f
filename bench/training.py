"""Training benchmark: the plain path vs the Ray path on the same candles, in the same run.

    .venv/bin/python bench/training.py                       # full shared history, configs/models.yaml
    .venv/bin/python bench/training.py --rounds 60 --max-rows 30000   # a shorter run

Each path runs as the operator runs it (``python -m training.train ... --json`` in a subprocess, so
imports, cluster start and saving are all counted) and writes to a throw-away registry. Printed:
wall times, the Ray/plain ratio (goal: <= 1.5 on this 2-core machine) and the breakdown of each
path (cluster start, data load, fitting, checkpointing). The two runs execute one after the other
on a machine shared with other work, so compare ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "data" / "sample"


def candle_files() -> list[str]:
    base = SHARED if all((SHARED / f"{s}_5m.parquet").exists() for s in ("BTCUSDT", "ETHUSDT")) else SAMPLE
    return [str(base / f"{s}_5m.parquet") for s in ("BTCUSDT", "ETHUSDT")]


def run(engine: str, files: list[str], out: Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "training.train", "--engine", engine, "--candles", *files, "--out", str(out),
           "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{engine} training failed ({proc.returncode})")
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    return wall, summary


def breakdown(wall: float, t: dict) -> dict[str, float]:
    """Wall time split into the phases the issue asks for (seconds)."""
    loading = t.get("data_prepare", 0.0) + t.get("data_load", 0.0)
    checkpoint = t.get("checkpoint", 0.0) + t.get("save", 0.0)
    fitting = t["fit_walk_forward"] + t["fit_meta"] + t["fit_final"] - t.get("data_load", 0.0) - t.get("checkpoint", 0.0)
    start = t.get("cluster_start", 0.0)
    return {"cluster start": start, "data load": loading, "fitting": fitting, "checkpointing": checkpoint,
            "other (imports, metrics, process)": wall - start - loading - fitting - checkpoint}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, help="override models.num_boost_round")
    p.add_argument("--max-rows", type=int, help="override models.max_train_rows")
    p.add_argument("--folds", type=int, help="override models.walk_forward_folds")
    p.add_argument("--num-workers", type=int, default=1, help="XGBoostTrainer workers")
    args = p.parse_args()
    extra: list[str] = []
    for flag, value in (("--rounds", args.rounds), ("--max-rows", args.max_rows), ("--folds", args.folds)):
        if value is not None:
            extra += [flag, str(value)]
    files = candle_files()
    tmp = Path(tempfile.mkdtemp(prefix="mle-bench-training-"))
    try:
        print(f"candles: {', '.join(files)}")
        print(f"settings overrides: {' '.join(extra) or '(none: configs/models.yaml)'}")
        plain_wall, plain = run("plain", files, tmp / "plain", extra)
        ray_wall, ray_ = run("ray", files, tmp / "ray", extra + ["--num-workers", str(args.num_workers)])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"rows: {plain['rows']} (both symbols)")
    print(f"plain path: {plain_wall:8.1f} s wall")
    print(f"ray path:   {ray_wall:8.1f} s wall  ({args.num_workers} XGBoostTrainer worker(s))")
    print(f"ratio ray/plain: {ray_wall / plain_wall:.2f}x  (goal <= 1.5x)")
    for name, wall, summary in (("plain", plain_wall, plain), ("ray", ray_wall, ray_)):
        print(f"{name} breakdown:")
        for k, v in breakdown(wall, summary["timings"]).items():
            print(f"  {k:<36} {v:8.1f} s  ({v / wall:5.1%})")
    t = ray_["timings"]
    if "trainer_run" in t:
        print(f"ray detail: XGBoostTrainer run {t['trainer_run']:.1f} s, of which the worker fitted "
              f"{t['trainer_worker_fit']:.1f} s and loaded its ray.data shard {t['trainer_worker_data_load']:.1f} s; "
              f"walk-forward tasks {t['fit_walk_forward']:.1f} s vs plain {plain['timings']['fit_walk_forward']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
