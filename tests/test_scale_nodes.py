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


def test_walk_finds_the_largest_size_within_budget_from_either_side():
    ladder = [100, 200, 300, 400, 600]
    capacity = 350
    tried: list[int] = []

    def within(n: int) -> bool:
        tried.append(n)
        return n <= capacity

    assert walk(ladder, 0, within) == 300 and tried == [100, 200, 300, 400]  # stops at the first over
    tried.clear()
    assert walk(ladder, 4, within) == 300 and tried == [600, 400, 300]  # started above: walks down
    tried.clear()
    assert walk(ladder, 2, lambda n: False) is None
