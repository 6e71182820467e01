"""Per-channel policy (issue #20) through the real chat apps: the Slack app
against the fake Web API (two channels, two workspaces) and the Matrix bot on a
real Synapse (two rooms). Each channel has its own approvers, workspace and
tools; an approver of one channel clicking in another is refused and nothing
runs; `/duck policy` shows each channel's section; `ducklm events` (a real
subprocess) shows the decisions. Nothing of ours is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.matrix.platform import MatrixPlatform
from bot.service import ChatService
from bot.slack.blocks import ACTION_APPROVE, ACTION_DENY_REASON
from runtime.factory import build_runtime
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.slack_api import (
    BOT_USER,
    TEAM,
    FakeSlack,
    block_actions_payload,
    event_callback,
    slash_command_form,
)
from tests.fakes.synapse import MatrixUser, SynapseServer
from tests.test_slack import Bot, start_bot, stop_bot

pytestmark = [pytest.mark.usefixtures("clean_env"), pytest.mark.timeout(120)]

PROD, STAGE, READ = "CPROD0001", "CSTAGE001", "CREAD0001"
QUIET = "CQUIET001"  # a channel that allows no tool at all
SHARED = "CSHARED01"
OTHER_TEAM = "T0OTHER01"
ASKER = "UASKER001"
PROD_APPROVER, STAGE_APPROVER = "UPRODAPP1", "USTAGEAP1"
ENV_APPROVER = "UENVAPPR1"  # DUCKLM_APPROVERS: replaced by the file's default section
TEAM_A_APPROVER, TEAM_B_APPROVER = "UTEAMAAP1", "UTEAMBAP1"


def ducklm_events(db: Path, task_id: str) -> str:
    """`ducklm events TASK`, a real subprocess on the bot's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUCKLM_", "SLACK_"))}
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "--db", str(db), "events", task_id],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PYTHONPATH": str(Path(__file__).parent.parent)},
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- Slack ----------------------------------------------------------------------------------


class OtherWorkspaceSlack(FakeSlack):
    """The fake Web API of a second Slack workspace: auth.test names another team."""

    def _m_auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**super()._m_auth_test(params), "team_id": OTHER_TEAM}


def write_policy(directory: Path) -> Path:
    for name in ("prod", "staging", "reading"):
        (directory / name).mkdir(parents=True, exist_ok=True)
    path = directory / "policy.toml"
    path.write_text(
        f"""\
[default]
approvers = []

[channels."slack:{PROD}"]
approvers = ["slack:{PROD_APPROVER}"]
workspace = "prod"

[channels."slack:{STAGE}"]
approvers = ["slack:{STAGE_APPROVER}"]
workspace = "staging"

[channels."slack:{READ}"]
approvers = ["slack:{PROD_APPROVER}"]
workspace = "reading"
tools = ["read_file", "list_dir"]

[channels."slack:{QUIET}"]
tools = []

[channels."slack:{TEAM}/{SHARED}"]
approvers = ["slack:{TEAM_A_APPROVER}"]

[channels."slack:{OTHER_TEAM}/{SHARED}"]
approvers = ["slack:{TEAM_B_APPROVER}"]
"""
    )
    return path


async def start(tmp_path: Path, model: FakeModelServer, fake: FakeSlack, policy: Path) -> Bot:
    return await start_bot(
        tmp_path,
        model,
        fake,
        approvers=[ENV_APPROVER],
        policy_file=policy,
        requesters=[f"slack:{ASKER}"],
    )


@pytest_asyncio.fixture
async def slack_bot(tmp_path: Path, model: FakeModelServer, slack: FakeSlack) -> AsyncIterator[Bot]:
    bot = await start(tmp_path, model, slack, write_policy(tmp_path))
    try:
        yield bot
    finally:
        await stop_bot(bot)


async def mention(bot: Bot, channel: str, text: str) -> str:
    message = bot.fake.add_message(channel, f"<@{BOT_USER}> {text}", user=ASKER)
    event = {
        "type": "app_mention",
        "user": ASKER,
        "text": message["text"],
        "ts": message["ts"],
        "channel": channel,
        "event_ts": message["ts"],
    }
    await bot.deliver(event_callback(event))
    return str(message["ts"])


def in_thread(bot: Bot, channel: str, root: str) -> list[dict[str, Any]]:
    return [m for m in bot.fake.posted(channel) if m.get("thread_ts") == root]


async def card_in(bot: Bot, model: FakeModelServer, channel: str, command: str) -> tuple[str, Any]:
    """Ask in `channel` for something that needs approval: (thread ts, card, approval id)."""
    model.reply(ACTION, Text(directive(shell(command, reason="asked for"))))
    root = await mention(bot, channel, f"please run {command}")
    card = await bot.fake.wait_for(
        lambda: next((m for m in in_thread(bot, channel, root) if m.get("blocks")), None),
        what=f"the card in {channel}",
    )
    (actions,) = [b for b in card["blocks"] if b["type"] == "actions"]
    return root, (card, actions["elements"][0]["value"])


async def approve(
    bot: Bot,
    channel: str,
    root: str,
    card: dict[str, Any],
    approval: str,
    user: str,
    action_id: str = ACTION_APPROVE,
) -> None:
    assert bot.sender is not None
    payload = block_actions_payload(
        user=user,
        action_id=action_id,
        value=approval,
        channel=channel,
        message_ts=card["ts"],
        thread_ts=root,
        response_url=bot.fake.webhook_url(),
    )
    answer = await bot.sender.interaction(payload)
    assert answer.status == 200


async def refused_click(
    bot: Bot,
    channel: str,
    root: str,
    card: dict[str, Any],
    approval: str,
    user: str,
    action_id: str = ACTION_APPROVE,
) -> str:
    """A click that must be refused: the private answer the clicker gets."""
    before = len(bot.fake.ephemeral)
    await approve(bot, channel, root, card, approval, user, action_id)
    told = await bot.fake.wait_for(
        lambda: next((e for e in bot.fake.ephemeral[before:] if e["user"] == user), None),
        what=f"the refusal told to {user}",
    )
    assert told["channel"] == channel
    return str(told["text"])


async def command(bot: Bot, channel: str, text: str, user: str = ASKER) -> str:
    assert bot.sender is not None
    form = slash_command_form(
        user=user, channel=channel, text=text, response_url=bot.fake.webhook_url()
    )
    answer = await bot.sender.command(form)
    assert answer.status == 200
    return str(answer.json().get("text") or "")


async def test_each_channel_has_its_own_approvers_and_workspace(
    slack_bot: Bot, model: FakeModelServer, tmp_path: Path
) -> None:
    bot = slack_bot
    default_workspace = bot.workspace
    for channel, own, other, where in (
        (PROD, PROD_APPROVER, STAGE_APPROVER, "prod"),
        (STAGE, STAGE_APPROVER, PROD_APPROVER, "staging"),
    ):
        root, (card, approval) = await card_in(bot, model, channel, f"echo {where} >> f")
        # the other channel's approver, and the environment's, are refused; nothing runs
        text = await refused_click(bot, channel, root, card, approval, other)
        assert f"not an approver in this channel (policy section `slack:{channel}`)" in text
        text = await refused_click(bot, channel, root, card, approval, ENV_APPROVER)
        assert "not an approver" in text and "policy.toml" in text
        # "Deny with reason…" opens its modal only for this channel's approvers
        text = await refused_click(bot, channel, root, card, approval, other, ACTION_DENY_REASON)
        assert f"not an approver in this channel (policy section `slack:{channel}`)" in text
        assert not [c for c in bot.fake.calls if c.method == "views.open"]
        await bot.settle()
        stored = await bot.runtime.approvals.get(approval)
        assert stored is not None and stored.decision is None
        assert not (tmp_path / where / "f").exists()
        # the channel's own approver: it runs, in the channel's workspace
        model.reply(THINKER, Text(f"Done in {where}."))
        await approve(bot, channel, root, card, approval, own)
        await bot.fake.wait_for(
            lambda where=where, channel=channel, root=root: any(
                f"Done in {where}." in m["text"] for m in in_thread(bot, channel, root)
            ),
            what="the answer",
        )
        assert (tmp_path / where / "f").read_text() == f"{where}\n"
        assert not (default_workspace / "f").exists()

        stored = await bot.runtime.approvals.get(approval)
        assert stored is not None and stored.decided_by == f"slack:{own}"
        trail = ducklm_events(tmp_path / "ducklm.db", stored.task_id)
        assert (
            f"decision_refused approve by slack:{other} refused (policy slack:{channel})" in trail
        )
        assert f"decision_refused approve by slack:{ENV_APPROVER} refused" in trail
        assert f"approval_decided approve by slack:{own}" in trail
        assert f"command_audit `echo {where} >> f`" in trail

    # the prod task ran in prod: its task row says so
    (prod_task,) = await bot.runtime.stores.tasks.list_recent(
        1, conversation_prefix=f"slack:{PROD}|"
    )
    assert prod_task.workspace == str(tmp_path / "prod")


async def test_a_channel_that_allows_no_tool_is_answered_without_the_action_step(
    slack_bot: Bot, model: FakeModelServer, tmp_path: Path
) -> None:
    """With no tool allowed there is nothing to plan: the thinker answers at once
    (no action call that could only name a tool to refuse)."""
    bot = slack_bot
    model.reply(THINKER, Text("Only talk here."))
    asked = len(model.requests_for(ACTION))
    root = await mention(bot, QUIET, "what is in the log?")
    await bot.fake.wait_for(
        lambda: any("Only talk here." in m["text"] for m in in_thread(bot, QUIET, root)),
        what="the answer",
    )
    assert len(model.requests_for(ACTION)) == asked
    (task,) = await bot.runtime.stores.tasks.list_recent(1, conversation_prefix=f"slack:{QUIET}|")
    assert task.status == "completed"


async def test_a_tool_the_channel_does_not_allow_is_not_run(
    slack_bot: Bot, model: FakeModelServer, tmp_path: Path
) -> None:
    bot = slack_bot
    model.reply(ACTION, Text(directive(shell("echo hi > g", reason="asked for"))))
    model.reply(THINKER, Text("I may not run commands here."))
    asked = len(model.requests_for(ACTION))
    root = await mention(bot, READ, "write hi into g")
    await bot.fake.wait_for(
        lambda: any("I may not run commands" in m["text"] for m in in_thread(bot, READ, root)),
        what="the answer",
    )
    assert not any(m.get("blocks") for m in in_thread(bot, READ, root))  # no card either
    assert not (tmp_path / "reading" / "g").exists()
    # the model was told why
    told = str(model.requests_for(THINKER)[-1].body["messages"])
    assert "shell_exec_safe may not be used here" in told and f"slack:{READ}" in told
    (task,) = await bot.runtime.stores.tasks.list_recent(1, conversation_prefix=f"slack:{READ}|")
    trail = ducklm_events(tmp_path / "ducklm.db", task.task_id)
    assert "tool_refused shell_exec_safe: The tool shell_exec_safe may not be used here" in trail
    assert "tool_call_started" not in trail
    # The model is offered only the channel's tools; the shell it named anyway
    # (models do) was refused when dispatched, above.
    offered = json.dumps(model.requests_for(ACTION)[asked].body)
    assert "read_file" in offered and "list_dir" in offered
    assert "shell_exec_safe" not in offered and "write_file" not in offered

    # a direct run is the shell tool too
    assert "thread" in await command(bot, READ, "run touch y", user=PROD_APPROVER)
    refused = await bot.fake.wait_for(
        lambda: next((m for m in bot.fake.posted(READ) if "may not be used" in m["text"]), None),
        what="the direct run's refusal",
    )
    assert "touch y" in refused["text"]
    assert not (tmp_path / "reading" / "y").exists()

    # reading is allowed there
    (tmp_path / "reading" / "notes.txt").write_text("quack\n")
    model.reply(
        ACTION,
        Text(directive({"tool": "read_file", "args": {"path": "notes.txt"}, "reason": "look"})),
    )
    root = await mention(bot, READ, "what is in notes.txt?")
    await bot.fake.wait_for(
        lambda: any("Done." in m["text"] for m in in_thread(bot, READ, root)), what="the answer"
    )
    assert "quack" in str(model.requests_for(THINKER)[-1].body["messages"])


async def test_duck_policy_shows_each_channels_section(slack_bot: Bot, tmp_path: Path) -> None:
    prod = await command(slack_bot, PROD, "policy")
    assert f"the policy file's section `slack:{PROD}`" in prod
    assert f"approvers: <@{PROD_APPROVER}>" in prod  # Slack shows ids as mentions
    assert f"workspace: {tmp_path / 'prod'}" in prod and "tools: all" in prod
    read = await command(slack_bot, READ, "policy")
    assert "tools: list_dir, read_file" in read and f"workspace: {tmp_path / 'reading'}" in read
    elsewhere = await command(slack_bot, "CELSEWHR1", "policy")
    assert "default section (no section for this channel)" in elsewhere
    assert "approvers: nobody" in elsewhere
    assert f"workspace: {slack_bot.workspace}" in elsewhere
    # the shared channel's section of this bot's own workspace
    shared = await command(slack_bot, SHARED, "policy")
    assert f"section `slack:{TEAM}/{SHARED}`" in shared
    assert slack_bot.fake.calls_to("chat.postMessage") == []  # all of it private


async def test_two_workspaces_with_the_same_channel_id_do_not_mix(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    """One policy file, two bots installed in two workspaces (each its own Web
    API, database and workspace), one shared channel id: each bot takes the
    approvers of its own workspace's section."""
    policy = write_policy(tmp_path)
    other = OtherWorkspaceSlack()
    await other.start()
    bots = []
    try:
        bots.append(await start(tmp_path / "a", model, slack, policy))
        bots.append(await start(tmp_path / "b", model, other, policy))
        for bot, own, foreign, name in (
            (bots[0], TEAM_A_APPROVER, TEAM_B_APPROVER, f"slack:{TEAM}/{SHARED}"),
            (bots[1], TEAM_B_APPROVER, TEAM_A_APPROVER, f"slack:{OTHER_TEAM}/{SHARED}"),
        ):
            assert f"section `{name}`" in await command(bot, SHARED, "policy")
            root, (card, approval) = await card_in(bot, model, SHARED, "echo shared >> f")
            text = await refused_click(bot, SHARED, root, card, approval, foreign)
            assert f"policy section `{name}`" in text
            await bot.settle()
            assert not (bot.workspace / "f").exists()
            model.reply(THINKER, Text("Shared done."))
            await approve(bot, SHARED, root, card, approval, own)
            await bot.fake.wait_for(
                lambda bot=bot, root=root: any(
                    "Shared done." in m["text"] for m in in_thread(bot, SHARED, root)
                ),
                what="the answer",
            )
            assert (bot.workspace / "f").read_text() == "shared\n"
            stored = await bot.runtime.approvals.get(approval)
            assert stored is not None and stored.decided_by == f"slack:{own}"
    finally:
        for bot in bots:
            await stop_bot(bot)
        await other.stop()


# -- Matrix on Synapse ------------------------------------------------------------------------

PASSWORD = "correct horse battery staple"


@pytest_asyncio.fixture
async def pair(synapse: SynapseServer) -> AsyncIterator[tuple[MatrixUser, MatrixUser]]:
    """alice and bob, fresh accounts for this test."""
    users = [
        await MatrixUser(synapse, synapse.register(synapse.unique(n), PASSWORD), PASSWORD).login()
        for n in ("alice", "bob")
    ]
    try:
        yield users[0], users[1]
    finally:
        for user in users:
            await user.close()


def notice_in(duck: str, root: str, text: str):
    def match(event: dict[str, Any]) -> bool:
        content = event.get("content") or {}
        relation = content.get("m.relates_to") or {}
        return (
            event.get("sender") == duck
            and content.get("msgtype") == "m.notice"
            and relation.get("event_id") == root
            and text in str(content.get("body") or "")
        )

    return match


async def test_matrix_rooms_have_their_own_approvers_and_workspace(
    tmp_path: Path,
    model: FakeModelServer,
    synapse: SynapseServer,
    pair: tuple[MatrixUser, MatrixUser],
) -> None:
    model_server = model
    alice, bob = pair
    duck = synapse.register(synapse.unique("duck"), PASSWORD)
    # The rooms first: the policy names their ids, and the bot reads it at start.
    room_a = await alice.create_room([duck, bob.user_id])
    room_b = await alice.create_room([duck, bob.user_id])
    for room in (room_a, room_b):
        await bob.join(room)
    for name in ("room-a", "room-b"):
        (tmp_path / name).mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""\
default:
  approvers: []
channels:
  "matrix:{room_a}":
    approvers: ["matrix:{alice.user_id}"]
    workspace: room-a
  "matrix:{room_b}":
    approvers: ["matrix:{bob.user_id}"]
    workspace: room-b
"""
    )
    settings = make_settings(
        tmp_path,
        model_server.base_url,
        matrix_homeserver=synapse.base_url,
        matrix_user_id=duck,
        matrix_password=PASSWORD,
        policy_file=policy,
    )
    runtime = await build_runtime(settings)
    service = ChatService(runtime)
    platform = MatrixPlatform(service, runtime.settings)
    await platform.start()
    try:
        for room in (room_a, room_b):
            await alice.wait_for(
                lambda e, room=room: (
                    e.get("room_id") == room
                    and e.get("type") == "m.room.member"
                    and e.get("state_key") == duck
                    and (e.get("content") or {}).get("membership") == "join"
                ),
                "the bot joining",
            )
        for room, asker, own, where in (
            (room_a, bob, alice, "room-a"),
            (room_b, alice, bob, "room-b"),
        ):
            # `!duck policy` shows the room's section
            asked = await asker.say(room, "!duck policy")
            shown = await asker.wait_for(notice_in(duck, asked, "Policy here"), "the policy")
            body = str(shown["content"]["body"])
            assert f"section `matrix:{room}`" in body and own.qualified in body
            assert str(tmp_path / where) in body

            model_server.reply(ACTION, Text(directive(shell(f"touch {where}.txt", "asked"))))
            question = await asker.say(room, f"please touch {where}.txt", mention=duck)
            card = await asker.wait_for(notice_in(duck, question, "Approval needed"), "the card")
            # the asker approves in the other room, not here: refused, nothing runs
            await asker.react(room, card["event_id"], "✅")
            refusal = await asker.wait_for(
                notice_in(duck, question, "not an approver in this channel"), "the refusal"
            )
            assert f"matrix:{room}" in str(refusal["content"]["body"])
            assert not (tmp_path / where / f"{where}.txt").exists()
            assert len(await runtime.approvals.pending()) == 1

            model_server.reply(THINKER, Text(f"Touched in {where}."))
            await own.react(room, card["event_id"], "✅")
            await own.wait_for(notice_in(duck, question, f"Touched in {where}."), "the answer")
            assert (tmp_path / where / f"{where}.txt").exists()
            assert not (tmp_path / "workspace" / f"{where}.txt").exists()
            (decided,) = [
                a
                for t in await runtime.stores.tasks.list_recent(5)
                for a in await runtime.approvals.list_for_task(t.task_id)
                if a.command == f"touch {where}.txt"
            ]
            assert decided.decided_by == own.qualified
            trail = ducklm_events(tmp_path / "ducklm.db", decided.task_id)
            assert f"decision_refused approve by {asker.qualified} refused" in trail
            assert f"approval_decided approve by {own.qualified}" in trail
    finally:
        await platform.stop()
        await service.close()
        await runtime.close()
