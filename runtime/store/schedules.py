"""Scheduled prompts (SQL only; timing lives in bot/scheduler.py)."""

from __future__ import annotations

import secrets
import sqlite3

from runtime.store.db import Database, StoreError, now, to_datetime
from runtime.store.models import Schedule

_COLUMNS = (
    "schedule_id, cron, timezone, prompt, conversation, created_by, created_at, paused, last_run_at"
)
_ID_ATTEMPTS = 20
# next_fire_at values that are not times: 0, "plan from the last run" (a new
# schedule, the column default, a hand-edited last_run_at); RESUMED, "plan from now".
PLAN = 0.0
RESUMED = -1.0


def _schedule(row: sqlite3.Row) -> Schedule:
    return Schedule(
        schedule_id=row["schedule_id"],
        cron=row["cron"],
        timezone=row["timezone"],
        prompt=row["prompt"],
        conversation=row["conversation"],
        created_by=row["created_by"],
        created_at=to_datetime(row["created_at"]),
        paused=bool(row["paused"]),
        last_run_at=to_datetime(row["last_run_at"]),
    )


class ScheduleStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self, cron: str, timezone: str, prompt: str, conversation: str, created_by: str
    ) -> Schedule:
        for _ in range(_ID_ATTEMPTS):
            # Short enough to type in `/duck schedule remove s-1a2b3c`.
            schedule_id = "s-" + secrets.token_hex(3)
            rows = await self.db.fetchall(
                "INSERT INTO schedules (schedule_id, cron, timezone, prompt, conversation, "
                "created_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT (schedule_id) DO NOTHING RETURNING {_COLUMNS}",
                (schedule_id, cron, timezone, prompt, conversation, created_by, now()),
            )
            if rows:
                return _schedule(rows[0])
        raise StoreError("could not find a free schedule id")

    async def get(self, schedule_id: str) -> Schedule | None:
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS} FROM schedules WHERE schedule_id = ?", (schedule_id,)
        )
        return _schedule(row) if row else None

    async def list(self, *, conversation_prefix: str | None = None) -> list[Schedule]:
        if conversation_prefix is None:
            rows = await self.db.fetchall(
                f"SELECT {_COLUMNS} FROM schedules ORDER BY created_at, rowid"
            )
        else:
            rows = await self.db.fetchall(
                f"SELECT {_COLUMNS} FROM schedules WHERE substr(conversation, 1, ?) = ? "
                "ORDER BY created_at, rowid",
                (len(conversation_prefix), conversation_prefix),
            )
        return [_schedule(row) for row in rows]

    async def set_paused(self, schedule_id: str, paused: bool) -> bool:
        """True when the schedule existed and was not already in that state. A
        resumed schedule is planned afresh from the time it resumes
        (RESUMED), whichever process runs its timer: the runs it skipped while
        paused are not owed."""
        return bool(
            await self.db.execute(
                "UPDATE schedules SET paused = ?, next_fire_at = CASE WHEN ? = 1 THEN next_fire_at "
                "ELSE ? END WHERE schedule_id = ? AND paused != ? RETURNING 1",
                (int(paused), int(paused), RESUMED, schedule_id, int(paused)),
            )
        )

    async def delete(self, schedule_id: str) -> bool:
        return bool(
            await self.db.execute(
                "DELETE FROM schedules WHERE schedule_id = ? RETURNING 1", (schedule_id,)
            )
        )

    # -- timers (issue #23): next fire times from the schedules_due index -----

    async def earliest_fire(self, after: float = RESUMED - 1) -> float | None:
        """The earliest `next_fire_at` of an active schedule later than `after`
        (0 or RESUMED: one waits to be planned); None when none is. One index probe."""
        row = await self.db.fetchone(
            "SELECT next_fire_at FROM schedules WHERE paused = 0 AND next_fire_at IS NOT NULL "
            "AND next_fire_at > ? ORDER BY next_fire_at LIMIT 1",
            (after,),
        )
        return None if row is None else float(row[0])

    async def due(self, low: float, high: float, limit: int = 100) -> list[tuple[Schedule, float]]:
        """Active schedules whose `next_fire_at` is in [low, high], earliest first,
        each with that time (what `claim_fire` compares against)."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS}, next_fire_at FROM schedules WHERE paused = 0 "
            "AND next_fire_at IS NOT NULL AND next_fire_at BETWEEN ? AND ? "
            "ORDER BY next_fire_at LIMIT ?",
            (low, high, limit),
        )
        return [(_schedule(row), float(row["next_fire_at"])) for row in rows]

    async def claim_fire(
        self, schedule_id: str, was: float, next_fire: float | None, *, ran_at: float | None
    ) -> bool:
        """Move `next_fire_at` from `was` to `next_fire` (None: it never fires
        again), recording a run at `ran_at` when given; True for the one caller
        whose view was current (compare-and-set: one run per fire time, whatever
        the number of processes)."""
        if ran_at is None:
            sql = (
                "UPDATE schedules SET next_fire_at = ? WHERE schedule_id = ? "
                "AND next_fire_at = ? AND paused = 0 RETURNING 1"
            )
            params: tuple[object, ...] = (next_fire, schedule_id, was)
        else:
            sql = (
                "UPDATE schedules SET next_fire_at = ?, last_run_at = ? WHERE schedule_id = ? "
                "AND next_fire_at = ? AND paused = 0 RETURNING 1"
            )
            params = (next_fire, ran_at, schedule_id, was)
        return bool(await self.db.execute(sql, params))

    async def set_next_fire(self, schedule_id: str, next_fire: float | None) -> bool:
        """Plan an active schedule afresh (after it was added or resumed)."""
        return bool(
            await self.db.execute(
                "UPDATE schedules SET next_fire_at = ? WHERE schedule_id = ? AND paused = 0 "
                "RETURNING 1",
                (next_fire, schedule_id),
            )
        )
