"""The audit log: append-only events, numbered 1, 2, 3 … per task, each
chained to the one before by a hash (runtime/store/chain.py, runtime/store/audit.py).

There is deliberately no method that updates or deletes an event.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from runtime.store.chain import SQL_FUNCTION, chain_lock_key, event_hash
from runtime.store.db import Database, dump_json, load_json, now, to_datetime
from runtime.store.models import Event

_COLUMNS = "task_id, seq, event_type, payload, created_at"
_READ = _COLUMNS + ", hash"
# An event to record: its type and its payload.
NewEvent = tuple[str, Mapping[str, Any] | None]
# SQLite allows 32766 bound parameters per statement; 4 per event.
MAX_EVENTS_PER_STATEMENT = 1000


def same_task(task_id: str | None) -> tuple[str, tuple[str, ...]]:
    """The condition (and its parameters) selecting one task's events, or the
    global ones: `task_id = ?` / `task_id IS NULL`, which an index answers on
    both backends (PostgreSQL's IS NOT DISTINCT FROM cannot use one)."""
    return ("task_id IS NULL", ()) if task_id is None else ("task_id = ?", (task_id,))


# PostgreSQL: how many chains' heads an EventStore remembers (a few hundred bytes each).
HEADS_KEPT = 4096
# One event row of the PostgreSQL INSERT … SELECT: typed, because in a VALUES list
# under a SELECT PostgreSQL cannot infer the parameters' types from the columns.
_TYPED_ROW = (
    "(CAST(? AS TEXT), CAST(? AS INTEGER), CAST(? AS TEXT), CAST(? AS TEXT), "
    "CAST(? AS DOUBLE PRECISION), CAST(? AS TEXT))"
)


def _chained(
    task_id: str | None,
    last: int,
    prev: str | None,
    events: Sequence[NewEvent],
    texts: Sequence[str],
    times: Sequence[float],
) -> tuple[list[Any], list[Event]]:
    """The rows (flat parameters) and Events of `events` appended after the head
    (last, prev), each hashed onto the one before (runtime/store/chain.py)."""
    params: list[Any] = []
    written: list[Event] = []
    for n, ((event_type, _), text, ts) in enumerate(zip(events, texts, times, strict=True), 1):
        seq = last + n
        prev = event_hash(prev, task_id, seq, event_type, text, ts)
        params += (task_id, seq, event_type, text, ts, prev)
        written.append(
            Event(
                task_id=task_id,
                seq=seq,
                event_type=event_type,
                payload=load_json(text, {}),  # what was stored, not the caller's object
                created_at=to_datetime(ts),
                hash=prev,
            )
        )
    return params, written


def _as_payload(payload: Any) -> dict[str, Any]:
    if payload is None:
        return {}
    if isinstance(payload, Mapping):
        return dict(payload)
    return {"value": payload}


def _event(row: sqlite3.Row) -> Event:
    payload = load_json(row["payload"], {})
    return Event(
        task_id=row["task_id"],
        seq=row["seq"],
        event_type=row["event_type"],
        payload=payload if isinstance(payload, dict) else {"value": payload},
        created_at=to_datetime(row["created_at"]),
        hash=row["hash"],
    )


class EventStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # PostgreSQL: the last (seq, hash) this store wrote per chain, a guess
        # of the head that saves reading it (see `_append_postgres`).
        self._heads: dict[str | None, tuple[int, str | None]] = {}

    async def append(
        self, task_id: str | None, event_type: str, payload: Mapping[str, Any] | None = None
    ) -> Event:
        """Record one event. `task_id` None is the global stream (admin actions)."""
        (event,) = await self.append_many(task_id, [(event_type, payload)])
        return event

    async def append_many(
        self, task_id: str | None, events: Sequence[NewEvent], *, at: Sequence[float] | None = None
    ) -> list[Event]:
        """Record several events of one task, in order, in one statement (so one
        commit): they get consecutive sequence numbers or none is written.

        `at` gives each event's time when it happened earlier than now (events a
        caller collected before writing them); by default they are stamped now.

        On SQLite the sequence numbers are computed inside the INSERT itself:
        SQLite runs a write statement under the database write lock, so two
        connections (or processes) can never both read the same MAX(seq). On
        PostgreSQL the chain's advisory lock does that (`_append_postgres`).
        """
        if not events:
            return []
        times = list(at) if at is not None else [now()] * len(events)
        if len(times) != len(events):
            raise ValueError("append_many: one time per event")
        if len(events) > MAX_EVENTS_PER_STATEMENT:
            return await self._append_in_chunks(task_id, events, times)
        texts = [dump_json(_as_payload(payload)) for _, payload in events]
        if self.db.dialect == "postgres":
            return await self._append_postgres(task_id, events, texts, times)
        params: list[Any] = []
        for n, ((event_type, _), text, ts) in enumerate(zip(events, texts, times, strict=True), 1):
            params += (n, event_type, text, ts)
        values = ", ".join(["(?, ?, ?, ?)"] * len(events))
        # Each event's hash chains it to the one before (runtime/store/chain.py):
        # the recursive CTE walks the new events in order from the task's last
        # stored (seq, hash), all inside the one statement that holds the lock.
        rows = await self.db.fetchall(
            f"WITH RECURSIVE new (n, event_type, payload, created_at) AS (VALUES {values}), "
            "base (last, prev) AS (SELECT m.last, (SELECT hash FROM events "
            "WHERE task_id IS ? AND seq = m.last) FROM (SELECT COALESCE(MAX(seq), 0) AS last "
            "FROM events WHERE task_id IS ?) AS m), "
            "chain (n, seq, event_type, payload, created_at, hash) AS ("
            "SELECT 0, last, NULL, NULL, NULL, prev FROM base UNION ALL "
            "SELECT new.n, chain.seq + 1, new.event_type, new.payload, new.created_at, "
            f"{SQL_FUNCTION}(chain.hash, ?, chain.seq + 1, new.event_type, new.payload, "
            "new.created_at) FROM chain JOIN new ON new.n = chain.n + 1) "
            f"INSERT INTO events ({_COLUMNS}, hash) "
            "SELECT ?, seq, event_type, payload, created_at, hash FROM chain WHERE n > 0 "
            "ORDER BY n RETURNING seq, hash",
            (*params, task_id, task_id, task_id, task_id),
        )
        # RETURNING's row order is unspecified; the numbers are consecutive from base.
        first = min(row["seq"] for row in rows)
        hashes = {row["seq"]: row["hash"] for row in rows}
        return [
            Event(
                task_id=task_id,
                seq=first + n,
                event_type=event_type,
                payload=load_json(text, {}),  # what was stored, not the caller's object
                created_at=to_datetime(ts),
                hash=hashes[first + n],
            )
            for n, ((event_type, _), text, ts) in enumerate(zip(events, texts, times, strict=True))
        ]

    async def _append_postgres(
        self,
        task_id: str | None,
        events: Sequence[NewEvent],
        texts: Sequence[str],
        times: Sequence[float],
    ) -> list[Event]:
        """PostgreSQL cannot run the chain's Python function inside the INSERT, so
        the hashes are computed here from the chain's head (seq, hash), and the
        INSERT writes them only if that is still the head, checked under the
        chain's advisory lock: `ducklm_chain_at` (runtime/store/pg_baseline.py)
        takes the lock (held to the end of the transaction) and then compares
        the head, its seq and its hash, with a fresh snapshot, so a process
        appending at the same time either went first (the check fails, the head
        is read again) or waits. The hash matters: a guess left by an append
        whose transaction rolled back names a seq another replica may since have
        written, with another hash; chaining onto it would fork the chain.

        The head comes from this store's last append to the chain when there
        was one (a task's events are mostly written by the replica running it),
        else it is guessed empty (a new task): then an append is one statement.
        A wrong guess (another process wrote, a transaction rolled back) costs
        one read and a second try; should that
        lose a race too, the append takes the lock first and reads the head
        under it, which cannot fail. The rows are the same as SQLite's."""
        # A chain this store has not written to yet is guessed empty: right for a
        # new task (the usual first append), and a wrong guess costs no more
        # than reading the head first would have, plus one failed check.
        guess = self._heads.get(task_id, (0, None))
        for _ in range(2):
            params, written = _chained(task_id, *guess, events, texts, times)
            rows = await self.db.fetchall(
                f"INSERT INTO events ({_COLUMNS}, hash) SELECT * FROM (VALUES "
                + ", ".join([_TYPED_ROW] * len(events))
                + ") AS new WHERE (SELECT ducklm_chain_at(?, ?, ?, ?)) RETURNING seq",
                (*params, chain_lock_key(task_id), task_id, *guess),
            )
            if rows:
                self._remember(task_id, written[-1])
                return written
            guess = await self._head(task_id)
        async with self.db.transaction():
            await self.db.fetchall("SELECT pg_advisory_xact_lock(?)", (chain_lock_key(task_id),))
            params, written = _chained(task_id, *await self._head(task_id), events, texts, times)
            values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(events))
            await self.db.execute(f"INSERT INTO events ({_COLUMNS}, hash) VALUES {values}", params)
        self._remember(task_id, written[-1])
        return written

    async def _head(self, task_id: str | None) -> tuple[int, str | None]:
        """The chain's last (seq, hash) as stored ((0, None): no event yet)."""
        where, key = same_task(task_id)
        row = await self.db.fetchone(
            f"SELECT seq, hash FROM events WHERE {where} ORDER BY seq DESC LIMIT 1", key
        )
        return (int(row["seq"]), row["hash"]) if row is not None else (0, None)

    def _remember(self, task_id: str | None, last: Event) -> None:
        heads = self._heads
        heads.pop(task_id, None)
        heads[task_id] = (last.seq, last.hash)
        if len(heads) > HEADS_KEPT:
            del heads[next(iter(heads))]  # the chain appended to longest ago

    async def _append_in_chunks(
        self, task_id: str | None, events: Sequence[NewEvent], times: Sequence[float]
    ) -> list[Event]:
        step = MAX_EVENTS_PER_STATEMENT
        written: list[Event] = []
        async with self.db.transaction():
            for i in range(0, len(events), step):
                written += await self.append_many(
                    task_id, events[i : i + step], at=times[i : i + step]
                )
        return written

    async def list_events(self, task_id: str | None) -> list[Event]:
        """A task's events (None: the global ones) in order."""
        where, key = same_task(task_id)
        rows = await self.db.fetchall(f"SELECT {_READ} FROM events WHERE {where} ORDER BY seq", key)
        return [_event(row) for row in rows]

    async def last_events(self, task_id: str, count: int) -> list[Event]:
        """A task's last `count` events, in order."""
        rows = await self.db.fetchall(
            f"SELECT {_READ} FROM events WHERE task_id = ? ORDER BY seq DESC LIMIT ?",
            (task_id, count),
        )
        return [_event(row) for row in reversed(rows)]

    async def list_by_type(self, event_type: str, limit: int = 100) -> list[Event]:
        """The latest events of one type across all tasks, newest first."""
        rows = await self.db.fetchall(
            f"SELECT {_READ} FROM events WHERE event_type = ? ORDER BY id DESC LIMIT ?",
            (event_type, limit),
        )
        return [_event(row) for row in rows]
