"""The test PostgreSQL server (tests/postgres.py) and the two-backend fixtures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.postgres import (
    OWNER_FILE,
    PostgresServer,
    _numbered,
    _reap_orphans,
    find_bindir,
    is_postgres,
    raw_execute,
    raw_executemany,
    raw_rows,
)


def test_server_is_tuned_and_local(postgres_server: PostgresServer) -> None:
    settings = dict(
        postgres_server.admin_query(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(?::text[])",
            [["fsync", "max_connections", "listen_addresses", "server_encoding"]],
        )
    )
    assert settings == {
        "fsync": "off",
        "max_connections": "300",
        "listen_addresses": "127.0.0.1",
        "server_encoding": "UTF8",
    }


def test_each_test_gets_a_fresh_database(postgres_server: PostgresServer) -> None:
    name = postgres_server.create_database()
    url = postgres_server.url(name)
    raw_execute(url, "CREATE TABLE t (x INTEGER)")
    assert raw_execute(url, "INSERT INTO t VALUES (?), (?)", [1, 2]) == 2
    other = postgres_server.create_database()
    try:
        tables = raw_rows(
            postgres_server.url(other),
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        )
        assert tables == []
    finally:
        postgres_server.drop_database(other)
    postgres_server.drop_database(name)
    left = postgres_server.admin_query("SELECT 1 FROM pg_database WHERE datname = ?", [name])
    assert left == []


def test_placeholders_skip_quoted_text() -> None:
    assert _numbered("SELECT '?', \"a?\" FROM t WHERE a = ? AND b = 'it''s ?' AND c = ?") == (
        "SELECT '?', \"a?\" FROM t WHERE a = $1 AND b = 'it''s ?' AND c = $2"
    )


@pytest.mark.backends("sqlite", "postgres")
async def test_raw_helpers_on_both_backends(db_target: str, db_backend: str) -> None:
    # Called from inside a running event loop on purpose: the helpers must not need one.
    assert is_postgres(db_target) == (db_backend == "postgres")
    raw_execute(db_target, "CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)")
    raw_execute(db_target, "INSERT INTO t (k, v) VALUES (?, ?)", ["a", 1])
    assert raw_execute(db_target, "UPDATE t SET v = v + 1 WHERE k = ?", ["a"]) == 1
    assert raw_rows(db_target, "SELECT k, v FROM t WHERE k = ?", ["a"]) == [("a", 2)]
    raw_executemany(db_target, "INSERT INTO t (k, v) VALUES (?, ?)", [("b", 1), ("c", 2)])
    assert raw_rows(db_target, "SELECT count(*), sum(v) FROM t") == [(3, 5)]


def test_a_named_binary_directory_without_the_binaries_fails_saying_how_to_install(
    tmp_path: Path,
) -> None:
    with pytest.raises(pytest.fail.Exception) as info:
        find_bindir(str(tmp_path))  # as DUCKLM_TEST_PG_BINDIR names it
    message = str(info.value)
    assert str(tmp_path) in message and "apt-get install postgresql" in message


def test_the_server_of_a_dead_test_run_is_reaped() -> None:
    """A pytest that was SIGKILLed leaves its server running; the next start stops it."""
    orphan = PostgresServer()
    orphan.start()
    try:
        assert orphan.process is not None
        dead = subprocess.Popen(["true"])
        dead.wait()
        (orphan.directory / OWNER_FILE).write_text(str(dead.pid))
        _reap_orphans(orphan.directory.parent)
        assert orphan.process.wait(timeout=30) is not None
        assert not orphan.directory.exists()
    finally:
        orphan.stop()


def test_sqlite_only_runs_start_no_postgres(tmp_path: Path) -> None:
    """A run whose tests use db_target on SQLite only never starts the server."""
    test_file = tmp_path / "test_probe.py"
    test_file.write_text(
        textwrap.dedent(
            """
            def test_probe(db_target):
                assert db_target.endswith("ducklm.db")
            """
        )
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        # The probe lives outside tests/, so the suite's conftest is loaded as a plugin.
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.conftest",
            "--setup-show",
            "-c",
            str(root / "pyproject.toml"),
            str(test_file),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "db_target" in result.stdout
    assert "postgres_server" not in result.stdout


@pytest.mark.backends("postgres")
async def test_a_postgres_db_target_has_the_schema_and_no_rows(db_target: str) -> None:
    from runtime.store import open_stores
    from runtime.store.migrations import SCHEMA_VERSION
    from runtime.store.pg_baseline import VERSION_TABLE

    assert raw_rows(db_target, f"SELECT version FROM {VERSION_TABLE}") == [(SCHEMA_VERSION,)]
    async with await open_stores(db_target) as stores:
        task = await stores.tasks.create_task("mine alone")
        assert [t.task_id for t in await stores.tasks.list_recent(10)] == [task.task_id]
