"""bench/scale_nodes.py's placement and ladder logic, without a cluster (the benchmark itself runs one).

The config it deploys is checked against Ray Serve's own schema and against the deployments the
graph really builds for those args: a config naming a deployment the app does not have (a shard
count computed differently) fails ``serve deploy``; a shard without a node resource, or a pool
free to put both replicas on one node, would make "adding a node" measure nothing.
"""

from __future__ import annotations

import pytest
import yaml

from bench.scale import APP, overrides_for
from bench.scale_nodes import layout, spread_config, walk
from configs.settings import load_settings
from deployments.sharding import shard_count, shard_name
from scripts import cluster_nodes as cn
from tests.conftest import ROOT

ADDRESSES = ["10.213.218.10", "10.213.218.11"]


@pytest.mark.parametrize("symbols,nodes", [(300, 2), (40, 2), (250, 1)])
def test_spread_config_deploys_the_built_graph_spread_over_the_nodes(tmp_path, symbols, nodes):
    from ray.serve.schema import ServeDeploySchema

    from scripts.serve_build import built_application

    keys = tmp_path / "keys"
    keys.write_text("k" * 32 + "\n")
    keys.chmod(0o600)
    ov = {**overrides_for(symbols, str(ROOT / "data" / "models"), "redis://127.0.0.1:6379/0", str(keys),
                          str(tmp_path / "spool")), **layout(symbols, nodes)}
    shards = shard_count(load_settings(**ov).feature_shards, symbols)
    base, _ = cn.lab_serve_config(tmp_path, nodes)
    cfg = spread_config(yaml.safe_load(base.read_text()), ov, ADDRESSES[:nodes], shards,
                        cn.code_actor_options("FeatureBuilder"))
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert app["name"] == APP and app["route_prefix"] == f"/{APP}" and app["args"] == ov
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {d["name"] for d in built_application(ov)["deployments"]}
    for name in (*cn.SCALED, "ApiIngress"):
        auto = deps[name].get("autoscaling_config")
        count = deps[name]["num_replicas"] if auto is None else auto["min_replicas"]
        assert count == nodes and (auto is None or auto["max_replicas"] == nodes), deps[name]
        assert deps[name]["max_replicas_per_node"] == 1
    placed = [next(iter(deps[shard_name(i)]["ray_actor_options"]["resources"])) for i in range(shards)]
    assert placed == [f"node:{ADDRESSES[i % nodes]}" for i in range(shards)]
    assert all(deps[shard_name(i)]["ray_actor_options"]["num_cpus"] == 0.1 for i in range(shards))  # the code's
    assert shards >= nodes and shards == max(nodes, -(-symbols // 100))


def test_layout_at_one_node_is_the_code_defaults_and_gives_every_node_a_feed_actor():
    defaults = load_settings()
    for symbols in (2, 20, 100, 250, 800):
        one = layout(symbols, 1)
        assert shard_count(one["feature_shards"], symbols) == shard_count(defaults.feature_shards, symbols)
        assert -(-symbols // one["feed_symbols_per_actor"]) == -(-symbols // defaults.feed_symbols_per_actor)
        two = layout(symbols, 2)
        assert -(-symbols // two["feed_symbols_per_actor"]) >= 2


def _measuring(p99_of, budget_s: float = 5.0):
    """A ``measure`` for :func:`walk` from a latency model, recording what it was asked."""
    tried: list[int] = []

    def measure(n: int) -> float | None:
        tried.append(n)
        p = p99_of(n)
        return p if p <= budget_s else None

    return measure, tried


def test_walk_jumps_over_rungs_the_estimate_keeps_within_and_stops_at_the_first_over():
    ladder = [100, 200, 300, 400, 500, 600]
    measure, tried = _measuring(lambda n: 0.2 + 0.01 * n)  # within 5 s up to 480 symbols
    assert walk(ladder, 0, 5.0, measure) == 400
    assert tried == [100, 400, 500]  # 100 -> 1.2 s: up to 416 expected within; 400 -> 4.2 s: 500 is next


def test_walk_checks_the_skipped_rungs_when_a_jump_lands_over():
    ladder = [100, 200, 300, 400, 500, 600]
    measure, tried = _measuring(lambda n: 0.01 * n + 0.00002 * n * n)  # faster than in proportion: over above 309
    assert walk(ladder, 0, 5.0, measure) == 300
    assert tried == [100, 400, 200, 300]  # 100 -> 1.2 s: 400 expected within, is over; 200 and 300 are not


def test_walk_from_a_start_over_goes_down_and_reports_the_top_or_none():
    ladder = [100, 200, 300, 400, 500]
    measure, tried = _measuring(lambda n: 0.014 * n)  # within up to 357
    assert walk(ladder, 4, 5.0, measure) == 300 and tried == [500, 400, 300]
    measure, tried = _measuring(lambda n: 0.001 * n)
    assert walk(ladder, 0, 5.0, measure) == 500 and tried == [100, 500]  # the top rung: a lower bound
    measure, tried = _measuring(lambda n: 9.0)
    assert walk(ladder, 2, 5.0, measure) is None and tried == [300, 200, 100]


def test_a_size_that_did_not_start_counts_as_over_in_the_summary_and_the_table():
    """A rung too big to start on the nodes (its replicas do not fit, or it publishes too late) is
    a size over the budget, not the end of the run: the 1-node walk once jumped from 100 to 1200."""
    from bench.scale_nodes import summary, table

    ok = {"symbols": 100, "nodes": 1, "within_budget": True, "close_to_ready_p50_s": 0.3, "close_to_ready_p99_s": 0.4,
          "closes": 20, "cpu_ms_per_symbol_horizon": 1.1, "rss_gib": 3.0, "pss_gib": 2.0, "node_cpu_share": {},
          "shards": 1, "feed_actors": {}, "replicas_per_node": {}}
    big = {"symbols": 1200, "nodes": 1, "within_budget": False, "closes": 0, "close_to_ready_p99_s": None,
           "not_started": "1200 symbols: the graph did not publish every symbol within 300 s"}
    s = summary(1, [ok, big])
    assert s["max_symbols_within_budget"] == 100 and s["first_over"] is big and not s["top_of_ladder"]
    text = table({"budget_s": 5.0, "closes": 20, "ladder": [100, 1200], "loadavg_start": 0.5, "loadavg_end": 1.0,
                  "setups": [s]})
    assert "| 1 | 100 |" in text and "1200: did not start" in text and big["not_started"] in text
