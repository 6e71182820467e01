"""`ducklm run` start-up with what is stored, and a catch-up after downtime.

    python -m bench.startup [--runs 5] [--window 40]

1. Start-up: a real `ducklm run` (Slack over HTTP, against the fake Web API and
   an instant model) on a store holding nothing, 10,000 or 100,000 pending
   approvals (their tasks waiting in Slack threads, cards posted, expiry a day
   away), or 10,000 schedules. Measured from the process's start to its "ducklm:
   schedule:" line (platforms connected, recovery done, timers armed), and its
   RSS then; the median of `--runs` starts of each, in turns. Printed as ratios
   to the empty store.
2. Catch-up: 10,000 hourly schedules that each missed a run (the bot was down
   for an hour). Over `--window` seconds the bench counts the runs started (from
   the store's last_run_at) and sends signed app_mention deliveries at a steady
   pace, timing each HTTP 200. The baseline is a second `ducklm run` beside it
   whose 10,000 schedules owe nothing, sent the same deliveries in turn.

Goals (issue #23): 100k pending within 2x the empty start-up and RSS within
+50 MiB; catch-up runs at most DUCKLM_CATCH_UP_RATE a minute, ack p99 within 2x
of the baseline and under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import THINKER_MODEL, percentile, print_header, rss_kib, verdict
from bench._slackbot import CHANNEL, SlackHarness, mention_body, post

START_RATIO_GOAL = 2.0
RSS_GOAL_MIB = 50.0
ACK_RATIO_GOAL = 2.0
ACK_P99_GOAL_S = 0.100
ACKS_PER_SECOND = 10
DEFAULT_CATCH_UP_RATE = 10.0  # runtime/settings.py's default, a minute


def decide(body: dict[str, Any]) -> str:
    if body.get("model") == THINKER_MODEL:
        return "All fine."
    return '{"actions": []}'


# -- stores -----------------------------------------------------------------


def empty_store(path: Path) -> None:
    """A migrated, empty store (the schema comes from DuckLM itself)."""
    from runtime.store import open_stores

    async def make() -> None:
        stores = await open_stores(path)
        await stores.close()

    asyncio.run(make())


def with_pending(path: Path, count: int) -> None:
    """`count` tasks waiting for approval in Slack threads, cards posted, as
    `ducklm run` leaves them (expiry in a day, reminder planned)."""
    empty_store(path)
    now = time.time()
    conn = sqlite3.connect(path)
    try:
        with conn:
            tasks, approvals = [], []
            for i in range(count):
                task_id, approval_id = uuid.uuid4().hex, uuid.uuid4().hex
                ts = f"1690000000.{i:06d}"
                conversation = f"slack:{CHANNEL}|{ts}"
                tasks.append((task_id, f"clean up {i}", conversation, now, now))
                approvals.append(
                    (
                        approval_id,
                        task_id,
                        f"rm -rf build-{i}",
                        now,
                        now + 86400,
                        f"slack:{CHANNEL}:{ts}",
                        now + 900,
                    )
                )
            conn.executemany(
                "INSERT INTO tasks (task_id, message, status, conversation, requested_by, "
                "created_at, updated_at, conversation_group) "
                "VALUES (?, ?, 'waiting_for_approval', ?, 'slack:UASKER001', ?, ?, "
                f"'slack:{CHANNEL}')",
                tasks,
            )
            conn.executemany(
                "INSERT INTO approvals (approval_id, task_id, action, tool, command, "
                "risk_level, created_at, expires_at, card_ref, card_state, due_at) VALUES "
                '(?, ?, \'{"tool": "shell_exec_safe", "args": {}}\', \'shell_exec_safe\', '
                "?, 'high', ?, ?, ?, 'posted', ?)",
                approvals,
            )
    finally:
        conn.close()


def with_schedules(path: Path, count: int, *, missed: bool, planned: bool = True) -> None:
    """`count` hourly schedules; with `missed`, each owes the run that fell due
    half an hour ago (last run an hour before that), else each ran on time.
    Without `planned`, their next fire time is still to be computed (0), as
    right after the upgrade to schema v7."""
    empty_store(path)
    now = time.time()
    due = now - 1800 if missed else now + 1800
    minute = time.gmtime(due).tm_min
    due = due - due % 60  # that minute's start: the cron's fire time
    conversation = f"slack:{CHANNEL}"
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO schedules (schedule_id, cron, timezone, prompt, conversation, "
                "created_by, created_at, last_run_at, next_fire_at) "
                "VALUES (?, ?, 'UTC', ?, ?, 'slack:UAPPROVER', ?, ?, ?)",
                [
                    (
                        f"s-{i:06x}",
                        f"{minute} * * * *",
                        f"report {i}",
                        conversation,
                        now - 86400,
                        due - 3600 + 1,
                        due if planned else 0.0,
                    )
                    for i in range(count)
                ],
            )
    finally:
        conn.close()


# -- start-up ---------------------------------------------------------------


def start_once(store: Path) -> tuple[float, float]:
    """Seconds until `ducklm run` is ready on a copy of `store`, and its RSS (MiB)."""
    harness = SlackHarness(decide)
    try:
        shutil.copy(store, harness.db)
        started = time.monotonic()
        harness.start_bot()
        log = harness.tmp / "ducklm.log"
        deadline = started + 300
        while "ducklm: schedule:" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or (harness.bot and harness.bot.poll() is not None):
                raise RuntimeError(f"ducklm run did not get ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.02)
        seconds = time.monotonic() - started
        assert harness.bot is not None
        return seconds, rss_kib(harness.bot.pid) / 1024
    finally:
        harness.close()


def startup(runs: int) -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="ducklm-bench-startup-"))
    try:
        stores: dict[str, Path] = {}
        for name, make in (
            ("empty", lambda p: empty_store(p)),
            ("10k pending", lambda p: with_pending(p, 10_000)),
            ("100k pending", lambda p: with_pending(p, 100_000)),
            ("10k schedules", lambda p: with_schedules(p, 10_000, missed=False)),
        ):
            stores[name] = tmp / f"{name.replace(' ', '-')}.db"
            make(stores[name])
        times: dict[str, list[float]] = {name: [] for name in stores}
        rss: dict[str, list[float]] = {name: [] for name in stores}
        for _ in range(runs):  # in turns, so load on the machine hits all alike
            for name, store in stores.items():
                seconds, mib = start_once(store)
                times[name].append(seconds)
                rss[name].append(mib)
        base_t = statistics.median(times["empty"])
        base_rss = statistics.median(rss["empty"])
        print(f"-- start-up of `ducklm run` (median of {runs}; ready = timers armed)")
        for name in stores:
            t, mib = statistics.median(times[name]), statistics.median(rss[name])
            print(
                f"   {name:14s} {t:6.2f} s  ({t / base_t:4.2f}x)   RSS {mib:6.1f} MiB "
                f"({mib - base_rss:+6.1f} MiB)"
            )
        t100 = statistics.median(times["100k pending"]) / base_t
        rss100 = statistics.median(rss["100k pending"]) - base_rss
        ok = t100 <= START_RATIO_GOAL and rss100 <= RSS_GOAL_MIB
        print(
            f"   goal: 100k pending within {START_RATIO_GOAL:g}x the empty start-up "
            f"({t100:.2f}x) and +{RSS_GOAL_MIB:g} MiB ({rss100:+.1f}): {verdict(ok)}"
        )
        return ok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- catch-up ---------------------------------------------------------------


async def acks_during(urls: list[str], seconds: float) -> list[list[float]]:
    """Signed app_mention deliveries at a steady pace for `seconds`, to each of
    `urls` in turn (so a burst of load on the machine hits all alike); the ack
    times of each."""
    latencies: list[list[float]] = [[] for _ in urls]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            for which, url in enumerate(urls):
                body = mention_body(f"how is web-{i}?")
                _, took, status = await post(session, url, body, "application/json")
                if status != 200:
                    raise SystemExit(f"a delivery was answered {status}, not 200")
                latencies[which].append(took)
            i += 1
            await asyncio.sleep(1 / ACKS_PER_SECOND)
    return latencies


def ready(harness: SlackHarness) -> None:
    log = harness.tmp / "ducklm.log"
    deadline = time.monotonic() + 300
    while "ducklm: schedule:" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"ducklm run did not get ready:\n{log.read_text()[-2000:]}")
        time.sleep(0.02)


def catch_up_run(
    window: float, *, planned: bool
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Two bots side by side over `window` seconds, one owing 10,000 catch-up
    runs, one owing nothing: (acks, run start times) of each."""
    with SlackHarness(decide) as owing, SlackHarness(decide) as baseline:
        with_schedules(owing.db, 10_000, missed=True, planned=planned)
        with_schedules(baseline.db, 10_000, missed=False)
        owing.start_bot()
        baseline.start_bot()
        ready(owing)
        ready(baseline)
        since = time.time()
        acks, base_acks = asyncio.run(
            acks_during([owing.url("ducklm"), baseline.url("ducklm")], window)
        )
        sql = "SELECT last_run_at FROM schedules WHERE last_run_at >= ? ORDER BY last_run_at"
        runs = [row[0] for row in owing.query(sql, (since - 5,))]
        base_runs = [row[0] for row in baseline.query(sql, (since - 5,))]
        return acks, runs, base_acks, base_runs


def catch_up(window: float, *, planned: bool = True) -> bool:
    acks, runs, base_acks, base_runs = catch_up_run(window, planned=planned)
    what = "" if planned else " (not planned yet: 10,000 to plan at start)"
    print(f"-- catch-up: 10,000 hourly schedules after an hour down{what}, {window:g} s observed")
    per_minute = max((sum(1 for r in runs if start <= r < start + 60) for start in runs), default=0)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    allowed = DEFAULT_CATCH_UP_RATE * max(window, 60) / 60 + 1
    print(
        f"   runs started: {len(runs)} (baseline, nothing owed: {len(base_runs)}); "
        f"most in any minute: {per_minute}; smallest gap {min(gaps, default=0):.2f} s"
    )
    rate_ok = len(runs) <= allowed and (not gaps or min(gaps) >= 60 / DEFAULT_CATCH_UP_RATE - 0.05)
    rate_ok = rate_ok and len(runs) >= 1 and not base_runs
    p99, base_p99 = percentile(acks, 99), percentile(base_acks, 99)
    print(
        f"   ack during catch-up:  p50 {percentile(acks, 50) * 1000:6.2f} ms  "
        f"p99 {p99 * 1000:6.2f} ms  max {max(acks) * 1000:6.2f} ms  ({len(acks)} deliveries)"
    )
    print(
        f"   ack, nothing owed:    p50 {percentile(base_acks, 50) * 1000:6.2f} ms  "
        f"p99 {base_p99 * 1000:6.2f} ms  max {max(base_acks) * 1000:6.2f} ms  "
        f"({len(base_acks)} deliveries)"
    )
    ack_ok = p99 <= ACK_P99_GOAL_S and p99 <= ACK_RATIO_GOAL * max(base_p99, 0.005)
    print(
        f"   goal: at most {DEFAULT_CATCH_UP_RATE:g} catch-up runs a minute, spread: "
        f"{verdict(rate_ok)}; ack p99 under {ACK_P99_GOAL_S * 1000:g} ms and within "
        f"{ACK_RATIO_GOAL:g}x of the baseline ({p99 / max(base_p99, 1e-9):.2f}x; "
        f"floor 5 ms): {verdict(ack_ok)}"
    )
    return rate_ok and ack_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="starts of each store")
    parser.add_argument("--window", type=float, default=40.0, help="catch-up seconds observed")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-catch-up", action="store_true")
    parser.add_argument(
        "--unplanned",
        action="store_true",
        help="also a catch-up whose schedules must first be planned (as after the upgrade)",
    )
    args = parser.parse_args()
    print_header("ducklm run: start-up with what is stored, catch-up after downtime")
    if not args.skip_startup:
        startup(args.runs)
    if not args.skip_catch_up:
        catch_up(args.window)
        if args.unplanned:
            catch_up(args.window, planned=False)


if __name__ == "__main__":
    main()
