"""The store's background connection: slow work leaves the loop free, runs one
piece at a time (SQLite: aiosqlite's thread; PostgreSQL: a pooled connection of
its own), and never leaves a transaction open behind it. Real SQLite files, a real
PostgreSQL, real threads; nothing is mocked."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiosqlite
import pytest

from runtime.store import StoreError, Stores, open_stores
from runtime.store.db import BackgroundConnection
from runtime.store.retention import delete_finished_tasks
from tests.postgres import raw_rows

pytestmark = pytest.mark.backends("sqlite", "postgres")

# A statement that keeps the database busy for a while (counting in a recursive CTE;
# the same SQL on both backends).
SLOW_SQL = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "SELECT count(*) FROM n"
)


async def test_background_work_gets_a_connection_to_the_same_database(
    stores: Stores,
) -> None:
    task = await stores.tasks.create_task("q")

    async def work(conn: BackgroundConnection) -> tuple[BackgroundConnection, int]:
        sql = "SELECT count(*) FROM tasks WHERE task_id = ?"
        (row,) = await conn.fetchall(sql, [task.task_id])
        return conn, row[0]

    conn, count = await stores.db.background_transaction(work)
    assert isinstance(conn, BackgroundConnection)
    assert count == 1
    if stores.db.dialect == "sqlite":  # SQLite-only work may reach aiosqlite itself
        assert isinstance(conn.connection, aiosqlite.Connection)  # type: ignore[attr-defined]


async def test_the_loop_keeps_serving_while_background_work_runs(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")

    async def slow(conn: BackgroundConnection) -> int:
        (row,) = await conn.fetchall(SLOW_SQL, [3_000_000])
        return int(row[0])

    job = asyncio.create_task(stores.db.background_transaction(slow))
    served = 0
    # While the slow statement runs (aiosqlite's thread, or the server), inline reads go on.
    while not job.done():
        assert await stores.tasks.get_task(task.task_id) is not None
        served += 1
        await asyncio.sleep(0)
    assert await job == 3_000_000
    assert served > 1


async def test_a_cancelled_caller_leaves_no_transaction_open(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")
    await stores.tasks.complete_task(task.task_id, "done")
    started = asyncio.Event()

    async def delete_slowly(conn: BackgroundConnection) -> int:
        deleted = await conn.execute("DELETE FROM deliveries")
        started.set()
        await conn.fetchall(SLOW_SQL, [1_000_000])
        return deleted

    caller = asyncio.create_task(stores.db.background_transaction(delete_slowly))
    await asyncio.wait_for(started.wait(), 20)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The work finishes on its own and commits; the write lock (SQLite) or the row
    # locks (PostgreSQL) are free again, so an inline write succeeds at once.
    assert await stores.deliveries.claim("after-cancel")
    assert await delete_finished_tasks(stores.db, -60) == 1


async def test_a_failing_background_statement_is_a_store_error_and_rolls_back(
    stores: Stores,
) -> None:
    task = await stores.tasks.create_task("q")
    await stores.tasks.complete_task(task.task_id, "done")

    async def half_done(conn: BackgroundConnection) -> None:
        await conn.execute("DELETE FROM tasks")
        await conn.execute("SELECT * FROM no_such_table")

    # The driver's words differ ("no such table" / "relation … does not exist").
    with pytest.raises(StoreError, match=r"no such table|no_such_table.* does not exist"):
        await stores.db.background_transaction(half_done)
    assert await stores.tasks.get_task(task.task_id) is not None  # rolled back
    # The connection is still good for the next piece of work.
    assert await delete_finished_tasks(stores.db, -60) == 1


@pytest.mark.backends(
    "sqlite",
    reason="SQLite has one background connection; PostgreSQL's pieces each take a pooled one",
)
async def test_background_work_runs_one_piece_at_a_time(stores: Stores) -> None:
    inside = 0
    most = 0

    async def work(conn: BackgroundConnection) -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await conn.fetchall(SLOW_SQL, [100_000])
        inside -= 1

    await asyncio.gather(*(stores.db.background_transaction(work) for _ in range(5)))
    assert most == 1


async def test_close_waits_for_background_work_then_refuses_more(db_target: str) -> None:
    s = await open_stores(db_target)
    for n in range(3):
        await s.tasks.create_task(f"q{n}")
    started = asyncio.Event()

    async def work(conn: BackgroundConnection) -> int:
        started.set()
        await conn.fetchall(SLOW_SQL, [500_000])
        return await conn.execute("DELETE FROM tasks")

    job = asyncio.create_task(s.db.background_transaction(work))
    await asyncio.wait_for(started.wait(), 20)
    await s.close()
    assert job.done() and await job == 3  # it finished before the connections closed
    with pytest.raises(StoreError, match="closed"):
        await s.deliveries.prune()
    assert raw_rows(db_target, "SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.backends("sqlite", reason="an in-memory SQLite database")
async def test_an_in_memory_store_runs_background_work_on_its_one_connection() -> None:
    async with await open_stores(":memory:") as s:
        task = await s.tasks.create_task("q")
        await s.events.append(task.task_id, "task_created")
        await s.tasks.complete_task(task.task_id, "done")
        await s.deliveries.claim("k")
        assert await s.deliveries.prune(older_than=-60) == 1
        assert await delete_finished_tasks(s.db, -60) == 1
        assert await s.tasks.get_task(task.task_id) is None
        # Inline statements still work after the background ones.
        assert (await s.tasks.create_task("again")).message == "again"


def test_a_process_that_closed_its_store_exits(db_target: str) -> None:
    # aiosqlite's thread is not a daemon: a background connection left open would
    # keep the interpreter alive after main() returns. close() must end it (and, on
    # PostgreSQL, the pool's connections).
    script = (
        "import asyncio, sys\n"
        "from runtime.store import open_stores\n"
        "from runtime.store.retention import delete_finished_tasks\n"
        "async def main():\n"
        "    async with await open_stores(sys.argv[1]) as s:\n"
        "        await delete_finished_tasks(s.db, 0)\n"
        "        await s.deliveries.prune()\n"
        "        await s.db.checkpoint()\n"
        "asyncio.run(main())\n"
        "print('done')\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script, db_target],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
