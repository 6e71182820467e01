"""Issue #15: each kill window, hit exactly.

Every test starts a real `ducklm run` (Slack over HTTP, the fake model) with
`DUCKLM_CRASH_AT=<point>`, drives it through Slack to that point (a mention, a
card, a click), waits for it to die by SIGKILL, checks that the database is in
the window the point names, starts `ducklm run` again on the same database
without the setting, and checks the end state through FakeSlack's record and
the database. `effects.log` in the workspace proves what ran, and how often.
The last test kills a task while it runs (SIGKILL from outside).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.slack.blocks import ACTION_APPROVE, ACTION_DENY
from tests.conftest import ACTION
from tests.crash_harness import (
    ANSWER_PREFIX,
    APPROVERS,
    CHANNEL,
    Card,
    DuckRun,
    Mention,
    ModelScript,
    answers,
    approvals_of,
    assert_restart_changes_nothing,
    buttons,
    card_buttons_now,
    cards,
    click,
    events_of,
    mention,
    rows,
    said,
    status_of,
    tasks_of,
    wait_for,
)
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.slack_api import FakeSlack
from tests.test_faults import assert_consistent

pytestmark = pytest.mark.timeout(180)


@pytest_asyncio.fixture
async def bot(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer
) -> AsyncIterator[DuckRun]:
    ModelScript(model_server)
    run = DuckRun(tmp_path, slack, model_server)
    try:
        yield run
    finally:
        await run.close()


def only_task(bot: DuckRun, conversation: str) -> str:
    found = tasks_of(bot.db, conversation)
    assert len(found) == 1, f"{conversation}: {found}\n{bot.stderr()}"
    return found[0][0]


def event_types(bot: DuckRun, task_id: str) -> list[str]:
    return [kind for _, kind, _ in events_of(bot.db, task_id)]


async def ask_for_a_write(bot: DuckRun, slack: FakeSlack, tag: str) -> tuple[Mention, Card]:
    """A mention that plans `echo <tag> >> effects.log`; returns it and its card."""
    asked = mention(slack, f"please run {tag}")
    assert await bot.post_event(asked.envelope) == 200, bot.stderr()
    found = await wait_for(
        slack, lambda: cards(slack, asked.ts), f"the approval card of {tag}", within=40
    )
    assert len(found) == 1, found
    return asked, found[0]


async def test_message_recorded_becomes_one_task_answered_once(
    bot: DuckRun, slack: FakeSlack
) -> None:
    await bot.start(crash_at="message_recorded")
    asked = mention(slack, "is web-1 healthy?")
    # Killed inside accept() or just after it: the 200 may or may not have gone out.
    status = await bot.post_event(asked.envelope)
    await bot.crashed("message_recorded")
    assert status in (200, None), status

    # The window: the claims are committed, no task exists.
    event_id = asked.envelope["event_id"]
    assert rows(bot.db, "SELECT key FROM deliveries WHERE key = ?", (f"slack:event:{event_id}",))
    assert tasks_of(bot.db, asked.conversation) == []
    open_rows = rows(bot.db, "SELECT conversation FROM inbox WHERE done_at IS NULL")
    assert open_rows == [(asked.conversation,)], open_rows

    await bot.start()
    # Slack retries the event (it saw no 200, or just retries), and the same
    # mention also arrives as a `message` event: both are duplicates now.
    assert await bot.post_event(asked.envelope, retry_num=1) == 200
    assert await bot.post_event(asked.copy) == 200
    await wait_for(slack, lambda: answers(slack, asked.ts), "the answer in the thread", within=40)
    await bot.stop()

    assert answers(slack, asked.ts) == ["Answer: ok."], slack.posted(CHANNEL)
    task_id = only_task(bot, asked.conversation)
    assert status_of(bot.db, asked.conversation) == "completed"
    assert event_types(bot, task_id)[-1] == "task_completed"
    assert rows(bot.db, "SELECT COUNT(*) FROM inbox WHERE done_at IS NULL") == [(0,)]
    assert_consistent(bot.db)
    await assert_restart_changes_nothing(bot, slack)


async def test_waiting_recorded_posts_the_missing_card_once(bot: DuckRun, slack: FakeSlack) -> None:
    await bot.start(crash_at="waiting_recorded")
    asked = mention(slack, "please run approve-1")
    assert await bot.post_event(asked.envelope) == 200, bot.stderr()
    await bot.crashed("waiting_recorded")

    # The window: waiting for an approval nobody was shown.
    assert status_of(bot.db, asked.conversation) == "waiting_for_approval"
    assert cards(slack, asked.ts) == []
    task_id = only_task(bot, asked.conversation)
    [approval] = approvals_of(bot.db, task_id)
    assert approval["decision"] is None and approval["card_state"] == "unposted"

    await bot.start()
    [card] = await wait_for(
        slack, lambda: cards(slack, asked.ts), "the missing card to be posted", within=40
    )
    assert card.approval_id == approval["approval_id"]
    shown = {b["action_id"] for b in card_buttons_now(slack, card)}
    assert {ACTION_APPROVE, ACTION_DENY} <= shown, shown
    await wait_for(
        slack,
        lambda: approvals_of(bot.db, task_id)[0]["card_state"] == "posted",
        "the card to be recorded as posted",
    )
    assert bot.effects() == []

    # Its buttons work: approving runs the command once and the task answers.
    assert await bot.post_interaction(click(slack, card)) == 200
    await wait_for(slack, lambda: answers(slack, asked.ts), "the answer after approval", within=40)
    await bot.stop()

    assert bot.effects() == ["approve-1"]
    assert len(cards(slack, asked.ts)) == 1, "the card was posted twice"
    assert card_buttons_now(slack, card) == []
    assert answers(slack, asked.ts) == ["Answer: approve-1."]
    assert status_of(bot.db, asked.conversation) == "completed"
    assert_consistent(bot.db)
    await assert_restart_changes_nothing(bot, slack)


async def test_decision_recorded_resolves_the_card_and_continues(
    bot: DuckRun, slack: FakeSlack
) -> None:
    await bot.start(crash_at="decision_recorded")
    asked, card = await ask_for_a_write(bot, slack, "approve-2")
    status = await bot.post_interaction(click(slack, card))
    await bot.crashed("decision_recorded")
    assert status in (200, None), status

    # The window: decided in the store, the card still offers its buttons.
    task_id = only_task(bot, asked.conversation)
    [approval] = approvals_of(bot.db, task_id)
    assert approval["decision"] == "approve"
    assert approval["decided_by"] == f"slack:{APPROVERS[0]}"
    assert approval["executed_at"] is None
    assert card_buttons_now(slack, card) != []
    assert bot.effects() == []

    await bot.start()
    await wait_for(
        slack, lambda: not card_buttons_now(slack, card), "the card to show the decision"
    )
    await wait_for(
        slack, lambda: answers(slack, asked.ts), "the continued task's answer", within=40
    )
    await bot.stop()

    assert bot.effects() == ["approve-2"]
    assert answers(slack, asked.ts) == ["Answer: approve-2."]
    assert len(cards(slack, asked.ts)) == 1
    [approval] = approvals_of(bot.db, task_id)
    assert approval["card_state"] == "resolved"
    assert approval["executed_at"] is not None
    assert status_of(bot.db, asked.conversation) == "completed"
    assert_consistent(bot.db)
    await assert_restart_changes_nothing(bot, slack)


async def approved_not_run(
    bot: DuckRun, slack: FakeSlack, point: str, tag: str
) -> tuple[str, str, dict[str, Any]]:
    """Drive a write to `point` (the approved command's claim or spawn), restart,
    and check what both windows share: the thread is told, a new card is posted for
    the same action, the old approval stays spent, `approval_reissued` links them.
    Returns (the thread's ts, the old approval id, the approval_reissued payload)."""
    await bot.start(crash_at=point)
    asked, card = await ask_for_a_write(bot, slack, tag)
    # The click is acked before the decision is carried out, but the kill may
    # still beat the response out of the socket.
    assert await bot.post_interaction(click(slack, card)) in (200, None)
    await bot.crashed(point)
    task_id = only_task(bot, asked.conversation)
    [old] = approvals_of(bot.db, task_id)
    assert old["decision"] == "approve" and old["executed_at"] is not None, old

    await bot.start()
    found = await wait_for(
        slack, lambda: cards(slack, asked.ts)[1:], "a new approval card", within=40
    )
    assert len(found) == 1, found
    new_card = found[0]
    assert new_card.approval_id != old["approval_id"]
    approvals = {a["approval_id"]: a for a in approvals_of(bot.db, task_id)}
    assert set(approvals) == {old["approval_id"], new_card.approval_id}
    new = approvals[new_card.approval_id]
    assert new["decision"] is None
    assert new["replaces_approval_id"] == old["approval_id"]
    assert (new["tool"], new["command"]) == (old["tool"], old["command"])
    spent = approvals[old["approval_id"]]
    assert spent["decision"] == "approve" and spent["executed_at"] is not None
    assert status_of(bot.db, asked.conversation) == "waiting_for_approval"
    # The old card shows its decision; the new one offers buttons.
    await wait_for(slack, lambda: not card_buttons_now(slack, card), "the old card resolved")
    assert card_buttons_now(slack, new_card) != []
    reissued = [p for _, kind, p in events_of(bot.db, task_id) if kind == "approval_reissued"]
    assert len(reissued) == 1, events_of(bot.db, task_id)
    assert reissued[0]["approval_id"] == new_card.approval_id
    assert reissued[0]["replaces"] == old["approval_id"]

    # The old button is spent: clicking it again changes nothing ...
    assert await bot.post_interaction(click(slack, card, user=APPROVERS[1])) == 200
    # ... and approving the new card runs the command once.
    assert await bot.post_interaction(click(slack, new_card)) == 200
    await wait_for(slack, lambda: answers(slack, asked.ts), "the answer after re-approval", 40)
    await bot.stop()

    assert answers(slack, asked.ts) == [f"Answer: {tag}."]
    assert len(cards(slack, asked.ts)) == 2
    assert card_buttons_now(slack, new_card) == []
    assert status_of(bot.db, asked.conversation) == "completed"
    assert_consistent(bot.db)
    await assert_restart_changes_nothing(bot, slack)
    return asked.ts, old["approval_id"], reissued[0]


async def test_execution_claimed_reports_not_started_and_offers_a_new_card(
    bot: DuckRun, slack: FakeSlack
) -> None:
    thread, _, reissued = await approved_not_run(bot, slack, "execution_claimed", "approve-3")
    assert reissued["started"] is False
    told = said(slack, thread, "did not start")
    assert len(told) == 1, said(slack, thread)
    # Nothing ran before the new approval; the new approval ran it exactly once.
    assert bot.effects() == ["approve-3"]


async def test_command_spawned_reports_unknown_result_and_offers_a_new_card(
    bot: DuckRun, slack: FakeSlack
) -> None:
    thread, _, reissued = await approved_not_run(bot, slack, "command_spawned", "approve-4")
    assert reissued["started"] in (None, True)
    told = said(slack, thread, "may have started")
    assert len(told) == 1, said(slack, thread)
    assert "unknown" in told[0].lower()
    # The first run may or may not have written its line before the kill; the
    # re-approval ran it once more, never more.
    assert bot.effects() in (["approve-4"], ["approve-4", "approve-4"])


async def test_task_killed_while_running_is_interrupted_with_its_event(
    bot: DuckRun, slack: FakeSlack, model_server: FakeModelServer
) -> None:
    await bot.start()
    asked = mention(slack, "what about hang-1")
    assert await bot.post_event(asked.envelope) == 200, bot.stderr()
    await wait_for(
        slack,
        lambda: (
            status_of(bot.db, asked.conversation) == "running"
            and any("hang-1" in str(r.body) for r in model_server.requests_for(ACTION))
        ),
        "the task to wait on the model",
        within=40,
    )
    await bot.kill()
    task_id = only_task(bot, asked.conversation)
    before = event_types(bot, task_id)

    await bot.start()
    await wait_for(
        slack,
        lambda: status_of(bot.db, asked.conversation) == "interrupted",
        "the task to be marked interrupted",
    )
    told = await wait_for(
        slack, lambda: said(slack, asked.ts, "interrupted"), "the thread to be told"
    )
    await bot.stop()

    assert len(told) == 1, said(slack, asked.ts)
    events = events_of(bot.db, task_id)
    assert [kind for _, kind, _ in events] == [*before, "task_interrupted"]
    payload = events[-1][2]
    assert payload["last_event"] == before[-1]
    assert isinstance(payload["doing"], str) and payload["doing"].strip()
    assert answers(slack, asked.ts) == []
    assert_consistent(bot.db)
    await assert_restart_changes_nothing(bot, slack)


async def test_answer_owed_after_completion_is_posted_once(bot: DuckRun, slack: FakeSlack) -> None:
    """Not one of the issue's five windows, but the random kill test's promise
    ("every acknowledged mention got exactly one final answer"): the task's
    completion is committed, the answer not yet posted. The bot clears its
    "on it" reaction between the two, so holding that call freezes it there."""
    slack.hold("reactions.remove")
    await bot.start()
    asked = mention(slack, "is web-2 healthy?")
    assert await bot.post_event(asked.envelope) == 200, bot.stderr()
    await wait_for(
        slack,
        lambda: (
            slack.calls_to("reactions.remove")
            and status_of(bot.db, asked.conversation) == "completed"
        ),
        "the task to complete and the bot to clear its reaction",
        within=40,
    )
    await bot.kill()
    assert answers(slack, asked.ts) == []  # the window: completed, nothing said
    slack.release("reactions.remove")

    await bot.start()
    await wait_for(slack, lambda: answers(slack, asked.ts), "the owed answer", within=40)
    await bot.stop()

    assert answers(slack, asked.ts) == ["Answer: ok."]
    only_task(bot, asked.conversation)
    assert_consistent(bot.db)
    await assert_restart_changes_nothing(bot, slack)


async def test_message_waiting_for_a_slot_is_answered_after_a_kill(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer
) -> None:
    """The issue's first window, second path: an acknowledged message that waits
    for a concurrency slot (one slot, taken by a task hanging on the model) when
    the bot is killed from outside."""
    ModelScript(model_server)
    bot = DuckRun(tmp_path, slack, model_server, DUCKLM_MAX_CONCURRENT_TASKS="1")
    try:
        await bot.start()
        busy = mention(slack, "what about hang-2")
        assert await bot.post_event(busy.envelope) == 200, bot.stderr()
        await wait_for(
            slack,
            lambda: status_of(bot.db, busy.conversation) == "running",
            "the first task to take the only slot",
            within=40,
        )
        waiting = mention(slack, "is web-3 healthy?")
        assert await bot.post_event(waiting.envelope) == 200, bot.stderr()
        await bot.kill()
        assert answers(slack, waiting.ts) == []  # acknowledged, not carried out

        await bot.start()
        assert await bot.post_event(waiting.envelope, retry_num=1) == 200
        await wait_for(slack, lambda: answers(slack, waiting.ts), "the waiting message's answer")
        await wait_for(
            slack, lambda: said(slack, busy.ts, "interrupted"), "the busy thread to be told"
        )
        await bot.stop()

        assert answers(slack, waiting.ts) == ["Answer: ok."]
        assert status_of(bot.db, waiting.conversation) == "completed"
        only_task(bot, waiting.conversation)
        assert status_of(bot.db, busy.conversation) == "interrupted"
        assert_consistent(bot.db)
        await assert_restart_changes_nothing(bot, slack)
    finally:
        await bot.close()


async def test_card_posted_but_not_recorded_is_adopted_not_posted_again(
    bot: DuckRun, slack: FakeSlack
) -> None:
    """Killed while the card's chat.postMessage is in flight: Slack shows the card,
    the store never learnt its ts. Recovery must find it (not post a second card),
    and its buttons must work."""

    def is_card(params: dict[str, Any]) -> bool:
        return bool(buttons(params.get("blocks")))

    slack.hold("chat.postMessage", is_card)
    await bot.start()
    asked = mention(slack, "please run approve-5")
    assert await bot.post_event(asked.envelope) == 200, bot.stderr()
    await wait_for(
        slack,
        lambda: [c for c in slack.calls_to("chat.postMessage") if is_card(c.params)],
        "the card's post to be on its way",
        within=40,
    )
    await bot.kill()
    slack.release("chat.postMessage")  # Slack carries out the post the bot never saw answered
    [card] = await wait_for(slack, lambda: cards(slack, asked.ts), "the card in Slack")
    task_id = only_task(bot, asked.conversation)
    [approval] = approvals_of(bot.db, task_id)
    assert approval["card_state"] == "unposted" and approval["card_ref"] is None, approval

    await bot.start()
    await bot.recovered()
    await wait_for(
        slack,
        lambda: approvals_of(bot.db, task_id)[0]["card_state"] == "posted",
        "the card to be recorded as posted",
    )
    assert approvals_of(bot.db, task_id)[0]["card_ref"] == f"{CHANNEL}:{card.ts}"
    assert await bot.post_interaction(click(slack, card)) == 200
    await wait_for(slack, lambda: answers(slack, asked.ts), "the answer after approval", 40)
    await bot.stop()

    assert cards(slack, asked.ts) == [card], "the card was posted twice"
    assert card_buttons_now(slack, card) == []
    assert bot.effects() == ["approve-5"]
    assert answers(slack, asked.ts) == ["Answer: approve-5."]
    assert_consistent(bot.db)
    await assert_restart_changes_nothing(bot, slack)


async def test_answer_posted_but_not_recorded_is_not_posted_twice(
    bot: DuckRun, slack: FakeSlack
) -> None:
    """Killed while the answer's chat.postMessage is in flight: Slack shows the
    answer, the store does not know it went out. Recovery must not say it twice."""

    def is_answer(params: dict[str, Any]) -> bool:
        return str(params.get("text", "")).startswith(ANSWER_PREFIX)

    slack.hold("chat.postMessage", is_answer)
    await bot.start()
    asked = mention(slack, "is web-4 healthy?")
    assert await bot.post_event(asked.envelope) == 200, bot.stderr()
    await wait_for(
        slack,
        lambda: [c for c in slack.calls_to("chat.postMessage") if is_answer(c.params)],
        "the answer's post to be on its way",
        within=40,
    )
    await bot.kill()
    slack.release("chat.postMessage")
    await wait_for(slack, lambda: answers(slack, asked.ts), "the answer in Slack")

    await bot.start()
    await bot.recovered()
    await wait_for(
        slack,
        lambda: rows(
            bot.db,
            "SELECT 1 FROM tasks WHERE conversation = ? AND answered_at IS NOT NULL",
            (asked.conversation,),
        ),
        "the answer to be recorded as given",
    )
    await bot.stop()

    assert answers(slack, asked.ts) == ["Answer: ok."], said(slack, asked.ts)
    assert_consistent(bot.db)
    await assert_restart_changes_nothing(bot, slack)


async def test_a_slack_outage_leaves_no_card_or_answer_stale(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer
) -> None:
    """No kill: Slack refuses every post, then every update, for a while. What the
    bot owed is carried out by the periodic recovery once Slack is back: the card
    posted, the card resolved, the answer posted, each once."""
    ModelScript(model_server)
    bot = DuckRun(tmp_path, slack, model_server, DUCKLM_RECOVERY_INTERVAL="1")
    try:
        await bot.start()
        slack.fail("chat.postMessage", "service_unavailable", times=10_000)
        asked = mention(slack, "please run approve-6")
        assert await bot.post_event(asked.envelope) == 200, bot.stderr()
        await wait_for(
            slack,
            lambda: (
                status_of(bot.db, asked.conversation) == "waiting_for_approval"
                and [
                    c for c in slack.calls_to("chat.postMessage") if buttons(c.params.get("blocks"))
                ]
            ),
            "the card's post to fail",
            within=40,
        )
        assert cards(slack, asked.ts) == []
        slack.fail("chat.postMessage", "service_unavailable", times=0)  # Slack is back
        [card] = await wait_for(slack, lambda: cards(slack, asked.ts), "the card, repaired")

        slack.fail("chat.update", "service_unavailable", times=10_000)
        slack.fail("chat.postMessage", "service_unavailable", times=10_000)
        assert await bot.post_interaction(click(slack, card)) == 200
        await wait_for(
            slack,
            lambda: (
                status_of(bot.db, asked.conversation) == "completed"
                and slack.calls_to("chat.update")
            ),
            "the task to finish while Slack is down",
            within=40,
        )
        assert card_buttons_now(slack, card) != [] and answers(slack, asked.ts) == []
        slack.fail("chat.update", "service_unavailable", times=0)
        slack.fail("chat.postMessage", "service_unavailable", times=0)
        await wait_for(slack, lambda: not card_buttons_now(slack, card), "the card, resolved")
        await wait_for(slack, lambda: answers(slack, asked.ts), "the answer, posted")
        await bot.stop(quiet=False)  # the refused calls are logged, with their tracebacks

        assert answers(slack, asked.ts) == ["Answer: approve-6."]
        assert cards(slack, asked.ts) == [card]
        assert bot.effects() == ["approve-6"]
        assert_consistent(bot.db)
    finally:
        await bot.close()
