"""Timing for `ducklm run`: approval reminders and expiry, scheduled prompts,
retention. APScheduler's `AsyncIOScheduler` keeps the clock; what must survive a
restart lives in our own tables, and every job is rebuilt from them at start,
so APScheduler needs no job store of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bot.cron import cron_trigger
from bot.service import ChatService
from runtime.store.models import Approval, Event, Schedule
from runtime.store.retention import delete_finished_tasks

logger = logging.getLogger("ducklm.scheduler")

HOUSEKEEPING_EVERY = timedelta(days=1)
HOUSEKEEPING_FIRST_DELAY = timedelta(minutes=1)
# A fire time this far in the past at start is a run missed while we were down.
MISSED_SLACK = timedelta(seconds=30)

TriggerFactory = Callable[[Schedule], BaseTrigger]


def schedule_trigger(schedule: Schedule) -> BaseTrigger:
    return cron_trigger(schedule.cron, schedule.timezone)


class Scheduler:
    def __init__(
        self,
        service: ChatService,
        *,
        remind_after: float,
        timezone: str = "UTC",
        retention_days: float | None = None,
        trigger_factory: TriggerFactory = schedule_trigger,
    ) -> None:
        self.service = service
        self.stores = service.runtime.stores
        self.approvals = service.approvals
        self.remind_after = timedelta(seconds=remind_after)
        self.retention_days = retention_days
        self.trigger_factory = trigger_factory
        self._scheduler = AsyncIOScheduler(timezone=ZoneInfo(timezone))
        self._running: set[str] = set()  # schedule ids with a run in progress

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self._scheduler.start()
        for approval in await self.approvals.pending(limit=100_000):
            self.track_approval(approval)
        for schedule in await self.stores.schedules.list():
            self._plan(schedule, at_start=True)
        self._scheduler.add_job(
            self.housekeeping,
            IntervalTrigger(seconds=HOUSEKEEPING_EVERY.total_seconds()),
            id="housekeeping",
            next_run_time=datetime.now(UTC) + HOUSEKEEPING_FIRST_DELAY,
            replace_existing=True,
        )
        self.service.loop.add_listener(self._on_event)

    async def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def describe(self) -> list[str]:
        """One line per job, for the log at start."""
        lines = []
        for job in sorted(self._scheduler.get_jobs(), key=lambda j: j.id):
            when = job.next_run_time.isoformat() if job.next_run_time else "paused"
            lines.append(f"{job.id}: next {when}")
        return lines

    # -- approvals ------------------------------------------------------------

    def track_approval(self, approval: Approval) -> None:
        """Arm the reminder and the expiry of a pending approval."""
        if approval.decision is not None:
            return
        now = datetime.now(UTC)
        remind_at = approval.created_at + self.remind_after
        if approval.reminded_at is None and (
            approval.expires_at is None or remind_at < approval.expires_at
        ):
            self._at(
                max(remind_at, now),
                self.service.remind_approval,
                approval.approval_id,
                job_id=f"remind:{approval.approval_id}",
            )
        if approval.expires_at is not None:
            self._at(
                max(approval.expires_at, now),
                self.service.expire_approval,
                approval.approval_id,
                job_id=f"expire:{approval.approval_id}",
            )

    async def _on_event(self, event: Event) -> None:
        if event.event_type != "tool_approval_requested":
            return
        approval_id = event.payload.get("approval_id")
        if isinstance(approval_id, str):
            approval = await self.approvals.get(approval_id)
            if approval is not None:
                self.track_approval(approval)

    def _at(self, when: datetime, func: Callable, *args: object, job_id: str) -> None:
        self._scheduler.add_job(
            func,
            DateTrigger(run_date=when),
            args=list(args),
            id=job_id,
            replace_existing=True,
            # A job due while the loop was busy still runs, however late.
            misfire_grace_time=None,
        )

    # -- scheduled prompts ----------------------------------------------------

    async def schedule_changed(self, schedule_id: str) -> None:
        """Re-plan one schedule after `schedule add|pause|resume|remove`."""
        schedule = await self.stores.schedules.get(schedule_id)
        if schedule is None or schedule.paused:
            job = self._scheduler.get_job(f"schedule:{schedule_id}")
            if job is not None:
                job.remove()
            return
        self._plan(schedule, at_start=False)

    def _plan(self, schedule: Schedule, *, at_start: bool) -> None:
        if schedule.paused:
            return
        try:
            trigger = self.trigger_factory(schedule)
        except ValueError as exc:
            logger.error("schedule %s is invalid and will not run: %s", schedule.schedule_id, exc)
            return
        self._scheduler.add_job(
            self.fire,
            trigger,
            args=[schedule.schedule_id],
            id=f"schedule:{schedule.schedule_id}",
            replace_existing=True,
            # Several fire times missed while the loop was blocked become one run.
            coalesce=True,
            misfire_grace_time=60,
            # We refuse overlapping runs ourselves, so the thread can say so.
            max_instances=4,
        )
        if at_start and self._missed_a_run(schedule, trigger):
            self._at(
                datetime.now(UTC),
                self.fire,
                schedule.schedule_id,
                True,
                job_id=f"catch-up:{schedule.schedule_id}",
            )

    @staticmethod
    def _missed_a_run(schedule: Schedule, trigger: BaseTrigger) -> bool:
        since = schedule.last_run_at or schedule.created_at
        due = trigger.get_next_fire_time(None, since + timedelta(seconds=1))
        return due is not None and due < datetime.now(UTC) - MISSED_SLACK

    async def fire(self, schedule_id: str, catch_up: bool = False) -> None:
        """One run of a schedule (what its trigger calls)."""
        schedule = await self.stores.schedules.get(schedule_id)
        if schedule is None or schedule.paused:
            return
        if schedule_id in self._running:
            await self.service.schedule_skipped(schedule)
            return
        if not await self.stores.schedules.mark_run(schedule_id, datetime.now(UTC)):
            return
        self._running.add(schedule_id)
        try:
            await self.service.run_scheduled(schedule, catch_up=catch_up)
        except Exception:
            logger.exception("scheduled run of %s failed", schedule_id)
        finally:
            self._running.discard(schedule_id)

    # -- housekeeping ---------------------------------------------------------

    async def housekeeping(self) -> None:
        """Once a day: retention, and forgetting old platform delivery ids and inbox rows."""
        try:
            if self.retention_days is not None:
                deleted = await delete_finished_tasks(self.stores.db, self.retention_days * 86400)
                if deleted:
                    logger.info("retention: deleted %d finished tasks", deleted)
            await self.stores.deliveries.prune()
            await self.stores.inbox.prune()  # done messages, kept as long as their deliveries
        except Exception:
            logger.exception("housekeeping failed")
