"""The store's background connection (aiosqlite): slow work leaves the loop
free, runs one piece at a time, and never leaves a transaction open behind it.
Real SQLite files, real threads; nothing is mocked."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiosqlite
import pytest

from runtime.store import StoreError, Stores, open_stores
from runtime.store.retention import delete_finished_tasks

# A statement that keeps SQLite busy for a while (counting in a recursive CTE).
SLOW_SQL = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "SELECT count(*) FROM n"
)


@pytest.fixture
async def stores(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = await open_stores(tmp_path / "duck.db")
    yield s
    await s.close()


async def test_background_work_gets_an_aiosqlite_connection_to_the_same_file(
    stores: Stores,
) -> None:
    task = await stores.tasks.create_task("q")

    async def work(conn: aiosqlite.Connection) -> tuple[type, int]:
        sql = "SELECT count(*) FROM tasks WHERE task_id = ?"
        (row,) = await conn.execute_fetchall(sql, [task.task_id])
        return type(conn), row[0]

    kind, count = await stores.db.background_transaction(work)
    assert issubclass(kind, aiosqlite.Connection)
    assert count == 1


async def test_the_loop_keeps_serving_while_background_work_runs(stores: Stores) -> None:
    task = await stores.tasks.create_task("q")

    async def slow(conn: aiosqlite.Connection) -> int:
        (row,) = await conn.execute_fetchall(SLOW_SQL, [3_000_000])
        return int(row[0])

    job = asyncio.create_task(stores.db.background_transaction(slow))
    served = 0
    # While the slow statement runs in aiosqlite's thread, inline reads go on.
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

    async def delete_slowly(conn: aiosqlite.Connection) -> int:
        async with conn.execute("DELETE FROM deliveries") as cursor:
            deleted = cursor.rowcount
        started.set()
        await conn.execute_fetchall(SLOW_SQL, [1_000_000])
        return deleted

    caller = asyncio.create_task(stores.db.background_transaction(delete_slowly))
    await asyncio.wait_for(started.wait(), 20)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The work finishes on its own and commits; the write lock is free again,
    # so an inline write succeeds at once rather than waiting out BUSY_TIMEOUT_S.
    assert await stores.deliveries.claim("after-cancel")
    assert await delete_finished_tasks(stores.db, -60) == 1


async def test_a_failing_background_statement_is_a_store_error_and_rolls_back(
    stores: Stores,
) -> None:
    task = await stores.tasks.create_task("q")
    await stores.tasks.complete_task(task.task_id, "done")

    async def half_done(conn: aiosqlite.Connection) -> None:
        await conn.execute("DELETE FROM tasks")
        await conn.execute("SELECT * FROM no_such_table")

    with pytest.raises(StoreError, match="no such table"):
        await stores.db.background_transaction(half_done)
    assert await stores.tasks.get_task(task.task_id) is not None  # rolled back
    # The connection is still good for the next piece of work.
    assert await delete_finished_tasks(stores.db, -60) == 1


async def test_background_work_runs_one_piece_at_a_time(stores: Stores) -> None:
    inside = 0
    most = 0

    async def work(conn: aiosqlite.Connection) -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await conn.execute_fetchall(SLOW_SQL, [100_000])
        inside -= 1

    await asyncio.gather(*(stores.db.background_transaction(work) for _ in range(5)))
    assert most == 1


async def test_close_waits_for_background_work_then_refuses_more(tmp_path: Path) -> None:
    s = await open_stores(tmp_path / "duck.db")
    for n in range(3):
        await s.tasks.create_task(f"q{n}")
    started = asyncio.Event()

    async def work(conn: aiosqlite.Connection) -> int:
        started.set()
        await conn.execute_fetchall(SLOW_SQL, [500_000])
        async with conn.execute("DELETE FROM tasks") as cursor:
            return cursor.rowcount

    job = asyncio.create_task(s.db.background_transaction(work))
    await asyncio.wait_for(started.wait(), 20)
    await s.close()
    assert job.done() and await job == 3  # it finished before the connections closed
    with pytest.raises(StoreError, match="closed"):
        await s.deliveries.prune()
    with sqlite3.connect(tmp_path / "duck.db") as raw:
        assert raw.execute("SELECT count(*) FROM tasks").fetchone() == (0,)


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


def test_a_process_that_closed_its_store_exits(tmp_path: Path) -> None:
    # aiosqlite's thread is not a daemon: a background connection left open would
    # keep the interpreter alive after main() returns. close() must end it.
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
        [sys.executable, "-c", script, str(tmp_path / "duck.db")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
