"""The PostgreSQL backend (runtime/store/postgres.py) against a real server.

Two `Database` objects on one database stand for two replicas: each has its own
pool, so their statements really run at once on the server, as two processes'
would (one test uses a second process as well). What must hold across them is
what the store promises on SQLite: one winner per compare-and-set, gap-free
chained events, one claim per delivery, one migration.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime.store import Database, StoreError, Stores, open_stores
from runtime.store.audit import verify
from runtime.store.db import _valid_text
from runtime.store.migrations import SCHEMA_VERSION
from runtime.store.pg_baseline import VERSION_TABLE
from runtime.store.retention import delete_finished_tasks
from runtime.store.sql import platform_filter, to_postgres
from tests.fakes.synapse import free_port
from tests.postgres import raw_execute, raw_rows

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def pair(postgres_url: str):
    """Two replicas' stores on one fresh PostgreSQL database."""
    one = await open_stores(postgres_url, pool_size=4)
    two = await open_stores(postgres_url, pool_size=4)
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


# -- SQL translation ---------------------------------------------------------------


def test_placeholders_become_numbered_outside_literals_and_comments() -> None:
    sql = "SELECT '?', \"a?b\", ? -- is it?\n, 'it''s ?', ? /* ? */ FROM t WHERE x = ?"
    assert to_postgres(sql) == (
        "SELECT '?', \"a?b\", $1 -- is it?\n, 'it''s ?', $2 /* ? */ FROM t WHERE x = $3"
    )


def test_indexed_by_hints_are_dropped_for_postgres() -> None:
    sql = "SELECT 1 FROM tasks INDEXED BY tasks_unanswered WHERE a = ? ORDER BY b"
    assert to_postgres(sql) == "SELECT 1 FROM tasks WHERE a = $1 ORDER BY b"


def test_platform_filter_is_a_prefix_per_platform() -> None:
    clause, params = platform_filter("c", ["slack", "matrix"])
    assert clause == "(substr(c, 1, ?) = ? OR substr(c, 1, ?) = ?)"
    assert params == [6, "slack:", 7, "matrix:"]


# -- opening -----------------------------------------------------------------------


async def test_sqlite_is_unchanged(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "duck.db")
    try:
        assert type(db) is Database
        assert (db.dialect, db.for_update, db.skip_locked) == ("sqlite", "", "")
        assert db.path == str(tmp_path / "duck.db")
        assert await db.user_version() == SCHEMA_VERSION
    finally:
        await db.close()


async def test_a_url_opens_postgres_with_the_schema(postgres_url: str) -> None:
    stores = await open_stores(postgres_url, pool_size=2)
    try:
        assert stores.db.dialect == "postgres"
        assert stores.db.for_update == " FOR UPDATE"
        assert await stores.db.user_version() == SCHEMA_VERSION
        task = await stores.tasks.create_task("q", conversation="slack:C1|1.2")
        assert (await stores.tasks.get_task(task.task_id)).message == "q"  # type: ignore[union-attr]
    finally:
        await stores.close()
    tables = {
        row[0]
        for row in raw_rows(
            postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    assert {"tasks", "events", "approvals", "rules", "deliveries", "schedules", "inbox"} <= tables
    assert raw_rows(postgres_url, f"SELECT version FROM {VERSION_TABLE}") == [(SCHEMA_VERSION,)]


async def test_two_opens_at_once_migrate_once(postgres_url: str) -> None:
    first, second = await asyncio.gather(
        Database.open(postgres_url, pool_size=1), Database.open(postgres_url, pool_size=1)
    )
    try:
        assert await first.user_version() == await second.user_version() == SCHEMA_VERSION
    finally:
        await first.close()
        await second.close()
    assert raw_rows(postgres_url, f"SELECT count(*) FROM {VERSION_TABLE}") == [(1,)]


async def test_a_second_process_opening_while_one_migrates_waits(postgres_url: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from runtime.store import Database
        async def main():
            db = await Database.open({postgres_url!r}, pool_size=1)
            print(await db.user_version())
            await db.close()
        asyncio.run(main())
        """
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, cwd=REPO, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [(await asyncio.wait_for(proc.communicate(), 120))[0].decode().strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outs == [str(SCHEMA_VERSION)] * 2


async def test_a_newer_schema_is_refused_and_left_alone(postgres_url: str) -> None:
    db = await Database.open(postgres_url, pool_size=1)
    await db.close()
    raw_execute(postgres_url, f"UPDATE {VERSION_TABLE} SET version = ?", [SCHEMA_VERSION + 1])
    with pytest.raises(StoreError) as caught:
        await Database.open(postgres_url, pool_size=1)
    message = str(caught.value)
    assert f"has schema version {SCHEMA_VERSION + 1}" in message
    assert (
        f"only knows versions up to {SCHEMA_VERSION}; upgrade DuckLM or use another database"
        in message
    )
    assert raw_rows(postgres_url, f"SELECT version FROM {VERSION_TABLE}") == [(SCHEMA_VERSION + 1,)]


async def test_open_without_migrating_then_migrate(postgres_url: str) -> None:
    db = await Database.open(postgres_url, pool_size=1, migrate=False)
    try:
        assert await db.user_version() == 0
        await db.migrate()
        assert await db.user_version() == SCHEMA_VERSION
    finally:
        await db.close()


def _with_password(url: str, user: str, password: str, database: str | None = None) -> str:
    rest = url.split("@", 1)[1]
    if database is not None:
        rest = rest.rsplit("/", 1)[0] + "/" + database
    return f"postgresql://{user}:{password}@{rest}"


async def test_an_unknown_database_is_a_clear_error_without_the_password(
    postgres_url: str,
) -> None:
    url = _with_password(postgres_url, "postgres", "s3cret-pw", "no_such_db")
    with pytest.raises(StoreError) as caught:
        await Database.open(url)
    message = str(caught.value)
    assert "no_such_db does not exist" in message
    assert "s3cret-pw" not in message and ":***@" in message


async def test_a_refused_login_is_a_clear_error_without_the_password(postgres_url: str) -> None:
    # The test server trusts local logins (any password), so a role that does not
    # exist is the refusal it can produce; a wrong password takes the same path
    # (InvalidPasswordError, a subclass of the same authorization error).
    url = _with_password(postgres_url, "nobody_here", "s3cret-pw")
    with pytest.raises(StoreError) as caught:
        await Database.open(url)
    message = str(caught.value)
    assert "refused the login" in message
    assert "s3cret-pw" not in message and "nobody_here:***@" in message


async def test_nothing_listening_is_a_clear_error() -> None:
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/ducklm"
    with pytest.raises(StoreError) as caught:
        await Database.open(url)
    message = str(caught.value)
    assert "connection was refused" in message and "s3cret-pw" not in message


async def test_an_unresolvable_host_and_a_bad_url_are_clear_errors() -> None:
    with pytest.raises(StoreError, match="cannot resolve the host name"):
        await Database.open("postgresql://u:s3cret-pw@no-such-host.invalid/d")
    with pytest.raises(StoreError, match="not a valid PostgreSQL URL") as caught:
        await Database.open("postgresql://u:s3cret-pw@127.0.0.1:notaport/d")
    assert "s3cret-pw" not in str(caught.value)


async def test_an_exhausted_pool_is_a_clear_error(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runtime.store.postgres.ACQUIRE_TIMEOUT_S", 0.3)
    stores = await open_stores(postgres_url, pool_size=1)
    holding = asyncio.Event()
    done = asyncio.Event()

    async def hold() -> None:
        async with stores.db.transaction():
            await stores.tasks.create_task("held")
            holding.set()
            await done.wait()

    holder = asyncio.create_task(hold())
    try:
        await asyncio.wait_for(holding.wait(), 10)
        with pytest.raises(StoreError, match="all 1 pooled connections stayed busy"):
            await stores.tasks.list_recent()
        done.set()
        await asyncio.wait_for(holder, 10)
        assert len(await stores.tasks.list_recent()) == 1  # served again once released
    finally:
        done.set()
        await stores.close()


async def test_a_server_gone_mid_statement_is_a_store_error_and_the_pool_recovers(
    postgres_url: str,
) -> None:
    stores = await open_stores(postgres_url, pool_size=2)
    try:
        sleeper = asyncio.create_task(stores.db.fetchall("SELECT pg_sleep(30)"))
        deadline = time.monotonic() + 10
        while True:  # bounded wait until the sleep is running on the server
            (count,) = raw_rows(
                postgres_url,
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
            )[0]
            if count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        raw_execute(
            postgres_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query = 'SELECT pg_sleep(30)'",
        )
        with pytest.raises(StoreError) as caught:
            await asyncio.wait_for(sleeper, 10)
        assert "database postgresql://" in str(caught.value)
        # The pool replaces the dead connection: the next statement works.
        await stores.tasks.create_task("after")
    finally:
        await stores.close()


# -- values ------------------------------------------------------------------------


async def test_text_postgres_cannot_hold_is_stored_replaced(postgres_url: str) -> None:
    async with await open_stores(postgres_url, pool_size=1) as stores:
        task = await stores.tasks.create_task("a\x00b\ud800c")
        stored = await stores.tasks.get_task(task.task_id)
        # NUL becomes U+FFFD; a lone surrogate as on SQLite (db._valid_text).
        assert stored is not None and stored.message == _valid_text("a\ufffdb\ud800c")


async def test_loosely_typed_parameters_are_bound_by_the_inferred_type(postgres_url: str) -> None:
    async with await open_stores(postgres_url, pool_size=1) as stores:
        assert (await stores.db.fetchone("SELECT CASE WHEN ? THEN 1 ELSE 2 END", (1,)))[0] == 1
        async with stores.db.transaction():  # refused before it ran: the transaction goes on
            assert (await stores.db.fetchone("SELECT ? || 'x'", (5,)))[0] == "5x"
            await stores.tasks.create_task("still fine")
        schedule = await stores.schedules.insert("* * * * *", "UTC", "p", "slack:C1", "u")
        assert await stores.schedules.set_paused(schedule.schedule_id, True)
        assert await stores.schedules.set_paused(schedule.schedule_id, False)


async def test_the_replan_trigger_resets_next_fire_on_a_bare_last_run_write(
    postgres_url: str,
) -> None:
    async with await open_stores(postgres_url, pool_size=1) as stores:
        schedule = await stores.schedules.insert("* * * * *", "UTC", "p", "slack:C1", "u")
        await stores.schedules.set_next_fire(schedule.schedule_id, 5000.0)
        await stores.db.execute(
            "UPDATE schedules SET last_run_at = ? WHERE schedule_id = ?",
            (4000.0, schedule.schedule_id),
        )
        row = await stores.db.fetchone(
            "SELECT next_fire_at FROM schedules WHERE schedule_id = ?", (schedule.schedule_id,)
        )
        assert row is not None and row[0] == 0
        # A claim that moves next_fire_at with last_run_at keeps its value.
        assert await stores.schedules.claim_fire(schedule.schedule_id, 0, 9000.0, ran_at=8000.0)
        row = await stores.db.fetchone(
            "SELECT next_fire_at FROM schedules WHERE schedule_id = ?", (schedule.schedule_id,)
        )
        assert row is not None and row[0] == 9000.0


# -- transactions --------------------------------------------------------------------


async def test_a_transaction_is_one_connection_nested_joins_and_rollback_undoes(
    postgres_url: str,
) -> None:
    async with await open_stores(postgres_url, pool_size=3) as stores:
        inside = asyncio.Event()
        release = asyncio.Event()
        created: list[str] = []

        async def writer() -> None:
            async with stores.db.transaction():
                task = await stores.tasks.create_task("pending")
                created.append(task.task_id)
                async with stores.db.transaction():  # joins
                    await stores.events.append(task.task_id, "task_created")
                # The same task reads its own uncommitted rows.
                assert await stores.tasks.get_task(task.task_id) is not None
                inside.set()
                await release.wait()

        job = asyncio.create_task(writer())
        await asyncio.wait_for(inside.wait(), 10)
        # Another task is not blocked by the open transaction and does not see it.
        assert await stores.tasks.get_task(created[0]) is None
        release.set()
        await asyncio.wait_for(job, 10)
        assert await stores.tasks.get_task(created[0]) is not None
        assert [e.seq for e in await stores.events.list_events(created[0])] == [1]

        with pytest.raises(RuntimeError):
            async with stores.db.transaction():
                gone = await stores.tasks.create_task("rolled back")
                raise RuntimeError("undo")
        assert await stores.tasks.get_task(gone.task_id) is None


# -- across replicas -------------------------------------------------------------------


async def test_concurrent_decides_of_one_approval_have_one_winner(
    pair: tuple[Stores, Stores],
) -> None:
    one, two = pair
    for _ in range(10):
        task = await one.tasks.create_task("q")
        approval = await one.approvals.insert(task.task_id, {"tool": "shell_exec_safe"})
        results = await asyncio.gather(
            *(
                stores.approvals.decide(approval.approval_id, "approve", f"u{n}")
                for n, stores in enumerate([one, two] * 4)
            )
        )
        assert results.count(True) == 1
        claims = await asyncio.gather(
            one.approvals.claim_execution(approval.approval_id),
            two.approvals.claim_execution(approval.approval_id),
            one.approvals.claim_execution(approval.approval_id),
            two.approvals.claim_execution(approval.approval_id),
        )
        assert claims.count(True) == 1


async def test_concurrent_appends_to_one_task_are_gap_free_and_chained(
    pair: tuple[Stores, Stores],
) -> None:
    one, two = pair
    task = await one.tasks.create_task("q")

    async def appender(stores: Stores, name: str) -> None:
        for n in range(15):
            batch = [(f"{name}-{n}-{k}", {"n": n}) for k in range(1 + n % 3)]
            await stores.events.append_many(task.task_id, batch)

    await asyncio.gather(*(appender(s, f"{s is one}{k}") for s in (one, two) for k in range(3)))
    events = await two.events.list_events(task.task_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len(events) == 6 * (5 * 1 + 5 * 2 + 5 * 3)
    result = await verify(one.db, task.task_id)
    assert result.ok, result.failures


async def test_appends_from_another_process_interleave_into_one_valid_chain(
    postgres_url: str,
) -> None:
    stores = await open_stores(postgres_url, pool_size=2)
    try:
        task = await stores.tasks.create_task("q")
        await stores.events.append(None, "global_first")
        script = textwrap.dedent(
            f"""
            import asyncio
            from runtime.store import open_stores
            async def main():
                s = await open_stores({postgres_url!r}, pool_size=2)
                for n in range(40):
                    await s.events.append_many({task.task_id!r}, [("child", {{"n": n}})] * 2)
                    await s.events.append(None, "child_global")
                await s.close()
            asyncio.run(main())
            """
        )
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=REPO)
        waiting = asyncio.create_task(child.wait())
        parent = 0
        deadline = time.monotonic() + 120
        try:
            # Append for as long as the child does (and at least 40 times).
            while (not waiting.done() or parent < 40) and time.monotonic() < deadline:
                await stores.events.append(task.task_id, "parent", {"n": parent})
                await stores.events.append(None, "parent_global")
                parent += 1
            assert await asyncio.wait_for(waiting, 120) == 0
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        events = await stores.events.list_events(task.task_id)
        assert [e.seq for e in events] == list(range(1, 80 + parent + 1))
        kinds = [e.event_type for e in events]
        # Both wrote while the other did: the chain interleaves them.
        assert kinds.index("child") < len(kinds) - 1 - kinds[::-1].index("parent")
        glob = await stores.events.list_events(None)
        assert [e.seq for e in glob] == list(range(1, 1 + 40 + parent + 1))
        result = await verify(stores.db)
        assert result.ok, result.failures
        assert result.events == len(events) + len(glob)
    finally:
        await stores.close()


async def test_concurrent_delivery_claims_have_one_winner_each(
    pair: tuple[Stores, Stores],
) -> None:
    one, two = pair
    keys = [f"slack:Ev{n}" for n in range(40)]
    results = await asyncio.gather(
        *(stores.deliveries.claim(key) for key in keys for stores in (one, two, one, two))
    )
    for n in range(len(keys)):
        assert results[4 * n : 4 * n + 4].count(True) == 1


async def test_delivery_claims_in_two_transactions_wait_for_each_other(
    pair: tuple[Stores, Stores],
) -> None:
    """What ChatService.accept does: claims inside a transaction. The second
    replica's claim of the same key waits for the first one's outcome."""
    one, two = pair
    claimed = asyncio.Event()
    finish = asyncio.Event()

    async def first(rollback: bool) -> bool:
        try:
            async with one.db.transaction():
                won = await one.deliveries.claim("slack:Ev-tx")
                claimed.set()
                await finish.wait()
                if rollback:
                    raise RuntimeError("the message was refused")
                return won
        except RuntimeError:
            return False

    job = asyncio.create_task(first(rollback=True))
    await asyncio.wait_for(claimed.wait(), 10)
    second = asyncio.create_task(two.deliveries.claim("slack:Ev-tx"))

    async def waiting_on_a_lock() -> bool:
        rows = await one.db.fetchall(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return rows[0][0] >= 1

    # The second claim really waits on the first's uncommitted row (bounded).
    deadline = time.monotonic() + 10
    while not await waiting_on_a_lock():
        assert time.monotonic() < deadline, "the second claim never waited on the first"
        await asyncio.sleep(0.01)
    assert not second.done()
    finish.set()
    assert await asyncio.wait_for(job, 10) is False
    # The first rolled back, so the key was free for the second after all.
    assert await asyncio.wait_for(second, 10) is True
    assert not await one.deliveries.claim("slack:Ev-tx")


async def test_two_replicas_taking_abandoned_inbox_rows_split_them(
    pair: tuple[Stores, Stores],
) -> None:
    one, two = pair
    ids = set()
    for n in range(30):
        row = await one.inbox.insert(f"slack:C1|{n}", "slack:U1", f"m{n}", owner="dead")
        ids.add(row.inbox_id)
    await one.db.execute("UPDATE inbox SET claimed_at = 1.0")
    started = time.time()  # both replicas' start: what they took since is theirs

    async def take(stores: Stores, owner: str) -> list[str]:
        taken: list[str] = []
        while True:
            rows = await stores.inbox.take_abandoned(owner, started, ["slack"], limit=4)
            taken += [r.inbox_id for r in rows]
            if len(rows) < 4:
                return taken

    got_one, got_two = await asyncio.gather(take(one, "r1"), take(two, "r2"))
    assert set(got_one) | set(got_two) == ids
    assert not set(got_one) & set(got_two)


async def test_two_replicas_interrupting_running_tasks_report_each_once(
    pair: tuple[Stores, Stores],
) -> None:
    one, two = pair
    for n in range(30):
        await one.tasks.create_task(f"q{n}")
    later = time.time() + 1
    got = await asyncio.gather(
        one.tasks.mark_interrupted(later, limit=3),
        two.tasks.mark_interrupted(later, limit=3),
        one.tasks.mark_interrupted(later),
        two.tasks.mark_interrupted(later),
    )
    ids = [task.task_id for tasks in got for task in tasks]
    assert len(ids) == len(set(ids)) == 30


async def test_owed_answers_and_lagging_cards_filter_by_platform(postgres_url: str) -> None:
    async with await open_stores(postgres_url, pool_size=2) as stores:
        slack = await stores.tasks.create_task("a", conversation="slack:C1|1")
        await stores.tasks.create_task("b", conversation="matrix:!r|1")
        await stores.tasks.create_task("c", conversation="slackish")
        for task in await stores.tasks.list_recent():
            await stores.tasks.complete_task(task.task_id, "done")
        pages = [page async for page in stores.tasks.iter_owed_answers(["slack"], stale_before=0)]
        assert [t.task_id for page in pages for t in page] == [slack.task_id]
        assert await stores.tasks.claim_answer(slack.task_id) == "claimed"
        assert await stores.tasks.claim_answer(slack.task_id) == "taken"
        approval = await stores.approvals.insert(slack.task_id, {"tool": "t"})
        await stores.approvals.decide(approval.approval_id, "deny", "u")
        await stores.approvals.card_posted(approval.approval_id, "ref")
        lagging = [a async for page in stores.approvals.iter_cards_lagging(["slack"]) for a in page]
        assert [a.approval_id for a in lagging] == [approval.approval_id]


async def test_retention_from_two_replicas_deletes_each_task_once_and_chains_verify(
    pair: tuple[Stores, Stores],
) -> None:
    one, two = pair
    for n in range(12):
        task = await one.tasks.create_task(f"q{n}")
        await one.events.append_many(task.task_id, [("a", None), ("b", {"n": n})])
        await one.tasks.complete_task(task.task_id, "done")
    keep = await one.tasks.create_task("running")
    deleted = await asyncio.gather(
        delete_finished_tasks(one.db, -60), delete_finished_tasks(two.db, -60)
    )
    assert sum(deleted) == 12
    assert [t.task_id for t in await one.tasks.list_recent()] == [keep.task_id]
    result = await verify(two.db)
    assert result.ok, result.failures
    recorded = await one.events.list_events(None)
    named = [tid for e in recorded for tid in e.payload["tasks"]]
    assert len(named) == len(set(named)) == 12


async def test_background_work_gets_the_neutral_connection(postgres_url: str) -> None:
    async with await open_stores(postgres_url, pool_size=2) as stores:
        await stores.deliveries.claim("k1")
        await stores.deliveries.claim("k2")

        async def work(conn) -> tuple[int, int]:  # type: ignore[no-untyped-def]
            (row,) = await conn.fetchall("SELECT count(*) FROM deliveries WHERE key > ?", ["k"])
            return row[0], await conn.execute("DELETE FROM deliveries WHERE key = ?", ["k1"])

        assert await stores.db.background_transaction(work) == (2, 1)
        assert await stores.deliveries.prune(-60) == 1
        await stores.db.checkpoint()  # a no-op on PostgreSQL


async def test_without_asyncpg_a_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # what a missing package looks like
    with pytest.raises(StoreError, match="needs the asyncpg package") as caught:
        await Database.open("postgresql://u:s3cret-pw@127.0.0.1/d")
    assert "s3cret-pw" not in str(caught.value)


async def test_a_stale_head_guess_is_caught_and_the_chain_stays_valid(
    pair: tuple[Stores, Stores],
) -> None:
    one, two = pair
    task = await one.tasks.create_task("q")
    await one.events.append(task.task_id, "a")  # one's guess: seq 1
    await two.events.append(task.task_id, "b")  # written behind one's back: seq 2
    third = await one.events.append(task.task_id, "c")
    assert third.seq == 3
    with pytest.raises(RuntimeError):
        async with one.db.transaction():
            await one.events.append(task.task_id, "rolled back")  # guess 4, never committed
            raise RuntimeError("undo")
    fourth = await one.events.append(task.task_id, "d")
    assert fourth.seq == 4
    global_one = await one.events.append(None, "g1")
    global_two = await two.events.append(None, "g2")
    assert (global_one.seq, global_two.seq) == (1, 2)
    assert [e.event_type for e in await two.events.list_events(task.task_id)] == list("abcd")
    result = await verify(two.db)
    assert result.ok, result.failures


@pytest.mark.backends("sqlite", "postgres")
async def test_retention_takes_the_votes_of_the_tasks_it_deletes(db_target: str) -> None:
    async with await open_stores(db_target) as stores:
        done = await stores.tasks.create_task("old")
        kept = await stores.tasks.create_task("running")
        for task in (done, kept):
            approval = await stores.approvals.insert(task.task_id, {"tool": "t"})
            await stores.db.execute(
                "INSERT INTO approval_votes (vote_id, approval_id, revision, voter, vote, "
                "task_id, created_at) VALUES (?, ?, 0, 'slack:U1', 'approve', ?, ?)",
                (
                    f"{approval.approval_id}/0/slack:U1",
                    approval.approval_id,
                    task.task_id,
                    time.time(),
                ),
            )
        await stores.tasks.complete_task(done.task_id, "done")
        assert await delete_finished_tasks(stores.db, -60) == 1
        left = await stores.db.fetchall("SELECT task_id FROM approval_votes")
        assert [row["task_id"] for row in left] == [kept.task_id]


async def test_timer_and_card_claims_have_one_winner_across_replicas(
    pair: tuple[Stores, Stores],
) -> None:
    one, two = pair
    task = await one.tasks.create_task("q", conversation="slack:C1|1")
    approval = await one.approvals.insert(task.task_id, {"tool": "t"})
    schedule = await one.schedules.insert("* * * * *", "UTC", "p", "slack:C1", "u")
    both = [one, two] * 3

    async def winners(make) -> int:  # type: ignore[no-untyped-def]
        return sum(bool(r) for r in await asyncio.gather(*(make(s) for s in both)))

    assert await winners(lambda s: s.approvals.claim_due(approval.approval_id, 0, 100.0)) == 1
    assert await winners(lambda s: s.approvals.mark_reminded(approval.approval_id)) == 1
    assert await winners(lambda s: s.approvals.claim_card(approval.approval_id, "unposted")) == 1
    assert (
        await winners(
            lambda s: s.schedules.claim_fire(schedule.schedule_id, 0, 200.0, ran_at=150.0)
        )
        == 1
    )
    await one.tasks.complete_task(task.task_id, "done")
    claims = await asyncio.gather(*(s.tasks.claim_answer(task.task_id) for s in both))
    assert claims.count("claimed") == 1 and claims.count("taken") == len(both) - 1


@pytest.mark.backends("sqlite", "postgres")
async def test_a_task_can_be_inserted_with_its_owner(db_target: str) -> None:
    async with await open_stores(db_target) as stores:
        task = stores.tasks.new_task("q")
        await stores.tasks.insert(task, owner="replica-1")
        plain = await stores.tasks.create_task("r")
        rows = await stores.db.fetchall(
            "SELECT task_id, owner FROM tasks ORDER BY created_at, task_id"
        )
        assert {row["task_id"]: row["owner"] for row in rows} == {
            task.task_id: "replica-1",
            plain.task_id: None,
        }


@pytest.fixture(scope="module")
def password_server():  # type: ignore[no-untyped-def]
    """A server of its own that checks passwords (the session's trusts every login)."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        server.admin_query("ALTER USER postgres PASSWORD 'right-pw'")
        hba = server.data / "pg_hba.conf"
        owner = (hba.stat().st_uid, hba.stat().st_gid)
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        os.chown(hba, *owner)
        server.admin_query("SELECT pg_reload_conf()")
        yield server
    finally:
        server.stop()


async def _refused_once_checking(url: str) -> str:
    """The error opening `url` (a wrong password) gives, waiting (bounded) until
    the password server's reloaded pg_hba.conf is in force."""
    deadline = time.monotonic() + 10
    while True:
        try:
            opened = await Database.open(url, migrate=False)
        except StoreError as exc:
            return str(exc)
        await opened.close()  # still trusting: try again
        assert time.monotonic() < deadline, "the server never started checking passwords"
        await asyncio.sleep(0.1)


async def test_a_wrong_password_is_a_clear_error_without_either_password(
    password_server,  # type: ignore[no-untyped-def]
) -> None:
    right = f"postgresql://postgres:right-pw@{password_server.host}:{password_server.port}/postgres"
    message = await _refused_once_checking(right.replace("right-pw", "wrong-pw"))
    assert "refused the login" in message and "password authentication failed" in message
    assert "wrong-pw" not in message and "right-pw" not in message
    assert "postgres:***@" in message
    db = await Database.open(right, migrate=False)  # the right one still gets in
    await db.close()


async def test_a_head_rolled_back_then_taken_by_another_replica_is_not_chained_onto(
    pair: tuple[Stores, Stores],
) -> None:
    # The fork the hash check prevents: one's append inside a transaction that
    # rolls back leaves one guessing (2, a hash never stored); two then writes a
    # different seq 2; one's next append must not chain onto the rolled-back hash
    # (max(seq) alone says 2, the guess's seq, and would let it through).
    one, two = pair
    for chain in ((await one.tasks.create_task("q")).task_id, None):
        await one.events.append(chain, "a")
        with pytest.raises(RuntimeError):
            async with one.db.transaction():
                await one.events.append(chain, "rolled back")
                raise RuntimeError("undo")
        await two.events.append(chain, "b")
        third = await one.events.append(chain, "c")
        stored = await two.events.list_events(chain)
        assert [(e.seq, e.event_type) for e in stored] == [(1, "a"), (2, "b"), (3, "c")]
        assert third.hash == stored[-1].hash
    result = await verify(two.db)
    assert result.ok, result.failures


# Passwords with what a URL gives a meaning to, unencoded; each 3-character piece
# of them is unusual enough to appear in no sentence of ours.
_SPECIAL_PASSWORDS = (
    "Zq#9xK",
    "Zq?9xK",
    "Zq/9xK",
    "Zq@9xK",
    "Zq:9xK",
    "Zq%9xK",
    "Zq 9xK",
    "Zq%239xK",
    "Zq/@#?:% 9xK",
    "Zq@9x@Kw/Jv",
    "Zq#9x@Qvhz.wk",
)


def _pieces(password: str) -> set[str]:
    from urllib.parse import quote, unquote

    pieces: set[str] = set()
    for form in (password, unquote(password), quote(password, safe="")):
        pieces |= {form[i : i + 3] for i in range(len(form) - 2)}
    return pieces


def _assert_hidden(message: str, password: str) -> None:
    shown = [piece for piece in _pieces(password) if piece in message]
    assert not shown, f"{password!r}: {shown} in {message!r}"


@pytest.mark.parametrize("password", _SPECIAL_PASSWORDS)
def test_the_shown_url_masks_a_password_with_special_characters(password: str) -> None:
    from runtime.store.postgres import mask_url

    assert mask_url(f"postgresql://u:{password}@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url(f"postgresql://u@h/db?password={password}&sslmode=off") == (
        "postgresql://u@h/db?password=***&sslmode=off"
    )


@pytest.mark.parametrize("password", _SPECIAL_PASSWORDS)
async def test_no_piece_of_a_special_password_is_in_a_bad_url_or_refused_connection_error(
    password: str,
) -> None:
    port = free_port()  # nothing listens on it
    for url in (
        f"postgresql://u:{password}@127.0.0.1:{port}/db",
        f"postgresql://u:{password}@127.0.0.1:notaport/db",
        f"postgresql://u@127.0.0.1:{port}/db?password={password}",
        f"postgresql://u@127.0.0.1:notaport/db?password={password}",
    ):
        with pytest.raises(StoreError) as caught:
            await Database.open(url)
        message = str(caught.value)
        assert message.startswith(("database postgresql://u", "postgresql://u")), message
        # The free port is random digits, which may match a piece of the encoded
        # password ("%20" + "9" holds "209"): set aside before looking.
        _assert_hidden(message.replace(f":{port}/", ":PORT/"), password)


async def test_no_piece_of_a_special_password_is_in_a_refused_login_error(
    password_server,  # type: ignore[no-untyped-def]
) -> None:
    from urllib.parse import quote

    where = f"{password_server.host}:{password_server.port}/postgres"
    await _refused_once_checking(f"postgresql://postgres:wrong-pw@{where}")
    for password in _SPECIAL_PASSWORDS:
        # Percent-encoded, the server gets the password and refuses it; raw, the
        # driver splits the URL wrongly and fails some other way: hidden both times.
        encoded = quote(password, safe="")
        for url in (
            f"postgresql://postgres:{encoded}@{where}",
            f"postgresql://postgres:{password}@{where}",
        ):
            with pytest.raises(StoreError) as caught:
                await Database.open(url, migrate=False)
            # The server's random port set aside, as above.
            shown = str(caught.value).replace(f":{password_server.port}/", ":PORT/")
            _assert_hidden(shown, password)
        assert "refused the login" in str(caught.value) or "postgres:***@" in str(caught.value)
