"""Retention: the one place where audit rows are deleted (SQL only).

The event log is append-only for everyone else; only finished tasks older than
the configured retention go, together with their events, approvals and the
votes cast on those. A task
that is running or waiting for approval is never touched.

The deletes run on the store's background connection (aiosqlite, off the
event loop), a chunk of tasks per transaction, so a first run over a year of
history neither stalls the bot nor holds the write lock for long.

Whole tasks go, never single events, so every chain that remains still
verifies (each task is its own chain, runtime/store/chain.py). Each chunk
first records what it deletes, in the same transaction: a `retention_deleted`
event in the global stream naming every task with its event count and chain
head, so `ducklm audit verify` passes afterwards and a kept export of a
deleted task can still be matched to the record of its deletion.
"""

from __future__ import annotations

from runtime.store.chain import GENESIS, canonical_event, chain_lock_key, link
from runtime.store.db import BackgroundConnection, Database, dump_json, load_json, now

CHUNK_TASKS = 500
_FINISHED = "('completed', 'failed', 'expired', 'interrupted')"


async def delete_finished_tasks(db: Database, older_than_seconds: float) -> int:
    """Delete finished tasks last updated more than `older_than_seconds` ago, with
    their events and approvals. Returns the number of tasks deleted."""
    cutoff = now() - older_than_seconds
    deleted = 0
    while True:
        chunk = await db.background_transaction(lambda conn: _delete_chunk(conn, cutoff, db))
        deleted += chunk
        if chunk < CHUNK_TASKS:
            return deleted


async def _delete_chunk(conn: BackgroundConnection, cutoff: float, db: Database) -> int:
    # PostgreSQL: the finished tasks are locked (FOR UPDATE) until the chunk
    # commits, so a second replica's retention run skips them instead of
    # recording their deletion twice. (SQLite: BEGIN IMMEDIATE, one writer.)
    rows = await conn.fetchall(
        f"SELECT task_id FROM tasks WHERE status IN {_FINISHED} AND updated_at < ? "
        f"ORDER BY updated_at LIMIT ?{db.skip_locked}",
        (cutoff, CHUNK_TASKS),
    )
    ids = [(row[0],) for row in rows]
    if ids:
        if db.dialect == "postgres":
            # The global chain's lock, as every append to it takes (events.py).
            await conn.fetchall("SELECT pg_advisory_xact_lock(?)", (chain_lock_key(None),))
        await _record_deletion(conn, [task_id for (task_id,) in ids], cutoff)
    await conn.executemany("DELETE FROM events WHERE task_id = ?", ids)
    await conn.executemany("DELETE FROM approval_votes WHERE task_id = ?", ids)  # v11's votes
    await conn.executemany("DELETE FROM approvals WHERE task_id = ?", ids)
    await conn.executemany("DELETE FROM tasks WHERE task_id = ?", ids)
    return len(ids)


async def _record_deletion(conn: BackgroundConnection, task_ids: list[str], cutoff: float) -> None:
    """Append `retention_deleted` to the global chain. The hash is computed here
    (this connection has no `ducklm_chain`); the transaction holds the write
    lock (SQLite) or the global chain's advisory lock (PostgreSQL), so the head
    read below is still the head when the row is written."""
    heads: dict[str, list[object]] = {}
    for task_id in task_ids:
        found = await conn.fetchall(
            "SELECT seq, hash FROM events WHERE task_id = ? ORDER BY seq DESC LIMIT 1",
            (task_id,),
        )
        heads[task_id] = [found[0][0], found[0][1]] if found else [0, None]
    last = await conn.fetchall(
        "SELECT seq, hash FROM events WHERE task_id IS NULL ORDER BY seq DESC LIMIT 1"
    )
    seq, prev = (last[0][0] + 1, last[0][1]) if last else (1, GENESIS)
    payload = {"before": cutoff, "tasks": heads}  # task id -> [event count, chain head]
    text = dump_json(payload)
    at = now()
    digest = link(prev, canonical_event(None, seq, "retention_deleted", load_json(text, {}), at))
    await conn.execute(
        "INSERT INTO events (task_id, seq, event_type, payload, created_at, hash) "
        "VALUES (NULL, ?, 'retention_deleted', ?, ?, ?)",
        (seq, text, at, digest),
    )
