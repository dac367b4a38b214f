"""Schemathesis against the running app's OpenAPI schema, with a valid API key: no 5xx, and every
response (status, content type, headers, body) conforms to what the schema documents.

Bounded: a few examples per operation (the property tests of the request parsing live in
FastAPI/pydantic; this checks that what we document is what we answer). Requests rotate over
a handful of keys so the per-key rate limit (tested on its own) does not shape the results.
"""

from __future__ import annotations

import itertools

import schemathesis
from hypothesis import HealthCheck, given, settings

from schemathesis import GenerationMode

MAX_EXAMPLES = 10


def test_api_conforms_to_its_openapi_schema(serving_app):
    keys = itertools.cycle([serving_app.new_key() for _ in range(5)])
    api = schemathesis.openapi.from_url(f"{serving_app.base_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "POST /predictions", "POST /signals", "GET /indicators", "GET /models/status", "GET /health",
        "GET /health/detailed", "GET /metrics"}
    calls: list[tuple[str, int]] = []
    for op in operations:
        modes = [GenerationMode.POSITIVE]
        if op.body or op.query:  # something a client can get wrong
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call_and_validate(headers={"X-API-Key": next(keys)}, timeout=30)
                assert response.status_code < 500, response.text
                calls.append((f"{mode.value} {op.method.upper()} {op.path}", response.status_code))

            check()
    # Valid requests were answered, invalid ones refused with a 4xx (both happened).
    assert any(label.startswith("positive POST /predictions") and code == 200 for label, code in calls)
    assert any(label.startswith("negative POST /predictions") and code == 422 for label, code in calls)
