"""CORS for the platform's browser frontend (issue 17 point 7), on the real app in-process.

The request guard answers 401 before FastAPI for a protected route without a key; a browser's
preflight (OPTIONS, never carrying the key) must nevertheless get the CORS answer, and the guard's
own refusals must carry the CORS headers so the frontend can read them. Only listed origins pass.
"""

from __future__ import annotations

import pytest

from configs.settings import load_settings
from configs.errors import ConfigError
from tests.hardening_util import KEY, call, make_app

FRONTEND = "http://localhost:3000"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key,content-type"}


def test_preflight_from_the_frontend_gets_the_cors_answer_not_the_guards_401():
    app, _ = make_app()  # default MLE_CORS_ORIGINS: the seed's http://localhost:3000
    for path in ("/predictions", "/signals", "/health/detailed"):
        r = call(app, "OPTIONS", path, key=None, headers={"Origin": FRONTEND, **PREFLIGHT})
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.headers["access-control-allow-origin"] == FRONTEND
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"x-api-key", "content-type"} <= allowed and "POST" in r.headers["access-control-allow-methods"]
        assert "access-control-allow-credentials" not in r.headers  # credentials are off by default


def test_other_origins_get_no_cors_headers():
    app, _ = make_app()
    r = call(app, "OPTIONS", "/predictions", key=None, headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = call(app, "POST", "/predictions", headers={"Origin": "https://evil.example"},
             json={"symbol": "BTCUSDT", "horizon": 6})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # the browser withholds it


def test_answers_and_refusals_to_the_frontend_carry_cors_headers():
    app, _ = make_app(cors_origins=[FRONTEND, "https://app.example"], cors_allow_credentials=True)
    ok = call(app, "POST", "/signals", headers={"Origin": "https://app.example"}, json={"symbol": "BTCUSDT"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert "retry-after" in ok.headers["access-control-expose-headers"].lower()
    denied = call(app, "POST", "/signals", key=None, headers={"Origin": FRONTEND}, json={"symbol": "BTCUSDT"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == FRONTEND
    assert denied.json()["error"] == "unauthorized"


def test_no_origins_means_no_cors_at_all():
    app, _ = make_app(cors_origins=[])
    r = call(app, "OPTIONS", "/predictions", key=None, headers={"Origin": FRONTEND, **PREFLIGHT})
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code == 405  # the guard lets preflights through; no route answers OPTIONS


@pytest.mark.parametrize("bad", [dict(cors_origins=["*"], cors_allow_credentials=True),
                                 dict(cors_origins=["http://localhost:3000/"]),
                                 dict(cors_origins=["localhost:3000"])])
def test_wildcard_with_credentials_and_non_origins_are_config_errors(bad):
    with pytest.raises(ConfigError, match="MLE_CORS_ORIGINS"):
        load_settings(api_keys=[KEY], **bad)


def test_origins_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLE_CORS_ORIGINS", "https://a.example, http://127.0.0.1:5173")
    assert load_settings().cors_origins == ["https://a.example", "http://127.0.0.1:5173"]
    monkeypatch.setenv("MLE_CORS_ORIGINS", "")
    assert load_settings().cors_origins == []


def test_preflight_through_serve_to_the_running_app(serving_app):
    """The same through Serve's proxy and the deployed ingress (default origins)."""
    with serving_app.client() as anon:
        r = anon.options("/signals", headers={"Origin": FRONTEND, **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == FRONTEND, r.text
        denied = anon.post("/signals", json={"symbol": "BTCUSDT"}, headers={"Origin": FRONTEND})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == FRONTEND
