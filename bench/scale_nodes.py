"""Does adding a node raise the symbols one candle close handles within 5 s? (issue 18 point 5)

    .venv/bin/python bench/scale_nodes.py [--nodes 1,2] [--ladder 100,200,...,1600] [--closes 20] [--start-timeout-s 300]
                                          [--budget-s 5] [--lab-id 218] [--json]      # as root

Per setup (1 node, then 2) a lab cluster of :mod:`scripts.cluster_nodes` -- one Ray node per network
namespace, services through the bridge -- with node ``i`` pinned to CPU core ``i`` (``taskset`` on
``ray start``; every process of the node inherits it): on this machine's 2 cores, 1 node is a
one-core machine and 2 nodes are two. Each size of ``--ladder`` deploys bench/scale.py's graph (the
same replay of 2 real + N-2 synthetic symbols, the same ``step_all`` closes, the same close -> ready
and CPU measurements, :func:`bench.scale.measure_closes`) the way an operator deploys a cluster:
``serve deploy`` of serve_config.yaml with the lab's changes (:func:`scripts.cluster_nodes.lab_serve_config`)
and these, so that the replicas spread over the nodes (:func:`spread_config`):

- EnsembleRouter and each model pool: one replica per node (a fixed count, ``max_replicas_per_node: 1``);
- ApiIngress: one replica per node; MarketFeed on the head (its MarketData actors where Ray puts
  them: soft affinity to MarketFeed's node; each size reports where they ran);
- ``feature_shards`` max(nodes, one per 100 symbols), shard ``i`` on node ``i mod nodes``;
- ``feed_symbols_per_actor`` min(100, symbols / nodes): at least one MarketData actor per node, so a
  close reaches the router as several calls and every router replica gets a share of it.

With one node all of these are the code's defaults. A setup walks its ladder up from the bottom
(a later setup from the previous one's best size), skipping the rungs a proportional estimate keeps
within budget (:func:`walk`), and ends at a size within budget whose next rung is over: close ->
ready p99 over ``--closes`` closes above ``--budget-s`` (its first close over the budget ends it:
with fewer than 100 closes p99 is the slowest close). Printed: per setup the largest size within
the budget (">=" when it is the top rung), its p50 / p99, CPU-ms per symbol-horizon (every process
of every node plus the lab's Redis, not this driver), RSS / PSS of all nodes, where the CPU went
per node; and the ratio of the largest sizes (2 nodes / 1 node).

Needs root (network namespaces). The driver that steps the feed runs inside the head's namespace
(a Ray driver must share a node's address); it is not pinned and its CPU is not counted, nor is the
Redis server's core limited (its CPU is counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.scale import APP, GraphNotStarted, close_row, measure_closes, overrides_for, wait_started  # noqa: E402
from bench.scale_parts import cluster_cpu_groups, cluster_memory_gib, redis_cpu_s  # noqa: E402
from scripts import cluster_nodes as cn  # noqa: E402
from scripts.lab_network import LabNetwork  # noqa: E402

LADDER = (100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1600)
LAB_ID = 218  # 10.213.218.0/24: not the drill's default (7), its test's (201) or docs/operations.md's (12)


def _say(msg: str) -> None:
    print(f"[scale_nodes] {msg}", file=sys.stderr, flush=True)


def layout(symbols: int, nodes: int) -> dict[str, int]:
    """The Settings a cluster of ``nodes`` sets for ``symbols`` (the defaults at one node)."""
    return {"feature_shards": min(symbols, max(nodes, math.ceil(symbols / 100))),
            "feed_symbols_per_actor": min(100, math.ceil(symbols / nodes))}


def spread_config(cfg: dict[str, Any], overrides: dict[str, Any], addresses: list[str], shards: int,
                  shard_options: dict[str, Any], app_name: str = APP) -> dict[str, Any]:
    """The lab's serve config (``cfg``, changed in place and returned) as this benchmark deploys it:
    application ``app_name`` with ``overrides`` as its args, one replica per node of the
    router, each pool and the ingress, FeatureBuilder shard ``i`` on node ``addresses[i % nodes]``
    (``shard_options``: the code's actor options, which a config's replace whole)."""
    from deployments.sharding import shard_name

    nodes = len(addresses)
    app = cfg["applications"][0]
    app.update(name=app_name, route_prefix=f"/{app_name}", args=overrides)
    deps = {d["name"]: d for d in app["deployments"]}
    for name in cn.SCALED:
        deps[name]["autoscaling_config"].update(min_replicas=nodes, initial_replicas=nodes, max_replicas=nodes)
        deps[name]["max_replicas_per_node"] = 1
    deps["ApiIngress"].update(num_replicas=nodes, max_replicas_per_node=1)
    for i in range(shards):
        dep = deps.setdefault(shard_name(i), {"name": shard_name(i)})
        dep["ray_actor_options"] = {**shard_options, "resources": {f"node:{addresses[i % nodes]}": 0.001}}
    app["deployments"] = list(deps.values())
    return cfg


def lab_cpu_groups(lab: LabNetwork, redis_pid: int) -> Callable[[], dict[str, float]]:
    """CPU seconds of every process in the lab's namespaces (but this driver), as ``"node<i> <group>"``,
    and of the lab's Redis."""
    me = os.getpid()

    def groups() -> dict[str, float]:
        out = {"redis-server": redis_cpu_s(redis_pid)}
        for i in range(lab.nodes):
            for g, t in cluster_cpu_groups(p for p in lab.pids(i) if p != me).items():
                out[f"node{i} {g}"] = t
        return out

    return groups


def node_cores(pids: list[int]) -> list[int]:
    """The CPU cores any of ``pids`` may run on (the pinning, checked rather than assumed)."""
    cores: set[int] = set()
    for pid in pids:
        try:
            cores |= os.sched_getaffinity(pid)
        except OSError:  # exited meanwhile
            pass
    return sorted(cores)


def actors_per_node(lab: LabNetwork, class_name: str) -> dict[str, int]:
    """{node address: ALIVE actors of ``class_name``} (the MarketData actors are no Serve replicas)."""
    import httpx

    nodes = cn.alive_nodes(lab)
    r = httpx.get(f"{cn.dashboard(lab)}/api/v0/actors", headers=cn.auth_headers(), timeout=30,
                  params={"limit": 1000, "filter_keys": "class_name", "filter_predicates": "=",
                          "filter_values": class_name, "detail": "true"})
    r.raise_for_status()
    out: dict[str, int] = {}
    for a in r.json()["data"]["result"]["result"]:
        if a.get("state") == "ALIVE":
            ip = nodes.get(a.get("node_id"), "?")
            out[ip] = out.get(ip, 0) + 1
    return dict(sorted(out.items()))


def wait_alone(lab: LabNetwork, app: str, timeout_s: float = 180) -> None:
    """Until ``app`` is the only application (the previous size's teardown must not overlap the closes)."""
    from scripts.rollout import serve_details

    deadline = time.monotonic() + timeout_s
    while set(serve_details(cn.dashboard(lab)).get("applications", {})) != {app}:
        if time.monotonic() > deadline:
            raise SystemExit(f"the previous size's application was not deleted within {timeout_s:.0f} s")
        time.sleep(1)


def run_size(n: int, spec: dict[str, Any], lab: LabNetwork) -> dict[str, Any]:
    """One size on the running lab cluster: deploy, wait until every symbol is published, the closes."""
    from configs.settings import load_settings
    from deployments.sharding import shard_count
    from scripts.cluster_drill import replicas_per_node

    workdir = Path(spec["workdir"])
    ov = {**overrides_for(n, spec["models"], spec["redis_url"], str(workdir / "api_keys"), str(workdir / "spool")),
          **layout(n, lab.nodes)}
    settings = load_settings(**ov)
    symbols, horizons = list(settings.market.symbols), list(settings.market.horizons)
    shards = shard_count(settings.feature_shards, len(symbols))
    base, _ = cn.lab_serve_config(workdir, lab.nodes)
    app = f"{APP}-{n}"  # a new application per size: deploying it deletes the previous one, while this one starts
    cfg = spread_config(yaml.safe_load(base.read_text()), ov, [lab.address(i) for i in range(lab.nodes)], shards,
                        cn.code_actor_options("FeatureBuilder"), app)
    path = workdir / f"serve-{n}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.monotonic()
    cn.serve_deploy(lab, path, workdir)
    open_time, started_s = wait_started(symbols, shards, t0, timeout_s=spec["start_timeout_s"], app=app)
    wait_alone(lab, app)
    _say(f"{lab.nodes} node(s), {n} symbols: every symbol published after {started_s:.0f} s; closing")
    measured = measure_closes(open_time, horizons, spec["closes"], spec["redis_url"],
                              lab_cpu_groups(lab, spec["redis_pid"]), spec["budget_s"], app)
    rss, pss = cluster_memory_gib(p for i in range(lab.nodes) for p in lab.pids(i) if p != os.getpid())
    placement = replicas_per_node(lab, app)
    feed_actors = actors_per_node(lab, "MarketData")
    cores = {f"node{i}": node_cores([p for p in lab.pids(i) if p != os.getpid()]) for i in range(lab.nodes)}
    row = close_row(n, len(horizons), measured)
    node_cpu: dict[str, float] = {}
    for g, t in measured["cpu_groups"].items():
        node_cpu[g.split(" ", 1)[0]] = node_cpu.get(g.split(" ", 1)[0], 0.0) + t
    total = sum(node_cpu.values()) or 1.0
    row.update(nodes=lab.nodes, shards=shards, feed_actors=feed_actors,
               within_budget=not measured["over_budget"] and len(measured["latencies"]) == spec["closes"],
               node_cpu_share={k: round(v / total, 3) for k, v in sorted(node_cpu.items())},
               replicas_per_node=placement, cores_per_node=cores, rss_gib=round(rss, 3), pss_gib=round(pss, 3),
               startup_s=round(started_s, 1))
    return row


def walk(ladder: list[int], start: int, budget_s: float, measure: Callable[[int], float | None]) -> int | None:
    """The largest ladder size within budget; ``measure(n)`` is its p99 seconds, None when over.

    Why it jumps: a size near the limit costs minutes (start-up, then 20 closes of up to 5 s each),
    so rungs that cannot fail are skipped. Close -> ready grows less than in proportion to the size
    (a fixed part per close), so from a size ``n`` within budget at p99 ``p`` every rung up to
    ``n * budget / p`` is expected within too: the walk goes straight to the largest of them (at
    least the next rung); if that one is over, it walks up the skipped rungs one by one. The answer
    is always a measured size within budget whose next rung was measured over (or the top rung).
    From a ``start`` that is itself over, it walks down to the first size within; None when none is."""
    p = measure(ladder[start])
    if p is None:
        return next((n for n in reversed(ladder[:start]) if measure(n) is not None), None)
    i = start
    while i + 1 < len(ladder):
        estimate = ladder[i] * budget_s / max(p, 1e-3)
        j = max((k for k in range(i + 1, len(ladder)) if ladder[k] <= estimate), default=i + 1)
        q = measure(ladder[j])
        if q is None:
            for k in range(i + 1, j):
                if measure(ladder[k]) is None:
                    return ladder[k - 1]
            return ladder[j - 1]
        i, p = j, q
    return ladder[i]


def driver(spec: dict[str, Any]) -> int:
    """Inside the head's namespace: connect, walk the ladder, one JSON line per size to ``results``."""
    import ray

    lab = LabNetwork(spec["lab_id"], spec["nodes"])
    # The head's address as this driver's (its namespace has no default route to guess one from).
    ray.init(address=f"{lab.address(0)}:{cn.RAY_PORT}", _node_ip_address=lab.address(0), log_to_driver=False,
             configure_logging=False)
    results = Path(spec["results"])

    def measure(n: int) -> float | None:
        try:
            row = run_size(n, spec, lab)
        except GraphNotStarted as exc:  # too big to start here (or to fit the nodes' CPUs): over, like a slow close
            row = {"symbols": n, "nodes": lab.nodes, "within_budget": False, "not_started": str(exc),
                   "close_to_ready_p99_s": None, "closes": 0}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        _say(f"{lab.nodes} node(s), {n} symbols: p99 {row['close_to_ready_p99_s']} s over {row['closes']} closes")
        return row["close_to_ready_p99_s"] if row["within_budget"] else None

    walk(spec["ladder"], spec["start"], spec["budget_s"], measure)
    return 0


def run_setup(nodes: int, args: argparse.Namespace, start: int, workdir: Path) -> list[dict[str, Any]]:
    """A lab of ``nodes`` one-core nodes, the driver in its head's namespace; its rows; torn down."""
    lab = LabNetwork(args.lab_id, nodes)
    workdir.mkdir(parents=True, exist_ok=True)
    results = workdir / "results.jsonl"
    lab.up()
    services = None
    try:
        cn.write_secrets(workdir)
        services = cn.LabServices(lab, workdir).start()
        envs = [cn.node_env(lab, services, workdir, i, Path(args.models)) for i in range(nodes)]
        cn.start_ray_nodes(lab, envs, args.cpus_per_node, workdir, cores=list(range(nodes)))
        _say(f"{nodes} node(s) up (cores {list(range(nodes))}), logs in {workdir}")
        spec = {"lab_id": args.lab_id, "nodes": nodes, "models": args.models, "workdir": str(workdir),
                "redis_url": services.redis_url, "redis_pid": services.redis_pid, "ladder": args.ladder,
                "start": start, "closes": args.closes, "budget_s": args.budget_s, "results": str(results),
                "start_timeout_s": args.start_timeout_s}
        # The driver is a client, not a node: Serve's node switches (throughput mode: handles only inside
        # an event loop) stay the nodes'.
        env = {k: v for k, v in envs[0].items() if not k.startswith("RAY_SERVE_")}
        with open(workdir / "driver.log", "w") as log:
            rc = subprocess.call(lab.exec_argv(0, [sys.executable, str(Path(__file__).resolve()), "--driver",
                                                   json.dumps(spec)]),
                                 env=env, stdout=log, stderr=None, timeout=args.setup_timeout_s)
        if rc != 0:
            raise SystemExit(f"the driver of {nodes} node(s) exited {rc}; see {workdir / 'driver.log'}")
        return [json.loads(line) for line in results.read_text().splitlines()]
    finally:
        if services is not None:
            services.stop()
        lab.down()


def summary(nodes: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A setup's largest size within budget, its figures, and the first size over."""
    ok = [r for r in rows if r["within_budget"]]
    best = max(ok, key=lambda r: r["symbols"]) if ok else None
    over = [r for r in rows if not r["within_budget"] and (best is None or r["symbols"] > best["symbols"])]
    return {"nodes": nodes, "cores": nodes, "max_symbols_within_budget": best["symbols"] if best else 0,
            "top_of_ladder": best is not None and not over and best["symbols"] == max(r["symbols"] for r in rows),
            "at_max": best, "first_over": min(over, key=lambda r: r["symbols"]) if over else None, "sizes": rows}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,2", help="comma-separated node counts, one core each (at most the cores)")
    p.add_argument("--ladder", default=",".join(map(str, LADDER)), help="comma-separated symbol counts, ascending")
    p.add_argument("--closes", type=int, default=20, help="measured closes per size (after 2 warm-up closes)")
    p.add_argument("--budget-s", type=float, default=5.0, help="close -> ready p99 a size must stay within")
    p.add_argument("--cpus-per-node", type=int, default=2,
                   help="logical CPUs each one-core node offers Ray: placement tokens (the graph's fractions "
                        "at 300 symbols add up to more than 1); the core pinning is what limits a node")
    p.add_argument("--models", default=str(ROOT / "data" / "models"), help="model registry (default: the shipped set)")
    p.add_argument("--lab-id", type=int, default=LAB_ID, help="lab subnet 10.213.<id>.0/24 and name prefix")
    p.add_argument("--setup-timeout-s", type=float, default=1800, help="give up on a setup after this")
    p.add_argument("--start-timeout-s", type=float, default=300,
                   help="a size whose graph has not published every symbol after this is over the budget")
    p.add_argument("--workdir", default=None, help="logs and per-size configs (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--driver", default=None, help=argparse.SUPPRESS)  # internal: the head namespace's driver
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.driver is not None:
        return driver(json.loads(args.driver))
    setups = [int(x) for x in args.nodes.split(",")]
    args.ladder = [int(x) for x in args.ladder.split(",")]
    if os.geteuid() != 0:
        raise SystemExit("the lab network needs root (ip netns, veth, bridge)")
    if min(setups) < 1 or max(setups) > (os.cpu_count() or 1):
        raise SystemExit(f"--nodes: 1..{os.cpu_count()} (one core per node)")
    if args.ladder != sorted(set(args.ladder)) or args.ladder[0] < 2 or args.closes < 1:
        raise SystemExit("--ladder: ascending symbol counts >= 2; --closes >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a supervisor's SIGTERM still tears the lab down
    out: dict[str, Any] = {"setups": [], "closes": args.closes, "budget_s": args.budget_s, "ladder": args.ladder,
                           "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="mle-scale-nodes-") as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        start = 0
        for nodes in setups:
            s = summary(nodes, run_setup(nodes, args, start, workdir / f"nodes{nodes}"))
            out["setups"].append(s)
            if s["max_symbols_within_budget"]:
                start = args.ladder.index(s["max_symbols_within_budget"])
    best = [s["max_symbols_within_budget"] for s in out["setups"]]
    out["ratio"] = round(best[-1] / best[0], 2) if len(best) > 1 and best[0] else None
    out["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out) if args.json else table(out))
    return 0


def table(out: dict[str, Any]) -> str:
    lines = [f"candle close of every symbol within {out['budget_s']} s (p99 over {out['closes']} closes), "
             f"ladder {out['ladder']}, load average {out['loadavg_start']:.1f} -> {out['loadavg_end']:.1f}",
             "| nodes (1 core each) | max symbols within budget | p50 s | p99 s | CPU-ms / symbol-horizon "
             "| RSS GiB | PSS GiB | first size over: p99 s |", "|" + "---|" * 8]
    for s in out["setups"]:
        r, o = s["at_max"] or {}, s["first_over"]
        over = "-" if o is None else (f"{o['symbols']}: did not start" if "not_started" in o else
                                      f"{o['symbols']}: {o['close_to_ready_p99_s'] or 'no answer'} ({o['closes']} closes)")
        most = (">=" if s["top_of_ladder"] else "") + str(s["max_symbols_within_budget"])
        lines.append(f"| {s['nodes']} | {most} | {r.get('close_to_ready_p50_s', '-')} "
                     f"| {r.get('close_to_ready_p99_s', '-')} | {r.get('cpu_ms_per_symbol_horizon', '-')} "
                     f"| {r.get('rss_gib', '-')} | {r.get('pss_gib', '-')} | {over} |")
    if len(out["setups"]) > 1:
        lines.append(f"ratio (symbols within budget, {out['setups'][-1]['nodes']} nodes / "
                     f"{out['setups'][0]['nodes']}): {out['ratio']}")
    for s in out["setups"]:
        for r in s["sizes"]:
            if "not_started" in r:
                lines.append(f"{s['nodes']} node(s), {r['symbols']} symbols: {r['not_started']}")
                continue
            lines.append(f"{s['nodes']} node(s), {r['symbols']} symbols: p50 {r['close_to_ready_p50_s']} p99 "
                         f"{r['close_to_ready_p99_s']} s, {r['cpu_ms_per_symbol_horizon']} CPU-ms/symbol-horizon, "
                         f"CPU per node {r['node_cpu_share']}, shards {r['shards']}, feed actors {r['feed_actors']}, "
                         f"replicas {r['replicas_per_node']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
