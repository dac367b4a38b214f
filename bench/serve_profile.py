"""Where an uncached request's time goes: the miss path of the deployed graph, hop by hop.

    .venv/bin/python bench/serve_profile.py [--models DIR] [--calls 200]

Deploys the whole graph on a private local cluster (in this process; set
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` to profile throughput mode) and times, one call at a time from
the driver's event loop: the whole ensemble in-process (the baseline), one model pool's ``predict``,
the router's pattern driven from outside (three base pools in parallel, then the meta pool; and
with the meta model in-process instead), ``EnsembleRouter.forecast`` itself, a no-op router call,
and HTTP ``/predictions`` cached and with ``Cache-Control: no-cache`` through Serve's proxy.
Printed: p50 per step and its ratio to the in-process baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from inference.layout import BASE_MODELS  # noqa: E402


async def profile(models: str, port: int, key: str, calls: int) -> list[tuple[str, float]]:
    import httpx
    from ray import serve

    from configs.settings import load_settings
    from deployments.model_pools import POOL_NAMES
    from inference.ensemble import Ensemble

    fb = serve.get_deployment_handle("FeatureBuilder", app_name="ml-engine")
    router = serve.get_deployment_handle("EnsembleRouter", app_name="ml-engine")
    handles = {m: serve.get_deployment_handle(n, app_name="ml-engine") for m, n in POOL_NAMES.items()}
    rows: list = []
    for _ in range(180):  # the replay's history reaches the FeatureBuilder
        rows = await fb.latest_rows.remote()
        if rows:
            break
        await asyncio.sleep(1)
    if not rows:
        raise SystemExit("no feature rows after 180 s")
    rows = rows[:1]
    ens = Ensemble.load(models, load_settings(models_dir=models), nthread=1)  # as in the pools
    # each pool call names its model's version (deployments/model_pools.py: @serve.multiplexed)
    pools = {m: h.options(multiplexed_model_id=ens.versions[m]) for m, h in handles.items()}
    feats, symbols = np.vstack([r.features for r in rows]), [r.symbol for r in rows]
    closes, times = [r.close for r in rows], [r.open_time for r in rows]
    X = ens.model_input(feats, symbols)

    async def in_process():
        ens.forecast(feats, symbols, closes, times, 6)

    async def base_outputs():
        out = await asyncio.gather(*(pools[m].predict.remote(X, 6) for m in BASE_MODELS))
        return dict(zip(BASE_MODELS, out))

    async def fan():
        outs = await base_outputs()
        await pools["meta_model"].predict.remote(ens.meta_input(X, outs, 6), 6)

    async def fan_meta_local():
        outs = await base_outputs()
        ens.predict_stage("meta_model", ens.meta_input(X, outs, 6), 6)

    results: list[tuple[str, float]] = []

    async def timeit(name: str, call) -> None:
        for _ in range(20):
            await call()
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - t0) * 1000)
        results.append((name, statistics.median(samples)))

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}) as client:
        body = {"symbol": symbols[0], "horizon": 6}

        async def cached():
            assert (await client.post("/predictions", json=body)).status_code == 200

        async def uncached():
            r = await client.post("/predictions", json=body, headers={"Cache-Control": "no-cache"})
            assert r.status_code == 200, r.text

        await timeit("whole ensemble in-process (baseline)", in_process)
        await timeit("one pool: RangePredictor.predict", lambda: pools["range_predictor"].predict.remote(X, 6))
        await timeit("3 base pools in parallel, then MetaModel", fan)
        await timeit("3 base pools in parallel, meta in-process", fan_meta_local)
        await timeit("EnsembleRouter.forecast", lambda: router.forecast.remote(rows, 6))
        await timeit("EnsembleRouter.status (a hop, no models)", lambda: router.status.remote())
        await timeit("HTTP /predictions, cached", cached)
        await timeit("HTTP /predictions, Cache-Control: no-cache", uncached)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="registry (default Settings.models_dir)")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import secrets

    import ray
    from ray import serve

    from configs.settings import load_settings
    from deployments.app import deploy, start_serve_on_free_port

    models = str(args.models or load_settings().models_dir)
    key = secrets.token_urlsafe(24)
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        port = start_serve_on_free_port("127.0.0.1")
        from deployments.auth import write_api_keys_file

        keys_file = write_api_keys_file(Path(tempfile.mkdtemp(prefix="mle-profile-")) / "api_keys", [key])
        deploy({"models_dir": models, "api_keys_file": str(keys_file), "rate_limit_per_minute": 10**9,
                "replay_speed": 0,
                "replay_history": 10**9, "max_data_age_s": 1e9, "serving_log": "", "serve_access_log": False})
        results = asyncio.run(profile(models, port, key, args.calls))
    finally:
        try:
            serve.shutdown()
        except Exception:  # throughput mode's handles belong to the closed loop; the cluster goes anyway
            pass
        ray.shutdown()
    mode = "throughput-optimized" if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" else "defaults"
    print(f"uncached request profile, Serve {mode}, {args.calls} sequential calls per step, models {models}")
    base = results[0][1]
    for name, p50 in results:
        print(f"  {name:<46} p50 {p50:8.2f} ms  {p50 / base:6.1f}x")
    print("baseline: the whole ensemble in-process, same run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
