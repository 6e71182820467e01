"""`ShellTool`: the `shell_exec_safe` tool the model calls.

Checks the arguments, reports the classification as the tool's assessment,
and at run time classifies again, never trusting a caller that cleared as
read-only a command that needs approval, before handing it to `execute`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from runtime.tools.base import Assessment, Tool, ToolArgumentError, ToolResult
from runtime.tools.shell.classifier import classify
from runtime.tools.shell.execution import _refusal, execute
from runtime.tools.shell.limits import MAX_COMMAND_CHARS


class ShellTool(Tool):
    name: ClassVar[str] = "shell_exec_safe"
    description: ClassVar[str] = (
        "Run one shell command in the workspace and return its output. Read-only "
        "commands (ls, cat, grep, git status/log/diff, df, ps, systemctl status, "
        "kubectl get, …) run at once; anything that writes, installs, controls "
        "services or uses the network waits for a person's approval; destroying "
        "the system is refused. Prefer plain read-only commands without "
        "redirections or substitutions."
    )
    args_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
    }

    def __init__(self, workspace: Path, *, timeout: float = 60.0, max_output: int = 65536) -> None:
        self.workspace = Path(workspace)
        self.timeout = timeout
        self.max_output = max_output

    @staticmethod
    def _command(args: dict[str, Any]) -> str:
        if not isinstance(args, dict):
            raise ToolArgumentError("shell_exec_safe takes an object with 'command'")
        command = args.get("command")
        if command is None:
            raise ToolArgumentError("shell_exec_safe needs a 'command'")
        if not isinstance(command, str):
            raise ToolArgumentError("'command' must be a string")
        if not command.strip():
            raise ToolArgumentError("'command' must not be empty")
        if len(command) > MAX_COMMAND_CHARS:
            raise ToolArgumentError(
                f"'command' is {len(command)} characters; the limit is {MAX_COMMAND_CHARS}"
            )
        return command

    def assess(self, args: dict[str, Any]) -> Assessment:
        return classify(self._command(args)).assessment()

    async def run(self, args: dict[str, Any], assessment: Assessment) -> ToolResult:
        command = self._command(args)
        fresh = classify(command)
        if fresh.blocked:
            return _refusal(command, fresh, f"Blocked: {fresh.reason}")
        if fresh.requires_approval and not assessment.requires_approval:
            # The caller cleared this as read-only; it is not. Never trust that.
            return _refusal(
                command, fresh, f"Refused: this command needs approval ({fresh.reason})"
            )
        return await execute(
            command,
            fresh,
            workspace=self.workspace,
            timeout=self.timeout,
            max_output=self.max_output,
        )
