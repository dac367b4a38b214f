"""``make serve`` as an operator runs it (issue 12, points 1 and 7): ``python -m deployments.launcher``
(directly, or through ``make serve``) in a subprocess, deploying the committed serve_config.yaml with
the shipped fast ingress.

1. ``make serve`` with ``MLE_FEED=binance`` against the fake exchange on loopback: the engine streams
   the exchange's candles although serve_config.yaml says ``feed: replay`` (the environment wins over
   its args), and /health/detailed says which feed, which clock and where the choice came from.
   SIGTERM to ``make`` (what a supervisor sends the process it started) then reaches the launcher
   (the recipe execs it), which stops everything it started -- the Ray head's whole session,
   HAProxy, the feed -- frees its ports within 10 s and exits 0. One run serves both tests (a start
   is ~45 s of the suite): the first observes it, the second stops it.
2. Ctrl-C (SIGINT) while it is still starting stops it the same way.
3. The default replay, stopped by SIGKILL (what a supervisor does after its grace period): the
   watchdog stops the Ray head by itself, and nothing answers on the API port any more.

Ports come from 20000-20999 (this machine's helpers share it by ranges); Ray runs a head of its own
here, so these tests are the suite's only second Ray cluster, one at a time.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from deployments.ray_head import port_open, session_pids
from features.candles import FIVE_MINUTES_MS
from scripts.lab.fake_binance import FakeBinance, load_test_candles

ROOT = Path(__file__).resolve().parents[1]
KEY = "launcher-test-key-0123456789abcdef"
STOP_BUDGET_S = 10.0
HISTORY = 1050  # candles the fake exchange has before the live one (the feed asks for 1012)


def _free_port_in_range(taken: set[int], lo: int = 20000, hi: int = 20999) -> int:
    for _ in range(200):
        port = random.randint(lo, hi)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


class Launcher:
    """``python -m deployments.launcher`` with its own ports, models, Redis db and spool."""

    def __init__(self, tmp: Path, models: Path, extra_env: dict[str, str], argv: list[str] | None = None) -> None:
        taken: set[int] = set()
        self.ray_port, self.http_port, self.dash_port = (_free_port_in_range(taken) for _ in range(3))
        self.log_path = tmp / "launcher.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLE_", "RAY_SERVE_"))}
        env.update({"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "MLE_API_KEYS": KEY,
                    "MLE_MODELS_DIR": str(models), "MLE_RAY_PORT": str(self.ray_port),
                    "MLE_HTTP_PORT": str(self.http_port), "MLE_DASHBOARD_PORT": str(self.dash_port),
                    "MLE_REDIS_URL": "redis://127.0.0.1:6379/13", "MLE_SERVING_LOG": "",
                    "MLE_SPOOL_DIR": str(tmp / "spool"), **extra_env})
        self._log = open(self.log_path, "w")
        argv = argv or [sys.executable, "-m", "deployments.launcher", "--no-train"]
        self.proc = subprocess.Popen(argv, cwd=ROOT if argv[0] == "make" else tmp, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.head_sid: int | None = None

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_serving(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while "is serving on" not in self.log_path.read_text():
            if self.proc.poll() is not None:
                pytest.fail(f"the launcher exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the launcher did not serve within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.5)
        self.head_sid = _head_session(self.ray_port)

    def health(self) -> dict:
        r = httpx.get(f"{self.base}/health/detailed", headers={"X-API-Key": KEY}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def ports(self) -> list[int]:
        return [self.ray_port, self.http_port, self.dash_port]

    def cleanup(self) -> None:
        """Never leave a head behind, whatever the test saw."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.head_sid is not None and session_pids(self.head_sid):
            from deployments.ray_head import stop_session

            stop_session(self.head_sid, grace_s=1.0)
        self._log.close()


def _head_session(ray_port: int) -> int:
    """The session of ``ray start --head --port ray_port`` (the head's processes all share it)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"start" in cmd and b"--head" in cmd and str(ray_port).encode() in cmd:
                return os.getsid(int(entry))
    pytest.fail(f"no `ray start --head --port {ray_port}` process found")


def _wait_gone(launcher: Launcher, t0: float) -> float:
    """Seconds from ``t0`` until the head's session is empty and no port of the launcher answers."""
    while time.monotonic() - t0 < 30:
        alive = session_pids(launcher.head_sid)
        open_ports = [p for p in launcher.ports() if port_open("127.0.0.1", p)]
        if not alive and not open_ports:
            return time.monotonic() - t0
        time.sleep(0.1)
    pytest.fail(f"30 s after the signal: processes {session_pids(launcher.head_sid)} of the head's session, "
                f"ports {[p for p in launcher.ports() if port_open('127.0.0.1', p)]} still open\n{launcher.log()}")


@pytest.fixture
def models(small_models, tmp_path) -> Path:
    return Path(shutil.copytree(small_models, tmp_path / "models"))


def _exchange_candles() -> dict:
    """Real candles moved in time so that the live one (index HISTORY) is the newest closed one 20 s ago."""
    now_ms = int(time.time() * 1000)
    out = {}
    for symbol in ("BTCUSDT", "ETHUSDT"):
        df = load_test_candles(symbol, HISTORY + 1).copy()
        last_open = (now_ms - 20_000) // FIVE_MINUTES_MS * FIVE_MINUTES_MS - FIVE_MINUTES_MS
        df["open_time"] = last_open - (len(df) - 1 - np.arange(len(df), dtype=np.int64)) * FIVE_MINUTES_MS
        out[symbol] = df.reset_index(drop=True)
    return out


@pytest.fixture(scope="module")
def binance_make_serve(small_models, tmp_path_factory):
    """``make serve`` fed by the fake exchange (``MLE_FEED=binance``), serving; with the exchange's
    candles (the live one at index HISTORY is not on the exchange yet). Stopped by the last test
    of the module; stopped here whatever happened."""
    tmp = tmp_path_factory.mktemp("make-serve-binance")
    models = Path(shutil.copytree(small_models, tmp / "models"))
    candles = _exchange_candles()
    with FakeBinance({s: df.iloc[:HISTORY] for s, df in candles.items()}) as fake:
        launcher = Launcher(tmp, models, {"MLE_FEED": "binance", "MLE_BINANCE_API_URL": fake.base_url,
                                          "MLE_BINANCE_WS_URL": f"ws://127.0.0.1:{fake.port}/ws"},
                            argv=["make", "--no-print-directory", "serve"])
        try:
            launcher.wait_serving()
            yield launcher, fake, candles
        finally:
            launcher.cleanup()


@pytest.mark.timeout(420)
def test_binance_from_the_environment_beats_the_committed_config(binance_make_serve):
    launcher, fake, candles = binance_make_serve
    health = launcher.health()
    config = health["market"]["config"]
    assert config["feed"] == "binance" and config["sources"]["feed"] == "environment", config
    assert health["market"]["feed"]["feed"] == "binance"
    live = int(candles["BTCUSDT"].open_time[HISTORY])
    fake.add_candles("BTCUSDT", candles["BTCUSDT"].iloc[HISTORY:])
    fake.wait_for_ws("BTCUSDT", 1, timeout=60)
    fake.push_kline("BTCUSDT", candles["BTCUSDT"].iloc[HISTORY].to_dict(), closed=True)
    deadline = time.monotonic() + 60
    while (btc := launcher.health()["market"]["symbols"]["BTCUSDT"])["candle_open_time"] != live:
        assert time.monotonic() < deadline, f"the exchange's candle {live} never arrived: {btc}"
        time.sleep(0.5)
    assert btc["source"] == "binance" and btc["clock"] == "exchange" and btc["clock_rate"] == 1.0
    # Both symbols on one combined websocket of the feed's Binance hub (issue 18).
    hub = launcher.health()["market"]["feed"]["binance"]
    assert hub["connections"] == 1 and hub["streams"] == 2 and fake.ws_handshakes[0] == 2, hub
    assert abs(btc["clock_offset_s"]) < 5, btc  # the fake exchange's server time is this host's
    # The exchange's newest closed candle (closed 20 s to 5 min 20 s before the test began), not a replay.
    assert 0 < btc["data_age_wall_s"] < 600, btc
    assert abs(btc["data_age_s"] - btc["data_age_wall_s"]) < 5, btc
    r = httpx.post(f"{launcher.base}/predictions", json={"symbol": "BTCUSDT", "horizon": 6},
                   headers={"X-API-Key": KEY}, timeout=10)
    assert r.status_code == 200 and r.json()["candle_open_time"] == live, r.text
    assert _haproxy_in(launcher.head_sid), "make serve runs Serve's HAProxy ingress"


@pytest.mark.timeout(420)
def test_sigterm_to_make_serve_stops_everything(binance_make_serve):
    """A supervisor signals the process it started: `make`. make passes SIGTERM to its recipe's
    process, which must be the launcher itself (the recipe execs it), not a shell that dies and
    leaves the launcher serving; the launcher's clean stop is an exit 0 (make reports any other
    status of its recipe, or a death by signal, as ``make: *** [...]``)."""
    launcher, _, _ = binance_make_serve
    assert launcher.proc.poll() is None, f"make serve is not running any more:\n{launcher.log()}"
    t0 = time.monotonic()
    launcher.proc.terminate()
    took = _wait_gone(launcher, t0)
    assert took <= STOP_BUDGET_S, f"SIGTERM to make: everything stopped after {took:.1f} s\n{launcher.log()}"
    launcher.proc.wait(timeout=30)
    assert launcher.proc.returncode == -signal.SIGTERM, launcher.proc.returncode  # make re-raises it
    assert "make: ***" not in launcher.log(), f"the launcher did not exit 0:\n{launcher.log()}"


@pytest.mark.timeout(420)
def test_sigkill_of_the_launcher_stops_the_ray_head_by_itself(models, tmp_path):
    """Also a fresh machine's first ``make serve``: a home with no Ray auth token yet (``ray start``
    in token mode refuses to start without one; the launcher generates it)."""
    home = tmp_path / "home"
    home.mkdir()
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ), "a token from the environment"
    launcher = Launcher(tmp_path, models, {"HOME": str(home)})
    try:
        launcher.wait_serving()
        token = home / ".ray" / "auth_token"
        assert token.exists() and token.stat().st_mode & 0o077 == 0, "the generated token must be the owner's only"
        health = launcher.health()
        assert health["market"]["config"]["feed"] == "replay"
        assert health["market"]["config"]["sources"]["feed"] == "args"  # serve_config.yaml's default
        btc = health["market"]["symbols"]["BTCUSDT"]
        assert btc["clock"] == "replay" and btc["clock_rate"] == 60.0
        assert btc["data_age_wall_s"] > 86400, "the shipped sample is old: its wall-clock age says so"
        t0 = time.monotonic()
        launcher.proc.kill()
        launcher.proc.wait(timeout=10)
        took = _wait_gone(launcher, t0)
        assert took <= STOP_BUDGET_S, f"SIGKILL: the head stopped after {took:.1f} s"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{launcher.base}/health", timeout=5)
    finally:
        launcher.cleanup()


def _haproxy_in(sid: int) -> bool:
    for pid in session_pids(sid):
        try:
            if b"haproxy" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                return True
        except OSError:
            continue
    return False


@pytest.mark.timeout(300)
def test_sigint_while_starting_stops_everything(models, tmp_path):
    """Ctrl-C before the engine serves (the head up, the graph deploying): the same clean stop, not a
    wait for the start-up to finish."""
    launcher = Launcher(tmp_path, models, {})
    try:
        deadline = time.monotonic() + 180
        while not port_open("127.0.0.1", launcher.ray_port):
            assert launcher.proc.poll() is None and time.monotonic() < deadline, launcher.log()
            time.sleep(0.2)
        launcher.head_sid = _head_session(launcher.ray_port)
        t0 = time.monotonic()
        launcher.proc.send_signal(signal.SIGINT)
        launcher.proc.wait(timeout=30)
        took = _wait_gone(launcher, t0)
        assert "is serving on" not in launcher.log(), "the signal came too late to test the start-up"
        assert launcher.proc.returncode == 0, launcher.log()
        assert took <= STOP_BUDGET_S, f"SIGINT while starting: everything stopped after {took:.1f} s\n{launcher.log()}"
    finally:
        launcher.cleanup()
