"""Who may ask, end to end through the real Slack app (issue #22): the bolt app
over HTTP with signed requests, the fake Slack Web API, the real service and
store, and the fake model server. Plus the start-up block of a real
`ducklm run` subprocess."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.backend import Thread
from tests.conftest import ACTION, directive
from tests.fakes.openai_server import FakeModelServer, RecordedRequest, Reply, Text
from tests.fakes.slack_api import (
    BOT_TOKEN,
    BOT_USER,
    SIGNING_SECRET,
    TEAM,
    FakeSlack,
)
from tests.test_cli_run import free_port, wait_until_listening
from tests.test_console import cli_env
from tests.test_slack import APPROVER, ASKER, CHANNEL, Bot, start_bot, stop_bot

pytestmark = pytest.mark.usefixtures("clean_env")

DATA = Path(__file__).parent / "data" / "slack"
OTHER_ASKER = "UBOB00001"
EXTERNAL_TEAM = "TEXTERNAL"


def slack_connect_envelope(user: str, text: str, ts: str, channel: str = CHANNEL) -> dict[str, Any]:
    """tests/data/slack/app_mention_slack_connect.json (an external member's
    mention in a shared channel: user_team is their own workspace), for one
    scenario's user, text, ts and a fresh event id."""
    envelope = json.loads((DATA / "app_mention_slack_connect.json").read_text())
    event = envelope["event"]
    event.update(user=user, text=f"<@{BOT_USER}> {text}", ts=ts, event_ts=ts, channel=channel)
    event["blocks"][0]["elements"][0]["elements"][1]["text"] = f" {text}"
    envelope["event_id"] = f"Ev{ts.replace('.', '')}"
    return envelope


async def refused_events(bot: Bot) -> list[dict[str, Any]]:
    """Oldest first."""
    events = await bot.runtime.stores.events.list_by_type("request_refused", limit=1000)
    return [e.payload for e in reversed(events)]


async def claimed(bot: Bot, key: str) -> bool:
    """Is `key` already claimed? (Claiming it again returns False if so; a key
    that was free is claimed by asking, so only ask about keys that must be.)"""
    return not await bot.runtime.stores.deliveries.claim(key)


# -- strangers and approvers from elsewhere ------------------------------------------------


@pytest_asyncio.fixture
async def bot(tmp_path: Path, model: FakeModelServer, slack: FakeSlack) -> AsyncIterator[Bot]:
    running = await start_bot(tmp_path, model, slack)
    try:
        yield running
    finally:
        await stop_bot(running)


async def test_a_slack_connect_member_is_refused_privately_and_nothing_runs(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    ts = slack.next_ts()
    envelope = slack_connect_envelope("UEXTERN01", "cat /etc/passwd please", ts)
    await bot.deliver(envelope)
    (told,) = await slack.wait_for(lambda: slack.ephemeral, what="the private refusal")
    assert told["user"] == "UEXTERN01" and told["channel"] == CHANNEL
    assert told["text"] == bot.service.policy.refuse_ask_text("slack:UEXTERN01")
    # recorded: both delivery keys claimed, one request_refused event, no task
    assert await claimed(bot, f"slack:event:{envelope['event_id']}")
    assert await claimed(bot, f"slack:msg:{CHANNEL}:{ts}")
    assert await refused_events(bot) == [
        {
            "user": "slack:UEXTERN01",
            "origin": EXTERNAL_TEAM,
            "conversation": Thread("slack", CHANNEL, ts).key,
            "reason": "stranger",
            "told": True,
        }
    ]
    # Slack's retry is a duplicate: no second event, no second answer.
    await bot.deliver(envelope, retry_num=1)
    # The same person asking again within the hour: refused, but not told again.
    await bot.deliver(slack_connect_envelope("UEXTERN01", "uname -a", slack.next_ts()))
    await bot.settle()
    assert len(slack.ephemeral) == 1
    assert [e["told"] for e in await refused_events(bot)] == [True, False]
    assert model.requests == []
    assert await bot.runtime.stores.tasks.list_recent(10) == []
    assert not slack.calls_to("reactions.add")  # no "on it" either

    # A member of the installing workspace in the same shared channel is served.
    answered, _ = await bot.mention("how full is the disk?")
    await bot.wait_text(answered, "Done.")


async def test_an_approver_from_another_workspace_is_served(
    bot: Bot, model: FakeModelServer, slack: FakeSlack
) -> None:
    ts = slack.next_ts()
    await bot.deliver(slack_connect_envelope(APPROVER, "how full is the disk?", ts))
    await bot.wait_text(ts, "Done.")
    assert slack.ephemeral == []
    assert await refused_events(bot) == []
    assert await bot.tasks_in(ts) == 1


async def test_listed_requesters_replace_the_default(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    bot = await start_bot(
        tmp_path, model, slack, requesters=[f"slack:{EXTERNAL_TEAM}", f"slack:{OTHER_ASKER}"]
    )
    try:
        guest_ts = slack.next_ts()
        await bot.deliver(slack_connect_envelope("UEXTERN01", "uptime", guest_ts))
        await bot.wait_text(guest_ts, "Done.")  # their workspace is listed
        home_ts, _ = await bot.mention("uptime")  # ASKER: home team, but not listed
        await slack.wait_for(lambda: slack.ephemeral, what="the refusal")
        listed_ts, _ = await bot.mention("uptime", user=OTHER_ASKER)
        await bot.wait_text(listed_ts, "Done.")
        await bot.settle()
        assert [m["user"] for m in slack.ephemeral] == [ASKER]
        assert await bot.tasks_in(home_ts) == 0
    finally:
        await stop_bot(bot)


async def test_channels_outside_ducklm_channels_get_no_answer_at_all(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    bot = await start_bot(tmp_path, model, slack, channels=[f"slack:{CHANNEL}"])
    try:
        elsewhere, _ = await bot.mention("uptime", channel="CRANDOM01")
        here, _ = await bot.mention("uptime")
        await bot.wait_text(here, "Done.")
        await bot.settle()
        assert slack.posted("CRANDOM01") == [] and slack.ephemeral == []
        assert await claimed(bot, f"slack:msg:CRANDOM01:{elsewhere}")
        assert len(model.requests_for(ACTION)) == 1
    finally:
        await stop_bot(bot)


# -- flooding -------------------------------------------------------------------------------


class Gate:
    """The action model's answers to one user's questions wait for `open`, so
    their tasks stay running as long as a test needs; others pass at once."""

    def __init__(self, held_word: str) -> None:
        self.held_word = held_word
        self.opened = asyncio.Event()
        self.waiting = 0

    async def __call__(self, request: RecordedRequest) -> Reply:
        question = json.dumps(request.body.get("messages", [])[-1:])
        if self.held_word in question:
            self.waiting += 1
            await self.opened.wait()
        return Text(directive())


async def test_fifty_quick_requests_from_one_user_while_another_is_served(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    gate = Gate("alice-")
    model.set_handler(ACTION, gate)
    # The held model calls must outlast the rest of the test on a loaded machine.
    bot = await start_bot(
        tmp_path, model, slack, user_max_tasks=3, user_rate="10/10m", model_timeout=120
    )
    try:
        # 50 quick mentions from one person, ten at a time as Slack would fire them
        sent = []
        for start in range(0, 50, 10):
            sent += await asyncio.gather(
                *(bot.mention(f"alice-{n} how full is the disk?") for n in range(start, start + 10))
            )
        await slack.wait_for(lambda: gate.waiting == 3, what="three of them running")

        # Another person is served while the first one's three are still running.
        bob_ts, _ = await bot.mention("uptime?", user=OTHER_ASKER)
        await bot.wait_text(bob_ts, "Done.")
        assert gate.waiting == 3 and not gate.opened.is_set()

        # One clear answer for the burst, naming the setting; not 47.
        (told,) = await slack.wait_for(lambda: slack.ephemeral, what="the flood answer")
        assert told["user"] == ASKER
        assert "DUCKLM_USER_MAX_TASKS=3" in told["text"]
        refused = await refused_events(bot)
        assert len(refused) == 47
        assert {e["reason"] for e in refused} == {"user_busy"}
        assert sum(e["told"] for e in refused) == 1
        # every one of the 50 was recorded as delivered: a retry is a duplicate
        for ts, _envelope in sent:
            assert await claimed(bot, f"slack:msg:{CHANNEL}:{ts}")
        await bot.deliver(sent[-1][1], retry_num=1)
        assert len(await refused_events(bot)) == 47

        gate.opened.set()
        await bot.settle(within=60)
        started = [ts for ts, _ in sent if await bot.tasks_in(ts)]
        assert len(started) == 3
        for ts in started:
            assert any("Done." in t for t in bot.texts(ts))
        # The global limit stays as it was.
        assert bot.service._slots._value == bot.runtime.settings.max_concurrent_tasks

        # Her slots are free again: the next question is taken (a new burst).
        again, _ = await bot.mention("alice-again, how full now?")
        await bot.wait_text(again, "Done.")
        assert len(slack.ephemeral) == 1
    finally:
        gate.opened.set()
        await stop_bot(bot)


async def test_the_rate_limit_answers_once_per_burst_and_names_the_setting(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    bot = await start_bot(tmp_path, model, slack, user_max_tasks=0, user_rate="3/h")
    try:
        for _ in range(3):
            ts, _ = await bot.mention("uptime?")
            await bot.wait_text(ts, "Done.")
        fourth, _ = await bot.mention("uptime?")
        fifth, _ = await bot.mention("uptime?")
        (told,) = await slack.wait_for(lambda: slack.ephemeral, what="the rate answer")
        assert "3 per 1 hour" in told["text"] and "DUCKLM_USER_RATE" in told["text"]
        assert "Try again in 20 minutes" in told["text"]
        bob, _ = await bot.mention("uptime?", user=OTHER_ASKER)
        await bot.wait_text(bob, "Done.")
        await bot.settle()
        assert len(slack.ephemeral) == 1
        assert await bot.tasks_in(fourth) == 0 and await bot.tasks_in(fifth) == 0
        assert [e["reason"] for e in await refused_events(bot)] == ["user_rate"] * 2
    finally:
        await stop_bot(bot)


# -- the start-up block of `ducklm run` ---------------------------------------------------


def fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


async def run_and_stop(tmp_path: Path, slack: FakeSlack, **env: str) -> str:
    """Start `ducklm run` serving Slack over HTTP, stop it, return its stderr."""
    port = free_port()
    environment = cli_env(
        fresh_dir(tmp_path),
        SLACK_BOT_TOKEN=BOT_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        DUCKLM_SLACK_MODE="http",
        DUCKLM_HTTP_HOST="127.0.0.1",
        DUCKLM_HTTP_PORT=str(port),
        DUCKLM_SLACK_API_URL=slack.api_url,
        DUCKLM_MODEL_BASE_URL="http://127.0.0.1:9/v1",  # never called
        **env,
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "run",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=environment,
    )
    try:
        await wait_until_listening(port, process)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    stderr = err.decode()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stderr


def block_of(stderr: str) -> list[str]:
    """The `ducklm: who may …` / `answers in` lines, in order, as one block."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ducklm: who may ask:"))
    block = []
    for line in lines[start:]:
        if not line.startswith(("ducklm: who may", "ducklm: answers in")):
            break
        block.append(line.removeprefix("ducklm: "))
    return block


async def test_ducklm_run_prints_who_may_ask_approve_and_administer(
    tmp_path: Path, slack: FakeSlack
) -> None:
    stderr = await run_and_stop(
        tmp_path / "closed",
        slack,
        DUCKLM_APPROVERS="slack:UAPPROVER matrix:@ops:example.org",
        DUCKLM_CHANNELS="slack:COPS00001",
    )
    assert block_of(stderr) == [
        f"who may ask: members of Slack workspace {TEAM} (DUCKLM_REQUESTERS unset); "
        "approvers and admins too",
        "who may approve: matrix:@ops:example.org, slack:UAPPROVER",
        "who may administer: nobody (DUCKLM_ADMINS unset)",
        "answers in: slack:COPS00001 (DUCKLM_CHANNELS)",
    ]
    assert "DUCKLM_ADMINS is not set" in stderr
    assert "ANYONE" not in stderr

    # An open configuration is allowed, and said loudly at every start.
    for attempt in ("first", "second"):
        stderr = await run_and_stop(
            tmp_path / attempt, slack, DUCKLM_REQUESTERS="*", DUCKLM_ADMINS="slack:UADMIN001"
        )
        block = block_of(stderr)
        assert block[0] == "who may ask: anyone (DUCKLM_REQUESTERS=*)"
        assert "who may administer: slack:UADMIN001" in block
        assert "who may approve: nobody (DUCKLM_APPROVERS unset)" in block
        assert "warning: DUCKLM_REQUESTERS=*: ANYONE who can reach the bot" in stderr


async def test_direct_runs_are_held_to_the_same_rate(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    bot = await start_bot(tmp_path, model, slack, user_max_tasks=0, user_rate="2/h")
    try:
        for _ in range(2):
            ran = (await bot.command("run echo hi", user=ASKER)).json()
            assert "DUCKLM_USER_RATE" not in ran.get("text", "")
        refused = (await bot.command("run echo hi", user=ASKER)).json()
        assert "DUCKLM_USER_RATE" in refused["text"]
        assert refused["response_type"] == "ephemeral"
        again = (await bot.command("run echo hi", user=ASKER)).json()
        assert "still over DuckLM's limits" in again["text"]
        await bot.settle()
        roots = [m for m in slack.posted(CHANNEL) if "asked to run" in m["text"]]
        assert len(roots) == 2  # the refused ones posted nothing in the channel
        tasks = await bot.runtime.stores.tasks.list_recent(10)
        assert len(tasks) == 2
        refused = await refused_events(bot)
        assert [(e["user"], e["reason"], e["told"]) for e in refused] == [
            (f"slack:{ASKER}", "user_rate", True),
            (f"slack:{ASKER}", "user_rate", False),
        ]
        # other commands are not tasks: never held back
        assert "No rules" in (await bot.command("rules", user=ASKER)).json()["text"]
    finally:
        await stop_bot(bot)
