"""Slack ack latency with three replicas on one PostgreSQL against one.

    python -m bench.replicas_ack [--burst 100] [--rounds 4] [--model-delay 0.2]

Three real `ducklm run` replicas (Slack over HTTP) on one throwaway PostgreSQL,
behind the tests' round-robin proxy (bench/_replicas.py). Each round sends a
burst of `--burst` concurrent signed app_mention deliveries through the proxy,
first forwarding to one replica, then to all three, and times each delivery to
its HTTP 200. The model takes `--model-delay` per call, so the tasks of earlier
bursts are still running when the next burst arrives (as in bench.slack_ack).
Before acking, a replica claims the delivery in the shared database (a round
trip to PostgreSQL, not a local SQLite write) and records the message in the
inbox; with three replicas each takes a third of a burst.

The proxy is in the path of both (a new connection to the replica per request),
so the ratio compares the replicas, not the proxy. Target: three replicas ack
no slower than one (p99 ratio <= 1).
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp

from bench._common import THINKER_MODEL, percentile, print_header, summary_ms, verdict
from bench._replicas import Replicas
from bench._slackbot import mention_body, post


def decide(body: dict) -> str:
    if body.get("model") == THINKER_MODEL:
        return "web-1 is fine."
    return '{"actions": []}'


async def burst(replicas: Replicas, session: aiohttp.ClientSession, size: int) -> list[float]:
    bodies = [mention_body(f"how is web-{i}?") for i in range(size)]
    results = await asyncio.wait_for(
        asyncio.gather(
            *(post(session, replicas.events_url, b, "application/json") for b in bodies)
        ),
        120,
    )
    bad = [status for _, _, status in results if status != 200]
    if bad:
        raise SystemExit(f"{len(bad)} deliveries were not acked with 200: {bad[:5]}")
    return [seconds for _, seconds, _ in results]


async def run(args: argparse.Namespace) -> None:
    env = {"DUCKLM_MAX_CONCURRENT_TASKS": str(args.concurrent_tasks)}
    with Replicas(decide, count=3, model_delay=args.model_delay, env=env) as replicas:
        print(f"   PostgreSQL {replicas.version}; replicas on ports {replicas.ports}")
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        samples: dict[int, list[float]] = {1: [], 3: []}
        per_round: dict[int, list[float]] = {1: [], 3: []}
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for count in (1, 3):  # warm-up, unmeasured: leaves tasks running
                replicas.use(count)
                await burst(replicas, session, args.burst)
            await asyncio.sleep(0.3)
            for _ in range(args.rounds):
                for count in (1, 3):
                    replicas.use(count)
                    got = await burst(replicas, session, args.burst)
                    samples[count] += got
                    per_round[count].append(percentile(got, 99))
                    await asyncio.sleep(0.3)
        total = args.burst * (args.rounds + 1) * 2
        await replicas.wait_until(
            "SELECT COUNT(*) FROM tasks WHERE status = 'completed'", total, 900
        )

    print()
    for count in (1, 3):
        label = "1 replica " if count == 1 else f"{count} replicas"
        print(f"   {label} {summary_ms(samples[count])}   ({len(samples[count])} deliveries)")
    for count in (1, 3):
        label = "1 replica " if count == 1 else f"{count} replicas"
        rounds = ", ".join(f"{v * 1000:.0f}" for v in per_round[count])
        print(f"   {label} p99 of each round (ms): {rounds}")
    p50 = {c: percentile(v, 50) for c, v in samples.items()}
    p99 = {c: percentile(v, 99) for c, v in samples.items()}
    print(f"   all {total} tasks completed")
    print()
    ratio50, ratio99 = p50[3] / p50[1], p99[3] / p99[1]
    print(f"three replicas / one: p50 {ratio50:.2f}x, p99 {ratio99:.2f}x")
    print(f"target p99 ratio <= 1: {ratio99:.2f}x -> {verdict(ratio99 <= 1.0)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model-delay", type=float, default=0.2, help="seconds per model call")
    parser.add_argument("--concurrent-tasks", type=int, default=8)
    args = parser.parse_args()
    print_header("Slack ack latency: three ducklm replicas vs one, on one PostgreSQL")
    print(
        f"   {args.rounds} rounds of {args.burst} concurrent signed app_mention deliveries "
        f"to each, through the proxy; model {args.model_delay * 1000:.0f} ms per call; "
        f"DUCKLM_MAX_CONCURRENT_TASKS={args.concurrent_tasks} per replica"
    )
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
