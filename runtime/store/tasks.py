"""Tasks: one row per question (or direct command), with its status and answer."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args
from uuid import uuid4

from runtime.store.db import Database, dump_json, load_json, now, to_datetime, to_timestamp
from runtime.store.models import Task, TaskStatus
from runtime.store.sql import NO_LIMIT, platform_filter

TASK_STATUSES: frozenset[str] = frozenset(get_args(TaskStatus))
# Finished tasks that owe their chat thread an answer (or the interruption note).
OWING_STATUSES = frozenset({"completed", "failed", "interrupted"})
_OWING = "('completed', 'failed', 'interrupted')"
_COLUMNS = (
    "task_id, message, workspace, debug, status, conversation, requested_by, "
    "history_messages, final_response, error, created_at, updated_at"
)


def _check_status(status: str) -> None:
    if status not in TASK_STATUSES:
        raise ValueError(f"unknown task status {status!r}; one of {sorted(TASK_STATUSES)}")


def _clean_history(history: Iterable[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    # Chat messages may carry None contents (e.g. tool-call turns); the model
    # stores plain strings, so coerce here rather than fail on every later read.
    return [
        {str(key): "" if value is None else str(value) for key, value in message.items()}
        for message in history or []
    ]


def _task(row: sqlite3.Row) -> Task:
    return Task(
        task_id=row["task_id"],
        message=row["message"],
        workspace=row["workspace"],
        debug=bool(row["debug"]),
        status=row["status"],
        conversation=row["conversation"],
        requested_by=row["requested_by"],
        history_messages=load_json(row["history_messages"], []),
        final_response=row["final_response"],
        error=row["error"],
        created_at=to_datetime(row["created_at"]),
        updated_at=to_datetime(row["updated_at"]),
    )


GROUP_SEPARATOR = "|"


def conversation_group(conversation: str | None) -> str | None:
    """The part of a conversation key before its first "|" (None without one).

    Keys are opaque to the runtime, but the chat layer's have the form
    `<platform>:<channel>|<thread>`; listing a channel's tasks is then a prefix
    `<group>|`, which an index on the group answers without a sort."""
    if conversation is None or GROUP_SEPARATOR not in conversation:
        return None
    return conversation.split(GROUP_SEPARATOR, 1)[0]


def _prefix_bounds(prefix: str) -> str | None:
    """The smallest string above every string starting with `prefix` (None: no bound).

    TEXT compares as UTF-8 bytes, which orders like code points, so
    [prefix, bound) is exactly the strings with that prefix and can use an index.
    """
    if not prefix:
        return None
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return None
    following = last + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not valid in UTF-8
        following = 0xE000
    return prefix[:-1] + chr(following)


def _fence(if_running: bool, owner: str | None) -> tuple[str, tuple[str, ...]]:
    """The conditions that keep a replica's write to its running task from
    overwriting what others did since (see `TaskStore.complete_task`)."""
    if not if_running:
        return "", ()
    if owner is None:
        return " AND status = 'running'", ()
    return " AND status = 'running' AND owner = ?", (owner,)


class TaskStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_task(
        self,
        message: str,
        workspace: str | Path | None = None,
        debug: bool = False,
        *,
        conversation: str | None = None,
        requested_by: str | None = None,
        history_messages: Iterable[Mapping[str, Any]] | None = None,
    ) -> Task:
        task = self.new_task(
            message,
            workspace,
            debug,
            conversation=conversation,
            requested_by=requested_by,
            history_messages=history_messages,
        )
        await self.insert(task)
        return task

    @staticmethod
    def new_task(
        message: str,
        workspace: str | Path | None = None,
        debug: bool = False,
        *,
        conversation: str | None = None,
        requested_by: str | None = None,
        history_messages: Iterable[Mapping[str, Any]] | None = None,
    ) -> Task:
        """A running task with a fresh id, not yet stored (see `insert`)."""
        ts = to_datetime(now())
        return Task(
            task_id=uuid4().hex,
            message=message,
            workspace=None if workspace is None else str(workspace),
            debug=bool(debug),
            conversation=conversation,
            requested_by=requested_by,
            history_messages=_clean_history(history_messages),
            created_at=ts,
            updated_at=ts,
        )

    async def insert(self, task: Task, *, owner: str | None = None) -> None:
        """Store a task built by `new_task`; `owner` is the replica running it (the
        tasks.owner column of v10, written here to save OwnershipStore.own's UPDATE)."""
        await self.db.execute(
            f"INSERT INTO tasks ({_COLUMNS}, conversation_group, owner) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                task.task_id,
                task.message,
                task.workspace,
                int(task.debug),
                task.status,
                task.conversation,
                task.requested_by,
                dump_json(task.history_messages),
                task.final_response,
                task.error,
                to_timestamp(task.created_at),
                to_timestamp(task.updated_at),
                conversation_group(task.conversation),
                owner,
            ),
        )

    async def get_task(self, task_id: str) -> Task | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,))
        return None if row is None else _task(row)

    async def update_status(self, task_id: str, status: str) -> bool:
        """Set the status unconditionally; False when there is no such task."""
        _check_status(status)
        return bool(
            await self.db.execute(
                "UPDATE tasks SET status = ?, updated_at = ? WHERE task_id = ? RETURNING 1",
                (status, now(), task_id),
            )
        )

    async def claim_status(self, task_id: str, from_status: str, to_status: str) -> bool:
        """Move from one status to another only if the task is still in the first one.

        Exactly one of several concurrent callers (or processes) gets True.
        """
        _check_status(from_status)
        _check_status(to_status)
        # A task reopened from `interrupted` (a cut-short run offered again) owes
        # its real answer later: an interruption note claimed or posted meanwhile
        # must not mark that answer as already given.
        reopened = (
            ", answered_at = NULL, answer_claimed_at = NULL"
            if from_status == "interrupted" and to_status not in ("completed", "failed")
            else ""
        )
        return bool(
            await self.db.execute(
                f"UPDATE tasks SET status = ?, updated_at = ?{reopened} "
                "WHERE task_id = ? AND status = ? RETURNING 1",
                (to_status, now(), task_id, from_status),
            )
        )

    async def waiting_for_approval(
        self, task_id: str, *, if_running: bool = False, owner: str | None = None
    ) -> bool:
        """Running -> waiting for approval; fenced like `complete_task`."""
        return await self._set_fenced(
            task_id, "status = 'waiting_for_approval'", (), if_running, owner
        )

    async def complete_task(
        self,
        task_id: str,
        final_response: str,
        *,
        if_running: bool = False,
        owner: str | None = None,
    ) -> bool:
        """The task's answer. With `if_running` (the loop's writes) only while the
        task is still running, and with `owner` only while it is that replica's:
        False when a survivor reported it interrupted meanwhile (this replica was
        taken for dead) or another replica carries it on; nothing changes then."""
        return await self._set_fenced(
            task_id,
            "status = 'completed', final_response = ?",
            (final_response,),
            if_running,
            owner,
        )

    async def fail_task(
        self, task_id: str, error: str, *, if_running: bool = False, owner: str | None = None
    ) -> bool:
        """The task failed; fenced like `complete_task`."""
        return await self._set_fenced(
            task_id, "status = 'failed', error = ?", (error,), if_running, owner
        )

    async def _set_fenced(
        self,
        task_id: str,
        assignments: str,
        values: tuple[str, ...],
        if_running: bool,
        owner: str | None,
    ) -> bool:
        """UPDATE the task's `assignments` (with `values`) and its updated_at, behind
        the fence of `_fence`; whether it did."""
        fence, params = _fence(if_running, owner)
        return bool(
            await self.db.execute(
                f"UPDATE tasks SET {assignments}, updated_at = ? "
                f"WHERE task_id = ?{fence} RETURNING 1",
                (*values, now(), task_id, *params),
            )
        )

    async def expire_task(self, task_id: str) -> bool:
        return await self.update_status(task_id, "expired")

    async def list_recent(
        self,
        limit: int = 20,
        *,
        conversation_prefix: str | None = None,
        status: str | None = None,
    ) -> list[Task]:
        """Newest first, optionally only conversations starting with a prefix
        (case-sensitive, no wildcards) and/or one status."""
        where: list[str] = []
        params: list[Any] = []
        group, separator, rest = (conversation_prefix or "").partition(GROUP_SEPARATOR)
        if separator and not rest:
            # "<group>|": exactly the keys of that group, newest first from its index.
            where.append("conversation_group = ?")
            params.append(group)
        elif conversation_prefix is not None:
            where.append("conversation >= ? AND substr(conversation, 1, ?) = ?")
            params += [conversation_prefix, len(conversation_prefix), conversation_prefix]
            bound = _prefix_bounds(conversation_prefix)
            if bound is not None:
                where.append("conversation < ?")
                params.append(bound)
        if status is not None:
            _check_status(status)
            where.append("status = ?")
            params.append(status)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM tasks {clause}ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (*params, limit),
        )
        return [_task(row) for row in rows]

    async def list_by_conversation(self, conversation: str, limit: int = 50) -> list[Task]:
        """The conversation's tasks, newest first."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM tasks WHERE conversation = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (conversation, limit),
        )
        return [_task(row) for row in rows]

    # -- the answer a finished task owes its chat thread (issue #15) ------------

    async def claim_answer(
        self, task_id: str, lease: float = 60.0, *, stale_before: float | None = None
    ) -> str:
        """The right to post a finished task's answer now. "claimed": this caller
        posts it; "reclaimed": likewise, but a dead caller's claim was taken over
        (its post may have gone out unrecorded); "taken": it was answered, or
        another caller holds the claim since less than `lease` seconds (a claim
        from before `stale_before` is a dead process's); "not_owed": no such
        task, or it is not finished (completed, failed or interrupted)."""
        row = await self.db.fetchone(
            "SELECT status, answered_at, answer_claimed_at FROM tasks WHERE task_id = ?",
            (task_id,),
        )
        if row is None or row["status"] not in OWING_STATUSES:
            return "not_owed"
        at = now()
        expired = at - lease if stale_before is None else max(at - lease, stale_before)
        old = row["answer_claimed_at"]
        if row["answered_at"] is not None or (old is not None and old >= expired):
            return "taken"
        # Compare-and-set on the claim as read: of two callers, one wins.
        if not await self.db.execute(
            "UPDATE tasks SET answer_claimed_at = ? WHERE task_id = ? "
            "AND answered_at IS NULL AND answer_claimed_at IS NOT DISTINCT FROM ? RETURNING 1",
            (at, task_id, old),
        ):
            return "taken"
        return "claimed" if old is None else "reclaimed"

    async def answered(self, task_id: str) -> bool:
        """The answer is out (after the platform accepted it)."""
        return bool(
            await self.db.execute(
                "UPDATE tasks SET answered_at = ?, answer_claimed_at = NULL "
                "WHERE task_id = ? AND answered_at IS NULL RETURNING 1",
                (now(), task_id),
            )
        )

    async def release_answer(self, task_id: str) -> None:
        """The post failed: the claim goes, recovery tries again."""
        await self.db.execute(
            "UPDATE tasks SET answer_claimed_at = NULL WHERE task_id = ? RETURNING 1",
            (task_id,),
        )

    async def iter_owed_answers(
        self,
        platforms: Sequence[str],
        *,
        stale_before: float,
        lease: float = 60.0,
        page: int = 200,
    ) -> AsyncIterator[list[Task]]:
        """Finished tasks (completed, failed, interrupted) of conversations on
        `platforms` whose answer was never posted and nobody is posting now, all
        of them, a page at a time (keyset on updated_at and rowid, from the
        tasks_unanswered index): nothing skipped however many are owed, memory
        bounded by a page. Oldest first."""
        if not platforms:
            return
        on_platforms, platform_params = platform_filter("conversation", platforms)
        expired = max(now() - lease, stale_before)
        after: tuple[float, int] | None = None
        while True:
            keyset = "" if after is None else "AND (updated_at, rowid) > (?, ?) "
            rows = await self.db.fetchall(
                # INDEXED BY: left alone, SQLite's planner reads tasks_status (every
                # completed task) and sorts; this index holds only what is owed.
                # (Dropped for PostgreSQL, whose planner finds it: runtime/store/sql.py.)
                f"SELECT {_COLUMNS}, updated_at AS k_at, rowid AS k_row "
                "FROM tasks INDEXED BY tasks_unanswered "
                f"WHERE answered_at IS NULL AND status IN {_OWING} "
                "AND (answer_claimed_at IS NULL OR answer_claimed_at < ?) "
                f"AND {on_platforms} "
                f"{keyset}ORDER BY updated_at, rowid LIMIT ?",
                (expired, *platform_params, *(after or ()), page),
            )
            if not rows:
                return
            after = (rows[-1]["k_at"], rows[-1]["k_row"])
            yield [_task(row) for row in rows]
            if len(rows) < page:
                return

    async def iter_interrupted_since(
        self, since: float, page: int = 200
    ) -> AsyncIterator[list[Task]]:
        """Tasks `interrupted` with their last change at or after `since`, all of
        them, a page at a time (keyset on updated_at and rowid, from the
        tasks_finished index). Oldest change first."""
        after: tuple[float, int] = (since, -1)
        while True:
            rows = await self.db.fetchall(
                f"SELECT {_COLUMNS}, updated_at AS k_at, rowid AS k_row "
                "FROM tasks INDEXED BY tasks_finished "
                # The IN repeats tasks_finished's condition, so the index applies.
                "WHERE status IN ('completed', 'failed', 'expired', 'interrupted') "
                "AND status = 'interrupted' AND updated_at >= ? "
                "AND (updated_at, rowid) > (?, ?) ORDER BY updated_at, rowid LIMIT ?",
                (since, *after, page),
            )
            if not rows:
                return
            after = (rows[-1]["k_at"], rows[-1]["k_row"])
            yield [_task(row) for row in rows]
            if len(rows) < page:
                return

    async def mark_interrupted(
        self, updated_before: float | None = None, limit: int | None = None
    ) -> list[Task]:
        """After a crash: every `running` task becomes `interrupted`; returns them.
        With `limit`, at most that many (the oldest): call again until it returns
        fewer (the marked ones no longer match, so no cursor is needed).

        Only the process that owns the tasks (the bot at start) should call this,
        not a CLI next to a running bot. `updated_before` (the caller's start time)
        spares tasks that a process started since then is working on. The
        `task_interrupted` events are the caller's (bot/recovery.py), in the same
        transaction.
        """
        at = now()
        # PostgreSQL: the subquery locks what it picks (skipping rows another
        # process is changing), and a locked row is re-checked against
        # status = 'running', so a task finished meanwhile is not marked.
        rows = await self.db.fetchall(
            "UPDATE tasks SET status = 'interrupted', updated_at = ? WHERE rowid IN "
            "(SELECT rowid FROM tasks WHERE status = 'running' AND updated_at < ? "
            f"ORDER BY created_at LIMIT ?{self.db.skip_locked}) RETURNING {_COLUMNS}",
            (
                at,
                at if updated_before is None else updated_before,
                NO_LIMIT if limit is None else limit,
            ),
        )
        return sorted((_task(row) for row in rows), key=lambda task: task.created_at)
