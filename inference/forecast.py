"""What the engine answers: the :class:`Forecast` of one symbol, candle and horizon, and the codes
of why a forecast is HOLD. Kept apart from the inference code (``inference.ensemble``, which
re-exports them) so the serving layer and the logs can name the contract without the models.

One type from the ensemble to every reader: the router writes ``Forecast`` JSON to Redis
(``deployments.cache``), the ingress parses it back into a ``Forecast``, renders the HTTP bodies
and the ``signals:{symbol}`` message from it (``deployments.render``) and hands the same object
to the log rows (``deployments.db.rows``). There is no second list of its fields to keep in step.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

# Why a forecast is HOLD (the ``reason`` field; None for a BUY or SELL). Forced HOLDs have no
# forecast (NaN ranges, confidence 0, no trade); the serving layer adds ``market_data_gap`` and
# ``stale_market_data`` for requests while no candle arrives:
#   features_unavailable    features undefined (warm-up, a long data gap)
#   unknown_symbol          kept for clients; no longer produced: a symbol the models were not trained on
#                           takes a default symbol_id (configs.symbols.model_symbol, docs/models.md)
#   market_data_invalid     the close is missing or not positive
#   model_output_undefined  the models gave no finite output
FORCED_HOLD_REASONS: tuple[str, ...] = ("features_unavailable", "unknown_symbol", "market_data_invalid",
                                        "model_output_undefined")
# HOLDs the models chose (the forecast is defined: ranges, probabilities, the would-be long's TP/SL):
#   edge_below_costs  the proposal's expected net R after costs (or its predicted range in costs)
#                     is below the horizon's policy floors, or the horizon found no edge at all
#   low_confidence    the proposal clears the policy, but p_win is below
#                     ``Settings.signal_min_confidence`` (MLE_SIGNAL_MIN_CONFIDENCE)
MODEL_HOLD_REASONS: tuple[str, ...] = ("edge_below_costs", "low_confidence")
HOLD_REASONS: tuple[str, ...] = FORCED_HOLD_REASONS + MODEL_HOLD_REASONS

NAN = float("nan")


def _null_is_nan(v: object) -> object:
    return NAN if v is None else v


def _nan_is_null(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _probability(v: float) -> float:
    if math.isfinite(v) and not 0.0 <= v <= 1.0:
        raise ValueError("a probability must be in [0, 1] (or undefined)")
    return v


# The one place NaN meets JSON: inside the engine an undefined number is NaN (vectorised code, the
# backtests' columns); in JSON (Redis, model_dump(mode="json"), what the views render) it is null,
# and null parses back to NaN. Infinity is undefined too (null on the wire).
_NAN_SCHEMA = WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "null"}]})
Number = Annotated[float, BeforeValidator(_null_is_nan), PlainSerializer(_nan_is_null, when_used="json"),
                   _NAN_SCHEMA]
Probability = Annotated[float, BeforeValidator(_null_is_nan), AfterValidator(_probability),
                        PlainSerializer(_nan_is_null, when_used="json"), _NAN_SCHEMA]
SignalType = Literal["BUY", "SELL", "HOLD"]


class Forecast(BaseModel):
    """One prediction for one symbol, candle and horizon: the Redis JSON, the source of the HTTP
    bodies and of the log rows. Frozen: one object is cached, served and logged.

    Prices are absolute; ``*_pct`` fields are fractions of ``close`` (0.004 = +0.4 %). Undefined
    numbers are NaN here and null in JSON (:data:`Number`); ``take_profit``/``stop_loss`` are None
    for a forced HOLD (no trade).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    symbol: str
    horizon: int
    candle_open_time: int
    close: Number
    pred_high_pct: Number
    pred_low_pct: Number
    high_lower: Number
    high_upper: Number
    low_lower: Number
    low_upper: Number
    p_tp_long: Probability
    p_tp_short: Probability
    signal_probs: tuple[Probability, Probability, Probability] = Field(description="SELL, HOLD, BUY")
    signal_type: SignalType
    confidence: Probability
    entry_price: Number
    take_profit: Optional[Number]
    stop_loss: Optional[Number]
    reason: Optional[str] = None
    model_versions: dict[str, str] = Field(default_factory=dict)
    reason_detail: Optional[str] = None
    # Mean forecasts (squared-error boosters): the point forecast R² rewards. The median
    # (``pred_*_pct``) is what MAE rewards and what a trader's "typical" move is; NaN when the model
    # set has no mean boosters.
    pred_high_mean_pct: Number = NAN
    pred_low_mean_pct: Number = NAN
    # The trade's economics (issue 15): expected net R after the fee profile's costs, the round trip
    # in units of the stop distance, the calibrated P(net R > 0) of the proposed side, the profile.
    expected_r: Number = NAN
    cost_r: Number = NAN
    p_win: Probability = NAN
    fee_profile: Optional[str] = None

    def to_json(self) -> bytes:
        """The JSON of this forecast (what Redis holds; :meth:`model_validate_json` reads it back)."""
        return self.__pydantic_serializer__.to_json(self)


FORECAST_FIELDS: tuple[str, ...] = tuple(Forecast.model_fields)
