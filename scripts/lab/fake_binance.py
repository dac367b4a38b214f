"""A fake Binance spot REST server on loopback, serving real candles, for tests and drills.

Why a real HTTP server and not a mocked client: the code under test talks to Binance through
python-binance and ``requests``; only a real socket exercises URL building, query encoding,
status codes, headers (``Retry-After``) and JSON parsing the way production does.

Usage::

    with FakeBinance({"BTCUSDT": candles}, interval="5m") as fake:
        fake.inject(429, retry_after=1)          # the next klines request gets a 429
        download_klines(..., base_url=fake.base_url)
        assert fake.klines_requests()[1].params["startTime"] == ...

The server runs aiohttp on its own event loop in a background thread. aiohttp (rather than
``http.server``) so a kline websocket stream can be added later as one more route: override
:meth:`FakeBinance.routes` (or add to it) and push messages from test code with
:meth:`FakeBinance.run_coroutine`; :meth:`FakeBinance.add_candles` appends candles while running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from aiohttp import web

from features.candles import validate_candles

INTERVAL_MS: dict[str, int] = {
    "1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
    "1h": 3_600_000, "2h": 7_200_000, "4h": 14_400_000, "6h": 21_600_000, "8h": 28_800_000,
    "12h": 43_200_000, "1d": 86_400_000,
}
KLINES_PATH = "/api/v3/klines"
# Request weight per endpoint (Binance spot API docs); the fake counts it per window like the exchange.
WEIGHTS: dict[str, int] = {"/api/v3/klines": 2, "/api/v3/time": 1, "/api/v3/ping": 1, "/api/v3/exchangeInfo": 20}
MAX_COMBINED_STREAMS = 1024  # streams one combined connection may carry
MAX_LIMIT = 1000
DEFAULT_LIMIT = 500

# Binance's own error bodies, so client code sees the JSON it would see in production.
_ERROR_BODIES: dict[int, dict[str, Any]] = {
    400: {"code": -1100, "msg": "Illegal characters found in a parameter."},
    418: {"code": -1003, "msg": "Way too much request weight used; IP banned."},
    429: {"code": -1003, "msg": "Too much request weight used; please use the websocket for live "
                                "updates to avoid polling the API."},
    500: {"code": -1001, "msg": "Internal error; unable to process your request. Please try again."},
    502: {"code": -1001, "msg": "Bad gateway."},
    503: {"code": -1008, "msg": "Service Unavailable."},
    504: {"code": -1007, "msg": "Timeout waiting for response from backend server."},
}

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA_DIR = Path(os.environ.get("MLE_SHARED_DATA_DIR") or (REPO_ROOT.parent / "shared" / "data" if (
    REPO_ROOT.parent / "shared" / "data").exists() else "/work/shared/data"))
SAMPLE_DATA_DIR = Path(os.environ.get("MLE_SAMPLE_DATA_DIR", REPO_ROOT / "data" / "sample"))


# --------------------------------------------------------------------------------------------
# Test data: real candles when available
# --------------------------------------------------------------------------------------------

def synthetic_candles(count: int, start_ms: int = 1_704_067_200_000, interval: str = "5m",
                      seed: int = 7, price: float = 42_000.0) -> pd.DataFrame:
    """A deterministic random-walk series in the schema, for machines without real data."""
    rng = np.random.default_rng(seed)
    close = np.round(price * np.exp(np.cumsum(rng.normal(0, 0.002, count))), 2)
    open_ = np.round(np.concatenate([[price], close[:-1]]), 2)
    wick = np.abs(rng.normal(0, 0.001, (2, count))) * close
    return pd.DataFrame({
        "open_time": start_ms + np.arange(count, dtype=np.int64) * INTERVAL_MS[interval],
        "open": open_,
        "high": np.round(np.maximum(open_, close) + wick[0], 2),
        "low": np.round(np.minimum(open_, close) - wick[1], 2),
        "close": close,
        "volume": np.round(rng.gamma(2.0, 50.0, count), 5),
    })


def load_test_candles(symbol: str = "BTCUSDT", count: int = 3000,
                      start: str | int | None = None) -> pd.DataFrame:
    """``count`` consecutive 5-minute candles of ``symbol`` from ``start`` (default: the first).

    Real data first (``/work/shared/data`` or ``$MLE_SHARED_DATA_DIR``, then ``data/sample``), a
    synthetic series only when neither has ``count`` candles, so CI machines without the shared
    data still run.
    """
    for directory in (SHARED_DATA_DIR, SAMPLE_DATA_DIR):
        path = directory / f"{symbol}_5m.parquet"
        if path.exists():
            df = pd.read_parquet(path)
            if len(df) < count:
                continue  # too short for the caller's page arithmetic
            if start is not None:
                start_ms = int(pd.Timestamp(start, tz="UTC").value // 1_000_000) \
                    if isinstance(start, str) else int(start)
                later = df[df["open_time"] >= start_ms]
                df = later if len(later) >= count else df  # sample files may not reach `start`
            return validate_candles(df.head(count))
    return synthetic_candles(count)


# --------------------------------------------------------------------------------------------
# Records and injections
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered; ``at`` is ``time.monotonic()`` on arrival."""

    method: str
    path: str
    params: dict[str, str]
    status: int
    at: float
    injected: bool

    def int_param(self, name: str) -> int | None:
        """An integer query parameter (``startTime``, ``endTime``, ``limit``) or None."""
        value = self.params.get(name)
        return int(value) if value is not None else None


@dataclass(frozen=True)
class Injection:
    """A canned response to serve instead of the real one.

    ``path`` limits it to one endpoint (None: any); ``match`` to requests whose query params
    satisfy it. ``disconnect`` drops the connection without a response (a network error).
    """

    status: int = 500
    body: Any = None  # dict/list → JSON, str → text; None → Binance's error body for ``status``
    headers: Mapping[str, str] = field(default_factory=dict)
    path: str | None = KLINES_PATH
    match: Callable[[Mapping[str, str]], bool] | None = None
    delay_s: float = 0.0
    disconnect: bool = False

    def applies_to(self, path: str, params: Mapping[str, str]) -> bool:
        return (self.path is None or self.path == path) and (self.match is None or self.match(params))


def _fmt_decimal(x: float) -> str:
    """Binance's 8-decimal string when it is exact, else the shortest exact repr.

    Exactness matters: tests assert the downloaded file equals the source bit for bit.
    """
    s = f"{x:.8f}"
    return s if float(s) == x else repr(float(x))


def _binance_error(status: int, code: int, msg: str) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=status)


def _limited(status: int, retry_after_s: float, header: str, used: int) -> web.Response:
    """Binance's 429 (over the weight limit) or 418 (banned for not backing off), with Retry-After."""
    import math

    return web.json_response(_ERROR_BODIES[status], status=status,
                             headers={"Retry-After": str(max(1, math.ceil(retry_after_s))), header: str(used)})


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

class FakeBinance:
    """Fake Binance spot REST API on 127.0.0.1 serving the given candles.

    Endpoints: ``GET /api/v3/ping``, ``/api/v3/time`` (``server_time_ms``, the exchange's clock),
    ``/api/v3/exchangeInfo`` (minimal) and ``/api/v3/klines`` with Binance's semantics
    (``startTime``/``endTime`` inclusive on open time, ``limit`` default 500, max 1000; only
    ``endTime`` → the last ``limit`` candles up to it). Candles missing ``quote_volume``/``trades``
    get deterministic ones (see :meth:`candles`).

    Like the real exchange, klines are what exists at the server's time: candles that open later are
    not served, and the candle open at that time is served as it stands then -- the open price, a
    close, high, low and volume part of the way to the final ones (:func:`partial_candle`), the close
    time still ahead. A client that takes it for closed stores a candle that never existed.
    """

    def __init__(self, candles: Mapping[str, pd.DataFrame], interval: str = "5m", *,
                 host: str = "127.0.0.1", port: int = 0,
                 server_time_ms: Callable[[], int] | None = None, weight_limit: int = 6000,
                 weight_interval: str = "1M") -> None:
        if interval not in INTERVAL_MS:
            raise ValueError(f"unsupported interval {interval!r}")
        self.interval = interval
        self.interval_ms = INTERVAL_MS[interval]
        self.host = host
        self._requested_port = port
        self._server_time_ms = server_time_ms or (lambda: int(time.time() * 1000))
        self._lock = threading.Lock()
        self._candles: dict[str, pd.DataFrame] = {}
        self._open_times: dict[str, np.ndarray] = {}
        for symbol, df in candles.items():
            self._set_candles(symbol, self._normalise(df))
        self._injections: list[Injection] = []
        self._log: list[RecordedRequest] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        # Kline websocket: open connections per stream name ("btcusdt@kline_5m").
        self._ws_conns: dict[str, list[tuple[web.WebSocketResponse, web.Request]]] = {}
        self._combined: set[int] = set()  # ids of combined-stream connections (their messages are wrapped)
        self._ws_refuse = False
        self._ws_connects: list[str] = []
        self._ws_handshakes: list[int] = []  # streams per accepted connection, in order
        # Request weight per IP and window, as Binance counts it (``X-MBX-USED-WEIGHT-<interval>``).
        self.weight_limit = int(weight_limit)
        self.weight_interval = weight_interval
        self.weight_window_ms = int(weight_interval[:-1]) * {"S": 1000, "M": 60_000}[weight_interval[-1].upper()]
        self._weight: tuple[int, int] = (-1, 0)  # (window, used)
        self._blocked_until_ms = 0.0  # after a 429: until Retry-After; a request before then gets 418
        self.weight_log: list[tuple[int, int]] = []  # (window, used after the request) per counted request
        self.rate_limited = 0  # 429s answered
        self.banned = 0        # 418s answered (requests sent while told to wait)

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> "FakeBinance":
        """Start serving on a free loopback port (blocks until it accepts connections)."""
        if self._thread is not None:
            raise RuntimeError("FakeBinance already started")
        self._loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fake-binance",
                                        daemon=True)
        self._thread.start()
        self._port = ready.result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop serving and join the thread; safe to call twice."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> "FakeBinance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeBinance not started")
        return self._port

    @property
    def base_url(self) -> str:
        """Root URL to hand to the client, e.g. ``http://127.0.0.1:41234`` (no ``/api``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop (for scheduling work such as websocket pushes)."""
        if self._loop is None:
            raise RuntimeError("FakeBinance not started")
        return self._loop

    def run_coroutine(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run ``coro`` on the server's loop from test code (thread-safe)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            port = loop.run_until_complete(self._start_site())
        except BaseException as exc:  # report startup failures to start(), don't hang it
            ready.set_exception(exc)
            loop.close()
            return
        ready.set_result(port)
        try:
            loop.run_forever()
        finally:
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _start_site(self) -> int:
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port)
        await site.start()
        return int(self._runner.addresses[0][1])

    def routes(self) -> list[web.RouteDef]:
        """The served routes; extend this (e.g. a kline websocket) in a subclass."""
        return [
            web.get("/api/v3/ping", self._ping),
            web.get("/api/v3/time", self._time),
            web.get("/api/v3/exchangeInfo", self._exchange_info),
            web.get(KLINES_PATH, self._klines),
            web.get("/ws/{stream}", self._kline_ws),
            web.get("/stream", self._combined_ws),
        ]

    # ---- data ----------------------------------------------------------------------------

    def _normalise(self, df: pd.DataFrame) -> pd.DataFrame:
        """Validate and complete the columns Binance sends (quote volume, trades, taker volumes)."""
        out = validate_candles(df, self.interval_ms)
        if "quote_volume" not in out.columns:
            typical = (out["open"] + out["high"] + out["low"] + out["close"]) / 4
            out["quote_volume"] = np.round(out["volume"] * typical, 8)
        if "trades" not in out.columns:
            out["trades"] = np.where(out["volume"] > 0, np.ceil(out["volume"] * 3) + 1, 0).astype(float)
        return out.reset_index(drop=True)

    def _set_candles(self, symbol: str, df: pd.DataFrame) -> None:
        self._candles[symbol] = df
        self._open_times[symbol] = df["open_time"].to_numpy(dtype=np.int64)

    def candles(self, symbol: str) -> pd.DataFrame:
        """What the server serves for ``symbol``: schema columns incl. quote_volume and trades."""
        with self._lock:
            return self._candles[symbol].copy()

    def add_candles(self, symbol: str, df: pd.DataFrame) -> None:
        """Append candles (newer than the served ones) while running, e.g. to simulate time."""
        with self._lock:
            base = self._candles.get(symbol)
            new = self._normalise(df)
            merged = new if base is None else self._normalise(pd.concat([base, new[base.columns]]))
            self._set_candles(symbol, merged)

    @property
    def symbols(self) -> list[str]:
        with self._lock:
            return sorted(self._candles)

    # ---- fault injection and request log -------------------------------------------------

    def inject(self, status: int = 500, *, times: int = 1, retry_after: float | None = None,
               body: Any = None, headers: Mapping[str, str] | None = None,
               path: str | None = KLINES_PATH, match: Callable[[Mapping[str, str]], bool] | None = None,
               delay_s: float = 0.0, disconnect: bool = False) -> None:
        """Queue ``times`` canned responses; each matching request consumes the first one queued.

        ``retry_after`` sets the ``Retry-After`` header (seconds), as Binance does on 429/418.
        """
        hdrs = dict(headers or {})
        if retry_after is not None:
            hdrs["Retry-After"] = f"{retry_after:g}"
        inj = Injection(status, body, hdrs, path, match, delay_s, disconnect)
        with self._lock:
            self._injections.extend([inj] * times)

    def clear_injections(self) -> None:
        with self._lock:
            self._injections.clear()

    @property
    def pending_injections(self) -> int:
        with self._lock:
            return len(self._injections)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request answered so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._log)

    def klines_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == KLINES_PATH]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    def _take_injection(self, path: str, params: Mapping[str, str]) -> Injection | None:
        with self._lock:
            for i, inj in enumerate(self._injections):
                if inj.applies_to(path, params):
                    return self._injections.pop(i)
        return None

    def _record(self, request: web.Request, status: int, at: float, injected: bool) -> None:
        rec = RecordedRequest(request.method, request.path, dict(request.query), status, at, injected)
        with self._lock:
            self._log.append(rec)

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        at = time.monotonic()
        inj = self._take_injection(request.path, request.query)
        if inj is not None:
            if inj.delay_s:
                await asyncio.sleep(inj.delay_s)
            self._record(request, 0 if inj.disconnect else inj.status, at, True)
            if inj.disconnect:
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError  # nothing more to send on a closed connection
            return self._injected_response(inj)
        limited = self._count_weight(request.path)
        if limited is not None:
            self._record(request, limited.status, at, False)
            return limited
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self._record(request, exc.status, at, False)
            raise
        self._record(request, response.status, at, False)
        if request.path in WEIGHTS:
            response.headers[self.weight_header] = str(self._weight[1])
        return response

    # ---- request weight ------------------------------------------------------------------

    @property
    def weight_header(self) -> str:
        return f"X-MBX-USED-WEIGHT-{self.weight_interval.upper()}"

    def _count_weight(self, path: str) -> web.Response | None:
        """Add the request's weight to its window; over the limit: 429 with Retry-After until the
        window ends, and 418 for a request sent before that Retry-After has passed."""
        weight = WEIGHTS.get(path)
        if weight is None:
            return None
        now = int(self._server_time_ms())
        window = now // self.weight_window_ms
        with self._lock:
            if now < self._blocked_until_ms:
                self.banned += 1
                return _limited(418, (self._blocked_until_ms - now) / 1000 * 2, self.weight_header, self._weight[1])
            used = self._weight[1] if self._weight[0] == window else 0
            if used + weight > self.weight_limit:
                self.rate_limited += 1
                self._blocked_until_ms = (window + 1) * self.weight_window_ms
                return _limited(429, (self._blocked_until_ms - now) / 1000, self.weight_header, used)
            self._weight = (window, used + weight)
            self.weight_log.append(self._weight)
        return None

    @staticmethod
    def _injected_response(inj: Injection) -> web.Response:
        body = inj.body if inj.body is not None else _ERROR_BODIES.get(
            inj.status, {"code": -1000, "msg": f"An unknown error occurred (fake HTTP {inj.status})."})
        if isinstance(body, str):
            return web.Response(status=inj.status, text=body, headers=dict(inj.headers))
        return web.json_response(body, status=inj.status, headers=dict(inj.headers))

    # ---- kline websocket ----------------------------------------------------------------
    # Binance's ``wss://stream.binance.com:9443/ws/<symbol>@kline_<interval>``: the server pushes a
    # kline message on every trade, ``k.x`` true once the candle has closed. Test code decides what
    # is sent and when (``push_kline``), and can drop every connection (``drop_websockets``) or
    # refuse new ones for a while (``refuse_websockets``) to simulate an outage.

    def stream_name(self, symbol: str) -> str:
        return f"{symbol.lower()}@kline_{self.interval}"

    def kline_message(self, symbol: str, candle: Mapping[str, Any], closed: bool,
                      event_time_ms: int | None = None) -> dict[str, Any]:
        """A Binance kline stream message for ``candle`` (open_time, open, high, low, close, volume)."""
        t = int(candle["open_time"])
        vol = float(candle["volume"])
        return {
            "e": "kline", "E": int(event_time_ms if event_time_ms is not None else self._server_time_ms()),
            "s": symbol,
            "k": {"t": t, "T": t + self.interval_ms - 1, "s": symbol, "i": self.interval, "f": 0, "L": 0,
                  "o": _fmt_decimal(float(candle["open"])), "c": _fmt_decimal(float(candle["close"])),
                  "h": _fmt_decimal(float(candle["high"])), "l": _fmt_decimal(float(candle["low"])),
                  "v": _fmt_decimal(vol), "n": 1, "x": bool(closed), "q": "0", "V": "0", "Q": "0", "B": "0"},
        }

    def push_kline(self, symbol: str, candle: Mapping[str, Any], closed: bool, timeout: float = 5.0) -> int:
        """Send a kline message to every open connection of ``symbol``; returns how many got it."""
        msg = self.kline_message(symbol, candle, closed)
        return self.run_coroutine(self._broadcast(self.stream_name(symbol), msg)).result(timeout)

    def push_klines(self, candles: Mapping[str, Mapping[str, Any]], closed: bool, timeout: float = 10.0) -> int:
        """:meth:`push_kline` for many symbols at once (one trip to the server's loop)."""
        async def push_all() -> int:
            sent = 0
            for symbol, candle in candles.items():
                sent += await self._broadcast(self.stream_name(symbol), self.kline_message(symbol, candle, closed))
            return sent

        return self.run_coroutine(push_all()).result(timeout)

    async def _broadcast(self, stream: str, msg: dict[str, Any]) -> int:
        sent = 0
        for ws, _ in list(self._ws_conns.get(stream, [])):
            if not ws.closed:
                await ws.send_json({"stream": stream, "data": msg} if id(ws) in self._combined else msg)
                sent += 1
        return sent

    def drop_websockets(self, symbol: str | None = None, timeout: float = 5.0) -> int:
        """Cut every open kline connection (of ``symbol``) without a close frame, like a network drop."""
        return self.run_coroutine(self._drop(symbol)).result(timeout)

    async def _drop(self, symbol: str | None) -> int:
        dropped: set[int] = set()  # a combined connection carries many streams: cut it once
        for stream, conns in self._ws_conns.items():
            if symbol is not None and stream != self.stream_name(symbol):
                continue
            for ws, request in list(conns):
                if request.transport is not None and id(ws) not in dropped:
                    request.transport.abort()
                    dropped.add(id(ws))
            conns.clear()
        return len(dropped)

    def refuse_websockets(self, refuse: bool = True) -> None:
        """While true, websocket handshakes get HTTP 503 (the exchange's stream is down)."""
        self._ws_refuse = refuse

    def ws_connections(self, symbol: str) -> int:
        return sum(1 for ws, _ in self._ws_conns.get(self.stream_name(symbol), []) if not ws.closed)

    @property
    def ws_connects(self) -> list[str]:
        """Stream names of every accepted websocket handshake, in order."""
        with self._lock:
            return list(self._ws_connects)

    def wait_for_ws(self, symbol: str, connects: int = 1, timeout: float = 20.0) -> None:
        """Block until ``symbol``'s stream has been connected ``connects`` times in total and is open."""
        deadline = time.monotonic() + timeout
        stream = self.stream_name(symbol)
        while time.monotonic() < deadline:
            if self.ws_connects.count(stream) >= connects and self.ws_connections(symbol) > 0:
                return
            time.sleep(0.02)
        raise TimeoutError(f"{stream}: {self.ws_connects.count(stream)} connects, wanted {connects}")

    async def _kline_ws(self, request: web.Request) -> web.StreamResponse:
        stream = request.match_info["stream"]
        if self._ws_refuse:
            return _binance_error(503, -1008, "Service Unavailable.")
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        with self._lock:
            self._ws_connects.append(stream)
            self._ws_handshakes.append(1)
        self._ws_conns.setdefault(stream, []).append((ws, request))
        try:
            async for _ in ws:  # clients send nothing that matters (pongs are handled by aiohttp)
                pass
        finally:
            conns = self._ws_conns.get(stream, [])
            if (ws, request) in conns:
                conns.remove((ws, request))
        return ws

    async def _combined_ws(self, request: web.Request) -> web.StreamResponse:
        """``/stream?streams=a@kline_5m/b@kline_5m``: one connection for many streams; messages are
        wrapped as ``{"stream": name, "data": message}``, as Binance's combined streams are."""
        streams = [s for s in request.query.get("streams", "").split("/") if s]
        if self._ws_refuse:
            return _binance_error(503, -1008, "Service Unavailable.")
        if not streams or len(streams) > MAX_COMBINED_STREAMS:
            return _binance_error(400, -1100, f"streams: 1..{MAX_COMBINED_STREAMS} names")
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        with self._lock:
            self._ws_connects.extend(streams)
            self._ws_handshakes.append(len(streams))
        entry = (ws, request)
        for stream in streams:
            self._ws_conns.setdefault(stream, []).append(entry)
        self._combined.add(id(ws))
        try:
            async for _ in ws:
                pass
        finally:
            self._combined.discard(id(ws))
            for stream in streams:
                conns = self._ws_conns.get(stream, [])
                if entry in conns:
                    conns.remove(entry)
        return ws

    @property
    def ws_handshakes(self) -> list[int]:
        """Streams per accepted websocket connection (1 for a ``/ws/<stream>`` one), in order."""
        with self._lock:
            return list(self._ws_handshakes)

    # ---- handlers ------------------------------------------------------------------------

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _time(self, request: web.Request) -> web.Response:
        return web.json_response({"serverTime": self._server_time_ms()})

    async def _exchange_info(self, request: web.Request) -> web.Response:
        wanted = request.query.get("symbol")
        symbols = self.symbols
        if wanted is not None:
            if wanted not in symbols:
                return _binance_error(400, -1121, "Invalid symbol.")
            symbols = [wanted]
        return web.json_response({
            "timezone": "UTC",
            "serverTime": self._server_time_ms(),
            "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE",
                            "intervalNum": 1, "limit": 6000}],
            "exchangeFilters": [],
            "symbols": [_symbol_info(s) for s in symbols],
        })

    async def _klines(self, request: web.Request) -> web.Response:
        q = request.query
        for name in ("symbol", "interval"):
            if not q.get(name):
                return _binance_error(400, -1102, f"Mandatory parameter '{name}' was not sent, "
                                                  "was empty/null, or malformed.")
        if q["interval"] != self.interval:
            return _binance_error(400, -1120, f"Invalid interval. (fake serves only {self.interval})")
        try:
            limit = int(q.get("limit", DEFAULT_LIMIT))
            start = int(q["startTime"]) if "startTime" in q else None
            end = int(q["endTime"]) if "endTime" in q else None
        except ValueError:
            return _binance_error(400, -1100, "Illegal characters found in a parameter.")
        if not 1 <= limit <= MAX_LIMIT:
            return _binance_error(400, -1130, "Invalid data sent for a parameter.")
        with self._lock:
            if q["symbol"] not in self._candles:
                return _binance_error(400, -1121, "Invalid symbol.")
            df, t = self._candles[q["symbol"]], self._open_times[q["symbol"]]
        now = int(self._server_time_ms())
        visible = int(np.searchsorted(t, now, side="right"))  # candles opened by the server's time
        lo, hi = _select(t[:visible], start, end, limit)
        rows = df.iloc[lo:hi]
        if len(rows) and int(rows["open_time"].iloc[-1]) + self.interval_ms > now:
            rows = rows.copy()
            rows.iloc[-1] = partial_candle(rows.iloc[-1], (now - int(rows["open_time"].iloc[-1])) / self.interval_ms)
        return web.json_response(self._kline_rows(rows))

    def _kline_rows(self, df: pd.DataFrame) -> list[list[Any]]:
        """Binance's 12-field layout: times and trade count as ints, every decimal as a string."""
        rows = []
        for r in df.itertuples(index=False):
            vol, qvol = float(r.volume), float(r.quote_volume)
            rows.append([
                int(r.open_time), _fmt_decimal(r.open), _fmt_decimal(r.high), _fmt_decimal(r.low),
                _fmt_decimal(r.close), _fmt_decimal(vol), int(r.open_time) + self.interval_ms - 1,
                _fmt_decimal(qvol), int(r.trades), _fmt_decimal(round(vol / 2, 8)),
                _fmt_decimal(round(qvol / 2, 8)), "0",
            ])
        return rows


def partial_candle(row: pd.Series, fraction: float) -> pd.Series:
    """A candle ``fraction`` of the way through its interval: the price moved that part of the way
    from open to close, volume and trades that share of the final ones (never equal to the final
    candle unless it is flat and empty)."""
    f = min(max(float(fraction), 0.0), 1.0)
    out = row.copy()
    close = round(float(row["open"]) + (float(row["close"]) - float(row["open"])) * f, 8)
    out["close"] = close
    out["high"] = max(float(row["open"]), close)
    out["low"] = min(float(row["open"]), close)
    for name in ("volume", "quote_volume"):
        out[name] = round(float(row[name]) * f, 8)
    out["trades"] = float(np.floor(float(row["trades"]) * f))
    return out


def _select(open_times: np.ndarray, start: int | None, end: int | None, limit: int) -> tuple[int, int]:
    """Index range Binance would return: inclusive ``start``/``end`` on open time, at most
    ``limit``; oldest first from ``start``, otherwise the newest up to ``end`` (or overall)."""
    hi = len(open_times) if end is None else int(np.searchsorted(open_times, end, side="right"))
    if start is not None:
        lo = int(np.searchsorted(open_times, start, side="left"))
        return lo, max(lo, min(hi, lo + limit))
    return max(0, hi - limit), hi


def _symbol_info(symbol: str) -> dict[str, Any]:
    quote = next((q for q in ("USDT", "USDC", "FDUSD", "BTC", "ETH", "BNB") if symbol.endswith(q)
                  and len(symbol) > len(q)), symbol[-4:])
    return {"symbol": symbol, "status": "TRADING", "baseAsset": symbol[: -len(quote)],
            "quoteAsset": quote, "isSpotTradingAllowed": True, "permissions": ["SPOT"],
            "orderTypes": ["LIMIT", "MARKET"], "filters": []}

