"""A lab network on this machine: Linux network namespaces joined by veth pairs to one bridge.

Why namespaces and not loopback aliases: Serve runs an HTTP proxy on *every* node on the same port
(``proxy_location: EveryNode``). On one network stack two proxies cannot both bind port 8000; in
their own namespaces each node has its own stack, its own address and its own port 8000, exactly
like separate machines. Nothing here touches an address outside the lab subnet
``10.213.<lab_id>.0/24``: the bridge holds ``.1`` (this host, the drill's side), node ``i`` is
``.(10 + i)``.

Everything is named after the lab id (``mlebr<id>``, ``mle<id>n<i>``, ``mle<id>v<i>``) so a run
only ever removes what it (or an earlier crashed run of the same id) created. Needs root and
iproute2. :class:`TcpForward` lets processes inside the namespaces reach a service that listens
only on this host's loopback (PostgreSQL here), through the bridge address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class LabNetwork:
    """``nodes`` namespaces on bridge ``mlebr<lab_id>``; create with :meth:`up`, remove with :meth:`down`."""

    lab_id: int
    nodes: int

    def __post_init__(self) -> None:
        if not 1 <= self.lab_id <= 250 or not 1 <= self.nodes <= 20:
            raise ValueError("lab_id is 1..250 and nodes 1..20")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.213.{self.lab_id}.0/24")

    @property
    def host_address(self) -> str:
        """This host's address on the bridge (where the drill listens and sends from)."""
        return f"10.213.{self.lab_id}.1"

    @property
    def bridge(self) -> str:
        return f"mlebr{self.lab_id}"

    def namespace(self, i: int) -> str:
        return f"mle{self.lab_id}n{i}"

    def address(self, i: int) -> str:
        return f"10.213.{self.lab_id}.{10 + i}"

    def contains(self, host: str) -> bool:
        try:
            return ipaddress.ip_address(host) in self.network
        except ValueError:
            return False

    def up(self) -> "LabNetwork":
        self.down()  # leftovers of a crashed run with the same id
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.nodes):
            ns, host_end, ns_end = self.namespace(i), f"mle{self.lab_id}v{i}", f"mle{self.lab_id}p{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("link", "set", ns_end, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", ns_end)
            _ip("-n", ns, "link", "set", ns_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def pids(self, i: int) -> list[int]:
        """Every process living in node ``i``'s namespace (its Ray node, replicas, workers)."""
        out = _ip("netns", "pids", self.namespace(i), check=False).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> int:
        """Signal every process of node ``i``: to Ray, the machine died. Returns how many."""
        pids = self.pids(i)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)

    def down(self) -> None:
        """Stop every process in the lab's namespaces, then remove the namespaces and the bridge."""
        existing = set(_ip("netns", "list", check=False).stdout.split())
        for i in range(20):
            if self.namespace(i) not in existing:
                continue
            self.kill_node(i, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while self.pids(i) and time.monotonic() < deadline:
                time.sleep(0.2)
            self.kill_node(i, signal.SIGKILL)
            _ip("netns", "del", self.namespace(i), check=False)
        # `netns del` only unmounts the name: a namespace that something still holds (a process
        # not yet reaped, an open fd) lives on with its veth end, and so does the host end on the
        # bridge, which the next `up` of this id then cannot create. Deleting the host end of a
        # veth removes both ends, wherever the peer lives.
        for link in self._host_links():
            _ip("link", "del", link, check=False)
        _ip("link", "del", self.bridge, check=False)

    def _host_links(self) -> list[str]:
        """This lab id's veth ends on the host (``mle<id>v<i>``), whatever the node count that made them."""
        out = _ip("-o", "link", "show", "type", "veth", check=False).stdout
        names = (line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line)
        prefix = f"mle{self.lab_id}v"
        return [n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()]

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(i), *argv]


class TcpForward:
    """``listen_host:listen_port`` -> ``target_host:target_port``, byte for byte, in a daemon thread."""

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int) -> None:
        self.listen, self.target = (listen_host, listen_port), (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._main, name="tcp-forward", daemon=True)

    def start(self) -> "TcpForward":
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError(f"cannot listen on {self.listen}")
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(self._client, *self.listen))
        finally:
            self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
