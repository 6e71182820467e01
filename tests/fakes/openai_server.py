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
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
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
    "Raw",
    "RecordedRequest",
    "Reply",
    "Text",
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


Reply = Text | Error | Hang | Drop | Raw
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

    async def _answer(
        self, request: web.Request, recorded: RecordedRequest, reply: Reply
    ) -> web.StreamResponse:
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
        prompt, completion = reply.usage
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        ident = f"chatcmpl-fake-{next(self._ids)}"
        created = int(time.time())
        stream = reply.stream if reply.stream is not None else bool(recorded.body.get("stream"))
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if reply.reasoning_content is not None:
                message["reasoning_content"] = reply.reasoning_content
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": recorded.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
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

        events: list[dict[str, Any]] = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"reasoning_content": p}) for p in _pieces(reply.reasoning_content or "")]
        events += [chunk({"content": p}) for p in _pieces(reply.content)]
        events.append(chunk({}, finish="stop"))
        events.append(
            {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": recorded.model,
                "choices": [],
                "usage": usage,
            }
        )
        for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest_asyncio.fixture
async def model_server() -> AsyncIterator[FakeModelServer]:
    """A started FakeModelServer (no API key), stopped after the test."""
    server = FakeModelServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
