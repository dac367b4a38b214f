"""``python -m scripts.cluster_drill --nodes 3 --json``: a real multi-node Ray cluster on this machine, used and torn down.

1. builds a lab network (:mod:`scripts.lab_network`: one network namespace per node, veth pairs on
   a bridge, addresses 10.213.<lab-id>.10+i — nothing outside this machine) and starts one Ray
   node in each (the head in the first), with the engine's services reachable through the bridge;
2. ``serve deploy`` of the committed serve_config.yaml (the proxies bound to every node address and
   one ingress replica per node, as a cluster sets them), checks that replicas run on more than one
   node and that every node's HTTP proxy answers ``POST /predictions`` on that node's address;
3. ``ray job submit -- python -m training.train --engine ray --num-workers 2 --storage-path <shared>``:
   one XGBoostTrainer worker per node, checkpoints in a folder every node reaches;
4. a node-loss drill under a steady, bounded load on the head's proxy: every process of one worker
   node is killed (-9: the machine is gone); requests are counted from the kill until Serve runs
   every deployment healthy on the survivors (``failed_during``) and for ``--after-s`` seconds
   after (``failed_after``); every ``signals:{symbol}`` message is collected, and a candle close
   with no message is ``candles_missed``;
5. tears everything down (Ray nodes, namespaces, bridge, its Redis, its database), also on error.

Prints one JSON object (``--json``) and exits 0 only when every goal holds: replicas on more than
one node, every proxy answering, the train workers on two nodes, failed during the drill < 0.1%,
none after, no candle missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from configs.settings import PROJECT_DIR, load_settings
from scripts import cluster_nodes as cn
from scripts.lab_network import LabNetwork
from scripts.loadgen import run_load
from scripts.rollout import wait_http

CANDLE_MS = 300_000
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def _say(msg: str) -> None:
    print(f"[cluster_drill] {msg}", file=sys.stderr, flush=True)


def requests_mix() -> list[dict[str, Any]]:
    return [{"method": "POST", "path": path, "json": {"symbol": s, "horizon": h}}
            for s in SYMBOLS for h in (6, 36) for path in ("/predictions", "/signals")]


def proxies_answering(lab: LabNetwork, key: str) -> dict[str, int]:
    out = {}
    for i in range(lab.nodes):
        try:
            r = httpx.post(f"http://{lab.address(i)}:{cn.HTTP_PORT}/predictions",
                           json={"symbol": "ETHUSDT", "horizon": 18}, headers={"X-API-Key": key}, timeout=15)
            out[lab.address(i)] = r.status_code
        except httpx.HTTPError as exc:
            out[lab.address(i)] = 0
            _say(f"proxy on {lab.address(i)}: {type(exc).__name__}")
    return out


def wait_proxies(lab: LabNetwork, key: str, timeout_s: float) -> dict[str, int]:
    """Every node's proxy status, asked until all answer 200 or ``timeout_s`` has passed: the proxies
    on the other nodes answer once they have learnt the ingress replicas' addresses (a second or
    two after the head's), which a fixed sleep could only guess. The last statuses either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = proxies_answering(lab, key)
        if all(s == 200 for s in statuses.values()) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.5)


def replicas_per_node(lab: LabNetwork, app: str = cn.APP) -> dict[str, dict[str, int]]:
    """{node_ip: {deployment: RUNNING replicas}} of application ``app``."""
    out: dict[str, Counter] = {}
    for dep, replicas in cn.serve_replicas(lab, app).items():
        for r in replicas:
            if r.get("state") == "RUNNING":
                out.setdefault(r.get("node_ip") or "?", Counter())[dep] += 1
    return {ip: dict(sorted(c.items())) for ip, c in sorted(out.items())}


def train_on_cluster(lab: LabNetwork, workdir: Path, rounds: int, folds: int | None = None,
                     max_rows: int | None = None) -> dict[str, Any]:
    """Ray Train on the cluster through the job server; which nodes its workers ran on.

    ``folds`` / ``max_rows`` shrink the walk-forward and every fit (the test's short run: what it
    checks is where Ray put the workers, not the models); None keeps configs/models.yaml's."""
    storage = workdir / "ray-storage"  # every lab node sees this host's disk: the shared folder
    storage.mkdir(exist_ok=True)
    sample = load_settings().sample_dir
    job_id = f"mle-lab{lab.lab_id}-train-{int(time.time())}"
    train = (f"cd {PROJECT_DIR} && {sys.executable} -m training.train --engine ray --num-workers 2 "
             f"--candles {sample / 'BTCUSDT_5m.parquet'} {sample / 'ETHUSDT_5m.parquet'} --rounds {rounds} "
             f"--out {workdir / 'trained'} --no-promote --storage-path {storage} --json"
             + (f" --folds {folds}" if folds is not None else "") + (f" --max-rows {max_rows}" if max_rows else ""))
    t0 = time.monotonic()
    with open(workdir / "train-job.log", "w") as log:
        rc = subprocess.call([cn.ray_cli(), "job", "submit", "--address", cn.dashboard(lab), "--submission-id",
                              job_id, "--", "bash", "-c", train], stdout=log, stderr=subprocess.STDOUT, timeout=900)
    seconds = time.monotonic() - t0
    nodes = cn.alive_nodes(lab)
    r = httpx.get(f"{cn.dashboard(lab)}/api/v0/actors", headers=cn.auth_headers(), timeout=30,
                  params={"limit": 1000, "filter_keys": "class_name", "filter_predicates": "=",
                          "filter_values": "RayTrainWorker", "detail": "true"})
    r.raise_for_status()
    workers = [a for a in r.json()["data"]["result"]["result"]]
    job_hex = _job_hex(lab, job_id)
    ips = sorted({nodes.get(a["node_id"], a["node_id"]) for a in workers if job_hex is None or a.get("job_id") == job_hex})
    return {"exit_code": rc, "seconds": round(seconds, 1), "workers": len(ips) and len(workers), "nodes": ips,
            "checkpoints_in": str(storage), "log": str(workdir / "train-job.log")}


def _job_hex(lab: LabNetwork, submission_id: str) -> str | None:
    r = httpx.get(f"{cn.dashboard(lab)}/api/jobs/{submission_id}", headers=cn.auth_headers(), timeout=30)
    return r.json().get("job_id") if r.status_code == 200 else None


class SignalWatch:
    """Collects the candle of every ``signals:{symbol}`` message (the feed's heartbeat, end to end)."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self._pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(*(f"signals:{s}" for s in SYMBOLS))
        self.seen: dict[str, set[int]] = {s: set() for s in SYMBOLS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=0.5)
            if msg and msg.get("type") == "message":
                body = json.loads(msg["data"])
                self.seen[body["symbol"]].add(int(body["candle_open_time"]))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        out = {}
        for s, times in self.seen.items():
            t = sorted(times)
            missed = sum((b - a) // CANDLE_MS - 1 for a, b in zip(t, t[1:]))
            out[s] = {"candles": len(t), "missed": int(missed)}
        return out


def recovered(lab: LabNetwork, dead_ip: str) -> bool:
    """Serve runs every deployment healthy, with no replica left on the dead node."""
    status, deps = cn.app_status(lab)
    if status != "RUNNING" or any(s != "HEALTHY" for s in deps.values()):
        return False
    return not any(r.get("node_ip") == dead_ip and r.get("state") == "RUNNING"
                   for reps in cn.serve_replicas(lab).values() for r in reps)


async def node_loss(lab: LabNetwork, kill: int, key: str, rate: float, warm_s: float, max_s: float,
                    after_s: float) -> dict[str, Any]:
    """Load on the head's proxy; kill node ``kill`` after ``warm_s``; until recovered, then ``after_s``."""
    stop = asyncio.Event()
    url = f"http://{lab.address(0)}:{cn.HTTP_PORT}"
    load = asyncio.create_task(run_load(url, rate=rate, duration_s=warm_s + max_s + after_s, requests=requests_mix(),
                                        headers={"X-API-Key": key}, timeout_s=10, stop=stop, allowed=lab.contains))
    t0 = time.perf_counter()
    await asyncio.sleep(warm_s)
    t_kill = time.perf_counter() - t0
    killed = lab.kill_node(kill)
    _say(f"killed node {kill} ({lab.address(kill)}): {killed} processes")
    t_rec = None
    while time.perf_counter() - t0 < warm_s + max_s:
        await asyncio.sleep(1)
        if await asyncio.to_thread(recovered, lab, lab.address(kill)):
            t_rec = time.perf_counter() - t0
            break
    end = (t_rec if t_rec is not None else time.perf_counter() - t0) + after_s
    await asyncio.sleep(max(0.0, end - (time.perf_counter() - t0)))
    stop.set()
    result = await load
    during = result.summary(t_kill, t_rec if t_rec is not None else float("inf"))
    after = result.summary(t_rec) if t_rec is not None else {"requests": 0, "failed": 0}
    return {"killed_node": lab.address(kill), "killed_processes": killed, "before": result.summary(0, t_kill),
            "during": during, "after": after, "recovery_s": None if t_rec is None else round(t_rec - t_kill, 1)}


def pick_victim(lab: LabNetwork, per_node: dict[str, dict[str, int]]) -> int:
    """The worker node running the most replicas (never the head: it holds the GCS)."""
    workers = range(1, lab.nodes)
    return max(workers, key=lambda i: sum(per_node.get(lab.address(i), {}).values()))


def deploy_and_train(args: argparse.Namespace, lab: LabNetwork, key: str, workdir: Path,
                     t0: float) -> dict[str, Any]:
    """Steps 2 and 3 on started nodes: deploy, check placement and proxies, train. ``start_s``
    counts from ``t0``, before ``ray start``."""
    config, changes = cn.lab_serve_config(workdir, lab.nodes)
    cn.serve_deploy(lab, config, workdir)
    wait_http(f"http://{lab.address(0)}:{cn.HTTP_PORT}", key, args.start_timeout_s)
    out: dict[str, Any] = {"nodes": lab.nodes, "node_addresses": [lab.address(i) for i in range(lab.nodes)],
                           "serve_config_changes": changes, "start_s": round(time.monotonic() - t0, 1)}
    _say(f"deployed and answering after {out['start_s']} s")
    statuses = wait_proxies(lab, key, args.proxy_timeout_s)
    out["replicas_per_node"] = replicas_per_node(lab)
    out["proxy_statuses"] = statuses
    out["proxies_answering"] = sum(1 for s in statuses.values() if s == 200)
    if args.train:
        out["train"] = train_on_cluster(lab, workdir, args.train_rounds, args.train_folds, args.train_max_rows)
        out["train_workers_nodes"] = out["train"]["nodes"]
        _say(f"trained in {out['train']['seconds']} s on {out['train_workers_nodes']}")
    return out


def run_drill(args: argparse.Namespace, lab: LabNetwork, workdir: Path) -> dict[str, Any]:
    key = cn.write_secrets(workdir)
    services = cn.LabServices(lab, workdir).start()
    try:
        models = Path(args.models_dir or load_settings().models_dir)
        from deployments.launcher import ensure_models

        ensure_models(load_settings(models_dir=models))
        envs = [cn.node_env(lab, services, workdir, i, models) for i in range(lab.nodes)]
        t0 = time.monotonic()
        cn.start_ray_nodes(lab, envs, args.cpus_per_node, workdir)
        out = deploy_and_train(args, lab, key, workdir, t0)
        watch = SignalWatch(services.redis_url)
        victim = pick_victim(lab, out["replicas_per_node"])
        out["killed_node_replicas"] = out["replicas_per_node"].get(lab.address(victim), {})
        drill = asyncio.run(node_loss(lab, victim, key, args.rate, args.warm_s, args.max_recovery_s, args.after_s))
        out["drill"] = drill
        out["signals"] = watch.stop()
        out["requests"] = drill["before"]["requests"] + drill["during"]["requests"] + drill["after"]["requests"]
        out["failed_during"] = drill["during"]["failed"]
        out["failed_after"] = drill["after"]["failed"]
        out["candles_missed"] = sum(v["missed"] for v in out["signals"].values())
        return out
    finally:
        services.stop()


def goals(out: dict[str, Any], train: bool) -> dict[str, bool]:
    during = out["drill"]["during"]
    return {
        "replicas_on_several_nodes": len(out["replicas_per_node"]) > 1,
        "every_proxy_answers": out["proxies_answering"] == out["nodes"],
        "train_workers_on_two_nodes": (not train) or len(out.get("train_workers_nodes", [])) >= 2,
        "recovered": out["drill"]["recovery_s"] is not None,
        "failed_during_below_0.1pct": during["requests"] > 0 and during["failed"] < 0.001 * during["requests"],
        "none_failed_after": out["drill"]["after"]["requests"] > 0 and out["failed_after"] == 0,
        "no_candle_missed": out["candles_missed"] == 0 and all(v["candles"] > 0 for v in out["signals"].values()),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.cluster_drill", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3, help="Ray nodes, one per network namespace (>= 2)")
    p.add_argument("--lab-id", type=int, default=7, help="lab subnet 10.213.<id>.0/24 and name prefix (1..250)")
    p.add_argument("--cpus-per-node", type=int, default=4,
                   help="logical CPUs each node offers Ray (the graph's fractions plus two Ray Train workers)")
    p.add_argument("--models-dir", default=None, help="registry every node loads (default: Settings.models_dir)")
    p.add_argument("--rate", type=float, default=20.0, help="drill load, requests per second (bounded)")
    p.add_argument("--warm-s", type=float, default=10.0, help="load before the node is killed")
    p.add_argument("--max-recovery-s", type=float, default=120.0, help="give up waiting for recovery after this")
    p.add_argument("--after-s", type=float, default=20.0, help="load measured after recovery")
    p.add_argument("--start-timeout-s", type=float, default=300.0, help="deploy until the first 200")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the Ray Train step")
    p.add_argument("--train-rounds", type=int, default=20, help="boosting rounds of the drill's training run")
    p.add_argument("--train-folds", type=int, default=None, help="walk-forward folds of that run (default: models.yaml)")
    p.add_argument("--train-max-rows", type=int, default=None, help="rows per fit of that run (default: models.yaml)")
    p.add_argument("--proxy-timeout-s", type=float, default=30.0, help="wait this long for every node's proxy to answer")
    p.add_argument("--workdir", default=None, help="logs and the shared folder (default var/cluster-drill/lab<id>)")
    p.add_argument("--keep", action="store_true", help="leave the cluster running (tear down with --down)")
    p.add_argument("--down", action="store_true", help="only tear down a kept lab of --lab-id")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        print("error: the lab network needs root (ip netns, veth, bridge)", file=sys.stderr)
        return 2
    if args.nodes < 2:
        print("error: --nodes must be at least 2 (a node is killed)", file=sys.stderr)
        return 2
    lab = LabNetwork(args.lab_id, args.nodes)
    if args.down:
        lab.down()
        return 0
    workdir = Path(args.workdir or PROJECT_DIR / "var" / "cluster-drill" / f"lab{args.lab_id}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _say(f"lab {lab.network}: {args.nodes} nodes, logs in {workdir}")
    # A supervisor's SIGTERM (or a test's timeout) still tears the lab down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lab.up()
    try:
        out = run_drill(args, lab, workdir)
    finally:
        if not args.keep:
            lab.down()
    out["goals"] = goals(out, args.train)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0 if all(out["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
