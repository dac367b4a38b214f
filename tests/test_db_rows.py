"""Log rows from forecasts: deterministic ids, forced HOLDs, and the spool line format round trip."""

from __future__ import annotations

import math
import uuid
import pytest

from deployments.db.rows import (NAMESPACE, PredictionRow, SignalRow, decode, encode, prediction_id,
                                 rows_from_forecast, signal_id, uuid5_str)
from tests.forecast_util import make_forecast


def _forecast(**kw):
    base = dict(symbol="BTCUSDT", horizon=6, candle_open_time=1_700_000_100_000, close=40_000.0, pred_high_pct=0.004,
                pred_low_pct=-0.003, high_lower=0.001, high_upper=0.009, low_lower=-0.008, low_upper=-0.0005,
                signal_type="BUY", confidence=0.6, entry_price=40_000.0, take_profit=40_160.0, stop_loss=39_880.0,
                reason=None, model_versions={"range_predictor": "r1", "tpsl_classifier": "t1",
                                             "signal_classifier": "s1", "meta_model": "m1"},
                expected_r=0.12, cost_r=0.3, p_win=0.6, fee_profile="spot_taker")
    base.update(kw)
    return make_forecast(**base)


def test_ids_are_uuid5_and_deterministic():
    for name in ("", "p|BTCUSDT|6|1|r1", "é" * 50):
        assert uuid5_str(name) == str(uuid.uuid5(NAMESPACE, name))
    a, b = rows_from_forecast(_forecast(), 1), rows_from_forecast(_forecast(), 2)
    assert [r.id for r in a] == [r.id for r in b]  # logged twice (close + request): one row each
    p, s = a
    assert p.id == prediction_id("BTCUSDT", 6, 1_700_000_100_000, "r1")
    assert s.id == signal_id("BTCUSDT", 6, 1_700_000_100_000, _forecast().model_versions)
    other = rows_from_forecast(_forecast(model_versions={**_forecast().model_versions, "meta_model": "m2"}))
    assert other[0].id == p.id and other[1].id != s.id  # the range model did not change; the signal did
    assert p.resolve_after == 1_700_000_100_000 + 6 * 300_000 and s.model_version == "m1"


def test_a_forced_hold_logs_its_signal_but_no_prediction():
    f = _forecast(pred_high_pct=math.nan, pred_low_pct=math.nan, high_lower=math.nan, signal_type="HOLD",
                  confidence=0.0, take_profit=None, stop_loss=None, reason="warming up: 400 of 1000 candles")
    rows = rows_from_forecast(f)
    assert len(rows) == 1 and isinstance(rows[0], SignalRow)
    assert rows[0].reason.startswith("warming up") and rows[0].take_profit is None


def test_spool_lines_round_trip():
    rows = rows_from_forecast(_forecast(high_lower=math.inf)) + rows_from_forecast(_forecast(horizon=72))
    assert rows[0].high_lower is None  # non-finite bounds are NULL, never a number
    data = encode(rows)
    assert data.count(b"\n") == len(rows)
    back = [decode(line) for line in data.splitlines()]
    assert back == rows and isinstance(back[0], PredictionRow)
    assert (back[1].expected_r, back[1].cost_r, back[1].p_win, back[1].fee_profile) == (0.12, 0.3, 0.6, "spot_taker")
    # A line spooled before the economics columns existed still decodes (they are NULL).
    legacy = decode(encode([rows[1]]).strip()[:-len(b',0.12,0.3,0.6,"spot_taker"]')] + b"]")
    assert legacy == rows[1]._replace(expected_r=None, cost_r=None, p_win=None, fee_profile=None)
    with pytest.raises(ValueError):
        decode(b'["p","short"]')
