"""Session fixture: the whole Serve application, deployed ONCE into the suite's Ray cluster.

``serving_app`` trains a small model set on the shipped sample (few rounds: these tests check the
serving graph, not model quality), starts a private redis-server on a free port (so a test can
stop it mid-run without touching the shared 6379 one; it requires a password, which must never
show in a log), deploys ``deployments.app:build_app`` on a free HTTP port with a replay of the
sample at 100x (one candle every 3 s, stale after 9 s without one) and waits until both symbols
have published forecasts. Every HTTP test uses it. The API keys reach the app as a key file, as
they should in production: never in Serve args.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.auth import write_api_keys_file
from scripts.lab.models import train_small_models
from scripts.lab.services import PrivateRedis
from tests.conftest import SAMPLE_DATA, SYMBOLS

APP_NAME = "ml-engine"
REPLAY_SPEED = 100.0
REPLAY_HISTORY = 1100


@dataclass
class ServingApp:
    base_url: str
    models_dir: Path
    redis: PrivateRedis
    overrides: dict[str, Any]
    spool_dir: Path
    _keys: list[str] = field(default_factory=list)

    def new_key(self) -> str:
        """An API key no other test has used (each has its own rate-limit budget)."""
        if not self._keys:
            pytest.fail("the serving app ran out of API keys; raise KEYS in tests/serving_app.py")
        return self._keys.pop()

    def key_id(self, key: str) -> str:
        """The id the app gives ``key`` (an HMAC under the deployment's secret) in Redis and logs."""
        from configs.settings import load_settings
        from deployments.auth import ApiKeys

        return ApiKeys.from_settings(load_settings(**self.overrides)).key_id(key)

    def client(self, key: str | None = None, timeout: float = 30.0) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    # ---- the market feed -------------------------------------------------------------------
    def feed(self):
        from ray import serve

        return serve.get_deployment_handle("MarketFeed", app_name=APP_NAME)

    def pause(self, symbol: str | None = None) -> dict:
        return self.feed().pause.remote(symbol).result(timeout_s=60)

    def resume(self, symbol: str | None = None) -> dict:
        return self.feed().resume.remote(symbol).result(timeout_s=60)

    def step(self, symbol: str, n: int = 1) -> dict:
        """Deliver the next ``n`` candles of ``symbol``; returns after the graph processed them."""
        return self.feed().step.remote(symbol, n).result(timeout_s=120)

    def wait_for_candle(self, key: str, symbol: str, open_time: int, timeout: float = 30.0) -> None:
        """Until the ingress serves ``open_time`` (or a newer candle: a running replay moves on) for
        ``symbol`` (it learns of candles by long-poll)."""
        deadline = time.monotonic() + timeout
        with self.client(key) as c:
            while time.monotonic() < deadline:
                r = c.get("/indicators", params={"symbol": symbol})
                if r.status_code == 200 and r.json()["candle_open_time"] >= open_time:
                    return
                time.sleep(0.05)
        raise TimeoutError(f"the ingress did not switch {symbol} to candle {open_time}")


KEYS = 60
# The private Redis's password: tests grep the cluster's logs for it after an outage.
REDIS_PASSWORD = "redis-pw-" + secrets.token_hex(8)


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client() is not None
    except Exception:  # no Serve controller in this cluster yet
        return False


@pytest.fixture(scope="session")
def small_models(tmp_path_factory) -> Path:
    """One small model set for the session (the serving app, the launcher tests)."""
    return train_small_models(tmp_path_factory.mktemp("small-models") / "models")


@pytest.fixture(scope="session")
def serving_app(ray_cluster, small_models, tmp_path_factory) -> ServingApp:
    from ray import serve
    from ray.serve.context import _get_global_client

    from deployments.app import deploy, start_serve_on_free_port

    root = tmp_path_factory.mktemp("serving")
    models_dir = small_models
    redis = PrivateRedis(root, password=REDIS_PASSWORD)
    redis.start()
    keys = [secrets.token_urlsafe(24) for _ in range(KEYS)]
    overrides = {
        "models_dir": str(models_dir),
        "api_keys_file": str(write_api_keys_file(root / "api_keys", keys)),
        # Every test calls from 127.0.0.1: the failed-auth budget of loopback is shared by all of them
        # (the throttle itself is tested on its own app, with addresses of its own).
        "auth_failures_per_minute": 600,
        "redis_url": redis.url,
        "replay_speed": REPLAY_SPEED,
        "replay_history": REPLAY_HISTORY,
        "model_poll_s": 1.0,
        "redis_retry_s": 0.5,
        "replay_files": {s: str(SAMPLE_DATA / f"{s}_5m.parquet") for s in SYMBOLS},
        # The log hook (issue 6 plugs PostgreSQL in here): JSON lines, so tests can see its calls.
        "serving_log": "deployments.hooks:JsonLinesServingLog",
        "spool_dir": str(root / "spool"),
    }
    if _serve_running():
        port = _get_global_client().http_config.port  # another module started Serve in this cluster
    else:
        port = start_serve_on_free_port("127.0.0.1")
    deploy(overrides, name=APP_NAME)
    app = ServingApp(f"http://127.0.0.1:{port}", models_dir, redis, overrides, root / "spool", list(keys))
    # Ready when both symbols have forecasts published for a candle.
    key = app.new_key()
    deadline = time.monotonic() + 180
    with app.client(key) as c:
        while True:
            r = c.get("/health/detailed")
            if r.status_code == 200:
                market = r.json()["market"]["symbols"]
                if all(market[s]["predictions_published"] for s in SYMBOLS):
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the serving app did not become ready: {r.status_code} {r.text[:2000]}")
            time.sleep(0.5)
    yield app
    try:
        serve.delete(APP_NAME)
    finally:
        redis.stop()
