"""The store's cost per task on PostgreSQL, against raw inserts of the same rows.

    python -m bench.pg_store [--tasks 60] [--concurrency 8] [--rounds 10]

A throwaway PostgreSQL server (tests/postgres.py: initdb into a temp dir,
127.0.0.1, a free port; durability settings off as in the tests) and one
database migrated by `open_stores`. Each task is the life of an approved
command, written as the runtime writes it, in six transactions:

1. the task, its owner replica and its first four events (task_created, the
   action model's call, its directive);
2. the approval, two events, the task waiting;
3. the decision (compare-and-set) and its event;
4. the continuation claimed (waiting -> running, owner) and its event;
5. the execution claimed (compare-and-set);
6. seven events (the tool run, the thinker's call, task_completed) and the task
   completed.

"store" goes through the store API (TaskStore, EventStore, ApprovalStore on
`Database`, asyncpg pool): placeholder translation, type conversion, the event
chain's advisory lock, head read and hashes, RETURNING. "raw" sends the same rows
in the same six transactions straight through an asyncpg pool of the same size
(the hashes are precomputed constants, the sequence numbers known in advance:
what a store without the cross-process guarantees would do). Both run
sequentially (latency per task) and with `--concurrency` tasks at once
(throughput), alternating in short rounds on the same database. The ratio is
store/raw time per task, the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bench._common import print_header

EVENT_PAYLOAD = {"model": "bench-action", "latency_ms": 12, "tokens": [10, 5], "note": "x" * 80}
FIRST = ["task_created", "model_call_started", "model_call_finished", "action_directive"]
ASKED = ["tool_approval_requested", "task_waiting_for_approval"]
LAST = [
    "tool_call_started",
    "command_audit",
    "tool_call_finished",
    "model_call_started",
    "model_call_finished",
    "cognition_response",
    "task_completed",
]
OWNER = "bench-replica:1:0000"  # the replica that runs the task (tasks.owner)
ACTION = {"tool": "shell_exec_safe", "args": {"command": "systemctl restart web"}, "reason": "r"}


# -- one task through the store API ------------------------------------------------


async def store_task(stores: Any, n: int) -> None:
    db, tasks, events, approvals = stores.db, stores.tasks, stores.events, stores.approvals
    task = tasks.new_task(f"please restart web-{n}", None, conversation=f"slack:CBENCH|{n}.0")
    async with db.transaction():
        await tasks.insert(task)
        await stores.ownership.own(task.task_id, OWNER)
        await events.append_many(task.task_id, [(k, EVENT_PAYLOAD) for k in FIRST])
    async with db.transaction():
        approval = await approvals.insert(
            task.task_id,
            ACTION,
            command="systemctl restart web",
            risk_level="high",
            action_type="write",
            reason="r",
            requested_by="slack:UASKER",
        )
        await events.append_many(task.task_id, [(k, EVENT_PAYLOAD) for k in ASKED])
        await tasks.update_status(task.task_id, "waiting_for_approval")
    async with db.transaction():
        assert await approvals.decide(approval.approval_id, "approve", "slack:UAPPROVER")
        await events.append(task.task_id, "approval_decided", EVENT_PAYLOAD)
    async with db.transaction():
        assert await stores.ownership.claim_continuation(task.task_id, OWNER)
        await events.append(task.task_id, "task_continued", EVENT_PAYLOAD)
    assert await approvals.claim_execution(approval.approval_id)
    async with db.transaction():
        await events.append_many(task.task_id, [(k, EVENT_PAYLOAD) for k in LAST])
        await tasks.complete_task(task.task_id, "web restarted")


# -- the same rows, raw ---------------------------------------------------------------

TASK_SQL = (
    "INSERT INTO tasks (task_id, message, workspace, debug, status, conversation, "
    "requested_by, history_messages, final_response, error, created_at, updated_at, "
    "conversation_group, owner) VALUES ($1, $2, NULL, 0, 'running', $3, NULL, '[]', NULL, "
    "NULL, $4, $4, $5, $6)"
)
APPROVAL_SQL = (
    "INSERT INTO approvals (approval_id, task_id, idx, action, tool, command, risk_level, "
    "action_type, reason, requested_by, created_at, expires_at, card_state) "
    "VALUES ($1, $2, 1, $3, 'shell_exec_safe', 'systemctl restart web', 'high', 'write', "
    "'r', 'slack:UASKER', $4, NULL, 'unposted')"
)
FAKE_HASH = "0" * 64


def events_sql(count: int) -> str:
    values = ", ".join(
        f"(${i * 6 + 1}, ${i * 6 + 2}, ${i * 6 + 3}, ${i * 6 + 4}, ${i * 6 + 5}, ${i * 6 + 6})"
        for i in range(count)
    )
    return (
        f"INSERT INTO events (task_id, seq, event_type, payload, created_at, hash) VALUES {values}"
    )


def event_params(task_id: str, first_seq: int, kinds: list[str]) -> list[Any]:
    text, at = json.dumps(EVENT_PAYLOAD, sort_keys=True), time.time()
    params: list[Any] = []
    for k, kind in enumerate(kinds):
        params += (task_id, first_seq + k, kind, text, at, FAKE_HASH)
    return params


async def raw_task(pool: Any, n: int) -> None:
    task_id, approval_id, at = uuid.uuid4().hex, uuid.uuid4().hex, time.time()
    conversation = f"slack:CBENCH|{n}.0"
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute(
                TASK_SQL,
                task_id,
                f"please restart web-{n}",
                conversation,
                at,
                "slack:CBENCH",
                OWNER,
            )
            await conn.execute(events_sql(len(FIRST)), *event_params(task_id, 1, FIRST))
        async with conn.transaction():
            await conn.execute(APPROVAL_SQL, approval_id, task_id, json.dumps(ACTION), time.time())
            await conn.execute(events_sql(len(ASKED)), *event_params(task_id, 5, ASKED))
            await conn.execute(
                "UPDATE tasks SET status = 'waiting_for_approval', updated_at = $1 "
                "WHERE task_id = $2",
                time.time(),
                task_id,
            )
        async with conn.transaction():
            await conn.execute(
                "UPDATE approvals SET decision = 'approve', decided_by = $1, decided_at = $2 "
                "WHERE approval_id = $3",
                "slack:UAPPROVER",
                time.time(),
                approval_id,
            )
            await conn.execute(events_sql(1), *event_params(task_id, 7, ["approval_decided"]))
        async with conn.transaction():
            await conn.execute(
                "UPDATE tasks SET status = 'running', owner = $1, updated_at = $2 "
                "WHERE task_id = $3",
                OWNER,
                time.time(),
                task_id,
            )
            await conn.execute(events_sql(1), *event_params(task_id, 8, ["task_continued"]))
        await conn.execute(
            "UPDATE approvals SET executed_at = $1 WHERE approval_id = $2", time.time(), approval_id
        )
        async with conn.transaction():
            await conn.execute(events_sql(len(LAST)), *event_params(task_id, 9, LAST))
            await conn.execute(
                "UPDATE tasks SET status = 'completed', final_response = 'web restarted', "
                "updated_at = $1 WHERE task_id = $2",
                time.time(),
                task_id,
            )


# -- measuring ----------------------------------------------------------------------------


async def timed(run: Callable[[int], Awaitable[None]], count: int, concurrency: int) -> float:
    """Seconds per task for `count` tasks, `concurrency` at a time."""
    numbers = iter(range(count))
    started = time.perf_counter()

    async def worker() -> None:
        for n in numbers:
            await run(n)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - started) / count


async def bench(url: str, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    import asyncpg

    from runtime.store import open_stores

    stores = await open_stores(url, pool_size=args.pool)
    pool = await asyncpg.create_pool(url, min_size=args.pool, max_size=args.pool)
    serial = itertools.count(1)
    results: dict[str, dict[str, list[float]]] = {
        mode: {"store": [], "raw": []} for mode in ("sequential", "concurrent")
    }
    try:
        # Warm-up: connections, prepared statements, the first pages of each table.
        await timed(lambda n: store_task(stores, -1 - n), 30, 1)
        await timed(lambda n: raw_task(pool, -1 - n), 30, 1)
        for _ in range(args.rounds):
            for mode, concurrency in (("sequential", 1), ("concurrent", args.concurrency)):
                base = next(serial) * args.tasks
                results[mode]["store"].append(
                    await timed(
                        lambda n, base=base: store_task(stores, base + n), args.tasks, concurrency
                    )
                )
                results[mode]["raw"].append(
                    await timed(
                        lambda n, base=base: raw_task(pool, base + n), args.tasks, concurrency
                    )
                )
        rows = await pool.fetchval("SELECT COUNT(*) FROM events")
        print(f"   {rows} events written in all")
    finally:
        await pool.close()
        await stores.db.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=60, help="tasks per round and mode")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--pool", type=int, default=10, help="connections in each pool")
    args = parser.parse_args()
    print_header("Store cost per task on PostgreSQL: store API vs raw asyncpg inserts")

    from tests.postgres import PostgresServer

    server = PostgresServer()
    server.start()
    try:
        version = server.admin_query("SHOW server_version")[0][0]
        print(
            f"   PostgreSQL {version} on 127.0.0.1 (fsync off); {args.rounds} rounds of "
            f"{args.tasks} tasks per mode; 6 transactions, 15 events, 1 approval per task"
        )
        url = server.url(server.create_database("bench"))
        results = asyncio.run(bench(url, args))
    finally:
        server.stop()

    print()
    ratios = {}
    for mode, pair in results.items():
        store, raw = statistics.median(pair["store"]), statistics.median(pair["raw"])
        # The median of the per-round ratios: each round's two halves ran back to
        # back, so load from other work on the machine mostly cancels in a round.
        per_round = [s / r for s, r in zip(pair["store"], pair["raw"], strict=True)]
        ratios[mode] = statistics.median(per_round)
        label = "1 at a time" if mode == "sequential" else f"{args.concurrency} at a time"
        print(
            f"   {mode:<10} ({label}): store {store * 1000:6.2f} ms/task "
            f"({1 / store:6.0f} tasks/s), raw {raw * 1000:6.2f} ms/task ({1 / raw:6.0f} tasks/s)"
        )
        rounds = ", ".join(f"{r:.2f}" for r in per_round)
        print(f"   {'':<10} store/raw per round: {rounds}; median {ratios[mode]:.2f}x")
    print()
    print(
        "store/raw time per task: "
        + ", ".join(f"{mode} {ratio:.2f}x" for mode, ratio in ratios.items())
    )


if __name__ == "__main__":
    main()
