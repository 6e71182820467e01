"""Rule checks at 10, 1,000 and 10,000 "always" rules, and the loop stall they cause.

    python -m bench.rules [--counts 10,1000,10000] [--repeat 30] [--runs 3] [--old]

For each count, a fresh SQLite file gets that many shell rules, made the way
`rules add` and "Always" make them (parsed once, stored with their match
columns): exact rules of everyday fixes (`systemctl restart svc-N`, `kubectl
rollout restart …`, `cd /srv/app-N && git pull`, `touch stamp-N`, `docker
restart web-N`) and prefix rules (`rm -rf build-N`, `chmod 644 conf-N`, `git
pull origin branch-N`), many of them for the same few programs. The same
eight commands are then checked through `ApprovalService.is_allowed_forever`
(the bot's path: store lookup, then the decision), four covered by a rule and
four not (a read-only one among them). A check's time is the mean over the
eight, best of `--runs` passes of `--repeat` rounds; the ratios to the
10-rule store are the figure that counts (goal: 10,000 within 2x of 10).

Loop stall: a ticker coroutine sleeps 1 ms at a time on the bot's event loop
and records how late each wake-up is. The largest lateness is measured (a)
while the eight checks run against 10,000 rules, and (b) during one whole
action on the real runtime (build_runtime, the real loop and gateway, a model
server answering at once): the model proposes `touch stamp-0`, a rule covers
it, it runs, the thinker answers. Goal: under 10 ms.

`--old` also times the previous way for comparison (every active rule read and
its pattern parsed again on every check: `rule_covers(command, all rules)`),
once per command at the largest count since it takes seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import InstantModelServer, print_header, scripted_answer, settings_for, verdict
from runtime.approvals import SHELL_TOOL, ApprovalService, rule_keys
from runtime.store import Stores, open_stores
from runtime.tools.shell_rules import rule_covers

EXACT = [
    "systemctl restart svc-{i}",
    "kubectl rollout restart deployment/app-{i} -n prod",
    "cd /srv/app-{i} && git pull",
    "touch stamp-{i}",
    "docker restart web-{i}",
]
PREFIX = ["rm -rf build-{i}", "chmod 644 conf-{i}", "git pull origin branch-{i}"]
TEMPLATES = [("exact", t) for t in EXACT] + [("prefix", t) for t in PREFIX]
# Covered by rules that exist at every count (i = 0 or 1), then four that are not.
CHECKED = [
    ("systemctl restart svc-1", True),
    ("rm -rf build-0 dist", True),
    ("cd /srv/app-0 && git pull", True),
    ("touch stamp-0 && ls -la", True),
    ("ls -la /var/log", False),
    ("touch other", False),
    ("git pull origin main", False),
    ("systemctl restart svc-999999", False),
]


def rule_specs(count: int) -> list[tuple[str, str]]:
    return [
        (TEMPLATES[j % len(TEMPLATES)][0], TEMPLATES[j % len(TEMPLATES)][1].format(i=j // 8))
        for j in range(count)
    ]


async def fill(stores: Stores, count: int) -> float:
    """Make `count` rules as `rules add` would; returns the seconds spent parsing them."""
    parse = 0.0
    specs = rule_specs(count)
    for start in range(0, len(specs), 500):
        made = []
        for kind, pattern in specs[start : start + 500]:
            t = time.perf_counter()
            made.append((kind, pattern, rule_keys(SHELL_TOOL, kind, pattern)))
            parse += time.perf_counter() - t
        async with stores.db.transaction():
            for kind, pattern, keys in made:
                await stores.rules.insert(SHELL_TOOL, kind, pattern, "bench", keys=keys)
    return parse


def action(command: str) -> dict[str, Any]:
    return {"tool": SHELL_TOOL, "args": {"command": command}, "reason": "bench"}


async def check_all(service: ApprovalService, workspace: str) -> None:
    for command, covered in CHECKED:
        got = await service.is_allowed_forever(action(command), workspace)
        if got is not covered:
            raise SystemExit(f"bench bug: {command!r} covered={got}, expected {covered}")


@dataclass
class Timing:
    """Wall-clock seconds, and this thread's CPU seconds (what our own code spent:
    on a loaded machine the wall clock also counts time the OS ran others)."""

    wall: float
    cpu: float

    def best(self, other: Timing | None) -> Timing:
        if other is None:
            return self
        return Timing(min(self.wall, other.wall), min(self.cpu, other.cpu))


async def per_check(service: ApprovalService, workspace: str, repeat: int) -> Timing:
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(repeat):
        await check_all(service, workspace)
    n = repeat * len(CHECKED)
    return Timing((time.perf_counter() - wall) / n, (time.thread_time() - cpu) / n)


async def old_per_check(stores: Stores, workspace: str, repeat: int) -> Timing:
    """The previous check: every active rule read as a model and parsed again."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(repeat):
        for command, covered in CHECKED:
            rules = await stores.rules.active_for_tool(SHELL_TOOL)
            if rule_covers(command, rules, workspace) is not covered:
                raise SystemExit(f"bench bug (old path): {command!r}")
    n = repeat * len(CHECKED)
    return Timing((time.perf_counter() - wall) / n, (time.thread_time() - cpu) / n)


async def max_stall(work: Callable[[], Awaitable[object]]) -> Timing:
    """The longest stretch the loop was held while `work` ran: a ticker asks to wake
    every 1 ms and records how late it woke (wall), and how much CPU this thread
    used meanwhile beyond that 1 ms (the loop's own work; the wall clock also
    counts the OS running other processes on a busy machine)."""
    wall_late: list[float] = []
    cpu_used: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.001)
            wall_late.append(time.perf_counter() - wall - 0.001)
            # Work may use the 1 ms the ticker sleeps; only the rest held it up.
            cpu_used.append(max(0.0, time.thread_time() - cpu - 0.001))

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)  # the ticker is running before the work starts
    wall_late.clear()
    cpu_used.clear()
    try:
        await work()
    finally:
        done.set()
        await tick
    if not wall_late:
        raise SystemExit("bench bug: the ticker never ran")
    return Timing(max(wall_late), max(cpu_used))


async def action_stalls(tmp: Path, count: int, actions: int) -> list[Timing]:
    """The stall during each of `actions` rule-covered actions (one task each) on the
    real runtime with `count` rules."""
    from runtime.factory import build_runtime

    stalls = []
    with InstantModelServer(scripted_answer(action("touch stamp-0"))) as server:
        settings = settings_for(tmp, server.base_url)
        rt = await build_runtime(settings)
        try:
            await fill(rt.stores, count)
            workspace = str(settings.workspace)
            await rt.loop.run_chat("warm up", workspace)  # imports, connections, caches
            for _ in range(actions):
                result: list[Any] = []

                async def work(result: list[Any] = result) -> None:
                    result.append(await rt.loop.run_chat("stamp it", workspace))

                stalls.append(await max_stall(work))
                events = await rt.stores.events.list_events(result[0].task_id)
                by_rule = any(
                    e.event_type == "command_audit" and e.payload.get("approved_by") == "rule"
                    for e in events
                )
                if result[0].status != "completed" or not by_rule:
                    raise SystemExit(f"bench bug: not run by rule ({result[0].status})")
        finally:
            await rt.close()
    return stalls


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


async def run(args: argparse.Namespace) -> None:
    counts = sorted(int(c) for c in args.counts.split(","))
    low, top = counts[0], counts[-1]
    best: dict[int, Timing] = {}
    old: dict[int, Timing] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rules-") as tmp_name:
        tmp = Path(tmp_name)
        workspace = str(tmp / "ws")
        (tmp / "ws").mkdir()
        stores: dict[int, Stores] = {}
        services: dict[int, ApprovalService] = {}
        try:
            for count in counts:
                stores[count] = await open_stores(tmp / f"rules-{count}.db")
                parse = await fill(stores[count], count)
                services[count] = ApprovalService.from_stores(stores[count])
                await check_all(services[count], workspace)  # warm up
                print(f"   {count:>6,} rules made (parsed once each: {ms(parse / count)})")
            # Interleaved passes, best of each: a busy neighbour slows every count alike.
            for _ in range(args.runs):
                for count in counts:
                    took = await per_check(services[count], workspace, args.repeat)
                    best[count] = took.best(best.get(count))

            # Inline SQLite never yields, so a check holds the loop from start to end:
            # the longest check is the stall it causes.
            stall_checks = Timing(0.0, 0.0)
            for _ in range(5):
                for command, _covered in CHECKED:
                    wall, cpu = time.perf_counter(), time.thread_time()
                    await services[top].is_allowed_forever(action(command), workspace)
                    stall_checks = Timing(
                        max(stall_checks.wall, time.perf_counter() - wall),
                        max(stall_checks.cpu, time.thread_time() - cpu),
                    )
            if args.old:
                for count in counts:
                    rounds = 1 if count >= 5000 else max(1, args.repeat // 10)
                    old[count] = await old_per_check(stores[count], workspace, rounds)
        finally:
            for store in stores.values():
                await store.close()
        stall_top = await action_stalls(tmp / "runtime-top", top, args.actions)
        stall_low = await action_stalls(tmp / "runtime-low", low, args.actions)

    print()
    for count in counts:
        t = best[count]
        print(
            f"   {count:>6,} rules: {ms(t.wall)} per check ({ms(t.cpu)} CPU)   ratio to {low:,}: "
            f"{t.wall / best[low].wall:.2f}x ({t.cpu / best[low].cpu:.2f}x CPU)"
        )
    ratio = max(best[top].wall / best[low].wall, best[top].cpu / best[low].cpu)
    print(f"   goal {top:,} rules within 2x of {low:,}: {verdict(ratio <= 2.0)}")
    if old:
        print()
        for count in counts:
            then, now = old[count].wall, best[count].wall
            print(
                f"   before (every rule parsed on every check), {count:>6,} rules: "
                f"{then * 1e3:9.1f} ms per check ({then / now:,.0f}x now)"
            )
    print()
    print(
        f"   loop stall, the longest of 40 checks at {top:,} rules: "
        f"{ms(stall_checks.wall)} ({ms(stall_checks.cpu)} of it the loop's own CPU)"
    )
    for label, stalls in ((top, stall_top), (low, stall_low)):
        wall = statistics.median(s.wall for s in stalls)
        cpu = statistics.median(s.cpu for s in stalls)
        print(
            f"   loop stall during one rule-covered action (a whole task) at {label:,} rules: "
            f"median {ms(wall)} ({ms(cpu)} CPU), worst {ms(max(s.wall for s in stalls))} "
            f"({ms(max(s.cpu for s in stalls))} CPU), {len(stalls)} actions"
        )
    own = max(stall_checks.cpu, statistics.median(s.cpu for s in stall_top))
    print(
        f"   goal: the loop held under 10 ms at {top:,} rules (its own CPU, longest check "
        f"and median action): {verdict(own < 0.010)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,1000,10000")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--actions", type=int, default=7, help="whole actions timed")
    parser.add_argument("--old", action="store_true", help="also time the previous check")
    args = parser.parse_args()
    print_header("rule checks: 10 vs 1,000 vs 10,000 rules, and the loop stall")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
