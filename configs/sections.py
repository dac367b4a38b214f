"""The YAML sections of the settings: market, features, labels and models (typed, strict).

Operators edit them in ``configs/{market,features,models}.yaml``; :class:`configs.settings.Settings`
holds one of each (``settings.market``, ``settings.features`` ...). Apart from the Settings class
because the lower layers take only their section (``features`` computes from a
:class:`FeatureParams`, the labels from :class:`LabelParams`, training fits with a
:class:`ModelConfig`), and because the field comments here are the configuration reference
(``python -m scripts.gen_config_docs``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from configs.symbols import is_synthetic, synthetic_names

# Longest look-back any feature may need, in 5-minute candles; features.WARMUP mirrors it.
MAX_FEATURE_WINDOW = 576


class Strict(BaseModel):
    """Base for YAML sections: unknown keys are errors, values are checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _positive_unique(values: tuple[int, ...] | list[int], limit: int = MAX_FEATURE_WINDOW) -> tuple[int, ...]:
    if not values:
        raise ValueError("must not be empty")
    for v in values:
        if v < 1 or v > limit:
            raise ValueError(f"{v} is outside 1..{limit}")
    if len(set(values)) != len(values):
        raise ValueError("values must be unique")
    return tuple(sorted(values))


class MarketConfig(Strict):
    symbols: list[str] = ["BTCUSDT", "ETHUSDT"]  # any number; synthetic replay symbols (SYN001BTCUSDT) too
    # N synthetic replay symbols added to `symbols` (configs/symbols.py): time-shifted copies of the
    # real symbols listed, named SYN<copy><SOURCE>, for tests and benchmarks; the replay feed only.
    synthetic_symbols: int = Field(0, ge=0, le=9990)
    horizons: list[int] = [6, 18, 36, 72]
    interval: Literal["5m"] = "5m"

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one symbol")
        for s in v:
            if not s.isalnum() or s.upper() != s:
                raise ValueError(f"{s!r} is not an upper-case exchange symbol like BTCUSDT")
        if len(set(v)) != len(v):
            raise ValueError("symbols must be unique")
        return v

    @model_validator(mode="after")
    def _with_synthetic(self) -> "MarketConfig":
        """``symbols`` then holds every symbol served, the synthetic ones included (idempotent: a
        dumped and reloaded config does not add them twice)."""
        names = synthetic_names(self.symbols, self.synthetic_symbols)
        extra = [s for s in names if s not in self.symbols]
        if extra:
            object.__setattr__(self, "symbols", [*self.symbols, *extra])
        return self

    @property
    def real_symbols(self) -> list[str]:
        """The configured symbols an exchange lists (not synthetic): what training and downloads use."""
        return [s for s in self.symbols if not is_synthetic(s)]

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v: list[int]) -> list[int]:
        return list(_positive_unique(v, 288))


class FeatureParams(Strict):
    rsi_periods: tuple[int, ...] = (6, 14)
    roc_periods: tuple[int, ...] = (1, 3, 6, 12, 36)
    ema_periods: tuple[int, ...] = (9, 21, 50)
    rv_windows: tuple[int, ...] = (12, 48, 288)
    volume_z_windows: tuple[int, ...] = (48, 288)
    flow_windows: tuple[int, ...] = (12, 48)
    vwap_windows: tuple[int, ...] = (48, 288)
    range_windows: tuple[int, ...] = (48, 288)
    # Gap policy (docs/features.md "Gaps"): a run of at most this many missing 5-minute slots (36 = 3
    # hours: exchange halts, a lost candle) is bridged with no-trade candles instead of restarting the
    # warm-up; longer gaps start a new segment. 0 = never bridge.
    max_bridge_candles: int = Field(36, ge=0, le=288)

    @field_validator("rsi_periods", "ema_periods")
    @classmethod
    def _recursive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        # Recursive (Wilder/EMA) indicators must forget their seed within WARMUP candles so the
        # incremental path equals the batch path to 1e-9; period 60 decays to ~1e-14 in 1000.
        v = _positive_unique(v, 60)
        if min(v) < 2:
            raise ValueError("periods must be at least 2")
        return v

    @field_validator("roc_periods", "rv_windows", "volume_z_windows", "flow_windows",
                     "vwap_windows", "range_windows")
    @classmethod
    def _windows(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _positive_unique(v)


class LabelParams(Strict):
    # Barrier distances in units of the horizon's volatility forecast sigma_h (features/barriers.py),
    # widened together until the stop is at least min_stop_cost_multiple round-trip costs.
    tp_vol_mult: float = Field(1.2, gt=0, le=20)
    sl_vol_mult: float = Field(0.8, gt=0, le=20)
    min_stop_cost_multiple: float = Field(3.0, ge=0, le=100)


class XGBParams(Strict):
    max_depth: int = Field(6, ge=1, le=16)
    eta: float = Field(0.05, gt=0, le=1)
    subsample: float = Field(0.8, gt=0, le=1)
    colsample_bytree: float = Field(0.8, gt=0, le=1)
    min_child_weight: float = Field(50, ge=0)
    tree_method: Literal["hist", "approx", "exact"] = "hist"
    max_bin: int = Field(256, ge=16, le=4096)


class ModelConfig(Strict):
    per_symbol: bool = False
    quantiles: list[float] = [0.1, 0.5, 0.9]
    num_boost_round: int = Field(400, ge=1, le=10000)
    early_stopping_rounds: int = Field(30, ge=1)
    xgb_params: XGBParams = XGBParams()
    # Walk-forward evaluation (training/data.py): expanding train windows; the first test fold
    # starts after `min_train_fraction` of the timeline; early stopping uses the last
    # `validation_fraction` of each train window (separated from fit and test rows by the embargo).
    walk_forward_folds: int = Field(4, ge=1, le=20)
    min_train_fraction: float = Field(0.5, gt=0, lt=1)
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    # Share of the out-of-fold rows (the newest) held out from the meta-model to calibrate its confidence.
    calibration_fraction: float = Field(0.3, gt=0, lt=0.9)
    # Cap on rows per boosting fit: longer windows are subsampled by a fixed time stride (neighbouring
    # 5-minute rows share most of their label window, so striding loses little and keeps 2 cores usable).
    max_train_rows: int = Field(200_000, ge=1000)

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, v: list[float]) -> list[float]:
        if len(v) != 3 or not (0 < v[0] < v[1] < v[2] < 1):
            raise ValueError("need three increasing quantiles in (0, 1): lower, median, upper")
        return v
