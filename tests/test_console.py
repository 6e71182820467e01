"""`ducklm console` and the admin CLI, driven as a person would: a subprocess and stdin."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.conftest import ACTION, THINKER, directive, shell
from tests.fakes.openai_server import FakeModelServer, Text

CLI_TIMEOUT = 60


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DUCKLM_", "SLACK_", "MATRIX_", "OPENAI_"))
    }
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    env.update(
        DUCKLM_DB=str(tmp_path / "ducklm.db"), DUCKLM_WORKSPACE=str(workspace), USER="tester"
    )
    env.update(extra)
    return env


async def ducklm(tmp_path: Path, *args: str, stdin: str = "", **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=cli_env(tmp_path, **env),
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), CLI_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_console_without_a_model_serves_direct_commands(tmp_path: Path) -> None:
    script = "\n".join(
        [
            "why is web-1 slow?",
            "run echo hello-from-duck",
            "run touch approved.txt",
            "a",
            "run touch denied.txt",
            "d not during the freeze",
            "run rm -rf /",
            "!run df -h",
            "/duck rules",
            "/duck bogus",
            "exit",
        ]
    )
    code, out, err = await ducklm(tmp_path, "console", stdin=script + "\n")

    assert code == 0, err
    assert out.count("No model is configured") == 2  # the notice once, then the reminder
    assert "DUCKLM_MODEL_BASE_URL" in out
    assert "hello-from-duck" in out
    assert "Approval needed" in out and "[a]pprove / [d]eny" in out
    assert (tmp_path / "workspace" / "approved.txt").exists()
    assert not (tmp_path / "workspace" / "denied.txt").exists()
    assert "not during the freeze" in out
    assert "is blocked and cannot run" in out
    assert "Filesystem" in out  # df -h ran without approval
    assert "No rules" in out
    assert "Unknown command `bogus`" in out
    assert "Traceback" not in out + err

    # the audit trail is in the same database, readable with the CLI
    code, tasks_out, _ = await ducklm(tmp_path, "tasks")
    assert code == 0 and "touch approved.txt" in tasks_out and "completed" in tasks_out

    async def trail(command: str) -> str:
        task_id = next(line.split("`")[1] for line in tasks_out.splitlines() if command in line)
        code, events_out, _ = await ducklm(tmp_path, "events", task_id)
        assert code == 0
        assert "direct_command" in events_out and "model_call" not in events_out
        return events_out

    denied = await trail("touch denied.txt")
    assert "approval_decided deny by console:tester: not during the freeze" in denied
    approved = await trail("touch approved.txt")
    assert "approval_decided approve by console:tester" in approved
    assert "`touch approved.txt` medium approved by console:tester, exit 0" in approved
    assert "`rm -rf /` critical blocked" in await trail("rm -rf /")
    assert "`echo hello-from-duck` low, exit 0" in await trail("echo hello-from-duck")


async def test_console_chats_with_a_model(tmp_path: Path, model_server: FakeModelServer) -> None:
    model_server.reply(ACTION, Text(directive(shell("echo disk-report"))), Text(directive()))
    model_server.reply(ACTION, Text(directive(shell("touch chat.txt"))), Text(directive()))
    model_server.set_default(THINKER, Text("Here is the answer."))
    script = "how are the disks?\nplease touch chat.txt\napprove\nexit\n"

    code, out, err = await ducklm(
        tmp_path,
        "console",
        stdin=script,
        DUCKLM_MODEL_BASE_URL=model_server.base_url,
        DUCKLM_MODEL_API_KEY="sk-test",
        DUCKLM_THINKER_MODEL=THINKER,
        DUCKLM_ACTION_MODEL=ACTION,
    )

    assert code == 0, err
    assert "No model is configured" not in out
    assert "… shell_exec_safe echo disk-report" in out  # shows which tool runs
    assert out.count("Here is the answer.") == 2
    assert "Approval needed" in out and "$ touch chat.txt" in out
    assert (tmp_path / "workspace" / "chat.txt").exists()
    # the second question carried the first exchange as history
    second_task_messages = model_server.requests_for(ACTION)[2].body["messages"]
    assert {"role": "user", "content": "how are the disks?"} in second_task_messages
    assert {"role": "assistant", "content": "Here is the answer."} in second_task_messages


async def test_rules_cli(tmp_path: Path) -> None:
    code, out, _ = await ducklm(tmp_path, "rules", "add", "prefix", "git", "pull")
    assert code == 0 and "Added rule" in out and "prefix `git pull`" in out
    rule_id = out.split("`")[1]
    code, out, _ = await ducklm(tmp_path, "rules", "add", "exact", "rm -rf /")
    assert "Rule not added" in out
    code, out, _ = await ducklm(tmp_path, "rules", "list")
    assert rule_id in out and "cli:tester" in out
    code, out, _ = await ducklm(tmp_path, "rules", "revoke", rule_id)
    assert code == 0 and "Revoked" in out
    code, out, _ = await ducklm(tmp_path, "rules")
    assert "No rules" in out
    code, out, _ = await ducklm(tmp_path, "rules", "list", "--all")
    assert "revoked by cli:tester" in out
    code, out, _ = await ducklm(tmp_path, "approvals")
    assert code == 0 and "No approvals are pending" in out


async def test_run_without_a_platform_names_the_variables(tmp_path: Path) -> None:
    code, _, err = await ducklm(tmp_path, "run")
    assert code != 0
    for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "MATRIX_HOMESERVER", "ducklm console"):
        assert name in err


async def test_bad_configuration_and_database_are_clear_errors(tmp_path: Path) -> None:
    code, _, err = await ducklm(tmp_path, "tasks", DUCKLM_SHELL_TIMEOUT="soon")
    assert code == 2 and "DUCKLM_SHELL_TIMEOUT" in err and "Traceback" not in err
    (tmp_path / "garbage.db").write_bytes(b"this is not sqlite" * 100)
    code, _, err = await ducklm(tmp_path, "tasks", DUCKLM_DB=str(tmp_path / "garbage.db"))
    assert code == 1 and "Database error" in err and "Traceback" not in err


async def test_a_piped_console_writes_the_markdown_source_without_escapes(
    tmp_path: Path, model_server: FakeModelServer
) -> None:
    answer = "Disks are **fine**:\n- `/` at 40%\n\n```\n$ df -h /\n/dev/sda1  40%\n```"
    model_server.set_default(ACTION, Text(directive()))
    model_server.set_default(THINKER, Text(answer))
    script = "how are the disks?\nrun echo piped-out\nrun touch piped.txt\na\nexit\n"

    # a terminal type that asks for colour does not matter: stdout is a pipe
    code, out, err = await ducklm(
        tmp_path,
        "console",
        stdin=script,
        TERM="xterm-256color",
        DUCKLM_MODEL_BASE_URL=model_server.base_url,
        DUCKLM_MODEL_API_KEY="sk-test",
        DUCKLM_THINKER_MODEL=THINKER,
        DUCKLM_ACTION_MODEL=ACTION,
    )

    assert code == 0, err
    assert "\x1b" not in out
    assert answer + "\n" in out  # the answer as the model wrote it, fences and all
    assert "```\n$ echo piped-out\npiped-out\n```\n(exit 0" in out
    assert "  $ touch piped.txt\n" in out and (tmp_path / "workspace" / "piped.txt").exists()
    assert "> " not in out  # no prompt without a terminal
    # a pipe has no readline, and no history file is written
    assert not (tmp_path / "ducklm-console-history").exists()
