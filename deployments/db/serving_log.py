"""The serving log hook (``deployments.hooks.ServingLog``) backed by PostgreSQL.

Enable with ``MLE_SERVING_LOG=deployments.db.serving_log:make_serving_log`` (``make serve`` does).
One instance per replica, by role:

- ``router`` (EnsembleRouter): ``candle_closed(forecasts)`` logs every forecast computed at a candle
  close (prediction + signal rows) through this process's :class:`LogWriter`;
- ``feed`` (each MarketData actor): ``candles_closed(event, window)`` forwards the candles the graph
  took, in order, to the :class:`OutcomeResolver` actor (started here if the cluster has none),
  which resolves what came due; a restarted resolver is refilled from ``window``, the feed's
  :class:`~deployments.feed.CandleWindow` (the engine's one candle history). No writer, no spool;
- ``ingress`` (ApiIngress): ``request_served(record, forecast)`` logs the forecast a request was
  answered with — usually already logged at the close, so it costs a dictionary lookup — and
  ``health()``/``live_metrics()`` ask the resolver for the drift verdict and rolling accuracy.

Nothing here blocks or raises into serving: writes go to the spool, calls to the resolver are
queued (:class:`CandleForwarder`), and health answers with what it knows within its timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Sequence

from configs.settings import Settings
from deployments.db.forwarder import CandleForwarder
from deployments.db.resolver import ACTOR_NAME, start_resolver
from deployments.db.writer import LogWriter
from inference.forecast import Forecast

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 2.5
# How long a rejected row keeps the log's health at "rejected" (someone should look at rejected.log).
REJECTED_ATTENTION_S = 3600.0
# The resolver's namespace, named: otherwise a named actor lands in its creator's job namespace,
# which is anonymous for a driver that called ray.init() without one (the ingress could not find it,
# nor an operator).
RESOLVER_NAMESPACE = "ml-engine"


def resolver_name(settings: Settings) -> str:
    """One resolver per database and resolution settings: an engine pointed at another database, or
    redeployed with other fees, drift rules or model registry, gets its own (the actor is detached
    and keeps the settings it was started with)."""
    key = "|".join(str(x) for x in (settings.database_url.get_secret_value(), settings.models_dir,
                                    settings.fee_profile, settings.fee_rate, settings.slippage_rate,
                                    settings.borrow_rate, settings.drift_mae_margin, settings.drift_min_samples, settings.drift_window))
    return f"{ACTOR_NAME}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class DbServingLog:
    """Prediction/signal logging, outcome resolution and live accuracy for one Serve replica."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.settings = settings
        self.role = role
        self.writer = LogWriter(settings, name=role) if role != "feed" else None
        self.forwarder: CandleForwarder | None = None
        self._windows: dict[str, Any] = {}  # symbol -> the feed's CandleWindow (role feed)
        self._resolver: Any = None
        self._last_live: dict[str, Any] = {}

    async def start(self) -> None:
        if self.writer is not None:
            await asyncio.to_thread(self.writer.start)
        if self.role == "feed":
            self.forwarder = CandleForwarder(self._resolver_handle, retry_s=1.0, history=self._feed_candles)

    def _feed_candles(self, symbol: str) -> list[tuple[int, float, float, float]]:
        """A restarted resolver's refill: the feed's candles of ``symbol`` (nothing copied here)."""
        window = self._windows.get(symbol)
        return window.outcome_candles() if window is not None else []

    # ---- resolver handle -----------------------------------------------------------------------
    def _resolver_handle(self, create: bool | None = None) -> Any:
        """The cluster's resolver (the feed creates it; the ingress only looks it up)."""
        import ray

        create = self.role == "feed" if create is None else create
        name = resolver_name(self.settings)
        if create:
            # Detached: it outlives the graph's processes and redeploys, so its candle history (the
            # last 14 days) survives them; a crash is refilled from the feed's CandleWindow.
            self._resolver = start_resolver(self.settings, name=name, namespace=RESOLVER_NAMESPACE, detached=True)
        else:
            try:
                self._resolver = ray.get_actor(name, namespace=RESOLVER_NAMESPACE)
            except ValueError:
                self._resolver = None
        return self._resolver

    # ---- hook points ---------------------------------------------------------------------------
    def candle_closed(self, forecasts: Sequence[Forecast]) -> None:
        if self.writer is not None:
            self.writer.log_forecasts(forecasts)

    def request_served(self, record: Any, forecast: Forecast | None) -> None:
        if self.writer is not None and forecast is not None and getattr(record, "status", 200) == 200:
            self.writer.log_forecasts((forecast,))

    def candles_closed(self, event: Any, window: Any | None = None) -> None:
        """Closed candles of one symbol the graph took (a MarketData event: history, backfill or live),
        for the resolver; ``window``: the symbol's CandleWindow, read when the resolver restarts."""
        if self.forwarder is None:
            return
        if window is not None:
            self._windows[event.symbol] = window
        try:
            ohlcv = event.ohlcv
            for i, t in enumerate(event.open_time.tolist()):
                self.forwarder.push(event.symbol, t, float(ohlcv[i, 1]), float(ohlcv[i, 2]), float(ohlcv[i, 3]))
        except Exception:  # never into the candle pipeline
            log.exception("serving log: could not queue candles for the resolver")

    # ---- status --------------------------------------------------------------------------------
    async def _ask(self, method: str) -> Any:
        handle = self._resolver or self._resolver_handle(create=False)
        if handle is None:
            raise LookupError("the outcome resolver is not running (the MarketData actors start it with their first candles)")
        return await asyncio.wait_for(getattr(handle, method).remote(), CALL_TIMEOUT_S)

    async def live_metrics(self) -> dict[str, Any]:
        """Rolling live accuracy per model version (24 h, 7 d, all) with the drift verdicts.

        A resolver too busy to answer within the timeout (a backlog after an outage) gets the last
        figures it gave, marked ``stale``, rather than none."""
        try:
            self._last_live = await self._ask("live_metrics")
            return self._last_live
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            if not isinstance(exc, asyncio.TimeoutError):
                self._resolver = None
            if self._last_live:
                return {**self._last_live, "stale": True, "error": error}
            return {"error": error}

    async def health(self) -> dict[str, Any]:
        """``/health/detailed``'s ``database.log``: writer (spool, losses), resolver, drift."""
        if self.writer is None:
            return {"status": "up", "forwarder": {"sent": self.forwarder.sent if self.forwarder else 0}}
        writer = self.writer.status()
        out: dict[str, Any] = {"status": log_status(writer), "writer": writer}
        try:
            out["resolver"] = await self._ask("status")
            out["drift"] = await self._ask("drift")
        except Exception as exc:
            self._resolver = None
            out["resolver"] = {"status": "unknown", "error": f"{type(exc).__name__}: {exc}"[:300]}
            out["drift"] = {"drift": None, "detail": "resolver unreachable"}
        return out

    async def close(self) -> None:
        if self.forwarder is not None:
            try:
                await asyncio.wait_for(self.forwarder.drain(), 5.0)
            except Exception:
                pass
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close, 5.0)


def log_status(writer: dict[str, Any], now: float | None = None) -> str:
    """One word for the log writer, worst first: ``spool_unavailable`` (rows dropped: no spool),
    ``disk_full`` (rows dropped: the disk refused), ``spool_full`` (rows dropped: the node's spool
    bound), ``spooling`` (PostgreSQL down, rows wait on disk), ``rejected`` (rows set aside in
    rejected.log within the last hour), else ``up``. Everything but ``up`` degrades health."""
    spool = writer.get("spool", "ok")
    if spool == "unavailable":
        return "spool_unavailable"
    if spool in ("disk_full", "write_error"):
        return "disk_full" if spool == "disk_full" else "spool_write_error"
    if spool == "full":
        return "spool_full"
    if writer.get("postgres") != "up":
        return "spooling"
    rejected_at = writer.get("last_rejected_at")
    if rejected_at is not None and (now or time.time()) - rejected_at < REJECTED_ATTENTION_S:
        return "rejected"
    return "up"


def make_serving_log(settings: Settings, role: str) -> DbServingLog:
    """``Settings.serving_log`` factory: ``deployments.db.serving_log:make_serving_log``."""
    return DbServingLog(settings, role)
