"""The Serve application over HTTP on loopback (deployed once per session by ``serving_app``).

Each endpoint, auth, the rate limit, validation, the cache (hit, miss, Redis keys and expiry),
signals on Redis pub/sub at candle close, Redis stopped mid-run, a stale feed, train/serve parity
on replayed real candles, a model switch without restart, and the metrics.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from features import FEATURE_NAMES
from features.candles import FIVE_MINUTES_MS
from tests.conftest import SAMPLE_DATA, SYMBOLS
from tests.serving_app import REPLAY_SPEED

pytestmark = pytest.mark.timeout(300)
HORIZONS = (6, 18, 36, 72)
ERROR_KEYS = {"error", "message", "path"}


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert ERROR_KEYS <= set(body) and body["error"] == code and body["path"] == r.request.url.path, body
    return body


def _exhaust(call, limit: int = 100):
    """Make ``limit`` allowed requests, then return the 429 that must follow.

    The limiter is a GCRA bucket (100 per minute, bursts of 100): it refills one request per
    0.6 s, so the 429 comes within ``elapsed / 0.6`` requests after the burst.
    """
    t0 = time.monotonic()
    statuses = [call().status_code for _ in range(limit)]
    assert statuses == [200] * limit, statuses
    for _ in range(int((time.monotonic() - t0) / 0.6) + 3):
        r = call()
        if r.status_code == 429:
            return r
        assert r.status_code == 200, r.text
    raise AssertionError("no 429 after the rate limit was spent")


# ---- health and auth ----------------------------------------------------------------------

def test_health_needs_no_key_and_detailed_reports_every_part(serving_app):
    with serving_app.client() as anon:
        r = anon.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        _error(anon.get("/health/detailed"), 401, "unauthorized")
    with serving_app.client(serving_app.new_key()) as c:
        body = c.get("/health/detailed").json()
    assert body["status"] == "ok", body
    assert body["models"]["status"] == "up" and set(body["models"]["versions"]) == {
        "range_predictor", "tpsl_classifier", "signal_classifier", "meta_model"}
    assert body["cache"]["status"] == "up"
    assert body["database"]["status"] == "up"  # the shared PostgreSQL of the test machine
    for symbol in SYMBOLS:
        m = body["market"]["symbols"][symbol]
        assert m["stale"] is False and 0 <= m["data_age_s"] <= body["market"]["max_data_age_s"]
        assert m["features_ready"] and m["predictions_published"]
        assert body["market"]["feed"]["symbols"][symbol]["source"].startswith("replay:")
    deployments = body["serve"]["applications"]["ml-engine"]["deployments"]
    assert {"ApiIngress", "EnsembleRouter", "FeatureBuilder", "RangePredictor", "TPSLClassifier",
            "SignalClassifier", "MetaModel", "MarketFeed"} <= set(deployments)
    assert all(d["replicas"].get("RUNNING", 0) >= 1 for d in deployments.values())


def test_api_keys_are_required_checked_and_never_logged(serving_app, ray_cluster):
    key = serving_app.new_key()
    wrong = key[:-4] + "XXXX"
    body = {"symbol": "BTCUSDT", "horizon": 6}
    with serving_app.client() as anon:
        for path, call in (("/predictions", lambda c: c.post("/predictions", json=body)),
                           ("/signals", lambda c: c.post("/signals", json={"symbol": "BTCUSDT"})),
                           ("/indicators", lambda c: c.get("/indicators", params={"symbol": "BTCUSDT"})),
                           ("/models/status", lambda c: c.get("/models/status"))):
            _error(call(anon), 401, "unauthorized")
        _error(anon.post("/predictions", json=body, headers={"X-API-Key": wrong}), 401, "unauthorized")
        _error(anon.post("/predictions", json=body, headers={"X-API-Key": ""}), 401, "unauthorized")
    with serving_app.client(key) as c:
        assert c.post("/predictions", json=body).status_code == 200
    # Neither the good nor the wrong key appears in any log file of the cluster.
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    time.sleep(1.0)  # let log writers flush
    for f in logs.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert key.encode() not in data and wrong.encode() not in data, f"API key found in {f}"


def test_rate_limit_per_key_shared_through_redis_with_retry_after(serving_app):
    key, other = serving_app.new_key(), serving_app.new_key()
    body = {"symbol": "ETHUSDT", "horizon": 18}
    with serving_app.client(key) as c:
        limited = _exhaust(lambda: c.post("/predictions", json=body))
        err = _error(limited, 429, "rate_limited")
        assert int(limited.headers["Retry-After"]) >= 1 and 0 < err["retry_after_s"] <= 1.0
    with serving_app.client(other) as c:
        assert c.post("/predictions", json=body).status_code == 200  # other keys are unaffected
    # The limiter's state lives in Redis (shared by every ingress replica), under the key's id.
    assert serving_app.redis.client().exists(f"ratelimit:{serving_app.key_id(key)}")


# ---- validation -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validation_key(serving_app) -> str:
    return serving_app.new_key()


@pytest.mark.parametrize("path,payload", [
    ("/predictions", {"symbol": "XRPUSDT", "horizon": 6}),
    ("/predictions", {"symbol": "BTCUSDT", "horizon": 7}),
    ("/predictions", {"symbol": "BTCUSDT"}),
    ("/predictions", {"symbol": "BTCUSDT", "horizon": "six"}),
    ("/predictions", {"symbol": "BTCUSDT", "horizon": 6, "extra": 1}),
    ("/predictions", ["BTCUSDT", 6]),
    ("/signals", {"symbol": "btcusdt"}),
    ("/signals", {"symbol": "BTCUSDT", "horizon": -1}),
])
def test_bad_requests_get_422_naming_supported_symbols_and_horizons(serving_app, validation_key, path, payload):
    with serving_app.client(validation_key) as c:
        err = _error(c.post(path, json=payload), 422, "validation_error")
    assert err["supported_symbols"] == list(SYMBOLS) and err["supported_horizons"] == list(HORIZONS)
    assert "BTCUSDT" in err["message"] and "72" in err["message"]


def test_malformed_bodies_and_queries_are_4xx_json(serving_app):
    with serving_app.client(serving_app.new_key()) as c:
        _error(c.post("/predictions", content=b"{not json", headers={"Content-Type": "application/json"}), 422,
               "validation_error")
        _error(c.get("/indicators"), 422, "validation_error")
        _error(c.get("/indicators", params={"symbol": "DOGEUSDT"}), 422, "validation_error")
        _error(c.get("/nope"), 404, "not_found")
        _error(c.get("/predictions"), 405, "method_not_allowed")


# ---- predictions, signals, indicators, models ------------------------------------------------

def test_predictions_signals_and_indicators_answer_with_every_field(serving_app):
    with serving_app.client(serving_app.new_key()) as c:
        for symbol in SYMBOLS:
            for h in HORIZONS:
                r = c.post("/predictions", json={"symbol": symbol, "horizon": h})
                assert r.status_code == 200, r.text
                p = r.json()
                assert p["symbol"] == symbol and p["horizon"] == h and p["horizon_minutes"] == 5 * h
                close = p["close"]
                assert p["predicted_high"] == pytest.approx(close * (1 + p["predicted_high_pct"] / 100), rel=1e-12)
                assert p["predicted_low"] == pytest.approx(close * (1 + p["predicted_low_pct"] / 100), rel=1e-12)
                assert p["predicted_high_mean"] == pytest.approx(close * (1 + p["predicted_high_mean_pct"] / 100),
                                                                 rel=1e-12)
                assert p["predicted_low_mean"] == pytest.approx(close * (1 + p["predicted_low_mean_pct"] / 100),
                                                                rel=1e-12)
                assert p["interval"]["coverage"] == pytest.approx(0.8)
                assert p["interval"]["high"]["lower"] <= p["interval"]["high"]["upper"]
                assert p["interval"]["low"]["lower"] <= p["interval"]["low"]["upper"]
                assert p["model_version"] == p["model_versions"]["range_predictor"]
                assert isinstance(p["cached"], bool) and p["data_age_s"] >= 0
                assert p["candle_time"].endswith("Z") and p["candle_open_time"] % FIVE_MINUTES_MS == 0
            s = c.post("/signals", json={"symbol": symbol}).json()
            assert s["horizon"] == min(HORIZONS)  # the default signal horizon: the shortest
            assert s["signal_type"] in ("BUY", "SELL", "HOLD") and 0 <= s["confidence"] <= 1
            if s["signal_type"] == "BUY":
                assert s["take_profit"] > s["entry_price"] > s["stop_loss"]
            elif s["signal_type"] == "SELL":
                assert s["take_profit"] < s["entry_price"] < s["stop_loss"]
            assert sum(s["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
            # The trade's economics after the fee profile's costs (issue 15).
            assert s["fee_profile"] == "spot_taker" and 0 < s["cost_r"] <= 1 / 3 + 1e-9 and s["p_win"] == s["confidence"]
            assert isinstance(s["expected_r"], float) and (s["signal_type"] == "HOLD" or s["expected_r"] > 0)
            s72 = c.post("/signals", json={"symbol": symbol, "horizon": 72}).json()
            assert s72["horizon"] == 72 and set(s72["model_versions"]) == set(s["model_versions"])
            ind = c.get("/indicators", params={"symbol": symbol}).json()
            assert set(ind["groups"]) == {"volatility", "momentum", "trend", "volume", "time", "higher_timeframes",
                                        "data_quality"}
            assert "rsi_14" in ind["groups"]["momentum"]["values"] and ind["groups"]["momentum"]["title"]
            assert sum(len(g["values"]) for g in ind["groups"].values()) == len(FEATURE_NAMES)


def test_models_status_reports_versions_training_range_and_metrics(serving_app):
    from inference.registry import MODEL_NAMES, ModelRegistry

    registry = ModelRegistry(serving_app.models_dir)
    with serving_app.client(serving_app.new_key()) as c:
        body = c.get("/models/status").json()
    assert body["loaded"] is True
    for name in MODEL_NAMES:
        m = body["models"][name]
        assert m["version"] == body["versions"][name]
        assert m["training_range"]["start"] and m["training_range"]["end"] and m["loaded_at"].endswith("Z")
    assert body["models"]["range_predictor"]["walk_forward_metrics"]["walk_forward"]
    assert body["horizons"] == list(HORIZONS)


# ---- cache, candle close, pub/sub, Redis outage, stale feed -------------------------------------

def test_candle_close_writes_every_horizon_to_redis_and_a_miss_computes_and_caches(serving_app):
    key = serving_app.new_key()
    rc = serving_app.redis.client()
    serving_app.pause("ETHUSDT")
    try:
        st = serving_app.step("ETHUSDT", 1)
        t = st["last_open_time"]
        serving_app.wait_for_candle(key, "ETHUSDT", t)
        keys = {h: f"prediction:ETHUSDT:{h}:{t}" for h in HORIZONS}
        # Written at candle close, expiring when the next candle closes (5 min of feed time at 100x).
        for h, k in keys.items():
            ttl_ms = rc.pttl(k)
            assert 0 < ttl_ms <= 300_000 / REPLAY_SPEED + 100, (k, ttl_ms)
            cached = json.loads(rc.get(k))
            assert cached["candle_open_time"] == t and cached["horizon"] == h
        rc.delete(keys[36])
        with serving_app.client(key) as c:
            hit = c.post("/predictions", json={"symbol": "ETHUSDT", "horizon": 18}).json()
            miss = c.post("/predictions", json={"symbol": "ETHUSDT", "horizon": 36}).json()
            assert rc.exists(keys[36])  # the miss wrote it back
            again = c.post("/predictions", json={"symbol": "ETHUSDT", "horizon": 36}).json()
        assert hit["cached"] is True and hit["candle_open_time"] == t
        assert miss["cached"] is False and miss["candle_open_time"] == t
        assert again["cached"] is True and again["predicted_high"] == miss["predicted_high"]
    finally:
        serving_app.resume("ETHUSDT")


def test_signals_are_published_on_redis_at_candle_close(serving_app):
    key = serving_app.new_key()
    pubsub = serving_app.redis.client().pubsub()
    pubsub.subscribe("signals:BTCUSDT")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    serving_app.pause("BTCUSDT")
    try:
        t = serving_app.step("BTCUSDT", 1)["last_open_time"]
        messages = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len({m["horizon"] for m in messages
                                                   if m["candle_open_time"] == t}) < len(HORIZONS):
            msg = pubsub.get_message(timeout=1)
            if msg and msg["type"] == "message":
                messages.append(json.loads(msg["data"]))
        ours = {m["horizon"]: m for m in messages if m["candle_open_time"] == t}
        assert set(ours) == set(HORIZONS)
        serving_app.wait_for_candle(key, "BTCUSDT", t)
        with serving_app.client(key) as c:
            for h, m in ours.items():
                assert m["symbol"] == "BTCUSDT" and m["published_at"] > 0
                s = c.post("/signals", json={"symbol": "BTCUSDT", "horizon": h}).json()
                assert (s["signal_type"], s["confidence"], s["take_profit"]) == (
                    m["signal_type"], m["confidence"], m["take_profit"])
                econ = ("expected_r", "cost_r", "p_win", "fee_profile")
                assert [s[k] for k in econ] == [m[k] for k in econ] and m["fee_profile"] == "spot_taker"
    finally:
        pubsub.close()
        serving_app.resume("BTCUSDT")


def test_redis_stopped_mid_run_the_engine_still_answers_and_health_says_cache_down(serving_app):
    key, limited_key = serving_app.new_key(), serving_app.new_key()
    redis = serving_app.redis
    redis.stop()
    try:
        with serving_app.client(key) as c:
            for symbol in SYMBOLS:
                r = c.post("/predictions", json={"symbol": symbol, "horizon": 72},
                           headers={"Cache-Control": "no-cache"})
                assert r.status_code == 200 and r.json()["cached"] is False, r.text
                assert c.post("/signals", json={"symbol": symbol}).status_code == 200
            health = c.get("/health/detailed").json()
            assert health["cache"]["status"] == "down" and health["status"] == "degraded"
            # A candle closing while Redis is down is still computed and served.
            serving_app.pause("BTCUSDT")
            try:
                t = serving_app.step("BTCUSDT", 1)["last_open_time"]
                serving_app.wait_for_candle(key, "BTCUSDT", t)
                p = c.post("/predictions", json={"symbol": "BTCUSDT", "horizon": 6}).json()
                assert p["candle_open_time"] == t
            finally:
                serving_app.resume("BTCUSDT")
        # Rate limiting falls back to each replica (one ingress replica here: the limit holds).
        with serving_app.client(limited_key) as c:
            _error(_exhaust(lambda: c.post("/signals", json={"symbol": "ETHUSDT"})), 429, "rate_limited")
    finally:
        redis.start()
    deadline = time.monotonic() + 20
    with serving_app.client(key) as c:
        while c.get("/health/detailed").json()["cache"]["status"] != "up":
            assert time.monotonic() < deadline, "the cache did not come back"
            time.sleep(0.2)
    # The outage was logged (the Redis URL holds a password): by every replica, without the password.
    import ray

    from tests.serving_app import REDIS_PASSWORD

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [f for f in logs.rglob("*") if f.is_file() and REDIS_PASSWORD.encode() in f.read_bytes()]
    assert redis.password == REDIS_PASSWORD and leaked == [], f"the Redis password is in {leaked}"


def test_a_stalled_feed_is_a_gap_503_for_predictions_and_hold_for_signals(serving_app):
    key = serving_app.new_key()
    serving_app.pause("ETHUSDT")
    try:
        deadline = time.monotonic() + 30
        with serving_app.client(key) as c:
            while True:
                r = c.post("/predictions", json={"symbol": "ETHUSDT", "horizon": 6})
                if r.status_code == 503:
                    break
                assert r.status_code == 200 and time.monotonic() < deadline, r.text
                time.sleep(0.25)
            err = _error(r, 503, "market_data_gap")  # a few candles missing: bridgeable, not (yet) stale
            assert err["data_age_s"] > 900 and "ETHUSDT" in err["message"] and err["missing_candles"] >= 3
            assert r.headers["Retry-After"]
            s = c.post("/signals", json={"symbol": "ETHUSDT"})
            assert s.status_code == 200 and s.json()["signal_type"] == "HOLD", s.text
            assert s.json()["reason"] == "market_data_gap" and s.json()["confidence"] == 0
            assert c.post("/predictions", json={"symbol": "BTCUSDT", "horizon": 6}).status_code == 200
            health = c.get("/health/detailed").json()
            assert health["market"]["symbols"]["ETHUSDT"]["stale"] is True and health["status"] == "degraded"
            # Two candle intervals without a delivery: the feed itself says stale (ml_feed_stale too).
            assert health["components"]["feed"] == "stale", health["components"]
            assert health["market"]["feed"]["symbols"]["ETHUSDT"]["stale"] is True
            t = serving_app.step("ETHUSDT", 1)["last_open_time"]
            serving_app.wait_for_candle(key, "ETHUSDT", t)
            assert c.post("/predictions", json={"symbol": "ETHUSDT", "horizon": 6}).status_code == 200
    finally:
        serving_app.resume("ETHUSDT")


# ---- train/serve parity ---------------------------------------------------------------------------

def test_served_features_and_predictions_equal_the_batch_path(serving_app):
    """The candle the engine serves, recomputed offline: build_features + Ensemble.forecast."""
    from configs.settings import load_settings
    from features import build_features, load_candles
    from inference.ensemble import Ensemble

    key = serving_app.new_key()
    settings = load_settings()
    ensemble = Ensemble.load(serving_app.models_dir, settings)
    candles = load_candles(SAMPLE_DATA / "BTCUSDT_5m.parquet")
    serving_app.pause("BTCUSDT")
    try:
        t = serving_app.step("BTCUSDT", 1)["last_open_time"]
        serving_app.wait_for_candle(key, "BTCUSDT", t)
        with serving_app.client(key) as c:
            served_features = c.get("/indicators", params={"symbol": "BTCUSDT"}).json()
            served = {h: c.post("/predictions", json={"symbol": "BTCUSDT", "horizon": h}).json() for h in HORIZONS}
            computed = {h: c.post("/predictions", json={"symbol": "BTCUSDT", "horizon": h},
                                  headers={"Cache-Control": "no-cache"}).json() for h in HORIZONS}
            signals = {h: c.post("/signals", json={"symbol": "BTCUSDT", "horizon": h}).json() for h in HORIZONS}
    finally:
        serving_app.resume("BTCUSDT")
    upto = candles[candles["open_time"] <= t]
    batch = build_features(upto, settings.features)
    row = batch.iloc[-1]
    assert int(upto["open_time"].iloc[-1]) == t
    values = {n: v for g in served_features["groups"].values() for n, v in g["values"].items()}
    assert list(values) == list(batch.columns) or set(values) == set(batch.columns)
    np.testing.assert_allclose([values[n] for n in batch.columns], row.to_numpy(), rtol=1e-9, atol=1e-12)
    close = float(upto["close"].iloc[-1])
    for h in HORIZONS:
        f = ensemble.forecast(row.to_numpy()[None, :], ["BTCUSDT"], [close], [t], h)[0]
        for answer in (served[h], computed[h]):
            assert answer["candle_open_time"] == t and answer["close"] == close
            assert answer["predicted_high_pct"] / 100 == pytest.approx(f.pred_high_pct, rel=1e-9, abs=1e-12)
            assert answer["predicted_low_pct"] / 100 == pytest.approx(f.pred_low_pct, rel=1e-9, abs=1e-12)
            assert answer["predicted_high_mean_pct"] / 100 == pytest.approx(f.pred_high_mean_pct, rel=1e-9, abs=1e-12)
            assert answer["predicted_low_mean_pct"] / 100 == pytest.approx(f.pred_low_mean_pct, rel=1e-9, abs=1e-12)
            assert answer["interval"]["high"]["upper_pct"] / 100 == pytest.approx(f.high_upper, rel=1e-9, abs=1e-12)
            assert answer["interval"]["low"]["lower_pct"] / 100 == pytest.approx(f.low_lower, rel=1e-9, abs=1e-12)
            assert answer["model_versions"] == ensemble.versions
        s = signals[h]
        assert s["signal_type"] == f.signal_type
        assert s["confidence"] == pytest.approx(f.confidence, rel=1e-9, abs=1e-12)
        assert s["take_profit"] == pytest.approx(f.take_profit, rel=1e-12)
        assert s["stop_loss"] == pytest.approx(f.stop_loss, rel=1e-12)


# ---- new model version without restart ------------------------------------------------------

def _new_model_set(models_dir: Path) -> dict[str, str]:
    """Re-save the current models as a new version of each (same boosters) without promoting."""
    from inference.registry import MODEL_NAMES, ModelRegistry, new_version

    registry = ModelRegistry(models_dir)
    version = new_version()
    for name in MODEL_NAMES:
        m = registry.load(name)
        meta = {k: v for k, v in m.metadata.items() if k not in ("files", "version", "model")}
        if name == "meta_model":
            meta["base_versions"] = {b: version for b in ("range_predictor", "tpsl_classifier", "signal_classifier")}
        registry.save(name, version, m.boosters, meta, m.documents, promote=False)
    return {name: version for name in MODEL_NAMES}


def test_new_model_version_is_picked_up_without_restart_or_failed_requests(serving_app):
    from inference.registry import MODEL_NAMES, ModelRegistry

    key = serving_app.new_key()
    registry = ModelRegistry(serving_app.models_dir)
    old = {m: registry.current(m) for m in MODEL_NAMES}
    new = _new_model_set(serving_app.models_dir)
    failures: list[str] = []
    seen: list[dict] = []
    stop = threading.Event()

    def load() -> None:
        with serving_app.client(key) as c:
            i = 0
            while not stop.is_set():
                symbol = SYMBOLS[i % 2]
                r = (c.post("/predictions", json={"symbol": symbol, "horizon": 6},
                            headers={"Cache-Control": "no-cache"}) if i % 2 else
                     c.post("/signals", json={"symbol": symbol}))
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    seen.append(r.json()["model_versions"])
                i += 1
                time.sleep(0.4)  # stay under the key's rate limit

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while not seen and not failures and time.monotonic() < deadline:
            time.sleep(0.1)
        for name in MODEL_NAMES:  # one pointer at a time: the set is inconsistent in between
            registry.promote(name, new[name])
            time.sleep(0.3)
        deadline = time.monotonic() + 60
        with serving_app.client(key) as c:
            while c.get("/models/status").json()["versions"] != new:
                assert time.monotonic() < deadline, "the new models were not picked up"
                time.sleep(0.5)
        deadline = time.monotonic() + 30
        while not (seen and seen[-1] == new) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert failures == []
    assert seen[0] == old and seen[-1] == new
    assert all(v in (old, new) for v in seen)  # never a mixed set


def test_each_pool_holds_only_its_models_boosters_and_the_router_none(serving_app):
    """Issue 16: a pool replica loads its own model (the versions requests name, at most two), the
    router the sets' metadata and documents only -- boosters only of a model whose pool failed; a
    cache miss goes from the ingress to the pools, not through the router."""
    from ray import serve

    from deployments.model_pools import MODELS_PER_REPLICA, POOL_NAMES
    from inference.registry import ModelRegistry
    from tests.serving_app import APP_NAME

    router = serve.get_deployment_handle("EnsembleRouter", app_name=APP_NAME)
    calls = router.loaded_models.remote().result(timeout_s=30)["forecast_calls"]
    with serving_app.client(serving_app.new_key()) as c:  # a forecast through every pool, from the ingress
        r = c.post("/predictions", json={"symbol": "BTCUSDT", "horizon": 6}, headers={"Cache-Control": "no-cache"})
        assert r.status_code == 200, r.text
    served = r.json()["model_versions"]
    held = router.loaded_models.remote().result(timeout_s=30)
    assert held["forecast_calls"] == calls  # the miss went to the pools directly, not through the router
    registry = ModelRegistry(serving_app.models_dir)
    for model, name in POOL_NAMES.items():
        stats = serve.get_deployment_handle(name, app_name=APP_NAME).stats.remote().result(timeout_s=30)
        assert stats["model"] == model and served[model] in stats["loaded_versions"], stats["loaded_versions"]
        assert len(stats["loaded_versions"]) <= MODELS_PER_REPLICA
        assert stats["libraries"] == {"xgboost": True, "sklearn": False}, (model, stats["libraries"])  # ~60 MiB less
        for version, boosters in stats["boosters"].items():  # this model's files, no other model's
            assert set(boosters) == registry.load(model, version, boosters=False).booster_names, (model, version)
    assert served in held["sets"]
    failed = set(router.status.remote().result(timeout_s=30)["pool_fallbacks"])
    assert {m for m, _ in held["booster_models"]} <= failed, (held, failed)


# ---- metrics ----------------------------------------------------------------------------------

def test_metrics_are_exported_for_prometheus_without_a_key(serving_app):
    deadline = time.monotonic() + 60
    wanted = ('ml_predictions_total{', 'ml_prediction_latency_seconds_bucket{', 'ml_cache_hits_total{',
              'ml_cache_misses_total', 'ml_market_data_age_seconds{', 'ml_precomputed_predictions_total{',
              'ml_feed_stale{')
    with serving_app.client() as anon:
        while True:
            r = anon.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            missing = [w for w in wanted if w not in r.text]
            if not missing:
                break
            assert time.monotonic() < deadline, f"metrics missing: {missing}"
            time.sleep(1.0)
    line = next(l for l in r.text.splitlines() if l.startswith("ml_predictions_total{") and 'symbol="BTCUSDT"' in l)
    assert 'horizon="' in line and float(line.rsplit(" ", 1)[1]) >= 1
    stale = {s for l in r.text.splitlines() if l.startswith("ml_feed_stale{") for s in SYMBOLS if f'symbol="{s}"' in l}
    assert stale == set(SYMBOLS)  # each MarketData actor reports its feed's staleness
    assert "ray_" not in r.text.split("\n", 1)[0]


# ---- the log hook (issue 6 wires PostgreSQL here) --------------------------------------------

def test_log_hook_gets_every_candle_close_forecast_and_every_request(serving_app):
    key = serving_app.new_key()
    serving_app.pause("BTCUSDT")
    try:
        t = serving_app.step("BTCUSDT", 1)["last_open_time"]
        serving_app.wait_for_candle(key, "BTCUSDT", t)
        with serving_app.client(key) as c:
            assert c.post("/signals", json={"symbol": "BTCUSDT", "horizon": 18}).status_code == 200
    finally:
        serving_app.resume("BTCUSDT")
    time.sleep(0.5)

    def lines(role: str) -> list[dict]:
        path = serving_app.spool_dir / f"serving-{role}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    forecasts = [r for r in lines("router") if r["kind"] == "forecast" and r["symbol"] == "BTCUSDT"
                 and r["candle_open_time"] == t]
    assert sorted(r["horizon"] for r in forecasts) == list(HORIZONS)
    requests = [r for r in lines("ingress") if r["kind"] == "request" and r["key_id"] == serving_app.key_id(key)]
    assert len(requests) == 1 and requests[0]["endpoint"] == "/signals" and requests[0]["status"] == 200
    assert requests[0]["horizon"] == 18 and requests[0]["forecast_candle"] == t
    assert key not in (serving_app.spool_dir / "serving-ingress.jsonl").read_text()


# ---- a FeatureBuilder restart -----------------------------------------------------------------

def test_a_killed_feature_builder_is_reseeded_and_keeps_answering(serving_app):
    """Serve restarts a killed FeatureBuilder replica with empty windows. The ingress keeps serving
    the candle it holds, and the next candle re-seeds the new replica from the MarketData actors'
    windows: no 1000-candle warm-up (``features_unavailable``) and no 5xx but the feed-age check.

    At the suite's 100x replay the data-age budget is 9 wall-seconds, about what Serve needs to
    notice the death and start a replica, so ``market_data_gap`` answers (no candle for longer
    than the budget, still bridgeable) may appear while the replica is down (at the live rate the
    budget is 15 minutes); nothing else may.
    """
    import ray
    from ray import serve

    from features.indicators import WARMUP
    from tests.serving_app import APP_NAME

    key = serving_app.new_key()
    fb = serve.get_deployment_handle("FeatureBuilder", app_name=APP_NAME)
    old_epoch = fb.snapshot.remote(-1, 0.0).result(timeout_s=30).epoch
    reseeds_before = {s: st["reseeds"] for s, st in serving_app.feed().status.remote().result(timeout_s=30)[
        "symbols"].items()}
    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with serving_app.client(key) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/predictions", json={"symbol": SYMBOLS[i % 2], "horizon": HORIZONS[i % 4]})
                answers.append((time.monotonic(), r.status_code, "" if r.status_code == 200 else r.json()["error"]))
                i += 1
                time.sleep(0.5)  # under the key's rate limit

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        time.sleep(1.0)
        # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<id> in namespace "serve".
        replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#FeatureBuilder#")]
        assert len(replicas) == 1, replicas
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 120
        while True:  # the new replica, re-seeded, with forecasts published for both symbols
            assert time.monotonic() < deadline, "the FeatureBuilder was not restarted and re-seeded"
            try:
                snap = fb.snapshot.remote(-1, 0.0).result(timeout_s=10)
            except Exception:  # still restarting
                time.sleep(0.5)
                continue
            if snap.epoch != old_epoch and all(
                    st.history >= WARMUP and st.features is not None and st.published for st in snap.symbols.values()):
                break
            time.sleep(0.5)
        recovered = time.monotonic()
        for symbol, st in snap.symbols.items():
            serving_app.wait_for_candle(key, symbol, st.open_time)
        time.sleep(3.0)
    finally:
        stop.set()
        worker.join(timeout=30)
    status = serving_app.feed().status.remote().result(timeout_s=30)["symbols"]
    assert all(status[s]["reseeds"] > reseeds_before[s] for s in SYMBOLS), status
    during = [a for a in answers if a[0] < recovered]
    after = [a for a in answers if a[0] >= recovered]
    assert during and after
    assert {e for _, code, e in during if code != 200} <= {"market_data_gap"}, during
    assert all(code == 200 for _, code, _ in after), after
