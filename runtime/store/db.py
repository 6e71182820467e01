"""The SQLite connection: opening, migrations, statement helpers and transactions.

One `Database` holds one aiosqlite connection for the life of the process, in
autocommit mode: a single statement is its own transaction, so most store
methods are one statement and need no lock. Multi-statement transactions go
through `transaction()`, which serializes them with an asyncio.Lock and
`BEGIN IMMEDIATE` (so a second process on the same file waits on the write
lock up to `busy_timeout` instead of failing half-way).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

BUSY_TIMEOUT_S = 5.0
SQLITE_HEADER = b"SQLite format 3\x00"
# RETURNING (3.35) is what makes compare-and-set and sequence numbers one statement.
MIN_SQLITE = (3, 35, 0)

# Each entry is one schema version: the statements that take the previous
# version to this one. Append new versions; never edit a released one.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """
        CREATE TABLE tasks (
            task_id TEXT PRIMARY KEY,
            message TEXT NOT NULL,
            workspace TEXT,
            debug INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            conversation TEXT,
            requested_by TEXT,
            history_messages TEXT NOT NULL DEFAULT '[]',
            final_response TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE INDEX tasks_created_at ON tasks (created_at)",
        "CREATE INDEX tasks_conversation ON tasks (conversation, created_at)",
        "CREATE INDEX tasks_status ON tasks (status, created_at)",
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            task_id TEXT REFERENCES tasks (task_id),
            seq INTEGER NOT NULL,
            event_type TEXT NOT NULL,
            payload TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX events_task_seq ON events (task_id, seq)",
        # NULLs are distinct in a unique index, so global events need their own.
        "CREATE UNIQUE INDEX events_global_seq ON events (seq) WHERE task_id IS NULL",
        "CREATE INDEX events_type ON events (event_type, id)",
        """
        CREATE TABLE approvals (
            approval_id TEXT PRIMARY KEY,
            task_id TEXT NOT NULL REFERENCES tasks (task_id),
            idx INTEGER NOT NULL DEFAULT 1,
            action TEXT NOT NULL,
            tool TEXT NOT NULL,
            command TEXT,
            risk_level TEXT,
            action_type TEXT,
            reason TEXT,
            requested_by TEXT,
            created_at REAL NOT NULL,
            expires_at REAL,
            decision TEXT,
            decided_by TEXT,
            decided_at REAL,
            decision_note TEXT,
            executed_at REAL,
            reminded_at REAL,
            card_ref TEXT
        )
        """,
        "CREATE INDEX approvals_pending ON approvals (created_at) WHERE decision IS NULL",
        "CREATE INDEX approvals_task ON approvals (task_id)",
        """
        CREATE TABLE rules (
            rule_id TEXT PRIMARY KEY,
            tool TEXT NOT NULL,
            kind TEXT NOT NULL,
            pattern TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            source_approval_id TEXT,
            revoked_by TEXT,
            revoked_at REAL
        )
        """,
        "CREATE INDEX rules_active ON rules (tool) WHERE revoked_at IS NULL",
    ),
    (
        # v2: platform deliveries already seen (Slack event ids, Matrix event ids),
        # so a retry or a replay after a restart never starts a second task.
        """
        CREATE TABLE deliveries (
            key TEXT PRIMARY KEY,
            claimed_at REAL NOT NULL
        )
        """,
        "CREATE INDEX deliveries_claimed_at ON deliveries (claimed_at)",
        # Matrix reactions name the card's event; find its approval without a scan.
        "CREATE INDEX approvals_card_ref ON approvals (card_ref) WHERE card_ref IS NOT NULL",
    ),
    (
        # v3: scheduled prompts (`/duck schedule add "<cron>" <prompt>`).
        """
        CREATE TABLE schedules (
            schedule_id TEXT PRIMARY KEY,
            cron TEXT NOT NULL,
            timezone TEXT NOT NULL,
            prompt TEXT NOT NULL,
            conversation TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            paused INTEGER NOT NULL DEFAULT 0,
            last_run_at REAL
        )
        """,
        "CREATE INDEX schedules_conversation ON schedules (conversation)",
        "CREATE INDEX tasks_finished ON tasks (updated_at) "
        "WHERE status IN ('completed', 'failed', 'expired', 'interrupted')",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot do what was asked; the message is meant for a person."""

    @property
    def cause(self) -> str:
        """The underlying error without the file's path, for chat users."""
        return str(self.__cause__) if self.__cause__ is not None else str(self)


# -- values ----------------------------------------------------------------


def now() -> float:
    return time.time()


def to_datetime(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def to_timestamp(value: datetime | float | None) -> float | None:
    if value is None or isinstance(value, int | float):
        return value
    if value.tzinfo is None:  # naive datetimes in this project mean UTC
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def dump_json(value: Any) -> str:
    """Encode for a TEXT column; never raises, so an odd payload cannot break its caller."""
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
        text.encode("utf-8")  # lone surrogates pass json.dumps but not SQLite's binding
        return text
    except UnicodeEncodeError:
        pass
    except Exception as exc:  # circular references, non-string keys, a failing __str__
        return _unencodable(value, exc)
    try:
        return json.dumps(value, default=str, ensure_ascii=True)
    except Exception as exc:
        return _unencodable(value, exc)


def _unencodable(value: Any, exc: Exception) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not win either
        text = f"<unrepresentable {type(value).__name__}>"
    return json.dumps(
        {"unencodable": text[:4000], "error": f"{type(exc).__name__}: {exc}"}, ensure_ascii=True
    )


def load_json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


# -- errors ----------------------------------------------------------------


def _describe(path: str, exc: BaseException) -> str:
    """A sentence naming the file and the likely cause, for a person to act on."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary == sqlite3.SQLITE_FULL or "disk is full" in text:
        return f"database {path}: the disk is full ({text})"
    if primary == sqlite3.SQLITE_READONLY or "readonly" in text:
        return (
            f"database {path} is read-only ({text}); DuckLM needs write access to the "
            "file and to its directory (for the -wal and -shm files)"
        )
    if primary == sqlite3.SQLITE_NOTADB or "not a database" in text:
        return f"{path} is not a SQLite database ({text})"
    if primary == sqlite3.SQLITE_CORRUPT:
        return f"database {path} is corrupt ({text})"
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in text:
        return (
            f"database {path} stayed locked by another connection for more than "
            f"{BUSY_TIMEOUT_S:g} s ({text})"
        )
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM) or "unable to open" in text:
        return (
            f"cannot open database {path} ({text}); check that its directory exists and is writable"
        )
    if "FOREIGN KEY" in text:
        return f"database {path}: the record refers to a task that does not exist ({text})"
    if primary == sqlite3.SQLITE_IOERR:
        return f"database {path}: I/O error ({text})"
    if isinstance(exc, OSError):
        return f"database {path}: {exc.strerror or exc}"
    return f"database {path}: {text}"


def _precheck(given: str | Path) -> str:
    """Return the absolute path, after catching the usual setup mistakes before
    SQLite reports them less clearly."""
    path = Path(given).expanduser().absolute()
    if path.exists():
        if path.is_dir():
            raise StoreError(f"database {path} is a directory, not a file")
        try:
            with path.open("rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise StoreError(f"cannot read database {path}: {exc.strerror or exc}") from exc
        if header and header != SQLITE_HEADER:
            raise StoreError(f"{path} is not a SQLite database (it has another file's header)")
        if not os.access(path, os.W_OK):
            raise StoreError(f"database {path} is read-only; DuckLM needs to write to it")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the directory {parent} for database {path}: {exc.strerror or exc}"
        ) from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(
            f"the directory {parent} of database {path} is not writable; SQLite needs to "
            "create the -wal and -shm files next to the database"
        )
    return str(path)


# -- the connection --------------------------------------------------------

Params = Sequence[Any]


def _bindable(params: Params) -> Params:
    """Text SQLite can store. A lone surrogate ('\\ud800', legal in the JSON that
    Slack or Matrix send) cannot be encoded as UTF-8 and would make sqlite3 refuse
    the whole statement; it becomes U+FFFD instead, like any undecodable byte."""
    if not any(isinstance(p, str) for p in params):
        return params
    return [_valid_text(p) if isinstance(p, str) else p for p in params]


def _valid_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


class Database:
    """One long-lived connection. Use `await Database.open(path)`."""

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        self._conn = conn
        self.path = path
        self._lock = asyncio.Lock()
        # The task running the current transaction; its statements bypass the lock.
        self._tx_owner: asyncio.Task[Any] | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path) -> Database:
        """Open (creating if needed) and migrate the database at `path`."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old for DuckLM; it needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer (use a newer Python build)"
            )
        memory = str(path) == ":memory:"
        shown = str(path) if memory else _precheck(path)
        try:
            conn = await aiosqlite.connect(
                shown, isolation_level=None, timeout=BUSY_TIMEOUT_S, cached_statements=256
            )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(_describe(shown, exc)) from exc
        conn.row_factory = sqlite3.Row
        db = cls(conn, shown)
        try:
            await db._configure(memory)
            await db._migrate()
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise StoreError(_describe(shown, exc)) from exc
            raise
        return db

    async def _configure(self, memory: bool) -> None:
        await self._raw(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not memory:
            mode = await self._enable_wal()
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"database {self.path}: cannot switch to WAL mode (got {mode!r}); "
                    "is it on a network file system?"
                )
        # WAL + NORMAL: no fsync per commit, still crash-safe (a power loss may drop
        # the last commits, never corrupt the file).
        await self._raw("PRAGMA synchronous = NORMAL")
        await self._raw("PRAGMA foreign_keys = ON")

    async def _enable_wal(self) -> object:
        # Switching a fresh file to WAL takes an exclusive lock and SQLite does not
        # call the busy handler for it, so two processes starting together would
        # see "database is locked" at once; retry for as long as busy_timeout.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        delay = 0.005
        while True:
            try:
                rows = await self._raw("PRAGMA journal_mode = WAL")
                return rows[0][0] if rows else None
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _migrate(self) -> None:
        version = await self.user_version()
        self._check_version(version)
        if version == SCHEMA_VERSION:
            return
        async with self.transaction():
            # Another process may have migrated between our read and our write lock.
            version = await self.user_version()
            self._check_version(version)
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    await self._raw(statement)
            await self._raw(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.path} has schema version {version}, but this DuckLM only "
                f"knows versions up to {SCHEMA_VERSION}; upgrade DuckLM or use another file"
            )

    async def user_version(self) -> int:
        rows = await self.fetchall("PRAGMA user_version")
        return int(rows[0][0])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._conn.close()
        except (sqlite3.Error, ValueError):
            pass  # closing a broken connection has nothing left to save

    @property
    def closed(self) -> bool:
        return self._closed

    # -- statements --------------------------------------------------------

    async def _raw(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return list(await self._conn.execute_fetchall(sql, _bindable(params)))

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run one statement and return its rows (writes use RETURNING to report rows)."""
        if self._closed:
            raise StoreError(f"database {self.path} is closed")
        if self._tx_owner is not None and self._tx_owner is not asyncio.current_task():
            # Wait out another task's transaction, or this statement would run
            # inside it (one connection) and share its fate on rollback.
            async with self._lock:
                pass
        # No await between the check above and the enqueue inside _raw, and the
        # connection's worker runs statements in FIFO order, so a transaction
        # that starts later cannot swallow this statement.
        try:
            return await self._raw(sql, params)
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(_describe(self.path, exc)) from exc

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; return the number of rows it reported (via RETURNING)."""
        return len(await self.fetchall(sql, params))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Run the body's statements as one write transaction.

        Nested use by the same task joins the outer transaction. Do not fan out
        to other tasks inside the body: their statements wait for the end of it.
        """
        me = asyncio.current_task()
        if me is not None and self._tx_owner is me:
            yield
            return
        if self._closed:
            raise StoreError(f"database {self.path} is closed")
        async with self._lock:
            self._tx_owner = me
            try:
                try:
                    await self._raw("BEGIN IMMEDIATE")
                except (sqlite3.Error, ValueError) as exc:
                    raise StoreError(_describe(self.path, exc)) from exc
                except BaseException:
                    # Cancelled while BEGIN was queued: it will still run, so undo it.
                    await self._rollback()
                    raise
                try:
                    yield
                except BaseException:
                    await self._rollback()
                    raise
                try:
                    await self._raw("COMMIT")
                except (sqlite3.Error, ValueError) as exc:
                    await self._rollback()
                    raise StoreError(_describe(self.path, exc)) from exc
            finally:
                self._tx_owner = None

    async def _rollback(self) -> None:
        # Enqueued before any await, so it runs even if this task is cancelled again.
        try:
            await self._raw("ROLLBACK")
        except (sqlite3.Error, ValueError):
            pass  # nothing active (SQLite may already have rolled back on error)
