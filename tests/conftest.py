"""Shared fixtures: real candles (the shared history when present, else the shipped sample)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from deployments.ray_head import free_port  # noqa: F401  (tests import it from here)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """The shared candle history: $MLE_SHARED_DATA_DIR, else ../shared/data beside the checkout (a
    clone elsewhere, e.g. CI's, still finds the machine's /work/shared/data)."""
    if os.environ.get("MLE_SHARED_DATA_DIR"):
        return Path(os.environ["MLE_SHARED_DATA_DIR"])
    beside = ROOT.parent / "shared" / "data"
    return beside if beside.exists() else Path("/work/shared/data")


SHARED_DATA = _shared_data()
SAMPLE_DATA = ROOT / "data" / "sample"
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def candle_path(symbol: str) -> Path:
    """The shared history for ``symbol`` if this machine has it, else the shipped sample."""
    shared = SHARED_DATA / f"{symbol}_5m.parquet"
    return shared if shared.exists() else SAMPLE_DATA / f"{symbol}_5m.parquet"


@pytest.fixture(scope="session")
def real_candles() -> dict[str, pd.DataFrame]:
    from features.candles import load_candles

    return {s: load_candles(candle_path(s)) for s in SYMBOLS}


@pytest.fixture(scope="session")
def has_shared_data() -> bool:
    return all((SHARED_DATA / f"{s}_5m.parquet").exists() for s in SYMBOLS)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole suite (started by this driver, stopped at the end).

    The dashboard (and its job server) is on, so `ray job submit` tests can use the same cluster;
    Serve tests deploy into it. Logical CPUs exceed the 2 physical cores on purpose: deployments
    ask for fractions, and the suite's small workloads interleave.
    """
    import ray

    # address="local": always a new cluster of our own; without it ray.init() joins any cluster a
    # `ray start --head` left running on this machine (e.g. `make serve` on port 6380).
    # Ray gives its raylet a fixed 30 s to register; on a saturated machine that can pass, so a
    # failed start is retried on fresh ports rather than failing every test that needs the cluster.
    for attempt in range(3):
        dashboard_port = free_port()
        try:
            ctx = ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=dashboard_port, configure_logging=False, log_to_driver=False,
                           runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    # Ray 2.5x+ enables token auth by default; the token is saved in ~/.ray/auth_token, which the
    # Ray CLI (`ray job submit`) reads itself. Plain HTTP clients send it as a bearer token.
    token_file = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
    info = {"address": ctx.address_info["address"], "gcs_address": ctx.address_info["gcs_address"],
            "dashboard_url": f"http://127.0.0.1:{dashboard_port}", "auth_headers": headers}
    yield info
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve was never started
        pass
    ray.shutdown()


# The Serve application, deployed once per session (tests/serving_app.py).
from tests.serving_app import serving_app, small_models  # noqa: E402,F401


# Modules whose tests start Ray clusters of their own in subprocesses (`make serve`'s head, the
# multi-node drill's nodes). They run first, before the suite's session cluster and its replaying
# app exist: once started, those stay up to the end and take a good part of the 2 cores (the replay
# at 100x, the controller, the dashboard), which made these start-up-bound tests ~1.5x slower.
OWN_CLUSTER_MODULES = ("test_cluster_drill.py", "test_launcher.py")


def pytest_collection_modifyitems(session, config, items):
    """``OWN_CLUSTER_MODULES`` first (in their usual order), then everything else as collected."""
    first = [item for item in items if item.path.name in OWN_CLUSTER_MODULES]
    if first:
        items[:] = first + [item for item in items if item.path.name not in OWN_CLUSTER_MODULES]


def pytest_terminal_summary(terminalreporter):
    """The hardening suite's one line per area: what was tried, how many, what failed."""
    from tests.hardening_report import LINES

    if LINES:
        terminalreporter.section("hardening and fault suite")
        for line in LINES:
            terminalreporter.write_line(line)
