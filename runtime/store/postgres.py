"""The PostgreSQL backend: the store API over an asyncpg connection pool.

asyncpg (chosen over psycopg 3 for its per-statement speed, its own pool and
Records that answer `row["c"]` and `row[0]` like sqlite3.Row) is imported only
when a URL is opened, so SQLite installations never load it.

Statements are written for both backends with `?` placeholders
(runtime/store/sql.py translates them). Each statement outside a transaction
takes a pooled connection for itself, so different tasks really run at once
(unlike SQLite's one connection). `transaction()` holds one pooled
connection for the task that opened it, at READ COMMITTED: every statement
that task runs until the end goes to that connection, and a nested
`transaction()` of the same task joins it. Single-statement compare-and-set
(`UPDATE … WHERE x IS NULL RETURNING`) is safe across processes at that level
(a blocked writer re-checks the WHERE against the committed row); a
read-then-write uses `db.for_update` / `db.skip_locked` or an advisory lock.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from runtime.store.db import BackgroundConnection, Database, Params, StoreError, _valid_text
from runtime.store.migrations import MIGRATIONS, SCHEMA_VERSION, Dialects
from runtime.store.pg_baseline import (
    BASELINE_VERSION,
    MIGRATION_LOCK,
    POSTGRES_BASELINE,
    VERSION_TABLE,
)
from runtime.store.sql import to_postgres

if TYPE_CHECKING:
    import asyncpg

logger = logging.getLogger("ducklm.store")
T = TypeVar("T")

# A URL's scheme (`postgresql://`); the authority starts after it.
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# A `password=` parameter's value runs to the next "&": an unencoded "#" in it
# would otherwise leave the rest of the password shown as a "fragment".
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&]*)", re.IGNORECASE)
# Shorter fragments of a password are not searched for in a driver's message:
# one or two characters occur in any sentence, so they say nothing of it.
_FRAGMENT = 3

# How long opening may take (DNS, TCP, TLS, authentication) before it is an error.
CONNECT_TIMEOUT_S = 10.0
# How long a statement waits for a free pooled connection before it is an error
# (every connection busy: a pool too small for the load, or a leak).
ACQUIRE_TIMEOUT_S = 10.0


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the authority's password is in `url` (`scheme://user:password@host`),
    or None. The password is everything from the first ":" after the user to
    the LAST "@" of the URL: unencoded, it may hold "@", "/", "?" or "#" (which
    end the authority in a well-formed URL), while a host never holds "@".
    An "@" in the path or query makes this mask more than the password, never
    less: what is shown loses a host, but no secret leaks."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    start = scheme.end()
    at = url.rfind("@", start)
    colon = url.find(":", start, at) if at >= 0 else -1
    if colon < 0 or any(c in url[start:colon] for c in "/?#@"):
        return None  # no "user:" before the "@": no password in the authority
    return colon + 1, at


def mask_url(url: str) -> str:
    """The URL without its password (what error messages and `db.path` show):
    the one in the authority (`user:secret@`) and a `password=` parameter."""
    span = _password_span(url)
    masked = f"{url[: span[0]]}***{url[span[1] :]}" if span else url
    return _QUERY_PASSWORD.sub(r"\1***", masked)


def _secrets(url: str) -> list[str]:
    """The URL's passwords as written and percent-decoded (a driver may quote either)."""
    found: list[str] = []
    span = _password_span(url)
    if span is not None:
        found.append(url[span[0] : span[1]])
    found += [m.group(2) for m in _QUERY_PASSWORD.finditer(url)]
    found += [urllib.parse.unquote(secret) for secret in found]
    return [secret for secret in found if secret]


def _scrub(message: str, url: str) -> str:
    """A driver's `message` with every piece of the URL's password replaced by
    "***" (each run of characters covered by any 3-character fragment of it,
    as written or percent-decoded), so a driver
    that quotes part of a password it split wrongly (an unencoded "#" or "@"
    makes it take the rest for a host, a port or a user) shows none of it."""
    hidden = [False] * len(message)
    for secret in _secrets(url):
        for i in range(len(secret) - _FRAGMENT + 1):
            piece = secret[i : i + _FRAGMENT]
            at = message.find(piece)
            while at >= 0:
                hidden[at : at + _FRAGMENT] = [True] * _FRAGMENT
                at = message.find(piece, at + 1)
    if not any(hidden):
        return message
    out: list[str] = []
    for i, char in enumerate(message):
        if not hidden[i]:
            out.append(char)
        elif i == 0 or not hidden[i - 1]:
            out.append("***")
    return "".join(out)


def _clean(value: Any) -> Any:
    """The bind step's conversions by Python type: text PostgreSQL can store (no
    lone surrogates, which UTF-8 cannot encode; no NUL, which PostgreSQL's text
    cannot hold: both become U+FFFD, like any undecodable byte)."""
    if isinstance(value, str):
        value = _valid_text(value)
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
    return value


def _bind(params: Params) -> list[Any]:
    return [_clean(p) for p in params]


def _coerce(value: Any, type_name: str) -> Any:
    """A parameter converted to the type PostgreSQL inferred for it. SQLite is
    loosely typed and the store's SQL was written for it (`CASE WHEN ? …` with
    0/1, an int where text is compared); asyncpg refuses a Python type that is
    not exactly the parameter's, so a refused statement is bound again through
    here (the usual statement never gets here: no cost on the fast path)."""
    if value is None:
        return None
    if type_name == "bool":
        return bool(value)
    if type_name in ("int2", "int4", "int8") and isinstance(value, float | str | bool):
        return int(value)
    if type_name in ("float4", "float8", "numeric") and not isinstance(value, float):
        return float(value)
    if type_name in ("text", "varchar", "bpchar", "name") and not isinstance(value, str):
        return str(value)
    return value


def _describe(shown: str, exc: BaseException, url: str) -> str:
    """A sentence naming the database (URL without password) and the likely
    cause. The driver's words in it are scrubbed of `url`'s password (`_scrub`);
    ours are not (they hold no secret, and "host" must stay "host")."""
    import asyncpg

    detail = _scrub(str(exc), url)
    reason = _scrub(getattr(exc, "strerror", None) or str(exc), url)

    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return (
            f"database {shown}: the server refused the login ({detail}); check the user "
            "and password in DUCKLM_DB"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return (
            f"database {shown} does not exist on that server ({detail}); create it "
            "(createdb) or fix the name in DUCKLM_DB"
        )
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return f"database {shown}: the server has no connection slot left ({detail})"
    if isinstance(exc, socket.gaierror):
        return f"database {shown}: cannot resolve the host name ({reason})"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"database {shown}: the connection was refused; is PostgreSQL running and "
            "listening on that host and port?"
        )
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError | ConnectionResetError) or (
        isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc).lower()
    ):
        return f"database {shown}: the connection to the server was lost ({detail})"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return f"database {shown}: the server is starting up or shutting down ({detail})"
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return f"database {shown}: the record refers to a task that does not exist ({detail})"
    if isinstance(exc, asyncpg.DiskFullError):
        return f"database {shown}: the server's disk is full ({detail})"
    if isinstance(exc, TimeoutError):
        return f"database {shown}: the server did not answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, OSError):
        return f"database {shown}: cannot connect ({reason})"
    return f"database {shown}: {detail}"


def _driver_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset between two borrowers: nothing beyond the rollback of an
    unfinished transaction that asyncpg always does. Its default reset query
    (RESET ALL, UNLISTEN *, pg_advisory_unlock_all, CLOSE ALL) is a round trip
    after every statement, and undoes nothing the store does: it sets no session
    state, listens to nothing, takes only transaction-scoped advisory locks."""


class _PgBackground(BackgroundConnection):
    """The neutral background interface on one pooled asyncpg connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        status = await self._conn.execute(to_postgres(sql), *_bind(params))
        # "DELETE 5", "UPDATE 2", "INSERT 0 1": the count is the last word.
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]:
        return list(await self._conn.fetch(to_postgres(sql), *_bind(params)))

    async def executemany(self, sql: str, seq_of_params: Sequence[Params]) -> None:
        if seq_of_params:
            await self._conn.executemany(to_postgres(sql), [_bind(p) for p in seq_of_params])


class PostgresDatabase(Database):
    """The store API on a PostgreSQL database. Use `await Database.open(url)`."""

    dialect = "postgres"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    url_schemes = ("postgresql://", "postgres://")  # registers it with Database.open

    def __init__(self, pool: asyncpg.Pool, url: str, pool_size: int) -> None:
        # Deliberately not Database.__init__: nothing of SQLite's connection applies.
        self._pool = pool
        self._url = url
        self.path = mask_url(url)
        self._pool_size = pool_size
        self._held: dict[asyncio.Task[Any], asyncpg.Connection] = {}
        self._closed = False
        self._background_jobs: set[asyncio.Task[Any]] = set()
        self._errors = _driver_errors()

    @classmethod
    async def open_url(
        cls, url: str, *, pool_size: int = 10, migrate: bool = True
    ) -> PostgresDatabase:
        shown = mask_url(url)
        try:
            import asyncpg
        except ImportError as exc:
            raise StoreError(
                f"database {shown}: PostgreSQL needs the asyncpg package "
                "(pip install asyncpg), which is not installed"
            ) from exc
        if pool_size < 1:
            raise StoreError(f"database {shown}: the pool size must be at least 1")
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                timeout=CONNECT_TIMEOUT_S,
                # Statements are prepared once per connection and reused (asyncpg's cache).
                statement_cache_size=512,
                server_settings={"application_name": "ducklm"},
                reset=_keep_session,
            )
        except ValueError as exc:  # asyncpg's parse of the DSN (a bad port, an option)
            # With a password in the URL, the parser's own words are not shown:
            # it quotes pieces of the URL it split wrongly (an unencoded "#" or
            # "/" in the password), even one or two characters of the password.
            why = "percent-encode special characters in the password" if _secrets(url) else str(exc)
            raise StoreError(f"{shown} is not a valid PostgreSQL URL ({why})") from exc
        except _driver_errors() as exc:
            raise StoreError(_describe(shown, exc, url)) from exc
        db = cls(pool, url, pool_size)
        try:
            if migrate:
                await db._migrate()
        except BaseException as exc:
            await db.close()
            if isinstance(exc, db._errors):
                raise StoreError(_describe(shown, exc, url)) from exc
            raise
        return db

    # -- migrations ----------------------------------------------------------

    async def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION (refusing a newer one)."""
        try:
            await self._migrate()
        except self._errors as exc:
            raise self._error(exc) from exc

    async def _migrate(self) -> None:
        if await self.user_version() == SCHEMA_VERSION:
            return  # the usual start: nothing to do, no lock taken
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
            # One process migrates at a time; the next one finds the version moved.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)"
            )
            version = await conn.fetchval(f"SELECT max(version) FROM {VERSION_TABLE}")
            version = int(version or 0)
            self._check_version(version)
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                for statement in POSTGRES_BASELINE:
                    await conn.execute(statement)
                version = BASELINE_VERSION
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    if isinstance(statement, Dialects):
                        statement = statement.postgres
                    await conn.execute(statement)
            await conn.execute(f"DELETE FROM {VERSION_TABLE}")
            await conn.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES ($1)", SCHEMA_VERSION)
            logger.info("database %s migrated to schema version %d", self.path, SCHEMA_VERSION)

    async def user_version(self) -> int:
        """The schema version (0: a database DuckLM has not set up yet)."""
        row = await self.fetchone(
            "SELECT CASE WHEN to_regclass(?) IS NULL THEN 0 ELSE 1 END", (VERSION_TABLE,)
        )
        if row is None or not row[0]:
            return 0
        row = await self.fetchone(f"SELECT max(version) FROM {VERSION_TABLE}")
        return int(row[0] or 0) if row is not None else 0

    # -- lifecycle -----------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._background_jobs:
            await asyncio.gather(*self._background_jobs, return_exceptions=True)
        try:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT_S)
        except (*self._errors, TimeoutError):
            self._pool.terminate()  # a dead server: nothing left to hand back

    # -- statements ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"database {self.path} is closed")

    async def _fetch(self, conn: asyncpg.Connection, sql: str, params: Params) -> list[Any]:
        import asyncpg

        text = to_postgres(sql)
        bound = _bind(params)
        try:
            return list(await conn.fetch(text, *bound))
        except asyncpg.DataError as exc:
            if "invalid input for query argument" not in str(exc):
                raise
        # A Python type asyncpg refused for a parameter: bind by the inferred types.
        statement = await conn.prepare(text)
        types = [t.name for t in statement.get_parameters()]
        coerced = [_coerce(v, n) for v, n in zip(bound, types, strict=True)]
        return list(await statement.fetch(*coerced))

    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]:
        """Run one statement and return its rows (asyncpg Records)."""
        self._check_open()
        me = asyncio.current_task()
        held = self._held.get(me) if me is not None else None
        try:
            if held is not None:
                return await self._fetch(held, sql, params)
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                return await self._fetch(conn, sql, params)
        except TimeoutError as exc:
            raise StoreError(self._exhausted()) from exc
        except self._errors as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> StoreError:
        """The StoreError for a driver error, without any piece of the password."""
        return StoreError(_describe(self.path, exc, self._url))

    def _exhausted(self) -> str:
        return (
            f"database {self.path}: all {self._pool_size} pooled connections stayed busy "
            f"for more than {ACQUIRE_TIMEOUT_S:g} s (raise DUCKLM_DB_POOL_SIZE?)"
        )

    async def fetchone(self, sql: str, params: Params = ()) -> Any | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; return the number of rows it reported (via RETURNING)."""
        return len(await self.fetchall(sql, params))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """One transaction on a pooled connection held by this task (see the module)."""
        me = asyncio.current_task()
        if me is not None and me in self._held:
            yield
            return
        self._check_open()
        if me is None:
            raise StoreError(f"database {self.path}: a transaction needs an asyncio task")
        try:
            conn = await self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S)
        except TimeoutError as exc:
            raise StoreError(self._exhausted()) from exc
        except self._errors as exc:
            raise self._error(exc) from exc
        try:
            tx = conn.transaction()
            try:
                await tx.start()
            except self._errors as exc:
                raise self._error(exc) from exc
            self._held[me] = conn
            try:
                yield
            except BaseException:
                self._held.pop(me, None)
                try:
                    await tx.rollback()
                except self._errors:
                    pass  # a lost connection rolled back on the server already
                raise
            self._held.pop(me, None)
            try:
                await tx.commit()
            except self._errors as exc:
                try:
                    await tx.rollback()
                except self._errors:
                    pass
                raise self._error(exc) from exc
        finally:
            self._held.pop(me, None)
            await self._pool.release(conn)

    # -- background work -----------------------------------------------------

    async def background_transaction(
        self, work: Callable[[BackgroundConnection], Awaitable[T]]
    ) -> T:
        """`await work(connection)` as one transaction on a pooled connection of
        its own, run as a task a cancelled caller does not interrupt (it commits
        or rolls back and hands the connection back). The statements run on the
        server, so the loop is never blocked: no thread is needed."""
        self._check_open()

        async def run() -> T:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                async with conn.transaction():
                    return await work(_PgBackground(conn))

        job = asyncio.get_running_loop().create_task(run())
        self._background_jobs.add(job)
        job.add_done_callback(_forget(self._background_jobs))
        try:
            return await asyncio.shield(job)
        except TimeoutError as exc:
            raise StoreError(self._exhausted()) from exc
        except self._errors as exc:
            raise self._error(exc) from exc

    async def checkpoint(self) -> None:
        """Nothing to do: PostgreSQL checkpoints its WAL itself."""


def _forget(jobs: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def forget(job: asyncio.Task[Any]) -> None:
        jobs.discard(job)
        if not job.cancelled():
            job.exception()

    return forget
