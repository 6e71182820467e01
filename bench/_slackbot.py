"""A real `ducklm run` in a subprocess, wired to a local fake Slack, an instant
model and (optionally) a real Synapse, plus the bare bolt baseline; used by
bench.slack_ack, bench.click_to_action and bench.memory.

The fake Slack Web API and the model run in threads of the benchmark process
(each on its own event loop); the load generator is the benchmark's main loop;
`ducklm run` and the bare app are separate processes, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from bench._common import (
    ACTION_MODEL,
    NO_FLOOD_LIMITS,
    ROOT,
    THINKER_MODEL,
    Decide,
    InstantModelServer,
    bench_env,
    free_port,
)

T = TypeVar("T")

CHANNEL = "CBENCH001"
ASKER = "UASKER001"
APPROVER = "UAPPROVER"
START_TIMEOUT = 60.0


class LoopThread:
    """An event loop in a daemon thread, for servers the benchmark drives."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class SlackHarness:
    """Starts what a benchmark asks for; `close()` stops everything it started."""

    def __init__(self, decide: Decide, *, model_delay: float = 0.0) -> None:
        from tests.fakes.slack_api import FakeSlack

        self.tmp = Path(tempfile.mkdtemp(prefix="ducklm-bench-slack-"))
        self.workspace = self.tmp / "workspace"
        self.workspace.mkdir()
        self.db = self.tmp / "ducklm.db"
        self.slack_thread = LoopThread("fake-slack")

        async def make() -> Any:
            fake = FakeSlack()
            await fake.start()
            return fake

        self.slack = self.slack_thread.call(make())
        self.model = InstantModelServer(decide, delay=model_delay).start()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.synapse: Any = None
        self.bot_port = 0
        self.bare_port = 0
        self.bot: subprocess.Popen[bytes] | None = None
        self.bare: subprocess.Popen[bytes] | None = None

    # -- processes -----------------------------------------------------------

    def start_synapse(self) -> dict[str, str]:
        """A real homeserver and a bot account; returns the MATRIX_* settings."""
        from tests.fakes.synapse import SynapseServer

        self.synapse = SynapseServer(self.tmp / "synapse")
        self.synapse.start()
        user = self.synapse.register("duckbot", "duckbot-password")
        return {
            "MATRIX_HOMESERVER": self.synapse.base_url,
            "MATRIX_USER_ID": user,
            "MATRIX_PASSWORD": "duckbot-password",
        }

    def start_bot(
        self, extra: dict[str, str] | None = None, *, expect: tuple[str, ...] = ("slack",)
    ) -> None:
        from tests.fakes.slack_api import BOT_TOKEN, SIGNING_SECRET

        self.bot_port = free_port()
        env = bench_env(
            {
                "DUCKLM_DB": str(self.db),
                "DUCKLM_WORKSPACE": str(self.workspace),
                "DUCKLM_MODEL_BASE_URL": self.model.base_url,
                "DUCKLM_MODEL_API_KEY": "sk-bench",
                "DUCKLM_THINKER_MODEL": THINKER_MODEL,
                "DUCKLM_ACTION_MODEL": ACTION_MODEL,
                "DUCKLM_MODEL_MAX_RETRIES": "0",
                "SLACK_BOT_TOKEN": BOT_TOKEN,
                "SLACK_SIGNING_SECRET": SIGNING_SECRET,
                "DUCKLM_SLACK_MODE": "http",
                "DUCKLM_HTTP_HOST": "127.0.0.1",
                "DUCKLM_HTTP_PORT": str(self.bot_port),
                "DUCKLM_SLACK_API_URL": self.slack.api_url,
                "DUCKLM_APPROVERS": f"slack:{APPROVER}",
                "DUCKLM_ADMINS": f"slack:{APPROVER}",
                # One bench user sends hundreds of mentions: the flood limits would
                # turn most of them into refusals, and the bench would time those.
                **NO_FLOOD_LIMITS,
                **(extra or {}),
            }
        )
        log = (self.tmp / "ducklm.log").open("wb")
        self.bot = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "run"],
            cwd=self.tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.processes.append(self.bot)
        self._wait_for_log(
            self.tmp / "ducklm.log", [f"serving {name}" for name in expect], self.bot
        )

    def start_bare(self) -> None:
        self.bare_port = free_port()
        log = (self.tmp / "bare.log").open("wb")
        self.bare = subprocess.Popen(
            [sys.executable, "-m", "bench._bare_bolt", str(self.bare_port), self.slack.api_url],
            cwd=ROOT,
            env=bench_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.processes.append(self.bare)
        self._wait_for_log(self.tmp / "bare.log", ["ready"], self.bare)

    def _wait_for_log(self, path: Path, needles: list[str], proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = path.read_text(errors="replace") if path.exists() else ""
            if all(n in text for n in needles):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args} did not say {needles} within {START_TIMEOUT:g} s")
            time.sleep(0.05)

    def url(self, which: str) -> str:
        port = self.bot_port if which == "ducklm" else self.bare_port
        return f"http://127.0.0.1:{port}/slack/events"

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.synapse is not None:
            self.synapse.stop()
        self.model.stop()
        with contextlib.suppress(Exception):
            self.slack_thread.call(self.slack.stop(), 15)
        self.slack_thread.stop()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> SlackHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the database, read-only from outside ----------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import sqlite3

        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    async def wait_until(self, sql: str, at_least: int, within: float) -> int:
        deadline = time.monotonic() + within
        while True:
            count = self.query(sql)[0][0]
            if count >= at_least:
                return count
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {within:g} s for {at_least} of {sql!r}; got {count}")
            await asyncio.sleep(0.1)


# -- what Slack sends -----------------------------------------------------------

_ts = iter(range(1, 10**9))


def next_ts() -> str:
    return f"1700000000.{next(_ts):06d}"


def signed(body: str) -> dict[str, str]:
    from tests.fakes.slack_api import SIGNING_SECRET, sign

    return sign(SIGNING_SECRET, body)


def mention_body(text: str, *, user: str = ASKER) -> str:
    from tests.fakes.slack_api import BOT_USER, event_callback

    ts = next_ts()
    event = {
        "type": "app_mention",
        "user": user,
        "text": f"<@{BOT_USER}> {text}",
        "ts": ts,
        "channel": CHANNEL,
        "event_ts": ts,
    }
    return json.dumps(event_callback(event))


def click_body(action_id: str, approval_id: str, card_ts: str, *, user: str = APPROVER) -> str:
    from urllib.parse import urlencode

    from tests.fakes.slack_api import block_actions_payload

    payload = block_actions_payload(
        user=user,
        action_id=action_id,
        value=approval_id,
        channel=CHANNEL,
        message_ts=card_ts,
        thread_ts=card_ts,
    )
    return urlencode({"payload": json.dumps(payload)})


async def post(
    session: aiohttp.ClientSession, url: str, body: str, content_type: str
) -> tuple[float, float, int]:
    """Send one signed request; returns (wall-clock send time, seconds until the
    response was read, HTTP status)."""
    headers = {"Content-Type": content_type, **signed(body)}
    data = body.encode()
    sent_wall = time.time()
    started = time.perf_counter()
    async with session.post(url, data=data, headers=headers) as response:
        status = response.status
        await response.read()
    return sent_wall, time.perf_counter() - started, status


async def gather_bounded(coros: list[Awaitable[T]], within: float) -> list[T]:
    return await asyncio.wait_for(asyncio.gather(*coros), within)
