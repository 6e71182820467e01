"""Direct commands (issue #8) with no model server running at all: a read-only
command, one that needs approval (approved, then denied) and a blocked one, with
the audit trail of each checked. The console is covered in test_console.py and
Matrix in test_matrix.py; this is Slack, end to end."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bot.slack.blocks import ACTION_APPROVE, ACTION_DENY
from runtime.store.models import Event
from tests.fakes.slack_api import FakeSlack
from tests.test_slack import ADMIN, CHANNEL, Bot, start_bot, stop_bot

pytestmark = pytest.mark.usefixtures("clean_env")

NO_MODEL = SimpleNamespace(base_url=None)  # start_bot's model argument, with nothing behind it


def roots(slack: FakeSlack) -> list[dict[str, Any]]:
    return [m for m in slack.posted(CHANNEL) if "thread_ts" not in m]


async def run_in_slack(bot: Bot, slack: FakeSlack, command: str) -> str:
    """`/duck run <command>`; returns the ts of the thread it opened."""
    before = len(roots(slack))
    answer = (await bot.command(f"run {command}")).json()
    assert answer["response_type"] == "ephemeral"
    new = await slack.wait_for(lambda: roots(slack)[before:], what="the run's thread")
    return new[0]["ts"]


async def trail(bot: Bot, root: str) -> list[Event]:
    (task,) = await bot.runtime.stores.tasks.list_by_conversation(f"slack:{CHANNEL}|{root}")
    return await bot.runtime.stores.events.list_events(task.task_id)


def audits(events: list[Event]) -> list[dict[str, Any]]:
    return [e.payload for e in events if e.event_type == "command_audit"]


async def test_slack_direct_commands_without_a_model(tmp_path: Path, slack: FakeSlack) -> None:
    bot = await start_bot(tmp_path, NO_MODEL, slack)  # type: ignore[arg-type]
    try:
        assert bot.runtime.model is None

        # read-only: runs at once, output in the thread
        root = await run_in_slack(bot, slack, "df -h")
        assert "Filesystem" in await bot.wait_text(root, "Filesystem")
        events = await trail(bot, root)
        assert events[1].event_type == "direct_command" and events[1].payload["model"] is None
        assert not any(e.event_type.startswith("model_call") for e in events)
        (audit,) = audits(events)
        assert audit["command"] == "df -h" and audit["risk_level"] == "low" and audit["ok"]

        # needs approval: approved
        root = await run_in_slack(bot, slack, "touch approved.txt")
        card, approval_id = await bot.wait_card(root)
        assert not (bot.workspace / "approved.txt").exists()
        await bot.click(ACTION_APPROVE, approval_id, card["ts"], thread_ts=root)
        await bot.wait_text(root, "touch approved.txt")
        await bot.settle()
        assert (bot.workspace / "approved.txt").exists()
        events = await trail(bot, root)
        assert [a["approved"] for a in audits(events)] == [False, True]
        assert audits(events)[1]["approved_by"] == "slack:UAPPROVER"
        decided = [e.payload for e in events if e.event_type == "approval_decided"]
        assert decided[0]["decision"] == "approve"

        # needs approval: denied
        root = await run_in_slack(bot, slack, "touch denied.txt")
        card, approval_id = await bot.wait_card(root)
        await bot.click(ACTION_DENY, approval_id, card["ts"], thread_ts=root)
        said = await bot.wait_text(root, "did not run")
        await bot.settle()
        assert said == "`touch denied.txt` did not run: Denied by <@UAPPROVER>."
        assert not (bot.workspace / "denied.txt").exists()
        events = await trail(bot, root)
        assert [a["approved"] for a in audits(events)] == [False, False]
        assert [e.payload["decision"] for e in events if e.event_type == "approval_decided"] == [
            "deny"
        ]

        # blocked: refused with the reason, nothing to approve
        root = await run_in_slack(bot, slack, "rm -rf /")
        refused = await bot.wait_text(root, "blocked")
        assert "cannot run" in refused
        assert bot.card(root) is None
        (audit,) = audits(await trail(bot, root))
        assert audit["blocked"] and audit["risk_level"] == "critical" and not audit["ok"]

        # a free-text mention without a model gets a clear answer, not silence
        ts, _ = await bot.mention("why is web-1 slow?", user=ADMIN)
        said = await bot.wait_text(ts, "DUCKLM_MODEL_BASE_URL")
        assert "run" in said
    finally:
        await stop_bot(bot)
