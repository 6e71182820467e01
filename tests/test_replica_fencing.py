"""A replica taken for dead keeps its hands off what survivors took over (issue
#19): a replica paused past DUCKLM_REPLICA_TIMEOUT resumes with turns in flight
whose tasks a survivor reported interrupted meanwhile. Its status writes are
fenced (only while the task is still running and its own), and its late
heartbeat stops those turns before they call another tool. Real loop, real
fake-model HTTP server, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.service import ChatService
from runtime.factory import build_runtime
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import FakeModelServer, RecordedRequest, Text

pytestmark = [pytest.mark.timeout(120), pytest.mark.backends("sqlite", "postgres")]


async def until(check: Callable[[], Awaitable[Any]], within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        outcome = await check()
        if outcome:
            return outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within} s")
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def service(
    tmp_path: Path, db_target: str, model_server: FakeModelServer, clean_env: None
) -> AsyncIterator[ChatService]:
    settings = make_settings(
        tmp_path,
        model_server.base_url,
        db=db_target,
        requesters=["*"],
        heartbeat_interval=30,  # the test beats by hand
        replica_timeout=60,
    )
    rt = await build_runtime(settings)
    chat = ChatService(rt)
    await chat.start()
    try:
        yield chat
    finally:
        await chat.close()
        await rt.close()


class Gate:
    """Holds the action model's first answer until opened, then gives `first`;
    later calls get `later`. (An async handler: the fake server runs on the
    test's event loop.)"""

    def __init__(self, first: str, later: str) -> None:
        self.open = asyncio.Event()
        self.first, self.later = first, later
        self.calls = 0

    async def __call__(self, request: RecordedRequest) -> Text:
        self.calls += 1
        if self.calls == 1:
            await asyncio.wait_for(self.open.wait(), 30)
            return Text(self.first)
        return Text(self.later)


async def held_task(
    service: ChatService, model_server: FakeModelServer, gate: Gate
) -> tuple[asyncio.Task[Any], str]:
    """A real turn, stored as running and owned by this replica, held in its first
    model call."""
    model_server.set_handler(ACTION, gate)
    model_server.set_default(THINKER, Text("the answer"))
    job = asyncio.create_task(
        service.loop.run_chat("what runs?", conversation="slack:C1|q", requested_by="U1")
    )
    ownership = service.runtime.stores.ownership
    (task_id,) = await until(lambda: ownership.running_by(service.instance))
    await until(lambda: asyncio.sleep(0, result=gate.calls >= 1))
    return job, task_id


async def interrupt_as_a_survivor(service: ChatService) -> list[str]:
    """What another replica's recovery does once this one's heartbeat looks old."""
    return await service.runtime.stores.ownership.interrupt_orphans(
        "survivor", live_after=time.time() + 60, unowned_before=0.0, limit=10
    )


async def test_a_taken_over_task_keeps_the_status_the_survivor_set(
    service: ChatService, model_server: FakeModelServer
) -> None:
    gate = Gate(directive(), directive())
    job, task_id = await held_task(service, model_server, gate)
    assert await interrupt_as_a_survivor(service) == [task_id]
    gate.open.set()  # the paused replica resumes: its turn finishes and writes
    result = await asyncio.wait_for(job, 30)
    stores = service.runtime.stores
    task = await stores.tasks.get_task(task_id)
    assert task is not None and task.status == "interrupted" and task.final_response is None
    assert result.already_handled and result.status == "interrupted"  # nothing to post
    kinds = [e.event_type for e in await stores.events.list_events(task_id)]
    assert "task_completed" not in kinds and "task_failed" not in kinds, kinds


async def test_a_late_heartbeat_stops_the_turns_of_tasks_taken_over(
    service: ChatService, model_server: FakeModelServer
) -> None:
    gate = Gate(directive(shell("ls")), directive())
    job, task_id = await held_task(service, model_server, gate)
    replica = service.replica
    assert await interrupt_as_a_survivor(service) == [task_id]
    replica.last_beat = time.time() - replica.timeout - 1  # paused past the timeout
    await replica.beat()
    gate.open.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(job, 30)
    stores = service.runtime.stores
    task = await stores.tasks.get_task(task_id)
    assert task is not None and task.status == "interrupted"
    kinds = [e.event_type for e in await stores.events.list_events(task_id)]
    assert "tool_call_started" not in kinds and "task_completed" not in kinds, kinds
    assert gate.calls == 1  # no further model call either


async def test_a_late_heartbeat_leaves_the_replicas_own_running_tasks_alone(
    service: ChatService, model_server: FakeModelServer
) -> None:
    gate = Gate(directive(), directive())
    job, _ = await held_task(service, model_server, gate)
    replica = service.replica
    replica.last_beat = time.time() - replica.timeout - 1
    await replica.beat()  # late, but nobody took the task: it runs on
    assert await service.loop.stop_lost_tasks() == []
    gate.open.set()
    result = await asyncio.wait_for(job, 30)
    assert result.status == "completed" and result.final_response == "the answer"
