"""One model's stage: its boosters and what turns their raw outputs into the model's stage output.

Why a unit of its own: a model replica pool runs one stage and needs nothing of the other three
models, so it loads one :class:`StageModel` per version (``deployments.model_pools``); the
in-process :class:`inference.ensemble.Ensemble` holds one per model and calls the same code, so a
pool's answer and the in-process answer cannot differ. Everything here comes from the model's own
files: its metadata (horizons, symbols, per-symbol routing, feature list) and, for the
meta-model, its calibration documents. That the four models agree with each other is the
ensemble's check (``Ensemble._check_consistency``), done where the set is chosen.
"""

from __future__ import annotations

import numpy as np

from configs.errors import ModelLoadError, PredictionError
from inference.layout import META_MODEL, MODEL_NAMES, MODELS, BoosterLayout, booster_name, expected_boosters
from inference.registry import LoadedModel
from inference.transforms import VOL_FEATURE, stage_output

__all__ = ["StageModel"]


class StageModel:
    """One verified model version with boosters, answering :meth:`predict` for n rows."""

    def __init__(self, model: LoadedModel, nthread: int | None = None) -> None:
        if model.name not in MODELS:
            raise ModelLoadError(f"unknown model {model.name!r}; one of {MODEL_NAMES}")
        meta = model.metadata
        self.name, self.version = model.name, model.version
        self.horizons: tuple[int, ...] = tuple(int(h) for h in meta["horizons"])
        self.symbols: tuple[str, ...] = tuple(meta["symbols"])
        self.per_symbol = bool(meta["per_symbol"])
        feature_names = list(meta["feature_names"])
        self._symbol_code = {s: float(i) for i, s in enumerate(self.symbols)}
        self._vol_index = feature_names.index(VOL_FEATURE)
        self.boosters = model.boosters  # the LoadedModel's own dict, not a copy
        missing = expected_boosters(self.name, self.horizons, self.symbols, self.per_symbol) - set(self.boosters)
        if missing:
            raise ModelLoadError(f"{self.name} {self.version}: boosters missing: {sorted(missing)}")
        self._calibration: dict[int, dict] = {}
        if self.name == META_MODEL:
            docs = {h: model.documents.get(f"calibration_h{h}") for h in self.horizons}
            absent = [h for h, doc in docs.items() if doc is None]
            if absent:
                raise ModelLoadError(f"meta_model {self.version}: calibration documents missing for horizons "
                                     f"{absent}; retrain")
            self._calibration = {h: doc for h, doc in docs.items() if doc is not None}
        if nthread is not None:  # replicas share the node's cores: one thread per call
            for booster in self.boosters.values():
                booster.set_param({"nthread": int(nthread)})

    def _check_horizon(self, horizon: int) -> int:
        if horizon not in self.horizons:
            raise PredictionError(f"horizon {horizon} is not one of the model's horizons {list(self.horizons)}")
        return int(horizon)

    def _booster_output(self, booster: BoosterLayout, horizon: int, X: np.ndarray) -> np.ndarray | None:
        """One booster's output as (n, width), routed by symbol when models are per symbol; None for
        an optional booster the model set lacks (e.g. mean boosters of older sets)."""
        n, width = len(X), booster.width
        if booster.optional and booster_name(booster.target, horizon, self.symbols[0] if self.per_symbol
                                             else None) not in self.boosters:
            return None
        out = np.full((n, width), np.nan)
        if n == 0:
            return out
        if not self.per_symbol:
            groups = [(None, np.ones(n, dtype=bool))]
        else:
            sym = X[:, -1]
            groups = [(s, sym == code) for s, code in self._symbol_code.items()]
        for symbol, rows in groups:
            if not rows.any():
                continue
            pred = self.boosters[booster_name(booster.target, horizon, symbol)].inplace_predict(X[rows])
            out[rows] = np.asarray(pred, dtype=np.float64).reshape(int(rows.sum()), width)
        return out

    def predict(self, X: np.ndarray, horizon: int) -> np.ndarray:
        """This model's raw stage output for the rows of ``X`` (columns: ``inference.layout.OUTPUT_COLUMNS``;
        ``X`` is the ensemble's model input, or the meta input for the meta-model)."""
        horizon = self._check_horizon(horizon)
        X = np.asarray(X, dtype=np.float64)
        raw = {b.target: self._booster_output(b, horizon, X) for b in MODELS[self.name]}
        return stage_output(self.name, raw, X[:, self._vol_index], horizon, self._calibration.get(horizon))
