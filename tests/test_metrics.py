"""runtime/metrics.py on a real runtime (both backends): the store-backed
gauges read at scrape time, and the observations where things happen (model
calls, tool runs, decisions), rendered in the Prometheus text format and
parsed back with prometheus-client's own parser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.factory import Runtime, build_runtime
from runtime.metrics import Metrics
from runtime.store.stats import TASK_STATUSES, StatsStore
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import Error, FakeModelServer, Text

pytestmark = pytest.mark.backends("sqlite", "postgres")


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed: (name, sorted labels) -> value."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def kept(runtime: Runtime) -> Metrics:
    assert runtime.metrics is not None, "build_runtime keeps metrics for serving commands"
    return runtime.metrics


async def test_tasks_by_status_and_pending_approvals_are_read_at_scrape_time(
    runtime: Runtime,
) -> None:
    metrics = kept(runtime)
    await metrics.refresh()
    for status in TASK_STATUSES:  # every status present, 0 before any task
        assert value(metrics, "ducklm_tasks", status=status) == 0
    assert value(metrics, "ducklm_pending_approvals") == 0
    assert value(metrics, "ducklm_store_up") == 1

    tasks = runtime.stores.tasks
    done = await tasks.create_task("a")
    await tasks.complete_task(done.task_id, "ok")
    failed = await tasks.create_task("b")
    await tasks.fail_task(failed.task_id, "no")
    waiting = await tasks.create_task("c")
    await tasks.waiting_for_approval(waiting.task_id)
    await runtime.approvals.create_pending(
        waiting.task_id, {"tool": "shell_exec_safe", "args": {"command": "touch x"}}
    )
    await tasks.create_task("d")  # running

    # Unchanged until the next scrape reads the store again.
    assert value(metrics, "ducklm_tasks", status="completed") == 0
    await metrics.refresh()
    assert value(metrics, "ducklm_tasks", status="completed") == 1
    assert value(metrics, "ducklm_tasks", status="failed") == 1
    assert value(metrics, "ducklm_tasks", status="waiting_for_approval") == 1
    assert value(metrics, "ducklm_tasks", status="running") == 1
    assert value(metrics, "ducklm_tasks", status="interrupted") == 0
    assert value(metrics, "ducklm_pending_approvals") == 1


async def test_a_store_that_fails_sets_store_up_0_and_the_rest_still_renders(
    runtime: Runtime,
) -> None:
    metrics = kept(runtime)
    metrics.tool_ran("read_file", 0.01)
    await runtime.stores.close()  # every query now raises StoreError
    await metrics.refresh()
    assert value(metrics, "ducklm_store_up") == 0
    assert ("ducklm_tasks", (("status", "running"),)) not in samples(metrics)
    assert value(metrics, "ducklm_tool_duration_seconds_count", tool="read_file") == 1


async def test_ping_answers_and_fails_once_the_store_is_closed(runtime: Runtime) -> None:
    stats = StatsStore(runtime.stores.db)
    await stats.ping()
    await runtime.stores.close()
    with pytest.raises(Exception, match="closed"):
        await stats.ping()


@pytest.mark.backends("sqlite", reason="the file identity check is SQLite's")
async def test_ping_fails_when_the_sqlite_file_is_moved_and_passes_when_it_is_back(
    runtime: Runtime,
) -> None:
    stats = StatsStore(runtime.stores.db)
    path = str(runtime.stores.db.path)
    await stats.ping()
    os.rename(path, path + ".away")
    with pytest.raises(OSError, match="not the file this process opened"):
        await stats.ping()
    os.rename(path + ".away", path)
    await stats.ping()


async def test_model_latency_per_role_and_model_and_errors(runtime: Runtime, model_server) -> None:
    metrics = kept(runtime)
    model_server.reply(ACTION, Text(directive(shell("echo metered"))), Text(directive()))
    model_server.reply(THINKER, Text("It said metered."))
    result = await runtime.loop.run_chat("say metered")
    assert result.status == "completed", result
    assert value(metrics, "ducklm_model_latency_seconds_count", role="action", model=ACTION) == 2
    assert value(metrics, "ducklm_model_latency_seconds_count", role="thinker", model=THINKER) == 1
    assert value(metrics, "ducklm_model_latency_seconds_sum", role="thinker", model=THINKER) > 0
    # The read-only echo ran (sandboxed or approved by nobody: it is low risk).
    assert value(metrics, "ducklm_tool_duration_seconds_count", tool="shell_exec_safe") == 1

    model_server.reply(ACTION, Error(401))
    failed = await runtime.loop.run_chat("again")
    assert failed.status == "failed", failed
    assert (
        value(metrics, "ducklm_model_errors_total", role="action", model=ACTION, error="auth") == 1
    )


async def test_decision_latency_by_decision(runtime: Runtime) -> None:
    metrics = kept(runtime)
    tasks = runtime.stores.tasks
    action = {"tool": "shell_exec_safe", "args": {"command": "touch decided"}}
    for decision in ("approve", "deny"):
        task = await tasks.create_task(decision)
        approval = await runtime.approvals.create_pending(task.task_id, action)
        outcome = await runtime.approvals.decide(approval.approval_id, decision, "slack:U1")
        assert outcome.taken
        again = await runtime.approvals.decide(approval.approval_id, decision, "slack:U2")
        assert not again.taken  # a second click is no second decision
    task = await tasks.create_task("late")
    approval = await runtime.approvals.create_pending(task.task_id, action)
    assert await runtime.approvals.expire(approval.approval_id)
    for decision in ("approve", "deny", "expired"):
        count = value(metrics, "ducklm_decision_latency_seconds_count", decision=decision)
        assert count == 1, decision
    assert value(metrics, "ducklm_decision_latency_seconds_count", decision="always") == 0


async def test_quick_commands_keep_no_metrics(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None, db_target: str
) -> None:
    # `ducklm tasks` and friends: prometheus-client is not even needed.
    rt = await build_runtime(
        make_settings(tmp_path, model_server.base_url, db=db_target), mcp=False
    )
    try:
        assert rt.metrics is None
        assert rt.model is not None and rt.model.metrics is None
    finally:
        await rt.close()


async def test_two_runtimes_keep_their_own_numbers(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None, runtime: Runtime
) -> None:
    other = await build_runtime(make_settings(tmp_path / "other", model_server.base_url))
    try:
        kept(runtime).duplicate("slack")
        assert value(kept(runtime), "ducklm_deliveries_deduplicated_total", platform="slack") == 1
        assert value(kept(other), "ducklm_deliveries_deduplicated_total", platform="slack") == 0
    finally:
        await other.close()
