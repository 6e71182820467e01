"""/healthz, /readyz and /metrics of real `ducklm run` and `ducklm console`
processes (bot/health.py).

`ducklm run` serves Slack over HTTP against FakeSlack and the fake model
(tests/crash_harness.py), with the endpoints on the same port as
/slack/events; the console serves them on DUCKLM_METRICS_PORT. Metrics are
read the way Prometheus reads them, through prometheus-client's parser. Every
wait is bounded and waits for a state, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bot.health import Health
from runtime.factory import Runtime
from runtime.replica import Replica
from tests.conftest import ACTION, THINKER
from tests.crash_harness import (
    ANSWER_PREFIX,
    APPROVERS,
    DuckRun,
    ModelScript,
    answers,
    cards,
    click,
    mention,
    wait_for,
)
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.fakes.synapse import MatrixUser, SynapseServer
from tests.postgres import is_postgres
from tests.test_cli_run import free_port
from tests.test_console import cli_env
from tests.test_matrix import PASSWORD, bot_notice, room_with_bot

pytestmark = [pytest.mark.timeout(180), pytest.mark.backends("sqlite", "postgres")]

WITHIN = 40.0  # seconds for any state below; a loaded 2-core box is slow, not stuck

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- reading the endpoints ---------------------------------------------------------


async def get(base: str, path: str) -> tuple[int, str]:
    """(status, body) of one GET; a fresh connection each time."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + path, timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        return response.status, await response.text()


async def get_json(base: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + path, timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        return response.status, await response.json()


async def scrape(base: str) -> Samples:
    """/metrics parsed as Prometheus parses it: (name, sorted labels) -> value."""
    status, text = await get(base, "/metrics")
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def eventually(check: Callable[[], Any], what: str, within: float = WITHIN) -> Any:
    """Poll an async `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)  # a poll interval, not a wait for an outcome
    raise AssertionError(f"not within {within} s: {what} (last: {last!r})")


async def metric_reaches(base: str, name: str, target: float, **labels: str) -> Samples:
    async def check() -> Samples | None:
        samples = await scrape(base)
        return samples if sample(samples, name, **labels) >= target else None

    return await eventually(check, f"{name}{labels} >= {target}")


async def readyz_becomes(base: str, status: int) -> Any:
    async def check() -> Any:
        try:
            got, body = await get_json(base, "/readyz")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        return body if got == status else None

    return await eventually(check, f"/readyz answering {status}")


# -- the run ---------------------------------------------------------------------------


@pytest_asyncio.fixture
async def bot(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer, db_target: str
) -> AsyncIterator[DuckRun]:
    ModelScript(model_server)
    run = DuckRun(tmp_path, slack, model_server, DUCKLM_DB=db_target)
    try:
        yield run
    finally:
        await run.close()


def base_of(bot: DuckRun) -> str:
    return f"http://127.0.0.1:{bot.port}"


async def test_a_slack_http_run_is_alive_ready_and_its_metrics_move(
    bot: DuckRun, slack: FakeSlack
) -> None:
    await bot.start()
    base = base_of(bot)
    assert await get_json(base, "/healthz") == (200, {"alive": True})
    body = await readyz_becomes(base, 200)
    assert body == {
        "ready": True,
        "failed": [],
        "checks": {"store": "ok", "platforms": {"slack": "ok"}, "replica": "ok"},
    }, body
    before = await scrape(base)
    assert sample(before, "ducklm_store_up") == 1
    assert sample(before, "ducklm_tasks", status="completed") == 0
    assert ("ducklm_tasks", (("status", "running"),)) in before  # 0, but there
    replica = [labels for name, labels in before if name == "ducklm_replica_info"]
    assert replica and dict(replica[0])["replica_id"], before.keys()

    # A mention: one task, completed; both model roles observed.
    first = mention(slack, "hello-1")
    assert await bot.post_event(first.envelope) == 200, bot.stderr()
    await wait_for(slack, lambda: answers(slack, first.ts), "the first answer")
    after = await metric_reaches(base, "ducklm_tasks", 1, status="completed")
    assert sample(after, "ducklm_model_latency_seconds_count", role="action", model=ACTION) >= 1
    assert sample(after, "ducklm_model_latency_seconds_count", role="thinker", model=THINKER) >= 1

    # Slack's retry of the same delivery: a duplicate, counted, no second task.
    assert sample(after, "ducklm_deliveries_deduplicated_total", platform="slack") == 0
    assert await bot.post_event(first.envelope, retry_num=1) == 200
    retried = await metric_reaches(
        base, "ducklm_deliveries_deduplicated_total", 1, platform="slack"
    )
    assert sample(retried, "ducklm_tasks", status="completed") == 1
    assert sample(retried, "ducklm_tasks", status="running") == 0

    # A 429 on the answer's post: retried after Retry-After, and counted.
    slack.rate_limit("chat.postMessage", times=1, retry_after=1)
    second = mention(slack, "hello-2")
    assert await bot.post_event(second.envelope) == 200
    await wait_for(slack, lambda: answers(slack, second.ts), "the answer after a 429")
    limited = await metric_reaches(base, "ducklm_platform_rate_limited_total", 1, platform="slack")
    assert sample(limited, "ducklm_platform_rate_limited_total", platform="slack") == 1
    assert sample(limited, "ducklm_tasks", status="completed") >= 1

    # An approval, decided by a click: decision latency and the tool's run observed.
    third = mention(slack, "approve-3")
    assert await bot.post_event(third.envelope) == 200
    found = await wait_for(slack, lambda: cards(slack, third.ts), "the approval card")
    pending = await metric_reaches(base, "ducklm_pending_approvals", 1)
    assert sample(pending, "ducklm_tasks", status="waiting_for_approval") == 1
    assert await bot.post_interaction(click(slack, found[0], user=APPROVERS[0])) == 200
    decided = await metric_reaches(
        base, "ducklm_decision_latency_seconds_count", 1, decision="approve"
    )
    await wait_for(slack, lambda: answers(slack, third.ts), "the answer after the approval")
    done = await metric_reaches(base, "ducklm_tasks", 3, status="completed")
    assert sample(done, "ducklm_pending_approvals") == 0
    assert sample(done, "ducklm_tool_duration_seconds_count", tool="shell_exec_safe") == 1
    assert sample(decided, "ducklm_decision_latency_seconds_sum", decision="approve") >= 0
    assert bot.effects() == ["approve-3"]
    await bot.stop()


async def test_readyz_names_the_store_when_it_is_unreachable(
    bot: DuckRun, db_target: str, request: pytest.FixtureRequest
) -> None:
    await bot.start()
    base = base_of(bot)
    await readyz_becomes(base, 200)
    with unreachable(db_target, request):
        body = await readyz_becomes(base, 503)
        assert body["failed"] == ["store"], body
        assert body["checks"]["store"] != "ok"
        assert body["checks"]["platforms"] == {"slack": "ok"}
        assert body["checks"]["replica"] == "ok"
        # Alive all the same: a liveness probe must not restart it for this.
        assert (await get(base, "/healthz"))[0] == 200
        # /metrics still renders, saying the store is down.
        if is_postgres(db_target):
            assert sample(await scrape(base), "ducklm_store_up") == 0
    body = await readyz_becomes(base, 200)  # back once the store is
    assert body["failed"] == []
    # Not quiet: asyncpg's pool logs a traceback while it cannot reconnect.
    await bot.stop(quiet=False)


@contextlib.contextmanager
def unreachable(db_target: str, request: pytest.FixtureRequest) -> Any:
    """The store goes away for the body. PostgreSQL: the database stops taking
    connections and its open ones are cut (the server itself is shared by
    every test). SQLite: the file is moved away (root reads any file, so
    permissions would not do); moved back afterwards, the very same file."""
    if not is_postgres(db_target):
        os.rename(db_target, db_target + ".away")
        try:
            yield
        finally:
            os.rename(db_target + ".away", db_target)
        return
    server = request.getfixturevalue("postgres_server")
    name = urlsplit(db_target).path.lstrip("/")
    server.admin_query(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        server.admin_query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ?", (name,)
        )
        yield
    finally:
        server.admin_query(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@pytest.mark.backends("sqlite", reason="the shutdown is the same on both backends")
async def test_readyz_turns_503_at_sigterm_while_it_still_serves(bot: DuckRun) -> None:
    bot.env["DUCKLM_SHUTDOWN_DRAIN"] = "5"  # /readyz 503 for 5 s after SIGTERM
    await bot.start()
    base = base_of(bot)
    await readyz_becomes(base, 200)
    assert bot.process is not None
    os.kill(bot.process.pid, 15)  # SIGTERM, as a rolling deploy sends it
    body = await readyz_becomes(base, 503)
    assert body["failed"] == ["replica"], body
    assert body["checks"]["replica"] == "shutting down"
    assert (await get(base, "/healthz"))[0] == 200  # still alive while it drains
    assert await bot.exited(30) == 0, bot.stderr()
    assert "draining for 5 s" in bot.stderr()


# -- the console on a port of its own ----------------------------------------------------


@pytest.mark.backends("sqlite", reason="the console's endpoints do not depend on the backend")
async def test_the_console_serves_the_endpoints_on_metrics_port(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = cli_env(tmp_path, DUCKLM_METRICS_PORT=str(port), DUCKLM_HTTP_HOST="127.0.0.1")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "console",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    assert process.stdin is not None
    try:
        body = await readyz_becomes(base, 200)
        assert body["checks"] == {"store": "ok", "platforms": {}, "replica": "ok"}, body
        assert await get_json(base, "/healthz") == (200, {"alive": True})
        assert sample(await scrape(base), "ducklm_tasks", status="completed") == 0
        # A direct command (no model is configured): a task, completed.
        process.stdin.write(b"run echo console-metered\n")
        await process.stdin.drain()
        done = await metric_reaches(base, "ducklm_tasks", 1, status="completed")
        assert sample(done, "ducklm_tool_duration_seconds_count", tool="shell_exec_safe") == 1
        process.stdin.close()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    with pytest.raises((aiohttp.ClientError, OSError)):
        await get(base, "/healthz")  # gone with the console


@pytest.mark.backends("sqlite", reason="the port check does not depend on the backend")
async def test_a_taken_metrics_port_is_a_clear_start_error(tmp_path: Path) -> None:
    with contextlib.closing(__import__("socket").socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = cli_env(
            tmp_path,
            DUCKLM_METRICS_PORT=str(port),
            DUCKLM_HTTP_HOST="127.0.0.1",
            SLACK_BOT_TOKEN=BOT_TOKEN,
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.cli",
            "console",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=env,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, err
    assert b"DUCKLM_METRICS_PORT" in err and b"Traceback" not in err, err


# -- Socket Mode: the endpoints on a port of their own -------------------------------


@pytest.mark.backends("sqlite", reason="the platform check does not depend on the backend")
async def test_socket_mode_readiness_follows_the_websocket(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run = DuckRun(
        tmp_path,
        slack,
        model_server,
        DUCKLM_SLACK_MODE="socket",
        SLACK_APP_TOKEN=APP_TOKEN,
        DUCKLM_METRICS_PORT=str(port),
    )
    run.port = port  # DuckRun waits for this port: the endpoints' own
    try:
        await run.start()
        body = await readyz_becomes(base, 200)
        assert body["checks"]["platforms"] == {"slack": "ok"}, body
        # The websocket drops and the SDK's reconnect cannot get a new URL yet.
        slack.hold("apps.connections.open")
        for ws in list(slack._sockets):  # FakeSlack's side of each websocket
            await ws.close()
        body = await readyz_becomes(base, 503)
        assert body["failed"] == ["platform:slack"], body
        assert body["checks"]["platforms"]["slack"] == "the Socket Mode connection is down"
        slack.release("apps.connections.open")  # reconnected: ready again
        await readyz_becomes(base, 200)
        await run.stop(quiet=False)  # the SDK logs the dropped connection
    finally:
        await run.close()


# -- readiness in process: a heartbeat that fell behind ---------------------------------


async def test_readyz_fails_when_the_heartbeat_is_older_than_the_replica_timeout(
    runtime: Runtime,
) -> None:
    # Beats every minute but counts as dead after 0.2 s: its heartbeat falls behind.
    replica = Replica(runtime.stores.replicas, name="late", heartbeat_interval=60, timeout=0.2)
    await replica.start()
    try:
        health = Health(runtime, replica=replica)
        health.starting = False
        ready, body = await health.readiness()
        assert ready, body

        async def late() -> Any:
            ready, body = await health.readiness()
            return None if ready else body

        body = await eventually(late, "the late heartbeat failing /readyz", within=10)
        assert body["failed"] == ["replica"], body
        assert "DUCKLM_REPLICA_TIMEOUT" in body["checks"]["replica"]
        assert runtime.metrics is not None
        assert (
            runtime.metrics.sample(
                "ducklm_replica_info", {"replica_id": replica.replica_id, "name": "late"}
            )
            == 1
        )
    finally:
        await replica.stop()


# -- Matrix only: the endpoints on a port of their own ---------------------------------


@pytest.mark.backends("sqlite", reason="the endpoints do not depend on the backend")
async def test_a_matrix_only_run_serves_the_endpoints_on_metrics_port(
    tmp_path: Path, slack: FakeSlack, model_server: FakeModelServer, synapse: SynapseServer
) -> None:
    duck = synapse.register(synapse.unique("duck"), PASSWORD)
    alice = await MatrixUser(
        synapse, synapse.register(synapse.unique("alice"), PASSWORD), PASSWORD
    ).login()
    ModelScript(model_server)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run = DuckRun(
        tmp_path,
        slack,
        model_server,
        MATRIX_HOMESERVER=synapse.base_url,
        MATRIX_USER_ID=duck,
        MATRIX_PASSWORD=PASSWORD,
        DUCKLM_MATRIX_ALLOWED_INVITERS=alice.user_id,
        DUCKLM_METRICS_PORT=str(port),
    )
    for slack_only in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "DUCKLM_SLACK_MODE"):
        run.env.pop(slack_only)
    run.port = port  # DuckRun waits for this port: the endpoints' own
    try:
        await run.start()
        body = await readyz_becomes(base, 200)
        assert body["checks"]["platforms"] == {"matrix": "ok"}, body
        room = await room_with_bot(alice, duck)
        question = await alice.say(room, "hello-matrix", mention=duck)
        await alice.wait_for(bot_notice(duck, question, ANSWER_PREFIX), "the answer", within=WITHIN)
        done = await metric_reaches(base, "ducklm_tasks", 1, status="completed")
        assert (
            sample(done, "ducklm_model_latency_seconds_count", role="thinker", model=THINKER) >= 1
        )
        await run.stop()
    finally:
        await run.close()
        await alice.close()
