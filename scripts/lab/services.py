"""Real services of one's own for tests, drills and checks: PostgreSQL and Redis.

The shared PostgreSQL (127.0.0.1:5432, database ``test``) may hold other runs' ``ml`` schema, so
the log tests never touch it: each gets a fresh database it creates and drops
(:func:`fresh_database`). Outage tests and drills need servers they may stop and restart at will:
:class:`PrivatePostgres` runs ``initdb`` into a temp dir and ``pg_ctl`` on a free port (as the
``postgres`` user when run as root, since initdb refuses root); :class:`PrivateRedis` runs a
``redis-server`` on a free loopback port (never the shared 6379).

Here, not under ``tests/``, because ``scripts/check_outcomes.py`` runs them too and scripts never
import the test suite (tests/test_layering.py); the tests import them from here.
"""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import asyncpg

if TYPE_CHECKING:
    import redis

from deployments.ray_head import free_port

SHARED_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin(url: str, sql: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(go())


@contextmanager
def fresh_database(admin_url: str = SHARED_ADMIN_URL, prefix: str = "mle_t") -> Iterator[str]:
    """A new empty database for one test; yields its URL and drops it afterwards."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    _admin(admin_url, f"CREATE DATABASE {name}")
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        _admin(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return Path(found[-1])


class PrivatePostgres:
    """A PostgreSQL server of the test's own: ``start()``, ``stop()``, ``start()`` again, ``destroy()``."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="mle-pg-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.datadir), "-o", opts, "-l", str(self.root / "server.log"), "-w",
                  "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect clients, clean shutdown; ``immediate``: like a crash (recovery on start)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A redis-server of our own on a free loopback port (stop / start at will), optionally with a
    password (``requirepass``)."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (bash scripts/services.sh needs it too)")
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir), *auth],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self) -> "redis.Redis":
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
