"""The model definitions: which boosters exist, their objectives and targets, and how one is fit.

Model code only fits and predicts; it never loads candles, splits data or writes files (that is
``training/data.py`` and ``inference/registry.py``). A *target* is one booster: the range predictor
has two per horizon (future high, future low; each a multi-quantile regression), the TP/SL
classifier two (long, short), the signal classifier and the meta-model one each (3 classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import xgboost as xgb

from configs.sections import ModelConfig

from configs.settings import Settings
from features.labels import SIGNAL_CLASSES
from inference.layout import BASE_MODELS, META_MODEL, MODELS, booster_name
from inference.transforms import range_scale

SEED = 20240601


@dataclass(frozen=True)
class TargetSpec:
    """One booster to train: model, target, horizon, objective kind, label column, optional symbol."""

    model: str
    target: str
    horizon: int
    kind: str    # "quantile" | "mean" | "binary" | "multiclass"
    label: str   # column of features.labels.build_labels
    symbol: str | None = None

    @property
    def name(self) -> str:
        return booster_name(self.target, self.horizon, self.symbol)

    @property
    def width(self) -> int:
        """Columns of the booster's raw prediction."""
        return 3 if self.kind in ("quantile", "multiclass") else 1


def base_specs(settings: Settings, symbols: Sequence[str]) -> list[TargetSpec]:
    """Every base booster of ``inference.layout.MODELS``, per horizon (and per symbol when ``models.per_symbol``)."""
    return _specs(settings, symbols, BASE_MODELS)


def meta_specs(settings: Settings, symbols: Sequence[str]) -> list[TargetSpec]:
    """The meta-labelling boosters: P(net R > 0 | the primary's proposal), binary (``training.meta_label``)."""
    return _specs(settings, symbols, (META_MODEL,))


def _specs(settings: Settings, symbols: Sequence[str], models: Sequence[str]) -> list[TargetSpec]:
    per = list(symbols) if settings.models.per_symbol else [None]
    return [TargetSpec(m, b.target, h, b.kind, f"{b.label}_{h}", s)
            for h in settings.market.horizons for s in per for m in models for b in MODELS[m]]


def xgb_params(spec: TargetSpec, cfg: ModelConfig, nthread: int) -> dict:
    """XGBoost parameters of one booster: the configured tree parameters plus its objective."""
    params: dict = dict(cfg.xgb_params.model_dump(), seed=SEED, nthread=nthread)
    if spec.kind == "quantile":
        params.update(objective="reg:quantileerror", quantile_alpha=list(cfg.quantiles), eval_metric="quantile")
    elif spec.kind == "mean":  # the conditional mean: the point forecast squared error (R²) rewards
        params.update(objective="reg:squarederror", eval_metric="rmse")
    elif spec.kind == "binary":
        params.update(objective="binary:logistic", eval_metric="logloss")
    elif spec.kind == "multiclass":
        params.update(objective="multi:softprob", num_class=len(SIGNAL_CLASSES), eval_metric="mlogloss")
    else:
        raise ValueError(f"unknown target kind {spec.kind!r}")
    return params


def target_values(spec: TargetSpec, labels: pd.DataFrame, atr_fraction: np.ndarray) -> np.ndarray:
    """The booster's training target for every row (NaN where the label is undefined).

    Range targets are divided by the volatility unit (see ``inference.transforms.range_scale``);
    predictions are multiplied back by ``inference.transforms.range_output``.
    """
    y = labels[spec.label].to_numpy(np.float64)
    if spec.kind in ("quantile", "mean"):
        return y / range_scale(atr_fraction, spec.horizon)
    return y


@dataclass(frozen=True)
class FitOutcome:
    """A fitted booster (raw UBJSON, trimmed to its best iteration) and its predictions."""

    key: str
    booster: bytes
    best_iteration: int      # number of boosting rounds kept
    predictions: np.ndarray | None


def fit_booster(params: dict, rounds: int, X_fit: np.ndarray, y_fit: np.ndarray, X_val: np.ndarray | None = None,
                y_val: np.ndarray | None = None, early_stopping: int | None = None, w_fit: np.ndarray | None = None,
                w_val: np.ndarray | None = None) -> tuple[xgb.Booster, int]:
    """Train one booster (optionally with sample weights); with a validation set, stop early on it and
    keep only the best rounds."""
    dfit = xgb.QuantileDMatrix(X_fit, label=y_fit, weight=w_fit, max_bin=params.get("max_bin", 256))
    evals = []
    if X_val is not None and len(X_val) and early_stopping:
        dval = xgb.QuantileDMatrix(X_val, label=y_val, weight=w_val, ref=dfit)
        evals = [(dval, "val")]
    booster = xgb.train(params, dfit, num_boost_round=rounds, evals=evals,
                        early_stopping_rounds=early_stopping if evals else None, verbose_eval=False)
    if evals:
        kept = booster.best_iteration + 1
        booster = booster[:kept]
    else:
        kept = rounds
    return booster, kept


def predict_raw(booster: xgb.Booster, X: np.ndarray, width: int) -> np.ndarray:
    """Raw booster output as (n, width) float64."""
    if len(X) == 0:
        return np.empty((0, width))
    return np.asarray(booster.inplace_predict(X), dtype=np.float64).reshape(len(X), width)
