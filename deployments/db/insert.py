"""The log writer's INSERTs and how their errors are told apart: "PostgreSQL is not there" vs "this row is bad".

Why the distinction is the whole game: rows that fail because the server is down must stay in the
spool and be retried, rows that fail because of what they hold must leave it (into
``rejected.log``) or they are retried forever and block every row behind them. asyncpg makes
this easy to get wrong: its client-side ``DataError`` (a value that cannot be encoded as the
column's type, e.g. text in a float column of an old spool replayed after a schema change) is a
subclass of ``InterfaceError``, which otherwise means a broken connection. It is also a
``ValueError``, and that is what :func:`is_unavailable` checks first.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import asyncpg

from deployments.db.rows import PREDICTION_COLUMNS, SIGNAL_COLUMNS, PredictionRow, SignalRow

_PG_TYPES = {"id": "uuid", "symbol": "text", "horizon": "int4", "candle_open_time": "int8",
             "resolve_after": "int8", "model_version": "text", "close": "float8", "predicted_high": "float8",
             "predicted_low": "float8", "high_lower": "float8", "high_upper": "float8", "low_lower": "float8",
             "low_upper": "float8", "created_ms": "int8", "signal_type": "text", "confidence": "float8",
             "entry_price": "float8", "take_profit": "float8", "stop_loss": "float8",
             "model_versions": "text", "reason": "text", "expected_r": "float8", "cost_r": "float8",
             "p_win": "float8", "fee_profile": "text"}


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    """``INSERT … SELECT FROM unnest($1::t[], …) ON CONFLICT (id) DO NOTHING``: one round trip per batch."""
    params = ", ".join(f"${i}::{_PG_TYPES[c]}[]" for i, c in enumerate(columns, 1))
    target = [("created_at" if c == "created_ms" else c) for c in columns]
    select = []
    for c in columns:
        if c == "created_ms":
            select.append("to_timestamp(u.created_ms / 1000.0)")
        elif c == "model_versions":
            select.append("u.model_versions::jsonb")
        else:
            select.append(f"u.{c}")
    return (f"INSERT INTO {table} ({', '.join(target)}) SELECT {', '.join(select)} "
            f"FROM unnest({params}) AS u({', '.join(columns)}) ON CONFLICT (id) DO NOTHING")


INSERT_PREDICTIONS = _insert_sql("ml.prediction_logs", PREDICTION_COLUMNS)
INSERT_SIGNALS = _insert_sql("ml.signal_logs", SIGNAL_COLUMNS)

# Errors that mean "PostgreSQL is not there (or not usable) right now": keep the rows, retry later.
# A missing table or schema counts too: reconnecting re-applies the migrations.
UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
               asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
               asyncpg.exceptions.UndefinedTableError, asyncpg.exceptions.InvalidSchemaNameError,
               asyncpg.exceptions.ReadOnlySQLTransactionError)
# Errors about what a row holds: the server refused it, or the client could not encode it.
ROW_ERRORS = (asyncpg.PostgresError, ValueError, TypeError, OverflowError)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable or unusable (not that the data is bad)."""
    if isinstance(exc, (ValueError, TypeError, OverflowError)):  # asyncpg's client-side DataError too
        return False
    return isinstance(exc, UNAVAILABLE)


def is_row_error(exc: BaseException) -> bool:
    return not is_unavailable(exc) and isinstance(exc, ROW_ERRORS)


async def insert_rows(conn: asyncpg.Connection, rows: Sequence[PredictionRow | SignalRow],
                      timeout: float | None = None) -> None:
    """Insert a batch (both tables, one transaction); rows already present are left alone."""
    preds = [r for r in rows if isinstance(r, PredictionRow)]
    sigs = [r for r in rows if isinstance(r, SignalRow)]
    async with conn.transaction():
        if preds:
            await conn.execute(INSERT_PREDICTIONS, *(list(c) for c in zip(*preds)), timeout=timeout)
        if sigs:
            await conn.execute(INSERT_SIGNALS, *(list(c) for c in zip(*sigs)), timeout=timeout)


async def insert_or_sort_out(conn: asyncpg.Connection, rows: Sequence[PredictionRow | SignalRow],
                             timeout: float | None) -> list[tuple[PredictionRow | SignalRow, str]]:
    """Insert ``rows``; if the batch is refused for its content, insert them one by one and return
    the refused ones with their reasons. Unavailability (and anything unexpected) is raised: the
    batch then stays in the spool."""
    try:
        await insert_rows(conn, rows, timeout)
        return []
    except Exception as exc:
        if not is_row_error(exc):
            raise
    bad: list[tuple[PredictionRow | SignalRow, str]] = []
    for r in rows:
        try:
            await insert_rows(conn, [r], timeout)
        except Exception as exc:
            if not is_row_error(exc):
                raise
            bad.append((r, f"{type(exc).__name__}: {exc}"[:500]))
    return bad


async def _close_quietly(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 1.0)
    except Exception:
        conn.terminate()
