"""What the one pydantic ``Forecast`` (issue 16) costs against the dataclass path it replaced.

    .venv/bin/python bench/forecast_path.py [--symbols 200] [--rounds 15]

The old path (a frozen dataclass -> ``to_dict`` -> canonical-JSON HMAC entry -> dict -> rendered
dicts -> ``forecast_from_dict`` for the log hook) is kept below *only* as this benchmark's baseline,
copied from the code before the change. Both paths run in the same process on the same stage
outputs of the shipped models (``--symbols`` rows per horizon: 200 x 4 = 800 rows, the candle close
of the HA configuration), alternating round by round; the figures are medians over rounds.

Measured:
1. compose at candle close: stage outputs -> forecasts for every horizon (``Ensemble.compose``);
   the new path also with full validation (``Forecast(**fields)``), to show what model_construct saves;
2. the candle close's serialisation: per forecast the Redis entry and the ``signals:{symbol}`` message;
3. per request, a Redis hit (another replica wrote the entry): verify + parse the entry, render the
   /predictions body, and (old path) rebuild the log hook's Forecast;
4. per request, a computed answer: entry written, body rendered (old: and the log hook's Forecast);
5. per request, the hot path (the ingress's memory, ~1000 req/s in HA mode): the rendered prefix
   plus the per-request fields -- the same code in both paths, shown to say it did not change.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402

from configs.settings import get_settings  # noqa: E402
from deployments.cache import make_entry, read_entry  # noqa: E402
from deployments.launcher import SHIPPED_MODELS  # noqa: E402
from deployments.render import body_prefix, finish, prediction_body, signal_body, signal_message  # noqa: E402
from deployments.state import iso_time  # noqa: E402
from features.batch import build_features  # noqa: E402
from features.candles import load_candles  # noqa: E402
from inference.ensemble import _FORCED, Ensemble  # noqa: E402
from inference.forecast import FORECAST_FIELDS, Forecast  # noqa: E402

SECRET, FEATURE_SET = b"bench-secret", "bench-feature-set"


# ---- the old path (baseline only) -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OldForecast:
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
    model_versions: dict[str, str] = dataclasses.field(default_factory=dict)
    reason_detail: str | None = None
    pred_high_mean_pct: float = float("nan")
    pred_low_mean_pct: float = float("nan")
    expected_r: float = float("nan")
    cost_r: float = float("nan")
    p_win: float = float("nan")
    fee_profile: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["signal_probs"] = list(self.signal_probs)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        d["signal_probs"] = [None if not math.isfinite(p) else p for p in self.signal_probs]
        return d


def old_compose(ens: Ensemble, c: dict[str, np.ndarray], horizon: int) -> list[OldForecast]:
    lists = {k: v.tolist() for k, v in c.items()}
    out = []
    for i in range(len(lists["symbol"])):
        ok = lists["reason"][i] not in _FORCED
        out.append(OldForecast(
            lists["symbol"][i], horizon, lists["candle_open_time"][i], lists["close"][i],
            lists["pred_high_pct"][i], lists["pred_low_pct"][i], lists["high_lower"][i],
            lists["high_upper"][i], lists["low_lower"][i], lists["low_upper"][i], lists["p_tp_long"][i],
            lists["p_tp_short"][i], tuple(lists["signal_probs"][i]), lists["signal_type"][i],
            lists["confidence"][i], lists["entry_price"][i], lists["take_profit"][i] if ok else None,
            lists["stop_loss"][i] if ok else None, lists["reason"][i], dict(ens.versions),
            lists["reason_detail"][i], lists["pred_high_mean_pct"][i], lists["pred_low_mean_pct"][i],
            lists["expected_r"][i], lists["cost_r"][i], lists["p_win"][i], lists["fee_profile"][i]))
    return out


def _old_signature(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hmac.new(SECRET, canonical.encode(), hashlib.sha256).hexdigest()


def old_make_entry(d: dict[str, Any]) -> str:
    body = {**d, "feature_set_hash": FEATURE_SET}
    return json.dumps({**body, "sig": _old_signature(body)}, allow_nan=False)


def old_read_entry(raw: str) -> dict[str, Any] | None:
    """The old reader's work on a valid entry: parse, canonical re-dump + HMAC, validate, dump."""
    data = json.loads(raw)
    body = {k: v for k, v in data.items() if k != "sig"}
    if not hmac.compare_digest(_old_signature(body), data["sig"]):
        return None
    entry = OLD_CACHE_ENTRY.model_validate(data)
    return entry.model_dump(exclude={"feature_set_hash", "sig"})


def _old_cache_entry_model():
    """The old ``CacheEntry``: every Forecast field re-listed with its checks."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class CacheEntry(BaseModel):
        model_config = ConfigDict(extra="forbid")
        symbol: str
        horizon: int
        candle_open_time: int
        close: float = Field(gt=0, allow_inf_nan=False)
        pred_high_pct: Optional[float] = Field(allow_inf_nan=False)
        pred_low_pct: Optional[float] = Field(allow_inf_nan=False)
        high_lower: Optional[float] = Field(allow_inf_nan=False)
        high_upper: Optional[float] = Field(allow_inf_nan=False)
        low_lower: Optional[float] = Field(allow_inf_nan=False)
        low_upper: Optional[float] = Field(allow_inf_nan=False)
        p_tp_long: Optional[float] = Field(allow_inf_nan=False)
        p_tp_short: Optional[float] = Field(allow_inf_nan=False)
        signal_probs: list[Optional[float]] = Field(min_length=3, max_length=3)
        signal_type: str
        confidence: Optional[float] = Field(ge=0, le=1, allow_inf_nan=False)
        entry_price: Optional[float] = Field(allow_inf_nan=False)
        take_profit: Optional[float] = Field(allow_inf_nan=False)
        stop_loss: Optional[float] = Field(allow_inf_nan=False)
        reason: Optional[str]
        model_versions: dict[str, str]
        reason_detail: Optional[str] = None
        pred_high_mean_pct: Optional[float] = Field(default=None, allow_inf_nan=False)
        pred_low_mean_pct: Optional[float] = Field(default=None, allow_inf_nan=False)
        expected_r: Optional[float] = Field(default=None, allow_inf_nan=False)
        cost_r: Optional[float] = Field(default=None, allow_inf_nan=False)
        p_win: Optional[float] = Field(default=None, ge=0, le=1, allow_inf_nan=False)
        fee_profile: Optional[str] = None
        feature_set_hash: str
        sig: str

        @field_validator("signal_probs")
        @classmethod
        def _probs(cls, v):
            if any(p is not None and not (math.isfinite(p) and 0 <= p <= 1) for p in v):
                raise ValueError("probabilities must be in [0, 1]")
            return v

    return CacheEntry


OLD_CACHE_ENTRY = _old_cache_entry_model()


def old_forecast_from_dict(d: dict[str, Any]) -> OldForecast:
    nan = float("nan")
    fields = dict(d)
    for k in ("close", "pred_high_pct", "pred_low_pct", "high_lower", "high_upper", "low_lower", "low_upper",
              "p_tp_long", "p_tp_short", "confidence", "entry_price", "pred_high_mean_pct", "pred_low_mean_pct",
              "expected_r", "cost_r", "p_win"):
        if fields.get(k) is None:
            fields[k] = nan
    fields["signal_probs"] = tuple(nan if p is None else p for p in (d.get("signal_probs") or (None,) * 3))
    return OldForecast(**fields)


def old_prediction_body(f: dict[str, Any], coverage: float) -> dict[str, Any]:
    close = float(f["close"])

    def price(frac: float) -> float:
        return close * (1.0 + frac)

    means = {}
    for side in ("high", "low"):
        v = f.get(f"pred_{side}_mean_pct")
        ok = v is not None and math.isfinite(v)
        means[f"predicted_{side}_mean"] = price(v) if ok else None
        means[f"predicted_{side}_mean_pct"] = v * 100 if ok else None
    versions = f.get("model_versions") or {}
    return {"symbol": f["symbol"], "horizon": f["horizon"], "horizon_minutes": f["horizon"] * 5,
            "candle_open_time": f["candle_open_time"], "candle_time": iso_time(f["candle_open_time"]),
            "close": close, "predicted_high": price(f["pred_high_pct"]), "predicted_high_pct": f["pred_high_pct"] * 100,
            "predicted_low": price(f["pred_low_pct"]), "predicted_low_pct": f["pred_low_pct"] * 100, **means,
            "interval": {"coverage": coverage,
                         "high": {"lower": price(f["high_lower"]), "upper": price(f["high_upper"]),
                                  "lower_pct": f["high_lower"] * 100, "upper_pct": f["high_upper"] * 100},
                         "low": {"lower": price(f["low_lower"]), "upper": price(f["low_upper"]),
                                 "lower_pct": f["low_lower"] * 100, "upper_pct": f["low_upper"] * 100}},
            "model_version": versions.get("range_predictor"), "model_versions": versions}


def old_signal_body(f: dict[str, Any]) -> dict[str, Any]:
    probs = f.get("signal_probs") or [None, None, None]
    keys = ("entry_price", "take_profit", "stop_loss", "reason", "reason_detail")
    return {"symbol": f["symbol"], "horizon": f["horizon"], "horizon_minutes": f["horizon"] * 5,
            "signal_type": f["signal_type"], "confidence": f["confidence"], **{k: f.get(k) for k in keys},
            "probabilities": {"SELL": probs[0], "HOLD": probs[1], "BUY": probs[2]},
            **{k: f.get(k) for k in ("p_tp_long", "p_tp_short", "expected_r", "cost_r", "p_win", "fee_profile")},
            "close": f["close"], "candle_open_time": f["candle_open_time"],
            "candle_time": iso_time(f["candle_open_time"]), "model_versions": f.get("model_versions") or {}}


# ---- measurement ------------------------------------------------------------------------------------
def stage_outputs(n: int) -> tuple[Ensemble, list[tuple[int, tuple, dict[str, np.ndarray]]]]:
    """The shipped models' stage outputs for ``n`` symbols' newest candle at every horizon."""
    settings = get_settings()
    ens = Ensemble.load(SHIPPED_MODELS, settings)
    candles = load_candles(settings.sample_dir / "BTCUSDT_5m.parquet").iloc[-(1200 + n):]
    feats = build_features(candles, settings.features)[list(ens.feature_names)].to_numpy(np.float64)[-n:]
    symbols = [f"SYM{i:03d}USDT" if i > 1 else ("BTCUSDT", "ETHUSDT")[i] for i in range(n)]
    closes, times = candles["close"].to_numpy()[-n:], candles["open_time"].to_numpy()[-n:]
    return ens, [(h, (feats, symbols, closes, times), ens.predict_arrays(feats, symbols, h))
                 for h in settings.market.horizons]


def per_call(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} (figures are taken below 2); {args.symbols} symbols x "
          f"{len(get_settings().market.horizons)} horizons, median of {args.rounds} rounds, old and new alternating")
    ens, staged = stage_outputs(args.symbols)
    rows = args.symbols * len(staged)

    def compose_new() -> list[Forecast]:
        return [f for h, a, out in staged for f in ens.compose(*a, h, out)]

    def compose_old() -> list[OldForecast]:
        return [f for h, a, out in staged for f in old_compose(ens, ens.compose_columns(*a, h, out), h)]

    def compose_validated() -> list[Forecast]:
        return [Forecast(**f.__dict__) for f in compose_new()]

    new, old = compose_new(), compose_old()
    assert [f.to_json() for f in new] == [Forecast.model_validate(o.to_dict()).to_json() for o in old]
    assert [json.loads(f.to_json()) for f in new] == [o.to_dict() for o in old]  # the same JSON content
    good = [i for i, f in enumerate(new) if f.reason not in _FORCED]
    fn, fo = new[good[0]], old[good[0]]
    entry_new, entry_old = make_entry(fn, FEATURE_SET, SECRET), old_make_entry(fo.to_dict())
    key = dict(symbol=fn.symbol, horizon=fn.horizon, candle_open_time=fn.candle_open_time,
               model_versions=fn.model_versions, feature_set_hash=FEATURE_SET, secret=SECRET)
    assert read_entry(entry_new, **key)[0].to_json() == fn.to_json()
    prefix = body_prefix(prediction_body(fn, 0.8))
    assert json.loads(prefix + b"}") == old_prediction_body(fo.to_dict(), 0.8)
    assert json.loads(body_prefix(signal_body(fn)) + b"}") == old_signal_body(fo.to_dict())

    def close_new() -> None:
        for f in new:
            make_entry(f, FEATURE_SET, SECRET), signal_message(f, 1.5)

    def close_old() -> None:
        for f in old:
            d = f.to_dict()
            old_make_entry(d), json.dumps({**old_signal_body(d), "published_at": 1.5})

    def hit_new() -> None:
        f, _ = read_entry(entry_new, **key)
        body_prefix(prediction_body(f, 0.8))

    def hit_old() -> None:
        d = old_read_entry(entry_old)
        body_prefix(old_prediction_body(d, 0.8)), old_forecast_from_dict(d)

    def computed_new() -> None:
        make_entry(fn, FEATURE_SET, SECRET), body_prefix(prediction_body(fn, 0.8))

    def computed_old() -> None:
        d = fo.to_dict()
        old_make_entry(d), body_prefix(old_prediction_body(d, 0.8)), old_forecast_from_dict(d)

    cases = {"compose, all horizons (ms)": (compose_old, compose_new, 1, 1e3),
             "  new, then validating each (ms)": (compose_old, compose_validated, 1, 1e3),
             "candle close: entries + messages (ms)": (close_old, close_new, 1, 1e3),
             "request, Redis hit (us)": (hit_old, hit_new, 2000, 1e6),
             "request, computed: write + render (us)": (computed_old, computed_new, 2000, 1e6),
             "request, ingress memory hit (us)": (lambda: finish(prefix, True, 1.25),
                                                  lambda: finish(prefix, True, 1.25), 20000, 1e6)}
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
    for _ in range(args.rounds):
        for label, (fo_, fn_, calls, _scale) in cases.items():
            times[label][0].append(per_call(fo_, calls))
            times[label][1].append(per_call(fn_, calls))
    print(f"{'':44s} {'old':>10s} {'new':>10s} {'old/new':>8s}")
    for label, (o, n) in times.items():
        scale = cases[label][3]
        mo, mn = statistics.median(o) * scale, statistics.median(n) * scale
        print(f"{label:44s} {mo:10.2f} {mn:10.2f} {mo / mn:7.2f}x")
    c_old, c_new = (statistics.median(x) for x in times["compose, all horizons (ms)"])
    valid = statistics.median(times["  new, then validating each (ms)"][1])
    print(f"compose per row ({rows} rows, vectorised compose_columns included): old {c_old / rows * 1e6:.2f} us, "
          f"new (model_construct) {c_new / rows * 1e6:.2f} us; validating each would add "
          f"{(valid - c_new) / rows * 1e6:.2f} us")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
