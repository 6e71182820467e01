"""Store growth: the audit and approval queries at 10k and at 1M events.

    python -m bench.store_growth [--small 10000] [--large 1000000]

Two SQLite files get their schema from `Database.open` (the real migrations and
indexes), then are bulk-loaded with stdlib `executemany` (10 events per task,
one approval per 10 tasks, 50 of them still pending, 20 global rule events,
tasks spread over 100 channels). Each query then runs through the real
store API (TaskStore / EventStore / ApprovalStore), repeated with random keys;
the printed ratio is the median time at the large size over the median at the
small size. Flat (about 1x) means the query is served by an index; a scan
would grow with the data (about 100x here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._common import print_header, verdict
from runtime.store.tasks import conversation_group

EVENTS_PER_TASK = 10
TASK_EVENTS = [
    "task_created",
    "model_call_started",
    "model_call_finished",
    "action_directive",
    "tool_call_started",
    "command_audit",
    "tool_call_finished",
    "model_call_started",
    "cognition_response",
    "task_completed",
]
PENDING = 50
RULE_EVENTS = 20
CHANNELS = 100
FLAT_LIMIT = 2.0  # the large/small ratio we call flat


def conversation(i: int) -> str:
    return f"slack:C{i % CHANNELS:04d}|1700000000.{i:06d}"


def payload(kind: str, i: int) -> str:
    if kind == "command_audit":
        body: dict[str, Any] = {
            "index": 1,
            "tool": "shell_exec_safe",
            "command": f"systemctl status web-{i % 50}",
            "risk_level": "low",
            "requires_approval": False,
            "approved": False,
            "ok": True,
            "returncode": 0,
            "duration_ms": 12,
        }
    elif kind == "task_created":
        body = {"message": f"why is web-{i % 50} slow?", "mode": "chat"}
    else:
        body = {"role": "action", "model": "gpt-4o-mini", "latency_ms": 800, "note": "x" * 60}
    return json.dumps(body)


async def build(path: Path, events: int, seed: int) -> dict[str, Any]:
    """Create the schema with Database.open, then bulk-load `events` events."""
    from runtime.store import Database

    db = await Database.open(path)
    await db.close()
    tasks = events // EVENTS_PER_TASK
    rng = random.Random(seed)
    base = time.time() - tasks  # one task a second, oldest first
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    task_ids = [f"{seed:02d}{i:030d}" for i in range(tasks)]
    conn.executemany(
        "INSERT INTO tasks (task_id, message, workspace, debug, status, conversation, "
        "requested_by, history_messages, final_response, error, created_at, updated_at, "
        "conversation_group) "
        "VALUES (?, ?, '/srv', 0, 'completed', ?, 'slack:U1', '[]', 'All good.', NULL, ?, ?, ?)",
        (
            (
                tid,
                f"why is web-{i % 50} slow?",
                conversation(i),
                base + i,
                base + i + 1,
                conversation_group(conversation(i)),
            )
            for i, tid in enumerate(task_ids)
        ),
    )

    def rows() -> Any:
        for i, tid in enumerate(task_ids):
            for seq, kind in enumerate(TASK_EVENTS, 1):
                yield tid, seq, kind, payload(kind, i), base + i + seq / 100

    conn.executemany(
        "INSERT INTO events (task_id, seq, event_type, payload, created_at) VALUES (?, ?, ?, ?, ?)",
        rows(),
    )
    # A rare type: the same 20 global rule events at every size, so the
    # query returns the same rows and only the table around them grows.
    conn.executemany(
        "INSERT INTO events (task_id, seq, event_type, payload, created_at) "
        "VALUES (NULL, ?, 'rule_created', '{}', ?)",
        ((n + 1, base + n * tasks / RULE_EVENTS) for n in range(RULE_EVENTS)),
    )
    approval_tasks = task_ids[::10]
    pending_from = len(approval_tasks) - PENDING
    conn.executemany(
        "INSERT INTO approvals (approval_id, task_id, idx, action, tool, command, risk_level, "
        "action_type, reason, requested_by, created_at, expires_at, decision, decided_by, "
        "decided_at, card_ref) VALUES (?, ?, 1, '{}', 'shell_exec_safe', 'systemctl restart web', "
        "'high', 'service_control', 'restarts a service', 'slack:U1', ?, NULL, ?, ?, ?, ?)",
        (
            (
                f"a{n:031d}",
                tid,
                base + n * 10,
                None if n >= pending_from else "approve",
                None if n >= pending_from else "slack:U2",
                None if n >= pending_from else base + n * 10 + 5,
                f"C0001:{n}",
            )
            for n, tid in enumerate(approval_tasks)
        ),
    )
    # The pending approvals' tasks wait, as they would.
    conn.executemany(
        "UPDATE tasks SET status = 'waiting_for_approval' WHERE task_id = ?",
        ((tid,) for tid in approval_tasks[pending_from:]),
    )
    conn.execute("COMMIT")
    count = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    conn.close()
    rng.shuffle(task_ids)
    return {
        "tasks": task_ids[:500],
        "pending_tasks": approval_tasks[pending_from:],
        "card_refs": [f"C0001:{n}" for n in range(0, len(approval_tasks), 7)][:500],
        "events": count,
    }


Query = Callable[[Any, random.Random, dict[str, Any]], Awaitable[Any]]

QUERIES: list[tuple[str, Query]] = [
    ("events.list_events(task)", lambda s, r, k: s.events.list_events(r.choice(k["tasks"]))),
    (
        "events.list_by_type('command_audit')",
        lambda s, r, k: s.events.list_by_type("command_audit", 100),
    ),
    (
        "events.list_by_type('rule_created')",
        lambda s, r, k: s.events.list_by_type("rule_created", 100),
    ),
    ("approvals.list_pending(100)", lambda s, r, k: s.approvals.list_pending(100)),
    (
        "approvals.pending_for_task(task)",
        lambda s, r, k: s.approvals.pending_for_task(r.choice(k["pending_tasks"])),
    ),
    (
        "approvals.find_by_card_ref(ref)",
        lambda s, r, k: s.approvals.find_by_card_ref(r.choice(k["card_refs"])),
    ),
    ("tasks.list_recent(20)", lambda s, r, k: s.tasks.list_recent(20)),
    (
        "tasks.list_recent(20, channel)",
        lambda s, r, k: s.tasks.list_recent(
            20, conversation_prefix=f"slack:C{r.randrange(CHANNELS):04d}|"
        ),
    ),
    ("tasks.get_task(task)", lambda s, r, k: s.tasks.get_task(r.choice(k["tasks"]))),
    (
        "events.append(task)  [write]",
        lambda s, r, k: s.events.append(r.choice(k["tasks"]), "bench_probe", {"n": 1}),
    ),
]

# The queries issue #7 names: list_events, pending approvals, the audit query.
TARGETED = frozenset(
    {
        "events.list_events(task)",
        "events.list_by_type('command_audit')",
        "events.list_by_type('rule_created')",
        "approvals.list_pending(100)",
        "approvals.pending_for_task(task)",
    }
)

PLANS = {
    "events.list_events(task)": (
        "SELECT * FROM events WHERE task_id IS ? ORDER BY seq",
        ("x",),
    ),
    "events.list_by_type('command_audit')": (
        "SELECT * FROM events WHERE event_type = ? ORDER BY id DESC LIMIT ?",
        ("command_audit", 100),
    ),
    "approvals.list_pending(100)": (
        "SELECT * FROM approvals WHERE decision IS NULL ORDER BY created_at, rowid LIMIT ?",
        (100,),
    ),
    "tasks.list_recent(20, channel)": (
        "SELECT * FROM tasks WHERE conversation_group = ? "
        "ORDER BY created_at DESC, rowid DESC LIMIT ?",
        ("slack:C0001", 20),
    ),
}


async def measure(
    paths: dict[str, Path], keys: dict[str, dict[str, Any]], repeats: int
) -> dict[str, dict[str, float]]:
    """Median time of every query at each size; the sizes alternate call by call,
    so a change in the machine's load hits both alike."""
    from runtime.store import open_stores

    stores = {label: await open_stores(path) for label, path in paths.items()}
    rngs = {label: random.Random(7) for label in paths}
    out: dict[str, dict[str, float]] = {label: {} for label in paths}
    try:
        for name, query in QUERIES:
            times: dict[str, list[float]] = {label: [] for label in paths}
            for label in paths:  # warm the page and statement caches
                for _ in range(100):
                    await query(stores[label], rngs[label], keys[label])
            for _ in range(repeats):
                for label in paths:
                    started = time.perf_counter()
                    await query(stores[label], rngs[label], keys[label])
                    times[label].append(time.perf_counter() - started)
            for label in paths:
                out[label][name] = statistics.median(times[label])
    finally:
        for store in stores.values():
            await store.close()
    return out


def plans(path: Path) -> dict[str, str]:
    conn = sqlite3.connect(path)
    try:
        return {
            name: "; ".join(
                row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
            )
            for name, (sql, params) in PLANS.items()
        }
    finally:
        conn.close()


async def amain(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ducklm-growth-") as tmp:
        sizes = {"small": args.small, "large": args.large}
        keys: dict[str, dict[str, Any]] = {}
        for label, events in sizes.items():
            started = time.perf_counter()
            keys[label] = await build(Path(tmp) / f"{label}.db", events, seed=len(keys))
            size_mb = (Path(tmp) / f"{label}.db").stat().st_size / 1e6
            print(
                f"   loaded {keys[label]['events']:,} events ({size_mb:.0f} MB) "
                f"in {time.perf_counter() - started:.1f} s"
            )
        paths = {label: Path(tmp) / f"{label}.db" for label in sizes}
        timed = await measure(paths, keys, args.repeats)
        small, large = timed["small"], timed["large"]
        query_plans = plans(Path(tmp) / "large.db")

    print()
    print(
        f"{'query (through the store API)':<40}{'10k µs':>10}{'1M µs':>10}{'ratio':>8}"
        if args.small == 10_000 and args.large == 1_000_000
        else f"{'query':<40}{'small µs':>10}{'large µs':>10}{'ratio':>8}"
    )
    worst = other = 0.0
    for name, _ in QUERIES:
        ratio = large[name] / small[name]
        if name in TARGETED:
            worst = max(worst, ratio)
        else:
            other = max(other, ratio)
        mark = "*" if name in TARGETED else " "
        print(f"{mark}{name:<39}{small[name] * 1e6:>10.0f}{large[name] * 1e6:>10.0f}{ratio:>7.2f}x")
    print()
    for name, plan in query_plans.items():
        print(f"   plan {name}: {plan}")
    print()
    print(
        f"target flat for the issue's queries (*: list_events, pending approvals, events by "
        f"type; ratio <= {FLAT_LIMIT:g}x): worst {worst:.2f}x -> {verdict(worst <= FLAT_LIMIT)}"
    )
    print(
        f"the other queries: worst {other:.2f}x"
        + ("" if other <= FLAT_LIMIT else " (NOT flat: see the plans above)")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    print_header("store growth: query times at two sizes")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
