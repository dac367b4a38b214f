"""``python -m scripts.drills``: fault drills under a steady bounded load, each printing what it measured.

    python -m scripts.drills --address http://127.0.0.1:8265 --url http://127.0.0.1:8000 --api-key "$KEY"

Against a running application (``serve deploy serve_config.yaml`` first, or ``scripts.rollout``),
with an open-loop load on loopback (scripts/loadgen.py) running through every drill:

1. **model replica**: SIGKILL the process of one ``RangePredictor`` replica (its PID from Ray's state
   API) — Serve notices the dead actor and starts a replacement;
2. **feature builder**: SIGKILL the ``FeatureBuilder`` replica — Serve restarts it;
3. **MarketData actor**: SIGKILL ``--market-symbol``'s ``MarketData`` actor — the ``MarketFeed``
   deployment's health check spawns a new one, which resumes after the newest candle the
   FeatureBuilder holds (a replay from the next candle of its file, Binance with a REST backfill).

For each drill: requests and failures *during* the drill (from the kill until the deployment is
HEALTHY again with its replicas RUNNING, goal < 0.1%), and *after recovery* (the next
``--after-s`` seconds, goal 0), the recovery time, and for the MarketData drill whether the
FeatureBuilder's candle history of every symbol (the killed one included) is still contiguous (no
candle missed) and has moved past the candle that was current at the kill. Exit status 0 only when every goal is met.

Only processes of the application under test are signalled, by PID; nothing else is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from scripts.loadgen import LoadResult, run_load
from scripts.rollout import app_state

SYMBOLS = ("BTCUSDT", "ETHUSDT")


def connect(gcs_address: str | None) -> None:
    # Token auth (Ray 2.5x): a driver sends ~/.ray/auth_token only in explicit token mode, and the
    # mode is read when Ray initialises its config, so set it before ray is imported.
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if not ray.is_initialized():
        ray.init(address=gcs_address or "auto", namespace="serve", logging_level="ERROR", log_to_driver=False)


def my_actor_pids(title: str) -> list[int]:
    """PIDs of this cluster's actor processes titled ``title`` (e.g. "ray::MarketData").

    Found as children of *this* cluster's raylet (its session directory is on the raylet's command
    line), so another Ray cluster on the same machine is never touched. Used for actors that are not
    Serve replicas (Serve's own status lists replica PIDs).
    """
    import psutil
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    pids = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info.get("name") == "raylet" and any(session in part for part in cmd):
            for child in proc.children(recursive=True):
                try:
                    if " ".join(child.cmdline()).split(" ")[0].split(".")[0] == title:
                        pids.append(child.pid)
                except psutil.Error:
                    pass
    return sorted(pids)


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def replica_counts(address: str, app: str) -> dict[str, int]:
    _, deps = app_state(address, app)
    return {name: n for name, (_, n) in deps.items()}


def serve_replica(address: str, app: str, deployment: str) -> dict[str, Any]:
    """A RUNNING replica of ``deployment`` as Serve sees it (pid, actor name)."""
    from scripts.rollout import serve_details

    replicas = serve_details(address)["applications"][app]["deployments"][deployment]["replicas"]
    return next(r for r in replicas if r["state"] == "RUNNING")


def replica_pids(address: str, app: str) -> set[int]:
    from scripts.rollout import serve_details

    deps = serve_details(address)["applications"][app]["deployments"]
    return {r.get("pid") for d in deps.values() for r in d.get("replicas", []) if r.get("state") == "RUNNING"}


def wait_recovered(address: str, app: str, want: dict[str, int], timeout_s: float,
                   extra: Any = None, dead_pid: int | None = None) -> float:
    """Until the killed replica is gone from Serve's view, every deployment is HEALTHY again with its
    replica count RUNNING, and ``extra()`` holds."""
    t0 = time.monotonic()
    while True:
        status, deps = app_state(address, app)
        ok = status == "RUNNING" and all(deps.get(n, ("", 0)) == ("HEALTHY", c) for n, c in want.items())
        if ok and dead_pid is not None:
            ok = dead_pid not in replica_pids(address, app)
        if ok and (extra is None or extra()):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"not recovered after {timeout_s:.0f}s: {status} {deps}")
        time.sleep(0.5)


def feature_history(app: str, symbol: str) -> dict[str, Any]:
    """The FeatureBuilder's view of ``symbol``: newest candle, contiguous history length, gaps."""
    from ray import serve

    snap = serve.get_deployment_handle("FeatureBuilder", app_name=app).snapshot.remote(-1, 0.1).result(timeout_s=30)
    st = snap.symbols[symbol]
    return {"open_time": st.open_time, "history": st.history, "gaps": st.gaps}


def market_status(app: str, symbol: str) -> dict[str, Any]:
    from ray import serve

    feed = serve.get_deployment_handle("MarketFeed", app_name=app)
    return feed.status.remote().result(timeout_s=30)["symbols"][symbol]


async def drill(name: str, kill, recovered, load_t0: float, args: argparse.Namespace,
                checks=None) -> dict[str, Any]:
    t_kill = time.perf_counter() - load_t0
    before = await asyncio.to_thread(checks) if checks else None
    victim = await asyncio.to_thread(kill)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: killed {victim}", flush=True)
    rec_s = await asyncio.to_thread(recovered)
    t_rec = time.perf_counter() - load_t0
    print(f"[{time.strftime('%H:%M:%S')}] {name}: recovered after {rec_s:.1f}s", flush=True)
    await asyncio.sleep(args.after_s)
    after = await asyncio.to_thread(checks) if checks else None
    return {"drill": name, "victim": victim, "t_kill": t_kill, "t_recovered": t_rec,
            "t_after_end": time.perf_counter() - load_t0, "recovery_s": round(rec_s, 1),
            "before": before, "after": after}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    connect(args.gcs_address)
    app, address = args.app, args.address
    key = args.api_key or os.environ.get("MLE_API_KEYS", "").split(",")[0]
    r = httpx.post(f"{args.url}/predictions", json={"symbol": "BTCUSDT", "horizon": 6},
                   headers={"X-API-Key": key}, timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"the application does not answer predictions: {r.status_code} {r.text[:300]}")
    baseline = replica_counts(address, app)
    requests = [{"method": "POST", "path": path, "json": {"symbol": s, "horizon": h}}
                for path in ("/predictions", "/signals") for s in SYMBOLS for h in args.horizons]
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(args.url, rate=args.rate, duration_s=args.max_duration_s, requests=requests,
                                        headers={"X-API-Key": key}, timeout_s=10, stop=stop))
    t0 = time.perf_counter()
    await asyncio.sleep(args.warmup_s)
    results = []

    killed: dict[str, int] = {}

    def healthy() -> float:
        return wait_recovered(address, app, baseline, args.timeout_s, dead_pid=killed.get("pid"))

    if "replica" in args.drills:
        def kill_replica() -> str:
            victim = serve_replica(address, app, args.replica)
            killed["pid"] = victim["pid"]
            kill_pid(victim["pid"])
            return f"{args.replica} replica pid {victim['pid']}"
        results.append(await drill("model replica", kill_replica, healthy, t0, args))

    if "feature_builder" in args.drills:
        def kill_fb() -> str:
            victim = serve_replica(address, app, "FeatureBuilder")
            killed["pid"] = victim["pid"]
            kill_pid(victim["pid"])
            return f"FeatureBuilder replica pid {victim['pid']}"
        results.append(await drill("feature builder", kill_fb, healthy, t0, args))

    if "market_data" in args.drills:
        def kill_md() -> str:
            # MarketData actors are unnamed (one per symbol, owned by MarketFeed): find the symbol's
            # actor by the PID its status reports, among this cluster's MarketData processes.
            pids = my_actor_pids("ray::MarketData")
            symbol = args.market_symbol
            pid = int(market_status(app, symbol)["pid"])
            if pid not in pids:
                raise SystemExit(f"{symbol}'s MarketData pid {pid} is not a MarketData process of this cluster {pids}")
            killed["md_pid"] = pid
            kill_pid(pid)
            return f"{symbol} MarketData actor pid {pid}"

        def md_back() -> float:
            def delivering() -> bool:  # a new actor (another pid) streams the killed symbol again
                try:
                    st = market_status(app, args.market_symbol)
                    return st.get("running") and st.get("pid") != killed["md_pid"] and st.get("delivered", 0) > 0
                except Exception:
                    return False
            return wait_recovered(address, app, baseline, args.timeout_s, extra=delivering)

        results.append(await drill("MarketData actor", kill_md, md_back, t0, args,
                                   checks=lambda: {s: feature_history(app, s) for s in SYMBOLS}))

    stop.set()
    result: LoadResult = await load
    report = {"rate_per_s": args.rate, "drills": []}
    for d in results:
        during = result.summary(d["t_kill"], d["t_recovered"])
        after = result.summary(d["t_recovered"], d["t_after_end"])
        entry = {"drill": d["drill"], "victim": d["victim"], "recovery_s": d["recovery_s"],
                 "during": during, "after_recovery": after,
                 "goal_met": during["failed_pct"] < 0.1 and after["failed"] == 0}
        if d["before"] is not None:
            b, a = d["before"], d["after"]
            entry["candles"] = {"before": b, "after": a, "killed_symbol": args.market_symbol,
                                "advanced": all(a[s]["open_time"] is not None and b[s]["open_time"] is not None
                                                and a[s]["open_time"] > b[s]["open_time"] for s in SYMBOLS),
                                "contiguous": all(a[s]["gaps"] == b[s]["gaps"] and a[s]["history"] >= b[s]["history"]
                                                  for s in SYMBOLS)}
            entry["goal_met"] = entry["goal_met"] and entry["candles"]["advanced"] and entry["candles"]["contiguous"]
        report["drills"].append(entry)
    report["total"] = result.summary()
    report["engine"] = await asyncio.to_thread(engine_counters, app)
    return report


def engine_counters(app: str) -> dict[str, Any]:
    """What the engine says it did about the kills: model-pool calls the router computed itself, and
    per symbol the MarketData actors started after a death and where the current one resumed."""
    from ray import serve

    out: dict[str, Any] = {}
    try:
        router = serve.get_deployment_handle("EnsembleRouter", app_name=app)
        out["pool_fallbacks"] = router.status.remote().result(timeout_s=30).get("pool_fallbacks")
        feed = serve.get_deployment_handle("MarketFeed", app_name=app).status.remote().result(timeout_s=30)
        out["feed"] = {s: {k: st.get(k) for k in ("respawns", "resumed_after", "restarts", "stale")}
                       for s, st in feed["symbols"].items()}
    except Exception as exc:  # an engine without these counters: the drill's figures still stand
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.drills", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"))
    p.add_argument("--gcs-address", default=None, help="Ray GCS address (default: auto)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--app", default="ml-engine")
    p.add_argument("--api-key", default=None)
    p.add_argument("--drills", nargs="+", default=["replica", "feature_builder", "market_data"],
                   choices=["replica", "feature_builder", "market_data"])
    p.add_argument("--replica", default="RangePredictor", help="the model deployment whose replica is killed")
    p.add_argument("--market-symbol", default="BTCUSDT", choices=SYMBOLS,
                   help="the symbol whose MarketData actor is killed")
    p.add_argument("--horizons", nargs="+", type=int, default=[6, 18, 36, 72])
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--after-s", type=float, default=15.0, help="load measured after each recovery")
    p.add_argument("--max-duration-s", type=float, default=900.0)
    p.add_argument("--timeout-s", type=float, default=240.0)
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"\nfault drills under load, {args.rate:.0f} req/s")
        print(f"{'drill':<18}{'recovery s':>11}{'during: req':>13}{'failed':>8}{'%':>8}{'after: req':>12}{'failed':>8}  goal")
        for d in report["drills"]:
            du, af = d["during"], d["after_recovery"]
            print(f"{d['drill']:<18}{d['recovery_s']:>11.1f}{du['requests']:>13}{du['failed']:>8}"
                  f"{du['failed_pct']:>8.3f}{af['requests']:>12}{af['failed']:>8}  {'met' if d['goal_met'] else 'MISSED'}")
            if "candles" in d:
                c = d["candles"]
                print(f"{'':<18}candles: {c['before']} -> {c['after']}; advanced={c['advanced']} "
                      f"contiguous={c['contiguous']}")
            if du["failed"] or af["failed"]:
                print(f"{'':<18}errors: {'; '.join(du['errors'] + af['errors'])}")
        t = report["total"]
        print(f"{'total':<18}{'':>11}{t['requests']:>13}{t['failed']:>8}{t['failed_pct']:>8.3f}")
        print(f"engine: {report['engine']}")
    return 0 if all(d["goal_met"] for d in report["drills"]) else 1


if __name__ == "__main__":
    sys.exit(main())
