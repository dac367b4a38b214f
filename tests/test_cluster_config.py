"""cluster.yaml / cluster.onprem.yaml: valid for `ray up`, and the commands they run do what we say.

Validation uses Ray's own code path (`prepare_config` fills defaults and merges setup commands the
way `ray up` does, `validate_config` checks ray/autoscaler/ray-schema.json), so a key Ray would
reject fails here, offline. The start commands are then executed for real in bash, in a temporary
HOME laid out like a node, with `ray` and `serve` replaced by recorders (starting a real head here
would collide with the suite's cluster); each recorded argv is parsed by Ray's own click commands,
so a misspelt flag fails too.
"""

from __future__ import annotations

import copy
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ("cluster.yaml", "cluster.onprem.yaml")
HEAD_IP = "192.0.2.10"  # documentation address: nothing is ever sent to it


def _prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / name).read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.fixture(scope="module", params=CLUSTER_FILES)
def cluster(request) -> tuple[str, dict]:
    return request.param, _prepared(request.param)


def test_validates_against_rays_schema(cluster):
    name, config = cluster
    head = config["head_node_type"]
    workers = [t for t in config["available_node_types"] if t != head]
    if config["provider"]["type"] == "local":
        # The local provider folds head and workers into one node type with worker bounds.
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
        node = config["available_node_types"][head]
        assert node["max_workers"] >= 1
    else:
        assert config["provider"]["type"] == "aws"
        assert workers, "a cloud cluster needs an autoscaling worker type"
        for w in workers:
            spec = config["available_node_types"][w]
            assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"]
            assert spec["max_workers"] > spec["min_workers"], "workers must be able to scale up"
        assert config["available_node_types"][head]["max_workers"] == 0


def test_provider_variants_exist():
    types = {yaml.safe_load((ROOT / n).read_text())["provider"]["type"] for n in CLUSTER_FILES}
    assert types == {"aws", "local"}


def test_project_is_synced_and_installed(cluster):
    _, config = cluster
    mounts = config["file_mounts"]
    assert mounts["~/ml-engine"] == ".", "the repository root must be synced to every node"
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token", "token auth needs the same token everywhere"
    assert ".venv" in config["rsync_exclude"] and "models" not in config["rsync_exclude"]
    for key in ("head_setup_commands", "worker_setup_commands"):  # merged by prepare_config
        cmds = config[key]
        assert any("pip install" in c and "-e ." in c and "~/ml-engine" in c for c in cmds), key
        assert any(".venv/bin" in c and "PATH" in c for c in cmds), f"{key}: venv not put on PATH"
    for cmd in _all_commands(config):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"bash syntax error in {cmd!r}: {result.stderr}"


def _all_commands(config: dict) -> list[str]:
    return [c for key in ("initialization_commands", "head_setup_commands", "worker_setup_commands",
                          "head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]


_RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD_FILE"], "a") as f:
    env = {{k: v for k, v in os.environ.items() if k.startswith(("MLE_", "RAY_"))}}
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:], "cwd": os.getcwd(),
                        "env": env}}) + "\\n")
"""


def _run_start_commands(cmds: list[str], tmp_path: Path) -> list[dict]:
    """Run ``cmds`` as Ray's command runner would (bash, RAY_HEAD_IP exported), recording ray/serve."""
    from ray.autoscaler._private.util import with_head_node_ip

    home = tmp_path / "home"
    project = home / "ml-engine"
    project.mkdir(parents=True)
    (project / ".env").write_text("MLE_HTTP_PORT=8123\nMLE_FEED=binance\n")
    (project / "serve_config.yaml").write_text((ROOT / "serve_config.yaml").read_text())
    # The node's venv python: this interpreter with this checkout's code (renders the config for real).
    venv_bin = project / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} \"$@\"\n")
    (venv_bin / "python").chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ray", "serve"):
        exe = bin_dir / tool
        exe.write_text(_RECORDER.format(python=sys.executable))
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record.jsonl"
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD_FILE": str(record)}
    for cmd in with_head_node_ip(cmds, HEAD_IP):
        result = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{cmd!r} failed: {result.stderr}"
    return [json.loads(line) for line in record.read_text().splitlines()]


def _click_parse(argv: list[str]):
    """Parse a recorded `ray start ...` / `serve deploy ...` with Ray's own CLI definitions."""
    from ray.scripts.scripts import start, stop
    from ray.serve.scripts import deploy

    commands = {("ray", "start"): start, ("ray", "stop"): stop, ("serve", "deploy"): deploy}
    command = commands[(argv[0], argv[1])]
    return command.make_context(" ".join(argv[:2]), list(argv[2:])).params


def test_head_starts_ray_on_6380_then_deploys_serve(cluster, tmp_path):
    _, config = cluster
    calls = _run_start_commands(config["head_start_ray_commands"], tmp_path)
    assert [c["argv"][:2] for c in calls] == [["ray", "stop"], ["ray", "start"], ["serve", "deploy"]]
    start = _click_parse(calls[1]["argv"])
    assert start["head"] and start["port"] == Settings().ray_port == 6380
    assert start["dashboard_host"] == "0.0.0.0", "serve deploy / ray job submit go through the dashboard"
    assert start["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert start["metrics_export_port"] == 8080
    assert calls[1]["env"]["RAY_AUTH_MODE"] == "token"
    assert calls[1]["env"]["RAY_SERVE_ENABLE_HA_PROXY"] == calls[1]["env"]["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # .env on the node reaches the Ray processes (and so every replica) as environment.
    assert calls[1]["env"]["MLE_HTTP_PORT"] == "8123" and calls[1]["env"]["MLE_FEED"] == "binance"
    assert calls[2]["env"]["RAY_AUTH_MODE"] == "token", "serve sends the token only in token mode"
    deploy = _click_parse(calls[2]["argv"])
    assert deploy["address"] == "http://127.0.0.1:8265"
    assert calls[2]["cwd"].endswith("ml-engine")
    # What is deployed is serve_config.yaml rendered for the node: every interface (not the file's
    # 127.0.0.1, which no client or other node could reach), the .env port, fast ingress kept.
    deployed = Path(calls[2]["cwd"]) / deploy["config_or_import_path"]
    rendered = yaml.safe_load(deployed.read_text())
    assert rendered["http_options"]["host"] == "0.0.0.0" and rendered["http_options"]["port"] == 8123
    app_env = rendered["applications"][0]["runtime_env"]["env_vars"]
    assert app_env["RAY_SERVE_ENABLE_HA_PROXY"] == app_env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_workers_join_the_head_on_6380(cluster, tmp_path):
    _, config = cluster
    calls = _run_start_commands(config["worker_start_ray_commands"], tmp_path)
    assert [c["argv"][:2] for c in calls] == [["ray", "stop"], ["ray", "start"]]
    start = _click_parse(calls[1]["argv"])
    assert start["address"] == f"{HEAD_IP}:6380" and not start["head"]
    assert calls[1]["env"]["RAY_AUTH_MODE"] == "token"
    assert calls[1]["env"]["RAY_SERVE_ENABLE_HA_PROXY"] == calls[1]["env"]["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert calls[1]["env"]["MLE_FEED"] == "binance"


def test_serve_deploy_retries_and_fails_loudly(tmp_path):
    """If the dashboard never comes up, the head start command must fail (not report success)."""
    config = _prepared("cluster.yaml")
    deploy_cmd = config["head_start_ray_commands"][-1].replace("sleep 5", "sleep 0")
    home = tmp_path / "home"
    (home / "ml-engine").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "serve").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "serve").chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    result = subprocess.run(["bash", "-c", deploy_cmd], env=env, capture_output=True, timeout=30)
    assert result.returncode != 0

