"""The targets bench/serve_load.py measures: bare FastAPI, the plain app, what `make serve` starts, the
graph deployed by code; plus the private Redis and PostgreSQL database each run gets. Every class
starts on ports of its own and ``stop()`` leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deployments.ray_head import free_port
from scripts.lab.services import PrivateRedis as LabRedis

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def wait_http(url: str, key: str, timeout: float = 600, proc: subprocess.Popen | None = None) -> None:
    """Until /health/detailed says both symbols have published forecasts."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url}: its process exited ({proc.returncode})")
        try:
            r = httpx.get(f"{url}/health/detailed", headers={"X-API-Key": key}, timeout=10)
            if r.status_code == 200 and all(r.json()["market"]["symbols"][s]["predictions_published"]
                                            for s in SYMBOLS):
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(1)
    raise SystemExit(f"{url} did not become ready: {last}")


class Baseline:
    name = "plain"

    def __init__(self, models: Path, key: str, redis_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "baseline_fastapi.py"), "--port",
                                      str(self.port), "--models", str(models), "--api-key", key, "--redis-url",
                                      redis_url], cwd=ROOT, stdout=subprocess.DEVNULL)
        wait_http(self.url, key)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Bare:
    name = "bare"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_fastapi.py"), "--port",
                                      str(self.port)], cwd=ROOT, stdout=subprocess.DEVNULL)
        _wait_health(self.url, timeout=60)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Shipped:
    """``python -m deployments.launcher`` (what ``make serve`` runs) on ports of its own, with the
    committed serve_config.yaml -- only the per-key rate limit raised out of reach, in a copy."""

    name = "shipped"

    def __init__(self, models: Path, key: str, redis_url: str, database_url: str, workdir: Path) -> None:
        import yaml

        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        for dep in config["applications"][0]["deployments"]:
            if dep["name"] == "ApiIngress":
                dep["user_config"] = {**(dep.get("user_config") or {}), "rate_limit_per_minute": 10**9}
        path = workdir / "serve_config-shipped.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLE_", "RAY_SERVE_"))}
        env.update({"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "MLE_API_KEYS": key,
                    "MLE_MODELS_DIR": str(models), "MLE_REDIS_URL": redis_url, "MLE_DATABASE_URL": database_url,
                    "MLE_RAY_PORT": str(free_port()), "MLE_HTTP_PORT": str(self.http_port),
                    "MLE_DASHBOARD_PORT": str(free_port()), "MLE_SPOOL_DIR": str(workdir / "spool")})
        self.log = open(workdir / "launcher.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "deployments.launcher", "--no-train", "--config",
                                      str(path)], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url, key, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the launcher stops its head within 10 s
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class PrivateDatabase:
    """A database of its own on the machine's PostgreSQL, so the shipped log writes no shared table."""

    def __init__(self, base_url: str = "postgresql://127.0.0.1:5432/test") -> None:
        self.base_url = base_url
        self.name = f"mle_bench_{secrets.token_hex(4)}"
        self._sql(f"CREATE DATABASE {self.name}")
        self.url = base_url.rsplit("/", 1)[0] + "/" + self.name

    def _sql(self, statement: str) -> None:
        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(self.base_url, timeout=5)
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(go())

    def stop(self) -> None:
        try:
            self._sql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        except Exception as exc:  # the machine's PostgreSQL went away: say so, the run's figures stand
            print(f"could not drop {self.name}: {exc}")


class ServeApp:
    """A fresh Ray head (own ports, own env) running the whole graph."""

    def __init__(self, name: str, env_extra: dict[str, str], models: Path, key: str, redis_url: str,
                 workdir: Path, ingress_replicas: int = 1) -> None:
        self.models, self.key, self.redis_url, self.ingress_replicas = models, key, redis_url, ingress_replicas
        self._start(name, env_extra, workdir)

    def _start(self, name: str, env_extra: dict[str, str], workdir: Path) -> None:
        """The head, this driver connected, Serve on a free port, then :meth:`_deploy`."""
        from deployments.launcher import RayHead

        self.name = name
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
               **env_extra}
        os.environ["RAY_AUTH_MODE"] = env["RAY_AUTH_MODE"]
        self.head = RayHead(free_port(), env, dashboard_port=free_port(), log_path=workdir / f"ray-{name}.log")
        try:
            self.head.wait_ready()
            from deployments.app import start_serve_on_free_port

            self.head.connect()
            self.http_port = start_serve_on_free_port("127.0.0.1")
            self.url = f"http://127.0.0.1:{self.http_port}"
            self._deploy(workdir)
        except BaseException:
            self.stop()  # never leave a Ray head behind
            raise

    def _deploy(self, workdir: Path) -> None:
        from deployments.app import deploy
        from deployments.auth import write_api_keys_file

        keys_file = write_api_keys_file(workdir / f"api_keys-{self.name}", [self.key])
        deploy({"models_dir": str(self.models), "api_keys_file": str(keys_file), "rate_limit_per_minute": 10**9,
                "redis_url": self.redis_url, "replay_speed": 0, "replay_history": 10**9, "max_data_age_s": 1e9,
                "serving_log": "", "serve_access_log": False}, ingress_replicas=self.ingress_replicas)
        wait_http(self.url, self.key)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            self.head.stop()


class BareServe(ServeApp):
    """bench/bare_fastapi.py's fixed dict as the only Serve deployment (one ingress replica, 0.5 CPU),
    in the mode ``make serve`` ships (HAProxy + throughput-optimized): Serve's own floor per
    request, with none of the engine's code."""

    def __init__(self, workdir: Path) -> None:
        self._start("bare-serve", haproxy_env(workdir), workdir)

    def _deploy(self, workdir: Path) -> None:
        from ray import serve

        from bench.bare_fastapi import build

        @serve.deployment(name="BareIngress", ray_actor_options={"num_cpus": 0.5})
        @serve.ingress(build())
        class BareIngress:
            pass

        serve.run(BareIngress.bind(), name="bare", route_prefix="/")
        _wait_health(self.url)


def _wait_health(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer /health")
        time.sleep(0.2)


_CLEANUP: list[Path] = []


def haproxy_env(workdir: Path) -> dict[str, str]:
    """Serve's high-throughput mode as ``make serve`` sets it (deployments.launcher.fast_ingress_env),
    with HAProxy's files and ports private to this run."""
    from deployments.launcher import fast_ingress_env

    env = fast_ingress_env({})
    _CLEANUP.append(Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]))
    return {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")}


class PrivateRedis(LabRedis):
    """The lab's private redis-server (scripts/lab/services.py), started at once as the benchmarks use it."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.start()
