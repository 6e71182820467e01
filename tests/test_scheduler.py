"""Time and restarts (issue #6), end to end through the real Slack platform: approval
reminders and expiry, scheduled prompts, retention, crash recovery.

Short TTLs in seconds and injected triggers keep every test well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from bot.backend import Thread
from bot.scheduler import Scheduler, cron_trigger
from bot.slack.blocks import ACTION_APPROVE
from runtime.store.models import Schedule
from runtime.store.retention import delete_finished_tasks
from tests.conftest import ACTION, THINKER
from tests.fakes.openai_server import FakeModelServer, Hang, Text
from tests.fakes.slack_api import FakeSlack
from tests.test_slack import (
    ADMIN,
    APPROVER,
    CHANNEL,
    NO_ACTIONS,
    Bot,
    actions_of,
    card_for,
    start_bot,
    stop_bot,
)

pytestmark = [pytest.mark.usefixtures("clean_env"), pytest.mark.backends("sqlite", "postgres")]


def every_second(schedule: Schedule) -> IntervalTrigger:
    """An injected trigger: the real APScheduler machinery, firing every second."""
    return IntervalTrigger(seconds=1)


async def start_timed(
    tmp_path: Path,
    model: FakeModelServer,
    slack: FakeSlack,
    *,
    db: str,
    trigger: Any = every_second,
    remind: float = 900.0,
    ttl: float = 86400.0,
    retention_days: float | None = None,
) -> tuple[Bot, Scheduler]:
    bot = await start_bot(tmp_path, model, slack, db=db, approval_remind=remind, approval_ttl=ttl)
    scheduler = Scheduler(
        bot.service, remind_after=remind, retention_days=retention_days, trigger_factory=trigger
    )
    bot.service.runner.schedule_listeners.append(scheduler.schedule_changed)
    await bot.service.recover()
    await scheduler.start()
    return bot, scheduler


async def stop_timed(bot: Bot, scheduler: Scheduler) -> None:
    await scheduler.stop()
    await stop_bot(bot)


def roots(slack: FakeSlack) -> list[dict[str, Any]]:
    return [m for m in slack.posted(CHANNEL) if not m.get("thread_ts")]


# -- reminders and expiry -------------------------------------------------------------


async def test_reminder_then_expiry_arrive_in_order(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot, scheduler = await start_timed(tmp_path, model, slack, db=db_target, remind=0.5, ttl=1.5)
    try:
        ts, card, approval_id = await card_for(bot, model, "touch late.txt")
        reminder = await bot.wait_text(ts, "Reminder")
        expired = await bot.wait_text(ts, "expired")
        texts = bot.texts(ts)
        assert texts.index(reminder) < texts.index(expired)
        assert f"<@{APPROVER}>" in reminder and "touch late.txt" in reminder
        assert "did not run" in expired
        await bot.settle()

        # the card lost its buttons and says it expired
        updated = bot.fake.message(CHANNEL, card["ts"])
        assert updated is not None and not actions_of(updated)
        assert "xpired" in json.dumps(updated["blocks"])
        approval = await bot.runtime.approvals.get(approval_id)
        assert approval is not None and approval.decision == "expired"
        task = await bot.runtime.stores.tasks.get_task(approval.task_id)
        assert task is not None and task.status == "expired"
        events = await bot.runtime.stores.events.list_events(approval.task_id)
        assert [e.event_type for e in events].count("approval_expired") == 1
        assert len([t for t in bot.texts(ts) if "Reminder" in t]) == 1  # one reminder only

        # a click after expiry is refused and runs nothing
        answer = await bot.click(ACTION_APPROVE, approval_id, card["ts"], thread_ts=ts)
        assert answer.status == 200
        await bot.settle()
        assert "expired" in slack.ephemeral[-1]["text"]
        assert not (bot.workspace / "late.txt").exists()
    finally:
        await stop_timed(bot, scheduler)


async def test_a_click_racing_expiry_has_exactly_one_outcome(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot, scheduler = await start_timed(tmp_path, model, slack, db=db_target)
    try:
        for i in range(8):
            _ts, _card, approval_id = await card_for(
                bot, model, f"echo run >> race{i}.txt", question=f"race {i}"
            )
            refusal, _ = await asyncio.gather(
                bot.service.handle_decision(approval_id, f"slack:{APPROVER}", "approve"),
                bot.service.expire_approval(approval_id),
            )
            await bot.settle()
            approval = await bot.runtime.approvals.get(approval_id)
            assert approval is not None
            ran = (bot.workspace / f"race{i}.txt").exists()
            if approval.decision == "approve":
                assert refusal is None and ran
                assert (bot.workspace / f"race{i}.txt").read_text() == "run\n"
            else:
                assert approval.decision == "expired"
                assert refusal is not None and "expired" in refusal and not ran
    finally:
        await stop_timed(bot, scheduler)


# -- scheduled prompts ----------------------------------------------------------------


async def test_a_schedule_fires_and_its_answer_is_threaded(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    model.set_default(ACTION, Text(NO_ACTIONS))
    model.set_default(THINKER, Text("Disks are fine."))
    bot, scheduler = await start_timed(tmp_path, model, slack, db=db_target)
    try:
        answer = await bot.command('schedule add "*/5 * * * *" tz=Europe/Berlin check the disks')
        assert "Added schedule" in answer.json()["text"], answer.json()
        (schedule,) = await bot.runtime.stores.schedules.list()
        assert schedule.timezone == "Europe/Berlin" and schedule.cron == "*/5 * * * *"
        assert schedule.conversation == Thread("slack", CHANNEL).channel_prefix

        root = await slack.wait_for(lambda: roots(slack), what="a scheduled root message")
        assert f"Scheduled run of `{schedule.schedule_id}`" in root[0]["text"]
        assert await bot.wait_text(root[0]["ts"], "Disks are fine.")
        task = (await bot.runtime.stores.tasks.list_recent(1))[0]
        assert task.message == "check the disks" and task.requested_by == f"slack:{ADMIN}"
        assert task.conversation == Thread("slack", CHANNEL, root[0]["ts"]).key

        # pause: no new runs; resume: runs again; remove: gone for good
        assert (
            "Paused" in (await bot.command(f"schedule pause {schedule.schedule_id}")).json()["text"]
        )
        await bot.settle()
        paused_at = len(roots(slack))
        await asyncio.sleep(2.5)
        assert len(roots(slack)) == paused_at
        assert (
            "Resumed"
            in (await bot.command(f"schedule resume {schedule.schedule_id}")).json()["text"]
        )
        await slack.wait_for(lambda: len(roots(slack)) > paused_at, what="a run after resume")
        assert (
            "Removed"
            in (await bot.command(f"schedule remove {schedule.schedule_id}")).json()["text"]
        )
        await bot.settle()
        removed_at = len(roots(slack))
        await asyncio.sleep(2.5)
        assert len(roots(slack)) == removed_at
        assert "No schedules" in (await bot.command("schedule list")).json()["text"]
    finally:
        await stop_timed(bot, scheduler)


async def test_an_overlapping_run_is_skipped_and_said_so(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    model.reply(THINKER, Hang(3.0))  # the first run is slow
    bot, scheduler = await start_timed(tmp_path, model, slack, db=db_target)
    try:
        await bot.command('schedule add "* * * * *" slow report')
        await slack.wait_for(
            lambda: any("Skipped a run" in m["text"] for m in roots(slack)),
            within=10,
            what="a skipped-run notice",
        )
    finally:
        await stop_timed(bot, scheduler)


async def test_schedule_commands_need_the_right_people_and_valid_cron(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot, scheduler = await start_timed(tmp_path, model, slack, db=db_target)
    try:
        refused = (await bot.command('schedule add "* * * * *" hi', user="USTRANGER")).json()
        assert "Only admins and schedulers" in refused["text"]
        bad = (await bot.command('schedule add "61 * * * *" hi')).json()
        assert "Schedule not added" in bad["text"]
        bad_tz = (await bot.command('schedule add "* * * * *" tz=Mars/Olympus hi')).json()
        assert "unknown time zone" in bad_tz["text"]
        assert await bot.runtime.stores.schedules.list() == []
    finally:
        await stop_timed(bot, scheduler)


async def test_restart_keeps_schedules_and_pending_expiry_with_one_catch_up(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    # first life: a schedule on the real cron trigger, and a pending approval
    bot, scheduler = await start_timed(
        tmp_path,
        model,
        slack,
        db=db_target,
        trigger=lambda s: cron_trigger(s.cron, s.timezone),
        ttl=4.0,
    )
    await bot.command('schedule add "* * * * *" minutely check')
    ts, _card, approval_id = await card_for(bot, model, "touch never.txt")
    (schedule,) = await bot.runtime.stores.schedules.list()
    # pretend the last run was ten minutes ago: nine runs were missed while down
    await bot.runtime.stores.db.execute(
        "UPDATE schedules SET last_run_at = ? WHERE schedule_id = ? RETURNING 1",
        (time.time() - 600, schedule.schedule_id),
    )
    await stop_timed(bot, scheduler)
    before = len(roots(slack))

    # second life on the same database
    bot, scheduler = await start_timed(
        tmp_path,
        model,
        slack,
        db=db_target,
        trigger=lambda s: cron_trigger(s.cron, s.timezone),
        ttl=4.0,
    )
    try:
        assert any(f"schedule:{schedule.schedule_id}" in line for line in scheduler.describe())
        assert any(f"expire:{approval_id}" in line for line in scheduler.describe())
        catch_up = await slack.wait_for(
            lambda: [m for m in roots(slack)[before:] if "catch-up" in m["text"]],
            what="one catch-up run",
        )
        await bot.wait_text(ts, "expired")  # the expiry timer came back
        await bot.settle()
        # nine missed runs became one catch-up; a regular run may follow only if the
        # test happened to cross a minute boundary
        runs = [m["text"] for m in roots(slack)[before:] if "Scheduled run" in m["text"]]
        assert len(catch_up) == 1 and len(runs) <= 2
        assert [r for r in runs if "catch-up" in r] == [catch_up[0]["text"]]
        assert not (bot.workspace / "never.txt").exists()
    finally:
        await stop_timed(bot, scheduler)


# -- retention and crash recovery -------------------------------------------------------


async def test_retention_removes_old_finished_tasks_and_keeps_waiting_ones(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot, scheduler = await start_timed(tmp_path, model, slack, db=db_target, retention_days=1)
    try:
        _ts, _card, approval_id = await card_for(bot, model, "touch keep.txt")
        old = await bot.runtime.loop.run_command("echo old")
        recent = await bot.runtime.loop.run_command("echo recent")
        waiting = (await bot.runtime.approvals.get(approval_id)).task_id  # type: ignore[union-attr]
        two_days_ago = time.time() - 2 * 86400
        for task_id in (old.task_id, waiting):
            await bot.runtime.stores.db.execute(
                "UPDATE tasks SET updated_at = ? WHERE task_id = ? RETURNING 1",
                (two_days_ago, task_id),
            )

        await scheduler.housekeeping()

        tasks = bot.runtime.stores.tasks
        assert await tasks.get_task(old.task_id) is None
        assert await bot.runtime.stores.events.list_events(old.task_id) == []
        assert await tasks.get_task(recent.task_id) is not None
        still = await tasks.get_task(waiting)
        assert still is not None and still.status == "waiting_for_approval"
        assert await bot.runtime.approvals.get(approval_id) is not None
        # the kept approval still works after retention ran
        assert (
            await bot.service.handle_decision(approval_id, f"slack:{APPROVER}", "approve") is None
        )
        await bot.settle()
        assert (bot.workspace / "keep.txt").exists()
    finally:
        await stop_timed(bot, scheduler)


async def test_retention_never_deletes_without_a_setting(db_target: str) -> None:
    from runtime.store import open_stores

    stores = await open_stores(db_target)
    try:
        task = await stores.tasks.create_task("x")
        await stores.tasks.complete_task(task.task_id, "done")
        assert await delete_finished_tasks(stores.db, 3600) == 0  # too recent
        assert await stores.tasks.get_task(task.task_id) is not None
    finally:
        await stores.close()


async def test_a_running_task_of_a_killed_process_becomes_interrupted(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    model.set_handler(THINKER, lambda request: Hang(60))
    thread = Thread("slack", CHANNEL, "1700000000.000100")
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from runtime.factory import build_runtime
        from tests.conftest import make_settings
        from pathlib import Path

        async def main():
            settings = make_settings(Path({str(tmp_path)!r}), {model.base_url!r}, db={db_target!r})
            rt = await build_runtime(settings)
            task = asyncio.create_task(rt.loop.run_chat("slow one", conversation={thread.key!r}))
            while not await rt.stores.tasks.list_recent(1):
                await asyncio.sleep(0.05)
            print("started", flush=True)
            await task

        asyncio.run(main())
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.strip() == b"started"
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()

    bot, scheduler = await start_timed(tmp_path, model, slack, db=db_target)
    try:
        (task,) = await bot.runtime.stores.tasks.list_recent(5)
        assert task.status == "interrupted"
        note = await bot.wait_text(thread.root or "", "interrupted")
        assert "DuckLM stopped while working on this" in note
    finally:
        await stop_timed(bot, scheduler)


async def test_daily_rules_review_goes_to_the_admins_channel_when_it_finds_something(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    admins_channel = "CADMINS01"
    bot = await start_bot(
        tmp_path,
        model,
        slack,
        db=db_target,
        rule_review_channel=f"slack:{admins_channel}",
        rule_idle_days=1e-6,  # a tenth of a second: every rule is idle at once
    )
    scheduler = Scheduler(bot.service, remind_after=900.0)
    try:
        await scheduler.housekeeping()  # no rules: nothing to review, nothing posted
        assert slack.posted(admins_channel) == []

        rule = await bot.runtime.approvals.add_rule(
            "shell_exec_safe", "prefix", "git pull", f"slack:{ADMIN}"
        )
        await asyncio.sleep(0.2)  # past the tiny idle period: the rule is idle
        await scheduler.housekeeping()
        posted = slack.posted(admins_channel)
        assert len(posted) == 1, posted
        assert posted[0]["text"].startswith("Daily rules review")
        assert rule.rule_id in posted[0]["text"] or "git pull" in posted[0]["text"]
    finally:
        await stop_bot(bot)


async def test_the_always_button_says_the_rule_is_for_this_channel_and_its_lifetime(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot = await start_bot(tmp_path, model, slack, db=db_target, rule_max_age=7 * 86400)
    try:
        _ts, card, _approval_id = await card_for(bot, model, "touch scoped.txt")
        text = json.dumps(card["blocks"])
        assert "in this channel only" in text and "7 days" in text, text
    finally:
        await stop_bot(bot)
