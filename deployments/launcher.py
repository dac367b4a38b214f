"""``make serve`` / ``python -m deployments.launcher``: the engine on this machine, in the foreground.

1. an API key: ``MLE_API_KEYS`` if set, else one generated for this run (printed);
2. models: if the registry has no current set, installs the shipped set (``data/models``, trained on
   the full history, checksums and feature-set hash verified); only when that is missing or does not
   match the code, trains a default set on the shipped sample (``python -m training.train ... --out
   <models_dir>``, with its progress bar), saying why;
3. a local Ray head on ``MLE_RAY_PORT`` (6380; Redis owns 6379) in a session of its own, watched
   by a watchdog that stops it if this process is killed (deployments/ray_head.py);
4. Serve on ``MLE_HTTP_HOST:MLE_HTTP_PORT`` deploying the committed ``serve_config.yaml`` (``--config``)
   exactly as ``serve deploy`` would -- its args are defaults below ``MLE_*`` (``MLE_FEED=binance``
   wins over ``feed: replay``; by default a 60x replay of the shipped sample) -- with Serve's fast
   ingress (HAProxy + throughput-optimized; ``RAY_SERVE_ENABLE_HA_PROXY=0
   RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` for Serve's default proxy);
5. prints the URL, where the key comes from and a working curl line, then waits.

Ctrl-C or SIGTERM: Serve is given 2.5 s to shut down, then the Ray head's whole session is stopped
(SIGTERM, SIGKILL after 3 s): every port is free within 10 s. Never a bare ``ray stop``: other
clusters on the machine are left alone. Redis and PostgreSQL are used when reachable; without them
the engine runs degraded (see /health/detailed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from configs.settings import PROJECT_DIR, Settings, load_settings, redact_url
from deployments.auth import new_api_key
from deployments.ray_head import RayHead, free_port, port_open  # noqa: F401  (RayHead: bench/ imports it here)

SERVE_CONFIG = PROJECT_DIR / "serve_config.yaml"
# The committed model set trained on the full history (make shipped-models rebuilds it; docs/models.md).
SHIPPED_MODELS = PROJECT_DIR / "data" / "models"
CURRENT_SET_FILE = "current_set.json"  # inference.registry.CURRENT_SET_FILE (not imported here: it loads xgboost)
# Serve's fast ingress (issue 12): HAProxy in front, replicas answering it directly. Both are read
# when Ray's processes start; an operator's own value (0) wins.
FAST_INGRESS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
SERVE_SHUTDOWN_S = 2.5  # of the 10 s a clean stop may take; the head's session gets the rest


def _say(msg: str) -> None:
    print(f"[make serve] {msg}", flush=True)


def shipped_set_problem(settings: Settings, shipped: Path = SHIPPED_MODELS) -> str | None:
    """Why the committed model set (``data/models``, ``make shipped-models``) cannot be served by this
    code, or None when it can: it must exist, pass every checksum and the feature-set hash, and load as
    one consistent ensemble under these settings (horizons, labels, feature list)."""
    from configs.errors import ModelLoadError, ModelNotFoundError
    from inference.ensemble import Ensemble

    if not (shipped / CURRENT_SET_FILE).is_file():
        return f"no shipped model set in {shipped}"
    try:
        Ensemble.load(shipped, settings)
    except (ModelNotFoundError, ModelLoadError) as exc:
        return f"the shipped model set does not match this code ({exc}); rebuild it: make shipped-models"
    return None


def install_shipped_models(settings: Settings, shipped: Path = SHIPPED_MODELS) -> str | None:
    """Copy the shipped set into ``settings.models_dir`` and promote it there (the registry verifies
    every checksum and the feature-set hash again on the copy). Returns None when installed, else why
    not (nothing is promoted then). Each version is copied into a hidden folder and renamed into place,
    so an interrupted copy never looks like a model version."""
    from inference.registry import ModelRegistry

    problem = shipped_set_problem(settings, shipped)
    if problem is not None:
        return problem
    versions = ModelRegistry(shipped).current_versions()
    root = Path(settings.models_dir)
    for model, version in versions.items():
        final = root / model / version
        if final.exists():
            continue  # versions are immutable: promote_set verifies what is there
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".incoming-{version}-", dir=final.parent))
        try:
            shutil.copytree(shipped / model / version, tmp, dirs_exist_ok=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    ModelRegistry(root).promote_set(versions)
    return None


def ensure_models(settings: Settings, shipped: Path = SHIPPED_MODELS) -> None:
    """Make sure the registry has a current set: the one there, else the shipped set (trained on the
    full history), else -- when that is missing or does not match the code -- a default set trained
    on the shipped 30-day sample (a weak one: say so)."""
    from configs.errors import ModelLoadError, ModelNotFoundError
    from inference.registry import MODEL_NAMES, ModelRegistry

    registry = ModelRegistry(settings.models_dir)
    try:
        versions = registry.current_versions()
        _say(f"models: {settings.models_dir} (set {', '.join(sorted(set(versions.values())))})")
        return
    except (ModelNotFoundError, ModelLoadError):
        pass
    problem = install_shipped_models(settings, shipped)
    if problem is None:
        versions = {m: registry.current(m) for m in MODEL_NAMES}
        _say(f"no models in {settings.models_dir}: installed the shipped set {versions['meta_model']} from {shipped} "
             "(trained on the full history; checksums and feature-set hash verified)")
        return
    files = [str(settings.sample_dir / f"{s}_5m.parquet") for s in settings.market.real_symbols]
    _say(f"no models in {settings.models_dir} and {problem}: training the default set on the shipped "
         "30-day sample (weak models)")
    cmd = [sys.executable, "-m", "training.train", "--candles", *files, "--out", str(settings.models_dir)]
    rc = subprocess.call(cmd, cwd=PROJECT_DIR)
    if rc != 0:
        raise SystemExit(f"training failed (exit {rc}): {' '.join(cmd)}")


def service_status(settings: Settings) -> tuple[str, str]:
    """Whether Redis and PostgreSQL answer (the engine runs without them, degraded)."""
    import asyncio

    import asyncpg
    import redis

    try:
        redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=1, socket_connect_timeout=1).ping()
        r = "up"
    except Exception as exc:
        r = f"not reachable ({type(exc).__name__}): predictions are computed on request, no pub/sub"

    async def pg() -> None:
        conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=2)
        await conn.close()

    try:
        asyncio.run(pg())
        p = "up"
    except Exception as exc:
        p = f"not reachable ({type(exc).__name__}): nothing is logged to the database"
    return r, p


def fast_ingress_env(env: dict[str, str], workdir: Path | None = None) -> dict[str, str]:
    """``env`` with the fast ingress on unless the operator turned it off, and HAProxy's files and
    ports private to this head (two heads on one machine must not share Serve's /tmp defaults)."""
    out = {**FAST_INGRESS, **env}
    if out["RAY_SERVE_ENABLE_HA_PROXY"] != "1":
        return out
    # HAProxy's admin socket path must stay under 97 bytes, and Serve adds a 56-character folder.
    d = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    private = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(d / "haproxy.cfg"),
               "RAY_SERVE_HAPROXY_SOCKET_PATH": str(d / "admin.sock"),
               "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(d),
               "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(d / "server-state"),
               "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    return {**private, **out}


def render_config(path: Path, settings: Settings, env: dict[str, str]):
    """The committed config as ``serve deploy`` would apply it here: ``http_options`` host and port from
    ``MLE_HTTP_HOST`` / ``MLE_HTTP_PORT``, and the fast-ingress switches of its ``runtime_env`` blocks
    from this environment (so ``RAY_SERVE_ENABLE_HA_PROXY=0 make serve`` really turns HAProxy off)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    raw["http_options"] = {**(raw.get("http_options") or {}), "host": settings.http_host, "port": settings.http_port}
    blocks = [(raw.get("controller_options") or {}).get("runtime_env") or {}]
    blocks += [app.get("runtime_env") or {} for app in raw.get("applications", [])]
    for block in blocks:
        env_vars = block.get("env_vars") or {}
        for key in [k for k in env_vars if k in env and k.startswith("RAY_SERVE_")]:
            env_vars[key] = env[key]
    return ServeDeploySchema.model_validate(raw)


def print_config(path: Path) -> int:
    """``--print-config``: the rendered config as YAML on stdout (nothing is started)."""
    import yaml

    config = render_config(path, load_settings(), dict(os.environ))
    print(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True), sort_keys=False), end="")
    return 0


def deploy_config(config) -> None:
    """Start Serve with the config's options and deploy its applications, as ``serve run config.yaml``
    does (the controller builds the app from its import path and args: the ``serve deploy`` path)."""
    from ray.serve._private import api as serve_api

    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   grpc_options=config.grpc_options.model_dump(),
                                   proxy_location=config.proxy_location,
                                   controller_options=config.controller_options)
    client.deploy_apps(config, _blocking=False)


def stop_serve(timeout_s: float = SERVE_SHUTDOWN_S) -> bool:
    """``serve.shutdown()`` (replicas drain and flush their logs) for at most ``timeout_s``: the head's
    session is stopped after it either way. False when it did not finish in time."""
    from ray import serve

    t = threading.Thread(target=serve.shutdown, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        _say(f"serve shutdown took over {timeout_s:g} s: stopping the Ray head regardless")
    return not t.is_alive()


def wait_until_serving(base_url: str, key: str, symbols: list[str], timeout: float = 300) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/health/detailed", headers={"X-API-Key": key}, timeout=10)
            if r.status_code == 200:
                market = r.json()["market"]["symbols"]
                if all(market[s]["predictions_published"] for s in symbols):
                    return r.json()
                last = ", ".join(f"{s}: {market[s]['history']} candles" for s in symbols)
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(1.0)
    raise SystemExit(f"the engine did not become ready in {timeout:.0f}s ({last})")


class _Stop(BaseException):
    """Raised by the SIGINT/SIGTERM handler wherever the launcher is (starting, waiting, serving)."""


def _on_signal(*_: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # one stop sequence; a second Ctrl-C must not cut it short
    raise _Stop()


def _catch_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def _environment() -> tuple[dict[str, str], bool]:
    """The environment of the head: the operator's, the fast ingress, a generated key if none."""
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The head enables Ray's token auth (token in ~/.ray/auth_token); this driver must use it too.
    env.setdefault("RAY_AUTH_MODE", "token")
    generated = not env.get("MLE_API_KEYS", "").strip()
    if generated:
        env["MLE_API_KEYS"] = new_api_key()
    env = fast_ingress_env(env)
    os.environ.update({k: env[k] for k in ("MLE_API_KEYS", "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE")})
    return env, generated


def _feed_note(settings: Settings, deployed: dict[str, Any]) -> str:
    """The feed as the deployed graph reports it (/health/detailed ``market.config``): the Serve args
    (e.g. serve_config.yaml's ``replay_speed: 60``) are not in this process's settings."""
    feed = deployed.get("feed") or settings.feed
    if feed == "replay":
        speed = deployed.get("replay_speed", settings.replay_speed)
        what = "replay as fast as possible" if not speed else f"replay at {speed:g}x real time"
    else:
        what = f"binance ({deployed.get('binance_api_url') or settings.binance_api_url})"
    return f"{what}, feed from {(deployed.get('sources') or {}).get('feed', '?')}"


def _banner(settings: Settings, base: str, key: str, generated: bool, health: dict, services: tuple[str, str]) -> str:
    key_note = (f"generated for this run: {key}  (set MLE_API_KEYS=k1,k2 to choose your own)" if generated
                else "the first of MLE_API_KEYS")
    shown = key if generated else "${MLE_API_KEYS%%,*}"
    feed_note = _feed_note(settings, (health.get("market") or {}).get("config") or {})
    ingress = "HAProxy + throughput-optimized" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Serve default proxy"
    return f"""
ML Engine is serving on {base}   (OpenAPI docs: {base}/docs)
  API key : {key_note}
  Feed    : {feed_note};  ingress: {ingress}
  Try     : curl -s -X POST {base}/predictions -H "X-API-Key: {shown}" -H 'Content-Type: application/json' -d '{{"symbol":"BTCUSDT","horizon":6}}'
            curl -s -X POST {base}/signals -H "X-API-Key: {shown}" -H 'Content-Type: application/json' -d '{{"symbol":"ETHUSDT"}}'
            curl -s {base}/health
  Ray dashboard: http://127.0.0.1:{settings.dashboard_port}   Redis: {services[0]}   PostgreSQL: {services[1]}
Ctrl-C stops everything started here.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.launcher", description=__doc__.split("\n")[0])
    parser.add_argument("--no-train", action="store_true", help="fail instead of training when no model exists")
    parser.add_argument("--config", type=Path, default=SERVE_CONFIG, help="the Serve config to deploy")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config as it would be deployed here (http_options from MLE_HTTP_HOST / "
                             "MLE_HTTP_PORT, fast-ingress switches from this environment) and exit: for serve deploy")
    args = parser.parse_args(argv)
    if args.print_config:
        return print_config(args.config)
    _catch_signals()
    given = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in os.environ  # an operator's own folder stays
    env, generated = _environment()
    ours = None if given else env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
    os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_SERVE_")})  # the driver too
    settings = load_settings()
    key = settings.api_keys[0].get_secret_value()
    config = render_config(args.config, settings, env)  # a broken config fails before anything starts

    head, requested, driver_clean = None, False, True
    try:
        if not args.no_train:
            ensure_models(settings)
        services = service_status(settings)
        _say(f"redis {redact_url(settings.redis_url)}: {services[0]}; "
             f"postgresql {redact_url(settings.database_url)}: {services[1]}")
        if port_open("127.0.0.1", settings.ray_port):
            raise SystemExit(f"port {settings.ray_port} is taken (another Ray head?); set MLE_RAY_PORT to a free port")
        if port_open(settings.http_host, settings.http_port):
            raise SystemExit(f"HTTP port {settings.http_port} is taken; set MLE_HTTP_PORT to a free port")
        _say(f"starting a Ray head on port {settings.ray_port}")
        head = RayHead(settings.ray_port, env, dashboard_port=settings.dashboard_port)
        head.wait_ready()
        head.connect()
        _catch_signals()  # ray.init installs its own SIGTERM handler (which just exits): ours must win
        _say(f"deploying {args.config.name} ({settings.feed} feed)")
        deploy_config(config)
        base = f"http://{settings.http_host}:{settings.http_port}"
        health = wait_until_serving(base, key, list(settings.market.symbols))
        print(_banner(settings, base, key, generated, health, services), flush=True)
        while True:
            time.sleep(1.0)
    except _Stop:
        _say("stopping")
        requested = True
    finally:
        driver_clean = _shutdown(head) if head is not None else True
        if ours:
            shutil.rmtree(ours, ignore_errors=True)  # HAProxy's files of this run (fast_ingress_env)
    if not driver_clean and requested:
        # The stop asked for is done (the head's session is gone), but this driver is still attached
        # to the dead cluster with serve.shutdown() running in a thread: Python's own exit would run
        # Ray's exit hooks against it, which ended the process with status 1 on a loaded machine.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _shutdown(head: RayHead) -> bool:
    """Serve, then the driver, then the head's session. False when Serve's shutdown overran and the
    driver was left attached (``ray.shutdown()`` would race the thread still shutting Serve down)."""
    import ray

    t0 = time.monotonic()
    clean = True
    if ray.is_initialized():
        clean = stop_serve()
        if clean:
            ray.shutdown()
    killed = head.stop()
    _say(f"stopped the Ray head it started in {time.monotonic() - t0:.1f} s"
         f"{f' ({killed} processes needed SIGKILL)' if killed else ''}; bye")
    return clean


if __name__ == "__main__":
    sys.exit(main())
