"""The pieces of a multi-node Ray cluster in a :class:`~scripts.lab_network.LabNetwork`.

One Ray node per namespace (``ray start`` inside ``ip netns exec``), the head in namespace 0; the
services the engine talks to reachable from every node through the bridge (a private Redis bound
to the bridge address, PostgreSQL forwarded to this host's loopback server); every node started
with the environment an operator gives a cluster node (MLE_* settings, the fast-ingress switches).
Used by :mod:`scripts.cluster_drill`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from configs.settings import PROJECT_DIR
from deployments import ray_head
from deployments.ray_head import ray_cli  # noqa: F401  (cluster_drill calls cn.ray_cli)
from scripts.lab_network import LabNetwork, TcpForward

RAY_PORT = 6380
DASHBOARD_PORT = 8265
HTTP_PORT = 8000
APP = "ml-engine"


def ensure_auth_token() -> None:
    """Ray's token auth across nodes: every node (and every CLI call) reads the same token file;
    a cluster of separate machines copies it to each (docs/operations.md)."""
    os.environ["RAY_AUTH_MODE"] = "token"  # for the CLI calls this process makes (serve deploy, job submit)
    ray_head.ensure_auth_token(dict(os.environ))


def auth_headers() -> dict[str, str]:
    token = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}


class LabServices:
    """Redis (private, on the bridge address) and PostgreSQL (a database of its own, forwarded)."""

    def __init__(self, lab: LabNetwork, workdir: Path) -> None:
        self.lab, self.workdir = lab, workdir
        self.database = f"mle_lab{lab.lab_id}"
        self._redis: subprocess.Popen | None = None
        # Bound to the bridge address, Redis refuses unauthenticated clients (protected mode): the lab's
        # own password, as a real deployment has one.
        self.redis_password = secrets.token_hex(16)
        self._forward: TcpForward | None = None

    @property
    def redis_pid(self) -> int | None:
        return None if self._redis is None else self._redis.pid

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@{self.lab.host_address}:6379/0"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{self.lab.host_address}:5432/{self.database}"

    def start(self) -> "LabServices":
        self._redis = subprocess.Popen(
            ["redis-server", "--bind", self.lab.host_address, "--port", "6379", "--save", "", "--appendonly", "no",
             "--requirepass", self.redis_password, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._forward = TcpForward(self.lab.host_address, 5432, "127.0.0.1", 5432).start()
        asyncio.run(self._database("CREATE"))
        return self

    def stop(self) -> None:
        if self._redis is not None:
            self._redis.terminate()
            self._redis.wait(10)
        if self._forward is not None:
            self._forward.stop()
        try:
            asyncio.run(self._database("DROP"))
        except Exception:  # PostgreSQL not there: nothing was created
            pass

    async def _database(self, verb: str) -> None:
        import asyncpg

        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=10)
        try:
            if verb == "DROP" or await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database):
                await conn.execute(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
            if verb == "CREATE":
                await conn.execute(f"CREATE DATABASE {self.database}")
        finally:
            await conn.close()


def node_env(lab: LabNetwork, services: LabServices, workdir: Path, i: int, models_dir: Path) -> dict[str, str]:
    """What an operator puts in a cluster node's environment (cluster.yaml does the same)."""
    keys = workdir / "api_keys"
    haproxy = Path(f"/tmp/mle{lab.lab_id}hp{i}")  # HAProxy's socket path must stay short
    haproxy.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(PROJECT_DIR), "RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE",
        "MLE_REDIS_URL": services.redis_url, "MLE_DATABASE_URL": services.database_url,
        "MLE_API_KEYS_FILE": str(keys), "MLE_DEPLOYMENT_SECRET": (workdir / "secret").read_text(),
        "MLE_MODELS_DIR": str(models_dir), "MLE_SPOOL_DIR": str(workdir / f"spool{i}"),
        "RAY_AUTH_MODE": "token", "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
        "MLE_RATE_LIMIT_PER_MINUTE": "1000000",  # the drill's load is one key; the limit is not under test
    })
    env.pop("RAY_ADDRESS", None)
    return env


def write_secrets(workdir: Path) -> str:
    """An API key file (0600) and a deployment secret for the lab; returns the key."""
    key = secrets.token_urlsafe(24)
    keys = workdir / "api_keys"
    keys.write_text(key + "\n")
    keys.chmod(0o600)
    (workdir / "secret").write_text(secrets.token_hex(32))
    return key


def start_ray_nodes(lab: LabNetwork, envs: list[dict[str, str]], cpus: int, log_dir: Path,
                    cores: list[int] | None = None) -> None:
    """The head in namespace 0, a worker in every other one; returns once all have joined. With
    ``cores``, node ``i``'s processes may run only on CPU core ``cores[i]`` (``taskset``: every
    process ``ray start`` launches inherits it), so a node is as big as a machine of that many cores."""
    head = lab.address(0)
    ensure_auth_token()
    for i in range(lab.nodes):
        argv = [ray_cli(), "start", "--node-ip-address", lab.address(i), "--num-cpus", str(cpus),
                "--disable-usage-stats"]
        if i == 0:
            argv += ["--head", "--port", str(RAY_PORT), "--dashboard-host", "0.0.0.0",
                     "--dashboard-port", str(DASHBOARD_PORT), "--temp-dir", f"/tmp/mle{lab.lab_id}ray"]
        else:
            argv += ["--address", f"{head}:{RAY_PORT}"]
        if cores is not None:
            argv = ["taskset", "-c", str(cores[i]), *argv]
        with open(log_dir / f"ray-start-{i}.log", "w") as log:
            rc = subprocess.call(lab.exec_argv(i, argv), env=envs[i], stdout=log, stderr=subprocess.STDOUT,
                                 timeout=240)
        if rc != 0:
            raise RuntimeError(f"ray start on node {i} failed (exit {rc}); see {log_dir / f'ray-start-{i}.log'}")
    wait_nodes(lab, lab.nodes, 180)


def dashboard(lab: LabNetwork) -> str:
    return f"http://{lab.address(0)}:{DASHBOARD_PORT}"


def alive_nodes(lab: LabNetwork) -> dict[str, str]:
    """{node_id: node_ip} of the nodes Ray considers alive."""
    r = httpx.get(f"{dashboard(lab)}/api/v0/nodes", params={"limit": 100, "detail": "false"},
                  headers=auth_headers(), timeout=30)
    r.raise_for_status()
    rows = r.json()["data"]["result"]["result"]
    return {n["node_id"]: n["node_ip"] for n in rows if n["state"] == "ALIVE"}


def wait_nodes(lab: LabNetwork, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if len(alive_nodes(lab)) >= n:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} Ray nodes did not join within {timeout_s:.0f}s")
        time.sleep(1)


# What a cluster sets per environment on top of the committed serve_config.yaml (docs/operations.md):
# the proxies bind every address of their node; the ingress has a replica on every node and the
# router and model pools at least two, so one node's loss never takes a deployment's only replica;
# the two singletons that hold state (the rolling windows, the feed actors) live on the head, which
# is the cluster's single point of failure anyway (it holds the GCS).
HEAD_ONLY = {"resources": {"node:__internal_head__": 0.001}}
SINGLETONS = ("FeatureBuilder", "MarketFeed")
SCALED = ("EnsembleRouter", "RangePredictor", "TPSLClassifier", "SignalClassifier", "MetaModel")


def lab_serve_config(workdir: Path, nodes: int) -> tuple[Path, dict[str, Any]]:
    """The committed serve_config.yaml with the cluster's per-environment settings; the file and
    what was changed."""
    cfg = yaml.safe_load((PROJECT_DIR / "serve_config.yaml").read_text())
    cfg["http_options"].update(host="0.0.0.0", port=HTTP_PORT)
    changes: dict[str, Any] = {"http_options.host": "0.0.0.0", "ApiIngress.num_replicas": nodes}
    for dep in cfg["applications"][0]["deployments"]:
        name = dep["name"]
        if name == "ApiIngress":
            dep["num_replicas"] = nodes
        elif name in SCALED and "autoscaling_config" in dep:
            auto = dep["autoscaling_config"]
            auto["min_replicas"] = auto["initial_replicas"] = 2
            auto["max_replicas"] = max(2, auto.get("max_replicas", 2))
            changes[f"{name}.min_replicas"] = 2
        elif name in SINGLETONS:
            dep["ray_actor_options"] = {**code_actor_options(name), **HEAD_ONLY}
            changes[f"{name}.placement"] = "head node"
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, changes


def code_actor_options(deployment: str) -> dict[str, Any]:
    """The deployment's ray_actor_options as the code declares them (a config's replace them whole)."""
    from scripts.serve_build import built_application

    for dep in built_application()["deployments"]:
        if dep["name"] == deployment:
            return dict(dep.get("ray_actor_options") or {})
    return {}


def serve_deploy(lab: LabNetwork, config: Path, log_dir: Path) -> None:
    with open(log_dir / "serve-deploy.log", "w") as log:
        rc = subprocess.call([str(Path(ray_cli()).with_name("serve")), "deploy", str(config), "-a", dashboard(lab)],
                             stdout=log, stderr=subprocess.STDOUT, timeout=120)
    if rc != 0:
        raise RuntimeError(f"serve deploy failed (exit {rc}); see {log_dir / 'serve-deploy.log'}")


def _application(lab: LabNetwork, app: str = APP) -> dict[str, Any]:
    from scripts.rollout import serve_details

    return serve_details(dashboard(lab)).get("applications", {}).get(app) or {}


def serve_replicas(lab: LabNetwork, app: str = APP) -> dict[str, list[dict[str, Any]]]:
    """{deployment: [replica details]} as Serve reports them."""
    return {name: d.get("replicas", []) for name, d in _application(lab, app).get("deployments", {}).items()}


def app_status(lab: LabNetwork, name: str = APP) -> tuple[str, dict[str, str]]:
    app = _application(lab, name)
    return app.get("status", "NOT_STARTED"), {n: d["status"] for n, d in app.get("deployments", {}).items()}
