"""Load the declarative :class:`configs.strategies.Strategy` set and apply one to a signal table
(pure, vectorised)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from configs.errors import ConfigError
from configs.settings import Settings, get_settings
from configs.strategies import Strategy, read_strategies
from features.indicators import feature_names

_SIDE = {"BUY": 1, "SELL": -1}


def load_strategies(path: str | Path | None = None, settings: Settings | None = None) -> dict[str, Strategy]:
    """The strategy file (default: ``<config_dir>/strategies.yaml``) validated against the engine:
    ``configs.strategies.read_strategies``' schema and horizon checks, then every filter's feature
    must be one the feature set computes (a typo would otherwise silently pass every row)."""
    settings = settings or get_settings()
    strategies = read_strategies(path, settings)
    known = set(feature_names(settings.features))
    for name, s in strategies.items():
        for i, f in enumerate(s.filters):
            if f.feature not in known:
                raise ConfigError(f"invalid strategies: strategies.{name}.filters.{i}.feature: unknown feature "
                                  f"{f.feature!r}")
    return strategies


def select_signals(signals: pd.DataFrame, strategy: Strategy) -> pd.DataFrame:
    """The rows of ``signals`` the strategy trades.

    ``signals`` needs the simulator's columns plus every feature its filters name (the feature row
    of the signal candle). A NaN feature fails its filter: missing data is never a reason to trade.
    """
    missing = [c for c in strategy.feature_columns if c not in signals.columns]
    if missing:
        raise ValueError(f"signal table lacks the feature columns {missing} that the strategy filters on")
    side = signals["side"].to_numpy(np.int64)
    keep = signals["horizon"].to_numpy(np.int64) == strategy.horizon
    keep &= np.isin(side, [_SIDE[s] for s in strategy.sides])
    keep &= signals["confidence"].to_numpy(np.float64) >= strategy.min_confidence
    if strategy.min_reward_risk is not None:
        rr = signals["tp_frac"].to_numpy(np.float64) / signals["sl_frac"].to_numpy(np.float64)
        keep &= rr >= strategy.min_reward_risk
    for f in strategy.filters:
        v = signals[f.feature].to_numpy(np.float64)
        if f.with_side:
            v = v * side
        ok = np.isfinite(v)
        if f.min is not None:
            ok &= v >= f.min
        if f.max is not None:
            ok &= v <= f.max
        keep &= ok
    return signals[keep]


def passes_filters(features: pd.DataFrame, strategy: Strategy, side: int) -> np.ndarray:
    """Rows whose feature row passes every filter of the strategy for a trade of ``side`` (+1/-1).

    The feature half of :func:`select_signals` (no confidence floor, no reward/risk: those belong to a
    forecast). The filter-only baseline draws its random entries from these rows.
    """
    ok = np.ones(len(features), bool)
    for f in strategy.filters:
        v = features[f.feature].to_numpy(np.float64)
        if f.with_side:
            v = v * side
        cond = np.isfinite(v)
        if f.min is not None:
            cond &= v >= f.min
        if f.max is not None:
            cond &= v <= f.max
        ok &= cond
    return ok


def candidate_rows(features: pd.DataFrame, strategy: Strategy) -> np.ndarray:
    """Rows whose features could pass the strategy's filters for at least one of its sides.

    Filters read only the feature row, so a row failing them for every allowed side can never be
    traded by this strategy: the backtest need not forecast it. :func:`select_signals` still applies
    the exact check (with the forecast's side) afterwards.
    """
    n = len(features)
    if not strategy.filters:
        return np.ones(n, bool)
    any_side = np.zeros(n, bool)
    for s in strategy.sides:
        any_side |= passes_filters(features, strategy, _SIDE[s])
    return any_side
