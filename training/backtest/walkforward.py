"""Walk-forward backtests: refit on an expanding window, trade each period only with unseen models.

The backtest range ``[start, end)`` is cut into consecutive calendar periods (``--wf-months`` long).
For period k a fresh model set is fitted on the candles that open strictly before
``period_start - embargo`` (embargo = the longest label horizon, in candles), so the last training
label window ends at least ``embargo`` candles before the first traded candle; the training
engine's own early-stopping split sits inside that window. Period k is then forecast by that
model set only. Every signal row carries ``wf_period`` and :func:`check_unseen` refuses a table
in which any row was forecast by a model whose training candles reach its period.

The fit itself is injected (``Fit``): the CLI passes the training engineer's plain engine; the
structural tests pass a recorder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from configs.settings import Settings
from features.candles import FIVE_MINUTES_MS
from training.backtest.signals import Forecaster, SignalTable, signal_table

log = logging.getLogger("training.backtest")


@dataclass(frozen=True)
class Period:
    """One walk-forward step: the model is fitted on candles opening before ``train_end_ms`` and
    trades candles opening in ``[test_start_ms, test_end_ms)``."""

    index: int
    test_start_ms: int
    test_end_ms: int
    train_end_ms: int

    def describe(self) -> dict[str, Any]:
        iso = lambda ms: pd.Timestamp(ms, unit="ms", tz="UTC").isoformat()  # noqa: E731
        return {"index": self.index, "test_start": iso(self.test_start_ms), "test_end": iso(self.test_end_ms),
                "train_candles_before": iso(self.train_end_ms)}


# fit(training candles per symbol, the period) -> a model set that can forecast
Fit = Callable[[Mapping[str, pd.DataFrame], Period], Forecaster]


def make_periods(start_ms: int, end_ms: int, length: pd.DateOffset, embargo_candles: int) -> list[Period]:
    """Consecutive periods of ``length`` (e.g. ``pd.DateOffset(months=3)``) from ``start_ms``; the
    last one ends at ``end_ms``."""
    if end_ms <= start_ms:
        raise ValueError("walk-forward needs data after the start date")
    out: list[Period] = []
    lo = pd.Timestamp(start_ms, unit="ms", tz="UTC")
    while int(lo.value // 1_000_000) < end_ms:
        hi = lo + length
        if hi <= lo:
            raise ValueError("walk-forward periods must have a positive length")
        a, b = int(lo.value // 1_000_000), min(int(hi.value // 1_000_000), end_ms)
        out.append(Period(len(out), a, b, a - embargo_candles * FIVE_MINUTES_MS))
        lo = hi
    return out


def training_candles(candles: Mapping[str, pd.DataFrame], period: Period) -> dict[str, pd.DataFrame]:
    """The candles a period's model may learn from (labels computed on them cannot see past the cut)."""
    out = {}
    for s, c in candles.items():
        keep = c[c["open_time"] < period.train_end_ms]
        if len(keep):
            out[s] = keep.reset_index(drop=True)
    return out


def check_unseen(signals: pd.DataFrame, periods: Sequence[Period], embargo_candles: int) -> None:
    """Raise ``AssertionError`` if a signal was made by a model that saw its candle (or its embargo)."""
    if signals.empty:
        return
    by_index = {p.index: p for p in periods}
    t = signals["open_time"].to_numpy(np.int64)
    k = signals["wf_period"].to_numpy(np.int64)
    start = np.array([by_index[i].test_start_ms for i in k])
    end = np.array([by_index[i].test_end_ms for i in k])
    train_end = np.array([by_index[i].train_end_ms for i in k])
    if ((t < start) | (t >= end)).any():
        raise AssertionError("a walk-forward signal lies outside its model's test period")
    # Last training candle opens before train_end; its label window ends before train_end + horizon.
    if (train_end + embargo_candles * FIVE_MINUTES_MS > start).any():
        raise AssertionError("a walk-forward model's training window reaches into its test period")


def walk_forward_table(candles: Mapping[str, pd.DataFrame], features: Mapping[str, pd.DataFrame], fit: Fit,
                       periods: Sequence[Period], horizons: Sequence[int], embargo_candles: int,
                       feature_columns: Sequence[str] = (), progress: Any = None,
                       strategies: Mapping[str, Any] | None = None) -> tuple[SignalTable, list[dict[str, Any]]]:
    """Fit per period, forecast that period only, and merge the periods' signal tables."""
    tables: list[SignalTable] = []
    info: list[dict[str, Any]] = []
    for p in periods:
        train = training_candles(candles, p)
        last_train = max((int(c["open_time"].iloc[-1]) for c in train.values()), default=None)
        if last_train is not None and last_train >= p.train_end_ms:
            raise AssertionError("training candles past the period's cut")  # training_candles guarantees it
        t0 = time.perf_counter()
        log.info("walk-forward period %d/%d: fitting on candles before %s", p.index + 1, len(periods),
                 p.describe()["train_candles_before"])
        model = fit(train, p)
        log.info("walk-forward period %d/%d: fitted in %.0fs; forecasting %s .. %s", p.index + 1, len(periods),
                 time.perf_counter() - t0, p.describe()["test_start"], p.describe()["test_end"])
        tables.append(signal_table(model, candles, features, horizons, p.test_start_ms, p.test_end_ms,
                                   feature_columns, progress, tag={"wf_period": p.index}, strategies=strategies))
        d = p.describe()
        d["train_candles"] = {s: int(len(c)) for s, c in train.items()}
        d["last_train_candle"] = (pd.Timestamp(last_train, unit="ms", tz="UTC").isoformat()
                                  if last_train is not None else None)
        d["model_versions"] = dict(getattr(model, "versions", {}) or {})
        info.append(d)
    signals = pd.concat([t.signals for t in tables], ignore_index=True) if tables else pd.DataFrame()
    check_unseen(signals, periods, embargo_candles)
    eligible = {s: np.concatenate([t.eligible.get(s, np.zeros(0, np.int64)) for t in tables]) for s in candles}
    volatility = {s: np.concatenate([t.volatility.get(s, np.zeros(0)) for t in tables]) for s in candles}
    eligible_features = {s: pd.concat([t.eligible_features[s] for t in tables if s in t.eligible_features],
                                      ignore_index=True) for s in candles
                         if any(s in t.eligible_features for t in tables)}
    counts: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    for t in tables:
        for h, cnt in t.counts.items():
            for k, v in cnt.items():
                counts.setdefault(h, {}).setdefault(k, 0)
                counts[h][k] += v
        for k, v in t.hold_reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    return SignalTable(signals, eligible, counts, reasons, volatility, eligible_features), info


def trained_until(metadata: Mapping[str, Mapping[str, Any]]) -> int | None:
    """Latest training-data candle of a model set (max over its models' ``data_range.end``), or None."""
    ends = [int(pd.Timestamp(m["data_range"]["end"]).value // 1_000_000)
            for m in metadata.values() if (m.get("data_range") or {}).get("end")]
    return max(ends) if ends else None


def plain_engine_fit(candles: Mapping[str, Path], settings: Settings, work_dir: Path, *, rounds: int | None = None,
                     folds: int | None = None) -> Fit:
    """A ``Fit`` that trains with the plain engine (``training.train.train`` with ``end=<period cut>``
    on the candle files ``candles``, symbol -> path; ``training.data.prepare`` cuts the candles before
    labels are computed) into ``work_dir/period_<k>``, with ``rounds``/``folds`` overriding the model
    section, loads the result with the serving ``Ensemble`` and checks from its metadata that it saw
    nothing at or after the cut."""
    from inference.ensemble import Ensemble
    from training.train import train, training_engine, with_overrides

    train_settings = with_overrides(settings, rounds=rounds, folds=folds)

    def fit(train_candles: Mapping[str, pd.DataFrame], period: Period) -> Forecaster:
        out = Path(work_dir) / f"period_{period.index}"
        cut = pd.Timestamp(period.train_end_ms, unit="ms", tz="UTC").isoformat()
        with training_engine("plain") as engine:
            train(train_settings, candles, engine, out=out, end=cut)
        ens = Ensemble.load(out, settings)
        last = trained_until(ens.metadata)
        if last is None or last >= period.train_end_ms:
            raise AssertionError(f"walk-forward model for period {period.index} was trained on data up to "
                                 f"{last}, past its cut {cut}")
        return ens

    return fit
