"""The store's connection: values and errors shared by both backends, `Database.open`
(a SQLite path or a postgresql:// URL, runtime/store/postgres.py for the
latter) and the SQLite backend itself: opening, migrations, statement helpers
and transactions.

Statements run inline, on the event loop's thread. A DuckLM statement is small
and indexed, and in WAL mode with synchronous=NORMAL a commit is a write() into
the WAL file with no fsync, so running it directly takes microseconds; handing
every statement to a worker thread and back (what aiosqlite does) took 50-100 µs
each on a busy 2-core machine, which was most of a task's store cost
(docs/performance.md). Nothing slow is allowed on the loop, though:

- Waiting for another connection's write lock: the inline connection has
  busy_timeout 0, so SQLite answers BUSY at once, and the statement is retried
  after an `asyncio.sleep`, for up to BUSY_TIMEOUT_S in all.
- Slow work: WAL checkpoints (automatic checkpoints are off on the inline
  connection) and bulk deletes run on a second connection, an aiosqlite one:
  its statements run in aiosqlite's own thread while the loop goes on
  (`checkpoint`, `background_transaction`). There the thread hop costs
  nothing that matters, and the work is slow enough to need it.

Single statements are their own transaction (autocommit). Multi-statement
transactions go through `transaction()`, which serializes them with an
asyncio.Lock and `BEGIN IMMEDIATE`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from runtime.store import chain
from runtime.store.migrations import MIGRATIONS, SCHEMA_VERSION, Dialects

if TYPE_CHECKING:
    import aiosqlite

logger = logging.getLogger("ducklm.store")
T = TypeVar("T")

BUSY_TIMEOUT_S = 5.0
# Retry delays while another connection holds the write lock (doubling, capped).
FIRST_RETRY_S = 0.001
MAX_RETRY_S = 0.05
# Commits between two background checkpoints. A DuckLM commit writes about 5-10
# pages, so this keeps the WAL near SQLite's own default of 1000 pages.
CHECKPOINT_EVERY_COMMITS = 150
# A WAL longer than this (frames of 4 KiB) after a passive checkpoint gets a
# RESTART checkpoint, which lets the next write start it over (see `checkpoint`).
RESTART_AFTER_FRAMES = 4000
# How long a checkpoint may wait for readers still on old WAL frames (while it
# holds the write lock, so inline writers wait too) before it gives up until
# the next one.
CHECKPOINT_WAIT_MS = 100
# A WAL that once grew large (a burst of big tool outputs) is cut back to this
# size after a checkpoint instead of keeping its high-water mark on disk.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024
SQLITE_HEADER = b"SQLite format 3\x00"
# Rows per hop when the background connection iterates a cursor (aiosqlite's default).
BACKGROUND_CHUNK_ROWS = 64
# RETURNING (3.35) is what makes compare-and-set and sequence numbers one statement;
# IS [NOT] DISTINCT FROM (3.39) is how SQL written for both backends compares
# values that may be NULL (SQLite's `IS ?` does not exist in PostgreSQL).
MIN_SQLITE = (3, 39, 0)


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
        if not text.isascii():
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


# What the sqlite3 module raises for a statement it could not run: its own
# errors, NUL characters in SQL (ValueError), integers too large to bind.
_STATEMENT_ERRORS = (sqlite3.Error, ValueError, OverflowError)


def _primary_code(exc: BaseException) -> int | None:
    """SQLite's primary result code (SQLITE_BUSY, …) without the extended bits."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _describe(path: str, exc: BaseException) -> str:
    """A sentence naming the file and the likely cause, for a person to act on."""
    primary = _primary_code(exc)
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
    if text.isascii():  # O(1): CPython keeps the flag on the string
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    # check_same_thread=False: the inline connection is closed from a worker
    # thread (closing the last connection checkpoints the file), and an
    # in-memory database's background work runs on it in aiosqlite's thread.
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        timeout=busy_timeout_s,
        check_same_thread=False,
        cached_statements=256,
    )
    conn.row_factory = sqlite3.Row
    # The audit chain's hash, computed inside the INSERT that numbers an event
    # (runtime/store/events.py) so concurrent writers can never fork a chain.
    conn.create_function(chain.SQL_FUNCTION, 6, chain.event_hash, deterministic=True)
    return conn


class BackgroundConnection:
    """What `background_transaction(work)` gives `work`, the same on both backends:
    statements with `?` placeholders, run inside the work's one transaction."""

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        raise NotImplementedError

    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]:
        """Run one statement and return its rows."""
        raise NotImplementedError

    async def executemany(self, sql: str, seq_of_params: Sequence[Params]) -> None:
        """Run one statement once per parameter tuple."""
        raise NotImplementedError


class _SqliteBackground(BackgroundConnection):
    """The interface on the aiosqlite connection (its statements run in its thread)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.connection = conn  # the aiosqlite connection itself, for SQLite-only work

    async def execute(self, sql: str, params: Params = ()) -> int:
        async with self.connection.execute(sql, _bindable(params)) as cursor:
            return cursor.rowcount

    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]:
        return list(await self.connection.execute_fetchall(sql, _bindable(params)))

    async def executemany(self, sql: str, seq_of_params: Sequence[Params]) -> None:
        await self.connection.executemany(sql, [_bindable(p) for p in seq_of_params])


def is_postgres_url(target: object) -> bool:
    """Whether `target` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


class Database:
    """The store's database. `await Database.open(target)` with a SQLite path
    gives this class (one long-lived connection, used inline on the event loop);
    with a postgresql:// URL, its PostgreSQL subclass (runtime/store/postgres.py),
    which has the same API.

    `dialect` names the backend for the few statements that differ (each with a
    comment saying why); `for_update` / `skip_locked` are the row-locking
    clauses a read-then-write needs on PostgreSQL, empty on SQLite (whose
    BEGIN IMMEDIATE already serializes every writer)."""

    dialect = "sqlite"
    for_update = ""
    skip_locked = ""
    # The URL schemes a subclass opens (`open_url`); empty for SQLite's files.
    url_schemes: ClassVar[tuple[str, ...]] = ()
    # Subclasses for URLs register themselves here when their module is imported
    # (runtime/store/__init__.py imports runtime/store/postgres.py): `open` finds
    # them without importing them, so this module and theirs import one way.
    _url_backends: ClassVar[list[type[Database]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.url_schemes:
            Database._url_backends.append(cls)

    @classmethod
    async def open_url(cls, url: str, *, pool_size: int = 10, migrate: bool = True) -> Database:
        """Open a database named by a URL (a subclass for its scheme implements this)."""
        raise StoreError(f"DuckLM cannot open {url.split('://', 1)[0]}:// databases")

    def __init__(self, conn: sqlite3.Connection, path: str, *, memory: bool = False) -> None:
        self._conn = conn
        self.path = path
        self._memory = memory
        self._lock = asyncio.Lock()
        # The task running the current transaction; its statements bypass the lock.
        self._tx_owner: asyncio.Task[Any] | None = None
        self._closed = False
        # The second connection (aiosqlite), for work that must not run on the
        # loop, opened on first use. One piece of work at a time holds it (the
        # lock), and each runs as a task of its own that a cancelled caller does
        # not interrupt, so no transaction is ever left open on it.
        self._background: aiosqlite.Connection | None = None
        self._background_lock = asyncio.Lock()
        self._background_jobs: set[asyncio.Task[Any]] = set()
        self._background_closed = False
        self._changes = 0  # total_changes after the last statement
        self._commits_since_checkpoint = 0
        self._checkpointing: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str | Path, *, pool_size: int = 10, migrate: bool = True) -> Database:
        """Open (creating if needed) and migrate the database at `path`: a SQLite
        file, or a postgresql:// URL (with a pool of `pool_size` connections).
        `migrate=False` leaves the schema as it is (`ducklm db` inspects first,
        then calls `migrate()`)."""
        if is_postgres_url(path):
            for backend in Database._url_backends:
                if str(path).startswith(backend.url_schemes):
                    return await backend.open_url(str(path), pool_size=pool_size, migrate=migrate)
            raise StoreError("PostgreSQL support is not loaded (import runtime.store.postgres)")
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old for DuckLM; it needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer (use a newer Python build)"
            )
        memory = str(path) == ":memory:"
        shown = str(path) if memory else _precheck(path)
        try:
            conn = _connect(shown, 0)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(_describe(shown, exc)) from exc
        db = cls(conn, shown, memory=memory)
        try:
            await db._configure()
            if migrate:
                await db._migrate()
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise StoreError(_describe(shown, exc)) from exc
            raise
        return db

    async def _configure(self) -> None:
        # Busy waits happen in `_run`, with asyncio.sleep, never inside SQLite.
        await self._run("PRAGMA busy_timeout = 0")
        if not self._memory:
            # Two processes starting together on a fresh file both try to switch
            # it to WAL; the loser sees BUSY and `_run` retries.
            rows = await self._run("PRAGMA journal_mode = WAL")
            mode = rows[0][0] if rows else None
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"database {self.path}: cannot switch to WAL mode (got {mode!r}); "
                    "is it on a network file system?"
                )
            # Checkpoints run in a worker thread instead (see `checkpoint`).
            await self._run("PRAGMA wal_autocheckpoint = 0")
            await self._run(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        # WAL + NORMAL: no fsync per commit, still crash-safe (a power loss may drop
        # the last commits, never corrupt the file).
        await self._run("PRAGMA synchronous = NORMAL")
        await self._run("PRAGMA foreign_keys = ON")

    async def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION (refusing a newer one)."""
        try:
            await self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(_describe(self.path, exc)) from exc

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
                    if isinstance(statement, Dialects):
                        statement = statement.sqlite
                    await self._run(statement)
            await self._run(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.path} has schema version {version}, but this DuckLM only "
                f"knows versions up to {SCHEMA_VERSION}; upgrade DuckLM or use another "
                + ("database" if self.dialect == "postgres" else "file")
            )

    async def user_version(self) -> int:
        rows = await self.fetchall("PRAGMA user_version")
        return int(rows[0][0])

    async def close(self) -> None:
        """Finish background work and close both connections (the inline one off
        the loop: the last connection to a file checkpoints it on close)."""
        if self._closed:
            return
        self._closed = True
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        if self._background_jobs:
            await asyncio.gather(*self._background_jobs, return_exceptions=True)
        async with self._background_lock:
            self._background_closed = True
            background, self._background = self._background, None
        if background is not None:
            try:
                await background.close()
            except (sqlite3.Error, ValueError):
                pass  # closing a broken connection has nothing left to save
        await asyncio.to_thread(self._close_inline)

    def _close_inline(self) -> None:
        try:
            self._conn.close()
        except sqlite3.Error:
            pass  # likewise

    @property
    def closed(self) -> bool:
        return self._closed

    # -- statements --------------------------------------------------------

    async def _run(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run one statement inline. While another connection holds the write
        lock, wait for it with asyncio.sleep (the loop keeps serving), up to
        BUSY_TIMEOUT_S in all; a failed attempt changed nothing, so a retry is safe."""
        params = _bindable(params)
        me = asyncio.current_task()
        deadline: float | None = None
        delay = FIRST_RETRY_S
        while True:
            while self._tx_owner is not None and self._tx_owner is not me:
                # Wait out another task's transaction, or this statement would run
                # inside it (one connection) and share its fate on rollback.
                async with self._lock:
                    pass
            try:
                rows = self._conn.execute(sql, params).fetchall()
                break
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if deadline is None:
                    deadline = time.monotonic() + BUSY_TIMEOUT_S
                elif time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)
        self._count_commit()
        return rows

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """Run one statement and return its rows (writes use RETURNING to report rows)."""
        if self._closed:
            raise StoreError(f"database {self.path} is closed")
        try:
            return await self._run(sql, params)
        except _STATEMENT_ERRORS as exc:
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
                await self.fetchall("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self._rollback()
                    raise
                try:
                    await self.fetchall("COMMIT")
                except StoreError:
                    self._rollback()
                    raise
            finally:
                self._tx_owner = None

    def _rollback(self) -> None:
        if not self._conn.in_transaction:
            return  # SQLite already rolled back (it does on some errors)
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- off the loop ------------------------------------------------------

    async def background_transaction(
        self, work: Callable[[BackgroundConnection], Awaitable[T]]
    ) -> T:
        """Run `await work(connection)` as one write transaction on the background
        connection (aiosqlite: its statements run in aiosqlite's thread), for
        bulk work (retention) that would stall the loop. `connection` is a
        BackgroundConnection, the same interface on both backends.

        `work` runs SQL on the connection it is given and nothing else. Keep each
        call short (delete in chunks): inline writers wait for it, up to
        BUSY_TIMEOUT_S.
        """
        if self._memory:
            # An in-memory database is private to its connection, so the work runs
            # on the inline one (in aiosqlite's thread), inside an inline
            # transaction: other tasks' statements wait for its end, as they would
            # for a background writer's lock.
            async with self.transaction():
                return await self._in_background(lambda conn: work(_SqliteBackground(conn)))

        async def transact(conn: aiosqlite.Connection) -> T:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                result = await work(_SqliteBackground(conn))
                await conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise
            return result

        return await self._in_background(transact)

    async def background_delete(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One DELETE statement as a background transaction (see above); returns
        how many rows it deleted. For pruning tables that grow with traffic."""

        async def delete(conn: BackgroundConnection) -> int:
            return await conn.execute(sql, params)

        return await self.background_transaction(delete)

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file, on the background connection, so
        the WAL can start over from its beginning.

        PASSIVE first: it neither waits for nor blocks anyone. Beside a busy
        writer it may never catch up completely (new frames keep arriving), and
        the WAL would then grow without end; so when the WAL is still longer
        than RESTART_AFTER_FRAMES, a RESTART follows. That one holds the write
        lock while it copies the few frames left (inline writers wait, without
        blocking the loop) and waits at most CHECKPOINT_WAIT_MS for readers."""
        if self._memory:
            return

        async def run(conn: aiosqlite.Connection) -> None:
            async with conn.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
                busy, frames, _ = await cursor.fetchone()  # type: ignore[misc]
            if busy or frames < RESTART_AFTER_FRAMES:
                return
            await conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
            try:
                await conn.execute_fetchall("PRAGMA wal_checkpoint(RESTART)")
            finally:
                await conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")

        await self._in_background(run)

    def _count_commit(self) -> None:
        """After a statement: count it if it committed a change, and start a
        background checkpoint every CHECKPOINT_EVERY_COMMITS commits."""
        changes = self._conn.total_changes
        if changes == self._changes or self._conn.in_transaction:
            return  # a read, or a statement inside a transaction not yet committed
        self._changes = changes
        self._commits_since_checkpoint += 1
        if self._memory or self._closed:
            return
        if self._commits_since_checkpoint < CHECKPOINT_EVERY_COMMITS:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._commits_since_checkpoint = 0
        self._checkpointing = asyncio.get_running_loop().create_task(self._logged_checkpoint())

    async def _logged_checkpoint(self) -> None:
        if self._closed:
            return  # closing the last connection checkpoints the file anyway
        try:
            await self.checkpoint()
        except StoreError as exc:  # the next one retries; the WAL only grows meanwhile
            logger.warning("WAL checkpoint failed: %s", exc)

    async def _in_background(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `work` on the background connection, as a task of its own: a caller
        cancelled half-way leaves it to finish (or roll back) and release the
        connection, instead of leaving a transaction open on it."""
        if self._closed:
            raise StoreError(f"database {self.path} is closed")
        job = asyncio.get_running_loop().create_task(self._serialized(work))
        self._background_jobs.add(job)
        job.add_done_callback(_forget_job(self._background_jobs))
        try:
            return await asyncio.shield(job)
        except (*_STATEMENT_ERRORS, OSError) as exc:
            raise StoreError(_describe(self.path, exc)) from exc

    async def _serialized(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        async with self._background_lock:
            if self._background_closed:
                raise StoreError(f"database {self.path} is closed")
            return await work(await self._background_connection())

    async def _background_connection(self) -> aiosqlite.Connection:
        if self._background is not None:
            return self._background
        # Imported on first use: a short-lived CLI process never needs it.
        import aiosqlite

        if self._memory:
            inline = self._conn
            conn = await aiosqlite.Connection(lambda: inline, BACKGROUND_CHUNK_ROWS)
        else:
            conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.execute("PRAGMA foreign_keys = ON")
        self._background = conn
        return conn


def _forget_job(jobs: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    """A done-callback that drops a background job from `jobs`, and reads its
    exception: a caller that was cancelled never will, and asyncio would log it
    as never retrieved."""

    def forget(job: asyncio.Task[Any]) -> None:
        jobs.discard(job)
        if not job.cancelled():
            job.exception()

    return forget
