"""Load benchmark: what `make serve` starts vs the same API as one plain FastAPI + uvicorn process vs a
bare FastAPI app, same run.

    .venv/bin/python bench/serve_load.py [--duration 5] [--models models] [--modes shipped] [--pyspy]

Measures p50 / p99 latency and throughput at concurrency 1, 16 and 64 for cached /predictions,
uncached /predictions (``Cache-Control: no-cache``: the whole ensemble is computed) and /signals, for:

* ``bare``: bench/bare_fastapi.py, a FastAPI app returning a fixed dict (cached /predictions only):
  the floor this machine and HTTP stack give;
* ``plain``: the same API code as one FastAPI + uvicorn process (bench/baseline_fastapi.py);
* ``shipped`` (mode ``shipped``, the default): ``python -m deployments.launcher`` -- exactly what
  ``make serve`` starts: the committed serve_config.yaml (HAProxy + throughput-optimized, access
  log, 60x replay, PostgreSQL log into a private database), with only the per-key rate limit raised
  out of reach in a copy of the config;
* optional modes ``default``, ``ha``, ``ha2``: the graph deployed by code with Serve's default proxy,
  HAProxy, HAProxy with 2 ingress replicas (no access log, no log hook, a static market).

Prints the table, the ratios to ``plain`` and ``bare``, the goals, and a CPU profile (CPU ms per request
by process: load generator, HAProxy, replicas, Redis, PostgreSQL, ... and "other", the machine's
other load), and the memory (RSS / PSS) of every process group, summed for the whole graph; with
``--pyspy``, two more cells per Serve target under py-spy (uncached c=1, cached c=16) say where the replicas' CPU goes
(bench/serve_where.py). Load: wrk (one thread, bounded duration) when installed, else an asyncio aiohttp
client. A 1 s warm-up precedes every measured cell.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import os  # noqa: E402

# Ray reads its auth mode when imported: the heads started here use tokens, so must this driver.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from bench.load_targets import (_CLEANUP, Bare, BareServe, Baseline, PrivateDatabase, PrivateRedis, ServeApp,  # noqa: E402
                                haproxy_env, Shipped)
from bench.serve_where import memory_by_group, print_memory, processes, spy_start, spy_summary  # noqa: E402

ENDPOINTS = (
    ("cached /predictions", "/predictions", {"symbol": "BTCUSDT", "horizon": 6}, {}),
    ("uncached /predictions", "/predictions", {"symbol": "BTCUSDT", "horizon": 6}, {"Cache-Control": "no-cache"}),
    ("/signals", "/signals", {"symbol": "ETHUSDT"}, {}),
)


# ---- load generation ----------------------------------------------------------------------------

@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process group during the run


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsed wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, body: dict, headers: dict[str, str], conc: int, duration: float) -> Result:
    lua = ["wrk.method = \"POST\"", f"wrk.body = {json.dumps(json.dumps(body))}",
           "wrk.headers[\"Content-Type\"] = \"application/json\""]
    lua += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lua) + "\n")
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(duration))}s", "--latency",
                              "--timeout", "10s", "-s", f.name, url], capture_output=True, text=True,
                             timeout=duration + 60).stdout
    finally:
        os.unlink(f.name)
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if "50" not in pct or "99" not in pct:
        raise RuntimeError(f"could not parse wrk's output:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errs.groups())) if errs else 0)
    return Result(rps, _ms(pct["50"]), _ms(pct["99"]), total, errors)


def run_python(url: str, body: dict, headers: dict[str, str], conc: int, duration: float) -> Result:
    """Fallback load generator (asyncio + aiohttp, closed loop, ``conc`` connections)."""
    import aiohttp

    async def go() -> Result:
        lat: list[float] = []
        errors = 0
        stop = time.perf_counter() + duration
        payload = json.dumps(body)
        hdrs = {"Content-Type": "application/json", **headers}

        async def worker(session) -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with session.post(url, data=payload, headers=hdrs) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.perf_counter() - t0)

        conn = aiohttp.TCPConnector(limit=conc)
        async with aiohttp.ClientSession(connector=conn) as session:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(session) for _ in range(conc)))
            wall = time.perf_counter() - t0
        lat.sort()
        return Result(len(lat) / wall, lat[len(lat) // 2] * 1e3, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
                      len(lat), errors)

    return asyncio.run(go())


# ---- CPU accounting (a coarse profile: which processes burn the CPU per request) -----------------

_CLK = os.sysconf("SC_CLK_TCK")
GROUPS = (
    ("load generator", re.compile(r"^wrk\b|serve_load\.py")),
    ("haproxy", re.compile(r"haproxy")),
    ("serve proxy", re.compile(r"ray::ProxyActor|ray::ServeProxy|SERVE_PROXY")),
    ("ingress replica", re.compile(r"ServeReplica:(ml-engine:ApiIngress|bare:BareIngress)")),
    ("router replica", re.compile(r"ServeReplica:ml-engine:EnsembleRouter")),
    ("model pool replicas", re.compile(r"ServeReplica:ml-engine:(RangePredictor|TPSLClassifier|SignalClassifier|MetaModel)")),
    ("other serve replicas", re.compile(r"ServeReplica:ml-engine:|ray::MarketData|ray::ServeController")),
    ("launcher", re.compile(r"deployments\.launcher|deployments\.ray_head")),
    ("baseline process", re.compile(r"baseline_fastapi\.py")),
    ("bare process", re.compile(r"bare_fastapi\.py")),
    ("redis", re.compile(r"redis-server")),
    ("postgresql", re.compile(r"^postgres")),
    ("ray system", re.compile(r"raylet|gcs_server|dashboard|ray/_private|ray\.util|ray::IDLE|default_worker")),
)


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(pid)] = (cmd, (int(parts[11]) + int(parts[12])) / _CLK)
    return out


def cpu_delta(before: dict, after: dict, redis_port: int) -> dict[str, float]:
    groups: dict[str, float] = defaultdict(float)
    for pid, (cmd, t) in after.items():
        dt = t - before.get(pid, (cmd, 0.0))[1]
        if dt <= 0:
            continue
        name = "other (not this benchmark)"
        for label, rx in GROUPS:
            if rx.search(cmd):
                name = label
                break
        if name == "redis" and f":{redis_port}" not in cmd:
            name = "other (not this benchmark)"
        groups[name] += dt
    return dict(groups)


GRAPH_GROUPS = ("haproxy", "serve proxy", "ingress replica", "router replica", "model pool replicas",
                "other serve replicas", "launcher", "ray system")
SPIED = ("ingress replica", "router replica", "model pool replicas")


def profiled_cell(target, key: str, duration: float, loadgen, outdir: Path, endpoint: int = 1, conc: int = 1) -> None:
    """One more cell (not in the table: py-spy slows what it samples) -- by default uncached
    /predictions at c=1 --, with every ingress, router and pool replica recorded; prints where their
    CPU goes."""
    label, path, body, headers = ENDPOINTS[endpoint]
    pids = {g: v for g, v in processes(GROUPS).items() if g in SPIED}
    spies = spy_start(pids, duration + 1, outdir)
    res = loadgen(target.url + path, body, {"X-API-Key": key, **headers}, conc, duration)
    for proc in spies:
        proc.wait(timeout=60)
    print(f"\n{target.name}: {label} c={conc} under py-spy: {res.rps:.1f} req/s, p50 {res.p50_ms:.2f} ms")
    spy_summary(outdir, res.requests)


# ---- the run ---------------------------------------------------------------------------------------

def measure(target, key: str, conc_levels: list[int], duration: float, loadgen, redis_port: int,
            results: dict, endpoints=ENDPOINTS) -> None:
    for label, path, body, headers in endpoints:
        for conc in conc_levels:
            hdrs = {"X-API-Key": key, **headers}
            loadgen(target.url + path, body, hdrs, conc, 1.0)  # warm-up
            before = cpu_snapshot()
            res = loadgen(target.url + path, body, hdrs, conc, duration)
            res.cpu = cpu_delta(before, cpu_snapshot(), redis_port)
            results[(target.name, label, conc)] = res
            print(f"  {target.name:<9} {label:<22} c={conc:<3} {res.rps:9.1f} req/s  p50 {res.p50_ms:8.2f} ms  "
                  f"p99 {res.p99_ms:8.2f} ms  errors {res.errors}", flush=True)


def print_table(results: dict, targets: list[str], conc_levels: list[int]) -> None:
    serve_targets = [t for t in targets if t not in ("plain", "bare")]
    head = f"{'endpoint':<22} {'c':>3} | {'plain req/s':>11} {'p50 ms':>7} {'p99 ms':>7}"
    for t in serve_targets:
        head += f" | {t + ' req/s':>15} {'p50 ms':>7} {'p99 ms':>7} {'x thr':>6} {'x p99':>6}"
    print("\n" + head)
    print("-" * len(head))
    for label, *_ in ENDPOINTS:
        for conc in conc_levels:
            b = results.get(("plain", label, conc))
            if b is None:
                continue
            line = f"{label:<22} {conc:>3} | {b.rps:>11.1f} {b.p50_ms:>7.2f} {b.p99_ms:>7.2f}"
            for t in serve_targets:
                r = results.get((t, label, conc))
                if r is None:
                    line += f" | {'-':>15} {'':>7} {'':>7} {'':>6} {'':>6}"
                    continue
                line += (f" | {r.rps:>15.1f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.rps / b.rps:>6.2f} "
                         f"{r.p99_ms / b.p99_ms:>6.2f}")
            print(line)
    print("x thr = Serve throughput / plain throughput; x p99 = Serve p99 / plain p99 (same run, same machine)")
    errors = {k: r.errors for k, r in results.items() if r.errors}
    if errors:
        print(f"non-2xx / socket errors: {errors}")


def print_vs_bare(results: dict, targets: list[str], conc_levels: list[int]) -> None:
    print("\ncached /predictions against the bare FastAPI app (a fixed dict, same run)")
    for conc in conc_levels:
        b = results.get(("bare", "cached /predictions", conc))
        if b is None:
            continue
        cells = [f"bare {b.rps:.0f} req/s p99 {b.p99_ms:.2f} ms"]
        for t in [t for t in targets if t != "bare"]:
            r = results.get((t, "cached /predictions", conc))
            if r:
                cells.append(f"{t} {r.rps / b.rps:.2f}x thr {r.p99_ms / b.p99_ms:.2f}x p99")
        print(f"  c={conc:<3} " + " | ".join(cells))


def print_goals(results: dict, targets: list[str]) -> None:
    print("\nGoals")
    base = results.get(("plain", "cached /predictions", 16))
    bare = results.get(("bare", "cached /predictions", 16))
    ship = results.get(("shipped", "cached /predictions", 16))
    if bare and ship:
        ok = ship.rps >= 0.5 * bare.rps and ship.p99_ms <= 3 * bare.p99_ms
        print(f"  cached /predictions c=16, shipped (make serve) vs bare FastAPI: {ship.rps / bare.rps:.2f}x "
              f"throughput (goal >= 0.5), p99 {ship.p99_ms / bare.p99_ms:.2f}x (goal <= 3): "
              f"{'MET' if ok else 'NOT MET'}")
    for t in [t for t in targets if t not in ("plain", "bare")]:
        r = results.get((t, "cached /predictions", 16))
        if base and r:
            ok = r.rps >= 0.8 * base.rps and r.p99_ms <= 2 * base.p99_ms
            print(f"  cached /predictions c=16, {t}: {r.rps / base.rps:.2f}x plain throughput (goal >= 0.8), "
                  f"p99 {r.p99_ms / base.p99_ms:.2f}x (goal <= 2): {'MET' if ok else 'NOT MET'}")
        u = results.get((t, "uncached /predictions", 1))
        if u:
            print(f"  uncached /predictions p50 at c=1, {t}: {u.p50_ms:.2f} ms (goal < 10 ms): "
                  f"{'MET' if u.p50_ms < 10 else 'NOT MET'}")
    u = results.get(("plain", "uncached /predictions", 1))
    if u:
        print(f"  (plain, in-process ensemble: uncached p50 at c=1 {u.p50_ms:.2f} ms)")


def served_cpu_ms(r: Result) -> float:
    """CPU ms per request of everything that served it: every group but the load generator and the
    machine's other load (Redis and PostgreSQL included: both targets use them)."""
    spent = sum(v for g, v in r.cpu.items() if g != "load generator" and not g.startswith("other ("))
    return 1000 * spent / max(r.requests, 1)


def print_cost_goals(results: dict, targets: list[str], conc_levels: list[int]) -> None:
    """Issue 18 point 4: CPU per uncached forecast through the graph <= 3x the in-process ensemble's
    (the plain app, same run), cached answers <= 1.5x the plain app's CPU per request."""
    print("\nCost per request (CPU ms of everything that served it, load generator excluded)")
    for label, goal in (("cached /predictions", 1.5), ("uncached /predictions", 3.0)):
        for conc in conc_levels:
            base = results.get(("plain", label, conc))
            if base is None:
                continue
            cells = [f"plain {served_cpu_ms(base):.2f}"]
            for t in [t for t in targets if t != "plain"]:
                r = results.get((t, label, conc))
                if r is not None and r.requests:
                    ratio = served_cpu_ms(r) / max(served_cpu_ms(base), 1e-9)
                    mark = "" if t in ("bare", "bare-serve") else f" ({'MET' if ratio <= goal else 'NOT MET'})"
                    cells.append(f"{t} {served_cpu_ms(r):.2f} = {ratio:.2f}x{mark}")
            print(f"  {label:<22} c={conc:<3} goal <= {goal:g}x plain: " + " | ".join(cells))


def print_profile(results: dict, targets: list[str], conc: int = 16) -> None:
    print(f"\nCPU profile: CPU ms per request by process group during the c={conc} runs "
          "(2 cores = 2000 CPU ms per wall second)")
    groups = [g for g, _ in GROUPS] + ["other (not this benchmark)"]
    for label in ("cached /predictions", "uncached /predictions"):
        print(f"  {label}")
        for t in targets:
            r = results.get((t, label, conc))
            if r is None or not r.requests:
                continue
            parts = [(g, 1000 * r.cpu.get(g, 0.0) / r.requests) for g in groups if r.cpu.get(g, 0.0) > 0]
            parts.sort(key=lambda x: -x[1])
            total = sum(v for g, v in parts if not g.startswith("other"))
            shown = ", ".join(f"{g} {v:.2f}" for g, v in parts[:7])
            print(f"    {t:<9} total (ours) {total:.2f} ms/req: {shown}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured cell (plus 1 s warm-up)")
    p.add_argument("--models", type=Path, default=None, help="registry (default Settings.models_dir; trained if empty)")
    p.add_argument("--modes", default="shipped",
                   help="shipped (what make serve starts), and/or the graph deployed by code: default (Serve's "
                        "default proxy), ha (HAProxy + throughput-optimized), ha2 (the same, 2 ingress replicas)")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--bare-serve", action="store_true",
                   help="also the bare app as a Serve deployment behind HAProxy: Serve's own floor per request")
    p.add_argument("--pyspy", action="store_true",
                   help="after a Serve target's cells, two more (untimed) under py-spy, uncached c=1 and cached "
                        "c=16: where their CPU goes")
    args = p.parse_args(argv)
    from configs.settings import load_settings
    from deployments.launcher import ensure_models

    settings = load_settings(**({"models_dir": args.models} if args.models else {}))
    ensure_models(settings)
    models = settings.models_dir
    conc_levels = [int(c) for c in args.concurrency.split(",")]
    loadgen = run_wrk if shutil.which("wrk") else run_python
    key = secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="mle-bench-"))
    redis = PrivateRedis(workdir)
    print(f"load generator: {'wrk' if loadgen is run_wrk else 'python aiohttp'}; {args.duration:g} s per cell; "
          f"models {models}; private redis :{redis.port}; machine: {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    results: dict = {}
    memory: dict[str, dict] = {}
    targets = ["bare", "plain"]
    cached = [e for e in ENDPOINTS if e[0] == "cached /predictions"]
    database = None
    try:
        print("bare FastAPI + uvicorn (a fixed dict)", flush=True)
        bare = Bare()
        try:
            measure(bare, key, conc_levels, args.duration, loadgen, redis.port, results, endpoints=cached)
        finally:
            bare.stop()
        if args.bare_serve:
            print("bare-serve: the same fixed dict as a Serve ingress behind HAProxy (throughput mode)", flush=True)
            bare_serve = BareServe(workdir)
            targets.append(bare_serve.name)
            try:
                measure(bare_serve, key, conc_levels, args.duration, loadgen, redis.port, results, endpoints=cached)
            finally:
                bare_serve.stop()
        print("plain FastAPI + uvicorn (one process, the same API code)", flush=True)
        base = Baseline(models, key, redis.url)
        try:
            measure(base, key, conc_levels, args.duration, loadgen, redis.port, results)
            memory["plain"] = memory_by_group(GROUPS, redis.port)
        finally:
            base.stop()
        modes = {  # name, environment, ingress replicas, description
            "default": ("serve", {}, 1, "defaults"),
            "ha": ("serve-ha", haproxy_env(workdir), 1, "HAProxy + throughput-optimized"),
            "ha2": ("serve-ha2", haproxy_env(workdir), 2, "HAProxy + throughput-optimized, 2 ingress replicas"),
        }
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode == "shipped":
                print("make serve (python -m deployments.launcher, the committed serve_config.yaml)", flush=True)
                database = database or PrivateDatabase()
                app = Shipped(models, key, redis.url, database.url, workdir)
            else:
                name, env_extra, replicas, what = modes[mode]
                print(f"Ray Serve ({what})", flush=True)
                app = ServeApp(name, env_extra, models, key, redis.url, workdir, ingress_replicas=replicas)
            targets.append(app.name)
            try:
                measure(app, key, conc_levels, args.duration, loadgen, redis.port, results)
                memory[app.name] = memory_by_group(GROUPS, redis.port)
                if args.pyspy:  # a miss alone, then cached answers under load: where each one's CPU goes
                    for endpoint, conc in ((1, 1), (0, 16)):
                        profiled_cell(app, key, args.duration, loadgen, endpoint=endpoint, conc=conc,
                                      outdir=Path(tempfile.mkdtemp(prefix=f"mle-spy-{app.name}-{endpoint}-")))
            finally:
                app.stop()
    finally:
        redis.stop()
        if database is not None:
            database.stop()
        for d in [workdir, *_CLEANUP]:
            shutil.rmtree(d, ignore_errors=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print_table(results, targets, conc_levels)
    print_vs_bare(results, targets, conc_levels)
    print_goals(results, targets)
    print_cost_goals(results, targets, conc_levels)
    for conc in conc_levels:  # c=1: every miss is its own pass; c=16: concurrent misses are batched
        print_profile(results, targets, conc)
    for name, mem in memory.items():
        print_memory(name, mem, ("baseline process",) if name == "plain" else GRAPH_GROUPS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
