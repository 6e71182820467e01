"""Escalation (issue #20): an approval still open after `escalate_after` mentions
`escalate_to` in its thread, once, and from then on they may decide it as
approvers of that channel. The due time lives in the store (approvals.escalate_at,
planned like due_at), so a restart re-arms it and replicas fire it once (a
compare-and-set claim). Store level on SQLite and PostgreSQL; a real `ducklm run`
restarted on the same database; three replicas on one PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from runtime.approvals import ApprovalService
from runtime.store import Stores, open_stores
from tests.crash_harness import (
    ASKER,
    DuckRun,
    ModelScript,
    answers,
    cards,
    click,
    mention,
    said,
    wait_for,
)
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.slack_api import FakeSlack
from tests.postgres import raw_rows
from tests.replicas import ReplicaSet, replica_db
from tests.test_console import ducklm

__all__ = ["replica_db"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.backends("sqlite", "postgres"), pytest.mark.timeout(300)]

BOSS = "UBOSS0001"
ESCALATE_S = 8.0


async def pending(stores: Stores, service: ApprovalService) -> tuple[Any, Any]:
    task = await stores.tasks.create_task("q", requested_by="slack:UREQ")
    approval = await service.create_pending(
        task.task_id,
        {"tool": "shell_exec_safe", "args": {"command": "touch a"}},
        risk_level="medium",
    )
    return task, approval


# -- the store -------------------------------------------------------------------------


async def test_escalation_is_planned_then_claimed_once_across_connections(
    db_target: str, stores: Stores
) -> None:
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service)
    (due,) = await service.escalations_due(time.time())
    assert (due.approval_id, due.escalate_at) == (approval.approval_id, 0)  # to be planned
    at = due.created_at + 60
    assert await service.claim_escalation(approval.approval_id, 0, at)
    assert not await service.claim_escalation(approval.approval_id, 0, at)  # planned once
    assert await service.escalations_due(time.time()) == []
    assert await service.earliest_escalation() == pytest.approx(at)
    async with await open_stores(db_target) as other_stores:
        other = ApprovalService.from_stores(other_stores)
        claims = await asyncio.gather(
            service.claim_escalation(approval.approval_id, at, None),
            other.claim_escalation(approval.approval_id, at, None),
        )
        assert sorted(claims) == [False, True]
        done = await asyncio.gather(
            service.escalate(approval.approval_id, ["slack:UBOSS"]),
            other.escalate(approval.approval_id, ["slack:UBOSS"]),
        )
        assert sorted(done) == [False, True]
    kinds = [e.event_type for e in await stores.events.list_events(task.task_id)]
    assert kinds.count("approval_escalated") == 1
    assert (await service.edit_state(approval.approval_id)).escalated_at is not None
    assert await service.earliest_escalation() is None
    # A decided approval is never due, nor escalated.
    _, decided = await pending(stores, service)
    await service.decide(decided.approval_id, "deny", "slack:UA")
    assert [d.approval_id for d in await service.escalations_due(time.time())] == []
    assert not await service.escalate(decided.approval_id, ["slack:UBOSS"])


async def test_a_claim_not_carried_out_is_due_again_after_its_lease(stores: Stores) -> None:
    """The claim is a lease: a process that died (or stopped) between claiming and
    escalating leaves it due again, and the escalation itself ends the lease."""
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service)
    past = time.time() - 1
    assert await service.claim_escalation(approval.approval_id, 0, past)  # planned
    lease = time.time() + 0.5
    assert await service.claim_escalation(approval.approval_id, past, lease)
    assert await service.escalations_due(time.time()) == []  # held by the claimer ...
    deadline = time.monotonic() + 10
    while not (due := await service.escalations_due(time.time())):  # ... which died
        assert time.monotonic() < deadline, "the lease never ran out"
        await asyncio.sleep(0.1)
    assert [d.approval_id for d in due] == [approval.approval_id]
    assert await service.claim_escalation(approval.approval_id, due[0].escalate_at, lease + 15)
    assert await service.escalate(approval.approval_id, ["slack:UBOSS"])
    assert await service.earliest_escalation() is None  # the escalation ended the lease
    assert not await service.escalate(approval.approval_id, ["slack:UBOSS"])
    kinds = [e.event_type for e in await stores.events.list_events(task.task_id)]
    assert kinds.count("approval_escalated") == 1


# -- a real `ducklm run`, restarted --------------------------------------------------


def escalations(slack: FakeSlack, thread_ts: str) -> list[str]:
    return said(slack, thread_ts, "escalation for", f"<@{BOSS}>")


def created_at(db_target: str, approval_id: str) -> float:
    ((at,),) = raw_rows(
        db_target, "SELECT created_at FROM approvals WHERE approval_id = ?", (approval_id,)
    )
    return float(at)


async def test_escalation_fires_once_after_a_restart_and_lets_the_escalation_approver_decide(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer, db_target: str
) -> None:
    ModelScript(model_server)
    bot = DuckRun(
        tmp_path,
        slack,
        model_server,
        DUCKLM_DB=db_target,
        DUCKLM_ESCALATE_AFTER=str(ESCALATE_S),
        DUCKLM_ESCALATE_TO=f"slack:{BOSS}",
        DUCKLM_APPROVAL_REMIND="3600",
    )
    try:
        await bot.start()
        asked = mention(slack, "please run approve-1")
        assert await bot.post_event(asked.envelope) == 200
        (card,) = await wait_for(slack, lambda: cards(slack, asked.ts), "the approval card")
        # The boss is no approver yet: a click before the escalation is refused.
        assert await bot.post_interaction(click(slack, card, user=BOSS)) == 200
        await wait_for(
            slack,
            lambda: [c for c in slack.calls_to("chat.postEphemeral") if BOSS in str(c.params)],
            "the refusal",
        )
        await bot.kill()  # down before the escalation is due
        due = created_at(db_target, card.approval_id) + ESCALATE_S
        await wait_for(slack, lambda: time.time() > due + 0.5, "the escalation's due time")
        assert escalations(slack, asked.ts) == []  # nobody was running

        await bot.start()  # the restart re-arms it from the store
        await wait_for(slack, lambda: escalations(slack, asked.ts), "the escalation", 60)
        await bot.stop()
        await bot.start()  # and a second restart does not repeat it
        await bot.recovered()
        assert await bot.post_interaction(click(slack, card, user=BOSS)) == 200
        await wait_for(slack, lambda: answers(slack, asked.ts), "the answer", 60)
        await bot.stop()

        assert len(escalations(slack, asked.ts)) == 1, said(slack, asked.ts)
        assert bot.effects() == ["approve-1"]
        ((task_id,),) = raw_rows(db_target, "SELECT task_id FROM tasks")
        code, shown, err = await ducklm(tmp_path, "events", task_id, DUCKLM_DB=db_target)
        assert code == 0, err
        assert shown.count("approval_escalated") == 1
        assert f"approval_escalated to slack:{BOSS}" in shown
        assert "decision_refused" in shown and f"approve by slack:{BOSS}" in shown
    finally:
        await bot.close()


async def test_a_crash_between_the_claim_and_the_escalation_escalates_once_after_a_restart(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer, db_target: str
) -> None:
    """The run dies right after claiming the escalation (before it is recorded or
    said): the claim was a lease, so the restarted run escalates, once."""
    ModelScript(model_server)
    bot = DuckRun(
        tmp_path,
        slack,
        model_server,
        DUCKLM_DB=db_target,
        DUCKLM_ESCALATE_AFTER=str(ESCALATE_S),
        DUCKLM_ESCALATE_TO=f"slack:{BOSS}",
        DUCKLM_APPROVAL_REMIND="2",
    )
    try:
        await bot.start(crash_at="escalation_claimed")
        asked = mention(slack, "please run approve-1")
        assert await bot.post_event(asked.envelope) == 200
        (card,) = await wait_for(slack, lambda: cards(slack, asked.ts), "the approval card")
        await wait_for(slack, lambda: said(slack, asked.ts, "reminder"), "the reminder")
        await bot.crashed("escalation_claimed", within=60)
        assert escalations(slack, asked.ts) == []  # claimed, then the process died

        await bot.start()
        await wait_for(slack, lambda: escalations(slack, asked.ts), "the escalation", 90)
        assert await bot.post_interaction(click(slack, card, user=BOSS)) == 200
        await wait_for(slack, lambda: answers(slack, asked.ts), "the answer", 60)
        await bot.stop()

        assert len(escalations(slack, asked.ts)) == 1, said(slack, asked.ts)
        assert bot.effects() == ["approve-1"]
        ((task_id,),) = raw_rows(db_target, "SELECT task_id FROM tasks")
        code, shown, err = await ducklm(tmp_path, "events", task_id, DUCKLM_DB=db_target)
        assert code == 0, err
        assert shown.count(f"approval_escalated to slack:{BOSS}") == 1, shown
        assert shown.count("approval_reminded reminded slack:") == 1, shown
    finally:
        await bot.close()


# -- three replicas on one PostgreSQL ------------------------------------------------


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
        DUCKLM_ESCALATE_AFTER="3",
        DUCKLM_ESCALATE_TO=f"slack:{BOSS}",
        DUCKLM_APPROVAL_REMIND="2",
    )
    try:
        await group.start()
        yield group
    finally:
        await group.close()


@pytest.mark.backends("postgres", reason="replicas share a PostgreSQL database")
async def test_three_replicas_remind_and_escalate_once(
    replicas: ReplicaSet, slack: FakeSlack
) -> None:
    asked = mention(slack, "please run approve-3", user=ASKER)
    assert (await replicas.post_event(asked.envelope)).status == 200, replicas.stderr()
    await wait_for(slack, lambda: cards(slack, asked.ts), "the approval card", 60)
    await wait_for(slack, lambda: escalations(slack, asked.ts), "the escalation", 60)
    await wait_for(slack, lambda: said(slack, asked.ts, "reminder"), "the reminder", 60)
    [(task_id, _)] = await replicas.db.tasks_of(asked.conversation)
    await replicas.stop()  # a late duplicate would be posted by now
    assert len(escalations(slack, asked.ts)) == 1, said(slack, asked.ts)
    assert len(said(slack, asked.ts, "reminder")) == 1, said(slack, asked.ts)
    kinds = await replicas.db.event_types(task_id)
    # Both timed steps are on the audit trail, once each.
    assert kinds.count("approval_escalated") == 1, kinds
    assert kinds.count("approval_reminded") == 1, kinds


# -- per channel, from the policy file -------------------------------------------------


@pytest.mark.backends("sqlite")
@pytest.mark.usefixtures("clean_env")
async def test_the_policy_file_escalates_per_channel(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    from bot.scheduler import Scheduler
    from tests.conftest import ACTION, directive, shell
    from tests.fakes.openai_server import Text
    from tests.test_slack import APPROVER, CHANNEL, start_bot, stop_bot

    quiet = "CQUIET001"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[default]\napprovers = ["slack:{APPROVER}"]\n\n'
        f'[channels."slack:{CHANNEL}"]\nescalate_after = 1\nescalate_to = ["slack:{BOSS}"]\n'
    )
    bot = await start_bot(tmp_path, model, slack, policy_file=policy)
    scheduler = Scheduler(bot.service, remind_after=3600.0, poll=0.2)
    await scheduler.start()
    try:
        roots = []
        for channel in (quiet, CHANNEL):
            model.reply(ACTION, Text(directive(shell("touch x", "asked"))))
            root, _ = await bot.mention("touch x please", channel=channel)
            await slack.wait_for(
                lambda root=root, channel=channel: [
                    m for m in bot.thread(root, channel) if m.get("blocks")
                ],
                what="the card",
            )
            roots.append((root, channel))
        (quiet_root, _), (loud_root, loud_channel) = roots
        await slack.wait_for(
            lambda: [
                m
                for m in bot.thread(loud_root, loud_channel)
                if "Escalation for" in str(m.get("text")) and f"<@{BOSS}>" in str(m.get("text"))
            ],
            what="the escalation in the channel whose section escalates",
        )
        # The other channel's approval is planned "never": nothing is due for it.
        assert len(await bot.runtime.approvals.pending()) == 2
        rows = raw_rows(
            str(tmp_path / "ducklm.db"),
            "SELECT a.escalate_at, a.escalated_at, t.conversation FROM approvals a "
            "JOIN tasks t ON t.task_id = a.task_id",
        )
        by_channel = {conversation.split("|")[0]: (at, done) for at, done, conversation in rows}
        assert by_channel[f"slack:{quiet}"] == (None, None)
        assert by_channel[f"slack:{CHANNEL}"][1] is not None
        assert not [m for m in bot.thread(quiet_root, quiet) if "Escalation" in str(m.get("text"))]
    finally:
        await scheduler.stop()
        await stop_bot(bot)
