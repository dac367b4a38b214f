"""Issue 13, input and authentication (points 1-4) and hop timeouts (point 12), on the real app
in-process: the body limit and the key check happen before a byte of the body is read, weak or
missing keys stop the engine from starting, key ids need the deployment secret, failed
authentication is throttled per address through Redis, /metrics is cached, answers 503 when the
agent is down and needs a key from outside its networks, and a hung model graph answers 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from configs.settings import load_settings
from deployments.auth import ApiKeys, new_api_key
from deployments.cache import RedisGateway
from deployments.guard import MetricsAccess
from deployments.prometheus import NodeMetricsExport
from configs.errors import ConfigError
from tests.conftest import free_port
from tests.hardening_report import record
from tests.hardening_util import (KEY, OTHER_KEY, StubBackend, acall, error_of, make_app,
                                  redis_server)  # noqa: F401 (a fixture)

BODY = {"symbol": "BTCUSDT", "horizon": 6}
MB = 1 << 20


# ---- point 1: the body limit and the key, before the body -------------------------------------

async def _drive(app, path: str, headers: dict[str, str], total: int, chunk: int = 64 << 10):
    """One request straight into the ASGI app, its body streamed lazily; (status, body, bytes pulled)."""
    pulled, sent, left = 0, [], total

    async def receive():
        nonlocal pulled, left
        n = min(chunk, left)
        left -= n
        pulled += n
        return {"type": "http.request", "body": b"x" * n, "more_body": left > 0}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("203.0.113.1", 5000), "server": ("engine", 80), "state": {}}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), pulled


def test_huge_bodies_and_keyless_requests_are_refused_before_the_body_is_read():
    app, _ = make_app()
    limit = 16 << 10

    async def scenario():
        declared = await _drive(app, "/predictions", {"content-length": str(50 * MB)}, 50 * MB)
        keyless = await _drive(app, "/predictions", {"content-type": "application/json"}, 50 * MB)
        streamed = await _drive(app, "/predictions", {"x-api-key": KEY}, 50 * MB)
        small = await acall(app, "POST", "/predictions", json=BODY)
        return declared, keyless, streamed, small

    declared, keyless, streamed, small = asyncio.run(scenario())
    assert declared[0] == 413 and declared[1]["error"] == "payload_too_large" and declared[2] == 0
    assert keyless[0] == 401 and keyless[1]["error"] == "unauthorized" and keyless[2] == 0
    assert streamed[0] == 413 and streamed[1]["error"] == "payload_too_large"
    assert limit < streamed[2] <= limit + (64 << 10)  # the limit plus one chunk, not 50 MB
    assert small.status_code == 200
    record("body limit (in-process)", "50 MB declared, 50 MB chunked without a key, 50 MB chunked with a key, "
           "a normal request; body bytes read before refusing: 0, 0, <= limit + one chunk", 4)


# ---- point 2: weak keys, key ids ------------------------------------------------------------

def test_weak_or_missing_keys_stop_the_engine_from_starting(monkeypatch, tmp_path):
    from deployments.app import build_app

    monkeypatch.delenv("MLE_API_KEYS", raising=False)
    weak = "only-twenty-chars-xx"
    with pytest.raises(ConfigError, match="MLE_API_KEYS") as err:
        load_settings(api_keys=[KEY, weak])
    assert weak not in str(err.value) and "20 characters" in str(err.value)
    monkeypatch.setenv("MLE_API_KEYS", f"{KEY},{weak}")
    with pytest.raises(ConfigError, match="MLE_API_KEYS"):
        load_settings()
    monkeypatch.delenv("MLE_API_KEYS")
    with pytest.raises(ConfigError, match="MLE_API_KEYS"):  # what the ingress replica builds at start
        make_app(api_keys=[])
    with pytest.raises(ConfigError, match="Serve args"):
        build_app({"api_keys": [KEY]})
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the engine's keys\n{KEY}\n\n{OTHER_KEY}\n")
    assert [k.get_secret_value() for k in load_settings(api_keys_file=keys_file).api_keys] == [KEY, OTHER_KEY]
    generated = new_api_key()  # what `make serve` uses when MLE_API_KEYS is unset
    assert len(generated) >= 24 and load_settings(api_keys=[generated]).api_keys


def test_key_ids_cannot_be_guessed_offline(redis_server):
    """The id in Redis is an HMAC under the deployment secret: a dictionary of candidate keys (even one
    holding the real key) matches nothing without the secret."""
    plain = load_settings(api_keys=[KEY, OTHER_KEY])
    kid = ApiKeys.from_settings(plain).identify(KEY)
    rekeyed = ApiKeys.from_settings(load_settings(api_keys=[KEY, OTHER_KEY], deployment_secret="s" * 32))
    assert kid and kid != rekeyed.identify(KEY)
    dictionary = [KEY, OTHER_KEY, "password", "hardening-test-key-0123456789abcdeg"]
    assert not {hashlib.sha256(g.encode()).hexdigest()[:len(kid)] for g in dictionary} & {kid}
    assert not {hashlib.sha256(g.encode()).hexdigest()[:12] for g in dictionary} & {kid[:12]}

    async def scenario():
        gw = RedisGateway(redis_server.url)
        app, _ = make_app(redis=gw)
        r = await acall(app, "POST", "/predictions", json=BODY)
        await gw.close()
        return r

    assert asyncio.run(scenario()).status_code == 200
    stored = {k.decode() for k in redis_server.client().keys("ratelimit:*")}
    assert f"ratelimit:{kid}" in stored
    assert f"ratelimit:{hashlib.sha256(KEY.encode()).hexdigest()[:12]}" not in stored
    record("weak keys and key ids", "a 20-character key (kwargs, MLE_API_KEYS), no key, keys in Serve args, a key "
           "file, a generated key; a 4-word dictionary against the Redis key id", 8)


# ---- point 3: failed authentication, throttled per address through Redis ---------------------

def test_repeated_401s_from_one_address_become_429_on_every_replica(redis_server):
    address = (f"198.51.100.{random.randrange(1, 250)}", 4321)
    stranger = ("192.0.2.77", 4321)

    async def scenario():
        gws = [RedisGateway(redis_server.url), RedisGateway(redis_server.url)]
        replicas = [make_app(redis=gw, auth_failures_per_minute=5)[0] for gw in gws]  # two ingress replicas
        out = []
        for i in range(7):
            key = None if i == 3 else "wrong-key-of-plenty-characters-%d" % i
            out.append(await acall(replicas[i % 2], "POST", "/predictions", key=key, client=address, json=BODY))
        other = await acall(replicas[0], "POST", "/predictions", key="wrong-key-of-plenty-characters", client=stranger,
                            json=BODY)
        valid = await acall(replicas[1], "POST", "/predictions", client=address, json=BODY)
        for gw in gws:
            await gw.close()
        return out, other, valid

    out, other, valid = asyncio.run(scenario())
    assert [r.status_code for r in out] == [401] * 5 + [429] * 2, [r.status_code for r in out]
    limited = error_of(out[5], 429, "rate_limited")
    assert int(out[5].headers["Retry-After"]) >= 1 and limited["retry_after_s"] > 0
    assert "address" in limited["message"]
    assert other.status_code == 401  # another address has its own budget
    assert valid.status_code == 200  # a valid key is never refused for its address
    assert redis_server.client().exists(f"authfail:{address[0]}")
    record("failed-auth throttle", "7 bad or missing keys from one address over 2 replicas sharing Redis "
           "(budget 5/min), another address, a valid key from the throttled address", 9)


# ---- point 4: /metrics ----------------------------------------------------------------------

class _FakeAgent(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).hits += 1
        body = b"# HELP ray_ml_predictions_total x\nray_ml_predictions_total{symbol=\"BTCUSDT\"} 3.0\nray_other 1\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_metrics_are_cached_503_when_the_agent_is_down_and_keyed_outside_their_networks():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeAgent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    access = MetricsAccess(["loopback", "cluster"])
    export = NodeMetricsExport(cache_s=30, url=lambda: url)
    app, _ = make_app(metrics_text=export, metrics_access=access)
    dead = NodeMetricsExport(cache_s=30, url=lambda: f"http://127.0.0.1:{free_port()}/metrics")
    dead_app, _ = make_app(metrics_text=dead)
    proxied, _ = make_app(metrics_text=export, metrics_access=MetricsAccess(["loopback"], behind_proxy=True))

    async def scenario():
        burst = await asyncio.gather(*(acall(app, "GET", "/metrics", key=None) for _ in range(25)))
        outside = await acall(app, "GET", "/metrics", key=None, client=("203.0.113.9", 1))
        outside_keyed = await acall(app, "GET", "/metrics", client=("203.0.113.9", 1))
        access.set_cluster_addresses(["10.1.2.3"])
        node = await acall(app, "GET", "/metrics", key=None, client=("10.1.2.3", 1))
        down = await acall(dead_app, "GET", "/metrics", key=None)
        via_proxy = await acall(proxied, "GET", "/metrics", key=None)
        return burst, outside, outside_keyed, node, down, via_proxy

    try:
        burst, outside, outside_keyed, node, down, via_proxy = asyncio.run(scenario())
    finally:
        server.shutdown()
    assert all(r.status_code == 200 for r in burst) and _FakeAgent.hits == 1  # 25 requests, one fetch
    assert burst[0].text.startswith("# HELP ml_predictions_total") and "ray_other" not in burst[0].text
    error_of(outside, 401, "unauthorized")
    assert outside_keyed.status_code == 200 and node.status_code == 200
    error_of(down, 503, "metrics_unavailable")
    assert down.headers["Retry-After"]
    error_of(via_proxy, 401, "unauthorized")  # behind HAProxy every peer looks local: the key is required
    record("/metrics", "25 concurrent scrapes, outside address with and without a key, a cluster node, the agent "
           "down, behind a proxy", 30)


# ---- point 12: a hung model graph ------------------------------------------------------------

def test_a_hung_graph_answers_503_with_retry_after_instead_of_holding_requests():
    app, _ = make_app(StubBackend(hang=True), handle_timeout_s=0.3, rate_limit_per_minute=10**6)

    async def scenario():
        t0 = time.perf_counter()
        misses = await asyncio.gather(*(acall(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": h},
                                              headers={"Cache-Control": "no-cache"})
                                        for h in (6, 18, 36, 72) for _ in range(50)))
        status = await acall(app, "GET", "/models/status")
        health = await acall(app, "GET", "/health/detailed")
        return misses, status, health, time.perf_counter() - t0

    misses, status, health, elapsed = asyncio.run(asyncio.wait_for(scenario(), 20))
    for r in misses:
        body = error_of(r, 503, "prediction_unavailable")
        assert r.headers["Retry-After"] and "0.3 s" in body["message"]
    error_of(status, 503, "prediction_unavailable")
    assert health.status_code == 200 and health.json()["status"] == "down"
    assert elapsed < 10, elapsed  # 200 requests held by a hung graph for ~0.3 s each, in parallel
    record("hop timeouts", "200 concurrent uncached requests, /models/status and /health/detailed against a "
           "graph that never answers (handle_timeout_s 0.3)", 202)
