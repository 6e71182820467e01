"""CLI start-up: `ducklm --help` and `ducklm tasks` against `python -c pass`.

    python -m bench.cli_startup [--runs 15]

Each command runs as a fresh process, the way an operator types it (the
installed `ducklm` console script, or `python -m bot.cli` without one),
`--runs` times in turns, so a burst of load on the machine hits all three
alike. `ducklm tasks` reads a real store of 1,000 tasks in a temporary
directory. Printed: the median wall time of each and its ratio to the bare
interpreter's start.

Target (issue #14): under 3x `python -c pass`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, print_header, verdict

TARGET_RATIO = 3.0
TASKS_IN_STORE = 1_000


def ducklm_command() -> list[str]:
    """The console script beside this interpreter, as installed by pip."""
    script = Path(sys.executable).with_name("ducklm")
    if script.exists():
        return [str(script)]
    found = shutil.which("ducklm")
    return [found] if found else [sys.executable, "-m", "bot.cli"]


async def fill_store(path: Path) -> None:
    from runtime.store import open_stores

    async with await open_stores(path) as stores:
        for n in range(TASKS_IN_STORE):
            task = await stores.tasks.create_task(f"question {n}", conversation=f"slack:C{n % 7}")
            await stores.tasks.complete_task(task.task_id, "answer")


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {done.returncode}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    print_header("CLI start-up: ducklm --help / ducklm tasks vs python -c pass")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ducklm.db"
        asyncio.run(fill_store(db))
        # No .env of the caller's may point the CLI at another database.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUCKLM_")}
        env["DUCKLM_DB"] = str(db)
        ducklm = ducklm_command()
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "ducklm --help": [*ducklm, "--help"],
            "ducklm tasks": [*ducklm, "tasks"],
        }
        for argv in commands.values():  # warm the page cache and the .pyc files
            timed(argv, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(timed(argv, env))

    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["python -c pass"]
    print(f"   {args.runs} runs each, interleaved; median wall time of a fresh process")
    for name, median in medians.items():
        ratio = median / base
        mark = "" if name == "python -c pass" else f"  {ratio:4.2f}x"
        if name != "python -c pass":
            mark += f"  (target < {TARGET_RATIO:g}x: {verdict(ratio < TARGET_RATIO)})"
        print(f"   {name:<16} {median * 1000:7.1f} ms{mark}")


if __name__ == "__main__":
    main()
