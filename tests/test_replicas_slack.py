"""Issue #19: three `ducklm run` replicas on one PostgreSQL behind a round-robin
proxy serve one Slack app over HTTP. Every delivery, click and retry is claimed
in the shared store, so a retry that lands on another replica is a duplicate
there too: one task per event, one execution per approval.

The evidence is threefold: FakeSlack's record (what the bot said), the database
(tasks, events, approvals, deliveries) and `effects.log` in the shared workspace,
which the approved command appends to (one line per run, whichever replica ran it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.slack.blocks import ACTION_APPROVE
from tests.crash_harness import (
    APPROVERS,
    CHANNEL,
    ModelScript,
    answers,
    card_buttons_now,
    cards,
    click,
    mention,
    thread_reply,
    wait_for,
)
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.slack_api import FakeSlack
from tests.replicas import ReplicaSet, ducklm_cli, replica_db

__all__ = ["replica_db"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(240)

MENTIONS = 6


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
        # Flood limits are per process (bot/admission.py): when the claims race
        # lets one replica win all six mentions of one person, its cap of five
        # running tasks refused the sixth. This test is about the claims.
        DUCKLM_USER_MAX_TASKS="0",
        DUCKLM_CHANNEL_MAX_TASKS="0",
    )
    try:
        await group.start()
        yield group
    finally:
        await group.close()


async def test_each_event_is_one_task_whichever_replica_gets_its_retries(
    replicas: ReplicaSet, slack: FakeSlack, tmp_path: Path
) -> None:
    asked = [mention(slack, f"is web-{i} healthy?") for i in range(MENTIONS)]
    # Each mention's first delivery goes to replica i % 3; Slack's two retries of
    # it (it saw no 200 in time, as far as it knows) go to the two others, and the
    # same message's `message.channels` copy (another event id) goes round-robin.
    # All at once: the claims race across processes, not one after the other.
    sends = []
    for i, m in enumerate(asked):
        first = i % len(replicas)
        sends.append(replicas.post_event(m.envelope, to=first))
        for retry in (1, 2):
            sends.append(
                replicas.post_event(m.envelope, retry_num=retry, to=(first + retry) % len(replicas))
            )
        sends.append(replicas.post_event(m.copy))
    served = await asyncio.gather(*sends)
    assert [s.status for s in served] == [200] * len(sends), (served, replicas.stderr())
    assert {s.replica for s in served} == {0, 1, 2}, served

    for m in asked:
        await wait_for(slack, lambda m=m: answers(slack, m.ts), f"the answer to {m.text}", 60)
    replicas.assert_alive()
    db = replicas.db
    for m in asked:
        tasks = await db.tasks_of(m.conversation)
        assert len(tasks) == 1, (m.conversation, tasks, replicas.stderr())
        assert tasks[0][1] == "completed", tasks
        assert answers(slack, m.ts) == ["Answer: ok."], slack.posted(CHANNEL)
        key = f"slack:event:{m.envelope['event_id']}"
        assert await db.count("SELECT COUNT(*) FROM deliveries WHERE key = ?", (key,)) == 1
    # One "on it" reaction per mention, not one per replica that saw it.
    reacted = [c.params.get("timestamp") for c in slack.calls_to("reactions.add")]
    assert sorted(reacted) == sorted(m.ts for m in asked), reacted

    await replicas.stop()
    await db.assert_consistent()
    code, out = await ducklm_cli(tmp_path, replicas.db_target, "audit", "verify")
    assert code == 0, out


async def test_concurrent_clicks_on_one_card_over_all_replicas_run_it_once(
    replicas: ReplicaSet, slack: FakeSlack, tmp_path: Path
) -> None:
    asked = mention(slack, "please run approve-1")
    assert (await replicas.post_event(asked.envelope)).status == 200, replicas.stderr()
    [card] = await wait_for(slack, lambda: cards(slack, asked.ts), "the approval card", 60)

    # Both approvers click Approve three times on each replica at once, and each
    # also answers `approve` in the thread on another replica: twelve attempts at
    # one decision, spread over three processes.
    attempts = []
    for replica in range(len(replicas)):
        for user in APPROVERS:
            for _ in range(2):
                attempts.append(
                    replicas.post_interaction(click(slack, card, user=user), to=replica)
                )
    for k, user in enumerate(APPROVERS):
        reply = thread_reply(slack, asked.ts, "approve", user=user)
        attempts.append(replicas.post_event(reply, to=(k + 1) % len(replicas)))
    served = await asyncio.gather(*attempts)
    assert [s.status for s in served] == [200] * len(attempts), (served, replicas.stderr())
    assert {s.replica for s in served} == {0, 1, 2}

    await wait_for(slack, lambda: answers(slack, asked.ts), "the answer after approval", 60)
    await wait_for(slack, lambda: not card_buttons_now(slack, card), "the card resolved", 30)
    replicas.assert_alive()

    assert replicas.effects() == ["approve-1"], replicas.stderr()
    assert answers(slack, asked.ts) == ["Answer: approve-1."]
    db = replicas.db
    [(task_id, status)] = await db.tasks_of(asked.conversation)
    assert status == "completed"
    [approval] = await db.approvals_of(task_id)
    assert approval["decision"] == "approve"
    assert approval["decided_by"] in {f"slack:{a}" for a in APPROVERS}
    assert approval["executed_at"] is not None
    kinds = await db.event_types(task_id)
    assert kinds.count("approval_decided") == 1, kinds
    assert kinds.count("task_continued") == 1, kinds
    assert kinds[-1] == "task_completed", kinds
    assert len(cards(slack, asked.ts)) == 1
    assert all(b["action_id"] != ACTION_APPROVE for b in card_buttons_now(slack, card))

    await replicas.stop()
    await db.assert_consistent()
    code, out = await ducklm_cli(tmp_path, replicas.db_target, "audit", "verify")
    assert code == 0, out


async def test_socket_mode_one_connection_per_replica_one_task_per_event(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer, replica_db: str
) -> None:
    """Socket Mode: each replica holds its own connection. FakeSlack pushes every
    envelope to every open connection (harsher than Slack, which picks one), so
    all three replicas receive each event, its retry and each click at once."""
    ModelScript(model_server)
    group = ReplicaSet(tmp_path, slack, model_server, db=replica_db, count=3, socket_mode=True)
    try:
        await group.start()
        # FakeSlack keeps no public count of open sockets; its list is the truth.
        await wait_for(slack, lambda: len(slack._sockets) == 3, "three Socket Mode connections")
        asked = [mention(slack, f"is db-{i} healthy?") for i in range(3)]
        for m in asked:
            first = await slack.push("events_api", m.envelope)
            again = await slack.push(
                "events_api", m.envelope, retry_attempt=1, retry_reason="timeout"
            )
            await slack.push("events_api", m.copy)
            for envelope_id in (first, again):
                await slack.wait_for_ack(envelope_id)
        write = mention(slack, "please run approve-9")
        await slack.push("events_api", write.envelope)
        [card] = await wait_for(slack, lambda: cards(slack, write.ts), "the approval card", 60)
        for user in APPROVERS:
            await slack.push("interactive", click(slack, card, user=user))
        for m in (*asked, write):
            await wait_for(slack, lambda m=m: answers(slack, m.ts), f"the answer to {m.text}", 60)
        group.assert_alive()
        await group.stop()

        db = group.db
        for m in asked:
            tasks = await db.tasks_of(m.conversation)
            assert [s for _, s in tasks] == ["completed"], (m.conversation, tasks)
            assert answers(slack, m.ts) == ["Answer: ok."]
        assert answers(slack, write.ts) == ["Answer: approve-9."]
        assert group.effects() == ["approve-9"]
        [(task_id, _)] = await db.tasks_of(write.conversation)
        assert (await db.event_types(task_id)).count("approval_decided") == 1
        assert len(cards(slack, write.ts)) == 1
        await db.assert_consistent()
    finally:
        await group.close()
