"""Fault suite (issue #7): a killed bot, a broken model server, a database that
cannot be written.

Everything here is real: a bot subprocess killed with SIGKILL, the httpx model
client against a local server that misbehaves on purpose, SQLite on a file
that is immutable or on a filesystem that is full. Hostile input lives in
tests/test_faults_hostile.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.backend import ApprovalCard, CardResolution, ChatBackend, Thread
from bot.service import ChatService
from runtime.factory import Runtime, build_runtime
from runtime.store import Database, StoreError
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import Drop, Error, FakeModelServer, Hang, Raw, RecordedRequest, Text

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


# -- helpers ---------------------------------------------------------------


def question_of(body: dict[str, Any]) -> str:
    """The `hang-N` / `approve-N` / free text the user asked, from a model request."""
    text = "\n".join(
        m.get("content") or ""
        for m in body.get("messages") or []
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    )
    found = re.search(r"\b(hang|approve)-\d+\b", text)
    return found.group(0) if found else ""


def has_observations(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    last = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else ""
    return isinstance(last, str) and last.startswith("tool_observations:")


def assert_clear_failure(result: Any, *expected: str) -> None:
    assert result.status == "failed", result
    text = result.final_response
    assert text and len(text) < 1000, text
    for marker in ("Traceback", 'File "'):
        assert marker not in text, text
    for part in expected:
        assert part in text, text


def db_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def assert_consistent(path: Path) -> None:
    """The store a restart finds: intact, no task left running, every task's events
    numbered 1..n from task_created, no event of an unknown task."""
    assert db_rows(path, "PRAGMA integrity_check") == [("ok",)]
    assert db_rows(path, "PRAGMA foreign_key_check") == []
    running = db_rows(path, "SELECT task_id FROM tasks WHERE status = 'running'")
    assert running == [], running
    for (task_id,) in db_rows(path, "SELECT task_id FROM tasks"):
        seqs = db_rows(
            path, "SELECT seq, event_type FROM events WHERE task_id = ? ORDER BY seq", (task_id,)
        )
        assert [s for s, _ in seqs] == list(range(1, len(seqs) + 1)), (task_id, seqs)
        if seqs:
            assert seqs[0][1] == "task_created", (task_id, seqs)
    orphans = db_rows(
        path,
        "SELECT COUNT(*) FROM events WHERE task_id IS NOT NULL "
        "AND task_id NOT IN (SELECT task_id FROM tasks)",
    )
    assert orphans == [(0,)]


@pytest_asyncio.fixture
async def rt_factory(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> AsyncIterator[Any]:
    """Build runtimes on tmp_path with overrides; all are closed after the test."""
    built: list[Runtime] = []

    async def make(**overrides: Any) -> Runtime:
        rt = await build_runtime(make_settings(tmp_path, model_server.base_url, **overrides))
        built.append(rt)
        return rt

    try:
        yield make
    finally:
        for rt in built:
            await rt.close()


async def normal_task_completes(rt: Runtime, server: FakeModelServer) -> None:
    server.reply(ACTION, Text(directive()))
    server.reply(THINKER, Text("all fine"))
    result = await rt.loop.run_chat("and now a normal question", str(rt.settings.workspace))
    assert result.status == "completed", result
    assert result.final_response == "all fine"


class RecordingBackend(ChatBackend):
    """A chat platform that keeps what the bot says, per thread key."""

    platform = "test"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.cards: list[ApprovalCard] = []
        self.card_threads: list[str] = []
        self.told: list[tuple[str, str]] = []

    async def send(self, thread: Thread, text: str) -> str | None:
        self.sent.append((thread.key, text))
        return f"m{len(self.sent)}"

    async def send_card(self, thread: Thread, card: ApprovalCard) -> str:
        self.cards.append(card)
        self.card_threads.append(thread.key)
        return f"card-{card.approval_id}"

    async def resolve_card(
        self, thread: Thread, card_ref: str, card: ApprovalCard, resolution: CardResolution
    ) -> None:
        pass

    async def tell(self, thread: Thread, user: str, text: str) -> None:
        self.told.append((user, text))

    async def working(self, thread: Thread, status: str | None) -> None:
        pass


# -- kill -9 ---------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from runtime.factory import build_runtime
    from runtime.settings import Settings

    def say(**fields):
        sys.stdout.write(json.dumps(fields) + "\\n")
        sys.stdout.flush()

    async def main(db, workspace, base_url):
        settings = Settings(
            _env_file=None, db=db, workspace=workspace, model_base_url=base_url,
            model_api_key="sk-test", thinker_model="%(thinker)s", action_model="%(action)s",
            model_timeout=300, model_max_retries=0,
        )
        rt = await build_runtime(settings)
        # Printed once the append returned, i.e. once the event is committed.
        rt.loop.add_listener(lambda e: say(event=[e.task_id, e.seq, e.event_type]))
        for i in range(5):
            r = await rt.loop.run_chat(
                f"please run approve-{i}", str(workspace),
                conversation=f"test:C1|{i}", requested_by="test:alice",
            )
            say(waiting=[r.task_id, r.pending_approval.approval_id], status=r.status)
        running = [
            asyncio.ensure_future(rt.loop.run_chat(
                f"what about hang-{i}", str(workspace), conversation=f"test:C2|{i}"))
            for i in range(20)
        ]
        say(started=len(running))
        await asyncio.sleep(3600)

    asyncio.run(main(*sys.argv[1:4]))
    """
) % {"thinker": THINKER, "action": ACTION}


async def read_lines(
    stream: asyncio.StreamReader, into: list[dict[str, Any]], until: Any, within: float
) -> None:
    async def pump() -> None:
        while not until():
            line = await stream.readline()
            if not line:
                raise AssertionError(f"the bot exited early; it said: {into}")
            into.append(json.loads(line))

    await asyncio.wait_for(pump(), within)


async def test_kill_9_with_running_tasks_and_waiting_approvals(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    effects = tmp_path / "workspace" / "effects.log"
    all_hanging = asyncio.Event()
    hanging: set[str] = set()

    def action(request: RecordedRequest) -> Any:
        asked = question_of(request.body)
        if asked.startswith("hang-"):
            hanging.add(asked)
            if len(hanging) == 20:
                all_hanging.set()
            return Hang(300)  # the 20 running tasks wait here when the bot dies
        if asked.startswith("approve-") and not has_observations(request.body):
            return Text(directive(shell(f"echo {asked} >> effects.log", "record it")))
        return Text(directive())

    model_server.set_handler(ACTION, action)
    model_server.set_default(THINKER, Text("done"))
    settings = make_settings(tmp_path, model_server.base_url)
    script = tmp_path / "bot.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(settings.db),
        str(settings.workspace),
        model_server.base_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    said: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        await read_lines(proc.stdout, said, lambda: any("started" in s for s in said), 60)

        await asyncio.wait_for(all_hanging.wait(), 30)
        # Every event the 20 tasks write before their model call is out.
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        rest = await asyncio.wait_for(proc.stdout.read(), 10)
        said += [json.loads(line) for line in rest.splitlines() if line.strip()]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    waiting = [tuple(s["waiting"]) for s in said if "waiting" in s]
    assert len(waiting) == 5 and all(
        s["status"] == "waiting_for_approval" for s in said if "waiting" in s
    )
    written = {tuple(s["event"]) for s in said if "event" in s}
    assert not effects.exists(), "an action ran before anyone approved it"

    # Every event the bot had written before the kill is in the file.
    stored = set(db_rows(settings.db, "SELECT task_id, seq, event_type FROM events"))
    assert written <= stored, written - stored

    rt = await build_runtime(settings)
    try:
        interrupted = await rt.stores.tasks.mark_interrupted()  # what `ducklm run` does at start
        hang_tasks = {
            t
            for (t,) in db_rows(
                settings.db, "SELECT task_id FROM tasks WHERE message LIKE 'what about hang-%'"
            )
        }
        assert len(hang_tasks) == 20
        assert {t.task_id for t in interrupted} == hang_tasks
        for task_id in hang_tasks:
            task = await rt.stores.tasks.get_task(task_id)
            assert task is not None and task.status == "interrupted"
        assert await rt.stores.tasks.mark_interrupted() == []  # a second start finds nothing

        # Every waiting approval still works after the restart, and runs once.
        for task_id, approval_id in waiting:
            task = await rt.stores.tasks.get_task(task_id)
            assert task is not None and task.status == "waiting_for_approval"
            outcome = await rt.approvals.decide(approval_id, "approve", "test:bob")
            assert outcome.taken
            result = await rt.loop.continue_after_approval(task_id, approval_id)
            assert result.status == "completed", result
            again = await rt.approvals.decide(approval_id, "approve", "test:carol")
            assert not again.taken
            repeat = await rt.loop.continue_after_approval(task_id, approval_id)
            assert repeat.already_handled or repeat.status == "completed"
    finally:
        await rt.close()

    lines = effects.read_text().splitlines()
    assert sorted(lines) == [f"approve-{i}" for i in range(5)], lines
    ran = db_rows(
        settings.db,
        "SELECT COUNT(*) FROM events WHERE event_type = 'command_audit' "
        "AND json_extract(payload, '$.ok') = 1",
    )
    assert ran == [(5,)]
    assert_consistent(settings.db)


# -- the model server misbehaves ------------------------------------------

GARBAGE = bytes(range(256)) * 4096  # 1 MiB of every byte value


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        pytest.param([Drop(), Drop()], ("dropped the connection",), id="drops"),
        pytest.param([Error(500, "boom"), Error(500, "boom")], ("HTTP 500",), id="500s"),
        pytest.param(
            [Error(503, body="<html>" + "x" * (1 << 20) + "</html>")] * 2,
            ("HTTP 503",),
            id="1MB-error-page",
        ),
        pytest.param([Raw(GARBAGE)], ("not a chat completion",), id="1MB-garbage"),
        pytest.param(
            [Raw(GARBAGE, content_type="text/html")], ("not a chat completion",), id="1MB-html"
        ),
        pytest.param([Raw(b"[" * 200_000)], ("not a chat completion",), id="json-bomb"),
        pytest.param(
            [Raw(b'{"choices": [{"message": {"content": ' + b"1" * (1 << 20) + b"}}]}")],
            (),
            id="1MB-number",
        ),
        pytest.param(
            [Raw(b"data: " + b"x" * (1 << 20) + b"\n\n", content_type="text/event-stream")],
            ("not a chat completion",),
            id="1MB-stream-garbage",
        ),
    ],
)
async def test_model_failures_fail_the_task_clearly_and_the_bot_keeps_serving(
    rt_factory: Any, model_server: FakeModelServer, replies: list[Any], expected: tuple[str, ...]
) -> None:
    rt = await rt_factory(model_max_retries=1)
    model_server.reply(ACTION, *replies)
    result = await rt.loop.run_chat("is web-1 up?", str(rt.settings.workspace))
    if expected:
        assert_clear_failure(result, *expected)
    else:  # a number where text belongs: either a clear failure or a harmless answer
        assert result.status in ("failed", "completed"), result
        if result.status == "failed":
            assert_clear_failure(result)
    task = await rt.stores.tasks.get_task(result.task_id)
    assert task is not None and task.status == result.status
    await normal_task_completes(rt, model_server)
    assert_consistent(Path(rt.settings.db))


async def test_model_hanging_past_the_timeout_fails_clearly(
    rt_factory: Any, model_server: FakeModelServer
) -> None:
    rt = await rt_factory(model_timeout=0.5, model_max_retries=0)
    model_server.reply(ACTION, Hang(30))
    result = await asyncio.wait_for(
        rt.loop.run_chat("is web-1 up?", str(rt.settings.workspace)), 15
    )
    assert_clear_failure(result, "did not answer within 0.5 s")
    await normal_task_completes(rt, model_server)


@pytest.mark.parametrize(
    "fault",
    [Drop(), Error(500, "boom"), Error(429, "slow down", headers={"Retry-After": "0"})],
    ids=["drop", "500", "429"],
)
async def test_one_model_failure_is_retried(
    rt_factory: Any, model_server: FakeModelServer, fault: Any
) -> None:
    rt = await rt_factory(model_max_retries=1)
    model_server.reply(ACTION, fault, Text(directive()))
    model_server.reply(THINKER, fault, Text("recovered"))
    result = await rt.loop.run_chat("is web-1 up?", str(rt.settings.workspace))
    assert result.status == "completed", result
    assert result.final_response == "recovered"


async def test_garbage_directive_is_logged_and_the_task_still_answers(
    rt_factory: Any, model_server: FakeModelServer
) -> None:
    rt = await rt_factory()
    noise = "".join(chr(c) for c in range(32, 0x3000, 7)) * 200  # ~1 MB of odd text
    # Every action request gets the noise: the first, and its repair round (issue 17).
    model_server.set_default(ACTION, Text(noise))
    model_server.reply(THINKER, Text("could not plan, answering directly"))
    result = await rt.loop.run_chat("is web-1 up?", str(rt.settings.workspace))
    assert result.status == "completed", result
    events = await rt.stores.events.list_events(result.task_id)
    failed = [e for e in events if e.event_type == "action_directive_failed"]
    assert failed and len(failed[0].payload["content"]) <= 2000
    assert not any(e.event_type == "tool_call_started" for e in events)


# -- the database cannot be written ----------------------------------------


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """Make files (or directories) unwritable even for root: `chattr +i`, else chmod
    when we are not root. Skips the test when neither is possible here."""
    done: list[Path] = []
    try:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None:
                pytest.skip("running as root without chattr: cannot make a file read-only")
            for path in paths:
                proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, timeout=10)
                if proc.returncode != 0:
                    pytest.skip(f"chattr +i does not work here: {proc.stderr.decode().strip()}")
                done.append(path)
        else:
            for path in paths:
                path.chmod(0o555 if path.is_dir() else 0o444)
                done.append(path)
        yield
    finally:
        for path in done:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(path)], capture_output=True, timeout=10)
            else:
                path.chmod(0o755 if path.is_dir() else 0o644)


async def attempt(rt: Runtime, text: str) -> Any:
    """A task's outcome: its ChatResult, or the StoreError it raised."""
    try:
        return await rt.loop.run_chat(text, str(rt.settings.workspace))
    except StoreError as exc:
        return exc


def assert_final_events(path: Path) -> None:
    """No half-written task: a finished status always comes with its audit event."""
    for status, event in (("completed", "task_completed"), ("failed", "task_failed")):
        missing = db_rows(
            path,
            "SELECT task_id FROM tasks WHERE status = ? AND task_id NOT IN "
            "(SELECT task_id FROM events WHERE event_type = ? AND task_id IS NOT NULL)",
            (status, event),
        )
        assert missing == [], f"{status} tasks without {event}: {missing}"


async def make_db(path: Path) -> None:
    db = await Database.open(path)
    await db.close()


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DUCKLM_", "SLACK_", "MATRIX_", "OPENAI_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
    )


async def test_read_only_database_file_is_a_clear_error(tmp_path: Path, clean_env: None) -> None:
    db = tmp_path / "ducklm.db"
    await make_db(db)
    with immutable(db):
        with pytest.raises(StoreError, match="read-only"):
            await Database.open(db)
        listed = cli("--db", str(db), "tasks", cwd=tmp_path)
        assert listed.returncode == 1, listed
        assert "Database error:" in listed.stderr and "read-only" in listed.stderr
        assert "Traceback" not in listed.stderr
        # `ducklm run` stops once with the same message: no crash loop, no Slack call.
        served = cli(
            "--db",
            str(db),
            "run",
            cwd=tmp_path,
            env={
                "SLACK_BOT_TOKEN": "xoxb-unused",
                "SLACK_SIGNING_SECRET": "unused",
                "DUCKLM_SLACK_MODE": "http",
                "DUCKLM_HTTP_HOST": "127.0.0.1",
                "DUCKLM_HTTP_PORT": "0",
                "DUCKLM_SLACK_API_URL": "http://127.0.0.1:9/api/",
            },
        )
        assert served.returncode == 1, served
        assert "read-only" in served.stderr and "Traceback" not in served.stderr
    assert db_rows(db, "SELECT COUNT(*) FROM tasks") == [(0,)]


async def test_read_only_directory_is_a_clear_error(tmp_path: Path, clean_env: None) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    with immutable(directory):
        with pytest.raises(StoreError, match="not writable"):
            await Database.open(directory / "ducklm.db")
        listed = cli("--db", str(directory / "ducklm.db"), "approvals", cwd=tmp_path)
        assert listed.returncode == 1, listed
        assert "Database error:" in listed.stderr and "Traceback" not in listed.stderr
    assert not (directory / "ducklm.db").exists()


async def test_database_turning_read_only_while_serving(
    rt_factory: Any, model_server: FakeModelServer, tmp_path: Path
) -> None:
    rt = await rt_factory()
    await normal_task_completes(rt, model_server)
    db = Path(rt.settings.db)
    model_server.set_default(ACTION, Text(directive()))
    model_server.set_default(THINKER, Text("fine"))
    # The -shm file stays writable: it is memory-mapped, and an immutable mapped
    # file is a SIGBUS, not an error SQLite could report.
    with immutable(db, db.with_name(db.name + "-wal")):
        outcome = await attempt(rt, "is web-1 up?")
        assert isinstance(outcome, StoreError), outcome
        assert str(db) in str(outcome) and "Traceback" not in str(outcome)
    # Writable again: the same process serves the next task.
    await normal_task_completes(rt, model_server)
    await rt.close()
    rt = await rt_factory()
    await rt.stores.tasks.mark_interrupted()
    assert_consistent(db)


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where`; skips when mounting is not allowed."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=10).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def fill(directory: Path) -> Path:
    """Write zeros until the filesystem is full; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        chunk = b"\0" * 4096
        with contextlib.suppress(OSError):
            while os.write(fd, chunk):
                pass
    finally:
        os.close(fd)
    return filler


async def run_until_full(rt: Runtime) -> StoreError:
    for n in range(300):
        outcome = await attempt(rt, f"question {n} " + "x" * 2000)
        if isinstance(outcome, StoreError):
            return outcome
        assert outcome.status == "completed", outcome
    raise AssertionError("300 tasks fit on a full disk")


async def test_disk_full_on_a_real_small_filesystem(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None
) -> None:
    model_server.set_default(ACTION, Text(directive()))
    model_server.set_default(THINKER, Text("fine " * 200))
    with small_filesystem(tmp_path / "small", "1m") as mount:
        settings = make_settings(tmp_path, model_server.base_url, db=mount / "ducklm.db")
        rt = await build_runtime(settings)
        try:
            await normal_task_completes(rt, model_server)
            filler = fill(mount)
            error = await run_until_full(rt)
            assert "disk is full" in str(error) and "Traceback" not in str(error)
            # No crash loop: the process is still there; once there is room, it serves.
            filler.unlink()
            await normal_task_completes(rt, model_server)
        finally:
            await rt.close()
        rt = await build_runtime(settings)  # a restart, with its recovery
        try:
            await rt.stores.tasks.mark_interrupted()
        finally:
            await rt.close()
        assert_consistent(settings.db)
        assert_final_events(settings.db)


async def test_disk_full_via_max_page_count(rt_factory: Any, model_server: FakeModelServer) -> None:
    """The same fault where mounting is not allowed: SQLite's page limit makes the
    writes fail with SQLITE_FULL, the error path a full disk takes."""
    model_server.set_default(ACTION, Text(directive()))
    model_server.set_default(THINKER, Text("fine " * 200))
    rt = await rt_factory()
    await normal_task_completes(rt, model_server)
    pages = (await rt.stores.db.fetchone("PRAGMA page_count"))[0]
    await rt.stores.db.fetchall(f"PRAGMA max_page_count = {pages}")
    error = await run_until_full(rt)
    assert "disk is full" in str(error) and "Traceback" not in str(error)
    await rt.stores.db.fetchall(f"PRAGMA max_page_count = {pages * 100}")
    await normal_task_completes(rt, model_server)
    db = Path(rt.settings.db)
    await rt.close()
    rt = await rt_factory()
    await rt.stores.tasks.mark_interrupted()
    assert_consistent(db)
    assert_final_events(db)


async def test_status_and_final_event_are_written_together(
    rt_factory: Any, model_server: FakeModelServer
) -> None:
    """The disk fills up between the status update and its audit event (forced with
    a temporary trigger that fails those inserts with SQLite's own message).

    Found by this suite: the loop used to write the status and its event as two
    autocommits, leaving a `failed` task without `task_failed` in the audit log."""
    rt = await rt_factory()
    await rt.stores.db.fetchall(
        "CREATE TEMP TRIGGER full_at_the_end BEFORE INSERT ON events "
        "WHEN NEW.event_type IN ('task_completed', 'task_failed') "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    model_server.reply(ACTION, Text(directive()))
    model_server.reply(THINKER, Text("fine"))
    outcome = await attempt(rt, "is web-1 up?")
    assert isinstance(outcome, StoreError) and "disk is full" in str(outcome)
    await rt.stores.db.fetchall("DROP TRIGGER temp.full_at_the_end")
    db = Path(rt.settings.db)
    await rt.close()
    rt = await rt_factory()
    await rt.stores.tasks.mark_interrupted()
    assert_consistent(db)
    # Either both were written or neither: a task without its final event must not
    # look finished (it would be `interrupted` after the restart instead).
    assert_final_events(db)


async def test_chat_user_is_told_the_database_is_full(
    rt_factory: Any, model_server: FakeModelServer
) -> None:
    """Found by this suite: the service used to answer a StoreError with "Sorry,
    something went wrong inside DuckLM." instead of naming the database."""
    model_server.set_default(ACTION, Text(directive()))
    model_server.set_default(THINKER, Text("fine " * 200))
    rt = await rt_factory()
    backend = RecordingBackend()
    service = ChatService(rt)
    service.add_backend(backend)
    try:
        pages = (await rt.stores.db.fetchone("PRAGMA page_count"))[0]
        await rt.stores.db.fetchall(f"PRAGMA max_page_count = {pages}")
        thread = Thread("test", "C1", "1")
        for n in range(300):
            sent_before = len(backend.sent)
            await service.submit_message(thread, "test:alice", f"question {n} " + "x" * 2000)
            reply = backend.sent[sent_before][1]
            if not reply.startswith("fine"):
                break
        else:
            raise AssertionError("300 tasks fit in a full database")
        # The bot keeps serving once there is room again.
        await rt.stores.db.fetchall(f"PRAGMA max_page_count = {pages * 100}")
        await service.submit_message(thread, "test:alice", "and now?")
        assert backend.sent[-1][1].startswith("fine")
        assert "disk" in reply.lower() or "database" in reply.lower(), reply
    finally:
        await service.close()
