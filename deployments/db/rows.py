"""Log rows: what one :class:`inference.forecast.Forecast` becomes in ``ml.prediction_logs`` / ``ml.signal_logs``.

Pure (no I/O). Ids are deterministic UUIDs (uuid5 of symbol, horizon, candle and model versions):
the same forecast logged twice — at candle close and again by a request that served it from the
cache, or replayed from the spool after a crash — is one row, so ``ON CONFLICT (id) DO NOTHING``
makes every path idempotent and the accuracy figures weigh each forecast once, not by popularity.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from functools import lru_cache
from typing import Any, NamedTuple, Sequence

from features.candles import FIVE_MINUTES_MS
from inference.forecast import Forecast

NAMESPACE = uuid.UUID("6f1c2d4e-9a57-4d1b-8e0c-3b7f5a2e9c61")
PREDICTION, SIGNAL = "p", "s"
RANGE_MODEL, SIGNAL_MODEL = "range_predictor", "meta_model"


class PredictionRow(NamedTuple):
    """Insert columns of ``ml.prediction_logs`` in :data:`PREDICTION_COLUMNS` order."""

    id: str
    symbol: str
    horizon: int
    candle_open_time: int
    resolve_after: int
    model_version: str
    close: float
    predicted_high: float
    predicted_low: float
    high_lower: float | None
    high_upper: float | None
    low_lower: float | None
    low_upper: float | None
    created_ms: int


class SignalRow(NamedTuple):
    """Insert columns of ``ml.signal_logs`` in :data:`SIGNAL_COLUMNS` order (``model_versions`` as JSON)."""

    id: str
    symbol: str
    horizon: int
    candle_open_time: int
    resolve_after: int
    signal_type: str
    confidence: float
    entry_price: float | None
    take_profit: float | None
    stop_loss: float | None
    model_version: str
    model_versions: str
    reason: str | None
    created_ms: int
    # The trade's economics (migration 0002); None in rows spooled before it (decoded as such).
    expected_r: float | None = None
    cost_r: float | None = None
    p_win: float | None = None
    fee_profile: str | None = None


PREDICTION_COLUMNS = PredictionRow._fields
SIGNAL_COLUMNS = SignalRow._fields
_SIGNAL_LEGACY_LEN = len(SIGNAL_COLUMNS) - 4  # spool lines written before expected_r … fee_profile


def resolve_after(candle_open_time: int, horizon: int) -> int:
    """Open time of candle t+h: once it has closed, the row's whole window t+1 … t+h is known."""
    return int(candle_open_time) + int(horizon) * FIVE_MINUTES_MS


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _versions_key(versions: dict[str, str]) -> str:
    return ",".join(f"{k}={versions[k]}" for k in sorted(versions))


_NS = NAMESPACE.bytes


def uuid5_str(name: str) -> str:
    """``str(uuid.uuid5(NAMESPACE, name))`` without building UUID objects (it runs per logged row)."""
    d = bytearray(hashlib.sha1(_NS + name.encode()).digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x50  # version 5
    d[8] = (d[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = d.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def prediction_id(symbol: str, horizon: int, candle_open_time: int, model_version: str) -> str:
    return uuid5_str(f"{PREDICTION}|{symbol}|{horizon}|{candle_open_time}|{model_version}")


def signal_id(symbol: str, horizon: int, candle_open_time: int, versions: dict[str, str]) -> str:
    return _signal_id(symbol, horizon, candle_open_time, _versions_key(versions))


def _signal_id(symbol: str, horizon: int, candle_open_time: int, versions_key: str) -> str:
    return uuid5_str(f"{SIGNAL}|{symbol}|{horizon}|{candle_open_time}|{versions_key}")


@lru_cache(maxsize=64)
def _versions_strings(items: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(id key, sorted JSON) of a set of model versions; few distinct sets exist (one per promotion)."""
    return ",".join(f"{k}={v}" for k, v in items), json.dumps(dict(items), sort_keys=True)


def rows_from_forecast(f: Forecast, created_ms: int | None = None) -> list[PredictionRow | SignalRow]:
    """The rows one forecast is logged as.

    A prediction row only when the range forecast is a number: a forced HOLD (warm-up, gap) has
    NaN ranges — nothing was predicted, so nothing is scored — but its signal row (HOLD with the
    reason) is logged, as every signal the engine gives is.
    """
    created_ms = int(time.time() * 1000) if created_ms is None else created_ms
    cot, h = int(f.candle_open_time), int(f.horizon)
    due = resolve_after(cot, h)
    versions = f.model_versions
    vkey, vjson = _versions_strings(tuple(sorted(versions.items())))
    rows: list[PredictionRow | SignalRow] = []
    ph, pl = _finite(f.pred_high_pct), _finite(f.pred_low_pct)
    if ph is not None and pl is not None:
        range_version = versions.get(RANGE_MODEL, vkey)
        rows.append(PredictionRow(prediction_id(f.symbol, h, cot, range_version), f.symbol, h, cot, due,
                                  range_version, float(f.close), ph, pl, _finite(f.high_lower),
                                  _finite(f.high_upper), _finite(f.low_lower), _finite(f.low_upper), created_ms))
    rows.append(SignalRow(_signal_id(f.symbol, h, cot, vkey), f.symbol, h, cot, due, str(f.signal_type),
                          float(f.confidence), _finite(f.entry_price), _finite(f.take_profit),
                          _finite(f.stop_loss), versions.get(SIGNAL_MODEL, vkey), vjson, f.reason,
                          created_ms, _finite(f.expected_r), _finite(f.cost_r), _finite(f.p_win), f.fee_profile))
    return rows


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(rows: Sequence[PredictionRow | SignalRow]) -> bytes:
    """Spool lines: one compact JSON array per row, kind first (``p`` or ``s``)."""
    out = []
    for r in rows:
        kind = PREDICTION if isinstance(r, PredictionRow) else SIGNAL
        out.append(_ENCODER.encode([kind, *r]))
    return ("\n".join(out) + "\n").encode() if out else b""


def decode(line: bytes) -> PredictionRow | SignalRow:
    """One spool line back to its row; ``ValueError`` when the line is not a complete row."""
    kind, *values = json.loads(line)
    if kind == PREDICTION and len(values) == len(PREDICTION_COLUMNS):
        return PredictionRow(*values)
    if kind == SIGNAL and len(values) in (len(SIGNAL_COLUMNS), _SIGNAL_LEGACY_LEN):
        return SignalRow(*values)
    raise ValueError(f"not a log row: {line[:80]!r}")
