"""Connections to MCP servers: started with the runtime, kept open, closed with it.

This is the only module that imports the `mcp` SDK; the package is imported
only when DUCKLM_MCP_CONFIG is set, so `ducklm tasks` and friends never pay for
it.

Each server is owned by one asyncio task that enters the SDK's `Client` and
holds it open until `close()`: the SDK's transports are anyio task groups and
cancel scopes, which must be left by the task that entered them. Calls come
from any task of the same event loop (one session answers concurrent calls).

A server that fails to start, or dies later, never takes the runtime down: its
state says why, its calls return that reason, and the others keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from runtime.tools.mcp.config import McpConfig, ServerConfig

logger = logging.getLogger("ducklm.mcp")

State = Literal["starting", "ready", "failed", "dead", "closed"]

# Bounded waits for a server's own shutdown (the SDK kills a stdio server's
# process group when it does not exit on its own).
_CLOSE_WAIT = 10.0
_LIST_PAGES = 50
_STDERR_TAIL = 600
# A dead server is started again on the next call to it, at most this often
# (seconds): a server that crashes on every call is not restarted in a loop.
RESTART_PAUSE = 30.0


class McpUnavailableError(RuntimeError):
    """The server cannot take calls now (it failed to start, died, or was closed)."""


@dataclass(frozen=True)
class ListedTool:
    """One tool as the server listed it (its own word, untrusted)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    read_only_hint: bool | None = None
    destructive_hint: bool | None = None


@dataclass
class CallOutcome:
    text: str
    is_error: bool
    duration_ms: int
    content_types: list[str] = field(default_factory=list)


def _describe_error(exc: BaseException) -> str:
    """A one-line reason from whatever the SDK raised (often an exception group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _render(result: Any) -> tuple[str, list[str]]:
    """The text of a CallToolResult: text blocks as they are, other blocks named."""
    parts: list[str] = []
    kinds: list[str] = []
    for block in result.content or []:
        kind = getattr(block, "type", "unknown")
        kinds.append(kind)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if text is not None else f"[resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.uri}]")
        else:  # image, audio: the model cannot use the bytes as text
            mime = getattr(block, "mime_type", "?")
            size = len(getattr(block, "data", "") or "")
            parts.append(f"[{kind} {mime}, {size} base64 characters, not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, sort_keys=True))
        kinds.append("structured")
    return "\n".join(parts), kinds


class _StderrTail:
    """A stdio server's stderr, kept as its last few hundred bytes (why a server
    would not start is usually there) and logged at debug level; never piling
    up, however chatty the server is over weeks."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        # Handed to the SDK for the child's stderr; our copy closes once spawned.
        self.writer: BinaryIO | None = os.fdopen(write, "wb", buffering=0)
        self._tail = bytearray()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._read, self._drain)
        self._open = True

    def spawned(self) -> None:
        """The child has its copy (or never will): ours must go, or EOF never comes."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _drain(self) -> None:
        while self._open:
            try:
                chunk = os.read(self._read, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # every writer is gone
                self._loop.remove_reader(self._read)
                return
            self._tail += chunk
            del self._tail[:-_STDERR_TAIL]
            logger.debug("mcp server '%s' stderr: %s", self._name, chunk.decode("utf-8", "replace"))

    def text(self) -> str:
        self._drain()  # what the server wrote just before it exited
        return self._tail.decode("utf-8", "replace")

    def close(self) -> None:
        self.spawned()
        if self._open:
            self._open = False
            self._loop.remove_reader(self._read)
            os.close(self._read)


class McpServer:
    """One configured server and its live session."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.name = config.name
        self.state: State = "starting"
        self.error: str | None = None
        self.tools: list[ListedTool] = []
        self.protocol_version: str | None = None
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._stderr: _StderrTail | None = None
        self._restart_lock = asyncio.Lock()
        self._last_restart: float | None = None
        self.restarts = 0
        self._died: str | None = None

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Connect and list tools, within the server's startup_timeout. Never raises."""
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._own(ready), name=f"mcp-server-{self.name}")
        try:
            await asyncio.wait_for(ready.wait(), self.config.startup_timeout)
        except TimeoutError:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=_CLOSE_WAIT)
            self.state = "failed"
            self.error = (
                f"did not connect and list its tools within {self.config.startup_timeout:g} s"
                + self._stderr_note()
            )

    async def _restart(self) -> None:
        """Start a dead server again, at most once per RESTART_PAUSE. Never raises.

        Only a later call restarts a server: the call during which it died is
        not repeated (it may have done part of its work)."""
        async with self._restart_lock:
            now = time.monotonic()
            if self.state != "dead" or (
                self._last_restart is not None and now - self._last_restart < RESTART_PAUSE
            ):
                return  # another call restarted it, or it is too soon
            self._last_restart = now
            # The first reason it died, not the last restart's (no growing message).
            died = self._died or self.error
            await self._end_session()
            self._stop = asyncio.Event()
            self.state = "starting"
            await self.start()
            if self.state == "ready":
                self.restarts += 1
                self._died = None
                logger.warning("mcp: server '%s' restarted (it had stopped: %s)", self.name, died)
            else:
                self.state = "dead"
                self._died = died
                self.error = f"{died}; trying again failed: {self.error}"
                logger.warning("mcp: server '%s' could not be restarted: %s", self.name, self.error)

    async def _end_session(self) -> None:
        """Leave the SDK client (its owner task does), bounded; then drop the stderr file."""
        self._stop.set()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=_CLOSE_WAIT)
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=_CLOSE_WAIT)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    async def _own(self, ready: asyncio.Event) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    client = await stack.enter_async_context(self._make_client())
                finally:
                    if self._stderr is not None:
                        self._stderr.spawned()
                self.tools = await self._list_tools(client)
                self.protocol_version = client.protocol_version
                self._client = client
                self.state = "ready"
                ready.set()
                await self._stop.wait()
        except Exception as exc:  # the SDK raises groups, OSError, MCPError...
            if self.state == "starting":
                self.state = "failed"
                self.error = _describe_error(exc) + self._stderr_note()
            else:
                self._mark_dead(_describe_error(exc))
        finally:
            self._client = None
            if self.state == "ready":
                if self._stop.is_set():
                    self.state = "closed"
                else:
                    self._mark_dead("its session ended")
            ready.set()

    def _make_client(self) -> Any:
        from mcp import Client, StdioServerParameters
        from mcp.client.stdio import stdio_client

        config = self.config
        if config.command is not None:
            self._stderr = _StderrTail(self.name)  # closed by _end_session
            params = StdioServerParameters(
                command=config.command,
                args=list(config.args),
                # The SDK passes only HOME, PATH, USER and the like, never the
                # bot's own tokens; the file's `env` adds what the server needs.
                env=dict(config.env),
                cwd=config.cwd,
            )
            return Client(stdio_client(params, errlog=self._stderr.writer))  # type: ignore[arg-type]
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        http = httpx2.AsyncClient(
            headers=dict(config.headers),
            timeout=httpx2.Timeout(30.0, read=max(300.0, config.timeout)),
        )
        return _HttpClient(http, Client(streamable_http_client(config.url, http_client=http)))

    async def _list_tools(self, client: Any) -> list[ListedTool]:
        listed: list[ListedTool] = []
        cursor: str | None = None
        for _ in range(_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                hints = tool.annotations
                listed.append(
                    ListedTool(
                        name=tool.name,
                        description=(tool.description or tool.title or "").strip(),
                        input_schema=dict(tool.input_schema or {}),
                        read_only_hint=hints.read_only_hint if hints else None,
                        destructive_hint=hints.destructive_hint if hints else None,
                    )
                )
            cursor = page.next_cursor
            if cursor is None:
                break
        return listed

    async def close(self) -> None:
        """Stop the session (and a stdio server's process), bounded."""
        if self.state in ("ready", "starting"):
            # First, so a call cut short by the shutdown is not reported as a death.
            self.state = "closed"
        await self._end_session()

    # -- calls --------------------------------------------------------------

    async def call(self, tool: str, args: dict[str, Any]) -> CallOutcome:
        """Call a tool. Raises McpUnavailableError when the server cannot answer."""
        if self.state == "dead":
            await self._restart()
        client = self._client
        if self.state != "ready" or client is None:
            raise McpUnavailableError(self.unavailable_reason())
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        started = time.monotonic()
        timeout = self.config.timeout
        try:
            # The SDK's own timeout, and ours around it in case a transport ignores it.
            result = await asyncio.wait_for(
                client.call_tool(tool, args, read_timeout_seconds=timeout), timeout + 5
            )
        except TimeoutError:
            raise McpUnavailableError(
                f"MCP server '{self.name}' did not answer {tool} within {timeout:g} s"
            ) from None
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise McpUnavailableError(
                    f"MCP server '{self.name}' did not answer {tool} within {timeout:g} s"
                ) from None
            if exc.code == CONNECTION_CLOSED:
                self._mark_dead(f"the connection closed during a call to {tool}")
                raise McpUnavailableError(self.unavailable_reason()) from None
            # A protocol-level error about this call (unknown tool, bad params):
            # the server is fine, the call is not.
            return CallOutcome(
                f"MCP error {exc.code}: {exc.message}",
                True,
                int((time.monotonic() - started) * 1000),
            )
        except (OSError, EOFError) as exc:
            self._mark_dead(f"{type(exc).__name__} during a call to {tool}")
            raise McpUnavailableError(self.unavailable_reason()) from None
        text, kinds = _render(result)
        return CallOutcome(
            text, bool(result.is_error), int((time.monotonic() - started) * 1000), kinds
        )

    # -- reporting ----------------------------------------------------------

    def _mark_dead(self, why: str) -> None:
        if self.state in ("closed", "failed", "dead"):
            return
        self.state = "dead"
        self.error = why + self._stderr_note()
        logger.warning("mcp: server '%s' stopped working: %s", self.name, self.error)

    def _stderr_note(self) -> str:
        """The end of a stdio server's stderr, for a report (one line)."""
        if self._stderr is None:
            return ""
        lines = [line.strip() for line in self._stderr.text().splitlines()]
        tail = [line for line in lines if line][-2:]
        return f" (stderr: {' | '.join(tail)})" if tail else ""

    def unavailable_reason(self) -> str:
        where = self.config.where
        if self.state == "failed":
            return f"MCP server '{self.name}' ({where}) failed to start: {self.error}"
        if self.state == "dead":
            gone = "is not running any more" if self.config.command else "stopped answering"
            return (
                f"MCP server '{self.name}' ({where}) {gone}: {self.error}. "
                f"DuckLM tries again on a later call (at most every {RESTART_PAUSE:g} s)."
            )
        return f"MCP server '{self.name}' is {self.state}"


class _HttpClient(contextlib.AbstractAsyncContextManager[Any]):
    """An SDK Client over streamable HTTP that also closes the httpx client it uses."""

    def __init__(self, http: Any, client: Any) -> None:
        self._http = http
        self._client = client

    async def __aenter__(self) -> Any:
        try:
            return await self._client.__aenter__()
        except BaseException:
            await self._http.aclose()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._client.__aexit__(*exc)
        finally:
            await self._http.aclose()


async def start_servers(config: McpConfig) -> list[McpServer]:
    """Start every enabled server at once; each ends ready or failed, within its timeout."""
    servers = [McpServer(server) for server in config.active]
    await asyncio.gather(*(server.start() for server in servers))
    return servers
