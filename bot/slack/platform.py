"""Slack: slack-bolt's AsyncApp over Socket Mode (default) or HTTP.

Inbound, a person's message is handed to the service before bolt acknowledges
it (a global middleware, so the 200 or the Socket Mode ack goes out only once
the message is recorded); everything else acks at once and hands the work to
a job this class keeps a strong reference to (bolt's own fire-and-forget
futures can be garbage-collected mid-run).

    app_mention / DM / reply in a bot thread -> service.accept(Inbound)
        (decision words, the empty-mention hint and new tasks are the service's)
    edit of a message the bot took            -> one "edits are not re-run" reply
    button click                              -> service.handle_decision
    "Deny with reason…" modal                 -> service.handle_decision(…, note)
    "Edit and approve…" modal                 -> service.handle_edit (issue #20)
    /duck …                                   -> service.handle_command

What people typed is decoded once (bot/slack/text.py); thread history comes
from DuckLM's own record or from conversations.replies (bot/slack/history.py).

Outbound, `SlackPlatform` is the service's `ChatBackend` for "slack".

Slack retries an event it thinks was not delivered (and bolt does not notice),
and one @-mention arrives twice (`app_mention` and `message.*`). Both are
de-duplicated in the store: a message's event id and its (channel, ts) are
claimed in accept's transaction, so neither a retry after a restart nor the
second copy starts a second task; other events have their event id claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncConnectionErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.backend import (
    ApprovalCard,
    CardResolution,
    ChatBackend,
    Platform,
    PlatformStartError,
    Thread,
)
from bot.commands import parse_decision
from bot.inbox import Accepted, Inbound
from bot.service import ChatService
from bot.slack.blocks import (
    ACTION_DENY_REASON,
    ACTION_EDIT,
    DECISIONS,
    DENY_REASON_VIEW,
    EDIT_BLOCK,
    EDIT_VIEW,
    REASON_BLOCK,
    approval_blocks,
    approval_text,
    card_block_id,
    command_from_view,
    deny_reason_modal,
    edit_modal,
    reason_from_view,
    resolution_text,
    resolved_blocks,
)
from bot.slack.format import MESSAGE_LIMIT, clip_mrkdwn, escape, split_mrkdwn, to_mrkdwn
from bot.slack.history import find_own_message, latest_own_text, slack_history, stored_history
from bot.slack.metered import CountingRateLimitHandler, MeteredWebClient
from bot.slack.parsing import (
    PLATFORM,
    card_ref,
    clicker,
    malformed_actions,
    origin_team,
    parse_card_ref,
    slack_user_id,
    text_field,
)
from bot.slack.text import (
    Decoded,
    ascii_command,
    decode_message,
    decode_mrkdwn,
    is_run,
    unwrap_code,
)
from runtime.approvals import edit_refusal
from runtime.settings import Settings

logger = logging.getLogger("ducklm.slack")

T = TypeVar("T")

# The last line of a long answer's first post; the whole text follows as a file.
LONG_ANSWER_CUT = "_(long answer cut here; the full text follows)_"

EVENTS_PATH = "/slack/events"
COMMAND = "/duck"
DEFAULT_API_URL = "https://slack.com/api/"

# Message subtypes that are still a person writing; everything else (edits,
# deletions, joins, bot messages, …) is ignored.
_PERSON_SUBTYPES = {None, "file_share", "thread_broadcast"}
MAX_INPUT_CHARS = 12_000  # a question longer than this is cut before the model sees it
MAX_CONTINUATIONS = 5  # extra messages when a long answer cannot be attached as a file
COMMAND_ACK_BUDGET = 2.0  # seconds to answer /duck in the ack; Slack allows 3
SOCKET_CONNECT_TIMEOUT = 15.0
STOP_GRACE = 5.0
RATE_LIMIT_RETRIES = 5
MAX_SEEN_IN_MEMORY = 10_000
MAX_NOTES = 200  # commands whose autocorrected characters were changed, remembered for the card


@dataclass
class _Status:
    """One thread's "working" message: posted lazily, edited at most once per
    interval (chat.update is Tier 3), deleted at the end."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ts: str | None = None
    shown: str | None = None
    wanted: str | None = None
    last: float = 0.0
    first: bool = True
    flush: asyncio.Task[None] | None = None


class SlackPlatform(Platform, ChatBackend):
    """The Slack connection (`Platform`) and the service's output for Slack (`ChatBackend`)."""

    name: ClassVar[str] = PLATFORM
    platform: ClassVar[str] = PLATFORM

    def __init__(
        self, service: ChatService, settings: Settings, *, status_interval: float = 1.0
    ) -> None:
        self.service = service
        self.settings = settings
        self.mode = settings.effective_slack_mode
        self.status_interval = status_interval
        self.client: AsyncWebClient | None = None
        self.app: AsyncApp | None = None
        self.bot_user_id: str | None = None
        self.bot_id: str | None = None
        self.http_port: int | None = None  # the bound port in HTTP mode (after start)
        # Mounted beside /slack/events in HTTP mode: /healthz, /readyz, /metrics.
        self.http_routes: list[Callable[[web.Application], None]] = []
        self._runner: web.AppRunner | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        self._status: dict[str, _Status] = {}
        self._status_ts: set[str] = set()  # our status messages, left out of history
        self._triggers: dict[str, list[tuple[str, str]]] = {}  # thread key -> reacted messages
        self._reacting: dict[str, asyncio.Task[None]] = {}  # thread key -> the :eyes: call
        # command -> what was changed in it (typographic quotes, dashes), shown on
        # its card and in its direct answer
        self._notes: dict[str, str] = {}
        self.team_id: str | None = None
        self._seen: dict[str, None] = {}  # only when the store has no delivery log
        service.add_backend(self)

    @property
    def events_url(self) -> str:
        """Where Slack posts in HTTP mode (events, interactivity and commands)."""
        host = self.settings.http_host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.http_port}{EVENTS_PATH}"

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Check the tokens, then listen (HTTP) or connect (Socket Mode)."""
        settings = self.settings
        if not settings.slack_bot_token:
            raise PlatformStartError(
                "SLACK_BOT_TOKEN is not set: use the app's Bot User OAuth Token (xoxb-…) "
                "from OAuth & Permissions."
            )
        if self.mode == "http" and not settings.slack_signing_secret:
            raise PlatformStartError(
                "DUCKLM_SLACK_MODE=http needs SLACK_SIGNING_SECRET (Basic Information → "
                "App Credentials → Signing Secret); or set SLACK_APP_TOKEN for Socket Mode."
            )
        if self.mode == "socket" and not settings.slack_app_token:
            raise PlatformStartError(
                "Socket Mode needs SLACK_APP_TOKEN: an app-level token (xapp-…) with the "
                "connections:write scope (Basic Information → App-Level Tokens). Or set "
                "DUCKLM_SLACK_MODE=http and SLACK_SIGNING_SECRET."
            )
        self.client = self._web_client(settings.slack_bot_token)
        await self._check_bot_token(self.client)
        self.app = self._build_app(self.client)
        if self.mode == "http":
            await self._listen(self.app)
        else:
            await self._connect(self.app)
        logger.info("Slack connected as %s (%s mode)", self.bot_user_id, self.mode)

    async def stop(self) -> None:
        """Disconnect; safe after a failed start. Jobs get a short grace period."""
        for status in self._status.values():
            if status.flush is not None:
                status.flush.cancel()
        socket_handler, self._socket = self._socket, None
        if socket_handler is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(socket_handler.close_async(), STOP_GRACE)
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), STOP_GRACE)
        if self._jobs:
            _, pending = await asyncio.wait(set(self._jobs), timeout=STOP_GRACE)
            for job in pending:
                job.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def connection_problem(self) -> str | None:
        """HTTP mode: the port listens. Socket Mode: the websocket is up (the
        SDK reconnects by itself; meanwhile events go to other connections)."""
        if self.mode == "http":
            return None if self._runner is not None else "the HTTP server is not listening"
        socket_handler = self._socket
        if socket_handler is None or not await socket_handler.client.is_connected():
            return "the Socket Mode connection is down"
        return None

    async def drain(self) -> None:
        """Wait until no Slack job (event, click, command) is left; tests use it."""
        while self._jobs:
            await asyncio.wait(set(self._jobs))

    def _web_client(self, token: str) -> AsyncWebClient:
        base_url = self.settings.slack_api_url or DEFAULT_API_URL
        metrics = self.service.runtime.metrics
        client = MeteredWebClient(
            token=token,
            base_url=base_url if base_url.endswith("/") else base_url + "/",
            logger=logger,
        )
        client.metrics = metrics  # API errors by method (bot/slack/metered.py)
        # slack-sdk retries only connection errors by default; a 429 would drop
        # the message. This handler sleeps for Retry-After and tries again.
        client.retry_handlers = [
            AsyncConnectionErrorRetryHandler(),
            CountingRateLimitHandler(metrics, max_retry_count=RATE_LIMIT_RETRIES),
        ]
        return client

    async def _check_bot_token(self, client: AsyncWebClient) -> None:
        try:
            auth = await client.auth_test()
        except SlackApiError as exc:
            hint = " (that is an app-level token)" if client.token.startswith("xapp-") else ""
            raise PlatformStartError(
                f"Slack rejected SLACK_BOT_TOKEN{hint}: auth.test answered "
                f"{exc.response.get('error')!r}. Use the Bot User OAuth Token (xoxb-…) "
                "from OAuth & Permissions, and reinstall the app if it was revoked."
            ) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PlatformStartError(
                f"Could not reach Slack at {client.base_url} ({exc}). Check the network "
                "or DUCKLM_SLACK_API_URL."
            ) from exc
        self.bot_user_id = auth.get("user_id")
        self.bot_id = auth.get("bot_id")
        self.team_id = auth.get("team_id")
        if isinstance(self.team_id, str) and self.team_id:
            # Who may ask by default: members of the installing workspace (#22).
            self.service.policy.set_home(PLATFORM, self.team_id)
        if not self.bot_user_id:
            raise PlatformStartError(
                "SLACK_BOT_TOKEN is not a bot token (auth.test returned no bot user); "
                "use the Bot User OAuth Token (xoxb-…)."
            )

    def _build_app(self, client: AsyncWebClient) -> AsyncApp:
        app = AsyncApp(
            client=client,
            # An empty secret is fine in Socket Mode: bolt skips verification there.
            signing_secret=self.settings.slack_signing_secret or "",
            name="ducklm",
            logger=logging.getLogger("ducklm.slack.bolt"),
        )
        # Message events are taken in the middleware, before the ack (see _on_delivery).
        app.middleware(self._on_delivery)
        app.action(re.compile("^(" + "|".join(DECISIONS) + ")$"))(self._on_decision_click)
        app.action(ACTION_DENY_REASON)(self._on_deny_reason_click)
        app.action(ACTION_EDIT)(self._on_edit_click)
        app.action(re.compile(".*"))(self._on_unknown_action)  # first match wins: keep last
        app.view(DENY_REASON_VIEW)(self._on_deny_reason_submit)
        app.view(EDIT_VIEW)(self._on_edit_submit)
        app.command(COMMAND)(self._on_command)
        return app

    async def _listen(self, app: AsyncApp) -> None:
        web_app = web.Application()
        web_app.router.add_post(EVENTS_PATH, self._http_request)
        for add_routes in self.http_routes:
            add_routes(web_app)
        runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.http_host, self.settings.http_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PlatformStartError(
                f"Cannot listen on {self.settings.http_host}:{self.settings.http_port} for "
                f"Slack ({exc}); set DUCKLM_HTTP_PORT to a free port."
            ) from exc
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else self.settings.http_port

    async def _http_request(self, request: web.Request) -> web.Response:
        """bolt's aiohttp adapter, plus a 400 instead of a 500 for a body bolt
        cannot even parse (garbage must not look like our failure)."""
        assert self.app is not None
        try:
            bolt_request = await to_bolt_request(request)
        except Exception as exc:
            logger.warning("unreadable Slack request ignored: %s", exc)
            return web.json_response({"error": "bad request"}, status=400)
        try:
            response = await self.app.async_dispatch(bolt_request)
        except Exception:
            logger.exception("Slack request failed")
            return web.json_response({"error": "internal error"}, status=500)
        if response.status >= 500 and malformed_actions(bolt_request.body):
            # bolt builds every listener argument up front, and `actions` that is
            # not a list of objects crashes that into a 500, which Slack retries.
            # The signature was checked first (a forgery still gets a 401).
            return web.json_response({"error": "malformed actions"}, status=400)
        return await to_aiohttp_response(response)

    async def _connect(self, app: AsyncApp) -> None:
        assert self.client is not None and self.settings.slack_app_token
        handler = AsyncSocketModeHandler(
            app, app_token=self.settings.slack_app_token, web_client=self.client
        )
        try:
            # The SDK's connect() retries a rejected token forever; asking for the
            # URL ourselves first turns that into a clear start-up error.
            handler.client.wss_uri = await handler.client.issue_new_wss_url()
            await asyncio.wait_for(handler.connect_async(), SOCKET_CONNECT_TIMEOUT)
        except SlackApiError as exc:
            await handler.close_async()
            raise PlatformStartError(
                f"Slack rejected SLACK_APP_TOKEN: apps.connections.open answered "
                f"{exc.response.get('error')!r}. It must be an app-level token (xapp-…) with "
                "connections:write (Basic Information → App-Level Tokens), and Socket Mode "
                "must be on."
            ) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            await handler.close_async()
            raise PlatformStartError(
                f"Could not open the Socket Mode connection ({exc or 'timed out'}); check "
                "SLACK_APP_TOKEN and the network."
            ) from exc
        self._socket = handler

    # -- jobs ------------------------------------------------------------------

    def _spawn(self, job: Coroutine[Any, Any, T], what: str) -> asyncio.Task[T]:
        """Run `job` in the background, holding a strong reference until it ends.
        A failure is logged (one bad event must never stop the bot)."""
        task = asyncio.get_running_loop().create_task(job)
        self._jobs.add(task)

        def done(finished: asyncio.Task[T]) -> None:
            self._jobs.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                logger.error("Slack %s failed", what, exc_info=finished.exception())

        task.add_done_callback(done)
        return task

    async def _claim(self, key: str) -> bool:
        """True the first time a delivery key is seen, across restarts."""
        deliveries = getattr(self.service.runtime.stores, "deliveries", None)
        if deliveries is None:  # an older store: de-duplicate in memory, bounded
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > MAX_SEEN_IN_MEMORY:
                del self._seen[next(iter(self._seen))]
            return True
        try:
            claimed = bool(await deliveries.claim(key))
        except Exception:
            # Better a rare duplicate than a lost message when the store hiccups.
            logger.exception("could not record Slack delivery %s", key)
            return True
        if not claimed and self.service.runtime.metrics is not None:
            self.service.runtime.metrics.duplicate(PLATFORM)
        return claimed

    # -- inbound: events --------------------------------------------------------

    async def _on_delivery(
        self, body: dict[str, Any], next: Callable[[], Awaitable[BoltResponse]]
    ) -> BoltResponse | None:
        """Global middleware, before bolt acknowledges anything.

        A person's message is handed to `ChatService.accept` here, so it is
        recorded (its delivery keys claimed in the same transaction) before
        Slack gets its 200; if that fails Slack gets a 500 and retries. Any
        other event only has its event_id claimed (retries carry the same id).
        """
        if body.get("type") != "event_callback":
            return await next()
        event = body.get("event")
        event_id = text_field(body, "event_id")
        if isinstance(event, dict) and event.get("type") in ("app_mention", "message"):
            try:
                await self._on_message_event(body, event, event_id)
            except Exception:
                logger.exception("could not take Slack event %s; Slack will retry", event_id)
                return BoltResponse(status=500, body="")
            # A response without next() is a 200 (None would be a 404, which Slack retries).
            return BoltResponse(status=200, body="")
        if event_id and not await self._claim(f"slack:event:{event_id}"):
            logger.info("duplicate Slack delivery %s ignored", event_id)
            return BoltResponse(status=200, body="")
        return await next()

    async def _on_message_event(
        self, body: dict[str, Any], event: dict[str, Any], event_id: str | None
    ) -> None:
        subtype = event.get("subtype")
        if subtype == "message_changed":
            if event_id is None or await self._claim(f"slack:event:{event_id}"):
                self._spawn(self._edited(event), "message edit")
            return
        if subtype not in _PERSON_SUBTYPES and subtype != "bot_message":
            return  # deletions, joins, topic changes, …
        mentioned = event.get("type") == "app_mention"
        sender_bot = text_field(event, "bot_id")
        from_bot = bool(sender_bot or event.get("bot_profile") or subtype == "bot_message")
        if from_bot:
            # Another bot is seen only when it @-mentions DuckLM (never its
            # chatter in a thread); the service bounds replies to bots per thread.
            if not mentioned or sender_bot == self.bot_id:
                return
        user = text_field(event, "user") or (sender_bot if mentioned else None)
        channel, ts = text_field(event, "channel"), text_field(event, "ts")
        if not (user and channel and ts) or user == self.bot_user_id:
            return
        thread_ts = text_field(event, "thread_ts")
        thread = Thread(PLATFORM, channel, thread_ts or ts)
        typed = decode_message(event, bot_user_id=self.bot_user_id, purpose="command")
        if not mentioned and event.get("channel_type") != "im":
            # In channels only replies in a thread the bot works in are for it
            # (an @-mention anywhere arrives as app_mention too), and not those
            # that address other people only ("@bob can you check?").
            if not thread_ts or typed.addresses_only_others:
                return
            if not await self.service.is_bot_thread(thread):
                return
        text, note = self._input(event, typed)
        if not text and not mentioned:
            return  # a file without words in a thread or DM: nothing to answer
        keys = [f"slack:msg:{channel}:{ts}"]
        if event_id:
            keys.insert(0, f"slack:event:{event_id}")
        inbound = Inbound(
            thread=thread,
            user=f"{PLATFORM}:{user}",
            text=text,
            deliveries=tuple(keys),
            message_id=ts,
            in_thread=bool(thread_ts),
            from_bot=from_bot,
            origin=origin_team(body, event),
        )
        outcome = await self.service.accept(inbound)
        if outcome is not Accepted.NEW:
            return
        if note:
            self._remember_note(text, note)
        if text and not (thread_ts and parse_decision(text)):
            # :eyes: says "on it" at once; `working` waits for it before any status.
            self._triggers.setdefault(thread.key, []).append((channel, ts))
            self._reacting[thread.key] = self._spawn(self._react(channel, ts, "eyes"), "reaction")

    def _input(self, event: dict[str, Any], typed: Decoded) -> tuple[str, str | None]:
        """What goes to the service: a `run …` exactly as typed (autocorrect
        undone, with a note saying so); a question with link targets as context."""
        if is_run(typed.text):
            verb, _, command = typed.text.partition(" ")
            command, note = ascii_command(unwrap_code(command.strip()))
            text = f"{verb} {command}"
        else:
            text = decode_message(event, bot_user_id=self.bot_user_id, purpose="question").text
            note = None
        if len(text) > MAX_INPUT_CHARS:
            text = text[:MAX_INPUT_CHARS] + f"\n[message cut at {MAX_INPUT_CHARS} characters]"
        return text, note

    async def _edited(self, event: dict[str, Any]) -> None:
        """An edit of a message the bot already took: say once, in its thread,
        that edits are not re-run. Unfurls and other changes that leave the
        text alone are no edits."""
        message = event.get("message") if isinstance(event.get("message"), dict) else {}
        previous = event.get("previous_message")
        previous = previous if isinstance(previous, dict) else {}
        channel, ts = text_field(event, "channel"), text_field(message, "ts")
        user = text_field(message, "user")
        if not (channel and ts and user) or user == self.bot_user_id or message.get("bot_id"):
            return
        if message.get("text") == previous.get("text"):
            return
        root = text_field(message, "thread_ts") or ts
        thread = Thread(PLATFORM, channel, root)
        # Was the message as sent for the bot (so it took it)? The same test as
        # for a new message: a mention, a DM, or a reply in a bot thread that
        # does not address other people only. Nothing is claimed but the hint.
        before = decode_message(previous, bot_user_id=self.bot_user_id)
        addressed = (
            before.mentions_bot
            or event.get("channel_type") == "im"
            or (
                root != ts
                and not before.addresses_only_others
                and await self.service.is_bot_thread(thread)
            )
        )
        if not addressed or not self.service.policy.may_ask(
            f"{PLATFORM}:{user}", origin=origin_team({}, message)
        ):
            return
        if not await self._claim(f"slack:edit:{channel}:{ts}"):
            return  # told once per message
        await self.send(
            thread,
            "I saw the edit, but edits are not re-run: I took the message as it was sent. "
            "Send a new message if you want me to act on the changed text.",
        )

    # -- ChatBackend: history ---------------------------------------------------------

    async def history(self, thread: Thread, before: str | None) -> list[dict[str, str]]:
        """The thread's earlier messages for the model: DuckLM's own record of
        the thread where it has one, else read from Slack (newest within budget)."""
        if thread.root is None:
            return []
        stored = await stored_history(self.service.tasks, thread.key)
        if stored is not None:
            return stored
        assert self.client is not None
        if before == thread.root:
            return []  # the thread's first message has nothing before it
        return await slack_history(
            self.client,
            thread.channel,
            thread.root,
            before,
            bot_user_id=self.bot_user_id,
            bot_id=self.bot_id,
            skip=self._status_ts,
        )

    # -- inbound: buttons and the modal ------------------------------------------

    async def _on_decision_click(
        self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any], action: dict[str, Any]
    ) -> None:
        await ack()
        self._spawn(self._decide_click(body, action), "button click")

    async def _decide_click(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        user = clicker(body)
        approval_id = action.get("value")
        decision = DECISIONS.get(str(action.get("action_id")))
        if not user or not isinstance(approval_id, str) or decision is None:
            logger.warning("malformed approval click ignored: %r", action)
            return
        # The card the click came from: a card whose post was never recorded (the
        # process died right after posting it) is adopted by the service.
        container = body.get("container") if isinstance(body.get("container"), dict) else {}
        channel, ts = text_field(container, "channel_id"), text_field(container, "message_ts")
        refusal = await self.service.handle_decision(
            approval_id,
            f"{PLATFORM}:{user}",
            decision,
            card_ref=card_ref(channel, ts) if channel and ts else None,
        )
        if refusal:
            await self._tell_clicker(body, user, refusal)

    async def _on_deny_reason_click(
        self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any], action: dict[str, Any]
    ) -> None:
        await ack()
        self._spawn(
            self._open_modal(body, action, "deny", deny_reason_modal), "deny-with-reason click"
        )

    async def _open_modal(
        self,
        body: dict[str, Any],
        action: dict[str, Any],
        decision: str,
        modal: Callable[[str, str], dict[str, Any]],
    ) -> None:
        """Open a decision's modal (deny with a reason, edit and approve) for the
        clicked card; say "no" first to someone who could not use it."""
        assert self.client is not None
        user, approval_id = clicker(body), action.get("value")
        trigger_id = body.get("trigger_id")
        if not user or not isinstance(approval_id, str) or not isinstance(trigger_id, str):
            logger.warning("malformed %s click ignored (no user, approval or trigger)", decision)
            return
        refusal, what = await self._precheck(approval_id, f"{PLATFORM}:{user}", decision)
        if refusal:
            await self._tell_clicker(body, user, refusal)
            return
        await self.client.views_open(trigger_id=trigger_id, view=modal(approval_id, what))

    async def _on_deny_reason_submit(
        self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any], view: dict[str, Any]
    ) -> None:
        user = clicker(body)
        approval_id = view.get("private_metadata")
        if not user or not isinstance(approval_id, str) or not approval_id:
            await ack()
            return
        who = f"{PLATFORM}:{user}"
        refusal, _ = await self._precheck(approval_id, who, "deny")
        if refusal:  # keep the modal open and say why, right under the input
            await ack(response_action="errors", errors={REASON_BLOCK: refusal[:150]})
            return
        await ack()
        self._spawn(self._deny_with_reason(approval_id, who, reason_from_view(view)), "deny modal")

    async def _deny_with_reason(self, approval_id: str, who: str, note: str | None) -> None:
        refusal = await self.service.handle_decision(approval_id, who, "deny", note)
        if refusal:  # lost a race with another decision
            await self._tell_beside_card(approval_id, who, refusal)

    async def _tell_beside_card(self, approval_id: str, who: str, text: str) -> None:
        """An ephemeral answer in the thread of the approval's card (a modal's
        submission has no message to answer next to)."""
        approval = await self.service.approvals.get(approval_id)
        if approval is not None and approval.card_ref and slack_user_id(who):
            channel, ts = parse_card_ref(approval.card_ref)
            thread = await self._thread_of_card(approval.task_id, channel, ts)
            await self.tell(thread, who, text)

    # -- "Edit and approve…" (issue #20) -------------------------------------------

    async def _on_edit_click(
        self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any], action: dict[str, Any]
    ) -> None:
        await ack()
        self._spawn(self._open_modal(body, action, "approve", edit_modal), "edit-and-approve click")

    async def _on_edit_submit(
        self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any], view: dict[str, Any]
    ) -> None:
        user = clicker(body)
        approval_id = view.get("private_metadata")
        if not user or not isinstance(approval_id, str) or not approval_id:
            await ack()
            return
        who = f"{PLATFORM}:{user}"
        command = command_from_view(view)
        refusal, _ = await self._precheck(approval_id, who, "approve")
        if refusal is None and command is None:
            refusal = "Type the command to run instead."
        if refusal is None and command is not None:
            # Said in the modal, before anything is stored: blocked, or no command.
            refusal = edit_refusal(command)
        if refusal:  # keep the modal open and say why, right under the input
            await ack(response_action="errors", errors={EDIT_BLOCK: refusal[:150]})
            return
        await ack()
        assert command is not None
        self._spawn(self._edit(approval_id, who, command), "edit modal")

    async def _edit(self, approval_id: str, who: str, command: str) -> None:
        refusal = await self.service.handle_edit(approval_id, who, command)
        if refusal:
            await self._tell_beside_card(approval_id, who, refusal)

    async def _thread_of_card(self, task_id: str, channel: str, ts: str) -> Thread:
        task = await self.service.tasks.get_task(task_id)
        if task is not None and task.conversation:
            with contextlib.suppress(ValueError):
                return Thread.parse(task.conversation)
        return Thread(PLATFORM, channel, ts)

    async def _precheck(self, approval_id: str, who: str, decision: str) -> tuple[str | None, str]:
        """A quick read-only look (the decision itself is still taken exactly once
        by the service): why `who` could not decide, and what the approval runs."""
        approval = await self.service.approvals.get(approval_id)
        if approval is None:
            return "That approval does not exist.", ""
        what = self.service.shown_command(approval)
        # The approval's channel's policy: an approver of another channel is
        # refused here, before a modal (deny with reason, edit) opens.
        refusal = await self.service.decision_refusal(who, approval, decision)
        if refusal:
            return refusal, what
        if approval.decision is not None:
            return f"Already decided: {approval.decision}. Nothing changed.", what
        return None, what

    async def _on_unknown_action(
        self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any]
    ) -> None:
        await ack()
        actions = body.get("actions") if isinstance(body.get("actions"), list) else []
        logger.warning("unknown Slack action ignored: %r", [a.get("action_id") for a in actions])

    async def _tell_clicker(self, body: dict[str, Any], user: str, text: str) -> None:
        """An ephemeral answer where the click happened (in the card's thread)."""
        container = body.get("container") if isinstance(body.get("container"), dict) else {}
        message = body.get("message") if isinstance(body.get("message"), dict) else {}
        channel_info = body.get("channel") if isinstance(body.get("channel"), dict) else {}
        channel = container.get("channel_id") or channel_info.get("id")
        if not isinstance(channel, str):
            logger.info("no channel to answer %s in: %s", user, text)
            return
        root = container.get("thread_ts") or message.get("thread_ts")
        await self.tell(Thread(PLATFORM, channel, root), f"{PLATFORM}:{user}", text)

    # -- inbound: /duck -----------------------------------------------------------

    async def _on_command(
        self,
        ack: Callable[..., Awaitable[Any]],
        command: dict[str, Any],
        respond: Callable[..., Awaitable[Any]],
    ) -> None:
        user, channel = command.get("user_id"), command.get("channel_id")
        if not isinstance(user, str) or not isinstance(channel, str):
            await ack()
            return
        who = f"{PLATFORM}:{user}"
        policy = self.service.policy
        origin = text_field(command, "user_team") or text_field(command, "team_id")
        if not policy.may_ask(who, origin=origin):
            await ack(text=policy.refuse_ask_text(who), response_type="ephemeral")
            return
        if not policy.answers_in(PLATFORM, channel):
            await ack(
                text="DuckLM does not answer in this channel (DUCKLM_CHANNELS).",
                response_type="ephemeral",
            )
            return
        # The text arrives entity-encoded (and with <…> sequences when the command
        # escapes users and links): decode it to what was typed, undo autocorrect.
        raw = command.get("text") if isinstance(command.get("text"), str) else ""
        text, note = ascii_command(decode_mrkdwn(raw, purpose="command").text)
        if is_run(text):
            verb, _, rest = text.partition(" ")
            text = f"{verb} {unwrap_code(rest.strip())}"
            if note:
                self._remember_note(text, note)
        job = self._spawn(self._command(channel, user, text, note), "/duck")
        # Answer in the ack when the command is quick (nearly all are); else ack
        # now and answer through the response_url when it is done.
        done, _ = await asyncio.wait({job}, timeout=COMMAND_ACK_BUDGET)
        if job in done and not job.cancelled():
            await ack(text=_ack_text(job), response_type="ephemeral")
            return
        await ack(text="Working on it…", response_type="ephemeral")
        job.add_done_callback(
            lambda j: self._spawn(
                respond(text=_ack_text(j), response_type="ephemeral", replace_original=False),
                "/duck late answer",
            )
        )

    async def _command(
        self, channel: str, user: str, text: str, note: str | None = None
    ) -> str | None:
        try:
            reply = await self.service.handle_command(
                Thread(PLATFORM, channel), f"{PLATFORM}:{user}", text, open_thread=True
            )
        except SlackApiError as exc:
            if exc.response.get("error") in ("not_in_channel", "channel_not_found"):
                return (
                    "I can't post in this channel. Invite me first (`/invite @DuckLM`), "
                    "then try again."
                )
            raise
        if not reply:
            return f"Running it in a thread in this channel. {note}" if note else None
        if note:
            reply = f"{reply}\n\n{note}"
        # An ephemeral answer is for reading, not an archive: `task <id>` can be long.
        return clip_mrkdwn(to_mrkdwn(reply), 3 * MESSAGE_LIMIT, "_(cut; see `ducklm events`)_")

    # -- outbound: ChatBackend --------------------------------------------------------

    async def send(self, thread: Thread, text: str) -> str | None:
        """Post Markdown as mrkdwn. A long text is cut at a line break and the
        whole of it attached as a file (or, failing that, sent in pieces)."""
        text = self._with_note(text)
        body = to_mrkdwn(text)
        ts = await self._post(thread, _first_post(body))
        if len(body) <= MESSAGE_LIMIT:
            return ts
        root = thread.root or ts
        try:
            await self._upload(thread.channel, root, text)
        except Exception:
            logger.warning("could not attach a long answer as a file; sending it in pieces")
            pieces = split_mrkdwn(body, MESSAGE_LIMIT)[1:]
            for piece in pieces[:MAX_CONTINUATIONS]:
                await self._post(thread.in_thread(root), piece)
            if len(pieces) > MAX_CONTINUATIONS:
                left = sum(len(p) for p in pieces[MAX_CONTINUATIONS:])
                await self._post(thread.in_thread(root), f"_(… {left} more characters not shown)_")
        return ts

    async def send_card(self, thread: Thread, card: ApprovalCard) -> str:
        assert self.client is not None
        blocks = approval_blocks(card)
        note = self._notes.get(card.command or "")
        if note:  # before the buttons, where the approver reads the command
            at = next((i for i, b in enumerate(blocks) if b.get("type") == "actions"), len(blocks))
            blocks.insert(
                at, {"type": "context", "elements": [{"type": "mrkdwn", "text": escape(note)}]}
            )
        reply = await self.client.chat_postMessage(
            channel=thread.channel,
            thread_ts=thread.root,
            text=approval_text(card),
            blocks=blocks,
            unfurl_links=False,
            unfurl_media=False,
        )
        return card_ref(thread.channel, str(reply["ts"]))

    async def find_card(self, thread: Thread, approval_id: str) -> str | None:
        """The card of this approval if the bot already posted it in the thread
        (found by its buttons' block_id), so recovery does not post it twice."""
        if thread.root is None or self.client is None:
            return None
        block_id = card_block_id(approval_id)

        def is_card(message: dict[str, Any]) -> bool:
            blocks = message.get("blocks")
            return isinstance(blocks, list) and any(
                isinstance(b, dict) and b.get("block_id") == block_id for b in blocks
            )

        ts = await find_own_message(
            self.client,
            thread.channel,
            thread.root,
            is_card,
            bot_user_id=self.bot_user_id,
            bot_id=self.bot_id,
        )
        return card_ref(thread.channel, ts) if ts else None

    async def find_answer(self, thread: Thread, text: str) -> bool:
        """Whether the bot's newest message in the thread is this answer's first
        post (what `send` would post first), so recovery does not say it twice."""
        if thread.root is None or self.client is None:
            return False
        latest = await latest_own_text(
            self.client,
            thread.channel,
            thread.root,
            bot_user_id=self.bot_user_id,
            bot_id=self.bot_id,
            skip=self._status_ts,
        )
        first = _first_post(to_mrkdwn(self._with_note(text)))
        return latest is not None and latest.strip() == first.strip()

    async def resolve_card(
        self, thread: Thread, card_ref: str, card: ApprovalCard, resolution: CardResolution
    ) -> None:
        assert self.client is not None
        channel, ts = parse_card_ref(card_ref)
        await self.client.chat_update(
            channel=channel,
            ts=ts,
            text=resolution_text(card, resolution),
            blocks=resolved_blocks(card, resolution),
        )

    async def update_card(self, thread: Thread, card_ref: str, card: ApprovalCard) -> None:
        assert self.client is not None
        channel, ts = parse_card_ref(card_ref)
        await self.client.chat_update(
            channel=channel, ts=ts, text=approval_text(card), blocks=approval_blocks(card)
        )

    async def tell(self, thread: Thread, user: str, text: str) -> None:
        assert self.client is not None
        user_id = slack_user_id(user)
        if user_id is None:  # not a Slack user: say it in the thread, addressed
            await self.send(thread, f"{user}: {text}")
            return
        await self.client.chat_postEphemeral(
            channel=thread.channel,
            user=user_id,
            text=clip_mrkdwn(to_mrkdwn(text), MESSAGE_LIMIT * 3, "…"),
            thread_ts=thread.root,
        )

    async def working(self, thread: Thread, status: str | None) -> None:
        """The :eyes: reaction says "on it" at once; a status message shows which
        tool runs, edited at most once per `status_interval`, deleted at the end."""
        reacting = self._reacting.pop(thread.key, None)
        if reacting is not None:  # the :eyes: first, then any status line
            with contextlib.suppress(Exception):
                await reacting
        state = self._status.setdefault(thread.key, _Status())
        async with state.lock:
            if status is None:
                await self._clear_status(thread, state)
                return
            first, state.first = state.first, False
            if first and self._triggers.get(thread.key):
                return  # the reaction on the question already says "on it"
            state.wanted = status
            if state.ts is None:
                await self._show_status(thread, state)
            elif state.flush is None:
                wait = state.last + self.status_interval - time.monotonic()
                if wait <= 0:
                    await self._show_status(thread, state)
                else:
                    state.flush = self._spawn(self._flush_status(thread, state, wait), "status")

    async def _flush_status(self, thread: Thread, state: _Status, wait: float) -> None:
        await asyncio.sleep(wait)
        async with state.lock:
            state.flush = None
            if state.ts is not None and self._status.get(thread.key) is state:
                await self._show_status(thread, state)

    async def _show_status(self, thread: Thread, state: _Status) -> None:
        assert self.client is not None
        text = f"_{to_mrkdwn(state.wanted or '')}_"
        if state.wanted == state.shown:
            return
        state.last = time.monotonic()
        state.shown = state.wanted
        if state.ts is None:
            reply = await self.client.chat_postMessage(
                channel=thread.channel, thread_ts=thread.root, text=text
            )
            state.ts = str(reply["ts"])
            self._status_ts.add(state.ts)
        else:
            await self.client.chat_update(channel=thread.channel, ts=state.ts, text=text)

    async def _clear_status(self, thread: Thread, state: _Status) -> None:
        assert self.client is not None
        self._status.pop(thread.key, None)
        if state.flush is not None:
            state.flush.cancel()
            state.flush = None
        triggers = self._triggers.get(thread.key)
        if triggers:
            channel, ts = triggers.pop(0)
            if not triggers:
                self._triggers.pop(thread.key, None)
            await self._react(channel, ts, "eyes", remove=True)
        if state.ts is not None:
            try:
                await self.client.chat_delete(channel=thread.channel, ts=state.ts)
            except SlackApiError as exc:
                logger.info("could not delete status message: %s", exc)
            self._status_ts.discard(state.ts)

    # -- notes on converted commands -------------------------------------------------

    def _remember_note(self, command: str, note: str) -> None:
        """Keep what autocorrect undoing changed in `command` (the text after
        `run`), for its card and its direct answer; bounded."""
        verb, _, rest = command.partition(" ")
        key = rest.strip() if verb.lower() == "run" else command
        self._notes[key] = note
        while len(self._notes) > MAX_NOTES:
            del self._notes[next(iter(self._notes))]

    def _with_note(self, text: str) -> str:
        """`text` as `send` posts it: with its command's note, if it has one."""
        note = self._note_for_answer(text)
        return f"{text}\n\n_{note}_" if note else text

    def _note_for_answer(self, text: str) -> str | None:
        """A direct command's answer names the command (`$ cmd` or `` `cmd` … ``,
        see runtime.loop.format_direct_result); its note goes with it."""
        for command in list(self._notes):
            if f"$ {command}\n" in text or f"`$ {command}`" in text or f"`{command}` " in text:
                return self._notes.pop(command)  # said once; the next run may be typed plainly
        return None

    # -- Web API helpers ------------------------------------------------------------------

    async def _post(self, thread: Thread, mrkdwn: str) -> str:
        assert self.client is not None
        reply = await self.client.chat_postMessage(
            channel=thread.channel,
            thread_ts=thread.root,
            text=mrkdwn,
            unfurl_links=False,
            unfurl_media=False,
        )
        return str(reply["ts"])

    async def _upload(self, channel: str, thread_ts: str, markdown: str) -> None:
        assert self.client is not None
        await self.client.files_upload_v2(
            channel=channel,
            thread_ts=thread_ts,
            content=markdown,
            filename="answer.md",
            title="Full answer",
        )

    async def _react(self, channel: str, ts: str, emoji: str, *, remove: bool = False) -> None:
        assert self.client is not None
        try:
            if remove:
                await self.client.reactions_remove(channel=channel, timestamp=ts, name=emoji)
            else:
                await self.client.reactions_add(channel=channel, timestamp=ts, name=emoji)
        except SlackApiError as exc:  # already_reacted, no_reaction, missing scope: cosmetic
            logger.info("reaction %s on %s/%s: %s", emoji, channel, ts, exc.response.get("error"))


def _first_post(body: str) -> str:
    """The mrkdwn `send` posts first for `body`: all of it, or a long one's head
    (`find_answer` compares with this, so the two cannot drift apart)."""
    if len(body) <= MESSAGE_LIMIT:
        return body
    return clip_mrkdwn(body, MESSAGE_LIMIT, LONG_ANSWER_CUT)


def _ack_text(job: asyncio.Task[str | None]) -> str:
    if job.cancelled():
        return "Sorry, that command was interrupted."
    if job.exception() is not None:
        return "Sorry, that command failed inside DuckLM; the log has the details."
    return job.result() or "Running it in a thread in this channel."
