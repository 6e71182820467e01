"""Cron expressions of scheduled prompts: parsed into APScheduler triggers.

Its own module because two sides need it: `admin.py` checks an expression
when a schedule is added (and says when it runs next), `scheduler.py` plans
the runs. Both import it; it imports neither.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger


def cron_trigger(cron: str, timezone: str) -> CronTrigger:
    """A standard five-field cron expression in a time zone; ValueError if invalid."""
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(
            f"`{cron}` is not a five-field cron expression (minute hour day month weekday)"
        )
    try:
        zone = ZoneInfo(timezone)
    except Exception as exc:
        raise ValueError(f"unknown time zone `{timezone}`") from exc
    return CronTrigger.from_crontab(cron, timezone=zone)
