"""FeatureBuilder sharding (issue 18 point 1), no cluster: the rendezvous hash, each shard's symbols,
and the market an ingress combines from the shards' snapshots across a shard's restart."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from deployments.sharding import ShardedMarket, assign, shard_count, shard_name, shard_of
from deployments.state import MarketSnapshot, SymbolState
from configs.errors import CandleDataError
from tests.conftest import ROOT

SYMBOLS = [f"SYN{i:03d}BTCUSDT" for i in range(1, 201)]


def test_adding_a_shard_moves_only_the_symbols_the_new_shard_takes():
    for n in (1, 2, 3, 7):
        before = {s: shard_of(s, n) for s in SYMBOLS}
        after = {s: shard_of(s, n + 1) for s in SYMBOLS}
        moved = [s for s in SYMBOLS if before[s] != after[s]]
        assert moved and all(after[s] == n for s in moved), n  # only to the new shard
        # about its fair share (1/(n+1) of the symbols), not a reshuffle
        assert abs(len(moved) - len(SYMBOLS) / (n + 1)) < 0.5 * len(SYMBOLS) / (n + 1), (n, len(moved))


def test_shards_are_balanced_and_stable_across_processes():
    groups = assign(SYMBOLS, 4)
    assert sorted(s for g in groups for s in g) == sorted(SYMBOLS)
    assert all(30 <= len(g) <= 70 for g in groups), [len(g) for g in groups]
    # blake2b, not hash(): the same answer in a process with another hash seed
    code = "from deployments.sharding import shard_of; print([shard_of(f'SYN{i:03d}BTCUSDT', 4) for i in range(1, 201)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert other.strip() == str([shard_of(s, 4) for s in SYMBOLS])
    assert shard_of("BTCUSDT", 1) == 0 and assign(["A", "B"], 1) == [["A", "B"]]


def test_shard_count_and_names():
    assert shard_count(0, 2) == 1 and shard_count(0, 200) == 2 and shard_count(0, 201) == 3
    assert shard_count(3, 200) == 3 and shard_count(5, 2) == 2  # never more shards than symbols
    assert [shard_name(i) for i in range(3)] == ["FeatureBuilder", "FeatureBuilder1", "FeatureBuilder2"]


def test_a_shard_holds_only_its_symbols():
    from deployments.market_state import MarketState
    from deployments.feed import CandleEvent, FeedClock

    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"]
    overrides = {"market": {"symbols": symbols}, "feature_shards": 2}
    states = [MarketState(overrides, shard) for shard in (0, 1)]
    assert sorted(states[0].symbols + states[1].symbols) == sorted(symbols)
    assert set(states[0].symbols).isdisjoint(states[1].symbols) and states[0].symbols and states[1].symbols
    other = states[1].symbols[0]
    event = CandleEvent(other, np.array([0], dtype=np.int64), np.array([[1.0, 1.0, 1.0, 1.0, 1.0]]), "live",
                        FeedClock(0.0, 300_000.0), "test")
    with pytest.raises(CandleDataError, match="another FeatureBuilder shard"):
        states[0].ingest(event)
    assert states[1].ingest(event).needs_history  # its own shard takes it (empty windows: history first)
    with pytest.raises(ValueError):
        MarketState(overrides, 2)


def _state(symbol: str, open_time: int | None, published: bool = True) -> SymbolState:
    return SymbolState(symbol, open_time=open_time, close=1.0 if open_time else None, published=published)


def test_the_ingress_keeps_a_restarted_shards_symbols_until_each_is_reseeded():
    """Shard 1 restarts and re-seeds its symbols one by one: until a symbol is re-seeded the ingress
    keeps the candle it held -- in every snapshot of the new shard, not only its first -- and the
    other shard's symbols are never touched."""
    market = ShardedMarket(2)
    market.update(0, MarketSnapshot(3, {"A": _state("A", 10)}, epoch="a"))
    got = market.update(1, MarketSnapshot(5, {"B": _state("B", 10), "C": _state("C", 10)}, epoch="b"))
    assert {s: st.open_time for s, st in got.symbols.items()} == {"A": 10, "B": 10, "C": 10}
    assert got.version == 8 and got.epoch == "a+b"
    # the restarted shard: empty, then B re-seeded and published at the next candle, C not yet
    got = market.update(1, MarketSnapshot(0, {"B": _state("B", None), "C": _state("C", None)}, epoch="b2"))
    assert got.symbols["B"].open_time == 10 and got.symbols["C"].open_time == 10
    got = market.update(1, MarketSnapshot(1, {"B": _state("B", 11), "C": _state("C", None)}, epoch="b2"))
    assert got.symbols["B"].open_time == 11 and got.symbols["C"].open_time == 10
    got = market.update(1, MarketSnapshot(2, {"B": _state("B", 12), "C": _state("C", 11)}, epoch="b2"))
    assert got.symbols["C"].open_time == 11 and market.held[1] == {}
    assert market.parts[1].version == 2 and market.parts[1].epoch == "b2"  # what the long-poll continues from
    assert got.symbols["A"].open_time == 10


def test_one_shard_is_the_snapshot_itself():
    market = ShardedMarket(1)
    snap = MarketSnapshot(1, {"A": _state("A", 10)}, epoch="a")
    assert market.update(0, snap) is snap
