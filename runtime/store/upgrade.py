"""Schema versions seen from outside the store: open a database without
migrating it, read its version, migrate it on request (`ducklm db migrate`,
and `ducklm db copy`, which must look at both sides before writing anything).

`Database.open` migrates as it opens (what `ducklm run` wants); these
functions separate the two steps, so a refusal (a newer schema, a target that
already holds data) happens before the first write.
"""

from __future__ import annotations

from pathlib import Path

from runtime.store.db import Database, StoreError
from runtime.store.migrations import SCHEMA_VERSION


class CopyRefused(StoreError):
    """The command cannot start; nothing was written on either side."""


class NewerSchema(CopyRefused):
    """The database was made by a newer DuckLM than this one."""

    def __init__(self, db: Database, version: int) -> None:
        super().__init__(
            f"database {db.path} has schema version {version}, but this DuckLM only knows "
            f"versions up to {SCHEMA_VERSION}; upgrade DuckLM first (nothing was changed)"
        )
        self.version = version


async def open_unmigrated(target: str | Path) -> Database:
    """The database at `target`, connected but neither created (beyond an
    empty SQLite file) nor migrated, so it can be inspected first."""
    return await Database.open(target, migrate=False)


async def schema_version(db: Database) -> int:
    """The version `db` is at; 0 when it holds no DuckLM schema yet (both
    backends: PRAGMA user_version, or PostgreSQL's version table)."""
    return int(await db.user_version())


async def migrate(db: Database) -> tuple[int, int]:
    """Bring `db` to the current schema; returns (from, to). Refuses a newer
    schema with NewerSchema, changing nothing."""
    before = await schema_version(db)
    if before > SCHEMA_VERSION:
        raise NewerSchema(db, before)
    if before != SCHEMA_VERSION:
        await db.migrate()
    return before, await schema_version(db)


async def migrate_database(target: str | Path) -> tuple[str, int, int]:
    """`ducklm db migrate`: (the database as shown, from, to)."""
    db = await open_unmigrated(target)
    try:
        before, after = await migrate(db)
        return db.path, before, after
    finally:
        await db.close()
