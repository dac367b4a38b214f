"""The MarketFeed's one Binance hub as a Ray actor, and the proxy its BinanceSources call.

Why an actor: the hub (deployments/binance_hub.py) must be one per feed -- one combined websocket
for every symbol and one REST pacer for the IP's request weight -- while the symbols' sources run
in several MarketData actors (a group of symbols each). Ray restarts the actor when it dies (the
handle stays valid): each source's call fails, its SymbolFeed restarts it with backoff, and it
re-subscribes and backfills over REST.
"""

from __future__ import annotations

from typing import Any

import ray

from configs.settings import Settings, load_settings
from deployments.binance_hub import BinanceHub


def make_hub(settings: Settings, symbols: list[str]) -> BinanceHub:
    return BinanceHub(symbols, api_url=settings.binance_api_url, ws_url=settings.binance_ws_url,
                      weight_budget=settings.binance_weight_budget,
                      streams_per_connection=settings.binance_streams_per_connection)


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=10_000)
class BinanceHubActor:
    """Every symbol's closed klines over combined streams, and all REST backfill paced by the
    exchange's weight headers (one long poll per symbol is pending at a time, hence the concurrency)."""

    def __init__(self, symbols: list[str], settings_overrides: dict[str, Any] | None = None) -> None:
        self.hub = make_hub(load_settings(**(settings_overrides or {})), symbols)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method not in ("get_klines", "get_server_time", "subscribe", "recv", "status"):
            raise AttributeError(f"BinanceHub has no remote method {method!r}")
        return await getattr(self.hub, method)(*args, **kwargs)


class RemoteHub:
    """A BinanceHub's interface over its Ray actor (what BinanceSource calls)."""

    def __init__(self, handle) -> None:
        self.handle = handle

    async def get_klines(self, **kwargs: Any) -> list:
        return await self.handle.call.remote("get_klines", **kwargs)

    async def get_server_time(self) -> dict[str, Any]:
        return await self.handle.call.remote("get_server_time")

    async def subscribe(self, symbol: str) -> tuple[int, bool]:
        return tuple(await self.handle.call.remote("subscribe", symbol))

    async def recv(self, symbol: str, token: int, timeout_s: float) -> list[dict[str, Any]]:
        return await self.handle.call.remote("recv", symbol, token, timeout_s)
