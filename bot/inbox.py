"""What a platform hands the service for one person's message (issue #15's inbox).

A platform turns a delivery into an `Inbound` and calls `ChatService.accept`
before it acknowledges the delivery (Slack: before the HTTP 200; Matrix: before
the sync token containing the event is saved). `accept` claims every delivery
key and records the message in one transaction, so an acknowledged message is
never lost: if the process dies afterwards, recovery finds the inbox row and
carries it out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bot.backend import Thread


@dataclass(frozen=True)
class Inbound:
    """One person's message as the platform received it."""

    thread: Thread  # where the answer goes
    user: str  # platform-qualified sender ("slack:U1", "matrix:@a:hs")
    text: str  # what the person typed, decoded, bot mention removed
    # Every delivery key to claim with it (Slack: "slack:event:<event_id>",
    # "slack:msg:<channel>:<ts>"; Matrix: "matrix:event:<event_id>").
    deliveries: tuple[str, ...]
    message_id: str | None = None  # the platform id of this message (Slack ts / Matrix event id)
    in_thread: bool = False  # a reply inside an existing thread (may be a decision word)
    from_bot: bool = False  # sent by another bot (admission bounds replies to bots)
    origin: str | None = None  # Slack: the sender's team id (user_team); Matrix: None
    # Arrived from a backlog (gap fill, pre-join invite backlog): the answer
    # says the bot was away.
    late: bool = False


class Accepted(enum.Enum):
    """What `ChatService.accept` did with an Inbound."""

    NEW = "new"  # recorded; the service processes it in the background
    DUPLICATE = "duplicate"  # a delivery key was already claimed; nothing recorded
    REFUSED = "refused"  # the sender may not ask: claim recorded, no task, user told privately
