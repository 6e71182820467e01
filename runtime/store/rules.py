"""Allow rules ("always"): rows only; what a rule matches is decided in
runtime/approvals.py and runtime/tools/shell_rules.py."""

from __future__ import annotations

import secrets
import sqlite3

from runtime.store.db import Database, StoreError, now, to_datetime
from runtime.store.models import Rule

_COLUMNS = (
    "rule_id, tool, kind, pattern, created_by, created_at, source_approval_id, "
    "revoked_by, revoked_at"
)
RULE_KINDS = frozenset({"exact", "prefix"})
_ID_ATTEMPTS = 20


def _rule(row: sqlite3.Row) -> Rule:
    return Rule(
        rule_id=row["rule_id"],
        tool=row["tool"],
        kind=row["kind"],
        pattern=row["pattern"],
        created_by=row["created_by"],
        created_at=to_datetime(row["created_at"]),
        source_approval_id=row["source_approval_id"],
        revoked_by=row["revoked_by"],
        revoked_at=to_datetime(row["revoked_at"]),
    )


def new_rule_id() -> str:
    # Short enough to type in `/duck rules revoke r-1a2b3c4d`.
    return "r-" + secrets.token_hex(4)


class RuleStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(
        self,
        tool: str,
        kind: str,
        pattern: str,
        created_by: str,
        source_approval_id: str | None = None,
    ) -> Rule:
        if kind not in RULE_KINDS:
            raise ValueError(f"unknown rule kind {kind!r}; one of {sorted(RULE_KINDS)}")
        # 32 bits of id: collisions are rare but possible, so retry on conflict
        # instead of trusting luck.
        for _ in range(_ID_ATTEMPTS):
            row = await self.db.fetchone(
                f"INSERT INTO rules ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL) "
                f"ON CONFLICT (rule_id) DO NOTHING RETURNING {_COLUMNS}",
                (new_rule_id(), tool, kind, pattern, created_by, now(), source_approval_id),
            )
            if row is not None:
                return _rule(row)
        raise StoreError(f"database {self.db.path}: could not find a free rule id")

    async def get(self, rule_id: str) -> Rule | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS} FROM rules WHERE rule_id = ?", (rule_id,))
        return None if row is None else _rule(row)

    async def active_for_tool(self, tool: str) -> list[Rule]:
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM rules WHERE tool = ? AND revoked_at IS NULL "
            "ORDER BY created_at, rowid",
            (tool,),
        )
        return [_rule(row) for row in rows]

    async def revoke(self, rule_id: str, revoked_by: str) -> bool:
        """True for the caller who revoked it; False if unknown or already revoked."""
        return bool(
            await self.db.execute(
                "UPDATE rules SET revoked_by = ?, revoked_at = ? "
                "WHERE rule_id = ? AND revoked_at IS NULL RETURNING 1",
                (revoked_by, now(), rule_id),
            )
        )

    # Named as the API asks; defined last so the builtin `list` stays usable above.
    async def list(self, include_revoked: bool = False) -> list[Rule]:
        """Rules, oldest first."""
        where = "" if include_revoked else "WHERE revoked_at IS NULL "
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM rules {where}ORDER BY created_at, rowid"
        )
        return [_rule(row) for row in rows]
