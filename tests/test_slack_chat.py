"""Chat as Slack really sends it (issue #16's Slack items, #22's Slack side),
through the real bolt app over signed HTTP against the fake Web API, with the
payloads of tests/data/slack/ (shaped after Slack's recorded fixtures): links,
e-mail, people and entities decoded to what was typed; autocorrected quotes
undone and said so; long threads read to their newest replies; cards and
modals clipped after escaping; edits hinted once; mentions of other people
left alone; Slack Connect strangers refused."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.backend import Thread
from bot.slack.blocks import ACTION_APPROVE, ACTION_DENY, ACTION_DENY_REASON
from tests.conftest import ACTION, THINKER, directive, shell
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.slack_api import BOT_USER, FakeSlack, event_callback
from tests.test_slack import (
    ADMIN,
    APPROVER,
    ASKER,
    CHANNEL,
    Bot,
    card_text,
    start_bot,
    stop_bot,
)

DATA = Path(__file__).parent / "data" / "slack"
_BROKEN_ESCAPE = re.compile(r"&(?!amp;|lt;|gt;)")

pytestmark = pytest.mark.usefixtures("clean_env")


def load(name: str) -> dict[str, Any]:
    return copy.deepcopy(json.loads((DATA / name).read_text()))


@pytest_asyncio.fixture
async def bot(tmp_path: Path, model: FakeModelServer, slack: FakeSlack) -> AsyncIterator[Bot]:
    running = await start_bot(tmp_path, model, slack)
    try:
        yield running
    finally:
        await stop_bot(running)


async def deliver_fixture(
    bot: Bot, name: str, *, thread_ts: str | None = None, event_id: str | None = None
) -> dict[str, Any]:
    """Deliver a recorded-shape event as a fresh message in the fake's channel."""
    envelope = load(name)
    event = envelope["event"]
    stored = bot.fake.add_message(
        event["channel"],
        event["text"],
        user=event["user"],
        thread_ts=thread_ts,
        blocks=event.get("blocks"),
    )
    event.update(ts=stored["ts"], event_ts=stored["ts"])
    if thread_ts:
        event["thread_ts"] = thread_ts
    if event_id:
        envelope["event_id"] = event_id
    await bot.deliver(envelope)
    return envelope


async def slash(bot: Bot, name: str, *, user: str = ADMIN, text: str | None = None) -> Any:
    assert bot.sender is not None
    form = load(name)
    form["user_id"] = user
    form["response_url"] = bot.fake.webhook_url()
    if text is not None:
        form["text"] = text
    return (await bot.sender.command(form)).json()


async def direct_tasks(bot: Bot) -> list[str]:
    return [t.message for t in await bot.runtime.stores.tasks.list_recent(50)]


def questions(model: FakeModelServer) -> list[str]:
    return [r.body["messages"][-1]["content"] for r in model.requests_for(ACTION)]


# -- what was typed ---------------------------------------------------------------------------


async def test_a_linked_host_in_a_direct_command_runs_as_typed(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    # `/duck run curl -sI example.com`, with "escape links" on: Slack sends the
    # auto-linked host as <http://example.com|example.com>.
    await slash(bot, "slash_run_link.json")
    await bot.settle()
    assert "curl -sI example.com" in await direct_tasks(bot)
    root = next(m for m in slack.posted(CHANNEL) if "thread_ts" not in m)
    assert root["text"] == f"<@{ADMIN}> asked to run `curl -sI example.com`"

    # The same words in a mention reach the model exactly, without the link note.
    await deliver_fixture(bot, "app_mention_link.json")
    await bot.settle()
    assert questions(model)[-1] == "run curl -sI example.com"


async def test_a_question_carries_the_link_target_for_the_model(
    bot: Bot, model: FakeModelServer
) -> None:
    envelope = load("app_mention_link.json")
    event = envelope["event"]
    event["text"] = event["text"].replace(" run curl -sI", " is this up?")
    event["blocks"][0]["elements"][0]["elements"][1]["text"] = " is this up? "
    stored = bot.fake.add_message(CHANNEL, event["text"], user=ASKER, blocks=event["blocks"])
    event.update(ts=stored["ts"], event_ts=stored["ts"])
    await bot.deliver(envelope)
    await bot.settle()
    assert questions(model) == ["is this up? example.com (link: http://example.com)"]


async def test_email_and_people_in_commands(bot: Bot, model: FakeModelServer) -> None:
    await deliver_fixture(bot, "app_mention_email.json")
    await deliver_fixture(bot, "app_mention_people.json")
    await bot.settle()
    assert sorted(questions(model)) == ["run echo @U0BOB0001 @here", "run echo ops@example.com"]

    # /duck with "escape users" on: <@U…|name> and <!here> become what was typed,
    # never `<@U…>`, which the shell would read as redirections.
    await slash(bot, "slash_run_link.json", text="run echo <@U0BOB0001|bob> <!here>")
    answer = await bot.fake.wait_for(
        lambda: next((m["text"] for m in bot.fake.posted(CHANNEL) if "exit 0" in m["text"]), None),
        what="the direct answer",
    )
    assert "$ echo @bob @here\n@bob @here" in answer


async def test_entity_encoded_slash_commands_run_and_store_what_was_typed(
    bot: Bot, slack: FakeSlack
) -> None:
    (bot.workspace / "f").write_text("a>b\nother\n")
    await slash(bot, "slash_run_grep.json")
    answer = await slack.wait_for(
        lambda: next((m["text"] for m in slack.posted(CHANNEL) if "exit 0" in m["text"]), None),
        what="the grep answer",
    )
    assert 'grep "a&gt;b" f &amp;&amp; echo ok\na&gt;b\nok' in answer  # escaped only on the way out
    assert 'grep "a>b" f && echo ok' in await direct_tasks(bot)

    added = await slash(bot, "slash_rules_add_amp.json")
    assert "Added rule" in added["text"]
    (rule,) = await bot.runtime.approvals.list_rules()
    assert "a&b.txt" in rule.pattern and "&amp;" not in rule.pattern


async def test_autocorrected_quotes_are_undone_and_the_card_says_so(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    ack = await slash(bot, "slash_run_smart_quotes.json")
    assert "changed to ASCII" in ack["text"]
    root = await slack.wait_for(
        lambda: next((m for m in slack.posted(CHANNEL) if "thread_ts" not in m), None),
        what="the thread's root",
    )
    card, approval = await bot.wait_card(root["ts"])
    text = card_text(card)
    assert "touch \\\"a b\\\" 'c' &amp;&amp; ls --all" in text
    note = next(b for b in card["blocks"] if b["type"] == "context" and "ASCII" in json.dumps(b))
    assert '\u201c → "' in note["elements"][0]["text"]  # the note names what changed
    await bot.click(ACTION_APPROVE, approval, card["ts"], thread_ts=root["ts"])
    answer = await bot.wait_text(root["ts"], "$ touch")
    assert "changed to ASCII" in answer
    names = sorted(p.name for p in bot.workspace.iterdir())
    assert names == ["a b", "c"]  # no file named “a or b’


# -- thread history ---------------------------------------------------------------------------


async def test_a_long_thread_gives_the_model_its_newest_replies(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    slack.replies_page_size = 15  # as Slack answers some apps since 2025
    root = slack.add_message(CHANNEL, "web-1 keeps timing out", user="UOTHER001")
    for i in range(230):
        slack.add_message(CHANNEL, f"reply {i}", user=f"UPEER{i % 7:04d}", thread_ts=root["ts"])
    slack.rate_limit("conversations.replies", times=1, retry_after=1)  # honoured, not fatal
    model.reply(THINKER, Text("Looks like the load balancer."))
    ts, _ = await bot.mention("what do you make of this?", thread_ts=root["ts"])
    await bot.wait_text(root["ts"], "load balancer")

    history = model.requests_for(ACTION)[0].body["messages"][1:-1]
    contents = [m["content"] for m in history]
    assert contents[0] == "web-1 keeps timing out"  # what the thread is about
    assert contents[1:] == [f"reply {i}" for i in range(201, 230)]  # the 29 newest
    assert all(m["role"] == "user" for m in history)
    assert model.requests_for(ACTION)[0].body["messages"][-1]["content"] == (
        "what do you make of this?"
    )
    calls = slack.calls_to("conversations.replies")
    assert len(calls) >= 17 and calls[0].result["error"] == "ratelimited"
    assert all(c.params.get("latest") == ts for c in calls)  # never past the question
    assert len({c.params.get("cursor") for c in calls[1:]}) == len(calls) - 1


async def test_a_follow_up_uses_duckLMs_own_record_not_the_web_api(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    model.reply(THINKER, Text("web-1 is at 91%."))
    ts, _ = await bot.mention("how full is web-1?")
    await bot.wait_text(ts, "91%")
    await bot.settle()
    model.reply(THINKER, Text("web-2 is at 40%."))
    await bot.say("and web-2?", thread_ts=ts)
    await bot.wait_text(ts, "40%")
    assert model.requests_for(ACTION)[1].body["messages"][1:] == [
        {"role": "user", "content": "how full is web-1?"},
        {"role": "assistant", "content": "web-1 is at 91%."},
        {"role": "user", "content": "and web-2?"},
    ]
    assert slack.calls_to("conversations.replies") == []


# -- clipping after escaping --------------------------------------------------------------------


async def test_a_long_markup_command_keeps_its_fence_and_the_modal_its_escapes(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    command = "printf '%s\\n' " + "'a&b<c>d' " * 400 + "> out.txt"
    model.reply(ACTION, Text(directive(shell(command, reason="write it down"))))
    ts, _ = await bot.mention("write the markup down")
    card, approval = await bot.wait_card(ts)
    sections = [b["text"]["text"] for b in card["blocks"] if b["type"] == "section"]
    shown = next(s for s in sections if s.startswith("```"))
    assert shown.endswith("\n```") and len(shown) <= 3000
    assert "&amp;b&lt;c&gt;d" in shown and not _BROKEN_ESCAPE.search(shown)

    await bot.click(ACTION_DENY_REASON, approval, card["ts"], thread_ts=ts)
    (opened,) = await slack.wait_for_calls("views.open")
    modal = opened.params["view"]["blocks"][0]["text"]["text"]
    assert len(modal) <= 3000 and modal.endswith("\n```")
    assert not _BROKEN_ESCAPE.search(modal)


# -- edits and mentions of other people ------------------------------------------------------


async def test_an_edit_of_an_answered_message_gets_one_hint(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    envelope = await deliver_fixture(bot, "app_mention_link.json")
    ts = envelope["event"]["ts"]
    await bot.wait_text(ts, "Done.")
    await bot.settle()

    def edit(event_id: str, new_text: str) -> dict[str, Any]:
        changed = load("message_changed.json")
        changed["event_id"] = event_id
        changed["event"]["message"].update(ts=ts, text=new_text)
        changed["event"]["previous_message"].update(ts=ts, text=envelope["event"]["text"])
        return changed

    await bot.deliver(edit("EvEDIT00001", f"<@{BOT_USER}> run curl -sI example.org"))
    await bot.deliver(edit("EvEDIT00001", f"<@{BOT_USER}> run curl -sI example.org"), retry_num=1)
    await bot.deliver(edit("EvEDIT00002", f"<@{BOT_USER}> run curl -sI example.net"))
    # an unfurl or attachment change leaves the text alone: no edit
    await bot.deliver(edit("EvEDIT00003", envelope["event"]["text"]))
    await bot.settle()
    hints = [t for t in bot.texts(ts) if "edits are not re-run" in t]
    assert len(hints) == 1
    assert len(model.requests_for(ACTION)) == 1  # nothing re-ran

    # An edit of chatter the bot never took says nothing.
    chatter = slack.add_message(CHANNEL, "lunch at 12?", user=ASKER)
    other = load("message_changed.json")
    other["event"]["message"].update(ts=chatter["ts"], text="lunch at 1?")
    other["event"]["previous_message"].update(ts=chatter["ts"], text="lunch at 12?")
    for message in (other["event"]["message"], other["event"]["previous_message"]):
        message["blocks"][0]["elements"][0]["elements"] = [
            {"type": "text", "text": message["text"]}
        ]
    await bot.deliver(other)
    await bot.settle()
    assert bot.texts(chatter["ts"]) == []


async def test_a_reply_to_another_person_in_a_bot_thread_is_not_answered(
    bot: Bot, model: FakeModelServer
) -> None:
    model.reply(THINKER, Text("web-1 is fine."))
    ts, _ = await bot.mention("how is web-1?")
    await bot.wait_text(ts, "fine")
    await bot.settle()
    await deliver_fixture(bot, "thread_reply_other_person.json", thread_ts=ts)
    await bot.settle()
    assert len(model.requests_for(ACTION)) == 1
    assert await bot.tasks_in(ts) == 1
    # A reply that mentions the bot as well is for it (it comes as app_mention).
    model.reply(THINKER, Text("web-2 too."))
    await bot.mention("and web-2? cc <@U0BOB0001>", thread_ts=ts)
    await bot.wait_text(ts, "web-2 too.")


# -- who may ask (#22) -------------------------------------------------------------------------


async def test_a_slack_connect_stranger_is_refused(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    envelope = await deliver_fixture(bot, "app_mention_slack_connect.json")
    told = await slack.wait_for(lambda: slack.ephemeral, what="the private refusal")
    (refusal,) = told
    assert refusal["user"] == "UEXTERN01" and refusal["channel"] == "CSHARED01"
    assert "DUCKLM_REQUESTERS" in refusal["text"]
    await bot.deliver(envelope, retry_num=1)  # still a duplicate after the refusal
    await bot.settle()
    assert model.requests == [] and len(slack.ephemeral) == 1
    assert await bot.runtime.stores.tasks.list_recent(10) == []
    key = Thread("slack", "CSHARED01", envelope["event"]["ts"]).key
    assert await bot.runtime.stores.tasks.list_by_conversation(key) == []


async def test_the_installing_team_comes_from_auth_test(bot: Bot) -> None:
    policy = bot.service.policy
    assert policy.may_ask(f"slack:{ASKER}", origin="TFAKE0001")
    assert not policy.may_ask(f"slack:{ASKER}", origin="TEXTERNAL")


async def test_slash_commands_from_someone_who_may_not_ask_are_refused(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    bot = await start_bot(tmp_path, model, slack, requesters=[f"slack:{ASKER}"])
    try:
        refused = await slash(bot, "slash_run_grep.json", user="USTRANGER")
        assert refused["text"] == bot.service.policy.refuse_ask_text("slack:USTRANGER")
        allowed = await slash(bot, "slash_run_link.json", user=ASKER, text="rules")
        assert "No rules" in allowed["text"]
        approver = await slash(bot, "slash_run_link.json", user=APPROVER, text="rules")
        assert "No rules" in approver["text"]  # approvers may always ask
        await bot.settle()
        assert await direct_tasks(bot) == []
    finally:
        await stop_bot(bot)


async def test_a_schedule_stores_its_prompt_and_cron_as_typed(bot: Bot) -> None:
    # Autocorrect made the cron quotes typographic; Slack encoded the "&".
    text = "schedule add \u201c0 9 * * 1-5\u201d check disks &amp; logs on &lt;web-1&gt;"
    added = await slash(bot, "slash_run_link.json", text=text)
    assert "schedule" in added["text"].lower() and "changed to ASCII" in added["text"]
    (schedule,) = await bot.runtime.stores.schedules.list()
    assert schedule.cron == "0 9 * * 1-5"
    assert schedule.prompt == "check disks & logs on <web-1>"


async def test_another_bot_is_heard_only_when_it_mentions_duckLM(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    model.reply(THINKER, Text("Disk alert looked at."))
    alert = slack.add_message(
        CHANNEL, f"<@{BOT_USER}> disk alert on web-1", user="UALERTBOT", bot_id="BALERT001"
    )
    event = {
        "type": "app_mention",
        "user": "UALERTBOT",
        "bot_id": "BALERT001",
        "bot_profile": {"id": "BALERT001", "name": "alerts"},
        "text": alert["text"],
        "ts": alert["ts"],
        "channel": CHANNEL,
        "event_ts": alert["ts"],
        "team": "TFAKE0001",
    }
    await bot.deliver(event_callback(event))
    await bot.wait_text(alert["ts"], "looked at")
    assert questions(model) == ["disk alert on web-1"]
    # Its chatter in the thread without a mention is not for DuckLM.
    await bot.say(
        "still firing",
        user="UALERTBOT",
        thread_ts=alert["ts"],
        bot_id="BALERT001",
        subtype="bot_message",
    )
    await bot.settle()
    assert len(questions(model)) == 1


async def test_replies_to_another_bot_are_bounded_per_thread(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    bot = await start_bot(tmp_path, model, slack, bot_replies_per_thread=2)
    try:
        root = slack.add_message(CHANNEL, "alerts", user="UALERTBOT", bot_id="BALERT001")
        for i in range(4):  # a bot that keeps mentioning DuckLM in one thread
            said = slack.add_message(
                CHANNEL,
                f"<@{BOT_USER}> alert {i}",
                user="UALERTBOT",
                bot_id="BALERT001",
                thread_ts=root["ts"],
            )
            event = {
                "type": "app_mention",
                "user": "UALERTBOT",
                "bot_id": "BALERT001",
                "text": said["text"],
                "ts": said["ts"],
                "thread_ts": root["ts"],
                "channel": CHANNEL,
                "event_ts": said["ts"],
            }
            await bot.deliver(event_callback(event))
            await bot.settle()
        assert questions(model) == ["alert 0", "alert 1"]
    finally:
        await stop_bot(bot)


async def test_a_decision_word_after_the_decision_is_told_not_asked(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    model.reply(ACTION, Text(directive(shell("touch x", reason="make x"))))
    ts, _ = await bot.mention("make x")
    card, approval = await bot.wait_card(ts)
    model.reply(THINKER, Text("Left it."))
    await bot.click(ACTION_DENY, approval, card["ts"], thread_ts=ts)
    await bot.wait_text(ts, "Left it.")
    await bot.settle()
    asked = len(model.requests)
    await bot.say("approve", user=APPROVER, thread_ts=ts)
    told = await slack.wait_for(
        lambda: [e for e in slack.ephemeral if "Already decided" in e["text"]], what="the answer"
    )
    assert told[0]["user"] == APPROVER and told[0]["thread_ts"] == ts
    await bot.settle()
    assert len(model.requests) == asked  # never a model call
    assert not (bot.workspace / "x").exists()


async def test_malformed_message_payloads_are_acked_and_the_bot_keeps_serving(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    weird_events = [
        {"type": "message", "subtype": "message_changed", "channel": CHANNEL, "message": 7},
        {"type": "message", "subtype": "message_changed", "message": {"ts": 1, "user": []}},
        {"type": "app_mention", "user": ASKER, "channel": CHANNEL, "ts": "1.1", "blocks": "x"},
        {"type": "app_mention", "user": ASKER, "channel": 5, "ts": "1.2", "text": "<@x"},
        {
            "type": "message",
            "channel_type": "im",
            "user": ASKER,
            "channel": "D1",
            "ts": "1.3",
            "blocks": [{"type": "rich_text", "elements": [{"type": "rich_text_list"}]}],
        },
    ]
    for event in weird_events:
        answer = await bot.sender.event(event_callback(event))  # type: ignore[union-attr]
        assert answer.status < 500, event  # never our failure (bolt 400s a non-string channel)
    await bot.settle()
    model.reply(THINKER, Text("Still here."))
    ts, _ = await bot.mention("are you alive?")
    await bot.wait_text(ts, "Still here.")


async def test_a_posted_card_is_found_in_its_thread_again(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    # Recovery asks before posting a card whose earlier post may have gone out
    # unrecorded; the card is found by its buttons, across pages.
    model.reply(ACTION, Text(directive(shell("touch x", reason="make x"))))
    ts, _ = await bot.mention("make x")
    card, approval = await bot.wait_card(ts)
    for i in range(40):
        slack.add_message(CHANNEL, f"chatter {i}", user=ASKER, thread_ts=ts)
    slack.replies_page_size = 15
    thread = Thread("slack", CHANNEL, ts)
    assert await bot.platform.find_card(thread, approval) == f"{CHANNEL}:{card['ts']}"
    assert await bot.platform.find_card(thread, "no-such-approval") is None
    slack.add_message(CHANNEL, "a thread of its own", user=ASKER)
    assert await bot.platform.find_card(Thread("slack", CHANNEL, "1.000001"), approval) is None


async def test_a_click_on_a_card_whose_post_was_never_recorded_resolves_it(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    model.reply(ACTION, Text(directive(shell("touch x", reason="make x"))))
    ts, _ = await bot.mention("make x")
    card, approval = await bot.wait_card(ts)
    await bot.settle()  # the post is recorded
    # The state a process leaves when it dies between posting the card and
    # recording it: the card is in Slack, the store says "unposted".
    await bot.runtime.stores.db.execute(
        "UPDATE approvals SET card_ref = NULL, card_state = 'unposted' WHERE approval_id = ?",
        (approval,),
    )
    reset = await bot.runtime.approvals.get(approval)
    assert reset is not None and reset.card_state == "unposted" and reset.card_ref is None
    model.reply(THINKER, Text("Made x."))
    await bot.click(ACTION_APPROVE, approval, card["ts"], thread_ts=ts)
    await bot.wait_text(ts, "Made x.")
    updates = [c for c in slack.calls_to("chat.update") if c.params["ts"] == card["ts"]]
    assert len(updates) == 1 and "Approved" in json.dumps(updates[0].params["blocks"])
    stored = await bot.runtime.approvals.get(approval)
    assert stored is not None and stored.card_ref == f"{CHANNEL}:{card['ts']}"
    # adopted from the click itself, without searching the thread for it
    assert slack.calls_to("conversations.replies") == []


async def test_a_long_private_answer_is_clipped_after_escaping(bot: Bot, slack: FakeSlack) -> None:
    for pad in range(5):  # every alignment of the cut against "&amp;"
        text = "x" * pad + "& < >" * 3000 + "\n```\n" + "code & more\n" * 500 + "```"
        await bot.platform.tell(Thread("slack", CHANNEL, "1.000100"), f"slack:{ASKER}", text)
        sent = slack.ephemeral[-1]["text"]
        assert len(sent) <= 9000 and not _BROKEN_ESCAPE.search(sent), pad
        assert sent.count("```") % 2 == 0
