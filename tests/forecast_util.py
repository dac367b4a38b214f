"""Real :class:`~inference.forecast.Forecast` objects for tests that name only the fields they are about."""

from __future__ import annotations

from typing import Any

from inference.forecast import Forecast

# Plausible values for the fields a test does not name (a HOLD the models chose, with its barriers).
_BASE: dict[str, Any] = dict(
    symbol="BTCUSDT", horizon=6, candle_open_time=1_700_000_100_000, close=40_000.0, pred_high_pct=0.004,
    pred_low_pct=-0.003, high_lower=0.001, high_upper=0.009, low_lower=-0.008, low_upper=-0.0005, p_tp_long=0.55,
    p_tp_short=0.4, signal_probs=(0.2, 0.5, 0.3), signal_type="HOLD", confidence=0.5, entry_price=40_000.0,
    take_profit=40_160.0, stop_loss=39_880.0, reason=None, model_versions={})


def make_forecast(**fields: Any) -> Forecast:
    """A validated Forecast: ``fields`` over plausible defaults."""
    return Forecast(**{**_BASE, **fields})
