"""Versioned plain-SQL migrations for the ``ml`` schema, applied in order at start-up.

Files ``migrations/NNNN_name.sql`` are applied once each, in version order, every one in its own
transaction, and recorded in ``ml.schema_migrations`` with a checksum. Re-applying is a no-op; an
applied file that was edited afterwards is an error (a schema must never silently differ from
its history). A session advisory lock serialises concurrent start-ups (several replicas, the
resolver, a test) so two processes never race to create the same table.

``python -m deployments.db.migrate`` applies them to ``Settings.database_url`` and prints the state.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from configs.errors import MLEngineError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SCHEMA = "ml"
# pg_advisory_lock key: a fixed 63-bit number derived from the table name, shared by every process.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"ml.schema_migrations").digest()[:8], "big") >> 1
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(MLEngineError):
    """The migration files or the database's migration history are inconsistent."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in version order; a misnamed file or a duplicate version is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        found[version] = Migration(version, m.group(2), path.read_text())
    return [found[v] for v in sorted(found)]


async def apply_migrations(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the pending migrations in order; return the versions applied now (empty if up to date)."""
    migrations = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(f"""
            CREATE SCHEMA IF NOT EXISTS {SCHEMA};
            CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )""")
        applied = {r["version"]: r for r in await conn.fetch(
            f"SELECT version, name, checksum FROM {SCHEMA}.schema_migrations")}
        known = {m.version for m in migrations}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise MigrationError(f"the database has migrations this code does not know: {unknown} "
                                 "(is an older build running against a newer schema?)")
        done: list[int] = []
        for m in migrations:
            row = applied.get(m.version)
            if row is not None:
                if row["checksum"] != m.checksum:
                    raise MigrationError(f"migration {m.version:04d}_{m.name} was edited after it was applied; "
                                         "add a new migration instead")
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(f"INSERT INTO {SCHEMA}.schema_migrations (version, name, checksum) "
                                   "VALUES ($1, $2, $3)", m.version, m.name, m.checksum)
            done.append(m.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def _main(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        done = await apply_migrations(conn)
        rows = await conn.fetch(f"SELECT version, name, applied_at FROM {SCHEMA}.schema_migrations ORDER BY version")
    finally:
        await conn.close()
    print(f"applied now: {done or 'none (up to date)'}")
    for r in rows:
        print(f"  {r['version']:04d}_{r['name']}  {r['applied_at']:%Y-%m-%d %H:%M:%S%z}")


def main(argv: list[str] | None = None) -> None:
    from configs.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=None, help="default: Settings.database_url (MLE_DATABASE_URL)")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.database_url or get_settings().database_url.get_secret_value()))


if __name__ == "__main__":
    main()
