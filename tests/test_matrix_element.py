"""DuckLM on Matrix as Element users meet it (issue #16, items 6-10): the real bot
on the real Synapse, people played by matrix-nio clients that send events the way
Element builds them (tests/fakes/synapse.py `element_*`): pills with m.mentions,
thread replies falling back to a reply, picker reactions with U+FE0F, edits with
m.new_content, a DM whose first message is sent before the bot joined; and the
gaps a bot that was down has to catch up on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bot.matrix.events import EDIT_HINT, LEAVING_NOTICE
from bot.service import LATE_TEXT
from tests import test_matrix
from tests.conftest import ACTION, THINKER, directive, shell
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.synapse import ELEMENT_PICKER, MatrixUser, SynapseServer
from tests.matrix_helpers import (
    PASSWORD,
    body,
    bot_events_in_thread,
    bot_notice,
    card_decided,
    content_answers,
    edit_of,
    flaky_proxy,
    joined,
    left,
    poll,
    relation,
    tasks_in_thread,
    then_answers,
)
from tests.test_matrix import StartBot, room_with_bot

pytestmark = pytest.mark.timeout(120)

# Shared with tests/test_matrix.py (pytest finds fixtures by name in the module).
bots = test_matrix.bots
duck = test_matrix.duck
people = test_matrix.people
alice = test_matrix.alice
bob = test_matrix.bob

# More than a sync's timeline carries (Synapse gives 10 events per room).
CHATTER = 12


def pill(user: MatrixUser | str, name: str | None = None) -> tuple[str, str]:
    user_id = user if isinstance(user, str) else user.user_id
    return user_id, name or user_id.partition(":")[0].lstrip("@")


async def element_card(
    model_server: FakeModelServer, asker: MatrixUser, room: str, duck: str, command: str
) -> tuple[str, dict[str, Any]]:
    """`asker` asks with an Element pill; the agent wants `command`: (question, card)."""
    model_server.reply(ACTION, Text(directive(shell(command, "the user asked"))))
    question = await asker.element_say(room, f"please run {command}", pills=[pill(duck)])
    card = await asker.wait_for(bot_notice(duck, question, "Approval needed"), "the card")
    return question, card


async def say_chatter(user: MatrixUser, room: str, prefix: str = "chatter") -> list[str]:
    """`CHATTER` messages not for the bot: more than one sync carries."""
    return [await user.element_say(room, f"{prefix} {n}") for n in range(CHATTER)]


async def room_then_stopped(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str, **overrides: Any
) -> str:
    """A room the bot joined with alice and bob, the bot stopped again since."""
    bot = await bots(**overrides)
    room = await room_with_bot(alice, duck, bob)
    await bot.stop()
    return room


async def settled(user: MatrixUser, seconds: float = 1.0) -> None:
    """Sync for a while so anything the bot was going to send has arrived (used only
    before asserting that something did *not* happen)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        await user.sync(200)


# -- item 6: gaps ---------------------------------------------------------------------


async def test_restart_catches_up_on_more_than_a_sync_carries(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """Down while an approver ✅s an old card and someone asks, with a dozen other
    messages after: both are handled after the restart, once, the answer late."""
    first = await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await element_card(model_server, bob, room, duck, "touch caught-up.txt")
    await first.stop()
    before_the_gap = first.platform.state.load_sync_token(duck)
    assert before_the_gap

    content_answers(model_server)
    await alice.element_react(room, card["event_id"], "white_check_mark")
    missed = await bob.element_say(room, "what is the uptime?", pills=[pill(duck)])
    chatter = await say_chatter(bob, room)

    second = await bots()
    await alice.wait_for(edit_of(card["event_id"], "Approved"), "the card's edit")
    await alice.wait_for(bot_notice(duck, question, "answer to"), "the approved task's answer")
    answer = await alice.wait_for(
        bot_notice(duck, missed, "answer to: what is the uptime?"), "the late answer"
    )
    assert LATE_TEXT in body(answer)
    assert (tmp_path / "workspace" / "caught-up.txt").exists()

    # once each, also after yet another restart that reads the same stretch again
    # (as if the second run had died before saving any of its sync tokens)
    await second.stop()
    second.platform.state.save_sync_token(duck, before_the_gap)
    third = await bots()
    probe = await bob.element_say(room, "still once?", pills=[pill(duck)])
    await bob.wait_for(bot_notice(duck, probe, "answer to: still once?"), "the probe's answer")
    await settled(alice)
    assert len(bot_events_in_thread(alice, duck, missed)) == 1
    edits = [e for e in alice.events if edit_of(card["event_id"], "Approved")(e)]
    assert len(edits) == 1
    asked = [r for r in model_server.requests_for(THINKER) if "what is the uptime?" in str(r.body)]
    assert len(asked) == 1
    assert await third.runtime.approvals.pending() == []
    for said in chatter:  # chatter is never answered
        assert not bot_events_in_thread(alice, duck, said)


async def test_a_burst_between_two_syncs_is_caught_up_while_running(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    synapse: SynapseServer,
    model_server: FakeModelServer,
) -> None:
    """Not only after a restart: the bot's connection drops, more than a sync
    carries is said meanwhile, and the next sync's gap is fetched (not late: the
    bot was running)."""
    async with flaky_proxy(synapse) as proxy:
        await bots(matrix_homeserver=proxy.url)
        room = await room_with_bot(alice, duck, bob)
        content_answers(model_server)
        proxy.cut()
        # Only once the bot's syncs are refused is it surely not listening (a
        # long-poll cut in flight may still bring the next event when it retries).
        await bob.element_say(room, "first words while it is away")
        await poll(lambda: proxy.refused > 0, "a sync attempt through the cut proxy")
        question = await bob.element_say(room, "did you get this?", pills=[pill(duck)])
        await say_chatter(bob, room)
        proxy.restore()
        answer = await bob.wait_for(
            bot_notice(duck, question, "answer to: did you get this?"), "the answer", within=60
        )
        assert LATE_TEXT not in body(answer)


async def test_a_gap_the_homeserver_fails_to_give_is_fetched_again(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    synapse: SynapseServer,
    model_server: FakeModelServer,
) -> None:
    """`/messages` fails (more often than nio retries by itself): the batch is not
    marked handled with a hole in it; it is handled again, and the question in
    the gap is answered."""
    async with flaky_proxy(synapse) as proxy:
        room = await room_then_stopped(bots, alice, bob, duck, matrix_homeserver=proxy.url)
        content_answers(model_server)
        question = await bob.element_say(room, "through the hole?", pills=[pill(duck)])
        await say_chatter(bob, room)

        proxy.drop_requests("/messages?", 9)
        await bots(matrix_homeserver=proxy.url)
        await bob.wait_for(
            bot_notice(duck, question, "answer to: through the hole?"), "the answer", within=60
        )
        assert proxy.dropped >= 3  # more than nio retries by itself: the call failed


async def test_catching_up_is_bounded(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
) -> None:
    """DUCKLM_MATRIX_BACKLOG_MAX: only the newest missed events are fetched; an old
    question beyond the bound is skipped, a newer one still answered."""
    room = await room_then_stopped(bots, alice, bob, duck)

    content_answers(model_server)
    too_old = await bob.element_say(room, "beyond the bound?", pills=[pill(duck)])
    await say_chatter(bob, room)
    within = await bob.element_say(room, "within the bound?", pills=[pill(duck)])
    await say_chatter(bob, room, "more chatter")

    await bots(matrix_backlog_max=CHATTER + 1)
    await bob.wait_for(bot_notice(duck, within, "within the bound?"), "the answer within")
    await settled(bob)
    assert not bot_events_in_thread(bob, duck, too_old)
    assert "beyond the bound" not in str([r.body for r in model_server.requests])


async def test_catching_up_skips_what_is_too_old(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
) -> None:
    """DUCKLM_MATRIX_BACKLOG_MAX_AGE: what was said longer ago is not answered now,
    in the gap or in the first sync; what is said after the start is."""
    room = await room_then_stopped(bots, alice, bob, duck)
    content_answers(model_server)
    in_gap = await bob.element_say(room, "old, in the gap?", pills=[pill(duck)])
    await say_chatter(bob, room)
    in_sync = await bob.element_say(room, "old, in the sync?", pills=[pill(duck)])
    await asyncio.sleep(0.05)  # the age bound below is 10 ms: these are older

    await bots(matrix_backlog_max_age=0.01)
    fresh = await bob.element_say(room, "new question?", pills=[pill(duck)])
    await bob.wait_for(bot_notice(duck, fresh, "new question?"), "the new answer")
    await settled(bob)
    assert not bot_events_in_thread(bob, duck, in_gap)
    assert not bot_events_in_thread(bob, duck, in_sync)


# -- item 7: the first message of a DM --------------------------------------------


async def test_first_dm_message_sent_before_the_join_is_answered_once(
    bots: StartBot, alice: MatrixUser, duck: str, model_server: FakeModelServer
) -> None:
    bot = await bots()
    content_answers(model_server)
    room, first = await alice.element_start_dm(duck, "hello duck, are you there?")
    await alice.wait_for(joined(duck, room), "the bot joining the DM")
    answer = await alice.wait_for(
        bot_notice(duck, first, "answer to: hello duck, are you there?"), "the answer"
    )
    assert LATE_TEXT not in body(answer)  # asked a moment ago, while the bot ran
    second = await alice.element_say(room, "and a second one?")
    await alice.wait_for(bot_notice(duck, second, "answer to: and a second one?"), "answer two")
    await settled(alice)
    assert len(bot_events_in_thread(alice, duck, first)) == 1
    (task,) = await tasks_in_thread(bot.runtime, room, first)
    assert task.requested_by == alice.qualified


async def test_history_before_the_invite_is_still_not_answered(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str, model_server: FakeModelServer
) -> None:
    """Only what was said since the invite is for the bot: earlier questions in the
    room it is invited to are history."""
    await bots()
    content_answers(model_server)
    room = await alice.create_room([bob.user_id])
    await bob.join(room)
    before = await alice.element_say(room, "before the invite?", pills=[pill(duck)])
    await alice.invite(room, duck)
    await alice.wait_for(joined(duck, room), "the bot joining")
    after = await alice.element_say(room, "after the join?", pills=[pill(duck)])
    await alice.wait_for(bot_notice(duck, after, "after the join?"), "the answer")
    await settled(alice)
    assert not bot_events_in_thread(alice, duck, before)


async def test_invited_while_down_answers_what_came_after_the_invite_only(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str, model_server: FakeModelServer
) -> None:
    """Invited while it was down, with more said since than a sync carries: after
    the restart it joins, fetches back to its invite (not further), and answers
    the question asked after the invite, late."""
    first = await bots()
    await first.stop()
    content_answers(model_server)
    room = await alice.create_room([bob.user_id])
    await bob.join(room)
    before = await alice.element_say(room, "asked before the invite?", pills=[pill(duck)])
    await alice.invite(room, duck)
    after = await bob.element_say(room, "asked after the invite?", pills=[pill(duck)])
    await say_chatter(bob, room)

    await bots()
    await alice.wait_for(joined(duck, room), "the bot joining")
    answer = await alice.wait_for(
        bot_notice(duck, after, "answer to: asked after the invite?"), "the answer"
    )
    assert LATE_TEXT in body(answer)
    await settled(alice)
    assert not bot_events_in_thread(alice, duck, before)
    assert "asked before the invite" not in str([r.body for r in model_server.requests])


# -- items 8 and 9: reactions -------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["+1", "heavy_check_mark", "ballot_box_with_check", "-1", "heavy_multiplication_x"],
)
async def test_a_look_alike_reaction_decides_nothing(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
    name: str,
) -> None:
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)
    _, card = await element_card(model_server, bob, room, duck, "touch acked.txt")
    await alice.element_react(room, card["event_id"], name)

    # The approver then asks something else: by the time that is answered, the
    # reaction (sent before it) was handled, and did nothing.
    content_answers(model_server)
    probe = await alice.element_say(room, "anything new?", pills=[pill(duck)])
    await alice.wait_for(bot_notice(duck, probe, "answer to"), "the probe's answer")
    assert not [e for e in alice.events if edit_of(card["event_id"], "")(e)]
    (pending,) = await bot.runtime.approvals.pending()
    assert pending.decision is None
    assert not (tmp_path / "workspace" / "acked.txt").exists()


async def test_picked_check_mark_with_variation_selector_approves(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await element_card(model_server, bob, room, duck, "touch picked.txt")
    seeded = await alice.wait_for(
        lambda e: (
            e.get("sender") == duck
            and e.get("type") == "m.reaction"
            and relation(e).get("event_id") == card["event_id"]
        ),
        "a seeded reaction",
    )
    # the bot's pill and the picked reaction are one key, byte for byte
    assert relation(seeded)["key"] == ELEMENT_PICKER["white_check_mark"]

    then_answers(model_server, "Touched it.")
    await alice.element_react(room, card["event_id"], "white_check_mark")
    await card_decided(alice, duck, question, card, "Approved", "Touched it")
    assert (tmp_path / "workspace" / "picked.txt").exists()


async def test_a_key_without_the_selector_still_counts(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """Other clients send ❌ without U+FE0F: the same answer."""
    await bots()
    room = await room_with_bot(alice, duck, bob)
    _, card = await element_card(model_server, bob, room, duck, "touch bare.txt")
    then_answers(model_server, "Left it alone.")
    await alice.react(room, card["event_id"], "\u274c")
    await alice.wait_for(edit_of(card["event_id"], "Denied"), "the card's edit")
    assert not (tmp_path / "workspace" / "bare.txt").exists()


# -- item 10: threads, other people, bots, edits ----------------------------------------


async def test_a_thread_message_to_someone_else_is_not_answered(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str, model_server: FakeModelServer
) -> None:
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)
    content_answers(model_server)
    question = await alice.element_say(room, "what is load?", pills=[pill(duck)])
    await alice.wait_for(bot_notice(duck, question, "answer to"), "the first answer")

    # in the bot's thread, alice talks to bob (a pill to bob, m.mentions = [bob])
    aside = await alice.element_say(
        room, "can you check this tomorrow?", pills=[pill(bob)], thread=question
    )
    # a plain thread reply (m.mentions empty) is still for the bot
    follow_up = await alice.element_say(room, "and memory?", thread=question)
    await alice.wait_for(bot_notice(duck, question, "answer to: and memory?"), "the follow-up")
    await settled(alice)
    # no task was started for the aside (it is only history for the follow-up)
    tasks = await tasks_in_thread(bot.runtime, room, question)
    assert sorted(t.message for t in tasks) == ["and memory?", "what is load?"]
    answers = [e for e in bot_events_in_thread(alice, duck, question) if "answer to" in body(e)]
    assert len(answers) == 2
    assert aside != follow_up


async def test_a_decision_word_after_the_decision_is_told_already_decided(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """`approve` in the card's thread after a deny gets what a late ✅ gets, and no
    model call (the thread reply goes through the inbox like any message)."""
    await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await element_card(model_server, bob, room, duck, "touch late.txt")
    then_answers(model_server, "Not touching it.")
    await alice.element_react(room, card["event_id"], "x")
    await alice.wait_for(bot_notice(duck, question, "Not touching it"), "the answer")
    calls = len(model_server.requests)

    await alice.element_say(room, "approve", thread=question)
    told = await alice.wait_for(bot_notice(duck, question, "Already decided"), "the answer")
    assert "deny" in body(told) and told["content"]["m.mentions"] == {"user_ids": [alice.user_id]}
    await settled(alice)
    assert len(model_server.requests) == calls
    assert not (tmp_path / "workspace" / "late.txt").exists()


async def test_an_edit_gets_one_hint(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str, model_server: FakeModelServer
) -> None:
    await bots()
    room = await room_with_bot(alice, duck, bob)
    content_answers(model_server)
    question = await alice.element_say(room, "what is the dsik usage?", pills=[pill(duck)])
    await alice.wait_for(bot_notice(duck, question, "answer to"), "the answer")

    await alice.element_edit(room, question, "what is the disk usage?")
    await alice.wait_for(bot_notice(duck, question, EDIT_HINT), "the hint")
    await alice.element_edit(room, question, "what is the disk usage, please?")
    # an edit of a message the bot never answered gets nothing
    chatter = await bob.element_say(room, "lunch?")
    await bob.element_edit(room, chatter, "lunch at noon?")
    probe = await alice.element_say(room, "done?", pills=[pill(duck)])
    await alice.wait_for(bot_notice(duck, probe, "answer to"), "the probe's answer")
    await settled(alice)
    hints = [e for e in bot_events_in_thread(alice, duck, question) if body(e) == EDIT_HINT]
    assert len(hints) == 1
    assert not bot_events_in_thread(alice, duck, chatter)
    asked = [r for r in model_server.requests_for(THINKER) if "disk usage" in str(r.body)]
    assert asked == []  # the edit was not run


async def test_another_bots_text_is_marked_and_bounded(
    bots: StartBot,
    alice: MatrixUser,
    duck: str,
    synapse: SynapseServer,
    model_server: FakeModelServer,
) -> None:
    """A bot that posts m.text (DUCKLM_MATRIX_BOT_USERS) in a DuckLM thread is
    answered at most DUCKLM_BOT_REPLIES_PER_THREAD times."""
    other_id = synapse.register(synapse.unique("otherbot"), PASSWORD)
    other = await MatrixUser(synapse, other_id, PASSWORD).login()
    try:
        bot = await bots(matrix_bot_users=[other_id], bot_replies_per_thread=2)
        room = await room_with_bot(alice, duck, other)
        content_answers(model_server)
        question = await alice.element_say(room, "start a thread", pills=[pill(duck)])
        await alice.wait_for(bot_notice(duck, question, "answer to"), "the first answer")
        for n in range(4):
            await other.element_say(room, f"bot says {n}", thread=question)
            if n < 2:
                await alice.wait_for(
                    bot_notice(duck, question, f"answer to: bot says {n}"), f"answer {n}"
                )
        probe = await alice.element_say(room, "a person again", thread=question)
        await alice.wait_for(bot_notice(duck, question, "a person again"), "the person's answer")
        await settled(alice)
        tasks = await tasks_in_thread(bot.runtime, room, question)
        assert sorted(t.message for t in tasks) == [
            "a person again",
            "bot says 0",
            "bot says 1",
            "start a thread",
        ]
        assert not [e for e in alice.events if "answer to: bot says 2" in body(e)]
        assert probe
    finally:
        await other.close()


# -- #22: who may ask ----------------------------------------------------------------------


async def test_strangers_are_declined_refused_and_left(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """With DUCKLM_REQUESTERS naming another server, bob (of this one) is a
    stranger: his invite is declined, his question refused, nothing runs; when
    the last person who may ask leaves, the bot leaves too, saying why."""
    bot = await bots(requesters=["matrix:*:elsewhere.example"])  # alice approves: she may
    declined = await bob.create_room([duck])
    await bob.wait_for(left(duck, declined), "the bot declining bob's invite")

    room = await room_with_bot(alice, duck, bob)
    model_server.reply(ACTION, Text(directive(shell("touch stranger.txt"))))
    asked = await bob.element_say(room, "please run touch stranger.txt", pills=[pill(duck)])
    refusal = await bob.wait_for(bot_notice(duck, asked, "DUCKLM_REQUESTERS"), "the refusal")
    assert refusal["content"]["m.mentions"] == {"user_ids": [bob.user_id]}
    assert await tasks_in_thread(bot.runtime, room, asked) == []
    assert model_server.requests == []
    assert not (tmp_path / "workspace" / "stranger.txt").exists()
    # nor directly: `!duck run` is refused the same way
    ran = await bob.element_say(room, "!duck run touch direct.txt")
    await bob.wait_for(bot_notice(duck, ran, "DUCKLM_REQUESTERS"), "the command's refusal")
    assert await tasks_in_thread(bot.runtime, room, ran) == []
    assert not (tmp_path / "workspace" / "direct.txt").exists()

    await alice.client.room_leave(room)
    await bob.wait_for(
        lambda e: e.get("room_id") == room and body(e) == LEAVING_NOTICE, "the leaving notice"
    )
    await bob.wait_for(left(duck, room), "the bot leaving")


async def test_an_invite_to_a_room_outside_the_channels_is_declined(
    bots: StartBot, alice: MatrixUser, duck: str
) -> None:
    """DUCKLM_CHANNELS names the rooms the bot answers in; it joins no other."""
    served = await alice.create_room()
    await bots(channels=[f"matrix:{served}"])
    other = await alice.create_room([duck])
    await alice.wait_for(left(duck, other), "the bot declining")
    await alice.invite(served, duck)
    await alice.wait_for(joined(duck, served), "the bot joining the served room")
