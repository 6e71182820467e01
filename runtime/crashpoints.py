"""Test-only crash hooks: die by SIGKILL at a named point of a code path.

The crash-consistency tests (issue #15) start a real `ducklm run` with
`DUCKLM_CRASH_AT=<name>` or `DUCKLM_CRASH_AT=<name>:<n>`; the process kills
itself with SIGKILL the n-th time (default: the first) it reaches
`crash_point(name)`, exactly between two steps whose gap recovery must close.
Unset (always, outside those tests) a crash point costs one dict lookup.

Points (see docs/architecture.md, "Outbox and recovery"):
- message_recorded   after accept()'s transaction committed, before the task row exists
- approval_recorded  after a new pending approval's row committed, before the task waits on it
- waiting_recorded   after task_waiting_for_approval committed, before the card is posted
- decision_recorded  after a decision committed, before the card is updated
- execution_claimed  after claim_execution committed, before tool_call_started is written
- command_spawned    after the approved command's process started, before it finishes
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
from collections.abc import Awaitable
from typing import Any, TypeVar

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


# Set while an armed `crash_after_spawn` runs its work: the spawn hook fires only
# for processes started in that task's context, not another task's.
_spawning: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ducklm_crash_spawning", default=None
)
_original_exec = asyncio.create_subprocess_exec


async def _exec_then_crash(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
    process = await _original_exec(*args, **kwargs)
    name = _spawning.get()
    if name is not None:
        crash_point(name)  # the process runs; its result is not known yet
    return process


async def crash_after_spawn(name: str, work: Awaitable[T]) -> T:
    """Run `work` (which starts a process) and reach `crash_point(name)` right after
    that process was started. Unarmed (always, outside the tests) it only awaits
    `work`; armed (see `armed`), asyncio's `create_subprocess_exec` (what the
    shell tool calls) is wrapped, which is the test seam's cost, not the bot's."""
    if not armed(name):
        return await work
    # Installed for good once armed: outside `work`'s context the wrapper is a
    # plain pass-through, so concurrent tasks never see each other's hook.
    asyncio.create_subprocess_exec = _exec_then_crash  # type: ignore[assignment]
    token = _spawning.set(name)
    try:
        return await work
    finally:
        _spawning.reset(token)
