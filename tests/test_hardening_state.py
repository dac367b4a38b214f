"""Issue 13, cache and secrets (points 5, 6), health (point 10) and the registry (point 11).

Planted and stale Redis entries are misses (counted), never answers; passwords never reach a log
line, a health body or the launcher's output, and 503 bodies name no file path; the overall
health includes the log writer and the feed, and /health/ready gates load balancers; the registry
fsyncs before it renames, refuses path-like names, and a truncated booster behind ``current``
makes the router serve the previous set instead of nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from configs.settings import load_settings, redact_url
from deployments import health
from deployments.api import DatabaseProbe
from deployments.cache import RedisGateway, make_entry, sign_entry
from deployments.db.serving_log import log_status
from deployments.db.writer import LogWriter
from configs.errors import ModelNotFoundError
from tests.conftest import free_port
from tests.hardening_report import record
from tests.hardening_util import (VERSIONS, StubBackend, acall, call, error_of, forecast_for, make_app,
                                  redis_server)  # noqa: F401 (a fixture)
from scripts.lab.services import wait_for
from tests.test_serving import _new_model_set
from inference.registry import CURRENT_FILE, MODEL_NAMES, ModelRegistry


# ---- point 5: poisoned or stale cache entries -------------------------------------------------

def _plants(service, row) -> dict[str, bytes | str]:
    """Entries someone (an older engine, an attacker) could have left under the candle's key."""
    h, secret = service.feature_hash, service.secret

    def sign(body: dict, feature_set_hash: str, key: bytes) -> bytes:  # signed as the router signs a Forecast
        return sign_entry(json.dumps(body).encode(), feature_set_hash, key)

    wrong = forecast_for(row, 6, shift=0.05).model_dump(mode="json")  # a 5 % higher range: a wrong answer is visible
    missing = {k: v for k, v in wrong.items() if k != "signal_type"}
    tampered = json.loads(sign(wrong, h, secret))
    tampered["pred_high_pct"] = 0.5
    return {
        "unreadable": b"\x00{not json",
        "signature": json.dumps(wrong),  # unsigned: what the engine wrote before entries were signed
        "signature/other secret": sign(wrong, h, b"somebody else's secret"),
        "signature/tampered": json.dumps(tampered),
        "schema": sign(missing, h, secret),  # an upgrade removed a field
        "schema/negative close": sign({**wrong, "close": -1.0}, h, secret),
        "identity": sign({**wrong, "candle_open_time": row.open_time - 300_000}, h, secret),
        "feature_set": sign(wrong, "another-feature-set", secret),
        "model_versions": sign({**wrong, "model_versions": {**VERSIONS, "meta_model": "v0"}}, h, secret),
    }


def test_poisoned_and_stale_cache_entries_are_misses_never_answers(redis_server):
    async def scenario():
        gw = RedisGateway(redis_server.url)
        app, service = make_app(StubBackend(), redis=gw)
        st = service.market.symbols["BTCUSDT"]
        key = f"prediction:BTCUSDT:6:{st.open_time}"
        answers = {}
        for label, value in _plants(service, st.row()).items():
            redis_server.client().set(key, value)
            service._local.clear()  # the ingress's memory: force the Redis read this test is about
            answers[label] = (await acall(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 6}),
                              await acall(app, "POST", "/signals", json={"symbol": "BTCUSDT", "horizon": 6}))
        good = make_entry(forecast_for(st.row(), 6, shift=0.02), service.feature_hash, service.secret)
        redis_server.client().set(key, good)
        service._local.clear()
        honoured = await acall(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 6})
        await gw.close()
        return answers, honoured, service

    answers, honoured, service = asyncio.run(scenario())
    failed = []
    for label, (prediction, signal) in answers.items():
        if prediction.status_code != 200 or signal.status_code != 200:
            failed.append(f"{label}: {prediction.status_code}/{signal.status_code}")
            continue
        p = prediction.json()
        if p["cached"] or abs(p["predicted_high_pct"] - 0.4) > 1e-9:  # the graph's answer, not the plant's
            failed.append(f"{label}: served the planted entry")
    assert failed == []
    counts = {r: service.metrics.registry.get_sample_value("ml_cache_rejected_total", {"reason": r})
              for r in ("unreadable", "signature", "schema", "identity", "feature_set", "model_versions")}
    assert counts == {"unreadable": 1, "signature": 3, "schema": 2, "identity": 1, "feature_set": 1,
                      "model_versions": 1}, counts
    assert honoured.status_code == 200 and honoured.json()["cached"] is True  # a valid entry is still a hit
    assert abs(honoured.json()["predicted_high_pct"] - 2.4) < 1e-9
    record("cache entries", f"{len(answers)} planted or stale entries ({', '.join(answers)}) read by "
           "/predictions and /signals, and one valid entry", 2 * len(answers) + 1, failed)


def test_the_cache_entry_schema_is_the_forecast_plus_its_provenance():
    """A field added to Forecast must reach CacheEntry too, or every entry the router writes would be
    refused as ``schema`` (correct, but a cache that never hits)."""
    from deployments.cache import CacheEntry
    from inference.forecast import Forecast

    assert set(CacheEntry.model_fields) == set(Forecast.model_fields) | {"feature_set_hash",
                                                                                             "sig"}


# ---- point 6: secrets ------------------------------------------------------------------------

class _WriterLog:
    """The ingress's log hook reduced to its writer (no Ray): what health reports about it."""

    def __init__(self, writer: LogWriter) -> None:
        self.writer = writer

    def request_served(self, record, forecast) -> None:
        if forecast is not None:
            self.writer.log_forecasts([forecast])

    async def health(self):
        return {"status": log_status(self.writer.status()), "writer": self.writer.status()}

    async def live_metrics(self):
        return {"status": "not_configured"}


def test_passwords_never_reach_logs_health_or_the_launcher(caplog, tmp_path):
    from deployments.launcher import service_status

    redis_pw, pg_pw = "R3dis-pw-never-shown", "Pg-pw-never-shown"
    settings = load_settings(api_keys=["x" * 32], redis_url=f"redis://:{redis_pw}@127.0.0.1:{free_port()}/0",
                             database_url=f"postgresql://mle:{pg_pw}@127.0.0.1:{free_port()}/mle")
    caplog.set_level(logging.DEBUG)
    writer = LogWriter(settings, spool_root=tmp_path / "spool").start()

    async def scenario():
        gw = RedisGateway(settings.redis_url, timeout_s=0.2)
        app, _ = make_app(redis=gw, serving_log=_WriterLog(writer), redis_url=settings.redis_url,
                          database_url=settings.database_url)
        probe = DatabaseProbe(settings.database_url, timeout_s=0.5)
        bodies = [(await acall(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 6})).text,
                  (await acall(app, "POST", "/signals", json={"symbol": "ETHUSDT"})).text,
                  (await acall(app, "GET", "/health/detailed")).text, json.dumps(await probe())]
        await gw.close()
        return bodies

    try:
        bodies = asyncio.run(scenario())
        wait_for(lambda: writer.status()["last_error"], 10, what="the writer's refused connection")
    finally:
        writer.close(timeout=0.5)
    launcher = " ".join(service_status(settings)) + redact_url(settings.redis_url) + redact_url(settings.database_url)
    texts = {"logs": caplog.text, "bodies": " ".join(bodies), "writer": json.dumps(writer.status()),
             "settings": repr(settings) + str(settings), "launcher": launcher}
    leaks = [f"{pw} in {where}" for where, text in texts.items() for pw in (redis_pw, pg_pw) if pw in text]
    assert leaks == []
    assert "redis://***@127.0.0.1" in texts["bodies"] and "postgresql://***@127.0.0.1" in launcher
    assert "Connect" in texts["logs"] and "Connect" in texts["writer"]  # the outage was seen and logged
    record("secrets", "Redis and PostgreSQL URLs with passwords, both down: logs, /health/detailed, the DB probe, "
           "the writer's status, Settings' repr, the launcher's lines", len(texts))


def test_503_bodies_name_no_file_paths(tmp_path):
    class Unloadable(StubBackend):
        async def forecast(self, rows, horizon):
            raise ModelNotFoundError(f"no model 'range_predictor' in registry {tmp_path}/models (train: python -m "
                                     f"training.train --candles ... --out {tmp_path}/models)")

    app, _ = make_app(Unloadable())
    body = error_of(call(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 6},
                         headers={"Cache-Control": "no-cache"}), 503, "model_not_found")
    assert str(tmp_path) not in body["message"] and "<path>" in body["message"]
    assert "python -m training.train" in body["message"]  # the advice stays, only the path goes


# ---- point 10: health tells the truth --------------------------------------------------------

class _StubLog:
    def __init__(self, status: str) -> None:
        self.status = status

    def request_served(self, record, forecast) -> None:
        return None

    async def health(self):
        return {"status": self.status}

    async def live_metrics(self):
        return {}


def test_overall_health_includes_the_log_writer_and_the_feed():
    seen = {}
    for case, backend, log in (("ok", StubBackend(), "up"), ("spooling", StubBackend(), "spooling"),
                               ("disk_full", StubBackend(), "disk_full"), ("rejected", StubBackend(), "rejected"),
                               ("feed", StubBackend(feed_state="reconnecting"), "up"),
                               ("no model", StubBackend(loaded=False), "up")):
        app, _ = make_app(backend, serving_log=_StubLog(log), symbols=("BTCUSDT", "ETHUSDT"))
        body = call(app, "GET", "/health/detailed").json()
        seen[case] = (body["status"], body["components"]["log"], body["components"]["feed"])
    assert seen == {"ok": ("ok", "up", "ok"), "spooling": ("degraded", "spooling", "ok"),
                    "disk_full": ("degraded", "disk_full", "ok"), "rejected": ("degraded", "rejected", "ok"),
                    "feed": ("degraded", "up", "degraded"), "no model": ("down", "up", "ok")}, seen
    assert health.overall({"models": "up", "a_component_added_later": "stale"}) == "degraded"
    now = 1_000_000.0
    writer = {"postgres": "up", "spool": "ok", "last_rejected_at": None}
    assert [log_status({**writer, **change}, now) for change in (
        {}, {"postgres": "down"}, {"spool": "disk_full"}, {"spool": "unavailable"}, {"spool": "full"},
        {"last_rejected_at": now - 60}, {"last_rejected_at": now - 7200})] == [
        "up", "spooling", "disk_full", "spool_unavailable", "spool_full", "rejected", "up"]


def test_readiness_is_503_until_models_market_data_and_the_graph_are_up():
    cases = {"ready": make_app(symbols=("BTCUSDT", "ETHUSDT"))[0],
             "no market data for ETHUSDT": make_app(symbols=("BTCUSDT",))[0],
             "no model": make_app(StubBackend(loaded=False), symbols=("BTCUSDT", "ETHUSDT"))[0],
             "hung graph": make_app(StubBackend(hang=True), symbols=("BTCUSDT", "ETHUSDT"), handle_timeout_s=0.2)[0]}
    got = {name: call(app, "GET", "/health/ready", key=None) for name, app in cases.items()}
    assert got["ready"].status_code == 200 and got["ready"].json()["status"] == "ready"
    for name in ("no market data for ETHUSDT", "no model", "hung graph"):
        body = error_of(got[name], 503, "not_ready")
        assert got[name].headers["Retry-After"] and not all(c["ok"] for c in body["checks"].values())
    assert got["no market data for ETHUSDT"].json()["checks"]["market"]["missing"] == ["ETHUSDT"]
    assert not got["hung graph"].json()["checks"]["graph"]["ok"]
    record("health", "overall status with the log writer spooling / disk full / rejecting, a reconnecting feed, "
           "no model; /health/ready ready, without market data, without a model, with a hung graph", 10)


# ---- point 11: the registry ------------------------------------------------------------------

def test_registry_fsyncs_files_and_folders_before_and_after_each_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    registry = ModelRegistry(tmp_path / "models", feature_hash="fh")
    registry.save("range_predictor", "v1", {"b": b"booster bytes"}, {"created": "now"}, {"calibration": {"a": 1}})
    model_dir = str(tmp_path / "models" / "range_predictor")
    order = [e for e in events if e[0] == "replace" or "incoming" in e[1] or e[1] == model_dir]
    renamed = order.index(("replace", f"{model_dir}/v1"))
    synced_before = {Path(p).name for kind, p in order[:renamed] if kind == "fsync"}
    assert {"b.ubj", "calibration.json", "metadata.json"} <= synced_before  # every file ...
    assert any(Path(p).name.startswith(".incoming-v1") for _, p in order[:renamed])  # ... and the folder
    assert ("fsync", model_dir) in order[renamed + 1:order.index(("replace", f"{model_dir}/{CURRENT_FILE}"))]
    assert order[-1] == ("fsync", model_dir)  # the pointer's rename made durable


def test_registry_names_cannot_leave_the_registry(tmp_path):
    from deployments.router import EnsembleRouter

    registry = ModelRegistry(tmp_path, feature_hash="fh")
    registry.save("meta_model", "v1", {"b": b"x"}, {})
    outside = tmp_path.parent / "outside-version"
    (outside).mkdir(exist_ok=True)
    tried = []
    for pointer in ("../outside-version", str(outside), "a/b", "..", "", "v1\x00"):
        (tmp_path / "meta_model" / CURRENT_FILE).write_text(pointer + "\n")
        with pytest.raises(ModelNotFoundError, match="not valid"):
            registry.current("meta_model")
        with pytest.raises(ModelNotFoundError):
            registry.load("meta_model", pointer or ".")
        tried.append(pointer)
    router = object.__new__(EnsembleRouter.func_or_class)
    with pytest.raises(ModelNotFoundError, match="user_config.model_versions"):
        router.reconfigure({"model_versions": {m: "../../etc" for m in MODEL_NAMES}})
    router.reconfigure({"model_versions": {m: "20260101T000000Z-abcd" for m in MODEL_NAMES}})
    record("registry names", f"{len(tried)} pointers ({', '.join(repr(t) for t in tried)}) and a pinned "
           "user_config with '../../etc'", len(tried) + 2)


def test_a_truncated_booster_behind_current_serves_the_previous_set(tmp_path, serving_app):
    from deployments.model_pools import ModelSets
    from deployments.router import EnsembleRouter

    models = shutil.copytree(serving_app.models_dir, tmp_path / "models")
    registry = ModelRegistry(models)
    previous = {m: registry.current(m) for m in MODEL_NAMES}
    current = _new_model_set(models)
    for name in MODEL_NAMES:
        registry.promote(name, current[name])
    booster = next((models / "range_predictor" / current["range_predictor"]).glob("*.ubj"))
    booster.write_bytes(booster.read_bytes()[: booster.stat().st_size // 2])  # an interrupted copy

    router = object.__new__(EnsembleRouter.func_or_class)  # the real methods, without Serve
    router.settings = load_settings(models_dir=str(models))
    router.models, router.pinned_versions = ModelSets(router.settings), None
    router.ensemble = router.loaded_at = router.load_error = router.fallback = None
    router.candles = 0
    assert asyncio.run(router._check_models()) is True
    status = asyncio.run(router.status())
    assert router.ensemble.versions == previous and status["loaded"] and status["versions"] == previous
    assert status["fallback"]["current"] == current and "checksum" in status["fallback"]["error"]
    assert health.models_state({"status": "up", **status}) == "fallback"
    assert asyncio.run(router._check_models()) is False and router.ensemble.versions == previous  # still
    for name in MODEL_NAMES:  # the operator rolls back: the fallback is over
        registry.promote(name, previous[name])
    assert asyncio.run(router._check_models()) is False and router.fallback is None
    record("registry fallback", "a truncated booster behind current at start, the next poll, a rollback", 3)
