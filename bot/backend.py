"""The interface every chat platform implements, and the values that cross it.

A platform (Slack, Matrix, …) is one class implementing `ChatBackend`; the
platform-neutral flow lives in `bot/service.py`. Adding a platform means one
new file that turns its events into `ChatService` calls and implements the
output methods below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

# "|" appears in neither Slack ids nor Matrix room/event ids, while ":" does in
# Matrix ids, so it separates the channel from the thread root in a key.
_ROOT_SEPARATOR = "|"


@dataclass(frozen=True)
class Thread:
    """Where a conversation lives: a platform, a channel (room), and a thread root."""

    platform: str
    channel: str
    root: str | None = None  # Slack thread_ts / Matrix root event id; None = the channel itself

    @property
    def key(self) -> str:
        """The conversation key stored with tasks: `slack:C024BE91L|1700000000.000100`."""
        return f"{self.platform}:{self.channel}{_ROOT_SEPARATOR}{self.root or ''}"

    @property
    def channel_prefix(self) -> str:
        """Prefix of every conversation key in the same channel (for `tasks`)."""
        return f"{self.platform}:{self.channel}{_ROOT_SEPARATOR}"

    def in_thread(self, root: str) -> Thread:
        return Thread(self.platform, self.channel, root)

    @classmethod
    def parse(cls, key: str) -> Thread:
        platform, sep, rest = key.partition(":")
        channel, sep2, root = rest.rpartition(_ROOT_SEPARATOR)
        if not (platform and sep and sep2 and channel):
            raise ValueError(f"not a conversation key: {key!r}")
        return cls(platform, channel, root or None)


@dataclass(frozen=True)
class ApprovalCard:
    """Everything an approval message shows; platforms decide how it looks."""

    approval_id: str
    task_id: str
    tool: str
    command: str | None
    risk_level: str
    action_type: str
    reason: str  # why it needs approval
    model_reason: str | None  # why the agent wants it
    requested_by: str | None
    always_offered: bool  # never for critical actions
    always_rule: str | None  # e.g. "exactly `systemctl restart nginx`"
    expires_at: datetime | None
    # Quorum so far (issue #20), e.g. "1 of 2: @alice"; None: no quorum vote yet.
    votes: str | None = None

    @property
    def what(self) -> str:
        return self.command or self.tool


@dataclass(frozen=True)
class CardResolution:
    """How an approval ended, shown on the card in place of its buttons."""

    decision: str  # approve | deny | always | expired
    decided_by: str | None
    decided_at: datetime | None
    note: str | None = None


class ChatBackend(ABC):
    """Output side of one chat platform. Every method may raise on network errors;
    the service logs and carries on."""

    platform: ClassVar[str]

    @abstractmethod
    async def send(self, thread: Thread, text: str) -> str | None:
        """Post Markdown-ish text in the thread (or as a new root message when
        `thread.root` is None). Returns the posted message's id."""

    @abstractmethod
    async def send_card(self, thread: Thread, card: ApprovalCard) -> str:
        """Post an approval card with Approve / Deny / Always. Returns a reference
        that `resolve_card` can use later, even after a restart."""

    @abstractmethod
    async def resolve_card(
        self, thread: Thread, card_ref: str, card: ApprovalCard, resolution: CardResolution
    ) -> None:
        """Replace the card's buttons with the decision, who took it and when."""

    async def update_card(self, thread: Thread, card_ref: str, card: ApprovalCard) -> None:
        """Show a still-open card anew (its quorum so far, issue #20), buttons
        kept. Optional: a platform without it leaves the card as posted (the
        thread says how many approved either way)."""
        return None

    @abstractmethod
    async def tell(self, thread: Thread, user: str, text: str) -> None:
        """Answer one person privately where the platform can (Slack ephemeral),
        else in the thread, addressed to them."""

    @abstractmethod
    async def working(self, thread: Thread, status: str | None) -> None:
        """Show that the bot is on it (and what it runs); `None` clears it."""

    def mention(self, user: str) -> str:
        """How to mention a platform-qualified user id in text sent with `send`."""
        return user

    # The answer to a message with no words (a bare mention).
    empty_hint: ClassVar[str] = "Hi! Ask me something, or try `/duck help`."

    async def find_card(self, thread: Thread, approval_id: str) -> str | None:
        """The reference (as `send_card` returns it) of this approval's card if one is
        already in the thread, else None. Recovery asks before posting a card whose
        previous post was under way when its process died (it may have gone out
        unrecorded). The default knows nothing: recovery then posts again."""
        return None

    async def find_answer(self, thread: Thread, text: str) -> bool:
        """Whether the bot's message `text` (as given to `send`) is already the
        latest the bot said in the thread. Recovery asks before posting an answer
        whose previous post was under way when its process died. The default
        knows nothing: recovery then posts again."""
        return False

    async def history(self, thread: Thread, before: str | None) -> list[dict[str, str]]:
        """The thread's earlier messages (before the message `before`, a platform
        message id) as chat history, {"role": "user"|"assistant", "content": ...},
        the newest that fit the platform's budget, oldest first. For a task started
        from an `Inbound`; a platform without threads returns []."""
        return []


class PlatformStartError(Exception):
    """A platform could not start (wrong token, unreachable server); the message
    says which setting to check."""


class Platform(ABC):
    """A chat platform's connection: receives events and feeds the ChatService."""

    name: ClassVar[str]

    @abstractmethod
    async def start(self) -> None:
        """Connect and check credentials; raise PlatformStartError with a clear message."""

    @abstractmethod
    async def stop(self) -> None:
        """Disconnect; must be safe to call after a failed start."""

    async def connection_problem(self) -> str | None:
        """Why this platform cannot take events or send right now (a sentence for
        /readyz: "Socket Mode connection is down"), or None when it can. Asked
        only after a successful `start`; a platform that cannot tell is fine."""
        return None
