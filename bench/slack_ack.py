"""Slack ack latency: time to the HTTP 200 for app_mention deliveries under load.

    python -m bench.slack_ack [--burst 200] [--rounds 5] [--model-delay 0.2]

A real `ducklm run` (HTTP mode) in a subprocess, talking to a local fake Slack
Web API and to a model that takes `--model-delay` seconds per call (so tasks
are running while the deliveries arrive), and beside it a bare slack-bolt app
that only acks (bench/_bare_bolt.py: same framework, same adapter). Each round
sends a burst of `--burst` concurrent signed app_mention deliveries to each,
bare first, after one unmeasured burst to each (which leaves ducklm with
tasks running).

Targets (issue #7): p99 under 100 ms, and within 2x of the bare app.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from bench._common import THINKER_MODEL, percentile, print_header, summary_ms, verdict
from bench._slackbot import SlackHarness, mention_body, post


def decide(body: dict) -> str:
    if body.get("model") == THINKER_MODEL:
        return "web-1 is fine."
    return '{"actions": []}'


async def burst(session: aiohttp.ClientSession, url: str, size: int) -> list[float]:
    bodies = [mention_body(f"how is web-{i}?") for i in range(size)]
    results = await asyncio.wait_for(
        asyncio.gather(*(post(session, url, b, "application/json") for b in bodies)), 60
    )
    bad = [status for _, _, status in results if status != 200]
    if bad:
        raise SystemExit(f"{len(bad)} deliveries were not acked with 200: {bad[:5]}")
    return [seconds for _, seconds, _ in results]


async def run(args: argparse.Namespace) -> None:
    with SlackHarness(decide, model_delay=args.model_delay) as harness:
        harness.start_bare()
        harness.start_bot({"DUCKLM_MAX_CONCURRENT_TASKS": str(args.concurrent_tasks)})
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            # Warm up both with a full burst: imports, caches, and a pool of
            # keep-alive connections (Slack keeps its connections open too).
            # In ducklm these first deliveries are tasks that are still running
            # when the measured bursts arrive.
            for which in ("bare", "ducklm"):
                await burst(session, harness.url(which), args.burst)
            await asyncio.sleep(0.3)
            samples: dict[str, list[float]] = {"bare": [], "ducklm": []}
            per_round: dict[str, list[float]] = {"bare": [], "ducklm": []}
            running_at_burst = []
            for _ in range(args.rounds):
                for which in ("bare", "ducklm"):
                    if which == "ducklm":
                        running_at_burst.append(
                            harness.query("SELECT COUNT(*) FROM tasks WHERE status = 'running'")[0][
                                0
                            ]
                        )
                    got = await burst(session, harness.url(which), args.burst)
                    samples[which] += got
                    per_round[which].append(percentile(got, 99))
                    await asyncio.sleep(0.3)
            total = args.burst * (args.rounds + 1)
            started = time.monotonic()
            await harness.wait_until(
                "SELECT COUNT(*) FROM tasks WHERE status = 'completed'", total, 600
            )
            drained = time.monotonic() - started

    print()
    for which in ("bare", "ducklm"):
        print(f"   {which:<7} {summary_ms(samples[which])}   ({len(samples[which])} deliveries)")
    for which in ("bare", "ducklm"):
        rounds = ", ".join(f"{v * 1000:.0f}" for v in per_round[which])
        print(f"   {which:<7} p99 of each round (ms): {rounds}")
    p99 = {w: percentile(v, 99) for w, v in samples.items()}
    p50 = {w: percentile(v, 50) for w, v in samples.items()}
    ratio50, ratio99 = p50["ducklm"] / p50["bare"], p99["ducklm"] / p99["bare"]
    print(f"   ducklm/bare: p50 {ratio50:.2f}x, p99 {ratio99:.2f}x")
    print(
        f"   tasks running in ducklm when each burst started: {running_at_burst}; "
        f"all {total} tasks completed {drained:.1f} s after the last burst"
    )
    print()
    print(f"target p99 < 100 ms: {p99['ducklm'] * 1000:.1f} ms -> {verdict(p99['ducklm'] < 0.1)}")
    ratio = p99["ducklm"] / p99["bare"]
    print(f"target p99 within 2x of the bare app: {ratio:.2f}x -> {verdict(ratio <= 2)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model-delay", type=float, default=0.2, help="seconds per model call")
    parser.add_argument("--concurrent-tasks", type=int, default=8)
    args = parser.parse_args()
    print_header("Slack ack latency: ducklm run vs a bare bolt app")
    print(
        f"   {args.rounds} rounds of {args.burst} concurrent signed app_mention deliveries; "
        f"model {args.model_delay * 1000:.0f} ms per call; "
        f"DUCKLM_MAX_CONCURRENT_TASKS={args.concurrent_tasks}"
    )
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
