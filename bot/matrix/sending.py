"""Sending to Matrix: events with retries, thread relations, typing notices.

A send is retried through network faults and 5xx answers for up to
SEND_RETRY_SECONDS, with one transaction id for every attempt, so the
homeserver drops a repeat that had already arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import aiohttp
from nio import ErrorResponse, RoomSendResponse
from nio.exceptions import SendRetryError

from bot.backend import Thread
from bot.matrix.connection import MatrixConnection
from bot.matrix.retry import backoff, count_error, error_text, is_transient

if TYPE_CHECKING:
    from runtime.metrics import Metrics

logger = logging.getLogger("ducklm.matrix")

SEND_RETRY_SECONDS = 120.0  # how long an answer is retried while the homeserver is away
TYPING_MS = 30_000
TYPING_REFRESH = 20.0


class MatrixSendError(RuntimeError):
    """The homeserver refused an event (not a network fault)."""


class Lru(OrderedDict[str, Any]):
    """A small bounded map (thread -> newest event, reply target -> thread root)."""

    def __init__(self, size: int = 1024) -> None:
        super().__init__()
        self.size = size

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class MatrixSender:
    def __init__(self, connection: MatrixConnection) -> None:
        self.connection = connection
        self.latest = Lru()  # thread key -> newest event in it (reply fallback)
        self._typing: dict[str, set[str]] = {}  # room -> thread keys working there
        self._typing_keepers: dict[str, asyncio.Task[None]] = {}
        self.metrics: Metrics | None = None  # failed sends counted (bot/matrix/retry.py)

    def clear(self) -> None:
        """Forget the typing state (at stop; the keepers were cancelled with the jobs)."""
        self._typing.clear()
        self._typing_keepers.clear()

    async def post(self, thread: Thread, content: dict[str, Any]) -> str:
        """A message in the thread (m.thread + reply fallback), or at the top level."""
        if thread.root:
            content["m.relates_to"] = {
                "rel_type": "m.thread",
                "event_id": thread.root,
                # Clients without threads show it as a reply to the newest message.
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": self.latest.get(thread.key, thread.root)},
            }
        event_id = await self.send_event(thread.channel, "m.room.message", content)
        if thread.root:
            self.latest.put(thread.key, event_id)
        return event_id

    async def send_event(self, room_id: str, kind: str, content: dict[str, Any]) -> str:
        """Send, retrying network faults and 5xx with backoff. One transaction id
        for every attempt, so the homeserver drops a repeat that had arrived."""
        if not self.connection.running:
            raise RuntimeError("the Matrix platform is stopped")
        tx_id = str(uuid.uuid4())
        deadline = time.monotonic() + SEND_RETRY_SECONDS
        failures = 0
        while True:
            client = self.connection.require_client()
            try:
                if kind != "m.reaction":
                    # DUCKLM_MATRIX_TRUST=cross-signed: judge new devices first.
                    await self.connection.trust.before_send(client, room_id)
                # In an encrypted room nio encrypts (m.reaction stays clear, as in
                # Element). Trust on first use: every device the homeserver lists
                # for the room's members gets the room key (docs/matrix.md, Trust).
                response: Any = await client.room_send(
                    room_id, kind, content, tx_id=tx_id, ignore_unverified_devices=True
                )
            except (aiohttp.ClientError, OSError, TimeoutError, SendRetryError) as exc:
                # SendRetryError: the room key could not be shared yet (members or
                # keys not fetched); worth another try like a network fault.
                response = exc
            if isinstance(response, RoomSendResponse):
                return str(response.event_id)
            count_error(self.metrics, "room_send", response)
            if isinstance(response, ErrorResponse) and not is_transient(response):
                raise MatrixSendError(f"sending {kind} to {room_id}: {error_text(response)}")
            failures += 1
            delay = backoff(failures)
            if time.monotonic() + delay > deadline:
                raise MatrixSendError(f"sending {kind} to {room_id} gave up: {response}")
            logger.warning("matrix: send failed (%s); retrying in %.1f s", response, delay)
            await asyncio.sleep(delay)

    async def seed_reactions(self, room_id: str, card_id: str, keys: list[str]) -> None:
        """Pre-seeded reactions are one-click answers in most clients. They are a
        convenience (the card says how to answer by text), so failures only log."""
        for key in keys:
            relates = {"rel_type": "m.annotation", "event_id": card_id, "key": key}
            try:
                await self.send_event(room_id, "m.reaction", {"m.relates_to": relates})
            except Exception as exc:
                logger.warning("matrix: could not add %s to the card: %s", key, exc)

    async def typing(self, thread: Thread, status: str | None) -> None:
        """A typing notice while any task works in the room (refreshed, as typing
        notices expire); Matrix has no per-thread status line to show the tool."""
        if self.connection.client is None:
            return
        active = self._typing.setdefault(thread.channel, set())
        if status is not None:
            active.add(thread.key)
            keeper = self._typing_keepers.get(thread.channel)
            if keeper is None or keeper.done():
                self._typing_keepers[thread.channel] = self.connection.spawn(
                    self._keep_typing(thread.channel)
                )
            return
        active.discard(thread.key)
        if not active:
            keeper = self._typing_keepers.pop(thread.channel, None)
            if keeper is not None:
                keeper.cancel()
            await self._typing_notice(thread.channel, False)

    async def _keep_typing(self, room_id: str) -> None:
        while self._typing.get(room_id):
            await self._typing_notice(room_id, True)
            await asyncio.sleep(TYPING_REFRESH)

    async def _typing_notice(self, room_id: str, on: bool) -> None:
        client = self.connection.client
        if client is None:
            return
        try:
            await client.room_typing(room_id, on, timeout=TYPING_MS)
        except Exception as exc:  # cosmetic; never worth failing a task for
            logger.debug("matrix: typing notice failed: %s", exc)
