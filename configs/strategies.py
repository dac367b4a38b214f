"""Typed loader for ``configs/strategies.yaml``: the backtested trading strategies.

A strategy is declarative — which horizon's signals it trades, a confidence floor and feature
filters — so there is no code per strategy, and what a strategy *is* can be read (and reviewed)
in one YAML file. Unknown keys, unknown feature names and horizons the engine does not predict are
refused at load time with a :class:`ConfigError` naming the key: a typo must never silently turn
a filter off and make a strategy look better or worse than it is. The feature-name check needs the
feature set (``features``, a layer above configs), so it runs in
``training.backtest.strategy.load_strategies``, the loader every caller uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from configs.errors import ConfigError
from configs.settings import Settings, _describe, get_settings

STRATEGIES_FILE = "strategies.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureFilter(_Strict):
    """Keep a signal only when feature ``feature`` at the signal candle lies in ``[min, max]``.

    With ``with_side: true`` the value is multiplied by the trade's direction (+1 BUY, -1 SELL)
    first, so ``{feature: ema_slope_50, min: 0, with_side: true}`` reads "the 50-candle EMA slopes
    in the trade's direction" for longs and shorts alike.
    """

    feature: str
    min: float | None = None
    max: float | None = None
    with_side: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> "FeatureFilter":
        if self.min is None and self.max is None:
            raise ValueError("a filter needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class Strategy(_Strict):
    """Which signals are traded. Everything else (entry, exits, costs) is the simulator's, shared."""

    description: str = Field(min_length=1)
    horizon: int = Field(ge=1)
    sides: tuple[Literal["BUY", "SELL"], ...] = ("BUY", "SELL")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    min_reward_risk: float | None = Field(None, gt=0)  # take-profit distance / stop distance
    filters: tuple[FeatureFilter, ...] = ()

    @field_validator("sides")
    @classmethod
    def _sides(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("name BUY, SELL or both, once each")
        return v

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """Feature columns the filters read (the signal table must carry them)."""
        return tuple(dict.fromkeys(f.feature for f in self.filters))


class StrategyFile(_Strict):
    strategies: dict[str, Strategy]

    @field_validator("strategies")
    @classmethod
    def _names(cls, v: dict[str, Strategy]) -> dict[str, Strategy]:
        if not v:
            raise ValueError("declare at least one strategy")
        for name in v:
            if not name.isidentifier():
                raise ValueError(f"strategy name {name!r} must be an identifier (letters, digits, _)")
        return v


def _check_horizons(strategies: dict[str, Strategy], settings: Settings) -> None:
    for name, s in strategies.items():
        if s.horizon not in settings.market.horizons:
            raise ConfigError(f"invalid strategies: strategies.{name}.horizon: {s.horizon} is not one of the "
                              f"predicted horizons {settings.market.horizons}")


def read_strategies(path: str | Path | None = None, settings: Settings | None = None) -> dict[str, Strategy]:
    """Read and validate the strategy file (default: ``<config_dir>/strategies.yaml``) against what
    configs knows: the schema and the predicted horizons. The feature names of the filters are
    checked one layer up, where the feature set is defined
    (``training.backtest.strategy.load_strategies``, what every caller uses)."""
    settings = settings or get_settings()
    p = Path(path) if path is not None else Path(settings.config_dir) / STRATEGIES_FILE
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such strategy file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    try:
        parsed = StrategyFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc).replace("invalid configuration", f"invalid strategies ({p.name})")) from None
    _check_horizons(parsed.strategies, settings)
    return parsed.strategies
