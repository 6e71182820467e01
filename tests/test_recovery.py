"""Recovery after a crash (issue #15), in process: each crash window's state is
built through the real code paths, the "process" dies there, and a new
ChatService on the same database (a SQLite file, or PostgreSQL: every test runs on
both) carries out what was owed.

A crash point is made to raise `Crash` (a BaseException: nothing of ours
catches it, as nothing survives a SIGKILL) and the dying service is closed
without draining, which drops its in-memory state the way a kill does. The
subprocess SIGKILL tests of the same windows are tests/test_crash_*.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import bot.service
import runtime.crashpoints
import runtime.loop
from bot.backend import ApprovalCard, CardResolution, ChatBackend, Thread
from bot.inbox import Accepted, Inbound
from bot.recovery import INTERRUPTED_TEXT, LATE_TEXT
from bot.service import MAX_INBOUND_TRIES, ChatService
from runtime.factory import Runtime, build_runtime
from runtime.settings import Settings
from runtime.store import Database
from tests.conftest import ACTION, THINKER, directive, make_settings, shell
from tests.fakes.openai_server import FakeModelServer, Hang, RecordedRequest, Text
from tests.postgres import raw_execute

pytestmark = [pytest.mark.timeout(120), pytest.mark.backends("sqlite", "postgres")]

APPROVER = "test:bob"
ASKER = "test:alice"


class Crash(BaseException):
    """Stands for the SIGKILL a crash point sends in a real `ducklm run`."""


@dataclass
class CrashPoints:
    """Which crash point "kills" the process now (None: none)."""

    at: str | None = None
    reached: list[str] = field(default_factory=list)

    def __call__(self, name: str) -> None:
        self.reached.append(name)
        if name == self.at:
            self.at = None  # the next process runs on
            raise Crash(name)


@pytest.fixture
def crash(monkeypatch: pytest.MonkeyPatch) -> CrashPoints:
    points = CrashPoints()
    for module in (bot.service, runtime.loop, runtime.crashpoints):
        monkeypatch.setattr(module, "crash_point", points)
    return points


class Chat(ChatBackend):
    """A fake chat platform that records what the bot says; `down` makes cards fail."""

    platform = "test"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.cards: list[tuple[str, ApprovalCard, str]] = []
        self.resolved: list[tuple[str, str]] = []
        self.told: list[tuple[str, str]] = []
        self.history_asked: list[tuple[str, str | None]] = []
        self.history_given: list[dict[str, str]] = []
        self.down = False
        self.die_after_post = False  # the process dies right after the card went out
        self.die_on_send = False  # the process dies as it is about to post a message
        self.die_after_send = False  # ... or right after the message went out
        self.sends_fail = False  # posting messages fails (the platform is down)
        self.findable = True  # whether find_card finds cards (a platform may not)

    async def send(self, thread: Thread, text: str) -> str | None:
        if self.die_on_send:
            self.die_on_send = False
            raise Crash("before the answer was posted")
        if self.sends_fail:
            raise ConnectionError("the platform is down")
        self.sent.append((thread.key, text))
        if self.die_after_send:
            self.die_after_send = False
            raise Crash("after the answer went out, before it was recorded")
        return f"m{len(self.sent)}"

    async def send_card(self, thread: Thread, card: ApprovalCard) -> str:
        if self.down:
            raise ConnectionError("the platform is down")
        ref = f"card-{len(self.cards) + 1}"
        self.cards.append((thread.key, card, ref))
        if self.die_after_post:
            self.die_after_post = False
            raise Crash("after the post, before it was recorded")
        return ref

    async def find_answer(self, thread: Thread, text: str) -> bool:
        said = self.texts(thread.key)
        return self.findable and bool(said) and said[-1] == text

    async def find_card(self, thread: Thread, approval_id: str) -> str | None:
        if not self.findable:
            return None
        for key_, card, ref in self.cards:
            if key_ == thread.key and card.approval_id == approval_id:
                return ref
        return None

    async def resolve_card(
        self, thread: Thread, card_ref: str, card: ApprovalCard, resolution: CardResolution
    ) -> None:
        if self.down:
            raise ConnectionError("the platform is down")
        self.resolved.append((card_ref, resolution.decision))

    async def tell(self, thread: Thread, user: str, text: str) -> None:
        self.told.append((user, text))

    async def working(self, thread: Thread, status: str | None) -> None:
        pass

    async def history(self, thread: Thread, before: str | None) -> list[dict[str, str]]:
        self.history_asked.append((thread.key, before))
        return list(self.history_given)

    def texts(self, key: str | None = None) -> list[str]:
        return [text for k, text in self.sent if key is None or k == key]


@dataclass
class Bot:
    runtime: Runtime
    service: ChatService
    chat: Chat


Start = Callable[..., Awaitable[Bot]]


@pytest_asyncio.fixture
async def settings(
    tmp_path: Path, model_server: FakeModelServer, clean_env: None, db_target: str
) -> Settings:
    return make_settings(
        tmp_path, model_server.base_url, db=db_target, approvers=[APPROVER], requesters=["*"]
    )


async def refuse_inserts(db: Database, target: str, table: str) -> Callable[[], Awaitable[None]]:
    """Make every insert into `table` of the store `db` (opened on DUCKLM_DB `target`)
    fail as a full disk would; returns the undo.

    SQLite: a TEMP trigger on the store's own connection. PostgreSQL has no
    connection-local triggers (and the store's statements go over a pool), so a real
    trigger raising SQLSTATE disk_full, created and dropped on a raw connection."""
    name = f"{table}_full"
    if db.dialect == "sqlite":
        await db.fetchall(
            f"CREATE TEMP TRIGGER {name} BEFORE INSERT ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )

        async def undo() -> None:
            await db.fetchall(f"DROP TRIGGER temp.{name}")

        return undo
    url = target
    raw_execute(
        url,
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'database or disk is full' USING ERRCODE = 'disk_full'; "
        "END $$",
    )
    raw_execute(
        url,
        f"CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()",
    )

    async def undo_pg() -> None:
        raw_execute(url, f"DROP TRIGGER {name} ON {table}")
        raw_execute(url, f"DROP FUNCTION {name}()")

    return undo_pg


@pytest_asyncio.fixture
async def start(settings: Settings) -> AsyncIterator[Start]:
    """Start a bot process (a runtime and a service) on the test's database."""
    bots: list[Bot] = []

    async def make(chat: Chat | None = None) -> Bot:
        """`chat`: the platform the previous process talked to (it outlives the bot)."""
        rt = await build_runtime(settings)
        service = ChatService(rt)
        chat = chat or Chat()
        service.add_backend(chat)
        made = Bot(rt, service, chat)
        bots.append(made)
        return made

    try:
        yield make
    finally:
        for made in bots:
            await kill(made)


async def kill(dead: Bot) -> None:
    """The process is gone: its jobs stop where they are, nothing is drained."""
    await dead.service.close()
    await dead.runtime.close()


async def until(check: Callable[[], Any], within: float = 30.0) -> None:
    """Wait (bounded) until `check()` is true; `check` may be async."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within} s")
        await asyncio.sleep(0.02)


def children() -> set[int]:
    """This process's child processes (Linux: every thread's children list)."""
    pids: set[int] = set()
    for path in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids.update(int(pid) for pid in path.read_text().split())
    return pids


def has_observations(request: RecordedRequest) -> bool:
    messages = request.body.get("messages") or []
    last = messages[-1].get("content") if messages else ""
    return isinstance(last, str) and last.startswith("tool_observations:")


def script_approval(server: FakeModelServer, command: str, answer: str = "ran it") -> None:
    """Every question asks for `command` (which needs approval); then the answer."""

    def action(request: RecordedRequest) -> Any:
        if has_observations(request):
            return Text(directive())
        return Text(directive(shell(command, "the user asked")))

    server.set_handler(ACTION, action)
    server.set_default(THINKER, Text(answer))


def message(n: int, text: str = "please record it", **extra: Any) -> Inbound:
    thread = Thread("test", "C1", f"{n}.1")
    return Inbound(
        thread,
        ASKER,
        text,
        (f"test:event:E{n}", f"test:msg:C1:{n}.1"),
        message_id=f"{n}.1",
        **extra,
    )


def key(n: int) -> str:
    return message(n).thread.key


async def event_types(rt: Runtime, task_id: str) -> list[str]:
    return [e.event_type for e in await rt.stores.events.list_events(task_id)]


async def only_task(rt: Runtime, n: int) -> str:
    tasks = await rt.stores.tasks.list_by_conversation(key(n))
    assert len(tasks) == 1, tasks
    return tasks[0].task_id


def effects(settings: Settings) -> list[str]:
    path = Path(settings.workspace) / "effects.log"
    return path.read_text().splitlines() if path.exists() else []


async def waiting_with_card(bot_: Bot, n: int) -> tuple[str, ApprovalCard, str]:
    """Ask (message n) for an action that needs approval; returns its card."""
    assert await bot_.service.accept(message(n)) is Accepted.NEW
    await bot_.service.drain()
    found = [c for c in bot_.chat.cards if c[0] == key(n)]
    assert len(found) == 1, bot_.chat.cards
    return found[0]


# -- each window ------------------------------------------------------------


async def test_message_recorded_becomes_one_task_after_a_restart(
    start: Start, crash: CrashPoints, model: FakeModelServer
) -> None:
    model.set_default(THINKER, Text("web-1 is up"))
    first = await start()
    crash.at = "message_recorded"
    with pytest.raises(Crash):
        await first.service.accept(message(1, "is web-1 up?"))
    await kill(first)

    second = await start()
    assert await second.runtime.stores.tasks.list_by_conversation(key(1)) == []
    assert await second.runtime.stores.inbox.count_open() == 1
    await second.service.recover()
    await second.service.drain()
    assert second.chat.texts(key(1)) == ["web-1 is up"]
    task_id = await only_task(second.runtime, 1)
    assert await second.runtime.stores.inbox.count_open() == 0
    # The platform retries the same delivery: a duplicate, nothing more happens.
    assert await second.service.accept(message(1, "is web-1 up?")) is Accepted.DUPLICATE
    await second.service.recover()
    await second.service.drain()
    assert second.chat.texts() == ["web-1 is up"]
    assert await only_task(second.runtime, 1) == task_id


async def test_waiting_recorded_gets_its_card_once_with_working_buttons(
    start: Start, crash: CrashPoints, model_server: FakeModelServer, settings: Settings
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    first = await start()
    crash.at = "waiting_recorded"
    assert await first.service.accept(message(2)) is Accepted.NEW
    await first.service.drain()
    assert "waiting_recorded" in crash.reached and first.chat.cards == []
    await kill(first)

    second = await start()
    await second.service.recover()
    await second.service.drain()
    assert len(second.chat.cards) == 1
    _, card, ref = second.chat.cards[0]
    stored = await second.runtime.approvals.get(card.approval_id)
    assert stored is not None and (stored.card_state, stored.card_ref) == ("posted", ref)
    await second.service.recover()  # a second round posts nothing more
    await second.service.drain()
    assert len(second.chat.cards) == 1

    assert await second.service.handle_decision(card.approval_id, APPROVER, "approve") is None
    await second.service.drain()
    assert effects(settings) == ["once"]
    assert second.chat.texts(key(2)) == ["ran it"]
    assert second.chat.resolved == [(ref, "approve")]


async def test_decision_recorded_resolves_the_card_and_continues_once(
    start: Start, crash: CrashPoints, model_server: FakeModelServer, settings: Settings
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    first = await start()
    _, card, ref = await waiting_with_card(first, 3)
    crash.at = "decision_recorded"
    with pytest.raises(Crash):
        await first.service.handle_decision(card.approval_id, APPROVER, "approve")
    await kill(first)
    assert first.chat.resolved == [] and effects(settings) == []

    second = await start()
    await second.service.recover()
    await second.service.drain()
    assert second.chat.resolved == [(ref, "approve")]
    assert effects(settings) == ["once"]
    assert second.chat.texts(key(3)) == ["ran it"]
    stored = await second.runtime.approvals.get(card.approval_id)
    assert stored is not None and stored.card_state == "resolved"
    await second.service.recover()
    await second.service.drain()
    assert second.chat.resolved == [(ref, "approve")] and effects(settings) == ["once"]


@pytest.mark.parametrize(
    ("point", "started", "said"),
    [
        ("execution_claimed", False, "did not start"),
        ("command_spawned", None, "may have started, and its result is unknown"),
    ],
)
async def test_cut_short_run_is_offered_again_never_rerun(
    start: Start,
    crash: CrashPoints,
    model_server: FakeModelServer,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    point: str,
    started: bool | None,
    said: str,
) -> None:
    # `sleep` keeps the process alive long enough for the spawn to be seen.
    script_approval(model_server, "echo once >> effects.log; sleep 0.5")
    # Session servers started by earlier tests (Synapse, Node clients) are
    # children of this process too: only the ones this test makes count.
    before = children()
    first = await start()
    _, card, _ = await waiting_with_card(first, 4)
    old = card.approval_id
    crash.at = point
    if point == "command_spawned":
        monkeypatch.setenv("DUCKLM_CRASH_AT", point)  # arms the spawn watch
    assert await first.service.handle_decision(old, APPROVER, "approve") is None
    await first.service.drain()
    assert point in crash.reached
    monkeypatch.delenv("DUCKLM_CRASH_AT", raising=False)
    await kill(first)
    # Whatever the command got to do is done once its process is gone (killed with
    # the dying service's cleanup, or finished: a real SIGKILL leaves it running).
    await until(lambda: not children() - before)
    ran_before = len(effects(settings))
    if point == "execution_claimed":
        assert ran_before == 0

    second = await start()
    await second.service.recover()
    await second.service.drain()
    assert len(effects(settings)) == ran_before, "recovery ran the command by itself"
    texts = second.chat.texts(key(4))
    assert len(texts) == 1 and said in texts[0], texts
    assert len(second.chat.cards) == 1
    _, new_card, _ = second.chat.cards[0]
    new = new_card.approval_id
    assert new != old and new_card.command == card.command
    assert "offered again" in new_card.reason  # the card says why it is back
    task_id = await only_task(second.runtime, 4)
    events = await second.runtime.stores.events.list_events(task_id)
    reissued = [e.payload for e in events if e.event_type == "approval_reissued"]
    assert len(reissued) == 1
    assert (reissued[0]["approval_id"], reissued[0]["replaces"], reissued[0]["started"]) == (
        new,
        old,
        started,
    )
    spent = await second.runtime.approvals.get(old)
    assert spent is not None and spent.decision == "approve" and spent.executed_at is not None
    assert (await second.runtime.approvals.get(new)).replaces_approval_id == old  # type: ignore[union-attr]
    # The old card's button is spent; the new one runs the action once.
    assert "Already decided" in (
        await second.service.handle_decision(old, APPROVER, "approve") or ""
    )
    await second.service.recover()  # idempotent: no second reissue, no second card
    await second.service.drain()
    assert len(second.chat.cards) == 1
    assert await second.service.handle_decision(new, APPROVER, "approve") is None
    await second.service.drain()
    assert len(effects(settings)) == ran_before + 1
    assert second.chat.texts(key(4))[-1] == "ran it"
    task = await second.runtime.stores.tasks.get_task(task_id)
    assert task is not None and task.status == "completed"


async def test_running_task_is_interrupted_with_its_event(
    start: Start, model_server: FakeModelServer
) -> None:
    model_server.set_default(ACTION, Hang(300))
    first = await start()
    assert await first.service.accept(message(5, "why is web-1 slow?")) is Accepted.NEW
    await until(lambda: model_server.requests_for(ACTION))
    await kill(first)  # mid model call

    second = await start()
    await second.service.recover()
    await second.service.drain()
    task_id = await only_task(second.runtime, 5)
    task = await second.runtime.stores.tasks.get_task(task_id)
    assert task is not None and task.status == "interrupted"
    events = await second.runtime.stores.events.list_events(task_id)
    assert events[-1].event_type == "task_interrupted"
    assert events[-1].payload == {
        "last_event": "model_call_started",
        "doing": "waiting for the action model",
    }
    assert second.chat.texts(key(5)) == [INTERRUPTED_TEXT]
    assert await second.runtime.stores.inbox.count_open() == 0  # it became its task


async def test_an_answer_lost_with_the_process_is_posted_once_after_the_restart(
    start: Start, model: FakeModelServer
) -> None:
    first = await start()
    first.chat.die_on_send = True
    assert await first.service.accept(message(14, "is web-1 up?", late=True)) is Accepted.NEW
    await first.service.drain()
    await kill(first)
    assert first.chat.sent == []

    second = await start()
    task = await second.runtime.stores.tasks.get_task(await only_task(second.runtime, 14))
    assert task is not None and task.status == "completed"
    await second.service.recover()
    await second.service.drain()
    (answer,) = second.chat.texts(key(14))
    assert answer == f"{LATE_TEXT}\n\nDone."  # still says it was late
    await second.service.recover()
    await second.service.recover_periodically()
    assert second.chat.texts() == [answer]


@pytest.mark.parametrize("findable", [True, False], ids=["found", "not-findable"])
async def test_an_answer_out_but_not_recorded_is_found_not_posted_twice(
    start: Start, model: FakeModelServer, findable: bool
) -> None:
    first = await start()
    first.chat.die_after_send = True
    assert await first.service.accept(message(17, "is web-1 up?")) is Accepted.NEW
    await first.service.drain()
    await kill(first)
    assert first.chat.texts(key(17)) == ["Done."]
    first.chat.findable = findable

    second = await start(first.chat)
    await second.service.recover()
    await second.service.drain()
    # A platform that can find it is asked; one that cannot gets it again.
    assert second.chat.texts(key(17)) == ["Done."] * (1 if findable else 2)
    await second.service.recover_periodically()
    assert len(second.chat.texts(key(17))) == (1 if findable else 2)


async def test_an_answer_the_platform_refused_is_posted_by_the_next_round(
    start: Start, model: FakeModelServer
) -> None:
    bot_ = await start()
    bot_.chat.sends_fail = True
    assert await bot_.service.accept(message(15, "is web-1 up?")) is Accepted.NEW
    await bot_.service.drain()
    assert bot_.chat.sent == []
    await bot_.service.recover_periodically()  # still down: nothing, and no error
    bot_.chat.sends_fail = False
    await bot_.service.recover_periodically()
    await bot_.service.recover_periodically()
    assert bot_.chat.texts() == ["Done."]


async def test_a_message_the_database_refused_is_retried_a_bounded_number_of_times(
    start: Start, model: FakeModelServer
) -> None:
    bot_ = await start()
    allow = await refuse_inserts(bot_.runtime.stores.db, bot_.runtime.settings.db, "tasks")
    assert await bot_.service.accept(message(16, "is web-1 up?")) is Accepted.NEW
    await bot_.service.drain()
    for _ in range(5):
        await bot_.service.recover_periodically()
        await bot_.service.drain()
    notices = bot_.chat.texts(key(16))
    assert len(notices) == MAX_INBOUND_TRIES, notices
    assert all("could not save its work" in text for text in notices)
    assert await bot_.runtime.stores.inbox.count_open() == 1  # still owed
    await allow()
    await kill(bot_)

    again = await start()  # the next start takes it up
    await again.service.recover()
    await again.service.drain()
    assert again.chat.texts(key(16)) == ["Done."]


async def test_cards_are_repaired_after_the_platform_was_down(
    start: Start, model_server: FakeModelServer, settings: Settings
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    bot_ = await start()
    bot_.chat.down = True
    assert await bot_.service.accept(message(6)) is Accepted.NEW
    await bot_.service.drain()
    assert bot_.chat.cards == []
    (pending,) = await bot_.runtime.approvals.pending()
    assert pending.card_state == "unposted"

    bot_.chat.down = False
    await bot_.service.recover_periodically()
    await bot_.service.drain()
    assert [c[1].approval_id for c in bot_.chat.cards] == [pending.approval_id]

    bot_.chat.down = True
    assert await bot_.service.handle_decision(pending.approval_id, APPROVER, "deny") is None
    await bot_.service.drain()
    stored = await bot_.runtime.approvals.get(pending.approval_id)
    assert stored is not None and stored.card_state == "posted" and bot_.chat.resolved == []

    bot_.chat.down = False
    await bot_.service.recover_periodically()
    await bot_.service.drain()
    assert bot_.chat.resolved == [("card-1", "deny")]
    await bot_.service.recover_periodically()
    assert bot_.chat.resolved == [("card-1", "deny")]
    assert effects(settings) == []


async def died_while_posting(start: Start, n: int) -> tuple[Chat, str, str]:
    """A process whose card went out and died before recording it; returns the
    platform, the approval id and the card's reference."""
    dying = await start()
    dying.chat.die_after_post = True
    assert await dying.service.accept(message(n)) is Accepted.NEW
    await dying.service.drain()
    await kill(dying)
    ((_, card, ref),) = dying.chat.cards
    stored = await dying_approval(dying, card.approval_id)
    assert stored == ("unposted", None, True)
    return dying.chat, card.approval_id, ref


async def dying_approval(bot_: Bot, approval_id: str) -> tuple[str, str | None, bool]:
    rt = await build_runtime(bot_.runtime.settings)
    try:
        approval = await rt.approvals.get(approval_id)
        assert approval is not None
        return approval.card_state, approval.card_ref, approval.card_claimed_at is not None
    finally:
        await rt.close()


async def test_a_card_posted_but_not_recorded_is_found_not_posted_twice(
    start: Start, model_server: FakeModelServer, settings: Settings
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    chat, approval_id, ref = await died_while_posting(start, 8)
    second = await start(chat)
    await second.service.recover()
    await second.service.drain()
    assert len(chat.cards) == 1
    stored = await second.runtime.approvals.get(approval_id)
    assert stored is not None and (stored.card_state, stored.card_ref) == ("posted", ref)
    assert await second.service.handle_decision(approval_id, APPROVER, "approve") is None
    await second.service.drain()
    assert chat.resolved == [(ref, "approve")] and effects(settings) == ["once"]


async def test_a_click_on_an_unrecorded_card_adopts_and_resolves_it(
    start: Start, model_server: FakeModelServer, settings: Settings
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    chat, approval_id, ref = await died_while_posting(start, 9)
    chat.findable = False
    second = await start(chat)
    # The click names its card; nothing else could have found it.
    assert (
        await second.service.handle_decision(approval_id, APPROVER, "approve", card_ref=ref) is None
    )
    await second.service.drain()
    assert chat.resolved == [(ref, "approve")] and effects(settings) == ["once"]
    stored = await second.runtime.approvals.get(approval_id)
    assert stored is not None and stored.card_state == "resolved"


async def test_a_decision_on_an_unrecorded_card_is_shown_on_it(
    start: Start, model_server: FakeModelServer
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    chat, approval_id, ref = await died_while_posting(start, 10)
    second = await start(chat)
    # Decided before any recovery ran (from another surface: no card named).
    assert await second.service.handle_decision(approval_id, APPROVER, "deny") is None
    await second.service.drain()
    assert chat.resolved == [(ref, "deny")] and len(chat.cards) == 1
    await second.service.recover_periodically()
    await second.service.drain()
    assert chat.resolved == [(ref, "deny")] and len(chat.cards) == 1


async def test_cards_of_platforms_served_elsewhere_are_left_alone(
    start: Start, model_server: FakeModelServer
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    bot_ = await start()
    result = await bot_.runtime.loop.run_chat(
        "please record it", conversation="other:C9|1.1", requested_by=ASKER
    )
    assert result.status == "waiting_for_approval"
    await bot_.service.recover_periodically()
    await bot_.service.drain()
    assert bot_.chat.cards == []
    lagging = [
        approval
        async for page in bot_.runtime.stores.approvals.iter_cards_lagging(["other"])
        for approval in page
    ]
    assert [a.approval_id for a in lagging] == [result.pending_approval.approval_id]  # type: ignore[union-attr]


async def test_expiry_changes_the_task_with_its_event(
    start: Start, model_server: FakeModelServer
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    bot_ = await start()
    _, card, ref = await waiting_with_card(bot_, 7)
    await bot_.service.expire_approval(card.approval_id)
    task_id = await only_task(bot_.runtime, 7)
    types = await event_types(bot_.runtime, task_id)
    assert types[-2:] == ["approval_expired", "task_expired"]
    task = await bot_.runtime.stores.tasks.get_task(task_id)
    assert task is not None and task.status == "expired"
    assert bot_.chat.resolved == [(ref, "expired")]


# -- idempotency --------------------------------------------------------------


async def test_two_processes_recovering_at_once_do_everything_once(
    start: Start, crash: CrashPoints, model_server: FakeModelServer, settings: Settings
) -> None:
    script_approval(model_server, "echo once >> effects.log")
    # Four dead processes, each killed in another window.
    dying = await start()
    dying.chat.die_on_send = True
    model_server.reply(ACTION, Text(directive()))  # message 14 is answered at once
    await dying.service.accept(message(14, "a question"))
    await dying.service.drain()
    await kill(dying)
    dying = await start()
    crash.at = "message_recorded"
    with pytest.raises(Crash):
        await dying.service.accept(message(11))
    await kill(dying)
    dying = await start()
    crash.at = "waiting_recorded"
    await dying.service.accept(message(12))
    await dying.service.drain()
    await kill(dying)
    dying = await start()
    _, card, _ = await waiting_with_card(dying, 13)
    crash.at = "execution_claimed"
    await dying.service.handle_decision(card.approval_id, APPROVER, "approve")
    await dying.service.drain()
    await kill(dying)

    one, two = await start(), await start()
    for _ in range(2):  # and then once more: nothing changes the second time
        await asyncio.gather(one.service.recover(), two.service.recover())
        await asyncio.gather(one.service.drain(), two.service.drain())
        sent = one.chat.sent + two.chat.sent
        cards = one.chat.cards + two.chat.cards
        # Message 11 became one task, which asked for approval: one card.
        assert [c[0] for c in cards].count(key(11)) == 1
        assert [c[0] for c in cards].count(key(12)) == 1  # the missing card, once
        assert [c[0] for c in cards].count(key(13)) == 1  # the new approval, once
        told = [t for k, t in sent if k == key(13)]
        assert len(told) == 1 and "did not start" in told[0], sent
        assert [t for k, t in sent if k == key(14)] == ["ran it"]  # the lost answer, once
        assert effects(settings) == []
    for n in (11, 12, 13, 14):
        await only_task(one.runtime, n)
    rows = await one.runtime.stores.db.fetchall(
        "SELECT COUNT(*) FROM events WHERE event_type = 'approval_reissued'"
    )
    assert rows[0][0] == 1
    assert await one.runtime.stores.inbox.count_open() == 0


async def test_a_reopened_cut_short_task_never_owes_the_interruption_note(
    start: Start, crash: CrashPoints, model_server: FakeModelServer, settings: Settings
) -> None:
    """Two services on one database: while one recovers a cut-short run, the other
    posts owed answers right after the first one's marking commits. The task is
    reopened in the marking transaction, so it never owes the interruption note:
    the thread hears only that the run did not start, and later its real answer."""
    script_approval(model_server, "echo once >> effects.log")
    dying = await start()
    _, card, _ = await waiting_with_card(dying, 15)
    crash.at = "execution_claimed"
    await dying.service.handle_decision(card.approval_id, APPROVER, "approve")
    await dying.service.drain()
    await kill(dying)

    one, two = await start(), await start()
    recovery = one.service.recovery
    mark = recovery._mark_interrupted
    marked: list[str] = []

    async def then_the_other_answers() -> list[str]:
        # The gap the defect lived in: after the marking commit, before anything else.
        ids = await mark()
        marked.extend(ids)
        await two.service.recovery._answers()
        return ids

    recovery._mark_interrupted = then_the_other_answers  # type: ignore[method-assign]
    await one.service.recover()
    await one.service.drain()
    assert marked, "the dead process's task was not taken over"
    assert INTERRUPTED_TEXT not in one.chat.texts(key(15)) + two.chat.texts(key(15))
    told = one.chat.texts(key(15))
    assert len(told) == 1 and "did not start" in told[0], told
    new = [c for c in one.chat.cards if c[0] == key(15)]
    assert len(new) == 1
    assert await one.service.handle_decision(new[0][1].approval_id, APPROVER, "approve") is None
    await one.service.drain()
    await two.service.recover_periodically()
    await two.service.drain()
    assert effects(settings) == ["once"]
    sent = one.chat.texts(key(15)) + two.chat.texts(key(15))
    assert sent.count("ran it") == 1 and INTERRUPTED_TEXT not in sent, sent


async def test_killed_between_the_approval_and_the_wait_leaves_nothing_pending(
    start: Start, crash: CrashPoints, model_server: FakeModelServer, settings: Settings
) -> None:
    """The approval's row is stored, the task dies before it waits on it: the task
    is interrupted, and the approval is withdrawn with its event rather than left
    pending for ever with no card (it could never be continued)."""
    script_approval(model_server, "echo never >> effects.log")
    first = await start()
    crash.at = "approval_recorded"
    assert await first.service.accept(message(21)) is Accepted.NEW
    await first.service.drain()
    assert "approval_recorded" in crash.reached
    assert len(await first.runtime.approvals.pending(10)) == 1
    await kill(first)

    second = await start()
    await second.service.recover()
    await second.service.drain()
    assert await second.runtime.approvals.pending(10) == []
    assert second.chat.cards == []
    task_id = await only_task(second.runtime, 21)
    task = await second.runtime.stores.tasks.get_task(task_id)
    assert task is not None and task.status == "interrupted"
    events = await second.runtime.stores.events.list_events(task_id)
    kinds = [e.event_type for e in events]
    assert kinds[-2:] == ["approval_expired", "task_interrupted"], kinds
    assert events[-2].payload["decided_by"] == "recovery"
    assert events[-1].payload["doing"].startswith("asking for approval of `echo never")
    assert effects(settings) == []
    await second.service.recover()  # a second round changes nothing
    await second.service.drain()
    assert [e.event_type for e in await second.runtime.stores.events.list_events(task_id)] == kinds


# -- recovery in pages (issue #23): more than a page of each kind, all of it, once --


@dataclass(frozen=True)
class Pages:
    """The page size recovery reads with, and how many rows of each kind a test
    makes: two full pages and a part. PostgreSQL gets the same shape at a fifth of
    the size: each row costs it a few network round trips (a paging test of 450
    rows took 35 s there against 7 s on SQLite), and paging is about the shape."""

    page: int
    many: int

    def numbers(self, base: int) -> list[int]:
        return list(range(base, base + self.many))


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Pages:
    """Pages of `page` rows, and no flood limits (one asker sends `many` messages)."""
    import bot.recovery

    pages = Pages(40, 90) if settings.db_is_postgres else Pages(200, 450)
    monkeypatch.setattr(bot.recovery, "PAGE_SIZE", pages.page)
    for name, value in (
        ("user_max_tasks", 0),
        ("channel_max_tasks", 0),
        ("user_rate", None),
        ("channel_rate", None),
    ):
        monkeypatch.setattr(settings, name, value)
    return pages


async def test_store_pages_hold_at_most_a_page_and_miss_nothing(db_target: str) -> None:
    """Each paged query yields pages of at most `page` rows, each row once, until
    nothing is left (the boundary included: a last page exactly full)."""
    from runtime.store import open_stores

    size = 40
    stores = await open_stores(db_target)
    try:
        made = [await stores.tasks.create_task(f"q{n}", conversation=key(n)) for n in range(80)]
        for task in made:
            await stores.tasks.complete_task(task.task_id, "done")
        pages = [
            [t.task_id for t in page]
            async for page in stores.tasks.iter_owed_answers(
                ["test"], stale_before=time.time(), page=size
            )
        ]
        assert [len(p) for p in pages] == [size, size]
        assert sorted(i for p in pages for i in p) == sorted(t.task_id for t in made)
        for task in made[:30]:
            await stores.tasks.answered(task.task_id)
        left = [
            t.task_id
            async for page in stores.tasks.iter_owed_answers(
                ["test"], stale_before=time.time(), page=size
            )
            for t in page
        ]
        assert sorted(left) == sorted(t.task_id for t in made[30:])
        assert [
            p async for p in stores.tasks.iter_owed_answers(["other"], stale_before=time.time())
        ] == []

        for n in range(90):
            await stores.inbox.insert(key(n), ASKER, f"m{n}", owner="dead")
        sizes = [len(p) async for p in stores.inbox.iter_open_for("dead", page=size)]
        assert sizes == [size, size, 10]
        taken: list[str] = []
        while rows := await stores.inbox.take_abandoned("me", time.time(), ["test"], size):
            assert len(rows) <= size
            taken += [r.inbox_id for r in rows]
        assert len(taken) == len(set(taken)) == 90
        assert [p async for p in stores.inbox.iter_open_for("dead", page=size)] == []
    finally:
        await stores.db.close()


async def test_interrupted_tasks_and_owed_answers_are_carried_out_in_pages(
    start: Start, small_pages: Pages
) -> None:
    first = await start()
    tasks = first.runtime.stores.tasks
    running, finished = {}, {}
    for n in small_pages.numbers(1000):
        task = await tasks.create_task(f"question {n}", conversation=key(n))
        assert await tasks.update_status(task.task_id, "running")
        running[n] = task.task_id
    for n in small_pages.numbers(2000):
        task = await tasks.create_task(f"question {n}", conversation=key(n))
        assert await tasks.complete_task(task.task_id, f"answer {n}")
        finished[n] = task.task_id
    await kill(first)  # they were running when it died; the answers never went out

    second = await start()
    await second.service.recover()
    await second.service.drain()
    for n, task_id in running.items():
        assert second.chat.texts(key(n)) == [INTERRUPTED_TEXT], n
        assert (await event_types(second.runtime, task_id)).count("task_interrupted") == 1
        task = await second.runtime.stores.tasks.get_task(task_id)
        assert task is not None and task.status == "interrupted"
    for n in finished:
        assert second.chat.texts(key(n)) == [f"answer {n}"], n
    assert len(second.chat.sent) == 2 * small_pages.many
    await second.service.recover()
    await second.service.recover_periodically()
    await second.service.drain()
    assert len(second.chat.sent) == 2 * small_pages.many  # a second round does nothing
    for task_id in running.values():
        assert (await event_types(second.runtime, task_id)).count("task_interrupted") == 1


async def test_open_inbox_rows_are_carried_out_in_pages(
    start: Start, crash: CrashPoints, model: FakeModelServer, small_pages: Pages
) -> None:
    model.set_default(THINKER, Text("web-1 is up"))
    first = await start()
    for n in small_pages.numbers(3000):
        crash.at = "message_recorded"
        with pytest.raises(Crash):
            await first.service.accept(message(n, "is web-1 up?"))
    await kill(first)

    second = await start()
    assert await second.runtime.stores.inbox.count_open() == small_pages.many
    await second.service.recover()
    await second.service.drain()
    for n in small_pages.numbers(3000):
        assert second.chat.texts(key(n)) == ["web-1 is up"], n
        await only_task(second.runtime, n)
    assert await second.runtime.stores.inbox.count_open() == 0
    await second.service.recover()
    await second.service.recover_periodically()
    await second.service.drain()
    assert len(second.chat.sent) == small_pages.many
    for n in small_pages.numbers(3000):
        await only_task(second.runtime, n)


async def test_lagging_cards_and_decisions_are_carried_out_in_pages(
    start: Start, crash: CrashPoints, model_server: FakeModelServer, small_pages: Pages
) -> None:
    script_approval(model_server, "echo once >> effects.log", answer="not run")
    numbers = small_pages.numbers(4000)
    first = await start()
    first.chat.down = True  # every card fails to post: all of them lag
    for n in numbers:
        assert await first.service.accept(message(n)) is Accepted.NEW
    await first.service.drain()
    await kill(first)
    assert first.chat.cards == []

    second = await start()
    await second.service.recover()
    await second.service.drain()
    cards = {k: card for k, card, _ in second.chat.cards}
    assert len(second.chat.cards) == small_pages.many and sorted(cards) == sorted(
        key(n) for n in numbers
    )
    for card in cards.values():  # each decision commits, and the process dies at once
        crash.at = "decision_recorded"
        with pytest.raises(Crash):
            await second.service.handle_decision(card.approval_id, APPROVER, "deny")
    await kill(second)
    assert second.chat.resolved == []

    third = await start(second.chat)  # the same platform, its cards still out there
    for _ in range(2):  # and once more: nothing changes the second time
        await third.service.recover()
        await third.service.drain()
        assert sorted(d for _, d in third.chat.resolved) == ["deny"] * small_pages.many
        assert len({ref for ref, _ in third.chat.resolved}) == small_pages.many
        for n in numbers:
            assert third.chat.texts(key(n)) == ["not run"], n
            task = await third.runtime.stores.tasks.get_task(await only_task(third.runtime, n))
            assert task is not None and task.status == "completed"
    assert len(third.chat.cards) == small_pages.many  # no card posted twice
