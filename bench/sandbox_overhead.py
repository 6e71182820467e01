"""Sandbox overhead: a sandboxed `ls` against an unsandboxed one, through `execute()`.

    python -m bench.sandbox_overhead [--runs 200]

Both run the same `ls -la` in the same workspace through the real execution
path (classification, scrubbed environment, rlimits, pids cgroup where one
can be made, output capture); the only difference is the bubblewrap sandbox
(`DUCKLM_SANDBOX=unasked` against `off`). Runs alternate so that load on the
machine hits both alike. Prints both medians, their ratio and the added
milliseconds.

Target (issue #13): the sandbox adds no more than a few milliseconds per command.
For scale it also prints bwrap's own floor on this machine (the cheapest
bwrap around `ls`): mount-namespace work is the kernel's, and costs several
times more on a loaded VM than on an idle host.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import print_header, summary_ms, verdict
from runtime.tools.shell import classify, execute
from runtime.tools.shell.sandbox import SandboxConfig, probe

TARGET_ADDED_MS = 5.0
COMMAND = "ls -la"


async def _once(workspace: Path, config: SandboxConfig) -> float:
    started = time.perf_counter()
    result = await execute(COMMAND, classify(COMMAND), workspace=workspace, sandbox=config)
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"`{COMMAND}` failed: {result.error}\n{result.output}")
    expected = config.mode != "off"
    if result.metadata.get("sandboxed") is not expected:
        raise SystemExit(f"expected sandboxed={expected}, got {result.metadata}")
    return elapsed


async def _bench(runs: int) -> int:
    sandboxed, plain = SandboxConfig(mode="unasked"), SandboxConfig(mode="off")
    with tempfile.TemporaryDirectory(prefix="ducklm-bench-") as tmp:
        workspace = Path(tmp)
        for i in range(20):
            (workspace / f"file-{i}.txt").write_text("x" * i)
        for _ in range(5):  # warm up: imports, the probe, page cache
            await _once(workspace, sandboxed)
            await _once(workspace, plain)
        with_sandbox: list[float] = []
        without: list[float] = []
        for _ in range(runs):
            with_sandbox.append(await _once(workspace, sandboxed))
            without.append(await _once(workspace, plain))
        floor_bwrap, floor_plain = _floor(workspace, runs)
    med_s = statistics.median(with_sandbox) * 1000
    med_p = statistics.median(without) * 1000
    added = med_s - med_p
    print(f"   unsandboxed `{COMMAND}`: {summary_ms(without)}")
    print(f"   sandboxed   `{COMMAND}`: {summary_ms(with_sandbox)}")
    print(
        f"   median {med_s:.2f} ms vs {med_p:.2f} ms: ratio {med_s / med_p:.2f}x, "
        f"sandbox adds {added:.2f} ms per command "
        f"(target <= {TARGET_ADDED_MS:g} ms: {verdict(added <= TARGET_ADDED_MS)})"
    )
    print(
        f"   for scale, bwrap's own floor here (`bwrap --ro-bind / / ls`, no profile, plain "
        f"subprocess): {floor_bwrap:.2f} ms vs {floor_plain:.2f} ms bare, "
        f"+{floor_bwrap - floor_plain:.2f} ms"
    )
    return 0


def _floor(workspace: Path, runs: int) -> tuple[float, float]:
    """Medians (ms) of the cheapest possible bwrap around `ls` and of `ls` alone."""
    bwrap = probe().path or "bwrap"
    ls = ["ls", "-la", str(workspace)]
    wrapped, bare = [], []
    for _ in range(max(20, runs // 2)):
        for argv, into in (([bwrap, "--ro-bind", "/", "/", "--", *ls], wrapped), (ls, bare)):
            started = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
            into.append((time.perf_counter() - started) * 1000)
    return statistics.median(wrapped), statistics.median(bare)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="runs of each kind")
    args = parser.parse_args(argv)
    print_header("sandbox overhead: sandboxed vs unsandboxed `ls` through execute()")
    status = probe()
    if not status.available:
        print(f"   no sandbox here: {status.detail}", file=sys.stderr)
        return 1
    print(f"   {status.detail}, {args.runs} runs each, alternating")
    return asyncio.run(_bench(args.runs))


if __name__ == "__main__":
    sys.exit(main())
