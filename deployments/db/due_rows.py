"""The resolver's SQL: select a symbol's logged rows that have come due, score them, write them back.

Why a module of its own: the :class:`~deployments.db.resolver.OutcomeResolver` actor is lifecycle
(candles, connection, metrics, sweeps); what one resolution pass does against PostgreSQL is these
two functions. Rows are read in batches of ``BATCH`` through the partial ``*_due`` indexes, scored
in one vectorised pass by :mod:`deployments.db.outcomes` (pure), and written with one
``UPDATE … FROM unnest(…)`` per batch; ``pending`` rows (a window a late candle may still fill) are
not written and are tried again at the next close.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import asyncpg
import numpy as np

from deployments.db.outcomes import CandleHistory, resolve_predictions, resolve_signals
from features.costs import Costs

BATCH = 20_000  # rows fetched per query; a backlog is worked through in several

_DUE_PREDICTIONS = """
SELECT id, horizon, candle_open_time, predicted_high, predicted_low, high_lower, high_upper, low_lower, low_upper
FROM ml.prediction_logs
WHERE resolved_at IS NULL AND symbol = $1 AND resolve_after <= $2
ORDER BY resolve_after LIMIT $3"""

_DUE_SIGNALS = """
SELECT id, horizon, candle_open_time, signal_type, entry_price, take_profit, stop_loss
FROM ml.signal_logs
WHERE resolved_at IS NULL AND symbol = $1 AND resolve_after <= $2
ORDER BY resolve_after LIMIT $3"""

_UPDATE_PREDICTIONS = """
UPDATE ml.prediction_logs AS p
SET actual_high = u.actual_high, actual_low = u.actual_low, mae = u.mae, high_inside = u.high_inside,
    low_inside = u.low_inside, inside_interval = u.inside_interval, resolve_status = u.status, resolved_at = now()
FROM unnest($1::uuid[], $2::float8[], $3::float8[], $4::float8[], $5::bool[], $6::bool[], $7::bool[], $8::text[])
     AS u(id, actual_high, actual_low, mae, high_inside, low_inside, inside_interval, status)
WHERE p.id = u.id AND p.resolved_at IS NULL"""

_UPDATE_SIGNALS = """
UPDATE ml.signal_logs AS s
SET outcome = u.outcome, exit_price = u.exit_price, exit_bar = u.exit_bar, pnl_percent = u.pnl_percent,
    r_multiple = u.r_multiple, resolve_status = u.status, resolved_at = now()
FROM unnest($1::uuid[], $2::text[], $3::float8[], $4::int2[], $5::float8[], $6::float8[], $7::text[])
     AS u(id, outcome, exit_price, exit_bar, pnl_percent, r_multiple, status)
WHERE s.id = u.id AND s.resolved_at IS NULL"""


def _nullable(values: np.ndarray) -> list[Any]:
    """NaN -> NULL (a gap has no actual range; it is not zero)."""
    out = []
    for v in values.tolist():
        out.append(None if isinstance(v, float) and not math.isfinite(v) else v)
    return out


def _col(rows: Sequence[asyncpg.Record], key: str, dtype: Any = np.float64) -> np.ndarray:
    if dtype is object:
        return np.array([r[key] for r in rows], dtype=object)
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=dtype)


async def resolve_due_predictions(conn: asyncpg.Connection, symbol: str, hist: CandleHistory, *,
                                  gap_grace_candles: int, timeout: float) -> int:
    """Score and write every due prediction row of ``symbol`` the history can settle; rows written."""
    done = 0
    while True:
        rows = await conn.fetch(_DUE_PREDICTIONS, symbol, hist.last_open_time, BATCH, timeout=timeout)
        if not rows:
            return done
        res = resolve_predictions(hist, _col(rows, "candle_open_time", np.int64), _col(rows, "horizon", np.int64),
                                  *(_col(rows, k) for k in ("predicted_high", "predicted_low", "high_lower",
                                                             "high_upper", "low_lower", "low_upper")),
                                  gap_grace_candles=gap_grace_candles)
        ready = np.flatnonzero(res["status"] != "pending")
        if len(ready):
            await conn.execute(_UPDATE_PREDICTIONS, [rows[i]["id"] for i in ready],
                               *(_nullable(res[k][ready]) for k in ("actual_high", "actual_low", "mae")),
                               *(list(res[k][ready]) for k in ("high_inside", "low_inside", "inside_interval",
                                                               "status")), timeout=timeout)
        done += len(ready)
        if len(rows) < BATCH or not len(ready):
            return done


async def resolve_due_signals(conn: asyncpg.Connection, symbol: str, hist: CandleHistory, costs: Costs, *,
                              gap_grace_candles: int, timeout: float) -> int:
    """Score and write every due signal row of ``symbol`` the history can settle; rows written."""
    done = 0
    while True:
        rows = await conn.fetch(_DUE_SIGNALS, symbol, hist.last_open_time, BATCH, timeout=timeout)
        if not rows:
            return done
        res = resolve_signals(hist, _col(rows, "candle_open_time", np.int64), _col(rows, "horizon", np.int64),
                              _col(rows, "signal_type", object), _col(rows, "entry_price"),
                              _col(rows, "take_profit"), _col(rows, "stop_loss"), costs,
                              gap_grace_candles=gap_grace_candles)
        ready = np.flatnonzero(res["status"] != "pending")
        if len(ready):
            await conn.execute(_UPDATE_SIGNALS, [rows[i]["id"] for i in ready], list(res["outcome"][ready]),
                               _nullable(res["exit_price"][ready]), list(res["exit_bar"][ready]),
                               _nullable(res["pnl_percent"][ready]), _nullable(res["r_multiple"][ready]),
                               list(res["status"][ready]), timeout=timeout)
        done += len(ready)
        if len(rows) < BATCH or not len(ready):
            return done
