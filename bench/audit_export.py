"""Audit export and verification at 100,000 events: rate and bounded memory.

    python -m bench.audit_export [--events 100000]

A SQLite file gets the real schema (`Database.open`) and is filled through the
real `EventStore.append_many` (so every event is hash-chained as in
production): 10 events per task, one shell action each (tool_call_started,
command_audit, tool_call_finished with output), a third of them approved.
Then, timed:

- `export_actions` (what `ducklm audit export` writes) to a counting sink;
- `verify` over every chain;
- the baseline: reading the same events with one plain `fetchall` and
  `json.loads` of each payload (the cheapest full read of the log).

Memory is the tracemalloc peak of a second, untimed run of each. The export and verify read in
pages, so their peak stays flat as the log grows (it is printed next to the
baseline's, which holds every row at once); the ratio of times says what
chaining and building records costs over a bare read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._common import print_header, verdict
from runtime.store import open_stores
from runtime.store.audit import export_actions, to_jsonl, verify

EVENTS_PER_TASK = 10
# The peak a paged export may reach, whatever the size of the log.
MAX_EXPORT_PEAK_MIB = 32.0


def _task_events(i: int) -> list[tuple[str, dict[str, Any]]]:
    command = f"cat logs/app-{i % 97}.log"
    approved = i % 3 == 0
    return [
        ("task_created", {"message": f"look at log {i}"}),
        ("model_call_started", {"role": "action"}),
        ("model_call_finished", {"role": "action", "latency_ms": 12}),
        ("action_directive", {"actions": [{"tool": "shell_exec_safe"}]}),
        (
            "tool_call_started",
            {"index": 1, "tool": "shell_exec_safe", "args": {"command": command}},
        ),
        (
            "command_audit",
            {
                "index": 1,
                "tool": "shell_exec_safe",
                "command": command,
                "risk_level": "low",
                "action_type": "read",
                "requires_approval": False,
                "blocked": False,
                "approved": approved,
                "approved_by": "slack:UBOB" if approved else None,
                "ok": True,
                "returncode": 0,
                "duration_ms": 4,
            },
        ),
        (
            "tool_call_finished",
            {"index": 1, "tool": "shell_exec_safe", "result": {"ok": True, "output": "x" * 200}},
        ),
        ("model_call_started", {"role": "thinker"}),
        ("model_call_finished", {"role": "thinker", "latency_ms": 30}),
        ("task_completed", {"final_response": "all fine"}),
    ]


async def _fill(path: Path, events: int) -> None:
    async with await open_stores(path) as stores:
        for i in range(events // EVENTS_PER_TASK):
            task = await stores.tasks.create_task(
                f"look at log {i}", conversation=f"slack:C{i % 50}|{i}.1", requested_by="slack:UA"
            )
            await stores.events.append_many(task.task_id, _task_events(i))


async def _measured(work: Callable[[], Awaitable[int]]) -> tuple[int, float, float]:
    """Time one run as it is, then the memory peak of a second run under tracemalloc
    (which slows allocation-heavy code several times, so it never times)."""
    started = time.perf_counter()
    count = await work()
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    await work()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return count, elapsed, peak / 1024 / 1024


async def run(events: int) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.db"
        started = time.perf_counter()
        await _fill(path, events)
        print(f"filled {events} chained events in {time.perf_counter() - started:.1f} s")
        async with await open_stores(path) as stores:

            async def export() -> int:
                written = 0
                async for record in export_actions(stores.db, 0.0):
                    written += len(to_jsonl(record))
                return written

            async def check() -> int:
                result = await verify(stores.db)
                assert result.ok, result.failures[:3]
                return result.events

            async def baseline() -> int:
                rows = await stores.db.fetchall("SELECT payload FROM events")
                return sum(1 for row in rows if json.loads(row["payload"]) is not None)

            size, t_export, m_export = await _measured(export)
            checked, t_verify, m_verify = await _measured(check)
            read, t_base, m_base = await _measured(baseline)
    assert checked == read == events
    print(
        f"export: {events / t_export:,.0f} events/s ({t_export:.2f} s, {size / 1e6:.1f} MB "
        f"of JSON lines), peak {m_export:.1f} MiB"
    )
    print(f"verify: {events / t_verify:,.0f} events/s ({t_verify:.2f} s), peak {m_verify:.1f} MiB")
    print(f"baseline full read: {events / t_base:,.0f} events/s, peak {m_base:.1f} MiB")
    print(f"export time / baseline: {t_export / t_base:.1f}x; verify: {t_verify / t_base:.1f}x")
    ok = m_export < MAX_EXPORT_PEAK_MIB and m_verify < MAX_EXPORT_PEAK_MIB
    print(f"bounded memory (< {MAX_EXPORT_PEAK_MIB:g} MiB): {verdict(ok)}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    print_header("audit export and verify")
    raise SystemExit(0 if asyncio.run(run(args.events)) else 1)


if __name__ == "__main__":
    main()
