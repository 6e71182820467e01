"""Issue 17: both action protocols, structured output negotiated, bounded and
cut-off replies, the repair round, against the fake server over real HTTP.

The fake behaves like OpenAI by default (honours `tools`, checks `tool`
messages against the calls before them, checks the `json_schema` form); each
test switches on the quirks of the server it stands for (llama-cpp-python,
Ollama). Nothing of ours is mocked: the real ModelClient (httpx), the real
loop, store, approvals and shell tool run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runtime.factory import Runtime, build_runtime
from runtime.model import ModelClient, ModelToolsUnsupportedError
from runtime.store.models import Event
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import (
    Error,
    FakeModelServer,
    Quirks,
    RecordedRequest,
    Text,
    ToolCalls,
)

NO_ACTIONS = directive()
LLAMA_CPP = Quirks(
    ignore_tools_auto=True,
    response_formats={"json_object", "json_object_schema"},
    format_refusal_status=500,
)
QUESTION = [{"role": "user", "content": "how full is the disk?"}]


def types(events: list[Event]) -> list[str]:
    return [e.event_type for e in events]


def of_type(events: list[Event], kind: str) -> list[dict[str, Any]]:
    return [e.payload for e in events if e.event_type == kind]


def call(command: str, reason: str = "test") -> tuple[str, dict[str, Any]]:
    return ("shell_exec_safe", {"command": command, "reason": reason})


def tool_messages(request: RecordedRequest) -> list[dict[str, Any]]:
    return [m for m in request.body["messages"] if m["role"] == "tool"]


async def make_runtime(
    tmp_path: Path, server: FakeModelServer, **overrides: Any
) -> AsyncIterator[Runtime]:
    rt = await build_runtime(make_settings(tmp_path, server.base_url, **overrides))
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
async def tools_rt(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> AsyncIterator[Runtime]:
    async for rt in make_runtime(tmp_path, model_server, action_protocol="tools"):
        yield rt


@pytest.fixture
async def directive_rt(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> AsyncIterator[Runtime]:
    async for rt in make_runtime(tmp_path, model_server, action_protocol="directive"):
        yield rt


@pytest.fixture
async def auto_rt(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> AsyncIterator[Runtime]:
    async for rt in make_runtime(tmp_path, model_server):
        yield rt


async def events_of(rt: Runtime, task_id: str) -> list[Event]:
    return await rt.stores.events.list_events(task_id)


# -- bounded, deterministic requests -----------------------------------------------


async def test_every_request_is_bounded_per_role(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("fine"))
    async for rt in make_runtime(
        tmp_path,
        model_server,
        action_max_tokens=300,
        thinker_max_tokens=900,
        thinker_temperature=0.7,
    ):
        assert (await rt.loop.run_chat("q")).status == "completed"
    action, thinker = model_server.requests_for(ACTION)[0], model_server.requests_for(THINKER)[0]
    assert (action.body["max_tokens"], action.body["temperature"]) == (300, 0.0)
    assert (thinker.body["max_tokens"], thinker.body["temperature"]) == (900, 0.7)


def test_protocol_setting_is_checked(tmp_path: Path, clean_env: None) -> None:
    with pytest.raises(ValueError, match=r"action_protocol|DUCKLM_ACTION_PROTOCOL"):
        make_settings(tmp_path, "http://127.0.0.1:9/v1", action_protocol="telepathy")


# -- finish_reason ------------------------------------------------------------------


async def test_cut_off_action_reply_is_a_failed_directive_never_an_empty_one(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    # The case: a reply cut at max_tokens that only echoed the prompt,
    # whose own example parses. It must not run, nor count as "no tools".
    from runtime.context import ContextBuilder

    echo = ContextBuilder().action_prompt
    end_of_example = echo.index("}]}") + 3
    assert '"df -h /var"' in echo[:end_of_example]
    # 4 characters a token in the fake: the cut falls just after the example.
    limit = end_of_example // 4 + 8
    model_server.quirks.truncate_at_max_tokens = True
    model_server.reply(ACTION, Text(echo), Text(directive(shell("echo repaired"))))
    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("answered"))
    async for rt in make_runtime(
        tmp_path, model_server, action_protocol="directive", action_max_tokens=limit
    ):
        result = await rt.loop.run_chat("q")
        events = await events_of(rt, result.task_id)
    assert result.status == "completed"
    assert model_server.requests_for(ACTION)[0].body["max_tokens"] == limit
    failed = of_type(events, "action_directive_failed")
    assert len(failed) == 1 and failed[0]["finish_reason"] == "length"
    assert "cut off" in failed[0]["error"]
    commands = [a["command"] for a in of_type(events, "command_audit")]
    assert commands == ["echo repaired"]  # the prompt's example never ran
    repair = model_server.requests_for(ACTION)[1].body["messages"][-1]["content"]
    assert "cut off" in repair and "JSON Schema" in repair


async def test_content_filter_on_action_is_a_failed_directive(
    directive_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.set_default(ACTION, Text(NO_ACTIONS, finish_reason="content_filter"))
    model_server.reply(THINKER, Text("sorry"))
    result = await directive_rt.loop.run_chat("q")
    events = await events_of(directive_rt, result.task_id)
    assert [f["finish_reason"] for f in of_type(events, "action_directive_failed")] == [
        "content_filter",
        "content_filter",
    ]
    assert "action_directive" not in types(events)
    assert "Planning failed" in result.final_response


async def test_cut_off_answer_is_posted_with_a_note(
    auto_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.quirks.truncate_at_max_tokens = True
    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("word " * 5000))
    result = await auto_rt.loop.run_chat("tell me everything")
    assert result.status == "completed"
    assert result.final_response.startswith("word word")
    assert (
        "cut off" in result.final_response and "DUCKLM_THINKER_MAX_TOKENS" in result.final_response
    )
    finished = of_type(await events_of(auto_rt, result.task_id), "model_call_finished")
    assert finished[-1]["finish_reason"] == "length"


# -- structured output, negotiated ---------------------------------------------------


async def test_directive_protocol_sends_the_schema_with_tool_names_as_enum(
    directive_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("ok"))
    await directive_rt.loop.run_chat("q")
    body = model_server.requests_for(ACTION)[0].body
    assert "tools" not in body
    form = body["response_format"]
    assert form["type"] == "json_schema" and form["json_schema"]["name"] == "directive"
    schema = form["json_schema"]["schema"]
    branches = schema["properties"]["actions"]["items"]["anyOf"]
    names = {b["properties"]["tool"]["enum"][0] for b in branches}
    assert {"shell_exec_safe", "read_file", "list_dir"} <= names
    # the prompt describes tools in plain text, with one concrete example
    system = body["messages"][0]["content"]
    assert "- shell_exec_safe:" in system and '"command": "df -h /var"' in system
    assert "<" not in system.split("Tools:")[0].replace("<kind>", "")  # no placeholders


async def test_llama_cpp_forms_fall_back_in_one_call_and_are_remembered(
    model_server: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    # llama-cpp-python: the OpenAI form is a 500 naming it; its own form works.
    model_server.quirks = LLAMA_CPP
    model_server.set_default(ACTION, Text(NO_ACTIONS))
    schema = {"type": "object", "properties": {"actions": {"type": "array"}}}
    caplog.set_level(logging.WARNING, "ducklm.model")
    async with ModelClient(model_server.base_url, None, {"action": ACTION}, max_retries=3) as c:
        first = await c.chat("action", QUESTION, schema=schema)
        second = await c.chat("action", QUESTION, schema=schema)
    assert (first.response_form, second.response_form) == ("json_object_schema",) * 2
    sent = [r.body["response_format"] for r in model_server.requests_for(ACTION)]
    assert [f["type"] for f in sent] == ["json_schema", "json_object", "json_object"]
    assert sent[1] == {"type": "json_object", "schema": schema}
    # one fallback, logged once, and no retries of the 500 (it named response_format)
    assert len(model_server.requests_for(ACTION)) == 3
    assert len([r for r in caplog.records if "refused response_format" in r.message]) == 1


@pytest.mark.parametrize(
    ("accepted", "status", "expected", "used"),
    [
        (set(), 400, ["json_schema", "json_object_schema", "json_object", None], None),
        ({"json_object"}, 422, ["json_schema", "json_object_schema", "json_object"], "json_object"),
        ({"json_schema", "json_object"}, 400, ["json_schema"], "json_schema"),
    ],
)
async def test_each_refusal_steps_down_one_form(
    model_server: FakeModelServer,
    accepted: set[str],
    status: int,
    expected: list[str | None],
    used: str | None,
) -> None:
    model_server.quirks = Quirks(response_formats=accepted, format_refusal_status=status)
    model_server.set_default(ACTION, Text(NO_ACTIONS))
    async with ModelClient(model_server.base_url, None, {"action": ACTION}, max_retries=0) as c:
        reply = await c.chat("action", QUESTION, schema={"type": "object"})
    assert reply.response_form == used

    def form(body: dict[str, Any]) -> str | None:
        rf = body.get("response_format")
        if rf is None:
            return None
        return "json_object_schema" if "schema" in rf else rf["type"]

    assert [form(r.body) for r in model_server.requests_for(ACTION)] == expected


async def test_a_500_that_names_nothing_is_retried_not_a_fallback(
    model_server: FakeModelServer,
) -> None:
    model_server.reply(ACTION, Error(500, "CUDA out of memory"), Text(NO_ACTIONS))
    async with ModelClient(
        model_server.base_url, None, {"action": ACTION}, max_retries=1, backoff=0.01
    ) as c:
        reply = await c.chat("action", QUESTION, schema={"type": "object"})
        assert c.response_form == "json_schema"
    assert reply.response_form == "json_schema"
    assert [r.body["response_format"]["type"] for r in model_server.requests] == ["json_schema"] * 2


async def test_llama_cpp_end_to_end_under_auto(
    auto_rt: Runtime, model_server: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    # llama-cpp-python ignores tools under tool_choice auto: the model writes
    # prose. That prose is not "no tools": the same turn is asked again as a
    # directive, in the server's own schema form, and the action runs.
    model_server.quirks = LLAMA_CPP
    caplog.set_level(logging.INFO)
    model_server.reply(
        ACTION,
        ToolCalls([call("echo never")], text="Let me check the disk usage for you."),
        Text(directive(shell("echo from-llama", "check"))),
        Text(NO_ACTIONS),
    )
    model_server.reply(THINKER, Text("disk is fine"))
    result = await auto_rt.loop.run_chat("how is the disk?")
    assert (result.status, result.final_response) == ("completed", "disk is fine")
    requests = model_server.requests_for(ACTION)
    assert "tools" in requests[0].body
    assert all("tools" not in r.body for r in requests[1:])  # remembered
    assert requests[-1].body["response_format"]["type"] == "json_object"
    events = await events_of(auto_rt, result.task_id)
    assert [a["command"] for a in of_type(events, "command_audit")] == ["echo from-llama"]
    assert "action_directive_failed" not in types(events)
    assert any(
        "action protocol auto" in r.message and "directive" in r.message for r in caplog.records
    )


# -- native tool calling -------------------------------------------------------------


async def test_several_tool_calls_in_one_reply_and_results_as_tool_messages(
    tools_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(
        ACTION,
        ToolCalls([call("echo one", "first"), ("list_dir", {"path": "."})]),
        Text(NO_ACTIONS),
    )
    model_server.reply(THINKER, Text("both ran"))
    result = await tools_rt.loop.run_chat("two things")
    assert result.status == "completed"
    first, second = model_server.requests_for(ACTION)
    assert first.body["tool_choice"] == "auto"
    functions = {t["function"]["name"]: t["function"] for t in first.body["tools"]}
    assert {"shell_exec_safe", "read_file", "list_dir"} <= set(functions)
    assert "reason" in functions["shell_exec_safe"]["parameters"]["properties"]
    assert "response_format" not in first.body
    # The fake checks every tool message answers a call of the assistant message.
    assistant = [m for m in second.body["messages"] if m.get("tool_calls")]
    assert len(assistant) == 1 and len(assistant[0]["tool_calls"]) == 2
    answers = tool_messages(second)
    assert [m["tool_call_id"] for m in answers] == [c["id"] for c in assistant[0]["tool_calls"]]
    assert "one" in json.loads(answers[0]["content"])["result"]["output"]
    events = await events_of(tools_rt, result.task_id)
    recorded = of_type(events, "action_directive")[0]
    assert recorded["protocol"] == "tools" and recorded["via"] == "tool_calls"
    assert [(a["tool"], a["args"], a["reason"]) for a in recorded["actions"]] == [
        ("shell_exec_safe", {"command": "echo one"}, "first"),
        ("list_dir", {"path": "."}, None),
    ]
    # the thinker gets observations as text, as ever
    thinker = model_server.requests_for(THINKER)[0].body["messages"][-1]["content"]
    assert thinker.startswith("tool_observations:\n") and "call_id" not in thinker


async def test_streamed_tool_call_deltas_are_assembled(model_server: FakeModelServer) -> None:
    model_server.reply(
        ACTION, ToolCalls([call("uptime", "load"), ("read_file", '{"path": "a b.txt"}')])
    )
    tools = [{"type": "function", "function": {"name": "shell_exec_safe", "parameters": {}}}]
    async with ModelClient(model_server.base_url, None, {"action": ACTION}, stream=True) as c:
        reply = await c.chat("action", QUESTION, tools=tools)
    assert model_server.requests[0].body["stream"] is True
    assert reply.finish_reason == "tool_calls"
    assert [(t.name, json.loads(t.arguments)) for t in reply.tool_calls] == [
        ("shell_exec_safe", {"command": "uptime", "reason": "load"}),
        ("read_file", {"path": "a b.txt"}),
    ]
    assert all(t.id.startswith("call_") for t in reply.tool_calls)


async def test_tools_approve_resumes_with_the_call_answered(
    tools_rt: Runtime, model_server: FakeModelServer
) -> None:
    workspace = tools_rt.settings.workspace
    model_server.reply(
        ACTION,
        ToolCalls([call("echo before"), call("touch made.txt", "create the marker")]),
        Text(NO_ACTIONS),
    )
    model_server.reply(THINKER, Text("made"))
    waiting = await tools_rt.loop.run_chat("make the marker")
    assert waiting.status == "waiting_for_approval"
    pending = waiting.pending_approval
    assert pending is not None and pending.command == "touch made.txt"
    assert pending.model_reason == "create the marker"
    assert not (workspace / "made.txt").exists()
    await tools_rt.approvals.decide(pending.approval_id, "approve", "console:bob")
    done = await tools_rt.loop.continue_after_approval(waiting.task_id, pending.approval_id)
    assert (done.status, done.final_response) == ("completed", "made")
    assert (workspace / "made.txt").exists()
    resumed = model_server.requests_for(ACTION)[-1]
    answers = tool_messages(resumed)
    assert len(answers) == 2
    assert json.loads(answers[1]["content"])["decision"] == "approve"
    audits = of_type(await events_of(tools_rt, waiting.task_id), "command_audit")
    assert [(a["command"], a["approved"]) for a in audits] == [
        ("echo before", False),
        ("touch made.txt", False),
        ("touch made.txt", True),
    ]


async def test_tools_deny_tells_the_model_in_the_tool_message(
    tools_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, ToolCalls([call("touch nope.txt")]), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("not touching it"))
    waiting = await tools_rt.loop.run_chat("touch nope")
    approval_id = waiting.pending_approval.approval_id  # type: ignore[union-attr]
    await tools_rt.approvals.decide(approval_id, "deny", "console:bob", "not in prod hours")
    done = await tools_rt.loop.continue_after_approval(waiting.task_id, approval_id)
    assert done.status == "completed"
    assert not (tools_rt.settings.workspace / "nope.txt").exists()
    answer = json.loads(tool_messages(model_server.requests_for(ACTION)[-1])[0]["content"])
    assert answer["decision"] == "deny" and "not in prod hours" in answer["result"]["error"]


async def test_tools_always_makes_a_rule_used_next_time(
    tools_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.set_default(THINKER, Text("done"))
    model_server.reply(ACTION, ToolCalls([call("touch always.txt")]), Text(NO_ACTIONS))
    first = await tools_rt.loop.run_chat("touch it")
    approval_id = first.pending_approval.approval_id  # type: ignore[union-attr]
    outcome = await tools_rt.approvals.decide(approval_id, "always", "console:bob")
    assert outcome.taken and outcome.rule is not None
    done = await tools_rt.loop.continue_after_approval(first.task_id, approval_id)
    assert done.status == "completed"
    model_server.reply(ACTION, ToolCalls([call("touch always.txt")]), Text(NO_ACTIONS))
    second = await tools_rt.loop.run_chat("again")
    events = await events_of(tools_rt, second.task_id)
    assert second.status == "completed" and "tool_approval_requested" not in types(events)
    assert of_type(events, "command_audit")[0]["approved_by"] == "rule"


async def test_tools_iteration_limit(tools_rt: Runtime, model_server: FakeModelServer) -> None:
    model_server.set_default(ACTION, ToolCalls([call("echo again")]))
    model_server.reply(THINKER, Text("gave up"))
    result = await tools_rt.loop.run_chat("loop")
    events = await events_of(tools_rt, result.task_id)
    assert types(events).count("action_directive") == 4
    assert of_type(events, "tool_iteration_limit_reached") == [{"max_tool_iterations": 4}]
    last = model_server.requests_for(ACTION)[-1]
    assert len([m for m in last.body["messages"] if m.get("tool_calls")]) == 3
    assert len(tool_messages(last)) == 3


async def test_tools_restart_while_waiting(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    settings = make_settings(tmp_path, model_server.base_url, action_protocol="tools")
    model_server.reply(ACTION, ToolCalls([call("touch later.txt")]), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("made it"))
    first = await build_runtime(settings)
    waiting = await first.loop.run_chat("make later.txt")
    await first.close()
    second = await build_runtime(settings)
    try:
        pending = await second.approvals.pending()
        await second.approvals.decide(pending[0].approval_id, "approve", "console:bob")
        done = await second.loop.continue_after_approval(waiting.task_id, pending[0].approval_id)
    finally:
        await second.close()
    assert (done.status, done.final_response) == ("completed", "made it")
    assert (settings.workspace / "later.txt").exists()
    resumed = model_server.requests_for(ACTION)[-1]
    call_ids = [c["id"] for m in resumed.body["messages"] for c in m.get("tool_calls") or []]
    assert [m["tool_call_id"] for m in tool_messages(resumed)] == call_ids and call_ids


async def test_auto_uses_tools_where_honoured(
    auto_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, ToolCalls([call("echo native")]), Text("No more tools needed."))
    model_server.reply(THINKER, Text("ok"))
    result = await auto_rt.loop.run_chat("q")
    assert result.status == "completed"
    requests = model_server.requests_for(ACTION)
    assert all("tools" in r.body for r in requests)
    # Once the server has called a tool, prose is the model saying "no tools".
    events = await events_of(auto_rt, result.task_id)
    assert [d["via"] for d in of_type(events, "action_directive")] == ["tool_calls", "text"]
    assert "action_directive_failed" not in types(events)


@pytest.mark.parametrize("server", ["ollama", "vllm", "llama-server"])
async def test_auto_falls_back_when_the_server_refuses_tools(
    auto_rt: Runtime, model_server: FakeModelServer, server: str
) -> None:
    model_server.quirks.reject_tools = server
    model_server.reply(ACTION, Text(directive(shell("echo ollama"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("ok"))
    result = await auto_rt.loop.run_chat("q")
    assert result.status == "completed"
    requests = model_server.requests_for(ACTION)
    assert ["tools" in r.body for r in requests] == [True, False, False]
    assert auto_rt.model is not None and auto_rt.model.tools_supported is False


async def test_tools_forced_on_a_server_without_them_fails_clearly(
    tools_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.quirks.reject_tools = "ollama"
    result = await tools_rt.loop.run_chat("q")
    assert result.status == "failed"
    assert "refused native tool calling" in result.final_response
    assert "DUCKLM_ACTION_PROTOCOL=directive" in result.final_response
    assert len(model_server.requests_for(ACTION)) == 1  # not retried


async def test_tools_unsupported_is_remembered_by_the_client(
    model_server: FakeModelServer,
) -> None:
    model_server.quirks.reject_tools = "ollama"
    tools = [{"type": "function", "function": {"name": "x", "parameters": {}}}]
    async with ModelClient(model_server.base_url, None, {"action": ACTION}) as c:
        for _ in range(2):
            with pytest.raises(ModelToolsUnsupportedError):
                await c.chat("action", QUESTION, tools=tools)
    assert len(model_server.requests) == 1


# -- the repair round ----------------------------------------------------------------


async def test_unknown_tool_call_is_repaired(
    tools_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(
        ACTION,
        ToolCalls([("teleport", {"to": "prod"})]),
        ToolCalls([call("echo fixed")]),
        Text(NO_ACTIONS),
    )
    model_server.reply(THINKER, Text("fixed"))
    result = await tools_rt.loop.run_chat("q")
    events = await events_of(tools_rt, result.task_id)
    failed = of_type(events, "action_directive_failed")
    assert len(failed) == 1 and "unknown tool 'teleport'" in failed[0]["error"]
    assert failed[0]["protocol"] == "tools" and failed[0]["tool_calls"][0]["name"] == "teleport"
    assert of_type(events, "action_directive")[0]["repaired"] is True
    repair = model_server.requests_for(ACTION)[1].body["messages"]
    assert "teleport" in repair[-2]["content"] and "shell_exec_safe" in repair[-1]["content"]
    assert [a["command"] for a in of_type(events, "command_audit")] == ["echo fixed"]


async def test_tool_arguments_that_are_not_json_are_repaired(
    tools_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(
        ACTION,
        ToolCalls([("shell_exec_safe", '{"command": "ls')]),
        ToolCalls([call("echo ok")]),
        Text(NO_ACTIONS),
    )
    model_server.reply(THINKER, Text("fine"))
    result = await tools_rt.loop.run_chat("q")
    events = await events_of(tools_rt, result.task_id)
    assert "not JSON" in of_type(events, "action_directive_failed")[0]["error"]
    assert [a["command"] for a in of_type(events, "command_audit")] == ["echo ok"]


async def test_directive_repair_then_planning_failed_is_said(
    directive_rt: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(
        ACTION,
        Text(directive({"tool": "<tool name>", "args": {}, "reason": "<one short sentence>"})),
        Text("I would run ls, I think."),
    )
    model_server.reply(THINKER, Text("I could not plan this."))
    result = await directive_rt.loop.run_chat("q")
    assert result.status == "completed"
    assert result.final_response.startswith("I could not plan this.")
    assert "Planning failed" in result.final_response
    thinker = model_server.requests_for(THINKER)[0].body["messages"][-1]["content"]
    assert thinker.startswith("planning_failed:")
    events = await events_of(directive_rt, result.task_id)
    failed = of_type(events, "action_directive_failed")
    assert [f["repair"] for f in failed] == [False, True]
    assert "unknown tool '<tool name>'" in failed[0]["error"]
    assert "tool_call_started" not in types(events)
    repair = model_server.requests_for(ACTION)[1].body
    assert "JSON Schema" in repair["messages"][-1]["content"]
    assert repair["response_format"]["type"] == "json_schema"


async def test_tools_protocol_never_takes_prose_for_no_tools_before_seeing_a_call(
    tools_rt: Runtime, model_server: FakeModelServer
) -> None:
    # A server that ignores tools under auto, with the protocol forced to tools:
    # the prose goes back for repair, and the repaired empty directive ends it.
    model_server.quirks.ignore_tools_auto = True
    model_server.reply(ACTION, Text("Sure, the disk is fine."), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("answer"))
    result = await tools_rt.loop.run_chat("q")
    events = await events_of(tools_rt, result.task_id)
    assert len(of_type(events, "action_directive_failed")) == 1
    assert of_type(events, "action_directive")[0]["repaired"] is True
    assert result.final_response == "answer"


async def test_tool_names_outside_openai_pattern_are_aliased_and_mapped_back(
    model_server: FakeModelServer,
) -> None:
    # The fake refuses function names OpenAI refuses; a tool of another kind
    # (an MCP server's, say) may be named so. It is sent under an alias.
    from runtime.context import ContextBuilder
    from runtime.planner import ActionPlanner

    specs = [
        {
            "tool": "db.query",
            "description": "Run a read-only SQL query.",
            "args": {"type": "object", "properties": {"sql": {"type": "string"}}},
        }
    ]
    model_server.reply(ACTION, ToolCalls([("db_query", {"sql": "select 1", "reason": "probe"})]))
    recorded: list[tuple[str, dict[str, Any]]] = []
    async with ModelClient(
        model_server.base_url, None, {"action": ACTION}, action_protocol="tools"
    ) as client:
        planner = ActionPlanner(client, ContextBuilder(specs))
        plan = await planner.plan(
            client.chat, lambda kind, payload: recorded.append((kind, payload)), QUESTION, []
        )
    sent = model_server.requests[0].body["tools"]
    assert [t["function"]["name"] for t in sent] == ["db_query"]
    assert [(a["tool"], a["args"], a["reason"]) for a in plan.actions] == [
        ("db.query", {"sql": "select 1"}, "probe")
    ]
    assert recorded[0][0] == "action_directive" and recorded[0][1]["protocol"] == "tools"
    assert (
        "- db.query: Run a read-only SQL query."
        in model_server.requests[0].body["messages"][0]["content"]
    )
