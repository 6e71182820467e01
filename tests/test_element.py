"""DuckLM on Matrix with a person who uses Element: the real bot (MatrixPlatform, as
tests/test_matrix.py starts it) against the real Synapse, and the person played by
matrix-js-sdk (tests/element/client.mjs), which sends events exactly as Element
builds them: pills with m.mentions, thread replies with is_falling_back, reactions
from the emoji picker (✅ is U+2705 U+FE0F), edits with m.new_content, and DMs that
start on the first message, sent before the bot has joined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.service import LATE_TEXT
from tests import element_client, test_matrix
from tests.conftest import ACTION, THINKER, directive, shell
from tests.element_client import ElementUser, OpenElement
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.synapse import SynapseServer
from tests.matrix_helpers import (
    NO_ACTIONS,
    PASSWORD,
    body,
    bot_notice,
    content_answers,
    edit_of,
    flaky_proxy,
    joined,
    relation,
    tasks_in_thread,
)
from tests.test_matrix import Bot, StartBot

pytestmark = pytest.mark.timeout(120)

# The fixtures this module shares (pytest finds them by name in the module): the bots of
# tests/test_matrix.py, started exactly as there, and the Element client.
bots = test_matrix.bots
duck = test_matrix.duck
people = test_matrix.people
element_packages = element_client.element_packages
element = element_client.element

VS16 = "\ufe0f"


# -- people ------------------------------------------------------------------------


@pytest.fixture
async def alice(element: OpenElement, people: dict[str, str]) -> ElementUser:
    """The approver (and admin) of test_matrix's bots, in Element."""
    return await element(people["alice"], PASSWORD)


@pytest.fixture
async def bob(element: OpenElement, people: dict[str, str]) -> ElementUser:
    """Someone in the room who may ask but not approve, in Element."""
    return await element(people["bob"], PASSWORD)


async def room_with_bot(owner: ElementUser, duck: str, *others: ElementUser) -> str:
    """A room of three or more (not a direct chat): the bot must be mentioned."""
    room = await owner.create_room([duck, *(o.user_id for o in others)])
    for other in others:
        await owner.wait_for(invited(other.user_id, room), "the invite")
        await other.join(room)
    await owner.wait_for(joined(duck, room), "the bot joining")
    return room


async def answering_room(
    bots: StartBot, model_server: FakeModelServer, alice: ElementUser, bob: ElementUser, duck: str
) -> str:
    """The bot started, in a room with alice and bob, the model answering by content."""
    await bots()
    room = await room_with_bot(alice, duck, bob)
    content_answers(model_server)
    return room


async def ask_for_approval(
    model_server: FakeModelServer,
    asker: ElementUser,
    room: str,
    duck: str,
    command: str,
    answer: str,
) -> tuple[str, dict[str, Any]]:
    """`asker` mentions the bot; the agent wants `command`, then nothing more, and
    says `answer` (anything later is answered by content); returns (question, card)."""
    model_server.reply(ACTION, Text(directive(shell(command))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text(answer))
    content_answers(model_server)
    question = await asker.say(room, f"please run {command}", mention=duck)
    card = await asker.wait_for(bot_notice(duck, question, "Approval needed"), "the card")
    return question, card


def invited(user_id: str, room_id: str) -> Any:
    return {
        "room_id": room_id,
        "type": "m.room.member",
        "state_key": user_id,
        "content": {"membership": "invite"},
    }


def by_bot_in_thread(events: list[dict[str, Any]], duck: str, root: str) -> list[dict[str, Any]]:
    """The bot's messages in the thread of `root` (edits of its card excluded)."""
    return [
        e
        for e in events
        if e.get("sender") == duck
        and e.get("type") == "m.room.message"
        and relation(e).get("rel_type") == "m.thread"
        and relation(e).get("event_id") == root
    ]


def replaces(event_id: str) -> dict[str, str]:
    return {"rel_type": "m.replace", "event_id": event_id}


def hint_about_edits(duck: str, root: str) -> Any:
    def match(event: dict[str, Any]) -> bool:
        return bot_notice(duck, root)(event) and "edit" in body(event).lower()

    return match


async def settled(user: ElementUser, room: str, duck: str) -> list[dict[str, Any]]:
    """The room's events once the bot has answered a probe sent after everything else:
    whatever it was going to do with earlier events, it has done (it handles a room's
    events in order), so counting them now is not a race."""
    probe = await user.say(room, "one more: last question?", mention=duck)
    await user.wait_for(bot_notice(duck, probe, "last question?"), "the answer to the probe")
    return await user.room_events(room)


async def approved_runs(bot: Bot, room: str, root: str) -> int:
    """How many times the task in the thread of `root` started an approved action."""
    (task,) = await tasks_in_thread(bot.runtime, room, root)
    return sum(
        1
        for e in await bot.runtime.stores.events.list_events(task.task_id)
        if e.event_type == "tool_call_started" and "approval_id" in e.payload
    )


# -- tests ----------------------------------------------------------------------------


async def test_the_client_sends_events_shaped_as_element_sends_them(
    element: OpenElement, synapse: SynapseServer
) -> None:
    """The harness itself, between two people and no bot: what one sends is what the
    other receives, in Element's shapes (so the bot tests below test the real thing)."""
    carol = await element(synapse.register(synapse.unique("carol"), PASSWORD), PASSWORD)
    dave = await element(synapse.register(synapse.unique("dave"), PASSWORD), PASSWORD)
    room = await carol.create_room([dave.user_id], name="shapes")
    await dave.wait_for(invited(dave.user_id, room), "the invite")
    await dave.join(room)
    await carol.wait_for(joined(dave.user_id, room), "dave joining")

    root = await carol.say(room, "look <here> & there", mention=dave.user_id)
    got = await dave.wait_for({"event_id": root}, "the pill message")
    name = dave.user_id[1:].partition(":")[0]  # Synapse's default display name
    assert got["content"] == {
        "msgtype": "m.text",
        "body": f"{name}: look <here> & there",
        "format": "org.matrix.custom.html",
        "formatted_body": f'<a href="https://matrix.to/#/{dave.user_id}">{name}</a>: '
        "look &lt;here&gt; &amp; there",
        "m.mentions": {"user_ids": [dave.user_id]},
    }

    first = await dave.say(room, "in the thread", thread=root)
    await carol.wait_for({"event_id": first}, "dave's reply")  # read before she answers
    second = await carol.say(room, "still in it", thread=root)
    shapes = [
        (await carol.wait_for({"event_id": e}, "a thread reply"))["content"]
        for e in (first, second)
    ]
    assert shapes[0]["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": root,
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": root},  # nothing in the thread yet: the root
    }
    assert shapes[1]["m.relates_to"]["m.in_reply_to"] == {"event_id": first}  # the latest
    assert shapes[0]["m.mentions"] == {} and "formatted_body" not in shapes[0]

    quoted = await dave.say(room, "a reply", reply_to=root, fallback=True)
    reply = (await carol.wait_for({"event_id": quoted}, "the reply"))["content"]
    assert reply["m.relates_to"] == {"m.in_reply_to": {"event_id": root}}
    assert reply["m.mentions"] == {"user_ids": [carol.user_id]}  # the replied-to sender
    assert reply["body"].startswith(f"> <{carol.user_id}> {name}: look")
    assert reply["body"].endswith("\n\na reply")
    assert reply["formatted_body"].startswith("<mx-reply><blockquote>")

    edited = await carol.edit(room, root, "look again", mention=dave.user_id)
    edit = (await dave.wait_for({"event_id": edited}, "the edit"))["content"]
    assert edit["body"] == f"* {name}: look again"
    assert edit["m.new_content"]["body"] == f"{name}: look again"
    assert edit["m.new_content"]["m.mentions"] == {"user_ids": [dave.user_id]}
    assert edit["m.mentions"] == {}  # dave was mentioned before: not notified again
    assert edit["m.relates_to"] == replaces(root)

    picked = {}
    for emoji in ("✅", "❌", "♾", "👍"):
        reaction = await dave.react(room, root, emoji)
        got = await carol.wait_for({"event_id": reaction}, f"the {emoji} reaction")
        picked[emoji] = got["content"]["m.relates_to"]["key"]
    # Element's picker sends emojibase's form, with the variation selector U+FE0F.
    assert picked == {e: e + VS16 for e in picked}

    room_dm, hello = await carol.start_dm(dave.user_id, "hi dave")
    await dave.wait_for(invited(dave.user_id, room_dm), "the DM invite")
    created = await carol.room_events(room_dm)
    create = next(
        e for e in created if e["type"] == "m.room.member" and e["state_key"] == dave.user_id
    )
    assert create["content"].get("is_direct") is True
    assert created[-1]["event_id"] == hello  # sent before dave joined
    assert not [e for e in created if joined(dave.user_id, room_dm)(e)]


async def test_a_pill_mention_is_answered_in_its_thread_and_so_is_a_follow_up(
    bots: StartBot,
    alice: ElementUser,
    bob: ElementUser,
    duck: str,
    model_server: FakeModelServer,
) -> None:
    room = await answering_room(bots, model_server, alice, bob, duck)

    question = await alice.say(room, "what does the duck say?", mention=duck)
    sent = await alice.wait_for({"event_id": question}, "the echo of the question")
    # Element's shape: the pill's display name in body, a matrix.to link, m.mentions
    assert sent["content"]["m.mentions"] == {"user_ids": [duck]}
    assert f'<a href="https://matrix.to/#/{duck}">' in sent["content"]["formatted_body"]
    assert sent["content"]["body"].endswith(": what does the duck say?")
    assert duck not in sent["content"]["body"]  # the name, not the id

    # The mention (the pill's name) is not part of the question the model sees.
    answer = await alice.wait_for(
        bot_notice(duck, question, "answer to: what does the duck say?"), "the answer"
    )
    assert answer["content"]["m.relates_to"]["m.in_reply_to"] == {"event_id": question}

    # A follow-up in Element's thread view: is_falling_back, m.in_reply_to the latest
    # reply (the bot's answer), no mention.
    await bob.wait_for({"event_id": answer["event_id"]}, "the answer, read by bob")
    follow_up = await bob.say(room, "and louder?", thread=question)
    echoed = await bob.wait_for({"event_id": follow_up}, "the echo of the follow-up")
    assert echoed["content"]["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": question,
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": answer["event_id"]},
    }
    assert echoed["content"]["m.mentions"] == {}
    await bob.wait_for(bot_notice(duck, question, "answer to: and louder?"), "the follow-up answer")

    events = await settled(alice, room, duck)
    answers = [body(e) for e in by_bot_in_thread(events, duck, question)]
    assert answers == ["answer to: what does the duck say?", "answer to: and louder?"]
    asked = [r for r in model_server.requests_for(THINKER) if "and louder?" in str(r.body)]
    assert "what does the duck say?" in str(asked[0].body["messages"])  # the thread so far


async def test_a_check_mark_from_the_picker_approves_once_and_updates_the_card(
    bots: StartBot,
    alice: ElementUser,
    bob: ElementUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(
        model_server, bob, room, duck, "touch approved.txt", "Created approved.txt."
    )

    # The bot's seeded ✅ is what the picker sends, so a picked ✅ joins its pill.
    seed = await alice.wait_for(
        lambda e: (
            e.get("sender") == duck
            and relation(e).get("rel_type") == "m.annotation"
            and relation(e).get("event_id") == card["event_id"]
            and str(relation(e).get("key")).startswith("\u2705")
        ),
        "the bot's ✅ seed",
    )
    assert relation(seed)["key"] == "\u2705" + VS16

    reaction = await alice.react(room, card["event_id"], "✅")
    picked = await alice.wait_for({"event_id": reaction}, "the echo of the reaction")
    assert picked["content"]["m.relates_to"]["key"] == "\u2705" + VS16

    edit = await alice.wait_for(edit_of(card["event_id"], "Approved"), "the card's edit")
    assert alice.qualified in edit["content"]["m.new_content"]["body"]
    await alice.wait_for(bot_notice(duck, question, "Created approved.txt"), "the answer")
    assert (tmp_path / "workspace" / "approved.txt").exists()

    events = await settled(alice, room, duck)
    assert await approved_runs(bot, room, question) == 1
    card_edits = [e for e in events if relation(e) == replaces(card["event_id"])]
    assert len(card_edits) == 1
    assert await bot.runtime.approvals.pending() == []


async def test_a_thumbs_up_on_a_card_does_nothing(
    bots: StartBot,
    alice: ElementUser,
    bob: ElementUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """👍 is Element's first quick reaction and means "seen": it must never approve."""
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(
        model_server, bob, room, duck, "touch thumbs.txt", "Not touched."
    )

    await alice.react(room, card["event_id"], "👍")  # the quick reaction, as the picker sends it
    await alice.react(room, card["event_id"], key="\U0001f44d")  # and without U+FE0F
    await alice.react(room, card["event_id"], "✔")
    # ❌ after them: the bot handles a room's events in order, so once the card shows
    # the denial, the reactions before it have been seen (and must have done nothing).
    await alice.react(room, card["event_id"], "❌")

    edit = await alice.wait_for(lambda e: relation(e) == replaces(card["event_id"]), "an edit")
    assert "Denied" in edit["content"]["m.new_content"]["body"]  # not "Approved" by 👍
    await alice.wait_for(bot_notice(duck, question, "Not touched"), "the answer")
    assert not (tmp_path / "workspace" / "thumbs.txt").exists()
    assert await approved_runs(bot, room, question) == 0
    events = await settled(alice, room, duck)
    assert not [e for e in events if edit_of(card["event_id"], "Approved")(e)]


async def test_an_edit_of_an_answered_question_gets_one_hint(
    bots: StartBot,
    alice: ElementUser,
    bob: ElementUser,
    duck: str,
    model_server: FakeModelServer,
) -> None:
    room = await answering_room(bots, model_server, alice, bob, duck)
    question = await alice.say(room, "what does the duck say?", mention=duck)
    await alice.wait_for(bot_notice(duck, question, "answer to:"), "the answer")

    first = await alice.edit(room, question, "what does the goose say?", mention=duck)
    echoed = await alice.wait_for({"event_id": first}, "the echo of the edit")
    content = echoed["content"]
    assert content["body"].startswith("* ") and content["m.mentions"] == {}
    assert content["m.new_content"]["m.mentions"] == {"user_ids": [duck]}
    assert content["m.relates_to"] == replaces(question)
    await alice.wait_for(hint_about_edits(duck, question), "the hint that edits are not re-run")

    await alice.edit(room, question, "what does the swan say?", mention=duck)  # again
    events = await settled(alice, room, duck)
    replies = by_bot_in_thread(events, duck, question)
    assert len([e for e in replies if "edit" in body(e).lower()]) == 1
    assert len([e for e in replies if "answer to:" in body(e)]) == 1
    assert not [r for r in model_server.requests if "goose" in str(r.body) or "swan" in str(r.body)]


async def test_the_first_dm_message_sent_before_the_bot_joined_is_answered_once(
    bots: StartBot,
    alice: ElementUser,
    duck: str,
    synapse: SynapseServer,
    model_server: FakeModelServer,
) -> None:
    # The bot reaches the homeserver through a proxy the test cuts while Alice starts
    # the DM, so the first message is certainly in the room before the bot has joined.
    async with flaky_proxy(synapse) as proxy:
        await bots(matrix_homeserver=proxy.url)
        content_answers(model_server)
        proxy.cut()
        room, hello = await alice.start_dm(duck, "hello duck, are you there?")
        proxy.restore()

        answer = await alice.wait_for(
            bot_notice(duck, hello, "are you there?"), "the answer to the first message", within=40
        )
        assert LATE_TEXT not in body(answer)  # the bot was running: not "late"
        events = await alice.room_events(room)
        ids = [e["event_id"] for e in events]
        bot_joined = next(e["event_id"] for e in events if joined(duck, room)(e))
        assert ids.index(hello) < ids.index(bot_joined)  # sent before the bot joined
        assert ids.index(bot_joined) < ids.index(answer["event_id"])

        events = await settled(alice, room, duck)
        assert len(by_bot_in_thread(events, duck, hello)) == 1
        asked = [r for r in model_server.requests_for(THINKER) if "are you there?" in str(r.body)]
        assert len(asked) == 1


async def test_a_burst_while_the_bot_is_down_is_handled_once_after_the_restart(
    bots: StartBot,
    alice: ElementUser,
    bob: ElementUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """More than ten events arrive while the bot is down, so its first sync after the
    restart is `limited`: an approver's ✅ on an old card and a question, followed by a
    dozen other messages, are both handled, once."""
    first = await bots()
    room = await room_with_bot(alice, duck, bob)
    model_server.reply(ACTION, Text(directive(shell("touch later.txt"))))
    question = await bob.say(room, "please run touch later.txt", mention=duck)
    card = await bob.wait_for(bot_notice(duck, question, "Approval needed"), "the card")
    await first.stop()

    content_answers(model_server)
    await alice.react(room, card["event_id"], "✅")
    missed = await bob.say(room, "are you back?", mention=duck)
    for n in range(12):
        await (alice if n % 2 else bob).say(room, f"chatter {n}")

    second = await bots()
    await alice.wait_for(edit_of(card["event_id"], "Approved"), "the card's edit", within=40)
    await alice.wait_for(bot_notice(duck, question, "answer to"), "the answer after approval")
    late = await alice.wait_for(
        bot_notice(duck, missed, "are you back?"), "the late answer", within=40
    )
    assert LATE_TEXT in body(late)  # it says it was away
    assert (tmp_path / "workspace" / "later.txt").exists()

    events = await settled(alice, room, duck)
    assert len(by_bot_in_thread(events, duck, missed)) == 1
    cards = [e for e in by_bot_in_thread(events, duck, question) if "Approval needed" in body(e)]
    assert len(cards) == 1
    card_edits = [e for e in events if relation(e) == replaces(card["event_id"])]
    assert len(card_edits) == 1
    assert await approved_runs(second, room, question) == 1
    chatter = [r for r in model_server.requests if "chatter" in str(r.body)]
    assert not chatter  # not addressed to the bot: skipped, not answered


async def test_a_thread_message_to_someone_else_is_not_answered(
    bots: StartBot,
    alice: ElementUser,
    bob: ElementUser,
    duck: str,
    model_server: FakeModelServer,
) -> None:
    """In the bot's thread, a message with a pill to another person only (Element puts
    just that person in m.mentions) is between people; the bot stays out of it."""
    room = await answering_room(bots, model_server, alice, bob, duck)
    question = await bob.say(room, "is web-1 up?", mention=duck)
    answer = await bob.wait_for(bot_notice(duck, question, "answer to:"), "the answer")

    aside = await bob.say(
        room, "can you double-check this?", mention=alice.user_id, thread=question
    )
    sent = await bob.wait_for({"event_id": aside}, "the echo of the aside")
    assert sent["content"]["m.mentions"] == {"user_ids": [alice.user_id]}
    # A follow-up for the bot after it, in the same thread and without a mention, is
    # answered: by then the aside has been seen.
    await bob.wait_for({"event_id": answer["event_id"]}, "the answer, read")
    await bob.say(room, "and web-2?", thread=question)
    await bob.wait_for(bot_notice(duck, question, "answer to: and web-2?"), "the follow-up answer")

    events = await settled(alice, room, duck)
    answers = [body(e) for e in by_bot_in_thread(events, duck, question)]
    assert answers == ["answer to: is web-1 up?", "answer to: and web-2?"]
    asked = [r for r in model_server.requests_for(THINKER) if "double-check" in str(r.body)]
    assert all("and web-2?" in str(r.body) for r in asked)  # only as history, never asked


async def test_approve_after_a_deny_is_told_it_was_decided_without_a_model_call(
    bots: StartBot,
    alice: ElementUser,
    bob: ElementUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(
        model_server, bob, room, duck, "touch late.txt", "Left it alone."
    )
    await alice.react(room, card["event_id"], "❌")
    await alice.wait_for(bot_notice(duck, question, "Left it alone"), "the answer")
    calls = len(model_server.requests)

    await alice.wait_for({"event_id": card["event_id"]}, "the card, read")
    await alice.say(room, "approve", thread=question)
    told = await alice.wait_for(bot_notice(duck, question, "Already decided"), "the answer")
    assert "deny" in body(told) and alice.qualified in body(told)
    assert len(model_server.requests) == calls  # no model call for it
    assert not (tmp_path / "workspace" / "late.txt").exists()


async def test_a_reply_with_the_quoted_fallback_decides(
    bots: StartBot,
    alice: ElementUser,
    bob: ElementUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """A reply to the card from a client without threads, with the legacy fallback
    (the card quoted in body and <mx-reply>): the bot reads only what Alice typed."""
    await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(
        model_server, bob, room, duck, "touch quoted.txt", "Not touching it."
    )

    await alice.wait_for({"event_id": card["event_id"]}, "the card, read")
    reply = await alice.say(
        room, "deny not during the freeze", reply_to=card["event_id"], fallback=True
    )
    sent = await alice.wait_for({"event_id": reply}, "the echo of the reply")
    assert sent["content"]["body"].startswith(f"> <{duck}> **Approval needed**")

    edit = await alice.wait_for(lambda e: relation(e) == replaces(card["event_id"]), "an edit")
    new_body = edit["content"]["m.new_content"]["body"]
    assert "Denied" in new_body and "not during the freeze" in new_body
    assert "Approval needed" not in new_body.partition("Denied")[2]  # the quote is not the reason
    await alice.wait_for(bot_notice(duck, question, "Not touching it"), "the answer")
    assert not (tmp_path / "workspace" / "quoted.txt").exists()
