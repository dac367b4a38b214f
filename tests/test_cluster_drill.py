"""A short run of ``python -m scripts.cluster_drill``: two Ray nodes in their own network namespaces.

The full drill (three nodes, longer load) is the script itself; this runs the same code with two
nodes, a small training run (two rounds, one fold, 1000 rows per fit: what is checked is where Ray
Train put its workers) and a short load, and checks what must hold on any run: the graph
spans both nodes, both proxies answer on their own addresses, Ray Train put a worker on each node,
Serve recovers on the survivor, no candle close went unpublished and the lab is gone afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

LAB_ID = 201  # its own subnet (10.213.201.0/24) and names; the script's default is 7


def _ip_netns() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def test_two_node_cluster_serves_trains_and_survives_a_node_loss(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.cluster_drill", "--nodes", "2", "--lab-id", str(LAB_ID), "--json",
         "--rate", "10", "--warm-s", "3", "--after-s", "5", "--max-recovery-s", "90", "--train-rounds", "2",
         "--train-folds", "1", "--train-max-rows", "1000",
         "--workdir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    lab = {f"10.213.{LAB_ID}.10", f"10.213.{LAB_ID}.11"}
    assert out["nodes"] == 2 and set(out["node_addresses"]) == lab
    assert set(out["replicas_per_node"]) == lab, out["replicas_per_node"]  # replicas on both nodes
    assert out["proxies_answering"] == 2, out["proxy_statuses"]
    assert out["train"]["exit_code"] == 0, out["train"]
    assert set(out["train_workers_nodes"]) == lab
    assert out["drill"]["recovery_s"] is not None, out["drill"]
    # Requests are counted in every phase; the failure goals (< 0.1% during, none after) are the
    # full drill's to report (docs/operations.md): on 2 shared cores a 60x replay turns a delivery
    # stuck on the dead node for ~20 s into a 4-candle market_data_gap, and a request can time out
    # even before the kill while the training job has just ended.
    assert out["drill"]["before"]["requests"] > 0 and out["drill"]["during"]["requests"] > 0 and out["drill"]["after"]["requests"] > 0
    assert out["requests"] == sum(out["drill"][p]["requests"] for p in ("before", "during", "after"))
    assert out["candles_missed"] == 0 and all(v["candles"] > 0 for v in out["signals"].values()), out["signals"]
    assert {"requests", "failed_during", "train_workers_nodes"} <= set(out)
    assert not {ns for ns in _ip_netns() if ns.startswith(f"mle{LAB_ID}n")}  # torn down
