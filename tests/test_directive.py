"""parse_directive: tolerant of how models wrap JSON, strict about its shape."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.directive import (
    MAX_ACTIONS,
    Action,
    Directive,
    DirectiveError,
    directive_schema,
    parse_directive,
)

SHELL = {"tool": "shell", "args": {"command": "uptime"}, "reason": "load"}


def test_canonical_directive() -> None:
    directive = parse_directive(json.dumps({"actions": [SHELL]}))
    assert directive == Directive(
        actions=[Action(tool="shell", args={"command": "uptime"}, reason="load")]
    )


def test_empty_actions_means_no_tools() -> None:
    assert parse_directive('{"actions": []}').actions == []


@pytest.mark.parametrize(
    "text",
    [
        '```json\n{"actions": [{"tool": "shell", "args": {"command": "uptime"}}]}\n```',
        '```\n{"actions": [{"tool": "shell", "args": {"command": "uptime"}}]}\n```',
        'Sure, here you go:\n```json\n{"actions": [{"tool": "shell", '
        '"args": {"command": "uptime"}}]}\n```\nLet me know!',
        # An unclosed fence (the model was cut off after the JSON).
        '```json\n{"actions": [{"tool": "shell", "args": {"command": "uptime"}}]}',
    ],
)
def test_code_fences(text: str) -> None:
    directive = parse_directive(text)
    assert [(a.tool, a.args) for a in directive.actions] == [("shell", {"command": "uptime"})]


def test_fenced_json_wins_over_brackets_in_prose() -> None:
    text = (
        "Step [1]: check the load {quickly}.\n"
        '```json\n{"actions": [{"tool": "shell", "args": {"command": "uptime"}}]}\n```'
    )
    assert parse_directive(text).actions[0].tool == "shell"


def test_other_fences_are_skipped() -> None:
    text = '```bash\nls [a-z]*\n```\n```json\n{"actions": [{"tool": "files"}]}\n```'
    assert parse_directive(text).actions[0].tool == "files"


def test_leading_and_trailing_prose() -> None:
    text = (
        'I will check the load first. {"actions": [{"tool": "shell", '
        '"args": {"command": "echo \\"}]{\\""}}]} That should tell us.'
    )
    directive = parse_directive(text)
    assert directive.actions[0].args == {"command": 'echo "}]{"'}


def test_brackets_in_prose_before_the_json() -> None:
    assert parse_directive('Plan [1]: {"tool": "shell"}').actions[0].tool == "shell"
    assert parse_directive('A stray [ bracket, then {"actions": []}').actions == []


def test_single_action_object() -> None:
    directive = parse_directive(json.dumps(SHELL))
    assert directive.actions == [Action(tool="shell", args={"command": "uptime"}, reason="load")]


def test_bare_list() -> None:
    directive = parse_directive(json.dumps([SHELL, {"tool": "files", "args": {"path": "a"}}]))
    assert [a.tool for a in directive.actions] == ["shell", "files"]


def test_lenient_fields() -> None:
    directive = parse_directive(
        '{"actions": [{"tool": "  shell  ", "args": null}, {"tool": "files", "reason": 3}]}'
    )
    assert directive.actions[0] == Action(tool="shell", args={}, reason=None)
    assert directive.actions[1].reason == "3"


def test_unicode_and_extra_keys_survive() -> None:
    directive = parse_directive(
        '{"thought": "ok", "actions": [{"tool": "shell", "args": {"command": "echo héllo 🦆"}, '
        '"extra": 1}]}'
    )
    assert directive.actions[0].args == {"command": "echo héllo 🦆"}


def test_exactly_max_actions_is_fine() -> None:
    text = json.dumps({"actions": [{"tool": f"t{i}"} for i in range(MAX_ACTIONS)]})
    assert len(parse_directive(text).actions) == MAX_ACTIONS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("I don't think any tool is needed.", "no JSON"),
        ('{"actions": [}', "invalid JSON"),
        ("{'actions': []}", "invalid JSON"),
        ('{"actions": [{"tool": "shell",}]}', "invalid JSON"),
        ('{"actions": [{"tool": "shell"', "invalid JSON"),
        ('{"actions": {"tool": "shell"}}', "'actions' must be a list"),
        ('{"actions": null}', "'actions' must be a list"),
        ('{"actions": "shell"}', "'actions' must be a list"),
        ('{"answer": "no tools"}', "no 'actions'"),
        ('{"actions": ["shell"]}', "action 1 is not an object"),
        ('{"actions": [{"tool": "a"}, {"args": {}}]}', "action 2 has no 'tool'"),
        ('{"actions": [{"tool": "   "}]}', "action 1 has an empty 'tool'"),
        ('{"actions": [{"tool": 7}]}', "'tool' must be a string"),
        ('{"actions": [{"tool": "shell", "args": "uptime"}]}', "'args' must be an object"),
        ('{"actions": [{"tool": "shell", "args": ["uptime"]}]}', "'args' must be an object"),
        ("[1, 2]", "action 1 is not an object"),
        (json.dumps({"actions": [{"tool": "t"}] * (MAX_ACTIONS + 1)}), "more than the 20"),
    ],
)
def test_refusals(text: str, message: str) -> None:
    with pytest.raises(DirectiveError, match=message.replace("(", r"\(")):
        parse_directive(text)


def test_too_long_text_is_refused() -> None:
    text = json.dumps({"actions": [{"tool": "shell", "args": {"x": "a" * 300_000}}]})
    with pytest.raises(DirectiveError, match="longer than 256 KiB"):
        parse_directive(text)
    # Counted in UTF-8 bytes, not characters.
    with pytest.raises(DirectiveError, match="longer than"):
        parse_directive('{"actions": [], "pad": "' + "é" * 140_000 + '"}')


def test_just_under_the_size_limit_parses() -> None:
    text = json.dumps({"actions": [{"tool": "shell", "args": {"x": "a" * 200_000}}]})
    assert parse_directive(text).actions[0].args["x"] == "a" * 200_000


@pytest.mark.parametrize(
    ("opener", "depth"),
    [
        ("[", 10_000),
        ("{", 10_000),
        ('{"a":', 10_000),
        ('{"actions": [{"tool": "x", "args": ', 5_000),
    ],
)
def test_deep_nesting_is_refused_not_recursed(opener: str, depth: int) -> None:
    started = time.thread_time()
    with pytest.raises(DirectiveError, match="nested deeper"):
        parse_directive(opener * depth)
    assert time.thread_time() - started < 2  # CPU time: other load does not count


def test_deep_but_balanced_nesting_is_refused() -> None:
    with pytest.raises(DirectiveError, match="nested deeper"):
        parse_directive("[" * 10_000 + "]" * 10_000)


def test_nesting_within_the_limit_is_fine() -> None:
    args: dict = {}
    inner = args
    for _ in range(40):
        inner["x"] = {}
        inner = inner["x"]
    assert parse_directive(json.dumps({"actions": [{"tool": "t", "args": args}]})).actions


@pytest.mark.parametrize(
    "text",
    [
        '{"a": "' + '\\"' * 100_000 + '"}',
        "[" * 40 + '"' * 200_000,
        "[]" * 100_000,
        "{" * 30 + "]" * 100_000,
        '"[{' * 80_000,
        "1" * 5000 + "[" + "1" * 5000 + "]",
        '{"actions": [{"tool": "t", "args": {"n": ' + "9" * 5000 + "}}]}",
    ],
)
def test_hostile_text_is_fast_and_only_raises_directive_error(text: str) -> None:
    started = time.thread_time()
    try:
        parse_directive(text)
    except DirectiveError:
        pass
    assert time.thread_time() - started < 2  # CPU time: other load does not count


def test_non_string_input_is_a_directive_error() -> None:
    with pytest.raises(DirectiveError):
        parse_directive(None)  # type: ignore[arg-type]
    with pytest.raises(DirectiveError):
        parse_directive(b'{"actions": []}')  # type: ignore[arg-type]


def test_directive_error_is_a_value_error() -> None:
    assert issubclass(DirectiveError, ValueError)


# -- properties ------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["tool", "args", "reason", "actions", "x"]), children)
    ),
    max_leaves=20,
)
_junk = st.text(alphabet='[]{}",:\\ \n`actionsargtolre0123ué', max_size=200)


def _only_directive_errors(text: str) -> Directive | None:
    try:
        return parse_directive(text)
    except DirectiveError:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_arbitrary_text_raises_only_directive_error(text: str) -> None:
    _only_directive_errors(text)


@settings(max_examples=400, deadline=None)
@given(_junk)
def test_bracket_soup_raises_only_directive_error(text: str) -> None:
    _only_directive_errors(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), _json_values, st.text(max_size=30))
def test_json_in_prose_raises_only_directive_error(before: str, value: object, after: str) -> None:
    _only_directive_errors(before + json.dumps(value) + after)


_actions = st.lists(
    st.fixed_dictionaries(
        {
            "tool": st.text(min_size=1, max_size=10).filter(str.strip),
            "args": st.dictionaries(st.text(max_size=5), _json_values, max_size=3),
        },
        optional={"reason": st.text(max_size=20)},
    ),
    max_size=MAX_ACTIONS,
)


@settings(max_examples=200, deadline=None)
@given(_actions, st.sampled_from(["{}", "```json\n{}\n```", "Here: {} Done.", "```\n{}```"]))
def test_valid_directives_round_trip(actions: list[dict], wrapper: str) -> None:
    text = wrapper.replace("{}", json.dumps({"actions": actions}), 1)
    directive = parse_directive(text)
    assert [a.tool for a in directive.actions] == [a["tool"].strip() for a in actions]
    assert [a.args for a in directive.actions] == [a["args"] for a in actions]


def test_a_fence_inside_a_json_string_does_not_cut_the_directive() -> None:
    actions = [{"tool": "a", "args": {}}, {"tool": "b", "args": {"note": "```"}}]
    text = "```json\n" + json.dumps({"actions": actions}) + "\n```"
    assert [a.tool for a in parse_directive(text).actions] == ["a", "b"]


def test_a_cut_off_directive_never_yields_one_of_its_actions() -> None:
    cut = (
        '{"actions": [{"tool": "shell_exec_safe", "args": {"command": "ls"}}, '
        '{"tool": "shell_exec_safe", "args": {"command": "rm -rf build"'
    )
    with pytest.raises(DirectiveError, match="cut off"):
        parse_directive(cut)
    with pytest.raises(DirectiveError):
        parse_directive("```json\n" + cut + "\n```")


# -- issue 17: known tool names only, and the schema -------------------------------


def test_known_tools_only_when_the_names_are_given() -> None:
    text = json.dumps({"actions": [SHELL, {"tool": "teleport", "args": {}}]})
    assert len(parse_directive(text).actions) == 2  # no names: any tool
    with pytest.raises(DirectiveError, match=r"action 2 names an unknown tool 'teleport'"):
        parse_directive(text, ["shell", "read_file"])
    assert parse_directive(json.dumps(SHELL), {"shell"}).actions[0].tool == "shell"


def test_a_copied_tool_line_is_not_an_action() -> None:
    # What a weak model did with the old prompt: the tool list came back.
    copied = '{"tool": "shell_exec_safe: Run one shell command", "args": {}, "reason": "<why>"}'
    with pytest.raises(DirectiveError, match="unknown tool"):
        parse_directive(copied, ["shell_exec_safe"])


def test_directive_schema_names_each_tool_with_its_arguments() -> None:
    specs = [
        {
            "tool": "shell",
            "args": {"type": "object", "properties": {"command": {"type": "string"}}},
        },
        {"tool": "list_dir", "args": {"type": "object", "properties": {}}},
    ]
    schema = directive_schema(specs)
    assert schema["required"] == ["actions"] and schema["additionalProperties"] is False
    items = schema["properties"]["actions"]
    assert items["maxItems"] == MAX_ACTIONS
    branches = items["items"]["anyOf"]
    assert [b["properties"]["tool"]["enum"] for b in branches] == [["shell"], ["list_dir"]]
    assert branches[0]["properties"]["args"] == specs[0]["args"]
    only = directive_schema(specs[:1])["properties"]["actions"]["items"]
    assert only["properties"]["tool"]["enum"] == ["shell"]
    assert directive_schema([])["properties"]["actions"]["maxItems"] == 0
