"""Symbols as configuration (issue 18 point 1) and synthetic replay symbols (point 3).

Pure functions on the shipped sample and the shipped model set; no Ray, no services: a few seconds.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from configs.settings import load_settings
from configs.symbols import (SYNTHETIC_LAG, model_symbol, parse_synthetic, real_symbol, synthetic_name,
                             synthetic_names)
from features.batch import build_features
from features.candles import FIVE_MINUTES_MS, load_candles
from configs.errors import ConfigError, MarketDataError
from features.indicators import WARMUP, feature_group, feature_names
from features.synthetic import synthetic_candles
from tests.conftest import SAMPLE_DATA


def test_synthetic_names_say_they_are_synthetic_and_name_their_source():
    assert synthetic_name("BTCUSDT", 7) == "SYN007BTCUSDT"
    assert parse_synthetic("SYN007BTCUSDT") == ("BTCUSDT", 7) and real_symbol("SYN042ETHUSDT") == "ETHUSDT"
    for real in ("BTCUSDT", "SYNUSDT", "SYN000BTCUSDT", "SYN07BTCUSDT", "SYN0071INCHUSDT"):
        assert parse_synthetic(real) is None and real_symbol(real) == real
    assert synthetic_names(["BTCUSDT", "ETHUSDT"], 5) == ["SYN001BTCUSDT", "SYN001ETHUSDT", "SYN002BTCUSDT",
                                                          "SYN002ETHUSDT", "SYN003BTCUSDT"]
    assert synthetic_names(["BTCUSDT"], 0) == []
    with pytest.raises(ValueError, match="at most 999"):
        synthetic_names(["BTCUSDT"], 1000)
    with pytest.raises(ValueError, match="cannot be the source"):
        synthetic_name("SYN001BTCUSDT", 1)
    # The documented default symbol_id: itself, a synthetic symbol's source, else the model's first.
    known = ("BTCUSDT", "ETHUSDT")
    assert [model_symbol(s, known) for s in ("ETHUSDT", "SYN003ETHUSDT", "DOGEUSDT", "SYN001DOGEUSDT")] == \
        ["ETHUSDT", "ETHUSDT", "BTCUSDT", "BTCUSDT"]


def test_settings_add_n_synthetic_symbols_to_the_configured_ones(monkeypatch):
    s = load_settings(market={"synthetic_symbols": 200})
    assert len(s.market.symbols) == 202 and s.market.symbols[:3] == ["BTCUSDT", "ETHUSDT", "SYN001BTCUSDT"]
    assert s.market.real_symbols == ["BTCUSDT", "ETHUSDT"] and s.market.symbols[-1] == "SYN100ETHUSDT"
    # A dumped config (Serve args, a restarted actor) reloads to the same list, not twice the copies.
    assert load_settings(market=s.market.model_dump()).market.symbols == s.market.symbols
    monkeypatch.setenv("MLE_MARKET__SYNTHETIC_SYMBOLS", "3")
    assert load_settings().market.symbols[2:] == ["SYN001BTCUSDT", "SYN001ETHUSDT", "SYN002BTCUSDT"]
    monkeypatch.delenv("MLE_MARKET__SYNTHETIC_SYMBOLS")
    named = load_settings(market={"symbols": ["ETHUSDT", "SYN005ETHUSDT", "SOLUSDT"]}).market
    assert named.symbols == ["ETHUSDT", "SYN005ETHUSDT", "SOLUSDT"] and named.real_symbols == ["ETHUSDT", "SOLUSDT"]
    with pytest.raises(ConfigError, match="replay feed only"):
        load_settings(feed="binance", market={"synthetic_symbols": 1})
    with pytest.raises(ConfigError, match="unique"):
        load_settings(market={"symbols": ["BTCUSDT", "BTCUSDT"]})


def test_synthetic_candles_are_time_shifted_copies_that_join_up():
    src = load_candles(SAMPLE_DATA / "BTCUSDT_5m.parquet")
    n, copy = len(src), 30
    lag = copy * SYNTHETIC_LAG
    assert 2 * WARMUP < lag < n - 2 * WARMUP  # both stretches are long enough to compare features
    syn = synthetic_candles(synthetic_name("BTCUSDT", copy), src)
    np.testing.assert_array_equal(syn["open_time"].to_numpy(), src["open_time"].to_numpy())  # same clock
    head = n - lag
    cols = ["open", "high", "low", "close", "volume"]
    np.testing.assert_array_equal(syn[cols].to_numpy()[:head], src[cols].to_numpy()[lag:])  # values later
    scale = syn["open"].iloc[head] / src["open"].iloc[0]
    assert syn["open"].iloc[head] == pytest.approx(syn["close"].iloc[head - 1], rel=1e-12)  # no price jump
    np.testing.assert_allclose(syn[cols[:4]].to_numpy()[head:], src[cols[:4]].to_numpy()[:lag] * scale, rtol=1e-12)
    np.testing.assert_array_equal(syn["volume"].to_numpy()[head:], src["volume"].to_numpy()[:lag])
    # Features are scale-free: away from the wrap, a copy's candle features are its source's, shifted
    # (calendar and hour/4-hour bar features follow the copy's own clock, so they differ).
    cols = [c for c in feature_names() if feature_group(c) not in ("time", "higher_timeframes")]
    fs, fy = build_features(src)[cols].to_numpy(), build_features(syn)[cols].to_numpy()
    np.testing.assert_allclose(fy[WARMUP:head], fs[lag + WARMUP:], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fy[head + WARMUP:], fs[WARMUP:lag], rtol=1e-6, atol=1e-9)
    assert not np.allclose(syn["close"].to_numpy(), src["close"].to_numpy())  # a different series
    with pytest.raises(MarketDataError, match="not a synthetic symbol"):
        synthetic_candles("BTCUSDT", src)


def test_the_replay_feed_serves_synthetic_symbols_from_the_shipped_sample():
    from deployments.market_data import make_source, replay_file

    settings = load_settings(market={"synthetic_symbols": 4}, replay_history=WARMUP)
    assert replay_file(settings, "SYN002ETHUSDT") == settings.sample_dir / "ETHUSDT_5m.parquet"

    async def first_events(symbol: str, k: int):
        src = make_source(settings, symbol)
        out = []
        async for ev in src.events():
            out.append(ev)
            if len(out) == k:
                return src, out

    src, (history, live) = asyncio.run(first_events("SYN002ETHUSDT", 2))
    assert src.status.source == "replay:ETHUSDT_5m.parquet+SYN002ETHUSDT" and history.symbol == "SYN002ETHUSDT"
    expected = synthetic_candles("SYN002ETHUSDT", load_candles(settings.sample_dir / "ETHUSDT_5m.parquet"))
    np.testing.assert_array_equal(history.open_time, expected["open_time"].to_numpy()[:WARMUP])
    np.testing.assert_array_equal(history.ohlcv, expected[["open", "high", "low", "close", "volume"]].to_numpy()[:WARMUP])
    assert live.kind == "live" and live.last_open_time == history.last_open_time + FIVE_MINUTES_MS
    _, (real, _) = asyncio.run(first_events("ETHUSDT", 2))
    np.testing.assert_array_equal(real.open_time, history.open_time)  # real and synthetic close together
    assert not np.array_equal(real.ohlcv, history.ohlcv)


def test_the_api_validates_synthetic_symbols_like_real_ones():
    from tests.test_serving_units import _call, _service_app

    class NoCall:
        async def forecast(self, rows, horizon):
            raise AssertionError("no market data: the service must answer before asking the models")

    app, _ = _service_app(NoCall(), market={"synthetic_symbols": 3})
    r = _call(app, "POST", "/predictions", json={"symbol": "SYN002BTCUSDT", "horizon": 6})
    assert r.status_code == 503 and r.json()["error"] == "market_data_unavailable", r.text
    r = _call(app, "POST", "/signals", json={"symbol": "SYN009BTCUSDT"})
    assert r.status_code == 422 and "SYN001ETHUSDT" in r.json()["supported_symbols"], r.text


def test_a_symbol_the_models_do_not_know_is_forecast_with_the_default_symbol_id():
    """Issue 18: not a HOLD `unknown_symbol` any more; features are scale-free, so the row is
    forecast with its synthetic source's id, or the model's first symbol's (configs.symbols)."""
    from configs.settings import get_settings
    from deployments.launcher import SHIPPED_MODELS
    from inference.ensemble import Ensemble
    from inference.forecast import FORCED_HOLD_REASONS

    ens = Ensemble.load(SHIPPED_MODELS, get_settings())
    eth = load_candles(SAMPLE_DATA / "ETHUSDT_5m.parquet").iloc[-(WARMUP + 20):]
    feats = build_features(eth).to_numpy(np.float64)[-20:]
    closes, times = eth["close"].to_numpy()[-20:], eth["open_time"].to_numpy()[-20:]
    as_of = {s: ens.forecast_columns(feats, [s] * 20, closes, times, 6)
             for s in ("ETHUSDT", "BTCUSDT", "SYN004ETHUSDT", "DOGEUSDT")}
    assert not set(as_of["DOGEUSDT"]["reason"]) & set(FORCED_HOLD_REASONS)  # forecast, not refused
    for name, same_as in (("SYN004ETHUSDT", "ETHUSDT"), ("DOGEUSDT", "BTCUSDT")):
        for key in ("pred_high_pct", "pred_low_pct", "p_tp_long", "confidence"):
            np.testing.assert_array_equal(as_of[name][key], as_of[same_as][key])
    codes = ens.model_input(feats[:4], ["BTCUSDT", "ETHUSDT", "SYN004ETHUSDT", "DOGEUSDT"])[:, -1]
    assert ens.symbols == ("BTCUSDT", "ETHUSDT") and codes.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert list(as_of["DOGEUSDT"]["symbol"]) == ["DOGEUSDT"] * 20
