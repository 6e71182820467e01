"""A local OpenAI-compatible Chat Completions server that answers from a script.

Tests drive the real `ModelClient` (httpx, retries, streaming) against it, so
nothing of ours is mocked. Replies are queued per model name (the request's
"model" field) and consumed first in, first out; when a model's queue is empty
its handler answers, then its default, and otherwise the server answers HTTP
500 naming the model, so a test that forgot to script a reply fails loudly.

    server = FakeModelServer()
    await server.start()
    server.reply("thinker", Error(500), Text("hello"))
    ...
    await server.stop()

`start_in_thread()` / `stop_thread()` run the same server on its own event loop
in a daemon thread, for tests that drive a subprocess or a synchronous client.

Like OpenAI, the server honours `tools`: a scripted `ToolCalls` is answered
with `tool_calls` (arguments as a JSON string, several calls in one reply,
streamed as deltas when the request streams), and it checks what OpenAI checks
(function names, `tool` messages answering the calls before them, the
`json_schema` form). A scripted `Text` is answered as text whatever the request
asked for, as a model that chose not to call a tool is. The quirks of other
servers are switched on per test through `server.quirks` (see `Quirks`):
llama-cpp-python ignoring `tools` under `tool_choice: auto`, answering
`json_schema` with a 500, accepting only its own schema form; Ollama refusing
`tools` for a model without them; any server cutting a reply at `max_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio
from aiohttp import web

from tests.fakes.loopback import serve_on_loopback

__all__ = [
    "Drop",
    "Error",
    "FakeModelServer",
    "Hang",
    "Quirks",
    "Raw",
    "RecordedRequest",
    "Reply",
    "Text",
    "ToolCalls",
    "model_server",
]

# How long start/stop may take before we call the fake broken; tests must
# never wait without a bound.
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


@dataclass
class Text:
    """A normal completion. `stream=None` streams iff the request asked to."""

    content: str
    reasoning_content: str | None = None
    usage: tuple[int, int] = (10, 5)  # (prompt_tokens, completion_tokens)
    stream: bool | None = None
    finish_reason: str = "stop"


@dataclass
class ToolCalls:
    """A reply with native tool calls: `calls` are (name, arguments) pairs, the
    arguments an object (sent as its JSON string, as OpenAI does) or a string
    sent verbatim (for broken JSON). `text` is what the model writes instead
    when the request carries no tools (or the server ignores them); without
    it such a request is answered with a loud 500."""

    calls: list[tuple[str, dict[str, Any] | str]]
    text: str | None = None
    content: str | None = None  # text alongside the calls (some models add a line)
    usage: tuple[int, int] = (10, 5)
    stream: bool | None = None
    finish_reason: str = "tool_calls"


@dataclass
class Quirks:
    """Behaviours of real servers other than OpenAI, off by default."""

    # llama-cpp-python: with `tool_choice` "auto" (or absent) `tools` are
    # ignored and the model answers in text; a forced function still works.
    ignore_tools_auto: bool = False
    # A server that refuses `tools`, in its own words and body shape: "ollama"
    # (a model without a tool template, 400), "vllm" (started without
    # --enable-auto-tool-choice, 400), "llama-server" (without --jinja, 500).
    reject_tools: str | None = None
    # The response_format forms accepted ("json_schema", "json_object_schema",
    # "json_object"); None accepts all (OpenAI takes both of its own, and
    # ignores a stray "schema" key). llama-cpp-python: {"json_object",
    # "json_object_schema"} with format_refusal_status 500.
    response_formats: set[str] | None = None
    format_refusal_status: int = 400
    # Cut the content at max_tokens (4 characters a token) with finish_reason
    # "length", as every server does when the bound is reached.
    truncate_at_max_tokens: bool = False


@dataclass
class Error:
    """An HTTP error in OpenAI's format, or `body` verbatim when given."""

    status: int
    message: str = "error"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None


@dataclass
class Hang:
    """Sleep, then answer an empty completion (for client timeouts)."""

    seconds: float


@dataclass
class Drop:
    """Close the connection without sending a response."""


@dataclass
class Raw:
    """Any bytes with any status, for garbage and odd providers."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"


Reply = Text | ToolCalls | Error | Hang | Drop | Raw
Handler = Callable[["RecordedRequest"], Reply | Awaitable[Reply]]


class _Headers(dict[str, str]):
    """A plain dict whose lookups ignore case, as HTTP header names do."""

    def __init__(self, items: Any = ()) -> None:
        super().__init__((str(k).lower(), str(v)) for k, v in dict(items).items())

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


@dataclass
class RecordedRequest:
    model: str
    body: dict[str, Any]
    headers: dict[str, str]  # case-insensitive lookups: headers["Authorization"]


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def _error_json(status: int, message: str, code: str | None = None) -> str:
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "error"),
                "param": None,
                "code": code,
            }
        }
    )


def _pieces(text: str, size: int = 8) -> list[str]:
    # Several small deltas, so the client's assembly is actually exercised.
    return [text[i : i + size] for i in range(0, len(text), size)]


class FakeModelServer:
    """An aiohttp server on 127.0.0.1 at a free port (see the module docstring)."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.base_url = ""
        self._lock = threading.Lock()  # the thread mode touches queues from two threads
        self._queues: dict[str, deque[Reply]] = {}
        self._handlers: dict[str, Handler] = {}
        self._defaults: dict[str, Reply] = {}
        self._ids = itertools.count(1)
        self.quirks = Quirks()
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # -- scripting ---------------------------------------------------------

    def reply(self, model: str, *replies: Reply) -> None:
        """Enqueue replies for `model`, answered first in, first out."""
        with self._lock:
            self._queues.setdefault(model, deque()).extend(replies)

    def set_handler(self, model: str, fn: Handler) -> None:
        """Answer `model` dynamically whenever its queue is empty."""
        with self._lock:
            self._handlers[model] = fn

    def set_default(self, model: str, reply: Reply) -> None:
        """Answer `model` with `reply` when its queue is empty and it has no handler."""
        with self._lock:
            self._defaults[model] = reply

    def requests_for(self, model: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.model == model]

    # -- lifecycle in the current loop --------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("FakeModelServer is already started")
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle)
        # handler_cancellation: a client that gave up (timeout) cancels its
        # Hang; a short shutdown_timeout keeps stop() from waiting 60 s on one.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        port = await serve_on_loopback(runner)
        self._runner = runner
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            self._closing.set()
        await asyncio.wait_for(runner.cleanup(), _STOP_TIMEOUT)

    # -- lifecycle in a thread of its own -----------------------------------

    def start_in_thread(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FakeModelServer is already running in a thread")
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        thread = threading.Thread(target=run, name="fake-model-server", daemon=True)
        thread.start()
        if not started.wait(_START_TIMEOUT):
            raise RuntimeError("FakeModelServer did not start within 10 s")
        if failure:
            thread.join(_STOP_TIMEOUT)
            raise failure[0]
        self._thread, self._thread_loop = thread, loop

    def stop_thread(self) -> None:
        thread, loop = self._thread, self._thread_loop
        if thread is None or loop is None:
            return
        self._thread = self._thread_loop = None
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(_STOP_TIMEOUT + 1)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_STOP_TIMEOUT)

    # -- serving -------------------------------------------------------------

    def _next_reply(self, recorded: RecordedRequest) -> Reply | Handler | None:
        with self._lock:
            queue = self._queues.get(recorded.model)
            if queue:
                return queue.popleft()
            if recorded.model in self._handlers:
                return self._handlers[recorded.model]
            return self._defaults.get(recorded.model)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        model = body.get("model")
        recorded = RecordedRequest(
            model=model if isinstance(model, str) else "",
            body=body,
            headers=_Headers(request.headers),
        )
        with self._lock:
            self.requests.append(recorded)

        if self.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {self.api_key}":
                shown = auth.removeprefix("Bearer ").strip()
                hint = f"{shown[:3]}***{shown[-4:]}" if len(shown) > 8 else "***"
                return web.Response(
                    status=401,
                    text=_error_json(
                        401,
                        f"Incorrect API key provided: {hint}. You can find your API key "
                        "at https://platform.openai.com/account/api-keys.",
                        code="invalid_api_key",
                    ),
                    content_type="application/json",
                )
        if not body or not isinstance(model, str):
            return web.Response(
                status=400,
                text=_error_json(
                    400, "fake model server: the body is not a JSON object with a 'model' string"
                ),
                content_type="application/json",
            )

        refusal = self._refusal(body)
        if refusal is not None:
            return refusal
        scripted = self._next_reply(recorded)
        if scripted is None:
            return web.Response(
                status=500,
                text=_error_json(500, f"fake model server: no scripted reply for model {model!r}"),
                content_type="application/json",
            )
        if callable(scripted):
            try:
                result = scripted(recorded)
                reply = await result if inspect.isawaitable(result) else result
            except Exception as exc:  # a broken test handler must fail the test loudly
                return web.Response(
                    status=500,
                    text=_error_json(
                        500, f"fake model server: handler for {model!r} raised {exc!r}"
                    ),
                    content_type="application/json",
                )
        else:
            reply = scripted
        return await self._answer(request, recorded, reply)

    def _refusal(self, body: dict[str, Any]) -> web.Response | None:
        """What a real server refuses before the model runs, as it refuses it."""

        def refuse(status: int, message: str, param: str | None = None) -> web.Response:
            data = json.loads(_error_json(status, message))
            data["error"]["param"] = param
            return web.json_response(data, status=status)

        tools = body.get("tools")
        if tools is not None:
            if self.quirks.reject_tools is not None:
                return _tools_refusal(self.quirks.reject_tools, body["model"])
            if not isinstance(tools, list) or not tools:
                return refuse(
                    400,
                    "Invalid 'tools': empty array. Expected an array with minimum length 1.",
                    "tools",
                )
            for number, tool in enumerate(tools):
                function = tool.get("function") if isinstance(tool, dict) else None
                name = function.get("name") if isinstance(function, dict) else None
                if (
                    not isinstance(tool, dict)
                    or tool.get("type") != "function"
                    or not isinstance(name, str)
                ):
                    return refuse(
                        400,
                        f"Missing required parameter: 'tools[{number}].function'.",
                        f"tools[{number}]",
                    )
                if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
                    return refuse(
                        400,
                        f"Invalid 'tools[{number}].function.name': string does not match pattern. "
                        "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                        f"tools[{number}].function.name",
                    )
        problem = _message_problem(body.get("messages"))
        if problem is not None:
            return refuse(400, problem, "messages")
        response_format = body.get("response_format")
        if response_format is not None:
            form = _form_of(response_format)
            if form == "json_schema":
                spec = response_format.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                    return refuse(
                        400,
                        "Missing required parameter: 'response_format.json_schema.name'.",
                        "response_format.json_schema.name",
                    )
                if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", spec["name"]):
                    return refuse(
                        400,
                        "Invalid 'response_format.json_schema.name': does not match the pattern.",
                        "response_format.json_schema.name",
                    )
            accepted = self.quirks.response_formats
            if form is None or (accepted is not None and form not in accepted):
                status = self.quirks.format_refusal_status
                kind = (
                    response_format.get("type")
                    if isinstance(response_format, dict)
                    else response_format
                )
                return refuse(
                    status, f"Unsupported response_format type: {kind!r}", "response_format"
                )
        return None

    async def _answer(
        self, request: web.Request, recorded: RecordedRequest, reply: Reply
    ) -> web.StreamResponse:
        if isinstance(reply, ToolCalls):
            body = recorded.body
            ignored = self.quirks.ignore_tools_auto and body.get("tool_choice", "auto") in (
                "auto",
                None,
            )
            if body.get("tools") and not ignored:
                return await self._tool_calls(request, recorded, reply)
            if reply.text is None:
                return web.Response(
                    status=500,
                    text=_error_json(
                        500,
                        f"fake model server: ToolCalls scripted for {recorded.model!r} but the "
                        "request carried no tools (or a quirk ignored them) and no text was given",
                    ),
                    content_type="application/json",
                )
            return await self._text(
                request, recorded, Text(reply.text, usage=reply.usage, stream=reply.stream)
            )
        if isinstance(reply, Text):
            return await self._text(request, recorded, reply)
        if isinstance(reply, Error):
            if reply.body is not None:
                try:
                    json.loads(reply.body)
                    content_type = "application/json"
                except ValueError:
                    content_type = "text/plain"
                text = reply.body
            else:
                content_type, text = "application/json", _error_json(reply.status, reply.message)
            return web.Response(
                status=reply.status,
                text=text,
                content_type=content_type,
                headers=reply.headers,
            )
        if isinstance(reply, Hang):
            assert self._closing is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), reply.seconds)
            return await self._text(request, recorded, Text(""))
        if isinstance(reply, Drop):
            transport = request.transport
            if transport is not None:
                transport.abort()
            # Nothing reaches the client; aiohttp notices the closed transport.
            raise asyncio.CancelledError
        if isinstance(reply, Raw):
            return web.Response(
                status=reply.status, body=reply.body, headers={"Content-Type": reply.content_type}
            )
        raise TypeError(f"fake model server: not a Reply: {reply!r}")

    async def _text(
        self, request: web.Request, recorded: RecordedRequest, reply: Text
    ) -> web.StreamResponse:
        content, finish = reply.content, reply.finish_reason
        limit = recorded.body.get("max_tokens")
        if (
            self.quirks.truncate_at_max_tokens
            and isinstance(limit, int)
            and len(content) > 4 * limit
        ):
            content, finish = content[: 4 * limit], "length"
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reply.reasoning_content is not None:
            message["reasoning_content"] = reply.reasoning_content
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{"reasoning_content": p} for p in _pieces(reply.reasoning_content or "")]
        deltas += [{"content": p} for p in _pieces(content)]
        return await self._completion(
            request, recorded, next(self._ids), reply, message, deltas, finish
        )

    async def _tool_calls(
        self, request: web.Request, recorded: RecordedRequest, reply: ToolCalls
    ) -> web.StreamResponse:
        number = next(self._ids)
        calls = [
            {
                "id": f"call_{number}_{i}",
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
            for i, (name, args) in enumerate(reply.calls)
        ]
        message = {"role": "assistant", "content": reply.content, "tool_calls": calls}
        # OpenAI's shape: the id, type and name once, then the arguments in
        # pieces under the call's index.
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None}]
        deltas += [{"content": p} for p in _pieces(reply.content or "")]
        for index, call in enumerate(calls):
            first = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            deltas.append({"tool_calls": [first]})
            deltas += [
                {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                for piece in _pieces(call["function"]["arguments"], 5)
            ]
        return await self._completion(
            request, recorded, number, reply, message, deltas, reply.finish_reason
        )

    async def _completion(
        self,
        request: web.Request,
        recorded: RecordedRequest,
        number: int,
        reply: Text | ToolCalls,
        message: dict[str, Any],
        deltas: list[dict[str, Any]],
        finish: str | None,
    ) -> web.StreamResponse:
        """One completion as OpenAI sends it: a JSON body, or (when the request or
        the reply asks to stream) server-sent chunks carrying `deltas`, then the
        finish reason, then the usage."""
        prompt, completion = reply.usage
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        ident, created = f"chatcmpl-fake-{number}", int(time.time())
        stream = reply.stream if reply.stream is not None else bool(recorded.body.get("stream"))
        if not stream:
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": recorded.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": recorded.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        events = [chunk(delta) for delta in deltas]
        events.append(chunk({}, finish=finish))
        events.append({**chunk({}), "choices": [], "usage": usage})
        for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _tools_refusal(server: str, model: str) -> web.Response:
    if server == "ollama":
        message = f"registry.ollama.ai/library/{model} does not support tools"
        return web.Response(
            status=400, text=_error_json(400, message), content_type="application/json"
        )
    if server == "vllm":
        body = {
            "object": "error",
            "message": '"auto" tool choice requires --enable-auto-tool-choice and '
            "--tool-call-parser to be set",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
        return web.json_response(body, status=400)
    if server == "llama-server":
        body = {
            "error": {
                "code": 500,
                "message": "tools param requires --jinja flag",
                "type": "server_error",
            }
        }
        return web.json_response(body, status=500)
    raise ValueError(f"fake model server: no such tools refusal {server!r}")


def _form_of(response_format: Any) -> str | None:
    """Which structured-output form a request's response_format is, or None."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json_object_schema" if "schema" in response_format else "json_object"
    if kind == "json_schema":
        return "json_schema"
    if kind == "text":
        return "text"
    return None


def _message_problem(messages: Any) -> str | None:
    """OpenAI's checks on a conversation with tool calls, in its words."""
    if not isinstance(messages, list):
        return None  # the fake's own tests post bare bodies; nothing to check
    open_calls: set[str] = set()
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"Invalid type for 'messages[{number}]': expected an object."
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in open_calls:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'."
                )
            open_calls.discard(call_id)
            continue
        if open_calls:
            return (
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(sorted(open_calls))}"
            )
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                if not isinstance(call, dict) or not isinstance(call.get("id"), str):
                    return f"Missing required parameter: 'messages[{number}].tool_calls[0].id'."
                function = call.get("function")
                if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
                    return (
                        f"Invalid type for 'messages[{number}].tool_calls[0].function.arguments'"
                        ": expected a string."
                    )
                open_calls.add(call["id"])
    if open_calls:
        return (
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(sorted(open_calls))}"
        )
    return None


@pytest_asyncio.fixture
async def model_server() -> AsyncIterator[FakeModelServer]:
    """A started FakeModelServer (no API key), stopped after the test."""
    server = FakeModelServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
