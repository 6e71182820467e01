"""Turning Matrix room events into service calls.

    !duck …                          -> service.handle_command
    a mention, a direct message, or  -> service.accept(Inbound)   (the inbox:
    a reply in one of the bot's         recorded before the sync token that
    threads (decision words too)        carries it is saved)
    ✅ ❌ ♾️ on an approval card       -> service.handle_decision
    an edit of a message answered    -> one hint that edits are not re-run

- The bot's own events come back through sync (M5) and are skipped; it sends
  `m.notice` and ignores incoming notices, so two bots never loop (M6). Other
  bots that send `m.text` (DUCKLM_MATRIX_BOT_USERS, or `m.automated` content,
  MSC3955) are marked `from_bot`; the service bounds its replies to them.
- In a bot thread, a message that mentions only other people (m.mentions or
  pills without the bot) is between those people, not for the bot.
- Only the three keys the card offers decide (compared without U+FE0F); any
  other reaction, 👍 included, is just a reaction.
- Every event the bot acts on is claimed once in the store
  (`matrix:event:<id>`), so a replayed batch never runs anything twice.
- Encrypted rooms: with encryption on (bot/matrix/crypto.py) nio decrypts in the
  sync and the decrypted event is handled like any other; a message whose room
  key has not arrived is tried again as keys come in (after asking for the key),
  and if it stays unreadable gets one notice in its thread. With encryption off,
  encrypted rooms get a notice saying the bot cannot read them.
- A room where no member may ask any more (DUCKLM_REQUESTERS) is left, saying why.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from nio import MatrixRoom, MegolmEvent, RoomGetEventResponse
from nio.api import RelationshipType
from nio.exceptions import EncryptionError

from bot import commands as c
from bot.backend import ChatBackend, Thread
from bot.inbox import Accepted, Inbound
from bot.matrix.connection import MatrixConnection, NotRecorded
from bot.matrix.crypto import DECRYPTED, event_source, sender_device
from bot.matrix.parsing import (
    PLATFORM,
    command_text,
    is_automated,
    mentioned_users,
    reaction_decision,
    strip_reply_fallback,
    user_in,
)
from bot.matrix.sending import Lru, MatrixSender

if TYPE_CHECKING:
    from bot.service import ChatService
    from runtime.store.models import Approval

logger = logging.getLogger("ducklm.matrix")

HISTORY_TIMEOUT = 10.0
MAX_HISTORY_EVENTS = 40
ENCRYPTED_NOTICE_INTERVAL = 600.0  # at most one "cannot read this" notice per room per 10 min
REFUSAL_INTERVAL = 3600.0  # a stranger's `!duck` is refused aloud at most this often
# How long a message whose room key is missing is tried again as keys arrive
# (senders' clients share keys within seconds; a key request takes a round trip).
UNDECRYPTABLE_WAIT = 60.0
# The audit record of an event the bot acted on in an encrypted room.
AUDIT_EVENT = "matrix_event_encryption"

ENCRYPTED_NOTICE = (
    "I can't read end-to-end encrypted messages, so I did not see what was said here. "
    "DuckLM works in unencrypted rooms only: ask me in a room (or direct chat) without "
    "encryption."
)
UNDECRYPTABLE_NOTICE = (
    "I could not decrypt this message: my device ({device}) did not get its key. If your "
    "client only sends keys to verified devices, allow unverified devices or verify mine, "
    "then send the message again."
)
EDIT_HINT = (
    "I saw your edit, but edits are not run again: I answered the message as it was first "
    "sent. Send a new message if you want me to look at the new text."
)
LEAVING_NOTICE = (
    "Nobody in this room may ask me anything any more (see DUCKLM_REQUESTERS), so I am "
    "leaving. Invite me again from an account that may ask."
)


class MatrixEvents:
    """The dispatcher's `RoomEvents`: reads each new event and calls the service;
    answers go out through `backend` (the platform)."""

    def __init__(
        self,
        service: ChatService,
        connection: MatrixConnection,
        sender: MatrixSender,
        backend: ChatBackend,
    ) -> None:
        self.service = service
        self.connection = connection
        self.sender = sender
        self.backend = backend
        self.bot_users = tuple(connection.settings.matrix_bot_users)
        self.cards = Lru()  # card event id -> approval id, as soon as it is posted
        self._reply_roots = Lru()  # replied-to event -> its thread root
        self._encrypted_notice_at: dict[str, float] = {}
        self._leaving: set[str] = set()
        self._refused_at = Lru()  # stranger -> when they were last told so
        self._undecryptable: set[str] = set()  # encrypted events waiting for their key

    async def on_room_event(
        self, room: MatrixRoom, source: dict[str, Any], *, late: bool = False
    ) -> None:
        if source.get("sender") == self.connection.user_id:
            return  # our own notices, reactions and edits come back through sync (M5)
        kind = source.get("type")
        if kind == "m.room.message":
            await self._on_message(room, source, late)
        elif kind == "m.reaction":
            await self._on_reaction(room, source)
        elif kind == "m.room.encrypted":
            if self.connection.encrypting:
                self._wait_for_key(room, source, late)
            else:
                await self._on_encrypted(room, source)
        elif kind == "m.room.encryption" and source.get("state_key") == "":
            await self.encrypted_room_notice(room, str(source.get("event_id") or ""))

    # -- messages --------------------------------------------------------------

    async def _on_message(self, room: MatrixRoom, source: dict[str, Any], late: bool) -> None:
        content = source.get("content") or {}
        if content.get("msgtype") != "m.text":
            return  # m.notice is other bots talking (M6); media is nothing we read
        relates = content.get("m.relates_to") or {}
        event_id = str(source.get("event_id") or "")
        sender = str(source.get("sender") or "")
        if not event_id or not sender:
            return
        if relates.get("rel_type") == "m.replace":
            await self._on_edit(room, sender, str(relates.get("event_id") or ""))
            return
        text = self._text_of(content)
        user = f"{PLATFORM}:{sender}"
        thread = await self._thread_of(room.room_id, event_id, relates)
        self.sender.latest.put(thread.key, event_id)

        command = command_text(text)
        if command is not None:
            if not await self._claim(event_id):
                return
            if self._may_command(room, user):
                reply = await self.service.handle_command(thread, user, command)
                if reply:
                    await self.backend.send(thread, reply)
            elif self._refusal_due(user):
                await self.backend.tell(thread, user, self.service.policy.refuse_ask_text(user))
            return

        in_thread = thread.root != event_id
        if not await self._addressed(room, content, thread, in_thread, text):
            return
        inbound = Inbound(
            thread=thread,
            user=user,
            text=self._without_mention(text),
            deliveries=(f"{PLATFORM}:event:{event_id}",),
            message_id=event_id,
            in_thread=in_thread,
            from_bot=self._from_bot(sender, content),
            late=late,
        )
        # Awaited here, inside the dispatcher: the sync token of this batch is
        # saved only after every message in it is in the store.
        try:
            outcome = await self.service.accept(inbound)
        except Exception as exc:
            raise NotRecorded(event_id) from exc
        if outcome is Accepted.DUPLICATE:
            logger.debug("matrix: %s was handled before", event_id)
            return
        await self._audit_encryption(room, source, thread)

    async def _audit_encryption(
        self, room: MatrixRoom, source: dict[str, Any], thread: Thread | None
    ) -> None:
        """In an encrypted room, the audit log says whether the event the bot acted
        on was encrypted, and by which of the sender's devices (reactions never
        are: Matrix sends them in the clear; the relation is what decides)."""
        if not room.encrypted:
            return
        info = source.get(DECRYPTED)
        sender = str(source.get("sender") or "")
        client = self.connection.client
        device = None
        if isinstance(info, dict) and client is not None:
            device = sender_device(client, sender, info.get("sender_key"))
        payload = {
            "event_id": source.get("event_id"),
            "event_type": source.get("type"),
            "room_id": room.room_id,
            "conversation": thread.key if thread is not None else None,
            "user": f"{PLATFORM}:{sender}",
            "encrypted": isinstance(info, dict),
            "device_id": device,
            "sender_key": info.get("sender_key") if isinstance(info, dict) else None,
        }
        try:
            await self.service.runtime.stores.events.append(None, AUDIT_EVENT, payload)
        except Exception:
            logger.exception("matrix: recording the encryption of %s failed", payload["event_id"])

    def _may_command(self, room: MatrixRoom, user: str) -> bool:
        """`!duck` keeps its own path (not the inbox), so who may ask is checked here."""
        policy = self.service.policy
        return policy.answers_in(PLATFORM, room.room_id) and policy.may_ask(user)

    def _refusal_due(self, user: str) -> bool:
        """Tell a stranger at most once an hour (a refusal per command would let
        anyone make the bot talk)."""
        if self.service.policy.may_ask(user):
            return False  # a room outside DUCKLM_CHANNELS: silence
        now = time.monotonic()
        last = self._refused_at.get(user)
        if last is not None and now - last < REFUSAL_INTERVAL:
            return False
        self._refused_at.put(user, now)
        return True

    @staticmethod
    def _text_of(content: dict[str, Any]) -> str:
        body = str(content.get("body") or "")
        if "m.in_reply_to" in (content.get("m.relates_to") or {}):
            body = strip_reply_fallback(body)
        return body.strip()

    async def _addressed(
        self,
        room: MatrixRoom,
        content: dict[str, Any],
        thread: Thread,
        in_thread: bool,
        text: str,
    ) -> bool:
        """Is this message for the bot: a mention, a direct chat, or a reply in one
        of its threads that is not addressed to other people only?"""
        if self._mentions_me(content) or self._is_direct(room):
            return True
        if not in_thread or not await self.service.is_bot_thread(thread):
            return False
        # `approve` quoting the requester's message mentions them (a rich reply
        # does): a decision word in a bot thread is still for the bot.
        return c.parse_decision(text) is not None or not self._mentions_only_others(content)

    def _mentions_only_others(self, content: dict[str, Any]) -> bool:
        others = mentioned_users(content) - {self.connection.user_id}
        return bool(others) and not self._mentions_me(content)

    def _from_bot(self, sender: str, content: dict[str, Any]) -> bool:
        """Another bot's m.text: a configured bot account, or marked automated."""
        return user_in(sender, self.bot_users) or is_automated(content)

    async def _on_edit(self, room: MatrixRoom, sender: str, original_id: str) -> None:
        """An edit of a message the bot answered gets one hint (per message) that
        edits are not run again; edits of anything else are nobody's business."""
        if not original_id:
            return
        client = self.connection.require_client()
        response = await client.room_get_event(room.room_id, original_id)
        if not isinstance(response, RoomGetEventResponse):
            return
        original = self._readable(response.event, room.room_id)
        content = original.get("content") or {}
        if original.get("sender") != sender or content.get("msgtype") != "m.text":
            return
        text = self._text_of(content)
        if command_text(text) is not None:
            return
        relates = content.get("m.relates_to") or {}
        thread = await self._thread_of(room.room_id, original_id, relates)
        in_thread = thread.root != original_id
        if not await self._addressed(room, content, thread, in_thread, text):
            return
        policy = self.service.policy
        if not policy.answers_in(PLATFORM, room.room_id) or not policy.may_ask(
            f"{PLATFORM}:{sender}"
        ):
            return
        if await self.service.runtime.stores.deliveries.claim(f"{PLATFORM}:edit:{original_id}"):
            await self.backend.send(thread, EDIT_HINT)

    # -- history (ChatBackend.history) ---------------------------------------------

    async def history(self, thread: Thread, before: str | None) -> list[dict[str, str]]:
        """The thread so far as model turns, for a task started from an Inbound;
        a help, not a condition, so a failure only logs."""
        if not thread.root:
            return []
        try:
            return await asyncio.wait_for(
                self._thread_history(thread.channel, thread.root, before), HISTORY_TIMEOUT
            )
        except Exception as exc:
            logger.warning("matrix: reading thread history failed: %s", exc)
            return []

    async def _thread_of(self, room_id: str, event_id: str, relates: dict[str, Any]) -> Thread:
        """`Thread(matrix, room, root)`: the thread root if the message is in a
        thread, else the message itself (its answer starts a thread under it)."""
        if relates.get("rel_type") == "m.thread" and relates.get("event_id"):
            return Thread(PLATFORM, room_id, str(relates["event_id"]))
        target = (relates.get("m.in_reply_to") or {}).get("event_id")
        if target:
            # A plain reply, from a client without threads: it belongs to the
            # thread of what it answers (e.g. `approve` in reply to a card).
            root = await self._root_of(room_id, str(target))
            if root is not None:
                return Thread(PLATFORM, room_id, root)
        return Thread(PLATFORM, room_id, event_id)

    async def _root_of(self, room_id: str, event_id: str) -> str | None:
        if event_id in self._reply_roots:
            return self._reply_roots[event_id]  # type: ignore[no-any-return]
        root: str | None = None
        response = await self.connection.require_client().room_get_event(room_id, event_id)
        if isinstance(response, RoomGetEventResponse):
            # The relation of an encrypted event is in the clear on its wrapper.
            relates = (response.event.source.get("content") or {}).get("m.relates_to") or {}
            if relates.get("rel_type") == "m.thread" and relates.get("event_id"):
                root = str(relates["event_id"])
            elif await self.service.is_bot_thread(Thread(PLATFORM, room_id, event_id)):
                root = event_id
        self._reply_roots.put(event_id, root)
        return root

    async def _thread_history(
        self, room_id: str, root: str, before: str | None
    ) -> list[dict[str, str]]:
        """The thread's messages before `before` as model turns (the bot's are
        `assistant`): the root and the newest MAX_HISTORY_EVENTS replies."""
        client = self.connection.require_client()
        sources: list[dict[str, Any]] = []
        first = await client.room_get_event(room_id, root)
        if isinstance(first, RoomGetEventResponse):
            sources.append(self._readable(first.event, room_id))
        room = client.rooms.get(room_id)
        # In an encrypted room the replies are m.room.encrypted (decrypted here).
        kind = "m.room.encrypted" if room is not None and room.encrypted else "m.room.message"
        # /relations pages newest first, so the budget keeps the newest replies.
        async for event in client.room_get_event_relations(
            room_id, root, RelationshipType.thread, kind, limit=MAX_HISTORY_EVENTS
        ):
            sources.append(self._readable(event, room_id))
            if len(sources) > MAX_HISTORY_EVENTS:
                break
        sources.sort(key=lambda s: int(s.get("origin_server_ts") or 0))
        ids = [str(s.get("event_id") or "") for s in sources]
        if before is not None and before in ids:
            sources = sources[: ids.index(before)]
        history = []
        for source in sources:
            content = source.get("content") or {}
            if source.get("event_id") == before or source.get("type") != "m.room.message":
                continue
            if (content.get("m.relates_to") or {}).get("rel_type") == "m.replace":
                continue
            body = strip_reply_fallback(str(content.get("body") or "")).strip()
            if not body:
                continue
            if source.get("sender") == self.connection.user_id:
                history.append({"role": "assistant", "content": body})
            else:
                history.append({"role": "user", "content": self._without_mention(body)})
        return history

    def _readable(self, event: Any, room_id: str) -> dict[str, Any]:
        """A fetched event's source, decrypted when it is encrypted and the bot has
        its room key (else as it is: an m.room.encrypted the readers skip)."""
        client = self.connection.client
        if isinstance(event, MegolmEvent) and client is not None and client.olm is not None:
            event.room_id = event.room_id or room_id
            try:
                return event_source(client.decrypt_event(event))
            except EncryptionError:
                pass
        return dict(getattr(event, "source", None) or {})

    def _mentions_me(self, content: dict[str, Any]) -> bool:
        me = self.connection.user_id
        mentions = content.get("m.mentions")
        if isinstance(mentions, dict) and me in (mentions.get("user_ids") or []):
            return True
        formatted = str(content.get("formatted_body") or "")
        if f"matrix.to/#/{me}" in formatted or (f"matrix.to/#/%40{me[1:]}" in formatted):
            return True  # a pill
        body = str(content.get("body") or "")
        if me.lower() in body.lower():
            return True
        return self._name_prefix().match(body) is not None

    def _name_prefix(self) -> re.Pattern[str]:
        """`Duck: …`, `@duck, …` at the start, as people type a name without a pill."""
        names = {self.connection.user_id.partition(":")[0].lstrip("@")}
        if self.connection.display_name:
            names.add(self.connection.display_name)
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True) if n)
        return re.compile(rf"^\s*@?(?:{alternatives})(?![\w-])[:,]?\s*", re.IGNORECASE)

    def _without_mention(self, text: str) -> str:
        text = re.sub(re.escape(self.connection.user_id) + r"[:,]?", "", text, flags=re.IGNORECASE)
        return self._name_prefix().sub("", text, count=1).strip()

    def _is_direct(self, room: MatrixRoom) -> bool:
        return room.member_count <= 2

    # -- reactions ---------------------------------------------------------------

    async def _on_reaction(self, room: MatrixRoom, source: dict[str, Any]) -> None:
        relates = (source.get("content") or {}).get("m.relates_to") or {}
        if relates.get("rel_type") != "m.annotation" or not relates.get("event_id"):
            return
        decision = reaction_decision(str(relates.get("key") or ""))
        if decision is None:
            return
        approval = await self._approval_for_card(str(relates["event_id"]))
        if approval is None:
            return  # a reaction to anything but an approval card is just a reaction
        if not await self._claim(str(source.get("event_id") or "")):
            return
        user = f"{PLATFORM}:{source.get('sender')}"
        await self._audit_encryption(room, source, await self._thread_of_task(approval.task_id))
        refusal = await self.service.handle_decision(
            # The card reacted to: a card an edit replaced decides nothing (#20).
            approval.approval_id,
            user,
            decision,
            card_ref=str(relates["event_id"]),
        )
        if refusal:
            thread = await self._thread_of_task(approval.task_id) or Thread(
                PLATFORM, room.room_id, None
            )
            await self.backend.tell(thread, user, refusal)

    async def _approval_for_card(self, card_ref: str) -> Approval | None:
        approval_id = self.cards.get(card_ref)
        if approval_id is not None:
            return await self.service.approvals.get(approval_id)
        return await self.service.approvals.find_by_card_ref(card_ref)

    async def _thread_of_task(self, task_id: str) -> Thread | None:
        thread = await self.service.thread_of(task_id)
        return thread if thread is not None and thread.platform == PLATFORM else None

    # -- encrypted rooms ---------------------------------------------------------

    async def _on_encrypted(self, room: MatrixRoom, source: dict[str, Any]) -> None:
        """Answer an unreadable message — at most once per room per interval, as the
        bot cannot tell whether it was even addressed."""
        event_id = str(source.get("event_id") or "")
        if not self._encrypted_notice_due(room.room_id) or not await self._claim(event_id):
            return
        await self._unreadable_notice(room, source, ENCRYPTED_NOTICE)

    def _wait_for_key(self, room: MatrixRoom, source: dict[str, Any], late: bool) -> None:
        """An encrypted message nio could not decrypt in the sync (its room key
        has not arrived): try again in the background, not holding up the room."""
        event_id = str(source.get("event_id") or "")
        if not event_id or event_id in self._undecryptable:
            return
        self._undecryptable.add(event_id)
        self.connection.spawn(self._retry_decrypt(room, source, late))

    async def _retry_decrypt(self, room: MatrixRoom, source: dict[str, Any], late: bool) -> None:
        event_id = str(source.get("event_id") or "")
        try:
            event = MegolmEvent.from_dict(source)
            if not isinstance(event, MegolmEvent):
                return  # not Megolm (an unknown algorithm): nothing to wait for
            event.room_id = room.room_id
            client = self.connection.require_client()
            try:
                # An m.room_key_request (the spec's way) to the bot's own devices, as
                # nio sends it; a sender's client that shares late (or re-shares on
                # its own) is what usually brings the key.
                await client.request_room_key(event)
            except Exception as exc:
                logger.debug("matrix: key request for %s failed: %s", event_id, exc)
            deadline = time.monotonic() + UNDECRYPTABLE_WAIT
            while (left := deadline - time.monotonic()) > 0:
                await self.connection.next_sync(left)
                try:
                    decrypted = client.decrypt_event(event)
                except EncryptionError:
                    continue
                logger.info("matrix: decrypted %s after its key arrived", event_id)
                await self.on_room_event(room, event_source(decrypted), late=late)
                return
            logger.warning("matrix: no room key for %s from %s", event_id, source.get("sender"))
            # Once per message, and not more than once per room per interval: a
            # room full of messages without keys must not become a room of notices.
            if self._encrypted_notice_due(room.room_id) and await self._claim(
                f"undecryptable:{event_id}"
            ):
                notice = UNDECRYPTABLE_NOTICE.format(device=self.connection.device_id)
                await self._unreadable_notice(room, source, notice)
        except Exception:
            logger.exception("matrix: handling undecryptable event %s failed", event_id)
        finally:
            self._undecryptable.discard(event_id)

    async def encrypted_room_notice(self, room: MatrixRoom, cause_event_id: str) -> None:
        """Say so at once when the bot joins an encrypted room or encryption is
        switched on (once per cause, even across restarts) — unless it can read it."""
        if self.connection.encrypting:
            return
        if await self._claim(cause_event_id):
            await self.backend.send(Thread(PLATFORM, room.room_id, None), ENCRYPTED_NOTICE)

    async def _unreadable_notice(self, room: MatrixRoom, source: dict[str, Any], text: str) -> None:
        """Say `text` in the unreadable message's thread (its relation is in the
        clear) and start the room's notice interval."""
        relates = (source.get("content") or {}).get("m.relates_to") or {}
        root = str(source.get("event_id") or "")
        if relates.get("rel_type") == "m.thread" and relates.get("event_id"):
            root = str(relates["event_id"])
        self._encrypted_notice_at[room.room_id] = time.monotonic()
        await self.backend.send(Thread(PLATFORM, room.room_id, root), text)

    def _encrypted_notice_due(self, room_id: str) -> bool:
        last = self._encrypted_notice_at.get(room_id)
        return last is None or time.monotonic() - last >= ENCRYPTED_NOTICE_INTERVAL

    # -- who is in the room --------------------------------------------------------

    async def after_batch(self, room: MatrixRoom, members_changed: bool) -> None:
        """Leave a room where no member may ask any more (DUCKLM_REQUESTERS),
        saying why: the requesters left, or the setting changed."""
        if not members_changed or room.room_id in self._leaving:
            return
        me = self.connection.user_id
        members = [u for u in room.users if u != me and u not in room.invited_users]
        policy = self.service.policy
        if any(policy.may_ask(f"{PLATFORM}:{user}") for user in members):
            return
        self._leaving.add(room.room_id)
        logger.warning("matrix: leaving %s: no member may ask any more", room.room_id)
        self.connection.spawn(self._leave(room.room_id))

    async def _leave(self, room_id: str) -> None:
        try:
            await self.backend.send(Thread(PLATFORM, room_id, None), LEAVING_NOTICE)
        except Exception as exc:  # leaving matters more than saying so
            logger.warning("matrix: could not say why I leave %s: %s", room_id, exc)
        try:
            await self.connection.require_client().room_leave(room_id)
        finally:
            self._leaving.discard(room_id)

    # -- once only ---------------------------------------------------------------

    async def _claim(self, event_id: str) -> bool:
        """True the first time the bot acts on this event, across restarts."""
        if not event_id:
            return False
        return await self.service.runtime.stores.deliveries.claim(f"{PLATFORM}:event:{event_id}")
