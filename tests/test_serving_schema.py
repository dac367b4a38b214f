"""Schemathesis against the running app's OpenAPI schema, with a valid API key: no 5xx, and every
response (status, content type, headers, body) conforms to what the schema documents.

Two passes (issue 13 made them part of the hardening suite): every operation on its own, with
valid and -- where a client can get something wrong -- invalid requests; then stateful scenarios
that follow links from one answer into the next request (a prediction's symbol and horizon into
/signals and /indicators and back), the way a client chains calls. The links are added to the
schema here, by ``operationRef``, so the test does not depend on operation ids. Requests rotate
over a handful of keys so the per-key rate limit (tested on its own) does not shape the results.
"""

from __future__ import annotations

import itertools

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.hardening_report import record

MAX_EXAMPLES = 25
STATEFUL_SCENARIOS = 15
STATEFUL_STEPS = 5
OPERATIONS = {"POST /predictions", "POST /signals", "GET /indicators", "GET /models/status", "GET /health",
              "GET /health/ready", "GET /health/detailed", "GET /metrics"}


def _settings(examples: int, **kw):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), **kw)


def test_api_conforms_to_its_openapi_schema(serving_app):
    keys = itertools.cycle([serving_app.new_key() for _ in range(6)])
    api = schemathesis.openapi.from_url(f"{serving_app.base_url}/openapi.json")
    # The key is ours to send (every request carries a valid one: a missing key is tested on its own),
    # and unknown query parameters are ignored by design, like most HTTP APIs do.
    api.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == OPERATIONS
    calls: list[tuple[str, int]] = []
    for op in operations:
        modes = [GenerationMode.POSITIVE]
        if op.body or op.query:  # something a client can get wrong
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            @_settings(MAX_EXAMPLES)
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call_and_validate(headers={"X-API-Key": next(keys)}, timeout=30)
                assert response.status_code < 500, response.text
                calls.append((f"{mode.value} {op.method.upper()} {op.path}", response.status_code))

            check()
    # Valid requests were answered, invalid ones refused with a 4xx (both happened).
    assert any(label.startswith("positive POST /predictions") and code == 200 for label, code in calls)
    assert any(label.startswith("negative POST /predictions") and code == 422 for label, code in calls)
    record("schemathesis", f"{len(OPERATIONS)} operations, up to {MAX_EXAMPLES} valid and {MAX_EXAMPLES} invalid "
           "requests each, every response validated against the schema", len(calls))


def _linked(raw: dict) -> dict:
    """The schema with OpenAPI links: what one answer says is the next request's input."""
    body = {"symbol": "$response.body#/symbol", "horizon": "$response.body#/horizon"}
    links = {
        ("/predictions", "post"): {
            "signalsForThePrediction": {"operationRef": "#/paths/~1signals/post", "requestBody": body},
            "indicatorsOfTheSymbol": {"operationRef": "#/paths/~1indicators/get",
                                      "parameters": {"query.symbol": "$response.body#/symbol"}}},
        ("/signals", "post"): {
            "predictionForTheSignal": {"operationRef": "#/paths/~1predictions/post", "requestBody": body}},
        ("/indicators", "get"): {
            "signalsOfTheSymbol": {"operationRef": "#/paths/~1signals/post",
                                   "requestBody": {"symbol": "$response.body#/symbol"}}},
    }
    for (path, method), entry in links.items():
        raw["paths"][path][method]["responses"]["200"]["links"] = entry
    return raw


def test_stateful_scenarios_follow_links_without_a_5xx(serving_app):
    keys = itertools.cycle([serving_app.new_key() for _ in range(3)])
    raw = httpx.get(f"{serving_app.base_url}/openapi.json", timeout=30).json()
    api = schemathesis.openapi.from_dict(_linked(raw))
    api.config.update(base_url=serving_app.base_url)
    # Valid flows only: links fill in valid values, and invalid requests have the test above.
    api.config.generation.update(modes=[GenerationMode.POSITIVE], with_security_parameters=False,
                                 allow_extra_parameters=False)
    steps: list[tuple[str, int]] = []

    class Scenario(api.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": {"X-API-Key": next(keys)}, "timeout": 30}

        def after_call(self, response, case):
            steps.append((f"{case.method} {case.path}", response.status_code))
            assert response.status_code < 500, response.text

    Scenario.run(settings=_settings(STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS))
    chained = [s for s in steps if s[0] in ("POST /signals", "GET /indicators") and s[1] == 200]
    assert steps and chained, steps
    record("schemathesis stateful", f"{STATEFUL_SCENARIOS} scenarios of up to {STATEFUL_STEPS} linked calls "
           "(predictions -> signals / indicators -> predictions)", len(steps))
