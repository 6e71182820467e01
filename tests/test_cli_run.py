"""`ducklm run` as an operator starts it: a subprocess configured only through the
environment variables in the README, driven by signed Slack HTTP requests, and
stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from bot.slack.blocks import ACTION_APPROVE
from tests.conftest import ACTION, THINKER, directive, shell
from tests.fakes.openai_server import FakeModelServer, Text
from tests.fakes.slack_api import (
    BOT_TOKEN,
    BOT_USER,
    SIGNING_SECRET,
    FakeSlack,
    SlackSender,
    block_actions_payload,
    event_callback,
)
from tests.test_console import cli_env

CHANNEL = "COPS00001"
APPROVER = "UAPPROVER"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_until_listening(port: int, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(30):
        while True:
            assert process.returncode is None, "ducklm run exited early"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def test_ducklm_run_serves_slack_over_http(
    tmp_path: Path, model_server: FakeModelServer, slack: FakeSlack
) -> None:
    port = free_port()
    model_server.reply(ACTION, Text(directive(shell("echo from-ducklm-run"))), Text(directive()))
    model_server.reply(ACTION, Text(directive(shell("touch approved.txt"))), Text(directive()))
    model_server.set_default(THINKER, Text("All done here."))
    env = cli_env(
        tmp_path,
        SLACK_BOT_TOKEN=BOT_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        DUCKLM_SLACK_MODE="http",
        DUCKLM_HTTP_HOST="127.0.0.1",
        DUCKLM_HTTP_PORT=str(port),
        DUCKLM_SLACK_API_URL=slack.api_url,
        DUCKLM_MODEL_BASE_URL=model_server.base_url,
        DUCKLM_MODEL_API_KEY="sk-test",
        DUCKLM_THINKER_MODEL=THINKER,
        DUCKLM_ACTION_MODEL=ACTION,
        DUCKLM_APPROVERS=f"slack:{APPROVER}",
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
        env=env,
    )
    try:
        await wait_until_listening(port, process)
        async with SlackSender(f"http://127.0.0.1:{port}/slack/events") as sender:
            # a question: answered in its thread
            question = slack.add_message(CHANNEL, f"<@{BOT_USER}> say hi", user="UASKER001")
            event = {
                "type": "app_mention",
                "user": "UASKER001",
                "text": question["text"],
                "ts": question["ts"],
                "channel": CHANNEL,
                "event_ts": question["ts"],
            }
            assert (await sender.event(event_callback(event))).status == 200
            await slack.wait_for(
                lambda: [
                    m
                    for m in slack.posted(CHANNEL)
                    if m.get("thread_ts") == question["ts"] and "All done" in m["text"]
                ],
                within=20,
                what="the answer in the thread",
            )

            # a write: an approval card, then an approved click runs it
            ask = slack.add_message(CHANNEL, f"<@{BOT_USER}> touch it", user="UASKER001")
            event = {**event, "text": ask["text"], "ts": ask["ts"], "event_ts": ask["ts"]}
            assert (await sender.event(event_callback(event))).status == 200
            card = await slack.wait_for(
                lambda: next(
                    (
                        m
                        for m in slack.posted(CHANNEL)
                        if m.get("thread_ts") == ask["ts"] and m.get("blocks")
                    ),
                    None,
                ),
                within=20,
                what="the approval card",
            )
            approval_id = next(
                e["value"] for b in card["blocks"] if b["type"] == "actions" for e in b["elements"]
            )
            assert not (tmp_path / "workspace" / "approved.txt").exists()
            click = block_actions_payload(
                user=APPROVER,
                action_id=ACTION_APPROVE,
                value=approval_id,
                channel=CHANNEL,
                message_ts=card["ts"],
                thread_ts=ask["ts"],
                response_url=slack.webhook_url(),
            )
            assert (await sender.interaction(click)).status == 200
            await slack.wait_for(
                lambda: (tmp_path / "workspace" / "approved.txt").exists(),
                within=20,
                what="the approved command to run",
            )

            # a forged request is refused
            async with aiohttp.ClientSession() as session:
                forged = await session.post(
                    f"http://127.0.0.1:{port}/slack/events",
                    data=b"{}",
                    headers={"X-Slack-Request-Timestamp": "1", "X-Slack-Signature": "v0=00"},
                )
                assert forged.status == 401
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    stderr = err.decode()
    assert process.returncode == 0, stderr
    assert "serving slack" in stderr.lower()
    assert "ducklm: schedule:" in stderr  # the timed jobs are logged at start
    assert "Traceback" not in stderr
