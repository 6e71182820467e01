"""Quorum (issue #20): N distinct approvers for a risk level, on a real SQLite file
and a real PostgreSQL. Each approval is its own `approval_vote` event and row;
two approvers at the same moment (two processes' connections) are both counted
once and the approval is decided once, by the vote that makes the quorum."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from runtime.approvals import ApprovalError, ApprovalService
from runtime.store import Stores, open_stores

pytestmark = pytest.mark.backends("sqlite", "postgres")

SHELL = "shell_exec_safe"


def shell_action(command: str) -> dict[str, Any]:
    return {"tool": SHELL, "args": {"command": command}, "reason": "needed"}


@pytest.fixture
async def stores(db_target: str):
    async with await open_stores(db_target) as opened:
        yield opened


async def pending(
    stores: Stores, service: ApprovalService, command: str = "systemctl restart nginx"
):
    task = await stores.tasks.create_task("q", requested_by="slack:UREQ")
    approval = await service.create_pending(
        task.task_id, shell_action(command), risk_level="high", requested_by="slack:UREQ"
    )
    return task, approval


async def events(stores: Stores, task_id: str, kind: str) -> list[dict[str, Any]]:
    return [e.payload for e in await stores.events.list_events(task_id) if e.event_type == kind]


async def test_two_approvers_make_the_quorum_one_vote_does_not(stores: Stores) -> None:
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service)
    first = await service.decide(approval.approval_id, "approve", "slack:UA", quorum=2)
    assert not first.taken and first.counted and first.waiting_for_more
    assert first.voters == ("slack:UA",) and first.needed == 2
    # The same person again: not counted twice, still open.
    again = await service.decide(approval.approval_id, "approve", "slack:UA", quorum=2)
    assert not again.taken and not again.counted and again.voters == ("slack:UA",)
    assert (await service.get(approval.approval_id)).decision is None
    second = await service.decide(approval.approval_id, "approve", "slack:UB", quorum=2)
    assert second.taken and second.voters == ("slack:UA", "slack:UB")
    decided = await service.get(approval.approval_id)
    assert (decided.decision, decided.decided_by) == ("approve", "slack:UB")
    votes = await events(stores, task.task_id, "approval_vote")
    assert [(v["voter"], v["votes"], v["quorum"]) for v in votes] == [
        ("slack:UA", 1, 2),
        ("slack:UB", 2, 2),
    ]
    (decision,) = await events(stores, task.task_id, "approval_decided")
    assert decision["voters"] == ["slack:UA", "slack:UB"] and decision["quorum"] == 2
    assert await service.claim_execution(approval.approval_id)
    assert not await service.claim_execution(approval.approval_id)
    # A third vote after the decision changes nothing.
    late = await service.decide(approval.approval_id, "approve", "slack:UC", quorum=2)
    assert not late.taken and not late.counted


async def test_one_deny_after_one_approval_denies(stores: Stores) -> None:
    service = ApprovalService.from_stores(stores)
    _task, approval = await pending(stores, service)
    await service.decide(approval.approval_id, "approve", "slack:UA", quorum=2)
    denied = await service.decide(approval.approval_id, "deny", "slack:UB", "not now", quorum=2)
    assert denied.taken and denied.approval.decision == "deny"
    assert not await service.claim_execution(approval.approval_id)
    late = await service.decide(approval.approval_id, "approve", "slack:UC", quorum=2)
    assert not late.taken and late.approval.decision == "deny"


async def test_the_requesters_own_approval_does_not_count_under_four_eyes(stores: Stores) -> None:
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service)
    with pytest.raises(ApprovalError, match="four-eyes"):
        await service.decide(
            approval.approval_id, "approve", "slack:UREQ", quorum=2, four_eyes=True
        )
    assert await service.voters(approval.approval_id) == []
    assert await events(stores, task.task_id, "approval_vote") == []
    # Without four-eyes (the risk is below it) the requester is one person like any.
    counted = await service.decide(approval.approval_id, "approve", "slack:UREQ", quorum=2)
    assert counted.counted and not counted.taken


async def test_concurrent_votes_from_two_connections_decide_once(
    db_target: str, stores: Stores
) -> None:
    service = ApprovalService.from_stores(stores)
    async with await open_stores(db_target) as other_stores:
        other = ApprovalService.from_stores(other_stores)
        for _ in range(5):
            task, approval = await pending(stores, service)
            outcomes = await asyncio.gather(
                service.decide(approval.approval_id, "approve", "slack:UA", quorum=2),
                other.decide(approval.approval_id, "approve", "slack:UB", quorum=2),
            )
            assert sum(o.taken for o in outcomes) == 1, outcomes
            assert all(o.counted for o in outcomes)
            assert len(await events(stores, task.task_id, "approval_vote")) == 2
            assert len(await events(stores, task.task_id, "approval_decided")) == 1
            claims = await asyncio.gather(
                service.claim_execution(approval.approval_id),
                other.claim_execution(approval.approval_id),
            )
            assert sorted(claims) == [False, True]


async def test_three_at_once_with_quorum_two_decide_once(db_target: str, stores: Stores) -> None:
    service = ApprovalService.from_stores(stores)
    async with (
        await open_stores(db_target) as s2,
        await open_stores(db_target) as s3,
    ):
        services = [service, ApprovalService.from_stores(s2), ApprovalService.from_stores(s3)]
        task, approval = await pending(stores, service)
        outcomes = await asyncio.gather(
            *(
                svc.decide(approval.approval_id, "approve", f"slack:U{n}", quorum=2)
                for n, svc in enumerate(services)
            )
        )
        assert sum(o.taken for o in outcomes) == 1
        assert len(await events(stores, task.task_id, "approval_decided")) == 1
