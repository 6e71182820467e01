"""`MatrixPlatform`: the Matrix connection (`Platform`) and the service's output
for Matrix (`ChatBackend`), wired from the parts of this package:

    MatrixConnection ──room events──▶ MatrixEvents ──▶ ChatService
          ▲                                               │
          └────────────── MatrixSender ◀── send / card / tell / working

Approvals are cards with pre-seeded reactions ✅ ❌ ♾️; an approver's reaction,
or a thread reply `approve` / `deny [reason]` / `always`, decides once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.backend import ApprovalCard, CardResolution, ChatBackend, Platform, Thread
from bot.matrix.connection import MatrixConnection
from bot.matrix.events import MatrixEvents
from bot.matrix.format import (
    ALWAYS_KEY,
    APPROVE_KEY,
    DENY_KEY,
    MAX_EVENT_CONTENT_BYTES,
    addressed_content,
    card_markdown,
    message_content,
    resolution_markdown,
    with_mentions,
)
from bot.matrix.parsing import PLATFORM
from bot.matrix.sending import MatrixSender
from bot.matrix.state import MatrixState

if TYPE_CHECKING:
    from bot.service import ChatService
    from runtime.settings import Settings

MAX_MENTIONED_APPROVERS = 10


class MatrixPlatform(Platform, ChatBackend):
    """The Matrix connection (Platform) and its output side (ChatBackend)."""

    name = PLATFORM
    platform = PLATFORM
    empty_hint = "Hi! Ask me something after the mention, or send `!duck help` for the commands."

    def __init__(self, service: ChatService, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self.connection = MatrixConnection(
            settings,
            # Whoever may ask may invite (DUCKLM_REQUESTERS; by default the bot's
            # own homeserver), narrowed by DUCKLM_MATRIX_ALLOWED_INVITERS.
            may_invite=lambda user_id: service.policy.may_invite(f"{PLATFORM}:{user_id}"),
            serves_room=lambda room_id: service.policy.answers_in(PLATFORM, room_id),
            on_access_token=lambda token: service.loop.redactor.add_literal(
                token, "matrix-access-token"
            ),
            # The session, sync token and sync lease live in the database, shared
            # by every replica; this replica holds the lease as its replica id.
            stores=service.runtime.stores,
            holder=service.instance,
        )
        self.sender = MatrixSender(self.connection)
        self.sender.metrics = getattr(service.runtime, "metrics", None)
        self.events = MatrixEvents(service, self.connection, self.sender, self)
        service.add_backend(self)

    # The connection's facts, as the platform's (tests and logs read them here).

    @property
    def user_id(self) -> str:
        return self.connection.user_id

    @property
    def device_id(self) -> str | None:
        return self.connection.device_id

    @property
    def state(self) -> MatrixState:
        return self.connection.state

    # -- Platform ------------------------------------------------------------

    async def start(self) -> None:
        # Who may ask by default: users of the bot's own homeserver, known before
        # the first sync so the first invites are already judged by it.
        server = (self.settings.matrix_user_id or "").strip().partition(":")[2]
        if server:
            self.service.policy.set_home(PLATFORM, server)
        # Registered as a replica before the first message can make a task, so
        # the tasks this process runs are owned by it from the start (#19).
        await self.service.start()
        await self.connection.start(self.events)

    async def connection_problem(self) -> str | None:
        """For /readyz: a standby without the sync lease still sends, so it is fine."""
        connection = self.connection
        if connection.client is None or not connection.running:
            return "the Matrix connection is stopped"
        return None

    @property
    def syncing(self) -> bool:
        """This replica holds the Matrix sync lease (the others are standbys)."""
        return self.connection.syncing

    async def stop(self) -> None:
        await self.connection.stop()
        self.sender.clear()

    # -- ChatBackend ---------------------------------------------------------

    async def send(self, thread: Thread, text: str) -> str | None:
        await self.connection.check_can_send(thread.channel)
        content = message_content(text)
        content["m.mentions"] = {}  # an answer quoting user ids must not ping them
        try:
            return await self.sender.post(thread, content)
        finally:
            self.connection.crypto_changed()

    async def send_card(self, thread: Thread, card: ApprovalCard) -> str:
        await self.connection.check_can_send(thread.channel)
        # Approvers in the room are mentioned, so the card notifies them.
        # Room for the approvers' pills, which are added after the clipping.
        content = with_mentions(
            message_content(card_markdown(card), max_bytes=MAX_EVENT_CONTENT_BYTES - 8000),
            "Approvers",
            self._approvers_in(thread.channel),
        )
        try:
            card_id = await self.sender.post(thread, content)
        finally:
            self.connection.crypto_changed()
        # The service stores the card's id only after we return, but a quick
        # approver can react before that: remember it here at once.
        self.events.cards.put(card_id, card.approval_id)
        keys = [APPROVE_KEY, DENY_KEY] + ([ALWAYS_KEY] if card.always_offered else [])
        self.connection.spawn(self.sender.seed_reactions(thread.channel, card_id, keys))
        return card_id

    def _approvers_in(self, room_id: str) -> dict[str, str | None]:
        room = self.connection.require_client().rooms.get(room_id)
        if room is None:
            return {}
        approvers = {}
        # The room's own approvers (its section of the policy file, if any).
        for qualified in sorted(self.service.policy.for_channel(PLATFORM, room_id).approvers):
            user_id = qualified.removeprefix(f"{PLATFORM}:")
            if qualified.startswith(f"{PLATFORM}:") and user_id in room.users:
                approvers[user_id] = room.user_name(user_id)
        return dict(list(approvers.items())[:MAX_MENTIONED_APPROVERS])

    async def resolve_card(
        self, thread: Thread, card_ref: str, card: ApprovalCard, resolution: CardResolution
    ) -> None:
        await self.connection.check_can_send(thread.channel)
        # The edit carries the text twice (the fallback and m.new_content): half each.
        new = message_content(
            resolution_markdown(card, resolution), max_bytes=MAX_EVENT_CONTENT_BYTES // 2 - 500
        )
        await self._edit_card(thread, card_ref, new)

    async def update_card(self, thread: Thread, card_ref: str, card: ApprovalCard) -> None:
        """The open card shown anew with its quorum so far ("1 of 2: @alice"), as
        an edit: reactions stay on the original event, which people react to."""
        await self.connection.check_can_send(thread.channel)
        # Half each for the fallback and m.new_content, less room for the pills.
        new = with_mentions(
            message_content(card_markdown(card), max_bytes=MAX_EVENT_CONTENT_BYTES // 2 - 4500),
            "Approvers",
            self._approvers_in(thread.channel),
        )
        await self._edit_card(thread, card_ref, new)

    async def _edit_card(self, thread: Thread, card_ref: str, new: dict[str, Any]) -> None:
        """Replace the card's content by `new` (an m.replace edit, encrypted in an
        encrypted room by the sender). Nobody is pinged again: the card's first
        post notified the approvers."""
        new["m.mentions"] = {}
        content: dict[str, Any] = {
            **{k: v for k, v in new.items() if k != "m.mentions"},
            "body": "* " + new["body"],
            "m.new_content": new,
            # m.replace only: the card keeps its thread relation (the server keeps
            # the original m.relates_to); it must not go inside m.new_content.
            "m.relates_to": {"rel_type": "m.replace", "event_id": card_ref},
            "m.mentions": {},
        }
        if "formatted_body" in content:
            content["formatted_body"] = "* " + content["formatted_body"]
        try:
            await self.sender.send_event(thread.channel, "m.room.message", content)
        finally:
            self.connection.crypto_changed()

    def mention(self, user: str) -> str:
        # Text goes through Markdown, so the bare Matrix id is what readers see.
        return user.removeprefix("matrix:")

    async def tell(self, thread: Thread, user: str, text: str) -> None:
        """Matrix has no private replies in a room: answer in the thread, with a mention."""
        await self.connection.check_can_send(thread.channel)
        mxid = user.removeprefix(f"{PLATFORM}:")
        if not mxid.startswith("@"):
            await self.send(thread, text)
            return
        room = self.connection.require_client().rooms.get(thread.channel)
        name = room.user_name(mxid) if room is not None else None
        try:
            await self.sender.post(thread, addressed_content(mxid, text, name))
        finally:
            self.connection.crypto_changed()

    async def working(self, thread: Thread, status: str | None) -> None:
        await self.sender.typing(thread, status)

    async def history(self, thread: Thread, before: str | None) -> list[dict[str, str]]:
        return await self.events.history(thread, before)
