"""The inference side of the models: base models -> meta-model -> Forecast.

Inference is separate from learning (Qlib-style): this module imports no training code, no Ray and
no pandas. It is split into stages so serving can run each model in its own replica pool with
``@serve.batch`` and still produce exactly what :meth:`Ensemble.forecast` produces in-process:

    X      = ens.model_input(features, symbols)                      # (n, F+1)
    base   = {m: ens.predict_stage(m, X, h) for m in BASE_MODELS}   # raw outputs
    meta_X = ens.meta_input(X, base, h)
    meta   = ens.predict_stage("meta_model", meta_X, h)             # probs + calibrated confidence
    out    = ens.compose(features, symbols, closes, open_times, h, {**base, "meta_model": meta})

Raw stage outputs (columns, see ``training.transforms``):
- ``range_predictor`` (n, 8): high 10%/50%/90% quantiles, low 10%/50%/90%, then the high and low
  mean forecasts (NaN for a model set trained without mean boosters), fractions of close;
- ``tpsl_classifier`` (n, 2): P(take-profit before stop-loss) long, short;
- ``signal_classifier`` (n, 3): P(SELL), P(HOLD), P(BUY);
- ``meta_model`` (n, 4): final P(SELL), P(HOLD), P(BUY) and the calibrated confidence of the argmax.

Rows whose features are undefined (warm-up, a long data gap) or whose close is missing become
HOLD with confidence 0, a ``reason`` code (``FORCED_HOLD_REASONS``) and a ``reason_detail`` for
people; their range fields are NaN (serving answers 503 for them); a symbol the models do not know
takes a default ``symbol_id`` (``configs.symbols.model_symbol``). Nothing
is guessed. A HOLD the models chose carries a code too (``MODEL_HOLD_REASONS``: ``model_hold``,
``low_confidence``), so every HOLD says why; only BUY and SELL have ``reason`` None.

Entry, take-profit and stop-loss: entry is the close; TP/SL are the ATR barriers of
:func:`features.labels.barrier_distances` (``atr_14`` feature column, the same barriers the TP/SL
classifier was trained on, so ``p_tp_long``/``p_tp_short`` are the probabilities of exactly those
prices being hit first). BUY uses the long barriers, SELL the short ones; HOLD reports the would-be
long's barriers (entry = close), or ``None`` when the row is undefined.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from configs.settings import Settings
from configs.symbols import model_symbol
from features.errors import ModelLoadError, PredictionError
from features.indicators import feature_names, feature_set_hash
from features.labels import SIGNAL_CLASSES, barrier_distances
from training.registry import MODEL_NAMES, LoadedModel, ModelRegistry
from training.transforms import (META_OUTPUTS, RANGE_OUTPUTS, SIGNAL_OUTPUTS, TPSL_OUTPUTS, VOL_FEATURE,
                                 apply_calibration, meta_columns, meta_matrix, model_columns, range_output)

BASE_MODELS: tuple[str, ...] = ("range_predictor", "tpsl_classifier", "signal_classifier")
OUTPUT_COLUMNS: dict[str, tuple[str, ...]] = {"range_predictor": RANGE_OUTPUTS, "tpsl_classifier": TPSL_OUTPUTS,
                                              "signal_classifier": SIGNAL_OUTPUTS, "meta_model": META_OUTPUTS}


def booster_name(target: str, horizon: int, symbol: str | None = None) -> str:
    """File stem of one booster: ``high_h6``, ``tp_long_h18``, ``meta_h72`` (``..__BTCUSDT`` per symbol)."""
    return f"{target}_h{horizon}" + (f"__{symbol}" if symbol else "")


# The boosters behind each model's stage output, in output order.
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
#   model_hold      the meta-model's most likely class is HOLD
#   low_confidence  its most likely class is BUY or SELL, but the calibrated confidence is below
#                   ``Settings.signal_min_confidence`` (MLE_SIGNAL_MIN_CONFIDENCE)
MODEL_HOLD_REASONS: tuple[str, ...] = ("model_hold", "low_confidence")
HOLD_REASONS: tuple[str, ...] = FORCED_HOLD_REASONS + MODEL_HOLD_REASONS

_FORCED = frozenset(FORCED_HOLD_REASONS)

MODEL_TARGETS: dict[str, tuple[str, ...]] = {"range_predictor": ("high", "low"),
                                             "tpsl_classifier": ("tp_long", "tp_short"),
                                             "signal_classifier": ("signal",), "meta_model": ("meta",)}


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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; NaN becomes ``None`` (JSON has no NaN)."""
        d = asdict(self)
        d["signal_probs"] = list(self.signal_probs)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        d["signal_probs"] = [None if not math.isfinite(p) else p for p in self.signal_probs]
        return d


class Ensemble:
    """The four current models, verified and mutually consistent, with the staged inference API."""

    def __init__(self, models: Mapping[str, LoadedModel], settings: Settings) -> None:
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
        self._vol_index = self.feature_names.index(VOL_FEATURE)
        self._calibration = {h: self.models["meta_model"].documents[f"calibration_h{h}"] for h in self.horizons}

    @classmethod
    def load(cls, models_dir: Path, settings: Settings) -> "Ensemble":
        """Load the current version of each model (ModelNotFoundError / ModelLoadError otherwise)."""
        registry = ModelRegistry(models_dir, feature_set_hash(settings.features))
        return cls({name: registry.load(name) for name in MODEL_NAMES}, settings)

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
            expected = {booster_name(t, h, s) for t in MODEL_TARGETS[name] for h in ref["horizons"]
                        for s in (ref["symbols"] if ref["per_symbol"] else [None])}
            missing = expected - set(self.models[name].boosters)
            if missing:
                raise ModelLoadError(f"{name} {self.versions[name]}: boosters missing: {sorted(missing)}")
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

    def _predict(self, model: str, target: str, horizon: int, X: np.ndarray, width: int,
                 optional: bool = False) -> np.ndarray:
        """One booster's output as (n, width), routed by symbol when models are per symbol
        (``optional``: NaN when the model set has no such booster, e.g. mean boosters of older sets)."""
        boosters = self.models[model].boosters
        n = len(X)
        out = np.full((n, width), np.nan)
        if n == 0 or (optional and booster_name(target, horizon, self.symbols[0] if self.per_symbol else None)
                      not in boosters):
            return out
        if not self.per_symbol:
            groups = [(None, np.ones(n, dtype=bool))]
        else:
            sym = X[:, -1]
            groups = [(s, sym == code) for s, code in self._symbol_code.items()]
        for symbol, rows in groups:
            if not rows.any():
                continue
            pred = boosters[booster_name(target, horizon, symbol)].inplace_predict(X[rows])
            out[rows] = np.asarray(pred, dtype=np.float64).reshape(int(rows.sum()), width)
        return out

    def predict_stage(self, model_name: str, X: np.ndarray, horizon: int) -> np.ndarray:
        """Raw outputs of one model for n rows (see the module docstring for the columns)."""
        horizon = self._check_horizon(horizon)
        X = np.asarray(X, dtype=np.float64)
        if model_name == "range_predictor":
            return range_output(self._predict(model_name, "high", horizon, X, 3),
                                self._predict(model_name, "low", horizon, X, 3), X[:, self._vol_index], horizon,
                                self._predict(model_name, "high_mean", horizon, X, 1, optional=True),
                                self._predict(model_name, "low_mean", horizon, X, 1, optional=True))
        if model_name == "tpsl_classifier":
            return np.hstack([self._predict(model_name, t, horizon, X, 1) for t in ("tp_long", "tp_short")])
        if model_name == "signal_classifier":
            return self._predict(model_name, "signal", horizon, X, 3)
        if model_name == "meta_model":
            probs = self._predict(model_name, "meta", horizon, X, 3)
            raw_conf = probs.max(axis=1) if len(probs) else np.empty(0)
            conf = np.clip(apply_calibration(self._calibration[horizon], raw_conf), 0.0, 1.0)
            return np.hstack([probs, conf[:, None]])
        raise PredictionError(f"unknown model {model_name!r}; one of {MODEL_NAMES}")

    def meta_input(self, X: np.ndarray, base_outputs: Mapping[str, np.ndarray], horizon: int) -> np.ndarray:
        """The meta-model's input: base outputs (range in volatility units), regime features, symbol."""
        self._check_horizon(horizon)
        return meta_matrix(np.asarray(X, dtype=np.float64), self.columns, base_outputs, horizon)

    def predict_arrays(self, features: np.ndarray, symbols: Sequence[str], horizon: int) -> dict[str, np.ndarray]:
        """Every stage in-process: ``{model_name: raw output}`` for n rows."""
        X = self.model_input(features, symbols)
        outputs = {m: self.predict_stage(m, X, horizon) for m in BASE_MODELS}
        outputs["meta_model"] = self.predict_stage("meta_model", self.meta_input(X, outputs, horizon), horizon)
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
        for name in (*BASE_MODELS, "meta_model"):
            if name not in outputs or len(outputs[name]) != n:
                raise PredictionError(f"compose needs {name} outputs for all {n} rows")
        rng, tpsl, meta = (np.asarray(outputs[m], dtype=np.float64)
                           for m in ("range_predictor", "tpsl_classifier", "meta_model"))
        symbols = np.asarray([str(s) for s in symbols], dtype=object)
        times = np.asarray(candle_open_times, dtype=np.int64)
        atr = features[:, self._vol_index] if n else np.empty(0)
        tp_d, sl_d = barrier_distances(atr, horizon, self.settings.labels)

        # Why a row has no forecast, in order of precedence (the first that applies is reported).
        missing = (~np.isfinite(features)).sum(axis=1) if n else np.zeros(0, dtype=np.int64)
        with np.errstate(invalid="ignore"):
            good_close = np.isfinite(closes) & (closes > 0)
        good_output = np.isfinite(rng[:, :len(RANGE_OUTPUTS)]).all(axis=1) & np.isfinite(meta).all(axis=1)
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

        probs = np.where(ok[:, None], meta[:, :3], np.nan)
        k = np.argmax(np.where(ok[:, None], meta[:, :3], 0.0), axis=1) if n else np.zeros(0, dtype=np.int64)
        signal = np.where(ok, np.asarray(SIGNAL_CLASSES, dtype=object)[k], "HOLD").astype(object)
        confidence = np.where(ok, meta[:, 3], 0.0)
        self._model_holds(ok, signal, confidence, reason, detail)
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
            "signal_probs": probs, "signal_type": signal,
            "confidence": confidence, "entry_price": closes,
            "take_profit": defined(tp), "stop_loss": defined(sl), "reason": reason, "reason_detail": detail,
            "pred_high_mean_pct": defined(rng[:, 6]), "pred_low_mean_pct": defined(rng[:, 7]),
        }

    def _model_holds(self, ok: np.ndarray, signal: np.ndarray, confidence: np.ndarray, reason: np.ndarray,
                     detail: np.ndarray) -> None:
        """The reasons of the HOLDs the models chose (in place): ``model_hold`` where the meta-model's
        most likely class is HOLD; ``low_confidence`` where it is BUY or SELL below the confidence floor
        (the signal becomes HOLD; its confidence stays the model's, so a client sees how far below)."""
        floor = float(self.settings.signal_min_confidence)
        held = ok & (signal == "HOLD")
        weak = ok & (signal != "HOLD") & (confidence < floor)
        reason[held], detail[held] = "model_hold", "the meta-model's most likely class is HOLD"
        if weak.any():
            for side in ("BUY", "SELL"):
                rows = weak & (signal == side)
                reason[rows] = "low_confidence"
                detail[rows] = f"{side} below the confidence floor {floor:g} (MLE_SIGNAL_MIN_CONFIDENCE)"
            signal[weak] = "HOLD"

    def compose(self, features: np.ndarray, symbols: Sequence[str], closes: Sequence[float],
                candle_open_times: Sequence[int], horizon: int,
                outputs: Mapping[str, np.ndarray]) -> list[Forecast]:
        """Turn stage outputs into Forecasts (pure: no model is called here)."""
        c = self.compose_columns(features, symbols, closes, candle_open_times, horizon, outputs)
        horizon = int(horizon)
        versions = self.versions
        lists = {k: v.tolist() for k, v in c.items()}  # Python floats/ints/strs, once per column
        forecasts: list[Forecast] = []
        for i in range(len(lists["symbol"])):
            ok = lists["reason"][i] not in _FORCED
            forecasts.append(Forecast(
                lists["symbol"][i], horizon, lists["candle_open_time"][i], lists["close"][i],
                lists["pred_high_pct"][i], lists["pred_low_pct"][i], lists["high_lower"][i],
                lists["high_upper"][i], lists["low_lower"][i], lists["low_upper"][i], lists["p_tp_long"][i],
                lists["p_tp_short"][i], tuple(lists["signal_probs"][i]), lists["signal_type"][i],
                lists["confidence"][i], lists["entry_price"][i], lists["take_profit"][i] if ok else None,
                lists["stop_loss"][i] if ok else None, lists["reason"][i], dict(versions),
                lists["reason_detail"][i], lists["pred_high_mean_pct"][i], lists["pred_low_mean_pct"][i]))
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
