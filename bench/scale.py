"""How the candle-close cost grows with the number of symbols (issue 18 point 5).

    .venv/bin/python bench/scale.py [--sizes 2,20,200] [--closes 20] [--models DIR] [--json]

Per size: the whole graph (``deployments.app:build_graph``) on a private local Ray cluster and a
private redis-server, replaying the shipped sample's two symbols plus synthetic copies
(``market.synthetic_symbols``) at real time, so nothing moves unless this script steps every
symbol's next candle at once (``MarketFeed.step_all``): one candle close of the whole market, as
fast as the graph processes it, ``--closes`` times (after two warm-up closes). Printed per size:

- close -> ready p50 / p99: from the step (the close) to the last symbol-horizon's ``signals:{symbol}``
  message (published in the same Redis pipeline right after its ``prediction:...`` SET);
- CPU-ms per symbol-horizon: CPU time of every process of the private cluster and its Redis (Ray's
  own processes included, this driver not) during the closes, divided by closes x symbols x horizons;
- RSS (and PSS) of the whole graph: every process of the cluster but idle pooled workers, after
  the closes;
- the baseline, measured in the same run: the same pass in this process -- every symbol's feature
  row (``features.FeatureBuilder``), one ensemble batch per horizon, the same Redis pipeline --
  CPU-ms per symbol-horizon (this process plus its Redis) and its wall time per close.

The models are the shipped set (``data/models``) unless ``--models`` names another registry.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.load_targets import PrivateRedis  # noqa: E402
from bench.scale_parts import cluster_cpu_groups, cluster_memory_gib, inprocess_pass, redis_cpu_s  # noqa: E402

APP = "ml-engine-scale"
HISTORY = 1100  # candles sent at start (>= the feature warm-up): forecasts from the first close


def overrides_for(n: int, models: str, redis_url: str, keys_file: str, spool: str) -> dict:
    real = ["BTCUSDT", "ETHUSDT"][:min(2, n)]
    return {"models_dir": models, "api_keys_file": keys_file, "redis_url": redis_url,
            "market": {"symbols": real, "synthetic_symbols": n - len(real)},
            "replay_speed": 1.0, "replay_history": HISTORY, "model_poll_s": 3600.0,
            "replay_files": {s: str(ROOT / "data" / "sample" / f"{s}_5m.parquet") for s in real},
            "serving_log": "", "spool_dir": spool}


class Subscriber(threading.Thread):
    """Every ``signals:*`` message's arrival time, by (symbol, horizon, candle)."""

    def __init__(self, redis_url: str) -> None:
        import redis

        super().__init__(daemon=True)
        self.pubsub = redis.Redis.from_url(redis_url).pubsub()
        self.pubsub.psubscribe("signals:*")
        self.arrived: dict[tuple[str, int, int], float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            msg = self.pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "pmessage":
                body = json.loads(msg["data"])
                self.arrived[(body["symbol"], body["horizon"], body["candle_open_time"])] = time.monotonic()

    def wait(self, keys: list[tuple[str, int, int]], timeout: float) -> float | None:
        """When the last of ``keys`` arrived; None if some had not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(k in self.arrived for k in keys):
                return max(self.arrived[k] for k in keys)
            time.sleep(0.002)
        return None


def newest(symbols: list[str], shards: int, app: str = APP) -> dict[str, tuple[int, bool]]:
    from ray import serve

    from deployments.sharding import shard_name

    out = {}
    for i in range(shards):
        snap = serve.get_deployment_handle(shard_name(i), app_name=app).snapshot.remote(-1, 0.0).result(timeout_s=60)
        out.update({s: (st.open_time, st.published) for s, st in snap.symbols.items()})
    return out


class GraphNotStarted(RuntimeError):
    """The graph of a size did not publish every symbol in time (it may not even fit the cluster)."""


def wait_started(symbols: list[str], shards: int, since: float, timeout_s: float = 600,
                 app: str = APP) -> tuple[dict[str, int], float]:
    """Once every symbol's newest candle is published (the graph is up): each symbol's candle and
    the seconds since ``since`` (``time.monotonic()`` before the deploy); GraphNotStarted after
    ``timeout_s``."""
    t = since
    error = "not every symbol published"
    while True:
        try:
            state = newest(symbols, shards, app)
            if set(state) == set(symbols) and all(p for _, p in state.values()):
                return {s: ot for s, (ot, _) in state.items()}, time.monotonic() - t
        except Exception as exc:  # still deploying
            error = f"{type(exc).__name__}: {exc}"[:300]
        if time.monotonic() - t > timeout_s:
            raise GraphNotStarted(f"{len(symbols)} symbols: the graph did not publish every symbol within "
                                  f"{timeout_s:.0f} s (last: {error})")
        time.sleep(0.5)


def measure_closes(open_time: dict[str, int], horizons: list[int], closes: int, redis_url: str,
                   cpu_groups: Callable[[], dict[str, float]], budget_s: float | None = None,
                   app: str = APP) -> dict[str, Any]:
    """``closes`` candle closes of every symbol (after two warm-up ones), each once the previous
    one's forecasts are all published: close -> ready seconds and the CPU seconds ``cpu_groups``
    counted meanwhile (by group). With ``budget_s`` the run stops at the first measured close slower
    than that (``over_budget``: with fewer than 100 closes p99 is the slowest close, so it is over
    too); a warm-up close is not judged, only given up on after 4 x ``budget_s``."""
    from ray import serve

    from features.candles import FIVE_MINUTES_MS

    feed = serve.get_deployment_handle("MarketFeed", app_name=app)
    sub = Subscriber(redis_url)
    sub.start()
    wait_s = 120.0 if budget_s is None else 4 * budget_s
    latencies: list[float] = []
    groups0: dict[str, float] = {}
    over = False
    try:
        for k in range(closes + 2):  # two warm-up closes
            if k == 2:
                groups0 = cpu_groups()
            open_time = {s: ot + FIVE_MINUTES_MS for s, ot in open_time.items()}
            keys_now = [(s, h, ot) for s, ot in open_time.items() for h in horizons]
            t0 = time.monotonic()
            try:
                feed.step_all.remote(1).result(timeout_s=300 if budget_s is None else wait_s)
                ready = sub.wait(keys_now, wait_s)
            except TimeoutError:
                ready = None
            if ready is None and budget_s is None:
                missing = [key for key in keys_now if key not in sub.arrived]
                raise SystemExit(f"{len(missing)} forecasts never published, e.g. {missing[:3]}")
            latency = float("inf") if ready is None else ready - t0
            if k >= 2:
                latencies.append(latency)
            if budget_s is not None and (ready is None or (k >= 2 and latency > budget_s)):
                over = True
                break
    finally:
        sub.stop.set()
    groups = {g: t - groups0.get(g, 0.0) for g, t in cpu_groups().items()} if groups0 else {}
    return {"latencies": latencies, "cpu_groups": groups, "over_budget": over}


def close_row(n: int, horizons: int, measured: dict[str, Any]) -> dict[str, Any]:
    """The per-size figures from :func:`measure_closes`' result (CPU over the closes measured)."""
    lat = sorted(measured["latencies"])
    groups = measured["cpu_groups"]
    cpu = sum(groups.values())
    done = max(1, len(lat))
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("inf")
    return {"symbols": n, "horizons": horizons, "closes": len(lat),
            "close_to_ready_p50_s": round(statistics.median(lat), 4) if lat else None,
            "close_to_ready_p99_s": round(p99, 4) if p99 != float("inf") else None,
            "cpu_ms_per_symbol_horizon": round(1000 * cpu / (done * n * horizons), 3),
            "cpu_share": {g: round(t / cpu, 3) for g, t in sorted(groups.items(), key=lambda x: -x[1])
                          if cpu > 0 and t / cpu >= 0.01}}


def run_graph(n: int, closes: int, models: str, redis: PrivateRedis, workdir: Path) -> dict:
    from ray import serve

    from configs.settings import load_settings
    from deployments.app import build_graph
    from deployments.auth import write_api_keys_file
    from deployments.sharding import shard_count

    keys = write_api_keys_file(workdir / f"keys-{n}", [secrets.token_urlsafe(24)])
    ov = overrides_for(n, models, redis.url, str(keys), str(workdir / "spool"))
    settings = load_settings(**ov)
    symbols, horizons = list(settings.market.symbols), list(settings.market.horizons)
    shards = shard_count(settings.feature_shards, len(symbols))
    t0 = time.monotonic()
    serve.run(build_graph(ov), name=APP, route_prefix="/scale", blocking=False)
    try:
        open_time, started_s = wait_started(symbols, shards, t0)
    except GraphNotStarted as exc:
        raise SystemExit(str(exc)) from None

    def cpu_groups() -> dict[str, float]:
        return {**cluster_cpu_groups(), "redis-server": redis_cpu_s(redis.proc.pid)}

    measured = measure_closes(open_time, horizons, closes, redis.url, cpu_groups)
    rss, pss = cluster_memory_gib()
    serve.delete(APP)
    return {**close_row(n, len(horizons), measured), "shards": shards, "rss_gib": round(rss, 3),
            "pss_gib": round(pss, 3), "startup_s": round(started_s, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2,20,200", help="comma-separated symbol counts")
    p.add_argument("--closes", type=int, default=20, help="measured closes per size (after 2 warm-up closes)")
    p.add_argument("--models", default=str(ROOT / "data" / "models"), help="model registry (default: the shipped set)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if min(sizes) < 1 or args.closes < 1:
        raise SystemExit("--sizes and --closes must be positive")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from deployments.app import start_serve_on_free_port

    stdout = None
    if args.json:  # Ray's own processes print warnings to this process's stdout: keep it for the object
        sys.stdout.flush()
        stdout = os.dup(1)
        os.dup2(2, 1)
    out: dict = {"sizes": [], "closes": args.closes, "models": args.models, "cpus": os.cpu_count(),
                 "loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="mle-scale-") as tmp:
        workdir = Path(tmp)
        redis = PrivateRedis(workdir)
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                     log_to_driver=False, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
            start_serve_on_free_port("127.0.0.1")
            for n in sizes:
                row = run_graph(n, args.closes, args.models, redis, workdir)
                row.update(inprocess_pass(n, args.closes, args.models, redis))
                row["cost_ratio"] = round(row["cpu_ms_per_symbol_horizon"] / row["inprocess_cpu_ms_per_symbol_horizon"], 2)
                out["sizes"].append(row)
                print(f"  {n} symbols done: {json.dumps(row)}", file=sys.stderr, flush=True)
        finally:
            try:
                from ray import serve

                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
            redis.stop()
    out["loadavg_end"] = os.getloadavg()[0]
    if stdout is not None:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        print(json.dumps(out), flush=True)
    else:
        print_table(out)
    return 0


def print_table(out: dict) -> None:
    print(f"candle close of every symbol, {out['closes']} closes per size, models {out['models']}, "
          f"load average {out['loadavg_start']:.1f} -> {out['loadavg_end']:.1f}")
    head = ("| symbols | shards | close->ready p50 s | p99 s | CPU-ms / symbol-horizon | in-process | ratio "
            "| in-process s / close | RSS GiB | PSS GiB |")
    print(head)
    print("|" + "---|" * 10)
    for r in out["sizes"]:
        print(f"| {r['symbols']} | {r['shards']} | {r['close_to_ready_p50_s']:.3f} | {r['close_to_ready_p99_s']:.3f} "
              f"| {r['cpu_ms_per_symbol_horizon']:.2f} | {r['inprocess_cpu_ms_per_symbol_horizon']:.2f} "
              f"| {r['cost_ratio']:.1f}x | {r['inprocess_s_per_close']:.3f} | {r['rss_gib']:.2f} | {r['pss_gib']:.2f} |")
    for r in out["sizes"]:
        share = ", ".join(f"{g} {100 * f:.0f}%" for g, f in r["cpu_share"].items())
        print(f"{r['symbols']} symbols, where the graph's CPU went: {share}")


if __name__ == "__main__":
    raise SystemExit(main())
