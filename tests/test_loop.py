"""RuntimeLoop end to end: real store (SQLite and PostgreSQL), real tools, real httpx
against the fake model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from runtime.factory import Runtime, build_runtime
from runtime.store.models import Event
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import Error, FakeModelServer, RecordedRequest, Text
from tests.postgres import PostgresServer, raw_rows

pytestmark = pytest.mark.backends("sqlite", "postgres")

NO_ACTIONS = directive()


def types(events: list[Event]) -> list[str]:
    return [e.event_type for e in events]


def last_user_content(request: RecordedRequest) -> str:
    return request.body["messages"][-1]["content"]


def observations_in(request: RecordedRequest) -> list[dict]:
    content = last_user_content(request)
    assert content.startswith("tool_observations:\n")
    return json.loads(content.split("\n", 1)[1])


async def events_of(rt: Runtime, task_id: str) -> list[Event]:
    return await rt.stores.events.list_events(task_id)


async def test_plain_answer(runtime: Runtime, model_server: FakeModelServer) -> None:
    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("All good.", reasoning_content="thought about it"))

    result = await runtime.loop.run_chat("is everything ok?")

    assert (result.status, result.final_response) == ("completed", "All good.")
    assert result.reasoning_content == "thought about it"
    events = await events_of(runtime, result.task_id)
    assert types(events) == [
        "task_created",
        "model_call_started",
        "model_call_finished",
        "action_directive",
        "model_call_started",
        "cognition_response",
        "model_call_finished",
        "task_completed",
    ]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    finished = events[-2].payload
    assert finished["model"] == THINKER and finished["total_tokens"] == 15
    task = await runtime.stores.tasks.get_task(result.task_id)
    assert task is not None and task.status == "completed" and task.final_response == "All good."
    # the action model is prompted with the tools and the directive format
    system = model_server.requests_for(ACTION)[0].body["messages"][0]["content"]
    assert "shell_exec_safe" in system and '"actions"' in system


async def test_read_only_tool_runs_then_answer(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, Text(directive(shell("echo duck-says-hi"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("It said hi."))

    result = await runtime.loop.run_chat("say hi")

    assert result.status == "completed"
    observations = observations_in(model_server.requests_for(THINKER)[0])
    assert observations[0]["tool"] == "shell_exec_safe"
    assert "duck-says-hi" in observations[0]["result"]["output"]
    events = await events_of(runtime, result.task_id)
    audit = next(e.payload for e in events if e.event_type == "command_audit")
    assert audit["command"] == "echo duck-says-hi"
    assert audit["risk_level"] == "low" and audit["ok"] and audit["returncode"] == 0
    assert not audit["approved"] and not audit["requires_approval"]
    assert "tool_approval_requested" not in types(events)


async def test_approve_runs_once_and_answer_has_output(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    workspace = runtime.settings.workspace
    history = [
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
    ]
    model_server.reply(
        ACTION,
        Text(directive(shell("echo first"), shell("touch made.txt", "create the marker"))),
        Text(directive(shell("ls"))),
        Text(NO_ACTIONS),
    )
    model_server.set_handler(
        THINKER, lambda req: Text("answer from " + str(len(observations_in(req))) + " observations")
    )

    result = await runtime.loop.run_chat(
        "make the marker", history_messages=history, requested_by="console:alice"
    )

    assert result.status == "waiting_for_approval"
    pending = result.pending_approval
    assert pending is not None
    assert pending.command == "touch made.txt" and pending.tool == "shell_exec_safe"
    assert pending.model_reason == "create the marker" and pending.requested_by == "console:alice"
    assert pending.risk_level in ("medium", "high") and pending.reason
    assert not (workspace / "made.txt").exists()
    task = await runtime.stores.tasks.get_task(result.task_id)
    assert task is not None and task.status == "waiting_for_approval"

    outcome = await runtime.approvals.decide(pending.approval_id, "approve", "console:bob")
    assert outcome.taken
    done = await runtime.loop.continue_after_approval(result.task_id, pending.approval_id)

    assert done.status == "completed"
    assert (workspace / "made.txt").exists()
    # the continuation saw the original context: history, question, every observation
    last_action = model_server.requests_for(ACTION)[-1].body["messages"]
    assert {"role": "user", "content": "earlier question"} in last_action
    assert any(m["content"] == "make the marker" for m in last_action)
    thinker_obs = observations_in(model_server.requests_for(THINKER)[-1])
    assert [o["index"] for o in thinker_obs] == [1, 2, 3]
    assert thinker_obs[1]["decision"] == "approve" and thinker_obs[1]["result"]["ok"]
    assert done.final_response == "answer from 3 observations"

    audits = [
        e.payload
        for e in await events_of(runtime, result.task_id)
        if e.event_type == "command_audit"
    ]
    touch = [a for a in audits if a["command"] == "touch made.txt"]
    assert [a["approved"] for a in touch] == [False, True]
    assert touch[1]["approved_by"] == "console:bob" and touch[1]["returncode"] == 0

    # a second continuation (double click, retry) changes nothing and runs nothing
    again = await runtime.loop.continue_after_approval(result.task_id, pending.approval_id)
    assert again.status == "completed" and again.final_response == "Already handled."
    audits_after = [
        e for e in await events_of(runtime, result.task_id) if e.event_type == "command_audit"
    ]
    assert len(audits_after) == len(audits)


async def test_deny_tells_the_model_the_reason(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, Text(directive(shell("touch nope.txt"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("Understood, not touching it."))

    waiting = await runtime.loop.run_chat("touch nope")
    approval_id = waiting.pending_approval.approval_id  # type: ignore[union-attr]
    await runtime.approvals.decide(approval_id, "deny", "console:bob", "not in prod hours")
    done = await runtime.loop.continue_after_approval(waiting.task_id, approval_id)

    assert done.status == "completed"
    assert not (runtime.settings.workspace / "nope.txt").exists()
    # the action model is asked again, with the denial and its reason, so it may propose
    # something else; then the thinker answers
    replan = observations_in(model_server.requests_for(ACTION)[-1])
    assert replan[0]["decision"] == "deny"
    assert "not in prod hours" in replan[0]["result"]["error"]
    events = await events_of(runtime, waiting.task_id)
    decided = [e.payload for e in events if e.event_type == "approval_decided"]
    assert decided == [
        {
            "approval_id": approval_id,
            "decision": "deny",
            "decided_by": "console:bob",
            "note": "not in prod hours",
        }
    ]
    audit = [e.payload for e in events if e.event_type == "command_audit"][-1]
    assert audit["approved"] is False and audit["returncode"] is None


async def test_always_then_no_approval_next_time(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    model_server.set_default(THINKER, Text("done"))
    model_server.reply(ACTION, Text(directive(shell("touch always.txt"))), Text(NO_ACTIONS))
    first = await runtime.loop.run_chat("touch it")
    approval_id = first.pending_approval.approval_id  # type: ignore[union-attr]
    outcome = await runtime.approvals.decide(approval_id, "always", "console:bob")
    assert outcome.taken and outcome.rule is not None and outcome.rule.kind == "exact"
    assert (
        await runtime.loop.continue_after_approval(first.task_id, approval_id)
    ).status == "completed"

    model_server.reply(ACTION, Text(directive(shell("touch always.txt"))), Text(NO_ACTIONS))
    second = await runtime.loop.run_chat("touch it again")

    assert second.status == "completed"
    events = await events_of(runtime, second.task_id)
    assert "tool_approval_requested" not in types(events)
    audit = next(e.payload for e in events if e.event_type == "command_audit")
    assert audit["approved_by"] == "rule" and audit["ok"]


async def test_iteration_limit(runtime: Runtime, model_server: FakeModelServer) -> None:
    model_server.set_default(ACTION, Text(directive(shell("echo again"))))
    model_server.reply(THINKER, Text("gave up looping"))

    result = await runtime.loop.run_chat("loop forever")

    assert result.status == "completed"
    events = await events_of(runtime, result.task_id)
    assert types(events).count("action_directive") == runtime.loop.max_tool_iterations == 4
    limit = [e for e in events if e.event_type == "tool_iteration_limit_reached"]
    assert limit[0].payload == {"max_tool_iterations": 4}
    assert len(observations_in(model_server.requests_for(THINKER)[0])) == 4


async def test_malformed_and_wrong_shaped_directives(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    model_server.set_default(THINKER, Text("answered without tools"))
    for bad in (
        "I think we should run ls",
        '{"actions": "ls"}',
        '{"actions": [{"args": {}}]}',
        "[1, 2",
    ):
        # The same bad answer to the request and to its one repair round (issue 17).
        model_server.set_default(ACTION, Text(bad))
        result = await runtime.loop.run_chat("question")
        assert result.status == "completed", bad
        assert "Planning failed" in result.final_response, bad
        events = await events_of(runtime, result.task_id)
        failed = [e.payload for e in events if e.event_type == "action_directive_failed"]
        assert len(failed) == 2 and all(f["error"] for f in failed), bad
        assert [f["repair"] for f in failed] == [False, True], bad
        assert "tool_call_started" not in types(events)


async def test_directive_in_code_fence_with_prose(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    fenced = "Sure! Here is my plan:\n```json\n" + directive(shell("echo fenced")) + "\n```"
    model_server.reply(ACTION, Text(fenced), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("ok"))
    result = await runtime.loop.run_chat("q")
    events = await events_of(runtime, result.task_id)
    assert "action_directive_failed" not in types(events)
    assert any(
        e.event_type == "command_audit" and e.payload["command"] == "echo fenced" for e in events
    )


async def test_unknown_tool_is_repaired_and_bad_args_are_observations(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    # An unknown tool is a failed directive the model is told about (issue 17's
    # repair round); bad arguments to a known tool are the tool's observation.
    model_server.reply(
        ACTION,
        Text(
            directive(
                {"tool": "teleport", "args": {}}, {"tool": "shell_exec_safe", "args": {"cmd": 1}}
            )
        ),
        Text(directive({"tool": "shell_exec_safe", "args": {"cmd": 1}})),
        Text(NO_ACTIONS),
    )
    model_server.reply(THINKER, Text("could not"))
    result = await runtime.loop.run_chat("q")
    assert result.status == "completed"
    repair = last_user_content(model_server.requests_for(ACTION)[1])
    assert "unknown tool 'teleport'" in repair
    assert "shell_exec_safe" in repair  # names what exists
    observations = observations_in(model_server.requests_for(THINKER)[0])
    assert observations[0]["result"]["ok"] is False and observations[0]["result"]["error"]


async def test_server_error_then_success_is_retried(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, Error(500, "overloaded"), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("fine"))
    result = await runtime.loop.run_chat("q")
    assert result.status == "completed"
    assert len(model_server.requests_for(ACTION)) == 2


async def test_wrong_key_fails_the_task_clearly(
    tmp_path: Path, clean_env: None, db_target: str
) -> None:
    server = FakeModelServer(api_key="sk-right")
    await server.start()
    try:
        settings = make_settings(tmp_path, server.base_url, model_api_key="sk-wrong", db=db_target)
        rt = await build_runtime(settings)
        try:
            result = await rt.loop.run_chat("q")
        finally:
            await rt.close()
    finally:
        await server.stop()
    assert result.status == "failed"
    assert "key" in result.final_response.lower() and "401" in result.final_response
    assert "Traceback" not in result.final_response
    assert len(server.requests) == 1  # an auth error is not retried


async def test_fifty_tasks_at_once(runtime: Runtime, model_server: FakeModelServer) -> None:
    model_server.set_default(ACTION, Text(NO_ACTIONS))
    model_server.set_default(THINKER, Text("ok"))
    results = await asyncio.gather(*(runtime.loop.run_chat(f"question {i}") for i in range(50)))
    assert {r.status for r in results} == {"completed"}
    assert len({r.task_id for r in results}) == 50
    for r in results:
        events = await events_of(runtime, r.task_id)
        assert [e.seq for e in events] == list(range(1, 9))
        assert events[0].event_type == "task_created" and events[-1].event_type == "task_completed"


async def test_concurrent_decisions_run_the_action_once(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    model_server.set_default(THINKER, Text("done"))
    model_server.set_default(ACTION, Text(NO_ACTIONS))
    model_server.reply(ACTION, Text(directive(shell("echo line >> count.txt"))))
    waiting = await runtime.loop.run_chat("append a line")
    approval_id = waiting.pending_approval.approval_id  # type: ignore[union-attr]

    outcomes = await asyncio.gather(
        *(runtime.approvals.decide(approval_id, "approve", f"console:u{i}") for i in range(10))
    )
    assert sum(o.taken for o in outcomes) == 1
    results = await asyncio.gather(
        *(runtime.loop.continue_after_approval(waiting.task_id, approval_id) for _ in range(10))
    )
    assert sum(r.final_response == "done" for r in results) == 1
    assert (runtime.settings.workspace / "count.txt").read_text() == "line\n"


async def test_pending_approval_survives_a_new_process(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None, db_target: str
) -> None:
    settings = make_settings(tmp_path, model_server.base_url, db=db_target)
    model_server.reply(ACTION, Text(directive(shell("touch later.txt"))), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("made it"))

    first = await build_runtime(settings)
    waiting = await first.loop.run_chat(
        "make later.txt", history_messages=[{"role": "user", "content": "context!"}]
    )
    await first.close()

    second = await build_runtime(settings)  # a fresh connection to the same database
    try:
        pending = await second.approvals.pending()
        assert [a.approval_id for a in pending] == [waiting.pending_approval.approval_id]  # type: ignore[union-attr]
        await second.approvals.decide(pending[0].approval_id, "approve", "console:bob")
        done = await second.loop.continue_after_approval(waiting.task_id, pending[0].approval_id)
    finally:
        await second.close()
    assert done.status == "completed" and done.final_response == "made it"
    assert (settings.workspace / "later.txt").exists()
    assert {"role": "user", "content": "context!"} in model_server.requests_for(ACTION)[-1].body[
        "messages"
    ]


async def test_read_file_cannot_escape_the_workspace(
    runtime: Runtime, model_server: FakeModelServer, tmp_path: Path
) -> None:
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    workspace = runtime.settings.workspace
    (workspace / "link").symlink_to(tmp_path / "secret.txt")
    (workspace / "notes.txt").write_text("hello notes")
    attempts = [
        {"tool": "read_file", "args": {"path": "../secret.txt"}},
        {"tool": "read_file", "args": {"path": str(tmp_path / "secret.txt")}},
        {"tool": "read_file", "args": {"path": "link"}},
        {"tool": "read_file", "args": {"path": "notes.txt"}},
        {"tool": "list_dir", "args": {"path": ".."}},
    ]
    model_server.reply(ACTION, Text(directive(*attempts)), Text(NO_ACTIONS))
    model_server.reply(THINKER, Text("ok"))
    await runtime.loop.run_chat("read things")

    observations = observations_in(model_server.requests_for(THINKER)[0])
    assert "TOP SECRET" not in json.dumps(observations)
    assert [o["result"]["ok"] for o in observations] == [False, False, False, True, False]
    assert observations[3]["result"]["output"] == "hello notes"
    assert "outside the workspace" in observations[2]["result"]["error"]


async def test_no_model_configured_fails_with_the_variable_names(
    tmp_path: Path, clean_env: None, db_target: str
) -> None:
    rt = await build_runtime(make_settings(tmp_path, db=db_target))
    try:
        assert rt.model is None
        result = await rt.loop.run_chat("hello?")
    finally:
        await rt.close()
    assert result.status == "failed" and "DUCKLM_MODEL_BASE_URL" in result.final_response


async def test_direct_commands_need_no_model(
    tmp_path: Path, clean_env: None, db_target: str
) -> None:
    rt = await build_runtime(make_settings(tmp_path, db=db_target))
    try:
        ok = await rt.loop.run_command("echo direct", requested_by="console:alice")
        blocked = await rt.loop.run_command("rm -rf /")
        waiting = await rt.loop.run_command("touch direct.txt")
        assert waiting.status == "waiting_for_approval" and waiting.pending_approval
        await rt.approvals.decide(waiting.pending_approval.approval_id, "approve", "console:bob")
        done = await rt.loop.continue_after_approval(
            waiting.task_id, waiting.pending_approval.approval_id
        )
        ok_events = await events_of(rt, ok.task_id)
        blocked_events = await events_of(rt, blocked.task_id)
    finally:
        await rt.close()

    assert ok.status == "completed" and "direct" in ok.final_response
    assert ok_events[1].event_type == "direct_command" and ok_events[1].payload["model"] is None
    assert "model_call_started" not in types(ok_events)
    assert blocked.status == "completed" and "blocked" in blocked.final_response
    audit = next(e.payload for e in blocked_events if e.event_type == "command_audit")
    assert audit["blocked"] and audit["risk_level"] == "critical"
    assert done.status == "completed" and (tmp_path / "workspace" / "direct.txt").exists()


# -- what is on disk before each outside effect ------------------------------------


def committed_types(db: str, task_id: str) -> list[str]:
    """The task's events as another connection (another process) sees them: only
    what is committed."""
    rows = raw_rows(db, "SELECT event_type FROM events WHERE task_id = ? ORDER BY seq", [task_id])
    return [row[0] for row in rows]


async def test_events_are_committed_before_each_model_call(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    seen: dict[str, list[str]] = {}
    task_ids: list[str] = []
    runtime.loop.add_listener(
        lambda e: task_ids.append(e.task_id) if e.event_type == "task_created" else None
    )

    def answer(role: str, reply: str):
        def handler(request: RecordedRequest) -> Text:
            seen[role] = committed_types(runtime.settings.db, task_ids[0])
            return Text(reply)

        return handler

    model_server.set_handler(ACTION, answer("action", NO_ACTIONS))
    model_server.set_handler(THINKER, answer("thinker", "done"))
    result = await runtime.loop.run_chat("q")

    assert result.status == "completed"
    assert seen["action"] == ["task_created", "model_call_started"]
    assert seen["thinker"] == [
        "task_created",
        "model_call_started",
        "model_call_finished",
        "action_directive",
        "model_call_started",
    ]
    # Recorded times are kept: each event has the time it happened, in order.
    events = await events_of(runtime, result.task_id)
    stamps = [e.created_at for e in events]
    assert stamps == sorted(stamps)


@pytest.mark.backends("sqlite", reason="the command reads the SQLite file; see the psql test below")
async def test_a_tool_starts_only_after_its_start_is_committed(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    # The database lives in the workspace, so a read-only command can look for
    # its own `tool_call_started` in the files (the pattern does not match the
    # command's own text, which is also stored). The sandbox hides the bot's own
    # database from unasked commands, so it is off here (tests/test_sandbox.py).
    settings = make_settings(tmp_path, model_server.base_url, sandbox="off")
    settings.db = settings.workspace / "duck.db"
    rt = await build_runtime(settings)
    try:
        look = "grep -a -o -h 'tool_call_starte[d]' duck.db duck.db-wal"
        model_server.reply(ACTION, Text(directive(shell(look))), Text(NO_ACTIONS))
        model_server.reply(THINKER, Text("seen"))
        result = await rt.loop.run_chat("look")
        events = await events_of(rt, result.task_id)
        output = next(e for e in events if e.event_type == "tool_call_finished").payload["result"][
            "output"
        ]
        assert "tool_call_started" in output

        # An approved action: the process counts the committed starts itself.
        count = (
            "python3 -c \"import sqlite3; print('starts:', sqlite3.connect('duck.db')"
            ".execute(\\\"SELECT count(*) FROM events WHERE event_type = 'tool_call_started' "
            "AND json_extract(payload, '$.approval_id') IS NOT NULL\\\").fetchone()[0])\""
        )
        waiting = await rt.loop.run_command(count)
        assert waiting.status == "waiting_for_approval" and waiting.pending_approval
        approval_id = waiting.pending_approval.approval_id
        assert (await rt.approvals.decide(approval_id, "approve", "console:bob")).taken
        done = await rt.loop.continue_after_approval(waiting.task_id, approval_id)
        assert done.status == "completed"
        assert "starts: 1" in done.final_response
    finally:
        await rt.close()


async def test_a_tool_starts_only_after_its_start_is_committed_on_postgres(
    tmp_path: Path,
    model_server: FakeModelServer,
    clean_env: None,
    postgres_url: str,
    postgres_server: PostgresServer,
) -> None:
    """PostgreSQL's form of the test above: the command itself asks the server (psql,
    another client) how many tool starts are committed, and sees its own."""
    settings = make_settings(tmp_path, model_server.base_url, sandbox="off", db=postgres_url)
    rt = await build_runtime(settings)
    try:
        psql = postgres_server.bindir / "psql"
        count = (
            f"{psql} -tA -d {postgres_url} -c \"SELECT 'starts: ' || count(*) FROM events "
            "WHERE event_type = 'tool_call_started' "
            "AND payload::json ->> 'approval_id' IS NOT NULL\""
        )
        waiting = await rt.loop.run_command(count)
        assert waiting.status == "waiting_for_approval" and waiting.pending_approval
        approval_id = waiting.pending_approval.approval_id
        assert (await rt.approvals.decide(approval_id, "approve", "console:bob")).taken
        done = await rt.loop.continue_after_approval(waiting.task_id, approval_id)
        assert done.status == "completed"
        assert "starts: 1" in done.final_response, done.final_response
    finally:
        await rt.close()


async def test_an_in_process_read_is_written_with_the_next_group(
    runtime: Runtime, model_server: FakeModelServer
) -> None:
    # read_file neither starts a process nor changes anything, so its start and
    # finish are written together, before the next model call, not before it runs.
    (runtime.settings.workspace / "notes.txt").write_text("load 0.3\n")
    gateway = runtime.loop._gateway(str(runtime.settings.workspace))
    assert not gateway.leaves_the_process({"tool": "read_file", "args": {}})
    assert gateway.leaves_the_process({"tool": "shell_exec_safe", "args": {}})
    assert gateway.leaves_the_process({"tool": "no_such_tool", "args": {}})

    seen: list[list[str]] = []
    task_ids: list[str] = []
    runtime.loop.add_listener(
        lambda e: task_ids.append(e.task_id) if e.event_type == "task_created" else None
    )
    replies = iter([directive({"tool": "read_file", "args": {"path": "notes.txt"}}), NO_ACTIONS])

    def action(request: RecordedRequest) -> Text:
        seen.append(committed_types(runtime.settings.db, task_ids[0]))
        return Text(next(replies))

    model_server.set_handler(ACTION, action)
    model_server.reply(THINKER, Text("fine"))
    result = await runtime.loop.run_chat("how is the load?")

    assert result.status == "completed"
    assert seen[1][-4:] == [
        "action_directive",
        "tool_call_started",
        "tool_call_finished",
        "model_call_started",
    ]
