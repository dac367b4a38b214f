"""The signal table of a backtest, from the serving ensemble (``Ensemble.forecast``, no second path).

Features are built once per symbol over the whole file (``features.build_features``: a row uses
candles <= t only, so candles before the backtest start just warm the indicators up), then the
rows of the backtest period are forecast in large batches. BUY/SELL forecasts become signal rows;
take-profit and stop-loss prices are turned back into fractions of the forecast's entry price
(the signal candle's close), which the simulator re-anchors to the real entry (the next open).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

from configs.strategies import Strategy
from training.backtest.baselines import VOL_COLUMN
from training.backtest.strategy import candidate_rows

_SIDES = {"BUY": 1, "SELL": -1}
FORECAST_BATCH = 131_072  # rows per Ensemble.forecast call: bounded memory, a progress tick each


class Forecaster(Protocol):
    """What the backtest needs of a model set: ``inference.ensemble.Ensemble`` satisfies it."""

    horizons: tuple[int, ...]
    symbols: tuple[str, ...]

    def forecast(self, features: np.ndarray, symbols: Sequence[str], closes: Sequence[float],
                 candle_open_times: Sequence[int], horizon: int) -> list[Any]: ...


@dataclass
class SignalTable:
    """BUY/SELL signals of a period plus what baselines and reports need about that period."""

    signals: pd.DataFrame                          # simulator columns + probabilities + filter features
    eligible: dict[str, np.ndarray]                # open times with defined features (random entries draw here)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per horizon: BUY/SELL/HOLD of rows forecast
    hold_reasons: dict[str, int] = field(default_factory=dict)
    volatility: dict[str, np.ndarray] = field(default_factory=dict)  # ATR/close at the eligible times
    # The strategies' filter features (and ATR/close) at the eligible times: the filter-only baseline
    # draws its random entries from the eligible candles whose features pass a strategy's filters.
    eligible_features: dict[str, pd.DataFrame] = field(default_factory=dict)


def period_mask(open_time: np.ndarray, start_ms: int | None, end_ms: int | None) -> np.ndarray:
    m = np.ones(len(open_time), bool)
    if start_ms is not None:
        m &= open_time >= start_ms
    if end_ms is not None:
        m &= open_time < end_ms
    return m


_FORECAST_FIELDS = ("candle_open_time", "signal_type", "confidence", "entry_price", "take_profit", "stop_loss",
                    "signal_probs", "p_tp_long", "p_tp_short", "reason")
# Carried into the signal table when the forecaster gives them (issue 15's cost-aware signal fields).
OPTIONAL_FIELDS = ("p_win", "expected_r", "cost_r")


def forecast_frame(forecaster: Forecaster, features: np.ndarray, symbols: Sequence[str], closes: np.ndarray,
                   open_times: np.ndarray, horizon: int) -> pd.DataFrame:
    """The backtest's columns of ``forecaster``'s forecasts of these rows.

    A model set with ``forecast_columns`` (``Ensemble``) gives them as arrays, the same definition
    as its Forecast objects without building one per row; any other forecaster goes through
    :func:`forecasts_to_frame`.
    """
    columns = getattr(forecaster, "forecast_columns", None)
    if columns is None:
        return forecasts_to_frame(forecaster.forecast(features, symbols, closes, open_times, horizon))
    return _frame(columns(features, symbols, closes, open_times, horizon))


def _frame(c: Mapping[str, Any]) -> pd.DataFrame:
    """The backtest's frame from forecast columns (Forecast field names; NaN for a missing price)."""
    probs = np.asarray(c["signal_probs"], dtype=np.float64).reshape(-1, 3)
    return pd.DataFrame({
        "open_time": np.asarray(c["candle_open_time"], dtype=np.int64),
        "signal_type": pd.Series(c["signal_type"], dtype=object),
        "confidence": np.asarray(c["confidence"], dtype=np.float64),
        "entry_price": np.asarray(c["entry_price"], dtype=np.float64),
        "take_profit": np.asarray(c["take_profit"], dtype=np.float64),
        "stop_loss": np.asarray(c["stop_loss"], dtype=np.float64),
        "p_sell": probs[:, 0], "p_hold": probs[:, 1], "p_buy": probs[:, 2],
        "p_tp_long": np.asarray(c["p_tp_long"], dtype=np.float64),
        "p_tp_short": np.asarray(c["p_tp_short"], dtype=np.float64),
        "reason": pd.Series(c["reason"], dtype=object),
        **{k: _floats(list(c[k])) for k in OPTIONAL_FIELDS if k in c and c[k] is not None},
    })


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def forecasts_to_frame(forecasts: Sequence[Any]) -> pd.DataFrame:
    """The columns of a Forecast list the backtest uses (``attrgetter`` per field: C-speed gathering)."""
    cols: dict[str, Any] = {name: list(map(attrgetter(name), forecasts)) for name in _FORECAST_FIELDS}
    for name in OPTIONAL_FIELDS:
        if forecasts and hasattr(forecasts[0], name):
            cols[name] = [getattr(f, name) for f in forecasts]
    cols["take_profit"], cols["stop_loss"] = _floats(cols["take_profit"]), _floats(cols["stop_loss"])
    return _frame(cols)


def defined_rows(candles: pd.DataFrame, features: pd.DataFrame, start_ms: int | None, end_ms: int | None) -> np.ndarray:
    """Candle indices in ``[start_ms, end_ms)`` whose feature row is fully defined."""
    t = candles["open_time"].to_numpy(np.int64)
    return np.flatnonzero(period_mask(t, start_ms, end_ms) & np.isfinite(features.to_numpy(np.float64)).all(axis=1))


def rows_to_forecast(features: pd.DataFrame, defined: np.ndarray, horizon: int,
                     strategies: Mapping[str, Strategy] | None) -> np.ndarray:
    """The defined rows some strategy trading ``horizon`` could use (all of them without strategies)."""
    mine = [s for s in (strategies or {}).values() if s.horizon == horizon]
    if not mine:
        return defined
    wanted = np.zeros(len(features), bool)
    for strat in mine:
        wanted |= candidate_rows(features, strat)
    return defined[wanted[defined]]


def count_rows_to_forecast(candles: Mapping[str, pd.DataFrame], features: Mapping[str, pd.DataFrame],
                           horizons: Sequence[int], start_ms: int | None, end_ms: int | None,
                           strategies: Mapping[str, Strategy] | None = None) -> int:
    """How many forecasts :func:`signal_table` will compute (the progress bar's total)."""
    total = 0
    for symbol, c in candles.items():
        d = defined_rows(c, features[symbol], start_ms, end_ms)
        total += sum(len(rows_to_forecast(features[symbol], d, h, strategies)) for h in horizons)
    return total


def signal_table(forecaster: Forecaster, candles: Mapping[str, pd.DataFrame], features: Mapping[str, pd.DataFrame],
                 horizons: Sequence[int], start_ms: int | None, end_ms: int | None,
                 feature_columns: Sequence[str] = (), progress: Any = None, tag: Mapping[str, Any] | None = None,
                 strategies: Mapping[str, Strategy] | None = None) -> SignalTable:
    """Forecast the feature-defined rows of ``[start_ms, end_ms)`` at each horizon; keep BUY/SELL.

    ``features[symbol]`` is ``build_features`` of ``candles[symbol]`` (same index). With
    ``strategies``, a horizon's rows are limited to those some strategy of that horizon could
    trade (:func:`candidate_rows`: its feature filters pass for one of its sides) — forecasts no
    strategy can use are not computed. ``tag`` adds constant columns (walk-forward: which model
    produced the rows).
    """
    parts: list[pd.DataFrame] = []
    eligible: dict[str, np.ndarray] = {}
    volatility: dict[str, np.ndarray] = {}
    eligible_features: dict[str, pd.DataFrame] = {}
    feature_columns = list(dict.fromkeys([*feature_columns, VOL_COLUMN]))  # baselines rescale by it
    counts: dict[str, dict[str, int]] = {str(h): {"BUY": 0, "SELL": 0, "HOLD": 0} for h in horizons}
    reasons: dict[str, int] = {}
    for symbol, c in candles.items():
        t = c["open_time"].to_numpy(np.int64)
        F = features[symbol].to_numpy(np.float64)
        defined = defined_rows(c, features[symbol], start_ms, end_ms)
        eligible[symbol] = t[defined]
        volatility[symbol] = features[symbol][VOL_COLUMN].to_numpy(np.float64)[defined]
        eligible_features[symbol] = features[symbol].iloc[defined][feature_columns].reset_index(drop=True)
        close = c["close"].to_numpy(np.float64)
        feat_cols = {name: features[symbol][name].to_numpy(np.float64) for name in feature_columns}
        for h in horizons:
            rows = rows_to_forecast(features[symbol], defined, h, strategies)
            for lo in range(0, len(rows), FORECAST_BATCH):
                r = rows[lo:lo + FORECAST_BATCH]
                fc = forecast_frame(forecaster, F[r], [symbol] * len(r), close[r], t[r], int(h))
                for k, v in fc["signal_type"].value_counts().items():
                    counts[str(h)][k] = counts[str(h)].get(k, 0) + int(v)
                for k, v in fc["reason"].dropna().value_counts().items():
                    reasons[k] = reasons.get(k, 0) + int(v)
                trade = fc["signal_type"].isin(list(_SIDES)).to_numpy()
                fc, r = fc[trade], r[trade]
                side = fc["signal_type"].map(_SIDES).to_numpy(np.int64)
                ratio_tp = fc["take_profit"].to_numpy() / fc["entry_price"].to_numpy() - 1.0
                ratio_sl = fc["stop_loss"].to_numpy() / fc["entry_price"].to_numpy() - 1.0
                part = pd.DataFrame({
                    "open_time": fc["open_time"].to_numpy(), "symbol": symbol, "side": side,
                    "confidence": fc["confidence"].to_numpy(), "tp_frac": side * ratio_tp, "sl_frac": -side * ratio_sl,
                    "horizon": int(h),
                    **{k: fc[k].to_numpy(np.float64) for k in ("p_sell", "p_hold", "p_buy", "p_tp_long", "p_tp_short",
                                                               *OPTIONAL_FIELDS) if k in fc},
                    **{name: col[r] for name, col in feat_cols.items()},
                    **(dict(tag) if tag else {}),
                })
                parts.append(part)
                if progress is not None:
                    progress.update(len(trade))
    signals = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["open_time", "symbol", "side", "confidence", "tp_frac", "sl_frac", "horizon"])
    return SignalTable(signals, eligible, counts, reasons, volatility, eligible_features)
