"""The Slack platform end to end: the real bolt app over HTTP (signed requests)
and Socket Mode (a local websocket), a local fake Slack Web API, the real
runtime and store, real shell commands in a temporary workspace, and the fake
model server. Nothing of ours is mocked."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.backend import PlatformStartError, Thread
from bot.service import ChatService
from bot.slack.blocks import (
    ACTION_ALWAYS,
    ACTION_APPROVE,
    ACTION_DENY,
    ACTION_DENY_REASON,
    ACTION_EDIT,
    DENY_REASON_VIEW,
)
from bot.slack.platform import MAX_INPUT_CHARS, SlackPlatform
from runtime.factory import Runtime, build_runtime
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.slack_api import (
    APP_TOKEN,
    BOT_TOKEN,
    BOT_USER,
    SIGNING_SECRET,
    Answer,
    FakeSlack,
    SlackSender,
    block_actions_payload,
    event_callback,
    slash_command_form,
    view_submission_payload,
)

CHANNEL = "COPS00001"
ASKER = "UASKER001"
APPROVER = "UAPPROVER"
ADMIN = "UADMIN001"
STRANGER = "USTRANGER"
NO_ACTIONS = directive()

pytestmark = pytest.mark.usefixtures("clean_env")


# -- the harness ---------------------------------------------------------------------


@dataclass
class Bot:
    fake: FakeSlack
    runtime: Runtime
    service: ChatService
    platform: SlackPlatform
    sender: SlackSender | None = None

    @property
    def workspace(self) -> Path:
        return Path(self.runtime.settings.workspace)

    async def settle(self, within: float = 15.0) -> None:
        """Wait until every background job (ours and the service's) is done."""
        async with asyncio.timeout(within):
            for _ in range(3):  # jobs start jobs; a short pause lets bolt's futures start
                await asyncio.sleep(0.05)
                await self.platform.drain()
                await self.service.drain()

    # inbound, as Slack would send it

    def _message(self, text: str, user: str, channel: str, thread_ts: str | None) -> dict[str, Any]:
        return self.fake.add_message(channel, text, user=user, thread_ts=thread_ts)

    async def mention(
        self,
        text: str,
        *,
        user: str = ASKER,
        channel: str = CHANNEL,
        thread_ts: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """@-mention the bot; returns the message ts and the delivered envelope."""
        msg = self._message(f"<@{BOT_USER}> {text}", user, channel, thread_ts)
        event = {
            "type": "app_mention",
            "user": user,
            "text": msg["text"],
            "ts": msg["ts"],
            "channel": channel,
            "event_ts": msg["ts"],
            **({"thread_ts": thread_ts} if thread_ts else {}),
        }
        envelope = event_callback(event)
        await self.deliver(envelope)
        return msg["ts"], envelope

    async def say(
        self,
        text: str,
        *,
        user: str = ASKER,
        channel: str = CHANNEL,
        thread_ts: str | None = None,
        channel_type: str = "channel",
        ts: str | None = None,
        **extra: Any,
    ) -> tuple[str, dict[str, Any]]:
        """A plain message event (message.channels / message.im)."""
        if ts is None:
            ts = self._message(text, user, channel, thread_ts)["ts"]
        event = {
            "type": "message",
            "channel_type": channel_type,
            "user": user,
            "text": text,
            "ts": ts,
            "channel": channel,
            "event_ts": ts,
            **({"thread_ts": thread_ts} if thread_ts else {}),
            **extra,
        }
        envelope = event_callback(event)
        await self.deliver(envelope)
        return ts, envelope

    async def deliver(self, envelope: dict[str, Any], retry_num: int | None = None) -> None:
        assert self.sender is not None
        answer = await self.sender.event(envelope, retry_num=retry_num)
        assert answer.status == 200, answer

    async def click(
        self,
        action_id: str,
        approval_id: str,
        card_ts: str,
        *,
        user: str = APPROVER,
        thread_ts: str | None = None,
    ) -> Answer:
        assert self.sender is not None
        payload = block_actions_payload(
            user=user,
            action_id=action_id,
            value=approval_id,
            channel=CHANNEL,
            message_ts=card_ts,
            thread_ts=thread_ts,
            response_url=self.fake.webhook_url(),
        )
        return await self.sender.interaction(payload)

    async def command(self, text: str, *, user: str = ADMIN) -> Answer:
        assert self.sender is not None
        form = slash_command_form(
            user=user, channel=CHANNEL, text=text, response_url=self.fake.webhook_url()
        )
        return await self.sender.command(form)

    # what the bot did

    def thread(self, root: str, channel: str = CHANNEL) -> list[dict[str, Any]]:
        return [m for m in self.fake.posted(channel) if m.get("thread_ts") == root]

    def texts(self, root: str) -> list[str]:
        return [m["text"] for m in self.thread(root) if not m.get("blocks")]

    def card(self, root: str) -> dict[str, Any] | None:
        cards = [m for m in self.thread(root) if m.get("blocks")]
        return cards[-1] if cards else None

    async def wait_card(self, root: str) -> tuple[dict[str, Any], str]:
        card = await self.fake.wait_for(lambda: self.card(root), what="approval card")
        return card, approval_id(card)

    async def wait_text(self, root: str, needle: str) -> str:
        return await self.fake.wait_for(
            lambda: next((t for t in self.texts(root) if needle in t), None),
            what=f"a reply containing {needle!r}",
        )

    async def tasks_in(self, root: str) -> int:
        key = Thread("slack", CHANNEL, root).key
        return len(await self.runtime.stores.tasks.list_by_conversation(key, limit=100))


def actions_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in message.get("blocks") or [] if b["type"] == "actions"]


def approval_id(card: dict[str, Any]) -> str:
    (actions,) = actions_of(card)
    values = {e["value"] for e in actions["elements"]}
    assert len(values) == 1
    return values.pop()


def card_text(card: dict[str, Any]) -> str:
    return json.dumps(card.get("blocks"))


async def start_bot(
    tmp_path: Path,
    model_server: FakeModelServer,
    fake: FakeSlack,
    *,
    mode: str = "http",
    approvers: list[str] | None = None,
    **overrides: Any,
) -> Bot:
    values: dict[str, Any] = {
        "slack_bot_token": BOT_TOKEN,
        "slack_signing_secret": SIGNING_SECRET,
        "slack_mode": mode,
        "http_host": "127.0.0.1",
        "http_port": 0,  # the OS picks a free port; platform.events_url says which
        "slack_api_url": fake.api_url,
        "approvers": [f"slack:{a}" for a in (approvers or [APPROVER])],
        "admins": [f"slack:{ADMIN}"],
    }
    if mode == "socket":
        values["slack_app_token"] = APP_TOKEN
    values.update(overrides)
    runtime = await build_runtime(make_settings(tmp_path, model_server.base_url, **values))
    service = ChatService(runtime)
    platform = SlackPlatform(service, runtime.settings)
    try:
        await platform.start()
    except BaseException:
        await platform.stop()
        await service.close()
        await runtime.close()
        raise
    bot = Bot(fake, runtime, service, platform)
    if platform.mode == "http":
        bot.sender = await SlackSender(platform.events_url).__aenter__()
    return bot


async def stop_bot(bot: Bot) -> None:
    if bot.sender is not None:
        await bot.sender.__aexit__(None, None, None)
    await bot.platform.stop()
    await bot.service.close()
    await bot.runtime.close()


@pytest_asyncio.fixture
async def bot(tmp_path: Path, model: FakeModelServer, slack: FakeSlack) -> AsyncIterator[Bot]:
    running = await start_bot(tmp_path, model, slack)
    try:
        yield running
    finally:
        await stop_bot(running)


async def card_for(
    bot: Bot, model: FakeModelServer, command: str = "echo x >> f", question: str = "add an x"
) -> tuple[str, dict[str, Any], str]:
    """Ask something that needs approval; returns (thread ts, card, approval id)."""
    model.reply(ACTION, Text(directive(shell(command, reason="the file needs an x"))))
    ts, _ = await bot.mention(question)
    card, approval = await bot.wait_card(ts)
    return ts, card, approval


# -- questions and answers ---------------------------------------------------------------


async def test_read_only_question_is_answered_in_the_thread(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    model.reply(ACTION, Text(directive(shell("df -h", reason="check disks"))))
    model.reply(THINKER, Text("# Disks\n**/** is fine, see [the runbook](https://wiki/x?a=1&b=2)"))
    ts, _ = await bot.mention("how full are the disks?")

    answer = await bot.wait_text(ts, "is fine")
    assert answer == "*Disks*\n*/* is fine, see <https://wiki/x?a=1&amp;b=2|the runbook>"
    # "on it" at once, as a reaction on the question, and gone at the end
    (added,) = slack.calls_to("reactions.add")
    assert added.params == {"channel": CHANNEL, "timestamp": ts, "name": "eyes"}
    # "At once" is an order, not a time (a loaded machine makes any time a guess):
    # the reaction comes before anything is posted in the thread.
    methods = [c.method for c in slack.calls]
    assert methods.index("reactions.add") < methods.index("chat.postMessage")
    await bot.settle()
    (removed,) = slack.calls_to("reactions.remove")
    assert removed.params == added.params
    # a status line said which tool ran, then went away
    status = [c for c in slack.calls_to("chat.postMessage") if "running" in c.params["text"]]
    assert status and "df -h" in status[0].params["text"]
    assert status[0].params["thread_ts"] == ts
    assert [c.params["ts"] for c in slack.calls_to("chat.delete")] == [status[0].result["ts"]]
    assert bot.texts(ts) == [answer]  # nothing else is left in the thread
    # the model saw the question without the bot's mention, and df's output
    question = model.requests_for(ACTION)[0].body["messages"][-1]["content"]
    assert question == "how full are the disks?"
    assert "Filesystem" in json.dumps(model.requests_for(THINKER)[0].body)


async def test_follow_ups_in_a_bot_thread_carry_the_history(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    model.reply(THINKER, Text("web-1 is at 91%."))
    ts, _ = await bot.mention("how full is web-1?")
    await bot.wait_text(ts, "91%")
    await bot.settle()

    # A reply in the bot's thread needs no mention; the thread is its history.
    model.reply(THINKER, Text("web-2 is at 40%."))
    await bot.say("and web-2?", thread_ts=ts)
    await bot.wait_text(ts, "40%")
    messages = model.requests_for(ACTION)[1].body["messages"][1:]
    assert messages == [
        {"role": "user", "content": "how full is web-1?"},
        {"role": "assistant", "content": "web-1 is at 91%."},
        {"role": "user", "content": "and web-2?"},
    ]
    await bot.settle()
    assert await bot.tasks_in(ts) == 2

    # Elsewhere, without a mention, nobody is talking to the bot.
    other, _ = await bot.say("lunch?")
    await bot.say("pizza", thread_ts=other)
    # The bot's own messages, other bots, edits and deletions are no tasks.
    await bot.say("echo", user=BOT_USER, thread_ts=ts)
    await bot.say("beep", thread_ts=ts, bot_id="BOTHER01", subtype="bot_message")
    await bot.say("edited", thread_ts=ts, subtype="message_changed")
    await bot.say("", thread_ts=ts, subtype="message_deleted")
    await bot.settle()
    assert len(model.requests_for(ACTION)) == 2
    assert await bot.tasks_in(ts) == 2


async def test_direct_messages_are_tasks(bot: Bot, model: FakeModelServer) -> None:
    model.reply(THINKER, Text("Hello from the duck."))
    ts, _ = await bot.say("hi there", channel="DDIRECT01", channel_type="im")
    reply = await bot.fake.wait_for(
        lambda: [m for m in bot.fake.posted("DDIRECT01") if m.get("thread_ts") == ts],
        what="DM answer",
    )
    assert reply[0]["text"] == "Hello from the duck."


async def test_one_mention_delivered_as_app_mention_and_as_message_is_one_task(
    bot: Bot, model: FakeModelServer
) -> None:
    ts, envelope = await bot.mention("status?")
    # Slack also sends the same message as message.channels (another event id).
    event = dict(envelope["event"], type="message", channel_type="channel")
    await bot.deliver(event_callback(event))
    await bot.settle()
    assert await bot.tasks_in(ts) == 1
    assert len(model.requests_for(ACTION)) == 1


async def test_retries_of_one_event_start_one_task(bot: Bot, model: FakeModelServer) -> None:
    ts, envelope = await bot.mention("what is the load?")
    for retry in (1, 2, 3):  # X-Slack-Retry-Num: Slack thinks we timed out
        await bot.deliver(envelope, retry_num=retry)
    await bot.settle()
    assert await bot.tasks_in(ts) == 1
    assert len(model.requests_for(ACTION)) == 1
    assert bot.texts(ts) == ["Done."]


async def test_bad_signature_is_rejected_and_starts_nothing(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    assert bot.sender is not None
    msg = slack.add_message(CHANNEL, f"<@{BOT_USER}> rm it all", user=STRANGER)
    event = {"type": "app_mention", "user": STRANGER, "text": msg["text"], "ts": msg["ts"]}
    envelope = event_callback({**event, "channel": CHANNEL, "event_ts": msg["ts"]})
    assert (await bot.sender.event(envelope, secret="not-the-secret")).status == 401
    stale = int(time.time()) - 6 * 60  # Slack's window is five minutes
    assert (await bot.sender.event(envelope, timestamp=stale)).status == 401
    payload = block_actions_payload(
        user=STRANGER, action_id=ACTION_APPROVE, value="x", channel=CHANNEL, message_ts="1.2"
    )
    assert (await bot.sender.interaction(payload, secret="not-the-secret")).status == 401
    await bot.settle()
    assert model.requests == []
    assert [c.method for c in slack.calls] == ["auth.test"]


# -- approvals ---------------------------------------------------------------------------


async def test_approve_runs_the_command_and_resolves_the_card(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    ts, card, approval = await card_for(bot, model)
    text = card_text(card)
    assert "echo x &gt;&gt; f" in text and "the file needs an x" in text
    assert f"<@{ASKER}>" in text and "risk" in text
    (actions,) = actions_of(card)
    ids = [e["action_id"] for e in actions["elements"]]
    assert ids == [ACTION_APPROVE, ACTION_DENY, ACTION_ALWAYS, ACTION_DENY_REASON, ACTION_EDIT]
    always = actions["elements"][2]["confirm"]["text"]["text"]
    assert "echo x" in always  # the confirm dialog names the rule it creates
    assert not (bot.workspace / "f").exists()

    model.reply(THINKER, Text("Added the x."))
    answer = await bot.click(ACTION_APPROVE, approval, card["ts"], thread_ts=ts)
    assert answer.status == 200
    await bot.wait_text(ts, "Added the x.")
    assert (bot.workspace / "f").read_text() == "x\n"
    resolved = bot.card(ts)
    assert resolved is not None and resolved["ts"] == card["ts"]
    assert actions_of(resolved) == []
    assert "Approved" in card_text(resolved) and f"<@{APPROVER}>" in card_text(resolved)
    assert "<!date^" in card_text(resolved)
    (update,) = [c for c in slack.calls_to("chat.update") if c.params["ts"] == card["ts"]]
    assert update.params["channel"] == CHANNEL
    stored = await bot.runtime.approvals.get(approval)
    assert stored is not None and stored.decision == "approve"
    assert stored.decided_by == f"slack:{APPROVER}"


async def test_plain_deny_button(bot: Bot, model: FakeModelServer) -> None:
    ts, card, approval = await card_for(bot, model)
    model.reply(THINKER, Text("OK, I left f alone."))
    await bot.click(ACTION_DENY, approval, card["ts"], thread_ts=ts)
    await bot.wait_text(ts, "left f alone")
    resolved = bot.card(ts)
    assert resolved is not None and actions_of(resolved) == []
    assert "Denied" in card_text(resolved)
    assert not (bot.workspace / "f").exists()


async def test_deny_with_a_reason_through_the_modal(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    assert bot.sender is not None
    ts, card, approval = await card_for(bot, model)
    await bot.click(ACTION_DENY_REASON, approval, card["ts"], thread_ts=ts)
    (opened,) = await slack.wait_for_calls("views.open")
    assert opened.params["trigger_id"]
    view = opened.params["view"]
    assert view["callback_id"] == DENY_REASON_VIEW and view["private_metadata"] == approval
    assert bot.card(ts) == card  # opening the modal decides nothing

    model.reply(THINKER, Text("Understood, I will use web-2."))
    submission = view_submission_payload(
        user=APPROVER,
        callback_id=DENY_REASON_VIEW,
        private_metadata=approval,
        values={"duck_reason": {"duck_reason_input": {"value": "wrong host, use web-2"}}},
    )
    answer = await bot.sender.interaction(submission)
    assert answer.status == 200 and answer.text == ""  # the modal closes
    await bot.wait_text(ts, "use web-2")
    resolved = bot.card(ts)
    assert resolved is not None and "Denied" in card_text(resolved)
    assert "wrong host, use web-2" in card_text(resolved)
    # the reason reached the model with the denial
    assert "wrong host, use web-2" in json.dumps(model.requests_for(THINKER)[-1].body)
    assert not (bot.workspace / "f").exists()


async def test_always_then_no_approval_next_time(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    ts, card, approval = await card_for(bot, model)
    await bot.click(ACTION_ALWAYS, approval, card["ts"], thread_ts=ts)
    await bot.wait_text(ts, "Done.")
    resolved = bot.card(ts)
    assert resolved is not None and "allowed from now on" in card_text(resolved)
    rules = await bot.runtime.approvals.list_rules()
    assert len(rules) == 1 and rules[0].created_by == f"slack:{APPROVER}"

    model.reply(ACTION, Text(directive(shell("echo x >> f"))))
    model.reply(THINKER, Text("Added another x."))
    again, _ = await bot.mention("add one more x")
    await bot.wait_text(again, "another x")
    assert bot.card(again) is None
    assert (bot.workspace / "f").read_text() == "x\nx\n"


async def test_twenty_concurrent_approvals_run_the_action_once(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    approvers = [f"UAPPR{i:04d}" for i in range(20)]
    bot = await start_bot(tmp_path, model, slack, approvers=approvers)
    try:
        ts, card, approval = await card_for(bot, model)
        answers = await asyncio.gather(
            *(
                bot.click(ACTION_APPROVE, approval, card["ts"], user=u, thread_ts=ts)
                for u in approvers
            )
        )
        assert {a.status for a in answers} == {200}
        await bot.wait_text(ts, "Done.")
        await bot.settle()
        assert (bot.workspace / "f").read_text() == "x\n"
        told = [e for e in slack.ephemeral if "Already decided" in e["text"]]
        assert len(told) == 19
        assert all(e["channel"] == CHANNEL and e["thread_ts"] == ts for e in told)
        assert len([c for c in slack.calls_to("chat.update") if c.params["ts"] == card["ts"]]) == 1
    finally:
        await stop_bot(bot)


async def test_clicks_by_someone_not_allowed_change_nothing(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    assert bot.sender is not None
    ts, card, approval = await card_for(bot, model)
    for action in (ACTION_APPROVE, ACTION_ALWAYS, ACTION_DENY):
        await bot.click(action, approval, card["ts"], user=STRANGER, thread_ts=ts)
    await bot.click(ACTION_DENY_REASON, approval, card["ts"], user=STRANGER, thread_ts=ts)
    await bot.settle()
    assert len(slack.ephemeral) == 4
    first = slack.ephemeral[0]
    assert first["user"] == STRANGER and first["channel"] == CHANNEL
    assert "not an approver" in first["text"] and f"slack:{STRANGER}" in first["text"]
    assert slack.calls_to("views.open") == []  # no modal for someone who may not deny
    # a forged modal submission is refused inside the modal
    submission = view_submission_payload(
        user=STRANGER,
        callback_id=DENY_REASON_VIEW,
        private_metadata=approval,
        values={"duck_reason": {"duck_reason_input": {"value": "no"}}},
    )
    refused = (await bot.sender.interaction(submission)).json()
    assert (
        refused["response_action"] == "errors"
        and "not an approver" in refused["errors"]["duck_reason"]
    )
    await bot.settle()
    assert bot.card(ts) == card and slack.calls_to("chat.update") == []
    stored = await bot.runtime.approvals.get(approval)
    assert stored is not None and stored.decision is None
    assert not (bot.workspace / "f").exists()


async def test_thread_replies_decide_like_the_buttons(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    ts, card, _ = await card_for(bot, model)
    await bot.say("approve", user=STRANGER, thread_ts=ts)  # not an approver
    await bot.settle()
    assert "not an approver" in slack.ephemeral[-1]["text"]
    assert bot.card(ts) == card

    model.reply(THINKER, Text("Fine, not today."))
    await bot.say("deny not today please", user=APPROVER, thread_ts=ts)
    await bot.wait_text(ts, "not today.")
    resolved = bot.card(ts)
    assert resolved is not None and "Denied" in card_text(resolved)
    assert "not today please" in card_text(resolved)
    await bot.settle()
    assert await bot.tasks_in(ts) == 1  # the replies were decisions, not new questions


async def test_a_restart_between_the_card_and_the_click(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    first = await start_bot(tmp_path, model, slack)
    try:
        ts, card, approval = await card_for(first, model)
        _, envelope = await first.mention("unrelated", thread_ts=None)
        await first.settle()
    finally:
        await stop_bot(first)

    second = await start_bot(tmp_path, model, slack)
    try:
        model.reply(THINKER, Text("Added the x after the restart."))
        await second.click(ACTION_APPROVE, approval, card["ts"], thread_ts=ts)
        await second.wait_text(ts, "after the restart")
        assert (second.workspace / "f").read_text() == "x\n"
        resolved = second.card(ts)
        assert resolved is not None and actions_of(resolved) == []
        # Slack retrying an event from before the restart starts nothing new
        asked = len(model.requests_for(ACTION))
        await second.deliver(envelope, retry_num=1)
        await second.settle()
        assert len(model.requests_for(ACTION)) == asked
    finally:
        await stop_bot(second)


# -- /duck --------------------------------------------------------------------------------


async def test_duck_commands_answer_privately(bot: Bot, slack: FakeSlack) -> None:
    answer = await bot.command("rules")
    assert answer.status == 200
    body = answer.json()
    assert body["response_type"] == "ephemeral" and "No rules" in body["text"]

    refused = (await bot.command("rules add exact uptime", user=STRANGER)).json()
    assert "Only admins" in refused["text"] and refused["response_type"] == "ephemeral"
    assert await bot.runtime.approvals.list_rules() == []

    added = (await bot.command("rules add exact uptime")).json()
    assert "Added rule" in added["text"]
    listed = (await bot.command("rules")).json()["text"]
    assert "uptime" in listed

    assert "Usage" in (await bot.command("rules add sideways x")).json()["text"]
    assert "Unknown command" in (await bot.command("frobnicate")).json()["text"]
    assert "rules add" in (await bot.command("")).json()["text"]  # help
    assert slack.calls_to("chat.postMessage") == []  # all of it private


async def test_duck_run_opens_a_thread(bot: Bot, slack: FakeSlack) -> None:
    answer = (await bot.command("run df -h")).json()
    assert answer["response_type"] == "ephemeral" and "thread" in answer["text"]
    root = await slack.wait_for(
        lambda: next((m for m in slack.posted(CHANNEL) if "thread_ts" not in m), None),
        what="the thread's root message",
    )
    assert root["text"] == f"<@{ADMIN}> asked to run `df -h`"
    output = await bot.wait_text(root["ts"], "Filesystem")
    assert "df -h" in output

    await bot.command("run touch x")
    roots = await slack.wait_for(
        lambda: [m for m in slack.posted(CHANNEL) if "thread_ts" not in m][1:],
        what="a second root",
    )
    card, approval = await bot.wait_card(roots[0]["ts"])
    assert "touch x" in card_text(card) and approval
    assert not (bot.workspace / "x").exists()


# -- robustness -------------------------------------------------------------------------


async def test_bad_input_leaves_the_bot_serving(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    assert bot.sender is not None
    big, _ = await bot.mention("x" * 20_000)
    await bot.wait_text(big, "Done.")
    question = model.requests_for(ACTION)[0].body["messages"][-1]["content"]
    assert MAX_INPUT_CHARS <= len(question) < MAX_INPUT_CHARS + 100

    garbage = await bot.sender.post("payload=%7Bnot+json", "application/x-www-form-urlencoded")
    assert garbage.status == 400
    assert (await bot.sender.post("{", "application/json")).status == 400
    assert (await bot.sender.interaction({"type": "block_actions"})).status < 500
    # bolt itself answers a signed payload it cannot match with a logged 500
    assert (await bot.sender.interaction({"type": "block_actions", "actions": 7})).status
    unknown = block_actions_payload(
        user=APPROVER, action_id="who_knows", value="x", channel=CHANNEL, message_ts="1.1"
    )
    assert (await bot.sender.interaction(unknown)).status == 200
    ghost = block_actions_payload(
        user=APPROVER, action_id=ACTION_APPROVE, value="no-such", channel=CHANNEL, message_ts="1.1"
    )
    assert (await bot.sender.interaction(ghost)).status == 200
    weird = {"type": "event_callback", "event_id": "Ev1", "event": {"type": "app_mention"}}
    assert (await bot.sender.event(weird)).status == 200
    await bot.settle()
    assert [e["text"] for e in slack.ephemeral] == ["That approval does not exist."]

    model.reply(THINKER, Text("Still here."))
    ts, _ = await bot.mention("are you alive?")
    await bot.wait_text(ts, "Still here.")


async def test_rate_limited_post_is_retried_not_dropped(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    slack.rate_limit("chat.postMessage", times=1, retry_after=1)
    model.reply(THINKER, Text("Delivered anyway."))
    ts, _ = await bot.mention("hello?")
    await bot.wait_text(ts, "Delivered anyway.")
    first, second = slack.calls_to("chat.postMessage")
    assert first.result["error"] == "ratelimited" and second.result["ok"]
    assert second.at - first.at >= 1.0  # Retry-After was honoured


async def test_long_answers_are_cut_and_attached(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    long = "# Report\n" + "\n".join(f"- line {i}: all good" for i in range(600))
    model.reply(THINKER, Text(long))
    ts, _ = await bot.mention("full report please")
    head = await bot.wait_text(ts, "full text follows")
    assert len(head) <= 3000 and head.startswith("*Report*\n• line 0")
    (done,) = await slack.wait_for_calls("files.completeUploadExternal")
    assert done.params["channel_id"] == CHANNEL and done.params["thread_ts"] == ts
    (file_id,) = [f["id"] for f in done.params["files"]]
    assert slack.uploads[file_id].decode() == long

    # Without file uploads the rest follows in pieces.
    slack.fail("files.getUploadURLExternal", "missing_scope")
    model.reply(THINKER, Text(long))
    again, _ = await bot.mention("again please")
    await bot.wait_text(again, "line 599: all good")
    await bot.settle()
    pieces = bot.texts(again)
    assert len(pieces) >= 3 and all(len(p) <= 3000 for p in pieces)


# -- Socket Mode and start-up -------------------------------------------------------------


async def test_socket_mode_answers_and_acks(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    bot = await start_bot(tmp_path, model, slack, mode="socket", slack_signing_secret=None)
    try:
        await slack.wait_for_socket()
        (opened,) = slack.calls_to("apps.connections.open")
        assert opened.token == APP_TOKEN
        msg = slack.add_message(CHANNEL, f"<@{BOT_USER}> ping over the socket", user=ASKER)
        event = {"type": "app_mention", "user": ASKER, "text": msg["text"], "ts": msg["ts"]}
        envelope = event_callback({**event, "channel": CHANNEL, "event_ts": msg["ts"]})
        model.reply(THINKER, Text("pong"))
        first = await slack.push("events_api", envelope)
        assert (await slack.wait_for_ack(first)) == {"envelope_id": first}
        await bot.wait_text(msg["ts"], "pong")
        # a redelivery over the socket is acked and ignored
        again = await slack.push("events_api", envelope, retry_attempt=1, retry_reason="timeout")
        await slack.wait_for_ack(again)
        # /duck works over the socket too; the answer rides on the ack
        form = slash_command_form(user=ADMIN, channel=CHANNEL, text="rules")
        command = await slack.push("slash_commands", form)
        ack = await slack.wait_for_ack(command)
        assert "No rules" in ack["payload"]["text"]
        await bot.settle()
        assert await bot.tasks_in(msg["ts"]) == 1
    finally:
        await stop_bot(bot)


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"slack_bot_token": "xoxb-revoked"}, "SLACK_BOT_TOKEN"),
        ({"slack_bot_token": None}, "SLACK_BOT_TOKEN"),
        ({"slack_signing_secret": None}, "SLACK_SIGNING_SECRET"),
        ({"slack_mode": "socket", "slack_app_token": None}, "SLACK_APP_TOKEN"),
        ({"slack_mode": "socket", "slack_app_token": "xapp-revoked"}, "SLACK_APP_TOKEN"),
    ],
)
async def test_start_up_errors_name_the_setting(
    tmp_path: Path,
    model: FakeModelServer,
    slack: FakeSlack,
    overrides: dict[str, Any],
    variable: str,
) -> None:
    with pytest.raises(PlatformStartError, match=variable):
        await start_bot(tmp_path, model, slack, **overrides)


async def test_a_busy_http_port_is_a_start_up_error(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PlatformStartError, match="DUCKLM_HTTP_PORT"):
            await start_bot(tmp_path, model, slack, http_port=port)
