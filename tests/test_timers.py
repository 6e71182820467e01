"""Timers from the store (issue #23): reminders, expiry and schedules come from an
indexed "next due" time, one timer per kind, whatever is pending.

The rows are made with bulk SQL on a second connection (how else would a test
make 100,000 of them in a second), then the real scheduler, the real service and
the real Slack platform (against the fake Web API) take them from there. Every
test runs on SQLite and PostgreSQL but the 100k one (SQLite only: time).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.backend import Thread
from bot.scheduler import Scheduler, cron_trigger
from tests.conftest import ACTION, THINKER
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.slack_api import FakeSlack
from tests.postgres import raw_executemany
from tests.test_slack import CHANNEL, NO_ACTIONS, Bot, card_for, start_bot, stop_bot

pytestmark = [pytest.mark.usefixtures("clean_env"), pytest.mark.backends("sqlite", "postgres")]

HOURLY = "0 * * * *"


def real_cron(schedule: Any) -> Any:
    return cron_trigger(schedule.cron, schedule.timezone)


async def wait_until(
    check: Callable[[], Any], *, within: float, what: str, every: float = 0.1
) -> Any:
    """Poll an async `check` until it returns something truthy, for at most `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(every)


def bulk(db: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
    raw_executemany(db, sql, rows)


def add_waiting_approvals(
    db: str, count: int, *, expires_at: Callable[[int], float], due_at: Callable[[int], float]
) -> None:
    """`count` tasks waiting for approval (in no chat thread) and their approvals."""
    created = time.time()
    task_ids = [uuid.uuid4().hex for _ in range(count)]
    bulk(
        db,
        "INSERT INTO tasks (task_id, message, status, created_at, updated_at) "
        "VALUES (?, 'bulk', 'waiting_for_approval', ?, ?)",
        [(task_id, created, created) for task_id in task_ids],
    )
    bulk(
        db,
        "INSERT INTO approvals (approval_id, task_id, action, tool, command, created_at, "
        'expires_at, due_at) VALUES (?, ?, \'{"tool": "shell_exec_safe"}\', '
        "'shell_exec_safe', 'touch x', ?, ?, ?)",
        [
            (uuid.uuid4().hex, task_id, created, expires_at(i), due_at(i))
            for i, task_id in enumerate(task_ids)
        ],
    )


def add_schedules(db: str, count: int, *, cron: str, last_run_at: float | None) -> None:
    created = time.time() - 86400
    conversation = Thread("slack", CHANNEL).channel_prefix
    bulk(
        db,
        "INSERT INTO schedules (schedule_id, cron, timezone, prompt, conversation, created_by, "
        "created_at, last_run_at) VALUES (?, ?, 'UTC', ?, ?, 'slack:UADMIN', ?, ?)",
        [
            (f"s-b{i:05x}", cron, f"report {i}", conversation, created, last_run_at)
            for i in range(count)
        ],
    )


async def start_scheduler(bot: Bot, **options: Any) -> Scheduler:
    scheduler = Scheduler(bot.service, remind_after=bot.runtime.settings.approval_remind, **options)
    bot.service.runner.schedule_listeners.append(scheduler.schedule_changed)
    await scheduler.start()
    return scheduler


def db_of(bot: Bot) -> str:
    return bot.runtime.settings.db


@contextlib.contextmanager
def statements_run(bot: Bot) -> Iterator[list[str]]:
    """The SQL the store runs meanwhile. SQLite: the inline connection's trace (every
    statement, BEGIN and COMMIT included). PostgreSQL's statements go over a pool,
    so the store's own entry points are counted instead (each still runs the real one)."""
    db = bot.runtime.stores.db
    statements: list[str] = []
    if db.dialect == "sqlite":
        db._conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        try:
            yield statements
        finally:
            db._conn.set_trace_callback(None)  # type: ignore[attr-defined]
        return
    names = ("fetchall", "fetchone", "execute")
    real = {name: getattr(db, name) for name in names}

    def counted(name: str) -> Any:
        async def call(sql: str, *args: Any, **kwargs: Any) -> Any:
            statements.append(sql)
            return await real[name](sql, *args, **kwargs)

        return call

    for name in names:
        setattr(db, name, counted(name))
    try:
        yield statements
    finally:
        for name in names:
            delattr(db, name)


def roots(slack: FakeSlack) -> list[dict[str, Any]]:
    return [m for m in slack.posted(CHANNEL) if not m.get("thread_ts")]


async def scalar(bot: Bot, sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = await bot.runtime.stores.db.fetchone(sql, params)
    assert row is not None
    return row[0]


# -- approvals ------------------------------------------------------------------------


@pytest.mark.backends(
    "sqlite", reason="time: 100k rows take minutes over a network round trip each"
)
async def test_more_than_100k_pending_approvals_all_expire(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack
) -> None:
    count = 100_001
    bot = await start_bot(tmp_path, model, slack, approval_ttl=2.0)
    scheduler: Scheduler | None = None
    try:
        soon = time.time() + 2.0
        # Half planned as the scheduler plans them (due at their expiry), half as
        # inserted (0: not planned yet, as after the upgrade to schema v7).
        add_waiting_approvals(
            db_of(bot),
            count,
            expires_at=lambda i: soon + (i % 100) / 100,
            due_at=lambda i: soon + (i % 100) / 100 if i % 2 else 0.0,
        )
        scheduler = await start_scheduler(bot)
        # one APScheduler job (housekeeping) and two timers, not two jobs per approval
        assert [job.id for job in scheduler._scheduler.get_jobs()] == ["housekeeping"]
        assert len(scheduler.describe()) == 2

        await wait_until(
            lambda: _none_pending(bot), within=600, what="every approval expired", every=1.0
        )
        assert await scalar(bot, "SELECT COUNT(*) FROM approvals WHERE decision = 'expired'") == (
            count
        )
        assert await scalar(bot, "SELECT COUNT(*) FROM tasks WHERE status = 'expired'") == count
        # exactly one expiry each, and none before its time
        assert await scalar(
            bot, "SELECT COUNT(*) FROM events WHERE event_type = 'approval_expired'"
        ) == (count)
        assert await scalar(
            bot,
            "SELECT COUNT(*) FROM approvals WHERE decided_at < expires_at OR due_at IS NOT NULL",
        ) == (0)
    finally:
        if scheduler is not None:
            await scheduler.stop()
        await stop_bot(bot)


async def _none_pending(bot: Bot) -> bool:
    return await bot.runtime.approvals.count_pending() == 0


async def test_a_new_approval_is_planned_reminded_then_expired_in_order(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot = await start_bot(
        tmp_path, model, slack, db=db_target, approval_remind=0.6, approval_ttl=1.5
    )
    scheduler = await start_scheduler(bot, poll=60.0)  # a long poll: the wake-ups must do it
    try:
        ts, _card, approval_id = await card_for(bot, model, "touch planned.txt")
        stores = bot.runtime.stores
        approval = await stores.approvals.get(approval_id)
        assert approval is not None
        remind_at = approval.created_at.timestamp() + 0.6
        # planned at once (woken by the new approval), due at its reminder
        await wait_until(
            lambda: _due_is(bot, approval_id, remind_at), within=10, what="the reminder planned"
        )
        await bot.wait_text(ts, "Reminder")
        await bot.wait_text(ts, "expired")
        texts = bot.texts(ts)
        assert sum("Reminder" in t for t in texts) == 1
        final = await stores.approvals.get(approval_id)
        assert final is not None and final.decision == "expired"
        assert (
            await scalar(bot, "SELECT due_at FROM approvals WHERE approval_id = ?", (approval_id,))
            is None
        )
    finally:
        await scheduler.stop()
        await stop_bot(bot)


async def _due_is(bot: Bot, approval_id: str, expected: float) -> bool:
    due = await scalar(bot, "SELECT due_at FROM approvals WHERE approval_id = ?", (approval_id,))
    return due is not None and abs(due - expected) < 1e-6


async def test_a_restart_arms_the_same_few_timers_whatever_is_pending(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot = await start_bot(tmp_path, model, slack, db=db_target)
    scheduler: Scheduler | None = None
    try:
        far = time.time() + 86400
        # PostgreSQL plans each schedule with its own round trip (10,000 took 25 s there):
        # a fifth as many rows still makes the start-up's statements independent of
        # them, and still ten planning batches.
        approvals, schedules = (
            (4_000, 2_000) if bot.runtime.settings.db_is_postgres else (20_000, 10_000)
        )
        add_waiting_approvals(db_of(bot), approvals, expires_at=lambda i: far, due_at=lambda i: far)
        add_schedules(db_of(bot), schedules, cron=HOURLY, last_run_at=None)
        # SQLite: the inline connection is the only one a start-up touches.
        with statements_run(bot) as statements:
            scheduler = Scheduler(bot.service, remind_after=900.0, trigger_factory=real_cron)
            await scheduler.start()
            at_start = list(statements)
        # A handful of index probes, not a query (or a job) per approval or schedule.
        assert len(at_start) <= 6, at_start
        assert [job.id for job in scheduler._scheduler.get_jobs()] == ["housekeeping"]
        assert set(scheduler._timers) == {"approvals", "schedules"}
        lines = scheduler.describe()
        assert len(lines) == 3
        assert lines[0].startswith("expire:") and "earliest approval" in lines[0]
        assert lines[1].startswith("schedule:s-b") and "to be planned" in lines[1]
        # the new schedules are then planned in the background, in batches
        await wait_until(
            lambda: _unplanned(bot, 0), within=120, what="every schedule planned", every=0.2
        )
        hour = (int(time.time()) // 3600 + 1) * 3600
        assert await scalar(
            bot, "SELECT COUNT(*) FROM schedules WHERE next_fire_at BETWEEN ? AND ?", (0.5, hour)
        ) == (schedules)
    finally:
        if scheduler is not None:
            await scheduler.stop()
        await stop_bot(bot)


async def _unplanned(bot: Bot, expected: int) -> bool:
    return await scalar(bot, "SELECT COUNT(*) FROM schedules WHERE next_fire_at = 0") == expected


# -- schedules ------------------------------------------------------------------------


async def test_a_schedule_fires_at_its_stored_next_fire_time_and_only_once(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    model.set_default(ACTION, Text(NO_ACTIONS))
    model.set_default(THINKER, Text("All fine."))
    bot = await start_bot(tmp_path, model, slack, db=db_target)
    schedulers: list[Scheduler] = []
    try:
        # once a year by its cron, but its stored next fire time is in a second
        add_schedules(db_of(bot), 1, cron="0 0 1 1 *", last_run_at=None)
        soon = time.time() + 1.0
        await bot.runtime.stores.db.execute(
            "UPDATE schedules SET next_fire_at = ? RETURNING 1", (soon,)
        )
        # two schedulers on one database (as two processes would be): one run
        for _ in range(2):
            schedulers.append(await start_scheduler(bot, trigger_factory=real_cron, poll=0.2))
        root = await slack.wait_for(lambda: roots(slack), what="the scheduled run")
        assert "Scheduled run of `s-b00000`" in root[0]["text"]
        assert "catch-up" not in root[0]["text"]
        await bot.wait_text(root[0]["ts"], "All fine.")
        await bot.settle()
        await asyncio.sleep(1.0)  # both timers poll 5 times a second: a second run would show
        assert len(roots(slack)) == 1
        (schedule,) = await bot.runtime.stores.schedules.list()
        assert schedule.last_run_at is not None and schedule.last_run_at.timestamp() >= soon
        next_fire = await scalar(bot, "SELECT next_fire_at FROM schedules")
        assert (
            next_fire
            == cron_trigger("0 0 1 1 *", "UTC")
            .get_next_fire_time(None, schedule.last_run_at)
            .timestamp()
        )
    finally:
        for scheduler in schedulers:
            await scheduler.stop()
        await stop_bot(bot)


async def test_missed_runs_are_caught_up_one_at_a_time_at_the_rate(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    model.set_default(ACTION, Text(NO_ACTIONS))
    model.set_default(THINKER, Text("Caught up."))
    bot = await start_bot(tmp_path, model, slack, db=db_target)
    scheduler: Scheduler | None = None
    count, rate = 6, 120.0  # a catch-up every 0.5 s
    try:
        # hourly schedules whose last run was two hours ago: each missed a run
        add_schedules(db_of(bot), count, cron=HOURLY, last_run_at=time.time() - 7200)
        started = time.time()
        scheduler = await start_scheduler(bot, trigger_factory=real_cron, catch_up_rate=rate)
        await slack.wait_for(
            lambda: len(roots(slack)) >= count, within=60, what=f"{count} catch-up runs"
        )
        await bot.settle()
        texts = [m["text"] for m in roots(slack)]
        assert len(texts) == count and all("catch-up" in t for t in texts)
        assert len({t.split("`")[1] for t in texts}) == count  # each schedule once
        runs = sorted(s.last_run_at.timestamp() for s in await bot.runtime.stores.schedules.list())
        gaps = [b - a for a, b in itertools.pairwise(runs)]
        assert min(gaps) >= 60.0 / rate - 0.01, gaps  # never two closer than the rate allows
        assert runs[-1] - started < (count - 1) * 60.0 / rate + 20.0  # and not stalled
        # each is planned for its next regular hour, not caught up again
        hour = (int(time.time()) // 3600 + 1) * 3600
        assert await scalar(
            bot, "SELECT COUNT(*) FROM schedules WHERE next_fire_at = ?", (float(hour),)
        ) == (count)
    finally:
        if scheduler is not None:
            await scheduler.stop()
        await stop_bot(bot)


async def test_a_schedule_resumed_by_another_process_owes_no_catch_up(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot = await start_bot(tmp_path, model, slack, db=db_target)
    scheduler: Scheduler | None = None
    try:
        # it last ran two hours ago, then was paused
        add_schedules(db_of(bot), 1, cron=HOURLY, last_run_at=time.time() - 7200)
        schedules = bot.runtime.stores.schedules
        assert await schedules.set_paused("s-b00000", True)
        scheduler = await start_scheduler(bot, trigger_factory=real_cron, poll=0.2)
        await asyncio.sleep(0.5)  # the timer looks 5 times a second: nothing is due
        # resumed through the store alone, as `ducklm console` beside the bot does
        assert await schedules.set_paused("s-b00000", False)
        hour = float((int(time.time()) // 3600 + 1) * 3600)
        await wait_until(
            lambda: _next_fire_is(bot, hour), within=10, what="the resumed schedule planned"
        )
        await asyncio.sleep(0.5)
        assert roots(slack) == []  # no catch-up for what it skipped while paused
    finally:
        if scheduler is not None:
            await scheduler.stop()
        await stop_bot(bot)


async def _next_fire_is(bot: Bot, expected: float) -> bool:
    return await scalar(bot, "SELECT next_fire_at FROM schedules") == expected


async def test_a_row_with_bad_times_does_not_hold_up_the_others(
    tmp_path: Path, model: FakeModelServer, slack: FakeSlack, db_target: str
) -> None:
    bot = await start_bot(tmp_path, model, slack, db=db_target)
    scheduler: Scheduler | None = None
    try:
        soon = time.time() + 0.5
        add_waiting_approvals(db_of(bot), 2, expires_at=lambda i: soon, due_at=lambda i: 0.0)
        add_schedules(db_of(bot), 2, cron=HOURLY, last_run_at=None)
        # hand edits: an expiry that is no number, a cron that is no cron. Only SQLite
        # can hold the first: PostgreSQL's DOUBLE PRECISION column refuses a text time.
        typed = bot.runtime.stores.db.dialect == "postgres"
        bad_approval = await scalar(bot, "SELECT approval_id FROM approvals ORDER BY rowid")
        if not typed:
            await bot.runtime.stores.db.execute(
                "UPDATE approvals SET expires_at = 'tomorrow' WHERE approval_id = ? RETURNING 1",
                (bad_approval,),
            )
        await bot.runtime.stores.db.execute(
            "UPDATE schedules SET cron = '61 * * * *' WHERE schedule_id = 's-b00000' RETURNING 1"
        )
        scheduler = await start_scheduler(bot, trigger_factory=real_cron)
        await wait_until(
            lambda: _pending_is(bot, 0 if typed else 1), within=20, what="the good approval expired"
        )
        if not typed:  # left as it was (undecided), only its timer is off
            row = await bot.runtime.stores.db.fetchone(
                "SELECT decision, due_at, expires_at FROM approvals WHERE approval_id = ?",
                (bad_approval,),
            )
            assert row is not None and tuple(row) == (None, None, "tomorrow")
        await wait_until(lambda: _unplanned(bot, 0), within=20, what="both schedules planned")
        assert (
            await scalar(bot, "SELECT next_fire_at FROM schedules WHERE schedule_id = 's-b00000'")
            is None
        )
        assert await scalar(
            bot, "SELECT next_fire_at FROM schedules WHERE schedule_id = 's-b00001'"
        ) == float((int(time.time()) // 3600 + 1) * 3600)
    finally:
        if scheduler is not None:
            await scheduler.stop()
        await stop_bot(bot)


async def _pending_is(bot: Bot, expected: int) -> bool:
    return await bot.runtime.approvals.count_pending() == expected
