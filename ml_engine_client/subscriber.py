"""Subscribe to the engine's signals on Redis: ``python -m ml_engine_client.subscriber BTCUSDT ETHUSDT``.

At every candle close the engine publishes one JSON message per symbol and horizon on the channel
``signals:{symbol}`` (schema: :class:`~ml_engine_client.models.SignalMessage`, the /signals answer's
fields plus ``published_at``; docs/api.md "Signals on Redis"). This is the asyncio subscriber a
backend can start from (redis-py's asyncio client).

Pub/sub is at-most-once: a subscriber that is disconnected (Redis restarting, a network blip) misses
what was published meanwhile. :func:`subscribe_signals` reconnects with backoff and says so through
``on_reconnect``; a caller that must not miss a candle asks POST /signals for the current one then.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Optional

from ml_engine_client.models import SignalMessage

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def channel(symbol: str) -> str:
    """The channel of ``symbol``'s signals (the engine's ``deployments.cache.signal_channel``)."""
    return f"signals:{symbol}"


async def subscribe_signals(redis_url: str, symbols: Iterable[str], *, max_backoff_s: float = 10.0,
                            on_reconnect: Optional[Callable[[Exception], None]] = None,
                            ready: Optional[asyncio.Event] = None) -> AsyncIterator[SignalMessage]:
    """Every signal published for ``symbols``, parsed, for as long as the caller iterates.

    ``ready`` is set once the subscription is in place (messages published before are not seen)."""
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

    channels = [channel(s) for s in symbols]
    backoff = 0.5
    while True:
        client = aioredis.from_url(redis_url)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(*channels)
                if ready is not None:
                    ready.set()
                backoff = 0.5
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        yield SignalMessage.model_validate_json(message["data"])
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if on_reconnect is not None:
                on_reconnect(exc)
            await asyncio.sleep(backoff)
            backoff = min(max_backoff_s, backoff * 2)
        finally:
            await client.aclose()


def describe(msg: SignalMessage) -> str:
    """One line per signal, for people."""
    trade = "" if msg.signal_type == "HOLD" else f" entry {msg.entry_price:.2f} tp {msg.take_profit:.2f} " \
                                                 f"sl {msg.stop_loss:.2f}"
    why = f" ({msg.reason})" if msg.reason else ""
    return (f"{msg.candle_time} {msg.symbol} h={msg.horizon} {msg.signal_type} "
            f"conf {msg.confidence:.2f}{trade}{why}")


async def _run(redis_url: str, symbols: list[str], count: int) -> int:
    seen = 0

    def reconnecting(exc: Exception) -> None:
        print(f"redis: {type(exc).__name__}; reconnecting (signals published meanwhile are missed)", file=sys.stderr)

    async for msg in subscribe_signals(redis_url, symbols, on_reconnect=reconnecting):
        print(describe(msg), flush=True)
        seen += 1
        if count and seen >= count:
            return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ml_engine_client.subscriber", description=__doc__.splitlines()[0])
    p.add_argument("symbols", nargs="+", help="e.g. BTCUSDT ETHUSDT")
    p.add_argument("--redis-url", default=os.environ.get("MLE_REDIS_URL", DEFAULT_REDIS_URL),
                   help="the engine's Redis (default: $MLE_REDIS_URL or %(default)s)")
    p.add_argument("--count", type=int, default=0, help="exit after this many signals (0: run until Ctrl-C)")
    args = p.parse_args(argv)
    try:
        return asyncio.run(_run(args.redis_url, args.symbols, args.count))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
