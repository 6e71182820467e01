"""Quorum (issue #20): N distinct approvers for a risk level, on a real SQLite file
and a real PostgreSQL. Each approval is its own `approval_vote` event and row;
two approvers at the same moment (two processes' connections) are both counted
once and the approval is decided once, by the vote that makes the quorum."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nio import RoomGetEventResponse

from bot.backend import Thread
from runtime.approvals import ApprovalError, ApprovalService
from runtime.store import Stores, open_stores
from tests import element_client
from tests.conftest import ACTION, THINKER, directive, shell
from tests.element_client import OpenElement
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.slack_api import FakeSlack
from tests.fakes.synapse import MatrixUser
from tests.test_console import ducklm
from tests.test_matrix import (
    NO_ACTIONS,
    PASSWORD,
    StartBot,
    alice,
    ask_for_approval,
    bob,
    body,
    bot_notice,
    bots,
    duck,
    edit_of,
    joined,
    people,
    room_with_bot,
)
from tests.test_matrix_e2ee import E2EE_WAIT
from tests.test_slack import (
    ACTION_ALWAYS,
    ACTION_APPROVE,
    ACTION_DENY,
    APPROVER,
    ASKER,
    CHANNEL,
    Bot,
    actions_of,
    card_for,
    card_text,
    start_bot,
    stop_bot,
)

pytestmark = pytest.mark.backends("sqlite", "postgres")
# The Matrix harness's fixtures, used here by name.
__all__ = ["alice", "bob", "bots", "duck", "people"]

# Element (matrix-js-sdk with its Rust crypto) for the encrypted room.
element_packages = element_client.element_packages
element = element_client.element

SHELL = "shell_exec_safe"


def shell_action(command: str) -> dict[str, Any]:
    return {"tool": SHELL, "args": {"command": command}, "reason": "needed"}


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


async def test_always_is_refused_under_a_quorum_and_changes_nothing(stores: Stores) -> None:
    """One person's Always would be a standing rule that lets every later matching
    action run with no approver, where this risk needs two."""
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service, "touch made-by-two")
    for voter in ("slack:UA", "slack:UB"):
        with pytest.raises(ApprovalError, match="needs 2 approvers"):
            await service.decide(approval.approval_id, "always", voter, quorum=2)
    await service.decide(approval.approval_id, "approve", "slack:UA", quorum=2)
    with pytest.raises(ApprovalError, match="needs 2 approvers"):
        await service.decide(approval.approval_id, "always", "slack:UB", quorum=2)
    assert (await service.get(approval.approval_id)).decision is None
    assert await service.voters(approval.approval_id) == ["slack:UA"]
    assert await service.list_rules() == []
    assert await events(stores, task.task_id, "rule_created") == []
    done = await service.decide(approval.approval_id, "approve", "slack:UB", quorum=2)
    assert done.taken and done.rule is None and await service.list_rules() == []


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


# -- through the real Slack app against the fake Web API ------------------------------

APPROVER2 = "UAPPROVR2"


def quorum_policy(tmp_path: Path, **extra: str) -> Path:
    """Three approvers (the asker among them), two needed from medium risk on, and
    four-eyes from medium: the asker's own approval never counts."""
    path = tmp_path / "policy.toml"
    lines = [
        "[default]",
        f'approvers = ["slack:{APPROVER}", "slack:{APPROVER2}", "slack:{ASKER}"]',
        'four_eyes_risk = "medium"',
        "quorum = { medium = 2 }",
        *(f"{key} = {value}" for key, value in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def events_shown(tmp_path: Path, db_target: str, task_id: str) -> str:
    """`ducklm events <task>` as a person runs it, on the same database."""
    code, out, err = await ducklm(tmp_path, "events", task_id, DUCKLM_DB=db_target)
    assert code == 0, err
    return out


async def only_task(bot: Bot, ts: str) -> str:
    key = Thread("slack", CHANNEL, ts).key
    (task,) = await bot.runtime.stores.tasks.list_by_conversation(key, limit=10)
    return task.task_id


@pytest.mark.usefixtures("clean_env")
async def test_slack_quorum_two_concurrent_clicks_run_once_and_the_asker_does_not_count(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot = await start_bot(tmp_path, model, slack, policy_file=quorum_policy(tmp_path), db=db_target)
    try:
        ts, card, approval = await card_for(bot, model)
        # Two approvers needed: no Always (one person's rule would bypass them).
        (buttons,) = actions_of(card)
        assert ACTION_ALWAYS not in {e["action_id"] for e in buttons["elements"]}
        assert "`always`" not in card_text(card)
        # The asker approves their own request: refused privately, not counted.
        await bot.click(ACTION_APPROVE, approval, card["ts"], thread_ts=ts, user=ASKER)
        told = await slack.wait_for_calls("chat.postEphemeral")
        assert "four-eyes" in told[-1].params["text"]
        assert await bot.runtime.approvals.voters(approval) == []

        model.reply(THINKER, Text("Added the x, approved by two people."))
        answers = await asyncio.gather(
            bot.click(ACTION_APPROVE, approval, card["ts"], thread_ts=ts, user=APPROVER),
            bot.click(ACTION_APPROVE, approval, card["ts"], thread_ts=ts, user=APPROVER2),
        )
        assert all(a.status == 200 for a in answers)
        await bot.wait_text(ts, "approved by two people")
        await bot.settle()
        assert (bot.workspace / "f").read_text() == "x\n"  # ran once
        counted = [t for t in bot.texts(ts) if "Approved 1 of 2" in t]
        assert len(counted) == 1 and "needs 1 more approver" in counted[0]
        resolved = bot.card(ts)
        assert resolved is not None and actions_of(resolved) == []
        assert "Approved" in card_text(resolved)
        decided = await bot.runtime.approvals.get(approval)
        assert decided.decision == "approve" and decided.decided_by in (
            f"slack:{APPROVER}",
            f"slack:{APPROVER2}",
        )

        shown = await events_shown(tmp_path, db_target, await only_task(bot, ts))
        assert shown.count("approval_vote") == 2
        # Each vote's line says who, and how far the quorum got.
        for voter in (APPROVER, APPROVER2):
            assert f"approval_vote approve by slack:{voter}, " in shown, shown
        assert ", 1 of 2" in shown and ", 2 of 2" in shown
        assert shown.count("approval_decided") == 1
        assert "decision_refused" in shown  # the asker's click, on the audit trail
        assert shown.count("tool_call_finished") == 1
    finally:
        await stop_bot(bot)


@pytest.mark.usefixtures("clean_env")
async def test_slack_quorum_one_deny_after_one_approval_denies(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot = await start_bot(tmp_path, model, slack, policy_file=quorum_policy(tmp_path), db=db_target)
    try:
        ts, card, approval = await card_for(bot, model)
        await bot.click(ACTION_APPROVE, approval, card["ts"], thread_ts=ts, user=APPROVER)
        counted = await bot.wait_text(ts, "Approved 1 of 2")
        assert f"<@{APPROVER}>" in counted
        # The card itself says so, and stays open.
        shown = await slack.wait_for(
            lambda: "1 of 2" in card_text(bot.card(ts)) and bot.card(ts), what="the card's count"
        )
        assert f"<@{APPROVER}>" in card_text(shown) and actions_of(shown), card_text(shown)
        # The same approver again: not counted twice, told so privately.
        await bot.click(ACTION_APPROVE, approval, card["ts"], thread_ts=ts, user=APPROVER)
        told = await slack.wait_for_calls("chat.postEphemeral")
        assert "approved this already" in told[-1].params["text"]
        # An Always (an old card's button, a reply) is refused: not a vote, no rule.
        await bot.click(ACTION_ALWAYS, approval, card["ts"], thread_ts=ts, user=APPROVER2)
        told = await slack.wait_for_calls("chat.postEphemeral", count=len(told) + 1)
        assert "needs 2 approvers" in told[-1].params["text"]
        assert await bot.runtime.approvals.voters(approval) == [f"slack:{APPROVER}"]
        assert await bot.runtime.approvals.list_rules() == []

        model.reply(THINKER, Text("OK, f stays as it is."))
        await bot.click(ACTION_DENY, approval, card["ts"], thread_ts=ts, user=APPROVER2)
        await bot.wait_text(ts, "f stays as it is")
        assert not (bot.workspace / "f").exists()
        assert "Denied" in card_text(bot.card(ts))
        shown = await events_shown(tmp_path, db_target, await only_task(bot, ts))
        assert shown.count("approval_vote") == 1 and "deny by slack:UAPPROVR2" in shown
        assert f"approval_vote approve by slack:{APPROVER}, 1 of 2" in shown, shown
    finally:
        await stop_bot(bot)


# -- the real Matrix bot on Synapse ---------------------------------------------------


@pytest.mark.timeout(180)
async def test_matrix_quorum_by_reactions(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[default]\napprovers = ["{alice.qualified}", "{bob.qualified}"]\n'
        "quorum = { medium = 2 }\n"
    )
    bot = await bots(policy_file=policy)
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch two.txt")

    await alice.react(room, card["event_id"], "✅")
    counted = await alice.wait_for(bot_notice(duck, question, "Approved 1 of 2"), "1 of 2")
    assert alice.user_id in body(counted) and "needs 1 more approver" in body(counted)
    # The card itself is edited to show the quorum so far, and stays open.
    await alice.wait_for(edit_of(card["event_id"], "1 of 2"), "the card's quorum edit")
    shown_card = await latest_edit(bob, room, card["event_id"])
    assert f"Approved so far:** 1 of 2: {alice.user_id}" in shown_card["body"]
    assert "1 of 2" in shown_card["formatted_body"] and "Approval needed" in shown_card["body"]
    assert "`edit <command>`" in shown_card["body"]  # still answerable, edits included
    assert shown_card.get("m.mentions") == {}  # the edit pings nobody again
    assert not (tmp_path / "workspace" / "two.txt").exists()
    assert len(await bot.runtime.approvals.pending()) == 1  # the card stays open

    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Touched by two."))
    await bob.react(room, card["event_id"], "✅")
    await alice.wait_for(edit_of(card["event_id"], "Approved"), "the card's edit")
    await alice.wait_for(bot_notice(duck, question, "Touched by two"), "the answer")
    assert (tmp_path / "workspace" / "two.txt").exists()
    (task,) = await bot.runtime.stores.tasks.list_recent(5)
    code, shown, err = await ducklm(tmp_path, "events", task.task_id)
    assert code == 0, err
    assert shown.count("approval_vote") == 2
    assert f"approval_decided approve by {bob.qualified}" in shown
    # The decision is the card's latest edit (the vote's edit came before it).
    final = await latest_edit(alice, room, card["event_id"])
    assert "Approved" in final["body"] and "Approval needed" not in final["body"]


async def latest_edit(user: MatrixUser, room: str, event_id: str) -> dict[str, Any]:
    """The card as a client shows it: the content of the newest edit the homeserver
    bundles with the original event (unsigned m.relations.m.replace)."""
    response = await user.client.room_get_event(room, event_id)
    assert isinstance(response, RoomGetEventResponse), response
    unsigned = response.event.source.get("unsigned") or {}
    latest = (unsigned.get("m.relations") or {}).get("m.replace")
    assert latest is not None, f"no edit bundled with {event_id}: {unsigned}"
    fetched = await user.client.room_get_event(room, latest["event_id"])
    assert isinstance(fetched, RoomGetEventResponse), fetched
    new: dict[str, Any] = fetched.event.source["content"]["m.new_content"]
    return new


@pytest.mark.timeout(150)
async def test_matrix_quorum_in_an_encrypted_room_edits_the_card_encrypted(
    bots: StartBot,
    element: OpenElement,
    people: dict[str, str],
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """In an encrypted room (both approvers in Element with its Rust crypto) the
    vote's edit of the card is encrypted like the card, and decrypts to "1 of 2"."""
    first = await element(people["alice"], PASSWORD, crypto=True)
    second = await element(people["bob"], PASSWORD, crypto=True)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[default]\napprovers = ["{first.qualified}", "{second.qualified}"]\n'
        "quorum = { medium = 2 }\n"
    )
    await bots(policy_file=policy)
    room = await first.create_room([duck, second.user_id], encrypted=True)
    await second.wait_for({"room_id": room, "type": "m.room.member", "state_key": second.user_id})
    await second.join(room)
    await first.wait_for(joined(duck, room), "the bot joining", within=E2EE_WAIT)
    await first.wait_for(joined(second.user_id, room), "bob joining")

    model_server.reply(ACTION, Text(directive(shell("touch three.txt", "the user asked"))))
    question = await first.say(room, "please run touch three.txt", mention=duck)
    card = await first.wait_for(
        bot_notice(duck, question, "Approval needed"), "the card", within=E2EE_WAIT
    )
    await first.react(room, card["event_id"], "✅")
    vote_edit = await second.wait_for(
        edit_of(card["event_id"], "1 of 2"), "the card's quorum edit", within=E2EE_WAIT
    )
    shown = vote_edit["content"]["m.new_content"]["body"]
    assert f"Approved so far:** 1 of 2: {first.user_id}" in shown
    assert not (tmp_path / "workspace" / "three.txt").exists()

    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Touched by two, encrypted."))
    await second.react(room, card["event_id"], "✅")
    await first.wait_for(edit_of(card["event_id"], "**Approved** by"), "the decision's edit")
    await first.wait_for(bot_notice(duck, question, "Touched by two"), "the answer")
    assert (tmp_path / "workspace" / "three.txt").exists()
    wire = await first.room_events(room)
    (vote_on_wire,) = [e for e in wire if e.get("event_id") == vote_edit["event_id"]]
    assert vote_on_wire["type"] == "m.room.encrypted"  # sent through the encrypting sender


# -- the policy: quorum per risk, escalation per section -------------------------------


def test_quorum_and_escalation_from_the_environment_and_the_policy_file(tmp_path: Path) -> None:
    from bot.policy import AccessPolicy
    from bot.policy_file import load_policy_file

    path = tmp_path / "policy.yaml"
    path.write_text(
        "default:\n"
        "  approvers: [slack:UA, slack:UB]\n"
        "  quorum: {high: 2}\n"
        "channels:\n"
        "  slack:CPROD0001:\n"
        "    quorum: {medium: 2, critical: 3}\n"
        "    escalate_to: [slack:ULEAD0001]\n"
        "  slack:CSTAGE001:\n"
        "    escalate_after: off\n"
    )
    policy = AccessPolicy(
        policy_file=load_policy_file(path), escalate_after=600, escalate_to=["slack:UENV00001"]
    )
    default = policy.default
    assert [default.quorum_for(r) for r in ("low", "medium", "high", "critical")] == [1, 1, 2, 2]
    assert default.quorum_for(None) == 2  # an unknown risk is taken as high
    assert (default.escalate_after, default.escalate_to) == (600, frozenset({"slack:UENV00001"}))
    prod = policy.for_channel("slack", "CPROD0001")
    # A section's quorum table replaces the default's (high inherits medium's 2).
    assert [prod.quorum_for(r) for r in ("low", "medium", "high", "critical")] == [1, 2, 2, 3]
    assert (prod.escalate_after, prod.escalate_to) == (600, frozenset({"slack:ULEAD0001"}))
    assert "slack:ULEAD0001" in prod.escalated().approvers
    assert "slack:ULEAD0001" not in prod.approvers
    stage = policy.for_channel("slack", "CSTAGE001")
    assert stage.escalate_after is None  # `off` turns the default's escalation off here
    shown = "\n".join(prod.describe())
    assert "quorum: medium = 2, critical = 3" in shown
    assert "escalation: after 10m to slack:ULEAD0001" in shown
    assert "escalation: off" in "\n".join(stage.describe())
    # Escalation approvers may talk to the bot (a decision reply), as approvers may.
    assert policy.may_ask("slack:ULEAD0001", origin="T0ELSEWHERE")
