"""`ducklm db copy SOURCE TARGET` through the real CLI (a subprocess), between a
SQLite file made by the real runtime and a real PostgreSQL database (and back):
every row equal, the audit chains verified, the copy usable afterwards; and the
refusals, each leaving both sides exactly as they were."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runtime.factory import build_runtime
from runtime.store import open_stores
from runtime.store.copy import NOT_COPIED, TABLES
from runtime.store.migrations import SCHEMA_VERSION
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import FakeModelServer, Text
from tests.postgres import PostgresServer, is_postgres, raw_rows

NO_ACTIONS = directive()
# The columns SQLite declares per table, in order (what both backends hold).
ROOT = Path(__file__).resolve().parent.parent


async def ducklm(cwd: Path, *args: str, **settings: str) -> tuple[int, str, str]:
    """The real entry point in a subprocess, with none of the developer's settings
    (only `settings`, such as DUCKLM_DB=...)."""
    import os

    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DUCKLM_", "SLACK_", "MATRIX_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(settings)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env,
    )
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# -- an installation, made by the real runtime -------------------------------------


async def make_installation(
    tmp_path: Path, model_server: FakeModelServer, db: str
) -> dict[str, Any]:
    """Tasks with events (one completed after an approval, one waiting on a pending
    approval, one whose 'Always' made a rule), a schedule, deliveries, an inbox row,
    global events, shared state and a stopped replica: what a real bot leaves."""
    settings = make_settings(tmp_path, model_server.base_url, db=db)
    runtime = await build_runtime(settings, mcp=False)
    try:
        loop, approvals, stores = runtime.loop, runtime.approvals, runtime.stores
        model_server.reply(
            ACTION,
            Text(directive(shell("echo looked"), shell("touch made.txt", "the marker"))),
            Text(NO_ACTIONS),
            Text(directive(shell("touch second.txt"))),
            Text(directive(shell("touch third.txt"))),
            Text(NO_ACTIONS),
        )
        model_server.set_default(THINKER, Text("done, ducks in a row"))
        approved = await loop.run_chat("make the marker", requested_by="slack:U1")
        assert approved.status == "waiting_for_approval" and approved.pending_approval
        outcome = await approvals.decide(
            approved.pending_approval.approval_id, "approve", "slack:UAPPROVER"
        )
        assert outcome.taken
        done = await loop.continue_after_approval(
            approved.task_id, approved.pending_approval.approval_id
        )
        assert done.status == "completed"
        waiting = await loop.run_chat("make another", requested_by="slack:U2")
        assert waiting.status == "waiting_for_approval"
        always = await loop.run_chat("and a third", requested_by="slack:U1")
        assert always.status == "waiting_for_approval" and always.pending_approval
        assert (
            await approvals.decide(always.pending_approval.approval_id, "always", "slack:UADMIN")
        ).taken
        await loop.continue_after_approval(always.task_id, always.pending_approval.approval_id)
        rule = await approvals.add_rule(SHELL, "prefix", "uptime", "cli:ops", lifetime=3600)
        await approvals.revoke_rule(rule.rule_id, "cli:ops")  # revoked rules are history too
        schedule = await stores.schedules.insert(
            "0 9 * * 1-5", "Europe/Berlin", "morning report", "slack:C1", "slack:UADMIN"
        )
        assert await stores.deliveries.claim("slack:event:Ev01")
        assert await stores.deliveries.claim("matrix:$event01")
        inbox = await stores.inbox.insert(
            "slack:C1|1700000000.000100",
            "slack:U3",
            "hello there \u00e9\U0001f986",
            deliveries=["slack:event:Ev02"],
            message_id="1700000000.000100",
            owner="someone",
        )
        await stores.state.put("matrix:sync_token", "s72594_4483_1934")
        await stores.replicas.register("old-host-1-abc", "old-host", "old-host", 4242)
        await stores.replicas.stop("old-host-1-abc")
        await stores.leases.acquire("matrix-sync:@duck:example.org", "old-host-1-abc", 30)
        return {
            "tasks": [approved.task_id, waiting.task_id, always.task_id],
            "pending": waiting.pending_approval.approval_id if waiting.pending_approval else None,
            "schedule": schedule.schedule_id,
            "inbox": inbox.inbox_id,
        }
    finally:
        await runtime.close()


SHELL = "shell_exec_safe"


def declared_columns(table: str) -> list[str]:
    """The columns of the current schema, as SQLite declares them (a scratch file)."""
    return _COLUMNS[table]


def _schema_columns() -> dict[str, list[str]]:
    import tempfile

    async def make(path: str) -> None:
        async with await open_stores(path):
            pass

    with tempfile.TemporaryDirectory() as scratch:
        path = str(Path(scratch) / "schema.db")
        asyncio.run(make(path))
        with sqlite3.connect(path) as conn:
            return {
                t.name: [r[1] for r in conn.execute(f'PRAGMA table_info("{t.name}")')]
                for t in TABLES
            }


_COLUMNS = _schema_columns()


def dump(target: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every copied table's rows, all declared columns, in primary-key order."""
    out = {}
    for table in TABLES:
        columns = ", ".join(f'"{c}"' for c in declared_columns(table.name))
        out[table.name] = raw_rows(
            target, f"SELECT {columns} FROM {table.name} ORDER BY {table.key}"
        )
    return out


def everything(target: str) -> dict[str, Any]:
    """Both sides' whole state for 'nothing changed': every DuckLM table, the
    version, and (SQLite) whether the file exists at all."""
    if not is_postgres(target) and not Path(target).exists():
        return {"exists": False}
    if is_postgres(target):
        try:
            tables = {
                r[0]
                for r in raw_rows(
                    target,
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema()",
                )
            }
        except Exception as exc:  # a URL the test made unreachable on purpose
            return {"unreachable": type(exc).__name__}
    else:
        tables = {
            r[0] for r in raw_rows(target, "SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    state: dict[str, Any] = {"tables": sorted(tables)}
    for name in sorted(tables & ({t.name for t in TABLES} | set(NOT_COPIED) | {"ducklm_schema"})):
        state[name] = sorted(map(repr, raw_rows(target, f"SELECT * FROM {name}")))
    if not is_postgres(target):
        state["user_version"] = raw_rows(target, "PRAGMA user_version")
    return state


async def audit_ok(cwd: Path, target: str) -> str:
    code, out, err = await ducklm(cwd, "--db", target, "audit", "verify")
    assert code == 0, out + err
    assert "verified" in out
    return out


# -- the copy ----------------------------------------------------------------------


async def test_sqlite_to_postgres_and_back(
    tmp_path: Path, model_server: FakeModelServer, postgres_url: str
) -> None:
    source = str(tmp_path / "ducklm.db")
    made = await make_installation(tmp_path, model_server, source)
    url = postgres_url
    before = dump(source)
    assert all(
        before[t]
        for t in (
            "tasks",
            "events",
            "approvals",
            "rules",
            "schedules",
            "deliveries",
            "inbox",
            "shared_state",
        )
    )

    code, out, err = await ducklm(tmp_path, "db", "copy", source, url, "--batch-size", "3")
    assert code == 0, out + err
    # progress per table on stderr, the report on stdout
    assert "events: copying" in err and "events: " in err and "copied" in err
    for table in before:
        n = len(before[table])
        assert f"{table}: {n} in source, {n} in target, equal" in out
    assert "audit verify on target:" in out and "verified" in out
    assert dump(url) == before
    # SQLite's implicit rowid (the store's tie-break order) came along
    assert raw_rows(url, "SELECT task_id, rowid FROM tasks ORDER BY task_id") == raw_rows(
        source, "SELECT task_id, rowid FROM tasks ORDER BY task_id"
    )
    assert not raw_rows(url, "SELECT * FROM replicas") and not raw_rows(url, "SELECT * FROM leases")
    await audit_ok(tmp_path, url)

    # The copy is a working installation: the chain and the sequences go on.
    async with await open_stores(url) as stores:
        task_id = made["tasks"][0]
        last = (await stores.events.list_events(task_id))[-1]
        event = await stores.events.append(task_id, "note", {"after": "the move"})
        assert event.seq == last.seq + 1
        glob = await stores.events.append(None, "rule_created", {"after": "the move"})
        assert glob.seq > 0
        new = await stores.tasks.create_task("after the move", requested_by="slack:U9")
        await stores.events.append(new.task_id, "task_created", {})
        pending = await stores.approvals.get(made["pending"])
        assert pending is not None and pending.decision is None
        ids = raw_rows(url, "SELECT max(id) FROM events")[0][0]
        assert ids == raw_rows(source, "SELECT max(id) FROM events")[0][0] + 3
    from runtime.approvals import ApprovalService

    async with await open_stores(url) as stores:
        rule = await ApprovalService.from_stores(stores).add_rule(
            SHELL, "exact", "df -h", "cli:ops"
        )
        assert rule.rule_id
    await audit_ok(tmp_path, url)

    # ... and back: PostgreSQL -> a new SQLite file holds the same rows again.
    back = str(tmp_path / "back.db")
    code, out, err = await ducklm(tmp_path, "db", "copy", url, back)
    assert code == 0, out + err
    assert dump(back) == dump(url)
    await audit_ok(tmp_path, back)


async def test_sqlite_to_sqlite_many_batches(tmp_path: Path) -> None:
    """More rows than a batch and than one INSERT's parameters, in key order."""
    source = str(tmp_path / "big.db")
    async with await open_stores(source) as stores:
        for n in range(30):
            task = await stores.tasks.create_task(f"task {n}")
            await stores.events.append_many(task.task_id, [("note", {"n": k}) for k in range(50)])
    code, out, err = await ducklm(
        tmp_path, "db", "copy", source, str(tmp_path / "copy.db"), "--batch-size", "700"
    )
    assert code == 0, out + err
    assert "events: 1500 in source, 1500 in target, equal" in out
    assert "events: 1500/1500 copied" in err
    assert dump(str(tmp_path / "copy.db")) == dump(source)
    assert "1500 events in 30 chain(s): verified" in out


# -- refusals: nothing changes on either side -------------------------------------


async def refused(cwd: Path, source: str, target: str, *expect: str, code: int = 1) -> str:
    sides = everything(source), everything(target)
    got, out, err = await ducklm(cwd, "db", "copy", source, target)
    assert got == code, out + err
    assert "Traceback" not in err
    for text in expect:
        assert text in err
    assert (everything(source), everything(target)) == sides
    return err


async def test_refuses_a_target_holding_data(tmp_path: Path, postgres_url: str) -> None:
    source = str(tmp_path / "a.db")
    async with await open_stores(source) as stores:
        await stores.tasks.create_task("mine")
    url = postgres_url
    async with await open_stores(url) as stores:
        await stores.deliveries.claim("slack:event:Ev9")  # any DuckLM row at all
    await refused(tmp_path, source, url, "already holds DuckLM data", "deliveries")
    # a SQLite target likewise
    other = str(tmp_path / "b.db")
    async with await open_stores(other) as stores:
        await stores.tasks.create_task("theirs")
    await refused(tmp_path, source, other, "already holds DuckLM data (in tasks)")


async def test_refuses_a_newer_source(tmp_path: Path, postgres_url: str) -> None:
    source = str(tmp_path / "newer.db")
    async with await open_stores(source) as stores:
        await stores.tasks.create_task("from the future")
    with sqlite3.connect(source) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    url = postgres_url
    await refused(
        tmp_path, source, url, f"schema version {SCHEMA_VERSION + 1}", "upgrade DuckLM", code=2
    )


async def test_refuses_a_missing_source(tmp_path: Path, postgres_url: str) -> None:
    url = postgres_url
    await refused(tmp_path, str(tmp_path / "nothing.db"), url, "does not exist")
    await refused(tmp_path, str(tmp_path / "nothing.db"), str(tmp_path / "t.db"), "does not exist")


async def test_refuses_a_running_bot(tmp_path: Path) -> None:
    source = str(tmp_path / "live.db")
    async with await open_stores(source) as stores:
        await stores.tasks.create_task("busy")
        await stores.replicas.register("web-1-77-f00", "web-1", "web-1", 77)
    await refused(tmp_path, source, str(tmp_path / "t.db"), "a bot is running", "web-1-77-f00")


async def test_bad_urls_are_one_sentence(tmp_path: Path, postgres_server: PostgresServer) -> None:
    source = str(tmp_path / "a.db")
    async with await open_stores(source) as stores:
        await stores.tasks.create_task("mine")
    closed = f"postgresql://duck:secret-pw@127.0.0.1:{free_port()}/ducklm"
    err = await refused(tmp_path, source, closed)
    assert "secret-pw" not in err and "Database error" in err
    missing = postgres_server.url("no_such_database_here")
    err = await refused(tmp_path, source, missing)
    assert "no_such_database_here" in err


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_an_older_source_is_migrated_first(tmp_path: Path) -> None:
    from runtime.store.migrations import MIGRATIONS, Dialects

    source = tmp_path / "v6.db"
    with sqlite3.connect(source) as conn:
        for statements in MIGRATIONS[:6]:
            for statement in statements:
                conn.execute(statement.sqlite if isinstance(statement, Dialects) else statement)
        conn.execute(
            "INSERT INTO tasks (task_id, message, status, created_at, updated_at) "
            "VALUES ('t-old', 'from v6', 'completed', ?, ?)",
            (time.time(), time.time()),
        )
        conn.execute("PRAGMA user_version = 6")
    code, out, err = await ducklm(tmp_path, "db", "copy", str(source), str(tmp_path / "new.db"))
    assert code == 0, out + err
    assert f"source migrated first: schema v6 -> v{SCHEMA_VERSION}" in err
    assert "tasks: 1 in source, 1 in target, equal" in out
    assert raw_rows(str(tmp_path / "new.db"), "SELECT message FROM tasks") == [("from v6",)]


async def test_a_failure_half_way_leaves_the_target_empty(
    tmp_path: Path, postgres_url: str
) -> None:
    """SQLite keeps any value in any column; PostgreSQL refuses one that does not
    fit. The tasks and events before it were already inserted: all rolled back."""
    source = str(tmp_path / "odd.db")
    async with await open_stores(source) as stores:
        for n in range(5):
            task = await stores.tasks.create_task(f"task {n}")
            await stores.events.append(task.task_id, "note", {"n": n})
        await stores.schedules.insert("0 9 * * *", "UTC", "report", "slack:C1", "slack:U1")
    with sqlite3.connect(source) as conn:
        conn.execute("UPDATE schedules SET paused = 'sometimes'")  # a hand edit
    before = everything(source)
    code, out, err = await ducklm(tmp_path, "db", "copy", source, postgres_url, "--batch-size", "2")
    assert code == 1, out + err
    assert "Traceback" not in err
    assert "copying schedules" in err and "the target keeps none" in err
    assert "tasks: 5/5 copied" in err  # it did get that far
    for table in TABLES:
        assert raw_rows(postgres_url, f"SELECT count(*) FROM {table.name}") == [(0,)]
    assert raw_rows(postgres_url, "SELECT version FROM ducklm_schema") == [(SCHEMA_VERSION,)]
    assert everything(source) == before


PASSWORD_ROLE = "ducklm_pw"
HBA_LINE = f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"


@pytest.fixture
def password_url(postgres_server: PostgresServer, postgres_url: str) -> str:
    """postgres_url for a role whose password the server checks: the fixture's
    server trusts every connection, so this session's server gets one
    pg_hba line (first, for this role only) and a reload; other roles keep trust."""
    hba = postgres_server.data / "pg_hba.conf"
    text = hba.read_text()
    if HBA_LINE not in text:
        hba.write_text(HBA_LINE + text)
        postgres_server.admin_query("SELECT pg_reload_conf()")
    if not postgres_server.admin_query(
        "SELECT 1 FROM pg_roles WHERE rolname = ?", (PASSWORD_ROLE,)
    ):
        postgres_server.admin_query(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'right-pw'")
    database = postgres_url.rsplit("/", 1)[1]
    postgres_server.admin_query(f'ALTER DATABASE "{database}" OWNER TO {PASSWORD_ROLE}')
    return f"postgresql://{PASSWORD_ROLE}:right-pw@127.0.0.1:{postgres_server.port}/{database}"


async def test_a_wrong_password_is_one_sentence(tmp_path: Path, password_url: str) -> None:
    source = str(tmp_path / "a.db")
    async with await open_stores(source) as stores:
        await stores.tasks.create_task("mine")
    wrong = password_url.replace(":right-pw@", ":wrong-pw@")
    err = await refused(tmp_path, source, wrong, "Database error")
    assert "wrong-pw" not in err and "right-pw" not in err
    assert "password" in err.lower()
    assert everything(password_url) == {"tables": []}  # still nothing in it
    # the right one works (and proves the role could write there)
    code, out, err = await ducklm(tmp_path, "db", "copy", source, password_url)
    assert code == 0, out + err
    assert "right-pw" not in out + err


@pytest.mark.backends("sqlite", "postgres")
async def test_every_table_is_copied_or_said_why_not(db_target: str) -> None:
    """A migration that adds a table must decide here whether `db copy` takes it
    (copy.py refuses to run while it does not know one)."""
    from runtime.store.copy import VERSION_TABLES, schema_tables, table_names, unknown_tables

    async with await open_stores(db_target) as stores:
        present = await table_names(stores.db)
    assert present == {t.name for t in TABLES} | set(NOT_COPIED) | (
        VERSION_TABLES if is_postgres(db_target) else set()
    )
    # What copy.py reads from the migrations' SQL as DuckLM's is what they made.
    assert schema_tables() == present - VERSION_TABLES and not unknown_tables()


async def test_a_source_that_does_not_verify_is_copied_as_it_is(tmp_path: Path) -> None:
    """The copy is faithful, broken chains included (an edit made before the move
    stays provable after it); the report says so, and names the event."""
    source = str(tmp_path / "edited.db")
    async with await open_stores(source) as stores:
        task = await stores.tasks.create_task("edited later")
        await stores.events.append_many(task.task_id, [("note", {"n": n}) for n in range(3)])
    with sqlite3.connect(source) as conn:
        conn.execute("UPDATE events SET payload = '{\"n\": 99}' WHERE seq = 2")
    target = str(tmp_path / "copy.db")
    code, out, err = await ducklm(tmp_path, "db", "copy", source, target)
    assert code == 0, out + err
    assert "1 chain(s) do not verify, exactly as in the source" in out
    assert f"FAILED: task {task.task_id}, event 2" in out
    assert dump(target) == dump(source)


async def test_postgres_to_postgres(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """Moving between two PostgreSQL databases: the rowid identities come along
    and their sequences go on past them."""
    async with await open_stores(postgres_url) as stores:
        for n in range(5):
            task = await stores.tasks.create_task(f"task {n}")
            await stores.events.append(task.task_id, "note", {"n": n})
    name = postgres_server.create_database("copy")
    try:
        target = postgres_server.url(name)
        code, out, err = await ducklm(tmp_path, "db", "copy", postgres_url, target)
        assert code == 0, out + err
        assert dump(target) == dump(postgres_url)
        rowids = "SELECT task_id, rowid FROM tasks ORDER BY task_id"
        assert raw_rows(target, rowids) == raw_rows(postgres_url, rowids)
        async with await open_stores(target) as stores:
            await stores.tasks.create_task("next")
        assert raw_rows(target, "SELECT max(rowid) FROM tasks") == [
            (raw_rows(postgres_url, "SELECT max(rowid) FROM tasks")[0][0] + 1,)
        ]
    finally:
        postgres_server.drop_database(name)


# -- a database shared with another application -------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def blank_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A target with nothing of DuckLM's in it yet: a new SQLite path, or an empty
    PostgreSQL database (schema version 0, unlike blank_target's)."""
    if request.param == "sqlite":
        return str(tmp_path / "target.db")
    return str(request.getfixturevalue("postgres_url"))


async def _small_installation(path: str) -> None:
    async with await open_stores(path) as stores:
        for n in range(3):
            task = await stores.tasks.create_task(f"task {n}")
            await stores.events.append_many(task.task_id, [("note", {"n": k}) for k in range(4)])
        await stores.events.append(None, "rule_created", {"n": 0})


async def test_a_target_shared_with_another_applications_tables_works(
    tmp_path: Path, blank_target: str
) -> None:
    """Another application's tables in the target (its schema, or its SQLite
    file) neither refuse the copy nor are touched by it."""
    source = str(tmp_path / "source.db")
    await _small_installation(source)
    from tests.postgres import raw_execute

    raw_execute(blank_target, "CREATE TABLE crm_customers (id INTEGER PRIMARY KEY, name TEXT)")
    raw_execute(blank_target, "INSERT INTO crm_customers (id, name) VALUES (1, 'Ada'), (2, 'Bo')")
    code, out, err = await ducklm(tmp_path, "db", "copy", source, blank_target)
    assert code == 0, out + err
    assert "tasks: 3 in source, 3 in target, equal" in out
    assert dump(blank_target) == dump(source)
    assert raw_rows(blank_target, "SELECT id, name FROM crm_customers ORDER BY id") == [
        (1, "Ada"),
        (2, "Bo"),
    ]
    await audit_ok(tmp_path, blank_target)


async def test_refuses_a_target_with_a_table_of_ducklm_s_name_before_migrating_it(
    tmp_path: Path, blank_target: str
) -> None:
    """Another application's empty `tasks` table: DuckLM's migration would fail on
    it (or worse, use it), so the copy refuses while the target is untouched."""
    source = str(tmp_path / "source.db")
    await _small_installation(source)
    from tests.postgres import raw_execute

    raw_execute(blank_target, "CREATE TABLE tasks (ticket INTEGER PRIMARY KEY)")
    raw_execute(blank_target, "CREATE TABLE crm_customers (id INTEGER PRIMARY KEY)")
    await refused(tmp_path, source, blank_target, "tasks", "not DuckLM's")
    assert {t[0] for t in _tables(blank_target)} == {"tasks", "crm_customers"}


def _tables(target: str) -> list[tuple[Any, ...]]:
    if is_postgres(target):
        return raw_rows(
            target,
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema()",
        )
    return raw_rows(target, "SELECT name FROM sqlite_master WHERE type = 'table'")


async def test_another_applications_tables_in_the_source_are_left_behind(tmp_path: Path) -> None:
    source = str(tmp_path / "source.db")
    await _small_installation(source)
    with sqlite3.connect(source) as conn:
        conn.execute("CREATE TABLE crm_customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO crm_customers VALUES (1, 'Ada')")
    target = str(tmp_path / "copy.db")
    code, out, err = await ducklm(tmp_path, "db", "copy", source, target)
    assert code == 0, out + err
    assert "crm_customers" in err and "not copied" in err
    assert dump(target) == dump(source)
    assert "crm_customers" not in {t[0] for t in _tables(target)}
    assert raw_rows(source, "SELECT name FROM crm_customers") == [("Ada",)]
