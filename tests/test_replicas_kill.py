"""Issue #19: kill -9 of a replica with a running task. Three `ducklm run`
replicas on one PostgreSQL; one of them runs a task that hangs on the model, the
two others each run a task held (at the model) by the test. After a SIGKILL of
the first, a survivor sees its heartbeat stop and reports its task interrupted
(the thread gets the note once, `ducklm events` shows task_interrupted); the
survivors' own running tasks are untouched and finish normally, and new work
through the proxy goes to the survivors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.crash_harness import answers, cards, click, mention, said, wait_for
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.slack_api import FakeSlack
from tests.replicas import (
    REPLICA_TIMEOUT,
    HeldScript,
    ReplicaSet,
    ducklm_cli,
    replica_db,
    wait_until,
)

__all__ = ["replica_db"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(240)


@pytest_asyncio.fixture
async def script(model_server: FakeModelServer) -> HeldScript:
    return HeldScript(model_server)


@pytest_asyncio.fixture
async def replicas(
    tmp_path: Path,
    slack: FakeSlack,
    model_server: FakeModelServer,
    script: HeldScript,
    replica_db: str,
) -> AsyncIterator[ReplicaSet]:
    group = ReplicaSet(tmp_path, slack, model_server, db=replica_db, count=3)
    try:
        await group.start()
        yield group
    finally:
        script.release()  # a failed test must not leave the model holding requests
        await group.close()


async def test_a_killed_replicas_task_is_interrupted_by_a_survivor_and_nothing_else(
    replicas: ReplicaSet, slack: FakeSlack, script: HeldScript, tmp_path: Path
) -> None:
    db = replicas.db
    doomed = mention(slack, "what about hang-1")
    held = [mention(slack, f"what about hold-{i}") for i in (1, 2)]
    assert (await replicas.post_event(doomed.envelope, to=0)).status == 200, replicas.stderr()
    for i, m in enumerate(held, 1):
        assert (await replicas.post_event(m.envelope, to=i)).status == 200, replicas.stderr()

    async def all_running() -> bool:
        statuses = [await db.status_of(m.conversation) for m in (doomed, *held)]
        return statuses == ["running"] * 3 and script.holding == {"hold-1", "hold-2"}

    await wait_until(all_running, "the three tasks to run (and wait on the model)", within=60)
    [(doomed_task, _)] = await db.tasks_of(doomed.conversation)
    held_tasks = [(await db.tasks_of(m.conversation))[0][0] for m in held]

    # Each task is owned by the replica that took its delivery.
    async def owner_name(task_id: str) -> str | None:
        found = await db.rows(
            "SELECT r.name FROM tasks t JOIN replicas r ON r.replica_id = t.owner "
            "WHERE t.task_id = ?",
            (task_id,),
        )
        return str(found[0][0]) if found else None

    assert await owner_name(doomed_task) == replicas[0].name
    assert [await owner_name(t) for t in held_tasks] == [replicas[1].name, replicas[2].name]
    before = await db.event_types(doomed_task)

    await replicas[0].kill()

    # No heartbeat for DUCKLM_REPLICA_TIMEOUT, then a survivor's recovery round.
    async def interrupted() -> bool:
        return await db.status_of(doomed.conversation) == "interrupted"

    await wait_until(
        interrupted,
        "a survivor to mark the dead replica's task interrupted",
        within=float(REPLICA_TIMEOUT) + 30,
    )
    told = await wait_for(
        slack, lambda: said(slack, doomed.ts, "interrupted"), "the thread to be told", 30
    )
    # The survivors' tasks are still running, untouched, while that happened.
    for m, task_id in zip(held, held_tasks, strict=True):
        assert await db.status_of(m.conversation) == "running", replicas.stderr()
        assert "task_interrupted" not in await db.event_types(task_id)

    # New work goes through the proxy to the survivors (the dead one refuses).
    fresh = mention(slack, "is web-4 healthy?")
    served = await replicas.post_event(fresh.envelope, to=None)
    assert served.status == 200 and served.replica in (1, 2), served
    await wait_for(slack, lambda: answers(slack, fresh.ts), "the new mention's answer", 60)

    script.release()
    for m in held:
        await wait_for(slack, lambda m=m: answers(slack, m.ts), f"{m.text}'s answer", 60)
    replicas.assert_alive()
    await replicas.stop()

    assert len(told) == 1 and len(said(slack, doomed.ts, "interrupted")) == 1, said(
        slack, doomed.ts
    )
    assert answers(slack, doomed.ts) == []
    events = await db.events_of(doomed_task)
    assert [kind for _, kind, _ in events] == [*before, "task_interrupted"]
    assert events[-1][2]["last_event"] == before[-1]
    for i, (m, task_id) in enumerate(zip(held, held_tasks, strict=True), 1):
        assert answers(slack, m.ts) == [f"Answer: hold-{i}."]
        assert await db.status_of(m.conversation) == "completed"
        kinds = await db.event_types(task_id)
        assert "task_interrupted" not in kinds and kinds[-1] == "task_completed", kinds
    assert await db.status_of(fresh.conversation) == "completed"
    await db.assert_consistent()

    code, out = await ducklm_cli(tmp_path, replicas.db_target, "events", doomed_task)
    assert code == 0 and "task_interrupted" in out, out
    code, out = await ducklm_cli(tmp_path, replicas.db_target, "audit", "verify")
    assert code == 0, out


async def test_a_replica_killed_after_spawning_an_approved_command_is_reissued_once(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer, replica_db: str
) -> None:
    """Replica 0 dies by SIGKILL right after it spawned an approved command
    (DUCKLM_CRASH_AT=command_spawned): whether the command ran is unknown. Both
    survivors run recovery rounds; between them the thread is told once, one new
    card is posted for the same command, and approving it runs the command once."""
    HeldScript(model_server)
    group = ReplicaSet(tmp_path, slack, model_server, db=replica_db, count=3)
    try:
        await group.start(crash_at={0: "command_spawned"})
        asked = mention(slack, "please run approve-4")
        assert (await group.post_event(asked.envelope, to=1)).status == 200, group.stderr()
        [card] = await wait_for(slack, lambda: cards(slack, asked.ts), "the approval card", 60)
        # The click lands on replica 0: it claims the continuation and runs the command.
        assert (await group.post_interaction(click(slack, card), to=0)).status in (200, 502)
        await group[0].crashed("command_spawned")

        found = await wait_for(
            slack,
            lambda: cards(slack, asked.ts)[1:],
            "a survivor to offer the command again",
            within=float(REPLICA_TIMEOUT) + 40,
        )
        assert len(found) == 1, found
        new_card = found[0]
        db = group.db
        [(task_id, status)] = await db.tasks_of(asked.conversation)
        assert status == "waiting_for_approval", status
        told = said(slack, asked.ts, "may have started")
        assert len(told) == 1, said(slack, asked.ts)

        # The new card works on any survivor, once.
        assert (await group.post_interaction(click(slack, new_card), to=2)).status == 200
        await wait_for(slack, lambda: answers(slack, asked.ts), "the answer after re-approval", 60)
        group.assert_alive()
        await group.stop()

        assert answers(slack, asked.ts) == ["Answer: approve-4."]
        assert len(cards(slack, asked.ts)) == 2
        assert len(said(slack, asked.ts, "may have started")) == 1
        # The first run may or may not have written its line before the kill.
        assert group.effects() in (["approve-4"], ["approve-4", "approve-4"])
        events = await db.events_of(task_id)
        kinds = [kind for _, kind, _ in events]
        assert kinds.count("task_interrupted") == 1, kinds
        assert kinds.count("approval_reissued") == 1, kinds
        assert kinds[-1] == "task_completed", kinds
        approvals = {a["approval_id"]: a for a in await db.approvals_of(task_id)}
        assert set(approvals) == {card.approval_id, new_card.approval_id}
        assert approvals[new_card.approval_id]["decision"] == "approve"
        await db.assert_consistent()
    finally:
        await group.close()
