"""The Matrix side of the inbox (issue #15): a message is in the store before the
sync token that carries it is saved, so a store that refuses for a while delays
the answer and never loses it. Real Synapse, real bot, the real SQLite file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bot.backend import Thread
from tests import test_matrix
from tests.fakes.openai_server import FakeModelServer
from tests.fakes.synapse import MatrixUser
from tests.test_matrix import StartBot, bot_events_in_thread, bot_notice, content_answers

pytestmark = pytest.mark.timeout(120)

bots = test_matrix.bots
duck = test_matrix.duck
people = test_matrix.people
alice = test_matrix.alice
bob = test_matrix.bob

LOCKED_FOR = 7.0  # longer than the store's 5 s busy timeout: accept fails once at least


async def test_a_message_the_store_refuses_is_answered_once_it_takes_it(
    bots: StartBot,
    alice: MatrixUser,
    bob: MatrixUser,
    duck: str,
    model_server: FakeModelServer,
    tmp_path: Path,
) -> None:
    bot = await bots()
    room = await test_matrix.room_with_bot(alice, duck, bob)
    content_answers(model_server)

    # Another process holds the database's write lock: accept's transaction
    # cannot start, so the message is not recorded yet.
    blocker = sqlite3.connect(tmp_path / "ducklm.db", timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        question = await alice.say(room, "are you listening?", mention=duck)
        await asyncio.sleep(LOCKED_FOR)  # the fault lasts this long (it is the condition)
        assert not bot_events_in_thread(alice, duck, question)
    finally:
        blocker.rollback()
        blocker.close()

    await alice.wait_for(
        bot_notice(duck, question, "answer to: are you listening?"), "the answer", within=60
    )
    probe = await alice.say(room, "and now?", mention=duck)
    await alice.wait_for(bot_notice(duck, probe, "answer to: and now?"), "the probe's answer")
    await alice.sync(0)
    assert len(bot_events_in_thread(alice, duck, question)) == 1
    tasks = await bot.runtime.stores.tasks.list_by_conversation(
        Thread("matrix", room, question).key
    )
    assert len(tasks) == 1
