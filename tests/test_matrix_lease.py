"""Two Matrix bots on one account and one database (issue #19), in process,
against the real Synapse: only the holder of the sync lease syncs; when it stops
(or vanishes) the other takes over from the sync token stored in the database
(each bot has its own local directory, so nothing on disk can carry it), and
every message is answered exactly once. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.backend import Thread
from bot.matrix import connection as connection_module
from bot.matrix.connection import LEASE_EVERY_S, LEASE_TTL_S, NotHolder
from bot.matrix.platform import MatrixPlatform
from bot.matrix.state import lease_name
from bot.service import ChatService
from runtime.factory import build_runtime
from tests import element_client
from tests.conftest import make_settings
from tests.element_client import ElementUser, OpenElement
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.synapse import MatrixUser, SynapseServer
from tests.postgres import raw_execute, raw_rows
from tests.test_matrix import (
    PASSWORD,
    Bot,
    bot_events_in_thread,
    bot_notice,
    content_answers,
    joined,
    room_with_bot,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.backends("sqlite", "postgres")]

# A standby notices a free lease within a renewal period, an expired one
# within the TTL on top; generous for a loaded machine.
TAKEOVER_S = LEASE_TTL_S + 10 * LEASE_EVERY_S + 10

StartBot = Callable[..., Awaitable[Bot]]
element_packages = element_client.element_packages
element = element_client.element
# Rust crypto's first key exchange on a loaded 2-core box takes a few seconds.
E2EE_WAIT = 60.0


@pytest.fixture(scope="module")
def people(synapse: SynapseServer) -> dict[str, str]:
    return {name: synapse.register(synapse.unique(name), PASSWORD) for name in ("alice", "bob")}


@pytest.fixture
def duck(synapse: SynapseServer) -> str:
    return synapse.register(synapse.unique("duck"), PASSWORD)


@pytest_asyncio.fixture
async def alice(synapse: SynapseServer, people: dict[str, str]) -> AsyncIterator[MatrixUser]:
    user = await MatrixUser(synapse, people["alice"], PASSWORD).login()
    try:
        yield user
    finally:
        await user.close()


@pytest_asyncio.fixture
async def bob(synapse: SynapseServer, people: dict[str, str]) -> AsyncIterator[MatrixUser]:
    user = await MatrixUser(synapse, people["bob"], PASSWORD).login()
    try:
        yield user
    finally:
        await user.close()


@pytest_asyncio.fixture
async def replicas(
    tmp_path: Path,
    db_target: str,
    model_server: FakeModelServer,
    synapse: SynapseServer,
    duck: str,
    people: dict[str, str],
    clean_env: None,
) -> AsyncIterator[StartBot]:
    """Starts bots ("replicas") on one database, each with its own local directory."""
    started: list[Bot] = []

    async def start(name: str, **overrides: Any) -> Bot:
        values: dict[str, Any] = {
            "db": db_target,
            "data_dir": tmp_path / name,
            "replica_name": name,
            "matrix_homeserver": synapse.base_url,
            "matrix_user_id": duck,
            "matrix_password": PASSWORD,
            "matrix_encryption": False,
            "approvers": [f"matrix:{people['alice']}"],
            "admins": [f"matrix:{people['alice']}"],
        }
        values.update(overrides)
        settings = make_settings(tmp_path / name, model_server.base_url, **values)
        runtime = await build_runtime(settings)
        service = ChatService(runtime)
        platform = MatrixPlatform(service, runtime.settings)
        try:
            await platform.start()
        except BaseException:
            await service.close()
            await runtime.close()
            raise
        bot = Bot(runtime, service, platform)
        started.append(bot)
        return bot

    try:
        yield start
    finally:
        for bot in reversed(started):
            await bot.stop()


async def until(check: Callable[[], Any], what: str, within: float = TAKEOVER_S) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within:.0f} s")
        await asyncio.sleep(0.05)


async def lease_tries(bot: Any, count: int) -> None:
    """Wait (bounded) until `bot`'s platform has tried for the sync lease `count`
    more times: a standby then had its chances, and what it did not do, it would
    not do later either."""
    start = bot.platform.connection.lease_tries
    await until(
        lambda: bot.platform.connection.lease_tries >= start + count,
        f"{count} more tries for the lease",
        within=60,
    )


def holder_of(db_target: str, duck: str) -> str | None:
    rows = raw_rows(
        db_target,
        "SELECT holder FROM leases WHERE name = ? AND expires_at > ?",
        (lease_name(duck), time.time()),
    )
    return str(rows[0][0]) if rows else None


async def settle(user: MatrixUser, seconds: float = 1.5) -> None:
    """Let late duplicates (if any) arrive before counting: a bounded quiet spell."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await user.sync(200)


def answers(user: MatrixUser, duck: str, root: str) -> list[dict[str, Any]]:
    return [e for e in bot_events_in_thread(user, duck, root) if "answer to" in str(e["content"])]


async def test_one_syncs_and_the_other_takes_over_from_the_stored_token(
    replicas: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    db_target: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    first = await replicas("one")
    second = await replicas("two")
    # Exactly one syncs; both use the one device of the shared session.
    assert [first.platform.syncing, second.platform.syncing] == [True, False]
    assert first.platform.device_id == second.platform.device_id
    assert holder_of(db_target, duck) == first.service.instance
    # A standby writes nothing of the sync position to its own disk.
    assert not second.platform.state.sync_path.exists()
    content_answers(model_server)

    room = await room_with_bot(alice, duck, bob)
    asked = [await alice.say(room, "first question?", mention=duck)]
    await alice.wait_for(bot_notice(duck, asked[0], "answer to: first question?"), "answer 1")
    # Several tries for the lease later the standby is still a standby.
    await lease_tries(second, 3)
    assert not second.platform.syncing
    assert holder_of(db_target, duck) == first.service.instance

    # The holder stops (a rolling deploy); a message arrives while nobody syncs.
    await first.stop()
    asked.append(await alice.say(room, "asked during the handover?", mention=duck))
    await until(lambda: second.platform.syncing, "takeover by the standby")
    assert holder_of(db_target, duck) == second.service.instance
    asked.append(await bob.say(room, "asked after the handover?", mention=duck))
    for root, text in zip(asked[1:], ("during the handover", "after the handover"), strict=True):
        await alice.wait_for(bot_notice(duck, root, text), f"the answer {text}")

    # The standby's own directory had no sync file when it took over: what it
    # continued from was the database's token (else the message asked during
    # the handover would have been history, never answered).
    await settle(alice)
    for root in asked:
        assert len(answers(alice, duck, root)) == 1, root


async def test_a_vanished_holder_is_replaced_after_its_lease_expires(
    replicas: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    db_target: str,
    model_server: FakeModelServer,
) -> None:
    first = await replicas("one")
    second = await replicas("two")
    content_answers(model_server)
    room = await room_with_bot(alice, duck, bob)
    before = await alice.say(room, "before the crash?", mention=duck)
    await alice.wait_for(bot_notice(duck, before, "answer to"), "the first answer")

    await vanish(first)  # as if SIGKILLed: nothing released
    gone_at = time.monotonic()
    during = await alice.say(room, "asked while nobody syncs?", mention=duck)
    await until(lambda: second.platform.syncing, "the takeover after the lease expired")
    # Not before the dead holder's lease ran out (it never released it).
    assert time.monotonic() - gone_at >= LEASE_TTL_S - 2 * LEASE_EVERY_S
    after = await bob.say(room, "and after?", mention=duck)
    await alice.wait_for(bot_notice(duck, during, "answer to"), "the answer asked in between")
    await alice.wait_for(bot_notice(duck, after, "answer to"), "the answer after")
    await settle(alice)
    for root in (before, during, after):
        assert len(answers(alice, duck, root)) == 1, root


async def test_a_holder_that_loses_its_lease_stops_syncing_at_once(
    replicas: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    db_target: str,
    model_server: FakeModelServer,
) -> None:
    first = await replicas("one")
    second = await replicas("two")
    content_answers(model_server)
    room = await room_with_bot(alice, duck, bob)
    # Someone else holds the lease now (as after a long pause of the holder).
    raw_execute(
        db_target,
        "UPDATE leases SET holder = ?, expires_at = ? WHERE name = ?",
        ("intruder", time.time() + 3600, lease_name(duck)),
    )
    await until(lambda: not first.platform.syncing, "the holder to stop", within=10)
    token_before = raw_rows(
        db_target, "SELECT version FROM shared_state WHERE key = ?", (f"matrix-sync:{duck}",)
    )
    ignored = await alice.say(room, "nobody may handle this yet", mention=duck)
    await lease_tries(first, 3)
    await lease_tries(second, 3)
    assert not first.platform.syncing and not second.platform.syncing
    assert bot_events_in_thread(alice, duck, ignored) == []
    # Neither wrote the sync token while not holding the lease.
    assert (
        raw_rows(
            db_target, "SELECT version FROM shared_state WHERE key = ?", (f"matrix-sync:{duck}",)
        )
        == token_before
    )
    # The intruder goes: one of the two takes over and the message is answered, once.
    raw_execute(db_target, "DELETE FROM leases WHERE name = ?", (lease_name(duck),))
    await until(lambda: first.platform.syncing or second.platform.syncing, "a replica to take over")
    assert not (first.platform.syncing and second.platform.syncing)
    await alice.wait_for(bot_notice(duck, ignored, "answer to"), "the answer after the pause")
    await settle(alice)
    assert len(answers(alice, duck, ignored)) == 1


def vanish(bot: Bot) -> Awaitable[list[Any]]:
    """The bot's Matrix side is gone as if SIGKILLed: its jobs end, nothing is
    released or written."""
    connection = bot.platform.connection
    connection.running = False
    connection._leasing = False
    for job in list(connection._tasks):
        job.cancel()
    return asyncio.gather(*connection._tasks, return_exceptions=True)


async def encrypted_room_answered(
    element: OpenElement, person: str, duck: str, model_server: FakeModelServer
) -> tuple[ElementUser, str, str]:
    """`person` (an Element client with Rust crypto) makes an encrypted room with the
    bot, asks once and reads the encrypted answer: (client, room, question's id)."""
    user = await element(person, PASSWORD, crypto=True)
    content_answers(model_server)
    room = await user.create_room([duck], encrypted=True)
    await user.wait_for(joined(duck, room), "the bot joining", within=E2EE_WAIT)
    root = await user.say(room, "encrypted?")
    await user.wait_for(bot_notice(duck, root, "answer to"), "the first answer", within=E2EE_WAIT)
    return user, room, root


async def test_an_encrypted_room_is_answered_across_a_takeover(
    replicas: StartBot,
    element: OpenElement,
    people: dict[str, str],
    duck: str,
    db_target: str,
    model_server: FakeModelServer,
) -> None:
    """With encryption on and separate local directories, the crypto store follows
    the lease: the new holder restores the old one's snapshot, so it reads what the
    person encrypted for the shared device and answers encrypted."""
    first = await replicas("one", matrix_encryption=True)
    second = await replicas("two", matrix_encryption=True)
    # The holder loads its crypto store as it starts syncing; the standby never does.
    await until(lambda: first.platform.connection.encrypting, "the holder's crypto store")
    assert not second.platform.connection.encrypting
    alice, room, _ = await encrypted_room_answered(element, people["alice"], duck, model_server)
    snapshot = raw_rows(
        db_target, "SELECT version FROM shared_state WHERE key = ?", (f"matrix-crypto:{duck}",)
    )
    assert snapshot, "the holder saved no crypto snapshot"

    # The holder's snapshot is current when it dies (what it sends after its
    # last snapshot is lost with it: docs/deploy.md, bot/matrix/crypto.py).
    await first.platform.connection.save_crypto_snapshot()
    await vanish(first)
    after = await alice.say(room, "encrypted after the takeover?")
    # Syncing starts with the lease; the crypto store is restored and loaded next.
    await until(
        lambda: second.platform.syncing and second.platform.connection.encrypting,
        "the takeover, with the crypto store loaded",
    )
    assert second.platform.device_id == first.platform.device_id
    answer = await alice.wait_for(
        bot_notice(duck, after, "answer to: encrypted after the takeover?"),
        "the answer from the new holder",
        within=E2EE_WAIT,
    )
    on_the_wire = [
        e for e in await alice.room_events(room) if e.get("event_id") == answer["event_id"]
    ]
    assert on_the_wire and on_the_wire[0]["type"] == "m.room.encrypted"
    assert not [e for e in alice.events if "can't read" in str(e.get("content"))]


async def test_a_holder_whose_crypto_store_is_not_loaded_never_sends_in_the_clear(
    replicas: StartBot,
    element: OpenElement,
    people: dict[str, str],
    duck: str,
    model_server: FakeModelServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new holder syncs from the moment it takes the lease, and loads its crypto
    store just after (restoring the snapshot first). nio sends in the clear when no
    Olm machine is loaded, so a send into an encrypted room in that window must
    wait for the store, and refuse if it never loads: never post plaintext."""
    monkeypatch.setattr(connection_module, "CRYPTO_LOAD_WAIT_S", 1.0)
    bot = await replicas("one", matrix_encryption=True)
    connection = bot.platform.connection
    await until(lambda: connection.encrypting, "the holder's crypto store")
    alice, room, root = await encrypted_room_answered(element, people["alice"], duck, model_server)
    thread = Thread("matrix", room, root)

    # The takeover's window: the lease held, the crypto store not loaded yet.
    connection._unload_crypto()
    assert connection.syncing and not connection.encrypting
    with pytest.raises(NotHolder):
        await bot.platform.send(thread, "never in the clear (refused)")

    # The store loads while the send waits: it goes out, encrypted.
    sending = asyncio.create_task(bot.platform.send(thread, "sent once the store loaded"))
    await asyncio.sleep(0)  # the send is waiting for the store
    assert not sending.done()
    await connection._start_crypto()  # as the takeover loads it
    sent = await sending
    monkeypatch.setattr(connection_module, "CRYPTO_LOAD_WAIT_S", 20.0)
    await alice.wait_for(
        lambda e: e.get("event_id") == sent and "sent once the store loaded" in str(e["content"]),
        "the message sent once the store loaded",
        within=E2EE_WAIT,
    )
    on_the_wire = await alice.room_events(room)
    assert [e["type"] for e in on_the_wire if e.get("event_id") == sent] == ["m.room.encrypted"]
    # Nothing the bot sent is in the clear, and the refused text never left it.
    bot_sent = [e for e in on_the_wire if e.get("sender") == duck and e["type"] == "m.room.message"]
    assert bot_sent == []
    assert not [e for e in alice.events if "never in the clear" in str(e.get("content"))]


async def test_with_encryption_a_standby_without_any_crypto_store_refuses_to_take_over(
    replicas: StartBot,
    duck: str,
    db_target: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = await replicas("one", matrix_encryption=True)
    second = await replicas("two", matrix_encryption=True)
    assert first.platform.syncing and not second.platform.syncing
    caplog.set_level(logging.ERROR, logger="ducklm.matrix")
    await vanish(first)
    # No snapshot in the database (as if it were never written) and none on disk.
    raw_execute(db_target, "DELETE FROM shared_state WHERE key = ?", (f"matrix-crypto:{duck}",))
    # It tries (the lease ran out) and refuses, saying why; and keeps refusing.
    await until(
        lambda: any("cannot take over syncing" in r.getMessage() for r in caplog.records),
        "the standby's refusal",
        within=60,
    )
    # Once the vanished holder's lease ran out, with tries at a free lease, too.
    await until(lambda: holder_of(db_target, duck) is None, "the lease to run out", within=60)
    await lease_tries(second, 2)
    assert not second.platform.syncing
    assert holder_of(db_target, duck) is None


async def test_retaking_the_lease_reloads_the_crypto_store_another_holder_moved_on(
    tmp_path: Path, db_target: str, model_server: FakeModelServer, clean_env: None
) -> None:
    """A focused test of the reload (no homeserver: the Olm machines are real, the
    takeovers are the connection's own restore steps). A held the lease with its
    crypto store loaded; B took over from A's snapshot and moved the Olm account
    on (new one-time keys); when A takes the lease back and restores B's snapshot,
    its stale in-memory Olm state is dropped and the restored store loads."""
    from nio import AsyncClient, AsyncClientConfig

    from bot.matrix.state import Session

    user, device = "@duck:localhost", "SHAREDDEV"
    made: list[Any] = []

    async def replica(name: str) -> Any:
        settings = make_settings(
            tmp_path / name,
            model_server.base_url,
            db=db_target,
            data_dir=tmp_path / name,
            replica_name=name,
            matrix_homeserver="http://127.0.0.1:9",
            matrix_user_id=user,
            matrix_password="unused",
            matrix_store_passphrase="same passphrase on every replica",
        )
        runtime = await build_runtime(settings)
        service = ChatService(runtime)
        connection = MatrixPlatform(service, runtime.settings).connection
        made.append((service, runtime))
        config = AsyncClientConfig(**await connection._crypto_config())
        connection.client = AsyncClient(
            connection.homeserver,
            user,
            config=config,
            store_path=str(connection.crypto_store.directory),
        )
        connection.client.user_id = user  # as a login sets it
        connection.client.device_id = connection.device_id = device
        connection.syncing = True  # as the holder (the snapshot is fenced by the lease)
        return connection

    try:
        a, b = await replica("a"), await replica("b")
        await a.shared.save_session(Session(a.homeserver, user, device_id=device))
        assert await a.shared.take_lease(60) is not None
        a.client.load_store()  # A's crypto store, loaded as the holder
        await a.save_crypto_snapshot()
        stale = a.client.olm

        # B takes over from A's snapshot and moves the account on.
        assert await a.shared.release_lease()
        assert await b.shared.take_lease(60) is not None
        await b._restore_crypto()
        b.client.load_store()
        assert b.client.olm.account.identity_keys == stale.account.identity_keys
        b.client.olm.account.generate_one_time_keys(3)
        b.client.olm.save_account()
        moved = dict(b.client.olm.account.one_time_keys["curve25519"])
        await b.save_crypto_snapshot()
        assert await b.shared.release_lease()

        # A takes the lease back: B's snapshot replaces its files, and its
        # in-memory Olm state goes with them (the standby step loads it again).
        assert await a.shared.take_lease(60) is not None
        await a._restore_crypto()
        assert a.client.olm is None and not a.encrypting
        a.client.load_store()
        assert a.client.olm is not stale
        assert dict(a.client.olm.account.one_time_keys["curve25519"]) == moved
    finally:
        for service, runtime in made:
            await service.close()
            await runtime.close()
