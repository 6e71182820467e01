"""Issue #19: two `ducklm run` replicas on one Matrix account and one PostgreSQL,
against the real Synapse (tests/fakes/synapse.py). One replica syncs at a time,
holding the `matrix-sync` lease; a SIGKILL of that one mid-conversation hands
the lease to the other within seconds, which continues from the sync token
stored in the database: every message is answered exactly once, none twice,
none missed.

Each replica has its own DUCKLM_DATA_DIR, so the survivor cannot read the
killed one's local files: it resumes from the database or not at all (a fresh
sync would skip the messages sent during the gap, or answer old ones again).
A message the killed replica had already started on is answered by the
survivor's interruption note instead of an answer; that is still its one reply.
Encryption is on (the default), so the survivor also takes over the killed
one's device keys from the crypto store snapshot in the database (the rooms
themselves are not encrypted; tests/test_matrix_lease.py covers an encrypted
room across a takeover).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.fakes.openai_server import FakeModelServer
from tests.fakes.slack_api import FakeSlack
from tests.fakes.synapse import MatrixUser, SynapseServer
from tests.replicas import REPLICA_TIMEOUT, HeldScript, ReplicaSet, replica_db, wait_until
from tests.test_matrix import PASSWORD, body, bot_events_in_thread, room_with_bot

__all__ = ["replica_db"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(240)

# How long a standby may take to notice the holder is gone and take the lease:
# the lease's TTL plus a few renewal periods, far below a person's patience.
TAKEOVER_S = float(REPLICA_TIMEOUT) + 20


@pytest.fixture
def duck(synapse: SynapseServer) -> str:
    return synapse.register(synapse.unique("duck"), PASSWORD)


@pytest_asyncio.fixture
async def alice(synapse: SynapseServer) -> AsyncIterator[MatrixUser]:
    user_id = synapse.register(synapse.unique("alice"), PASSWORD)
    user = await MatrixUser(synapse, user_id, PASSWORD).login()
    try:
        yield user
    finally:
        await user.close()


@pytest_asyncio.fixture
async def replicas(
    tmp_path: Path,
    slack: FakeSlack,
    model_server: FakeModelServer,
    synapse: SynapseServer,
    duck: str,
    alice: MatrixUser,
    replica_db: str,
) -> AsyncIterator[ReplicaSet]:
    HeldScript(model_server).release()  # nothing is held: ask-N answers at once
    group = ReplicaSet(
        tmp_path,
        slack,
        model_server,
        db=replica_db,
        count=2,
        MATRIX_HOMESERVER=synapse.base_url,
        MATRIX_USER_ID=duck,
        MATRIX_PASSWORD=PASSWORD,
        DUCKLM_MATRIX_ALLOWED_INVITERS=alice.user_id,
    )
    try:
        await group.start()
        yield group
    finally:
        await group.close()


async def sync_holder(group: ReplicaSet) -> str | None:
    """The name of the replica holding the Matrix sync lease now (None: nobody)."""
    found = await group.db.rows(
        "SELECT r.name FROM leases l JOIN replicas r ON r.replica_id = l.holder "
        "WHERE l.name LIKE ? AND l.expires_at > ?",
        ("matrix%", time.time()),
    )
    return str(found[0][0]) if found else None


def replies(alice: MatrixUser, duck: str, root: str) -> list[str]:
    """The bot's message bodies in the thread of `root` (answers, notes, cards)."""
    return [body(e) for e in bot_events_in_thread(alice, duck, root)]


def final_replies(alice: MatrixUser, duck: str, root: str) -> list[str]:
    """Its answers and interruption notes: what "answered" means for one message.
    (An answer may follow a note, e.g. that the message waited for a takeover.)"""
    return [
        text
        for text in replies(alice, duck, root)
        if "Answer: " in text or "interrupted" in text.lower()
    ]


async def answered(alice: MatrixUser, duck: str, roots: dict[str, str]) -> bool:
    await alice.sync(200)
    return all(final_replies(alice, duck, root) for root in roots.values())


async def test_a_killed_syncing_replica_hands_over_and_every_message_is_answered_once(
    replicas: ReplicaSet, alice: MatrixUser, duck: str
) -> None:
    holder = await wait_until(lambda: sync_holder(replicas), "one replica to sync", within=30)
    syncing = next(r for r in replicas.replicas if r.name == holder)
    standby = next(r for r in replicas.replicas if r is not syncing)

    room = await room_with_bot(alice, duck)
    roots: dict[str, str] = {}
    for n in (1, 2):
        roots[f"ask-{n}"] = await alice.say(room, f"what about ask-{n}", mention=duck)
    await wait_until(lambda: answered(alice, duck, roots), "the first answers", within=60)
    assert await sync_holder(replicas) == syncing.name  # the standby never took over

    # Mid-conversation: a message, the holder killed at once, two more while
    # nobody syncs.
    roots["ask-3"] = await alice.say(room, "what about ask-3", mention=duck)
    await syncing.kill()
    killed_at = time.monotonic()
    for n in (4, 5):
        roots[f"ask-{n}"] = await alice.say(room, f"what about ask-{n}", mention=duck)

    await wait_until(
        lambda: _held_by(replicas, standby.name), "the standby to take the lease", within=TAKEOVER_S
    )
    took_over = time.monotonic() - killed_at
    try:
        await wait_until(lambda: answered(alice, duck, roots), "every message answered", within=60)
    except AssertionError as exc:
        seen = {tag: replies(alice, duck, root) for tag, root in roots.items()}
        raise AssertionError(f"{exc}: {seen}\n{replicas.stderr()}") from None
    replicas.assert_alive()
    await replicas.stop()  # anything a duplicate would post is posted by now
    await alice.sync(200)

    for tag, root in roots.items():
        finals = final_replies(alice, duck, root)
        assert len(finals) == 1, (tag, replies(alice, duck, root), replicas.stderr())
        if tag != "ask-3":  # ask-3 may have been started by the killed replica
            assert finals[0].endswith(f"Answer: {tag}."), (tag, finals)
        tasks = await replicas.db.rows(
            "SELECT task_id, status FROM tasks WHERE conversation LIKE ?", (f"%{root}%",)
        )
        assert len(tasks) == 1, (tag, tasks)
        assert tasks[0][1] in ("completed", "interrupted"), (tag, tasks)
    assert took_over < TAKEOVER_S, took_over
    await replicas.db.assert_consistent()


async def _held_by(group: ReplicaSet, name: str) -> bool:
    return await sync_holder(group) == name
