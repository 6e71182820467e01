"""Slack: slack-bolt's AsyncApp over Socket Mode (default) or HTTP.

Inbound, every listener acks at once and hands the work to a job this class
keeps a strong reference to (bolt's own fire-and-forget futures can be
garbage-collected mid-run); the long work then runs in `ChatService`.

    app_mention / DM / reply in a bot thread -> service.submit_message
    thread reply "approve"/"deny …"/"always"  -> service.handle_thread_reply
    button click                              -> service.handle_decision
    "Deny with reason…" modal                 -> service.handle_decision(…, note)
    /duck …                                   -> service.handle_command

Outbound, `SlackPlatform` is the service's `ChatBackend` for "slack".

Slack retries an event it thinks was not delivered (and bolt does not notice),
and one @-mention arrives twice (`app_mention` and `message.*`). Both are
de-duplicated in the store, so neither a retry after a restart nor the second
copy starts a second task: event ids in a global middleware, (channel, ts) just
before a message becomes a task.
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
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.backend import (
    ApprovalCard,
    CardResolution,
    ChatBackend,
    Platform,
    PlatformStartError,
    Thread,
)
from bot.service import ChatService
from bot.slack.blocks import (
    ACTION_DENY_REASON,
    DECISIONS,
    DENY_REASON_VIEW,
    REASON_BLOCK,
    approval_blocks,
    approval_text,
    deny_reason_modal,
    reason_from_view,
    resolution_text,
    resolved_blocks,
)
from bot.slack.format import MESSAGE_LIMIT, clip_mrkdwn, split_mrkdwn, to_mrkdwn
from bot.slack.parsing import (
    PLATFORM,
    card_ref,
    clicker,
    malformed_actions,
    parse_card_ref,
    plain_text,
    slack_user_id,
    text_field,
    ts_key,
)
from runtime.settings import Settings

logger = logging.getLogger("ducklm.slack")

T = TypeVar("T")

EVENTS_PATH = "/slack/events"
COMMAND = "/duck"
DEFAULT_API_URL = "https://slack.com/api/"

# Message subtypes that are still a person writing; everything else (edits,
# deletions, joins, bot messages, …) is ignored.
_PERSON_SUBTYPES = {None, "file_share", "thread_broadcast"}
MAX_INPUT_CHARS = 12_000  # a question longer than this is cut before the model sees it
MAX_HISTORY = 30  # earlier thread messages given to the model
MAX_HISTORY_CHARS = 4_000  # per message
MAX_CONTINUATIONS = 5  # extra messages when a long answer cannot be attached as a file
COMMAND_ACK_BUDGET = 2.0  # seconds to answer /duck in the ack; Slack allows 3
SOCKET_CONNECT_TIMEOUT = 15.0
STOP_GRACE = 5.0
RATE_LIMIT_RETRIES = 5
MAX_SEEN_IN_MEMORY = 10_000


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
        self._runner: web.AppRunner | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        self._status: dict[str, _Status] = {}
        self._status_ts: set[str] = set()  # our status messages, left out of history
        self._triggers: dict[str, list[tuple[str, str]]] = {}  # thread key -> reacted messages
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

    async def drain(self) -> None:
        """Wait until no Slack job (event, click, command) is left; tests use it."""
        while self._jobs:
            await asyncio.wait(set(self._jobs))

    def _web_client(self, token: str) -> AsyncWebClient:
        base_url = self.settings.slack_api_url or DEFAULT_API_URL
        client = AsyncWebClient(
            token=token,
            base_url=base_url if base_url.endswith("/") else base_url + "/",
            logger=logger,
        )
        # slack-sdk retries only connection errors by default; a 429 would drop
        # the message. This handler sleeps for Retry-After and tries again.
        client.retry_handlers = [
            AsyncConnectionErrorRetryHandler(),
            AsyncRateLimitErrorRetryHandler(max_retry_count=RATE_LIMIT_RETRIES),
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
        app.middleware(self._deduplicate)
        app.event("app_mention")(self._on_mention)
        app.event("message")(self._on_message)
        app.action(re.compile("^(" + "|".join(DECISIONS) + ")$"))(self._on_decision_click)
        app.action(ACTION_DENY_REASON)(self._on_deny_reason_click)
        app.action(re.compile(".*"))(self._on_unknown_action)  # first match wins: keep last
        app.view(DENY_REASON_VIEW)(self._on_deny_reason_submit)
        app.command(COMMAND)(self._on_command)
        return app

    async def _listen(self, app: AsyncApp) -> None:
        web_app = web.Application()
        web_app.router.add_post(EVENTS_PATH, self._http_request)
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
            return bool(await deliveries.claim(key))
        except Exception:
            # Better a rare duplicate than a lost message when the store hiccups.
            logger.exception("could not record Slack delivery %s", key)
            return True

    # -- inbound: events --------------------------------------------------------

    async def _deduplicate(
        self, body: dict[str, Any], next: Callable[[], Awaitable[BoltResponse]]
    ) -> BoltResponse | None:
        """Global middleware: a delivery whose event_id was seen is acked and
        dropped. Slack retries (X-Slack-Retry-Num) carry the same event_id."""
        event_id = body.get("event_id") if body.get("type") == "event_callback" else None
        if isinstance(event_id, str) and event_id:
            if not await self._claim(f"slack:event:{event_id}"):
                logger.info("duplicate Slack delivery %s ignored", event_id)
                # A response without next() would be a 404, which Slack retries.
                return BoltResponse(status=200, body="")
        return await next()

    async def _on_mention(self, event: dict[str, Any]) -> None:
        self._spawn(self._handle_message(event, mentioned=True), "app_mention")

    async def _on_message(self, event: dict[str, Any]) -> None:
        self._spawn(self._handle_message(event, mentioned=False), "message")

    async def _handle_message(self, event: Any, *, mentioned: bool) -> None:
        if not isinstance(event, dict) or event.get("subtype") not in _PERSON_SUBTYPES:
            return
        if event.get("bot_id") or event.get("bot_profile"):
            return  # other bots (and us): no bot-to-bot loops
        user, channel, ts = (
            text_field(event, "user"),
            text_field(event, "channel"),
            text_field(event, "ts"),
        )
        if not (user and channel and ts) or user == self.bot_user_id:
            return
        thread_ts = text_field(event, "thread_ts")
        thread = Thread(PLATFORM, channel, thread_ts or ts)
        if not mentioned and event.get("channel_type") != "im":
            # In channels only replies in a thread the bot works in are for it;
            # an @-mention anywhere arrives as app_mention too.
            if not thread_ts or not await self.service.is_bot_thread(thread):
                return
        if not await self._claim(f"slack:msg:{channel}:{ts}"):
            return  # the same message, delivered as app_mention and as message
        who = f"{PLATFORM}:{user}"
        text = plain_text(text_field(event, "text") or "", self.bot_user_id)
        if thread_ts and await self.service.handle_thread_reply(thread, who, text):
            return
        if not text:  # a bare mention (or a file without words)
            if mentioned:
                await self.send(thread, "Hi! Ask me something, or try `/duck help`.")
            return
        if len(text) > MAX_INPUT_CHARS:
            text = text[:MAX_INPUT_CHARS] + f"\n[message cut at {MAX_INPUT_CHARS} characters]"
        await self._react(channel, ts, "eyes")  # "on it", within a second
        self._triggers.setdefault(thread.key, []).append((channel, ts))
        history = await self._history(channel, thread_ts, ts) if thread_ts else []
        self.service.submit_message(thread, who, text, history)

    async def _history(self, channel: str, root: str, before: str) -> list[dict[str, str]]:
        """The thread's earlier messages as chat history (ours → assistant)."""
        assert self.client is not None
        try:
            reply = await self.client.conversations_replies(channel=channel, ts=root, limit=200)
        except SlackApiError as exc:
            logger.warning("could not read thread %s/%s: %s", channel, root, exc)
            return []
        history: list[dict[str, str]] = []
        for message in reply.get("messages") or []:
            ts = message.get("ts")
            if not isinstance(ts, str) or ts_key(ts) >= ts_key(before):
                continue
            if ts in self._status_ts or message.get("subtype") not in _PERSON_SUBTYPES | {
                "bot_message"
            }:
                continue
            own = message.get("user") == self.bot_user_id or (
                self.bot_id is not None and message.get("bot_id") == self.bot_id
            )
            content = plain_text(message.get("text") or "", self.bot_user_id)
            if content:
                role = "assistant" if own else "user"
                history.append({"role": role, "content": content[:MAX_HISTORY_CHARS]})
        return history[-MAX_HISTORY:]

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
        refusal = await self.service.handle_decision(approval_id, f"{PLATFORM}:{user}", decision)
        if refusal:
            await self._tellclicker(body, user, refusal)

    async def _on_deny_reason_click(
        self, ack: Callable[..., Awaitable[Any]], body: dict[str, Any], action: dict[str, Any]
    ) -> None:
        await ack()
        self._spawn(self._open_reason_modal(body, action), "deny-with-reason click")

    async def _open_reason_modal(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        assert self.client is not None
        user, approval_id = clicker(body), action.get("value")
        trigger_id = body.get("trigger_id")
        if not user or not isinstance(approval_id, str) or not isinstance(trigger_id, str):
            logger.warning("malformed deny-with-reason click ignored")
            return
        # Say "no" before someone types a reason that cannot be used.
        refusal, what = await self._precheck(approval_id, f"{PLATFORM}:{user}", "deny")
        if refusal:
            await self._tellclicker(body, user, refusal)
            return
        await self.client.views_open(
            trigger_id=trigger_id, view=deny_reason_modal(approval_id, what)
        )

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
        if not refusal:
            return
        # Lost a race with another decision: tell them next to the card.
        approval = await self.service.approvals.get(approval_id)
        user = slack_user_id(who)
        if approval is not None and approval.card_ref and user:
            channel, ts = parse_card_ref(approval.card_ref)
            thread = await self._thread_of_card(approval.task_id, channel, ts)
            await self.tell(thread, who, refusal)

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
        refusal = self.service.policy.refuse_decision(who, approval, decision)
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

    async def _tellclicker(self, body: dict[str, Any], user: str, text: str) -> None:
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
        text = command.get("text") if isinstance(command.get("text"), str) else ""
        job = self._spawn(self._command(channel, user, text), "/duck")
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

    async def _command(self, channel: str, user: str, text: str) -> str | None:
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
            return None
        # An ephemeral answer is for reading, not an archive: `task <id>` can be long.
        return clip_mrkdwn(to_mrkdwn(reply), 3 * MESSAGE_LIMIT, "_(cut; see `ducklm events`)_")

    # -- outbound: ChatBackend --------------------------------------------------------

    async def send(self, thread: Thread, text: str) -> str | None:
        """Post Markdown as mrkdwn. A long text is cut at a line break and the
        whole of it attached as a file (or, failing that, sent in pieces)."""
        body = to_mrkdwn(text)
        if len(body) <= MESSAGE_LIMIT:
            return await self._post(thread, body)
        head = clip_mrkdwn(body, MESSAGE_LIMIT, "_(long answer cut here; the full text follows)_")
        ts = await self._post(thread, head)
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
        reply = await self.client.chat_postMessage(
            channel=thread.channel,
            thread_ts=thread.root,
            text=approval_text(card),
            blocks=approval_blocks(card),
            unfurl_links=False,
            unfurl_media=False,
        )
        return card_ref(thread.channel, str(reply["ts"]))

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

    async def tell(self, thread: Thread, user: str, text: str) -> None:
        assert self.client is not None
        user_id = slack_user_id(user)
        if user_id is None:  # not a Slack user: say it in the thread, addressed
            await self.send(thread, f"{user}: {text}")
            return
        await self.client.chat_postEphemeral(
            channel=thread.channel,
            user=user_id,
            text=to_mrkdwn(text)[: MESSAGE_LIMIT * 3],
            thread_ts=thread.root,
        )

    async def working(self, thread: Thread, status: str | None) -> None:
        """The :eyes: reaction says "on it" at once; a status message shows which
        tool runs, edited at most once per `status_interval`, deleted at the end."""
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


def _ack_text(job: asyncio.Task[str | None]) -> str:
    if job.cancelled():
        return "Sorry, that command was interrupted."
    if job.exception() is not None:
        return "Sorry, that command failed inside DuckLM; the log has the details."
    return job.result() or "Running it in a thread in this channel."
