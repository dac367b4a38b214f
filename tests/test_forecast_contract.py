"""One Forecast from the ensemble to every reader (issue 16): the composed object is a valid
``Forecast``, its JSON (Redis) parses back to the same forecast with NaN <-> null, the HTTP bodies and
the ``signals:{symbol}`` message are exactly the client's models' fields, and the client's field names
stay those of the engine's Forecast (the client package cannot import the engine, so this test is
what keeps the two in step)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from configs.settings import get_settings
from deployments.cache import make_entry, read_entry
from deployments.render import (SIGNAL_DERIVED, SIGNAL_FROM_FORECAST, body_prefix, finish, prediction_body,
                                signal_body, signal_message)
from inference.forecast import FORECAST_FIELDS, Forecast
from ml_engine_client.models import PredictionResponse, SignalBody, SignalMessage, SignalResponse
from tests.forecast_util import make_forecast

SETTINGS = get_settings()
SECRET, FEATURE_SET = b"contract-test-secret", "fs-1"
# The Forecast fields a /signals body does not carry as they are: the range forecast (rendered as
# prices and percent by /predictions) and the class probabilities (rendered as ``probabilities``).
RANGE_FIELDS = {"pred_high_pct", "pred_low_pct", "high_lower", "high_upper", "low_lower", "low_upper",
                "pred_high_mean_pct", "pred_low_mean_pct"}
PER_REQUEST = {"cached", "data_age_s"}  # appended to a rendered body per request (render.finish)


@pytest.fixture(scope="module")
def composed() -> list[Forecast]:
    """Forecasts of the shipped models on the sample's last candles, with forced HOLDs among them."""
    from features.batch import build_features
    from features.candles import load_candles
    from inference.ensemble import Ensemble
    from deployments.launcher import SHIPPED_MODELS

    ens = Ensemble.load(SHIPPED_MODELS, SETTINGS)
    candles = load_candles(SETTINGS.sample_dir / "BTCUSDT_5m.parquet").iloc[-1500:]
    feats = build_features(candles, SETTINGS.features)[list(ens.feature_names)].to_numpy(np.float64)[-60:]
    closes = candles["close"].to_numpy()[-60:].copy()
    feats[0, 3] = np.nan  # features_unavailable
    closes[1] = np.nan    # market_data_invalid
    symbols = ["BTCUSDT"] * 30 + ["ETHUSDT"] * 29 + ["SYN1USDT"]
    return [f for h in SETTINGS.market.horizons
            for f in ens.forecast(feats, symbols, closes, candles["open_time"].to_numpy()[-60:], h)]


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (and of the same type: NaN never comes back as None)."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_composed_forecasts_are_valid_forecasts_and_their_json_round_trips(composed):
    reasons = {f.reason for f in composed}
    assert {"features_unavailable", "market_data_invalid"} <= reasons
    for f in composed:
        # Built by model_construct: strict validation of its own values finds nothing to coerce.
        again = Forecast.model_validate(f.model_dump(), strict=True)
        raw = f.to_json()
        assert again.to_json() == raw
        assert b"NaN" not in raw and b"Infinity" not in raw  # JSON has no NaN: undefined is null
        back = Forecast.model_validate_json(raw)
        assert back.to_json() == raw and back.model_fields_set == set(FORECAST_FIELDS)
        for k in FORECAST_FIELDS:  # null parses back to NaN, not None, where the engine means NaN
            assert _same(getattr(f, k), getattr(back, k)), k


def test_nan_is_null_in_json_and_null_is_nan_back():
    f = make_forecast(pred_high_pct=math.nan, p_win=math.inf, signal_probs=(math.nan, 0.5, 0.5), take_profit=None)
    d = json.loads(f.to_json())
    assert d["pred_high_pct"] is None and d["p_win"] is None and d["signal_probs"] == [None, 0.5, 0.5]
    assert d["take_profit"] is None and f.model_dump(mode="json")["pred_high_pct"] is None
    back = Forecast.model_validate_json(f.to_json())
    assert math.isnan(back.pred_high_pct) and math.isnan(back.p_win) and math.isnan(back.signal_probs[0])
    assert back.take_profit is None  # no trade stays None
    with pytest.raises(ValidationError):
        make_forecast(confidence=1.5)  # probabilities are in [0, 1] or undefined
    with pytest.raises(ValidationError):
        make_forecast(signal_type="STRONG_BUY")
    with pytest.raises(ValidationError):
        make_forecast(unknown_field=1)
    with pytest.raises(ValidationError):  # frozen: the object the cache, the answer and the log share
        f.close = 1.0


def test_the_client_models_field_names_are_the_forecasts():
    """A field added to Forecast (or to the client's SignalBody) fails here until it is rendered on
    the wire and declared in the client's models."""
    assert set(SignalBody.model_fields) - set(FORECAST_FIELDS) == set(SIGNAL_DERIVED)
    assert set(FORECAST_FIELDS) - set(SignalBody.model_fields) == RANGE_FIELDS | {"signal_probs"}
    assert SIGNAL_FROM_FORECAST == set(FORECAST_FIELDS) - RANGE_FIELDS - {"signal_probs"}
    assert set(SignalMessage.model_fields) - set(SignalBody.model_fields) == {"published_at"}
    assert set(SignalResponse.model_fields) - set(SignalBody.model_fields) == PER_REQUEST


def test_rendered_bodies_are_the_response_models_field_for_field(composed):
    defined = [f for f in composed if math.isfinite(f.pred_high_pct)]
    forced = [f for f in composed if f.reason == "features_unavailable"]
    assert defined and forced
    for f in defined + forced:
        body = signal_body(f)
        assert list(body) == list(SignalBody.model_fields)  # the model's fields, in its order
        for k in SIGNAL_FROM_FORECAST:
            assert body[k] == json.loads(f.to_json())[k], k  # the forecast's own value, as its JSON has it
        answer = SignalResponse.model_validate_json(finish(body_prefix(body), True, 1.5))
        assert answer.model_fields_set == set(SignalResponse.model_fields)
        msg = SignalMessage.model_validate_json(signal_message(f, 1_700_000_000.25))
        assert msg.model_fields_set == set(SignalMessage.model_fields) and msg.published_at == 1_700_000_000.25
    for f in defined:
        body = prediction_body(f, 0.8)
        assert set(body) == set(PredictionResponse.model_fields) - PER_REQUEST
        answer = PredictionResponse.model_validate_json(finish(body_prefix(body), False, 0.25))
        assert answer.model_fields_set == set(PredictionResponse.model_fields)
        assert answer.predicted_high == pytest.approx(f.close * (1 + f.pred_high_pct))
        assert answer.interval.low.upper_pct == pytest.approx(100 * f.low_upper)


def test_a_cache_entry_is_the_forecast_json_signed_and_any_re_encoding_is_refused(composed):
    f = next(f for f in composed if f.reason != "market_data_invalid")
    key = dict(symbol=f.symbol, horizon=f.horizon, candle_open_time=f.candle_open_time,
               model_versions=f.model_versions, feature_set_hash=FEATURE_SET, secret=SECRET)
    entry = make_entry(f, FEATURE_SET, SECRET)
    data = json.loads(entry)
    assert {k: data[k] for k in FORECAST_FIELDS} == json.loads(f.to_json())  # the Forecast JSON, as is
    assert list(data)[-2:] == ["feature_set_hash", "sig"]
    back, reason = read_entry(entry, **key)
    assert reason is None and type(back) is Forecast and back.to_json() == f.to_json()
    # The same content encoded differently (key order, spacing) is not what this engine signed.
    for other in (json.dumps(data), json.dumps(data, sort_keys=True, separators=(",", ":"))):
        assert read_entry(other, **key) == (None, "signature")
    # A forecast without a valid close is never served from the cache.
    invalid = next(f for f in composed if f.reason == "market_data_invalid")
    assert read_entry(make_entry(invalid, FEATURE_SET, SECRET), **{**key, "symbol": invalid.symbol,
                      "horizon": invalid.horizon, "candle_open_time": invalid.candle_open_time}) == (None, "schema")
