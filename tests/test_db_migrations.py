"""Migrations of the ``ml`` schema: from an empty database, re-applied, concurrent, and guarded."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from deployments.db.migrate import Migration, MigrationError, apply_migrations, load_migrations
from scripts.lab.services import fresh_database

COLUMNS = {
    "prediction_logs": {"id", "symbol", "horizon", "candle_open_time", "model_version", "predicted_high",
                        "predicted_low", "high_lower", "high_upper", "low_lower", "low_upper", "actual_high",
                        "actual_low", "mae", "inside_interval", "created_at", "resolved_at"},
    "signal_logs": {"id", "symbol", "horizon", "signal_type", "confidence", "entry_price", "take_profit",
                    "stop_loss", "model_versions", "outcome", "exit_price", "pnl_percent", "r_multiple",
                    "created_at", "resolved_at"},
}


async def _state(conn: asyncpg.Connection) -> dict:
    cols = await conn.fetch("SELECT table_name, column_name, data_type FROM information_schema.columns "
                            "WHERE table_schema = 'ml' ORDER BY table_name, ordinal_position")
    idx = await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'ml' ORDER BY indexname")
    hist = await conn.fetch("SELECT version, name, checksum FROM ml.schema_migrations ORDER BY version")
    return {"columns": [tuple(r) for r in cols], "indexes": [tuple(r) for r in idx], "history": [tuple(r) for r in hist]}


def test_migrations_from_empty_and_reapplied():
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations}) and migrations

    async def go(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM information_schema.schemata WHERE schema_name='ml'") == 0
            assert await apply_migrations(conn) == [m.version for m in migrations]
            first = await _state(conn)
            for table, wanted in COLUMNS.items():
                have = {c for t, c, _ in first["columns"] if t == table}
                assert wanted <= have, (table, wanted - have)
            types = {(t, c): ty for t, c, ty in first["columns"]}
            assert types[("prediction_logs", "id")] == "uuid" and types[("signal_logs", "model_versions")] == "jsonb"
            names = {i for i, _ in first["indexes"]}
            assert {"prediction_logs_due", "signal_logs_due", "prediction_logs_metrics", "signal_logs_metrics",
                    "prediction_logs_pkey", "signal_logs_pkey"} <= names
            due = dict(first["indexes"])["prediction_logs_due"]
            assert "(symbol, resolve_after)" in due and "WHERE (resolved_at IS NULL)" in due
            # Re-applying: nothing to do, nothing changes.
            assert await apply_migrations(conn) == []
            assert await _state(conn) == first
            # The resolver's due query and the status query use their indexes (planner forced off seq scans).
            await conn.execute("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN SELECT id FROM ml.prediction_logs WHERE resolved_at IS NULL AND symbol = 'BTCUSDT' "
                "AND resolve_after <= 1 ORDER BY resolve_after LIMIT 10"))
            assert "prediction_logs_due" in plan, plan
            plan = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN SELECT model_version, avg(mae) FROM ml.prediction_logs WHERE mae IS NOT NULL "
                "AND candle_open_time >= 0 GROUP BY model_version"))
            assert "prediction_logs_metrics" in plan, plan
        finally:
            await conn.close()

    with fresh_database() as url:
        asyncio.run(go(url))


def test_concurrent_start_ups_apply_once():
    async def go(url: str) -> None:
        conns = [await asyncpg.connect(url) for _ in range(4)]
        try:
            results = await asyncio.gather(*(apply_migrations(c) for c in conns))
            assert sorted(len(r) for r in results) == [0, 0, 0, len(load_migrations())]
            assert await conns[0].fetchval("SELECT count(*) FROM ml.schema_migrations") == len(load_migrations())
        finally:
            for c in conns:
                await c.close()

    with fresh_database() as url:
        asyncio.run(go(url))


def test_edited_or_unknown_migrations_are_refused(tmp_path):
    (tmp_path / "0001_logs.sql").write_text("CREATE TABLE ml.t (x int);")
    (tmp_path / "0002_more.sql").write_text("ALTER TABLE ml.t ADD COLUMN y int;")
    original = load_migrations(tmp_path)

    async def go(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            assert await apply_migrations(conn, original) == [1, 2]
            edited = [original[0], Migration(2, "more", "ALTER TABLE ml.t ADD COLUMN z int;")]
            with pytest.raises(MigrationError, match="edited after it was applied"):
                await apply_migrations(conn, edited)
            with pytest.raises(MigrationError, match="does not know"):
                await apply_migrations(conn, original[:1])
            # A failing migration rolls back completely and is not recorded.
            bad = original + [Migration(3, "bad", "ALTER TABLE ml.t ADD COLUMN w int; SELECT 1/0;")]
            with pytest.raises(asyncpg.DivisionByZeroError):
                await apply_migrations(conn, bad)
            assert await conn.fetchval("SELECT max(version) FROM ml.schema_migrations") == 2
            assert await conn.fetchval("SELECT count(*) FROM information_schema.columns "
                                       "WHERE table_schema='ml' AND table_name='t' AND column_name='w'") == 0
        finally:
            await conn.close()

    with fresh_database() as url:
        asyncio.run(go(url))

    (tmp_path / "0002_again.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="used twice"):
        load_migrations(tmp_path)
    (tmp_path / "3_bad_name.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError):
        load_migrations(tmp_path)
