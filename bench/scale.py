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

    def __init__(self, redis_port: int) -> None:
        import redis

        super().__init__(daemon=True)
        self.pubsub = redis.Redis(port=redis_port).pubsub()
        self.pubsub.psubscribe("signals:*")
        self.arrived: dict[tuple[str, int, int], float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            msg = self.pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "pmessage":
                body = json.loads(msg["data"])
                self.arrived[(body["symbol"], body["horizon"], body["candle_open_time"])] = time.monotonic()

    def wait(self, keys: list[tuple[str, int, int]], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(k in self.arrived for k in keys):
                return max(self.arrived[k] for k in keys)
            time.sleep(0.002)
        missing = [k for k in keys if k not in self.arrived]
        raise SystemExit(f"{len(missing)} forecasts never published, e.g. {missing[:3]}")


def newest(symbols: list[str], shards: int) -> dict[str, tuple[int, bool]]:
    from ray import serve

    from deployments.sharding import shard_name

    out = {}
    for i in range(shards):
        snap = serve.get_deployment_handle(shard_name(i), app_name=APP).snapshot.remote(-1, 0.0).result(timeout_s=60)
        out.update({s: (st.open_time, st.published) for s, st in snap.symbols.items()})
    return out


def run_graph(n: int, closes: int, models: str, redis: PrivateRedis, workdir: Path) -> dict:
    from ray import serve

    from configs.settings import load_settings
    from deployments.app import build_graph
    from deployments.auth import write_api_keys_file
    from deployments.sharding import shard_count
    from features.candles import FIVE_MINUTES_MS

    keys = write_api_keys_file(workdir / f"keys-{n}", [secrets.token_urlsafe(24)])
    ov = overrides_for(n, models, redis.url, str(keys), str(workdir / "spool"))
    settings = load_settings(**ov)
    symbols, horizons = list(settings.market.symbols), list(settings.market.horizons)
    shards = shard_count(settings.feature_shards, len(symbols))
    t = time.monotonic()
    serve.run(build_graph(ov), name=APP, route_prefix="/scale", blocking=False)
    while True:
        try:
            state = newest(symbols, shards)
            if len(state) == n and all(p for _, p in state.values()):
                break
        except Exception:  # still deploying
            pass
        if time.monotonic() - t > 600:
            raise SystemExit(f"{n} symbols: the graph did not publish every symbol within 600 s")
        time.sleep(0.5)
    started_s = time.monotonic() - t
    feed = serve.get_deployment_handle("MarketFeed", app_name=APP)
    sub = Subscriber(redis.port)
    sub.start()
    open_time = {s: ot for s, (ot, _) in state.items()}
    latencies: list[float] = []
    groups0: dict[str, float] = {}
    redis0 = 0.0
    for k in range(closes + 2):  # two warm-up closes
        if k == 2:
            groups0, redis0 = cluster_cpu_groups(), redis_cpu_s(redis.proc.pid)
        open_time = {s: ot + FIVE_MINUTES_MS for s, ot in open_time.items()}
        keys_now = [(s, h, open_time[s]) for s in symbols for h in horizons]
        t0 = time.monotonic()
        feed.step_all.remote(1).result(timeout_s=300)
        ready = sub.wait(keys_now, 120)
        if k >= 2:
            latencies.append(ready - t0)
    groups = {g: t - groups0.get(g, 0.0) for g, t in cluster_cpu_groups().items()}
    groups["redis-server"] = redis_cpu_s(redis.proc.pid) - redis0
    cpu = sum(groups.values())
    rss, pss = cluster_memory_gib()
    sub.stop.set()
    serve.delete(APP)
    latencies.sort()
    return {"symbols": n, "shards": shards, "horizons": len(horizons), "closes": closes,
            "close_to_ready_p50_s": round(statistics.median(latencies), 4),
            "close_to_ready_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4),
            "cpu_ms_per_symbol_horizon": round(1000 * cpu / (closes * n * len(horizons)), 3),
            "rss_gib": round(rss, 3), "pss_gib": round(pss, 3), "startup_s": round(started_s, 1),
            "cpu_share": {g: round(t / cpu, 3) for g, t in sorted(groups.items(), key=lambda x: -x[1])
                          if cpu > 0 and t / cpu >= 0.01}}


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
