"""One MCP tool as a gateway Tool: its name for the model, its judgement, its run.

Trust runs one way. Only the operator's config can let a tool run unasked
(`read_only`); what the server says about a tool (`readOnlyHint`,
`destructiveHint`) can only make it stricter:

- not in `read_only`: approval, risk `medium`; `high` if the server says
  `destructiveHint: true`. `readOnlyHint: true` alone changes nothing, since
  a server may say anything about itself;
- in `read_only`: runs at once, risk `low`, unless the server contradicts the
  operator (`readOnlyHint: false` or `destructiveHint: true`): then approval
  as above (and a line at start says so).

Arguments are checked against the tool's `inputSchema` before anything runs
(jsonschema, which the SDK itself depends on), so a card never shows a call
the server would refuse, and a bad call costs no round trip.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, ClassVar

from runtime.tools.base import Assessment, Tool, ToolArgumentError, ToolResult
from runtime.tools.mcp.session import ListedTool, McpServer, McpUnavailableError

# OpenAI-style function names (what native tool calling sends back).
MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PREFIX = "mcp__"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_DESCRIBE_MAX = 300


def model_name(server: str, tool: str, taken: set[str]) -> str:
    """`mcp__<server>__<tool>`, made to fit the model-facing name rules: other
    characters become `_`, and a short hash of the real name is added when the
    name is too long or would clash with one already taken."""
    base = f"{PREFIX}{server}__{_UNSAFE.sub('_', tool)}"
    if len(base) <= 64 and base not in taken:
        return base
    digest = hashlib.sha256(f"{server}/{tool}".encode()).hexdigest()[:8]
    return f"{base[: 64 - 9]}_{digest}"


def stricter_than_config(listed: ListedTool) -> bool:
    """Whether the server's own hints contradict an operator's `read_only`."""
    return listed.read_only_hint is False or listed.destructive_hint is True


def _validator(schema: dict[str, Any]) -> Any:
    """A validator for the server's inputSchema; ValueError when the schema is unusable."""
    from jsonschema import exceptions, validators

    if schema.get("type", "object") != "object":
        raise ValueError("its inputSchema is not an object schema")
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        raise ValueError(f"its inputSchema is not valid JSON Schema: {exc.message}") from None
    return cls(schema)


class McpTool(Tool):
    """A tool of one MCP server, named and judged by DuckLM."""

    # name, description and args_schema are set per instance: one class, many tools.
    in_process_read: ClassVar[bool] = False

    def __init__(
        self,
        server: McpServer,
        listed: ListedTool,
        *,
        name: str,
        read_only: bool,
        max_output: int = 64 * 1024,
    ) -> None:
        if not MODEL_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid tool name")
        self.server = server
        self.listed = listed
        self.read_only = read_only
        self.max_output = max_output
        self._check = _validator(listed.input_schema)
        self.name = name  # type: ignore[misc]
        text = listed.description or "(no description)"
        self.description = f"{text} (from MCP server '{server.name}')"  # type: ignore[misc]
        self.args_schema = listed.input_schema  # type: ignore[misc]

    @property
    def label(self) -> str:
        return f"{self.server.name}/{self.listed.name}"

    def _validate(self, args: dict[str, Any]) -> None:
        from jsonschema.exceptions import best_match

        try:
            errors = list(self._check.iter_errors(args))
        except (RecursionError, ValueError, TypeError) as exc:  # absurd nesting, odd values
            raise ToolArgumentError(
                f"{self.name}: arguments for MCP tool {self.label} cannot be checked: {exc}"
            ) from None
        if errors:
            first = best_match(errors)
            where = "/".join(str(p) for p in first.absolute_path) or "(arguments)"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ToolArgumentError(
                f"{self.name}: invalid arguments for MCP tool {self.label}: "
                f"{where}: {first.message}{more}"
            )

    def assess(self, args: dict[str, Any]) -> Assessment:
        self._validate(args)
        listed = self.listed
        destructive = listed.destructive_hint is True
        if self.read_only and not stricter_than_config(listed):
            return Assessment(
                action_type="read",
                risk_level="low",
                reason=f"MCP tool {self.label} is marked read-only in DUCKLM_MCP_CONFIG",
            )
        if self.read_only:
            why = (
                f"MCP tool {self.label} is marked read-only in DUCKLM_MCP_CONFIG, "
                "but the server says it changes things"
            )
        else:
            why = f"MCP tool {self.label} is not marked read-only in DUCKLM_MCP_CONFIG"
        if destructive:
            why += " (the server says it is destructive)"
        return Assessment(
            action_type="mcp_call",
            risk_level="high" if destructive else "medium",
            requires_approval=True,
            reason=why,
        )

    def describe(self, args: dict[str, Any]) -> str:
        """The one line an approval card and the audit show: `mcp server/tool {args}`."""
        shown = json.dumps(args, ensure_ascii=False, sort_keys=True)
        if len(shown) > _DESCRIBE_MAX:
            shown = shown[: _DESCRIBE_MAX - 1] + "…"
        return f"mcp {self.label} {shown}"

    async def run(self, args: dict[str, Any], assessment: Assessment) -> ToolResult:
        # Checked again: a stored approval may predate a change of the server's schema.
        self._validate(args)
        metadata: dict[str, Any] = {
            "mcp_server": self.server.name,
            "mcp_tool": self.listed.name,
            "transport": self.server.config.transport,
            "description": self.describe(args),
        }
        try:
            outcome = await self.server.call(self.listed.name, args)
        except McpUnavailableError as exc:
            return ToolResult(
                ok=False, error=str(exc), metadata={**metadata, "server_unavailable": True}
            )
        text = outcome.text
        truncated = len(text) > self.max_output
        if truncated:
            text = text[: self.max_output] + f"\n[output cut at {self.max_output} characters]"
        metadata.update(
            duration_ms=outcome.duration_ms,
            is_error=outcome.is_error,
            truncated=truncated,
            content=outcome.content_types,
        )
        if outcome.is_error:
            return ToolResult(
                ok=False,
                output=text,
                error=f"MCP tool {self.label} reported an error: {text[:500]}",
                metadata=metadata,
            )
        return ToolResult(ok=True, output=text, metadata=metadata)
