"""DuckLM's own time per task next to the model's, for both action protocols.

A task here is what a chat question costs: plan (one read_file call), plan
again (no more tools), answer. The model is the tests' OpenAI-compatible fake
server (real HTTP on 127.0.0.1, OpenAI's reply shapes, `tool_calls` for the
tools protocol), answering each call after `--model-ms` milliseconds, like a
fast hosted model; real models take longer, so this is an upper bound of the
share.

For each task: `model` is the model calls as the client timed them (HTTP
included: the provider's time as the user sees it), `duckLM` is the rest of
the task's wall time (store writes, prompts, parsing, the tool, approvals
checks). The ratio duckLM / model is printed per protocol; it should be a
rounding error.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import ACTION_MODEL, THINKER_MODEL, print_header, settings_for
from tests.conftest import directive
from tests.fakes.openai_server import FakeModelServer, RecordedRequest, Reply, Text, ToolCalls

NO_ACTIONS = directive()
READ = {"tool": "read_file", "args": {"path": "notes.txt"}, "reason": "read the notes"}


def answer(delay: float) -> Any:
    """The model: one read_file call, then no more tools; the thinker answers."""

    async def decide(request: RecordedRequest) -> Reply:
        await asyncio.sleep(delay)
        if request.model == THINKER_MODEL:
            return Text("web-1 is fine: load 0.3, disk 41%.")
        messages = request.body.get("messages") or []
        if request.body.get("tools"):
            if any(m.get("role") == "tool" for m in messages):
                return Text(NO_ACTIONS)
            return ToolCalls([("read_file", {"path": "notes.txt", "reason": "read the notes"})])
        last = messages[-1].get("content", "") if messages else ""
        if isinstance(last, str) and last.startswith("tool_observations:"):
            return Text(NO_ACTIONS)
        return Text(directive(READ))

    return decide


async def scenario(protocol: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from runtime.factory import build_runtime

    server = FakeModelServer()
    await server.start()
    handler = answer(args.model_ms / 1000)
    server.set_handler(ACTION_MODEL, handler)
    server.set_handler(THINKER_MODEL, handler)
    settings = settings_for(tmp / protocol, server.base_url, action_protocol=protocol)
    (settings.workspace / "notes.txt").write_text("web-1: load 0.3, disk 41%\n")
    rt = await build_runtime(settings)
    walls: list[float] = []
    models: list[float] = []
    calls = 0
    try:
        for i in range(args.warmup + args.tasks):
            started = time.perf_counter()
            result = await rt.loop.run_chat(f"is web-1 ok? ({i})", str(settings.workspace))
            wall = time.perf_counter() - started
            if result.status != "completed":
                raise SystemExit(
                    f"{protocol}: task {i} ended {result.status}: {result.final_response}"
                )
            events = await rt.stores.events.list_events(result.task_id)
            finished = [e.payload for e in events if e.event_type == "model_call_finished"]
            directives = [e.payload for e in events if e.event_type == "action_directive"]
            if i < args.warmup:
                continue
            if directives[0]["protocol"] != protocol:
                raise SystemExit(f"{protocol}: the plan came by {directives[0]['protocol']}")
            walls.append(wall)
            models.append(sum(p["latency_ms"] for p in finished) / 1000)
            calls += len(finished)
    finally:
        await rt.close()
        await server.stop()
    overhead = [w - m for w, m in zip(walls, models, strict=True)]
    return {
        "wall": statistics.median(walls),
        "model": statistics.median(models),
        "overhead": statistics.median(overhead),
        "overhead_p90": sorted(overhead)[int(0.9 * (len(overhead) - 1))],
        "calls": calls / len(walls),
    }


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(
        f"{'protocol':<11}{'calls':>6}{'task ms':>10}{'model ms':>10}{'duckLM ms':>11}"
        f"{'p90':>8}{'duckLM/model':>14}"
    )
    for name, r in results.items():
        share = r["overhead"] / r["model"] if r["model"] else float("inf")
        print(
            f"{name:<11}{r['calls']:>6.0f}{r['wall'] * 1000:>10.1f}{r['model'] * 1000:>10.1f}"
            f"{r['overhead'] * 1000:>11.2f}{r['overhead_p90'] * 1000:>8.2f}{share:>13.1%}"
        )
    print(
        f"\n(medians over {args.tasks} tasks; the model answers each call after "
        f"{args.model_ms:g} ms, so a task's model time is at least {3 * args.model_ms:g} ms)"
    )


async def amain(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ducklm-bench-") as tmp:
        for protocol in ("directive", "tools"):
            results[protocol] = await scenario(protocol, args, Path(tmp))
    report(results, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model-ms", type=float, default=50.0, help="model time per call")
    args = parser.parse_args()
    print_header("model overhead: DuckLM's time per task next to the model's")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
