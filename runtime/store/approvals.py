"""Approval rows and their compare-and-set transitions (SQL only; the policy is in
runtime/approvals.py).

Every transition is one `UPDATE … WHERE <still in the old state> RETURNING`, so
whichever caller (task, process) gets a row back is the one that made it. That
holds on PostgreSQL at READ COMMITTED as well: a second writer waits for the
first one's row lock, then re-checks its WHERE against the committed row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple
from uuid import uuid4

from runtime.store.db import Database, dump_json, load_json, now, to_datetime, to_timestamp
from runtime.store.models import Approval
from runtime.store.sql import platform_filter

_COLUMNS = (
    "approval_id, task_id, idx, action, tool, command, risk_level, action_type, reason, "
    "requested_by, created_at, expires_at, decision, decided_by, decided_at, decision_note, "
    "executed_at, reminded_at, card_ref, card_state, replaces_approval_id, card_claimed_at"
)
# The columns for a query that joins approvals (as `a`) with another table.
_QUALIFIED = ", ".join(f"a.{column.strip()} AS {column.strip()}" for column in _COLUMNS.split(","))
DECISIONS = frozenset({"approve", "deny", "always", "expired"})
CARD_STATES = frozenset({"unposted", "posted", "resolved"})
# How long a process may take to post or resolve a card before another may try.
CARD_LEASE_S = 60.0


class DueApproval(NamedTuple):
    """What the scheduler reads to time a pending approval (times as stored: epoch seconds)."""

    approval_id: str
    created_at: float
    expires_at: float | None
    reminded_at: float | None
    due_at: float  # what `claim_due` compares against; 0: not planned yet


def _approval(row: sqlite3.Row) -> Approval:
    action = load_json(row["action"], {})
    return Approval(
        approval_id=row["approval_id"],
        task_id=row["task_id"],
        index=row["idx"],
        action=action if isinstance(action, dict) else {"value": action},
        tool=row["tool"],
        command=row["command"],
        risk_level=row["risk_level"],
        action_type=row["action_type"],
        reason=row["reason"],
        requested_by=row["requested_by"],
        created_at=to_datetime(row["created_at"]),
        expires_at=to_datetime(row["expires_at"]),
        decision=row["decision"],
        decided_by=row["decided_by"],
        decided_at=to_datetime(row["decided_at"]),
        decision_note=row["decision_note"],
        executed_at=to_datetime(row["executed_at"]),
        reminded_at=to_datetime(row["reminded_at"]),
        card_ref=row["card_ref"],
        card_state=row["card_state"],
        replaces_approval_id=row["replaces_approval_id"],
        card_claimed_at=to_datetime(row["card_claimed_at"]),
    )


class ApprovalStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self,
        task_id: str,
        action: Mapping[str, Any],
        *,
        index: int = 1,
        tool: str | None = None,
        command: str | None = None,
        risk_level: str | None = None,
        action_type: str | None = None,
        reason: str | None = None,
        requested_by: str | None = None,
        expires_at: datetime | float | None = None,
        replaces_approval_id: str | None = None,
    ) -> Approval:
        """A new pending approval; `tool` defaults to action["tool"]. With
        `replaces_approval_id` it is the same action offered again (at most once
        per replaced approval: a unique index)."""
        approval_id = uuid4().hex
        tool = tool if tool is not None else str(action.get("tool") or "")
        row = await self.db.fetchone(
            f"INSERT INTO approvals ({_COLUMNS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
            "'unposted', ?, NULL) "
            f"RETURNING {_COLUMNS}",
            (
                approval_id,
                task_id,
                index,
                dump_json(dict(action)),
                tool,
                command,
                risk_level,
                action_type,
                reason,
                requested_by,
                now(),
                to_timestamp(expires_at),
                replaces_approval_id,
            ),
        )
        assert row is not None
        return _approval(row)

    async def get(self, approval_id: str) -> Approval | None:
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS} FROM approvals WHERE approval_id = ?", (approval_id,)
        )
        return None if row is None else _approval(row)

    async def decide(
        self,
        approval_id: str,
        decision: str,
        decided_by: str,
        note: str | None = None,
        decided_at: datetime | float | None = None,
        *,
        revision: int | None = None,
    ) -> bool:
        """Record the decision if none was recorded yet; True only for the caller who did.
        With `revision`, only if the approval is still at that revision (the one the
        decider saw): an edit in between (issue #20) makes it decide nothing."""
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; one of {sorted(DECISIONS)}")
        at = to_timestamp(decided_at)
        same = "" if revision is None else " AND revision = ?"
        return bool(
            await self.db.execute(
                "UPDATE approvals SET decision = ?, decided_by = ?, decision_note = ?, "
                f"decided_at = ? WHERE approval_id = ? AND decision IS NULL{same} RETURNING 1",
                (
                    decision,
                    decided_by,
                    note,
                    now() if at is None else at,
                    approval_id,
                    *(() if revision is None else (revision,)),
                ),
            )
        )

    async def claim_execution(self, approval_id: str) -> bool:
        """Claim the right to run the approved action; True exactly once."""
        return bool(
            await self.db.execute(
                "UPDATE approvals SET executed_at = ? WHERE approval_id = ? "
                "AND executed_at IS NULL AND decision IN ('approve', 'always') RETURNING 1",
                (now(), approval_id),
            )
        )

    async def list_pending(self, limit: int = 100) -> list[Approval]:
        """Undecided approvals, oldest first."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM approvals WHERE decision IS NULL "
            "ORDER BY created_at, rowid LIMIT ?",
            (limit,),
        )
        return [_approval(row) for row in rows]

    async def count_pending(self) -> int:
        """How many approvals are undecided (the approvals_pending index: no table scan)."""
        row = await self.db.fetchone("SELECT COUNT(*) FROM approvals WHERE decision IS NULL")
        return int(row[0]) if row is not None else 0

    async def pending_for_task(self, task_id: str) -> list[Approval]:
        """The task's undecided approvals, oldest first."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM approvals WHERE task_id = ? AND decision IS NULL "
            "ORDER BY created_at, rowid",
            (task_id,),
        )
        return [_approval(row) for row in rows]

    async def list_for_task(self, task_id: str) -> list[Approval]:
        """All of the task's approvals, decided or not, oldest first."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM approvals WHERE task_id = ? ORDER BY created_at, rowid",
            (task_id,),
        )
        return [_approval(row) for row in rows]

    async def find_by_card_ref(self, card_ref: str) -> Approval | None:
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS} FROM approvals WHERE card_ref = ? ORDER BY created_at DESC LIMIT 1",
            (card_ref,),
        )
        return _approval(row) if row else None

    async def set_card_ref(self, approval_id: str, ref: str | None) -> bool:
        return bool(
            await self.db.execute(
                "UPDATE approvals SET card_ref = ? WHERE approval_id = ? RETURNING 1",
                (ref, approval_id),
            )
        )

    # -- cards (issue #15: the card follows the decision) -------------------

    async def claim_card(
        self,
        approval_id: str,
        state: str,
        lease: float = CARD_LEASE_S,
        *,
        stale_before: float | None = None,
    ) -> bool:
        """Take the right to change the card of an approval whose card is in `state`
        (unposted: post it; posted: resolve it), unless another caller holds it
        since less than `lease` seconds (or since `stale_before`, the caller's
        start: a claim older than that is a dead process's). True for one caller."""
        if state not in CARD_STATES:
            raise ValueError(f"unknown card state {state!r}; one of {sorted(CARD_STATES)}")
        at = now()
        expired = at - lease if stale_before is None else max(at - lease, stale_before)
        return bool(
            await self.db.execute(
                "UPDATE approvals SET card_claimed_at = ? WHERE approval_id = ? "
                "AND card_state = ? AND (card_claimed_at IS NULL OR card_claimed_at < ?) "
                "RETURNING 1",
                (at, approval_id, state, expired),
            )
        )

    async def release_card(self, approval_id: str) -> None:
        """Give the claim back (the platform call failed): the next recovery retries."""
        await self.db.execute(
            "UPDATE approvals SET card_claimed_at = NULL WHERE approval_id = ? RETURNING 1",
            (approval_id,),
        )

    async def card_posted(self, approval_id: str, ref: str) -> bool:
        """The card is out: its reference and state in one statement."""
        return bool(
            await self.db.execute(
                "UPDATE approvals SET card_ref = ?, card_state = 'posted', card_claimed_at = NULL "
                "WHERE approval_id = ? AND card_state = 'unposted' RETURNING 1",
                (ref, approval_id),
            )
        )

    async def card_resolved(self, approval_id: str) -> bool:
        """The card shows the decision now."""
        return bool(
            await self.db.execute(
                "UPDATE approvals SET card_state = 'resolved', card_claimed_at = NULL "
                "WHERE approval_id = ? AND card_state = 'posted' RETURNING 1",
                (approval_id,),
            )
        )

    async def iter_cards_lagging(
        self, platforms: Sequence[str], page: int = 200
    ) -> AsyncIterator[list[Approval]]:
        """Approvals whose card does not show their state, in conversations of
        `platforms` (the part of the conversation key before its first ":"):
        pending without a card while their task waits, decided (or expired) with
        the card still showing its buttons or perhaps posted unrecorded.

        All of it, a page at a time (keyset on created_at and rowid through the
        approvals_card_lagging index, whose condition is the first three lines of
        the WHERE): memory bounded by a page, nothing skipped however much lags.
        Oldest first."""
        if not platforms:
            return
        on_platforms, platform_params = platform_filter("t.conversation", platforms)
        after: tuple[float, int] | None = None
        while True:
            keyset = "" if after is None else "AND (a.created_at, a.rowid) > (?, ?) "
            rows = await self.db.fetchall(
                f"SELECT {_QUALIFIED}, a.created_at AS k_at, a.rowid AS k_row "
                "FROM approvals a INDEXED BY approvals_card_lagging "
                "JOIN tasks t ON t.task_id = a.task_id "
                "WHERE ((a.decision IS NULL AND a.card_state = 'unposted') "
                "OR (a.decision IS NOT NULL AND a.card_state = 'posted') "
                "OR (a.decision IS NOT NULL AND a.card_state = 'unposted' "
                "AND a.card_claimed_at IS NOT NULL)) "
                # A pending approval's card is owed only while its task waits.
                "AND (a.decision IS NOT NULL OR t.status = 'waiting_for_approval') "
                f"AND {on_platforms} "
                f"{keyset}ORDER BY a.created_at, a.rowid LIMIT ?",
                (*platform_params, *(after or ()), page),
            )
            if not rows:
                return
            after = (rows[-1]["k_at"], rows[-1]["k_row"])
            yield [_approval(row) for row in rows]
            if len(rows) < page:
                return

    async def iter_decided_not_carried_out(self, page: int = 200) -> AsyncIterator[list[Approval]]:
        """Per waiting task with nothing pending, its latest decision whose
        continuation never started (the decided action was not claimed), for
        every waiting task: a page of waiting tasks at a time
        (keyset on the tasks_status index: created_at and rowid), so a page may
        hold fewer (or no) approvals. Oldest task first."""
        after: tuple[float, int] | None = None
        while True:
            keyset = "" if after is None else "AND (created_at, rowid) > (?, ?) "
            rows = await self.db.fetchall(
                # The page of tasks first, then each one's latest decision not
                # carried out (LEFT: the cursor must move past tasks without one).
                f"SELECT {_QUALIFIED}, w.created_at AS k_at, w.k_row AS k_row, "
                "EXISTS (SELECT 1 FROM approvals p WHERE p.task_id = w.task_id "
                "AND p.decision IS NULL) AS k_pending "
                "FROM (SELECT task_id, created_at, rowid AS k_row FROM tasks "
                f"WHERE status = 'waiting_for_approval' {keyset}"
                "ORDER BY created_at, rowid LIMIT ?) w "
                "LEFT JOIN approvals a ON a.rowid = (SELECT d.rowid FROM approvals d "
                "WHERE d.task_id = w.task_id AND d.decision IN ('approve', 'always', 'deny') "
                "AND d.executed_at IS NULL ORDER BY d.created_at DESC, d.rowid DESC LIMIT 1) "
                "ORDER BY w.created_at, w.k_row",
                (*(after or ()), page),
            )
            if not rows:
                return
            after = (rows[-1]["k_at"], rows[-1]["k_row"])
            yield [
                _approval(row)
                for row in rows
                if row["approval_id"] is not None and not row["k_pending"]
            ]
            if len(rows) < page:
                return

    async def replacement_of(self, approval_id: str) -> Approval | None:
        """The approval that offers `approval_id`'s action again, if any."""
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS} FROM approvals WHERE replaces_approval_id = ?", (approval_id,)
        )
        return None if row is None else _approval(row)

    async def mark_reminded(self, approval_id: str) -> bool:
        """True for the one caller that should send the reminder: the approval is
        still undecided and nobody reminded yet."""
        return bool(
            await self.db.execute(
                "UPDATE approvals SET reminded_at = ? WHERE approval_id = ? "
                "AND reminded_at IS NULL AND decision IS NULL RETURNING 1",
                (now(), approval_id),
            )
        )

    # -- timers (issue #23): what is due next, from the approvals_due index ----

    async def earliest_due(self) -> float | None:
        """The earliest `due_at` of a pending approval (0: one waits to be planned),
        None when nothing is due. One index probe, however much is pending."""
        row = await self.db.fetchone(
            "SELECT due_at FROM approvals WHERE decision IS NULL AND due_at IS NOT NULL "
            "ORDER BY due_at LIMIT 1"
        )
        return None if row is None else float(row[0])

    async def due(self, until: float, limit: int = 200) -> list[DueApproval]:
        """Pending approvals due at or before `until`, earliest first: only what
        timing needs (no models built: a backlog of 100,000 is read in batches)."""
        rows = await self.db.fetchall(
            "SELECT approval_id, created_at, expires_at, reminded_at, due_at FROM approvals "
            "WHERE decision IS NULL AND due_at IS NOT NULL AND due_at <= ? "
            "ORDER BY due_at LIMIT ?",
            (until, limit),
        )
        return [DueApproval(*row) for row in rows]

    async def claim_due(self, approval_id: str, was: float, next_due: float | None) -> bool:
        """Move a pending approval's `due_at` from `was` to `next_due` (None:
        nothing more is due); True for the one caller whose view was current,
        who then does what was due (so a second process never does it twice)."""
        return bool(
            await self.db.execute(
                "UPDATE approvals SET due_at = ? WHERE approval_id = ? AND due_at = ? "
                "AND decision IS NULL RETURNING 1",
                (next_due, approval_id, was),
            )
        )
