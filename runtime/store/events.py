"""The audit log: append-only events, numbered 1, 2, 3 … per task.

There is deliberately no method that updates or deletes an event.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from runtime.store.db import Database, dump_json, load_json, now, to_datetime
from runtime.store.models import Event

_COLUMNS = "task_id, seq, event_type, payload, created_at"


def _event(row: sqlite3.Row) -> Event:
    payload = load_json(row["payload"], {})
    return Event(
        task_id=row["task_id"],
        seq=row["seq"],
        event_type=row["event_type"],
        payload=payload if isinstance(payload, dict) else {"value": payload},
        created_at=to_datetime(row["created_at"]),
    )


class EventStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(
        self, task_id: str | None, event_type: str, payload: Mapping[str, Any] | None = None
    ) -> Event:
        """Record one event. `task_id` None is the global stream (admin actions).

        The sequence number is computed inside the INSERT itself: SQLite runs a
        write statement under the database write lock, so two connections (or
        processes) can never both read the same MAX(seq).
        """
        if payload is None:
            payload = {}
        elif not isinstance(payload, Mapping):
            payload = {"value": payload}
        text = dump_json(dict(payload))
        ts = now()
        row = await self.db.fetchone(
            "INSERT INTO events (task_id, seq, event_type, payload, created_at) "
            "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM events WHERE task_id IS ? "
            "RETURNING seq",
            (task_id, event_type, text, ts, task_id),
        )
        assert row is not None  # an INSERT … RETURNING that succeeded returns its row
        stored = load_json(text, {})
        return Event(
            task_id=task_id,
            seq=row["seq"],
            event_type=event_type,
            payload=stored if isinstance(stored, dict) else {"value": stored},
            created_at=to_datetime(ts),
        )

    async def list_events(self, task_id: str | None) -> list[Event]:
        """A task's events (None: the global ones) in order."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM events WHERE task_id IS ? ORDER BY seq", (task_id,)
        )
        return [_event(row) for row in rows]

    async def list_by_type(self, event_type: str, limit: int = 100) -> list[Event]:
        """The latest events of one type across all tasks, newest first."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM events WHERE event_type = ? ORDER BY id DESC LIMIT ?",
            (event_type, limit),
        )
        return [_event(row) for row in rows]
