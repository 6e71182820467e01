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

ACTION_PROMPT = """\
You are the planning step of DuckLM, an operations assistant. Decide which tool calls,
if any, are needed to answer the user's last message, given any `tool_observations`
already gathered. Answer with JSON only, in exactly this form:

{{"actions": [{{"tool": "<tool name>", "args": {{...}}, "reason": "<one short sentence>"}}]}}

Use an empty list, {{"actions": []}}, when no (further) tool call is needed, for example
when the observations already answer the question. Prefer read-only commands. Commands
that change anything are shown to a human for approval before they run, and some are
blocked outright; if an action was denied, do not propose it again unchanged.
`[REDACTED:<kind>]` in observations is a placeholder for a secret removed from the
output; never try to recover it (no re-encoding, no other route to the same value).

Tools:
{tools}
"""


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


def _trim_observation(observation: dict[str, Any]) -> dict[str, Any]:
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
        tools = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in tool_specs)
        self.action_prompt = ACTION_PROMPT.format(tools=tools)
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

    def for_role(self, role: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        prompt = self.action_prompt if role == "action" else self.thinker_prompt
        return [{"role": "system", "content": prompt}, *messages]
