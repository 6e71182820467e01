"""Moving an installation from one database to another (`ducklm db copy`).

Either side is a SQLite file or a PostgreSQL URL; the usual move is SQLite ->
PostgreSQL, when one process becomes several replicas. The copy is faithful:
every row of every table that makes up an installation, with its keys, event
sequence numbers and chain hashes as stored, so `ducklm audit verify` proves on
the target what it proved on the source, and new events continue each chain.

What happens, in this order (nothing is written until every check of step 1
passed):
1. Both sides are opened without migrating and inspected: the source must
   exist, hold a DuckLM schema no newer than this DuckLM's, and have no replica
   with a fresh heartbeat (a running bot would change it under the copy); the
   target must not be newer, must hold no DuckLM row at all, and, while it has
   no DuckLM schema, no table by one of DuckLM's names. Only DuckLM's tables
   count (`schema_tables`, read from the migrations): a database or schema
   shared with another application's tables works, and those are left alone
   on both sides (the source's are named in a note, not copied).
2. An older source is migrated to the current schema first (reported).
3. The target is created or migrated to the current schema.
4. One transaction on the target: each table in TABLES order (tasks before what
   refers to them), read from the source in primary-key order in batches and
   inserted in multi-row INSERTs; identity sequences advanced past the copied
   values; row counts compared; the audit chains verified. Any failure rolls it
   all back, leaving the target migrated and empty.

The source is read inside one transaction of its own, so the batches see one
state of it (SQLite: the write lock, which also keeps a bot from writing;
PostgreSQL: REPEATABLE READ).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.store.audit import VerifyResult, verify
from runtime.store.db import Database, StoreError, is_postgres_url
from runtime.store.migrations import MIGRATIONS, SCHEMA_VERSION, Dialects
from runtime.store.pg_baseline import POSTGRES_BASELINE
from runtime.store.upgrade import (
    CopyRefused,
    NewerSchema,
    migrate,
    open_unmigrated,
    schema_version,
)

DEFAULT_BATCH_ROWS = 1000
# Bound parameters per INSERT: below SQLite's 32766 and PostgreSQL's 32767.
MAX_PARAMS = 30000


@dataclass(frozen=True)
class Table:
    name: str
    key: str  # the primary key: the copy's order and its batches' keyset
    why: str


# Every table an installation keeps, in copy order: a table comes after the
# tables its rows refer to (events and approvals name tasks). Tables a later
# schema version adds and that do not exist yet are skipped.
TABLES: tuple[Table, ...] = (
    Table("tasks", "task_id", "every task, finished or not, with its owner as recorded"),
    Table("events", "id", "the audit log: seq and chain hashes as stored, ids kept"),
    Table("approvals", "approval_id", "pending ones keep working after the move"),
    Table(
        "approval_votes",
        "vote_id",
        "each person's approval of a quorum approval: a half-approved one keeps its votes",
    ),
    Table("rules", "rule_id", "the 'always allow' rules, revoked ones included (history)"),
    Table("schedules", "schedule_id", "scheduled prompts with their next fire times"),
    Table(
        "deliveries",
        "key",
        "platform deliveries already seen: a retry or a replay after the move is still a duplicate",
    ),
    Table("inbox", "inbox_id", "messages received and not yet done, and the done ones' record"),
    Table(
        "shared_state",
        "key",
        "state the replicas share (the Matrix session and sync token): the moved "
        "bot continues as the same device from the same sync position",
    ),
)

# Tables of a DuckLM database that are deliberately not copied.
NOT_COPIED: dict[str, str] = {
    "replicas": "the processes that served the source, all stopped (a fresh heartbeat "
    "refuses the copy); the target's processes register themselves. A copied task's "
    "owner still names its old process, which has no row there: recovery counts it dead",
    "leases": "a lease is held by a running process, and none may run during the copy; "
    "the target's replicas take them afresh",
}
# Where PostgreSQL records the schema version (SQLite: PRAGMA user_version):
# the target's own, written when it is migrated; not DuckLM data.
VERSION_TABLES = frozenset({"ducklm_schema"})


_CREATE_TABLE = re.compile(r'\bCREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?"?(\w+)', re.I)
_DROP_TABLE = re.compile(r'\bDROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?"?(\w+)', re.I)
_RENAME_TABLE = re.compile(r'\bALTER\s+TABLE\s+"?(\w+)"?\s+RENAME\s+TO\s+"?(\w+)', re.I)


def schema_tables() -> frozenset[str]:
    """The tables DuckLM's migrations leave in a database (either backend's
    statements, PostgreSQL's baseline too), read from their SQL: what is
    DuckLM's in a database that may hold another application's tables too."""
    tables: set[str] = set()
    statements: list[str] = list(POSTGRES_BASELINE)
    for version in MIGRATIONS:
        for statement in version:
            if isinstance(statement, Dialects):
                statements += (statement.sqlite, statement.postgres)
            else:
                statements.append(statement)
    for sql in statements:
        tables |= set(_CREATE_TABLE.findall(sql))
        for old, new in _RENAME_TABLE.findall(sql):
            tables.discard(old)
            tables.add(new)
        tables -= set(_DROP_TABLE.findall(sql))
    return frozenset(tables)


def unknown_tables() -> list[str]:
    """DuckLM tables this module neither copies nor says why not: a migration
    added one and copy.py was not updated (copying without it would lose its
    rows without a word)."""
    known = {t.name for t in TABLES} | set(NOT_COPIED) | VERSION_TABLES
    return sorted(schema_tables() - known)


@dataclass
class TableCopied:
    name: str
    source_rows: int
    target_rows: int

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows


@dataclass
class CopyReport:
    source: str
    target: str
    source_migrated: tuple[int, int] | None = None  # (from, to) when the source was older
    target_migrated: tuple[int, int] | None = None
    tables: list[TableCopied] = field(default_factory=list)
    audit: VerifyResult | None = None
    # The target's chain failures were already the source's (a faithful copy of them).
    audit_as_source: bool = False


# progress(table, rows copied so far, rows in all), called after each batch.
Progress = Callable[[str, int, int], None]
# note(sentence): what the copy did beside copying rows (migrations).
Note = Callable[[str], None]


def _quiet(*_: Any) -> None:
    pass


# -- looking at a database -------------------------------------------------
# The catalogues differ per backend (sqlite_master and PRAGMA table_info on
# SQLite, information_schema on PostgreSQL), hence the dialect branches.


async def table_names(db: Database) -> set[str]:
    if db.dialect == "postgres":
        rows = await db.fetchall(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
    else:
        rows = await db.fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    return {str(row[0]) for row in rows}


async def column_names(db: Database, table: str) -> list[str]:
    """The table's columns. On SQLite this includes the implicit `rowid` unless
    a column is an alias of it (INTEGER PRIMARY KEY): it orders ties in the
    store's keyset queries, so a copy to a backend that declares a `rowid`
    column carries it over (and back)."""
    if db.dialect == "postgres":
        rows = await db.fetchall(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            (table,),
        )
        return [str(row[0]) for row in rows]
    rows = await db.fetchall(f'PRAGMA table_info("{table}")')
    names = [str(row["name"]) for row in rows]
    keys = [row for row in rows if row["pk"]]
    aliased = len(keys) == 1 and str(keys[0]["type"]).upper() == "INTEGER"
    if not aliased and "rowid" not in names:
        names.append("rowid")
    return names


async def identity_columns(db: Database, table: str) -> list[str]:
    """Columns whose values a sequence hands out (PostgreSQL identity or serial
    columns), which must be advanced past copied values. SQLite gives a new
    rowid as max + 1 by itself, so it has none to advance."""
    if db.dialect != "postgres":
        return []
    rows = await db.fetchall(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ? "
        "AND (is_identity = 'YES' OR column_default LIKE 'nextval(%')",
        (table,),
    )
    return [str(row[0]) for row in rows]


async def always_identity(db: Database, table: str) -> bool:
    """Whether the table has a GENERATED ALWAYS identity (an explicit value then
    needs OVERRIDING SYSTEM VALUE)."""
    if db.dialect != "postgres":
        return False
    row = await db.fetchone(
        "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = ? AND is_identity = 'YES' AND identity_generation = 'ALWAYS'",
        (table,),
    )
    return bool(row and row[0])


async def count_rows(db: Database, table: str) -> int:
    row = await db.fetchone(f"SELECT COUNT(*) FROM {table}")
    return int(row[0]) if row else 0


async def nonempty_tables(db: Database) -> list[str]:
    """The DuckLM tables of `db` that hold a row (its schema-version table aside)."""
    present = await table_names(db)
    known = [t.name for t in TABLES] + list(NOT_COPIED)
    found = []
    for name in known:
        if name in present and await count_rows(db, name):
            found.append(name)
    return found


async def fresh_replicas(db: Database, within: float) -> list[str]:
    """Replicas (processes serving this database) that heartbeat less than
    `within` seconds ago and have not stopped: a bot that is running."""
    if "replicas" not in await table_names(db):
        return []
    rows = await db.fetchall(
        "SELECT replica_id FROM replicas WHERE stopped_at IS NULL AND heartbeat_at > ? "
        "ORDER BY replica_id",
        (time.time() - within,),
    )
    return [str(row[0]) for row in rows]


# -- the copy --------------------------------------------------------------


def _missing_file(source: str | Path) -> Path | None:
    """The source's absolute path when it is a SQLite file that does not exist
    (opening it would create an empty one)."""
    if is_postgres_url(source):
        return None
    path = Path(source).expanduser().absolute()
    return None if path.is_file() else path


def _same_database(a: Database, b: Database) -> bool:
    if is_postgres_url(a.path) or is_postgres_url(b.path):
        return a.path == b.path
    return Path(a.path).resolve() == Path(b.path).resolve()


async def _inspect_source(src: Database, replica_timeout: float) -> int:
    """The source's schema version, after the checks that refuse it."""
    version = await schema_version(src)
    if version == 0:
        raise CopyRefused(f"source database {src.path} holds no DuckLM schema (nothing to copy)")
    if version > SCHEMA_VERSION:
        raise NewerSchema(src, version)
    running = await fresh_replicas(src, replica_timeout)
    if running:
        raise CopyRefused(
            f"a bot is running on source database {src.path} (replica "
            f"{', '.join(running)} heartbeat less than {replica_timeout:g} s ago); stop it first "
            "(one killed without a clean exit counts as running until its heartbeat is "
            f"{replica_timeout:g} s old)"
        )
    return version


async def _inspect_target(dst: Database) -> None:
    version = await schema_version(dst)
    if version > SCHEMA_VERSION:
        raise NewerSchema(dst, version)
    if version == 0:
        # No DuckLM schema, yet a table by one of DuckLM's names: another
        # application's (migrating would fail on it, or build on a stranger's
        # table). Tables by other names are left alone, and do not refuse.
        taken = sorted((await table_names(dst)) & schema_tables())
        if taken:
            raise CopyRefused(
                f"target database {dst.path} has no DuckLM schema but already has "
                f"table(s) {', '.join(taken)}, not DuckLM's (another application's?); "
                "copy into a database or schema without them"
            )
    holding = await nonempty_tables(dst)
    if holding:
        raise CopyRefused(
            f"target database {dst.path} already holds DuckLM data (in {', '.join(holding)}); "
            "copy into an empty database"
        )


async def copy_database(
    source: str | Path,
    target: str | Path,
    *,
    replica_timeout: float,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: Progress = _quiet,
    note: Note = _quiet,
) -> CopyReport:
    """Copy every DuckLM row of `source` into `target` (see the module's text).
    Raises CopyRefused (nothing written on either side) or StoreError (the
    target left migrated and empty)."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    unknown = unknown_tables()
    if unknown:
        raise StoreError(
            f"db copy does not know the table(s) {', '.join(unknown)} of schema "
            f"v{SCHEMA_VERSION}; nothing was copied (runtime/store/copy.py needs updating)"
        )
    missing = _missing_file(source)
    if missing is not None:
        raise CopyRefused(f"source database {missing} does not exist")
    src = await open_unmigrated(source)
    try:
        # The source first: a refusal on its side must not even create a target file.
        source_version = await _inspect_source(src, replica_timeout)
        dst = await open_unmigrated(target)
        try:
            if _same_database(src, dst):
                raise CopyRefused(f"the source and the target are the same database ({src.path})")
            await _inspect_target(dst)
            foreign = sorted(await table_names(src) - schema_tables() - VERSION_TABLES)
            if foreign:
                note(
                    f"source table(s) {', '.join(foreign)} are not DuckLM's: not copied "
                    "(left as they are)"
                )
            report = CopyReport(source=src.path, target=dst.path)
            if source_version < SCHEMA_VERSION:
                report.source_migrated = await migrate(src)
                note(f"source migrated first: schema v{source_version} -> v{SCHEMA_VERSION}")
            report.target_migrated = await migrate(dst)
            await _copy_all(src, dst, report, batch_rows, progress)
            return report
        finally:
            await dst.close()
    finally:
        await src.close()


async def _copy_all(
    src: Database, dst: Database, report: CopyReport, batch_rows: int, progress: Progress
) -> None:
    # Only DuckLM's tables: a target schema (or file) shared with another
    # application keeps that application's tables as they are.
    present = await table_names(dst)
    tables = [t for t in TABLES if t.name in present]
    # One transaction on each side: the source read as one state, the target
    # written all or nothing.
    async with _snapshot(src), dst.transaction():
        for table in tables:
            report.tables.append(await _copy_table(src, dst, table, batch_rows, progress))
        await _advance_sequences(dst, [t.name for t in tables])
        bad = [t for t in report.tables if not t.ok]
        if bad:
            differ = ", ".join(
                f"{t.name}: {t.source_rows} in the source, {t.target_rows} copied" for t in bad
            )
            raise StoreError(f"row counts differ after the copy ({differ}); the target keeps none")
        report.audit = await verify(dst)
        if not report.audit.ok:
            # A source whose own chains do not verify (events from before v8 with
            # gaps, an edit) is copied as it is; anything else is the copy's fault.
            theirs = sorted(f.describe() for f in (await verify(src)).failures)
            ours = sorted(f.describe() for f in report.audit.failures)
            if ours != theirs:
                raise StoreError(
                    "the copied audit log does not verify where the source's does ("
                    + "; ".join(ours[:3])
                    + "); the target keeps none"
                )
            report.audit_as_source = True


class _snapshot:
    """The source read as one state of it, in one transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._tx: Any = None

    async def __aenter__(self) -> None:
        self._tx = self._db.transaction()
        await self._tx.__aenter__()
        if self._db.dialect == "postgres":
            # READ COMMITTED (the store's default) would give every batch a newer
            # snapshot; this must be the transaction's first statement.
            await self._db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

    async def __aexit__(self, *exc: Any) -> None:
        await self._tx.__aexit__(*exc)


def _quoted(name: str) -> str:
    # Quoted on both backends: inbox.user is a reserved word in PostgreSQL, and a
    # quoted "rowid" still names SQLite's implicit one.
    return '"' + name.replace('"', '""') + '"'


async def _copy_table(
    src: Database, dst: Database, table: Table, batch_rows: int, progress: Progress
) -> TableCopied:
    theirs = await column_names(src, table.name)
    ours = set(await column_names(dst, table.name))
    # Both sides are at the current schema, so they differ only in what one
    # backend declares and the other keeps implicit (SQLite's rowid).
    columns = [c for c in theirs if c in ours]
    total = await count_rows(src, table.name)
    per_insert = max(1, min(batch_rows, MAX_PARAMS // len(columns)))
    listed = ", ".join(_quoted(c) for c in columns)
    overriding = " OVERRIDING SYSTEM VALUE" if await always_identity(dst, table.name) else ""
    key = columns.index(table.key)
    order = _quoted(table.key)
    select = f"SELECT {listed} FROM {table.name} "
    row_marks = "(" + ", ".join(["?"] * len(columns)) + ")"
    copied = 0
    progress(table.name, 0, total)
    rows = await src.fetchall(f"{select}ORDER BY {order} LIMIT ?", (batch_rows,))
    while rows:
        for start in range(0, len(rows), per_insert):
            chunk = rows[start : start + per_insert]
            params = [row[i] for row in chunk for i in range(len(columns))]
            try:
                await dst.execute(
                    f"INSERT INTO {table.name} ({listed}){overriding} VALUES "
                    + ", ".join([row_marks] * len(chunk)),
                    params,
                )
            except (StoreError, ValueError, OverflowError) as exc:
                # Usually a value the target's column cannot hold (SQLite stores
                # any type in any column); name the rows, so a person can look.
                raise StoreError(
                    f"copying {table.name}: the target refused the rows with {table.key} "
                    f"{chunk[0][key]!r} to {chunk[-1][key]!r} ({exc}); the target keeps none"
                ) from exc
        copied += len(rows)
        progress(table.name, copied, max(total, copied))
        if len(rows) < batch_rows:
            break
        rows = await src.fetchall(
            f"{select}WHERE {order} > ? ORDER BY {order} LIMIT ?", (rows[-1][key], batch_rows)
        )
    return TableCopied(table.name, total, await count_rows(dst, table.name))


async def _advance_sequences(db: Database, tables: Sequence[str]) -> None:
    """Move each identity sequence past the largest copied value, so the next
    row the store inserts does not collide with a copied one (PostgreSQL only:
    explicit values never advance a sequence there)."""
    for table in tables:
        for column in await identity_columns(db, table):
            await db.fetchall(
                f"SELECT setval(pg_get_serial_sequence(?, ?), "
                f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)",
                (table, column),
            )
