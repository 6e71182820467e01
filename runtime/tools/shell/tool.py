"""`ShellTool`: the `shell_exec_safe` tool the model calls.

Checks the arguments, reports the classification as the tool's assessment,
and at run time classifies again, never trusting a caller that cleared as
read-only a command that needs approval, before handing it to `execute`.

Fail safe: when unasked commands must be sandboxed (`DUCKLM_SANDBOX` is not
`off`) and bwrap does not work here, a read-only command needs approval like
any other, and the assessment says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from runtime.tools.base import Assessment, Tool, ToolArgumentError, ToolResult
from runtime.tools.shell.classifier import classify
from runtime.tools.shell.execution import _refusal, execute
from runtime.tools.shell.limits import MAX_COMMAND_CHARS
from runtime.tools.shell.sandbox import SandboxConfig


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

    def __init__(
        self,
        workspace: Path,
        *,
        timeout: float = 60.0,
        max_output: int = 65536,
        sandbox: SandboxConfig | None = None,
    ) -> None:
        self.workspace = Path(workspace)
        self.timeout = timeout
        self.max_output = max_output
        self.sandbox = sandbox if sandbox is not None else SandboxConfig()

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
        assessment = classify(self._command(args)).assessment()
        if not assessment.requires_approval and self.sandbox.required_but_missing:
            return assessment.model_copy(
                update={"requires_approval": True, "reason": self.sandbox.missing_reason()}
            )
        return assessment

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
        # The gateway runs a call whose assessment needs approval only once a
        # person or a rule approved it; anything else runs unasked.
        return await execute(
            command,
            fresh,
            workspace=self.workspace,
            timeout=self.timeout,
            max_output=self.max_output,
            sandbox=self.sandbox,
            approved=assessment.requires_approval,
        )
