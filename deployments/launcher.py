"""``make serve`` / ``python -m deployments.launcher``: the engine on this machine, in the foreground.

1. an API key: ``MLE_API_KEYS`` if set, else one generated for this run (printed);
2. models: trains the default set on the shipped sample if the registry has none
   (``python -m training.train ... --out <models_dir>``, with its progress bar);
3. a local Ray head on ``MLE_RAY_PORT`` (6380; Redis owns 6379), started as
   ``ray start --head --block`` so that terminating that one process stops everything it started;
4. Serve on ``MLE_HTTP_HOST:MLE_HTTP_PORT`` with the whole graph, replaying the shipped sample
   (``MLE_REPLAY_SPEED``, default 60x here: a candle every 5 s; 1 = real time, 0 = as fast as possible);
5. prints the URL, where the key comes from and a working curl line, then waits.

Ctrl-C or SIGTERM: deletes the application, shuts Serve down and stops the Ray head it started
(never a bare ``ray stop``: other clusters on the machine are left alone). Redis and PostgreSQL
are used when reachable; without them the engine runs degraded (see /health/detailed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from configs.settings import PROJECT_DIR, Settings, load_settings, redact_url
from deployments.auth import new_api_key

DEFAULT_REPLAY_SPEED = "60"


def _say(msg: str) -> None:
    print(f"[make serve] {msg}", flush=True)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_models(settings: Settings) -> None:
    """Train the default model set on the shipped sample when the registry has no current set."""
    from features.errors import ModelLoadError, ModelNotFoundError
    from training.registry import MODEL_NAMES, ModelRegistry

    registry = ModelRegistry(settings.models_dir)
    try:
        for name in MODEL_NAMES:
            registry.current(name)
        _say(f"models: {settings.models_dir} ({', '.join(f'{m} {registry.current(m)}' for m in MODEL_NAMES[:1])}...)")
        return
    except (ModelNotFoundError, ModelLoadError):
        pass
    files = [str(settings.sample_dir / f"{s}_5m.parquet") for s in settings.market.symbols]
    _say(f"no models in {settings.models_dir}: training the default set on the shipped sample")
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


class RayHead:
    """A ``ray start --head --block`` child process: ours to stop, and only ours."""

    def __init__(self, port: int, env: dict[str, str], dashboard_port: int | None = None,
                 log_path: Path | None = None) -> None:
        self.port = port
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli) if ray_cli.exists() else shutil.which("ray") or "ray", "start", "--head",
               "--port", str(port), "--dashboard-host", "127.0.0.1", "--block", "--disable-usage-stats"]
        if dashboard_port is not None:
            cmd += ["--dashboard-port", str(dashboard_port)]
        # Ports Ray would otherwise take by default (10001, 52365): another head on this machine may
        # hold them, and `ray start --block` then kills the whole node.
        cmd += ["--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port())]
        self.log_path = log_path or PROJECT_DIR / "var" / "ray-head.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not _port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                raise SystemExit(f"ray start exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the Ray head did not come up in {timeout:.0f}s; see {self.log_path}")
            time.sleep(0.5)

    def connect(self, timeout: float = 120) -> None:
        """``ray.init`` this driver to the head, retried: its GCS port opens before its node is
        registered, and ray.init fails in between."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.init(address=f"127.0.0.1:{self.port}", configure_logging=False, log_to_driver=False)
                return
            except ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.launcher", description=__doc__.split("\n")[0])
    parser.add_argument("--no-train", action="store_true", help="fail instead of training when no model exists")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("MLE_REPLAY_SPEED", DEFAULT_REPLAY_SPEED)
    # The head enables Ray's token auth (token in ~/.ray/auth_token); this driver must use it too.
    env.setdefault("RAY_AUTH_MODE", "token")
    generated = not env.get("MLE_API_KEYS", "").strip()
    if generated:
        env["MLE_API_KEYS"] = new_api_key()
    os.environ.update({k: env[k] for k in ("MLE_API_KEYS", "MLE_REPLAY_SPEED", "RAY_USAGE_STATS_ENABLED",
                                           "RAY_AUTH_MODE")})
    settings = load_settings()
    key = settings.api_keys[0].get_secret_value()

    if not args.no_train:
        ensure_models(settings)
    redis_state, pg_state = service_status(settings)
    _say(f"redis {redact_url(settings.redis_url)}: {redis_state}; "
         f"postgresql {redact_url(settings.database_url)}: {pg_state}")
    if _port_open("127.0.0.1", settings.ray_port):
        raise SystemExit(f"port {settings.ray_port} is taken (another Ray head?); set MLE_RAY_PORT to a free port")
    if _port_open(settings.http_host, settings.http_port):
        raise SystemExit(f"HTTP port {settings.http_port} is taken; set MLE_HTTP_PORT to a free port")

    stop = threading.Event()

    def on_signal() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    on_signal()

    _say(f"starting a Ray head on port {settings.ray_port}")
    head = RayHead(settings.ray_port, env)
    try:
        head.wait_ready()
        import ray
        from ray import serve

        from deployments.app import deploy, start_serve

        head.connect()
        on_signal()  # ray.init installs its own SIGTERM handler (which just exits): ours must win
        try:
            start_serve(settings.http_host, settings.http_port)
            _say("deploying the graph (replay of the shipped sample at "
                 f"{settings.replay_speed:g}x{' = as fast as possible' if settings.replay_speed == 0 else ''})")
            deploy({})
            base = f"http://{settings.http_host}:{settings.http_port}"
            if not stop.is_set():
                wait_until_serving(base, key, list(settings.market.symbols))
            key_note = (f"generated for this run: {key}  (set MLE_API_KEYS=k1,k2 to choose your own)" if generated
                        else "the first of MLE_API_KEYS")
            shown = key if generated else "${MLE_API_KEYS%%,*}"
            print(f"""
ML Engine is serving on {base}   (OpenAPI docs: {base}/docs)
  API key : {key_note}
  Try     : curl -s -X POST {base}/predictions -H "X-API-Key: {shown}" -H 'Content-Type: application/json' -d '{{"symbol":"BTCUSDT","horizon":6}}'
            curl -s -X POST {base}/signals -H "X-API-Key: {shown}" -H 'Content-Type: application/json' -d '{{"symbol":"ETHUSDT"}}'
            curl -s {base}/health
  Ray dashboard: http://127.0.0.1:8265   Redis: {redis_state}   PostgreSQL: {pg_state}
Ctrl-C stops everything started here.
""", flush=True)
            while not stop.wait(1.0):
                pass
            _say("stopping")
        finally:
            try:
                serve.shutdown()
            except Exception as exc:  # best effort: the head is stopped below anyway
                _say(f"serve shutdown: {exc}")
            ray.shutdown()
    finally:
        head.stop()
        _say("stopped the Ray head it started; bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
