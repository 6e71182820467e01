"""DuckLM on Matrix, end to end: a real Synapse, real matrix-nio clients, the real
ChatService and runtime, and the fake model server. One homeserver serves the
whole session; every test registers a fresh bot account, so tests never see
each other's rooms.
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.backend import PlatformStartError
from bot.matrix.events import ENCRYPTED_NOTICE
from bot.matrix.platform import MatrixPlatform
from bot.service import ChatService
from runtime.factory import Runtime, build_runtime
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import FakeModelServer, RecordedRequest, Reply, Text
from tests.fakes.synapse import ELEMENT_PICKER, MatrixUser, SynapseServer, free_port

# Other test modules import these from here (edit_of only they use).
from tests.matrix_helpers import (
    NO_ACTIONS,
    PASSWORD,
    body,
    bot_events_in_thread,
    bot_notice,
    card_decided,
    content_answers,
    flaky_proxy,
    joined,
    left,
    poll,
    relation,
    tasks_in_thread,
    then_answers,
)
from tests.matrix_helpers import edit_of as edit_of

pytestmark = pytest.mark.timeout(90)


# -- people and bots -----------------------------------------------------------


@pytest.fixture(scope="module")
def people(synapse: SynapseServer) -> dict[str, str]:
    """alice approves and administers; bob is just a person in the room."""
    return {name: synapse.register(synapse.unique(name), PASSWORD) for name in ("alice", "bob")}


@pytest.fixture
def duck(synapse: SynapseServer) -> str:
    """A fresh bot account per test."""
    return synapse.register(synapse.unique("duck"), PASSWORD)


@pytest_asyncio.fixture
async def alice(synapse: SynapseServer, people: dict[str, str]) -> AsyncIterator[MatrixUser]:
    user = await MatrixUser(synapse, people["alice"], PASSWORD).login()
    try:
        yield user
    finally:
        await user.close()


@pytest_asyncio.fixture
async def bob(synapse: SynapseServer, people: dict[str, str]) -> AsyncIterator[MatrixUser]:
    user = await MatrixUser(synapse, people["bob"], PASSWORD).login()
    try:
        yield user
    finally:
        await user.close()


class Bot:
    """`ducklm run` for Matrix, built through the public constructors."""

    def __init__(self, runtime: Runtime, service: ChatService, platform: MatrixPlatform) -> None:
        self.runtime = runtime
        self.service = service
        self.platform = platform
        self.stopped = False

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.platform.stop()
        await self.service.close()
        await self.runtime.close()


StartBot = Callable[..., Awaitable[Bot]]


@pytest_asyncio.fixture
async def bots(
    tmp_path: Path,
    model_server: FakeModelServer,
    synapse: SynapseServer,
    duck: str,
    people: dict[str, str],
    clean_env: None,
) -> AsyncIterator[StartBot]:
    """Starts bots on one database and state dir (so a second start is a restart)."""
    started: list[Bot] = []

    async def start(**overrides: Any) -> Bot:
        values: dict[str, Any] = {
            "matrix_homeserver": synapse.base_url,
            "matrix_user_id": duck,
            "matrix_password": PASSWORD,
            "approvers": [f"matrix:{people['alice']}"],
            "admins": [f"matrix:{people['alice']}"],
        }
        values.update(overrides)
        runtime = await build_runtime(make_settings(tmp_path, model_server.base_url, **values))
        service = ChatService(runtime)
        platform = MatrixPlatform(service, runtime.settings)
        try:
            await platform.start()
        except BaseException:
            await service.close()
            await runtime.close()
            raise
        bot = Bot(runtime, service, platform)
        started.append(bot)
        return bot

    try:
        yield start
    finally:
        for bot in reversed(started):
            await bot.stop()


# -- rooms and cards -----------------------------------------------------------------


async def room_with_bot(owner: MatrixUser, duck: str, *others: MatrixUser) -> str:
    room = await owner.create_room([duck, *(o.user_id for o in others)])
    for other in others:
        await other.join(room)
    await owner.wait_for(joined(duck, room), "the bot joining")
    return room


async def ask_for_approval(
    model_server: FakeModelServer, asker: MatrixUser, room: str, duck: str, command: str
) -> tuple[str, dict[str, Any]]:
    """`asker` mentions the bot; the agent wants `command`; returns (question, card)."""
    model_server.reply(ACTION, Text(directive(shell(command, "the user asked"))))
    question = await asker.say(room, f"please run {command}", mention=duck)
    card = await asker.wait_for(bot_notice(duck, question, "Approval needed"), "the card")
    return question, card


# -- tests ----------------------------------------------------------------------------


async def test_read_only_question_is_answered_in_its_thread(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str, model_server: FakeModelServer
) -> None:
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)  # three members: not a direct chat
    model_server.reply(ACTION, Text(directive(shell("echo quack"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("The duck says **quack**. <script>alert(1)</script>"))

    chatter = await alice.say(room, "lunch anyone?")  # not addressed to the bot
    question = await alice.say(room, "what does the duck say?", mention=duck)
    answer = await alice.wait_for(bot_notice(duck, question, "quack"), "the answer")

    content = answer["content"]
    assert content["m.relates_to"] == {
        "rel_type": "m.thread",
        "event_id": question,
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": question},
    }
    assert content["format"] == "org.matrix.custom.html"
    assert "<strong>quack</strong>" in content["formatted_body"]
    assert "&lt;script&gt;" in content["formatted_body"]
    assert "<script>" not in content["formatted_body"]
    assert content["m.mentions"] == {}
    assert not bot_events_in_thread(alice, duck, chatter)

    (task,) = await tasks_in_thread(bot.runtime, room, question)
    assert task.status == "completed"
    assert task.requested_by == alice.qualified
    assert task.message == "what does the duck say?"
    # the read-only command ran at once, without a card
    assert "quack" in str(model_server.requests_for(THINKER)[0].body["messages"])

    # In the bot's thread every reply is for the bot, and it sees the thread so far.
    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Still quack."))
    await alice.say(room, "and louder?", thread=question)
    await alice.wait_for(bot_notice(duck, question, "Still quack"), "the follow-up answer")
    messages = model_server.requests_for(THINKER)[-1].body["messages"]
    turns = [(m["role"], m["content"]) for m in messages if m["role"] != "system"]
    assert ("user", "what does the duck say?") in turns
    assert any(role == "assistant" and "quack" in text for role, text in turns)
    assert ("user", "and louder?") in turns


async def test_approve_by_reaction_runs_the_command_and_edits_the_card(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch approved.txt")

    text = body(card)
    assert "touch approved.txt" in text and bob.qualified in text
    assert "```" in text and "<pre><code" in card["content"]["formatted_body"]
    # the approvers in the room are notified
    assert card["content"]["m.mentions"] == {"user_ids": [alice.user_id]}
    assert f"https://matrix.to/#/{alice.user_id}" in card["content"]["formatted_body"]
    # the bot pre-seeds the answers as reactions on its card, spelt as Element's
    # picker spells them (U+FE0F included), so a picked ✅ joins the bot's pill
    seeds = [ELEMENT_PICKER[name] for name in ("white_check_mark", "x", "infinity")]
    assert seeds == ["\u2705\ufe0f", "\u274c\ufe0f", "\u267e\ufe0f"]
    for key in seeds:
        await alice.wait_for(
            lambda e, key=key: (
                e.get("sender") == duck
                and relation(e).get("rel_type") == "m.annotation"
                and relation(e).get("event_id") == card["event_id"]
                and relation(e).get("key") == key
            ),
            f"the {key} seed",
        )
    assert not (tmp_path / "workspace" / "approved.txt").exists()

    then_answers(model_server, "Created approved.txt.")
    await alice.react(room, card["event_id"], "✅")

    edit = await card_decided(alice, duck, question, card, "Approved", "Created approved.txt")
    new_body = edit["content"]["m.new_content"]["body"]
    assert alice.qualified in new_body and "UTC" in new_body
    assert "m.relates_to" not in edit["content"]["m.new_content"]
    assert (tmp_path / "workspace" / "approved.txt").exists()
    assert await bot.runtime.approvals.pending() == []


async def test_deny_by_reaction(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch denied.txt")

    then_answers(model_server, "OK, I did not touch it.")
    await alice.react(room, card["event_id"], "❌")

    await card_decided(alice, duck, question, card, "Denied", "did not touch")
    assert not (tmp_path / "workspace" / "denied.txt").exists()
    observations = str(model_server.requests_for(THINKER)[-1].body["messages"])
    assert "deny" in observations or "denied" in observations


async def test_always_by_reaction_creates_a_rule(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch always.txt")

    then_answers(model_server, "Done once.")
    await alice.react(room, card["event_id"], "♾️")
    # The card is edited before the approved command runs: the answer is what
    # says it ran.
    await card_decided(alice, duck, question, card, "Always allowed", "Done once")
    (rule,) = await bot.runtime.approvals.list_rules()
    assert rule.created_by == alice.qualified

    # the same action again needs no approval
    (tmp_path / "workspace" / "always.txt").unlink()
    model_server.reply(ACTION, Text(directive(shell("touch always.txt"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Done again."))
    again = await bob.say(room, "once more please", mention=duck)
    await bob.wait_for(bot_notice(duck, again, "Done again"), "the second answer")
    assert (tmp_path / "workspace" / "always.txt").exists()
    assert not [e for e in bot_events_in_thread(bob, duck, again) if "Approval" in body(e)]


async def test_reaction_by_a_non_approver_is_refused_in_the_thread(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch nope.txt")

    await bob.react(room, card["event_id"], "✅")
    refusal = await bob.wait_for(bot_notice(duck, question, "not an approver"), "the refusal")
    assert refusal["content"]["m.mentions"] == {"user_ids": [bob.user_id]}
    assert bob.qualified in body(refusal) and "DUCKLM_APPROVERS" in body(refusal)
    assert f"https://matrix.to/#/{bob.user_id}" in refusal["content"]["formatted_body"]
    assert not (tmp_path / "workspace" / "nope.txt").exists()
    pending = await bot.runtime.approvals.pending()
    assert [a.command for a in pending] == ["touch nope.txt"]
    # a reaction on something that is not a card means nothing
    await alice.react(room, question, "✅")
    await alice.say(room, "!duck approvals")
    await alice.wait_for(lambda e: e.get("sender") == duck and "touch nope.txt" in body(e))
    assert len(await bot.runtime.approvals.pending()) == 1


async def test_text_approve_in_the_thread(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch texted.txt")

    then_answers(model_server, "Touched by text.")
    await alice.say(room, "approve", thread=question)

    await card_decided(alice, duck, question, card, "Approved", "Touched by text")
    assert (tmp_path / "workspace" / "texted.txt").exists()


async def test_plain_reply_from_a_client_without_threads_decides(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    """`deny <reason>` as a plain reply to the card (no m.thread) still decides."""
    await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch replied.txt")

    then_answers(model_server, "Not touching it.")
    await alice.say(room, "deny not during the freeze", reply_to=card["event_id"])

    edit = await card_decided(alice, duck, question, card, "Denied", "Not touching it")
    assert "not during the freeze" in edit["content"]["m.new_content"]["body"]
    assert "not during the freeze" in str(model_server.requests_for(THINKER)[-1].body)
    assert not (tmp_path / "workspace" / "replied.txt").exists()


async def test_restart_with_a_pending_approval(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    first = await bots()
    room = await room_with_bot(alice, duck, bob)
    question, card = await ask_for_approval(model_server, bob, room, duck, "touch later.txt")
    device = first.platform.device_id
    await first.stop()
    session = first.platform.state.session_path
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    assert first.platform.state.sync_path.exists()

    # sent while the bot is down: answered after the restart, not missed
    content_answers(model_server)
    missed = await alice.say(room, "are you back?", mention=duck)

    second = await bots()
    assert second.platform.device_id == device  # the saved session, no new device
    await alice.wait_for(bot_notice(duck, missed, "answer to: are you back?"), "the late answer")

    await alice.react(room, card["event_id"], "✅")
    await card_decided(alice, duck, question, card, "Approved", "answer to")
    assert (tmp_path / "workspace" / "later.txt").exists()

    # nothing from before the restart was answered again
    await asyncio.sleep(0.5)
    await alice.sync(0)
    cards = [e for e in bot_events_in_thread(alice, duck, question) if "Approval needed" in body(e)]
    assert len(cards) == 1
    asked = [r for r in model_server.requests_for(ACTION) if "please run" in str(r.body)]
    assert len(asked) == 2  # the plan before the restart, the continuation after it
    answers_to_missed = bot_events_in_thread(alice, duck, missed)
    assert len(answers_to_missed) == 1


async def test_a_replayed_sync_is_not_handled_twice(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
) -> None:
    """Even if the saved sync position is older than what was handled (a crash
    between handling and saving), nothing is answered or decided twice."""
    first = await bots()
    state = first.platform.state
    old_token = await poll(lambda: state.load_sync_token(duck), "the first sync token")
    room = await room_with_bot(alice, duck, bob)
    content_answers(model_server)
    question = await alice.say(room, "what time is it?", mention=duck)
    await alice.wait_for(bot_notice(duck, question, "answer to"), "the answer")
    command = await alice.say(room, "!duck rules add exact uptime")
    await alice.wait_for(bot_notice(duck, command, "Added rule"), "the rule")
    await first.stop()

    state.save_sync_token(duck, old_token)  # as if the last batches were never saved
    second = await bots()
    probe = await alice.say(room, "still one answer each?", mention=duck)
    await alice.wait_for(bot_notice(duck, probe, "answer to"), "the answer to the probe")

    assert len(bot_events_in_thread(alice, duck, question)) == 1
    assert len(bot_events_in_thread(alice, duck, command)) == 1
    assert len(await second.runtime.approvals.list_rules()) == 1
    asked = [r for r in model_server.requests_for(THINKER) if "what time is it?" in str(r.body)]
    assert len(asked) == 1


async def test_duck_commands_check_admins(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str
) -> None:
    bot = await bots()
    room = await room_with_bot(alice, duck, bob)

    listed = await alice.say(room, "!duck rules")
    reply = await alice.wait_for(bot_notice(duck, listed, "No rules"), "the rules")
    assert reply["content"]["msgtype"] == "m.notice" and "formatted_body" in reply["content"]

    refused = await bob.say(room, "!duck rules add exact uptime")
    await bob.wait_for(bot_notice(duck, refused, "Only admins"), "the refusal")
    assert await bot.runtime.approvals.list_rules() == []

    added = await alice.say(room, "!duck rules add exact uptime")
    await alice.wait_for(bot_notice(duck, added, "Added rule"), "the new rule")
    (rule,) = await bot.runtime.approvals.list_rules()
    assert rule.created_by == alice.qualified

    helped = await bob.say(room, "!duck help")
    await bob.wait_for(bot_notice(duck, helped, "rules add exact"), "the help")

    # `!duck run` answers in a thread under the command itself
    ran = await alice.say(room, "!duck run echo quack-from-run")
    await alice.wait_for(bot_notice(duck, ran, "quack-from-run"), "the command's output")


async def test_invites_only_from_allowed_inviters(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str
) -> None:
    await bots(matrix_allowed_inviters=[bob.user_id])
    refused = await alice.create_room([duck])
    await alice.wait_for(left(duck, refused), "the bot declining")
    welcome = await bob.create_room([duck])
    await bob.wait_for(joined(duck, welcome), "the bot joining")


async def test_history_is_not_answered(
    bots: StartBot,
    alice: MatrixUser,
    duck: str,
    synapse: SynapseServer,
    model_server: FakeModelServer,
) -> None:
    # Before DuckLM ever ran: the account is in one room, invited to another,
    # and both have a question for it.
    raw = await MatrixUser(synapse, duck, PASSWORD).login()
    joined_room = await alice.create_room([duck])
    await raw.join(joined_room)
    await raw.close()
    old_one = await alice.say(joined_room, "old question one", mention=duck)
    invited_room = await alice.create_room([duck])
    old_two = await alice.say(invited_room, "old question two", mention=duck)

    content_answers(model_server)
    await bots()
    await alice.wait_for(joined(duck, invited_room), "the bot joining")
    new_one = await alice.say(joined_room, "new question one", mention=duck)
    new_two = await alice.say(invited_room, "new question two", mention=duck)
    await alice.wait_for(bot_notice(duck, new_one, "new question one"), "answer one")
    await alice.wait_for(bot_notice(duck, new_two, "new question two"), "answer two")

    # a direct chat needs no mention
    direct = await alice.create_room([duck], direct=True)
    await alice.wait_for(joined(duck, direct), "the bot joining the direct chat")
    hello = await alice.say(direct, "how are you?")
    await alice.wait_for(bot_notice(duck, hello, "how are you?"), "the direct answer")

    assert not bot_events_in_thread(alice, duck, old_one)
    assert not bot_events_in_thread(alice, duck, old_two)
    assert "old question" not in str([r.body for r in model_server.requests])


async def test_encrypted_room_gets_a_notice(bots: StartBot, alice: MatrixUser, duck: str) -> None:
    # Without encryption (DUCKLM_MATRIX_ENCRYPTION off, or vodozemac missing) the bot
    # says it cannot read; with it, see tests/test_matrix_e2ee.py.
    await bots(matrix_encryption=False)
    room = await alice.create_room([duck], encrypted=True)
    await alice.wait_for(
        lambda e: (
            e.get("room_id") == room and e.get("sender") == duck and body(e) == ENCRYPTED_NOTICE
        ),
        "the notice on joining",
    )
    secret = await alice.send_event(
        room,
        "m.room.encrypted",
        {
            "algorithm": "m.megolm.v1.aes-sha2",
            "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg",
            "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA",
            "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ",
            "device_id": "TESTDEVICE",
        },
    )
    notice = await alice.wait_for(bot_notice(duck, secret, "can't read"), "the notice")
    assert notice["content"]["msgtype"] == "m.notice"


async def test_start_errors_name_the_setting(
    bots: StartBot,
    duck: str,
    synapse: SynapseServer,
) -> None:
    with pytest.raises(PlatformStartError, match="MATRIX_PASSWORD"):
        await bots(matrix_password="wrong password")
    with pytest.raises(PlatformStartError, match="MATRIX_ACCESS_TOKEN"):
        await bots(matrix_password=None, matrix_access_token="syt_not_a_token")
    began = time.monotonic()
    with pytest.raises(PlatformStartError, match="MATRIX_HOMESERVER"):
        await bots(matrix_homeserver=f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - began < 15
    with pytest.raises(PlatformStartError, match="MATRIX_PASSWORD"):
        await bots(matrix_password=None)


async def test_network_faults_are_retried(
    bots: StartBot,
    alice: MatrixUser,
    duck: str,
    synapse: SynapseServer,
    model_server: FakeModelServer,
) -> None:
    async with flaky_proxy(synapse) as proxy:
        await bots(matrix_homeserver=proxy.url)
        room = await room_with_bot(alice, duck)
        content_answers(model_server)

        # The homeserver "goes away" under the sync long-poll; the bot keeps trying.
        proxy.cut()
        during = await alice.say(room, "still there?", mention=duck)
        await poll(lambda: proxy.refused > 0, "sync attempt through the cut proxy", within=30)
        proxy.restore()
        await alice.wait_for(bot_notice(duck, during, "answer to: still there?"), "the answer")

        # It goes away while the answer is on its way; the send is retried.
        loop = asyncio.get_running_loop()

        def thinker(request: RecordedRequest) -> Reply:
            proxy.cut()
            loop.call_later(2.0, proxy.restore)
            return Text("answered across the outage")

        model_server.set_handler(THINKER, thinker)
        again = await alice.say(room, "and now?", mention=duck)
        await alice.wait_for(bot_notice(duck, again, "answered across the outage"), "the answer")


async def test_direct_commands_without_a_model(
    tmp_path: Path,
    synapse: SynapseServer,
    duck: str,
    people: dict[str, str],
    alice: MatrixUser,
    bob: MatrixUser,
    clean_env: None,
) -> None:
    """Issue #8 on Matrix: no model server at all; read-only, approved, denied and
    blocked direct commands, each with its audit trail."""
    settings = make_settings(
        tmp_path,
        matrix_homeserver=synapse.base_url,
        matrix_user_id=duck,
        matrix_password=PASSWORD,
        approvers=[f"matrix:{people['alice']}"],
    )
    runtime = await build_runtime(settings)
    service = ChatService(runtime)
    platform = MatrixPlatform(service, runtime.settings)
    await platform.start()
    bot = Bot(runtime, service, platform)
    try:
        assert runtime.model is None
        room = await room_with_bot(alice, duck, bob)
        workspace = tmp_path / "workspace"

        async def trail(root: str) -> list[dict[str, Any]]:
            (task,) = await tasks_in_thread(runtime, room, root)
            events = await runtime.stores.events.list_events(task.task_id)
            assert events[1].event_type == "direct_command"
            assert not any(e.event_type.startswith("model_call") for e in events)
            return [e.payload for e in events if e.event_type == "command_audit"]

        ran = await bob.say(room, "!duck run uname -s")
        await bob.wait_for(bot_notice(duck, ran, "Linux"), "the read-only output")
        (audit,) = await trail(ran)
        assert audit["risk_level"] == "low" and audit["ok"] and not audit["approved"]

        approved = await bob.say(room, "!duck run touch approved.txt")
        card = await bob.wait_for(bot_notice(duck, approved, "Approval needed"), "a card")
        assert not (workspace / "approved.txt").exists()
        await alice.react(room, card["event_id"], "✅")
        await bob.wait_for(bot_notice(duck, approved, "touch approved.txt` ("), "the run")
        assert (workspace / "approved.txt").exists()
        assert [a["approved"] for a in await trail(approved)] == [False, True]

        denied = await bob.say(room, "!duck run touch denied.txt")
        await bob.wait_for(bot_notice(duck, denied, "Approval needed"), "a card")
        await alice.say(room, "deny not today", thread=denied)
        await bob.wait_for(bot_notice(duck, denied, "did not run"), "the denial")
        assert not (workspace / "denied.txt").exists()
        assert [a["approved"] for a in await trail(denied)] == [False, False]

        blocked = await bob.say(room, "!duck run mkfs.ext4 /dev/sda1")
        await bob.wait_for(bot_notice(duck, blocked, "blocked"), "the refusal")
        (audit,) = await trail(blocked)
        assert audit["blocked"] and audit["risk_level"] == "critical"
        assert await runtime.approvals.pending() == []
    finally:
        await bot.stop()


async def test_the_access_token_from_login_is_redacted_from_tool_output(
    bots: StartBot, alice: MatrixUser, bob: MatrixUser, duck: str, tmp_path: Path
) -> None:
    """The token a password login returns is not in Settings; the platform hands it to
    the redactor, so a command that prints it never shows it in the room."""
    bot = await bots()
    client = bot.platform.connection.client
    assert client is not None
    token = client.access_token
    assert len(token) >= 8
    (tmp_path / "workspace" / "leak.txt").write_text(f"token={token}\n")
    room = await room_with_bot(alice, duck, bob)

    ran = await alice.say(room, "!duck run cat leak.txt")
    reply = await alice.wait_for(bot_notice(duck, ran, "REDACTED"), "the redacted output")

    assert token not in reply["content"]["body"]
    assert token not in reply["content"].get("formatted_body", "")
    (task,) = await tasks_in_thread(bot.runtime, room, ran)
    for event in await bot.runtime.stores.events.list_events(task.task_id):
        assert token not in json.dumps(event.payload)
