"""Which FeatureBuilder shard holds a symbol's rolling window, and the market seen across shards.

Why rendezvous (highest-random-weight) hashing: each symbol goes to the shard whose hash of
``(shard key, symbol)`` is highest. The answer depends only on the symbol and the shard keys, not on
the order symbols were configured in, and going from N to N+1 shards moves exactly the symbols the
new shard now wins (about 1/(N+1) of them) -- every other symbol stays where its window already is.
A moved symbol (or every symbol of a restarted shard) is re-seeded from its MarketData actor's
window at its next candle, as a restarted FeatureBuilder always was (``needs_history``).

The hash is blake2b, not Python's ``hash()``: it must agree across processes (the router routes a
symbol's candles, the shard checks it owns them, the ingress merges what the shards publish).

No Ray here: the deployments (feature_builder, router, ingress) use these functions.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

from deployments.state import MarketSnapshot, SymbolState

SHARD_DEPLOYMENT = "FeatureBuilder"
SYMBOLS_PER_SHARD = 100  # feature_shards = 0 (automatic): one shard per this many symbols


def shard_count(configured: int, symbols: int) -> int:
    """The number of shards: ``configured`` (``Settings.feature_shards``), or with 0 one per
    :data:`SYMBOLS_PER_SHARD` symbols; never more shards than symbols (an empty shard holds nothing)."""
    n = configured if configured > 0 else math.ceil(symbols / SYMBOLS_PER_SHARD)
    return max(1, min(n, max(1, symbols)))


def shard_name(shard: int) -> str:
    """Shard 0 is ``FeatureBuilder`` (the name a one-shard graph always had), shard i ``FeatureBuilder{i}``."""
    return SHARD_DEPLOYMENT if shard == 0 else f"{SHARD_DEPLOYMENT}{shard}"


def _weight(shard: int, symbol: str) -> int:
    digest = hashlib.blake2b(f"{shard_name(shard)}/{symbol}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_of(symbol: str, shards: int) -> int:
    """The shard (0..shards-1) holding ``symbol``'s window."""
    if shards <= 1:
        return 0
    return max(range(shards), key=lambda i: _weight(i, symbol))


def assign(symbols: Sequence[str], shards: int) -> list[list[str]]:
    """Per shard, its symbols (in the configured order)."""
    out: list[list[str]] = [[] for _ in range(max(1, shards))]
    for s in symbols:
        out[shard_of(s, shards)].append(s)
    return out


class ShardedMarket:
    """The market as the ingress holds it: the newest snapshot of each shard, combined into one.

    Each shard is long-polled separately (its own ``version`` and ``epoch``). A restarted shard (a
    new epoch) knows nothing of a symbol until that symbol's next candle re-seeds it, one symbol
    after another; meanwhile the candle a reader held is still the newest the market produced. So
    per shard the states of the old incarnation are kept and merged into every snapshot of the new
    one (:meth:`MarketSnapshot.keeping`) until the new one has caught up with each symbol -- not
    only into its first snapshot. The combined snapshot's version is the sum of the shards'
    versions and its epoch joins theirs.
    """

    def __init__(self, shards: int) -> None:
        self.parts: list[MarketSnapshot] = [MarketSnapshot(0, {}) for _ in range(shards)]
        self.held: list[dict[str, SymbolState]] = [{} for _ in range(shards)]

    def update(self, shard: int, snap: MarketSnapshot) -> MarketSnapshot:
        before = self.parts[shard]
        if before.epoch and snap.epoch != before.epoch:
            self.held[shard] = {s: st for s, st in before.symbols.items() if st.open_time is not None}
        self.parts[shard], self.held[shard] = snap.keeping(self.held[shard])
        return self.combined()

    def combined(self) -> MarketSnapshot:
        if len(self.parts) == 1:
            return self.parts[0]
        symbols: dict[str, SymbolState] = {}
        for part in self.parts:
            symbols.update(part.symbols)
        return MarketSnapshot(sum(p.version for p in self.parts), symbols,
                              max(p.created_at for p in self.parts), "+".join(p.epoch for p in self.parts))
