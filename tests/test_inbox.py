"""The inbox (issue #15): `ChatService.accept` records a message with its delivery
claims in one transaction, and what becomes of the recorded message."""

from __future__ import annotations

import asyncio

import pytest

import tests.test_recovery as harness
from bot.backend import Thread
from bot.inbox import Accepted, Inbound
from bot.service import LATE_TEXT
from runtime.crashpoints import crash_point
from runtime.settings import Settings
from runtime.store import StoreError, Stores, open_stores
from runtime.store.db import now
from tests.fakes.openai_server import FakeModelServer
from tests.postgres import raw_rows
from tests.test_recovery import (
    APPROVER,
    ASKER,
    Start,
    effects,
    key,
    message,
    only_task,
    refuse_inserts,
    script_approval,
    waiting_with_card,
)

# The fake platform and the bot-process fixtures are test_recovery's.
settings = harness.settings
start = harness.start

pytestmark = [pytest.mark.timeout(120), pytest.mark.backends("sqlite", "postgres")]


def rows(db: str, sql: str) -> list[tuple[object, ...]]:
    """The raw database's rows (its own connection, as another process would see)."""
    return raw_rows(db, sql)


# -- accept -------------------------------------------------------------------


async def test_accept_records_the_message_and_it_becomes_one_task(
    start: Start, model: FakeModelServer
) -> None:
    bot_ = await start()
    assert await bot_.service.accept(message(1, "is web-1 up?")) is Accepted.NEW
    await bot_.service.drain()
    assert bot_.chat.texts(key(1)) == ["Done."]
    task_id = await only_task(bot_.runtime, 1)
    db = bot_.runtime.settings.db
    assert rows(db, "SELECT outcome, task_id, done_at IS NOT NULL FROM inbox") == [
        ("task", task_id, 1)
    ]
    assert sorted(rows(db, "SELECT key FROM deliveries")) == [
        ("test:event:E1",),
        ("test:msg:C1:1.1",),
    ]


async def test_a_duplicate_claims_nothing_not_even_its_new_keys(
    start: Start, model: FakeModelServer
) -> None:
    bot_ = await start()
    first = message(1)
    assert await bot_.service.accept(first) is Accepted.NEW
    # The same message as another event (Slack's app_mention and message): one
    # key is new, one was claimed; nothing is recorded, the new key stays free.
    again = Inbound(first.thread, ASKER, first.text, ("test:event:E99", "test:msg:C1:1.1"))
    assert await bot_.service.accept(again) is Accepted.DUPLICATE
    assert await bot_.service.accept(first) is Accepted.DUPLICATE
    await bot_.service.drain()
    db = bot_.runtime.settings.db
    assert ("test:event:E99",) not in rows(db, "SELECT key FROM deliveries")
    assert rows(db, "SELECT COUNT(*) FROM inbox") == [(1,)]
    assert bot_.chat.texts() == ["Done."]


async def test_accept_failing_mid_transaction_leaves_no_claim(
    start: Start, model: FakeModelServer
) -> None:
    bot_ = await start()
    # The inbox insert fails after both claims ran (a full disk at that moment).
    allow = await refuse_inserts(bot_.runtime.stores.db, bot_.runtime.settings.db, "inbox")
    with pytest.raises(StoreError, match="disk is full"):
        await bot_.service.accept(message(1))
    path = bot_.runtime.settings.db
    assert rows(path, "SELECT COUNT(*) FROM deliveries") == [(0,)]
    assert rows(path, "SELECT COUNT(*) FROM inbox") == [(0,)]
    # Not acknowledged, so the platform delivers it again: now it goes through.
    await allow()
    assert await bot_.service.accept(message(1)) is Accepted.NEW
    await bot_.service.drain()
    assert bot_.chat.texts(key(1)) == ["Done."]


async def test_the_task_is_started_with_the_threads_history(
    start: Start, model: FakeModelServer
) -> None:
    bot_ = await start()
    bot_.chat.history_given = [
        {"role": "user", "content": "web-1 is slow"},
        {"role": "assistant", "content": "load is 12"},
    ]
    assert await bot_.service.accept(message(1, "and now?", in_thread=True)) is Accepted.NEW
    await bot_.service.drain()
    assert bot_.chat.history_asked == [(key(1), "1.1")]
    task = await bot_.runtime.stores.tasks.get_task(await only_task(bot_.runtime, 1))
    assert task is not None and task.history_messages == bot_.chat.history_given


async def test_a_late_message_says_the_bot_was_away(start: Start, model: FakeModelServer) -> None:
    bot_ = await start()
    assert await bot_.service.accept(message(1, late=True)) is Accepted.NEW
    await bot_.service.drain()
    (answer,) = bot_.chat.texts(key(1))
    assert answer.startswith(LATE_TEXT) and answer.endswith("Done.")


async def test_an_empty_message_gets_the_hint_and_no_task(
    start: Start, model_server: FakeModelServer
) -> None:
    bot_ = await start()
    assert await bot_.service.accept(message(1, "  ")) is Accepted.NEW
    await bot_.service.drain()
    assert bot_.chat.texts(key(1)) == [bot_.chat.empty_hint]
    assert await bot_.runtime.stores.tasks.list_by_conversation(key(1)) == []
    assert model_server.requests == []
    assert await bot_.runtime.stores.inbox.count_open() == 0


# -- decision words -------------------------------------------------------------


async def test_a_decision_reply_decides_the_pending_approval(
    start: Start, model_server: FakeModelServer, settings: Settings
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    bot_ = await start()
    _, card, ref = await waiting_with_card(bot_, 1)
    asked = len(model_server.requests)
    reply = Inbound(
        Thread("test", "C1", "1.1"), APPROVER, "approve", ("test:event:R1",), in_thread=True
    )
    assert await bot_.service.accept(reply) is Accepted.NEW
    await bot_.service.drain()
    approval = await bot_.runtime.approvals.get(card.approval_id)
    assert approval is not None and approval.decision == "approve"
    assert bot_.chat.resolved == [(ref, "approve")]
    assert bot_.chat.texts(key(1)) == ["ran it"]
    assert effects(settings) == ["once"]
    # The continuation asked the model; the reply itself never did.
    assert len(model_server.requests) == asked + 2

    # Another "approve" with nothing pending: the late click's answer, no model call.
    asked = len(model_server.requests)
    late = Inbound(
        Thread("test", "C1", "1.1"), ASKER, "approve", ("test:event:R2",), in_thread=True
    )
    assert await bot_.service.accept(late) is Accepted.NEW
    await bot_.service.drain()
    assert len(model_server.requests) == asked
    assert bot_.chat.told[-1][0] == ASKER and "Already decided: approve" in bot_.chat.told[-1][1]
    assert effects(settings) == ["once"]
    assert await bot_.runtime.stores.inbox.count_open() == 0


async def test_a_decision_word_in_a_thread_without_approvals_is_a_question(
    start: Start, model: FakeModelServer
) -> None:
    bot_ = await start()
    reply = Inbound(Thread("test", "C1", "1.1"), ASKER, "approve", ("k1",), in_thread=True)
    assert await bot_.service.accept(reply) is Accepted.NEW
    await bot_.service.drain()
    assert bot_.chat.texts(key(1)) == ["Done."]
    await only_task(bot_.runtime, 1)


# -- the loop closes the row with the task ----------------------------------------


async def test_a_closed_row_makes_no_second_task(start: Start, model: FakeModelServer) -> None:
    bot_ = await start()
    rt = bot_.runtime
    row = await rt.stores.inbox.insert(key(1), ASKER, "hello", owner="someone")
    assert await rt.stores.inbox.close(row.inbox_id, "task", "t-elsewhere")
    result = await rt.loop.run_chat("hello", conversation=key(1), inbox_id=row.inbox_id)
    assert result.already_handled
    assert await rt.stores.tasks.list_by_conversation(key(1)) == []
    assert model.requests == []


# -- the store ------------------------------------------------------------------


async def test_close_is_a_compare_and_set(stores: Stores) -> None:
    row = await stores.inbox.insert("test:C1|1", ASKER, "hi", owner="a")
    results = await asyncio.gather(*(stores.inbox.close(row.inbox_id, "hint") for _ in range(5)))
    assert sorted(results) == [False] * 4 + [True]


async def test_two_processes_take_abandoned_rows_once(db_target: str) -> None:
    one, two = await open_stores(db_target), await open_stores(db_target)
    try:
        for n in range(20):
            await one.inbox.insert(f"test:C1|{n}", ASKER, "hi", owner="dead")
        await one.inbox.insert("other:C1|1", ASKER, "hi", owner="dead")
        cutoff = now()  # both started after the dead process claimed its rows
        a, b = await asyncio.gather(
            one.inbox.take_abandoned("one", cutoff, ["test"]),
            two.inbox.take_abandoned("two", cutoff, ["test"]),
        )
        taken = [r.inbox_id for r in a] + [r.inbox_id for r in b]
        assert len(taken) == len(set(taken)) == 20  # the other platform's row stays
        assert await one.inbox.take_abandoned("three", now() - 60, ["test"]) == []
    finally:
        await one.close()
        await two.close()


async def test_prune_forgets_done_rows_only(stores: Stores) -> None:
    done = await stores.inbox.insert("test:C1|1", ASKER, "old", owner="a")
    await stores.inbox.close(done.inbox_id, "task", "t1")
    still_open = await stores.inbox.insert("test:C1|2", ASKER, "waiting", owner="a")
    recent = await stores.inbox.insert("test:C1|3", ASKER, "new", owner="a")
    await stores.inbox.close(recent.inbox_id, "hint")
    await stores.db.fetchall(
        "UPDATE inbox SET done_at = done_at - 8 * 86400 WHERE inbox_id = ?", (done.inbox_id,)
    )
    await stores.db.fetchall("UPDATE inbox SET received_at = received_at - 8 * 86400")
    assert await stores.inbox.prune() == 1
    assert await stores.inbox.get(done.inbox_id) is None
    assert await stores.inbox.get(still_open.inbox_id) is not None
    assert await stores.inbox.get(recent.inbox_id) is not None


def test_crash_point_is_a_no_op_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DUCKLM_CRASH_AT", raising=False)
    crash_point("message_recorded")  # unset: nothing happens
    monkeypatch.setenv("DUCKLM_CRASH_AT", "waiting_recorded:3")
    crash_point("message_recorded")  # another point: nothing happens
    monkeypatch.setenv("DUCKLM_CRASH_AT", "oops:x")
    with pytest.raises(ValueError, match="DUCKLM_CRASH_AT"):
        crash_point("oops")
