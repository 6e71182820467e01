"""Helpers for the replica tests (issue #19): N real `ducklm run` processes on
one database (a PostgreSQL URL, or a shared SQLite file while developing), each
on its own HTTP port (Slack's HTTP mode; in Socket Mode the operations port),
behind a small round-robin HTTP proxy; and read-only looks at that database on
either backend.

Each replica is a `tests.crash_harness.DuckRun` (the same start, kill, stop and
signed-request pieces) with its own directory (logs, local files, DUCKLM_DATA_DIR)
and `DUCKLM_REPLICA_NAME`, sharing the database and the workspace, so a command
that appends to `effects.log` leaves one line per run whichever replica ran it.

The proxy forwards each request to the next replica in turn, as a load balancer
would; a request can be aimed at one replica (`ReplicaProxy.post(..., to=i)`)
so that Slack's retry of a delivery lands on another replica than the first
delivery did. Like a load balancer with health checks it skips a replica that
refuses the connection (a dead one), never one that took the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import directive
from tests.crash_harness import ANSWER_PREFIX, DuckRun, ModelScript, rows
from tests.fakes.loopback import serve_on_loopback
from tests.fakes.openai_server import FakeModelServer, RecordedRequest, Reply, Text
from tests.fakes.slack_api import APP_TOKEN, SIGNING_SECRET, FakeSlack, sign
from tests.test_console import cli_env

__all__ = [
    "Database",
    "HeldScript",
    "Replica",
    "ReplicaProxy",
    "ReplicaSet",
    "Served",
    "ducklm_cli",
    "replica_db",
    "tag_of",
    "wait_until",
]

# Short enough that a dead replica is noticed within a test's patience, long
# enough that a loaded 2-core box never misses two heartbeats of a live one.
HEARTBEAT_INTERVAL = "0.5"
REPLICA_TIMEOUT = "6"
RECOVERY_INTERVAL = "1"


# -- the fake model's script ----------------------------------------------------

_TAG = re.compile(r"\b(hang|approve|hold|ask)-\d+\b")


def tag_of(body: dict[str, Any]) -> str:
    """The `hang-N` / `approve-N` / `hold-N` a model request is about ("" if none)."""
    text = "\n".join(
        m.get("content") or ""
        for m in body.get("messages") or []
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    )
    found = _TAG.search(text)
    return found.group(0) if found else ""


class HeldScript(ModelScript):
    """tests.crash_harness.ModelScript, plus `hold-N`: the action model's answer
    to it waits until the test calls `release()` (a task that is running on a live
    replica for as long as the test needs), then plans nothing; the thinker then
    answers `Answer: hold-N.`. `ask-N` plans nothing and is answered `Answer: ask-N.`
    (so each message's answer is told apart)."""

    def __init__(self, model: FakeModelServer) -> None:
        super().__init__(model)
        self.released = asyncio.Event()
        self.holding: set[str] = set()  # the hold-N tags the action model is holding

    def release(self) -> None:
        self.released.set()

    async def action(self, request: RecordedRequest) -> Reply:
        tag = tag_of(request.body)
        if tag.startswith("hold-"):
            self.holding.add(tag)
            await self.released.wait()  # the test's gate, not a wait of ours
            return Text(directive())
        return await super().action(request)

    async def thinker(self, request: RecordedRequest) -> Reply:
        tag = tag_of(request.body)
        if tag.startswith(("hold-", "ask-")):
            return Text(f"{ANSWER_PREFIX} {tag}.")
        return await super().thinker(request)


# -- the database the replicas share ------------------------------------------------


@pytest.fixture
def replica_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What DUCKLM_DB is for every replica: a fresh PostgreSQL database (the
    deployment the issue is about). `DUCKLM_TEST_REPLICAS_DB=sqlite` runs the same
    tests on one shared SQLite file instead, for working on them without a server."""
    if os.environ.get("DUCKLM_TEST_REPLICAS_DB") == "sqlite":
        return str(tmp_path / "shared.db")
    return str(request.getfixturevalue("postgres_url"))


# -- reading the shared database (either backend) ------------------------------


_PLACEHOLDER = re.compile(r"\?")


def _numbered(sql: str) -> str:
    """`?` -> `$1..$n` for asyncpg (the tests' own queries hold no literal `?`)."""
    counter = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class Database:
    """Read-only looks at the replicas' database from the test, beside the running
    processes: sqlite3 on a file (tests.crash_harness.rows), asyncpg on a URL.
    Rows are tuples on both. A table that does not exist yet reads as empty (the
    first replica may still be creating the schema)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.is_postgres = target.startswith(("postgresql://", "postgres://"))
        self._conn: Any = None

    async def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not self.is_postgres:
            return rows(Path(self.target), sql, params)
        import asyncpg

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.target, timeout=10)
        try:
            found = await self._conn.fetch(_numbered(sql), *params, timeout=10)
        except asyncpg.UndefinedTableError:
            return []
        return [tuple(record) for record in found]

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    # -- what the tests ask most -------------------------------------------------

    async def tasks_of(self, conversation: str) -> list[tuple[str, str]]:
        """(task_id, status) of one conversation's tasks, oldest first."""
        found = await self.rows(
            "SELECT task_id, status FROM tasks WHERE conversation = ? ORDER BY created_at",
            (conversation,),
        )
        return [(str(t), str(s)) for t, s in found]

    async def status_of(self, conversation: str) -> str | None:
        found = await self.tasks_of(conversation)
        return found[-1][1] if found else None

    async def owner_of(self, task_id: str) -> str | None:
        found = await self.rows("SELECT owner FROM tasks WHERE task_id = ?", (task_id,))
        return found[0][0] if found else None

    async def event_types(self, task_id: str) -> list[str]:
        found = await self.rows(
            "SELECT event_type FROM events WHERE task_id = ? ORDER BY seq", (task_id,)
        )
        return [str(kind) for (kind,) in found]

    async def events_of(self, task_id: str) -> list[tuple[int, str, dict[str, Any]]]:
        found = await self.rows(
            "SELECT seq, event_type, payload FROM events WHERE task_id = ? ORDER BY seq",
            (task_id,),
        )
        return [(int(seq), str(kind), json.loads(payload)) for seq, kind, payload in found]

    async def approvals_of(self, task_id: str) -> list[dict[str, Any]]:
        names = (
            "approval_id",
            "decision",
            "decided_by",
            "executed_at",
            "card_state",
            "command",
        )
        found = await self.rows(
            f"SELECT {', '.join(names)} FROM approvals WHERE task_id = ? ORDER BY created_at",
            (task_id,),
        )
        return [dict(zip(names, row, strict=True)) for row in found]

    async def count(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        found = await self.rows(sql, params)
        return int(found[0][0]) if found else 0

    async def assert_consistent(self) -> None:
        """What several writers must still leave: no task running, every task's
        events numbered 1..n from task_created (no gap, no duplicate seq from two
        processes), no event of an unknown task."""
        running = await self.rows("SELECT task_id FROM tasks WHERE status = 'running'")
        assert running == [], running
        for (task_id,) in await self.rows("SELECT task_id FROM tasks"):
            seqs = await self.rows(
                "SELECT seq, event_type FROM events WHERE task_id = ? ORDER BY seq", (task_id,)
            )
            assert [s for s, _ in seqs] == list(range(1, len(seqs) + 1)), (task_id, seqs)
            if seqs:
                assert seqs[0][1] == "task_created", (task_id, seqs)
        orphans = await self.count(
            "SELECT COUNT(*) FROM events WHERE task_id IS NOT NULL "
            "AND task_id NOT IN (SELECT task_id FROM tasks)"
        )
        assert orphans == 0


async def ducklm_cli(cwd: Path, db: str, *args: str, within: float = 60.0) -> tuple[int, str]:
    """`ducklm <args>` on the replicas' database (the CLI an operator runs beside
    them): its exit code and its stdout + stderr."""
    env = cli_env(cwd, DUCKLM_DB=db)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        env=env,
    )
    out, _ = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def wait_until(
    predicate: Callable[[], Any], what: str, *, within: float = 30.0, every: float = 0.2
) -> Any:
    """Bounded wait for a state: `predicate` (sync or async) until truthy."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(every)


# -- the replicas ----------------------------------------------------------------


class Replica(DuckRun):
    """One `ducklm run` of the set: its own directory, port and replica name; the
    set's database and workspace."""

    def __init__(
        self,
        directory: Path,
        index: int,
        slack: FakeSlack,
        model: FakeModelServer,
        *,
        db: str,
        workspace: Path,
        socket_mode: bool = False,
        **env: str,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.name = f"replica-{index}"
        if socket_mode:
            # One Socket Mode connection per replica, and no HTTP server for Slack:
            # the operations port is what the harness waits on instead.
            env = {"DUCKLM_SLACK_MODE": "socket", "SLACK_APP_TOKEN": APP_TOKEN, **env}
        super().__init__(
            directory,
            slack,
            model,
            DUCKLM_DB=db,
            DUCKLM_WORKSPACE=str(workspace),
            DUCKLM_DATA_DIR=str(directory),
            DUCKLM_REPLICA_NAME=self.name,
            DUCKLM_HEARTBEAT_INTERVAL=HEARTBEAT_INTERVAL,
            DUCKLM_REPLICA_TIMEOUT=REPLICA_TIMEOUT,
            DUCKLM_RECOVERY_INTERVAL=RECOVERY_INTERVAL,
            **env,
        )
        if socket_mode:
            self.env["DUCKLM_METRICS_PORT"] = str(self.port)
        self.killed = False  # by the test, on purpose: not a death to report

    @property
    def target(self) -> str:
        return self.env["DUCKLM_DB"]

    async def kill(self) -> None:
        self.killed = True
        await super().kill()

    async def crashed(self, point: str, within: float = 30.0) -> None:
        await super().crashed(point, within)
        self.killed = True  # by its crash point, as the test armed it

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class ReplicaSet:
    """N replicas on one database and one workspace (under `tmp_path`), and the
    proxy in front of them. `start()` starts every replica (one after the other,
    each recovered before the next: a replica's start-up recovery must not race
    another's start), then the proxy; `close()` (for `finally`) kills whatever is
    left and stops the proxy."""

    def __init__(
        self,
        tmp_path: Path,
        slack: FakeSlack,
        model: FakeModelServer,
        *,
        db: str,
        count: int = 3,
        socket_mode: bool = False,
        **env: str,
    ) -> None:
        self.db_target = db
        self.workspace = tmp_path / "workspace"
        self.workspace.mkdir(exist_ok=True)
        self.replicas = [
            Replica(
                tmp_path / f"replica-{i}",
                i,
                slack,
                model,
                db=db,
                workspace=self.workspace,
                socket_mode=socket_mode,
                **env,
            )
            for i in range(count)
        ]
        self.proxy = ReplicaProxy([r.port for r in self.replicas])
        self.db = Database(db)

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.running]

    async def start(self, crash_at: dict[int, str] | None = None) -> None:
        """`crash_at` arms a crash point (DUCKLM_CRASH_AT) in some replicas, by index."""
        for replica in self.replicas:
            await replica.start((crash_at or {}).get(replica.index))
            await replica.recovered()
        await self.proxy.start()

    def effects(self) -> list[str]:
        """What approved commands appended to the shared workspace's effects.log."""
        return self.replicas[0].effects()

    def stderr(self) -> str:
        """Every replica's logs, labelled, for assertion messages."""
        return "\n".join(f"=== {r.name}\n{r.stderr()}" for r in self.replicas)

    def assert_alive(self) -> None:
        dead = [
            (r.name, r.process.returncode)
            for r in self.replicas
            if r.process and not r.running and not r.killed
        ]
        assert not dead, f"replicas died: {dead}\n{self.stderr()}"

    async def stop(self) -> None:
        """A clean stop (SIGTERM) of every live replica: each exits 0."""
        for replica in self.alive:
            await replica.stop(quiet=False)

    async def close(self) -> None:
        for replica in self.replicas:
            with contextlib.suppress(Exception):
                await replica.close()
        await self.proxy.stop()
        await self.db.close()

    # -- Slack's side, through the proxy -------------------------------------------

    async def post_event(
        self, envelope: dict[str, Any], *, retry_num: int = 0, to: int | None = None
    ) -> Served:
        """An Events API delivery, signed as Slack signs it, through the proxy
        (round-robin, or aimed at replica `to`)."""
        headers = {}
        if retry_num:
            headers = {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
        return await self.proxy.post(json.dumps(envelope), "application/json", headers, to=to)

    async def post_interaction(self, payload: dict[str, Any], *, to: int | None = None) -> Served:
        from urllib.parse import urlencode

        body = urlencode({"payload": json.dumps(payload)})
        return await self.proxy.post(body, "application/x-www-form-urlencoded", {}, to=to)

    async def post_command(self, form: dict[str, str], *, to: int | None = None) -> Served:
        from urllib.parse import urlencode

        return await self.proxy.post(
            urlencode(form), "application/x-www-form-urlencoded", {}, to=to
        )


# -- the round-robin proxy ----------------------------------------------------------


@dataclass
class Served:
    """One request as the proxy passed it on: which replica answered, its status
    (None when no replica could be reached or the connection broke)."""

    path: str
    replica: int | None
    status: int | None
    body: str = ""
    skipped: list[int] = field(default_factory=list)  # replicas that refused the connection


class ReplicaProxy:
    """An HTTP reverse proxy on 127.0.0.1 at a free port: each request goes to the
    next backend port in turn. Headers and body pass through untouched (Slack's
    signature covers them). `X-Replica: <i>` aims a request at backend i (the header
    is dropped before forwarding). A backend that refuses the connection is skipped
    for the next one, as a load balancer's health check would take it out; a
    request a backend accepted is never sent twice (that would be our retry, not
    Slack's)."""

    PIN = "X-Replica"
    TAG = "X-Proxy-Tag"  # the test's own id for a request, to find what became of it

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.served: list[Served] = []
        self._by_tag: dict[str, Served] = {}
        self.base_url = ""
        self._turn = itertools.count()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/slack/events"

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        port = await serve_on_loopback(runner)
        self._runner = runner
        self.base_url = f"http://127.0.0.1:{port}"
        # No pooled keep-alive to the backends: a pooled connection may belong to
        # a replica that was just killed.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=20),
            auto_decompress=False,
        )

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await asyncio.wait_for(runner.cleanup(), 10)

    def _order(self, pinned: int | None) -> list[int]:
        if pinned is not None:
            return [pinned]
        first = next(self._turn) % len(self.ports)
        return [(first + k) % len(self.ports) for k in range(len(self.ports))]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        pin = request.headers.get(self.PIN)
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower()
            not in (
                "host",
                "content-length",
                "transfer-encoding",
                self.PIN.lower(),
                self.TAG.lower(),
            )
        }
        served = Served(request.path, None, None)
        self.served.append(served)
        if tag := request.headers.get(self.TAG):
            self._by_tag[tag] = served
        for index in self._order(int(pin) if pin is not None else None):
            url = f"http://127.0.0.1:{self.ports[index]}{request.path_qs}"
            try:
                async with self._session.request(
                    request.method, url, data=body, headers=headers
                ) as answer:
                    payload = await answer.read()
                    served.replica, served.status = index, answer.status
                    served.body = payload.decode(errors="replace")
                    passed = {
                        k: v
                        for k, v in answer.headers.items()
                        if k.lower() not in ("content-length", "transfer-encoding", "connection")
                    }
                    return web.Response(status=answer.status, body=payload, headers=passed)
            except aiohttp.ClientConnectorError:
                served.skipped.append(index)  # refused: not taken, try the next one
                continue
            except (aiohttp.ClientError, TimeoutError):
                served.replica = index  # taken, then broken: never resent
                return web.Response(status=502, text="backend broke the connection")
        return web.Response(status=503, text="no replica reachable")

    async def post(
        self,
        body: str,
        content_type: str,
        headers: dict[str, str],
        *,
        to: int | None = None,
        secret: str = SIGNING_SECRET,
    ) -> Served:
        """Sign and send one request through the proxy; what it did with it."""
        all_headers = {"Content-Type": content_type, **sign(secret, body), **headers}
        if to is not None:
            all_headers[self.PIN] = str(to)
        tag = uuid.uuid4().hex
        all_headers[self.TAG] = tag
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            try:
                async with session.post(self.url, data=body.encode(), headers=all_headers) as r:
                    await r.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
        return self._by_tag.pop(tag, None) or Served(self.url, None, None)
