"""Issue 13 against the deployed Serve application (through Serve's HTTP proxy, on loopback): a
50 MB body without a key is refused at once and costs the ingress no memory, a set of hostile
requests (deep JSON, NaN, Infinity, unicode keys, repeated headers, broken framing) gets 4xx and
never 5xx, no API key is in the Serve config, and /health/ready needs no key.
"""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.hardening_report import record

pytestmark = pytest.mark.timeout(300)
MB = 1 << 20


def _serve_details(ray_cluster) -> dict:
    r = httpx.get(f"{ray_cluster['dashboard_url']}/api/serve/applications/", headers=ray_cluster["auth_headers"],
                  timeout=30)
    r.raise_for_status()
    return r.json()


def _ingress_pid(ray_cluster) -> int:
    replicas = _serve_details(ray_cluster)["applications"]["ml-engine"]["deployments"]["ApiIngress"]["replicas"]
    return next(r["pid"] for r in replicas if r["state"] == "RUNNING")


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def raw_request(port: int, head: str, total: int = 0, chunked: bool = False, timeout: float = 30.0):
    """Send ``head`` then a body of ``total`` bytes (chunked or not), stopping as soon as an answer
    arrives, as a real client would. Returns (status, body bytes, body bytes sent, seconds)."""
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head.encode("latin-1"))
    piece = b"x" * (64 << 10)
    sent, answer = 0, b""
    sock.setblocking(False)
    try:
        while time.monotonic() - t0 < timeout:
            want_write = [sock] if sent < total or (chunked and sent == total) else []
            readable, writable, _ = select.select([sock], want_write, [], 1.0)
            if readable:
                data = sock.recv(1 << 16)
                answer += data
                if not data or _complete(answer):
                    break
            elif writable:
                try:
                    if sent < total:
                        n = min(len(piece), total - sent)
                        frame = (b"%x\r\n" % n + piece[:n] + b"\r\n") if chunked else piece[:n]
                        sock.sendall(frame)
                        sent += n
                    else:
                        sock.sendall(b"0\r\n\r\n")
                        sent += 1
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    time.sleep(0.01)
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer.partition(b"\r\n\r\n")[2], sent, time.monotonic() - t0


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return head.lower().find(b"chunked") < 0 or body.endswith(b"0\r\n\r\n")


def test_a_50mb_body_without_a_key_is_refused_at_once_and_costs_the_ingress_no_memory(serving_app, ray_cluster):
    """Each 50 MB request is answered (401/413 JSON) as soon as its headers are in; the client stops
    sending then. With a Content-Length the ingress's peak memory does not move at all. A chunked
    body is pulled into the replica by Serve itself (its proxy forwards what arrives until the answer
    is out), so there the peak grows by about what arrived meanwhile (measured: 1.1-1.2x the bytes
    sent on a quiet machine, up to 1.8x with the suite's other work on both cores). Without the
    guard FastAPI reads and joins the whole body on top of that: 2.5x or more. The bound sits
    between: 2.2x."""
    port = int(serving_app.base_url.rsplit(":", 1)[1])
    pid = _ingress_pid(ray_cluster)
    head = "POST /predictions HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\n"
    requests = {"declared": (head + f"Content-Length: {50 * MB}\r\n\r\n", False),
                "chunked": (head + "Transfer-Encoding: chunked\r\n\r\n", True),
                "chunked with a key": (head + f"X-API-Key: {serving_app.new_key()}\r\nTransfer-Encoding: chunked"
                                              "\r\n\r\n", True)}
    results = {}
    for name, (text, chunked) in requests.items():
        before = _peak_rss(pid)
        status, body, sent, seconds = raw_request(port, text, 50 * MB, chunked=chunked)
        results[name] = (status, json.loads(body)["error"], sent, seconds, _peak_rss(pid) - before)
    assert [r[:2] for r in results.values()] == [(413, "payload_too_large"), (401, "unauthorized"),
                                                 (413, "payload_too_large")], results
    for name, (_status, _error, sent, seconds, grown) in results.items():
        allowed = 2 * MB if name == "declared" else 2.2 * sent + 4 * MB
        assert seconds < 10 and grown < allowed, f"{name}: {sent / MB:.1f} MB sent, peak memory +{grown / MB:.1f} MB"
    record("huge bodies (deployed)", "50 MB with Content-Length and no key, 50 MB chunked without and with a key: "
           + ", ".join(f"{n} {r[0]} after {r[2] / MB:.0f} MB sent, peak +{r[4] / MB:.1f} MB" for n, r in results.items()),
           len(results))


def _hostile_cases(key: str) -> list[tuple[str, str, str, list[tuple[str, str]], bytes | None]]:
    """(name, method, path, headers, body): requests a fuzzer or an attacker would send."""
    json_headers = [("X-API-Key", key), ("Content-Type", "application/json")]
    deep_list = b"[" * 5000 + b"]" * 5000
    deep_obj = b'{"a":' * 2000 + b"1" + b"}" * 2000
    raw = {
        "deep JSON array": deep_list,
        "deep JSON object": deep_obj,
        "deep JSON in a field": b'{"symbol":' + b"[" * 3000 + b"]" * 3000 + b',"horizon":6}',
        "NaN horizon": b'{"symbol":"BTCUSDT","horizon":NaN}',
        "Infinity horizon": b'{"symbol":"BTCUSDT","horizon":Infinity}',
        "-Infinity horizon": b'{"symbol":"BTCUSDT","horizon":-Infinity}',
        "1e999 horizon": b'{"symbol":"BTCUSDT","horizon":1e999}',
        "400-digit horizon": b'{"symbol":"BTCUSDT","horizon":' + b"9" * 400 + b"}",
        "unicode key": '{"symbol":"BTCUSDT","horizon":6,"ü🙂":1}'.encode(),
        "lone surrogate key": b'{"symbol":"BTCUSDT","horizon":6,"\\ud800":1}',
        "NUL key": b'{"symbol":"BTCUSDT","horizon":6,"\\u0000":1}',
        "RTL override symbol": '{"symbol":"\u202eTDSUCTB","horizon":6}'.encode(),
        "fullwidth symbol": '{"symbol":"ＢＴＣＵＳＤＴ","horizon":6}'.encode(),
        "NUL in symbol": b'{"symbol":"BTCUSDT\\u0000","horizon":6}',
        "invalid UTF-8": b'{"symbol":"\xff\xfe","horizon":6}',
        "duplicate keys": b'{"symbol":"BTCUSDT","symbol":"ETHUSDT","horizon":6,"horizon":7}',
        "empty body": b"",
        "null body": b"null",
        "string body": b'"BTCUSDT"',
        "100 KB body": b'{"symbol":"' + b"B" * 100_000 + b'","horizon":6}',
    }
    cases = [(name, "POST", "/predictions", json_headers, body) for name, body in raw.items()]
    cases += [
        ("signals, NaN horizon", "POST", "/signals", json_headers, raw["NaN horizon"]),
        ("text/plain body", "POST", "/predictions", [("X-API-Key", key), ("Content-Type", "text/plain")],
         b'{"symbol":"BTCUSDT","horizon":6}'),
        ("two API keys, one wrong", "POST", "/predictions",
         [("X-API-Key", key), ("X-API-Key", "wrong-key-wrong-key-wrong-key"), ("Content-Type", "application/json")],
         b'{"symbol":"BTCUSDT","horizon":6}'),
        ("the same API key twice", "POST", "/predictions",
         [("X-API-Key", key), ("X-API-Key", key), ("Content-Type", "application/json")],
         b'{"symbol":"BTCUSDT","horizon":6}'),
        ("two content types", "POST", "/predictions",
         [("X-API-Key", key), ("Content-Type", "application/json"), ("Content-Type", "text/plain")],
         b'{"symbol":"BTCUSDT","horizon":6}'),
        ("repeated Cache-Control", "POST", "/predictions",
         json_headers + [("Cache-Control", "no-cache"), ("Cache-Control", "max-age=0")],
         b'{"symbol":"BTCUSDT","horizon":6}'),
        ("10 KB API key", "GET", "/models/status", [("X-API-Key", "k" * 10_000)], None),
        ("repeated query symbol", "GET", "/indicators?symbol=BTCUSDT&symbol=ETHUSDT", [("X-API-Key", key)], None),
        ("NUL in query", "GET", "/indicators?symbol=BTC%00USDT", [("X-API-Key", key)], None),
        ("10 KB query", "GET", "/indicators?symbol=" + "B" * 10_000, [("X-API-Key", key)], None),
        ("path traversal", "GET", "/../../etc/passwd", [("X-API-Key", key)], None),
        ("OPTIONS", "OPTIONS", "/predictions", [("X-API-Key", key)], None),
        ("GET with a body", "GET", "/models/status", [("X-API-Key", key)], b"x" * 20_000),
    ]
    return cases


def test_hostile_requests_get_4xx_json_and_never_5xx(serving_app):
    key = serving_app.new_key()
    failed, statuses = [], {}
    with httpx.Client(base_url=serving_app.base_url, timeout=30) as client:
        for name, method, path, headers, body in _hostile_cases(key):
            r = client.request(method, path, headers=headers, content=body)
            statuses[name] = r.status_code
            try:
                shape_ok = {"error", "message", "path"} <= set(r.json())
            except ValueError:
                shape_ok = False
            if r.status_code >= 500 or (r.status_code >= 400 and not shape_ok):
                failed.append(f"{name}: {r.status_code} {r.text[:120]!r}")
            time.sleep(0.02)  # stay under the key's rate limit
    port = int(serving_app.base_url.rsplit(":", 1)[1])
    framing = {  # broken HTTP framing: refused by the HTTP server before the engine sees it
        "two different Content-Lengths": "POST /predictions HTTP/1.1\r\nHost: e\r\nContent-Length: 5\r\n"
                                         "Content-Length: 50\r\n\r\n",
        "Content-Length and chunked": "POST /predictions HTTP/1.1\r\nHost: e\r\nContent-Length: 5\r\n"
                                      "Transfer-Encoding: chunked\r\n\r\n",
        "negative Content-Length": "POST /predictions HTTP/1.1\r\nHost: e\r\nContent-Length: -1\r\n\r\n",
    }
    for name, head in framing.items():
        status = raw_request(port, head, timeout=10)[0]
        statuses[name] = status
        if not 400 <= status < 500:
            failed.append(f"{name}: {status}")
    assert failed == [], failed
    assert statuses["two API keys, one wrong"] == 401 and statuses["the same API key twice"] == 401
    assert statuses["100 KB body"] == 413 and statuses["lone surrogate key"] == 422
    record("hostile requests (deployed)", "deep JSON, NaN, Infinity, huge numbers, unicode/NUL/surrogate keys, "
           "invalid UTF-8, repeated headers and keys, long keys and queries, broken framing",
           len(statuses), failed)


def test_no_api_key_in_the_serve_config_and_readiness_needs_none(serving_app, ray_cluster):
    config = json.dumps(_serve_details(ray_cluster))
    keys = Path(serving_app.overrides["api_keys_file"]).read_text().split()
    assert keys and not [k for k in keys if k in config], "an API key is visible in the Serve config"
    assert '"api_keys"' not in config
    with serving_app.client() as anon:
        r = anon.get("/health/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    assert all(check["ok"] for check in r.json()["checks"].values())
