"""Replicas on one database (issue #19): registration and heartbeats, leases
under concurrency, shared state, and recovery that takes over only what a dead
replica left. Every test runs on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.service import ChatService
from runtime.factory import Runtime, build_runtime
from runtime.replica import Replica
from runtime.store import Database, Stores, open_stores
from tests.conftest import ACTION, make_settings
from tests.fakes.openai_server import FakeModelServer, Hang

pytestmark = pytest.mark.backends("sqlite", "postgres")


async def until(check: Callable[[], Awaitable[Any]], within: float = 20.0) -> Any:
    """Wait (bounded) until `await check()` is truthy; returns it."""
    deadline = time.monotonic() + within
    while True:
        outcome = await check()
        if outcome:
            return outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within} s")
        await asyncio.sleep(0.05)


# -- replicas ------------------------------------------------------------------


async def test_register_heartbeat_and_death_by_timeout_or_stop(stores: Stores) -> None:
    replicas = stores.replicas
    t0 = time.time()
    await replicas.register("a", "alpha", "host-1", 101, at=t0)
    await replicas.register("b", "beta", "host-2", 102, at=t0)
    assert [r.replica_id for r in await replicas.live(20, at=t0)] == ["a", "b"]
    row = await replicas.get("a")
    assert row is not None and (row.name, row.host, row.pid) == ("alpha", "host-1", 101)

    # b keeps heartbeating, a does not: 30 s later only b is alive.
    assert await replicas.heartbeat("b", at=t0 + 25)
    assert [r.replica_id for r in await replicas.live(20, at=t0 + 30)] == ["b"]
    dead = await replicas.get("a")
    assert dead is not None and not dead.alive(t0 + 30, 20)

    # A clean stop is death at once, whatever the heartbeat says.
    assert await replicas.stop("b", at=t0 + 26)
    assert await replicas.live(20, at=t0 + 26) == []
    assert not await replicas.heartbeat("b", at=t0 + 27)  # stopped rows stay stopped
    assert not await replicas.stop("b")  # once

    # Registering again (a pruned or stopped row) makes it alive again.
    revived = await replicas.register("b", "beta", "host-2", 102, at=t0 + 28)
    assert revived.stopped_at is None and revived.alive(t0 + 28, 20)
    assert revived.started_at == t0  # its start is kept

    # Pruning forgets only the long dead.
    assert await replicas.prune(3600, at=t0 + 7200) == 2
    assert await replicas.all() == []


async def test_replica_loop_registers_beats_and_stops(stores: Stores) -> None:
    replica = Replica(stores.replicas, name="unit", heartbeat_interval=0.05, timeout=5)
    assert replica.replica_id.startswith("unit:")
    other = Replica(stores.replicas, name="unit")
    assert other.replica_id != replica.replica_id  # unique per process and instance
    beats: list[float] = []

    async def beaten() -> None:
        beats.append(time.time())

    replica.on_beat(beaten)
    await replica.start()
    first = await stores.replicas.get(replica.replica_id)
    assert first is not None
    await until(lambda: _true(len(beats) >= 3))
    later = await stores.replicas.get(replica.replica_id)
    assert later is not None and later.heartbeat_at > first.heartbeat_at
    await replica.stop()
    stopped = await stores.replicas.get(replica.replica_id)
    assert stopped is not None and stopped.stopped_at is not None
    assert await stores.replicas.live(5) == []


async def _true(value: bool) -> bool:
    return value


# -- leases --------------------------------------------------------------------


async def test_lease_acquire_renew_expire_release(stores: Stores) -> None:
    leases = stores.leases
    t0 = time.time()
    taken = await leases.acquire("sync", "a", 5, at=t0)
    assert taken is not None and (taken.holder, taken.expires_at) == ("a", t0 + 5)
    assert await leases.acquire("sync", "b", 5, at=t0 + 1) is None  # held
    assert await leases.renew("sync", "a", 5, at=t0 + 4)
    assert not await leases.renew("sync", "b", 5, at=t0 + 4)  # not b's
    again = await leases.acquire("sync", "a", 5, at=t0 + 4.5)  # the holder: a renewal
    assert again is not None and again.acquired_at == t0  # held since t0, not retaken
    # Expired: the holder lost it (renew says so) and anyone may take it.
    assert not await leases.renew("sync", "a", 5, at=t0 + 20)
    stolen = await leases.acquire("sync", "b", 5, at=t0 + 20)
    assert stolen is not None and stolen.holder == "b" and stolen.acquired_at == t0 + 20
    assert not await leases.release("sync", "a")  # not a's any more
    assert await leases.release("sync", "b")
    assert await leases.get("sync") is None
    assert (await leases.acquire("sync", "a", 5)) is not None  # free again


async def test_lease_race_over_two_connections_has_one_winner(db_target: str) -> None:
    """Many coroutines on two Database objects (as two processes) race for a free
    lease, then for an expired one: exactly one wins each time."""
    first = await Database.open(db_target)
    second = await Database.open(db_target)
    try:
        from runtime.store.replicas import LeaseStore

        stores = [LeaseStore(first), LeaseStore(second)]
        t0 = time.time()
        for round_, at in enumerate((t0, t0 + 10, t0 + 20, t0 + 30)):
            holders = [f"r{round_}-{i}" for i in range(24)]
            results = await asyncio.gather(
                *(
                    stores[i % 2].acquire("race", holder, 5, at=at)
                    for i, holder in enumerate(holders)
                )
            )
            winners = [lease for lease in results if lease is not None]
            assert len(winners) == 1, winners
            held = await stores[0].get("race")
            assert held is not None and held.holder == winners[0].holder
            # Renewals against the winner's lease: only the winner's succeeds.
            renewals = await asyncio.gather(
                *(
                    stores[i % 2].renew("race", holder, 5, at=at + 1)
                    for i, holder in enumerate(holders)
                )
            )
            assert sum(renewals) == 1
    finally:
        await first.close()
        await second.close()


# -- shared state --------------------------------------------------------------


async def test_shared_state_put_cas_fenced_and_daily_claims(db_target: str) -> None:
    first = await open_stores(db_target)
    second = await open_stores(db_target)
    try:
        state = first.state
        assert await state.get("k") is None
        assert await state.compare_and_set("k", "one", None) == 1
        assert await state.compare_and_set("k", "two", None) is None  # exists already
        assert await state.compare_and_set("k", "two", 5) is None  # wrong version
        assert await state.compare_and_set("k", "two", 1) == 2
        assert await state.put("k", "three") == 3
        got = await second.state.get("k")
        assert got is not None and (got.value, got.version) == ("three", 3)

        # A fenced write goes through only for the lease's holder.
        await first.leases.acquire("matrix-sync:@d:x", "a", 5)
        assert await state.put_if_holder("token", "s1", "matrix-sync:@d:x", "a") == 1
        assert await state.put_if_holder("token", "s0", "matrix-sync:@d:x", "b") is None
        late = time.time() + 60  # a's lease has expired by then
        assert await state.put_if_holder("token", "s2", "matrix-sync:@d:x", "a", at=late) is None
        token = await second.state.get("token")
        assert token is not None and token.value == "s1"

        # Once per period across both "processes", even when they ask together.
        t0 = time.time()
        claims = await asyncio.gather(
            *(
                (first, second)[i % 2].state.claim_period("daily", 100, f"r{i}", at=t0)
                for i in range(16)
            )
        )
        assert sum(claims) == 1
        assert not await second.state.claim_period("daily", 100, "late", at=t0 + 50)
        assert await second.state.claim_period("daily", 100, "next", at=t0 + 101)
        assert await state.delete("daily")
    finally:
        await first.close()
        await second.close()


# -- ownership and inbox takeover ----------------------------------------------


async def test_inbox_takeover_only_from_dead_or_old_unowned_owners(stores: Stores) -> None:
    t0 = time.time()
    replicas, inbox = stores.replicas, stores.inbox
    await replicas.register("live", "live", "h", 1, at=t0)
    await replicas.register("dead", "dead", "h", 2, at=t0 - 100)
    live_row = await inbox.insert("slack:C1|1", "U1", "live's", owner="live")
    dead_row = await inbox.insert("slack:C1|2", "U1", "dead's", owner="dead")
    old_unowned = await inbox.insert("slack:C1|3", "U1", "pre-v10", owner="legacy-uuid")
    other_platform = await inbox.insert("matrix:!r|4", "U1", "matrix", owner="dead")
    ours = await inbox.insert("slack:C1|5", "U1", "mine", owner="me")
    taken = await stores.ownership.take_abandoned_inbox(
        "me",
        live_after=t0 - 20,
        unowned_before=time.time() + 1,  # every unregistered claim is older
        platforms=["slack"],
        limit=100,
    )
    assert set(taken) == {dead_row.inbox_id, old_unowned.inbox_id}
    for row_id, owner in (
        (live_row.inbox_id, "live"),
        (other_platform.inbox_id, "dead"),
        (ours.inbox_id, "me"),
        (dead_row.inbox_id, "me"),
    ):
        found = await inbox.get(row_id)
        assert found is not None and found.owner == owner
    # A second survivor finds nothing left to take.
    assert (
        await stores.ownership.take_abandoned_inbox(
            "other", live_after=t0 - 20, unowned_before=t0, platforms=["slack"], limit=100
        )
        == []
    )
    # An unregistered owner's row claimed after the earliest live start is left alone.
    fresh = await inbox.insert("slack:C1|6", "U1", "new legacy", owner="legacy-2")
    assert fresh.inbox_id not in await stores.ownership.take_abandoned_inbox(
        "me", live_after=t0 - 20, unowned_before=t0 - 1, platforms=["slack"], limit=100
    )


# -- two services on one database ----------------------------------------------


async def _runtime(tmp_path: Path, db_target: str, base_url: str, **extra: Any) -> Runtime:
    values: dict[str, Any] = {
        "heartbeat_interval": 0.1,
        "replica_timeout": 1.0,
        "requesters": ["*"],
        **extra,
    }
    settings = make_settings(tmp_path, base_url, db=db_target, **values)
    return await build_runtime(settings)


async def _running_task(service: ChatService, question: str) -> asyncio.Task[Any]:
    """A real task of the loop, stored as running and waiting for the model."""
    job = asyncio.create_task(
        service.loop.run_chat(question, conversation=f"slack:C1|{question}", requested_by="U1")
    )

    async def stored() -> list[str]:
        return await service.runtime.stores.ownership.running_by(service.instance)

    await until(stored)
    return job


async def test_survivor_interrupts_only_the_dead_replicas_tasks(
    tmp_path: Path, db_target: str, model_server: FakeModelServer
) -> None:
    model_server.set_default(ACTION, Hang(60))  # every task stays running
    rt_a = await _runtime(tmp_path / "a", db_target, model_server.base_url)
    rt_b = await _runtime(tmp_path / "b", db_target, model_server.base_url)
    a, b = ChatService(rt_a), ChatService(rt_b)
    jobs: list[asyncio.Task[Any]] = []
    try:
        await a.start()
        await b.start()
        jobs.append(await _running_task(a, "qa"))
        jobs.append(await _running_task(b, "qb"))
        (task_a,) = await rt_a.stores.ownership.running_by(a.instance)
        (task_b,) = await rt_b.stores.ownership.running_by(b.instance)

        # Both alive: a full recovery, at start and periodic, touches neither.
        await b.recover()
        await b.recover_periodically()
        await a.recover_periodically()
        for task_id in (task_a, task_b):
            task = await rt_b.stores.tasks.get_task(task_id)
            assert task is not None and task.status == "running"

        # a dies without a word (its heartbeat stops, its work vanishes).
        heartbeat = a.replica._task
        assert heartbeat is not None
        heartbeat.cancel()
        jobs[0].cancel()

        async def interrupted() -> bool:
            await b.recover_periodically()
            task = await rt_b.stores.tasks.get_task(task_a)
            return task is not None and task.status == "interrupted"

        await until(interrupted, within=20)
        events = [e.event_type for e in await rt_b.stores.events.list_events(task_a)]
        assert events.count("task_interrupted") == 1
        survivor = await rt_b.stores.tasks.get_task(task_b)
        assert survivor is not None and survivor.status == "running"
        assert await rt_b.stores.ownership.owner_of(task_b) == b.instance
        # Rounds after that change nothing more.
        await b.recover_periodically()
        events = [e.event_type for e in await rt_b.stores.events.list_events(task_a)]
        assert events.count("task_interrupted") == 1
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        for service, rt in ((a, rt_a), (b, rt_b)):
            await service.close()
            await rt.close()


async def test_clean_stop_lets_a_survivor_act_at_once(
    tmp_path: Path, db_target: str, model_server: FakeModelServer
) -> None:
    model_server.set_default(ACTION, Hang(60))
    # A long timeout: only the stop mark can make a dead before the test ends.
    rt_a = await _runtime(tmp_path / "a", db_target, model_server.base_url, replica_timeout=600)
    rt_b = await _runtime(tmp_path / "b", db_target, model_server.base_url, replica_timeout=600)
    a, b = ChatService(rt_a), ChatService(rt_b)
    try:
        await a.start()
        await b.start()
        job = await _running_task(a, "qa")
        (task_a,) = await rt_a.stores.ownership.running_by(a.instance)
        await b.recover_periodically()
        still = await rt_b.stores.tasks.get_task(task_a)
        assert still is not None and still.status == "running"
        job.cancel()  # the process ends: its task is left running in the store
        await asyncio.gather(job, return_exceptions=True)
        await a.close()  # the clean exit marks the replica stopped
        await b.recover_periodically()
        task = await rt_b.stores.tasks.get_task(task_a)
        assert task is not None and task.status == "interrupted"
    finally:
        await a.close()
        await b.close()
        await rt_a.close()
        await rt_b.close()


async def test_continuation_moves_ownership_to_the_continuing_replica(
    tmp_path: Path, db_target: str, model_server: FakeModelServer
) -> None:
    """A task asked on one replica and approved on another is the second's from
    the continuation on (claimed once: the first replica's own claim fails)."""
    rt_a = await _runtime(tmp_path / "a", db_target, model_server.base_url)
    rt_b = await _runtime(tmp_path / "b", db_target, model_server.base_url)
    a, b = ChatService(rt_a), ChatService(rt_b)
    try:
        await a.start()
        await b.start()
        result = await rt_a.loop.run_command("touch made.txt", conversation="slack:C1|x")
        assert result.status == "waiting_for_approval" and result.pending_approval is not None
        assert await rt_a.stores.ownership.owner_of(result.task_id) == a.instance
        approval_id = result.pending_approval.approval_id
        outcome = await rt_b.approvals.decide(approval_id, "approve", "console:op")
        assert outcome.taken
        done, again = await asyncio.gather(
            rt_b.loop.continue_after_approval(result.task_id, approval_id),
            rt_a.loop.continue_after_approval(result.task_id, approval_id),
        )
        assert sorted([done.already_handled, again.already_handled]) == [False, True]
        winner = b if not done.already_handled else a
        assert await rt_a.stores.ownership.owner_of(result.task_id) == winner.instance
        finished = await rt_a.stores.tasks.get_task(result.task_id)
        assert finished is not None and finished.status == "completed"
        assert (tmp_path / "a" / "workspace" / "made.txt").exists() or (
            tmp_path / "b" / "workspace" / "made.txt"
        ).exists()
    finally:
        for service, rt in ((a, rt_a), (b, rt_b)):
            await service.close()
            await rt.close()


async def test_a_runtime_without_a_chat_service_serves_as_a_replica(
    tmp_path: Path, db_target: str, model_server: FakeModelServer
) -> None:
    """`ducklm console` and the like: `serving(runtime)` registers a replica whose
    heartbeat makes the loop's tasks its own, and marks it stopped at the end."""
    from runtime.replica import serving

    rt = await _runtime(tmp_path, db_target, model_server.base_url)
    try:
        async with serving(rt) as replica:
            result = await rt.loop.run_command("echo owned", conversation="console:local")
            assert await rt.stores.ownership.owner_of(result.task_id) == replica.replica_id
            assert [r.replica_id for r in await rt.stores.replicas.live(60)] == [replica.replica_id]
        assert rt.loop.owner is None
        assert await rt.stores.replicas.live(60) == []
    finally:
        await rt.close()


# -- timers across replicas ------------------------------------------------------


@pytest.mark.backends("postgres")
async def test_a_timer_notices_an_approval_another_replica_made(
    tmp_path: Path, db_target: str, model_server: FakeModelServer
) -> None:
    """On a shared store a replica's timers re-read it every SHARED_POLL_S: an
    approval made by another replica (whose events never wake this one) is
    planned within seconds, without a restart."""
    from bot.scheduler import SHARED_POLL_S, Scheduler

    rt_a = await _runtime(tmp_path / "a", db_target, model_server.base_url)
    rt_b = await _runtime(tmp_path / "b", db_target, model_server.base_url)
    a, b = ChatService(rt_a), ChatService(rt_b)
    scheduler = Scheduler(a, remind_after=3600.0)
    assert scheduler._poll == SHARED_POLL_S
    try:
        await scheduler.start()
        # Its first round ran and found nothing (so what follows is a re-read).
        timer = scheduler._timers["approvals"]
        deadline = time.monotonic() + 30
        while timer.rounds < 1:
            assert time.monotonic() < deadline, "the approvals timer never ran a round"
            await asyncio.sleep(0.01)
        result = await rt_b.loop.run_command("touch later.txt", conversation="console:b")
        assert result.pending_approval is not None
        approval_id = result.pending_approval.approval_id

        async def planned() -> bool:
            row = await rt_a.stores.db.fetchone(
                "SELECT due_at FROM approvals WHERE approval_id = ?", (approval_id,)
            )
            return row is not None and bool(row["due_at"])  # 0: not planned yet

        await until(planned, within=SHARED_POLL_S * 3 + 5)
    finally:
        await scheduler.stop()
        for service, rt in ((a, rt_a), (b, rt_b)):
            await service.close()
            await rt.close()


async def test_the_daily_housekeeping_runs_once_across_replicas(
    tmp_path: Path, db_target: str, model_server: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    from bot.scheduler import HOUSEKEEPING_KEY, Scheduler

    rt_a = await _runtime(tmp_path / "a", db_target, model_server.base_url)
    rt_b = await _runtime(tmp_path / "b", db_target, model_server.base_url)
    a, b = ChatService(rt_a), ChatService(rt_b)
    caplog.set_level("INFO", logger="ducklm.scheduler")
    try:
        schedulers = [Scheduler(a, remind_after=900.0), Scheduler(b, remind_after=900.0)]
        await asyncio.gather(*(s.daily() for s in schedulers + schedulers))
        skipped = [r for r in caplog.records if "another replica ran it" in r.getMessage()]
        assert len(skipped) == 3  # four daily jobs at once, one ran
        claim = await rt_a.stores.state.get(HOUSEKEEPING_KEY)
        assert claim is not None and claim.version == 1
    finally:
        for service, rt in ((a, rt_a), (b, rt_b)):
            await service.close()
            await rt.close()


async def test_a_restart_marks_its_dead_predecessors_on_this_host_stopped(stores: Stores) -> None:
    """A crashed process's replica on this host is dead at once for its
    successor (no wait for the timeout): its pid runs no more, or it is this
    process's own pid from before this process started (a container restart).
    A live process's replica, or another host's, is left alone."""
    import os
    import socket

    from runtime.replica import PROCESS_STARTED

    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()  # reaped: the pid runs no more
    host = socket.gethostname()
    t0 = time.time()
    await stores.replicas.register("crashed", "n", host, gone.pid, at=t0)
    await stores.replicas.register("same-pid", "n", host, os.getpid(), at=PROCESS_STARTED - 60)
    await stores.replicas.register("parent", "n", host, os.getppid(), at=t0)
    await stores.replicas.register("elsewhere", "n", "other-host", gone.pid, at=t0)
    replica = Replica(stores.replicas, name="me", heartbeat_interval=60, timeout=60)
    try:
        await replica.start()
        alive = {r.replica_id for r in await stores.replicas.live(60)}
        assert alive == {"parent", "elsewhere", replica.replica_id}
    finally:
        await replica.stop()


# -- settings ------------------------------------------------------------------


def test_a_heartbeat_slower_than_half_the_replica_timeout_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    monkeypatch.setenv("DUCKLM_HEARTBEAT_INTERVAL", "15")
    monkeypatch.setenv("DUCKLM_REPLICA_TIMEOUT", "20")
    with pytest.raises(ValueError) as refused:
        make_settings(tmp_path)
    said = str(refused.value)
    assert "DUCKLM_HEARTBEAT_INTERVAL (15 s)" in said and "DUCKLM_REPLICA_TIMEOUT (20 s)" in said
    monkeypatch.setenv("DUCKLM_HEARTBEAT_INTERVAL", "10")  # exactly half: accepted
    settings = make_settings(tmp_path)
    assert (settings.heartbeat_interval, settings.replica_timeout) == (10, 20)


@pytest.mark.parametrize("encryption", [True, False])
async def test_a_matrix_standby_with_encryption_leaves_matrix_messages_to_the_holder(
    tmp_path: Path, db_target: str, model_server: FakeModelServer, encryption: bool
) -> None:
    """A replica serving Matrix that does not hold the sync lease (it has not
    synced here) cannot answer in encrypted rooms: with encryption on, its
    recovery takes over no Matrix message a dead replica left open; with it off,
    Matrix is one of the platforms it takes over."""
    from bot.matrix.platform import MatrixPlatform

    rt = await _runtime(
        tmp_path,
        db_target,
        model_server.base_url,
        matrix_homeserver="http://127.0.0.1:9",
        matrix_user_id="@duck:localhost",
        matrix_password="unused",
        matrix_encryption=encryption,
    )
    service = ChatService(rt)
    MatrixPlatform(service, rt.settings)  # registers itself, never started
    try:
        await service.start()
        stores = rt.stores
        await stores.replicas.register("dead", "dead", "h", 2, at=time.time() - 100)
        assert await stores.replicas.stop("dead")
        if not encryption:
            assert "matrix" in service.recovery._inbox_platforms()
            return
        row = await stores.inbox.insert(
            "matrix:!r:localhost|$e", "@a:localhost", "hi", owner="dead"
        )
        assert "matrix" not in service.recovery._inbox_platforms()
        await service.recover_periodically()
        assert await stores.inbox.count_open() == 1
        kept = await stores.inbox.get(row.inbox_id)
        assert kept is not None and kept.owner == "dead"
    finally:
        await service.close()
        await rt.close()


@pytest.mark.backends("postgres", reason="SQLite keeps the process clock (one host)")
async def test_liveness_and_leases_use_the_database_clock_not_the_hosts(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock is an hour ahead must not stamp heartbeats or lease
    expiries in the future (other replicas would see it alive, or its lease held,
    an hour too long): on PostgreSQL "now" is the database's."""
    import runtime.store.replicas as replica_sql

    real = time.time
    monkeypatch.setattr(replica_sql, "now", lambda: real() + 3600)
    db_now = await replica_sql.clock(stores.db)
    assert abs(db_now - real()) < 60  # same machine here: the real time
    await stores.replicas.register("skewed", "skewed", "h", 1)
    assert await stores.replicas.heartbeat("skewed")
    row = await stores.replicas.get("skewed")
    assert row is not None and abs(row.heartbeat_at - db_now) < 60
    lease = await stores.leases.acquire("sync", "skewed", 30)
    assert lease is not None and abs(lease.expires_at - (db_now + 30)) < 60
    # Dead by the database's clock once its heartbeat is older than `within`.
    await stores.replicas.register("old", "old", "h", 2, at=db_now - 100)
    live = [r.replica_id for r in await stores.replicas.live(20)]
    assert "skewed" in live and "old" not in live
