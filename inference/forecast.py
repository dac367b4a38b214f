"""What the engine answers: the :class:`Forecast` of one symbol, candle and horizon, and the codes
of why a forecast is HOLD. Kept apart from the inference code (``inference.ensemble``, which
re-exports them) so the serving layer and the logs can name the contract without the models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

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



@dataclass(frozen=True)
class Forecast:
    """One prediction for one symbol, candle and horizon (JSON-ready via :meth:`to_dict`)."""

    symbol: str
    horizon: int
    candle_open_time: int
    close: float
    pred_high_pct: float
    pred_low_pct: float
    high_lower: float
    high_upper: float
    low_lower: float
    low_upper: float
    p_tp_long: float
    p_tp_short: float
    signal_probs: tuple[float, float, float]
    signal_type: str
    confidence: float
    entry_price: float
    take_profit: float | None
    stop_loss: float | None
    reason: str | None = None
    model_versions: dict[str, str] = field(default_factory=dict)
    reason_detail: str | None = None
    # Mean forecasts (squared-error boosters): the point forecast R² rewards. The median
    # (``pred_*_pct``) is what MAE rewards and what a trader's "typical" move is; NaN when the model
    # set has no mean boosters.
    pred_high_mean_pct: float = float("nan")
    pred_low_mean_pct: float = float("nan")
    # The trade's economics (issue 15): expected net R after the fee profile's costs, the round trip
    # in units of the stop distance, the calibrated P(net R > 0) of the proposed side, the profile.
    expected_r: float = float("nan")
    cost_r: float = float("nan")
    p_win: float = float("nan")
    fee_profile: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; NaN becomes ``None`` (JSON has no NaN)."""
        d = asdict(self)
        d["signal_probs"] = list(self.signal_probs)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        d["signal_probs"] = [None if not math.isfinite(p) else p for p in self.signal_probs]
        return d
