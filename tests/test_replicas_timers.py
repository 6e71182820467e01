"""Issue #19: timed work fires once across replicas. Three `ducklm run` replicas
on one PostgreSQL; an approval's reminder and expiry, and a scheduled prompt,
each happen once (one post in chat, one event, one task), however many
processes are watching the same due times. Each fire is claimed in the shared
store by compare-and-set (bot/scheduler.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.crash_harness import (
    APPROVERS,
    CHANNEL,
    ModelScript,
    answers,
    cards,
    mention,
    said,
    wait_for,
)
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.slack_api import FakeSlack, slash_command_form
from tests.replicas import Database, ReplicaSet, ducklm_cli, replica_db, wait_until

__all__ = ["replica_db"]  # the fixture, imported for pytest

# A five-field cron fires at most once a minute: the scheduled run may be up to
# a minute away when the test adds it.
pytestmark = pytest.mark.timeout(300)

ADMIN = APPROVERS[0]
REMIND_S = 2
TTL_S = 8


@pytest_asyncio.fixture
async def replicas(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer, replica_db: str
) -> AsyncIterator[ReplicaSet]:
    ModelScript(model_server)
    group = ReplicaSet(
        tmp_path,
        slack,
        model_server,
        db=replica_db,
        count=3,
        DUCKLM_APPROVAL_REMIND=str(REMIND_S),
        DUCKLM_APPROVAL_TTL=str(TTL_S),
        DUCKLM_ADMINS=f"slack:{ADMIN}",
    )
    try:
        await group.start()
        yield group
    finally:
        await group.close()


def scheduled_roots(slack: FakeSlack, schedule_id: str) -> list[dict[str, object]]:
    """The root messages of a schedule's runs in the channel."""
    return [
        m
        for m in slack.posted(CHANNEL)
        if not m.get("thread_ts") and str(m["text"]).startswith(f"Scheduled run of `{schedule_id}`")
    ]


async def test_a_reminder_and_an_expiry_each_happen_once(
    replicas: ReplicaSet, slack: FakeSlack
) -> None:
    asked = mention(slack, "please run approve-7")
    assert (await replicas.post_event(asked.envelope)).status == 200, replicas.stderr()
    await wait_for(slack, lambda: cards(slack, asked.ts), "the approval card", 60)
    await wait_for(
        slack, lambda: said(slack, asked.ts, "reminder", "waiting for approval"), "the reminder", 30
    )
    await wait_for(
        slack,
        lambda: said(slack, asked.ts, "expired", "did not run"),
        "the expiry notice",
        TTL_S + 40,
    )
    db = replicas.db
    [(task_id, _)] = await db.tasks_of(asked.conversation)
    await replicas.stop()  # whatever a late duplicate would have posted is posted now

    assert len(said(slack, asked.ts, "reminder", "waiting for approval")) == 1, said(
        slack, asked.ts
    )
    assert len(said(slack, asked.ts, "expired", "did not run")) == 1, said(slack, asked.ts)
    [approval] = await db.approvals_of(task_id)
    assert approval["decision"] == "expired"
    kinds = await db.event_types(task_id)
    assert kinds.count("approval_expired") == 1, kinds
    assert replicas.effects() == []
    assert answers(slack, asked.ts) == []
    assert await db.status_of(asked.conversation) == "expired"
    await db.assert_consistent()


async def test_a_scheduled_prompt_fires_once_per_due_time(
    replicas: ReplicaSet, slack: FakeSlack, tmp_path: Path
) -> None:
    form = slash_command_form(
        user=ADMIN,
        channel=CHANNEL,
        text='schedule add "* * * * *" is web-9 healthy?',
        response_url=slack.webhook_url(),
    )
    assert (await replicas.post_command(form, to=1)).status == 200, replicas.stderr()
    db = replicas.db
    [(schedule_id,)] = await wait_until(
        lambda: db.rows("SELECT schedule_id FROM schedules"), "the schedule stored", within=30
    )
    # The next minute's run: one root message in the channel and its answer.
    [root] = await wait_for(
        slack, lambda: scheduled_roots(slack, schedule_id), "the scheduled run", 75
    )
    await wait_for(slack, lambda: answers(slack, str(root["ts"])), "the scheduled answer", 60)
    # Stop it from firing again before the next minute, then let every replica
    # finish what it started: a duplicate fire would have posted by then.
    remove = slash_command_form(
        user=ADMIN,
        channel=CHANNEL,
        text=f"schedule remove {schedule_id}",
        response_url=slack.webhook_url(),
    )
    assert (await replicas.post_command(remove, to=2)).status == 200
    await wait_until(
        lambda: _gone(db, schedule_id),
        "the schedule removed",
        within=30,
    )
    replicas.assert_alive()
    await replicas.stop()

    roots = scheduled_roots(slack, schedule_id)
    assert len(roots) == 1, roots
    assert answers(slack, str(root["ts"])) == ["Answer: ok."]
    tasks = await db.rows(
        "SELECT task_id, status FROM tasks WHERE conversation = ?",
        (f"slack:{CHANNEL}|{root['ts']}",),
    )
    assert [s for _, s in tasks] == ["completed"], tasks
    all_tasks = await db.count("SELECT COUNT(*) FROM tasks")
    assert all_tasks == 1, await db.rows("SELECT conversation, status FROM tasks")
    await db.assert_consistent()
    code, out = await ducklm_cli(tmp_path, replicas.db_target, "audit", "verify")
    assert code == 0, out


async def _gone(db: Database, schedule_id: str) -> bool:
    return (
        await db.count("SELECT COUNT(*) FROM schedules WHERE schedule_id = ?", (schedule_id,)) == 0
    )
