"""Everything MCP that a runtime holds: the config, the servers, their tools, the report.

`McpToolbox.start(path)` never raises: a config file that cannot be used, a
server that will not start or a tool DuckLM cannot take are each one line of
`report()`, and whatever is left works. The runtime prints that report at
start and closes the toolbox on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from runtime.tools.mcp.config import McpConfig, McpConfigError, load_config
from runtime.tools.mcp.session import McpServer, start_servers
from runtime.tools.mcp.tool import McpTool, model_name, stricter_than_config

logger = logging.getLogger("ducklm.mcp")


class McpToolbox:
    def __init__(
        self,
        config: McpConfig | None,
        servers: list[McpServer],
        tools: list[McpTool],
        report: list[str],
        *,
        problems: int,
    ) -> None:
        self.config = config
        self.servers = servers
        self.tools = tools
        self._report = report
        self.problems = problems

    @classmethod
    async def start(cls, path: str | Path, *, max_output: int = 64 * 1024) -> McpToolbox:
        """Load the config, start its servers and wrap their tools. Never raises."""
        try:
            config = load_config(path)
        except McpConfigError as exc:
            line = f"mcp: config error, no MCP tools this run: {exc}"
            logger.warning(line)
            return cls(None, [], [], [line], problems=1)
        servers = await start_servers(config)
        tools: list[McpTool] = []
        report: list[str] = []
        problems = 0
        taken: set[str] = set()
        for disabled in (s for s in config.servers if not s.active):
            report.append(f"mcp: server '{disabled.name}' is disabled in {config.path}")
        for server in servers:
            if server.state != "ready":
                problems += 1
                report.append(f"mcp: {server.unavailable_reason()}; its tools are not offered")
                continue
            wanted = set(server.config.read_only)
            listed_names = {t.name for t in server.tools}
            mine: list[McpTool] = []
            notes: list[str] = []
            for listed in sorted(server.tools, key=lambda t: t.name):
                name = model_name(server.name, listed.name, taken)
                read_only = listed.name in wanted
                try:
                    tool = McpTool(
                        server, listed, name=name, read_only=read_only, max_output=max_output
                    )
                except ValueError as exc:
                    problems += 1
                    notes.append(f"tool '{listed.name}' skipped: {exc}")
                    continue
                if read_only and stricter_than_config(listed):
                    notes.append(
                        f"'{listed.name}' is read_only in the config but the server says it "
                        "changes things: it needs approval"
                    )
                taken.add(name)
                mine.append(tool)
            unknown = sorted(wanted - listed_names)
            if unknown:
                problems += 1
                notes.append(f"read_only names no tool of this server: {', '.join(unknown)}")
            tools.extend(mine)
            auto = sum(1 for t in mine if t.read_only and not stricter_than_config(t.listed))
            line = (
                f"mcp: server '{server.name}' ready "
                f"({server.config.transport}, {server.config.where}): "
                f"{len(mine)} tool(s), {auto} run unasked, the rest need approval"
            )
            report.append("; ".join([line, *notes]))
        for line in report:
            logger.info(line)
        return cls(config, servers, tools, report, problems=problems)

    def report(self) -> list[str]:
        """One line per server (and one for a config error), for the start-time notice."""
        return list(self._report)

    def secret_values(self) -> list[str]:
        """Credentials from the config (`env`, `headers`), to be redacted everywhere."""
        if self.config is None:
            return []
        return [value for server in self.config.servers for value in server.secret_values()]

    async def close(self) -> None:
        """Stop every server at once (each bounded), so shutdown takes one server's time."""
        outcomes = await asyncio.gather(
            *(server.close() for server in self.servers), return_exceptions=True
        )
        for server, outcome in zip(self.servers, outcomes, strict=True):
            if isinstance(outcome, Exception):  # one server's failure must not stop the rest
                logger.error("mcp: closing server '%s' failed: %s", server.name, outcome)
