"""What one Serve ``DeploymentHandle`` hop costs on this machine: the floor under an uncached request.

    .venv/bin/python bench/serve_hops.py [--calls 300]

A private local cluster runs three no-op deployments, Top -> Mid -> Leaf. Top times, one call at a
time, Mid answering itself (one hop), Mid calling Leaf (two hops), and Mid fanning out to Leaf three
times in parallel and then once more (the shape of the EnsembleRouter's miss path: three base-model
pools, then the meta-model). The cache-miss path of the engine is ingress -> router -> that fan-out,
so its latency cannot go below roughly ``fan`` + one hop, whatever the models cost. Printed: p50 per
shape and its ratio to the one-hop baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
class Leaf:
    async def f(self, x: np.ndarray) -> np.ndarray:
        return x


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
class Mid:
    def __init__(self, leaf) -> None:
        self.leaf = leaf

    async def local(self, x: np.ndarray) -> np.ndarray:
        return x

    async def one(self, x: np.ndarray) -> np.ndarray:
        return await self.leaf.f.remote(x)

    async def fan(self, x: np.ndarray) -> np.ndarray:
        base = await asyncio.gather(*(self.leaf.f.remote(x) for _ in range(3)))
        return await self.leaf.f.remote(base[0])


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
class Top:
    def __init__(self, mid) -> None:
        self.mid = mid

    async def run(self, shape: str, calls: int) -> list[float]:
        x = np.zeros((1, 60))  # one feature row
        out = []
        for _ in range(calls):
            t = time.perf_counter()
            await getattr(self.mid, shape).remote(x)
            out.append((time.perf_counter() - t) * 1000)
        return out


SHAPES = {"local": "Top -> Mid (1 hop)", "one": "Top -> Mid -> Leaf (2 hops)",
          "fan": "Top -> Mid -> 3 x Leaf, then Leaf (the router's miss path + 1 hop)"}
MODES = {"default": {}, "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}


def measure(calls: int) -> dict[str, float]:
    """p50 ms per shape on a private local cluster (this process; Serve flags come from the env).

    Everything runs inside one event loop: throughput mode's handles belong to the loop that first
    uses them, and must be shut down while it still runs."""
    async def drive() -> dict[str, float]:
        handle = await asyncio.to_thread(serve.run, Top.bind(Mid.bind(Leaf.bind())), name="hops", route_prefix=None)
        try:
            await handle.run.remote("fan", 50)  # warm-up
            return {s: statistics.median(await handle.run.remote(s, calls)) for s in SHAPES}
        finally:
            await asyncio.to_thread(serve.shutdown)

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        return asyncio.run(drive())
    finally:
        ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.child:
        print(json.dumps(measure(args.calls)))
        return 0
    results: dict[str, dict[str, float]] = {}
    for mode, env in MODES.items():  # one process per mode: Serve reads its flags at import
        out = subprocess.run([sys.executable, __file__, "--calls", str(args.calls), "--child", mode],
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"{mode} run failed")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["default"]["local"]
    print(f"Serve handle hops, {args.calls} sequential calls per shape, {os.cpu_count()} CPUs "
          "(default = Serve defaults, throughput = RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    print(f"{'shape':<70} {'mode':<11} {'p50 ms':>8} {'ratio':>7}")
    for shape, what in SHAPES.items():
        for mode in MODES:
            v = results[mode][shape]
            print(f"{what:<70} {mode:<11} {v:8.2f} {v / base:6.1f}x")
    print("baseline: one hop with Serve's defaults (ratio 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
