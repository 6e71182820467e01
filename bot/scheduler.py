"""Timing for `ducklm run`: approval reminders and expiry, scheduled prompts,
retention.

What is due lives in the store (issue #23): each pending approval has a
`due_at` (its reminder or its expiry, whichever comes first) and each schedule a
`next_fire_at`, both indexed. One timer per kind waits for the earliest of them
and is woken when something changes (a new approval, a schedule added or
resumed); at most every POLL_S seconds it looks again anyway, for changes made
by another process (every SHARED_POLL_S on PostgreSQL, where other replicas
create approvals and schedules this process is never woken for). So start-up
arms the same few timers whether nothing or a hundred thousand things are
pending, and nothing here walks every row. Escalations (issue #20) have their
own due time (`escalate_at`, planned from the approval's channel) on the
approvals timer.

Each fire is claimed in the store by compare-and-set on the old due time
before anything is done (`claim_due`, `claim_fire`): of two processes looking
at one row, one gets it. Runs of schedules missed while the bot was down are
caught up one at a time, at most `catch_up_rate` a minute (DUCKLM_CATCH_UP_RATE),
never as a burst. APScheduler only keeps the daily housekeeping job, which
every replica runs and one claims per day (shared_state, `daily`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bot.cron import cron_trigger
from bot.service import ChatService
from runtime.crashpoints import crash_point
from runtime.store.approvals import ApprovalStore, DueApproval
from runtime.store.models import Event, Schedule
from runtime.store.retention import delete_finished_tasks
from runtime.store.schedules import PLAN, RESUMED

__all__ = ["Scheduler", "cron_trigger", "schedule_trigger"]

logger = logging.getLogger("ducklm.scheduler")

HOUSEKEEPING_EVERY = timedelta(days=1)
HOUSEKEEPING_FIRST_DELAY = timedelta(minutes=1)
# A fire time this far in the past is a run missed (while we were down, or
# while the loop could not keep up): it runs as a catch-up, at the catch-up rate.
MISSED_SLACK = timedelta(seconds=30)
# The longest a timer sleeps without looking at the store again.
POLL_S = 30.0
# ... when the store is shared by replicas (PostgreSQL): an approval or a
# schedule another replica created is due at a time this process's timers were
# never woken for, so they re-read the earliest due time this often (a few
# index probes per round), and a due time is noticed within seconds.
SHARED_POLL_S = 2.0
# The daily housekeeping is claimed in shared_state, so of several replicas one
# runs it per day; the claim accepts a run this much before a full day passed
# (the interval job's timing jitters).
HOUSEKEEPING_KEY = "housekeeping:daily"
HOUSEKEEPING_SLACK = timedelta(minutes=10)
# Replica rows dead this long are forgotten by housekeeping.
REPLICA_KEEP_S = 7 * 86400.0
# Rows read per query; a full batch means the timer goes on at once.
BATCH = 200
# Statements run inline and do not yield: the loop gets a turn after this many
# rows (a row costs 0.2-1 ms: a cron computation and a claim), so a batch
# never holds it for more than a few milliseconds.
YIELD_EVERY = 5
# Reminders and expiries carried out at the same time (each posts to chat).
APPROVAL_ACTIONS_AT_ONCE = 8
# An escalation's claim is a lease: escalate_at moves this far ahead, and the
# escalation's own transaction clears it (mark_escalated, once). A process that
# dies or stops between the two leaves it due again after this, not lost; a slow
# escalation retried meanwhile is not repeated (mark_escalated is once).
ESCALATION_RETRY_S = 15.0
# Events that mean a new approval is waiting to be planned.
NEW_APPROVAL_EVENTS = frozenset({"tool_approval_requested", "approval_reissued"})
# A planned time is "after" the instant it is computed from, never equal to it.
_AFTER = timedelta(milliseconds=1)

TriggerFactory = Callable[[Schedule], BaseTrigger]


def schedule_trigger(schedule: Schedule) -> BaseTrigger:
    return _cron(schedule.cron, schedule.timezone)


@functools.lru_cache(maxsize=1024)
def _cron(cron: str, timezone: str) -> BaseTrigger:
    # A CronTrigger keeps no state between calls, and building one costs more
    # than asking it for a time: thousands of schedules share a few expressions.
    return cron_trigger(cron, timezone)


class _Timer:
    """One asyncio task that runs `round` whenever its wait ends: when the time
    `round` returned is reached, when `wake()` is called, or after POLL_S."""

    def __init__(
        self, name: str, round_: Callable[[], Awaitable[float | None]], poll: float
    ) -> None:
        self.name = name
        self._round = round_
        self._poll = poll
        self._wake = asyncio.Event()
        self.rounds = 0  # rounds finished (what a test waits on, never a fixed time)
        self._task = asyncio.create_task(self._run(), name=f"timer:{name}")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            # Cleared before the round reads the store: a change after this
            # point wakes the wait below instead of being missed.
            self._wake.clear()
            try:
                due_at = await self._round()
            except Exception:  # the store was busy or closing: look again later
                logger.exception("%s timer round failed", self.name)
                due_at = None
            self.rounds += 1
            wait = self._poll if due_at is None else min(max(due_at - time.time(), 0.0), self._poll)
            if wait == 0.0:
                await asyncio.sleep(0)  # more is due: go on, after giving the loop a turn
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)


class Scheduler:
    def __init__(
        self,
        service: ChatService,
        *,
        remind_after: float,
        timezone: str = "UTC",
        retention_days: float | None = None,
        trigger_factory: TriggerFactory = schedule_trigger,
        catch_up_rate: float | None = None,
        poll: float | None = None,
    ) -> None:
        self.service = service
        self.stores = service.runtime.stores
        self.remind_after = float(remind_after)
        self.retention_days = retention_days
        self.trigger_factory = trigger_factory
        if catch_up_rate is None:
            catch_up_rate = service.runtime.settings.catch_up_rate
        # Seconds between two catch-up runs.
        self.catch_up_every = 60.0 / catch_up_rate
        if poll is None:
            shared = getattr(self.stores.db, "dialect", "sqlite") == "postgres"
            poll = SHARED_POLL_S if shared else POLL_S
        self._poll = poll
        self._scheduler = AsyncIOScheduler(timezone=ZoneInfo(timezone))
        self._running: set[str] = set()  # schedule ids with a run in progress
        self._timers: dict[str, _Timer] = {}
        self._slots = asyncio.Semaphore(APPROVAL_ACTIONS_AT_ONCE)
        self._actions: set[asyncio.Task[None]] = set()
        self._runs: set[asyncio.Task[None]] = set()
        self._next_catch_up = 0.0  # time.time() from which the next catch-up may start
        self._heads: list[str] = []

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Arm one timer for approvals, one for schedules and the housekeeping job:
        the same three whatever is stored."""
        self._scheduler.start()
        self._scheduler.add_job(
            self.daily,
            IntervalTrigger(seconds=HOUSEKEEPING_EVERY.total_seconds()),
            id="housekeeping",
            next_run_time=datetime.now(UTC) + HOUSEKEEPING_FIRST_DELAY,
            replace_existing=True,
        )
        self._heads = await self._describe_heads()
        self._timers = {
            "approvals": _Timer("approvals", self._approvals_round, self._poll),
            "schedules": _Timer("schedules", self._schedules_round, self._poll),
        }
        self.service.loop.add_listener(self._on_event)

    async def stop(self) -> None:
        for timer in self._timers.values():
            await timer.stop()
        self._timers = {}
        if self._actions:  # reminders and expiries under way are short: let them end
            await asyncio.wait(set(self._actions), timeout=10)
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def describe(self) -> list[str]:
        """What is armed, for the log at start: the earliest approval timer and
        the earliest schedule (each one index probe at start), and housekeeping."""
        lines = list(self._heads)
        for job in self._scheduler.get_jobs():
            when = job.next_run_time.isoformat() if job.next_run_time else "paused"
            lines.append(f"{job.id}: next {when}")
        return lines

    async def _describe_heads(self) -> list[str]:
        lines = []
        due = await self.approvals_store.earliest_due()
        # (Re-read by time: the row may have been decided in between.)
        for approval in await self.approvals_store.due(due, limit=1) if due is not None else []:
            at = approval.due_at
            if at == 0:  # not planned yet: name what its plan will be
                at = self._safe_step(approval, 0)[1] or 0
            kind = (self._safe_step(approval, at)[0] if at else None) or "check"
            lines.append(f"{kind}:{approval.approval_id}: next {_when(at)} (earliest approval)")
        fire = await self.stores.schedules.earliest_fire()
        for schedule, at in (
            await self.stores.schedules.due(fire, fire, 1) if fire is not None else []
        ):
            lines.append(f"schedule:{schedule.schedule_id}: next {_when(at)} (earliest schedule)")
        return lines

    @property
    def approvals_store(self) -> ApprovalStore:
        return self.stores.approvals

    def _wake(self, name: str) -> None:
        timer = self._timers.get(name)
        if timer is not None:
            timer.wake()

    async def _on_event(self, event: Event) -> None:
        if event.event_type in NEW_APPROVAL_EVENTS:
            self._wake("approvals")

    # -- approvals ------------------------------------------------------------

    def _approval_step(self, approval: DueApproval, due: float) -> tuple[str | None, float | None]:
        """What a pending approval's `due_at` of `due` stands for, and its next
        `due_at`: plan it (0) -> remind -> expire -> nothing (None). Each step
        moves forward, so a claim always makes progress."""
        expires = approval.expires_at
        remind = approval.created_at + self.remind_after
        wants_reminder = approval.reminded_at is None and (expires is None or remind < expires)
        if due == 0:
            first = remind if wants_reminder else expires
            return None, first
        if expires is not None and due >= expires:
            return "expire", None
        return ("remind" if approval.reminded_at is None else None), expires

    def _safe_step(self, approval: DueApproval, due: float) -> tuple[str | None, float | None]:
        try:
            return self._approval_step(approval, due)
        except TypeError:  # a hand-edited time that is no number
            logger.error("approval %s has unusable times; it gets no timer", approval)
            return None, None  # out of the queue, rather than at its head forever

    async def _approvals_round(self) -> float | None:
        now = time.time()
        batch = await self.approvals_store.due(now, BATCH)
        for n, approval in enumerate(batch, 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            due = approval.due_at
            step, next_due = self._safe_step(approval, due)
            await self._slots.acquire()  # bounded: the claim waits for a free slot
            try:
                claimed = await self.approvals_store.claim_due(approval.approval_id, due, next_due)
            except BaseException:
                self._slots.release()
                raise
            if not claimed or step is None:
                self._slots.release()
                continue
            action = (
                self.service.remind_approval if step == "remind" else self.service.expire_approval
            )
            self._spawn(self._approval_action(action, approval.approval_id), self._actions)
        # Escalations share this timer: the next wake is the earliest of
        # reminder, expiry and escalation.
        escalation = await self._escalations_round()
        if len(batch) == BATCH:
            return now  # more are due already
        earliest = await self.approvals_store.earliest_due()
        if escalation is None or earliest is None:
            return escalation if earliest is None else earliest
        return min(earliest, escalation)

    async def _approval_action(
        self, action: Callable[[str], Awaitable[None]], approval_id: str
    ) -> None:
        try:
            await action(approval_id)
        except Exception:  # one approval's failure must not stop the others
            logger.exception("timed work on approval %s failed", approval_id)
        finally:
            self._slots.release()

    # -- escalation (issue #20) ------------------------------------------------

    async def _escalations_round(self) -> float | None:
        """Escalations, timed from the store like reminders (approvals.escalate_at,
        its own index): a pending approval's 0 is planned from its channel's
        escalate_after (None: never), a time that has come is claimed by
        compare-and-set (one replica) and escalated once. A restart re-arms it."""
        approvals = self.service.approvals
        now = time.time()
        batch = await approvals.escalations_due(now, BATCH)
        for n, due in enumerate(batch, 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if due.escalate_at == 0:
                after = None
                if self.service.policy.any_escalation:  # else no channel escalates
                    where = await self.service.policy_of_task(due.task_id)
                    after = where.escalate_after if where.escalate_to else None
                at = None if after is None else due.created_at + after
                await approvals.claim_escalation(due.approval_id, 0, at)
                continue
            # The slot first: a claim never waits for one (a stop meanwhile would
            # leave it claimed with nobody to do it), and the claim is a lease.
            await self._slots.acquire()
            if not await approvals.claim_escalation(
                due.approval_id, due.escalate_at, time.time() + ESCALATION_RETRY_S
            ):
                self._slots.release()
                continue
            crash_point("escalation_claimed")  # test seam: claimed, not escalated yet
            self._spawn(
                self._approval_action(self.service.escalate_approval, due.approval_id),
                self._actions,
            )
        if len(batch) == BATCH:
            return now
        return await approvals.earliest_escalation()

    # -- scheduled prompts ----------------------------------------------------

    async def schedule_changed(self, schedule_id: str) -> None:
        """Re-plan one schedule after `schedule add|pause|resume|remove`: from now,
        so a resumed schedule does not catch up the runs it skipped on purpose."""
        schedule = await self.stores.schedules.get(schedule_id)
        if schedule is not None and not schedule.paused:
            await self.stores.schedules.set_next_fire(schedule_id, self._next_fire(schedule))
        self._wake("schedules")

    def _next_fire(self, schedule: Schedule, after: float | None = None) -> float | None:
        """The schedule's first fire time after `after` (default: now); None if it
        never fires again or its cron or time zone is invalid (logged)."""
        start = datetime.fromtimestamp(time.time() if after is None else after, UTC) + _AFTER
        try:
            when = self.trigger_factory(schedule).get_next_fire_time(None, start)
        except (ValueError, ArithmeticError) as exc:
            # Planned as "never" rather than left at the head of the queue.
            logger.error("schedule %s is invalid and will not run: %s", schedule.schedule_id, exc)
            return None
        return None if when is None else when.timestamp()

    async def _schedules_round(self) -> float | None:
        schedules = self.stores.schedules
        # 1. Plan the new ones (and those a restart or a hand edit sent back):
        #    the first fire after their last run, which may be long past.
        planning = await schedules.due(RESUMED, PLAN, BATCH)
        for n, (schedule, mark) in enumerate(planning, 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            since = schedule.last_run_at or schedule.created_at
            after = None if mark == RESUMED else since.timestamp()  # None: from now
            await schedules.claim_fire(
                schedule.schedule_id, mark, self._next_fire(schedule, after), ran_at=None
            )
        if len(planning) == BATCH:
            return time.time()
        now = time.time()
        slack = MISSED_SLACK.total_seconds()
        # 2. Runs due now, on time: all of them.
        on_time = await schedules.due(now - slack, now, BATCH)
        for n, (schedule, due) in enumerate(on_time, 1):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            await self._claim_run(schedule, due, now, catch_up=False)
        if len(on_time) == BATCH:
            return now
        # 3. Runs missed: one at a time, at the catch-up rate, oldest first.
        wake = await schedules.earliest_fire(after=now)
        missed = await schedules.due(1.0, now - slack, 1)  # 1.0: past the "plan me" 0
        if missed:
            if now >= self._next_catch_up:
                schedule, due = missed[0]
                if await self._claim_run(schedule, due, now, catch_up=True):
                    self._next_catch_up = now + self.catch_up_every
                return now  # perhaps more are missed: the next one waits for its turn
            wake = self._next_catch_up if wake is None else min(wake, self._next_catch_up)
        return wake

    async def _claim_run(
        self, schedule: Schedule, due: float, now: float, *, catch_up: bool
    ) -> bool:
        # The next fire after now: a catch-up stands for every run it missed.
        next_fire = self._next_fire(schedule, max(now, due))
        if not await self.stores.schedules.claim_fire(
            schedule.schedule_id, due, next_fire, ran_at=now
        ):
            return False  # another process took it, or it changed meanwhile
        self._spawn(self.fire(schedule.schedule_id, catch_up), self._runs)
        return True

    async def fire(self, schedule_id: str, catch_up: bool = False) -> None:
        """One run of a schedule whose fire time was claimed."""
        schedule = await self.stores.schedules.get(schedule_id)
        if schedule is None or schedule.paused:
            return
        if schedule_id in self._running:
            await self.service.schedule_skipped(schedule)
            return
        self._running.add(schedule_id)
        try:
            await self.service.run_scheduled(schedule, catch_up=catch_up)
        except Exception:
            logger.exception("scheduled run of %s failed", schedule_id)
        finally:
            self._running.discard(schedule_id)

    @staticmethod
    def _spawn(coro: Awaitable[None], into: set[asyncio.Task[None]]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        into.add(task)
        task.add_done_callback(into.discard)

    # -- housekeeping ---------------------------------------------------------

    async def daily(self) -> None:
        """The daily job of every replica: housekeeping, if this replica claims
        today's run (shared_state), so it runs once a day across all of them."""
        try:
            period = (HOUSEKEEPING_EVERY - HOUSEKEEPING_SLACK).total_seconds()
            claimed = await self.stores.state.claim_period(
                HOUSEKEEPING_KEY, period, self.service.instance
            )
        except Exception:
            logger.exception("housekeeping could not be claimed; trying again tomorrow")
            return
        if not claimed:
            logger.info("housekeeping: another replica ran it less than a day ago")
            return
        await self.housekeeping()

    async def housekeeping(self) -> None:
        """Retention, forgetting old platform delivery ids, inbox rows and dead
        replicas, and the rules review for the admins (now; `daily` claims it)."""
        try:
            await self.stores.replicas.prune(REPLICA_KEEP_S)
            if self.retention_days is not None:
                deleted = await delete_finished_tasks(self.stores.db, self.retention_days * 86400)
                if deleted:
                    logger.info("retention: deleted %d finished tasks", deleted)
            await self.stores.deliveries.prune()
            await self.stores.inbox.prune()  # done messages, kept as long as their deliveries
        except Exception:
            logger.exception("housekeeping failed")
        try:
            await self.post_rule_review()
        except Exception:
            logger.exception("the daily rules review failed")

    async def post_rule_review(self) -> None:
        """The daily `rules review` in DUCKLM_RULE_REVIEW_CHANNEL, when that is set and
        the review found something (idle rules, rules that allowed a failure or cover
        a denial)."""
        where = self.service.runtime.settings.rule_review_channel
        if not where:
            return
        review = await self.service.runner.review_for_admins()
        if review is not None:
            await self.service.post_to_channel(where, f"Daily rules review:\n{review}")


def _when(ts: float) -> str:
    if ts <= PLAN:
        return "now (to be planned)"
    return datetime.fromtimestamp(ts, UTC).isoformat()
