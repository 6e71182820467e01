"""The audit chain (issue #21): a real run verifies; editing, deleting or swapping
an event in the database directly (the SQLite file, or PostgreSQL's table) makes
`verify` name that event."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from bot.cli import main
from runtime.factory import Runtime
from runtime.store import open_stores
from runtime.store.audit import verify
from runtime.store.chain import GENESIS, canonical_event, link
from runtime.store.db import Database
from runtime.store.retention import delete_finished_tasks
from tests.conftest import ACTION, THINKER, directive, shell
from tests.fakes.openai_server import FakeModelServer, Text
from tests.postgres import is_postgres, raw_execute, raw_rows

pytestmark = pytest.mark.backends("sqlite", "postgres")

NO_ACTIONS = directive()


async def _approved_run(runtime: Runtime, model_server: FakeModelServer) -> str:
    """A task that asks for approval, is approved, runs a command and answers."""
    model_server.reply(ACTION, Text(directive(shell("touch chained.txt"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("made it"))
    waiting = await runtime.loop.run_chat("make the file", requested_by="console:alice")
    approval_id = waiting.pending_approval.approval_id  # type: ignore[union-attr]
    await runtime.approvals.decide(approval_id, "approve", "console:bob")
    done = await runtime.loop.continue_after_approval(waiting.task_id, approval_id)
    assert done.status == "completed"
    return waiting.task_id


def _copy(runtime: Runtime, tmp_path: Path, name: str) -> str:
    """Where to tamper: a consistent copy of the live SQLite file (WAL included), or
    on PostgreSQL the test's own database itself (fresh per test, nobody else's)."""
    if is_postgres(runtime.settings.db):
        return runtime.settings.db
    target = tmp_path / name
    with sqlite3.connect(runtime.settings.db) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return str(target)


async def _verify_file(target: str | Path, task_id: str | None = None):
    db = await Database.open(target)
    try:
        return await verify(db, task_id)
    finally:
        await db.close()


def _rows(target: str, task_id: str) -> list[tuple[int, int, str]]:
    return raw_rows(  # type: ignore[return-value]
        target, "SELECT id, seq, event_type FROM events WHERE task_id = ? ORDER BY seq", [task_id]
    )


async def test_a_real_run_verifies_and_every_hash_is_recomputable(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    task_id = await _approved_run(runtime, model_server)
    events = await runtime.stores.events.list_events(task_id)
    assert len(events) >= 8
    # Recomputed here from the stored rows alone, as an outside auditor would
    # (the float time as stored: a datetime rounds it to microseconds).
    rows = raw_rows(
        runtime.settings.db,
        "SELECT seq, event_type, payload, created_at, hash FROM events "
        "WHERE task_id = ? ORDER BY seq",
        [task_id],
    )
    assert [r[0] for r in rows] == [e.seq for e in events]
    prev = GENESIS
    for seq, event_type, payload, created_at, stored in rows:
        prev = link(
            prev, canonical_event(task_id, seq, event_type, json.loads(payload), created_at)
        )
        assert stored == prev
    assert [e.hash for e in events] == [r[4] for r in rows]
    result = await verify(runtime.stores.db, task_id)
    assert result.ok and result.events == len(events) and result.head == events[-1].hash
    whole = await verify(runtime.stores.db)
    assert whole.ok and whole.chains >= 1 and whole.events >= len(events)


async def test_an_edited_payload_is_named(
    runtime: Runtime, model_server: FakeModelServer, tmp_path: Path
) -> None:
    task_id = await _approved_run(runtime, model_server)
    copy = _copy(runtime, tmp_path, "edited.db")
    rows = _rows(copy, task_id)
    audit_id, audit_seq, _ = next(r for r in rows if r[2] == "command_audit")
    ((text,),) = raw_rows(copy, "SELECT payload FROM events WHERE id = ?", [audit_id])
    original = json.loads(text)
    payload = dict(original, approved_by="console:mallory")
    raw_execute(copy, "UPDATE events SET payload = ? WHERE id = ?", [json.dumps(payload), audit_id])
    result = await _verify_file(copy, task_id)
    assert not result.ok
    (failure,) = result.failures
    assert (failure.task_id, failure.seq) == (task_id, audit_seq)
    assert "command_audit" in failure.reason
    # Re-stored with the same meaning but other spacing still verifies: the hash is
    # over the canonical JSON, not the stored text.
    raw_execute(
        copy,
        "UPDATE events SET payload = ? WHERE id = ?",
        [json.dumps(original, indent=2), audit_id],
    )
    assert (await _verify_file(copy, task_id)).ok


async def test_a_deleted_event_is_named(
    runtime: Runtime, model_server: FakeModelServer, tmp_path: Path
) -> None:
    task_id = await _approved_run(runtime, model_server)
    copy = _copy(runtime, tmp_path, "deleted.db")
    rows = _rows(copy, task_id)
    victim_id, victim_seq, _ = rows[3]
    raw_execute(copy, "DELETE FROM events WHERE id = ?", [victim_id])
    result = await _verify_file(copy)
    assert [(f.task_id, f.seq) for f in result.failures] == [(task_id, victim_seq + 1)]
    assert f"event {victim_seq} is missing" in result.failures[0].reason


async def test_swapped_events_are_named(
    runtime: Runtime, model_server: FakeModelServer, tmp_path: Path
) -> None:
    task_id = await _approved_run(runtime, model_server)
    copy = _copy(runtime, tmp_path, "swapped.db")
    rows = _rows(copy, task_id)
    (a_id, a_seq, _), (b_id, b_seq, _) = rows[2], rows[4]
    # Swap their places (seq), hashes travelling with the rows.
    raw_execute(copy, "UPDATE events SET seq = -1 WHERE id = ?", [a_id])
    raw_execute(copy, "UPDATE events SET seq = ? WHERE id = ?", [a_seq, b_id])
    raw_execute(copy, "UPDATE events SET seq = ? WHERE id = ?", [b_seq, a_id])
    result = await _verify_file(copy, task_id)
    assert [(f.task_id, f.seq) for f in result.failures] == [(task_id, a_seq)]
    # Swapping only the hashes back in line does not help: contents no longer chain.
    ((ha,),) = raw_rows(copy, "SELECT hash FROM events WHERE id = ?", [a_id])
    ((hb,),) = raw_rows(copy, "SELECT hash FROM events WHERE id = ?", [b_id])
    raw_execute(copy, "UPDATE events SET hash = ? WHERE id = ?", [hb, a_id])
    raw_execute(copy, "UPDATE events SET hash = ? WHERE id = ?", [ha, b_id])
    assert [f.seq for f in (await _verify_file(copy, task_id)).failures] == [a_seq]


async def test_concurrent_appends_from_two_connections_keep_one_chain(db_target: str) -> None:
    path = db_target
    first = await open_stores(path)
    second = await open_stores(path)
    try:
        task = await first.tasks.create_task("q")

        async def write(stores, name: str) -> None:
            for i in range(40):
                await stores.events.append_many(task.task_id, [(name, {"i": i}), (name, {"j": i})])

        await asyncio.gather(write(first, "a"), write(second, "b"))
        result = await verify(first.db, task.task_id)
        assert result.ok and result.events == 160
    finally:
        await first.close()
        await second.close()


async def test_retention_records_what_it_deleted_and_verify_still_passes(db_target: str) -> None:
    stores = await open_stores(db_target)
    try:
        old = await stores.tasks.create_task("old")
        await stores.events.append(old.task_id, "note", {"x": 1})
        await stores.tasks.complete_task(old.task_id, "done")
        kept = await stores.tasks.create_task("kept")
        await stores.events.append(None, "rule_created", {"rule_id": "r-1"})
        head = (await stores.events.list_events(old.task_id))[-1]
        assert await delete_finished_tasks(stores.db, -60) == 1
        result = await verify(stores.db)
        assert result.ok, [f.describe() for f in result.failures]
        (record,) = await stores.events.list_by_type("retention_deleted")
        assert record.task_id is None
        assert record.payload["tasks"] == {old.task_id: [head.seq, head.hash]}
        assert await stores.tasks.get_task(kept.task_id) is not None
    finally:
        await stores.close()


def test_cli_verify_exit_codes(db_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = db_target

    async def build() -> str:
        async with await open_stores(path) as stores:
            task = await stores.tasks.create_task("q")
            await stores.events.append_many(task.task_id, [("a", {"n": 1}), ("b", {"n": 2})])
            return task.task_id

    task_id = asyncio.run(build())
    assert main(["--db", path, "audit", "verify"]) == 0
    assert "verified" in capsys.readouterr().out
    raw_execute(path, "UPDATE events SET event_type = 'z' WHERE task_id = ? AND seq = 2", [task_id])
    assert main(["--db", path, "audit", "verify", task_id]) == 1
    out = capsys.readouterr().out
    assert f"FAILED: task {task_id}, event 2: z:" in out
    assert main(["--db", path, "audit", "verify", "t-nope"]) == 1


@pytest.mark.backends("sqlite", reason="a v7 SQLite file; PostgreSQL starts at the current schema")
def test_migration_chains_events_written_before_it(tmp_path: Path) -> None:
    """A v7 file's events get their hashes in the v8 migration and verify."""
    from runtime.store import db as dbmod

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statements in dbmod.MIGRATIONS[:7]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 7")
    conn.execute(
        "INSERT INTO tasks (task_id, message, status, created_at, updated_at) "
        "VALUES ('t-old', 'm', 'completed', 1, 1)"
    )
    for seq in (1, 2, 3):
        conn.execute(
            "INSERT INTO events (task_id, seq, event_type, payload, created_at) "
            "VALUES ('t-old', ?, 'e', ?, ?)",
            (seq, json.dumps({"seq": seq}), 1.5 + seq),
        )
    conn.commit()
    conn.close()
    result = asyncio.run(_verify_file(path))
    assert result.ok and result.events == 3


async def test_duck_task_says_whether_its_chain_verifies(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    from bot import commands as c
    from bot.admin import CommandRunner
    from bot.policy import Actor

    task_id = await _approved_run(runtime, model_server)
    runner = CommandRunner(runtime.stores.tasks, runtime.stores.events, runtime.approvals)
    who = Actor("slack:U1")
    shown = await runner.execute(c.TaskShow(task_id), who)
    head = (await runtime.stores.events.list_events(task_id))[-1].hash or ""
    assert shown.splitlines()[-1].startswith("audit chain verifies (")
    assert f"head {head[:16]}" in shown
    raw_execute(
        runtime.settings.db,
        "UPDATE events SET payload = '{}' WHERE task_id = ? AND seq = 2",
        [task_id],
    )
    tampered = await runner.execute(c.TaskShow(task_id), who)
    assert tampered.splitlines()[-1].startswith(
        f"audit chain DOES NOT VERIFY: task {task_id}, event 2: "
    )
