"""The one door every tool call goes through: validation, judgement, then the run.

The gateway never decides *who* may approve; it only says whether a call may
run now (`approved` tells it a person or a rule already allowed it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.tools.base import Assessment, Tool, ToolArgumentError, ToolResult
from runtime.tools.files import ListDirTool, ReadFileTool
from runtime.tools.redaction import Redactor
from runtime.tools.shell import ShellTool
from runtime.tools.shell.sandbox import SandboxConfig

if TYPE_CHECKING:
    from runtime.metrics import Metrics

logger = logging.getLogger("ducklm.tools")


def normalize_action(action: Any) -> dict[str, Any]:
    """The canonical {"tool", "args", "reason"} form stored with approvals and rules."""
    if not isinstance(action, dict):
        raise ToolArgumentError("an action must be an object with 'tool' and 'args'")
    tool = action.get("tool")
    args = action.get("args") or {}
    reason = action.get("reason")
    if not isinstance(tool, str) or not tool.strip():
        raise ToolArgumentError("an action needs a 'tool' name")
    if not isinstance(args, dict):
        raise ToolArgumentError("'args' must be an object")
    return {
        "tool": tool.strip(),
        "args": args,
        "reason": reason if isinstance(reason, str) else None,
    }


def _assessment_metadata(assessment: Assessment) -> dict[str, Any]:
    return assessment.model_dump()


class ToolGateway:
    def __init__(
        self,
        tools: Iterable[Tool],
        *,
        redactor: Redactor | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.tools: dict[str, Tool] = {tool.name: tool for tool in tools}
        # Without the bot's credentials it still redacts well-known secret formats.
        self.redactor = redactor if redactor is not None else Redactor()
        self.metrics = metrics  # run durations by tool (runtime/metrics.py)

    @classmethod
    def default(
        cls,
        workspace: str | Path,
        *,
        shell_timeout: float = 60.0,
        shell_max_output: int = 64 * 1024,
        redactor: Redactor | None = None,
        sandbox: SandboxConfig | None = None,
        extra_tools: Iterable[Tool] = (),
        metrics: Metrics | None = None,
    ) -> ToolGateway:
        """The built-in tools for `workspace`, plus `extra_tools` (MCP servers'
        tools, shared by every workspace's gateway)."""
        root = Path(workspace)
        builtin: list[Tool] = [
            ShellTool(root, timeout=shell_timeout, max_output=shell_max_output, sandbox=sandbox),
            ReadFileTool(root),
            ListDirTool(root),
        ]
        extra = list(extra_tools)
        names = [tool.name for tool in builtin + extra]
        clash = sorted({name for name in names if names.count(name) > 1})
        if clash:
            # A later tool must never silently replace another (least of all the shell).
            raise ValueError(f"two tools share a name: {', '.join(clash)}")
        return cls(builtin + extra, redactor=redactor, metrics=metrics)

    def specs(self) -> list[dict[str, Any]]:
        """What the action model is told about each tool."""
        return [
            {"tool": t.name, "description": t.description, "args": t.args_schema}
            for t in self.tools.values()
        ]

    def assess(self, action: dict[str, Any]) -> tuple[Tool, Assessment]:
        """Judge a normalized action; raises ToolArgumentError for unknown tools or bad args."""
        tool = self.tools.get(action["tool"])
        if tool is None:
            known = ", ".join(sorted(self.tools))
            raise ToolArgumentError(f"unknown tool '{action['tool']}' (available: {known})")
        return tool, tool.assess(action["args"])

    def describe(self, action: dict[str, Any]) -> str | None:
        """The one line a card shows for a normalized action: the command of a
        shell action, or what a tool with a `describe` method says (MCP tools:
        `mcp server/tool {args}`)."""
        tool = self.tools.get(action.get("tool", ""))
        args = action.get("args") or {}
        describe = getattr(tool, "describe", None)
        if callable(describe):
            try:
                return describe(args)
            except Exception:  # a card without a line beats no card
                logger.exception("describing %s failed", action.get("tool"))
                return None
        command = args.get("command") if isinstance(args, dict) else None
        return command if isinstance(command, str) else None

    def leaves_the_process(self, action: dict[str, Any]) -> bool:
        """Whether running this normalized action does anything beyond reading
        inside this process (unknown tools count as leaving: be safe)."""
        tool = self.tools.get(action.get("tool", ""))
        return tool is None or not tool.in_process_read

    async def run_action(self, action: Any, approved: bool = False) -> ToolResult:
        """Run an action if it may run now.

        Results that stop before running carry `pending_approval` (a person must
        decide) or `blocked` (nobody can) in their metadata.

        Every result leaves redacted (output, error and metadata; the metadata
        says `redacted: <count>` and the kinds): this is the one door between a
        tool and what the loop records, shows the model and returns to chat.
        The action itself is never altered.
        """
        return self.redactor.redact_result(await self._run_action(action, approved))

    async def _run_action(self, action: Any, approved: bool) -> ToolResult:
        try:
            normalized = normalize_action(action)
            tool, assessment = self.assess(normalized)
        except ToolArgumentError as exc:
            return ToolResult(ok=False, error=str(exc), metadata={"invalid": True})
        metadata = _assessment_metadata(assessment)
        if assessment.blocked:
            return ToolResult(ok=False, error=f"Blocked: {assessment.reason}", metadata=metadata)
        if assessment.requires_approval and not approved:
            return ToolResult(
                ok=False,
                error=f"Needs approval: {assessment.reason}",
                metadata={**metadata, "pending_approval": True},
            )
        started = time.monotonic()
        try:
            result = await tool.run(normalized["args"], assessment)
        except ToolArgumentError as exc:
            return ToolResult(ok=False, error=str(exc), metadata=metadata)
        except Exception as exc:  # a tool bug must not take the task down with it
            logger.exception("tool %s crashed", tool.name)
            return ToolResult(
                ok=False,
                error=f"{tool.name} failed: {type(exc).__name__}: {exc}",
                metadata=metadata,
            )
        finally:
            if self.metrics is not None:
                self.metrics.tool_ran(tool.name, time.monotonic() - started)
        return result.model_copy(update={"metadata": {**metadata, **result.metadata}})
