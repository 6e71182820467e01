"""MCP tools end to end: a real MCP server (tests/fakes/mcp_server.py, written with the
official SDK) started as a subprocess by the real runtime, driven through the real
RuntimeLoop by the fake OpenAI-compatible model server.

What ran is checked from the server's side (it appends every call to calls.jsonl),
not from anything the client says.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from runtime.factory import Runtime, build_runtime
from runtime.tools.mcp.config import McpConfigError, load_config, parse_config
from runtime.tools.mcp.tool import model_name
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import FakeModelServer, RecordedRequest, Text, ToolCalls
from tests.test_console import cli_env

REPO = Path(__file__).resolve().parent.parent
NO_ACTIONS = directive()
SECRET = "mcp-s3cret-value-7f3a9c21"


def mcp(tool: str, reason: str = "test", **args: Any) -> dict[str, Any]:
    return {"tool": f"mcp__demo__{tool}", "args": args, "reason": reason}


def demo_server(state: Path, **extra: Any) -> dict[str, Any]:
    return {
        "command": sys.executable,
        "args": ["-m", "tests.fakes.mcp_server", str(state)],
        "cwd": str(REPO),
        "read_only": ["lookup", "show_env", "wipe"],
        "env": {"DEMO_API_TOKEN": SECRET, "DEMO_LEVEL": "debug"},
        # A loaded CI machine can take a while to start Python and the SDK.
        "startup_timeout": 120,
        **extra,
    }


def calls(state: Path) -> list[dict[str, Any]]:
    path = state / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def observations_in(request: RecordedRequest) -> list[dict[str, Any]]:
    content = request.body["messages"][-1]["content"]
    assert content.startswith("tool_observations:\n"), content[:200]
    return json.loads(content.split("\n", 1)[1])


async def wait_for(predicate: Any, limit: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def build(tmp_path: Path, model_server: FakeModelServer, config: Any) -> Runtime:
    path = tmp_path / "mcp.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    settings = make_settings(
        tmp_path, model_server.base_url, mcp_config=path, action_protocol="directive"
    )
    return await build_runtime(settings)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "mcp-state"


@pytest_asyncio.fixture
async def rt(
    tmp_path: Path, state: Path, model_server: FakeModelServer, clean_env: None
) -> AsyncIterator[Runtime]:
    model_server.set_default(THINKER, Text("Done."))
    runtime = await build(
        tmp_path,
        model_server,
        {
            "mcpServers": {
                "demo": demo_server(state),
                "broken": {"command": str(tmp_path / "no-such-mcp-server")},
                "off": {"command": "whatever", "enabled": False},
            }
        },
    )
    try:
        yield runtime
    finally:
        await runtime.close()


async def test_tools_listed_reported_and_offered_to_the_model(
    rt: Runtime, model_server: FakeModelServer
) -> None:
    report = rt.startup_notices()
    assert len(report) == 3
    ready = next(line for line in report if "'demo' ready" in line)
    assert "9 tool(s), 2 run unasked" in ready  # wipe is read_only but says destructive
    assert "'wipe' is read_only in the config but the server says it changes things" in ready
    broken = next(line for line in report if "'broken'" in line)
    assert "failed to start" in broken and "no-such-mcp-server" in broken
    assert any("'off' is disabled" in line for line in report)

    names = {spec["tool"] for spec in rt.loop._gateway(None).specs()}
    assert {"mcp__demo__lookup", "mcp__demo__write_note", "shell_exec_safe"} <= names
    assert not any("broken" in name for name in names)

    model_server.reply(ACTION, Text(NO_ACTIONS))
    await rt.loop.run_chat("what tools do you have?")
    system = model_server.requests_for(ACTION)[0].body["messages"][0]["content"]
    assert "mcp__demo__lookup" in system and "from MCP server 'demo'" in system


async def test_read_only_tool_runs_at_once_and_is_audited(
    rt: Runtime, state: Path, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, Text(directive(mcp("lookup", key="k1"))), Text(NO_ACTIONS))

    result = await rt.loop.run_chat("look up k1")

    assert result.status == "completed"
    observation = observations_in(model_server.requests_for(THINKER)[0])[0]
    assert observation["tool"] == "mcp__demo__lookup"
    assert observation["result"]["ok"] and "value-of-k1" in observation["result"]["output"]
    assert [c["tool"] for c in calls(state)] == ["lookup"]
    events = await rt.stores.events.list_events(result.task_id)
    kinds = [e.event_type for e in events]
    assert "tool_approval_requested" not in kinds
    started = next(e.payload for e in events if e.event_type == "tool_call_started")
    assert started == {"index": 1, "tool": "mcp__demo__lookup", "args": {"key": "k1"}}
    finished = next(e.payload for e in events if e.event_type == "tool_call_finished")
    meta = finished["result"]["metadata"]
    assert meta["mcp_server"] == "demo" and meta["mcp_tool"] == "lookup"
    assert meta["risk_level"] == "low" and not meta["requires_approval"]
    assert meta["description"] == 'mcp demo/lookup {"key": "k1"}'
    assert kinds.index("tool_call_started") < kinds.index("tool_call_finished")


async def test_writing_tool_needs_approval_then_runs_once(
    rt: Runtime, state: Path, model_server: FakeModelServer
) -> None:
    model_server.reply(
        ACTION, Text(directive(mcp("write_note", "keep a note", text="hello"))), Text(NO_ACTIONS)
    )

    waiting = await rt.loop.run_chat("note hello", requested_by="console:alice")

    assert waiting.status == "waiting_for_approval"
    pending = waiting.pending_approval
    assert pending is not None
    assert pending.tool == "mcp__demo__write_note"
    assert pending.command == 'mcp demo/write_note {"text": "hello"}'
    assert pending.risk_level == "medium" and "not marked read-only" in (pending.reason or "")
    assert pending.model_reason == "keep a note"
    assert calls(state) == [] and not (state / "notes.txt").exists()

    assert (await rt.approvals.decide(pending.approval_id, "approve", "console:bob")).taken
    done = await rt.loop.continue_after_approval(waiting.task_id, pending.approval_id)

    assert done.status == "completed"
    assert (state / "notes.txt").read_text() == "hello\n"
    again = await rt.loop.continue_after_approval(waiting.task_id, pending.approval_id)
    assert again.already_handled
    assert [c["tool"] for c in calls(state)] == ["write_note"]
    events = await rt.stores.events.list_events(waiting.task_id)
    requested = next(e.payload for e in events if e.event_type == "tool_approval_requested")
    assert requested["tool"] == "mcp__demo__write_note" and requested["risk_level"] == "medium"
    finished = [e.payload for e in events if e.event_type == "tool_call_finished"]
    assert len(finished) == 1 and finished[0]["result"]["ok"]
    assert "wrote 5 characters" in finished[0]["result"]["output"]
    started = [e.payload for e in events if e.event_type == "tool_call_started"]
    assert [s.get("approval_id") for s in started] == [None, pending.approval_id]


async def test_deny_runs_nothing(rt: Runtime, state: Path, model_server: FakeModelServer) -> None:
    model_server.reply(ACTION, Text(directive(mcp("write_note", text="no"))), Text(NO_ACTIONS))
    waiting = await rt.loop.run_chat("note no")
    approval_id = waiting.pending_approval.approval_id  # type: ignore[union-attr]

    await rt.approvals.decide(approval_id, "deny", "console:bob", "not today")
    done = await rt.loop.continue_after_approval(waiting.task_id, approval_id)

    assert done.status == "completed"
    assert calls(state) == [] and not (state / "notes.txt").exists()
    replan = observations_in(model_server.requests_for(ACTION)[-1])
    assert replan[0]["decision"] == "deny" and "not today" in replan[0]["result"]["error"]


async def test_always_makes_an_exact_rule_for_those_arguments_only(
    rt: Runtime, state: Path, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, Text(directive(mcp("write_note", text="a"))), Text(NO_ACTIONS))
    first = await rt.loop.run_chat("note a")
    approval_id = first.pending_approval.approval_id  # type: ignore[union-attr]
    outcome = await rt.approvals.decide(approval_id, "always", "console:bob")
    assert outcome.rule is not None and outcome.rule.kind == "exact"
    await rt.loop.continue_after_approval(first.task_id, approval_id)

    model_server.reply(ACTION, Text(directive(mcp("write_note", text="a"))), Text(NO_ACTIONS))
    assert (await rt.loop.run_chat("note a again")).status == "completed"
    model_server.reply(ACTION, Text(directive(mcp("write_note", text="b"))), Text(NO_ACTIONS))
    assert (await rt.loop.run_chat("note b")).status == "waiting_for_approval"
    assert (state / "notes.txt").read_text() == "a\na\n"


async def test_server_read_only_hint_does_not_make_a_tool_auto(
    rt: Runtime, state: Path, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, Text(directive(mcp("sneaky_write", text="x"))), Text(NO_ACTIONS))

    result = await rt.loop.run_chat("sneak")

    assert result.status == "waiting_for_approval"
    assert result.pending_approval is not None
    assert result.pending_approval.risk_level == "medium"
    assert calls(state) == [] and not (state / "sneaky.txt").exists()


async def test_destructive_hint_overrides_the_operators_read_only(
    rt: Runtime, state: Path, model_server: FakeModelServer
) -> None:
    model_server.reply(ACTION, Text(directive(mcp("wipe", target="/srv"))), Text(NO_ACTIONS))

    result = await rt.loop.run_chat("wipe it")

    assert result.status == "waiting_for_approval"
    pending = result.pending_approval
    assert pending is not None and pending.risk_level == "high"
    assert "says it is destructive" in (pending.reason or "")
    assert calls(state) == []


async def test_arguments_are_checked_against_the_schema_before_anything_runs(
    rt: Runtime, state: Path, model_server: FakeModelServer
) -> None:
    model_server.reply(
        ACTION,
        Text(directive(mcp("lookup", key=5))),
        Text(directive(mcp("write_note"))),
        Text(NO_ACTIONS),
    )

    result = await rt.loop.run_chat("bad args")

    assert result.status == "completed"
    observations = observations_in(model_server.requests_for(THINKER)[0])
    wrong_type, missing = (o["result"] for o in observations)
    assert not wrong_type["ok"] and "invalid arguments" in wrong_type["error"]
    assert "key: 5 is not of type 'string'" in wrong_type["error"]
    assert "'text' is a required property" in missing["error"]
    assert calls(state) == []  # neither reached the server, and nothing waits for approval
    assert await rt.approvals.pending() == []


async def test_secrets_from_the_config_are_redacted_from_tool_output(
    rt: Runtime, state: Path, model_server: FakeModelServer
) -> None:
    model_server.reply(
        ACTION,
        Text(directive(mcp("show_env", name="DEMO_API_TOKEN"))),
        Text(directive(mcp("show_env", name="DEMO_LEVEL"))),
        Text(NO_ACTIONS),
    )

    result = await rt.loop.run_chat("show the token")

    token, level = (o["result"] for o in observations_in(model_server.requests_for(THINKER)[0]))
    assert SECRET not in json.dumps(token) and "[REDACTED" in token["output"]
    assert level["output"] == "DEMO_LEVEL=debug"  # not a credential: left alone
    events = await rt.stores.events.list_events(result.task_id)
    assert SECRET not in json.dumps([e.payload for e in events])
    assert "redacted" in result.final_response


async def test_a_server_that_dies_gives_a_clear_error_is_restarted_once_and_the_rest_works(
    tmp_path: Path, state: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    config = {"mcpServers": {"demo": demo_server(state, read_only=["lookup", "die"])}}
    model_server.set_default(THINKER, Text("Done."))
    rt = await build(tmp_path, model_server, config)
    try:
        first_pid = int((state / "started.txt").read_text())
        model_server.reply(
            ACTION,
            Text(directive(mcp("die"), mcp("lookup", key="after"), shell("echo still-here"))),
            Text(directive(mcp("die"), mcp("lookup", key="again"))),
            Text(NO_ACTIONS),
        )
        result = await rt.loop.run_chat("kill it")

        assert result.status == "completed"
        died, lookup, echo, died_again, too_soon = (
            o["result"] for o in observations_in(model_server.requests_for(THINKER)[0])
        )
        assert not died["ok"] and "MCP server 'demo'" in died["error"]
        assert "not running any more" in died["error"]
        assert "the connection closed during a call to die" in died["error"]
        # The next call started it again; the call that killed it was not repeated.
        assert lookup["ok"] and "value-of-after" in lookup["output"]
        assert echo["ok"] and "still-here" in echo["output"]
        assert not died_again["ok"] and "not running any more" in died_again["error"]
        # A second death within RESTART_PAUSE: no restart loop, a clear error.
        assert not too_soon["ok"] and too_soon["metadata"]["server_unavailable"]
        assert "tries again on a later call (at most every 30 s)" in too_soon["error"]
        made = calls(state)
        assert [c["tool"] for c in made] == ["die", "lookup", "die"]
        assert made[0]["pid"] == first_pid != made[1]["pid"] == made[2]["pid"]
        assert rt.mcp is not None and rt.mcp.servers[0].state == "dead"
        assert rt.mcp.servers[0].restarts == 1
    finally:
        await rt.close()


async def test_close_stops_the_server_process(
    tmp_path: Path, state: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    rt = await build(tmp_path, model_server, {"mcpServers": {"demo": demo_server(state)}})
    pid = int((state / "started.txt").read_text())
    assert pid_alive(pid)

    await rt.close()

    await wait_for(lambda: not pid_alive(pid), what="the MCP server to exit")


async def test_bad_config_file_is_reported_and_nothing_else_breaks(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    model_server.set_default(THINKER, Text("Done."))
    rt = await build(tmp_path, model_server, '{"mcpServers": {"demo": {"command": "x",}}}')
    try:
        (line,) = rt.startup_notices()
        assert "config error" in line and "mcp.json" in line and "not valid JSON" in line
        assert "line 1" in line
        model_server.reply(ACTION, Text(directive(shell("echo fine"))), Text(NO_ACTIONS))
        result = await rt.loop.run_chat("still there?")
        assert result.status == "completed"
        assert (
            "fine" in observations_in(model_server.requests_for(THINKER)[0])[0]["result"]["output"]
        )
    finally:
        await rt.close()


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ([], "must hold a JSON object"),
        ({}, "no 'mcpServers'"),
        ({"mcpServers": []}, "must be an object"),
        ({"mcpServers": {"a b": {"command": "x"}}}, "server name 'a b'"),
        ({"mcpServers": {"s": "x"}}, "mcpServers.s must be an object"),
        ({"mcpServers": {"s": {}}}, "either 'command'"),
        ({"mcpServers": {"s": {"command": "x", "url": "http://h/mcp"}}}, "either 'command'"),
        ({"mcpServers": {"s": {"command": "x", "autoApprove": ["a"]}}}, "s.autoApprove: unknown"),
        ({"mcpServers": {"s": {"url": "ftp://h"}}}, "s.url: Value error, must be an http"),
        ({"mcpServers": {"s": {"command": "x", "read_only": "a"}}}, "s.read_only"),
        ({"mcpServers": {"s": {"command": "x", "timeout": 0}}}, "s.timeout"),
        ({"mcpServers": {"s": {"command": "x", "headers": {"A": "b"}}}}, "'headers' apply"),
        ({"mcpServers": {"s": {"url": "http://h/mcp", "env": {"A": "b"}}}}, "apply to a 'command'"),
        (
            {"mcpServers": {"s": {"command": "x", "env": {"T": "${DUCKLM_TEST_UNSET_VAR}"}}}},
            "s.env.T uses ${DUCKLM_TEST_UNSET_VAR}, which is not set",
        ),
    ],
)
def test_config_errors_name_the_problem(document: Any, expected: str, tmp_path: Path) -> None:
    with pytest.raises(McpConfigError) as caught:
        parse_config(document, tmp_path / "mcp.json", environ={})
    assert expected in str(caught.value)
    assert str(tmp_path / "mcp.json") in str(caught.value)


def test_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(McpConfigError, match="no such file"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(McpConfigError, match="cannot read it"):
        load_config(bad)


def test_config_variables_secrets_and_other_clients_keys(tmp_path: Path) -> None:
    document = {
        "globalShortcut": "ignored",  # other top-level keys of a Claude Desktop file
        "mcpServers": {
            "a": {
                "type": "stdio",
                "command": "srv",
                "env": {"API_TOKEN": "${MY_TOKEN}", "LEVEL": "info"},
            },
            "b": {
                "url": "https://mcp.example.org/mcp",
                "headers": {"Authorization": "Bearer ${MY_TOKEN}", "Accept-Language": "en"},
                "disabled": True,
            },
        },
    }
    config = parse_config(document, tmp_path / "mcp.json", environ={"MY_TOKEN": "tok-123456789"})
    a, b = config.servers
    assert a.env == {"API_TOKEN": "tok-123456789", "LEVEL": "info"}
    assert a.secret_values() == ["tok-123456789"]
    assert b.headers["Authorization"] == "Bearer tok-123456789"
    assert set(b.secret_values()) == {"Bearer tok-123456789", "tok-123456789"}
    assert [s.name for s in config.active] == ["a"] and b.transport == "http"
    assert a.cwd is None
    relative = parse_config(
        {"mcpServers": {"r": {"command": "srv", "cwd": "servers/r"}}}, tmp_path / "mcp.json", {}
    )
    assert relative.servers[0].cwd == str(tmp_path / "servers" / "r")


def test_model_names_fit_function_name_rules() -> None:
    taken: set[str] = set()
    first = model_name("srv", "get.item", taken)
    assert first == "mcp__srv__get_item"
    taken.add(first)
    clash = model_name("srv", "get_item", taken)
    assert clash != first and clash.startswith("mcp__srv__get_item_")
    long = model_name("server", "x" * 200, set())
    assert len(long) == 64
    import re

    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in (first, clash, long))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_streamable_http_server(
    tmp_path: Path, state: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    port = _free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.mcp_server",
        str(state),
        "--http",
        str(port),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        await wait_for(listening, limit=90, what="the HTTP MCP server")
        config = {
            "mcpServers": {
                "demo": {
                    "url": f"http://127.0.0.1:{port}/mcp",
                    "headers": {"X-Api-Key": SECRET},
                    "read_only": ["lookup"],
                    "startup_timeout": 120,
                }
            }
        }
        model_server.set_default(THINKER, Text("Done."))
        rt = await build(tmp_path, model_server, config)
        try:
            assert "'demo' ready (http" in rt.startup_notices()[0]
            model_server.reply(
                ACTION,
                Text(directive(mcp("lookup", key="web"), mcp("write_note", text="w"))),
                Text(NO_ACTIONS),
            )
            result = await rt.loop.run_chat("over http")
            assert result.status == "waiting_for_approval"
            assert [c["tool"] for c in calls(state)] == ["lookup"]
            approval_id = result.pending_approval.approval_id  # type: ignore[union-attr]
            await rt.approvals.decide(approval_id, "approve", "console:bob")
            done = await rt.loop.continue_after_approval(result.task_id, approval_id)
            assert done.status == "completed"
            assert [c["tool"] for c in calls(state)] == ["lookup", "write_note"]

            # The server goes away: a clear error at once, then one try to reconnect.
            server.kill()
            await asyncio.wait_for(server.wait(), 10)
            model_server.reply(
                ACTION,
                Text(directive(mcp("lookup", key="x"), mcp("lookup", key="y"))),
                Text(NO_ACTIONS),
            )
            started = time.monotonic()
            gone = await rt.loop.run_chat("still there?")
            assert gone.status == "completed" and time.monotonic() - started < 30
            first, second = (
                o["result"] for o in observations_in(model_server.requests_for(THINKER)[-1])
            )
            assert not first["ok"] and "MCP server 'demo'" in first["error"]
            assert "stopped answering" in first["error"]
            assert "trying again failed" in second["error"] and SECRET not in second["error"]
        finally:
            await rt.close()
    finally:
        if server.returncode is None:
            server.terminate()
            await asyncio.wait_for(server.wait(), 10)


def test_no_config_loads_nothing_of_mcp(tmp_path: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "from runtime.factory import build_runtime\n"
        "from runtime.settings import Settings\n"
        f"s = Settings(_env_file=None, db={str(tmp_path / 'x.db')!r})\n"
        "rt = asyncio.run(build_runtime(s))\n"
        "names = ('mcp', 'mcp.', 'mcp_types', 'runtime.tools.mcp')\n"
        "print(sorted(m for m in sys.modules if m.startswith(names)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUCKLM_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def _cli(tmp_path: Path, *args: str, stdin: str = "", **extra: str) -> tuple[int, str, str]:
    env = cli_env(tmp_path, **extra)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_console_reports_servers_at_start_and_approves_an_mcp_call(
    tmp_path: Path, state: Path, model_server: FakeModelServer
) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "demo": demo_server(state),
                    "broken": {"command": str(tmp_path / "no-such-mcp-server")},
                }
            }
        )
    )
    model_server.reply(
        ACTION, Text(directive(mcp("write_note", text="from the console"))), Text(NO_ACTIONS)
    )
    model_server.set_default(THINKER, Text("Noted."))

    code, out, err = await _cli(
        tmp_path,
        "console",
        stdin="take a note\napprove\nexit\n",
        DUCKLM_MCP_CONFIG=str(path),
        DUCKLM_MODEL_BASE_URL=model_server.base_url,
        DUCKLM_MODEL_API_KEY="sk-test",
        DUCKLM_THINKER_MODEL=THINKER,
        DUCKLM_ACTION_MODEL=ACTION,
        DUCKLM_ACTION_PROTOCOL="directive",
    )

    assert code == 0, err
    assert "mcp: server 'demo' ready (stdio" in err
    assert "mcp: MCP server 'broken'" in err and "failed to start" in err
    assert '\n  mcp demo/write_note {"text": "from the console"}\n' in out
    assert "Noted." in out
    assert (state / "notes.txt").read_text() == "from the console\n"

    # Store-only commands do not start MCP servers.
    (state / "started.txt").unlink()
    code, out, err = await _cli(tmp_path, "tasks", DUCKLM_MCP_CONFIG=str(path))
    assert code == 0, err
    assert "mcp:" not in err and not (state / "started.txt").exists()


async def test_slow_calls_time_out_and_long_output_is_cut(
    tmp_path: Path, state: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {"mcpServers": {"demo": demo_server(state, read_only=["nap", "big"], timeout=1)}}
        )
    )
    settings = make_settings(
        tmp_path,
        model_server.base_url,
        mcp_config=path,
        action_protocol="directive",
        shell_max_output=2048,
    )
    model_server.set_default(THINKER, Text("Done."))
    rt = await build_runtime(settings)
    try:
        model_server.reply(
            ACTION,
            Text(directive(mcp("nap", seconds=30))),
            Text(directive(mcp("big", size=5000))),
            Text(NO_ACTIONS),
        )
        started = time.monotonic()
        result = await rt.loop.run_chat("be slow")
        assert time.monotonic() - started < 25  # the nap alone is 30 s
        assert result.status == "completed"
        slow, big = (o["result"] for o in observations_in(model_server.requests_for(THINKER)[0]))
        assert not slow["ok"] and "did not answer nap within 1 s" in slow["error"]
        # The server itself is fine: the next call works.
        assert big["ok"] and big["metadata"]["truncated"]
        assert big["output"].startswith("x" * 2048) and "output cut at 2048" in big["output"]
        assert rt.mcp is not None and rt.mcp.servers[0].state == "ready"
    finally:
        await rt.close()


async def test_a_server_that_never_answers_does_not_hold_up_the_start(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    pidfile = tmp_path / "hung.pid"
    config = {
        "mcpServers": {
            "hung": {
                "command": "/bin/sh",
                "args": ["-c", f"echo $$ > {pidfile}; echo about to hang >&2; exec sleep 300"],
                "startup_timeout": 1.5,
            },
            # Much on stderr before the reason: only the end is kept and shown.
            "quits": {
                "command": "/bin/sh",
                "args": ["-c", "seq 1 40000 >&2; echo bad flag >&2; exit 2"],
            },
        }
    }
    started = time.monotonic()
    rt = await build(tmp_path, model_server, config)
    try:
        assert time.monotonic() - started < 25
        hung, quits = sorted(rt.startup_notices())
        assert "'hung'" in hung and "within 1.5 s" in hung and "about to hang" in hung
        assert "'quits'" in quits and "failed to start" in quits and "bad flag" in quits
        assert "40000 | bad flag" in quits and len(quits) < 600
        await wait_for(lambda: not pid_alive(int(pidfile.read_text())), what="the hung server")
    finally:
        await rt.close()


async def test_a_pending_mcp_approval_survives_a_restart(
    tmp_path: Path, state: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    config = {"mcpServers": {"demo": demo_server(state)}}
    model_server.set_default(THINKER, Text("Done."))
    first = await build(tmp_path, model_server, config)
    first_pid = int((state / "started.txt").read_text())
    try:
        model_server.reply(ACTION, Text(directive(mcp("write_note", text="later"))))
        waiting = await first.loop.run_chat("note later")
        approval_id = waiting.pending_approval.approval_id  # type: ignore[union-attr]
    finally:
        await first.close()

    second = await build(tmp_path, model_server, config)  # a new server process
    try:
        await second.approvals.decide(approval_id, "approve", "console:bob")
        model_server.reply(ACTION, Text(NO_ACTIONS))
        done = await second.loop.continue_after_approval(waiting.task_id, approval_id)
        assert done.status == "completed"
        assert (state / "notes.txt").read_text() == "later\n"
        # It ran once, in the new server process, not the one that was asked first.
        (call,) = calls(state)
        assert call["pid"] == int((state / "started.txt").read_text()) != first_pid
    finally:
        await second.close()


def test_unusable_input_schemas_and_urls_with_credentials(tmp_path: Path) -> None:
    from runtime.tools.mcp.session import ListedTool, McpServer
    from runtime.tools.mcp.tool import McpTool

    config = parse_config(
        {"mcpServers": {"w": {"url": "https://me:pw@mcp.example.org/mcp?key=k"}}},
        tmp_path / "mcp.json",
        environ={},
    )
    server = McpServer(config.servers[0])
    assert server.config.where == "https://mcp.example.org/mcp"
    for schema, why in [
        ({"type": "array"}, "not an object schema"),
        ({"type": "object", "properties": {"a": {"type": "nonsense"}}}, "not valid JSON Schema"),
    ]:
        with pytest.raises(ValueError, match=why):
            McpTool(server, ListedTool("t", "", schema), name="mcp__w__t", read_only=False)
    with pytest.raises(ValueError, match="not a valid tool name"):
        McpTool(server, ListedTool("t", "", {"type": "object"}), name="a b", read_only=False)


async def test_native_tool_calling_reaches_mcp_tools(
    tmp_path: Path, state: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"demo": demo_server(state)}}))
    settings = make_settings(
        tmp_path, model_server.base_url, mcp_config=path, action_protocol="tools"
    )
    model_server.set_default(THINKER, Text("Done."))
    rt = await build_runtime(settings)
    try:
        model_server.reply(
            ACTION,
            ToolCalls(
                [
                    ("mcp__demo__lookup", {"key": "n1", "reason": "need n1"}),
                    ("mcp__demo__write_note", {"text": "native", "reason": "keep it"}),
                ]
            ),
            Text(NO_ACTIONS),
        )
        waiting = await rt.loop.run_chat("native calls")

        functions = {
            t["function"]["name"]: t["function"]
            for t in model_server.requests_for(ACTION)[0].body["tools"]
        }
        lookup = functions["mcp__demo__lookup"]
        assert lookup["parameters"]["properties"]["key"]["type"] == "string"
        assert "from MCP server 'demo'" in lookup["description"]
        assert waiting.status == "waiting_for_approval"
        pending = waiting.pending_approval
        assert pending is not None and pending.model_reason == "keep it"
        assert pending.command == 'mcp demo/write_note {"text": "native"}'
        assert [c["args"] for c in calls(state)] == [{"key": "n1"}]  # reason is not an arg

        await rt.approvals.decide(pending.approval_id, "approve", "console:bob")
        done = await rt.loop.continue_after_approval(waiting.task_id, pending.approval_id)
        assert done.status == "completed"
        assert (state / "notes.txt").read_text() == "native\n"
    finally:
        await rt.close()


def test_setting_is_read_from_the_environment(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.settings import Settings

    monkeypatch.setenv("DUCKLM_MCP_CONFIG", str(tmp_path / "mcp.json"))
    assert Settings(_env_file=None).mcp_config == tmp_path / "mcp.json"
    monkeypatch.setenv("DUCKLM_MCP_CONFIG", "  ")
    assert Settings(_env_file=None).mcp_config is None


async def test_the_config_file_is_hidden_from_unasked_commands(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    from runtime.tools.shell.sandbox import probe

    if not probe("bwrap").available:
        pytest.skip(f"bubblewrap does not work here: {probe('bwrap').detail}")
    mark = "plainmark" + str(os.getpid()) + "x" + str(time.monotonic_ns())
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    path = workspace / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"s": {"command": mark, "enabled": False}}}))
    (workspace / "other.txt").write_text("visible")
    settings = make_settings(tmp_path, model_server.base_url, mcp_config=path)
    rt = await build_runtime(settings)
    try:
        result = await rt.loop.run_command("cat other.txt; echo; cat mcp.json")
        assert result.status == "completed"
        assert "visible" in result.final_response
        assert mark not in result.final_response
    finally:
        await rt.close()
