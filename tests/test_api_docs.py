"""docs/openapi.json and docs/api.md are generated from the FastAPI app and must match it."""

from __future__ import annotations

import json

from scripts import gen_api_docs


def test_committed_api_reference_is_up_to_date():
    openapi, markdown = gen_api_docs.render()
    assert (gen_api_docs.DOCS / "openapi.json").read_text() == openapi, \
        "docs/openapi.json is out of date: run `python -m scripts.gen_api_docs` and commit it"
    assert (gen_api_docs.DOCS / "api.md").read_text() == markdown, \
        "docs/api.md is out of date: run `python -m scripts.gen_api_docs` and commit it"


def test_reference_documents_every_route_and_error():
    spec = json.loads((gen_api_docs.DOCS / "openapi.json").read_text())
    md = (gen_api_docs.DOCS / "api.md").read_text()
    assert spec["openapi"].startswith("3.")
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert f"| {method.upper()} | `{path}` |" in md
            assert "200" in op["responses"]
    # The request models carry the configured symbols and horizons as enums (422 names them).
    from configs.settings import Settings

    s = Settings()
    req = spec["components"]["schemas"]["PredictionRequest"]["properties"]
    assert req["symbol"]["enum"] == s.market.symbols and req["horizon"]["enum"] == s.market.horizons
