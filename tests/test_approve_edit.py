"""Approve with an edit (issue #20): the new command is classified afresh
(blocked: refused, nothing changes; a higher risk: that risk's quorum), the
audit trail records both commands and who edited, and what runs is exactly the
edited command. Store level on SQLite and PostgreSQL; the console as a person
drives it (a `ducklm console` subprocess); Slack and Matrix in their own tests
below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot.backend import Thread
from bot.slack.blocks import ACTION_EDIT, EDIT_BLOCK, EDIT_INPUT, EDIT_VIEW
from runtime.approvals import ApprovalError, ApprovalService
from runtime.store import Stores, open_stores
from tests.conftest import ACTION, THINKER
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.slack_api import FakeSlack, view_submission_payload
from tests.fakes.synapse import MatrixUser
from tests.postgres import raw_rows
from tests.test_console import ducklm
from tests.test_matrix import (
    NO_ACTIONS,
    StartBot,
    alice,
    ask_for_approval,
    bob,
    body,
    bot_notice,
    bots,
    duck,
    edit_of,
    people,
    room_with_bot,
)
from tests.test_quorum import APPROVER2
from tests.test_slack import (
    ACTION_APPROVE,
    APPROVER,
    CHANNEL,
    STRANGER,
    Bot,
    actions_of,
    card_for,
    card_text,
    start_bot,
    stop_bot,
)

SHELL = "shell_exec_safe"
# The Matrix harness's fixtures, used here by name.
__all__ = ["alice", "bob", "bots", "duck", "people"]


def shell_action(command: str) -> dict[str, Any]:
    return {"tool": SHELL, "args": {"command": command}, "reason": "needed"}


async def pending(stores: Stores, service: ApprovalService, command: str, risk: str = "medium"):
    task = await stores.tasks.create_task("q", requested_by="slack:UREQ")
    approval = await service.create_pending(
        task.task_id, shell_action(command), risk_level=risk, requested_by="slack:UREQ"
    )
    return task, approval


async def events(stores: Stores, task_id: str, kind: str) -> list[dict[str, Any]]:
    return [e.payload for e in await stores.events.list_events(task_id) if e.event_type == kind]


@pytest.mark.backends("sqlite", "postgres")
async def test_an_edit_replaces_the_action_and_starts_a_new_revision(stores: Stores) -> None:
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service, "touch a.txt")
    assert await service.card_posted(approval.approval_id, "COPS00001:1700000000.000100")
    # An approval of the old command, with a quorum of 2 ...
    await service.decide(approval.approval_id, "approve", "slack:UA", quorum=2)
    edit = await service.edit(approval.approval_id, "chown root a.txt", "slack:UB")
    # From the edit's commit on the old card is not the approval's card: a click
    # on it decides nothing (bot/service.py), and the new card is owed.
    assert (edit.approval.card_state, edit.approval.card_ref) == ("unposted", None)
    assert (edit.old_command, edit.new_command) == ("touch a.txt", "chown root a.txt")
    assert (edit.old_risk, edit.new_risk) == ("medium", "high")
    edited = edit.approval
    assert edited.command == "chown root a.txt" and edited.risk_level == "high"
    assert edited.action["args"]["command"] == "chown root a.txt"
    assert edited.action["edited"] == {
        "from": "touch a.txt",
        "to": "chown root a.txt",
        "by": "slack:UB",
    }
    assert "first proposed: `touch a.txt`" in (edited.reason or "")
    state = await service.edit_state(approval.approval_id)
    assert (state.revision, state.original_command, state.edited_by) == (
        1,
        "touch a.txt",
        "slack:UB",
    )
    # ... does not count for the edited command.
    assert await service.voters(approval.approval_id) == []
    (logged,) = await events(stores, task.task_id, "approval_edited")
    assert logged["old_command"] == "touch a.txt"
    assert logged["new_command"] == "chown root a.txt"
    assert (logged["edited_by"], logged["old_risk"], logged["new_risk"]) == (
        "slack:UB",
        "medium",
        "high",
    )
    # A second edit keeps the first proposed command as the original.
    again = await service.edit(approval.approval_id, "chown root b.txt", "slack:UA")
    assert again.approval.action["edited"]["from"] == "touch a.txt"
    assert (await service.edit_state(approval.approval_id)).original_command == "touch a.txt"


@pytest.mark.backends("sqlite", "postgres")
async def test_the_edit_event_holds_no_secret_the_edit_typed(stores: Stores) -> None:
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service, "touch a.txt")
    token = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
    edit = await service.edit(approval.approval_id, f"echo {token}", "slack:UB")
    assert edit.approval.command == f"echo {token}"  # what runs is the real command
    (logged,) = await events(stores, task.task_id, "approval_edited")
    assert token not in json.dumps(logged) and "REDACTED" in logged["new_command"]


@pytest.mark.backends("sqlite", "postgres")
async def test_a_decision_on_the_revision_before_an_edit_decides_nothing(stores: Stores) -> None:
    """An approver read the approval (medium: one approver), someone edited it into a
    high-risk command, then the approver's click lands: it must not approve the
    edited command on the old risk's quorum, alone or as a vote."""
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service, "touch a.txt")
    seen = (await service.edit_state(approval.approval_id)).revision
    await service.edit(approval.approval_id, "chown root a.txt", "slack:UB")
    for quorum in (1, 2):
        with pytest.raises(ApprovalError, match="edited since you looked"):
            await service.decide(
                approval.approval_id, "approve", "slack:UA", quorum=quorum, revision=seen
            )
    with pytest.raises(ApprovalError, match="edited since you looked"):
        await service.decide(approval.approval_id, "deny", "slack:UA", revision=seen)
    still = await service.get(approval.approval_id)
    assert still.decision is None and still.command == "chown root a.txt"
    assert await service.voters(approval.approval_id) == []
    assert await events(stores, task.task_id, "approval_vote") == []
    assert await events(stores, task.task_id, "approval_decided") == []
    # The store's own compare-and-set checks the revision too.
    assert not await stores.approvals.decide(
        approval.approval_id, "approve", "slack:UA", revision=seen
    )
    assert (await service.get(approval.approval_id)).decision is None
    # On the revision it now is, the decision is taken.
    taken = await service.decide(approval.approval_id, "approve", "slack:UA", revision=seen + 1)
    assert taken.taken and taken.approval.decision == "approve"


@pytest.mark.backends("sqlite", "postgres")
async def test_an_edit_into_a_blocked_command_is_refused_and_changes_nothing(
    stores: Stores,
) -> None:
    service = ApprovalService.from_stores(stores)
    task, approval = await pending(stores, service, "touch a.txt")
    # Blocked, empty, unchanged, and a remark that is no command at all.
    for bad in ("rm -rf /", "sudo reboot", "", "touch a.txt", "I think we should use web-2"):
        with pytest.raises(ApprovalError):
            await service.edit(approval.approval_id, bad, "slack:UB")
    unchanged = await service.get(approval.approval_id)
    assert unchanged.action == approval.action and unchanged.command == "touch a.txt"
    assert unchanged.risk_level == "medium" and unchanged.decision is None
    assert (await service.edit_state(approval.approval_id)).revision == 0
    assert await events(stores, task.task_id, "approval_edited") == []
    # Decided approvals and other tools cannot be edited either.
    await service.decide(approval.approval_id, "deny", "slack:UB")
    with pytest.raises(ApprovalError, match="already decided"):
        await service.edit(approval.approval_id, "touch b.txt", "slack:UB")
    task2 = await stores.tasks.create_task("q")
    other = await service.create_pending(
        task2.task_id, {"tool": "read_file", "args": {"path": "x"}}, risk_level="medium"
    )
    with pytest.raises(ApprovalError, match="Only shell commands"):
        await service.edit(other.approval_id, "cat x", "slack:UB")


@pytest.mark.backends("sqlite", "postgres")
async def test_two_edits_at_once_one_wins(db_target: str, stores: Stores) -> None:
    import asyncio

    service = ApprovalService.from_stores(stores)
    async with await open_stores(db_target) as other_stores:
        other = ApprovalService.from_stores(other_stores)
        task, approval = await pending(stores, service, "touch a.txt")
        results = await asyncio.gather(
            service.edit(approval.approval_id, "touch b.txt", "slack:UA"),
            other.edit(approval.approval_id, "touch c.txt", "slack:UB"),
            return_exceptions=True,
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, ApprovalError) for r in lost), lost
        # Each edit that took replaced what the one before it left (one revision
        # each, never two edits of the same revision): a loser changed nothing.
        logged = await events(stores, task.task_id, "approval_edited")
        assert len(logged) == len(won) >= 1
        assert [e["revision"] for e in logged] == list(range(1, len(won) + 1))
        assert logged[0]["old_command"] == "touch a.txt"
        if len(won) == 2:  # one after the other
            assert logged[1]["old_command"] == logged[0]["new_command"]
        final = await service.get(approval.approval_id)
        assert final.command == logged[-1]["new_command"]


# -- the console ---------------------------------------------------------------------


async def events_shown(tmp_path: Path) -> str:
    """`ducklm events` of every task of the console's database, as a person reads it."""
    shown = []
    for (task_id,) in raw_rows(str(tmp_path / "ducklm.db"), "SELECT task_id FROM tasks"):
        code, out, err = await ducklm(tmp_path, "events", task_id)
        assert code == 0, err
        shown.append(out)
    return "\n".join(shown)


async def test_console_edit_runs_exactly_the_edited_command(tmp_path: Path) -> None:
    script = "\n".join(
        [
            "run touch proposed.txt",
            "edit rm -rf /",  # blocked: refused, the approval stays as it was
            "edit `touch edited.txt`",
            "exit",
        ]
    )
    code, out, err = await ducklm(tmp_path, "console", stdin=script + "\n")
    assert code == 0, err
    assert "Not edited" in out and "blocked" in out
    assert "console:tester edited the command: `touch proposed.txt` → `touch edited.txt`" in out
    workspace = tmp_path / "workspace"
    assert (workspace / "edited.txt").exists()
    assert not (workspace / "proposed.txt").exists()
    events_out = await events_shown(tmp_path)
    assert "approval_edited" in events_out and "approval_decided" in events_out
    assert "Traceback" not in out + err


async def test_console_quorum_counts_the_console_as_one_person(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[default]\nquorum = { medium = 2 }\n")
    script = "\n".join(["run touch needs-two.txt", "a", "a", "exit"])
    code, out, err = await ducklm(
        tmp_path, "console", stdin=script + "\n", DUCKLM_POLICY_FILE=str(policy)
    )
    assert code == 0, err
    assert "Approved 1 of 2: console:tester" in out
    # Told at start (naming the key) and on the card: the console alone cannot
    # complete it, and Always (refused under a quorum) is not offered.
    assert "default section sets quorum.medium = 2" in out
    assert "the console is one person: it cannot be approved from here alone" in out
    assert "a[l]ways" not in out
    assert not (tmp_path / "workspace" / "needs-two.txt").exists()
    events_out = await events_shown(tmp_path)
    assert events_out.count("approval_vote") == 1  # the second `a` is the same person
    assert "approval_decided" not in events_out


# -- through the real Slack app against the fake Web API ------------------------------


def edit_submission(approval: str, command: str, user: str = APPROVER) -> dict[str, Any]:
    return view_submission_payload(
        user=user,
        callback_id=EDIT_VIEW,
        private_metadata=approval,
        values={EDIT_BLOCK: {EDIT_INPUT: {"value": command}}},
    )


async def slack_events(tmp_path: Path, db_target: str, bot: Bot, ts: str) -> str:
    key = Thread("slack", CHANNEL, ts).key
    (task,) = await bot.runtime.stores.tasks.list_by_conversation(key, limit=10)
    code, out, err = await ducklm(tmp_path, "events", task.task_id, DUCKLM_DB=db_target)
    assert code == 0, err
    return out


@pytest.mark.backends("sqlite", "postgres")
@pytest.mark.usefixtures("clean_env")
async def test_slack_edit_and_approve_through_the_modal(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot = await start_bot(tmp_path, model, slack, db=db_target)
    try:
        assert bot.sender is not None
        ts, card, approval = await card_for(bot, model, command="echo proposed >> f")
        await bot.click(ACTION_EDIT, approval, card["ts"], thread_ts=ts)
        (opened,) = await slack.wait_for_calls("views.open")
        view = opened.params["view"]
        assert view["callback_id"] == EDIT_VIEW and view["private_metadata"] == approval
        (field,) = [b for b in view["blocks"] if b["type"] == "input"]
        assert field["element"]["initial_value"] == "echo proposed >> f"  # prefilled
        assert bot.card(ts) == card  # opening the modal decides nothing

        # Edited into a blocked command: the modal stays open and says why.
        answer = await bot.sender.interaction(edit_submission(approval, "rm -rf /"))
        assert answer.status == 200
        errors = json.loads(answer.text)
        assert errors["response_action"] == "errors" and "blocked" in errors["errors"][EDIT_BLOCK]
        # ... and a remark that is no command likewise.
        answer = await bot.sender.interaction(edit_submission(approval, "use web-2 instead"))
        assert "no program here" in json.loads(answer.text)["errors"][EDIT_BLOCK]
        assert (await bot.runtime.approvals.get(approval)).command == "echo proposed >> f"

        model.reply(THINKER, Text("Wrote the edited line."))
        answer = await bot.sender.interaction(edit_submission(approval, "echo edited >> f"))
        assert answer.status == 200 and answer.text == ""  # the modal closes
        await bot.wait_text(ts, "Wrote the edited line.")
        assert (bot.workspace / "f").read_text() == "edited\n"  # exactly the edited command
        note = await bot.wait_text(ts, "edited the command")
        assert "echo proposed &gt;&gt; f" in note and "echo edited &gt;&gt; f" in note
        # The old card says it was edited; the new card showed both commands.
        cards = [m for m in bot.thread(ts) if m.get("blocks")]
        assert len(cards) == 2
        assert "Edited" in card_text(cards[0]) and actions_of(cards[0]) == []
        assert "echo edited" in card_text(cards[1]) and "first proposed" in card_text(cards[1])
        # The model was told what ran instead of what it proposed.
        told = json.dumps(model.requests_for(THINKER)[-1].body)
        assert "edited your command" in told and "echo edited" in told

        shown = await slack_events(tmp_path, db_target, bot, ts)
        assert "approval_edited" in shown and "approval_decided approve by slack:UAPPROVER" in shown
        assert (
            f"approval_edited by slack:{APPROVER}: `echo proposed >> f` -> `echo edited >> f`, "
            "risk "
        ) in shown, shown
        (edited,) = [
            e.payload
            for e in await bot.runtime.stores.events.list_events(
                (await bot.runtime.approvals.get(approval)).task_id
            )
            if e.event_type == "approval_edited"
        ]
        assert edited["old_command"] == "echo proposed >> f"
        assert edited["new_command"] == "echo edited >> f"
        assert edited["edited_by"] == f"slack:{APPROVER}"
    finally:
        await stop_bot(bot)


@pytest.mark.usefixtures("clean_env")
async def test_slack_edit_reply_raising_the_risk_needs_that_risks_quorum(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[default]\napprovers = ["slack:{APPROVER}", "slack:{APPROVER2}"]\n'
        "quorum = { high = 2 }\n"
    )
    bot = await start_bot(tmp_path, model, slack, policy_file=policy)
    try:
        ts, old_card, approval = await card_for(bot, model, command="touch proposed")
        # A reply by someone who may not approve changes nothing.
        await bot.say("edit touch sneaky", thread_ts=ts, user=STRANGER)
        # The approver's reply: medium -> high, so the edit needs two approvers; the
        # editor is one of them.
        await bot.say("edit `touch edited && chown root edited`", thread_ts=ts, user=APPROVER)
        note = await bot.wait_text(ts, "edited the command")
        assert "risk high (was medium)" in note and "needs 2 approvers" in note
        await bot.wait_text(ts, "Approved 1 of 2")
        await bot.settle()
        workspace = bot.workspace
        assert not (workspace / "edited").exists() and not (workspace / "proposed").exists()
        assert not (workspace / "sneaky").exists()
        new_card = bot.card(ts)
        assert new_card is not None and actions_of(new_card)

        # A click on the card the edit replaced (it showed the old command, and
        # was in flight) approves nothing.
        await bot.click(ACTION_APPROVE, approval, old_card["ts"], thread_ts=ts, user=APPROVER2)
        told = await slack.wait_for_calls("chat.postEphemeral")
        assert "This card was replaced" in told[-1].params["text"]
        assert await bot.runtime.approvals.voters(approval) == [f"slack:{APPROVER}"]

        model.reply(THINKER, Text("Done, as edited."))
        await bot.click(ACTION_APPROVE, approval, new_card["ts"], thread_ts=ts, user=APPROVER2)
        await bot.wait_text(ts, "Done, as edited.")
        assert (workspace / "edited").exists() and not (workspace / "proposed").exists()
        shown = await slack_events(tmp_path, str(tmp_path / "ducklm.db"), bot, ts)
        assert shown.count("approval_vote") == 2 and "approval_edited" in shown
        assert "risk medium -> high" in shown, shown
        assert f"approval_vote approve by slack:{APPROVER}, 1 of 2" in shown
        assert f"approval_vote approve by slack:{APPROVER2}, 2 of 2" in shown
    finally:
        await stop_bot(bot)


# -- the real Matrix bot on Synapse ---------------------------------------------------


@pytest.mark.timeout(180)
async def test_matrix_edit_reply_in_the_thread(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    bot = await bots()  # alice approves
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch proposed.txt")

    # Into a blocked command: refused in the thread, nothing changes.
    await alice.say(room, "edit rm -rf /", thread=question)
    await alice.wait_for(bot_notice(duck, question, "blocked"), "the refusal")
    (still,) = await bot.runtime.approvals.pending()
    assert still.command == "touch proposed.txt"
    # bob may not approve: his edit is refused too.
    await bob.say(room, "edit touch bobs.txt", thread=question)
    await bob.wait_for(bot_notice(duck, question, "not an approver"), "bob's refusal")

    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Touched the edited file."))
    await alice.say(room, "edit touch edited.txt", thread=question)
    note = await alice.wait_for(bot_notice(duck, question, "edited the command"), "the note")
    assert "touch proposed.txt" in body(note) and "touch edited.txt" in body(note)
    await alice.wait_for(edit_of(card["event_id"], "edited to"), "the old card's edit")
    await alice.wait_for(bot_notice(duck, question, "Touched the edited file"), "the answer")
    workspace = tmp_path / "workspace"
    assert (workspace / "edited.txt").exists()
    assert not (workspace / "proposed.txt").exists() and not (workspace / "bobs.txt").exists()
    told = json.dumps(model_server.requests_for(THINKER)[-1].body)
    assert "edited your command" in told
    (task,) = await bot.runtime.stores.tasks.list_recent(5)
    code, shown, err = await ducklm(tmp_path, "events", task.task_id)
    assert code == 0, err
    assert "approval_edited" in shown and f"approval_decided approve by {alice.qualified}" in shown


@pytest.mark.usefixtures("clean_env")
async def test_slack_edit_whose_new_card_fails_to_post_is_posted_by_recovery(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[default]\napprovers = ["slack:{APPROVER}", "slack:{APPROVER2}"]\n'
        "quorum = { medium = 2 }\n"
    )
    bot = await start_bot(tmp_path, model, slack, policy_file=policy)
    try:
        ts, card, approval = await card_for(bot, model, command="touch proposed")
        # Slack refuses every post for a while: the edit is taken (the old card
        # loses its buttons), but the new card cannot be posted.
        slack.fail("chat.postMessage", "service_unavailable", times=50)
        await bot.say("edit touch edited", thread_ts=ts, user=APPROVER)
        await slack.wait_for(
            lambda: "Edited" in card_text(slack.message(CHANNEL, card["ts"]) or {}),
            what="the old card marked edited",
        )
        await bot.settle()
        edited = await bot.runtime.approvals.get(approval)
        assert edited.command == "touch edited" and edited.decision is None
        assert edited.card_state == "unposted" and edited.card_ref is None
        slack.fail("chat.postMessage", "service_unavailable", times=0)
        await bot.service.recover_periodically()  # what the periodic recovery does
        new_card = await slack.wait_for(
            lambda: next((m for m in bot.thread(ts) if m.get("blocks") and actions_of(m)), None),
            what="the edited approval's card",
        )
        assert "touch edited" in card_text(new_card) and "first proposed" in card_text(new_card)
        model.reply(THINKER, Text("Done as edited."))
        await bot.click(ACTION_APPROVE, approval, new_card["ts"], thread_ts=ts, user=APPROVER2)
        await bot.wait_text(ts, "Done as edited.")
        assert (bot.workspace / "edited").exists() and not (bot.workspace / "proposed").exists()
    finally:
        await stop_bot(bot)
