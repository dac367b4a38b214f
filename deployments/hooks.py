"""The hook through which served forecasts and API requests are logged (PostgreSQL, issue 6).

Serving calls a :class:`ServingLog` at these points and nowhere else:

- ``candle_closed(forecasts)`` in the EnsembleRouter, after a candle's forecasts (every symbol x
  horizon it computed) are written to Redis and published: the prediction/signal log rows;
- ``request_served(record, forecast)`` in the API ingress, after every /predictions and /signals
  response (cached or computed), so requests can be audited and served forecasts tied to them;
- ``candles_closed(event, window)`` in each MarketData actor, for every candle event the graph took
  (the outcome resolver scores logged forecasts against these candles), with the symbol's
  :class:`~deployments.feed.CandleWindow` -- the engine's one candle history, which a restarted
  resolver is refilled from; ``live_metrics()`` adds the rolling live accuracy to ``/models/status``.

The logging calls are synchronous and must not block or raise: an implementation enqueues and writes in the
background (batching, spooling to disk while PostgreSQL is down). ``start()`` runs once in the
replica's event loop, ``health()`` feeds ``/health/detailed``'s ``database`` entry and ``close()``
flushes at shutdown. The implementation is chosen by ``Settings.serving_log`` ("module:factory",
called with the Settings and the role, "router", "ingress" or "feed"); empty means :class:`NullServingLog`.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

from configs.settings import Settings
from configs.errors import ConfigError
from inference.forecast import Forecast

log = logging.getLogger(__name__)

Role = Literal["router", "ingress", "feed"]


@dataclass(frozen=True)
class RequestRecord:
    """One answered API request (the API key is identified by its id, never by its value)."""

    at: float                 # time.time() when the request arrived
    endpoint: str             # "/predictions" | "/signals"
    key_id: str
    symbol: str
    horizon: int
    status: int
    latency_s: float
    source: str               # "cache" | "computed"
    candle_open_time: int | None


class ServingLog(Protocol):
    async def start(self) -> None: ...

    def candle_closed(self, forecasts: Sequence[Forecast]) -> None: ...

    def request_served(self, record: RequestRecord, forecast: Forecast | None) -> None: ...

    def candles_closed(self, event: Any, window: Any | None = None) -> None: ...

    async def live_metrics(self) -> dict[str, Any]: ...

    async def health(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class NullServingLog:
    """Logs nothing (no log configured); health says so."""

    async def start(self) -> None:
        return None

    def candle_closed(self, forecasts: Sequence[Forecast]) -> None:
        return None

    def request_served(self, record: RequestRecord, forecast: Forecast | None) -> None:
        return None

    def candles_closed(self, event: Any, window: Any | None = None) -> None:
        return None

    async def live_metrics(self) -> dict[str, Any]:
        return {"status": "not_configured", "detail": "Settings.serving_log is empty: no live accuracy"}

    async def health(self) -> dict[str, Any]:
        return {"status": "not_configured", "detail": "Settings.serving_log is empty: forecasts are not logged"}

    async def close(self) -> None:
        return None


def load_serving_log(settings: Settings, role: Role) -> ServingLog:
    """Build the configured :class:`ServingLog` (``Settings.serving_log = "module:factory"``)."""
    spec = settings.serving_log.strip()
    if not spec:
        return NullServingLog()
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"serving_log: {spec!r} is not 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"serving_log: cannot import {spec!r}: {exc}") from None
    return factory(settings, role)


class JsonLinesServingLog:
    """Appends every hook call as one JSON line to ``spool_dir/serving-{role}.jsonl``.

    For debugging and for the tests that prove the hook is called; the PostgreSQL log of issue 6
    lives in ``deployments/db``. Select it with ``Settings.serving_log =
    "deployments.hooks:JsonLinesServingLog"``.
    """

    def __init__(self, settings: Settings, role: Role) -> None:
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self.path = settings.spool_dir / f"serving-{role}.jsonl"
        self._file = None

    async def start(self) -> None:
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)

    def _write(self, kind: str, payload: dict[str, Any]) -> None:
        import json

        if self._file is not None:
            self._file.write(json.dumps({"kind": kind, **payload}, default=str) + "\n")

    def candle_closed(self, forecasts: Sequence[Forecast]) -> None:
        for f in forecasts:
            self._write("forecast", {"symbol": f.symbol, "horizon": f.horizon, "candle_open_time": f.candle_open_time,
                                     "signal_type": f.signal_type, "model_versions": f.model_versions})

    def request_served(self, record: RequestRecord, forecast: Forecast | None) -> None:
        from dataclasses import asdict

        self._write("request", {**asdict(record), "forecast_candle": getattr(forecast, "candle_open_time", None)})

    def candles_closed(self, event: Any, window: Any | None = None) -> None:
        self._write("candles", {"symbol": event.symbol, "event_kind": event.kind, "count": len(event.open_time),
                                "last_open_time": int(event.open_time[-1])})

    async def live_metrics(self) -> dict[str, Any]:
        return {"status": "not_configured", "detail": "JSON-lines log: outcomes are not resolved"}

    async def health(self) -> dict[str, Any]:
        return {"status": "up", "detail": f"JSON lines in {self.path}"}

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
