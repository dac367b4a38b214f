"""The Ray head ``make serve`` starts: its own session, stopped within seconds, never outliving us.

Why a session of its own: ``ray start --head --block`` and everything it starts (GCS, raylet,
dashboard, workers, Serve's replicas and proxy, HAProxy, the replay actors) share its session id,
so "everything the launcher started" is exactly the processes of that session -- found in /proc,
stopped with SIGTERM, then SIGKILL after a grace period -- and a Ctrl-C in the terminal reaches
only the launcher, which then stops the head in order.

Why a watchdog: a supervisor's SIGKILL (``docker stop`` after its grace, ``systemctl kill``,
the OOM killer) gives the launcher no chance to stop anything, and the head would keep serving.
``python -m deployments.ray_head --watch PID --session SID`` (started by :class:`RayHead`, in a
session of its own so it is not among what it kills) polls the launcher every 0.2 s and, once it
is gone, stops the head's session the same way. It exits by itself when the session is empty.
Linux only (/proc), like the rest of the engine's process handling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from configs.settings import PROJECT_DIR

# A clean stop must leave every port free within 10 s (docker's default grace): SIGTERM, this
# long for Ray to stop its processes, then SIGKILL for what is left.
TERM_GRACE_S = 3.0


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    """This environment's ``ray`` (beside its Python), else the one on PATH."""
    cli = Path(sys.executable).with_name("ray")
    return str(cli) if cli.exists() else shutil.which("ray") or "ray"


def ensure_auth_token(env: dict[str, str]) -> Path | None:
    """Generate Ray's auth token when ``env`` asks for token auth and none is there yet.

    Why: ``ray start --head`` in token mode refuses to start without a token (it never creates one;
    ``ray.init`` of a local cluster does), so on a fresh machine ``make serve`` died at its first
    step. The token goes where every Ray process and CLI of this user looks (``~/.ray/auth_token``,
    readable only by its owner); one set explicitly (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``)
    is left alone. Returns the file generated, if any."""
    if env.get("RAY_AUTH_MODE") != "token" or env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        return None
    token = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if token.exists():
        return None
    subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=60)
    token.chmod(0o600)
    return token


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies excluded: they hold no port and cannot be killed)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            out.append(int(entry))
    return out


def stop_session(sid: int, grace_s: float = TERM_GRACE_S, first: int | None = None) -> int:
    """SIGTERM every process of the session at once (or only ``first``), after ``grace_s`` SIGKILL
    whatever is left. Returns how many needed SIGKILL.

    All at once, not ``ray start --block`` alone: it stops its processes one after the other and
    took over 4 s with Serve running; each Ray process exits on SIGTERM by itself."""
    me = os.getpid()
    targets = [first] if first else [p for p in session_pids(sid) if p != me]
    for pid in targets:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and [p for p in session_pids(sid) if p != me]:
        time.sleep(0.1)
    left = [p for p in session_pids(sid) if p != me]
    for pid in left:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and [p for p in session_pids(sid) if p != me]:
        time.sleep(0.05)
    return len(left)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, kernel start time) of ``pid``; the start time tells a live process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except OSError:
        return None


def _alive(pid: int, born: str | None) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[1] == born


def watch(parent: int, sid: int, poll_s: float = 0.2) -> int:
    """Stop session ``sid`` once ``parent`` is gone; return once the head (the session's leader) is.

    Two /proc reads per poll, not a scan of every process: the watchdog runs beside benchmarks."""
    parent_born, head_born = (_stat(parent) or ("", None))[1], (_stat(sid) or ("", None))[1]
    while _alive(sid, head_born):
        if not _alive(parent, parent_born):
            print(f"[ray_head watchdog] launcher {parent} is gone: stopping the Ray head (session {sid})",
                  file=sys.stderr, flush=True)
            stop_session(sid)
            return 0
        time.sleep(poll_s)
    return 0  # the launcher stopped the head itself (and stops the rest of its session)


class RayHead:
    """A ``ray start --head --block`` child process in its own session: ours to stop, and only ours."""

    def __init__(self, port: int, env: dict[str, str], dashboard_port: int | None = None,
                 log_path: Path | None = None, watchdog: bool = True) -> None:
        self.port = port
        ensure_auth_token(env)
        cmd = [ray_cli(), "start", "--head",
               "--port", str(port), "--dashboard-host", "127.0.0.1", "--block", "--disable-usage-stats"]
        if dashboard_port is not None:
            cmd += ["--dashboard-port", str(dashboard_port)]
        # Ports Ray would otherwise take by default (10001, 52365): another head on this machine may
        # hold them, and `ray start --block` then kills the whole node.
        cmd += ["--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
        self.log_path = log_path or PROJECT_DIR / "var" / "ray-head.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.watchdog = None
        if watchdog:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-m", "deployments.ray_head", "--watch", str(os.getpid()), "--session",
                 str(self.proc.pid)], cwd=PROJECT_DIR, env={**env, "PYTHONPATH": str(PROJECT_DIR)},
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                raise SystemExit(f"ray start exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the Ray head did not come up in {timeout:.0f}s; see {self.log_path}")
            time.sleep(0.5)

    def connect(self, timeout: float = 120) -> None:
        """``ray.init`` this driver to the head, retried: its GCS port opens before its node is
        registered, and ray.init fails in between."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.init(address=f"127.0.0.1:{self.port}", configure_logging=False, log_to_driver=False)
                return
            except ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(2)

    def stop(self, grace_s: float = TERM_GRACE_S) -> int:
        """Stop the head and everything in its session (SIGKILL after ``grace_s``); returns how many
        processes needed SIGKILL."""
        killed = stop_session(self.proc.pid, grace_s)
        self.proc.wait(timeout=10)
        if self.watchdog is not None:
            self.watchdog.wait(timeout=10)  # it exits once the session is empty
        self._log.close()
        return killed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.ray_head", description="the Ray head's watchdog")
    p.add_argument("--watch", type=int, required=True, help="pid of the launcher")
    p.add_argument("--session", type=int, required=True, help="session id of the Ray head")
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the launcher
    return watch(a.watch, a.session)


if __name__ == "__main__":
    sys.exit(main())
