"""What the models see: system prompts per role, thread history, tool observations."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from runtime.store.models import Task

MAX_HISTORY_MESSAGES = 30
MAX_HISTORY_CHARS = 24_000
# Tool output is already capped by the tools; this keeps many observations
# from crowding the question out of the model's context.
MAX_OBSERVATION_OUTPUT = 12_000

THINKER_PROMPT = """\
You are DuckLM, an operations assistant answering on-call engineers in a chat thread.
Answer the user's last message. When `tool_observations` are given, base your answer on
them: quote the relevant output briefly, say what it means, and say plainly when an
action was denied, blocked, failed or is still waiting for approval. Never claim a
command ran if no observation shows it ran. Be concise; use Markdown code blocks for
commands and output. Text such as `[REDACTED:slack-token]` is a placeholder: a secret
was removed from the output before you saw it. Do not guess it; say it was redacted."""

# Shared by both action protocols. The tools are described in plain text, and
# the only JSON shown is one concrete directive: a tool list written as JSON
# objects with the keys of an action was copied back by weak models as
# actions with invented names, and a "<placeholder>" came back verbatim.
_ACTION_RULES = """\
Prefer read-only commands. Commands that change anything are shown to a human for
approval before they run, and some are blocked outright; if an action was denied, do
not propose it again unchanged. `[REDACTED:<kind>]` in observations is a placeholder
for a secret removed from the output; never try to recover it (no re-encoding, no
other route to the same value)."""

ACTION_PROMPT = """\
You are the planning step of DuckLM, an operations assistant. Decide which tool calls,
if any, are needed to answer the user's last message, given any `tool_observations`
already gathered.

Answer with one JSON object and nothing else. It has one key, "actions": a list of
actions. Each action is an object with "tool" (the name of one of the tools listed
below), "args" (an object holding that tool's arguments) and "reason" (one short
sentence, in your own words, saying why the call is needed).
{example}
When no (further) tool call is needed, for example when the observations already
answer the question, answer exactly {{"actions": []}}.

{rules}

Tools:
{tools}
"""

TOOLS_PROMPT = """\
You are the planning step of DuckLM, an operations assistant. Call the tools needed to
answer the user's last message, given the tool results already gathered. You may call
several tools at once. Give each call a "reason" argument: one short sentence, in your
own words, saying why the call is needed. When no (further) tool call is needed, call
no tool and answer exactly {{"actions": []}}. If you cannot call tools, answer with
JSON only, a list of "actions", each with "tool", "args" and "reason".
{example}
{rules}

Tools:
{tools}
"""

# One concrete directive, never a template.
_EXAMPLES = {
    "shell_exec_safe": (
        {"command": "df -h /var"},
        "Check how full the disk holding the logs is.",
        "to check free disk space",
    ),
    "list_dir": ({"path": "."}, "See which files the workspace holds.", "to list the workspace"),
}


def _example(tool_specs: Sequence[dict[str, Any]]) -> str:
    names = {spec.get("tool") for spec in tool_specs}
    for tool, (args, reason, purpose) in _EXAMPLES.items():
        if tool in names:
            directive = {"actions": [{"tool": tool, "args": args, "reason": reason}]}
            return f"For example, {purpose}:\n{json.dumps(directive, ensure_ascii=False)}\n"
    return ""


def describe_tools(tool_specs: Sequence[dict[str, Any]]) -> str:
    """The tools in plain text: name, what it does, and each argument."""
    lines: list[str] = []
    for spec in tool_specs:
        lines.append(f"- {spec.get('tool')}: {spec.get('description') or ''}".rstrip())
        schema = spec.get("args") if isinstance(spec.get("args"), dict) else {}
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        if not properties:
            lines.append("  Arguments: none.")
            continue
        parts = []
        for name, prop in properties.items():
            prop = prop if isinstance(prop, dict) else {}
            kind = prop.get("type") or "any"
            if isinstance(kind, list):
                kind = " or ".join(str(k) for k in kind)
            text = f"{name} ({kind}, {'required' if name in required else 'optional'})"
            if prop.get("enum"):
                text += " one of " + ", ".join(json.dumps(v) for v in prop["enum"])
            if prop.get("description"):
                text += f": {prop['description']}"
            parts.append(text)
        lines.append("  Arguments: " + "; ".join(parts) + ".")
    return "\n".join(lines) if lines else '(none: answer {"actions": []})'


def _clean_history(history: Sequence[Any] | None) -> list[dict[str, str]]:
    """Keep only well-formed user/assistant turns, newest last, within a size budget."""
    cleaned: list[dict[str, str]] = []
    for item in history or []:
        if not isinstance(item, dict):
            continue
        role, content = item.get("role"), item.get("content")
        if role in ("user", "assistant") and isinstance(content, str) and content.strip():
            cleaned.append({"role": role, "content": content})
    cleaned = cleaned[-MAX_HISTORY_MESSAGES:]
    total = 0
    kept: list[dict[str, str]] = []
    for message in reversed(cleaned):
        total += len(message["content"])
        if total > MAX_HISTORY_CHARS:
            break
        kept.append(message)
    return list(reversed(kept))


# Keys the loop adds to an observation of a native tool call so the call can be
# replayed to the model; nobody else needs them.
CALL_KEYS = ("call_id", "round", "args", "function")


def _trim_observation(observation: dict[str, Any]) -> dict[str, Any]:
    observation = {k: v for k, v in observation.items() if k not in CALL_KEYS}
    result = observation.get("result")
    if not isinstance(result, dict):
        return observation
    output = result.get("output")
    if isinstance(output, str) and len(output) > MAX_OBSERVATION_OUTPUT:
        cut = len(output) - MAX_OBSERVATION_OUTPUT
        result = {**result, "output": output[:MAX_OBSERVATION_OUTPUT] + f"\n[… {cut} chars cut]"}
        return {**observation, "result": result}
    return observation


class ContextBuilder:
    def __init__(self, tool_specs: Sequence[dict[str, Any]] | None = None) -> None:
        if tool_specs is None:
            from runtime.tools.gateway import ToolGateway

            tool_specs = ToolGateway.default(".").specs()
        self.tool_specs: list[dict[str, Any]] = list(tool_specs)
        tools, example = describe_tools(self.tool_specs), _example(self.tool_specs)
        self.action_prompt = ACTION_PROMPT.format(tools=tools, example=example, rules=_ACTION_RULES)
        self.tools_prompt = TOOLS_PROMPT.format(tools=tools, example=example, rules=_ACTION_RULES)
        self.thinker_prompt = THINKER_PROMPT

    def build_basic_messages(
        self, task: Task, history_messages: Sequence[Any] | None = None
    ) -> list[dict[str, str]]:
        """The conversation without a system prompt: thread history, then the question."""
        history = task.history_messages if history_messages is None else history_messages
        return [*_clean_history(history), {"role": "user", "content": task.message}]

    def with_observations(
        self, messages: list[dict[str, str]], observations: Sequence[dict[str, Any]]
    ) -> list[dict[str, str]]:
        if not observations:
            return messages
        body = json.dumps(
            [_trim_observation(o) for o in observations], ensure_ascii=False, indent=2, default=str
        )
        return [*messages, {"role": "user", "content": "tool_observations:\n" + body}]

    def with_tool_rounds(
        self, messages: list[dict[str, Any]], observations: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The conversation for native tool calling: observations of native calls
        become the assistant's `tool_calls` and one `tool` message per call, in
        rounds as the model made them; any other observation (a directive
        answered in text, a direct command) goes first as `tool_observations`.
        Only calls that have a result are replayed: every call in an assistant
        message must be answered by a tool message."""
        plain = [o for o in observations if not o.get("call_id")]
        out: list[dict[str, Any]] = list(self.with_observations(list(messages), plain))
        rounds: dict[Any, list[dict[str, Any]]] = {}
        for observation in observations:
            if observation.get("call_id"):
                rounds.setdefault(observation.get("round"), []).append(observation)
        for calls in rounds.values():
            out.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": o["call_id"],
                            "type": "function",
                            "function": {
                                "name": o.get("function") or o.get("tool") or "",
                                "arguments": json.dumps(o.get("args") or {}, ensure_ascii=False),
                            },
                        }
                        for o in calls
                    ],
                }
            )
            for o in calls:
                shown = _trim_observation(o)
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": o["call_id"],
                        "content": json.dumps(shown, ensure_ascii=False, default=str),
                    }
                )
        return out

    def for_role(self, role: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompt = self.action_prompt if role == "action" else self.thinker_prompt
        return [{"role": "system", "content": prompt}, *messages]

    def for_tools(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The action model's messages under native tool calling."""
        return [{"role": "system", "content": self.tools_prompt}, *messages]
