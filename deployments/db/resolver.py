"""The outcome resolver: at each candle close, score the logged forecasts that have come due.

I/O edge around :mod:`deployments.db.outcomes` (pure scoring), :mod:`deployments.db.due_rows` (its SQL)
and :mod:`deployments.db.live_metrics`.
:class:`OutcomeResolver` holds a bounded candle history per symbol, fed by the engine's market
feed (``add_candles`` once with the warm-up history, then ``on_candle_close`` per closed candle);
each close it selects that symbol's unresolved rows whose window has ended (partial ``*_due``
indexes), resolves them in one vectorised pass, and writes the results back with one
``UPDATE … FROM unnest(…)`` per table. Then it refreshes the rolling live metrics.

PostgreSQL down: nothing is lost — unresolved rows simply wait in the table (and rows still in the
writer's spool wait there); the next close after it is back resolves the backlog, as long as the
candles are still in the history (``history_candles``, 14 days by default; older rows become
``no_data`` rather than a guess). A window with a missing candle waits ``gap_grace_candles`` for
it (deliveries may come late or out of order) before it is written off as a ``gap``.

Run it as a Ray actor with :func:`start_resolver` (one per cluster, named, fractional CPU).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Callable, Mapping, Sequence

import asyncpg

from configs.settings import Settings, scrub
from deployments.db.due_rows import resolve_due_predictions, resolve_due_signals
from deployments.db.insert import UNAVAILABLE, _close_quietly
from deployments.db.live_gauges import LiveGauges, registry_baselines
from deployments.db.live_metrics import Baseline, fetch_live_metrics, latest_version, summarize
from deployments.db.migrate import apply_migrations
from deployments.db.outcomes import CandleHistory
from deployments.db.rows import RANGE_MODEL, SIGNAL_MODEL
from features.costs import Costs

log = logging.getLogger(__name__)

ACTOR_NAME = "outcome_resolver"

class OutcomeResolver:
    """Resolves due predictions and signals at each candle close and keeps live metrics."""

    def __init__(self, settings: Settings, *, database_url: str | None = None,
                 baselines: Callable[[str], Mapping[tuple[str, int], Baseline]]
                 | Mapping[str, Mapping[tuple[str, int], Baseline]] | None = None,
                 history_candles: int = 14 * 288, gap_grace_candles: int = 36,
                 metrics_interval_s: float = 1.0, sweep_interval_s: float | None = None) -> None:
        self.settings = settings
        self.costs = Costs.from_settings(settings)  # the fee profile labels and backtest charge too
        # Rows are resolved when a candle arrives; a row written after its last due candle arrived
        # (the writer batches, a spool replays after an outage, a replay ends) would wait for the
        # next candle. A sweep every ``sweep_interval_s`` resolves those too (None: candles only).
        self.sweep_interval_s = sweep_interval_s
        self._sweeper: asyncio.Task | None = None
        self.database_url = database_url or settings.database_url.get_secret_value()
        if baselines is None:
            baselines = registry_baselines(settings)
        elif isinstance(baselines, Mapping):
            table = dict(baselines)
            baselines = lambda version: table.get(version, {})  # noqa: E731  (a fixed table: tests, tools)
        self.baseline_source = baselines
        self.history_candles = history_candles
        self.instance = secrets.token_hex(8)  # changes when Ray restarts the actor (its history is then empty)
        self.gap_grace_candles = gap_grace_candles
        self.metrics_interval_s = metrics_interval_s
        self.histories: dict[str, CandleHistory] = {}
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._baselines: dict[str, Mapping[tuple[str, int], Baseline]] = {}
        self._metrics: dict[str, Any] = {}
        self._metrics_at = 0.0
        self._deferred: asyncio.Task | None = None
        self._versions_seen: dict[str, dict[str, int]] = {RANGE_MODEL: {}, SIGNAL_MODEL: {}}
        self.resolved = {"predictions": 0, "signals": 0}
        self.postgres_up = False
        self.last_error: str | None = None
        self.last_resolve_at: float | None = None
        self._gauges: LiveGauges | None = None

    # ---- candles -------------------------------------------------------------------------------
    def _history(self, symbol: str) -> CandleHistory:
        return self.histories.setdefault(symbol, CandleHistory(self.history_candles))

    async def add_candles(self, symbol: str, open_time: Sequence[int], high: Sequence[float],
                          low: Sequence[float], close: Sequence[float]) -> int:
        """Load history (start-up, the feed's warm-up window) without resolving; returns candles added."""
        return self._history(symbol).extend(open_time, high, low, close)

    @property
    def market_time(self) -> int | None:
        """Latest candle open time seen on any symbol: the clock of the metric windows."""
        times = [h.last_open_time for h in self.histories.values() if h.last_open_time is not None]
        return max(times) if times else None

    async def on_candles(self, symbol: str, open_time: Sequence[int], high: Sequence[float],
                         low: Sequence[float], close: Sequence[float]) -> dict[str, int]:
        """Candles closed (one, or several when the feed ran ahead): add them, resolve what came due
        for ``symbol``, refresh the live metrics."""
        if self.sweep_interval_s and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._history(symbol).extend(open_time, high, low, close)
        counts = await self.resolve(symbol)
        await self.refresh_metrics()
        return {**counts, "history": len(self.histories[symbol]), "instance": self.instance}

    async def on_candle_close(self, symbol: str, open_time: int, high: float, low: float, close: float,
                              ) -> dict[str, int]:
        """One candle closed (see :meth:`on_candles`); returns rows resolved and the history length."""
        return await self.on_candles(symbol, [open_time], [high], [low], [close])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s or 5.0)
            try:
                if any((await self.resolve()).values()):
                    await self.refresh_metrics()
            except asyncio.CancelledError:
                raise
            except Exception:  # the sweep must outlive any one failure
                log.exception("outcome resolver sweep")

    # ---- resolution ----------------------------------------------------------------------------
    async def resolve(self, symbol: str | None = None) -> dict[str, int]:
        """Resolve every due row of ``symbol`` (all symbols if None); PostgreSQL down -> zeros."""
        counts = {"predictions": 0, "signals": 0}
        symbols = [symbol] if symbol is not None else list(self.histories)
        opts = {"gap_grace_candles": self.gap_grace_candles, "timeout": self.settings.db_timeout_s}
        async with self._lock:
            conn = await self._connection()
            if conn is None:
                return counts
            try:
                for sym in symbols:
                    hist = self.histories.get(sym)
                    if hist is None or hist.last_open_time is None:
                        continue
                    counts["predictions"] += await resolve_due_predictions(conn, sym, hist, **opts)
                    counts["signals"] += await resolve_due_signals(conn, sym, hist, self.costs, **opts)
            except UNAVAILABLE as exc:
                await self._drop_connection(exc)
        for k, v in counts.items():
            self.resolved[k] += v
        self.last_resolve_at = time.time()
        return counts

    # ---- live metrics --------------------------------------------------------------------------
    async def refresh_metrics(self, force: bool = False) -> dict[str, Any]:
        """Recompute the rolling metrics (at most every ``metrics_interval_s`` unless forced)."""
        now = self.market_time
        if now is None:
            return self._metrics
        wait = self.metrics_interval_s - (time.monotonic() - self._metrics_at)
        if not force and wait > 0:
            # Throttled: refresh once the interval is over, so the figures never stay behind the
            # last resolution (e.g. after the final candle of a burst).
            if self._deferred is None or self._deferred.done():
                self._deferred = asyncio.get_running_loop().create_task(self._refresh_later(wait))
            return self._metrics
        async with self._lock:
            conn = await self._connection()
            if conn is None:
                return self._metrics
            try:
                pred_rows, sig_rows = await fetch_live_metrics(conn, now, self.settings.db_timeout_s)
                seen = await conn.fetch(
                    "SELECT 'p' AS k, model_version, max(candle_open_time) AS t FROM ml.prediction_logs "
                    "WHERE mae IS NOT NULL GROUP BY model_version UNION ALL "
                    "SELECT 's', model_version, max(candle_open_time) FROM ml.signal_logs "
                    "WHERE outcome IS NOT NULL GROUP BY model_version", timeout=self.settings.db_timeout_s)
            except UNAVAILABLE as exc:
                await self._drop_connection(exc)
                return self._metrics
        for r in seen:
            self._versions_seen[RANGE_MODEL if r["k"] == "p" else SIGNAL_MODEL][r["model_version"]] = int(r["t"])
        for v in {r["model_version"] for r in pred_rows}:
            if v not in self._baselines:
                try:
                    self._baselines[v] = self.baseline_source(v)
                except Exception as exc:  # unknown version, unreadable metadata: no baseline, said so
                    log.warning("resolver: no walk-forward baseline for %s %s: %s", RANGE_MODEL, v, exc)
                    self._baselines[v] = {}
        s = self.settings
        summary = summarize(pred_rows, sig_rows, self._baselines, drift_margin=s.drift_mae_margin,
                            drift_min_samples=s.drift_min_samples, drift_window=s.drift_window)
        self._metrics = {"market_time": now, "models": summary,
                         "current": {m: latest_version(v) for m, v in self._versions_seen.items()}}
        self._metrics_at = time.monotonic()
        if self._gauges is None:
            self._gauges = LiveGauges.create()
        if self._gauges is not None:
            self._gauges.export(self._metrics)
        return self._metrics

    async def _refresh_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.refresh_metrics(force=True)
        except Exception:  # a view; the next close refreshes again
            log.exception("resolver: deferred metrics refresh failed")

    async def live_metrics(self) -> dict[str, Any]:
        """For ``/models/status``: per model and version, the 24 h / 7 d / all figures and drift."""
        return self._metrics

    async def drift(self) -> dict[str, Any]:
        """For ``/health/detailed``: the drift verdict of the serving range-predictor version."""
        current = self._metrics.get("current", {}).get(RANGE_MODEL)
        verdict = self._metrics.get("models", {}).get(RANGE_MODEL, {}).get(current, {}).get("drift") \
            if current else None
        return {"model_name": RANGE_MODEL, "version": current, "drift": bool(verdict and verdict["flag"]),
                "detail": verdict}

    async def status(self) -> dict[str, Any]:
        return {"postgres": "up" if self.postgres_up else "down", "last_error": self.last_error,
                "resolved": dict(self.resolved), "market_time": self.market_time,
                "history_candles": {s: len(h) for s, h in self.histories.items()},
                "last_resolve_at": self.last_resolve_at}

    # ---- connection ----------------------------------------------------------------------------
    async def _connection(self) -> asyncpg.Connection | None:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        timeout = self.settings.db_timeout_s
        try:
            conn = await asyncpg.connect(self.database_url, timeout=timeout, command_timeout=timeout)
            await apply_migrations(conn)
        except Exception as exc:
            self.postgres_up = False
            self.last_error = scrub(f"{type(exc).__name__}: {exc}", self.database_url)
            return None
        self._conn, self.postgres_up = conn, True
        return conn

    async def _drop_connection(self, exc: BaseException) -> None:
        self.postgres_up = False
        self.last_error = scrub(f"{type(exc).__name__}: {exc}", self.database_url)
        log.warning("resolver: PostgreSQL unavailable (%s); rows wait for the next close", self.last_error)
        if self._conn is not None:
            await _close_quietly(self._conn)
        self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            await _close_quietly(self._conn)
            self._conn = None


def start_resolver(settings: Settings, *, name: str = ACTOR_NAME, namespace: str | None = None,
                   detached: bool = True, **kwargs: Any):
    """The cluster's resolver actor (created, or the running one if it exists), on a fraction of a CPU.

    Detached by default, so it outlives the deployment that started it: a Serve redeploy does not
    lose its candle history. Restarted by Ray if it dies; the feed's history (``add_candles``)
    refills it.
    """
    import ray

    kwargs.setdefault("sweep_interval_s", 5.0)
    actor = ray.remote(num_cpus=0.05, max_restarts=-1, max_concurrency=64)(OutcomeResolver)
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return actor.options(**options).remote(settings, **kwargs)
