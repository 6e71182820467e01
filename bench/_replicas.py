"""Several `ducklm run` replicas on one throwaway PostgreSQL, behind the tests'
round-robin proxy; used by bench.replicas_throughput and bench.replicas_ack.

What runs where: PostgreSQL (tests/postgres.py) and each replica are processes
of their own, as in production; the fake Slack Web API, the model (a delay per
call, bench/_common.py) and the proxy (tests/replicas.py) each run on an event
loop in a thread of the benchmark process; the load generator is the main loop.
The proxy's backends can be narrowed (`use(1)`) so that "one replica" and
"three replicas" are measured through the same proxy, one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    ACTION_MODEL,
    NO_FLOOD_LIMITS,
    THINKER_MODEL,
    Decide,
    InstantModelServer,
    bench_env,
    free_port,
)
from bench._slackbot import APPROVER, LoopThread

START_TIMEOUT = 60.0


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc (0 if gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat: the
    difference of two readings says how busy every core was in between."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class Replicas:
    """PostgreSQL, fake Slack, the model, `count` replicas and the proxy; `close()`
    stops everything it started (also after a failure half-way)."""

    def __init__(
        self, decide: Decide, *, count: int, model_delay: float, env: dict[str, str]
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ducklm-bench-replicas-"))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []
        self.server: Any = None
        self.proxy: Any = None
        self.threads: list[LoopThread] = []
        self.model: InstantModelServer | None = None
        try:
            self._start(decide, count, model_delay, env)
        except BaseException:
            self.close()
            raise

    def _start(self, decide: Decide, count: int, model_delay: float, env: dict[str, str]) -> None:
        from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET, FakeSlack
        from tests.postgres import PostgresServer
        from tests.replicas import ReplicaProxy

        self.server = PostgresServer()
        self.server.start()
        self.url = self.server.url(self.server.create_database("bench"))
        self.version = self.server.admin_query("SHOW server_version")[0][0]

        slack_thread = LoopThread("fake-slack")
        self.threads.append(slack_thread)

        async def make_slack() -> FakeSlack:
            fake = FakeSlack()
            await fake.start()
            return fake

        self.slack = slack_thread.call(make_slack())
        self.model = InstantModelServer(decide, delay=model_delay).start()
        workspace = self.tmp / "workspace"
        workspace.mkdir()
        for i in range(count):
            port = free_port()
            directory = self.tmp / f"replica-{i}"
            directory.mkdir()
            child = bench_env(
                {
                    "DUCKLM_DB": self.url,
                    "DUCKLM_DATA_DIR": str(directory),
                    "DUCKLM_REPLICA_NAME": f"replica-{i}",
                    "DUCKLM_WORKSPACE": str(workspace),
                    "DUCKLM_MODEL_BASE_URL": self.model.base_url,
                    "DUCKLM_MODEL_API_KEY": "sk-bench",
                    "DUCKLM_THINKER_MODEL": THINKER_MODEL,
                    "DUCKLM_ACTION_MODEL": ACTION_MODEL,
                    "DUCKLM_MODEL_MAX_RETRIES": "0",
                    "SLACK_BOT_TOKEN": BOT_TOKEN,
                    "SLACK_SIGNING_SECRET": SIGNING_SECRET,
                    "DUCKLM_SLACK_MODE": "http",
                    "DUCKLM_HTTP_HOST": "127.0.0.1",
                    "DUCKLM_HTTP_PORT": str(port),
                    "DUCKLM_SLACK_API_URL": self.slack.api_url,
                    "DUCKLM_APPROVERS": f"slack:{APPROVER}",
                    **NO_FLOOD_LIMITS,
                    **env,
                }
            )
            log = directory / "ducklm.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "bot.cli", "run"],
                    cwd=directory,
                    env=child,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            self.processes.append(process)
            self.ports.append(port)
            self.logs.append(log)
            # One after the other: the first migrates the fresh database, and each
            # start-up recovery is over before the next replica starts.
            self._wait_for_log(log, "ducklm: schedule:", process)

        proxy_thread = LoopThread("proxy")
        self.threads.append(proxy_thread)
        self.proxy = ReplicaProxy(list(self.ports))
        proxy_thread.call(self.proxy.start())
        self._proxy_thread = proxy_thread

    def _wait_for_log(self, path: Path, needle: str, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = path.read_text(errors="replace") if path.exists() else ""
            if needle in text:
                return
            if process.poll() is not None:
                raise RuntimeError(f"ducklm run exited with {process.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ducklm run did not say {needle!r} within {START_TIMEOUT:g} s")
            time.sleep(0.05)

    @property
    def events_url(self) -> str:
        return str(self.proxy.url)

    def use(self, count: int) -> None:
        """Let the proxy forward to the first `count` replicas only."""
        self.proxy.ports = self.ports[:count]

    def replica_cpu(self) -> float:
        """CPU seconds (user + system) the replica processes have used so far."""
        return sum(_cpu_of(process.pid) for process in self.processes)

    def postgres_cpu(self) -> float:
        """CPU seconds of the PostgreSQL server: the postmaster and its children
        (the replicas' pooled connections live as long as the replicas)."""
        root = self.server.process.pid
        total = _cpu_of(root)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == root:  # ppid
                    total += _cpu_of(int(stat.parent.name))
        return total

    @staticmethod
    def own_cpu() -> float:
        """CPU seconds of this process: fake Slack, the model, the proxy, the load."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    async def count(self, sql: str) -> int:
        import asyncpg

        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    async def wait_until(self, sql: str, at_least: int, within: float) -> int:
        deadline = time.monotonic() + within
        while True:
            found = await self.count(sql)
            if found >= at_least:
                return found
            if not self.alive():
                raise RuntimeError("a replica died:\n" + self.log_tails())
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {within:g} s for {at_least} of {sql!r}; got {found}")
            await asyncio.sleep(0.05)

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {log.parent.name}\n{log.read_text(errors='replace')[-2000:]}" for log in self.logs
        )

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self.proxy is not None:
            try:
                self._proxy_thread.call(self.proxy.stop(), 15)
            except Exception:  # a bench that failed half-way: stop what is left
                pass
        if self.model is not None:
            self.model.stop()
        if self.threads and getattr(self, "slack", None) is not None:
            try:
                self.threads[0].call(self.slack.stop(), 15)
            except Exception:
                pass
        for thread in self.threads:
            thread.stop()
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
