"""Store reads of one decision (bot/service.py): a click reads the approval's edit
state and its task once, and works the channel's policy out once; on PostgreSQL
every read is a round trip. Counted by wrapping the store methods of the
instances one service uses (the runtime's own reads in decide/edit included)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from functools import wraps
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.backend import ApprovalCard, Thread
from bot.service import ChatService
from runtime.factory import Runtime, build_runtime
from runtime.store.models import Approval
from tests.conftest import make_settings
from tests.test_faults import RecordingBackend

APPROVER = "slack:UAPPROVER1"
APPROVER2 = "slack:UAPPROVER2"
ASKER = "slack:UASKER001"
THREAD = Thread("test", "C1", "root")


class NumberedCards(RecordingBackend):
    """Every card posted is a new message (the recording backend reuses one ref)."""

    async def send_card(self, thread: Thread, card: ApprovalCard) -> str:
        await super().send_card(thread, card)
        return f"card-{len(self.cards)}"


def policy(tmp_path: Path, quorum: int) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(
        f'[default]\napprovers = ["{APPROVER}", "{APPROVER2}"]\nquorum = {{ medium = {quorum} }}\n'
    )
    return path


@pytest_asyncio.fixture(params=[1, 2], ids=["quorum1", "quorum2"])
async def bot(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChatService]:
    settings = make_settings(tmp_path, policy_file=policy(tmp_path, request.param))
    rt: Runtime = await build_runtime(settings)
    service = ChatService(rt)
    service.add_backend(NumberedCards())
    try:
        yield service
    finally:
        await service.close()
        await rt.close()


async def posted_approval(service: ChatService, command: str = "touch a.txt") -> Approval:
    """A pending shell approval of a task in THREAD, its card posted."""
    task = await service.tasks.create_task("q", conversation=THREAD.key, requested_by=ASKER)
    created = await service.approvals.create_pending(
        task.task_id,
        {"tool": "shell_exec_safe", "args": {"command": command}, "reason": "needed"},
        risk_level="medium",
        requested_by=ASKER,
    )
    await service.post_card(THREAD, created)
    approval = await service.approvals.get(created.approval_id)
    assert approval is not None and approval.card_state == "posted"
    return approval


def count_reads(service: ChatService) -> Counter[str]:
    """Wrap the reads a decision makes, on these instances only; returns the tally."""
    reads: Counter[str] = Counter()
    votes = service.approvals._votes  # the runtime's edit-state reads go through it
    targets: list[tuple[Any, str, str]] = [
        (votes, "state", "edit_state"),
        (service.tasks, "get_task", "task"),
        (service.approvals._approvals, "get", "approval"),
    ]
    for owner, method, name in targets:
        setattr(owner, method, _counted(getattr(owner, method), name, reads))
    return reads


def _counted(call: Callable[..., Any], name: str, reads: Counter[str]) -> Callable[..., Any]:
    @wraps(call)
    async def counting(*args: Any, **kwargs: Any) -> Any:
        reads[name] += 1
        return await call(*args, **kwargs)

    return counting


async def test_a_click_reads_edit_state_and_task_once(bot: ChatService) -> None:
    approval = await posted_approval(bot)
    reads = count_reads(bot)
    refusal = await bot.handle_decision(
        approval.approval_id, APPROVER, "approve", card_ref=approval.card_ref
    )
    seen = dict(reads)  # before the continuation (spawned, not yet run) reads anything
    assert refusal is None
    # Before: edit state 3 times, the task 3 times (policy twice, thread once).
    assert seen["edit_state"] == 1 and seen["task"] == 1, seen
    # The approval: once here, twice in decide, and under a quorum once more
    # after the card shows the votes (a decision taken meanwhile is shown next).
    quorum = bot.policy.default.quorum_for("medium")
    assert seen["approval"] == (3 if quorum == 1 else 4), seen
    stored = await bot.approvals.get(approval.approval_id)
    assert stored is not None
    assert (stored.decision is None) == (quorum > 1)


async def test_a_refused_click_reads_edit_state_and_task_once(bot: ChatService) -> None:
    approval = await posted_approval(bot)
    reads = count_reads(bot)
    refusal = await bot.handle_decision(approval.approval_id, "slack:USTRANGER", "approve")
    assert refusal and dict(reads) == {"edit_state": 1, "task": 1, "approval": 1}


async def test_an_edit_reads_the_task_once(bot: ChatService) -> None:
    approval = await posted_approval(bot)
    reads = count_reads(bot)
    refusal = await bot.handle_edit(approval.approval_id, APPROVER, "touch b.txt")
    seen = dict(reads)
    assert refusal is None, refusal
    # Before: the task 6 times, edit state 5 times. Now: the task once; edit state
    # once here and once in ApprovalService.edit.
    assert seen["task"] == 1 and seen["edit_state"] == 2, seen
    stored = await bot.approvals.get(approval.approval_id)
    assert stored is not None and stored.command == "touch b.txt"


async def test_a_click_on_a_replaced_card_is_still_refused(bot: ChatService) -> None:
    """Behaviour kept: after an edit, the old card's click approves nothing."""
    if bot.policy.default.quorum_for("medium") == 1:
        pytest.skip("the editor's own approval decides it at once")
    approval = await posted_approval(bot)
    assert await bot.handle_edit(approval.approval_id, APPROVER2, "touch b.txt") is None
    refusal = await bot.handle_decision(
        approval.approval_id, APPROVER, "approve", card_ref=approval.card_ref
    )
    assert refusal is not None and "This card was replaced" in refusal
