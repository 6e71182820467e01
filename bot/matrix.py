"""DuckLM in Matrix rooms, with matrix-nio (unencrypted rooms; no e2e in v1).

How it is wired (the pitfalls are numbered as in research/platforms.md §3):

    sync loop ──SyncResponse──▶ inbox ──▶ dispatcher ──▶ ChatService
    (own loop, backoff,           (queue)    (one batch at a time; then the
     never raises)                            sync token is written to disk)

- nio runs event callbacks inline in its sync loop and a raising callback ends
  `sync_forever` (M1), and a SyncError is returned, not raised, so it would spin
  (M2). So the bot runs its own loop around `client.sync()`, registers no nio
  callbacks, and only queues each response; the dispatcher handles the events.
- The sync token is saved by us after a batch was handled (M4), so a restart
  resumes with `since=token, full_state=True`: nothing is answered twice and
  nothing sent while the bot was down is missed. Every event the bot acts on is
  also claimed once in the store (`matrix:event:<id>`), so a replayed batch
  never runs anything twice.
- History is never answered (M3): the first sync of a start without a saved
  token is history as a whole (only invites in it are acted on), and in a room
  the bot just joined everything before its own join event is ignored. Both
  are structural, so a skewed clock cannot let old messages through.
- The bot's own events come back through sync (M5) and are skipped; it sends
  `m.notice` and ignores incoming notices, so two bots never loop (M6).
- Encrypted rooms get a notice saying the bot cannot read them (M7: no e2e).

Approvals are cards with pre-seeded reactions ✅ ❌ ♾️; an approver's reaction,
or a thread reply `approve` / `deny [reason]` / `always`, decides once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    ErrorResponse,
    JoinResponse,
    LoginResponse,
    MatrixRoom,
    ProfileGetDisplayNameResponse,
    RoomGetEventResponse,
    RoomSendResponse,
    SyncResponse,
    WhoamiResponse,
)
from nio.api import RelationshipType

from bot import commands as c
from bot.backend import (
    ApprovalCard,
    CardResolution,
    ChatBackend,
    Platform,
    PlatformStartError,
    Thread,
)
from bot.matrix_format import (
    ALWAYS_KEY,
    APPROVE_KEY,
    DENY_KEY,
    addressed_content,
    card_markdown,
    message_content,
    resolution_markdown,
    with_mentions,
)
from bot.matrix_state import MatrixState, Session

if TYPE_CHECKING:
    from bot.service import ChatService
    from runtime.settings import Settings
    from runtime.store.models import Approval

logger = logging.getLogger("ducklm.matrix")

PLATFORM = "matrix"
COMMAND_PREFIX = "!duck"
DEVICE_NAME = "DuckLM"

SYNC_TIMEOUT_MS = 30_000  # long-poll; the server answers at once when something happens
REQUEST_TIMEOUT = 45.0  # per request; a sync gets its long-poll time on top (nio adds it)
START_TIMEOUT = 60.0  # login + first sync, before `ducklm run` gives up with a message
SEND_RETRY_SECONDS = 120.0  # how long an answer is retried while the homeserver is away
MAX_BACKOFF = 60.0
TOKEN_ERROR_BACKOFF = 300.0
TYPING_MS = 30_000
TYPING_REFRESH = 20.0
HISTORY_TIMEOUT = 10.0
MAX_HISTORY_EVENTS = 40
ENCRYPTED_NOTICE_INTERVAL = 600.0  # at most one "cannot read this" notice per room per 10 min
STOP_TIMEOUT = 10.0
MAX_MENTIONED_APPROVERS = 10

ENCRYPTED_NOTICE = (
    "I can't read end-to-end encrypted messages, so I did not see what was said here. "
    "DuckLM works in unencrypted rooms only: ask me in a room (or direct chat) without "
    "encryption."
)
EMPTY_MENTION_REPLY = "Ask me something after the mention, or send `!duck help` for the commands."

REACTION_DECISIONS: dict[str, str] = {
    APPROVE_KEY: "approve",
    "✔": "approve",
    "☑": "approve",
    "👍": "approve",
    DENY_KEY: "deny",
    "✖": "deny",
    "❎": "deny",
    "👎": "deny",
    ALWAYS_KEY: "always",
}
_VARIATION_SELECTORS = re.compile("[\ufe0e\ufe0f]")


def normalize_reaction(key: str) -> str:
    """`♾` and `♾️` (with U+FE0F) are the same answer; clients differ in which they send."""
    return _VARIATION_SELECTORS.sub("", key or "").strip()


_DECISIONS_BY_KEY = {normalize_reaction(k): v for k, v in REACTION_DECISIONS.items()}


def backoff(failures: int, cap: float = MAX_BACKOFF) -> float:
    """0.5 s, 1 s, 2 s … up to `cap`, with jitter so restarts don't stampede."""
    delay = min(cap, 0.5 * 2 ** max(0, failures - 1))
    return delay * random.uniform(0.8, 1.2)


def strip_reply_fallback(body: str) -> str:
    """Drop the `> <@user> quoted text` lines old clients put before a reply."""
    lines = body.split("\n")
    if not lines or not lines[0].startswith(">"):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    return "\n".join(lines[i:]).lstrip("\n")


def command_text(body: str) -> str | None:
    """The text after `!duck` (case-insensitive), or None when it is no command."""
    stripped = body.strip()
    head = stripped[: len(COMMAND_PREFIX)]
    if head.lower() != COMMAND_PREFIX:
        return None
    rest = stripped[len(COMMAND_PREFIX) :]
    if rest and not rest[0].isspace():
        return None  # `!ducks` is not our command
    return rest.strip()


def user_matches(user_id: str | None, allowed: Iterable[str]) -> bool:
    """Is `user_id` listed, by full id (`@alice:example.org`) or by server
    (`example.org` or `:example.org`)? An empty list allows everybody."""
    entries = [entry.strip() for entry in allowed if entry.strip()]
    if not entries:
        return True
    if not user_id:
        return False
    server = user_id.partition(":")[2].lower()
    for entry in entries:
        entry = entry.removeprefix(f"{PLATFORM}:")
        if entry.startswith("@"):
            if entry == user_id:
                return True
        elif entry.lstrip(":").lower() == server:
            return True
    return False


class MatrixSendError(RuntimeError):
    """The homeserver refused an event (not a network fault)."""


class _Lru(OrderedDict[str, Any]):
    """A small bounded map (reply target -> thread root)."""

    def __init__(self, size: int = 1024) -> None:
        super().__init__()
        self.size = size

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class MatrixPlatform(Platform, ChatBackend):
    """The Matrix connection (Platform) and its output side (ChatBackend)."""

    name = PLATFORM
    platform = PLATFORM

    def __init__(
        self,
        service: ChatService,
        settings: Settings,
        *,
        allowed_inviters: Iterable[str] | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.homeserver = (settings.matrix_homeserver or "").strip().rstrip("/")
        self.user_id = (settings.matrix_user_id or "").strip()
        if allowed_inviters is None:
            # DUCKLM_MATRIX_ALLOWED_INVITERS; empty (the default) lets anybody invite.
            allowed_inviters = settings.matrix_allowed_inviters
        self.allowed_inviters = tuple(allowed_inviters)
        self.state = MatrixState(settings.matrix_state_dir)
        self.client: AsyncClient | None = None
        self.display_name: str | None = None
        self.device_id: str | None = None
        self._running = False
        # (response, history_only): a first sync without a saved token is all history.
        self._inbox: asyncio.Queue[tuple[SyncResponse, bool]] = asyncio.Queue()
        # Strong references to everything we start (the loops, joins, typing
        # keepers, history fetches): a bare create_task may be garbage-collected.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._typing: dict[str, set[str]] = {}  # room -> thread keys working there
        self._typing_keepers: dict[str, asyncio.Task[None]] = {}
        self._latest: _Lru = _Lru()  # thread key -> newest event in it (reply fallback)
        self._reply_roots: _Lru = _Lru()  # replied-to event -> its thread root
        self._cards: _Lru = _Lru()  # card event id -> approval id, as soon as it is posted
        self._joining: set[str] = set()
        self._encrypted_notice_at: dict[str, float] = {}
        service.add_backend(self)

    # ======================================================================
    # Platform: start / stop
    # ======================================================================

    async def start(self) -> None:
        self._check_settings()
        config = AsyncClientConfig(
            # nio retries timeouts forever by default, which would hang `ducklm run`
            # on a dead homeserver; we retry ourselves, with backoff, where it helps.
            max_timeouts=2,
            max_timeout_retry_wait_time=5,
            request_timeout=REQUEST_TIMEOUT,
            max_limit_exceeded=10,  # 429s honour retry_after_ms a few times
        )
        self.client = AsyncClient(self.homeserver, self.user_id, config=config)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._login()
                await self._load_profile()
                first, history_only = await self._first_sync()
        except PlatformStartError:
            await self._close_client()
            raise
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            await self._close_client()
            raise PlatformStartError(
                f"Matrix: cannot reach MATRIX_HOMESERVER={self.homeserver} "
                f"({type(exc).__name__}: {exc or 'no answer'}). Check the URL and that the "
                "homeserver is up."
            ) from exc
        self._running = True
        self._inbox.put_nowait((first, history_only))
        self._spawn(self._supervise("dispatcher", self._dispatch_forever))
        self._spawn(self._supervise("sync", self._sync_forever))
        logger.info("matrix: serving as %s (device %s)", self.user_id, self.device_id)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        self._typing.clear()
        self._typing_keepers.clear()
        await self._close_client()

    def _check_settings(self) -> None:
        if not self.homeserver:
            raise PlatformStartError(
                "Matrix: MATRIX_HOMESERVER is not set (e.g. https://matrix.example.org)."
            )
        if not self.homeserver.startswith(("http://", "https://")):
            raise PlatformStartError(
                f"Matrix: MATRIX_HOMESERVER={self.homeserver} must start with https:// "
                "(or http:// for a local server)."
            )
        if not re.fullmatch(r"@[^:\s]+:\S+", self.user_id):
            raise PlatformStartError(
                f"Matrix: MATRIX_USER_ID={self.user_id or '(unset)'} must be a full user id "
                "such as @duck:example.org."
            )
        if not (self.settings.matrix_password or self.settings.matrix_access_token):
            raise PlatformStartError(
                "Matrix: set MATRIX_PASSWORD (the bot logs in and keeps its session) or "
                "MATRIX_ACCESS_TOKEN for the bot account."
            )

    async def _close_client(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), STOP_TIMEOUT)

    # -- login ---------------------------------------------------------------

    async def _login(self) -> None:
        """Token from the environment, else the saved session, else the password."""
        client = self._client()
        saved = await asyncio.to_thread(self.state.load_session, self.homeserver, self.user_id)
        device_id = saved.device_id if saved else None
        token = self.settings.matrix_access_token
        if token:
            who = await self._whoami(token, device_id)
            if not isinstance(who, WhoamiResponse):
                raise PlatformStartError(
                    f"Matrix: the homeserver rejected MATRIX_ACCESS_TOKEN for "
                    f"MATRIX_USER_ID={self.user_id} ({_error_text(who)}). Create a new token "
                    "or set MATRIX_PASSWORD instead."
                )
            self._check_owner(who.user_id, "MATRIX_ACCESS_TOKEN")
            self.device_id = who.device_id or device_id
            client.device_id = self.device_id or ""
            # The token belongs to the environment; only the device id is ours to keep.
            await self._save_session(Session(self.homeserver, self.user_id, self.device_id))
            return
        if saved and saved.access_token:
            who = await self._whoami(saved.access_token, device_id)
            if isinstance(who, WhoamiResponse):
                self._check_owner(who.user_id, "the saved session")
                self.device_id = who.device_id or device_id
                return
            if not _is_token_error(who):
                raise PlatformStartError(
                    f"Matrix: MATRIX_HOMESERVER={self.homeserver} did not accept the saved "
                    f"session ({_error_text(who)})."
                )
            logger.info("matrix: saved access token expired; logging in again")
        await self._password_login(device_id)

    async def _whoami(self, token: str, device_id: str | None) -> Any:
        client = self._client()
        client.restore_login(self.user_id, device_id or "", token)
        return await client.whoami()

    async def _password_login(self, device_id: str | None) -> None:
        client = self._client()
        client.access_token = ""
        # Reusing the saved device id keeps one device per bot, not one per restart.
        client.device_id = device_id or ""
        response = await client.login(
            password=self.settings.matrix_password or "", device_name=DEVICE_NAME
        )
        if not isinstance(response, LoginResponse):
            raise PlatformStartError(
                f"Matrix: login as MATRIX_USER_ID={self.user_id} failed "
                f"({_error_text(response)}). Check MATRIX_PASSWORD (or set "
                "MATRIX_ACCESS_TOKEN)."
            )
        self._check_owner(response.user_id, "MATRIX_PASSWORD")
        self.device_id = response.device_id
        await self._save_session(
            Session(self.homeserver, self.user_id, response.device_id, response.access_token)
        )

    def _check_owner(self, user_id: str, source: str) -> None:
        if user_id != self.user_id:
            raise PlatformStartError(
                f"Matrix: {source} belongs to {user_id}, not MATRIX_USER_ID={self.user_id}."
            )

    async def _save_session(self, session: Session) -> None:
        try:
            await asyncio.to_thread(self.state.save_session, session)
        except OSError as exc:
            raise PlatformStartError(
                f"Matrix: cannot write the session to {self.state.directory} ({exc}); it "
                "lives next to DUCKLM_DB."
            ) from exc

    async def _load_profile(self) -> None:
        response = await self._client().get_displayname(self.user_id)
        if isinstance(response, ProfileGetDisplayNameResponse) and response.displayname:
            self.display_name = response.displayname

    async def _first_sync(self) -> tuple[SyncResponse, bool]:
        """One sync before `start` returns, so a dead server fails the start.
        Returns the response and whether it is history only (no saved token)."""
        client = self._client()
        token = await asyncio.to_thread(self.state.load_sync_token, self.user_id)
        if token:
            # full_state rebuilds the rooms' state; the timeline still starts at
            # the token, so exactly the events we have not handled arrive.
            response = await client.sync(timeout=0, since=token, full_state=True)
            if isinstance(response, SyncResponse):
                return response, False
            logger.warning("matrix: saved sync token refused (%s); starting fresh", response)
        # No token: everything already in the rooms happened before this start, so
        # it is history (M3). Marking the batch, rather than comparing timestamps
        # with our clock, is immune to clock skew. Ask for little of it.
        response = await client.sync(
            timeout=0, full_state=True, sync_filter={"room": {"timeline": {"limit": 1}}}
        )
        if not isinstance(response, SyncResponse):
            raise PlatformStartError(
                f"Matrix: the first sync with MATRIX_HOMESERVER={self.homeserver} failed "
                f"({_error_text(response)})."
            )
        return response, True

    def _client(self) -> AsyncClient:
        if self.client is None:
            raise RuntimeError("the Matrix platform is not started")
        return self.client

    # ======================================================================
    # The sync loop and the dispatcher
    # ======================================================================

    def _spawn(self, job: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _supervise(self, what: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Restart a loop that died of a bug instead of going deaf (M1)."""
        failures = 0
        while self._running:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                logger.exception("matrix: %s loop crashed; restarting", what)
                await asyncio.sleep(backoff(failures))

    async def _sync_forever(self) -> None:
        client = self._client()
        failures = 0
        while self._running:
            try:
                response = await client.sync(timeout=SYNC_TIMEOUT_MS)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                # Homeserver restarting, network gone, a proxy's HTML error page.
                failures += 1
                delay = backoff(failures)
                logger.warning("matrix: sync failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            if isinstance(response, SyncResponse):
                failures = 0
                self._inbox.put_nowait((response, False))
                continue
            failures += 1
            if _is_token_error(response):
                if await self._relogin():
                    continue
                delay = backoff(failures, TOKEN_ERROR_BACKOFF)
                logger.error(
                    "matrix: the homeserver no longer accepts the bot's access token; set "
                    "MATRIX_PASSWORD or a new MATRIX_ACCESS_TOKEN (retrying in %.0f s)",
                    delay,
                )
            else:
                delay = backoff(failures)
                logger.warning("matrix: sync error %s; retrying in %.1f s", response, delay)
            # A SyncError is *returned*; without this sleep the loop would spin (M2).
            await asyncio.sleep(delay)

    async def _relogin(self) -> bool:
        if not self.settings.matrix_password:
            return False
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.state.forget_access_token, self.homeserver, self.user_id)
        try:
            await self._password_login(self.device_id)
        except (PlatformStartError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.error("matrix: logging in again failed: %s", exc)
            return False
        logger.info("matrix: logged in again after the token was revoked")
        return True

    async def _dispatch_forever(self) -> None:
        while True:
            response, history_only = await self._inbox.get()
            await self._handle_sync(response, history_only)
            # Only now is the batch handled, so only now may a restart skip it (M4).
            try:
                await asyncio.to_thread(
                    self.state.save_sync_token, self.user_id, response.next_batch
                )
            except OSError:
                logger.exception("matrix: cannot save the sync token")

    async def _handle_sync(self, response: SyncResponse, history_only: bool = False) -> None:
        for room_id, invite in response.rooms.invite.items():
            await self._guarded(self._on_invite(room_id, invite.invite_state))
        if history_only:
            return
        for room_id, info in response.rooms.join.items():
            room = self._client().rooms.get(room_id)
            if room is None:
                continue
            events = [getattr(event, "source", None) or {} for event in info.timeline.events]
            start = self._after_own_join(events)
            if start and room.encrypted:
                joined = str(events[start - 1].get("event_id") or "")
                await self._guarded(self._encrypted_room_notice(room, joined))
            for source in events[start:]:
                await self._guarded(self._on_room_event(room, source))

    def _after_own_join(self, events: list[dict[str, Any]]) -> int:
        """Index after the bot's own (re)join in this batch, or 0: a room just
        joined replays its history, which is never for us (M3)."""
        start = 0
        for index, source in enumerate(events):
            if (
                source.get("type") == "m.room.member"
                and source.get("state_key") == self.user_id
                and (source.get("content") or {}).get("membership") == "join"
                and _prev_membership(source) != "join"  # a display-name change is no join
            ):
                start = index + 1
        return start

    @staticmethod
    async def _guarded(call: Coroutine[Any, Any, Any]) -> None:
        """One bad event must not stop the others (nor the dispatcher)."""
        try:
            await call
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("matrix: handling an event failed")

    # ======================================================================
    # Inbound events
    # ======================================================================

    async def _on_invite(self, room_id: str, invite_state: list[Any]) -> None:
        if room_id in self._joining:
            return  # nio repeats the invite in every sync until we have joined
        inviter = None
        for event in invite_state:
            # nio pops `content` out of an invite event's source; read its fields.
            if (
                getattr(event, "state_key", None) == self.user_id
                and getattr(event, "membership", None) == "invite"
            ):
                inviter = getattr(event, "sender", None)
        if not user_matches(inviter, self.allowed_inviters):
            logger.warning("matrix: declining invite to %s from %s", room_id, inviter)
            self._joining.add(room_id)
            self._spawn(self._decline(room_id))
            return
        self._joining.add(room_id)
        self._spawn(self._join(room_id, inviter))

    async def _join(self, room_id: str, inviter: str | None) -> None:
        try:
            for attempt in range(1, 6):
                try:
                    response = await self._client().join(room_id)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    response = exc
                if isinstance(response, JoinResponse):
                    logger.info("matrix: joined %s (invited by %s)", room_id, inviter)
                    return
                logger.warning("matrix: joining %s failed: %s", room_id, response)
                await asyncio.sleep(backoff(attempt))
        finally:
            self._joining.discard(room_id)

    async def _decline(self, room_id: str) -> None:
        try:
            await self._client().room_leave(room_id)
        finally:
            self._joining.discard(room_id)

    async def _on_room_event(self, room: MatrixRoom, source: dict[str, Any]) -> None:
        if source.get("sender") == self.user_id:
            return  # our own notices, reactions and edits come back through sync (M5)
        kind = source.get("type")
        if kind == "m.room.message":
            await self._on_message(room, source)
        elif kind == "m.reaction":
            await self._on_reaction(room, source)
        elif kind == "m.room.encrypted":
            await self._on_encrypted(room, source)
        elif kind == "m.room.encryption" and source.get("state_key") == "":
            await self._encrypted_room_notice(room, str(source.get("event_id") or ""))

    # -- messages --------------------------------------------------------------

    async def _on_message(self, room: MatrixRoom, source: dict[str, Any]) -> None:
        content = source.get("content") or {}
        if content.get("msgtype") != "m.text":
            return  # m.notice is other bots talking (M6); media is nothing we read
        relates = content.get("m.relates_to") or {}
        if relates.get("rel_type") == "m.replace":
            return  # an edit of an earlier message, which was answered already
        event_id = str(source.get("event_id") or "")
        sender = str(source.get("sender") or "")
        if not event_id or not sender:
            return
        body = str(content.get("body") or "")
        if "m.in_reply_to" in relates:
            body = strip_reply_fallback(body)
        text = body.strip()
        user = f"{PLATFORM}:{sender}"
        thread = await self._thread_of(room.room_id, event_id, relates)
        self._latest.put(thread.key, event_id)

        command = command_text(text)
        if command is not None:
            if await self._claim(event_id):
                reply = await self.service.handle_command(thread, user, command)
                if reply:
                    await self.send(thread, reply)
            return

        in_thread = thread.root != event_id
        claimed = False
        if in_thread and c.parse_decision(text) is not None:
            if not await self._claim(event_id):
                return
            claimed = True
            if await self.service.handle_thread_reply(thread, user, text):
                return
        addressed = (
            self._mentions_me(content)
            or self._is_direct(room)
            or (in_thread and await self.service.is_bot_thread(thread))
        )
        if not addressed:
            return
        if not claimed and not await self._claim(event_id):
            return
        question = self._without_mention(text)
        if not question:
            await self.send(thread, EMPTY_MENTION_REPLY)
            return
        self._spawn(self._submit(thread, user, question, event_id if in_thread else None))

    async def _submit(self, thread: Thread, user: str, text: str, current: str | None) -> None:
        """Fetch the thread so far (for follow-ups), then hand the question over."""
        history: list[dict[str, str]] = []
        if current is not None and thread.root:
            try:
                history = await asyncio.wait_for(
                    self._thread_history(thread.channel, thread.root, current), HISTORY_TIMEOUT
                )
            except Exception as exc:  # history is a help, not a condition
                logger.warning("matrix: reading thread history failed: %s", exc)
        self.service.submit_message(thread, user, text, history)

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
        response = await self._client().room_get_event(room_id, event_id)
        if isinstance(response, RoomGetEventResponse):
            relates = (response.event.source.get("content") or {}).get("m.relates_to") or {}
            if relates.get("rel_type") == "m.thread" and relates.get("event_id"):
                root = str(relates["event_id"])
            elif await self.service.is_bot_thread(Thread(PLATFORM, room_id, event_id)):
                root = event_id
        self._reply_roots.put(event_id, root)
        return root

    async def _thread_history(self, room_id: str, root: str, current: str) -> list[dict[str, str]]:
        """The thread's earlier messages as model turns (the bot's are `assistant`)."""
        client = self._client()
        sources: list[dict[str, Any]] = []
        first = await client.room_get_event(room_id, root)
        if isinstance(first, RoomGetEventResponse):
            sources.append(first.event.source)
        async for event in client.room_get_event_relations(
            room_id, root, RelationshipType.thread, "m.room.message", limit=MAX_HISTORY_EVENTS
        ):
            sources.append(event.source)
            if len(sources) > MAX_HISTORY_EVENTS:
                break
        sources.sort(key=lambda s: int(s.get("origin_server_ts") or 0))
        history = []
        for source in sources:
            content = source.get("content") or {}
            if source.get("event_id") == current or source.get("type") != "m.room.message":
                continue
            if (content.get("m.relates_to") or {}).get("rel_type") == "m.replace":
                continue
            body = strip_reply_fallback(str(content.get("body") or "")).strip()
            if not body:
                continue
            if source.get("sender") == self.user_id:
                history.append({"role": "assistant", "content": body})
            else:
                history.append({"role": "user", "content": self._without_mention(body)})
        return history

    def _mentions_me(self, content: dict[str, Any]) -> bool:
        mentions = content.get("m.mentions")
        if isinstance(mentions, dict) and self.user_id in (mentions.get("user_ids") or []):
            return True
        formatted = str(content.get("formatted_body") or "")
        if f"matrix.to/#/{self.user_id}" in formatted or (
            f"matrix.to/#/%40{self.user_id[1:]}" in formatted
        ):
            return True  # a pill
        body = str(content.get("body") or "")
        if self.user_id.lower() in body.lower():
            return True
        return self._name_prefix().match(body) is not None

    def _name_prefix(self) -> re.Pattern[str]:
        """`Duck: …`, `@duck, …` at the start, as people type a name without a pill."""
        names = {self.user_id.partition(":")[0].lstrip("@")}
        if self.display_name:
            names.add(self.display_name)
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True) if n)
        return re.compile(rf"^\s*@?(?:{alternatives})(?![\w-])[:,]?\s*", re.IGNORECASE)

    def _without_mention(self, text: str) -> str:
        text = re.sub(re.escape(self.user_id) + r"[:,]?", "", text, flags=re.IGNORECASE)
        return self._name_prefix().sub("", text, count=1).strip()

    def _is_direct(self, room: MatrixRoom) -> bool:
        return room.member_count <= 2

    # -- reactions ---------------------------------------------------------------

    async def _on_reaction(self, room: MatrixRoom, source: dict[str, Any]) -> None:
        relates = (source.get("content") or {}).get("m.relates_to") or {}
        if relates.get("rel_type") != "m.annotation" or not relates.get("event_id"):
            return
        decision = _DECISIONS_BY_KEY.get(normalize_reaction(str(relates.get("key") or "")))
        if decision is None:
            return
        approval = await self._approval_for_card(str(relates["event_id"]))
        if approval is None:
            return  # a reaction to anything but an approval card is just a reaction
        if not await self._claim(str(source.get("event_id") or "")):
            return
        user = f"{PLATFORM}:{source.get('sender')}"
        refusal = await self.service.handle_decision(approval.approval_id, user, decision)
        if refusal:
            thread = await self._thread_of_task(approval.task_id) or Thread(
                PLATFORM, room.room_id, None
            )
            await self.tell(thread, user, refusal)

    async def _approval_for_card(self, card_ref: str) -> Approval | None:
        approval_id = self._cards.get(card_ref)
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
        relates = (source.get("content") or {}).get("m.relates_to") or {}  # cleartext
        root = event_id
        if relates.get("rel_type") == "m.thread" and relates.get("event_id"):
            root = str(relates["event_id"])
        self._encrypted_notice_at[room.room_id] = time.monotonic()
        await self.send(Thread(PLATFORM, room.room_id, root), ENCRYPTED_NOTICE)

    async def _encrypted_room_notice(self, room: MatrixRoom, cause_event_id: str) -> None:
        """Say so at once when the bot joins an encrypted room or encryption is
        switched on (once per cause, even across restarts)."""
        if await self._claim(cause_event_id):
            await self.send(Thread(PLATFORM, room.room_id, None), ENCRYPTED_NOTICE)

    def _encrypted_notice_due(self, room_id: str) -> bool:
        last = self._encrypted_notice_at.get(room_id)
        return last is None or time.monotonic() - last >= ENCRYPTED_NOTICE_INTERVAL

    # -- once only ---------------------------------------------------------------

    async def _claim(self, event_id: str) -> bool:
        """True the first time the bot acts on this event, across restarts."""
        if not event_id:
            return False
        return await self.service.runtime.stores.deliveries.claim(f"{PLATFORM}:event:{event_id}")

    # ======================================================================
    # ChatBackend: output
    # ======================================================================

    async def send(self, thread: Thread, text: str) -> str | None:
        content = message_content(text)
        content["m.mentions"] = {}  # an answer quoting user ids must not ping them
        return await self._post(thread, content)

    async def send_card(self, thread: Thread, card: ApprovalCard) -> str:
        # Approvers in the room are mentioned, so the card notifies them.
        content = with_mentions(
            message_content(card_markdown(card)), "Approvers", self._approvers_in(thread.channel)
        )
        card_id = await self._post(thread, content)
        # The service stores the card's id only after we return, but a quick
        # approver can react before that: remember it here at once.
        self._cards.put(card_id, card.approval_id)
        keys = [APPROVE_KEY, DENY_KEY] + ([ALWAYS_KEY] if card.always_offered else [])
        self._spawn(self._seed_reactions(thread.channel, card_id, keys))
        return card_id

    def _approvers_in(self, room_id: str) -> dict[str, str | None]:
        room = self._client().rooms.get(room_id)
        if room is None:
            return {}
        approvers = {}
        for qualified in sorted(self.service.policy.approvers):
            user_id = qualified.removeprefix(f"{PLATFORM}:")
            if qualified.startswith(f"{PLATFORM}:") and user_id in room.users:
                approvers[user_id] = room.user_name(user_id)
        return dict(list(approvers.items())[:MAX_MENTIONED_APPROVERS])

    async def _seed_reactions(self, room_id: str, card_id: str, keys: list[str]) -> None:
        """Pre-seeded reactions are one-click answers in most clients. They are a
        convenience (the card says how to answer by text), so failures only log."""
        for key in keys:
            relates = {"rel_type": "m.annotation", "event_id": card_id, "key": key}
            try:
                await self._send_event(room_id, "m.reaction", {"m.relates_to": relates})
            except Exception as exc:
                logger.warning("matrix: could not add %s to the card: %s", key, exc)

    async def resolve_card(
        self, thread: Thread, card_ref: str, card: ApprovalCard, resolution: CardResolution
    ) -> None:
        new = message_content(resolution_markdown(card, resolution))
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
        await self._send_event(thread.channel, "m.room.message", content)

    def mention(self, user: str) -> str:
        # Text goes through Markdown, so the bare Matrix id is what readers see.
        return user.removeprefix("matrix:")

    async def tell(self, thread: Thread, user: str, text: str) -> None:
        """Matrix has no private replies in a room: answer in the thread, with a mention."""
        mxid = user.removeprefix(f"{PLATFORM}:")
        if not mxid.startswith("@"):
            await self.send(thread, text)
            return
        room = self._client().rooms.get(thread.channel)
        name = room.user_name(mxid) if room is not None else None
        await self._post(thread, addressed_content(mxid, text, name))

    async def working(self, thread: Thread, status: str | None) -> None:
        """A typing notice while any task works in the room (refreshed, as typing
        notices expire); Matrix has no per-thread status line to show the tool."""
        if self.client is None:
            return
        active = self._typing.setdefault(thread.channel, set())
        if status is not None:
            active.add(thread.key)
            keeper = self._typing_keepers.get(thread.channel)
            if keeper is None or keeper.done():
                self._typing_keepers[thread.channel] = self._spawn(
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
        client = self.client
        if client is None:
            return
        try:
            await client.room_typing(room_id, on, timeout=TYPING_MS)
        except Exception as exc:  # cosmetic; never worth failing a task for
            logger.debug("matrix: typing notice failed: %s", exc)

    # -- sending -------------------------------------------------------------------

    async def _post(self, thread: Thread, content: dict[str, Any]) -> str:
        """A message in the thread (m.thread + reply fallback), or at the top level."""
        if thread.root:
            content["m.relates_to"] = {
                "rel_type": "m.thread",
                "event_id": thread.root,
                # Clients without threads show it as a reply to the newest message.
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": self._latest.get(thread.key, thread.root)},
            }
        event_id = await self._send_event(thread.channel, "m.room.message", content)
        if thread.root:
            self._latest.put(thread.key, event_id)
        return event_id

    async def _send_event(self, room_id: str, kind: str, content: dict[str, Any]) -> str:
        """Send, retrying network faults and 5xx with backoff. One transaction id
        for every attempt, so the homeserver drops a repeat that had arrived."""
        if not self._running:
            raise RuntimeError("the Matrix platform is stopped")
        tx_id = str(uuid.uuid4())
        deadline = time.monotonic() + SEND_RETRY_SECONDS
        failures = 0
        while True:
            client = self._client()
            try:
                response: Any = await client.room_send(room_id, kind, content, tx_id=tx_id)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                response = exc
            if isinstance(response, RoomSendResponse):
                return str(response.event_id)
            if isinstance(response, ErrorResponse) and not _is_transient(response):
                raise MatrixSendError(f"sending {kind} to {room_id}: {_error_text(response)}")
            failures += 1
            delay = backoff(failures)
            if time.monotonic() + delay > deadline:
                raise MatrixSendError(f"sending {kind} to {room_id} gave up: {response}")
            logger.warning("matrix: send failed (%s); retrying in %.1f s", response, delay)
            await asyncio.sleep(delay)


def _prev_membership(source: dict[str, Any]) -> str | None:
    unsigned = source.get("unsigned") or {}
    prev = unsigned.get("prev_content") or source.get("prev_content") or {}
    membership = prev.get("membership") if isinstance(prev, dict) else None
    return membership if isinstance(membership, str) else None


def _error_text(response: Any) -> str:
    if isinstance(response, ErrorResponse):
        status = getattr(response.transport_response, "status", None)
        code = response.status_code or (f"HTTP {status}" if status else "error")
        return f"{code}: {response.message}"
    return str(response)


def _is_token_error(response: Any) -> bool:
    return isinstance(response, ErrorResponse) and response.status_code in (
        "M_UNKNOWN_TOKEN",
        "M_MISSING_TOKEN",
    )


def _is_transient(response: ErrorResponse) -> bool:
    status = getattr(response.transport_response, "status", None)
    return status is None or status >= 500 or response.status_code == "M_LIMIT_EXCEEDED"
