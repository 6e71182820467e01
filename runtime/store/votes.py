"""Quorum votes, edits and escalation of approvals (issue #20; SQL only, the
policy is in runtime/approvals.py).

Portable to both backends. Concurrency: `lock` is a no-op UPDATE of the
approval's row that PostgreSQL (READ COMMITTED) holds until the transaction
ends, so two voters of one approval count their votes one after the other and
the last needed vote sees every earlier one (SQLite has one writer anyway).
Every transition is still a compare-and-set checked by its RETURNING row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from runtime.store.db import Database, dump_json, now


class EditState(NamedTuple):
    """What an approval's row says about edits and escalation."""

    revision: int  # 0: never edited; each edit adds one
    original_command: str | None  # the command first proposed (set by the first edit)
    edited_by: str | None  # the last editor
    escalated_at: float | None  # when the escalation approvers were called in


class DueEscalation(NamedTuple):
    approval_id: str
    task_id: str
    created_at: float
    escalate_at: float  # 0: to be planned


class VoteStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- votes ------------------------------------------------------------

    async def lock(self, approval_id: str) -> int | None:
        """Inside a transaction: hold the pending approval's row until it ends and
        return its revision; None when it is decided (or unknown)."""
        row = await self.db.fetchone(
            "UPDATE approvals SET revision = revision WHERE approval_id = ? "
            "AND decision IS NULL RETURNING revision",
            (approval_id,),
        )
        return None if row is None else int(row[0])

    async def add(
        self, approval_id: str, revision: int, voter: str, vote: str, task_id: str
    ) -> bool:
        """Count `voter`'s vote on this revision; False if they had voted already."""
        return bool(
            await self.db.execute(
                "INSERT INTO approval_votes (vote_id, approval_id, revision, voter, vote, "
                "task_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (vote_id) DO NOTHING RETURNING 1",
                (
                    f"{approval_id}/{revision}/{voter}",
                    approval_id,
                    revision,
                    voter,
                    vote,
                    task_id,
                    now(),
                ),
            )
        )

    async def voters(self, approval_id: str, revision: int) -> list[str]:
        """Who approved this revision, first voter first."""
        rows = await self.db.fetchall(
            "SELECT voter FROM approval_votes WHERE approval_id = ? AND revision = ? "
            "ORDER BY created_at, voter",
            (approval_id, revision),
        )
        return [str(row[0]) for row in rows]

    # -- edits ------------------------------------------------------------

    async def state(self, approval_id: str) -> EditState | None:
        row = await self.db.fetchone(
            "SELECT revision, original_command, edited_by, escalated_at FROM approvals "
            "WHERE approval_id = ?",
            (approval_id,),
        )
        if row is None:
            return None
        return EditState(int(row[0] or 0), row[1], row[2], row[3])

    async def edit(
        self,
        approval_id: str,
        revision: int,
        action: Mapping[str, Any],
        *,
        command: str,
        risk_level: str,
        action_type: str,
        reason: str,
        edited_by: str,
    ) -> bool:
        """Replace a pending approval's action by an edited one, if it is still at
        `revision` (True: this caller's edit is the one); the first proposed
        command is kept in original_command. Undecided only. The approval's card
        is owed anew (unposted, no reference): from this commit on, a click on
        the old card (which showed the old command) names a card that is not
        the approval's, and decides nothing; recovery posts the new card if the
        editor's process does not."""
        return bool(
            await self.db.execute(
                "UPDATE approvals SET action = ?, command = ?, risk_level = ?, "
                "action_type = ?, reason = ?, edited_by = ?, revision = revision + 1, "
                "original_command = COALESCE(original_command, command), "
                "card_state = 'unposted', card_ref = NULL, card_claimed_at = NULL "
                "WHERE approval_id = ? AND revision = ? AND decision IS NULL RETURNING 1",
                (
                    dump_json(dict(action)),
                    command,
                    risk_level,
                    action_type,
                    reason,
                    edited_by,
                    approval_id,
                    revision,
                ),
            )
        )

    # -- escalation (timed like approvals.due_at, from its own index) --------

    async def earliest_escalation(self) -> float | None:
        row = await self.db.fetchone(
            "SELECT escalate_at FROM approvals WHERE decision IS NULL "
            "AND escalate_at IS NOT NULL ORDER BY escalate_at LIMIT 1"
        )
        return None if row is None else float(row[0])

    async def escalations_due(self, until: float, limit: int = 200) -> list[DueEscalation]:
        rows = await self.db.fetchall(
            "SELECT approval_id, task_id, created_at, escalate_at FROM approvals "
            "WHERE decision IS NULL AND escalate_at IS NOT NULL AND escalate_at <= ? "
            "ORDER BY escalate_at LIMIT ?",
            (until, limit),
        )
        return [DueEscalation(str(r[0]), str(r[1]), float(r[2]), float(r[3])) for r in rows]

    async def claim_escalation(self, approval_id: str, was: float, next_at: float | None) -> bool:
        """Move escalate_at from `was` to `next_at` (None: nothing more due); True
        for the one caller (of every replica) whose view was current."""
        return bool(
            await self.db.execute(
                "UPDATE approvals SET escalate_at = ? WHERE approval_id = ? "
                "AND escalate_at = ? AND decision IS NULL RETURNING 1",
                (next_at, approval_id, was),
            )
        )

    async def mark_escalated(self, approval_id: str) -> bool:
        """Record that the escalation approvers were called in, and end the claim's
        lease (escalate_at) in the same statement; True once."""
        return bool(
            await self.db.execute(
                "UPDATE approvals SET escalated_at = ?, escalate_at = NULL WHERE approval_id = ? "
                "AND escalated_at IS NULL AND decision IS NULL RETURNING 1",
                (now(), approval_id),
            )
        )

    async def end_escalation(self, approval_id: str) -> None:
        """Nothing more to escalate (done already, or nobody to call in): the
        claim's lease is not renewed."""
        await self.db.execute(
            "UPDATE approvals SET escalate_at = NULL WHERE approval_id = ? "
            "AND escalate_at IS NOT NULL RETURNING 1",
            (approval_id,),
        )
