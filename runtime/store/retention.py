"""Retention: the one place where audit rows are deleted (SQL only).

The event log is append-only for everyone else; only finished tasks older than
the configured retention go, together with their events and approvals. A task
that is running or waiting for approval is never touched.

The deletes run on the store's background connection (aiosqlite, off the
event loop), a chunk of tasks per transaction, so a first run over a year of
history neither stalls the bot nor holds the write lock for long.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.store.db import Database, now

if TYPE_CHECKING:
    import aiosqlite

CHUNK_TASKS = 500
_FINISHED = "('completed', 'failed', 'expired', 'interrupted')"


async def delete_finished_tasks(db: Database, older_than_seconds: float) -> int:
    """Delete finished tasks last updated more than `older_than_seconds` ago, with
    their events and approvals. Returns the number of tasks deleted."""
    cutoff = now() - older_than_seconds
    deleted = 0
    while True:
        chunk = await db.background_transaction(lambda conn: _delete_chunk(conn, cutoff))
        deleted += chunk
        if chunk < CHUNK_TASKS:
            return deleted


async def _delete_chunk(conn: aiosqlite.Connection, cutoff: float) -> int:
    rows = await conn.execute_fetchall(
        f"SELECT task_id FROM tasks WHERE status IN {_FINISHED} AND updated_at < ? "
        "ORDER BY updated_at LIMIT ?",
        (cutoff, CHUNK_TASKS),
    )
    ids = [(row[0],) for row in rows]
    await conn.executemany("DELETE FROM events WHERE task_id = ?", ids)
    await conn.executemany("DELETE FROM approvals WHERE task_id = ?", ids)
    await conn.executemany("DELETE FROM tasks WHERE task_id = ?", ids)
    return len(ids)
