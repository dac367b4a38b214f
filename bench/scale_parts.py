"""bench/scale.py's measuring parts: the private cluster's processes (CPU, memory) from /proc, and
the in-process baseline of one candle close."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np

_CLK = os.sysconf("SC_CLK_TCK")


def _procs() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds, command line) of every process we can read."""
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
        out[int(pid)] = (int(parts[1]), (int(parts[11]) + int(parts[12])) / _CLK, cmd)
    return out


def _cluster(procs: dict[int, tuple[int, float, str]]) -> list[int]:
    """This driver's descendants (the Ray cluster it started: GCS, raylet, workers), not redis-server."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if "redis-server" not in procs[pid][2]:
            out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _group(cmd: str) -> str:
    """What a cluster process is: the deployment of a Serve replica, the actor class, else Ray's own."""
    if not cmd.startswith("ray::"):
        return "ray system"
    title = cmd[5:].split(" ", 1)[0].split(".", 1)[0]
    if title.startswith("ServeReplica:"):
        return title.rsplit(":", 1)[-1]
    return title or "ray system"


def cluster_cpu_groups(pids: Iterable[int] | None = None) -> dict[str, float]:
    """CPU seconds of the cluster's processes by :func:`_group`: ``pids``, or this driver's
    descendants (a cluster it started itself)."""
    procs = _procs()
    out: dict[str, float] = {}
    for pid in _cluster(procs) if pids is None else [p for p in pids if p in procs]:
        g = _group(procs[pid][2])
        out[g] = out.get(g, 0.0) + procs[pid][1]
    return out


def cluster_cpu_s() -> float:
    return sum(cluster_cpu_groups().values())


def redis_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / _CLK


def cluster_memory_gib(pids: Iterable[int] | None = None) -> tuple[float, float]:
    """RSS and PSS of the cluster's processes (as in :func:`cluster_cpu_groups`), idle pooled
    workers left out (no part of the graph)."""
    procs = _procs()
    rss = pss = 0
    for pid in _cluster(procs) if pids is None else [p for p in pids if p in procs]:
        if "ray::IDLE" in procs[pid][2]:
            continue
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 2**20, pss / 2**20


def _candles(symbol: str):
    from configs.symbols import is_synthetic, real_symbol
    from features.candles import load_candles
    from features.synthetic import synthetic_candles

    root = Path(__file__).resolve().parents[1]
    df = load_candles(root / "data" / "sample" / f"{real_symbol(symbol)}_5m.parquet")
    return synthetic_candles(symbol, df) if is_synthetic(symbol) else df


def inprocess_pass(n: int, closes: int, models: str, redis, history: int = 1100) -> dict:
    """The graph's candle-close work for ``n`` symbols in this process, ``closes`` times: each
    symbol's new feature row, one ensemble batch per horizon, every SET and PUBLISH in one Redis
    pipeline. CPU of this process plus its Redis, per symbol-horizon."""
    import redis as redis_lib

    from configs.settings import load_settings
    from deployments.auth import deployment_secret
    from deployments.cache import make_entry, prediction_key, signal_channel
    from deployments.render import signal_message
    from features.incremental import FeatureBuilder
    from features.indicators import feature_set_hash
    from inference.ensemble import Ensemble

    real = ["BTCUSDT", "ETHUSDT"][:min(2, n)]
    settings = load_settings(models_dir=models, market={"symbols": real, "synthetic_symbols": n - len(real)})
    symbols, horizons = list(settings.market.symbols), list(settings.market.horizons)
    ens = Ensemble.load(Path(models), settings)
    for model in ens.models.values():  # as in the pools: one thread per call
        for booster in model.boosters.values():
            booster.set_param({"nthread": 1})
    fb = FeatureBuilder(settings.features)
    frames = {s: _candles(s) for s in symbols}
    for s in symbols:
        fb.extend(s, frames[s].iloc[:history])
    arrays = {s: frames[s][["open_time", "open", "high", "low", "close", "volume"]].to_numpy(np.float64)
              for s in symbols}
    client = redis_lib.Redis(port=redis.port)
    secret, fhash = deployment_secret(settings), feature_set_hash(settings.features)
    walls: list[float] = []
    cpu0, r0 = time.process_time(), redis_cpu_s(redis.proc.pid)
    for k in range(closes):
        t0 = time.perf_counter()
        feats, closes_, times = [], [], []
        for s in symbols:
            t, o, h, lo, c, v = arrays[s][history + k]
            feats.append(fb.update(s, int(t), o, h, lo, c, v))
            closes_.append(float(c))
            times.append(int(t))
        X = np.vstack(feats)
        pipe = client.pipeline(transaction=False)
        now = time.time()
        for h in horizons:
            for f in ens.forecast(X, symbols, closes_, times, h):
                pipe.set(prediction_key(f.symbol, f.horizon, f.candle_open_time), make_entry(f, fhash, secret), px=300_000)
                pipe.publish(signal_channel(f.symbol), signal_message(f, now))
        pipe.execute()
        walls.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0 + redis_cpu_s(redis.proc.pid) - r0
    return {"inprocess_cpu_ms_per_symbol_horizon": round(1000 * cpu / (closes * n * len(horizons)), 3),
            "inprocess_s_per_close": round(float(np.median(walls)), 4)}
