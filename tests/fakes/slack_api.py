"""A local fake of Slack's Web API and Socket Mode, plus helpers that sign
requests exactly as Slack signs them.

`FakeSlack` is one aiohttp server on 127.0.0.1 at a free port:

- `POST|GET /api/<method>`: the Web API. Every call is recorded with its merged
  parameters (query string, form body or JSON body) and the token it used.
  Messages posted with `chat.postMessage` are kept per channel, so
  `conversations.replies`, `chat.update` and `chat.delete` behave like Slack's.
- `GET /socket-mode`: a Socket Mode websocket. `apps.connections.open` hands
  out its `ws://` URL; tests push envelopes with `push()` and read the acks the
  app sends back from `acks`.
- `POST /upload/<file_id>`: the upload URL of the files v2 flow.
- `POST /webhook/<name>`: a `response_url` target (records the JSON body).

Tests can make any method answer HTTP 429 with `Retry-After` (`rate_limit`) or
an `{"ok": false}` error (`fail`) a number of times.

`SlackSender` posts signed Events API, interactivity and slash-command requests
to a bolt app, the way Slack would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

from tests.fakes.loopback import serve_on_loopback

__all__ = [
    "APP_TOKEN",
    "BOT_ID",
    "BOT_TOKEN",
    "BOT_USER",
    "SIGNING_SECRET",
    "TEAM",
    "Call",
    "FakeSlack",
    "SlackSender",
    "block_actions_payload",
    "event_callback",
    "sign",
    "slash_command_form",
    "view_submission_payload",
]

BOT_TOKEN = "xoxb-fake-bot-token"
APP_TOKEN = "xapp-fake-app-token"
SIGNING_SECRET = "fake-signing-secret"
BOT_USER = "UBOTDUCK"
BOT_ID = "BDUCK001"
TEAM = "TFAKE0001"
APP_ID = "AFAKE0001"

_STOP_TIMEOUT = 10.0


@dataclass
class Call:
    """One Web API call as the fake received it."""

    method: str
    params: dict[str, Any]
    token: str | None
    at: float = field(default_factory=time.monotonic)
    result: dict[str, Any] = field(default_factory=dict)  # what the fake answered


@dataclass
class _Trouble:
    times: int
    status: int = 200
    error: str | None = None
    retry_after: int | None = None


def _jsonish(value: Any) -> Any:
    """Form and query values of `blocks`/`files` arrive JSON-encoded; decode them."""
    if isinstance(value, str) and value[:1] in "[{":
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


class FakeSlack:
    """See the module docstring. `start()` binds a free port; `stop()` closes it."""

    def __init__(
        self,
        *,
        bot_token: str = BOT_TOKEN,
        app_token: str = APP_TOKEN,
        ts_base: int = 1_700_000_000,
    ) -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.calls: list[Call] = []
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.ephemeral: list[dict[str, Any]] = []
        self.uploads: dict[str, bytes] = {}
        self.webhooks: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.base_url = ""
        self._ts = itertools.count(1)
        self._ts_base = ts_base
        self._trouble: dict[str, _Trouble] = {}
        # method -> (gate, which calls it holds); see hold()
        self._held: dict[str, tuple[asyncio.Event, Callable[[dict[str, Any]], bool] | None]] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self._socket_connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        # conversations.replies answers at most this many messages per page, as
        # Slack does for some apps since 2025 (15), whatever `limit` asks for.
        self.replies_page_size = 1000

    # -- addresses -----------------------------------------------------------

    @property
    def api_url(self) -> str:
        """What DUCKLM_SLACK_API_URL is set to."""
        return f"{self.base_url}/api/"

    def webhook_url(self, name: str = "response") -> str:
        return f"{self.base_url}/webhook/{name}"

    # -- scripting -----------------------------------------------------------

    def rate_limit(self, method: str, *, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next `times` calls of `method` with HTTP 429 and Retry-After."""
        self._trouble[method] = _Trouble(times, status=429, retry_after=retry_after)

    def fail(self, method: str, error: str, *, times: int = 1) -> None:
        """Answer the next `times` calls of `method` with `{"ok": false, "error": error}`."""
        self._trouble[method] = _Trouble(times, error=error)

    def hold(self, method: str, matching: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Keep the calls of `method` (those whose params match, if given) waiting,
        recorded but unanswered, until `release(method)`: freezes the bot at a known
        point (the crash tests kill it there)."""
        self._held.setdefault(method, (asyncio.Event(), matching))

    def release(self, method: str) -> None:
        held = self._held.pop(method, None)
        if held is not None:
            held[0].set()

    def next_ts(self) -> str:
        # Increasing, unique, and shaped like Slack's "1700000000.000100".
        return f"{self._ts_base + next(self._ts)}.000100"

    def add_message(
        self,
        channel: str,
        text: str,
        *,
        user: str | None = None,
        thread_ts: str | None = None,
        bot_id: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Put a message into a channel's history as if a person had written it;
        returns the stored message (with its fresh `ts`). `fields` adds more of a
        message's fields (`blocks`, `team`, `user_team`, …)."""
        message: dict[str, Any] = {"type": "message", "ts": self.next_ts(), "text": text, **fields}
        if user:
            message["user"] = user
        if bot_id:
            message["bot_id"] = bot_id
        if thread_ts:
            message["thread_ts"] = thread_ts
        self.messages.setdefault(channel, []).append(message)
        return message

    # -- reading what happened -----------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def posted(self, channel: str | None = None) -> list[dict[str, Any]]:
        """Messages the bot posted (still present), in order."""
        found = []
        for chan, messages in self.messages.items():
            if channel is None or chan == channel:
                found += [m for m in messages if m.get("bot_id") == BOT_ID]
        return sorted(found, key=lambda m: float(m["ts"]))

    def message(self, channel: str, ts: str) -> dict[str, Any] | None:
        for m in self.messages.get(channel, []):
            if m["ts"] == ts:
                return m
        return None

    async def wait_for(
        self, predicate: Callable[[], Any], within: float = 30.0, what: str = "condition"
    ) -> Any:
        """Poll `predicate` (re-checked whenever a call arrives) until it is truthy."""
        deadline = time.monotonic() + within
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {within} s waiting for {what}; calls: "
                    f"{[c.method for c in self.calls]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))

    async def wait_for_calls(self, method: str, count: int = 1, within: float = 30.0) -> list[Call]:
        await self.wait_for(
            lambda: len(self.calls_to(method)) >= count, within, f"{count} × {method}"
        )
        return self.calls_to(method)

    # -- Socket Mode ----------------------------------------------------------

    async def wait_for_socket(self, within: float = 30.0) -> None:
        await asyncio.wait_for(self._socket_connected.wait(), within)

    async def push(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        envelope_id: str | None = None,
        retry_attempt: int = 0,
        retry_reason: str = "",
    ) -> str:
        """Send an envelope (`events_api`, `interactive`, `slash_commands`) to every
        connected app; returns its envelope_id."""
        envelope_id = envelope_id or str(uuid.uuid4())
        envelope = {
            "envelope_id": envelope_id,
            "payload": payload,
            "type": kind,
            "accepts_response_payload": kind != "events_api",
        }
        if kind == "events_api":
            envelope["retry_attempt"] = retry_attempt
            envelope["retry_reason"] = retry_reason
        if not self._sockets:
            raise AssertionError("no Socket Mode connection is open")
        for ws in list(self._sockets):
            await ws.send_str(json.dumps(envelope))
        return envelope_id

    async def wait_for_ack(self, envelope_id: str, within: float = 30.0) -> dict[str, Any]:
        return await self.wait_for(
            lambda: next((a for a in self.acks if a.get("envelope_id") == envelope_id), None),
            within,
            f"ack of envelope {envelope_id}",
        )

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("FakeSlack is already started")
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)  # the SDK GETs a few reads
        app.router.add_get("/socket-mode", self._socket)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_post("/webhook/{name}", self._webhook)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        port = await serve_on_loopback(runner)
        self._runner = runner
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for method in list(self._held):
            self.release(method)
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        await asyncio.wait_for(runner.cleanup(), _STOP_TIMEOUT)

    # -- the Web API ----------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        raw = await request.read()
        if raw:
            if request.content_type == "application/json":
                with contextlib.suppress(ValueError):
                    body = json.loads(raw)
                    if isinstance(body, dict):
                        params.update(body)
            else:
                params.update(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        params = {k: _jsonish(v) for k, v in params.items()}
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() or params.pop("token", None)
        call = Call(method, params, token)
        self.calls.append(call)
        self._changed.set()
        held = self._held.get(method)
        if held is not None and (held[1] is None or held[1](params)):
            await held[0].wait()

        trouble = self._trouble.get(method)
        if trouble and trouble.times > 0:
            trouble.times -= 1
            if trouble.status == 429:
                call.result = {"ok": False, "error": "ratelimited"}
                return web.json_response(
                    call.result,
                    status=429,
                    headers={"Retry-After": str(trouble.retry_after or 1)},
                )
            call.result = {"ok": False, "error": trouble.error}
            return web.json_response(call.result)

        expected = self.app_token if method == "apps.connections.open" else self.bot_token
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if token != expected:
            call.result = {"ok": False, "error": "invalid_auth"}
        elif handler is None:
            call.result = {"ok": True}
        else:
            call.result = handler(params)
        return web.json_response(call.result)

    def _m_auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://fake.slack.com/",
            "team": "Fake",
            "user": "duck",
            "team_id": TEAM,
            "user_id": BOT_USER,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _m_apps_connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": self.base_url.replace("http://", "ws://") + "/socket-mode"}

    def _m_chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel"))
        message = {
            "type": "message",
            "ts": self.next_ts(),
            "text": params.get("text") or "",
            "user": BOT_USER,
            "bot_id": BOT_ID,
        }
        if params.get("blocks"):
            message["blocks"] = params["blocks"]
        if params.get("thread_ts"):
            message["thread_ts"] = str(params["thread_ts"])
        self.messages.setdefault(channel, []).append(message)
        return {"ok": True, "channel": channel, "ts": message["ts"], "message": message}

    def _m_chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(params.get("channel")), str(params.get("ts"))
        message = self.message(channel, ts)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if "text" in params:
            message["text"] = params["text"]
        if "blocks" in params:
            message["blocks"] = params["blocks"]
        return {"ok": True, "channel": channel, "ts": ts, "text": message["text"]}

    def _m_chat_delete(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(params.get("channel")), str(params.get("ts"))
        message = self.message(channel, ts)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        self.messages[channel].remove(message)
        return {"ok": True, "channel": channel, "ts": ts}

    def _m_chat_postEphemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        self.ephemeral.append(params)
        return {"ok": True, "message_ts": self.next_ts()}

    def _m_conversations_replies(self, params: dict[str, Any]) -> dict[str, Any]:
        """Oldest first, paged with cursors like Slack: `limit` capped by
        `replies_page_size`, `latest`/`oldest`/`inclusive` applied, the root
        always first on the first page, `has_more` and `next_cursor` while more is left."""
        channel, root = str(params.get("channel")), str(params.get("ts"))
        thread = sorted(
            (
                m
                for m in self.messages.get(channel, [])
                if m["ts"] == root or m.get("thread_ts") == root
            ),
            key=lambda m: float(m["ts"]),
        )
        if not thread:
            return {"ok": False, "error": "thread_not_found"}
        inclusive = str(params.get("inclusive", "")).lower() in ("1", "true")
        latest, oldest = params.get("latest"), params.get("oldest")

        def within(m: dict[str, Any]) -> bool:
            ts = float(m["ts"])
            if latest is not None and (
                ts > float(latest) or (ts == float(latest) and not inclusive)
            ):
                return False
            return not (
                oldest is not None
                and (ts < float(oldest) or (ts == float(oldest) and not inclusive))
            )

        replies = [m for m in thread if m["ts"] != root and within(m)]
        try:
            limit = int(params.get("limit") or 1000)
        except ValueError:
            return {"ok": False, "error": "invalid_arguments"}
        size = max(1, min(limit, self.replies_page_size))
        start = int(str(params.get("cursor") or "0").removeprefix("page:") or 0)
        # The root comes first on every page, as Slack repeats the parent message.
        page = replies[start : start + size - 1] if size > 1 else replies[start : start + 1]
        after = start + len(page)
        result: dict[str, Any] = {"ok": True, "messages": [thread[0], *page]}
        if after < len(replies):
            result["has_more"] = True
            result["response_metadata"] = {"next_cursor": f"page:{after}"}
        else:
            result["has_more"] = False
        return result

    def _m_views_open(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "view": {"id": f"V{next(self._ts):08d}", **(params.get("view") or {})}}

    def _m_files_getUploadURLExternal(self, params: dict[str, Any]) -> dict[str, Any]:
        file_id = f"F{next(self._ts):08d}"
        return {"ok": True, "upload_url": f"{self.base_url}/upload/{file_id}", "file_id": file_id}

    def _m_files_completeUploadExternal(self, params: dict[str, Any]) -> dict[str, Any]:
        files = params.get("files") or []
        missing = [f["id"] for f in files if f.get("id") not in self.uploads]
        if missing:
            return {"ok": False, "error": "file_not_found"}
        return {"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in files]}

    # -- other routes -----------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        self.uploads[request.match_info["file_id"]] = await request.read()
        self._changed.set()
        return web.Response(text="OK - uploaded")

    async def _webhook(self, request: web.Request) -> web.Response:
        with contextlib.suppress(ValueError):
            self.webhooks.append({"name": request.match_info["name"], **(await request.json())})
        self._changed.set()
        return web.Response(text="ok")

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(
            json.dumps(
                {"type": "hello", "num_connections": 1, "connection_info": {"app_id": APP_ID}}
            )
        )
        self._socket_connected.set()
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    with contextlib.suppress(ValueError):
                        self.acks.append(json.loads(msg.data))
                    self._changed.set()
        finally:
            self._sockets.remove(ws)
            if not self._sockets:
                self._socket_connected.clear()
        return ws


# -- building and signing Slack's requests ----------------------------------------


def sign(secret: str, body: str, timestamp: int | None = None) -> dict[str, str]:
    """The headers Slack sends: v0 HMAC-SHA256 over `v0:<timestamp>:<body>`."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature}


def event_callback(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    """The Events API wrapper around one event."""
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM,
        "api_app_id": APP_ID,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": int(time.time()),
        "authorizations": [
            {"team_id": TEAM, "user_id": BOT_USER, "is_bot": True, "is_enterprise_install": False}
        ],
    }


def block_actions_payload(
    *,
    user: str,
    action_id: str,
    value: str,
    channel: str,
    message_ts: str,
    thread_ts: str | None = None,
    response_url: str = "",
) -> dict[str, Any]:
    """A `block_actions` interaction: a button click on a message."""
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM},
        "api_app_id": APP_ID,
        "token": "legacy-verification-token",
        "team": {"id": TEAM, "domain": "fake"},
        "container": {
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel,
            "is_ephemeral": False,
            **({"thread_ts": thread_ts} if thread_ts else {}),
        },
        "trigger_id": f"{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex[:8]}",
        "channel": {"id": channel, "name": "ops"},
        "message": {
            "type": "message",
            "ts": message_ts,
            "bot_id": BOT_ID,
            "text": "approval",
            **({"thread_ts": thread_ts} if thread_ts else {}),
        },
        "response_url": response_url,
        "state": {"values": {}},
        "actions": [
            {
                "action_id": action_id,
                "block_id": "block",
                "type": "button",
                "value": value,
                "text": {"type": "plain_text", "text": action_id},
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }


def slash_command_form(
    *, user: str, channel: str, text: str, command: str = "/duck", response_url: str = ""
) -> dict[str, str]:
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM,
        "team_domain": "fake",
        "channel_id": channel,
        "channel_name": "ops",
        "user_id": user,
        "user_name": user.lower(),
        "command": command,
        "text": text,
        "api_app_id": APP_ID,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": f"{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex[:8]}",
    }


@dataclass
class Answer:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text) if self.text else None


class SlackSender:
    """Posts requests to a bolt app's `/slack/events` as Slack does, signed."""

    def __init__(self, url: str, secret: str = SIGNING_SECRET) -> None:
        self.url = url
        self.secret = secret
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SlackSender:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(
        self,
        body: str,
        content_type: str,
        *,
        secret: str | None = None,
        timestamp: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        assert self._session is not None, "use `async with SlackSender(...)`"
        all_headers = {"Content-Type": content_type, **sign(secret or self.secret, body, timestamp)}
        all_headers.update(headers or {})
        async with self._session.post(self.url, data=body.encode(), headers=all_headers) as resp:
            return Answer(resp.status, await resp.text())

    async def event(
        self, envelope: dict[str, Any], *, retry_num: int | None = None, **kw: Any
    ) -> Answer:
        headers = kw.pop("headers", None) or {}
        if retry_num:
            headers |= {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
        return await self.post(json.dumps(envelope), "application/json", headers=headers, **kw)

    async def interaction(self, payload: dict[str, Any] | str, **kw: Any) -> Answer:
        raw = payload if isinstance(payload, str) else json.dumps(payload)
        return await self.post(
            urlencode({"payload": raw}), "application/x-www-form-urlencoded", **kw
        )

    async def command(self, form: dict[str, str], **kw: Any) -> Answer:
        return await self.post(urlencode(form), "application/x-www-form-urlencoded", **kw)


def view_submission_payload(
    *, user: str, callback_id: str, private_metadata: str, values: dict[str, Any]
) -> dict[str, Any]:
    """A modal's `view_submission`; `values` is `view.state.values`."""
    return {
        "type": "view_submission",
        "team": {"id": TEAM, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM},
        "api_app_id": APP_ID,
        "token": "legacy-verification-token",
        "trigger_id": f"{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex[:8]}",
        "view": {
            "id": "VFAKE0001",
            "team_id": TEAM,
            "type": "modal",
            "callback_id": callback_id,
            "private_metadata": private_metadata,
            "state": {"values": values},
            "hash": "1.fake",
            "app_id": APP_ID,
            "bot_id": BOT_ID,
        },
    }
