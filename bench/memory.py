"""Memory: RSS of `ducklm run` idle with Slack and Matrix connected, and as tasks finish.

    python -m bench.memory [--tasks 3000] [--no-matrix]

A real `ducklm run` in a subprocess serves Slack (HTTP mode, against a local
fake Web API) and Matrix (a real Synapse on 127.0.0.1, started from
tests/fakes/synapse.py, with a registered bot account). Its RSS (VmRSS from
/proc) is read once it has been idle for a few seconds, then after every 500
finished tasks (Slack mentions answered by an instant model, through the
whole loop and store). The bare bolt app's RSS is printed beside it.

Targets (issue #7): under 120 MB after 1,000 finished tasks, and no growth
proportional to finished tasks (measured as the slope between the middle and
the end of the run).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from bench._common import THINKER_MODEL, print_header, rss_kib, verdict
from bench._slackbot import SlackHarness, mention_body, post

STEP = 500
FLAT_KIB_PER_TASK = 1.0  # 1 MB per 1,000 tasks


def decide(body: dict) -> str:
    if body.get("model") == THINKER_MODEL:
        return "web-1 is fine: load 0.3, disk 41%, nothing in the logs."
    return '{"actions": []}'


def mib(kib: int) -> str:
    return f"{kib / 1024:6.1f} MiB"


async def run(args: argparse.Namespace) -> None:
    with SlackHarness(decide) as harness:
        expect: tuple[str, ...] = ("slack",)
        extra = {}
        if not args.no_matrix:
            extra = harness.start_synapse()
            expect = ("slack", "matrix")
        harness.start_bare()
        harness.start_bot(extra, expect=expect)
        assert harness.bot is not None and harness.bare is not None
        await asyncio.sleep(args.settle)
        idle = rss_kib(harness.bot.pid)
        bare = rss_kib(harness.bare.pid)
        samples = [(0, idle)]
        print(f"   idle: ducklm {mib(idle)}  (bare bolt app {mib(bare)})")
        timeout = aiohttp.ClientTimeout(total=30)
        url = harness.url("ducklm")
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=timeout) as session:
            sent = 0
            while sent < args.tasks:
                for _ in range(STEP // 50):
                    bodies = [mention_body(f"how is web-{sent + i}?") for i in range(50)]
                    answers = await asyncio.gather(
                        *(post(session, url, b, "application/json") for b in bodies)
                    )
                    assert all(status == 200 for _, _, status in answers)
                    sent += 50
                await harness.wait_until(
                    "SELECT COUNT(*) FROM tasks WHERE status = 'completed'", sent, 300
                )
                await asyncio.sleep(args.settle)
                samples.append((sent, rss_kib(harness.bot.pid)))
                print(f"   after {sent:>5} finished tasks: {mib(samples[-1][1])}")
        elapsed = time.monotonic() - started
        failed = harness.query("SELECT COUNT(*) FROM tasks WHERE status != 'completed'")[0][0]

    at_1000 = next((kib for n, kib in samples if n >= 1000), samples[-1][1])
    middle = next(s for s in samples if s[0] >= args.tasks // 2)
    end = samples[-1]
    slope = (end[1] - middle[1]) / max(1, end[0] - middle[0])  # KiB per task
    print()
    print(f"   {args.tasks} tasks in {elapsed:.0f} s ({failed} not completed)")
    print(
        f"   growth: {mib(end[1] - idle)} over {end[0]} tasks; from {middle[0]} to {end[0]}: "
        f"{slope:.2f} KiB per task"
    )
    print()
    what = "Slack + Matrix" if not args.no_matrix else "Slack only"
    print(
        f"target < 120 MB after 1,000 tasks ({what}): {at_1000 / 1024:.1f} MiB "
        f"({at_1000 * 1024 / 1e6:.1f} MB) -> {verdict(at_1000 * 1024 < 120e6)}"
    )
    print(
        f"target no growth proportional to finished tasks: {slope:.2f} KiB/task "
        f"(flat: <= {FLAT_KIB_PER_TASK:g}) -> {verdict(slope <= FLAT_KIB_PER_TASK)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000, help="a multiple of 500")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before a sample")
    parser.add_argument("--no-matrix", action="store_true", help="Slack only (no Synapse)")
    args = parser.parse_args()
    print_header("memory: RSS of ducklm run")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
