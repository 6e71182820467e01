"""Who may ask, end to end through the real Slack app (issue #22): the bolt app
over HTTP with signed requests, the fake Slack Web API, the real service and
store, and the fake model server. Plus the start-up block of a real
`ducklm run` subprocess."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from tests.fakes.slack_api import (
    BOT_TOKEN,
    SIGNING_SECRET,
    TEAM,
    FakeSlack,
)
from tests.test_cli_run import free_port, wait_until_listening
from tests.test_console import cli_env

pytestmark = pytest.mark.usefixtures("clean_env")


# -- the start-up block of `ducklm run` ---------------------------------------------------


def fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


async def run_and_stop(tmp_path: Path, slack: FakeSlack, **env: str) -> str:
    """Start `ducklm run` serving Slack over HTTP, stop it, return its stderr."""
    port = free_port()
    environment = cli_env(
        fresh_dir(tmp_path),
        SLACK_BOT_TOKEN=BOT_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        DUCKLM_SLACK_MODE="http",
        DUCKLM_HTTP_HOST="127.0.0.1",
        DUCKLM_HTTP_PORT=str(port),
        DUCKLM_SLACK_API_URL=slack.api_url,
        DUCKLM_MODEL_BASE_URL="http://127.0.0.1:9/v1",  # never called
        **env,
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "run",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=environment,
    )
    try:
        await wait_until_listening(port, process)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    stderr = err.decode()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stderr


def block_of(stderr: str) -> list[str]:
    """The `ducklm: who may …` / `answers in` lines, in order, as one block."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ducklm: who may ask:"))
    block = []
    for line in lines[start:]:
        if not line.startswith(("ducklm: who may", "ducklm: answers in")):
            break
        block.append(line.removeprefix("ducklm: "))
    return block


async def test_ducklm_run_prints_who_may_ask_approve_and_administer(
    tmp_path: Path, slack: FakeSlack
) -> None:
    stderr = await run_and_stop(
        tmp_path / "closed",
        slack,
        DUCKLM_APPROVERS="slack:UAPPROVER matrix:@ops:example.org",
        DUCKLM_CHANNELS="slack:COPS00001",
    )
    assert block_of(stderr) == [
        f"who may ask: members of Slack workspace {TEAM} (DUCKLM_REQUESTERS unset); "
        "approvers and admins too",
        "who may approve: matrix:@ops:example.org, slack:UAPPROVER",
        "who may administer: nobody (DUCKLM_ADMINS unset)",
        "answers in: slack:COPS00001 (DUCKLM_CHANNELS)",
    ]
    assert "DUCKLM_ADMINS is not set" in stderr
    assert "ANYONE" not in stderr

    # An open configuration is allowed, and said loudly at every start.
    for attempt in ("first", "second"):
        stderr = await run_and_stop(
            tmp_path / attempt, slack, DUCKLM_REQUESTERS="*", DUCKLM_ADMINS="slack:UADMIN001"
        )
        block = block_of(stderr)
        assert block[0] == "who may ask: anyone (DUCKLM_REQUESTERS=*)"
        assert "who may administer: slack:UADMIN001" in block
        assert "who may approve: nobody (DUCKLM_APPROVERS unset)" in block
        assert "warning: DUCKLM_REQUESTERS=*: ANYONE who can reach the bot" in stderr
