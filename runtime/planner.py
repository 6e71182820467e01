"""The action step: asking the action model which tools to call, by either protocol.

Two protocols feed the same loop (DESIGN.md, `DUCKLM_ACTION_PROTOCOL`):

- `directive`: the model answers a JSON directive in text, asked for with
  structured output (the client negotiates the form the server takes);
- `tools`: OpenAI native tool calling; the model answers `tool_calls` and the
  results go back as `tool` messages;
- `auto` (the default): `tools` until the server shows it does not honour
  them, then `directive`, logged once. A server "does not honour" tools when
  it refuses them (400/422/500 naming them) or answers a tools request in text
  that is not a directive (llama-cpp-python ignores `tools` under
  `tool_choice: auto`); such a text is never taken for "no tools needed".

Whichever protocol answered, the result is one `Plan`: the actions in the
directive's shape (tool, args, reason), which the loop runs, approves and
audits the same way. A reply that cannot be used (unparseable, an unknown
tool, arguments that are not a JSON object, cut off at `max_tokens` or by a
content filter) gets one repair round: the model is shown the error and the
expected form once more. If that fails too the plan says planning failed, and
the thinker is told.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.context import ContextBuilder
from runtime.directive import (
    MAX_ACTIONS,
    Directive,
    DirectiveError,
    check_tool_names,
    directive_schema,
    parse_directive,
)
from runtime.model import ModelClient, ModelResponse, ModelToolsUnsupportedError

__all__ = ["CUT_OFF", "ActionPlanner", "Plan"]

logger = logging.getLogger("ducklm.planner")

# finish_reason values that mean the reply is not the model's whole answer.
CUT_OFF = {
    "length": "it was cut off at the token limit (max_tokens; DUCKLM_ACTION_MAX_TOKENS)",
    "content_filter": "the provider's content filter stopped it",
}
_REPLY_SHOWN_CHARS = 2000
_FUNCTION_NAME = re.compile(r"[^a-zA-Z0-9_-]")


class Caller(Protocol):
    def __call__(
        self, role: str, messages: list[dict[str, Any]], **options: Any
    ) -> Awaitable[ModelResponse]: ...


Recorder = Callable[[str, dict[str, Any]], None]


@dataclass
class Plan:
    """What the action step decided. `failed` is set (and `actions` empty) when
    even the repair round gave nothing usable."""

    actions: list[dict[str, Any]] = field(default_factory=list)
    protocol: str = "directive"
    failed: str | None = None


class _Unusable(Exception):
    """A reply that cannot be used; the message is what the model is told."""

    def __init__(self, error: str, response: ModelResponse, shown: str) -> None:
        super().__init__(error)
        self.error = error
        self.response = response
        self.shown = shown  # the reply as the model will see it in the repair round


class ActionPlanner:
    """One per loop; protocol facts about the server live on the ModelClient."""

    def __init__(
        self,
        client: ModelClient,
        context: ContextBuilder,
        known: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """`context` has the tools offered to the model; `known` (default: the
        same) every tool it may name: a known tool that was not offered (the
        channel does not allow it, issue #20) is passed on to be refused when it
        is dispatched, with the reason, instead of being taken for a typo."""
        self.client = client
        self.context = context
        specs = context.tool_specs
        self.known_specs = list(specs if known is None else known)
        self.offered_names = [spec["tool"] for spec in specs]
        self.tool_names = [spec["tool"] for spec in self.known_specs]
        self.schema = directive_schema(specs)
        # OpenAI function names allow [a-zA-Z0-9_-]{1,64}; an MCP tool's name
        # may not, so it is sent under an alias and mapped back.
        self._to_function: dict[str, str] = {}
        self._from_function: dict[str, str] = {}
        for name in self.tool_names:
            alias = _FUNCTION_NAME.sub("_", name)[:64] or "tool"
            while alias in self._from_function:
                alias = (alias[:60] + f"_{len(self._from_function)}")[:64]
            self._to_function[name], self._from_function[alias] = alias, name
        self.functions = [_function(spec, self._to_function[spec["tool"]]) for spec in specs]
        self._announced = False

    @property
    def protocol(self) -> str:
        return self.client.action_protocol

    def _use_tools(self) -> bool:
        if self.protocol == "directive" or not self.functions:
            return False
        if self.protocol == "tools":
            return True
        return self.client.tools_supported is not False

    async def plan(
        self,
        call: Caller,
        record: Recorder,
        messages: list[dict[str, Any]],
        observations: Sequence[dict[str, Any]],
    ) -> Plan:
        """Ask for the next actions; record `action_directive` or
        `action_directive_failed` (once per unusable reply)."""
        repair: _Unusable | None = None
        for attempt in (1, 2):
            tools = self._use_tools()
            try:
                actions, via, response = await self._attempt(
                    call, messages, observations, tools=tools, repair=repair
                )
            except _Unusable as unusable:
                record(
                    "action_directive_failed",
                    {
                        "error": unusable.error,
                        "content": unusable.response.content[:_REPLY_SHOWN_CHARS],
                        "tool_calls": [c.model_dump() for c in unusable.response.tool_calls],
                        "finish_reason": unusable.response.finish_reason,
                        "protocol": "tools" if tools else "directive",
                        "repair": attempt == 2,
                    },
                )
                repair = unusable
                continue
            protocol = "tools" if via == "tool_calls" else "directive"
            record(
                "action_directive",
                {
                    "actions": actions,
                    "protocol": protocol,
                    "via": via,
                    "repaired": attempt == 2,
                    "response_form": response.response_form,
                },
            )
            return Plan(actions=actions, protocol=protocol)
        assert repair is not None
        return Plan(protocol="tools" if self._use_tools() else "directive", failed=repair.error)

    # -- one request ---------------------------------------------------------

    async def _attempt(
        self,
        call: Caller,
        messages: list[dict[str, Any]],
        observations: Sequence[dict[str, Any]],
        *,
        tools: bool,
        repair: _Unusable | None,
    ) -> tuple[list[dict[str, Any]], str, ModelResponse]:
        if tools:
            outgoing = self.context.for_tools(self.context.with_tool_rounds(messages, observations))
            if repair is not None:
                outgoing += self._repair_messages(repair, tools=True)
            try:
                response = await call("action", outgoing, tools=self.functions)
            except ModelToolsUnsupportedError:
                if self.protocol != "auto":
                    raise
                self._announce("directive", "the server refuses native tool calling")
                return await self._attempt(call, messages, observations, tools=False, repair=repair)
            return await self._from_tools_reply(response, call, messages, observations, repair)
        outgoing = self.context.for_role(
            "action", self.context.with_observations(messages, list(observations))
        )
        if repair is not None:
            outgoing += self._repair_messages(repair, tools=False)
        response = await call("action", outgoing, schema=self.schema)
        self._check_finish(response, response.content)
        try:
            directive = parse_directive(response.content, self.tool_names)
        except DirectiveError as exc:
            raise _Unusable(str(exc), response, response.content) from exc
        return _actions(directive), "text", response

    async def _from_tools_reply(
        self,
        response: ModelResponse,
        call: Caller,
        messages: list[dict[str, Any]],
        observations: Sequence[dict[str, Any]],
        repair: _Unusable | None,
    ) -> tuple[list[dict[str, Any]], str, ModelResponse]:
        shown = _show_calls(response)
        self._check_finish(response, shown)
        if response.tool_calls:
            self._announce("tools", "the server answers with native tool calls")
            return self._calls(response, shown), "tool_calls", response
        try:
            directive = parse_directive(response.content)
        except DirectiveError as exc:
            if self.protocol == "auto" and self.client.tools_supported is not True:
                # Text that is no directive, from a server never seen calling
                # a tool: it ignored `tools` (llama-cpp-python under
                # tool_choice auto). Not "no tools needed": ask again the other way.
                self.client.tools_supported = False
                self._announce("directive", "the server answered a tools request in prose")
                return await self._attempt(call, messages, observations, tools=False, repair=repair)
            if self.client.tools_supported is True and response.content.strip():
                # A server known to call tools answered in prose: the model's
                # own way of saying no tool is needed.
                return [], "text", response
            raise _Unusable(
                f"the reply has no tool calls and is not a directive ({exc})", response, shown
            ) from exc
        if directive.actions and self.protocol == "auto" and self.client.tools_supported is None:
            # Actions written as text although tools were offered: the model
            # (or the server) does not do native calls; the directive, with
            # structured output, serves it better from now on.
            self.client.tools_supported = False
            self._announce("directive", "the model answered a tools request with a directive")
        try:
            check_tool_names(directive, self.tool_names)
        except DirectiveError as exc:
            raise _Unusable(str(exc), response, shown) from exc
        return _actions(directive), "text", response

    def _check_finish(self, response: ModelResponse, shown: str) -> None:
        why = CUT_OFF.get(response.finish_reason or "")
        if why is not None:
            raise _Unusable(
                f"the reply is incomplete: {why} (finish_reason {response.finish_reason!r})",
                response,
                shown,
            )

    def _calls(self, response: ModelResponse, shown: str) -> list[dict[str, Any]]:
        if len(response.tool_calls) > MAX_ACTIONS:
            raise _Unusable(
                f"{len(response.tool_calls)} tool calls, more than the {MAX_ACTIONS} allowed "
                "at once",
                response,
                shown,
            )
        actions = []
        for number, tool_call in enumerate(response.tool_calls, 1):
            tool = self._from_function.get(tool_call.name)
            if tool is None:
                known = ", ".join(sorted(self._to_function[n] for n in self.offered_names))
                raise _Unusable(
                    f"tool call {number} names an unknown tool {tool_call.name[:80]!r} "
                    f"(the tools are: {known})",
                    response,
                    shown,
                )
            try:
                args = json.loads(tool_call.arguments) if tool_call.arguments.strip() else {}
            except (ValueError, RecursionError) as exc:
                raise _Unusable(
                    f"tool call {number} ({tool_call.name}) has arguments that are not JSON "
                    f"({exc})",
                    response,
                    shown,
                ) from exc
            if not isinstance(args, dict):
                raise _Unusable(
                    f"tool call {number} ({tool_call.name}) has arguments that are not a "
                    "JSON object",
                    response,
                    shown,
                )
            reason = args.pop("reason", None) if "reason" not in self._own_args(tool) else None
            actions.append(
                {
                    "tool": tool,
                    "args": args,
                    "reason": reason if isinstance(reason, str) or reason is None else str(reason),
                    "call_id": tool_call.id,
                    "function": tool_call.name,
                }
            )
        return actions

    def _own_args(self, tool: str) -> set[str]:
        for spec in self.known_specs:
            if spec["tool"] == tool:
                return set(((spec.get("args") or {}).get("properties") or {}).keys())
        return set()

    def _repair_messages(self, repair: _Unusable, *, tools: bool) -> list[dict[str, Any]]:
        """The unusable reply (as text: a `tool_calls` message would need a
        `tool` answer per call) and what was wrong with it, with the form."""
        shown = repair.shown.strip()[:_REPLY_SHOWN_CHARS] or "(an empty reply)"
        names = ", ".join(self.offered_names) or "none"
        if tools:
            form = (
                f"Call one or more of these tools with arguments as a JSON object: {names}. "
                'If no tool is needed, call none and answer exactly {"actions": []}.'
            )
        else:
            form = (
                'Answer again with one JSON object and nothing else, {"actions": [...]}, each '
                f'action with "tool" (one of: {names}), "args" and "reason". It must match '
                f"this JSON Schema: {json.dumps(self.schema, ensure_ascii=False)}. "
                'If no tool is needed, answer exactly {"actions": []}.'
            )
        return [
            {"role": "assistant", "content": shown},
            {
                "role": "user",
                "content": f"Your last reply could not be used: {repair.error}. {form}",
            },
        ]

    def _announce(self, chosen: str, why: str) -> None:
        if self.protocol != "auto" or self._announced:
            return
        self._announced = True
        logger.info(
            "action protocol auto: using %s with the model API at %s (%s)",
            "native tool calling" if chosen == "tools" else "the JSON directive",
            self.client.base_url,
            why,
        )


def _function(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """A tool as an OpenAI function, with an optional `reason` argument so the
    approval card can still say why the model wants the call."""
    parameters = dict(spec.get("args") or {"type": "object", "properties": {}})
    parameters.setdefault("type", "object")
    properties = dict(parameters.get("properties") or {})
    if "reason" not in properties:
        properties["reason"] = {
            "type": "string",
            "description": "one short sentence: why this call is needed",
        }
    parameters["properties"] = properties
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": spec.get("description") or spec["tool"],
            "parameters": parameters,
        },
    }


def _actions(directive: Directive) -> list[dict[str, Any]]:
    return [action.model_dump() for action in directive.actions]


def _show_calls(response: ModelResponse) -> str:
    calls = "; ".join(f"{c.name}({c.arguments})" for c in response.tool_calls)
    text = response.content.strip()
    if calls:
        text = f"{text}\n(tool calls: {calls})".strip()
    return text
