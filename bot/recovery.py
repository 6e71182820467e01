"""What a restart (and, from time to time, a running bot) owes the outside world.

The store is an outbox (issue #15): whatever the bot owes a thread is written
in the same transaction as the state that owes it, and this module carries out
what is owed and not yet done:

- tasks left `running` by a dead process become `interrupted`, each with a
  `task_interrupted` event saying what it was doing, and their thread is told;
- an approved action whose run was cut short (execution claimed, no
  `tool_call_finished`) is never run again by itself: the thread is told whether
  it did not start or may have started, and a new approval for the same action
  is offered (`approval_reissued`), so a person decides;
- a decision whose continuation never started is continued (exactly once: the
  continuation claims the task with a compare-and-set);
- an inbox row (a person's acknowledged message) that is still open becomes its
  answer, once;
- a pending approval without a card gets it; a decided one whose card still
  shows buttons gets it resolved (a failed post or update is retried the same way).

Every step is a compare-and-set in the store, so running it twice, or from two
processes at once, changes nothing the second time.

Several replicas on one database (issue #19): each running task and each open
inbox row names the replica carrying it out. Recovery takes over only what a
dead replica left (no heartbeat for DUCKLM_REPLICA_TIMEOUT, or stopped), at
start and in every periodic round, so a survivor reports a dead replica's tasks
while it keeps running; never a live replica's work, never its own. Unowned
work (from before v10) and claims without an owner (answers, cards) count as
abandoned only when older than the earliest start of any live replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Protocol

from bot.admin import clip
from bot.backend import ChatBackend, Thread
from runtime.approvals import ApprovalService
from runtime.factory import Runtime
from runtime.replica import Replica
from runtime.store.inbox import InboxRow
from runtime.store.models import Approval, Event, Task

logger = logging.getLogger("ducklm.recovery")

MAX_ERROR_CHARS = 400
# The first line of an answer to a message that arrived from a backlog: it is
# answered only after a gap (the bot was down, or, with replicas, the one
# serving the room died and another took over).
LATE_TEXT = "(Sorry for the delay: DuckLM was away when you asked.)"
INTERRUPTED_TEXT = (
    "DuckLM stopped while working on this (a restart, or the replica doing it died), so "
    "the task was interrupted and did not finish. Ask again if it is still needed."
)
# Events after a task's last `task_waiting_for_approval` that show its
# continuation wrote nothing yet (so it may start again).
_DECISION_ONLY = frozenset(
    {"approval_decided", "rule_created", "task_continued", "task_interrupted"}
)
# A crash during a previous recovery can leave a task interrupted before its
# cut-short run was offered again: the tasks interrupted within this window (all
# of them, in pages) are checked once more at start.
RECHECK_WINDOW_S = 3600.0
# Every step walks what is owed in pages of this many rows (keyset pagination
# in the store), until nothing is left: no cap skips work, memory holds one
# page, and the event loop gets a turn between pages.
PAGE_SIZE = 200


def answer_text(status: str, text: str) -> str:
    """What a finished task says in its thread, from its status and its answer
    (completed) or error (failed)."""
    if status == "failed":
        return f"Sorry, I could not finish that: {clip(text, MAX_ERROR_CHARS)}"
    if status == "interrupted":
        return INTERRUPTED_TEXT
    return text


WITHDRAWN_NOTE = "withdrawn: DuckLM stopped before this approval was asked for in chat"


def describe_interruption(events: list[Event]) -> dict[str, Any]:
    """`task_interrupted`'s payload: the type of the task's last event and, in a few
    words, what that means it was doing."""
    if not events:
        return {"last_event": None, "doing": "starting"}
    last = events[-1]
    payload = last.payload
    kind = last.event_type
    if kind == "model_call_started":
        role = payload.get("role")
        doing = f"waiting for the {role} model" if role else "waiting for the model"
    elif kind == "tool_call_started":
        args = payload.get("args") or {}
        what = args.get("command") or args.get("path") or payload.get("tool") or "a tool"
        doing = f"running `{clip(str(what), 120)}`"
    elif kind == "task_created":
        doing = "starting"
    elif kind in ("task_continued", "approval_decided"):
        doing = "continuing after an approval"
    elif kind in ("tool_call_finished", "command_audit"):
        doing = "reading a tool's result"
    elif kind in ("model_call_finished", "cognition_response"):
        doing = "working on the model's reply"
    else:
        doing = f"just after {kind}"
    return {"last_event": kind, "doing": doing}


def _reissue_reason(reason: str | None, started: bool | None) -> str:
    if started is False:
        why = "the approved run did not start"
    else:
        why = "the approved run may have started; its result is unknown"
    return f"{reason or 'it may change something'} (offered again: {why})"


def _cut_short_text(command: str, started: bool | None) -> str:
    if started is False:
        return (
            f"The approved command `{clip(command, 200)}` did not start: DuckLM stopped after "
            "the approval was recorded and before the command ran. Nothing ran. It is "
            "offered again below; approve it to run it."
        )
    return (
        f"The approved command `{clip(command, 200)}` may have started, and its result is "
        "unknown: DuckLM stopped while it was running. Check its effect before approving "
        "it again below."
    )


class Service(Protocol):
    """What recovery uses of bot.service.ChatService (a protocol: no import cycle)."""

    runtime: Runtime
    approvals: ApprovalService
    backends: Mapping[str, ChatBackend]
    instance: str
    started_at: float
    replica: Replica
    stale_before: float

    async def thread_of(self, task_id: str) -> Thread | None: ...
    async def say(self, thread: Thread, text: str) -> None: ...
    async def deliver_answer(
        self, thread: Thread, task_id: str, text: str, preface: str | None = None
    ) -> None: ...
    async def post_card(self, thread: Thread, approval: Approval) -> None: ...
    async def resolve_card(self, thread: Thread, approval: Approval) -> None: ...
    def shown_command(self, approval: Approval) -> str: ...
    def continue_task(self, thread: Thread, task_id: str, approval_id: str) -> None: ...
    def start_inbound(self, row: InboxRow) -> None: ...
    def inbound_retryable(self, inbox_id: str) -> bool: ...


class Recovery:
    """Recovery for one ChatService (the process serving some platforms)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        stores = service.runtime.stores
        self.db = stores.db
        self.tasks = stores.tasks
        self.events = stores.events
        self.inbox = stores.inbox
        self.approvals = service.approvals
        self.approval_rows = stores.approvals
        self.ownership = stores.ownership

    async def at_start(self) -> None:
        """Everything a dead predecessor left: interrupted tasks, cut-short runs,
        then what `periodic` repairs. A step that fails (logged) does not keep
        the others from running."""
        await _guarded(self._interrupted)
        await self.periodic()

    async def periodic(self) -> None:
        """What a running bot repairs from time to time (and at start): tasks a
        dead replica left running, decisions not carried out, open inbox rows,
        cards that lag their approval, answers not posted."""
        for step in (
            self._dead_replicas,
            self._continue_decided,
            self._open_inbox,
            self._cards,
            self._answers,
        ):
            await _guarded(step)

    async def _unowned_before(self) -> float:
        """Unowned work older than this is no live process's: the earliest start
        of this process and of the other live replicas."""
        return await self.service.replica.earliest_live_start(self.service.started_at)

    # -- tasks ----------------------------------------------------------------

    async def _interrupted(self) -> None:
        # The window is taken before marking, so the tasks marked now are in it:
        # the walk below checks them for a cut-short run (the interruption note
        # is the answer they owe, `_answers`), together with those a crash
        # during an earlier recovery left interrupted without their new approval.
        recent = time.time() - RECHECK_WINDOW_S
        await self._dead_replicas()
        async for page in self.tasks.iter_interrupted_since(recent, PAGE_SIZE):
            for task in page:
                await _guarded(partial(self._cut_short_now, task.task_id))
            await asyncio.sleep(0)

    async def _dead_replicas(self) -> None:
        """The tasks of replicas that died (no heartbeat, or stopped; at start, a
        predecessor) become interrupted, page by page, each checked for a
        cut-short run in the same transaction. Tasks of live replicas are never
        touched."""
        while True:
            marked = await self._mark_interrupted()
            await asyncio.sleep(0)
            if len(marked) < PAGE_SIZE:
                break

    async def _mark_interrupted(self) -> list[str]:
        """A page of `running` tasks nobody alive works on (their owner replica is
        dead, or unowned and older than every live replica) become
        `interrupted`, with their events (one transaction per page); returns
        their ids, fewer than PAGE_SIZE: the last page.

        A task whose decided approval was cut short is reopened (waiting for
        approval again) in that same transaction: committed as interrupted, it
        would owe the interruption note, and another replica's `_answers` could
        post it (and mark it answered, dropping its real answer later) before
        it was reopened. What the thread is told about it goes out after the
        commit."""
        service = self.service
        unowned_before = await self._unowned_before()
        tell: list[Callable[[], Awaitable[None]]] = []
        async with self.db.transaction():
            task_ids = await self.ownership.interrupt_orphans(
                service.instance,
                within=service.replica.timeout,  # before the database's now
                unowned_before=unowned_before,
                limit=PAGE_SIZE,
            )
            for task_id in task_ids:
                last = await self.events.last_events(task_id, 1)
                interruption = describe_interruption(last)
                withdrawn = await self._withdraw_pending(task_id)
                if withdrawn:
                    # It died asking: the command never ran, whatever the last event says.
                    asked = withdrawn[0].command or withdrawn[0].tool
                    interruption["doing"] = f"asking for approval of `{clip(asked, 120)}`"
                    interruption["withdrawn"] = [a.approval_id for a in withdrawn]
                await self.events.append(task_id, "task_interrupted", interruption)
                await self._cut_short(task_id, tell)
        if task_ids:
            logger.info("recovery: %d task(s) of dead processes interrupted", len(task_ids))
        for step in tell:
            await _guarded(step)
        return task_ids

    async def _withdraw_pending(self, task_id: str) -> list[Approval]:
        """The undecided approvals of a task that is being marked interrupted: it
        died between storing an approval and waiting for it (no card, and nothing
        can continue an interrupted task), so each is decided "expired" by
        "recovery", with its event. Inside `_mark_interrupted`'s transaction."""
        withdrawn = []
        for approval in await self.approval_rows.pending_for_task(task_id):
            if await self.approval_rows.decide(
                approval.approval_id, "expired", "recovery", WITHDRAWN_NOTE
            ):
                await self.events.append(
                    task_id,
                    "approval_expired",
                    {
                        "approval_id": approval.approval_id,
                        "expires_at": approval.expires_at,
                        "decided_by": "recovery",
                        "note": WITHDRAWN_NOTE,
                    },
                )
                withdrawn.append(approval)
        return withdrawn

    async def _cut_short_now(self, task_id: str) -> bool:
        """`_cut_short` on its own (outside a marking transaction): the thread is
        told right after."""
        tell: list[Callable[[], Awaitable[None]]] = []
        handled = await self._cut_short(task_id, tell)
        for step in tell:
            await _guarded(step)
        return handled

    async def _cut_short(self, task_id: str, tell: list[Callable[[], Awaitable[None]]]) -> bool:
        """An interrupted task whose decided approval was not carried out to the end.
        True when handled here (the thread needs no generic notice). Its store
        writes join the caller's transaction, if any; what the thread is to be
        told is appended to `tell`, for the caller to do after its commit."""
        events = await self.events.list_events(task_id)
        at = next(
            (
                i
                for i in range(len(events) - 1, -1, -1)
                if events[i].event_type == "task_waiting_for_approval"
            ),
            None,
        )
        if at is None:
            return False
        waiting, after = events[at], events[at + 1 :]
        approval_id = waiting.payload.get("approval_id")
        approval = await self.approvals.get(approval_id) if isinstance(approval_id, str) else None
        if approval is None or approval.decision is None or approval.decision == "expired":
            return False
        if approval.executed_at is not None:
            if any(_finished(e, approval) for e in after):
                return False  # it ran to the end; the task died later
            if await self.approvals.replacement_of(approval.approval_id) is not None:
                return True  # offered again already (an earlier recovery)
            started = any(
                e.event_type == "tool_call_started"
                and e.payload.get("approval_id") == approval.approval_id
                for e in after
            )
            await self._reissue(
                task_id, approval, waiting.payload, tell, started=None if started else False
            )
            return True
        if all(e.event_type in _DECISION_ONLY for e in after):
            # Decided, the continuation claimed the task and died before it wrote
            # anything: back to waiting, and `_continue_decided` carries it out.
            async with self.db.transaction():
                if await self.tasks.claim_status(task_id, "interrupted", "waiting_for_approval"):
                    await self.events.append(
                        task_id,
                        "task_waiting_for_approval",
                        {**waiting.payload, "recovered": True},
                    )
            return True
        return False

    async def _reissue(
        self,
        task_id: str,
        old: Approval,
        waiting: dict[str, Any],
        tell: list[Callable[[], Awaitable[None]]],
        *,
        started: bool | None,
    ) -> None:
        """Offer the same action again, linked to the spent approval; never run it.
        The note and the new card go out after the commit (appended to `tell`)."""
        shown = self.service.shown_command(old)
        async with self.db.transaction():
            if not await self.tasks.claim_status(task_id, "interrupted", "waiting_for_approval"):
                return  # another recovery got there first
            new = await self.approvals.create_pending(
                task_id,
                old.action,
                index=old.index,
                command=old.command,
                risk_level=old.risk_level,
                action_type=old.action_type,
                # The card itself says why it is back, should the note below be lost.
                reason=_reissue_reason(old.reason, started),
                requested_by=old.requested_by,
                replaces_approval_id=old.approval_id,
            )
            observations = [
                {**o, "approval_id": new.approval_id}
                if isinstance(o, dict) and o.get("approval_id") == old.approval_id
                else o
                for o in waiting.get("observations") or []
            ]
            await self.events.append_many(
                task_id,
                [
                    (
                        "approval_reissued",
                        {
                            "approval_id": new.approval_id,
                            "replaces": old.approval_id,
                            "started": started,
                            "tool": old.tool,
                            "command": shown,
                        },
                    ),
                    (
                        "task_waiting_for_approval",
                        {
                            "approval_id": new.approval_id,
                            "direct": bool(waiting.get("direct")),
                            "observations": observations,
                        },
                    ),
                ],
            )

        async def say_and_post() -> None:
            thread = await self.service.thread_of(task_id)
            if thread is None:
                return
            await self.service.say(thread, _cut_short_text(shown, started))
            await self.service.post_card(thread, new)

        tell.append(say_and_post)

    async def _continue_decided(self) -> None:
        """Decisions committed whose continuation never started (a crash right after
        the click). The continuation's compare-and-set on the task keeps it once.
        The store gives each task's latest such decision, a page of tasks at a time.
        With other live replicas, a decision younger than the replica timeout is
        left to the replica that took it (its continuation is starting; taking it
        here would run it once all the same, but not where the click was)."""
        replica = self.service.replica
        others = [r for r in await replica.live() if r.replica_id != self.service.instance]
        recent = time.time() - replica.timeout if others else None
        async for page in self.approval_rows.iter_decided_not_carried_out(PAGE_SIZE):
            for approval in page:
                decided = approval.decided_at
                if recent is not None and decided is not None and decided.timestamp() > recent:
                    continue
                thread = await self.service.thread_of(approval.task_id)
                if thread is not None:
                    self.service.continue_task(thread, approval.task_id, approval.approval_id)
            await asyncio.sleep(0)

    # -- inbox and cards --------------------------------------------------------

    async def _open_inbox(self) -> None:
        """Messages acknowledged but never carried out: those of a dead process, and
        this process's own whose job ended without closing them."""
        service = self.service
        # Its own rows first: a row taken below is this process's too, and must
        # not be started twice in one round (its job may already have failed).
        async for page in self.inbox.iter_open_for(service.instance, PAGE_SIZE):
            for row in page:
                if service.inbound_retryable(row.inbox_id):
                    service.start_inbound(row)
            await asyncio.sleep(0)
        while True:
            # Only rows of dead replicas (or unowned and older than every live
            # replica): a live replica's message is its own to carry out.
            taken = await self.ownership.take_abandoned_inbox(
                service.instance,
                within=service.replica.timeout,  # before the database's now
                unowned_before=await self._unowned_before(),
                platforms=self._inbox_platforms(),
                limit=PAGE_SIZE,
            )
            for inbox_id in taken:
                row = await self.inbox.get(inbox_id)
                if row is not None:
                    service.start_inbound(row)
            await asyncio.sleep(0)
            if len(taken) < PAGE_SIZE:
                break

    def _inbox_platforms(self) -> list[str]:
        """The platforms whose abandoned inbox rows this replica may take over: all
        it serves, but Matrix only while its connection says it can answer there
        (the sync lease holder, or encryption off)."""
        platforms = []
        for platform, backend in sorted(self.service.backends.items()):
            connection = getattr(backend, "connection", None)
            takes_over = getattr(connection, "takes_over_inbox", None)
            if callable(takes_over) and not takes_over():
                continue
            platforms.append(platform)
        return platforms

    async def _answers(self) -> None:
        """Finished tasks whose answer never reached their thread: the process died
        between the commit and the post, or the platform was down."""
        service = self.service
        async for page in self.tasks.iter_owed_answers(
            sorted(service.backends), stale_before=service.stale_before, page=PAGE_SIZE
        ):
            for task in page:
                await self._answer(task)
            await asyncio.sleep(0)

    async def _answer(self, task: Task) -> None:
        service = self.service
        thread = await service.thread_of(task.task_id)
        if thread is None:
            return
        said = task.error if task.status == "failed" else task.final_response
        row = await self.inbox.for_task(task.task_id)
        late = row is not None and row.late and task.status != "interrupted"
        await service.deliver_answer(
            thread,
            task.task_id,
            answer_text(task.status, said or ""),
            LATE_TEXT if late else None,
        )

    async def _cards(self) -> None:
        """Post missing cards, resolve stale ones, for the platforms served here."""
        # A pending approval of a task that no longer waits (it died before it
        # said so) is not listed: nobody could carry its decision out.
        platforms = sorted(self.service.backends)
        async for page in self.approval_rows.iter_cards_lagging(platforms, PAGE_SIZE):
            for approval in page:
                thread = await self.service.thread_of(approval.task_id)
                if thread is None:
                    continue
                if approval.decision is None:
                    await self.service.post_card(thread, approval)
                else:
                    await self.service.resolve_card(thread, approval)
            await asyncio.sleep(0)


async def _guarded(step: Callable[[], Awaitable[object]]) -> None:
    try:
        await step()
    except Exception:  # one failing step (a locked store) must not stop the others
        logger.exception("recovery step %s failed", getattr(step, "__name__", repr(step)))


def _finished(event: Event, approval: Approval) -> bool:
    if event.event_type != "tool_call_finished":
        return False
    named = event.payload.get("approval_id")
    if named is not None:
        return named == approval.approval_id
    return event.payload.get("index") == approval.index  # written before it was named
