"""The MarketFeed deployment: owns the MarketData actors (:mod:`deployments.market_data`).

Why a deployment: ``serve deploy`` alone must bring the feed up, and Serve restarts it; it creates
one MarketData actor per ``feed_symbols_per_actor`` symbols on its own node, replaces an actor the
moment it dies (resuming after the newest candle each symbol reported), holds the feed's one
Binance hub, and offers pause / resume / step of a replay to operators and tests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from configs.errors import MarketDataError
from configs.settings import load_settings
from deployments.binance_actor import BinanceHubActor
from deployments.market_data import MarketData, feed_groups

log = logging.getLogger("ray.serve")


@serve.deployment(name="MarketFeed", num_replicas=1, max_ongoing_requests=100,
                  ray_actor_options={"num_cpus": 0.01}, health_check_period_s=10)
class MarketFeed:
    """Owns the MarketData actors, ``feed_symbols_per_actor`` symbols each (they die with this
    replica, e.g. on ``serve shutdown``)."""

    async def __init__(self, router, settings_overrides: dict[str, Any] | None = None) -> None:
        self.router = router
        self.overrides = dict(settings_overrides or {})
        self.settings = load_settings(**self.overrides)
        self.groups = feed_groups(list(self.settings.market.symbols), self.settings.feed_symbols_per_actor)
        self.group_of = {s: g for g, group in enumerate(self.groups) for s in group}
        self.actors: dict[int, Any] = {}
        self.last_seen: dict[str, int] = {}  # newest candle each symbol reported delivered (a resume hint)
        self.respawns: dict[str, int] = {}
        self._watchers: dict[int, asyncio.Task] = {}
        self._lock = asyncio.Lock()
        self.hub = None  # Binance: one hub (combined streams, weight-paced REST) for every symbol
        if self.settings.feed == "binance":
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            self.hub = BinanceHubActor.options(scheduling_strategy=here).remote(
                list(self.settings.market.symbols), self.overrides)
        for g in range(len(self.groups)):
            await self._spawn(g)

    async def _spawn(self, g: int) -> None:
        # On this replica's node (soft: elsewhere if it cannot): the feed then lives and dies with
        # its owner, and a cluster that keeps MarketFeed on the head never loses a feed to a worker
        # node's failure (docs/operations.md, "Several nodes on one machine").
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        group = self.groups[g]
        hints = {s: self.last_seen[s] for s in group if s in self.last_seen}
        actor = MarketData.options(scheduling_strategy=here).remote(group, self.router, self.overrides, hints,
                                                                    self.hub)
        await actor.start.remote()
        self.actors[g] = actor
        self._watchers[g] = asyncio.create_task(self._watch(g, actor))

    async def _watch(self, g: int, actor) -> None:
        """Replace ``actor`` the moment it dies: a call that lasts its lifetime fails then. (The
        health check every 10 s alone would leave the symbols without candles that long, which a
        60x replay turns into 10 minutes of data age.)"""
        try:
            await actor.wait_done.remote()  # returns only when the sources end (finished replays)
        except ray.exceptions.RayActorError:
            await self._replace(g, actor)
        except Exception:  # the health check is the backstop
            log.exception("%s market data watcher", self.groups[g])

    async def _replace(self, g: int, dead) -> None:
        async with self._lock:
            if self.actors.get(g) is not dead:
                return  # already replaced (the watcher and the health check both saw it die)
            group = self.groups[g]
            log.warning("market data actor of %s died; starting another after candles %s", group,
                        {s: self.last_seen.get(s) for s in group})
            for s in group:
                self.respawns[s] = self.respawns.get(s, 0) + 1
            await self._spawn(g)

    def _seen(self, symbol: str, status: dict[str, Any]) -> dict[str, Any]:
        t = status.get("last_delivered_open_time")
        if t is not None:
            self.last_seen[symbol] = max(int(t), self.last_seen.get(symbol, int(t)))
        return status

    def _actor(self, symbol: str):
        if symbol not in self.group_of:
            raise MarketDataError(f"no feed for {symbol}; the engine streams {list(self.group_of)}")
        return self.actors[self.group_of[symbol]]

    async def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for g, actor in list(self.actors.items()):
            try:
                got = await asyncio.wait_for(actor.statuses.remote(), timeout=5)
                out.update({s: self._seen(s, st) for s, st in got.items()})
            except Exception as exc:
                out.update({s: {"state": "unreachable", "error": f"{type(exc).__name__}: {exc}"[:300]}
                            for s in self.groups[g]})
        for s in out:
            out[s]["respawns"] = self.respawns.get(s, 0)
        doc = {"feed": self.settings.feed, "symbols": {s: out[s] for s in self.group_of if s in out}}
        if self.hub is not None:  # connections, reconnects, REST weight used, waits, 429/418s
            try:
                doc["binance"] = await asyncio.wait_for(self.hub.call.remote("status"), timeout=5)
            except Exception as exc:
                doc["binance"] = {"state": "unreachable", "error": f"{type(exc).__name__}: {exc}"[:300]}
        return doc

    async def pause(self, symbol: str | None = None) -> dict[str, Any]:
        symbols = [symbol] if symbol else list(self.group_of)
        return {s: await self._actor(s).pause.remote(s) for s in symbols}

    async def resume(self, symbol: str | None = None) -> dict[str, Any]:
        symbols = [symbol] if symbol else list(self.group_of)
        return {s: await self._actor(s).resume.remote(s) for s in symbols}

    async def step(self, symbol: str, n: int = 1) -> dict[str, Any]:
        return await self._actor(symbol).step.remote(n, 30.0, symbol)

    async def step_all(self, n: int = 1) -> dict[str, Any]:
        """Every symbol's next ``n`` candles at once (a replay's candle close of every symbol);
        returns once the graph has processed them."""
        parts = await asyncio.gather(*(a.step_all.remote(n) for a in self.actors.values()))
        return {s: st for part in parts for s, st in part.items()}

    async def check_health(self) -> None:
        """Restart a dead MarketData actor (Serve calls this every ``health_check_period_s``)."""
        for g, actor in list(self.actors.items()):
            try:
                got = await asyncio.wait_for(actor.statuses.remote(), timeout=10)
                for s, st in got.items():
                    self._seen(s, st)
            except ray.exceptions.RayActorError:
                await self._replace(g, actor)
            except asyncio.TimeoutError:
                pass  # busy, not dead
