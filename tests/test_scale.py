"""The graph at more than two symbols (issue 18): 20 synthetic replay symbols on two FeatureBuilder
shards, deployed once for this module into the suite's Ray cluster beside the serving app.

The replay runs at real time (the next candle is 5 minutes away), so nothing moves unless a test
steps every symbol's next candle at once (``MarketFeed.step_all``) -- a candle close of the whole
market. One MarketData actor streams all 20 symbols, so a close reaches the router as one call.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest

from deployments.sharding import assign, shard_name
from features.candles import FIVE_MINUTES_MS
from features.indicators import WARMUP
from tests.conftest import SAMPLE_DATA, SYMBOLS

APP = "ml-engine-scale"
SHARDS = 2
SYNTHETIC = 18
POOLS = ("RangePredictor", "TPSLClassifier", "SignalClassifier", "MetaModel")


def _handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)


class ScaleApp:
    def __init__(self, settings, redis) -> None:
        self.settings = settings
        self.symbols = list(settings.market.symbols)
        self.horizons = list(settings.market.horizons)
        self.redis = redis
        self.shards = assign(self.symbols, SHARDS)

    def states(self) -> dict:
        """Every symbol's state, from the shards' snapshots."""
        out = {}
        for i in range(SHARDS):
            out.update(_handle(shard_name(i)).snapshot.remote(-1, 0.0).result(timeout_s=30).symbols)
        return out

    def wait_published(self, open_time: dict[str, int], timeout: float, what: str) -> dict:
        """Until every symbol's candle ``open_time[symbol]`` is published; the states then."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.states()
                if all(states[s].open_time == t and states[s].published for s, t in open_time.items()):
                    return states
            except Exception:  # a shard restarting
                states = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {states}")
            time.sleep(0.2)

    def step_all(self) -> None:
        _handle("MarketFeed").step_all.remote(1).result(timeout_s=120)

    def feed_status(self) -> dict:
        return _handle("MarketFeed").status.remote().result(timeout_s=60)["symbols"]


@pytest.fixture(scope="module")
def scale_app(ray_cluster, small_models, tmp_path_factory):
    from ray import serve

    from configs.settings import load_settings
    from deployments.app import build_graph, start_serve_on_free_port
    from deployments.auth import write_api_keys_file
    from scripts.lab.services import PrivateRedis
    from tests.serving_app import _serve_running

    root = tmp_path_factory.mktemp("scale")
    redis = PrivateRedis(root)
    redis.start()
    overrides = {
        "models_dir": str(small_models),
        "api_keys_file": str(write_api_keys_file(root / "api_keys", [secrets.token_urlsafe(24)])),
        "redis_url": redis.url,
        "market": {"symbols": list(SYMBOLS), "synthetic_symbols": SYNTHETIC},
        "feature_shards": SHARDS,
        "feed_symbols_per_actor": 2 + SYNTHETIC,
        "replay_speed": 1.0,
        "replay_history": WARMUP + 100,
        "replay_files": {s: str(SAMPLE_DATA / f"{s}_5m.parquet") for s in SYMBOLS},
        "model_poll_s": 60.0,
        "serving_log": "deployments.hooks:JsonLinesServingLog",
        "spool_dir": str(root / "spool"),
    }
    settings = load_settings(**overrides)
    if not _serve_running():
        start_serve_on_free_port("127.0.0.1")
    serve.run(build_graph(overrides), name=APP, route_prefix="/scale", blocking=False)
    app = ScaleApp(settings, redis)
    try:
        deadline = time.monotonic() + 240
        while True:  # ready: every symbol's last history candle published
            try:
                states = app.states()
                if all(s in states and states[s].published for s in app.symbols):
                    break
            except Exception:  # still deploying
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the 20-symbol app did not become ready: {serve.status().applications.get(APP)}")
            time.sleep(0.5)
        yield app
    finally:
        serve.delete(APP, _blocking=False)  # the replicas stop in the background; the suite goes on
        redis.stop()


def test_twenty_symbols_are_forecast_cached_and_published_at_one_close(scale_app):
    """One close of 20 symbols: every symbol-horizon's prediction is in Redis and its signal on
    ``signals:{symbol}``, every shard marks its symbols published, and each model pool saw the
    close as one request (every horizon: its fixed cost paid once per close) computed as one batch
    per horizon (20 rows each)."""
    app = scale_app
    assert all(app.shards) and sum(map(len, app.shards)) == 20 == len(app.symbols)
    before = {s: st.open_time for s, st in app.states().items()}
    stats = {p: _handle(p).stats.remote().result(timeout_s=30) for p in POOLS}
    sub = app.redis.client().pubsub()
    sub.psubscribe("signals:*")
    sub.get_message(timeout=5)  # the subscription's confirmation
    app.step_all()
    after = {s: t + FIVE_MINUTES_MS for s, t in before.items()}
    app.wait_published(after, 60, "every symbol published at the close")
    client = app.redis.client()
    for s in app.symbols:
        for h in app.horizons:
            entry = client.get(f"prediction:{s}:{h}:{after[s]}")
            assert entry is not None, (s, h)
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 10
    while len(seen) < 20 * len(app.horizons) and time.monotonic() < deadline:
        msg = sub.get_message(timeout=1)
        if msg and msg["type"] == "pmessage":
            body = json.loads(msg["data"])
            assert body["candle_open_time"] == after[body["symbol"]]
            seen.add((body["symbol"], body["horizon"]))
    sub.close()
    assert seen == {(s, h) for s in app.symbols for h in app.horizons}
    for p in POOLS:
        now = _handle(p).stats.remote().result(timeout_s=30)
        assert now["rows"] - stats[p]["rows"] == 20 * len(app.horizons), p
        assert now["batches"] - stats[p]["batches"] == len(app.horizons), p  # one batch per horizon
        assert now["requests"] - stats[p]["requests"] == 1, p  # one request per close, all horizons


def test_a_killed_feature_builder_shard_loses_no_symbol(scale_app):
    """SIGKILL shard 1 and keep stepping closes: Serve restarts it, each of its symbols is re-seeded
    from the MarketData window at its next candle, and afterwards every symbol has every candle
    (none skipped, history contiguous) and its forecasts in Redis; shard 0's symbols never noticed
    (no re-seed)."""
    import ray

    app = scale_app
    victim = app.shards[1]
    states = app.states()
    start = {s: st.open_time for s, st in states.items()}
    old_epoch = _handle(shard_name(1)).snapshot.remote(-1, 0.0).result(timeout_s=30).epoch
    reseeds = {s: st["reseeds"] for s, st in app.feed_status().items()}
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#{shard_name(1)}#")]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    steps = 0
    deadline = time.monotonic() + 90
    while True:
        app.step_all()
        steps += 1
        expected = {s: t + steps * FIVE_MINUTES_MS for s, t in start.items()}
        try:
            states = app.wait_published(expected, 20, "after the kill")
            epoch = _handle(shard_name(1)).snapshot.remote(-1, 0.0).result(timeout_s=30).epoch
            if epoch != old_epoch:
                break
        except TimeoutError:
            pass
        assert time.monotonic() < deadline, "shard 1 was not restarted and re-seeded"
    status = app.feed_status()
    client = app.redis.client()
    for s in app.symbols:
        st = states[s]
        assert st.history >= WARMUP and st.features is not None, (s, st.history)  # contiguous: no warm-up
        assert status[s]["last_delivered_open_time"] == expected[s]  # every candle, none skipped
        for h in app.horizons:
            assert client.get(f"prediction:{s}:{h}:{expected[s]}") is not None, (s, h)
    assert all(status[s]["reseeds"] > reseeds[s] for s in victim), status
    assert all(status[s]["reseeds"] == reseeds[s] for s in app.shards[0]), status
