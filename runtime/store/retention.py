"""Retention: the one place where audit rows are deleted (SQL only).

The event log is append-only for everyone else; only finished tasks older than
the configured retention go, together with their events and approvals. A task
that is running or waiting for approval is never touched.
"""

from __future__ import annotations

from runtime.store.db import Database, now

_FINISHED = "('completed', 'failed', 'expired', 'interrupted')"


async def delete_finished_tasks(db: Database, older_than_seconds: float) -> int:
    """Delete finished tasks last updated more than `older_than_seconds` ago, with
    their events and approvals. Returns the number of tasks deleted."""
    cutoff = now() - older_than_seconds
    old = f"SELECT task_id FROM tasks WHERE status IN {_FINISHED} AND updated_at < ?"
    async with db.transaction():
        await db.execute(f"DELETE FROM events WHERE task_id IN ({old}) RETURNING 1", (cutoff,))
        await db.execute(f"DELETE FROM approvals WHERE task_id IN ({old}) RETURNING 1", (cutoff,))
        return await db.execute(
            f"DELETE FROM tasks WHERE status IN {_FINISHED} AND updated_at < ? RETURNING 1",
            (cutoff,),
        )
