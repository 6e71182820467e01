"""Steps the Matrix end-to-end tests share, whichever client plays the people
(matrix-nio's MatrixUser or matrix-js-sdk's ElementUser): event predicates, the
model's scripted answers, waits for the bot's replies, and a homeserver that can
go away. tests/test_matrix.py re-exports the names other test modules import
from it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from bot.backend import Thread
from runtime.factory import Runtime
from runtime.store.models import Task
from tests.conftest import ACTION, THINKER, directive
from tests.fakes.openai_server import FakeModelServer, RecordedRequest, Reply, Text
from tests.fakes.synapse import FlakyProxy, SynapseServer

PASSWORD = "correct horse battery staple"
NO_ACTIONS = directive()

Event = dict[str, Any]
Predicate = Callable[[Event], bool]


# -- event predicates -------------------------------------------------------------


def body(event: Event) -> str:
    return str((event.get("content") or {}).get("body") or "")


def relation(event: Event) -> dict[str, Any]:
    return (event.get("content") or {}).get("m.relates_to") or {}


def bot_notice(duck: str, root: str, text: str = "") -> Predicate:
    """A notice by the bot in the thread of `root` that contains `text`."""

    def match(event: Event) -> bool:
        rel = relation(event)
        return (
            event.get("sender") == duck
            and event.get("type") == "m.room.message"
            and (event.get("content") or {}).get("msgtype") == "m.notice"
            and rel.get("rel_type") == "m.thread"
            and rel.get("event_id") == root
            and text in body(event)
        )

    return match


def membership(user_id: str, room_id: str, state: str) -> Predicate:
    return lambda e: (
        e.get("room_id") == room_id
        and e.get("type") == "m.room.member"
        and e.get("state_key") == user_id
        and (e.get("content") or {}).get("membership") == state
    )


def joined(user_id: str, room_id: str) -> Predicate:
    return membership(user_id, room_id, "join")


def left(user_id: str, room_id: str) -> Predicate:
    """`user_id` left `room_id`, or declined its invite (both are membership "leave")."""
    return membership(user_id, room_id, "leave")


def edit_of(event_id: str, text: str) -> Predicate:
    def match(event: Event) -> bool:
        rel = relation(event)
        new = (event.get("content") or {}).get("m.new_content") or {}
        return (
            rel.get("rel_type") == "m.replace"
            and rel.get("event_id") == event_id
            and text in str(new.get("body", ""))
        )

    return match


def bot_events_in_thread(user: Any, duck: str, root: str) -> list[Event]:
    """The bot's messages relating to `root` among what `user` has seen so far."""
    return [
        e
        for e in user.events
        if e.get("sender") == duck
        and e.get("type") == "m.room.message"
        and relation(e).get("event_id") == root
    ]


# -- the model ----------------------------------------------------------------------


def content_answers(model_server: FakeModelServer) -> None:
    """Model replies by content, for tests where tasks run concurrently."""

    def action(request: RecordedRequest) -> Reply:
        return Text(NO_ACTIONS)

    def thinker(request: RecordedRequest) -> Reply:
        question = "?"
        for message in request.body["messages"]:
            if message["role"] == "user" and not message["content"].startswith("tool_"):
                question = message["content"]
        return Text(f"answer to: {question}")

    model_server.set_handler(ACTION, action)
    model_server.set_handler(THINKER, thinker)


def then_answers(model_server: FakeModelServer, text: str) -> None:
    """The agent's next plan wants nothing more, and its answer says `text`."""
    model_server.reply(ACTION, Text(NO_ACTIONS))
    model_server.reply(THINKER, Text(text))


async def tasks_in_thread(runtime: Runtime, room: str, root: str) -> list[Task]:
    """The tasks the bot started in the Matrix thread of `root` in `room`."""
    return await runtime.stores.tasks.list_by_conversation(Thread("matrix", room, root).key)


# -- waiting --------------------------------------------------------------------------


async def poll(read: Callable[[], Any], what: str, within: float = 30.0) -> Any:
    """`read()` once it returns something truthy, within a bound."""
    deadline = time.monotonic() + within
    while not (value := read()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within:.0f} s")
        await asyncio.sleep(0.05)
    return value


async def card_decided(
    user: Any, duck: str, question: str, card: Event, verdict: str, answer: str
) -> Event:
    """`user` (a MatrixUser or an ElementUser) sees the card's edit saying `verdict`,
    then the answer containing `answer` in the question's thread; returns the edit."""
    edit = await user.wait_for(edit_of(card["event_id"], verdict), "the card's edit")
    await user.wait_for(bot_notice(duck, question, answer), "the answer")
    return edit


# -- the homeserver -------------------------------------------------------------------


@asynccontextmanager
async def flaky_proxy(synapse: SynapseServer) -> AsyncIterator[FlakyProxy]:
    """A proxy to the homeserver that a test can cut and restore, stopped afterwards."""
    proxy = FlakyProxy(synapse.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
