"""serve_config.yaml stays in step with the code: Serve's own schema, the graph the builder returns,
and the Settings its ``args`` override.

The reference is what ``serve build`` would write for the app builder (scripts/serve_build.py uses
Ray's ``build_app`` + ``deployment_to_schema``). The config may tune what operators tune (replicas,
autoscaling bounds, ``max_ongoing_requests``, ``ray_actor_options``, ``user_config``), but it must name
exactly the deployments the code builds, configure each the way Serve can apply, and fit the cluster.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "serve_config.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)  # what `serve deploy` checks first
    return raw


@pytest.fixture(scope="module")
def app(config) -> dict:
    apps = config["applications"]
    assert len(apps) == 1, "one application: the engine"
    return apps[0]


@pytest.fixture(scope="module")
def built(app) -> dict:
    from scripts.serve_build import built_application

    return built_application(app.get("args") or {}, name=app["name"])


def test_import_path_and_args_build_the_application(app, built):
    from configs.settings import load_settings

    assert app["import_path"] == "deployments.app:build_app"
    assert app["route_prefix"] == "/"
    load_settings(**(app.get("args") or {}))  # every override is a valid Settings value
    assert "api_keys" not in (app.get("args") or {}), "keys belong in MLE_API_KEYS, not in a visible config"


def test_every_deployment_exists_in_code_and_the_graph_is_complete(app, built):
    in_config = [d["name"] for d in app.get("deployments", [])]
    in_code = [d["name"] for d in built["deployments"]]
    assert len(in_config) == len(set(in_config))
    assert sorted(in_config) == sorted(in_code), (
        f"config-only: {sorted(set(in_config) - set(in_code))}, code-only: {sorted(set(in_code) - set(in_config))}")


def test_each_deployment_sets_replicas_and_resources_the_code_allows(app, built):
    from deployments import app as app_module

    code = {d["name"]: d for d in built["deployments"]}
    classes = _deployment_classes(app_module)
    for dep in app["deployments"]:
        name = dep["name"]
        assert ("num_replicas" in dep) != ("autoscaling_config" in dep), \
            f"{name}: give either num_replicas or autoscaling_config"
        actor = _effective(dep, code[name], "ray_actor_options")
        assert actor and 0 < actor.get("num_cpus", 1) <= 1, f"{name}: fractional CPUs (the graph shares the cores)"
        if "autoscaling_config" in dep:
            a = dep["autoscaling_config"]
            assert 1 <= a.get("min_replicas", 1) <= a.get("initial_replicas", a.get("min_replicas", 1)) \
                <= a["max_replicas"], f"{name}: replica bounds"
        if "user_config" in dep:
            assert hasattr(classes[name], "reconfigure"), f"{name} has a user_config but no reconfigure()"
        # Singletons in the code (state kept in one replica) must stay singletons.
        if code[name].get("num_replicas") == 1 and "autoscaling_config" not in code[name]:
            assert dep.get("num_replicas") == 1, f"{name} holds state in one replica; keep num_replicas: 1"


def _effective(dep: dict, code: dict, key: str):
    """An option as Serve applies it: the config's value, else the code's."""
    return dep[key] if key in dep else code.get(key)


def test_model_versions_are_a_user_config_of_the_router(app):
    from inference.registry import MODEL_NAMES

    router = next(d for d in app["deployments"] if d["name"] == "EnsembleRouter")
    versions = router["user_config"]["model_versions"]
    assert versions is None or set(versions) == set(MODEL_NAMES)


def test_the_graph_fits_two_cores_at_minimum_scale(app, built):
    code = {d["name"]: d for d in built["deployments"]}
    cpus = 0.0
    for dep in app["deployments"]:
        n = dep.get("num_replicas") or dep.get("autoscaling_config", {}).get("min_replicas", 1)
        cpus += n * (_effective(dep, code[dep["name"]], "ray_actor_options") or {}).get("num_cpus", 1)
    assert cpus <= 2.0, f"the graph reserves {cpus} CPUs at its minimum scale"


def test_http_options_match_the_settings(config):
    from configs.settings import Settings

    http = config["http_options"]
    assert http["port"] == Settings().http_port
    assert http.get("host") in ("0.0.0.0", Settings().http_host)


def _deployment_classes(module) -> dict:
    """Deployment name -> class, for the deployments the app module wires together."""
    from ray.serve import Deployment

    from deployments.model_pools import POOL_NAMES, ModelPool

    out = {v.name: v.func_or_class for v in vars(module).values() if isinstance(v, Deployment)}
    for name in POOL_NAMES.values():  # one class, deployed under one name per model
        out[name] = ModelPool.func_or_class
    return out


def test_the_documented_serve_run_line_builds_the_graph(tmp_path):
    """`serve run ... deployments.app:build_app api_keys_file=... replay_speed=60` (docs/operations.md):
    Serve's own CLI path turns the key=value words into the builder's args; a typo fails it."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve import Application
    from ray.serve.scripts import convert_args_to_dict

    from deployments import app as app_module
    from configs.errors import ConfigError

    text = (ROOT / "docs" / "operations.md").read_text()
    line = next(line for line in text.splitlines() if "serve run --address" in line) + " " + next(
        line for line in text.splitlines() if "api_keys_file=" in line and "serve run" not in line)
    words = line.replace("\\", " ").split()
    builder = words[words.index("deployments.app:build_app")]
    keys = tmp_path / "keys"
    keys.write_text("a-development-key-of-enough-length\n")
    args = [w.replace('"$PWD/var/dev_api_keys"', str(keys)) for w in words[words.index(builder) + 1:]]
    built = call_user_app_builder_with_args_if_necessary(app_module.build_app, convert_args_to_dict(tuple(args)))
    assert isinstance(built, Application) and builder == "deployments.app:build_app"
    with pytest.raises(ConfigError, match="replay_sped"):
        call_user_app_builder_with_args_if_necessary(app_module.build_app,
                                                     convert_args_to_dict((f"api_keys_file={keys}", "replay_sped=6")))


def test_user_config_keys_are_the_deployments_tunables(config, app):
    """serve_config.yaml and the rollout drill's tuned variant only set keys each deployment's
    reconfigure takes (a wrong key would fail the deploy), and the variant still validates."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.tunables import INGRESS_TUNABLES, POOL_TUNABLES, ROUTER_TUNABLES
    from scripts.rollout import TUNED, with_tunables

    takes = {"ApiIngress": set(INGRESS_TUNABLES), "EnsembleRouter": {*ROUTER_TUNABLES, "model_versions"},
             **{pool: set(POOL_TUNABLES) for pool in ("RangePredictor", "TPSLClassifier", "SignalClassifier",
                                                      "MetaModel")}}
    tuned = with_tunables(config, app["name"], TUNED)
    ServeDeploySchema.model_validate(tuned)
    for variant in (config, tuned):
        for dep in next(a for a in variant["applications"] if a["name"] == app["name"])["deployments"]:
            assert set(dep.get("user_config") or {}) <= takes.get(dep["name"], set()), dep["name"]
    router = next(d for d in tuned["applications"][0]["deployments"] if d["name"] == "EnsembleRouter")
    assert router["user_config"] == {"model_versions": None, "model_poll_s": 1.0}
    # The committed file changes nothing by itself: every tunable is null (the Settings value holds).
    assert all(v is None for d in app["deployments"] for k, v in (d.get("user_config") or {}).items()
               if k != "model_versions")


def _print_config(env: dict) -> dict:
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLE_", "RAY_SERVE_"))}
    out = subprocess.run([sys.executable, "-m", "deployments.launcher", "--print-config"], cwd=ROOT,
                         env={**base, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_the_fast_ingress_is_the_committed_default(config, app):
    """HAProxy + throughput-optimized for the controller (proxies) and the replicas (direct ingress)."""
    for env_vars in (config["controller_options"]["runtime_env"]["env_vars"], app["runtime_env"]["env_vars"]):
        assert env_vars["RAY_SERVE_ENABLE_HA_PROXY"] == env_vars["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_print_config_binds_the_environments_address_and_honours_the_way_back():
    """What the container and operators deploy: http_options from MLE_HTTP_HOST/PORT, and
    RAY_SERVE_ENABLE_HA_PROXY=0 really reaches both runtime_env blocks."""
    from ray.serve.schema import ServeDeploySchema

    rendered = _print_config({"MLE_HTTP_HOST": "0.0.0.0", "MLE_HTTP_PORT": "8123"})
    ServeDeploySchema.model_validate(rendered)
    assert rendered["http_options"]["host"] == "0.0.0.0" and rendered["http_options"]["port"] == 8123
    assert rendered["applications"][0]["args"] == yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    back = _print_config({"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"})
    assert back["http_options"]["host"] == "127.0.0.1"
    for env_vars in (back["controller_options"]["runtime_env"]["env_vars"],
                     back["applications"][0]["runtime_env"]["env_vars"]):
        assert env_vars["RAY_SERVE_ENABLE_HA_PROXY"] == env_vars["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


def test_launcher_banner_reports_the_deployed_feed_not_its_own_defaults():
    """The banner said "replay at 0x" under `make serve`: the launcher's Settings have replay_speed 0
    (as fast as possible), the deployed graph replays at serve_config.yaml's 60x."""
    from configs.settings import Settings
    from deployments.launcher import _feed_note

    settings = Settings()
    deployed = {"feed": "replay", "replay_speed": 60.0, "sources": {"feed": "args"}}
    assert _feed_note(settings, deployed) == "replay at 60x real time, feed from args"
    assert _feed_note(settings, {**deployed, "replay_speed": 0.0}).startswith("replay as fast as possible")
    live = {"feed": "binance", "replay_speed": None, "binance_api_url": "http://127.0.0.1:9", "sources": {"feed": "env"}}
    assert _feed_note(settings, live) == "binance (http://127.0.0.1:9), feed from env"
