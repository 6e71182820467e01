"""Runtime overhead: tasks per second through RuntimeLoop.run_chat, and the store's share.

    python -m bench.runtime_overhead [--tasks 1000] [--concurrency 8] [--profile]

A model that answers at once (a minimal OpenAI-compatible HTTP server on
127.0.0.1, in a thread of this process) drives the real loop, the real httpx
model client and the real SQLite store in two scenarios: no tools (action
model says `{"actions": []}`, thinker answers), and one read-only tool call
(`read_file` of a small file, then no more actions, then the answer).

Beside it, in the same run:

- the baseline: the same rows each task writes (its task row, every event with
  the same JSON payload, the final status update) inserted straight into SQLite
  with the stdlib driver in ONE transaction per task, on a file whose schema
  was created by `Database.open` (same indexes, WAL, synchronous=NORMAL);
- the loop's store work: the time spent inside TaskStore / EventStore /
  ApprovalStore / RuleStore calls and in its transactions (BEGIN, COMMIT)
  during the sequential run, per task; and one task's calls, recorded in
  order with their transactions, replayed through fresh stores with nothing
  else running.

Targets (issue #7): >= 300 tasks/s without tools on 2 cores; per-task store
cost within 3x of the raw inserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import io
import json
import pstats
import sqlite3
import sys
import tempfile
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from bench._common import (
    InstantModelServer,
    print_header,
    scripted_answer,
    settings_for,
    verdict,
)

READ_TOOL = {"tool": "read_file", "args": {"path": "notes.txt"}, "reason": "look at the notes"}
STORE_METHODS = {
    "tasks": (
        "create_task",
        "insert",
        "complete_task",
        "fail_task",
        "waiting_for_approval",
        "get_task",
    ),
    "events": ("append", "append_many", "list_events"),
    "approvals": ("insert", "get"),
    "rules": ("active_for_tool", "any_active", "unfilled", "longest_prefix", "matching"),
}


class StoreClock:
    """Wraps the store methods of one runtime (and its transactions: BEGIN, the
    lock, COMMIT) and adds up the time spent in them. With `recording` on it
    also keeps the calls in order, so one task's store work can be replayed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.enabled = False
        self.recording = False
        self.trace: list[tuple[Any, ...]] = []
        self._depth = 0  # a store method calling another (append -> append_many) counts once

    def install(self, stores: Any) -> None:
        for store_name, methods in STORE_METHODS.items():
            store = getattr(stores, store_name)
            for name in methods:
                setattr(store, name, self._wrap(store_name, name, getattr(store, name)))
        stores.db.transaction = self._wrap_transaction(stores.db.transaction)

    def _wrap(
        self, store: str, name: str, method: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return await method(*args, **kwargs)
            if self.recording:
                self.trace.append(("call", store, name, args, kwargs))
            started = time.perf_counter()
            self._depth += 1
            try:
                return await method(*args, **kwargs)
            finally:
                self._depth -= 1
                if self.enabled:
                    self.seconds += time.perf_counter() - started
                    self.calls += 1

        return timed

    def _wrap_transaction(self, transaction: Callable[[], Any]) -> Callable[[], Any]:
        clock = self

        @contextlib.asynccontextmanager
        async def timed() -> AsyncIterator[None]:
            if clock.recording:
                clock.trace.append(("begin",))
            inner = transaction()
            started = time.perf_counter()
            await inner.__aenter__()
            if clock.enabled:
                clock.seconds += time.perf_counter() - started
            try:
                yield
            except BaseException as exc:
                if not await inner.__aexit__(type(exc), exc, exc.__traceback__):
                    raise
            else:
                started = time.perf_counter()
                await inner.__aexit__(None, None, None)
                if clock.enabled:
                    clock.seconds += time.perf_counter() - started
            finally:
                if clock.recording:
                    clock.trace.append(("end",))

        return timed


async def run_tasks(loop: Any, workspace: str, count: int, concurrency: int) -> float:
    """Run `count` chat tasks, at most `concurrency` at once; returns elapsed seconds."""
    slots = asyncio.Semaphore(concurrency)
    failures: list[str] = []

    async def one(i: int) -> None:
        async with slots:
            result = await loop.run_chat(
                f"is web-{i % 10} healthy?", workspace, conversation=f"bench:C1|{i}"
            )
            if result.status != "completed":
                failures.append(result.final_response)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} tasks did not complete, e.g.: {failures[0]}")
    return elapsed


def raw_rows(task: Any, events: list[Any]) -> dict[str, Any]:
    """What one task writes, as plain values for the raw-insert baseline."""
    return {
        "message": task.message,
        "workspace": task.workspace,
        "conversation": task.conversation,
        "history": task.history_messages,
        "events": [(e.event_type, e.payload) for e in events],
        "final": task.final_response,
    }


def raw_insert_rate(db_path: Path, rows: dict[str, Any], count: int) -> float:
    """Seconds per task for the baseline: one stdlib sqlite3 transaction per task
    writing the task row, its events (JSON-encoded here, as the store must) and
    the final status, with sequence numbers computed in Python."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    events = rows["events"]
    started = time.perf_counter()
    for i in range(count):
        task_id = uuid.uuid4().hex
        ts = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO tasks (task_id, message, workspace, debug, status, conversation, "
            "requested_by, history_messages, final_response, error, created_at, updated_at) "
            "VALUES (?, ?, ?, 0, 'running', ?, NULL, ?, NULL, NULL, ?, ?)",
            (
                task_id,
                rows["message"],
                rows["workspace"],
                f"bench:C1|{i}",
                json.dumps(rows["history"]),
                ts,
                ts,
            ),
        )
        conn.executemany(
            "INSERT INTO events (task_id, seq, event_type, payload, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (task_id, seq, kind, json.dumps(payload, ensure_ascii=False), ts)
                for seq, (kind, payload) in enumerate(events, 1)
            ],
        )
        conn.execute(
            "UPDATE tasks SET status = 'completed', final_response = ?, updated_at = ? "
            "WHERE task_id = ?",
            (rows["final"], ts, task_id),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed / count


_INSERT_TASK = (
    "INSERT INTO tasks (task_id, message, workspace, debug, status, conversation, "
    "requested_by, history_messages, final_response, error, created_at, updated_at) "
    "VALUES (?, ?, ?, 0, 'running', ?, NULL, ?, NULL, NULL, ?, ?)"
)
# The statements the stores run, verbatim (sequence number computed in the INSERT).
_APPEND = (
    "INSERT INTO events (task_id, seq, event_type, payload, created_at) "
    "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM events WHERE task_id IS ? "
    "RETURNING seq"
)
_COMPLETE = (
    "UPDATE tasks SET status = 'completed', final_response = ?, updated_at = ? "
    "WHERE task_id = ? RETURNING 1"
)


def store_sql_autocommit_rate(db_path: Path, rows: dict[str, Any], count: int) -> float:
    """The stores' own statements, one autocommit transaction each, stdlib sqlite3
    on this thread: what per-statement commits cost without any async layer."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    started = time.perf_counter()
    for i in range(count):
        task_id, ts = uuid.uuid4().hex, time.time()
        conn.execute(
            _INSERT_TASK,
            (
                task_id,
                rows["message"],
                rows["workspace"],
                f"bench:C1|{i}",
                json.dumps(rows["history"]),
                ts,
                ts,
            ),
        )
        for kind, payload in rows["events"]:
            conn.execute(
                _APPEND, (task_id, kind, json.dumps(payload, ensure_ascii=False), ts, task_id)
            ).fetchall()
        conn.execute(_COMPLETE, (rows["final"], ts, task_id)).fetchall()
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed / count


def _swap(value: Any, old: str, new: str) -> Any:
    if value == old:
        return new
    if isinstance(value, str) and old in value:
        return value.replace(old, new)
    return value


async def replay(stores: Any, trace: list[tuple[Any, ...]], task_id: str, i: int) -> None:
    """Make one task's recorded store calls again, in order, with its transactions."""
    new_id = None
    stack = contextlib.AsyncExitStack()
    async with stack:
        for step in trace:
            if step[0] == "begin":
                await stack.enter_async_context(stores.db.transaction())
                continue
            if step[0] == "end":
                await stack.aclose()
                stack = contextlib.AsyncExitStack()
                continue
            _, store, name, args, kwargs = step
            if name == "insert":  # the task row: a fresh id for each replay
                new_id = uuid.uuid4().hex
                args = (
                    args[0].model_copy(update={"task_id": new_id, "conversation": f"bench:C1|{i}"}),
                )
            elif new_id is not None:
                args = tuple(_swap(a, task_id, new_id) for a in args)
            await getattr(getattr(stores, store), name)(*args, **kwargs)


async def store_replay_rate(stores: Any, trace: list[tuple[Any, ...]], count: int) -> float:
    """Seconds per task for the same store calls the loop made for one task
    (recorded), replayed through fresh stores with no model and no loop around."""
    task_id = next(s[3][0].task_id for s in trace if s[0] == "call" and s[2] == "insert")
    started = time.perf_counter()
    for i in range(count):
        await replay(stores, trace, task_id, i)
    return (time.perf_counter() - started) / count


async def scenario(
    name: str,
    tool_action: dict[str, Any] | None,
    args: argparse.Namespace,
    tmp: Path,
    results: dict[str, Any],
) -> None:
    from runtime.factory import build_runtime
    from runtime.store import Database, open_stores

    with InstantModelServer(scripted_answer(tool_action)) as server:
        settings = settings_for(tmp / name, server.base_url)
        (settings.workspace / "notes.txt").write_text("web-1: load 0.3, disk 41%\n")
        rt = await build_runtime(settings)
        clock = StoreClock()
        clock.install(rt.stores)
        workspace = str(settings.workspace)
        try:
            await run_tasks(rt.loop, workspace, 50, 1)  # warm up: imports, caches
            clock.enabled = True
            seq_elapsed = await run_tasks(rt.loop, workspace, args.tasks, 1)
            clock.enabled = False
            store_in_loop = clock.seconds / args.tasks
            calls = clock.calls / args.tasks
            con_elapsed = await run_tasks(rt.loop, workspace, args.tasks, args.concurrency)

            profile_text = None
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                await run_tasks(rt.loop, workspace, min(args.tasks, 500), args.concurrency)
                profiler.disable()
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
                profile_text = out.getvalue()

            clock.recording = True
            await run_tasks(rt.loop, workspace, 1, 1)
            clock.recording = False
            trace = [step for step in clock.trace if step[0] != "call" or step[2] != "get_task"]
            recent = await rt.stores.tasks.list_recent(1)
            sample = recent[0]
            events = await rt.stores.events.list_events(sample.task_id)
            rows = raw_rows(sample, events)
        finally:
            await rt.close()

    # Baselines on fresh files with the real schema.
    raw_db = tmp / f"{name}-raw.db"
    db = await Database.open(raw_db)  # creates the real schema
    await db.close()
    raw_per_task = raw_insert_rate(raw_db, rows, args.tasks)
    breakdown = {}
    path = tmp / f"{name}-autocommit.db"
    await (await Database.open(path)).close()
    breakdown["autocommit"] = store_sql_autocommit_rate(path, rows, args.tasks)
    replay_stores = await open_stores(tmp / f"{name}-replay.db")
    try:
        await store_replay_rate(replay_stores, trace, 50)
        replay_per_task = await store_replay_rate(replay_stores, trace, args.tasks)
    finally:
        await replay_stores.close()

    results[name] = {
        "events": len(rows["events"]),
        "seq_rate": args.tasks / seq_elapsed,
        "con_rate": args.tasks / con_elapsed,
        "store_in_loop": store_in_loop,
        "store_calls": calls,
        "replay": replay_per_task,
        "raw": raw_per_task,
        "breakdown": breakdown,
        "profile": profile_text,
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"{'scenario':<22}{'events':>7}{'seq tasks/s':>13}{f'x{args.concurrency} tasks/s':>13}"
        f"{'raw tasks/s':>13}{'raw/ours':>10}"
    )
    for name, r in results.items():
        raw_rate = 1 / r["raw"]
        best = max(r["seq_rate"], r["con_rate"])
        print(
            f"{name:<22}{r['events']:>7}{r['seq_rate']:>13.0f}{r['con_rate']:>13.0f}"
            f"{raw_rate:>13.0f}{raw_rate / best:>9.1f}x"
        )
    print()
    print("per-task store cost (ms): in the loop | replayed through the stores | raw sqlite3 tx")
    for name, r in results.items():
        print(
            f"  {name:<14} {r['store_in_loop'] * 1000:6.3f} ({r['store_calls']:.0f} calls) | "
            f"{r['replay'] * 1000:6.3f} | {r['raw'] * 1000:6.3f}   ratio in-loop/raw "
            f"{r['store_in_loop'] / r['raw']:5.1f}x, replay/raw {r['replay'] / r['raw']:5.1f}x"
        )
    print()
    print("where the store time goes (no tools, ms per task, each step adds one layer):")
    r = results["no tools"]
    steps = [
        ("raw inserts, one transaction per task", r["raw"]),
        ("the stores' SQL, one autocommit tx per statement", r["breakdown"]["autocommit"]),
        ("  ... as the loop makes them (stores, transactions)", r["replay"]),
        ("  ... inside the running loop (contention)", r["store_in_loop"]),
    ]
    previous = None
    for label, value in steps:
        delta = "" if previous is None else f"  (+{(value - previous) * 1000:.3f})"
        print(f"  {label:<52}{value * 1000:7.3f} ms  {value / r['raw']:4.1f}x{delta}")
        previous = value
    none = results["no tools"]
    best = max(none["seq_rate"], none["con_rate"])
    print()
    print(f"target >= 300 tasks/s without tools: {best:.0f} tasks/s -> {verdict(best >= 300)}")
    ratio = none["store_in_loop"] / none["raw"]
    print(
        f"target store cost <= 3x raw inserts: {ratio:.1f}x (in the loop), "
        f"{none['replay'] / none['raw']:.1f}x (replayed) -> {verdict(ratio <= 3)}"
    )
    if "no tools +sniffio" in results:
        shim = results["no tools +sniffio"]
        print(
            "note: sniffio is not installed, so httpcore fails `import sniffio` on every "
            f"request; with it importable the same run does "
            f"{max(shim['seq_rate'], shim['con_rate']):.0f} tasks/s "
            f"(+{(max(shim['seq_rate'], shim['con_rate']) / best - 1) * 100:.0f}%)"
        )
    for name, r in results.items():
        if r["profile"]:
            print(f"\n-- cProfile, {name}, x{args.concurrency}, top 25 by own time --")
            print(r["profile"])


def sniffio_missing() -> bool:
    try:
        import sniffio  # noqa: F401
    except ImportError:
        return True
    return False


@contextlib.contextmanager
def sniffio_shim() -> Iterator[None]:
    """What `pip install sniffio` would do for httpcore: `import sniffio` succeeds
    (httpcore imports it on every lock set-up; when it is missing, each import
    walks sys.path and fails)."""
    shim = types.ModuleType("sniffio")
    shim.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]
    sys.modules["sniffio"] = shim
    try:
        yield
    finally:
        del sys.modules["sniffio"]


async def amain(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ducklm-bench-") as tmp:
        await scenario("no tools", None, args, Path(tmp), results)
        await scenario("one read tool", READ_TOOL, args, Path(tmp), results)
        if sniffio_missing():
            with sniffio_shim():
                await scenario("no tools +sniffio", None, args, Path(tmp), results)
    report(results, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="cProfile a concurrent run")
    args = parser.parse_args()
    print_header("runtime overhead: RuntimeLoop.run_chat vs raw SQLite inserts")
    print(f"   {args.tasks} tasks per run, concurrency 1 and {args.concurrency}")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
