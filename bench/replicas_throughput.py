"""Throughput of one replica against three on one PostgreSQL, with a model that
takes 200 ms per call.

    python -m bench.replicas_throughput [--tasks 120] [--rounds 2] [--model-delay 0.2]

Three real `ducklm run` replicas (Slack over HTTP) on one throwaway PostgreSQL,
behind the tests' round-robin proxy (bench/_replicas.py). Each round sends a
burst of `--tasks` signed app_mention deliveries through the proxy, first with
the proxy forwarding to one replica, then to all three, and times each burst
from the first delivery to the last of its tasks completed in the database.
Each task makes two model calls (the action model plans nothing, the thinker
answers), 2 x `--model-delay` of waiting, so a replica's throughput is bounded
by its DUCKLM_MAX_CONCURRENT_TASKS slots, not by the CPU: three replicas have
three times the slots. The ratio (tasks/s with three over tasks/s with one)
should approach 3; what keeps it below is the shared machine (2 cores for
everything here) and the shared database.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

import aiohttp

from bench._common import THINKER_MODEL, print_header, verdict
from bench._replicas import Replicas, machine_busy
from bench._slackbot import mention_body, post

COMPLETED = "SELECT COUNT(*) FROM tasks WHERE status = 'completed'"


def decide(body: dict) -> str:
    if body.get("model") == THINKER_MODEL:
        return "web-1 is fine."
    return '{"actions": []}'


@dataclass
class Burst:
    rate: float  # tasks/s
    busy: float  # share of the machine's CPU time in use meanwhile (0..1), everyone's
    cpu_ms: float  # replica CPU milliseconds per task
    pg_ms: float  # PostgreSQL's CPU milliseconds per task
    own_ms: float  # this process's (fake Slack, model, proxy, load) CPU ms per task


async def burst(replicas: Replicas, session: aiohttp.ClientSession, size: int) -> Burst:
    """One burst of `size` mentions through the proxy, until all are completed."""
    before = await replicas.count(COMPLETED)
    bodies = [mention_body(f"how is web-{i}?") for i in range(size)]
    cpu, machine = replicas.replica_cpu(), machine_busy()
    pg, own = replicas.postgres_cpu(), replicas.own_cpu()
    started = time.perf_counter()
    results = await asyncio.wait_for(
        asyncio.gather(
            *(post(session, replicas.events_url, b, "application/json") for b in bodies)
        ),
        120,
    )
    bad = [status for _, _, status in results if status != 200]
    if bad:
        raise SystemExit(f"{len(bad)} deliveries were not acked with 200: {bad[:5]}")
    await replicas.wait_until(COMPLETED, before + size, 600)
    elapsed = time.perf_counter() - started
    busy, total = (b - a for a, b in zip(machine, machine_busy(), strict=True))
    return Burst(
        size / elapsed,
        busy / total,
        (replicas.replica_cpu() - cpu) * 1000 / size,
        (replicas.postgres_cpu() - pg) * 1000 / size,
        (replicas.own_cpu() - own) * 1000 / size,
    )


async def run(args: argparse.Namespace) -> None:
    env = {"DUCKLM_MAX_CONCURRENT_TASKS": str(args.concurrent_tasks)}
    with Replicas(decide, count=3, model_delay=args.model_delay, env=env) as replicas:
        print(f"   PostgreSQL {replicas.version}; replicas on ports {replicas.ports}")
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        rates: dict[int, list[Burst]] = {1: [], 3: []}
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for count in (1, 3):  # warm-up: imports, caches, pools, prepared statements
                replicas.use(count)
                await burst(replicas, session, 3 * args.concurrent_tasks * count)
            for _ in range(args.rounds):
                for count in (1, 3):
                    replicas.use(count)
                    rates[count].append(await burst(replicas, session, args.tasks))
                    await asyncio.sleep(0.5)  # let the last answers settle between bursts
        total = await replicas.count("SELECT COUNT(*) FROM tasks")
        failed = await replicas.count("SELECT COUNT(*) FROM tasks WHERE status <> 'completed'")

    print()
    median = {c: statistics.median(b.rate for b in rates[c]) for c in (1, 3)}
    for count in (1, 3):
        each = ", ".join(f"{b.rate:.1f}" for b in rates[count])
        label = "1 replica " if count == 1 else f"{count} replicas"
        print(f"   {label}: {median[count]:6.1f} tasks/s (median; rounds: {each})")
        cpu = ", ".join(f"{b.busy * 100:.0f}%" for b in rates[count])
        per_task = ", ".join(f"{b.cpu_ms:.0f}/{b.pg_ms:.0f}/{b.own_ms:.0f}" for b in rates[count])
        print(
            f"   {'':<10}  machine CPU busy meanwhile (everyone's): {cpu}; CPU ms per task "
            f"(replicas/PostgreSQL/fakes+proxy+load): {per_task}"
        )
    slots = args.concurrent_tasks / (2 * args.model_delay)
    print(f"   bound set by the slots alone: {slots:.1f} tasks/s per replica")
    print(f"   {total} tasks in all, {failed} not completed")
    ratio = median[3] / median[1]
    print()
    print(f"three replicas / one: {ratio:.2f}x -> {verdict(ratio >= 2.5)} (target: approach 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=120, help="mentions per burst")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-delay", type=float, default=0.2, help="seconds per model call")
    parser.add_argument("--concurrent-tasks", type=int, default=4)
    args = parser.parse_args()
    print_header("Throughput: one ducklm replica vs three on one PostgreSQL")
    print(
        f"   {args.rounds} rounds of a {args.tasks}-mention burst to each; model "
        f"{args.model_delay * 1000:.0f} ms per call (2 calls a task); "
        f"DUCKLM_MAX_CONCURRENT_TASKS={args.concurrent_tasks} per replica"
    )
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
