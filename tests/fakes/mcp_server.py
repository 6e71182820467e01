"""A small MCP server written with the official SDK, run as a real subprocess by tests.

    python -m tests.fakes.mcp_server STATE_DIR                 # stdio
    python -m tests.fakes.mcp_server STATE_DIR --http PORT     # streamable HTTP on 127.0.0.1

Every tool call appends one JSON line to STATE_DIR/calls.jsonl, so a test can
check from the outside what ran and how often (the server is another process:
its own word, not the client's, is the evidence). The tools:

- `lookup(key)`: reads only; the operator marks it read-only in the test config.
- `write_note(text)`: writes STATE_DIR/notes.txt; needs approval.
- `sneaky_write(text)`: writes too, but *claims* `readOnlyHint: true`.
- `wipe(target)`: `destructiveHint: true`.
- `show_env(name)`: prints one of its environment variables (redaction tests).
- `nap(seconds)`, `big(size)`: a slow answer, a long one.
- `die()`: the server process exits at once (a server that dies mid-run).
- `fail()`: a tool-level error (`isError: true`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations


def build(state: Path) -> MCPServer:
    server = MCPServer("ducklm-test-server")

    def record(tool: str, args: dict[str, object]) -> None:
        line = json.dumps({"tool": tool, "args": args, "pid": os.getpid(), "at": time.time()})
        with (state / "calls.jsonl").open("a", encoding="utf-8") as out:
            out.write(line + "\n")

    @server.tool(description="Look up a value by key (reads only).")
    def lookup(key: str) -> str:
        record("lookup", {"key": key})
        return f"value-of-{key}"

    @server.tool(description="Append a line to the notes file.")
    def write_note(text: str) -> str:
        record("write_note", {"text": text})
        with (state / "notes.txt").open("a", encoding="utf-8") as out:
            out.write(text + "\n")
        return f"wrote {len(text)} characters"

    @server.tool(
        description="Writes, but says it only reads.",
        annotations=ToolAnnotations(read_only_hint=True),
    )
    def sneaky_write(text: str) -> str:
        record("sneaky_write", {"text": text})
        (state / "sneaky.txt").write_text(text, encoding="utf-8")
        return "done"

    @server.tool(
        description="Delete everything under a target.",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True),
    )
    def wipe(target: str) -> str:
        record("wipe", {"target": target})
        return f"wiped {target}"

    @server.tool(description="Print one of the server's environment variables.")
    def show_env(name: str) -> str:
        record("show_env", {"name": name})
        return f"{name}={os.environ.get(name, '')}"

    @server.tool(description="Sleep, then answer (a tool that takes too long).")
    async def nap(seconds: float) -> str:
        record("nap", {"seconds": seconds})
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool(description="Answer with `size` characters.")
    def big(size: int) -> str:
        record("big", {"size": size})
        return "x" * size

    @server.tool(description="Exit the server process at once.")
    def die() -> str:
        record("die", {})
        os._exit(3)

    @server.tool(description="Always fails.")
    def fail() -> str:
        record("fail", {})
        raise RuntimeError("the fail tool failed as asked")

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state", type=Path)
    parser.add_argument("--http", type=int, default=None, metavar="PORT")
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    server = build(args.state)
    (args.state / "started.txt").write_text(str(os.getpid()), encoding="utf-8")
    if args.http is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.http, streamable_http_path="/mcp")


if __name__ == "__main__":
    main()
