"""Where the running graph's memory and CPU go: RSS per deployment, and py-spy stacks per replica.

Helpers of bench/serve_load.py (issue 16: memory of the whole graph before and after; issue 18
point 4: say where the CPU of a forecast through the graph goes beyond the model's).

* :func:`memory_by_group`: RSS and PSS (MiB) of every process of a process group (the groups of
  serve_load's CPU profile: ingress, router, model pools, ...), summed per group.
* :func:`spy_start` / :func:`spy_summary`: ``py-spy record`` (raw collapsed stacks, active threads
  only, so samples are CPU time) of each replica while a profiled cell runs, then per group the
  share of samples by where the innermost frame is: our code, XGBoost, numpy, Serve's request
  path, Ray core / gRPC, pickling, asyncio, other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

# Innermost-frame buckets, first match wins (file paths as py-spy prints them).
BUCKETS = (
    ("xgboost", re.compile(r"xgboost/")),
    ("numpy", re.compile(r"numpy/")),
    ("our code", re.compile(r"(deployments|inference|features|configs)/[a-z_]+\.py")),
    ("serve request path", re.compile(r"ray/serve/")),
    ("ray core / grpc", re.compile(r"ray/_private|ray/_raylet|grpc|ray/util|ray/actor|ray/remote")),
    ("pickle", re.compile(r"pickle|cloudpickle")),
    ("asyncio", re.compile(r"asyncio/|uvloop")),
    ("http (uvicorn/starlette/fastapi)", re.compile(r"uvicorn|starlette|fastapi|h11|httptools|pydantic")),
)


def _status_kib(pid: int, field: str, path: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes(groups, redis_port: int | None = None) -> dict[str, list[int]]:
    """pid lists per group name (``groups``: (name, compiled regex) over the command line)."""
    out: dict[str, list[int]] = defaultdict(list)
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for name, rx in groups:
            if rx.search(cmd):
                if name == "redis" and redis_port is not None and f":{redis_port}" not in cmd:
                    break
                out[name].append(int(pid))
                break
    return dict(out)


def memory_by_group(groups, redis_port: int | None = None) -> dict[str, tuple[int, float, float]]:
    """Per group: (processes, RSS MiB, PSS MiB). PSS shares pages the processes share (Ray's
    libraries, numpy, XGBoost) among them; summed RSS counts them once per process."""
    out = {}
    for name, pids in processes(groups, redis_port).items():
        rss = sum(_status_kib(p, "VmRSS:") for p in pids)
        pss = sum(_status_kib(p, "Pss:", "smaps_rollup") for p in pids)
        out[name] = (len(pids), rss / 1024, pss / 1024)
    return out


def print_memory(label: str, mem: dict[str, tuple[int, float, float]], graph: tuple[str, ...]) -> None:
    print(f"\nmemory of {label} (RSS / PSS MiB per process group, measured after its cells)")
    total_rss = total_pss = 0.0
    for name, (n, rss, pss) in sorted(mem.items(), key=lambda kv: -kv[1][1]):
        mark = "" if name in graph else "  (not the graph)"
        print(f"  {name:<26} {n:>3} processes  RSS {rss:8.1f}  PSS {pss:8.1f}{mark}")
        if name in graph:
            total_rss, total_pss = total_rss + rss, total_pss + pss
    print(f"  {'whole graph':<26}                RSS {total_rss:8.1f}  PSS {total_pss:8.1f}")


def spy_start(pids: dict[str, list[int]], seconds: float, outdir: Path) -> list[subprocess.Popen]:
    """One ``py-spy record`` per process (raw stacks, 100 Hz, without pausing the process)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    outdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for group, plist in pids.items():
        for pid in plist:
            out = outdir / f"{group.replace(' ', '_')}-{pid}.txt"
            procs.append(subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                           "--rate", "100", "--format", "raw", "--nonblocking", "-o", str(out)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


# Innermost frames of threads that are in native code (Ray's core worker loop, a thread body that is
# one native call -- gRPC, Ray's own threads --, lock and selector waits): py-spy cannot tell their
# work from their waits, so they are counted apart; the Python breakdown is over the rest.
NATIVE_WAITS = re.compile(r"^(?:\w+\.)?(main_loop|run|wait|select|poll|acquire|_wait_for_tstate_lock|sleep|_worker) \(")


def _leaf_bucket(stack: str) -> str:
    leaf = stack.rsplit(";", 1)[-1]
    if NATIVE_WAITS.match(leaf):
        return "native wait"
    for name, rx in BUCKETS:
        if rx.search(leaf):
            return name
    return "other"


def spy_summary(outdir: Path, requests: int) -> None:
    """Per group: samples per request (10 ms each at 100 Hz) and their share by innermost frame."""
    per_group: dict[str, Counter] = defaultdict(Counter)
    top: dict[str, Counter] = defaultdict(Counter)
    for f in sorted(outdir.glob("*.txt")):
        group = f.stem.rsplit("-", 1)[0].replace("_", " ")
        for line in f.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            bucket = _leaf_bucket(stack)
            per_group[group][bucket] += int(count)
            if bucket == "native wait":
                continue
            frames = [fr for fr in stack.split(";") if "(" in fr]
            ours = [fr for fr in frames if re.search(r"(deployments|inference|bench)/", fr)]
            top[group][(ours[-1] if ours else frames[-1] if frames else stack).split(" (")[0]] += int(count)
    print(f"\npy-spy (100 Hz, active threads: a sample is 10 ms of CPU), {requests} requests, "
          f"share by innermost frame; raw stacks in {outdir}")
    for group, buckets in per_group.items():
        waits = buckets.pop("native wait", 0)
        total = max(sum(buckets.values()), 1)
        print(f"  {group:<22} {100 * waits / (waits + total):.0f}% of samples in native threads (Ray core worker, "
              "gRPC; busy or waiting: left out)")
        ms = 10.0 * total / max(requests, 1)
        parts = ", ".join(f"{b} {100 * n / total:.0f}%" for b, n in buckets.most_common(6))
        print(f"  {group:<22} ~{ms:5.2f} CPU-ms/req sampled: {parts}")
        calls = ", ".join(f"{fn} {100 * n / total:.0f}%" for fn, n in top[group].most_common(5))
        print(f"  {'':<22} innermost own-code frame: {calls}")
