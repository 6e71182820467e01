"""Catching up on what a sync did not carry: gaps and the time before a join.

A sync gives at most a few events per room (Synapse: 10) and marks the
timeline `limited` when there were more; the rest is only reachable with
`/messages`, backwards from the timeline's `prev_batch`. The bot fetches it:

- a **gap** in a room it was already in (it was down, or a burst came between
  two syncs): back to the previous sync's token (`to`), or to the last event it
  handled there (the marker in sync.json), whichever comes first;
- the time **between its invite and its join** (Element's "start a DM" sends
  the first message before the bot has joined): back to its own invite, as
  everything before the invite was said before the bot was asked in.

Both are bounded (DUCKLM_MATRIX_BACKLOG_MAX events per room, none older than
DUCKLM_MATRIX_BACKLOG_MAX_AGE seconds), so a bot that was down for a week does
not answer a week of chatter: the newest part within the bound is handled in
order (the dispatcher then answers only what is addressed to it, and says the
answer is late), the rest is skipped and logged. Each event is still claimed
once, so a fetched event that was handled before does nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import aiohttp
from nio import AsyncClient, RoomMessagesResponse
from nio.api import MessageDirection

from bot.matrix.crypto import event_source
from bot.matrix.retry import error_text

logger = logging.getLogger("ducklm.matrix")

PAGE_SIZE = 50
# A backlog answer is "late" (the service says the bot was away) when the event
# is older than this, or older than the bot's start.
LATE_AFTER_SECONDS = 60.0


class BacklogError(Exception):
    """The homeserver did not give the missed events (the caller decides whether
    to try the whole batch again or go on without them)."""


@dataclass(frozen=True)
class BacklogBounds:
    max_events: int  # per room and gap; 0 fetches nothing
    max_age: float  # seconds; 0 fetches nothing

    def cutoff_ms(self, now_ms: int) -> int:
        return now_ms - int(self.max_age * 1000)


def now_ms() -> int:
    return int(time.time() * 1000)


def timestamp(source: dict[str, Any]) -> int:
    try:
        return int(source.get("origin_server_ts") or 0)
    except (TypeError, ValueError):
        return 0


def is_own_membership(source: dict[str, Any], user_id: str, membership: str) -> bool:
    return (
        source.get("type") == "m.room.member"
        and source.get("state_key") == user_id
        and (source.get("content") or {}).get("membership") == membership
    )


def is_late(source: dict[str, Any], started_ms: int, now: int | None = None) -> bool:
    """Was this event sent while the bot was away (before it started, or long ago)?"""
    sent = timestamp(source)
    current = now_ms() if now is None else now
    return sent < started_ms or current - sent > LATE_AFTER_SECONDS * 1000


async def fetch_backlog(
    client: AsyncClient,
    room_id: str,
    prev_batch: str,
    *,
    user_id: str,
    bounds: BacklogBounds,
    until_token: str | None = None,
    stop_ids: Collection[str] = (),
    stop_at_join: bool = False,
) -> list[dict[str, Any]]:
    """The events before `prev_batch` (oldest first) down to the first stop:
    `until_token`, an event in `stop_ids`, the bot's own invite (or, with
    `stop_at_join`, its own join), the age bound or the count bound. The stop
    event itself is not returned. Raises BacklogError when the homeserver fails
    to answer (a partial gap handled as a whole would skip its older part)."""
    if bounds.max_events <= 0 or bounds.max_age <= 0 or not prev_batch:
        return []
    cutoff = bounds.cutoff_ms(now_ms())
    newest_first: list[dict[str, Any]] = []
    token: str | None = prev_batch
    reason = "the start of the room"
    while token:
        try:
            response: Any = await client.room_messages(
                room_id,
                start=token,
                end=until_token,
                direction=MessageDirection.back,
                limit=min(PAGE_SIZE, bounds.max_events - len(newest_first) + 1),
            )
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            response = exc
        if not isinstance(response, RoomMessagesResponse):
            raise BacklogError(
                f"fetching the missed events of {room_id} failed: {error_text(response)}"
            )
        stop = _take(newest_first, response.chunk, user_id, bounds, cutoff, stop_ids, stop_at_join)
        if stop is not None:
            reason = stop
            break
        if not response.chunk or not response.end or response.end == token:
            reason = "the previous sync" if until_token else "the start of the room"
            break
        token = response.end
    logger.info(
        "matrix: %s: caught up on %d missed event(s), back to %s",
        room_id,
        len(newest_first),
        reason,
    )
    newest_first.reverse()
    return newest_first


def _take(
    into: list[dict[str, Any]],
    chunk: list[Any],
    user_id: str,
    bounds: BacklogBounds,
    cutoff: int,
    stop_ids: Collection[str],
    stop_at_join: bool,
) -> str | None:
    """Append one page (newest first); the reason to stop, or None to go on."""
    for event in chunk:
        source = event_source(event)  # decrypted (nio did) and marked so
        if source.get("event_id") in stop_ids:
            return "the last event handled"
        if is_own_membership(source, user_id, "invite"):
            return "the bot's invite"
        if stop_at_join and is_own_membership(source, user_id, "join"):
            return "the bot's join"
        if timestamp(source) < cutoff:
            logger.warning(
                "matrix: skipping missed events older than DUCKLM_MATRIX_BACKLOG_MAX_AGE=%.0f s",
                bounds.max_age,
            )
            return "the age bound"
        if len(into) >= bounds.max_events:
            logger.warning(
                "matrix: more than DUCKLM_MATRIX_BACKLOG_MAX=%d missed events; skipping the older",
                bounds.max_events,
            )
            return "the count bound"
        into.append(source)
    return None
