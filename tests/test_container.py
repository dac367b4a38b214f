"""Dockerfile, entrypoint and docker-compose.yml: what can be checked without a Docker daemon.

No daemon runs here (and the Docker CLI here has no compose plugin), so the image is never built
in the suite. Instead: hadolint and shellcheck (real binaries from PyPI wheels) lint the files,
Docker's own Go parser (`dockerfile` package) reads the Dockerfile, the Rust `compose_spec` parser
(strict: unknown keys and bad values are errors) reads the compose file, and the compose
environment, once interpolated from ops/compose.env.example, must load as valid `Settings`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD_PORT, METRICS_PORT = 8265, 8080


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def instructions() -> list:
    import dockerfile

    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def _stages(instructions) -> dict[str, list]:
    stages: dict[str, list] = {}
    current = None
    for ins in instructions:
        if ins.cmd == "FROM":
            current = ins.value[2] if len(ins.value) == 3 else ins.value[0]
            stages[current] = []
        stages[current].append(ins)
    return stages


def test_hadolint_clean():
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_entrypoint_shellcheck_clean():
    result = subprocess.run([str(BIN / "shellcheck"), str(ROOT / "ops" / "docker-entrypoint.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_slim_python_image_for_head_and_workers(instructions):
    stages = _stages(instructions)
    assert list(stages)[-1] == "engine", "the default build target must be the model-less runtime"
    assert stages["engine"][0].value[0] == "runtime" and stages["baked"][0].value[0] == "runtime"
    assert stages["runtime"][0].value[0].startswith("python:3.11-slim")
    runtime = stages["runtime"]
    entry = [i for i in runtime if i.cmd == "ENTRYPOINT"][0].value
    assert entry == ("docker-entrypoint.sh",)
    assert [i for i in runtime if i.cmd == "CMD"][0].value == ("head",)
    baked = [i for i in stages["baked"] if i.cmd == "COPY"]
    assert baked and baked[0].value[-1] == "/app/models/"


def test_runs_as_non_root(instructions):
    runtime = _stages(instructions)["runtime"]
    args = dict(a.value[0].split("=", 1) for a in runtime if a.cmd == "ARG")
    users = [i for i in runtime if i.cmd == "USER"]
    assert users, "the runtime stage must drop root"
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1].value[0])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) != 0, user
    # USER comes before the ENTRYPOINT, so every role (head, worker, job) runs unprivileged.
    names = [i.cmd for i in runtime]
    assert names.index("USER") < names.index("ENTRYPOINT")


def test_ports_env_and_healthcheck(instructions):
    runtime = _stages(instructions)["runtime"]
    settings = Settings()
    exposed = {int(p) for i in runtime if i.cmd == "EXPOSE" for p in i.value}
    assert exposed == {settings.http_port, settings.ray_port, DASHBOARD_PORT, METRICS_PORT}
    env = {}
    for i in runtime:
        if i.cmd == "ENV":
            env.update(zip(i.value[::2], i.value[1::2]))
    assert env["MLE_HTTP_HOST"] == "0.0.0.0", "Serve must listen beyond the container's loopback"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1", "the fast ingress"
    assert env["MLE_MODELS_DIR"] == "/app/models" and env["PYTHONPATH"] == "/app"
    # Every MLE_ variable the image sets is a real Settings field with a valid value.
    mle = {k: v for k, v in env.items() if k.startswith("MLE_")}
    _settings_from_env(mle)
    health = [i for i in runtime if i.cmd == "HEALTHCHECK"]
    assert len(health) == 1 and health[0].value[0] == "CMD"
    probe = " ".join(health[0].value[1:])
    assert "/health" in probe and "MLE_HTTP_PORT" in probe and str(settings.http_port) in probe
    assert any(f.startswith("--start-period=") for f in health[0].flags), "Ray + model load need a grace period"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_copied_paths_exist_and_are_not_dockerignored(instructions):
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    for ins in instructions:
        if ins.cmd != "COPY" or any(f.startswith("--from=") for f in ins.flags):
            continue
        for src in ins.value[:-1]:
            if src == "models/":  # the `baked` target: the operator's trained models, git-ignored
                assert not _dockerignored("models", ignore)
                continue
            assert (ROOT / src).exists(), f"COPY {src}: missing from the build context"
            assert not _dockerignored(src.rstrip("/"), ignore), f"COPY {src}: excluded by .dockerignore"


def test_dependency_layer_installs_the_lock_file(instructions):
    """The image installs the pinned train lock (serving + training, no matplotlib, no test tools);
    tests/test_packaging.py checks that lock against pyproject.toml."""
    deps = _stages(instructions)["deps"]
    [arg] = [i.value[0] for i in deps if i.cmd == "ARG"]
    name, default = arg.split("=", 1)
    assert name == "REQUIREMENTS" and default == "requirements/train.txt" and (ROOT / default).exists()
    assert any(i.cmd == "COPY" and i.value[0] == "requirements/" for i in deps)
    [run] = [i.value[0] for i in deps if i.cmd == "RUN"]
    assert run.endswith('/opt/venv/bin/pip install --no-cache-dir -r "${REQUIREMENTS}"')
    assert "pyproject" not in run  # nothing resolved afresh at build time


# ---------------------------------------------------------------------------------------------
# Entrypoint (the roles that do not start Ray can run here)
# ---------------------------------------------------------------------------------------------

def _entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": env.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(ROOT / "ops" / "docker-entrypoint.sh"), *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


def test_entrypoint_runs_other_commands_as_given(tmp_path):
    result = _entrypoint("python", "-c", "import configs.settings as s; print(s.Settings().http_port)",
                         env={"MLE_HTTP_PORT": "8123"})
    assert result.returncode == 0 and result.stdout.strip() == "8123", result.stderr


def test_worker_needs_the_head_address():
    result = _entrypoint("worker", env={})
    assert result.returncode != 0 and "RAY_HEAD_ADDRESS" in result.stderr


def test_head_without_models_fails_with_the_reason(tmp_path):
    result = _entrypoint("head", env={"MLE_MODELS_DIR": str(tmp_path), "ENGINE_TRAIN_IF_MISSING": "0"})
    assert result.returncode == 2
    assert f"no models in {tmp_path}" in result.stderr and "ENGINE_TRAIN_IF_MISSING=1" in result.stderr


# ---------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (error when unset or empty)."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise AssertionError(f"${{{name}}} is required ({arg}) but ops/compose.env.example lacks it")
        return arg if op == "-" else ""
    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    import compose_spec

    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # resolves YAML anchors/merges
    spec = {k: v for k, v in raw.items() if not k.startswith("x-")}
    parsed = compose_spec.PyCompose.from_json(json.dumps(spec))   # raises ValueError on any bad key
    parsed.validate()                                              # volume/network references
    return spec


@pytest.fixture(scope="module")
def compose_env() -> dict[str, str]:
    lines = (ROOT / "ops" / "compose.env.example").read_text().splitlines()
    return dict(l.split("=", 1) for l in lines if l.strip() and not l.startswith("#"))


def _settings_from_env(env: dict[str, str]) -> Settings:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return load_settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_compose_services(compose):
    services = compose["services"]
    assert {"redis", "postgres", "engine", "worker"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name}: no healthcheck"
    engine = services["engine"]
    assert engine["build"]["target"] == "engine" and engine["command"] == ["head"]
    assert engine["depends_on"] == {"redis": {"condition": "service_healthy"},
                                    "postgres": {"condition": "service_healthy"}}
    assert "./models:/app/models" in engine["volumes"]
    published = {p.split(":")[-1] for p in engine["ports"]}
    assert published == {str(Settings().http_port), str(DASHBOARD_PORT), str(METRICS_PORT)}
    assert all(p.startswith("127.0.0.1:") for p in engine["ports"]), "publish on loopback by default"
    assert services["worker"]["profiles"] == ["workers"] and services["worker"]["command"] == ["worker"]


def test_compose_env_wires_the_engine_to_its_services(compose, compose_env):
    services = compose["services"]
    pg = {k: _interpolate(v, compose_env) for k, v in services["postgres"]["environment"].items()}
    for name in ("engine", "worker"):
        env = {k: _interpolate(str(v), compose_env) for k, v in services[name]["environment"].items()}
        settings = _settings_from_env({k: v for k, v in env.items() if k.startswith("MLE_")})
        assert settings.redis_url.get_secret_value() == "redis://redis:6379/0"
        assert settings.database_url.get_secret_value() == (f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
                                         f"@postgres:5432/{pg['POSTGRES_DB']}")
        assert settings.http_host == "0.0.0.0" and settings.api_keys
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == compose_env["RAY_AUTH_TOKEN"]
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1", name
    worker_env = services["worker"]["environment"]
    assert worker_env["RAY_HEAD_ADDRESS"] == f"engine:{Settings().ray_port}"


def test_compose_secrets_are_required_not_defaulted(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("POSTGRES_PASSWORD", "MLE_API_KEYS", "RAY_AUTH_TOKEN"):
        assert re.search(r"\$\{" + secret + r":\?", text), f"{secret} must fail loudly when unset"
    with pytest.raises(AssertionError, match="POSTGRES_PASSWORD"):
        _interpolate(compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"], {})
