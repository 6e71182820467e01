"""What /metrics and /readyz read from the store: counts and a trivial query.

Portable SQL (SQLite and PostgreSQL alike). The counts run at scrape time, a
few times a minute: one GROUP BY over `tasks_status` (an index whose leading
column is the status, so no table scan) and one COUNT over the partial index
of pending approvals.
"""

from __future__ import annotations

import os
from typing import Any

from runtime.store.db import is_postgres_url

# Every status a task can have (DESIGN.md), so a status with no task shows 0
# instead of vanishing from the scrape (a gauge that disappears breaks alerts).
TASK_STATUSES = (
    "running",
    "waiting_for_approval",
    "completed",
    "failed",
    "expired",
    "interrupted",
)


class StatsStore:
    def __init__(self, db: Any) -> None:
        self.db = db
        # SQLite: the file this process opened, by device and inode. An open
        # connection keeps reading a deleted or replaced file without an error,
        # so readiness compares the path with what was opened (see ping).
        self._opened = _identity(getattr(db, "path", None)) if _is_sqlite(db) else None

    async def tasks_by_status(self) -> dict[str, int]:
        """Tasks per status; every known status present (0 when none)."""
        rows = await self.db.fetchall("SELECT status, COUNT(*) FROM tasks GROUP BY status")
        counts = dict.fromkeys(TASK_STATUSES, 0)
        for row in rows:
            counts[str(row[0])] = int(row[1])
        return counts

    async def pending_approvals(self) -> int:
        """Approvals nobody has decided yet (an expired one has a decision)."""
        row = await self.db.fetchone("SELECT COUNT(*) FROM approvals WHERE decision IS NULL")
        return int(row[0]) if row is not None else 0

    async def ping(self) -> None:
        """Raise (StoreError, OSError or the driver's error) unless the store
        answers a trivial query; on SQLite also unless DUCKLM_DB is still the
        file this process opened and can be read."""
        if self._opened is not None:
            _check_file(str(self.db.path), self._opened)
        await self.db.fetchone("SELECT 1")


def _check_file(path: str, opened: tuple[int, int]) -> None:
    """Raise OSError unless `path` is still the file opened and can be read (a
    stat and a 16-byte read: too small to matter on the loop)."""
    if _identity(path) != opened:
        raise OSError(
            f"database {path} is not the file this process opened (deleted, moved or replaced)"
        )
    # access() would pass for root, who reads anything: open it for real.
    with open(path, "rb") as handle:
        handle.read(16)


def _is_sqlite(db: Any) -> bool:
    dialect = getattr(db, "dialect", None)
    if dialect is not None:
        return bool(dialect == "sqlite")
    return not is_postgres_url(str(getattr(db, "path", "")))


def _identity(path: str | None) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None for an in-memory database
    or a file that is not there."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)
