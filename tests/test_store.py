"""The store through its public API: schema, concurrency, errors, records.

Every test runs on SQLite and on PostgreSQL (`[sqlite]`/`[postgres]`) except those
about the SQLite file itself (its pragmas, WAL, write lock, header, directory), which
say so; where the same property has a PostgreSQL form (a newer schema refused,
processes migrating a fresh database at once) it is tested there too. A bad URL's
errors (nothing listening, no such database, a refused login, never the password)
are tests/test_store_postgres.py's."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from runtime.store import Database, StoreError, Stores, open_stores
from runtime.store.migrations import SCHEMA_VERSION
from tests.postgres import PostgresServer, is_postgres, raw_execute, raw_rows

pytestmark = pytest.mark.backends("sqlite", "postgres")
SQLITE_FILE = "about the SQLite file itself"


def sqlite_only(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.backends("sqlite", reason=reason)


def _readonly(path: Path) -> Iterator[Path]:
    """Make `path` (a directory) read-only even for root, or skip."""
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK):  # root ignores permission bits
        chattr = shutil.which("chattr")
        done = chattr and subprocess.run([chattr, "+i", str(path)], capture_output=True)
        if not done or done.returncode != 0:
            path.chmod(0o755)
            pytest.skip("cannot make a read-only directory here")
        immutable = True
    try:
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "ro"
    directory.mkdir()
    yield from _readonly(directory)


# -- opening and migrations ----------------------------------------------------


async def test_migrations_create_schema_and_reopen_is_idempotent(
    tmp_path: Path, db_backend: str, request: pytest.FixtureRequest
) -> None:
    # PostgreSQL: an empty database (db_target's already has the schema).
    if db_backend == "postgres":
        path: str | Path = request.getfixturevalue("postgres_url")
    else:
        path = tmp_path / "nested" / "dir" / "duck.db"
    async with await open_stores(path) as s:  # (a file's parents are created)
        assert await s.db.user_version() == SCHEMA_VERSION
        task = await s.tasks.create_task("hello")
        await s.events.append(task.task_id, "task_created", {"message": "hello"})

    async with await open_stores(path) as s:
        assert await s.db.user_version() == SCHEMA_VERSION
        if s.db.dialect == "postgres":  # the catalogue differs; the names must not
            rows = await s.db.fetchall(
                "SELECT tablename AS name FROM pg_tables WHERE schemaname = current_schema() "
                "UNION SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            )
        else:
            rows = await s.db.fetchall("SELECT type, name FROM sqlite_master")
        names = {row["name"] for row in rows}
        assert {"tasks", "events", "approvals", "rules"} <= names
        assert {
            "events_task_seq",
            "events_global_seq",
            "events_type",
            "approvals_pending",
            "tasks_created_at",
            "tasks_conversation",
        } <= names
        assert (await s.tasks.get_task(task.task_id)) == task
        assert [e.seq for e in await s.events.list_events(task.task_id)] == [1]


@sqlite_only("SQLite pragmas")
async def test_connection_settings(stores: Stores) -> None:
    async def pragma(name: str) -> object:
        row = await stores.db.fetchone(f"PRAGMA {name}")
        assert row is not None
        return row[0]

    assert await pragma("journal_mode") == "wal"
    assert await pragma("foreign_keys") == 1
    assert await pragma("synchronous") == 1  # NORMAL
    # Waits for the write lock happen in asyncio (see test_waiting_for_the_write_lock…),
    # and checkpoints in a worker thread, so SQLite itself never blocks the loop.
    assert await pragma("busy_timeout") == 0
    assert await pragma("wal_autocheckpoint") == 0


async def test_processes_opening_a_fresh_file_together(
    tmp_path: Path, db_backend: str, request: pytest.FixtureRequest
) -> None:
    # The bot and a CLI (or several replicas) may start at the same moment on a
    # database none has set up.
    server: PostgresServer | None = None
    if db_backend == "postgres":
        server = request.getfixturevalue("postgres_server")
    for attempt in range(20 if server is None else 4):
        if server is None:
            path = str(tmp_path / f"fresh{attempt}.db")
        else:
            name = server.create_database("fresh")
            request.addfinalizer(lambda name=name: server.drop_database(name))
            path = server.url(name)
        opened = await asyncio.gather(*(open_stores(path) for _ in range(6)))
        for s in opened:
            assert await s.db.user_version() == SCHEMA_VERSION
            await s.close()


async def test_newer_schema_version_is_refused(db_target: str) -> None:
    path = db_target
    db = await Database.open(path)  # create and migrate
    shown = db.path
    await db.close()
    if is_postgres(path):
        from runtime.store.pg_baseline import VERSION_TABLE

        raw_execute(path, f"UPDATE {VERSION_TABLE} SET version = ?", [SCHEMA_VERSION + 1])
        tables = "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
    else:
        with sqlite3.connect(path) as raw:
            raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        tables = "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
    before = raw_rows(path, tables)
    with pytest.raises(StoreError) as info:
        await Database.open(path)
    assert raw_rows(path, tables) == before  # refused before changing anything
    message = str(info.value)
    assert str(shown) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert "upgrade DuckLM" in message


@sqlite_only(SQLITE_FILE)
async def test_new_database_in_readonly_directory(readonly_dir: Path) -> None:
    path = readonly_dir / "duck.db"
    with pytest.raises(StoreError) as info:
        await Database.open(path)
    assert str(readonly_dir) in str(info.value)
    assert "not writable" in str(info.value)


@sqlite_only(SQLITE_FILE)
async def test_existing_database_in_directory_made_readonly(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    path = directory / "duck.db"
    db = await Database.open(path)
    await db.close()
    for _ in _readonly(directory):
        with pytest.raises(StoreError) as info:
            await Database.open(path)
        assert str(path) in str(info.value)


@sqlite_only(SQLITE_FILE)
async def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a database\n" * 100)
    with pytest.raises(StoreError) as info:
        await Database.open(path)
    assert str(path) in str(info.value)
    assert "not a SQLite database" in str(info.value)
    assert path.read_text().startswith("this is not")  # untouched


@sqlite_only(SQLITE_FILE)
async def test_corrupt_file_with_sqlite_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "duck.db"
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    with pytest.raises(StoreError) as info:
        await Database.open(path)
    assert str(path) in str(info.value)


@sqlite_only(SQLITE_FILE)
async def test_directory_or_file_in_the_way(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        await Database.open(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the directory"):
        await Database.open(blocker / "duck.db")


@sqlite_only("max_page_count is SQLite's; a full disk on a PostgreSQL server is not ours to fill")
async def test_disk_full_is_a_store_error(stores: Stores) -> None:
    # max_page_count makes SQLite report SQLITE_FULL exactly as a full disk does.
    row = await stores.db.fetchone("PRAGMA page_count")
    assert row is not None
    await stores.db.fetchall(f"PRAGMA max_page_count = {row[0] + 2}")
    task = await stores.tasks.create_task("fill")
    with pytest.raises(StoreError, match="disk is full"):
        for _ in range(1000):
            await stores.events.append(task.task_id, "blob", {"data": "x" * 4000})


async def test_closed_database_is_a_store_error(db_target: str) -> None:
    s = await open_stores(db_target)
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await s.tasks.create_task("late")


# -- events --------------------------------------------------------------------


async def test_concurrent_appends_keep_per_task_sequences(stores: Stores) -> None:
    tasks = [await stores.tasks.create_task(f"q{i}") for i in range(50)]

    async def writer(task_id: str) -> None:
        for n in range(20):
            await stores.events.append(task_id, "step", {"n": n})
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(t.task_id) for t in tasks))
    for task in tasks:
        events = await stores.events.list_events(task.task_id)
        assert [e.seq for e in events] == list(range(1, 21))
        assert [e.payload["n"] for e in events] == list(range(20))


async def test_two_connections_append_to_the_same_tasks(db_target: str) -> None:
    path = db_target
    first = await open_stores(path)
    second = await open_stores(path)  # another process's connection
    try:
        tasks = [await first.tasks.create_task(f"q{i}") for i in range(5)]

        async def writer(s: Stores, who: str) -> None:
            for n in range(40):
                await s.events.append(tasks[n % 5].task_id, "step", {"who": who, "n": n})

        await asyncio.gather(
            *(writer(s, f"{s is first}-{k}") for s in (first, second) for k in range(3))
        )
        for task in tasks:
            events = await second.events.list_events(task.task_id)
            assert [e.seq for e in events] == list(range(1, 6 * 8 + 1))
    finally:
        await first.close()
        await second.close()


async def test_a_second_process_appends_concurrently(db_target: str) -> None:
    path = db_target
    async with await open_stores(path) as s:
        task = await s.tasks.create_task("shared")
        script = textwrap.dedent(
            f"""
            import asyncio
            from runtime.store import open_stores

            async def main():
                async with await open_stores({str(path)!r}) as s:
                    for n in range(150):
                        await s.events.append({task.task_id!r}, "other", {{"n": n}})
                        await s.events.append(None, "global_other", {{"n": n}})

            asyncio.run(main())
            """
        )
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
        for n in range(150):
            await s.events.append(task.task_id, "ours", {"n": n})
            await s.events.append(None, "global_ours", {"n": n})
            await asyncio.sleep(0)
        assert await proc.wait() == 0
        events = await s.events.list_events(task.task_id)
        assert [e.seq for e in events] == list(range(1, 301))
        assert sum(e.event_type == "other" for e in events) == 150
        assert [e.seq for e in await s.events.list_events(None)] == list(range(1, 301))


async def test_global_events_have_their_own_sequence(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    await stores.events.append(task.task_id, "a")
    first = await stores.events.append(None, "rule_created", {"rule_id": "r-1"})
    second = await stores.events.append(None, "rule_revoked", {"rule_id": "r-1"})
    assert (first.task_id, first.seq, second.seq) == (None, 1, 2)
    assert [e.event_type for e in await stores.events.list_events(None)] == [
        "rule_created",
        "rule_revoked",
    ]
    assert [e.seq for e in await stores.events.list_events(task.task_id)] == [1]


async def test_event_fields_and_list_by_type(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    before = datetime.now(UTC)
    appended = [await stores.events.append(task.task_id, "tick", {"n": n}) for n in range(5)]
    await stores.events.append(task.task_id, "other")
    assert appended[0].created_at.tzinfo is not None
    assert abs(appended[0].created_at - before) < timedelta(seconds=5)
    assert appended[0].payload == {"n": 0}
    latest = await stores.events.list_by_type("tick", limit=3)
    assert [e.payload["n"] for e in latest] == [4, 3, 2]
    assert latest[0] == appended[4]
    assert (await stores.events.append(task.task_id, "empty")).payload == {}


class BadStr:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


async def test_unencodable_payloads_do_not_crash(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    circular: dict = {}
    circular["self"] = circular
    odd = [
        {"when": datetime(2024, 1, 2, tzinfo=UTC), "path": Path("/tmp"), "s": {1}},
        circular,
        {("tuple", "key"): 1},
        {"surrogate": "\ud800 lone"},
        {"text": "ünïcødé ✓"},
        {"bad": BadStr()},
    ]
    for payload in odd:
        event = await stores.events.append(task.task_id, "odd", payload)
        assert isinstance(event.payload, dict)
    events = await stores.events.list_events(task.task_id)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[0].payload["when"].startswith("2024-01-02")
    assert "unencodable" in events[1].payload
    assert events[3].payload["surrogate"] == "\ud800 lone"
    assert events[4].payload["text"] == "ünïcødé ✓"
    assert "RuntimeError" in events[5].payload["error"]


async def test_event_for_unknown_task_is_a_store_error(stores: Stores) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await stores.events.append("no-such-task", "x")


# -- tasks ---------------------------------------------------------------------


async def test_task_round_trip_with_history(stores: Stores) -> None:
    history = [
        {"role": "user", "content": "is web-1 up?"},
        {"role": "assistant", "content": "yes — ✓"},
    ]
    task = await stores.tasks.create_task(
        "why is web-1 slow?",
        "/srv/work",
        True,
        conversation="slack:C1:1700.1",
        requested_by="slack:U1",
        history_messages=history,
    )
    loaded = await stores.tasks.get_task(task.task_id)
    assert loaded == task
    assert loaded.history_messages == history
    assert (loaded.workspace, loaded.debug, loaded.status) == ("/srv/work", True, "running")
    assert loaded.created_at.tzinfo is not None
    assert len(task.task_id) == 32
    assert await stores.tasks.get_task("missing") is None


async def test_status_transitions(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    assert await stores.tasks.waiting_for_approval(task.task_id)
    assert (await stores.tasks.get_task(task.task_id)).status == "waiting_for_approval"
    assert await stores.tasks.complete_task(task.task_id, "the answer")
    done = await stores.tasks.get_task(task.task_id)
    assert (done.status, done.final_response) == ("completed", "the answer")
    assert done.updated_at >= done.created_at

    other = await stores.tasks.create_task("q2")
    await stores.tasks.fail_task(other.task_id, "boom")
    failed = await stores.tasks.get_task(other.task_id)
    assert (failed.status, failed.error) == ("failed", "boom")
    await stores.tasks.expire_task(other.task_id)
    assert (await stores.tasks.get_task(other.task_id)).status == "expired"

    assert not await stores.tasks.update_status("missing", "failed")
    with pytest.raises(ValueError):
        await stores.tasks.update_status(task.task_id, "bogus")


async def test_claim_status_is_compare_and_set(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    await stores.tasks.waiting_for_approval(task.task_id)
    results = await asyncio.gather(
        *(
            stores.tasks.claim_status(task.task_id, "waiting_for_approval", "running")
            for _ in range(20)
        )
    )
    assert results.count(True) == 1
    assert not await stores.tasks.claim_status(task.task_id, "waiting_for_approval", "running")


async def test_list_recent_and_by_conversation(stores: Stores) -> None:
    made = []
    for conversation in [
        "slack:C1:1",
        "slack:C1:2",
        "slack:c1:3",  # other case: not the same prefix
        "slack:C2:1",
        "matrix:!room:1",
        "slack:C1%:1",  # LIKE wildcards are plain characters here
        None,
    ]:
        made.append(await stores.tasks.create_task("q", conversation=conversation))
    await stores.tasks.complete_task(made[1].task_id, "ok")

    recent = await stores.tasks.list_recent(limit=3)
    assert [t.task_id for t in recent] == [t.task_id for t in made[::-1][:3]]

    c1 = await stores.tasks.list_recent(conversation_prefix="slack:C1:")
    assert [t.conversation for t in c1] == ["slack:C1:2", "slack:C1:1"]
    slack = await stores.tasks.list_recent(conversation_prefix="slack:")
    assert len(slack) == 5
    assert [
        t.conversation for t in await stores.tasks.list_recent(conversation_prefix="slack:C1%")
    ] == ["slack:C1%:1"]
    done = await stores.tasks.list_recent(conversation_prefix="slack:C1:", status="completed")
    assert [t.task_id for t in done] == [made[1].task_id]
    assert await stores.tasks.list_recent(status="failed") == []

    again = await stores.tasks.create_task("q2", conversation="slack:C1:1")
    by_conversation = await stores.tasks.list_by_conversation("slack:C1:1")
    assert [t.task_id for t in by_conversation] == [again.task_id, made[0].task_id]


async def test_channel_listing_matches_a_plain_prefix_filter(stores: Stores) -> None:
    conversations = [
        "slack:C1|1700.1",
        "slack:C1|1700.2",
        "slack:C1x|1700.3",  # another channel that starts the same
        "slack:C2|1700.1",
        "slack:C1",  # no thread part
        "slack:C1|1700.1|odd",
        "matrix:!r:hs|$e1",
        None,
    ]
    made = []
    for round_ in range(3):
        for conversation in conversations:
            made.append(await stores.tasks.create_task(f"q{round_}", conversation=conversation))
    await stores.tasks.complete_task(made[0].task_id, "ok")
    for prefix in ["slack:C1|", "slack:C1", "slack:C1|1700.1", "matrix:!r:hs|", "slack:", "|"]:
        for status in (None, "completed"):
            expected = [
                t.task_id
                for t in reversed(made)
                if t.conversation is not None
                and t.conversation.startswith(prefix)
                and (status is None or t.task_id == made[0].task_id)
            ][:5]
            listed = await stores.tasks.list_recent(5, conversation_prefix=prefix, status=status)
            assert [t.task_id for t in listed] == expected, (prefix, status)


@sqlite_only("SQLite's query plan (PostgreSQL's planner picks by statistics, not a rule)")
async def test_a_channel_listing_uses_its_index(stores: Stores) -> None:
    rows = await stores.db.fetchall(
        "EXPLAIN QUERY PLAN SELECT task_id FROM tasks WHERE conversation_group = ? "
        "ORDER BY created_at DESC, rowid DESC LIMIT 20",
        ("slack:C1",),
    )
    plan = " ".join(row["detail"] for row in rows)
    assert "tasks_conversation_group" in plan and "TEMP B-TREE" not in plan


@sqlite_only("a v3 SQLite file; PostgreSQL starts at the current schema")
async def test_migrating_a_v3_database_fills_the_conversation_group(tmp_path: Path) -> None:
    from runtime.store.migrations import MIGRATIONS

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:
        for statements in MIGRATIONS[:3]:
            for statement in statements:
                raw.execute(statement)
        for n, conversation in enumerate(["slack:C1|1", "slack:C2|1", "console:local", None]):
            raw.execute(
                "INSERT INTO tasks (task_id, message, status, conversation, created_at, "
                "updated_at) VALUES (?, 'q', 'completed', ?, ?, ?)",
                (f"t{n}", conversation, n, n),
            )
        raw.execute("PRAGMA user_version = 3")
    async with await open_stores(path) as s:
        assert await s.db.user_version() == SCHEMA_VERSION
        listed = await s.tasks.list_recent(conversation_prefix="slack:C1|")
        assert [t.task_id for t in listed] == ["t0"]
        groups = await s.db.fetchall("SELECT task_id, conversation_group FROM tasks ORDER BY 1")
        assert [tuple(row) for row in groups] == [
            ("t0", "slack:C1"),
            ("t1", "slack:C2"),
            ("t2", None),
            ("t3", None),
        ]


async def test_mark_interrupted(stores: Stores) -> None:
    running = [await stores.tasks.create_task(f"r{i}") for i in range(3)]
    waiting = await stores.tasks.create_task("w")
    await stores.tasks.waiting_for_approval(waiting.task_id)
    done = await stores.tasks.create_task("d")
    await stores.tasks.complete_task(done.task_id, "ok")

    interrupted = await stores.tasks.mark_interrupted()
    assert sorted(t.task_id for t in interrupted) == sorted(t.task_id for t in running)
    assert all(t.status == "interrupted" for t in interrupted)
    assert (await stores.tasks.get_task(waiting.task_id)).status == "waiting_for_approval"
    assert (await stores.tasks.get_task(done.task_id)).status == "completed"
    assert await stores.tasks.mark_interrupted() == []


# -- transactions ----------------------------------------------------------------


async def test_transaction_rolls_back_and_spares_other_tasks(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    inside = asyncio.Event()
    outsider_done = asyncio.Event()

    async def failing() -> None:
        async with stores.db.transaction():
            await stores.events.append(task.task_id, "doomed")
            inside.set()
            # Give the other task every chance to slip a statement in.
            for _ in range(20):
                await asyncio.sleep(0)
            raise RuntimeError("boom")

    async def outsider() -> None:
        await inside.wait()
        await stores.events.append(task.task_id, "kept")
        outsider_done.set()

    results = await asyncio.gather(failing(), outsider(), return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert outsider_done.is_set()
    events = await stores.events.list_events(task.task_id)
    assert [(e.seq, e.event_type) for e in events] == [(1, "kept")]


async def test_transaction_commits_and_nests(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    async with stores.db.transaction():
        await stores.events.append(task.task_id, "a")
        async with stores.db.transaction():
            await stores.events.append(task.task_id, "b")
    assert [e.event_type for e in await stores.events.list_events(task.task_id)] == ["a", "b"]


# -- approvals and rules (rows) --------------------------------------------------


async def test_approval_rows(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    action = {"tool": "read_file", "args": {"path": "a.txt"}, "reason": "look"}
    expires = datetime.now(UTC) + timedelta(hours=1)
    first = await stores.approvals.insert(task.task_id, action, index=2, expires_at=expires)
    second = await stores.approvals.insert(task.task_id, action, risk_level="high")
    assert (first.tool, first.index, first.action, first.decision) == ("read_file", 2, action, None)
    assert abs(first.expires_at - expires) < timedelta(milliseconds=1)
    assert [a.approval_id for a in await stores.approvals.list_pending()] == [
        first.approval_id,
        second.approval_id,
    ]

    assert not await stores.approvals.claim_execution(first.approval_id)  # undecided
    assert await stores.approvals.set_card_ref(first.approval_id, "slack:C1:1700.2")
    assert await stores.approvals.mark_reminded(first.approval_id)
    assert not await stores.approvals.mark_reminded(first.approval_id)

    assert await stores.approvals.decide(first.approval_id, "approve", "slack:U2", None)
    assert not await stores.approvals.decide(first.approval_id, "deny", "slack:U3", "no")
    assert await stores.approvals.claim_execution(first.approval_id)
    assert not await stores.approvals.claim_execution(first.approval_id)
    loaded = await stores.approvals.get(first.approval_id)
    assert (loaded.decision, loaded.decided_by, loaded.card_ref) == (
        "approve",
        "slack:U2",
        "slack:C1:1700.2",
    )
    assert loaded.executed_at is not None and loaded.reminded_at is not None

    assert await stores.approvals.decide(second.approval_id, "deny", "slack:U2", "too risky")
    assert not await stores.approvals.claim_execution(second.approval_id)
    assert not await stores.approvals.mark_reminded(second.approval_id)
    assert (await stores.approvals.get(second.approval_id)).decision_note == "too risky"
    assert await stores.approvals.list_pending() == []
    assert await stores.approvals.pending_for_task(task.task_id) == []
    assert await stores.approvals.get("missing") is None


async def test_rule_rows(stores: Stores) -> None:
    rule = await stores.rules.insert("read_file", "exact", '{"path": "a"}', "admin")
    assert rule.rule_id.startswith("r-") and len(rule.rule_id) == 10
    int(rule.rule_id[2:], 16)
    other = await stores.rules.insert("shell_exec_safe", "prefix", "git status", "admin", "ap1")
    assert other.source_approval_id == "ap1"
    assert await stores.rules.get(rule.rule_id) == rule
    assert [r.rule_id for r in await stores.rules.active_for_tool("read_file")] == [rule.rule_id]
    assert await stores.rules.revoke(rule.rule_id, "admin2")
    assert not await stores.rules.revoke(rule.rule_id, "admin3")
    assert not await stores.rules.revoke("r-00000000", "admin")
    assert await stores.rules.active_for_tool("read_file") == []
    assert [r.rule_id for r in await stores.rules.list()] == [other.rule_id]
    every = await stores.rules.list(include_revoked=True)
    assert [r.rule_id for r in every] == [rule.rule_id, other.rule_id]
    assert every[0].revoked_by == "admin2" and not every[0].active
    with pytest.raises(ValueError):
        await stores.rules.insert("x", "regex", ".*", "admin")


# -- inline statements, the write lock and background work ---------------------


class LockHolder:
    """Another connection (as another process's would) holding the write lock
    until told to let go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.locked = asyncio.Event()
        self.release = asyncio.Event()
        self._thread: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LockHolder:
        loop = asyncio.get_running_loop()

        def hold() -> None:
            other = sqlite3.connect(self.path, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("INSERT INTO deliveries (key, claimed_at) VALUES ('held', 0)")
                loop.call_soon_threadsafe(self.locked.set)
                asyncio.run_coroutine_threadsafe(self.release.wait(), loop).result(timeout=30)
                other.execute("COMMIT")
            finally:
                other.close()

        self._thread = asyncio.create_task(asyncio.to_thread(hold))
        await asyncio.wait_for(self.locked.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._thread is not None
        await asyncio.wait_for(self._thread, 10)


@sqlite_only(SQLITE_FILE)
async def test_waiting_for_the_write_lock_does_not_block_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "duck.db"
    async with await open_stores(path) as s:
        task = await s.tasks.create_task("q")
        async with LockHolder(path):
            append = asyncio.create_task(s.events.append(task.task_id, "while_locked"))
            claim = asyncio.create_task(s.deliveries.claim("during the wait"))
            ticks = 0
            for _ in range(20):  # the loop keeps running while both writes wait
                await asyncio.sleep(0.005)
                ticks += 1
            assert ticks == 20
            assert not append.done() and not claim.done()
            # Reads do not wait for the write lock in WAL mode.
            assert (await s.tasks.get_task(task.task_id)) is not None
        event = await asyncio.wait_for(append, 10)
        assert event.seq == 1
        assert await asyncio.wait_for(claim, 10) is True
        assert [e.event_type for e in await s.events.list_events(task.task_id)] == ["while_locked"]
        assert await s.deliveries.claim("held") is False  # the other connection's write landed


@sqlite_only(SQLITE_FILE)
async def test_a_lock_held_past_the_busy_timeout_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runtime.store.db.BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "duck.db"
    async with await open_stores(path) as s:
        task = await s.tasks.create_task("q")
        async with LockHolder(path):
            with pytest.raises(StoreError, match="stayed locked by another connection"):
                await s.events.append(task.task_id, "too late")
            with pytest.raises(StoreError, match="stayed locked"):
                async with s.db.transaction():
                    await s.events.append(task.task_id, "too late either")
        assert await s.events.list_events(task.task_id) == []
        assert (await s.events.append(task.task_id, "after")).seq == 1


@sqlite_only(SQLITE_FILE)
async def test_checkpoints_run_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Automatic checkpoints are off on the inline connection; the store starts one
    # in a worker thread after enough writes, which moves pages into the main file.
    monkeypatch.setattr("runtime.store.db.CHECKPOINT_EVERY_COMMITS", 20)
    path = tmp_path / "duck.db"
    async with await open_stores(path) as s:
        before = path.stat().st_size
        task = await s.tasks.create_task("q")
        for n in range(300):
            await s.events.append(task.task_id, "big", {"n": n, "data": "x" * 2000})
        for _ in range(500):
            if path.stat().st_size > before + 300 * 1000:
                break
            await asyncio.sleep(0.01)
        assert path.stat().st_size > before + 300 * 1000
        assert len(await s.events.list_events(task.task_id)) == 300


@sqlite_only(SQLITE_FILE)
async def test_an_explicit_checkpoint_and_close_leave_a_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "duck.db"
    s = await open_stores(path)
    task = await s.tasks.create_task("q")
    await s.events.append(task.task_id, "one")
    await s.db.checkpoint()
    await s.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM events").fetchone() == (1,)
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_retention_deletes_in_chunks_and_spares_unfinished_tasks(stores: Stores) -> None:
    from runtime.store.retention import CHUNK_TASKS, delete_finished_tasks

    finished = []
    for i in range(CHUNK_TASKS * 2 + 7):
        task = await stores.tasks.create_task(f"old {i}")
        await stores.events.append(task.task_id, "task_created")
        await stores.tasks.complete_task(task.task_id, "done")
        finished.append(task.task_id)
    running = await stores.tasks.create_task("still running")
    await stores.events.append(running.task_id, "task_created")
    # A cutoff in the future: every finished task is "old".
    assert await delete_finished_tasks(stores.db, -60) == len(finished)
    assert await stores.tasks.get_task(finished[0]) is None
    assert await stores.events.list_events(finished[-1]) == []
    assert await stores.tasks.get_task(running.task_id) is not None
    assert len(await stores.events.list_events(running.task_id)) == 1
    assert await delete_finished_tasks(stores.db, -60) == 0


async def test_background_work_on_a_closed_database_is_a_store_error(db_target: str) -> None:
    from runtime.store.retention import delete_finished_tasks

    s = await open_stores(db_target)
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await delete_finished_tasks(s.db, 0)


async def test_append_many_numbers_a_group_consecutively(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    await stores.events.append(task.task_id, "first")
    stamps = [1_700_000_000.0, 1_700_000_001.5]
    written = await stores.events.append_many(
        task.task_id, [("a", {"x": 1}), ("b", None)], at=stamps
    )
    assert [(e.seq, e.event_type, e.payload) for e in written] == [(2, "a", {"x": 1}), (3, "b", {})]
    stored = await stores.events.list_events(task.task_id)
    assert stored[1:] == written
    assert [e.created_at.timestamp() for e in stored[1:]] == stamps
    assert await stores.events.append_many(task.task_id, []) == []
    with pytest.raises(ValueError, match="one time per event"):
        await stores.events.append_many(task.task_id, [("c", {})], at=[])


async def test_append_many_splits_huge_groups_in_one_transaction(stores: Stores) -> None:
    from runtime.store.events import MAX_EVENTS_PER_STATEMENT

    task = await stores.tasks.create_task("q")
    count = MAX_EVENTS_PER_STATEMENT * 2 + 3
    written = await stores.events.append_many(
        task.task_id, [("step", {"n": n}) for n in range(count)]
    )
    assert [e.seq for e in written] == list(range(1, count + 1))
    stored = await stores.events.list_events(task.task_id)
    assert [e.payload["n"] for e in stored] == list(range(count))


async def test_append_many_is_all_or_nothing(stores: Stores) -> None:
    with pytest.raises(StoreError, match="task that does not exist"):
        await stores.events.append_many("no-such-task", [("a", {}), ("b", {})])
    assert await stores.events.list_events("no-such-task") == []


async def test_concurrent_groups_stay_contiguous(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")

    async def writer(who: str) -> None:
        for n in range(10):
            await stores.events.append_many(task.task_id, [(who, {"n": n}), (who, {"n": n})])
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(f"w{k}") for k in range(5)))
    events = await stores.events.list_events(task.task_id)
    assert [e.seq for e in events] == list(range(1, 101))
    for first, second in zip(events[::2], events[1::2], strict=True):
        assert (first.event_type, first.payload) == (second.event_type, second.payload)


def _size(path: Path) -> int:
    return path.stat().st_size


@sqlite_only(SQLITE_FILE)
async def test_the_wal_starts_over_under_a_steady_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A passive checkpoint beside a writer that never pauses does not catch up,
    # so the WAL never starts over and grows with every write (over 80 MB here).
    # The RESTART that follows a long WAL lets it start over; each start cuts
    # the file back to JOURNAL_SIZE_LIMIT, which is what this test watches.
    monkeypatch.setattr("runtime.store.db.CHECKPOINT_EVERY_COMMITS", 20)
    monkeypatch.setattr("runtime.store.db.RESTART_AFTER_FRAMES", 200)
    monkeypatch.setattr("runtime.store.db.JOURNAL_SIZE_LIMIT", 256 * 1024)
    path = tmp_path / "duck.db"
    wal = Path(f"{path}-wal")
    async with await open_stores(path) as s:
        task = await s.tasks.create_task("q")
        sizes = []
        for n in range(4000):
            await s.events.append(task.task_id, "step", {"n": n, "data": "x" * 3000})
            await asyncio.sleep(0)
            sizes.append(_size(wal))
        starts = sum(later < earlier for earlier, later in itertools.pairwise(sizes))
        assert starts >= 1, f"the WAL never started over; it reached {sizes[-1]} bytes"
        assert len(await s.events.list_events(task.task_id)) == 4000
