"""Running classified commands: environment, timeouts, output caps, the tool itself."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from runtime.tools.base import Assessment, ToolArgumentError
from runtime.tools.gateway import ToolGateway
from runtime.tools.shell import ShellTool, classify, execute, scrubbed_env

SECRETS = {
    "SLACK_BOT_TOKEN": "xoxb-secret-slack",
    "SLACK_APP_TOKEN": "xapp-secret-app",
    "DUCKLM_MODEL_API_KEY": "sk-secret-model",
    "MATRIX_PASSWORD": "secret-matrix-pw",
    "MATRIX_ACCESS_TOKEN": "secret-matrix-token",
    "FOO_SECRET": "secret-foo",
    "AWS_SECRET_ACCESS_KEY": "secret-aws",
    "OPENAI_API_KEY": "sk-secret-openai",
    "GITHUB_TOKEN": "ghp-secret",
    "LC_SECRET_TOKEN": "secret-in-lc",
}


async def run(command: str, workspace: Path, **kwargs: float | int):
    return await execute(command, classify(command), workspace=workspace, **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting for its parent is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# -- environment ------------------------------------------------------------


def test_scrubbed_env_keeps_only_the_allow_list() -> None:
    env = scrubbed_env(
        {
            **SECRETS,
            "PATH": "/usr/bin:.:relative/bin::/bin",
            "HOME": "/home/duck",
            "LANG": "C.UTF-8",
            "LC_ALL": "C",
            "KUBECONFIG": "/home/duck/.kube/config",
            "LD_PRELOAD": "/tmp/x.so",
            "BASH_ENV": "/tmp/x.sh",
            "PYTHONPATH": "/tmp",
        }
    )
    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/duck",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
    }


def test_scrubbed_env_has_a_default_path() -> None:
    assert scrubbed_env({})["PATH"].startswith("/")


async def test_printenv_shows_none_of_the_bots_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    for command in ("printenv", "env", "bash -c 'env; set'"):
        result = await execute(
            command,
            classify(command),
            workspace=tmp_path,
        )
        assert result.ok, result.error
        for name, value in SECRETS.items():
            assert value not in result.output, (command, name)
            assert name not in result.output, (command, name)


# -- basics -----------------------------------------------------------------


async def test_cwd_is_the_workspace(tmp_path: Path) -> None:
    result = await run("pwd", tmp_path)
    assert result.ok
    assert result.output.strip() == str(tmp_path)
    result = await run("pwd && ls", tmp_path)  # through bash too
    assert result.output.splitlines()[0] == str(tmp_path)


async def test_simple_command_runs_without_a_shell(tmp_path: Path) -> None:
    c = classify("echo '$HOME' `x`")
    assert not c.simple  # backticks: needs bash
    c = classify("echo '$HOME;' a")
    assert c.simple
    result = await execute("echo '$HOME;' a", c, workspace=tmp_path)
    assert result.output == "$HOME; a\n"


async def test_metadata(tmp_path: Path) -> None:
    result = await run("ls -la", tmp_path)
    meta = result.metadata
    assert meta["command"] == "ls -la"
    assert meta["action_type"] == "read"
    assert meta["risk_level"] == "low"
    assert meta["requires_approval"] is False
    assert meta["blocked"] is False
    assert meta["returncode"] == 0
    assert meta["reason"]
    assert isinstance(meta["duration_ms"], int)
    assert meta["truncated"] is False
    assert meta["timed_out"] is False


async def test_failure_has_exit_status_and_stderr(tmp_path: Path) -> None:
    result = await run("ls /definitely/not/here", tmp_path)
    assert not result.ok
    assert result.error == "exit status 2"
    assert "[stderr]" in result.output
    assert "Traceback" not in result.output


async def test_missing_program_is_a_clean_error(tmp_path: Path) -> None:
    command = "definitely-not-a-program-xyz --flag"
    result = await execute(command, classify(command), workspace=tmp_path)
    assert not result.ok
    assert result.error == "command not found: definitely-not-a-program-xyz"
    result = await execute(f"ls && {command}", classify(f"ls && {command}"), workspace=tmp_path)
    assert not result.ok
    assert "command not found" in (result.error or "")


async def test_permission_denied_is_a_clean_error(tmp_path: Path) -> None:
    script = tmp_path / "noexec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = await execute(str(script), classify(str(script)), workspace=tmp_path)
    assert not result.ok
    assert "permission denied" in (result.error or "")


async def test_blocked_classification_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    command = f"touch {marker}"
    blocked = classify(command).model_copy(update={"blocked": True, "reason": "Nope."})
    result = await execute(command, blocked, workspace=tmp_path)
    assert not result.ok
    assert "Blocked" in (result.error or "")
    assert not marker.exists()


async def test_execute_reclassifies_a_forged_classification(tmp_path: Path) -> None:
    # a caller claiming `rm -rf /` is harmless still cannot run it
    harmless = classify("ls")
    result = await execute("rm -rf / --no-preserve-root", harmless, workspace=tmp_path)
    assert not result.ok
    assert "Blocked" in (result.error or "")


# -- timeouts and process groups ---------------------------------------------


async def test_timeout_kills_grandchildren(tmp_path: Path) -> None:
    command = "sleep 300 & echo $!; wait"
    started = time.monotonic()
    result = await execute(command, classify(command), workspace=tmp_path, timeout=1)
    assert time.monotonic() - started < 10
    assert result.metadata["timed_out"] is True
    assert result.error == "timed out after 1 s"
    assert not result.ok
    pid = int(result.output.split()[0])
    for _ in range(50):
        if not _alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not _alive(pid)


async def test_background_leftovers_are_killed_after_exit(tmp_path: Path) -> None:
    command = "sleep 300 > /dev/null 2>&1 & echo $!"
    result = await execute(command, classify(command), workspace=tmp_path, timeout=10)
    assert result.ok
    pid = int(result.output.split()[0])
    for _ in range(50):
        if not _alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not _alive(pid)


async def test_timeout_of_a_simple_command(tmp_path: Path) -> None:
    result = await run("sleep 30", tmp_path, timeout=0.5)
    assert result.metadata["timed_out"]
    assert result.metadata["duration_ms"] < 5000


# -- output -------------------------------------------------------------------


async def test_huge_output_is_capped_quickly(tmp_path: Path) -> None:
    started = time.monotonic()
    result = await run("head -c 10000000 /dev/zero", tmp_path)
    assert time.monotonic() - started < 5
    assert result.ok
    assert result.metadata["truncated"] is True
    assert "[… output truncated: 9934464 bytes dropped]" in result.output
    assert len(result.output) < 70_000


async def test_huge_stderr_does_not_block_the_child(tmp_path: Path) -> None:
    command = "head -c 5000000 /dev/zero >&2; echo done"
    result = await execute(command, classify(command), workspace=tmp_path, timeout=10)
    assert result.ok
    assert result.output.startswith("done\n")
    assert "[stderr]" in result.output
    assert "bytes dropped]" in result.output


async def test_custom_cap(tmp_path: Path) -> None:
    result = await run("seq 1 100000", tmp_path, max_output=100)
    assert result.output.startswith("1\n2\n3\n")
    assert "output truncated" in result.output


async def test_binary_output_does_not_break(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 4 + b"\xff\xfe\xc3")
    result = await run("cat blob", tmp_path)
    assert result.ok
    assert "\ufffd" in result.output
    result = await run("head -c 3000 /dev/urandom", tmp_path)
    assert result.ok


# -- the tool -----------------------------------------------------------------


def test_tool_interface(tmp_path: Path) -> None:
    tool = ShellTool(tmp_path, timeout=5, max_output=1000)
    assert tool.name == "shell_exec_safe"
    assert tool.args_schema["required"] == ["command"]
    assessment = tool.assess({"command": "ls -la"})
    assert assessment == Assessment(
        action_type="read", risk_level="low", requires_approval=False, blocked=False,
        reason=assessment.reason,
    )  # fmt: skip
    assert tool.assess({"command": "rm -rf /"}).blocked
    assert tool.assess({"command": "sudo ls"}).requires_approval


@pytest.mark.parametrize(
    "args",
    [{}, {"command": None}, {"command": 5}, {"command": ["ls"]}, {"command": ""},
     {"command": "   "}, {"command": "x" * 10_001}],
)  # fmt: skip
def test_tool_rejects_bad_arguments(tmp_path: Path, args: dict) -> None:
    with pytest.raises(ToolArgumentError):
        ShellTool(tmp_path).assess(args)


async def test_tool_run_reclassifies(tmp_path: Path) -> None:
    tool = ShellTool(tmp_path)
    low = Assessment()
    marker = tmp_path / "made"
    result = await tool.run({"command": f"touch {marker}"}, low)
    assert not result.ok
    assert "needs approval" in (result.error or "")
    assert not marker.exists()
    result = await tool.run({"command": "rm -rf /"}, Assessment(requires_approval=True))
    assert "Blocked" in (result.error or "")
    approved = tool.assess({"command": f"touch {marker}"})
    result = await tool.run({"command": f"touch {marker}"}, approved)
    assert result.ok and marker.exists()


async def test_gateway_runs_read_only_and_holds_the_rest(tmp_path: Path) -> None:
    gateway = ToolGateway.default(tmp_path, shell_timeout=5)
    result = await gateway.run_action({"tool": "shell_exec_safe", "args": {"command": "pwd"}})
    assert result.ok and result.output.strip() == str(tmp_path)
    result = await gateway.run_action({"tool": "shell_exec_safe", "args": {"command": "touch x"}})
    assert result.metadata.get("pending_approval")
    assert not (tmp_path / "x").exists()
    result = await gateway.run_action(
        {"tool": "shell_exec_safe", "args": {"command": "touch x"}}, approved=True
    )
    assert result.ok and (tmp_path / "x").exists()
    result = await gateway.run_action(
        {"tool": "shell_exec_safe", "args": {"command": "rm -rf /"}}, approved=True
    )
    assert not result.ok and "Blocked" in (result.error or "")
