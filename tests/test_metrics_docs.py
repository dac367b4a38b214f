"""docs/metrics.md is generated from deployments/prometheus_series.py, and nothing names a series or a
label that the code does not define: the alert rules and the Grafana dashboard (parsed as PromQL),
README.md and every doc (series written as ``name{label,...}`` must list exactly its labels)."""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser

from deployments.prometheus_series import METRICS, series_labels
from scripts import gen_metrics_docs
from tests.test_observability import alert_rules, dashboard_exprs

ROOT = Path(__file__).resolve().parents[1]
SERIES = series_labels()
# A series in prose: `ml_x`, `ray_ml_x_total{a,b}` or `ml_x{a="v"}` (ml_engine_client is a package).
MENTION = re.compile(r"\b((?:ray_)?ml_(?!engine)[a-z_]+)(\{[^}]*\})?")


def test_committed_metrics_reference_is_up_to_date():
    assert gen_metrics_docs.OUT.read_text() == gen_metrics_docs.render(), \
        "docs/metrics.md is out of date: run `python -m scripts.gen_metrics_docs` and commit it"
    assert gen_metrics_docs.main(["--check"]) == 0


def test_every_definition_is_documented_with_its_labels():
    text = gen_metrics_docs.render()
    for m in METRICS:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{m.exposed()}`"))
        assert all(f"`{label}`" in row for label in m.labels), m.name
        assert m.unit and m.meaning and m.help, m.name


def test_the_recorders_register_exactly_the_defined_labels():
    from deployments.prometheus import EngineMetrics

    registered = {f.name: f for f in EngineMetrics(use_ray=False).registry.collect()}
    for family in registered.values():
        defined = next(m for m in METRICS if m.name == family.name or m.name == family.name + "_total")
        labels = {frozenset(k for k in s.labels if k != "le") for s in family.samples}
        assert labels <= {frozenset(defined.labels)}, (family.name, labels)
    # Hits and misses are read together: the same labels on both.
    by = {m.name: m for m in METRICS}
    assert by["ml_cache_hits"].labels == by["ml_cache_misses"].labels == ("layer",)


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, labels it matches on or groups by) for every selector of a PromQL expression."""
    found: list[tuple[str, set[str]]] = []
    grouped: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.append((node.name, {m.name for m in node.matchers.matchers if m.name != "__name__"}))
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouped.update(node.modifier.labels)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    ours = [(n, labels) for n, labels in found if n.startswith("ray_ml_")]
    if len({n for n, _ in ours}) == 1:  # a grouping label must belong to the one engine series grouped
        ours = [(n, labels | (grouped - {"le"})) for n, labels in ours]
    return ours


def test_alerts_and_dashboard_select_defined_series_by_defined_labels():
    exprs = [(r["alert"], r["expr"]) for r in alert_rules()] + dashboard_exprs()
    checked = 0
    for title, expr in exprs:
        for name, labels in _selectors(expr):
            assert name in SERIES, f"{title}: {name} is not defined in deployments/prometheus_series.py"
            assert labels <= SERIES[name], f"{title}: {name} has no label {sorted(labels - SERIES[name])}"
            checked += 1
    assert checked >= 15


def test_docs_name_defined_series_with_their_labels():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    mentions = 0
    for path in files:
        for m in MENTION.finditer(path.read_text()):
            name, braces = m.group(1), m.group(2)
            where = f"{path.name}: {m.group(0)}"
            assert name in SERIES, f"{where}: no such series (deployments/prometheus_series.py)"
            if braces:
                inner = braces[1:-1].replace("\\", "")
                if "=" in inner:
                    labels = {part.split("=")[0].strip().lstrip("!") for part in inner.split(",") if part.strip()}
                    assert labels <= SERIES[name], f"{where}: label not defined"
                else:
                    labels = {part.strip() for part in inner.split(",") if part.strip()}
                    assert labels == SERIES[name] - {"le"}, f"{where}: the labels are {sorted(SERIES[name])}"
            mentions += 1
    assert mentions >= 20


def test_hits_and_misses_count_the_lookups_of_each_layer():
    from tests.hardening_util import call, make_app

    app, service = make_app()  # no Redis: every local miss is a redis miss too
    body = {"symbol": "BTCUSDT", "horizon": 6}
    for _ in range(3):
        assert call(app, "POST", "/predictions", json=body).status_code == 200
    assert call(app, "POST", "/predictions", json=body, headers={"Cache-Control": "no-cache"}).status_code == 200
    reg = service.metrics.registry

    def value(name: str, layer: str) -> float:
        return reg.get_sample_value(name, {"layer": layer}) or 0.0

    assert (value("ml_cache_misses_total", "local"), value("ml_cache_misses_total", "redis")) == (1.0, 1.0)
    assert (value("ml_cache_hits_total", "local"), value("ml_cache_hits_total", "redis")) == (2.0, 0.0)
