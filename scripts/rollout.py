"""``python -m scripts.rollout``: roll out under a steady load and count every request (goal: zero failed).

    ray start --head --port 6380 --dashboard-port 8265          # a running head
    python -m scripts.rollout --address http://127.0.0.1:8265 --config serve_config.yaml \\
        --models-dir models --api-key "$KEY"

What it does, against a running Ray head (it starts nothing but Serve applications and stops nothing):

1. ``serve deploy`` the config (the application comes up; the script waits until every deployment
   is HEALTHY and a prediction answers 200);
2. starts a steady open-loop load on loopback: POST /predictions and /signals for every symbol and
   horizon, ``--rate`` requests per second (scripts/loadgen.py);
3. **model version change**, twice: promotes another trained version in the registry (the serving
   graph watches the ``current`` pointers and swaps with no restart) and back; then ``serve deploy``s
   the config with ``EnsembleRouter``'s ``user_config.model_versions`` pinned to that version (the
   router's ``reconfigure``, no restart) and deploys the original (``null``: follow the registry)
   again — each time waiting until the answers carry the expected version;
4. **live tunables**: ``serve deploy``s the config with new ``user_config`` values for the ingress
   (rate limit), the router (poll interval) and the pools (batch size and wait) and checks that
   every deployment kept its replicas (Serve replica ids unchanged: reconfigure, no restart);
5. **replica count change**: writes the config with one more replica for ``--scale-deployment`` (its
   ``num_replicas``, or ``min_replicas``/``initial_replicas`` under autoscaling) and ``serve deploy``s
   it, waits until the new replica is RUNNING, then deploys the original config again (scale back);
6. keeps the load running ``--settle-s`` more seconds, stops it, and prints per phase the requests
   sent and the failed ones (transport errors, timeouts, any non-2xx), with latency percentiles.

Exit status 0 only when no request failed. ``--args KEY=VALUE`` adds Settings overrides to the
application's ``args`` (e.g. a private Redis URL, the HTTP port comes from ``--http-port``).
``--api-key`` reaches the application as ``api_keys_file`` (a 0600 file in the run's temporary
folder, so the head must be on this machine); without it the head's ``MLE_API_KEYS`` is used.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from deployments.auth import write_api_keys_file
from scripts.loadgen import LoadResult, run_load
from inference.registry import MODEL_NAMES, ModelRegistry

PHASES = ("steady", "model_version", "tunables", "replicas_up", "replicas_down", "settle")
# What the tunables phase sets through user_config (deployments/tunables.py): no replica may restart.
POOLS = ("RangePredictor", "TPSLClassifier", "SignalClassifier", "MetaModel")
TUNED: dict[str, dict[str, Any]] = {"ApiIngress": {"rate_limit_per_minute": 1_000_000},
                                    "EnsembleRouter": {"model_poll_s": 1.0},
                                    **{pool: {"batch_max_size": 32, "batch_wait_s": 0.002} for pool in POOLS}}


# ---------------------------------------------------------------------------------------------
# Serve control (the CLI for deploys, the dashboard's REST API for status)
# ---------------------------------------------------------------------------------------------

def serve_bin() -> str:
    return str(Path(sys.executable).parent / "serve")


def cli_env() -> dict[str, str]:
    """The environment for Ray/Serve CLIs: Ray 2.5x clusters use token auth, and unlike the ``ray``
    CLI, ``serve`` only sends the token (~/.ray/auth_token) when RAY_AUTH_MODE=token is set."""
    env = dict(os.environ)
    if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    return env


def serve_deploy(config: Path, address: str) -> None:
    """``serve deploy CONFIG --address ADDRESS`` (what an operator runs)."""
    t0 = time.monotonic()
    while True:
        result = subprocess.run([serve_bin(), "deploy", str(config), "--address", address],
                                capture_output=True, text=True, timeout=120, env=cli_env())
        if result.returncode == 0:
            return
        # A head started seconds ago may not have its dashboard agent yet.
        if "No available agent" not in result.stderr or time.monotonic() - t0 > 120:
            raise RuntimeError(f"serve deploy failed: {result.stderr[-2000:]}")
        time.sleep(2)


def serve_details(address: str) -> dict[str, Any]:
    """``serve status`` as JSON, from the dashboard's REST API (bearer token when the cluster uses one)."""
    token = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}
    r = httpx.get(f"{address}/api/serve/applications/", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()


def app_state(address: str, app: str) -> tuple[str, dict[str, tuple[str, int]]]:
    """(application status, {deployment: (status, running replicas)})."""
    details = serve_details(address).get("applications", {}).get(app)
    if not details:
        return "NOT_STARTED", {}
    deps = {name: (d["status"], sum(1 for r in d.get("replicas", []) if r["state"] == "RUNNING"))
            for name, d in details.get("deployments", {}).items()}
    return details["status"], deps


def replica_ids(address: str, app: str) -> dict[str, set[str]]:
    """The RUNNING replicas of each deployment, by Serve's replica id (a restart makes a new one)."""
    deps = serve_details(address).get("applications", {}).get(app, {}).get("deployments", {})
    return {name: {r["replica_id"] for r in d.get("replicas", []) if r["state"] == "RUNNING"}
            for name, d in deps.items()}


def wait_running(address: str, app: str, timeout_s: float, want: dict[str, int] | None = None) -> float:
    """Wait until the application is RUNNING, every deployment HEALTHY (and ``want`` replica counts)."""
    t0 = time.monotonic()
    while True:
        status, deps = app_state(address, app)
        ok = status == "RUNNING" and deps and all(s == "HEALTHY" for s, _ in deps.values())
        if ok and want:
            ok = all(deps.get(name, ("", 0))[1] == n for name, n in want.items())
        if ok:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{app} not ready after {timeout_s:.0f}s: {status} {deps}")
        time.sleep(1)


# ---------------------------------------------------------------------------------------------
# Config variants
# ---------------------------------------------------------------------------------------------

def load_config(path: Path, app: str | None, http_port: int | None, extra_args: dict[str, Any]) -> tuple[dict, str]:
    config = yaml.safe_load(path.read_text())
    apps = config["applications"]
    target = next((a for a in apps if a["name"] == app), None) if app else apps[0]
    if target is None:
        raise SystemExit(f"{path} has no application named {app!r}")
    if http_port is not None:
        config.setdefault("http_options", {})["port"] = http_port
    if extra_args:
        target.setdefault("args", {}).update(extra_args)
    return config, target["name"]


def with_tunables(config: dict, app: str, values: dict[str, dict[str, Any]]) -> dict:
    """The config with ``values`` merged into each named deployment's ``user_config``."""
    out = copy.deepcopy(config)
    deps = next(a for a in out["applications"] if a["name"] == app).setdefault("deployments", [])
    for name, tuned in values.items():
        dep = next((d for d in deps if d["name"] == name), None)
        if dep is None:
            dep = {"name": name}
            deps.append(dep)
        dep["user_config"] = {**(dep.get("user_config") or {}), **tuned}
    return out


def with_more_replicas(config: dict, app: str, deployment: str) -> tuple[dict, int]:
    """The config with one more replica of ``deployment``; returns (config, expected replicas)."""
    out = copy.deepcopy(config)
    target = next(a for a in out["applications"] if a["name"] == app)
    deps = target.setdefault("deployments", [])
    dep = next((d for d in deps if d["name"] == deployment), None)
    if dep is None:
        dep = {"name": deployment}
        deps.append(dep)
    auto = dep.get("autoscaling_config")
    if auto:
        n = int(auto.get("min_replicas", 1)) + 1
        auto["min_replicas"] = n
        auto["initial_replicas"] = n
        auto["max_replicas"] = max(int(auto.get("max_replicas", n)), n)
    else:
        n = int(dep.get("num_replicas", 1)) + 1
        dep["num_replicas"] = n
    return out, n


def with_pinned_versions(config: dict, app: str, versions: dict[str, str] | None) -> dict:
    """The config with EnsembleRouter's ``user_config.model_versions`` set (None: follow the registry)."""
    out = copy.deepcopy(config)
    target = next(a for a in out["applications"] if a["name"] == app)
    deps = target.setdefault("deployments", [])
    router = next((d for d in deps if d["name"] == "EnsembleRouter"), None)
    if router is None:
        router = {"name": "EnsembleRouter"}
        deps.append(router)
    router["user_config"] = {**(router.get("user_config") or {}), "model_versions": versions}  # keep the tunables
    return out


def write_config(config: dict, folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def parse_kv(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def wait_http(url: str, key: str, timeout_s: float) -> None:
    t0 = time.monotonic()
    while True:
        try:
            r = httpx.post(f"{url}/predictions", json={"symbol": "BTCUSDT", "horizon": 6},
                           headers={"X-API-Key": key}, timeout=10)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{url}/predictions never answered 200")
        time.sleep(1)


def served_versions(url: str, key: str) -> dict[str, str]:
    r = httpx.post(f"{url}/predictions", json={"symbol": "BTCUSDT", "horizon": 6}, headers={"X-API-Key": key},
                   timeout=10)
    r.raise_for_status()
    return r.json()["model_versions"]


def promote_all(registry: ModelRegistry, version: str) -> None:
    registry.promote_set(version)


async def rollout(args: argparse.Namespace) -> dict[str, Any]:
    extra = parse_kv(args.args)
    work = Path(tempfile.mkdtemp(prefix="rollout-"))
    if args.api_key:  # through a key file (the head is on this machine): keys never go in Serve args
        extra.setdefault("api_keys_file", str(write_api_keys_file(work / "api_keys", [args.api_key])))
    config, app = load_config(Path(args.config), args.app, args.http_port, extra)
    port = config.get("http_options", {}).get("port", 8000)
    url = f"http://127.0.0.1:{port}"
    key = args.api_key or os.environ.get("MLE_API_KEYS", "").split(",")[0]
    registry = ModelRegistry(args.models_dir)
    original = registry.current_versions()
    others = [v for v in registry.versions("range_predictor") if v != original["range_predictor"]
              and all(v in registry.versions(m) for m in MODEL_NAMES)]
    if not others:
        raise SystemExit(f"{args.models_dir} needs a second complete model version to switch to")
    alternative = others[-1]

    config = with_pinned_versions(config, app, None)  # follow the registry (what serve_config.yaml says)
    base = write_config(config, work, "base.yaml")
    pinned = write_config(with_pinned_versions(config, app, {m: alternative for m in MODEL_NAMES}), work,
                          "pinned.yaml")
    tuned = write_config(with_tunables(config, app, TUNED), work, "tuned.yaml")
    scaled_cfg, scaled_n = with_more_replicas(config, app, args.scale_deployment)
    scaled = write_config(scaled_cfg, work, "scaled.yaml")
    marks: dict[str, float] = {}
    log: list[str] = []

    def note(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        log.append(line)
        print(line, flush=True)

    t_deploy = time.monotonic()
    serve_deploy(base, args.address)
    wait_running(args.address, app, args.timeout_s)
    wait_http(url, key, args.timeout_s)
    note(f"deployed {args.config} as {app!r} in {time.monotonic() - t_deploy:.1f}s; serving {original['range_predictor']}")
    _, deps = app_state(args.address, app)
    base_replicas = deps[args.scale_deployment][1]

    requests = [{"method": "POST", "path": path, "json": {"symbol": s, "horizon": h}}
                for path in ("/predictions", "/signals") for s in args.symbols for h in args.horizons]
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(url, rate=args.rate, duration_s=args.max_duration_s, requests=requests,
                                        headers={"X-API-Key": key}, timeout_s=10, stop=stop))
    t0 = time.perf_counter()

    def mark(phase: str) -> None:
        marks[phase] = time.perf_counter() - t0

    mark("steady")
    await asyncio.sleep(args.steady_s)

    # Model version change: the registry pointer moves, the graph swaps without a restart.
    mark("model_version")
    promote_all(registry, alternative)
    note(f"promoted {alternative} (was {original['range_predictor']})")
    deadline = time.monotonic() + args.timeout_s
    while (await asyncio.to_thread(served_versions, url, key))["range_predictor"] != alternative:
        if time.monotonic() > deadline:
            raise TimeoutError("the new model version was never served")
        await asyncio.sleep(0.5)
    note(f"answers carry {alternative}")
    promote_all(registry, original["range_predictor"])
    while (await asyncio.to_thread(served_versions, url, key))["range_predictor"] != original["range_predictor"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the original model version never came back")
        await asyncio.sleep(0.5)
    note(f"promoted {original['range_predictor']} back; answers carry it")
    # The same through serve deploy: user_config pins the set, then the original config un-pins it.
    await asyncio.to_thread(serve_deploy, pinned, args.address)
    while (await asyncio.to_thread(served_versions, url, key))["range_predictor"] != alternative:
        if time.monotonic() > deadline:
            raise TimeoutError("the version pinned by user_config was never served")
        await asyncio.sleep(0.5)
    note(f"serve deploy with user_config.model_versions = {alternative}: answers carry it")
    await asyncio.to_thread(serve_deploy, base, args.address)
    while (await asyncio.to_thread(served_versions, url, key))["range_predictor"] != original["range_predictor"]:
        if time.monotonic() > deadline:
            raise TimeoutError("un-pinning never brought the registry's version back")
        await asyncio.sleep(0.5)
    note(f"serve deploy with user_config.model_versions = null: answers carry {original['range_predictor']} again")

    # Live tunables through serve deploy: only user_config changes, so the same replicas take it.
    mark("tunables")
    before = await asyncio.to_thread(replica_ids, args.address, app)
    await asyncio.to_thread(serve_deploy, tuned, args.address)
    await asyncio.sleep(3)  # the controller applies it; then the application reports RUNNING again
    await asyncio.to_thread(wait_running, args.address, app, args.timeout_s)
    after = await asyncio.to_thread(replica_ids, args.address, app)
    restarted = sorted(name for name in before if before[name] != after.get(name))
    note(f"serve deploy with new user_config in {len(TUNED)} deployments (batch size and wait, poll interval, rate "
         f"limit): {sum(map(len, after.values()))} replicas, restarted: {', '.join(restarted) or 'none'}")
    if restarted:
        raise RuntimeError(f"a user_config change restarted {restarted}: it must reach the replicas via reconfigure")

    # Replica count change through serve deploy, and back.
    mark("replicas_up")
    await asyncio.to_thread(serve_deploy, scaled, args.address)
    waited = await asyncio.to_thread(wait_running, args.address, app, args.timeout_s,
                                     {args.scale_deployment: scaled_n})
    note(f"serve deploy: {args.scale_deployment} {base_replicas} -> {scaled_n} replicas RUNNING after {waited:.1f}s")
    await asyncio.sleep(args.steady_s)
    mark("replicas_down")
    await asyncio.to_thread(serve_deploy, base, args.address)
    waited = await asyncio.to_thread(wait_running, args.address, app, args.timeout_s,
                                     {args.scale_deployment: base_replicas})
    note(f"serve deploy: {args.scale_deployment} {scaled_n} -> {base_replicas} replicas after {waited:.1f}s")
    mark("settle")
    await asyncio.sleep(args.settle_s)
    stop.set()
    result: LoadResult = await load
    end = time.perf_counter() - t0

    bounds = [marks[p] for p in PHASES] + [end]
    report = {"app": app, "url": url, "rate_per_s": args.rate,
              "phases": {p: result.summary(bounds[i], bounds[i + 1]) for i, p in enumerate(PHASES)},
              "total": result.summary(), "log": log}
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"),
                   help="the head's dashboard (serve deploy's --address)")
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--app", default=None, help="application name in the config (default: the first)")
    p.add_argument("--models-dir", default="models", help="the registry the application serves")
    p.add_argument("--api-key", default=None, help="a key for the load (default: first of MLE_API_KEYS)")
    p.add_argument("--http-port", type=int, default=None, help="override http_options.port")
    p.add_argument("--args", nargs="*", default=[], help="Settings overrides KEY=VALUE added to the app's args")
    p.add_argument("--scale-deployment", default="RangePredictor")
    p.add_argument("--symbols", nargs="+", default=["BTCUSDT", "ETHUSDT"])
    p.add_argument("--horizons", nargs="+", type=int, default=[6, 18, 36, 72])
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    p.add_argument("--steady-s", type=float, default=10.0)
    p.add_argument("--settle-s", type=float, default=10.0)
    p.add_argument("--max-duration-s", type=float, default=600.0, help="hard bound on the load")
    p.add_argument("--timeout-s", type=float, default=240.0, help="longest wait for a deployment step")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = asyncio.run(rollout(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"\nrollout under load, {args.rate:.0f} req/s on {report['url']} (application {report['app']!r})")
        print(f"{'phase':<15}{'requests':>10}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}  statuses")
        for phase, s in report["phases"].items():
            print(f"{phase:<15}{s['requests']:>10}{s['failed']:>8}{s['p50_ms'] or 0:>9.1f}{s['p99_ms'] or 0:>9.1f}  "
                  f"{s['statuses']}")
        t = report["total"]
        print(f"{'total':<15}{t['requests']:>10}{t['failed']:>8}{t['p50_ms'] or 0:>9.1f}{t['p99_ms'] or 0:>9.1f}  "
              f"{t['statuses']}")
        if t["failed"]:
            print("failures:", "; ".join(t["errors"]))
    return 0 if report["total"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
