"""Click to action: from an Approve click's HTTP request to the start of the tool process.

    python -m bench.click_to_action [--clicks 100]

A real `ducklm run` (HTTP mode) in a subprocess with a local fake Slack and an
instant model. `--clicks` mentions each get an approval card for
`date +%s.%N > stamp-N.txt` (a write, so it waits for approval). Then an
approver clicks Approve on each card, one after another: the click's request
is signed and sent at wall time t0; the command's first act is `date` writing
the time it started, t1; click to action = t1 - t0. The `tool_call_started`
event's time (written just before the process is spawned) is printed beside
it. The baseline is the bare bolt app acking the same click payloads, in the
same run.

Target (issue #7): p99 under 50 ms beyond the bare ack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

import aiohttp

from bench._common import THINKER_MODEL, percentile, print_header, summary_ms, verdict
from bench._slackbot import SlackHarness, click_body, mention_body, post

FORM = "application/x-www-form-urlencoded"


def decide(body: dict) -> str:
    if body.get("model") == THINKER_MODEL:
        return "Stamped."
    messages = body.get("messages") or []
    last = messages[-1].get("content", "") if messages else ""
    if isinstance(last, str) and last.startswith("tool_observations:"):
        return '{"actions": []}'
    found = re.search(r"stamp-(\d+)", " ".join(str(m.get("content")) for m in messages))
    if not found:
        return '{"actions": []}'
    command = f"date +%s.%N > stamp-{found.group(1)}.txt"
    return json.dumps(
        {"actions": [{"tool": "shell_exec_safe", "args": {"command": command}, "reason": "t"}]}
    )


async def run(args: argparse.Namespace) -> None:
    from bot.slack.blocks import ACTION_APPROVE
    from bot.slack.parsing import parse_card_ref

    with SlackHarness(decide) as harness:
        harness.start_bare()
        harness.start_bot()
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = harness.url("ducklm")
            await asyncio.gather(
                *(
                    post(session, url, mention_body(f"please stamp-{n}"), "application/json")
                    for n in range(args.clicks)
                )
            )
            await harness.wait_until(
                "SELECT COUNT(*) FROM approvals WHERE decision IS NULL AND card_ref IS NOT NULL",
                args.clicks,
                120,
            )
            pending = harness.query(
                "SELECT approval_id, task_id, command, card_ref FROM approvals "
                "WHERE decision IS NULL ORDER BY created_at"
            )
            # The bare app acks the same clicks (warm it up first).
            bare_acks = []
            for i, (approval_id, _, _, ref) in enumerate(pending[:10] + pending):
                body = click_body(ACTION_APPROVE, approval_id, parse_card_ref(ref)[1])
                _, seconds, status = await post(session, harness.url("bare"), body, FORM)
                assert status == 200, status
                if i >= 10:
                    bare_acks.append(seconds)

            to_start, to_event, acks = [], [], []
            for approval_id, task_id, command, ref in pending:
                number = re.search(r"stamp-(\d+)", command).group(1)
                stamp = harness.workspace / f"stamp-{number}.txt"
                body = click_body(ACTION_APPROVE, approval_id, parse_card_ref(ref)[1])
                sent, seconds, status = await post(session, url, body, FORM)
                assert status == 200, status
                acks.append(seconds)
                deadline = time.monotonic() + 10
                while not (stamp.exists() and stamp.read_text().strip()):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{command} did not run within 10 s of the click")
                    await asyncio.sleep(0.001)
                to_start.append(float(stamp.read_text()) - sent)
                started = harness.query(
                    "SELECT created_at FROM events WHERE task_id = ? AND event_type = "
                    "'tool_call_started' AND json_extract(payload, '$.approval_id') = ?",
                    (task_id, approval_id),
                )
                to_event.append(started[0][0] - sent)
                await asyncio.sleep(0.02)  # let the task finish before the next click
            ran = harness.query(
                "SELECT COUNT(*) FROM events WHERE event_type = 'command_audit' "
                "AND json_extract(payload, '$.ok') = 1"
            )[0][0]

    print()
    print(f"   bare app, ack of a click         {summary_ms(bare_acks)}")
    print(f"   ducklm, ack of a click           {summary_ms(acks)}")
    print(f"   click -> tool_call_started event {summary_ms(to_event)}")
    print(f"   click -> tool process started    {summary_ms(to_start)}")
    print(f"   commands that ran: {ran} of {len(pending)} clicks (each exactly once)")
    beyond = percentile(to_start, 99) - percentile(bare_acks, 99)
    print()
    print(
        f"target p99 click->action under 50 ms beyond the bare ack: "
        f"{percentile(to_start, 99) * 1000:.1f} ms - {percentile(bare_acks, 99) * 1000:.1f} ms "
        f"= {beyond * 1000:.1f} ms -> {verdict(beyond < 0.05)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=100)
    args = parser.parse_args()
    print_header("click to action: Approve click -> tool process start")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
