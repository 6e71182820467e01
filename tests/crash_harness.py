"""Helpers for the crash-consistency tests (issue #15): a real `ducklm run`
subprocess, configured only by environment variables, serving Slack over HTTP
against `FakeSlack` and the fake model server; signed Slack requests; SIGKILL
(from outside, or from a crash point via `DUCKLM_CRASH_AT`); a restart on the
same database; and read-only looks at that database and at FakeSlack's record.

The fake model answers by what was asked, so any process (the first one or a
restarted one) plays the same script:

- a question containing `approve-N` plans `echo approve-N >> effects.log`, a
  write that needs an approval; once it has the command's observations it plans
  nothing more;
- `hang-N` makes the action model hang (the task is "running" until killed);
- anything else plans nothing.

The thinker always answers `Answer: <tag>.`, so a final answer is recognisable
in a thread. `effects.log` in the workspace is the evidence of what ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bot.slack.blocks import ACTION_APPROVE
from tests.conftest import ACTION, THINKER, directive, shell
from tests.fakes.openai_server import FakeModelServer, Hang, RecordedRequest, Reply, Text
from tests.fakes.slack_api import (
    BOT_TOKEN,
    BOT_USER,
    SIGNING_SECRET,
    TEAM,
    FakeSlack,
    SlackSender,
    block_actions_payload,
    event_callback,
)
from tests.test_cli_run import free_port
from tests.test_console import cli_env
from tests.test_faults import has_observations, question_of

CHANNEL = "CCRASH001"
ASKER = "UASKER001"
APPROVERS = ("UAPPROVE1", "UAPPROVE2")
ANSWER_PREFIX = "Answer:"
EFFECTS = "effects.log"

START_TIMEOUT = 40.0  # a loaded 2-core box starts `ducklm run` in a few seconds
STOP_TIMEOUT = 30.0


# -- the fake model's script -------------------------------------------------


class ModelScript:
    """The fake model's answers (see the module docstring). `hang` False makes
    `hang-N` answer like any question (a last run must be able to finish
    everything); `latency` (seconds, drawn per request) makes the model take time,
    so that kills land while tasks wait on it."""

    def __init__(
        self, model: FakeModelServer, *, latency: Callable[[], float] | None = None
    ) -> None:
        self.hang = True
        self.latency = latency
        model.set_handler(ACTION, self.action)
        model.set_handler(THINKER, self.thinker)

    async def _think(self) -> None:
        if self.latency is not None:
            await asyncio.sleep(self.latency())  # the model's own time, not a test wait

    async def action(self, request: RecordedRequest) -> Reply:
        await self._think()
        asked = question_of(request.body)
        if asked.startswith("hang-") and self.hang:
            return Hang(300)
        if asked.startswith("approve-") and not has_observations(request.body):
            return Text(directive(shell(f"echo {asked} >> {EFFECTS}", "record it")))
        return Text(directive())

    async def thinker(self, request: RecordedRequest) -> Reply:
        await self._think()
        return Text(f"{ANSWER_PREFIX} {question_of(request.body) or 'ok'}.")


# -- one `ducklm run` at a time over one database ----------------------------


class DuckRun:
    """`ducklm run` over HTTP on a fixed port, started again and again on the
    same database and workspace. Each run's stderr goes to its own file
    (`run-N.log`), so a pipe never fills and a failure can show every run."""

    def __init__(
        self, tmp_path: Path, slack: FakeSlack, model: FakeModelServer, **env: str
    ) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/slack/events"
        self.env = cli_env(
            tmp_path,
            SLACK_BOT_TOKEN=BOT_TOKEN,
            SLACK_SIGNING_SECRET=SIGNING_SECRET,
            DUCKLM_SLACK_MODE="http",
            DUCKLM_HTTP_HOST="127.0.0.1",
            DUCKLM_HTTP_PORT=str(self.port),
            DUCKLM_SLACK_API_URL=slack.api_url,
            DUCKLM_MODEL_BASE_URL=model.base_url,
            DUCKLM_MODEL_API_KEY="sk-test",
            DUCKLM_MODEL_MAX_RETRIES="0",
            DUCKLM_MODEL_TIMEOUT="300",
            DUCKLM_THINKER_MODEL=THINKER,
            DUCKLM_ACTION_MODEL=ACTION,
            DUCKLM_APPROVERS=",".join(f"slack:{a}" for a in APPROVERS),
        )
        self.env.update(env)
        self.process: asyncio.subprocess.Process | None = None
        self.logs: list[Path] = []

    @property
    def db(self) -> Path:
        return Path(self.env["DUCKLM_DB"])

    @property
    def workspace(self) -> Path:
        return Path(self.env["DUCKLM_WORKSPACE"])

    def effects(self) -> list[str]:
        """What the approved commands wrote, one line per run of one."""
        path = self.workspace / EFFECTS
        return path.read_text().splitlines() if path.exists() else []

    def stderr(self) -> str:
        """Every run's stderr so far, labelled, for assertion messages."""
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')}" for log in self.logs)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, crash_at: str | None = None, *, ready: bool = True) -> None:
        """Start a run (with `DUCKLM_CRASH_AT=crash_at` if given). With `ready`,
        return once it listens; a run that dies first fails the test."""
        assert not self.running, "the previous run is still alive"
        env = dict(self.env)
        env.pop("DUCKLM_CRASH_AT", None)
        if crash_at:
            env["DUCKLM_CRASH_AT"] = crash_at
        log = self.tmp_path / f"run-{len(self.logs) + 1}.log"
        self.logs.append(log)
        with log.open("wb") as err:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot.cli",
                "run",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.tmp_path,
                env=env,
            )
        if ready:
            assert await self.listening(), f"ducklm run exited early:\n{self.stderr()}"

    async def listening(self, within: float = START_TIMEOUT) -> bool:
        """Wait until the run accepts connections: True, or False if it died
        first (a crash point may be reached during start-up recovery)."""
        assert self.process is not None
        deadline = time.monotonic() + within
        while self.process.returncode is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"ducklm run did not listen within {within} s")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), 0.1)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            # The port also answers while the old run's socket is still closing;
            # only a live process counts.
            return self.process.returncode is None
        return False

    async def recovered(self, within: float = START_TIMEOUT) -> None:
        """Wait until this run's start-up recovery is over: `ducklm run` prints its
        schedule only after it (bot/server.py)."""
        log = self.logs[-1]
        deadline = time.monotonic() + within
        while "ducklm: schedule:" not in log.read_text(errors="replace"):
            assert self.running, f"ducklm run died while recovering:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"no recovery within {within} s:\n{self.stderr()}"
            with contextlib.suppress(TimeoutError):
                assert self.process is not None
                await asyncio.wait_for(self.process.wait(), 0.1)

    async def exited(self, within: float) -> int | None:
        """The run's return code once it exits within `within` s, else None."""
        assert self.process is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), within)
        return self.process.returncode

    async def crashed(self, point: str, within: float = 30.0) -> None:
        """Wait for the run to kill itself at its crash point (return code -9)."""
        code = await self.exited(within)
        if code is None:
            raise AssertionError(
                f"ducklm run did not die at crash point {point!r} within {within} s "
                f"(not reached, or DUCKLM_CRASH_AT not implemented):\n{self.stderr()}"
            )
        assert code == -signal.SIGKILL, f"exit {code}, not SIGKILL:\n{self.stderr()}"

    def _signal(self, sig: int) -> None:
        """os.kill, not Process.send_signal: that one polls (waitpid) first, which
        reaps a run that just died by itself (a crash point) behind asyncio's back,
        and asyncio then reports return code 255 instead of -9."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)

    def kill_now(self) -> None:
        """SIGKILL at once, from inside a callback (no waiting)."""
        if self.running:
            assert self.process is not None
            self._signal(signal.SIGKILL)

    async def kill(self) -> None:
        """SIGKILL from outside, as an operator's worst day would."""
        assert self.process is not None
        if self.process.returncode is None:
            self._signal(signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), 10)

    async def stop(self, *, quiet: bool = True) -> None:
        """A clean stop (SIGTERM): exit 0 and (with `quiet`) no traceback in any
        run's log (a test that makes Slack fail expects the logged failures)."""
        assert self.process is not None
        if self.process.returncode is None:
            self._signal(signal.SIGTERM)
        code = await self.exited(STOP_TIMEOUT)
        assert code == 0, f"ducklm run exited {code} on SIGTERM:\n{self.stderr()}"
        if quiet:
            assert "Traceback" not in self.stderr(), self.stderr()

    async def close(self) -> None:
        """For `finally`: whatever state the test left, nothing keeps running."""
        if self.running:
            await self.kill()

    # -- Slack's side of the wire ----------------------------------------------

    async def post_event(self, envelope: dict[str, Any], *, retry_num: int = 0) -> int | None:
        """Deliver an Events API request as Slack does: its HTTP status, or None
        when the connection broke (the process died before answering)."""
        try:
            # A fresh connection each time: a pooled one may belong to a dead run.
            async with SlackSender(self.url) as sender:
                return (await sender.event(envelope, retry_num=retry_num or None)).status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def post_interaction(self, payload: dict[str, Any]) -> int | None:
        try:
            async with SlackSender(self.url) as sender:
                return (await sender.interaction(payload)).status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None


# -- building what Slack sends ---------------------------------------------------


@dataclass
class Mention:
    """One person's @-mention of the bot: the message in FakeSlack's history and
    the two deliveries Slack makes of it (app_mention and message.channels)."""

    ts: str
    text: str
    envelope: dict[str, Any]  # the app_mention event_callback (one event_id)
    copy: dict[str, Any]  # the same message as a `message` event (another event_id)

    @property
    def conversation(self) -> str:
        """The conversation key its task is stored under."""
        return f"slack:{CHANNEL}|{self.ts}"


def mention(slack: FakeSlack, text: str, *, user: str = ASKER) -> Mention:
    message = slack.add_message(CHANNEL, f"<@{BOT_USER}> {text}", user=user)
    event = {
        "type": "app_mention",
        "client_msg_id": str(uuid.uuid4()),
        "user": user,
        "text": message["text"],
        "ts": message["ts"],
        "team": TEAM,
        "channel": CHANNEL,
        "event_ts": message["ts"],
    }
    copy = {
        **event,
        "type": "message",
        "channel_type": "channel",
        "user_team": TEAM,
        "source_team": TEAM,
    }
    return Mention(message["ts"], text, event_callback(event), event_callback(copy))


def thread_reply(slack: FakeSlack, thread_ts: str, text: str, *, user: str) -> dict[str, Any]:
    """A person's reply in a thread (`approve`, `deny …`), as the `message` event
    Slack sends for it; the message goes into FakeSlack's history too."""
    message = slack.add_message(CHANNEL, text, user=user, thread_ts=thread_ts)
    return event_callback(
        {
            "type": "message",
            "client_msg_id": str(uuid.uuid4()),
            "channel": CHANNEL,
            "channel_type": "channel",
            "user": user,
            "user_team": TEAM,
            "text": text,
            "ts": message["ts"],
            "thread_ts": thread_ts,
            "event_ts": message["ts"],
            "team": TEAM,
        }
    )


def click(
    slack: FakeSlack, card: Card, *, user: str = APPROVERS[0], action_id: str = ACTION_APPROVE
) -> dict[str, Any]:
    """A button click on a card, as Slack posts it."""
    return block_actions_payload(
        user=user,
        action_id=action_id,
        value=card.approval_id,
        channel=CHANNEL,
        message_ts=card.ts,
        thread_ts=card.thread_ts,
        response_url=slack.webhook_url(),
    )


# -- reading FakeSlack's record ----------------------------------------------


@dataclass(frozen=True)
class Card:
    """An approval card the bot posted (found by its chat.postMessage call)."""

    ts: str
    thread_ts: str | None
    approval_id: str


def buttons(blocks: Any) -> list[dict[str, Any]]:
    """The buttons of a message's blocks (a resolved card has none)."""
    found: list[dict[str, Any]] = []
    for block in blocks or []:
        if isinstance(block, dict) and block.get("type") == "actions":
            found += [e for e in block.get("elements") or [] if e.get("type") == "button"]
    return found


def cards(slack: FakeSlack, thread_ts: str | None = None) -> list[Card]:
    """Every approval card posted (in one thread), oldest first."""
    found = []
    for call in slack.calls_to("chat.postMessage"):
        if not call.result.get("ok"):
            continue
        approve = [
            b for b in buttons(call.params.get("blocks")) if b["action_id"] == ACTION_APPROVE
        ]
        if not approve:
            continue
        thread = call.params.get("thread_ts")
        thread = str(thread) if thread else None
        if thread_ts is not None and thread != thread_ts:
            continue
        found.append(Card(str(call.result["ts"]), thread, str(approve[0]["value"])))
    return found


def card_buttons_now(slack: FakeSlack, card: Card) -> list[dict[str, Any]]:
    """The buttons the card shows now (after every chat.update)."""
    message = slack.message(CHANNEL, card.ts)
    assert message is not None, f"card {card} was deleted"
    return buttons(message.get("blocks"))


def thread_texts(slack: FakeSlack, thread_ts: str) -> list[str]:
    """What the bot said in a thread (cards and status messages included), in order."""
    return [m["text"] for m in slack.posted(CHANNEL) if m.get("thread_ts") == thread_ts]


def answers(slack: FakeSlack, thread_ts: str) -> list[str]:
    """The final answers (the thinker's `Answer: …`) in a thread."""
    return [t for t in thread_texts(slack, thread_ts) if t.startswith(ANSWER_PREFIX)]


def said(slack: FakeSlack, thread_ts: str, *words: str) -> list[str]:
    """The bot's messages in the thread that contain every one of `words` (any case)."""
    return [t for t in thread_texts(slack, thread_ts) if all(w.lower() in t.lower() for w in words)]


async def wait_for(
    slack: FakeSlack, predicate: Callable[[], Any], what: str, within: float = 30.0
) -> Any:
    """Bounded wait for a state (Slack's record or the database); FakeSlack's
    wait re-checks on every Web API call and at least every 0.2 s."""
    return await slack.wait_for(predicate, within=within, what=what)


# -- reading the database (read-only, beside the running process) -------------


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read-only query; an empty list while the file does not exist yet."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []  # the first run is still creating its schema
        raise
    finally:
        conn.close()


def tasks_of(db: Path, conversation: str) -> list[tuple[str, str]]:
    """(task_id, status) of the tasks in one conversation, oldest first."""
    return [
        (t, s)
        for t, s in rows(
            db,
            "SELECT task_id, status FROM tasks WHERE conversation = ? ORDER BY created_at",
            (conversation,),
        )
    ]


def status_of(db: Path, conversation: str) -> str | None:
    found = tasks_of(db, conversation)
    return found[-1][1] if found else None


def events_of(db: Path, task_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(seq, event_type, payload) of a task's events, in order."""
    return [
        (seq, kind, json.loads(payload))
        for seq, kind, payload in rows(
            db,
            "SELECT seq, event_type, payload FROM events WHERE task_id = ? ORDER BY seq",
            (task_id,),
        )
    ]


def approvals_of(db: Path, task_id: str) -> list[dict[str, Any]]:
    """A task's approvals as dicts of their columns, oldest first."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute(
            "SELECT * FROM approvals WHERE task_id = ? ORDER BY created_at, rowid", (task_id,)
        ).fetchall()
    finally:
        conn.close()
    return [dict(row) for row in found]


def snapshot(bot: DuckRun, slack: FakeSlack) -> dict[str, Any]:
    """What a restart with nothing owed must leave as it is."""
    return {
        "posted": len(slack.calls_to("chat.postMessage")),
        "updated": len(slack.calls_to("chat.update")),
        "tasks": rows(bot.db, "SELECT task_id, status FROM tasks ORDER BY task_id"),
        "events": rows(bot.db, "SELECT COUNT(*) FROM events WHERE task_id IS NOT NULL"),
        "approvals": rows(
            bot.db,
            "SELECT approval_id, decision, executed_at, card_state, card_ref FROM approvals "
            "ORDER BY approval_id",
        ),
        "inbox": rows(bot.db, "SELECT inbox_id, done_at FROM inbox ORDER BY inbox_id"),
        "effects": bot.effects(),
    }


async def assert_restart_changes_nothing(bot: DuckRun, slack: FakeSlack) -> None:
    """Recovery is idempotent: one more start (and clean stop) after everything
    owed was done posts nothing, updates nothing, runs nothing, writes nothing."""
    before = snapshot(bot, slack)
    await bot.start()
    await bot.recovered()
    await bot.stop()
    assert snapshot(bot, slack) == before, bot.stderr()
