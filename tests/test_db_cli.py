"""`ducklm db migrate` through the real CLI (a subprocess): an old SQLite file built
from the first migrations, a fresh PostgreSQL database, a newer schema refused
with exit 2 and nothing changed; and the --help texts of the `db` commands."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from runtime.store import open_stores
from runtime.store.migrations import MIGRATIONS, SCHEMA_VERSION, Dialects
from tests.postgres import raw_execute, raw_rows
from tests.test_db_copy import ducklm, everything, free_port


def old_sqlite(path: Path, version: int) -> None:
    """A file as DuckLM v<version> left it, with a task in it."""
    with sqlite3.connect(path) as conn:
        for statements in MIGRATIONS[:version]:
            for statement in statements:
                conn.execute(statement.sqlite if isinstance(statement, Dialects) else statement)
        conn.execute(
            "INSERT INTO tasks (task_id, message, status, conversation, created_at, updated_at) "
            "VALUES ('t-old', 'from long ago', 'completed', 'slack:C1|1.2', ?, ?)",
            (time.time(), time.time()),
        )
        conn.execute(f"PRAGMA user_version = {version}")


async def test_migrate_an_old_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_sqlite(path, 3)
    code, out, err = await ducklm(tmp_path, "db", "migrate", "--db", str(path))
    assert code == 0, out + err
    assert f"schema v3 -> v{SCHEMA_VERSION}" in out and str(path) in out
    assert raw_rows(str(path), "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    # v4 filled the new column from the old rows; the row itself is kept
    assert raw_rows(str(path), "SELECT message, conversation_group FROM tasks") == [
        ("from long ago", "slack:C1")
    ]
    # the top-level --db works too, and a second run has nothing to do
    code, out, err = await ducklm(tmp_path, "--db", str(path), "db", "migrate")
    assert code == 0, out + err
    assert f"already at v{SCHEMA_VERSION}" in out
    code, out, err = await ducklm(tmp_path, "db", "migrate", DUCKLM_DB=str(path))
    assert code == 0 and f"database {path}: already at v{SCHEMA_VERSION}" in out, out + err


async def test_migrate_a_fresh_postgres_database(tmp_path: Path, postgres_url: str) -> None:
    code, out, err = await ducklm(tmp_path, "db", "migrate", "--db", postgres_url)
    assert code == 0, out + err
    assert f"schema v0 -> v{SCHEMA_VERSION}" in out
    assert raw_rows(postgres_url, "SELECT max(version) FROM ducklm_schema") == [(SCHEMA_VERSION,)]
    async with await open_stores(postgres_url) as stores:  # the store finds it ready
        assert (await stores.tasks.create_task("hello")).task_id
    code, out, err = await ducklm(tmp_path, "db", "migrate", "--db", postgres_url)
    assert code == 0 and f"already at v{SCHEMA_VERSION}" in out, out + err


async def test_migrate_refuses_a_newer_sqlite_schema(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    async with await open_stores(path) as stores:
        await stores.tasks.create_task("from a newer DuckLM")
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = everything(str(path))
    code, out, err = await ducklm(tmp_path, "db", "migrate", "--db", str(path))
    assert code == 2, out + err
    assert f"schema version {SCHEMA_VERSION + 1}" in err and "upgrade DuckLM" in err
    assert "Traceback" not in err
    assert everything(str(path)) == before


async def test_migrate_refuses_a_newer_postgres_schema(tmp_path: Path, postgres_url: str) -> None:
    async with await open_stores(postgres_url) as stores:
        await stores.tasks.create_task("from a newer DuckLM")
    raw_execute(postgres_url, "UPDATE ducklm_schema SET version = ?", (SCHEMA_VERSION + 1,))
    before = everything(postgres_url)
    code, out, err = await ducklm(tmp_path, "db", "migrate", "--db", postgres_url)
    assert code == 2, out + err
    assert f"schema version {SCHEMA_VERSION + 1}" in err and "Traceback" not in err
    assert everything(postgres_url) == before


async def test_migrate_names_an_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://duck:secret-pw@127.0.0.1:{free_port()}/ducklm"
    code, out, err = await ducklm(tmp_path, "db", "migrate", "--db", url)
    assert code == 1, out + err
    assert err.startswith("Database error:") and "127.0.0.1" in err
    assert "secret-pw" not in err and "Traceback" not in err


async def test_help_texts(tmp_path: Path) -> None:
    code, out, _ = await ducklm(tmp_path, "--help")
    assert code == 0 and "db" in out and "migrate the schema" in out
    code, out, _ = await ducklm(tmp_path, "db", "copy", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "SOURCE TARGET" in flat and "--batch-size" in flat
    assert "a running bot is not supported during the copy" in flat
    assert "must hold no DuckLM data" in flat and "one transaction" in flat
    code, out, _ = await ducklm(tmp_path, "db", "migrate", "--help")
    assert code == 0 and "refused (exit 2)" in " ".join(out.split())
    code, _, err = await ducklm(tmp_path, "db")
    assert code == 2 and "ACTION" in err
