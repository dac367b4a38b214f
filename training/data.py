"""Data preparation for training and evaluation: features + labels + symbol, and purged splits.

Both training engines (plain and Ray) and the evaluator call this module, so they see exactly the
same rows. Nothing here fits a model or touches the registry (FreqAI-style separation).

Leak rules enforced here:
- features at row t use candles <= t (features/), labels use t+1..t+h (features/labels.py);
- ``end``: candles after it are cut *before* labels are computed, so no label peeks past it;
- walk-forward splits are by time, expanding, and every boundary (fit | validation | test) is
  separated by an embargo of at least the longest horizon: a training row's label window ends
  strictly before the first row on the other side of the boundary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from configs.settings import Settings
from features.barriers import barrier_inputs, barrier_sigma, fit_barrier_model
from features.batch import build_features
from features.candles import FIVE_MINUTES_MS, load_candles
from features.costs import Costs
from configs.errors import ConfigError
from features.indicators import feature_names
from features.labels import build_labels
from features.volatility import har_target
from inference.transforms import model_columns

_SYMBOL = re.compile(r"^[A-Z0-9]+$")


def parse_candle_args(specs: Sequence[str]) -> dict[str, Path]:
    """``SYMBOL_5m.parquet`` (symbol = file name up to the first ``_``) or ``SYMBOL=path``."""
    out: dict[str, Path] = {}
    for spec in specs:
        if "=" in spec:
            symbol, path = spec.split("=", 1)
        else:
            path = spec
            symbol = Path(spec).name.split("_", 1)[0]
        symbol = symbol.strip().upper()
        if not _SYMBOL.match(symbol):
            raise ConfigError(f"cannot tell the symbol of {spec!r}: name files SYMBOL_5m.parquet or pass SYMBOL=path")
        if symbol in out:
            raise ConfigError(f"symbol {symbol} given twice ({out[symbol]} and {path})")
        out[symbol] = Path(path)
    if not out:
        raise ConfigError("no candle files given")
    return out


def load_histories(paths: Mapping[str, Path]) -> dict[str, pd.DataFrame]:
    return {symbol: load_candles(path) for symbol, path in paths.items()}


def symbol_order(symbols: Sequence[str], settings: Settings) -> tuple[str, ...]:
    """Model symbol codes: the configured symbols first (stable codes), then any others sorted."""
    known = [s for s in settings.market.symbols if s in symbols]
    return tuple(known + sorted(set(symbols) - set(known)))


@dataclass
class Prepared:
    """Rows with defined features, sorted by (open_time, symbol). Labels may be NaN (end, gaps)."""

    X: np.ndarray                 # (n, F+1) float32: features + symbol code
    columns: tuple[str, ...]      # model input columns
    feature_names: tuple[str, ...]
    labels: pd.DataFrame          # build_labels columns, RangeIndex aligned with X
    open_time: np.ndarray         # int64 ms
    symbol: np.ndarray            # str per row
    close: np.ndarray             # float64
    symbols: tuple[str, ...]      # symbol code order
    barrier_models: dict[str, dict] = field(default_factory=dict)  # {str(h): features.barriers model}

    def __len__(self) -> int:
        return len(self.open_time)

    def take(self, rows: np.ndarray) -> "Prepared":
        return Prepared(self.X[rows], self.columns, self.feature_names, self.labels.iloc[rows].reset_index(drop=True),
                        self.open_time[rows], self.symbol[rows], self.close[rows], self.symbols,
                        self.barrier_models)

    def data_range(self) -> dict[str, str]:
        def iso(ms: int) -> str:
            return pd.Timestamp(int(ms), unit="ms", tz="UTC").isoformat()

        return {"start": iso(self.open_time.min()), "end": iso(self.open_time.max()), "rows": int(len(self))}


def to_ms(when: str | None) -> int | None:
    """'2025-01-01' (UTC) -> epoch ms, None stays None."""
    if when is None:
        return None
    ts = pd.Timestamp(when)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value // 1_000_000)


def prepare(candles: Mapping[str, pd.DataFrame], settings: Settings, symbols: Sequence[str] | None = None,
            start_ms: int | None = None, end_ms: int | None = None,
            barrier_models: Mapping[str, dict] | None = None) -> Prepared:
    """Features, labels and the symbol column for every symbol, concatenated and time-sorted.

    ``end_ms``: candles opening at or after it are dropped before features and labels are computed
    (labels near the end become NaN instead of peeking). ``start_ms``: rows before it are dropped
    after the features are computed (earlier candles only warm the indicators up).
    ``symbols`` fixes the symbol code order (a trained model's list); default from the settings.
    ``barrier_models``: the trade labels' volatility models (a trained set's, for evaluation); None
    fits them here (:func:`fit_barrier_models`). Costs: the settings' fee profile.
    """
    order = tuple(symbols) if symbols is not None else symbol_order(list(candles), settings)
    codes = {s: i for i, s in enumerate(order)}
    names = feature_names(settings.features)
    horizons = settings.market.horizons
    per: dict[str, tuple[pd.DataFrame, np.ndarray, np.ndarray]] = {}
    for symbol, df in candles.items():
        if end_ms is not None:
            df = df[df["open_time"] < end_ms]
        feats = build_features(df, settings.features).to_numpy()
        keep = np.isfinite(feats).all(axis=1)
        if start_ms is not None:
            keep &= df["open_time"].to_numpy() >= start_ms
        per[symbol] = (df, feats, keep)
    if barrier_models is None:
        barrier_models = fit_barrier_models(per, names, horizons, settings.models.min_train_fraction)
    costs = Costs.from_settings(settings)
    parts_X, parts_lab, parts_t, parts_sym, parts_close = [], [], [], [], []
    for symbol, (df, feats, keep) in per.items():
        sigma = {h: barrier_sigma(barrier_models[str(h)], feats, names) for h in horizons}
        labels = build_labels(df, horizons, settings.labels, sigma, costs)
        n = int(keep.sum())
        code = codes.get(symbol, np.nan)
        parts_X.append(np.hstack([feats[keep], np.full((n, 1), code)]).astype(np.float32))
        parts_lab.append(labels[keep].reset_index(drop=True))
        parts_t.append(df["open_time"].to_numpy(np.int64)[keep])
        parts_sym.append(np.full(n, symbol, dtype=object))
        parts_close.append(df["close"].to_numpy(np.float64)[keep])
    t = np.concatenate(parts_t)
    sym = np.concatenate(parts_sym)
    sym_code = np.array([codes.get(s, len(codes)) for s in sym])
    order_rows = np.lexsort((sym_code, t))
    return Prepared(X=np.vstack(parts_X)[order_rows], columns=model_columns(names), feature_names=tuple(names),
                    labels=pd.concat(parts_lab, ignore_index=True).iloc[order_rows].reset_index(drop=True),
                    open_time=t[order_rows], symbol=sym[order_rows],
                    close=np.concatenate(parts_close)[order_rows], symbols=order,
                    barrier_models={k: dict(v) for k, v in barrier_models.items()})


def fit_barrier_models(per: Mapping[str, tuple[pd.DataFrame, np.ndarray, np.ndarray]], names: Sequence[str],
                       horizons: Sequence[int], min_train_fraction: float) -> dict[str, dict]:
    """The barrier volatility model of every horizon (``features.barriers``), one for all symbols (log
    volatilities are scale-free), fitted on the rows whose target window ``t+1 .. t+h`` ends before
    the first walk-forward test block (the first ``min_train_fraction`` of the timeline): no test
    row's label depends on a coefficient fitted on its own or later candles."""
    times = np.unique(np.concatenate([df["open_time"].to_numpy(np.int64)[keep] for df, _, keep in per.values()]))
    cutoff = times[min(len(times) - 1, int(len(times) * min_train_fraction))]
    out: dict[str, dict] = {}
    for h in horizons:
        xs, ys = [], []
        for df, feats, keep in per.values():
            t = df["open_time"].to_numpy(np.int64)
            rows = keep & (t + int(h) * FIVE_MINUTES_MS < cutoff)
            y = har_target(t, *(df[k].to_numpy(np.float64) for k in ("high", "low", "close")), int(h))
            xs.append(barrier_inputs(feats[rows], names))
            ys.append(y[rows])
        out[str(h)] = fit_barrier_model(np.vstack(xs), np.concatenate(ys))
    return out


# ---- purged, embargoed walk-forward ------------------------------------------------------------------
@dataclass(frozen=True)
class Fold:
    """Row indices of one walk-forward fold: fit (boosting), val (early stopping), test (scoring)."""

    index: int
    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _before(open_time: np.ndarray, boundary_ms: int, embargo: int) -> np.ndarray:
    """Rows whose label window (t+1 .. t+embargo candles) ends strictly before ``boundary_ms``."""
    return open_time + embargo * FIVE_MINUTES_MS < boundary_ms


def split_tail(open_time: np.ndarray, rows: np.ndarray, fraction: float, embargo: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` (sorted by time) into (head, tail): the tail is the last ``fraction`` of their
    timeline, and head rows are purged so their label windows end before the tail's first candle."""
    if len(rows) == 0:
        return rows, rows
    times = np.unique(open_time[rows])
    boundary = times[min(len(times) - 1, int(len(times) * (1 - fraction)))]
    tail = rows[open_time[rows] >= boundary]
    head = rows[_before(open_time[rows], boundary, embargo)]
    return head, tail


def walk_forward_splits(open_time: np.ndarray, n_folds: int, embargo: int, min_train_fraction: float,
                        validation_fraction: float) -> list[Fold]:
    """Expanding-window folds over time (``open_time`` sorted ascending).

    The timeline after ``min_train_fraction`` is cut into ``n_folds`` consecutive test blocks. For
    block k the train window is every row whose label window ends before the block (purge +
    embargo of ``embargo`` candles); its last ``validation_fraction`` is the early-stopping tail,
    itself separated from the fit rows by the same embargo. The test block is never used to fit or
    to stop.
    """
    times = np.unique(open_time)
    if len(times) < 10 * max(1, n_folds):
        raise ConfigError(f"walk-forward needs more data: {len(times)} time steps for {n_folds} folds")
    rows = np.arange(len(open_time))
    folds: list[Fold] = []
    for k in range(n_folds):
        lo = int(len(times) * (min_train_fraction + (1 - min_train_fraction) * k / n_folds))
        hi = int(len(times) * (min_train_fraction + (1 - min_train_fraction) * (k + 1) / n_folds))
        start = times[lo]
        end = times[hi] if hi < len(times) else np.iinfo(np.int64).max
        test = rows[(open_time >= start) & (open_time < end)]
        train = rows[_before(open_time, start, embargo)]
        fit, val = split_tail(open_time, train, validation_fraction, embargo)
        folds.append(Fold(k, fit, val, test))
    return folds


def subsample_stride(open_time: np.ndarray, rows: np.ndarray, max_rows: int) -> np.ndarray:
    """At most ~``max_rows`` of ``rows``, keeping every k-th 5-minute slot (all symbols of a slot).

    Neighbouring rows share almost all of their label window, so a time stride loses little
    information while making fits on years of history affordable on two cores. Deterministic,
    hence identical in both training engines.
    """
    if len(rows) <= max_rows:
        return rows
    stride = math.ceil(len(rows) / max_rows)
    slot = open_time[rows] // FIVE_MINUTES_MS
    return rows[slot % stride == 0]
