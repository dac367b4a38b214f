"""The lab network (scripts/lab_network.py) tears down everything it made, even a namespace that
outlives its name, so that the next lab of the same id comes up (bench/scale_nodes.py runs a
1-node lab, then a 2-node one, back to back)."""

from __future__ import annotations

import os
import subprocess
import sys

from scripts.lab_network import LabNetwork

LAB_ID = 243  # not the drill's (7) nor bench/scale_nodes.py's (218)


def _links(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(prefix)]


def _reaches(lab: LabNetwork, src: int, dst: int) -> bool:
    """A TCP connection from node ``src``'s namespace to a listener in node ``dst``'s."""
    server = subprocess.Popen(lab.exec_argv(dst, [sys.executable, "-c", _LISTEN, lab.address(dst)]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = subprocess.run(lab.exec_argv(src, [sys.executable, "-c", _CONNECT, lab.address(dst)]),
                                capture_output=True, text=True, timeout=30)
        return client.returncode == 0
    finally:
        server.kill()
        server.wait()


_LISTEN = "import socket,sys; s=socket.create_server((sys.argv[1], 18555)); print('ready', flush=True); s.accept()"
_CONNECT = "import socket,sys; socket.create_connection((sys.argv[1], 18555), timeout=5).close()"


def test_down_removes_host_links_of_a_namespace_still_held_open() -> None:
    one = LabNetwork(LAB_ID, 1).up()
    held = os.open(f"/run/netns/{one.namespace(0)}", os.O_RDONLY)  # keeps the namespace alive past `netns del`
    try:
        assert _links(f"mle{LAB_ID}v") == [f"mle{LAB_ID}v0"]
        one.down()
        assert _links(f"mle{LAB_ID}v") == [], "the host end of a held namespace's veth survived down()"
        assert _links(one.bridge) == []
        two = LabNetwork(LAB_ID, 2).up()  # the same id, more nodes: what the combined bench run does
        try:
            assert sorted(_links(f"mle{LAB_ID}v")) == [f"mle{LAB_ID}v0", f"mle{LAB_ID}v1"]
            assert _reaches(two, 1, 0), "node 1 cannot reach node 0 over the rebuilt bridge"
        finally:
            two.down()
        assert _links(f"mle{LAB_ID}") == []
    finally:
        os.close(held)
        LabNetwork(LAB_ID, 1).down()
