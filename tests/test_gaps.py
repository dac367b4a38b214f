"""The gap policy (docs/features.md "Gaps"): short gaps are bridged with no-trade candles in training,
backtests and serving alike; long gaps restart the warm-up; labels never span a missing slot; while no
candle arrives, /signals is HOLD with a reason and /predictions a 503 naming the gap."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
import pytest

from configs.sections import FeatureParams
from deployments.feed import CandleEvent, CandleWindow, FeedClock, find_gaps
from deployments.state import MarketSnapshot
from features import WARMUP, FeatureBuilder, build_features, build_labels
from features.candles import FIVE_MINUTES_MS, bridge_gaps, load_candles, segment_ids
from tests.conftest import candle_path
from tests.test_features import RTOL, ATOL, synthetic
from tests.test_serving_units import _call, _service_app

HALT_START = int(pd.Timestamp("2023-03-24 12:40", tz="UTC").value // 1_000_000)  # 16 candles missing
FIELDS = ["open", "high", "low", "close", "volume"]


@pytest.fixture(scope="module")
def halt() -> tuple[pd.DataFrame, int]:
    """1,300 real BTCUSDT candles before the real 2023-03-24 Binance halt and 400 after it, with the index
    of the first candle after the halt. Without the shared history (a clone elsewhere), the same
    16-candle hole is cut into the shipped sample at the same position."""
    df = load_candles(candle_path("BTCUSDT"))
    i = int(np.searchsorted(df["open_time"].to_numpy(), HALT_START))
    if i < 1300 or i >= len(df) or int(df["open_time"].iloc[i]) != HALT_START + 16 * FIVE_MINUTES_MS:
        df = df.drop(index=range(1300, 1316)).reset_index(drop=True)  # the sample: make the same hole
        i = 1300
    return df.iloc[i - 1300: i + 400].reset_index(drop=True), 1300


def test_bridge_gaps_fills_short_runs_with_no_trade_candles_and_leaves_long_ones():
    t = np.array([0, 1, 2, 5, 6, 50], dtype=np.int64) * FIVE_MINUTES_MS  # 2 missing, then 43 missing
    ohlcv = np.arange(30, dtype=np.float64).reshape(6, 5) + 1.0
    b = bridge_gaps(t, ohlcv, max_missing=36)
    assert list(b.open_time // FIVE_MINUTES_MS) == [0, 1, 2, 3, 4, 5, 6, 50]
    assert list(b.bridged) == [False, False, False, True, True, False, False, False]
    assert list(b.real_index) == [0, 1, 2, 5, 6, 7]
    close_before = ohlcv[2, 3]
    np.testing.assert_array_equal(b.ohlcv[3], [close_before] * 4 + [0.0])
    np.testing.assert_array_equal(b.ohlcv[b.real_index], ohlcv)
    # A limit of 0 bridges nothing; a run one longer than the limit is not bridged either.
    assert not bridge_gaps(t, ohlcv, 0).bridged.any()
    assert len(bridge_gaps(t, ohlcv, 1).open_time) == 6


def test_real_halt_features_batch_equals_incremental_and_serve_at_once(halt):
    """The first real candle after the 2023-03-24 halt has features (no warm-up restart), equal in the
    batch and the incremental path, and ``bridged_288`` counts the 16 bridged slots for one day."""
    df, first = halt
    batch = build_features(df)
    fb = FeatureBuilder()
    served = [fb.update("BTCUSDT", int(r.open_time), r.open, r.high, r.low, r.close, r.volume)
              for r in df.itertuples(index=False)]
    assert served[first] is not None and np.isfinite(batch.iloc[first]).all()
    for j in range(WARMUP - 1, len(df)):
        np.testing.assert_allclose(served[j], batch.iloc[j].to_numpy(), rtol=RTOL, atol=ATOL, err_msg=str(j))
    bridged = batch["bridged_288"].to_numpy()
    assert bridged[first - 1] == 0 and bridged[first] == 16
    assert bridged[first + 288 - 17] == 16 and bridged[first + 288 - 16] == 15 and bridged[first + 288] == 0
    # No look-ahead across the gap: the row before the halt is the same without the candles after it.
    before = build_features(df.iloc[:first]).iloc[first - 1].to_numpy()
    np.testing.assert_array_equal(before, batch.iloc[first - 1].to_numpy())


def test_a_gap_longer_than_the_limit_restarts_the_warm_up_in_both_paths():
    params = FeatureParams(max_bridge_candles=36)
    df = synthetic(WARMUP + 300, seed=11)
    cut = df.drop(index=range(WARMUP + 100, WARMUP + 137)).reset_index(drop=True)  # 37 missing
    x = build_features(cut, params)
    assert x.iloc[WARMUP + 99].notna().all() and x.iloc[WARMUP + 100:].isna().all().all()
    fb = FeatureBuilder(params)
    rows = [fb.update("X", int(r.open_time), r.open, r.high, r.low, r.close, r.volume)
            for r in cut.itertuples(index=False)]
    assert rows[WARMUP + 99] is not None and all(r is None for r in rows[WARMUP + 100:])
    assert fb.history("X") == len(cut) - (WARMUP + 100)
    # One fewer missing slot is bridged.
    short = df.drop(index=range(WARMUP + 100, WARMUP + 136)).reset_index(drop=True)
    assert build_features(short, params).iloc[WARMUP + 100:].notna().all().all()


def test_labels_never_span_a_missing_slot(halt):
    """Range and barrier labels whose window t+1..t+h touches the halt are undefined; rows after it are
    labelled from real candles only (bridged candles never count as trading)."""
    df, first = halt
    labels = build_labels(df, (6, 36))
    for h in (6, 36):
        crossing = np.arange(first - h, first)  # windows reaching into the missing slots
        assert labels[f"fut_high_{h}"].iloc[crossing].isna().all()
        assert labels[f"outcome_long_{h}"].iloc[crossing].isna().all()
        assert labels[f"fut_high_{h}"].iloc[first - h - 1: first - h].notna().all()
        after = df.iloc[first:first + 2 * h + 1].reset_index(drop=True)
        expected = after["high"].iloc[1:h + 1].max() / after["close"].iloc[0] - 1
        assert labels[f"fut_high_{h}"].iloc[first] == pytest.approx(expected, rel=1e-12)
    assert (segment_ids(df["open_time"]) == 1).sum() == len(df) - first  # labels see the gap as one


def test_candle_window_keeps_short_gaps_and_the_reseed_equals_the_original(halt):
    """A restarted FeatureBuilder re-seeded from the MarketData window across the halt computes the
    same row as the one that saw every candle live."""
    from deployments.market_state import MarketState

    df, first = halt
    t = df["open_time"].to_numpy(np.int64)
    v = df[FIELDS].to_numpy(np.float64)
    clock = FeedClock(time.time(), float(t[-1] + FIVE_MINUTES_MS), 1.0)
    window = CandleWindow("BTCUSDT", 2 * WARMUP, max_bridge=36)
    original = MarketState()
    for lo in range(0, len(df), 50):
        ev = CandleEvent("BTCUSDT", t[lo:lo + 50], v[lo:lo + 50], "history" if lo == 0 else "live", clock, "test",
                         find_gaps(t[lo:lo + 50], int(t[lo - 1]) if lo else None))
        window.remember(ev)
        original.ingest(ev)
    assert len(window) == len(df)  # the halt did not restart the window
    restarted = MarketState()
    restarted.ingest(window.history_event(clock, "test"))
    np.testing.assert_array_equal(restarted.states["BTCUSDT"].features, original.states["BTCUSDT"].features)
    # A long gap restarts the window.
    late = CandleEvent("BTCUSDT", t[-1:] + 40 * FIVE_MINUTES_MS, v[-1:], "live", clock, "test")
    window.remember(late)
    assert len(window) == 1


def test_candle_window_is_the_one_history_the_resolver_is_refilled_from(halt):
    """The window keeps, bounded by ``keep``, every candle across long gaps for the outcome resolver
    (a forecast made before a halt is scored with the candles before it), while the FeatureBuilder's
    re-seed range starts after the last long gap, at most ``size`` candles."""
    df, first = halt
    t = df["open_time"].to_numpy(np.int64)
    v = df[FIELDS].to_numpy(np.float64)
    clock = FeedClock(time.time(), float(t[-1] + FIVE_MINUTES_MS), 1.0)
    window = CandleWindow("BTCUSDT", 100, max_bridge=36, keep=len(df) - 100)
    window.remember(CandleEvent("BTCUSDT", t, v, "history", clock, "test", find_gaps(t, None)))
    late_t = t[-5:] + 100 * FIVE_MINUTES_MS  # after a gap too long to bridge (95 missing > 36)
    window.remember(CandleEvent("BTCUSDT", late_t, v[-5:], "live", clock, "test", find_gaps(late_t, int(t[-1]))))
    assert list(window.open_time) == list(late_t)  # the re-seed: after the long gap only
    kept = window.outcome_candles()  # across the halt (bridged) and the long gap, the newest ``keep``
    assert [c[0] for c in kept] == (list(t) + list(late_t))[-window.keep:] and len(kept) == window.keep
    assert kept[-1] == (int(late_t[-1]), float(v[-1, 1]), float(v[-1, 2]), float(v[-1, 3]))
    # Within the bound the re-seed is the newest ``size`` candles back to the last long gap.
    window.remember(CandleEvent("BTCUSDT", late_t[-1] + FIVE_MINUTES_MS * np.arange(1, 201), np.repeat(v[-1:], 200, 0),
                                "live", clock, "test"))
    assert len(window) == 100 and window.open_time[-1] == late_t[-1] + 200 * FIVE_MINUTES_MS
    assert len(window.outcome_candles()) == window.keep


def _with_age(service, age_s: float) -> None:
    """Move the market clock so that BTCUSDT's newest candle closed ``age_s`` feed seconds ago."""
    snap = service.market
    st = snap.symbols["BTCUSDT"]
    clock = FeedClock(time.time(), float(st.open_time + FIVE_MINUTES_MS + age_s * 1000), 1.0)
    states = {**snap.symbols, "BTCUSDT": dataclasses.replace(st, clock=clock)}
    service.set_market(MarketSnapshot(snap.version + 1, states, epoch=snap.epoch))


class _NeverCalled:
    async def forecast(self, rows, horizon):
        raise AssertionError("a request inside a gap must not compute a forecast")

    async def models_status(self):
        return {"loaded": True, "versions": {}, "models": {}}

    async def runtime_status(self):
        return {}


@pytest.mark.parametrize("age_s, code", [(1000.0, "market_data_gap"), (37 * 300 + 10.0, "stale_market_data")])
def test_requests_inside_a_gap_get_hold_for_signals_and_a_503_naming_it_for_predictions(age_s, code):
    app, service = _service_app(_NeverCalled())
    _with_age(service, age_s)
    r = _call(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 6})
    body = r.json()
    assert r.status_code == 503 and body["error"] == code and r.headers["Retry-After"], body
    assert body["missing_candles"] == int(age_s // 300) and body["data_age_s"] == pytest.approx(age_s, abs=5)
    assert "BTCUSDT" in body["message"] and "missing" in body["message"]
    s = _call(app, "POST", "/signals", json={"symbol": "BTCUSDT", "horizon": 18})
    sig = s.json()
    assert s.status_code == 200 and sig["signal_type"] == "HOLD" and sig["reason"] == code, sig
    assert sig["confidence"] == 0 and sig["take_profit"] is None and sig["stop_loss"] is None
    assert sig["candle_open_time"] == service.market.symbols["BTCUSDT"].open_time and sig["horizon"] == 18
    assert "missing" in sig["reason_detail"] and sig["cached"] is False


def test_warming_up_gives_hold_with_a_reason_for_signals_not_a_503():
    app, service = _service_app(_NeverCalled())
    snap = service.market
    st = dataclasses.replace(snap.symbols["BTCUSDT"], features=None, feature_reason="features need 1000 contiguous "
                             "candles, have 12 (warming up, or restarting after a gap)")
    service.set_market(MarketSnapshot(snap.version + 1, {**snap.symbols, "BTCUSDT": st}, epoch=snap.epoch))
    s = _call(app, "POST", "/signals", json={"symbol": "BTCUSDT"})
    assert s.status_code == 200 and s.json()["reason"] == "features_unavailable" and "have 12" in s.json()["reason_detail"]
    r = _call(app, "POST", "/predictions", json={"symbol": "BTCUSDT", "horizon": 6})
    assert r.status_code == 503 and r.json()["error"] == "features_unavailable"


def test_resent_candles_neither_reset_the_data_age_nor_count_their_gaps_again(halt):
    """A restarted feed resends candles the FeatureBuilder has (its history, with a clock anchored at
    an older close): the symbol's data age keeps growing and the halt's gap is counted once."""
    from deployments.market_state import MarketState

    df, _ = halt
    t = df["open_time"].to_numpy(np.int64)
    v = df[FIELDS].to_numpy(np.float64)
    state = MarketState()
    now = time.time()
    clock = FeedClock(now - 600, float(t[-1] + FIVE_MINUTES_MS), 1.0)  # the newest candle closed 600 s ago
    state.ingest(CandleEvent("BTCUSDT", t, v, "history", clock, "test", find_gaps(t, None)))
    before = state.states["BTCUSDT"]
    assert before.gaps == 1
    older = FeedClock(now, float(t[-20] + FIVE_MINUTES_MS), 1.0)  # a replay restarted from an older candle
    state.ingest(CandleEvent("BTCUSDT", t[:-10], v[:-10], "history", older, "test", find_gaps(t[:-10], None)))
    after = state.states["BTCUSDT"]
    assert after.open_time == before.open_time and after.gaps == 1
    assert after.clock == clock and after.data_age_s() >= 600
