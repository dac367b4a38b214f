"""Live tunables (issue 17 point 3): Serve ``user_config`` -> ``reconfigure``, no restart.

The Serve test: ``serve deploy`` (the operators' CLI, against the suite's cluster) of a one-pool
application, then again with only its ``user_config`` changed: the running replica takes the new
batch size and wait, and it is the same replica (Serve replica id and process id unchanged). The
rest checks, in-process, what each deployment accepts and that the ingress limits by the new figure.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from configs.settings import load_settings
from deployments.tunables import INGRESS_TUNABLES, POOL_TUNABLES, ROUTER_TUNABLES, apply_tunables
from configs.errors import ConfigError
from tests.hardening_util import call, error_of, make_app

pytestmark = pytest.mark.timeout(300)
APP = "tunables-probe"


def _config(path, user_config: dict, args: dict | None = None) -> str:
    config = {"applications": [{
        "name": APP, "route_prefix": None, "import_path": "deployments.app:build_pool",
        "args": {"model": "range_predictor", **(args or {})},
        "deployments": [{"name": "RangePredictor", "num_replicas": 1, "user_config": user_config}]}]}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _serve_deploy(config: str, ray_cluster) -> None:
    serve_cli = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    from scripts.rollout import cli_env  # token auth: the serve CLI sends Ray's token only when told to

    result = subprocess.run([*serve_cli, "deploy", config, "--address", ray_cluster["dashboard_url"]],
                            capture_output=True, text=True, timeout=120, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]


def _tunables(expect: dict, timeout: float = 90.0) -> dict:
    from ray import serve

    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            handle = serve.get_deployment_handle("RangePredictor", app_name=APP)
            seen = handle.tunables.remote().result(timeout_s=10)
            if all(seen[k] == v for k, v in expect.items()):
                return seen
        except Exception as exc:  # the application is still coming up
            seen = repr(exc)
        time.sleep(0.5)
    raise AssertionError(f"the pool never reported {expect}; last: {seen}")


def test_serve_deploy_of_a_changed_user_config_reconfigures_the_same_replica(ray_cluster, tmp_path):
    from ray import serve

    try:
        _serve_deploy(_config(tmp_path / "a.yaml", {"batch_max_size": 8, "batch_wait_s": 0.0}), ray_cluster)
        before = _tunables({"batch_max_size": 8, "batch_wait_s": 0.0})
        _serve_deploy(_config(tmp_path / "b.yaml", {"batch_max_size": 32, "batch_wait_s": 0.005}), ray_cluster)
        after = _tunables({"batch_max_size": 32, "batch_wait_s": 0.005})
        assert before["replica"] and (after["replica"], after["pid"]) == (before["replica"], before["pid"])
        # Without a user_config the Settings value holds (args here), as it did before user_config existed.
        _serve_deploy(_config(tmp_path / "c.yaml", {}, args={"batch_max_size": 4}), ray_cluster)
        _tunables({"batch_max_size": 4, "batch_wait_s": 0.0})
    finally:
        serve.delete(APP)


def test_tunables_are_validated_as_their_settings_and_only_the_deployments_own():
    assert apply_tunables({}, {"batch_max_size": 16}, POOL_TUNABLES).batch_max_size == 16
    assert apply_tunables({"batch_max_size": 8}, {"batch_max_size": None}, POOL_TUNABLES).batch_max_size == 8
    with pytest.raises(ConfigError, match="batch_max_size"):
        apply_tunables({}, {"batch_max_size": 0}, POOL_TUNABLES)
    with pytest.raises(ValueError, match="rate_limit_per_minute cannot be changed live here"):
        apply_tunables({}, {"rate_limit_per_minute": 5}, POOL_TUNABLES)
    with pytest.raises(ConfigError, match="model_poll_s"):
        apply_tunables({}, {"model_poll_s": -1}, ROUTER_TUNABLES, also=("model_versions",))
    assert apply_tunables({}, {"model_versions": None, "model_poll_s": 0.5}, ROUTER_TUNABLES,
                          also=("model_versions",)).model_poll_s == 0.5
    assert apply_tunables({}, {"rate_limit_per_minute": 7}, INGRESS_TUNABLES).rate_limit_per_minute == 7
    assert load_settings().rate_limit_per_minute == 100  # nothing leaks into the defaults


def test_the_ingress_limits_by_the_new_rate_at_once():
    app, service = make_app()
    body = {"symbol": "BTCUSDT", "horizon": 6}
    assert call(app, "POST", "/predictions", json=body).status_code == 200
    service.set_rate_limit(1)  # what ApiIngress.reconfigure does with user_config.rate_limit_per_minute
    statuses = [call(app, "POST", "/predictions", json=body) for _ in range(2)]
    assert statuses[0].status_code == 200  # a burst of one ...
    r = statuses[1]  # ... then the new limit
    assert "more than 1 requests per minute" in error_of(r, 429, "rate_limited")["message"]
    assert service.settings.rate_limit_per_minute == 1


def test_router_and_ingress_reconfigure_apply_their_tunables():
    from deployments.ingress import ApiIngress
    from deployments.router import EnsembleRouter
    from inference.registry import MODEL_NAMES

    router = object.__new__(EnsembleRouter.func_or_class)
    router.overrides = {"model_poll_s": 2.0}
    router.reconfigure({"model_versions": {m: "v1" for m in MODEL_NAMES}, "model_poll_s": 0.25})
    assert router.settings.model_poll_s == 0.25 and router.pinned_versions == {m: "v1" for m in MODEL_NAMES}
    router.reconfigure({"model_versions": None})  # poll interval back to the args' value
    assert router.settings.model_poll_s == 2.0 and router.pinned_versions is None
    with pytest.raises(ValueError, match="batch_max_size cannot be changed live here"):
        router.reconfigure({"model_versions": None, "batch_max_size": 8})

    app, service = make_app()
    ingress = object.__new__(ApiIngress.func_or_class)
    ingress.overrides, ingress.service = {}, service
    ingress.reconfigure({"rate_limit_per_minute": 3})
    assert service.limiter.limit == 3
    body = {"symbol": "BTCUSDT", "horizon": 6}
    statuses = [call(app, "POST", "/predictions", json=body).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
