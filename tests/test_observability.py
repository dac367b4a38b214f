"""Grafana dashboard, Prometheus scrape config and alert rules: valid, and about metrics that exist.

Every PromQL expression is parsed by a real PromQL parser (promql-parser, the Rust one), and every
metric it selects must be one the code exports: the engine's own (deployments/prometheus.py, exported
by Ray as ``ray_<name>``) or Ray Serve's (their names are read from the installed Ray's source).
The scrape config is checked against the suite's live Ray cluster: the service-discovery file it
names exists and its targets serve Ray metrics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "ops" / "grafana" / "ml-engine.json"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
PROMETHEUS_BUILTIN = {"up"}


def selected_metrics(expr: str) -> set[str]:
    """Metric names selected anywhere in ``expr`` (raises ValueError when it does not parse)."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                for m in node.matchers.matchers:
                    if m.name == "__name__":
                        names.add(m.value)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def engine_exports() -> set[str]:
    """Series names of the engine's metrics, as Prometheus sees them from Ray's export: every
    definition in deployments/prometheus_series.py (what the recorders construct), with the suffixes
    Prometheus adds per type."""
    from deployments.prometheus_series import METRICS

    return {f"ray_{s}" for m in METRICS for s in m.series()}


def ray_serve_exports() -> set[str]:
    """Series names of Ray Serve's built-in metrics, read from the installed Ray's source."""
    import ray.serve

    names: set[str] = set()
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        text = path.read_text(errors="ignore")
        names |= set(re.findall(r'"(serve_[a-z_]+)"', text))
        for template in re.findall(r'f"(serve_[a-z_]*\{protocol_name\}[a-z_]*)"', text):
            names.add(template.replace("{protocol_name}", "http"))
    return {f"ray_{n}{s}" for n in names for s in ("", "_total", "_bucket", "_sum", "_count")}


@pytest.fixture(scope="module")
def known_metrics() -> set[str]:
    return engine_exports() | ray_serve_exports() | PROMETHEUS_BUILTIN


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_engine_metric_names_are_the_contract_ones():
    names = engine_exports()
    for required in ("ray_ml_predictions_total", "ray_ml_prediction_latency_seconds_bucket",
                     "ray_ml_model_accuracy", "ray_ml_cache_hits_total", "ray_ml_market_data_age_seconds",
                     "ray_ml_model_drift"):
        assert required in names
    # The definitions cover what prometheus_client registers at run time (no name is missed or invented).
    from deployments.prometheus import EngineMetrics

    kinds = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    local = {f"ray_{f.name}{s}" for f in EngineMetrics(use_ray=False).registry.collect() for s in kinds[f.type]}
    assert local <= names


def test_dashboard_queries_parse_and_select_existing_metrics(known_metrics):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        metrics = selected_metrics(expr)
        assert metrics, f"{title}: selects no metric"
        unknown = metrics - known_metrics
        assert not unknown, f"{title}: {sorted(unknown)} is exported by no code"


def test_dashboard_covers_what_operators_watch():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "ml-engine"
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("predictions served", "latency percentiles", "cache hit rate", "market data age",
                  "live accuracy", "drift", "healthy replicas", "http requests"):
        assert topic in titles, topic
    queries = " ".join(e for _, e in dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in queries
    # Panels use the datasource variable, so the dashboard imports into any Grafana.
    assert all(p.get("datasource", {}).get("uid") == "${datasource}" for p in dash["panels"] if p["type"] != "row")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_parse_and_select_existing_metrics(known_metrics):
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"MLEngineHTTPErrors", "MLEnginePredictionLatencyHigh",
                                           "MLEngineMarketDataStale", "MLEngineModelDrift",
                                           "MLEngineIntervalCoverageLow", "MLEngineNodeDown"}
    for rule in rules:
        unknown = selected_metrics(rule["expr"]) - known_metrics
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} is exported by no code"
        assert re.fullmatch(r"\d+[smh]", rule["for"]) and rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    ops_doc = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules:
        assert rule["alert"] in ops_doc, f"{rule['alert']} is not explained in docs/operations.md"


def test_stale_data_alert_matches_the_setting():
    from configs.settings import Settings

    rule = next(r for r in alert_rules() if r["alert"] == "MLEngineMarketDataStale")
    assert f"> {int(Settings().max_data_age_s)}" in rule["expr"]


def test_scrape_config_uses_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = yaml.safe_load(PROMETHEUS.read_text())
    assert (PROMETHEUS.parent / config["rule_files"][0]).resolve() == ALERTS.resolve()
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "ray")
    assert job["file_sd_configs"][0]["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]


def test_service_discovery_targets_serve_ray_metrics(ray_cluster):
    """The live cluster writes the file the config names, and its targets answer with Ray series."""
    import ray
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    sd_file = session_dir / PROMETHEUS_SERVICE_DISCOVERY_FILE
    deadline = __import__("time").monotonic() + 30
    while not sd_file.exists() and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.5)
    groups = json.loads(sd_file.read_text())
    targets = [t for g in groups for t in g["targets"]]
    assert targets, "Ray lists no metrics target"
    text = httpx.get(f"http://{targets[0]}/metrics", timeout=10).text
    assert re.search(r"^ray_\w+", text, flags=re.M), "the target exports no ray_ series"
