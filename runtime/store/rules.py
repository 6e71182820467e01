"""Allow rules ("always"): rows only; what a rule matches is decided in
runtime/approvals.py and runtime/tools/shell_rules.py.

Each rule row also holds what matching needs, computed once when the rule is
made (`RuleKeys`): a check asks for the few rows whose match key a command
could name (`matching`), through a partial index, so its cost does not grow
with the number of rules. Every check reads the table itself, so a rule added
or revoked by another process (the CLI beside a running bot) counts at once.

A rule may have a scope (the channel, a conversation group such as
"slack:C1", it is used in; NULL: everywhere) and an expiry; lookups return
only the rules usable in the asking channel at that moment, so an expired
rule stops matching at once. `used` counts each match (what `rules` and
`rules review` show).
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from typing import Protocol

from runtime.store.db import Database, StoreError, now, to_datetime
from runtime.store.models import Rule

_COLUMNS = (
    "rule_id, tool, kind, pattern, created_by, created_at, source_approval_id, "
    "revoked_by, revoked_at, normalized, program, parsed, scope, expires_at, "
    "last_used_at, use_count"
)
# What a check may use: not expired, and global or of the asking channel.
# (`scope = ?` with a NULL channel is never true: then only global rules.)
_USABLE = "AND (expires_at IS NULL OR expires_at > ?) AND (scope IS NULL OR scope = ?) "
RULE_KINDS = frozenset({"exact", "prefix"})
_ID_ATTEMPTS = 20
# Match keys per statement (SQLite's limit on bound parameters is far above this).
KEYS_PER_QUERY = 500


class RuleKeys(Protocol):
    """What matching needs of a rule (runtime.tools.shell_rules.CompiledRule)."""

    normalized: str
    program: str | None
    match_key: str | None  # None: the rule covers nothing, no lookup finds it
    words: int
    parsed: str | None


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
        normalized=row["normalized"],
        program=row["program"],
        parsed=row["parsed"],
        scope=row["scope"],
        expires_at=to_datetime(row["expires_at"]),
        last_used_at=to_datetime(row["last_used_at"]),
        use_count=row["use_count"],
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
        keys: RuleKeys | None = None,
        *,
        scope: str | None = None,
        expires_at: float | None = None,
    ) -> Rule:
        """A new active rule (`scope` None: global; `expires_at` None: never). Without
        `keys` its match columns stay NULL until the next check fills them."""
        if kind not in RULE_KINDS:
            raise ValueError(f"unknown rule kind {kind!r}; one of {sorted(RULE_KINDS)}")
        filled = (
            (None, None, None, 0, None)
            if keys is None
            else (keys.normalized, keys.program, keys.match_key, keys.words, keys.parsed)
        )
        # 32 bits of id: collisions are rare but possible, so retry on conflict
        # instead of trusting luck.
        for _ in range(_ID_ATTEMPTS):
            row = await self.db.fetchone(
                "INSERT INTO rules (rule_id, tool, kind, pattern, created_by, created_at, "
                "source_approval_id, normalized, program, match_key, words, parsed, scope, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT (rule_id) DO NOTHING RETURNING {_COLUMNS}",
                (
                    new_rule_id(),
                    tool,
                    kind,
                    pattern,
                    created_by,
                    now(),
                    source_approval_id,
                    *filled,
                    scope,
                    expires_at,
                ),
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

    async def any_active(self, tool: str) -> bool:
        """Whether the tool has an active rule at all (most checks stop here)."""
        return (
            await self.db.fetchone(
                "SELECT 1 FROM rules WHERE tool = ? AND revoked_at IS NULL LIMIT 1", (tool,)
            )
            is not None
        )

    async def unfilled(self, limit: int = 100) -> list[Rule]:
        """Rules whose match columns are not filled yet, oldest first (an empty
        partial index when all are: this costs nothing on a check)."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM rules WHERE normalized IS NULL "
            "ORDER BY created_at, rowid LIMIT ?",
            (limit,),
        )
        return [_rule(row) for row in rows]

    async def fill(self, filled: Sequence[tuple[str, RuleKeys]]) -> None:
        """Store the match columns of rules made without them, in one transaction.
        A row another process filled meanwhile is left as it is."""
        # Each UPDATE is its own compare-and-set (`normalized IS NULL`), which
        # holds under PostgreSQL's READ COMMITTED too: no read precedes it.
        async with self.db.transaction():
            for rule_id, keys in filled:
                await self.db.execute(
                    "UPDATE rules SET normalized = ?, program = ?, match_key = ?, words = ?, "
                    "parsed = ? WHERE rule_id = ? AND normalized IS NULL",
                    (
                        keys.normalized,
                        keys.program,
                        keys.match_key,
                        keys.words,
                        keys.parsed,
                        rule_id,
                    ),
                )

    async def longest_prefix(self, tool: str, programs: Sequence[str]) -> dict[str, int]:
        """Per program, the most words an active prefix rule for it has (programs with
        none are left out). One index probe per program (SQLite's max() optimization
        on rules_program), whatever the number of rules."""
        found: dict[str, int] = {}
        for program in programs:
            row = await self.db.fetchone(
                "SELECT max(words) FROM rules WHERE tool = ? AND program = ? "
                "AND revoked_at IS NULL AND kind = 'prefix' AND match_key IS NOT NULL",
                (tool, program),
            )
            if row is not None and row[0]:
                found[program] = int(row[0])
        return found

    async def matching(
        self,
        tool: str,
        keys: Sequence[str],
        *,
        channel: str | None = None,
        at: float | None = None,
    ) -> list[Rule]:
        """The rules of `tool` usable in `channel` at `at` (default now: active, not
        expired, global or scoped to that channel) whose match key is one of `keys`
        (rules_match). `channel` None: only global rules."""
        found: list[Rule] = []
        moment = now() if at is None else at
        unique = sorted(set(keys))
        for start in range(0, len(unique), KEYS_PER_QUERY):
            chunk = unique[start : start + KEYS_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            rows = await self.db.fetchall(
                f"SELECT {_COLUMNS} FROM rules WHERE tool = ? AND revoked_at IS NULL "
                f"AND match_key IS NOT NULL AND match_key IN ({marks}) {_USABLE}",
                (tool, *chunk, moment, channel),
            )
            found.extend(_rule(row) for row in rows)
        return found

    async def used(self, rule_ids: Sequence[str]) -> None:
        """Count a match of each rule and stamp its last use."""
        stamp = now()
        # `use_count + 1` is computed by the UPDATE on the locked row, so
        # concurrent matches from several replicas all count (no lost update).
        async with self.db.transaction():
            for rule_id in rule_ids:
                await self.db.execute(
                    "UPDATE rules SET last_used_at = ?, use_count = use_count + 1 "
                    "WHERE rule_id = ?",
                    (stamp, rule_id),
                )

    async def idle(self, unused_since: float) -> list[Rule]:
        """Active rules not used since `unused_since` (never used: made before it)."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM rules WHERE revoked_at IS NULL "
            "AND COALESCE(last_used_at, created_at) < ? ORDER BY created_at, rowid",
            (unused_since,),
        )
        return [_rule(row) for row in rows]

    async def task_channel(self, task_id: str) -> str | None:
        """The channel (conversation group) of a task: the default scope of a rule
        made from one of its approvals. None (a global rule) for a task without
        a chat channel (the console, the CLI)."""
        row = await self.db.fetchone(
            "SELECT conversation_group FROM tasks WHERE task_id = ?", (task_id,)
        )
        return None if row is None else row["conversation_group"]

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
