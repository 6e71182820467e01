"""Test-only crash hooks: die by SIGKILL at a named point of a code path.

The crash-consistency tests (issue #15) start a real `ducklm run` with
`DUCKLM_CRASH_AT=<name>` or `DUCKLM_CRASH_AT=<name>:<n>`; the process kills
itself with SIGKILL the n-th time (default: the first) it reaches
`crash_point(name)`, exactly between two steps whose gap recovery must close.
Unset (always, outside those tests) a crash point costs one dict lookup.

Points (see docs/architecture.md, "Outbox and recovery"):
- message_recorded   after accept()'s transaction committed, before the task row exists
- waiting_recorded   after task_waiting_for_approval committed, before the card is posted
- decision_recorded  after a decision committed, before the card is updated
- execution_claimed  after claim_execution committed, before tool_call_started is written
- command_spawned    after the approved command's process started, before it finishes
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_ENV = "DUCKLM_CRASH_AT"
_reached: dict[str, int] = {}


def _target(value: str) -> tuple[str, int]:
    name, sep, count = value.partition(":")
    if not sep:
        return name, 1
    try:
        return name, max(1, int(count))
    except ValueError:
        raise ValueError(f"{_ENV}={value!r}: expected <name> or <name>:<n>") from None


def crash_point(name: str) -> None:
    """SIGKILL this process if DUCKLM_CRASH_AT names this point (and this is the n-th visit)."""
    value = os.environ.get(_ENV)
    if not value:
        return
    target, nth = _target(value)
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == nth:
        os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether DUCKLM_CRASH_AT names this point (for seams that cost more than a lookup)."""
    value = os.environ.get(_ENV)
    return bool(value) and _target(value)[0] == name


def _children() -> set[int]:
    """This process's child pids (Linux: every thread's /proc children list)."""
    pids: set[int] = set()
    for path in Path("/proc/self/task").glob("*/children"):
        try:
            pids.update(int(pid) for pid in path.read_text().split())
        except OSError:
            continue
    return pids


async def crash_after_spawn(name: str, work: Awaitable[T], *, within: float = 10.0) -> T:
    """Run `work` (which starts a process); once a new child process exists, reach
    `crash_point(name)`. Only used while the point is armed (see `armed`): the
    polling is the test seam's cost, not the bot's."""
    before = _children()
    job = asyncio.ensure_future(work)
    deadline = time.monotonic() + within
    while not job.done() and time.monotonic() < deadline:
        if _children() - before:
            crash_point(name)
            break
        await asyncio.sleep(0.002)
    return await job
