"""The action model's directive, parsed tolerantly.

The action model is asked for exactly

    {"actions": [{"tool": "...", "args": {...}, "reason": "..."}]}

(an empty list meaning "no tools needed"), but models wrap JSON in code
fences, add a sentence before or after it, answer a single action object, or
a bare list. `parse_directive` accepts those and refuses everything else with
a `DirectiveError` that says what was wrong, so the runtime can log it (and
tell the model). It never raises anything else: a model's answer is untrusted
input. Given the tool names, it refuses an action naming any other tool: weak
models copy lines of the tool list back as actions with invented names, and
such a directive goes back to the model to be repaired, not to a tool.

`directive_schema` is the JSON Schema of the same shape (the tool names as an
enum), sent as structured output so a server that can constrain the reply does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

__all__ = [
    "MAX_ACTIONS",
    "Action",
    "Directive",
    "DirectiveError",
    "check_tool_names",
    "directive_schema",
    "parse_directive",
]

MAX_ACTIONS = 20
MAX_TEXT_BYTES = 256 * 1024
MAX_DEPTH = 50
# Bounds the bracket scan's work on hostile text (mostly brackets and quotes).
_MAX_SCAN_TOKENS = 400_000
_MAX_UNBALANCED_RETRIES = 8

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_OUTSIDE_STRING = re.compile(r'[\[\]{}"]')
_INSIDE_STRING = re.compile(r'["\\]')
_CLOSING = {"[": "]", "{": "}"}


class DirectiveError(ValueError):
    """The action model's answer is not a usable directive; the message says why."""


class Action(BaseModel):
    tool: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    reason: str | None = None

    @field_validator("tool", mode="before")
    @classmethod
    def _strip_tool(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value


class Directive(BaseModel):
    actions: list[Action]


def parse_directive(text: str, tools: Collection[str] | None = None) -> Directive:
    """Parse the action model's answer into a Directive, or raise DirectiveError.

    With `tools`, every action must name one of them (None accepts any name)."""
    try:
        directive = _parse(text)
    except DirectiveError:
        raise
    except Exception as exc:  # a bug here must not crash the task loop
        raise DirectiveError(f"could not parse the directive ({type(exc).__name__})") from exc
    if tools is not None:
        check_tool_names(directive, tools)
    return directive


def check_tool_names(directive: Directive, tools: Collection[str]) -> None:
    """Raise DirectiveError naming the first action whose tool does not exist."""
    for number, action in enumerate(directive.actions, 1):
        if action.tool not in tools:
            known = ", ".join(sorted(tools)) or "none"
            shown = action.tool if len(action.tool) <= 80 else action.tool[:79] + "…"
            raise DirectiveError(
                f"action {number} names an unknown tool {shown!r} (the tools are: {known})"
            )


def directive_schema(tool_specs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of a directive for these tools (`ToolGateway.specs()` form).

    Each action is one branch of an `anyOf`: the tool name as a constant and
    that tool's own argument schema, so a grammar-constrained server (llama.cpp)
    cannot pair one tool's name with another's arguments."""
    branches = []
    for spec in tool_specs:
        args = spec.get("args") if isinstance(spec.get("args"), dict) else {"type": "object"}
        branches.append(
            {
                "type": "object",
                "properties": {
                    "tool": {"type": "string", "enum": [spec["tool"]]},
                    "args": args,
                    "reason": {"type": "string"},
                },
                "required": ["tool", "args", "reason"],
                "additionalProperties": False,
            }
        )
    if not branches:  # no tools: the only valid directive is an empty one
        return {
            "type": "object",
            "properties": {"actions": {"type": "array", "maxItems": 0}},
            "required": ["actions"],
            "additionalProperties": False,
        }
    item: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return {
        "type": "object",
        "properties": {"actions": {"type": "array", "items": item, "maxItems": MAX_ACTIONS}},
        "required": ["actions"],
        "additionalProperties": False,
    }


def _parse(text: str) -> Directive:
    if not isinstance(text, str):
        raise DirectiveError(f"the directive must be text, not {type(text).__name__}")
    if len(text) > MAX_TEXT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise DirectiveError(f"the answer is longer than {MAX_TEXT_BYTES // 1024} KiB")
    if not text.strip():
        raise DirectiveError("the answer is empty")
    return _shape(_find_json(text))


# -- finding the JSON ----------------------------------------------------------


class _Budget:
    def __init__(self) -> None:
        self.tokens = _MAX_SCAN_TOKENS

    def spend(self) -> None:
        self.tokens -= 1
        if self.tokens < 0:
            raise DirectiveError("the answer is too convoluted to find JSON in")


def _find_json(text: str) -> Any:
    """The first JSON value that looks like a directive, searched inside code
    fences first and then in the whole text; failing that, the first JSON
    value at all (so the shape check can say what is wrong with it)."""
    budget = _Budget()
    regions = [r for r in (m.group(1) for m in _FENCE.finditer(text)) if _whole(r, budget)]
    regions.append(text)
    errors: list[str] = []
    first: Any = _NOTHING
    for region in regions:
        for value, after_cut in _values(region, budget, errors):
            if _looks_like_directive(value, after_cut=after_cut):
                return value
            if first is _NOTHING and not after_cut:
                first = value
    if first is not _NOTHING:
        return first
    raise DirectiveError(errors[0] if errors else "no JSON object in the answer")


def _whole(region: str, budget: _Budget) -> bool:
    """Is the fenced text exactly one JSON object or array? A fence the regex cut
    short (a ``` inside a JSON string) is not, and must not yield a fragment."""
    body = region.strip()
    if body[:1] not in ("{", "["):
        return False
    end, _ = _balanced_end(body, 0, budget)
    return end == len(body)


_NOTHING = object()


def _looks_like_directive(value: Any, *, after_cut: bool = False) -> bool:
    # Prose such as "step [1]" or "{name}" often precedes the real answer.
    if isinstance(value, dict):
        if "actions" in value:
            return True
        # After a cut-off (unbalanced) span, a bare action object is most likely
        # one action out of a truncated directive: never run a fragment.
        return "tool" in value and not after_cut
    if isinstance(value, list) and not after_cut:
        return not value or (isinstance(value[0], dict) and "tool" in value[0])
    return False


def _values(region: str, budget: _Budget, errors: list[str]) -> Iterator[tuple[Any, bool]]:
    """Every balanced {...}/[...] span of `region` (string-aware, outermost
    only) that parses as JSON, with whether an unbalanced span came before it
    (it may then be nested in cut-off JSON); why others failed goes to `errors`."""
    pos = 0
    unbalanced_retries = 0
    while True:
        start = _next_opener(region, pos)
        if start < 0:
            return
        end, problem = _balanced_end(region, start, budget)
        if end is None:
            # Unbalanced from here: a stray bracket in prose may precede the
            # real JSON, so try the next opener, a bounded number of times.
            errors.append(f"invalid JSON: {problem}")
            unbalanced_retries += 1
            if unbalanced_retries > _MAX_UNBALANCED_RETRIES:
                return
            pos = start + 1
            continue
        try:
            # Depth is already bounded by the scan, so json cannot recurse far.
            yield json.loads(region[start:end]), unbalanced_retries > 0
        except (ValueError, RecursionError) as exc:
            errors.append(f"invalid JSON: {_json_problem(exc)}")
        # Skip the whole span: keeps the scan linear ("[1] then {...}").
        pos = end


def _next_opener(text: str, pos: int) -> int:
    brace, bracket = text.find("{", pos), text.find("[", pos)
    if brace < 0:
        return bracket
    if bracket < 0:
        return brace
    return min(brace, bracket)


def _balanced_end(text: str, start: int, budget: _Budget) -> tuple[int | None, str]:
    """Index just past the bracket matching text[start], or (None, problem)."""
    stack: list[str] = []
    pos = start
    length = len(text)
    while pos < length:
        budget.spend()
        match = _OUTSIDE_STRING.search(text, pos)
        if match is None:
            break
        char = match.group()
        pos = match.end()
        if char == '"':
            pos = _string_end(text, pos, budget)
            if pos < 0:
                return None, "unterminated string"
            continue
        if char in _CLOSING:
            stack.append(_CLOSING[char])
            if len(stack) > MAX_DEPTH:
                raise DirectiveError(f"the JSON is nested deeper than {MAX_DEPTH} levels")
            continue
        if char != stack.pop():
            return None, f"mismatched {char!r} at character {pos - 1}"
        if not stack:
            return pos, ""
    return None, "unbalanced brackets (the JSON is cut off)"


def _string_end(text: str, pos: int, budget: _Budget) -> int:
    """Index just past the closing quote of a string whose body starts at pos."""
    while True:
        budget.spend()
        match = _INSIDE_STRING.search(text, pos)
        if match is None:
            return -1
        if match.group() == "\\":
            pos = match.end() + 1
            continue
        return match.end()


def _json_problem(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at character {exc.pos}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)[:120]


# -- checking the shape --------------------------------------------------------


def _shape(data: Any) -> Directive:
    if isinstance(data, list):
        raw_actions: Any = data
    elif isinstance(data, dict):
        if "actions" in data:
            raw_actions = data["actions"]
            if not isinstance(raw_actions, list):
                raise DirectiveError(f"'actions' must be a list, not {_json_type(raw_actions)}")
        elif "tool" in data:
            raw_actions = [data]
        else:
            raise DirectiveError("the JSON object has no 'actions' (and is not an action)")
    else:  # pragma: no cover - the scanner only yields objects and arrays
        raise DirectiveError("the JSON is neither an object nor a list")
    if len(raw_actions) > MAX_ACTIONS:
        raise DirectiveError(
            f"{len(raw_actions)} actions, more than the {MAX_ACTIONS} allowed at once"
        )
    return Directive(actions=[_action(i, raw) for i, raw in enumerate(raw_actions, 1)])


def _action(number: int, raw: Any) -> Action:
    if not isinstance(raw, dict):
        raise DirectiveError(f"action {number} is not an object but {_json_type(raw)}")
    tool = raw.get("tool")
    if tool is None:
        raise DirectiveError(f"action {number} has no 'tool'")
    if not isinstance(tool, str):
        raise DirectiveError(f"action {number}'s 'tool' must be a string, not {_json_type(tool)}")
    if not tool.strip():
        raise DirectiveError(f"action {number} has an empty 'tool'")
    args = raw.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise DirectiveError(f"action {number}'s 'args' must be an object, not {_json_type(args)}")
    reason = raw.get("reason")
    if reason is not None and not isinstance(reason, str):
        # A number or a list of steps is still a reason worth keeping.
        reason = json.dumps(reason, ensure_ascii=False)
    try:
        return Action(tool=tool, args=args, reason=reason)
    except ValidationError as exc:  # pragma: no cover - checked above
        raise DirectiveError(f"action {number} is invalid: {exc.errors()[0]['msg']}") from exc


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
