"""Helpers shared by the benchmarks: the machine, timing, a minimal model server.

Every benchmark measures ours and a baseline in the same run on the same
machine and prints the ratio; absolute numbers are printed for context only.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ACTION_MODEL = "bench-action"
THINKER_MODEL = "bench-thinker"


# -- the machine -----------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "os": f"{platform.system()} {platform.release()}",
    }


def print_header(title: str) -> None:
    info = machine()
    print(f"== {title}")
    print(
        f"   machine: {info['nproc']} cores, {info['cpu']}, {info['ram']} RAM, "
        f"Python {info['python']}, SQLite {info['sqlite']}, {info['os']}"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"   load average at start: {load[0]:.2f}")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# -- statistics ------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(values: Sequence[float]) -> str:
    """p50/p99/max of durations given in seconds, printed in ms."""
    return (
        f"p50 {percentile(values, 50) * 1000:7.2f} ms  p99 {percentile(values, 99) * 1000:7.2f} ms"
        f"  max {max(values) * 1000:7.2f} ms  mean {statistics.fmean(values) * 1000:7.2f} ms"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one) in KiB, from /proc."""
    path = Path(f"/proc/{pid or 'self'}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in {path}")


# -- a minimal OpenAI-compatible server ------------------------------------

Decide = Callable[[dict[str, Any]], str]


def completion(model: str, content: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
    ).encode()


def scripted_answer(tool_action: dict[str, Any] | None) -> Decide:
    """An instant model: the action role proposes `tool_action` once (none when
    the conversation already carries tool observations), the thinker answers."""
    none = json.dumps({"actions": []})
    one = json.dumps({"actions": [tool_action]}) if tool_action else none

    def decide(body: dict[str, Any]) -> str:
        if body.get("model") == THINKER_MODEL:
            return "All good: nothing to worry about."
        messages = body.get("messages") or []
        last = messages[-1].get("content", "") if messages else ""
        if isinstance(last, str) and last.startswith("tool_observations:"):
            return none
        return one

    return decide


class _Protocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, Content-Length bodies only: just what httpx sends."""

    def __init__(self, decide: Decide, counter: list[int], delay: float = 0.0) -> None:
        self.decide = decide
        self.counter = counter
        self.delay = delay
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            length = 0
            for line in self.buffer[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            self.counter[0] += 1
            try:
                request = json.loads(body)
                reply = completion(str(request.get("model")), self.decide(request))
                status = b"200 OK"
            except Exception as exc:  # a bench bug: answer 500 so the client says so
                reply = json.dumps({"error": {"message": repr(exc)}}).encode()
                status = b"500 Internal Server Error"
            assert self.transport is not None
            message = (
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(reply)).encode() + b"\r\n\r\n" + reply
            )
            if self.delay > 0:  # a model that thinks: the answer comes later
                asyncio.get_running_loop().call_later(self.delay, self._write, message)
            else:
                self.transport.write(message)

    def _write(self, message: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(message)


class InstantModelServer:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers at once, on its own
    event loop in a daemon thread of this process (so it shares the cores and
    the GIL with the code under test, like a model server on the same box)."""

    def __init__(self, decide: Decide, *, delay: float = 0.0) -> None:
        self.decide = decide
        self.delay = delay
        self.requests = [0]
        self.base_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> InstantModelServer:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                self._server = await loop.create_server(
                    lambda: _Protocol(self.decide, self.requests, self.delay), "127.0.0.1", 0
                )
                port = self._server.sockets[0].getsockname()[1]
                self.base_url = f"http://127.0.0.1:{port}/v1"

            loop.run_until_complete(serve())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="instant-model", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the instant model server did not start within 10 s")
        self._loop = loop
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> InstantModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def settings_for(tmp: Path, base_url: str | None, **overrides: Any) -> Any:
    """The tests' explicit-values Settings, with the bench's model names, no retries
    (a benchmark must not hide a failing call) and a longer model timeout."""
    from tests.conftest import make_settings

    values: dict[str, Any] = {
        "thinker_model": THINKER_MODEL,
        "action_model": ACTION_MODEL,
        "model_max_retries": 0,
        "model_timeout": 30,
        # A bench sends many requests from one user; the flood limits would refuse most.
        "user_max_tasks": 0,
        "channel_max_tasks": 0,
        "user_rate": None,
        "channel_rate": None,
        **overrides,
    }
    return make_settings(tmp, base_url, **values)


# The environment form of the same: no per-user or per-channel flood limits.
NO_FLOOD_LIMITS = {
    "DUCKLM_USER_MAX_TASKS": "0",
    "DUCKLM_CHANNEL_MAX_TASKS": "0",
    "DUCKLM_USER_RATE": "off",
    "DUCKLM_CHANNEL_RATE": "off",
}


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ours without DUCKLM_/SLACK_/MATRIX_ keys."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DUCKLM_", "SLACK_", "MATRIX_", "OPENAI_"))
    }
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def python() -> str:
    return sys.executable


def now() -> float:
    return time.perf_counter()
