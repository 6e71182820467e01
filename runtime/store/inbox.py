"""The inbox: people's messages recorded before their delivery is acknowledged (SQL only).

A platform acknowledges a delivery (Slack's HTTP 200, Matrix's saved sync
token) only after `ChatService.accept` committed the delivery claims and an
inbox row together. A row is open until it became a task (closed in the same
commit as the task row, see RuntimeLoop) or was answered without one (a
decision, a hint). Whatever is still open after a crash is carried out by
recovery, once: a row is taken with a compare-and-set on its owner.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import uuid4

from runtime.store.db import Database, dump_json, load_json, now, to_datetime
from runtime.store.sql import NO_LIMIT, platform_filter

# Kept as long as the deliveries they were claimed with (runtime/store/deliveries.py).
DEFAULT_KEEP_SECONDS = 7 * 24 * 3600
_COLUMNS = (
    # "user" quoted: USER is a reserved word in PostgreSQL (SQLite accepts both).
    'inbox_id, conversation, "user", text, message_id, in_thread, from_bot, origin, late, '
    "deliveries, received_at, owner, claimed_at, done_at, outcome, task_id"
)


class InboxHandled(Exception):
    """The inbox row was already closed by someone else: the caller's work must
    roll back (it would be the message's second answer)."""


@dataclass(frozen=True)
class InboxRow:
    inbox_id: str
    conversation: str  # where the answer goes (a chat conversation key)
    user: str
    text: str
    message_id: str | None
    in_thread: bool
    from_bot: bool
    origin: str | None
    late: bool
    deliveries: tuple[str, ...]
    received_at: datetime
    owner: str | None  # the process (ChatService) carrying it out
    claimed_at: datetime | None
    done_at: datetime | None
    outcome: str | None  # task | decision | already_decided | hint | ...
    task_id: str | None


def _row(row: sqlite3.Row) -> InboxRow:
    keys = load_json(row["deliveries"], [])
    return InboxRow(
        inbox_id=row["inbox_id"],
        conversation=row["conversation"],
        user=row["user"],
        text=row["text"],
        message_id=row["message_id"],
        in_thread=bool(row["in_thread"]),
        from_bot=bool(row["from_bot"]),
        origin=row["origin"],
        late=bool(row["late"]),
        deliveries=tuple(str(k) for k in keys) if isinstance(keys, list) else (),
        received_at=to_datetime(row["received_at"]),  # type: ignore[arg-type]
        owner=row["owner"],
        claimed_at=to_datetime(row["claimed_at"]),
        done_at=to_datetime(row["done_at"]),
        outcome=row["outcome"],
        task_id=row["task_id"],
    )


class InboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self,
        conversation: str,
        user: str,
        text: str,
        *,
        deliveries: Sequence[str] = (),
        message_id: str | None = None,
        in_thread: bool = False,
        from_bot: bool = False,
        origin: str | None = None,
        late: bool = False,
        owner: str | None = None,
    ) -> InboxRow:
        """Record a message, open, already claimed by `owner` (the accepting process)."""
        at = now()
        row = await self.db.fetchone(
            f"INSERT INTO inbox ({_COLUMNS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL) "
            f"RETURNING {_COLUMNS}",
            (
                uuid4().hex,
                conversation,
                user,
                text,
                message_id,
                int(in_thread),
                int(from_bot),
                origin,
                int(late),
                dump_json(list(deliveries)),
                at,
                owner,
                at if owner is not None else None,
            ),
        )
        assert row is not None
        return _row(row)

    async def get(self, inbox_id: str) -> InboxRow | None:
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS} FROM inbox WHERE inbox_id = ?", (inbox_id,)
        )
        return None if row is None else _row(row)

    async def close(self, inbox_id: str, outcome: str, task_id: str | None = None) -> bool:
        """Mark the row done; True only for the caller that did (compare-and-set)."""
        return bool(
            await self.db.execute(
                "UPDATE inbox SET done_at = ?, outcome = ?, task_id = ? "
                "WHERE inbox_id = ? AND done_at IS NULL RETURNING 1",
                (now(), outcome, task_id, inbox_id),
            )
        )

    async def for_task(self, task_id: str) -> InboxRow | None:
        """The message a task was started from, if it came through the inbox."""
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS} FROM inbox WHERE task_id = ? LIMIT 1", (task_id,)
        )
        return None if row is None else _row(row)

    async def take_abandoned(
        self,
        owner: str,
        claimed_before: float,
        platforms: Sequence[str],
        limit: int | None = None,
    ) -> list[InboxRow]:
        """Claim for `owner` every open row of `platforms` claimed before
        `claimed_before` (by a process that has died since: the caller's own start
        time is the cut-off). One statement, so two processes recovering at once
        split the rows, never share one. With `limit`, at most that many (the
        oldest): call again until it returns fewer (a taken row is `owner`'s and
        no longer matches, so no cursor is needed)."""
        if not platforms:
            return []
        on_platforms, platform_params = platform_filter("conversation", platforms)
        # PostgreSQL (READ COMMITTED): SKIP LOCKED leaves rows another process is
        # taking right now to it, and a row it took meanwhile is re-checked
        # against the WHERE when locked, so the split stays exclusive there too.
        rows = await self.db.fetchall(
            "UPDATE inbox SET owner = ?, claimed_at = ? WHERE rowid IN "
            "(SELECT rowid FROM inbox WHERE done_at IS NULL "
            "AND (claimed_at IS NULL OR claimed_at < ?) AND owner IS DISTINCT FROM ? "
            f"AND {on_platforms} "
            f"ORDER BY received_at LIMIT ?{self.db.skip_locked}) RETURNING {_COLUMNS}",
            (
                owner,
                now(),
                claimed_before,
                owner,
                *platform_params,
                NO_LIMIT if limit is None else limit,
            ),
        )
        return sorted((_row(r) for r in rows), key=lambda r: r.received_at)

    async def iter_open_for(self, owner: str, page: int = 200) -> AsyncIterator[list[InboxRow]]:
        """`owner`'s open rows, oldest first (the caller tells which still have a
        job), a page at a time (keyset on received_at and rowid, from the
        inbox_open index): memory bounded by a page however many are open."""
        after: tuple[float, int] | None = None
        while True:
            keyset = "" if after is None else "AND (received_at, rowid) > (?, ?) "
            rows = await self.db.fetchall(
                f"SELECT {_COLUMNS}, received_at AS k_at, rowid AS k_row FROM inbox "
                f"WHERE done_at IS NULL AND owner = ? {keyset}ORDER BY received_at, rowid LIMIT ?",
                (owner, *(after or ()), page),
            )
            if not rows:
                return
            after = (rows[-1]["k_at"], rows[-1]["k_row"])
            yield [_row(r) for r in rows]
            if len(rows) < page:
                return

    async def count_open(self) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) FROM inbox WHERE done_at IS NULL")
        return int(row[0]) if row is not None else 0

    async def prune(self, older_than: float = DEFAULT_KEEP_SECONDS) -> int:
        """Forget done rows older than `older_than` seconds (with the deliveries;
        off the loop like them). Open rows stay until they are carried out."""
        return await self.db.background_delete(
            "DELETE FROM inbox WHERE done_at IS NOT NULL AND done_at < ?", (now() - older_than,)
        )
