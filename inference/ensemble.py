"""The inference side of the models: base models -> meta-model -> Forecast.

Inference is separate from learning (Qlib-style): this module imports no training code, no Ray and
no pandas. It is split into stages so serving can run each model in its own replica pool with
``@serve.batch`` and still produce exactly what :meth:`Ensemble.forecast` produces in-process:

    X      = ens.model_input(features, symbols)                      # (n, F+1)
    base   = {m: ens.predict_stage(m, X, h) for m in BASE_MODELS}   # raw outputs
    meta_X = ens.meta_input(X, base, h)
    meta   = ens.predict_stage("meta_model", meta_X, h)             # probs + calibrated confidence
    out    = ens.compose(features, symbols, closes, open_times, h, {**base, "meta_model": meta})

Raw stage outputs (columns, see ``inference.transforms``):
- ``range_predictor`` (n, 8): high 10%/50%/90% quantiles, low 10%/50%/90%, then the high and low
  mean forecasts (NaN for a model set trained without mean boosters), fractions of close;
- ``tpsl_classifier`` (n, 2): P(take-profit before stop-loss) long, short;
- ``signal_classifier`` (n, 3): P(SELL), P(HOLD), P(BUY);
- ``meta_model`` (n, 2): P(net R > 0 | the proposal), raw and calibrated (``p_win``). Meta-labelling:
  the primary rule (``inference.transforms.proposed_side``) proposes the side the signal classifier
  ranks higher; the meta-model says whether acting on it pays after costs.

Rows whose features are undefined (warm-up, a long data gap) or whose close is missing become
HOLD with confidence 0, a ``reason`` code (``FORCED_HOLD_REASONS``) and a ``reason_detail`` for
people; their range fields are NaN (serving answers 503 for them); a symbol the models do not know
takes a default ``symbol_id`` (``configs.symbols.model_symbol``). Nothing
is guessed. A HOLD the models chose carries a code too (``MODEL_HOLD_REASONS``: ``edge_below_costs``,
``low_confidence``), so every HOLD says why; only BUY and SELL have ``reason`` None.

The trade decision: ``expected_r = p_win x W + (1 - p_win) x L - cost_r`` (``inference.transforms.
expected_net_r``; W, L the mean gross R of winning / losing proposals, ``cost_r`` the round trip of
the fee profile in units of the stop). BUY/SELL only where the horizon's policy (``policy_h``, chosen
on out-of-fold rows, ``training.meta_label``) trades and ``expected_r`` and the predicted range in
costs clear its floors; otherwise HOLD ``edge_below_costs``.

Entry, take-profit and stop-loss: entry is the close; TP/SL are :func:`features.barriers.barrier_distances`
of the horizon's volatility forecast (``features.barriers.barrier_sigma`` on the feature row, with the
coefficients the labels were made with, saved in the models' metadata), so ``p_tp_long``/``p_tp_short``
and ``p_win`` are about exactly those prices. BUY uses the long barriers, SELL the short ones; HOLD
reports the would-be long's barriers (entry = close), or ``None`` when the row is undefined.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from configs.settings import Settings
from configs.symbols import model_symbol
from features.barriers import barrier_distances, barrier_sigma
from features.costs import Costs, round_trip_cost
from configs.errors import ModelLoadError, PredictionError
from features.indicators import feature_names, feature_set_hash
from inference.forecast import FORCED_HOLD_REASONS, FORECAST_FIELDS, Forecast
from inference.layout import BASE_MODELS, META_MODEL, MODEL_NAMES, MODELS, RANGE_OUTPUTS, expected_boosters
from inference.registry import LoadedModel, ModelRegistry
from inference.stage import StageModel
from inference.transforms import (INTERVAL_DOCUMENT, apply_interval_calibration, expected_net_r, meta_columns,
                                  meta_matrix, model_columns, proposed_side, range_cost_ratio)

__all__ = ["Ensemble"]

_FORCED = frozenset(FORCED_HOLD_REASONS)


class Ensemble:
    """The four current models, verified and mutually consistent, with the staged inference API."""

    def __init__(self, models: Mapping[str, LoadedModel], settings: Settings, nthread: int | None = None) -> None:
        """``models``: the four verified versions. Models loaded with their boosters get a
        :class:`StageModel` (``predict_stage``); a set loaded without boosters (the router's: the
        pools hold them) has the same checks, ``model_input``, ``meta_input`` and ``compose``."""
        self.models = dict(models)
        self.settings = settings
        self.versions: dict[str, str] = {name: m.version for name, m in self.models.items()}
        self.metadata: dict[str, dict] = {name: m.metadata for name, m in self.models.items()}
        self._check_consistency()
        meta = self.metadata["range_predictor"]
        self.horizons: tuple[int, ...] = tuple(int(h) for h in meta["horizons"])
        self.symbols: tuple[str, ...] = tuple(meta["symbols"])
        self.per_symbol: bool = bool(meta["per_symbol"])
        self.feature_names: tuple[str, ...] = tuple(meta["feature_names"])
        self.columns: tuple[str, ...] = model_columns(self.feature_names)
        self._symbol_code = {s: float(i) for i, s in enumerate(self.symbols)}
        meta_docs = self.models["meta_model"].documents
        self._policy = {h: meta_docs[f"policy_h{h}"] for h in self.horizons}
        self.barrier_models: dict[str, dict] = dict(meta["barrier_models"])
        self._barriers = {h: self.barrier_models[str(h)] for h in self.horizons}
        self.costs = Costs.from_settings(settings)
        self.round_trip_cost = float(round_trip_cost(self.costs))
        # None for a set trained before the interval calibration existed: its intervals are served raw
        self._intervals = self.models["range_predictor"].documents.get(INTERVAL_DOCUMENT)
        self.stages: dict[str, StageModel] = {name: StageModel(m, nthread) for name, m in self.models.items()
                                              if m.boosters}

    @classmethod
    def load(cls, models_dir: Path, settings: Settings, boosters: bool = True,
             versions: Mapping[str, str] | None = None, nthread: int | None = None) -> "Ensemble":
        """Load the current version of each model, or ``versions`` (ModelNotFoundError /
        ModelLoadError otherwise); ``boosters=False``: metadata and documents only, every file verified;
        ``nthread``: threads per booster call (1 where replicas share the node's cores)."""
        registry = ModelRegistry(models_dir, feature_set_hash(settings.features))
        return cls({name: registry.load(name, (versions or {}).get(name), boosters=boosters)
                    for name in MODEL_NAMES}, settings, nthread)

    def _check_consistency(self) -> None:
        """Refuse model sets that were not trained together or against other settings."""
        ref = self.metadata["range_predictor"]
        expected_features = list(feature_names(self.settings.features))
        for name in MODEL_NAMES:
            meta = self.metadata[name]
            for key in ("horizons", "symbols", "per_symbol", "feature_names"):
                if meta.get(key) != ref.get(key):
                    raise ModelLoadError(f"{name} {self.versions[name]} and range_predictor "
                                         f"{self.versions['range_predictor']} disagree on {key!r}; "
                                         "promote versions trained together")
            if list(meta.get("feature_names", [])) != expected_features:
                raise ModelLoadError(f"{name} {self.versions[name]}: feature list differs from this engine's")
            labels = meta.get("label_params")
            if labels != self.settings.labels.model_dump():
                raise ModelLoadError(f"{name} {self.versions[name]} was trained with label parameters {labels}, "
                                     f"settings say {self.settings.labels.model_dump()}; retrain")
            costs = dataclasses.asdict(Costs.from_settings(self.settings))
            if meta.get("costs") != costs:
                raise ModelLoadError(f"{name} {self.versions[name]}: its labels charged the costs {meta.get('costs')}, "
                                     f"settings say {costs} (fee_profile); retrain with this profile")
            if meta.get("barrier_models") != ref.get("barrier_models") or not ref.get("barrier_models"):
                raise ModelLoadError(f"{name} {self.versions[name]}: barrier models missing or differ from "
                                     "range_predictor's; promote versions trained together")
            expected = expected_boosters(name, ref["horizons"], ref["symbols"], ref["per_symbol"])
            missing = expected - self.models[name].booster_names
            if missing:
                raise ModelLoadError(f"{name} {self.versions[name]}: boosters missing: {sorted(missing)}")
        docs = {f"{k}_h{h}" for k in ("calibration", "policy") for h in ref["horizons"]}
        if docs - set(self.models["meta_model"].documents):
            raise ModelLoadError(f"meta_model {self.versions['meta_model']}: documents missing: "
                                 f"{sorted(docs - set(self.models['meta_model'].documents))}; retrain")
        base = self.metadata["meta_model"].get("base_versions", {})
        actual = {m: self.versions[m] for m in BASE_MODELS}
        if base != actual:
            raise ModelLoadError(f"meta_model {self.versions['meta_model']} was stacked on {base}, but the current "
                                 f"base models are {actual}; promote the versions trained together")
        if list(self.metadata["meta_model"].get("meta_columns", [])) != list(meta_columns()):
            raise ModelLoadError("meta_model input columns differ from this engine's definition; retrain")
        missing_h = set(self.settings.market.horizons) - set(ref["horizons"])
        if missing_h:
            raise ModelLoadError(f"models cover horizons {ref['horizons']}, settings ask for {sorted(missing_h)}")

    # ---- stages ----------------------------------------------------------------------------------
    def model_input(self, features: np.ndarray, symbols: Sequence[str]) -> np.ndarray:
        """Features plus the symbol column; a symbol the model was not trained on gets the id of
        :func:`configs.symbols.model_symbol` (its synthetic source, else the model's first symbol)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.feature_names):
            raise PredictionError(f"features must be (n, {len(self.feature_names)}), got {features.shape}")
        if len(symbols) != len(features):
            raise PredictionError(f"{len(symbols)} symbols for {len(features)} feature rows")
        codes = np.array([self._symbol_code[model_symbol(s, self.symbols)] for s in symbols], dtype=np.float64)
        return np.hstack([features, codes[:, None]])

    def _check_horizon(self, horizon: int) -> int:
        if horizon not in self.horizons:
            raise PredictionError(f"horizon {horizon} is not one of the model's horizons {list(self.horizons)}")
        return int(horizon)

    def predict_stage(self, model_name: str, X: np.ndarray, horizon: int) -> np.ndarray:
        """Raw outputs of one model for n rows (columns: ``inference.layout.OUTPUT_COLUMNS``)."""
        horizon = self._check_horizon(horizon)
        if model_name not in MODELS:
            raise PredictionError(f"unknown model {model_name!r}; one of {MODEL_NAMES}")
        stage = self.stages.get(model_name)
        if stage is None:
            raise ModelLoadError(f"{model_name} {self.versions[model_name]}: its boosters are not loaded in this "
                                 "process (a metadata-only set: its model pool holds them)")
        return stage.predict(X, horizon)

    def barriers(self, features: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """TP and SL distances (fractions of close) of each feature row: the labels' barriers."""
        sigma = barrier_sigma(self._barriers[horizon], np.asarray(features, dtype=np.float64), self.feature_names)
        return barrier_distances(sigma, self.settings.labels, self.round_trip_cost)

    def served_range(self, rng: np.ndarray, symbols: Sequence[str], horizon: int) -> np.ndarray:
        """The range predictor's stage output as served: its 10/90% bounds calibrated per decile of the
        predicted median (``interval_calibration``, fitted on the walk-forward's out-of-fold rows;
        ``inference.transforms``). The stage output itself stays raw: the meta-model was trained on it."""
        doc = (self._intervals or {}).get(str(int(horizon)))
        return apply_interval_calibration(doc, np.asarray(rng, dtype=np.float64), symbols)

    def meta_input(self, X: np.ndarray, base_outputs: Mapping[str, np.ndarray], horizon: int) -> np.ndarray:
        """The meta-model's input: base outputs (range in volatility units), regime features, symbol,
        the proposal (side, cost in R, range in costs)."""
        self._check_horizon(horizon)
        X = np.asarray(X, dtype=np.float64)
        _, sl_d = self.barriers(X[:, :-1], horizon)
        return meta_matrix(X, self.columns, base_outputs, horizon, sl_d, self.round_trip_cost)

    def predict_arrays(self, features: np.ndarray, symbols: Sequence[str], horizon: int) -> dict[str, np.ndarray]:
        """Every stage in-process: ``{model_name: raw output}`` for n rows."""
        X = self.model_input(features, symbols)
        outputs = {m: self.predict_stage(m, X, horizon) for m in BASE_MODELS}
        outputs[META_MODEL] = self.predict_stage(META_MODEL, self.meta_input(X, outputs, horizon), horizon)
        return outputs

    def compose_columns(self, features: np.ndarray, symbols: Sequence[str], closes: Sequence[float],
                        candle_open_times: Sequence[int], horizon: int,
                        outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stage outputs as one array per :class:`Forecast` field (pure, vectorised).

        The single definition of how outputs become a forecast: :meth:`compose` builds its objects
        from these columns, and backtests over hundreds of thousands of rows use them directly
        (building an object per row cost most of a backtest's time). ``take_profit``/``stop_loss``
        are NaN where a Forecast has ``None``; ``reason`` (a code of ``HOLD_REASONS``) and
        ``reason_detail`` are None exactly for BUY and SELL.
        """
        horizon = self._check_horizon(horizon)
        features = np.asarray(features, dtype=np.float64)
        closes = np.asarray(closes, dtype=np.float64)
        n = len(features)
        if not (len(symbols) == len(closes) == len(candle_open_times) == n):
            raise PredictionError("features, symbols, closes and candle_open_times differ in length")
        for name in MODEL_NAMES:
            if name not in outputs or len(outputs[name]) != n:
                raise PredictionError(f"compose needs {name} outputs for all {n} rows")
        raw_rng, tpsl, sig_out, meta = (np.asarray(outputs[m], dtype=np.float64) for m in
                                        MODEL_NAMES)
        symbols = np.asarray([str(s) for s in symbols], dtype=object)
        rng = self.served_range(raw_rng, symbols, horizon)  # medians and means unchanged
        times = np.asarray(candle_open_times, dtype=np.int64)
        tp_d, sl_d = self.barriers(features, horizon) if n else (np.empty(0), np.empty(0))

        # Why a row has no forecast, in order of precedence (the first that applies is reported).
        missing = (~np.isfinite(features)).sum(axis=1) if n else np.zeros(0, dtype=np.int64)
        with np.errstate(invalid="ignore"):
            good_close = np.isfinite(closes) & (closes > 0)
        good_output = (np.isfinite(rng[:, :len(RANGE_OUTPUTS)]).all(axis=1) & np.isfinite(meta).all(axis=1)
                       & np.isfinite(sig_out).all(axis=1) & np.isfinite(sl_d) & (sl_d > 0))
        reason = np.full(n, None, dtype=object)
        detail = np.full(n, None, dtype=object)
        for i in np.flatnonzero(~good_output):
            reason[i], detail[i] = "model_output_undefined", "the models gave no finite output for this row"
        for i in np.flatnonzero(~good_close):
            reason[i], detail[i] = "market_data_invalid", "close price missing or not positive"
        for i in np.flatnonzero(missing > 0):
            reason[i] = "features_unavailable"
            detail[i] = (f"features undefined (warm-up or a long data gap): {int(missing[i])} of "
                         f"{features.shape[1]} values missing")
        ok = (missing == 0) & good_close & good_output

        def defined(values: np.ndarray) -> np.ndarray:
            return np.where(ok, values, np.nan)

        side = proposed_side(sig_out) if n else np.empty(0)
        p_win = defined(meta[:, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            cost_r = defined(self.round_trip_cost / sl_d)
            expected = defined(expected_net_r(p_win, cost_r, self._policy[horizon]))
            ratio = range_cost_ratio(rng, self.round_trip_cost)
        signal = np.where(side > 0, "BUY", "SELL").astype(object)
        signal[~ok] = "HOLD"
        confidence = np.where(ok, meta[:, 1], 0.0)
        self._model_holds(ok, signal, p_win, expected, ratio, self._policy[horizon], reason, detail)
        short = signal == "SELL"  # BUY, or HOLD reporting the would-be long, takes the long barriers
        with np.errstate(invalid="ignore"):
            tp = np.where(short, closes * (1 - tp_d), closes * (1 + tp_d))
            sl = np.where(short, closes * (1 + sl_d), closes * (1 - sl_d))
        return {
            "symbol": symbols, "candle_open_time": times, "close": closes,
            "pred_high_pct": defined(rng[:, 1]), "pred_low_pct": defined(rng[:, 4]),
            "high_lower": defined(rng[:, 0]), "high_upper": defined(rng[:, 2]),
            "low_lower": defined(rng[:, 3]), "low_upper": defined(rng[:, 5]),
            "p_tp_long": defined(tpsl[:, 0]), "p_tp_short": defined(tpsl[:, 1]),
            "signal_probs": np.where(ok[:, None], sig_out, np.nan), "signal_type": signal,
            "confidence": confidence, "entry_price": closes,
            "take_profit": defined(tp), "stop_loss": defined(sl), "reason": reason, "reason_detail": detail,
            "pred_high_mean_pct": defined(rng[:, 6]), "pred_low_mean_pct": defined(rng[:, 7]),
            "expected_r": expected, "cost_r": cost_r, "p_win": p_win,
            "fee_profile": np.full(n, self.costs.profile, dtype=object),
        }

    def _model_holds(self, ok: np.ndarray, signal: np.ndarray, p_win: np.ndarray, expected: np.ndarray,
                     ratio: np.ndarray, policy: Mapping[str, Any], reason: np.ndarray, detail: np.ndarray) -> None:
        """The HOLDs the models chose (in place): ``edge_below_costs`` where the horizon's policy does
        not trade this proposal (no edge found at the horizon, expected net R or predicted range in
        costs below its floors); ``low_confidence`` where it does but ``p_win`` is below the operator's
        floor. The signal becomes HOLD; ``confidence``/``p_win``/``expected_r`` stay the model's, so a
        client sees how far below."""
        floor = float(self.settings.signal_min_confidence)
        if not policy.get("trade"):
            takes = np.zeros(len(ok), dtype=bool)
            why = "no positive expected net R was found at this horizon on out-of-fold data"
        else:
            min_er, min_ratio = float(policy["min_expected_r"]), float(policy["min_range_cost_ratio"])
            with np.errstate(invalid="ignore"):
                takes = (expected > min_er) & (ratio >= min_ratio)
            why = (f"expected net R <= {min_er:g} or predicted range < {min_ratio:.2f} round-trip costs "
                   f"({self.costs.profile})")
        edge = ok & ~takes
        weak = ok & takes & (p_win < floor)
        reason[edge], detail[edge] = "edge_below_costs", why
        reason[weak] = "low_confidence"
        detail[weak] = f"p_win below the confidence floor {floor:g} (MLE_SIGNAL_MIN_CONFIDENCE)"
        signal[edge | weak] = "HOLD"

    def compose(self, features: np.ndarray, symbols: Sequence[str], closes: Sequence[float],
                candle_open_times: Sequence[int], horizon: int,
                outputs: Mapping[str, np.ndarray]) -> list[Forecast]:
        """Turn stage outputs into Forecasts (pure: no model is called here)."""
        c = self.compose_columns(features, symbols, closes, candle_open_times, horizon, outputs)
        horizon = int(horizon)
        versions = self.versions
        lists = {k: v.tolist() for k, v in c.items()}  # Python floats/ints/strs, once per column
        lists["take_profit"] = [tp if r not in _FORCED else None for tp, r in zip(lists["take_profit"], lists["reason"])]
        lists["stop_loss"] = [sl if r not in _FORCED else None for sl, r in zip(lists["stop_loss"], lists["reason"])]
        lists["signal_probs"] = [tuple(p) for p in lists["signal_probs"]]
        names = [k for k in FORECAST_FIELDS if k in lists]
        # Built without re-validation: every value comes from the columns above, of the field's type
        # (tests/test_forecast_contract.py validates composed forecasts against the model).
        construct = Forecast.model_construct
        forecasts: list[Forecast] = [
            construct(horizon=horizon, model_versions=dict(versions), **dict(zip(names, values)))
            for values in zip(*(lists[k] for k in names))]
        return forecasts

    def forecast(self, features: np.ndarray, symbols: Sequence[str], closes: Sequence[float],
                 candle_open_times: Sequence[int], horizon: int) -> list[Forecast]:
        """All stages in-process (evaluate, backtests, the plain baseline, equality tests)."""
        outputs = self.predict_arrays(features, symbols, horizon)
        return self.compose(features, symbols, closes, candle_open_times, horizon, outputs)

    def forecast_columns(self, features: np.ndarray, symbols: Sequence[str], closes: Sequence[float],
                         candle_open_times: Sequence[int], horizon: int) -> dict[str, np.ndarray]:
        """:meth:`forecast` as columns (:meth:`compose_columns`): for backtests over many rows."""
        outputs = self.predict_arrays(features, symbols, horizon)
        return self.compose_columns(features, symbols, closes, candle_open_times, horizon, outputs)
