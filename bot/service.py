"""Platform-neutral glue between chat platforms and the runtime.

    message  -> task (in the background)  -> answer or approval card in the thread
    click    -> authorised decision (once) -> card resolved -> continuation -> thread
    /duck    -> parsed command            -> private reply (or a direct run in a thread)

Platforms hand a person's message to `accept` (an `Inbound`, recorded before
they acknowledge it), call the `handle_*` methods for clicks and `/duck`, and
implement `ChatBackend` for output. Nothing here knows Slack or Matrix. What a
restart owes (open messages, cut-short runs, lagging cards) is bot/recovery.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from bot import commands as c
from bot.admin import CommandRunner, clip, when
from bot.admission import Admission, Refusal, duration
from bot.backend import ApprovalCard, CardResolution, ChatBackend, Thread
from bot.edits import edited_text, parse_edit, vote_counted_text, votes_text
from bot.inbox import Accepted, Inbound
from bot.policy import AccessPolicy, ChannelPolicy
from bot.recovery import LATE_TEXT, Recovery, answer_text
from runtime.approvals import ApprovalError, DecisionOutcome
from runtime.crashpoints import crash_point
from runtime.factory import Runtime
from runtime.loop import ChatResult, PendingApproval
from runtime.replica import Replica
from runtime.store import StoreError
from runtime.store.inbox import InboxRow
from runtime.store.models import Approval, Event, Schedule
from runtime.store.votes import EditState
from runtime.tools.shell_rules import describe_rule, rule_for_command

logger = logging.getLogger("ducklm.service")

DEFAULT_MAX_CONCURRENT_TASKS = 8
# Starts of one recorded message per process before recovery leaves it to the next start.
MAX_INBOUND_TRIES = 3
# A direct run refused by a flood limit whose explanation was already given.
STILL_REFUSED = "Not started: you are still over DuckLM's limits (see my earlier answer)."


class _Duplicate(Exception):
    """A delivery key of an Inbound was claimed before: roll the claims back."""


class ChatService:
    def __init__(
        self,
        runtime: Runtime,
        *,
        policy: AccessPolicy | None = None,
        max_concurrent_tasks: int = DEFAULT_MAX_CONCURRENT_TASKS,
    ) -> None:
        self.runtime = runtime
        self.loop = runtime.loop
        self.approvals = runtime.approvals
        self.tasks = runtime.stores.tasks
        settings = runtime.settings
        self.policy = policy or AccessPolicy.from_settings(settings)
        # A tool the task's channel does not allow is refused before it runs (#20).
        self.loop.tool_refusal = self.policy.tool_refusal
        # Who may ask, where, and how much (issue #22): checked in accept().
        self.admission = Admission.from_settings(settings, self.policy)
        self.runner = CommandRunner(
            self.tasks,
            runtime.stores.events,
            self.approvals,
            runtime.stores.schedules,
            timezone=settings.timezone,
            shown=lambda text: self.loop.redactor.redact(text).text,
            rule_idle_days=settings.rule_idle_days,
            workspace=str(settings.workspace),
        )
        self.backends: dict[str, ChatBackend] = {}
        self.workspace = str(runtime.settings.workspace)
        # Bolt and nio fire and forget; we keep strong references to every job so
        # none is garbage-collected mid-run, and bound how many tasks run at once.
        self._jobs: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(max_concurrent_tasks)
        self._threads: dict[str, Thread] = {}  # task_id -> thread, while it runs
        self.loop.add_listener(self._on_event)
        # This process, as the owner of the inbox rows and tasks it carries out
        # (its replica id, issue #19), and when it started: unowned rows and
        # running tasks older than that belong to a dead process.
        self.replica = Replica.from_settings(runtime.stores.replicas, settings)
        self.instance = self.replica.replica_id
        self.started_at = time.time()
        # Claims (answers, cards) made before this time are a dead process's: the
        # earliest start of this process and of every other live replica (a live
        # replica that started earlier may be posting right now). Refreshed on
        # every heartbeat; only ever too early, which merely waits for a lease.
        self.stale_before = self.started_at
        self.db = runtime.stores.db
        self.inbox = runtime.stores.inbox
        self.deliveries = runtime.stores.deliveries
        self.events = runtime.stores.events
        self._inbound_jobs: set[str] = set()  # inbox ids being carried out here
        self._inbound_tries: dict[str, int] = {}  # how often each was started here
        self.recovery = Recovery(self)

    def add_backend(self, backend: ChatBackend) -> None:
        self.backends[backend.platform] = backend

    # -- the channel's policy (issue #20) -------------------------------------

    def workspace_of(self, thread: Thread) -> str:
        """Where tools run for tasks of this thread's channel (its policy section)."""
        return self.policy.for_channel(thread.platform, thread.channel).workspace

    async def policy_of_task(self, task_id: str) -> ChannelPolicy:
        """The policy of the channel a task lives in (the default without one)."""
        where, _ = await self._where_task_lives(task_id)
        return where

    async def _where_task_lives(self, task_id: str) -> tuple[ChannelPolicy, Thread | None]:
        """The policy of a task's channel and its thread (None: not served here),
        from one read of the task (a decision needs both; each read is a round trip)."""
        task = await self.tasks.get_task(task_id)
        conversation = task.conversation if task else None
        return self.policy.for_conversation(conversation), self._served_thread(conversation)

    async def decision_refusal(self, user: str, approval: Approval, decision: str) -> str | None:
        """Why `user` may not take `decision` on `approval` in its task's channel
        (a read-only look; handle_decision checks again when it decides)."""
        where = await self.approval_policy(approval)
        return self.policy.refuse_decision(user, approval, decision, where)

    async def approval_policy(self, approval: Approval) -> ChannelPolicy:
        """The policy deciding this approval: its task's channel's, with the
        escalation approvers among the approvers once it was escalated (#20)."""
        where = await self.policy_of_task(approval.task_id)
        return _escalated(where, await self.approvals.edit_state(approval.approval_id))

    # -- inbound: messages --------------------------------------------------

    async def accept(self, inbound: Inbound) -> Accepted:
        """Claim every delivery key and record the message, in one transaction,
        before the platform acknowledges the delivery; then carry it out in the
        background. A message recorded here is answered even if the process dies
        right after (recovery takes the open inbox row)."""
        refusal: Refusal | None = None
        try:
            async with self.db.transaction():
                # In one order everywhere: two replicas claiming the same keys
                # (an event and its `message` copy) in opposite orders would
                # deadlock on PostgreSQL, and one of them fail.
                for key in sorted(inbound.deliveries):
                    if not await self.deliveries.claim(key):
                        raise _Duplicate(key)  # rolls back the keys claimed so far
                # admission (issue #22): after the claims, so a duplicate costs
                # nothing; a refused message keeps its claims (a retry is a
                # duplicate) and gets no inbox row, so no task.
                refusal = self.admission.admit(inbound)
                if refusal is not None:
                    await self._record_refusal(inbound, refusal)
                else:
                    row = await self.inbox.insert(
                        inbound.thread.key,
                        inbound.user,
                        inbound.text,
                        deliveries=inbound.deliveries,
                        message_id=inbound.message_id,
                        in_thread=inbound.in_thread,
                        from_bot=inbound.from_bot,
                        origin=inbound.origin,
                        late=inbound.late,
                        owner=self.instance,
                    )
        except _Duplicate:
            if self.runtime.metrics is not None:  # /metrics: deliveries deduplicated
                self.runtime.metrics.duplicate(inbound.thread.platform)
            return Accepted.DUPLICATE
        except BaseException:  # not recorded: the platform's retry starts afresh
            self.admission.cancel(inbound)
            if refusal is not None:
                self.admission.cancel_refusal(inbound, refusal)
            raise
        if refusal is not None:
            return self._refused(inbound, refusal)
        self.admission.rekey(inbound, row.inbox_id)  # finished() in _inbound
        crash_point("message_recorded")  # test seam (issue #15): recorded, no task yet
        self.start_inbound(row)
        return Accepted.NEW

    async def _record_refusal(self, inbound: Inbound, refusal: Refusal) -> None:
        """The `request_refused` event of a message or direct run admission refused
        (none for an unserved channel: the bot is not there)."""
        if refusal.reason == "channel":
            return
        await self.events.append(
            None,
            "request_refused",
            {
                "user": inbound.user,
                "origin": inbound.origin,
                "conversation": inbound.thread.key,
                "reason": refusal.reason,
                "told": refusal.text is not None,
            },
        )

    async def _record_refused_decision(
        self, approval: Approval, user: str, decision: str, refusal: str, where: ChannelPolicy
    ) -> None:
        """A click or reply that changed nothing because its author may not decide
        there (issue #20): on the task's audit trail, so `ducklm events` shows
        who tried. Best effort: the refusal is told either way."""
        if approval.decision is not None:
            return  # late clicks on a decided card are not attempts to decide
        await self._safely(
            self.events.append(
                approval.task_id,
                "decision_refused",
                {
                    "approval_id": approval.approval_id,
                    "user": user,
                    "decision": decision,
                    "section": where.section,
                    "reason": refusal,
                },
            )
        )

    def _refused(self, inbound: Inbound, refusal: Refusal) -> Accepted:
        """Admission said no (issue #22): the claims and a `request_refused` event
        are recorded, nothing else; the sender is told why, privately, when
        admission says so (at most once an hour, or once per burst)."""
        logger.info("refused %s in %s: %s", inbound.user, inbound.thread.key, refusal.reason)
        backend = self.backends.get(inbound.thread.platform)
        if refusal.text and backend is not None:
            self._spawn(self._safely(backend.tell(inbound.thread, inbound.user, refusal.text)))
        return Accepted.REFUSED

    def start_inbound(self, row: InboxRow) -> None:
        """Carry out a recorded message in the background (from accept or recovery)."""
        if row.inbox_id in self._inbound_jobs:
            return
        self._inbound_jobs.add(row.inbox_id)
        self._inbound_tries[row.inbox_id] = self._inbound_tries.get(row.inbox_id, 0) + 1
        self._spawn(self._inbound(row))

    async def _closed_row(self, inbox_id: str) -> bool:
        try:
            found = await self.inbox.get(inbox_id)
        except StoreError:
            return False
        return found is None or found.done_at is not None

    def inbound_retryable(self, inbox_id: str) -> bool:
        """Whether recovery should start this process's own open row again: not
        while it runs, and at most MAX_INBOUND_TRIES times (a database that keeps
        failing must not repeat its notice every round; the next start tries again)."""
        return (
            inbox_id not in self._inbound_jobs
            and self._inbound_tries.get(inbox_id, 0) < MAX_INBOUND_TRIES
        )

    async def _inbound(self, row: InboxRow) -> None:
        try:
            await self._process_inbound(row)
        except StoreError as exc:  # stays open: the next recovery tries again
            logger.error("message %s could not be carried out: %s", row.inbox_id, exc)
        except Exception:  # a bug; closed, so one bad message cannot come back forever
            logger.exception("message %s crashed", row.inbox_id)
            await self._safely(self.inbox.close(row.inbox_id, "failed"))
        finally:
            self._inbound_jobs.discard(row.inbox_id)
            if await self._closed_row(row.inbox_id):
                self._inbound_tries.pop(row.inbox_id, None)
            self.admission.finished(row.inbox_id)  # its flood-limit slot (issue #22)

    async def _process_inbound(self, row: InboxRow) -> None:
        thread = Thread.parse(row.conversation)
        backend = self.backends.get(thread.platform)
        if backend is None:
            return  # another process serves it; it stays open for that one
        text = row.text.strip()
        if row.in_thread and await self._decision_reply(thread, row, text):
            return
        if not text:  # a bare mention (or a file without words)
            # Closed first: a hint lost to a crash matters less than a hint twice.
            if await self.inbox.close(row.inbox_id, "hint"):
                await self._safely(backend.send(thread, backend.empty_hint))
            return
        history = await self._safely(backend.history(thread, row.message_id)) or []
        await self._run(
            thread,
            self.loop.run_chat(
                text,
                self.workspace_of(thread),
                history_messages=list(history),
                conversation=thread.key,
                requested_by=row.user,
                inbox_id=row.inbox_id,
            ),
            preface=LATE_TEXT if row.late else None,
        )

    async def _decision_reply(self, thread: Thread, row: InboxRow, text: str) -> bool:
        """A decision word in an approval thread: the pending approval is decided; with
        nothing pending, the answer a late click gets (never a model call). False when
        the text is no decision or the thread never had an approval. `edit <command>`
        is a decision too (approve with an edit, issue #20)."""
        reply = _reply_decision(text)
        if reply is None:
            return False
        approval = await self._pending_in(thread)
        if approval is not None:
            await self._decide_reply(thread, row.user, approval, reply)
            await self.inbox.close(row.inbox_id, "decision")
            return True
        decided = await self._latest_decided_in(thread)
        if decided is None:
            return False
        if await self.inbox.close(row.inbox_id, "already_decided"):
            backend = self.backends[thread.platform]
            await self._safely(backend.tell(thread, row.user, _already_decided(decided)))
        return True

    async def _decide_reply(
        self, thread: Thread, user: str, approval: Approval, reply: c.DecisionReply | str
    ) -> None:
        """Decide `approval` as a thread reply says (a str: the command of an edit);
        a refusal is told to its author privately."""
        if isinstance(reply, str):
            refusal = await self.handle_edit(approval.approval_id, user, reply)
        else:
            refusal = await self.handle_decision(
                approval.approval_id, user, reply.decision, reply.note
            )
        if refusal:
            await self._safely(self.backends[thread.platform].tell(thread, user, refusal))

    def submit_message(
        self, thread: Thread, user: str, text: str, history: Iterable[dict[str, str]] = ()
    ) -> asyncio.Task[None]:
        """Start a task for a message; returns at once (platforms must ack fast)."""
        return self._spawn(self._chat(thread, user, text, list(history)))

    async def is_bot_thread(self, thread: Thread) -> bool:
        """Has the bot already worked in this thread (so every reply is for it)?"""
        if thread.root is None:
            return False
        return bool(await self.tasks.list_by_conversation(thread.key, limit=1))

    async def handle_thread_reply(self, thread: Thread, user: str, text: str) -> bool:
        """`approve` / `deny [reason]` / `always` in an approval's thread. Returns
        False when the text is no decision or the thread has nothing pending.
        `edit <command>` approves with an edit (issue #20)."""
        reply = _reply_decision(text)
        if reply is None:
            return False
        approval = await self._pending_in(thread)
        if approval is None:
            return False
        await self._decide_reply(thread, user, approval, reply)
        return True

    # -- inbound: decisions -------------------------------------------------

    async def handle_decision(
        self,
        approval_id: str,
        user: str,
        decision: str,
        note: str | None = None,
        *,
        card_ref: str | None = None,
    ) -> str | None:
        """Authorise and take a decision exactly once. Returns a private message for
        the clicker when nothing changed (refused, already decided), else None.
        `card_ref` is the card the click came from, when the platform knows it: a
        card whose post was never recorded (its process died) is adopted, so its
        buttons are replaced like any other card's."""
        # The revision first, then the approval: what is decided is then never a
        # later revision than the one the store checks (an edit meanwhile: refused).
        seen = await self.approvals.edit_state(approval_id)
        approval = await self.approvals.get(approval_id)
        if approval is None or seen is None:
            return "That approval does not exist."
        if card_ref and approval.decision is None and card_ref != approval.card_ref:
            # A click on a card an edit replaced (issue #20): it showed another
            # command, so it approves nothing; the new card (or a reply) does.
            # Read again only when `seen` shows no edit: one may have landed since.
            if seen.revision > 0 or await self._edited(approval_id):
                return (
                    "This card was replaced: the command was edited since "
                    f"(now `{clip(self.shown_command(approval), 200)}`). Decide on the new "
                    "card, or reply `approve` in the thread."
                )
        if card_ref and approval.card_state == "unposted":
            await self.approvals.card_posted(approval_id, card_ref)
            approval = await self.approvals.get(approval_id) or approval
        # The approvers of the channel the approval's task lives in (issue #20),
        # escalated as `seen` says; the task is read once for policy and thread.
        channel, thread = await self._where_task_lives(approval.task_id)
        where = _escalated(channel, seen)
        refusal = self.policy.refuse_decision(user, approval, decision, where)
        if refusal:
            await self._record_refused_decision(approval, user, decision, refusal, where)
            return refusal
        if approval.decision is not None:
            # A stale card, clicked late: fix it now.
            if approval.card_state == "posted" and thread is not None:
                await self.resolve_card(thread, approval)
            return _already_decided(approval)
        return await self._take(approval, user, decision, note, seen.revision, where, thread)

    async def _edited(self, approval_id: str) -> bool:
        """Whether the approval's command was edited (as the store says now)."""
        state = await self.approvals.edit_state(approval_id)
        return state is not None and state.revision > 0

    async def _take(
        self,
        approval: Approval,
        user: str,
        decision: str,
        note: str | None,
        revision: int,
        where: ChannelPolicy,
        thread: Thread | None,
    ) -> str | None:
        """Take an authorised decision: with the channel's quorum for the
        approval's risk, an approval is one person's vote (issue #20), and the
        vote that makes the quorum decides. `revision`: the one `approval` was
        read at; the store refuses the decision if an edit came since. `where`
        and `thread`: the approval's policy and thread, as the caller read them."""
        approval_id = approval.approval_id
        needed = where.quorum_for(approval.risk_level)
        try:
            outcome = await self.approvals.decide(
                approval_id,
                decision,
                user,
                note,
                quorum=needed,
                four_eyes=where.needs_second_person(approval.risk_level),
                revision=revision,
            )
        except ApprovalError as exc:
            return str(exc)
        if outcome.waiting_for_more:
            return await self._vote_counted(approval, user, outcome, thread)
        if not outcome.taken or outcome.approval is None:
            return _already_decided(outcome.approval or approval)
        crash_point("decision_recorded")  # test seam (issue #15): decided, card not updated
        if thread is not None:
            await self.resolve_card(thread, outcome.approval)
            self._spawn(self._continue(thread, approval.task_id, approval_id))
        return None

    async def _vote_counted(
        self, approval: Approval, user: str, outcome: DecisionOutcome, thread: Thread | None
    ) -> str | None:
        """An approval short of its quorum: the thread says who approved so far."""
        mention = self.backends[thread.platform].mention if thread is not None else str
        if not outcome.counted:
            return (
                "You approved this already; it still needs "
                f"{outcome.needed - len(outcome.voters)} more approver(s) "
                f"({', '.join(mention(v) for v in outcome.voters)} so far)."
            )
        if thread is not None:
            what = clip(self.shown_command(approval), 200)
            await self.say(thread, vote_counted_text(what, outcome.voters, outcome.needed, mention))
            if outcome.approval is not None:
                await self._show_votes(thread, outcome, mention)
        return None

    async def _show_votes(
        self, thread: Thread, outcome: DecisionOutcome, mention: Callable[[str], str]
    ) -> None:
        """The card itself shows "1 of 2: @alice" and keeps its buttons. Under the
        card's claim (as resolving it is), so an update never lands after the
        decision's; a decision taken meanwhile is shown right after."""
        current = outcome.approval
        assert current is not None
        if not current.card_ref or current.card_state != "posted":
            return
        if not await self.approvals.claim_card(
            current.approval_id, "posted", stale_before=self.stale_before
        ):
            return  # being resolved (or updated) right now
        try:
            card = replace(
                self._card(
                    PendingApproval.from_approval(current, self.loop.redactor), outcome.needed
                ),
                votes=votes_text(outcome.voters, outcome.needed, mention),
            )
            await self._safely(
                self.backends[thread.platform].update_card(thread, current.card_ref, card)
            )
        finally:
            await self.approvals.release_card(current.approval_id)
        fresh = await self.approvals.get(current.approval_id)
        if fresh is not None and fresh.decision is not None:
            await self.resolve_card(thread, fresh)

    async def handle_edit(self, approval_id: str, user: str, command: str) -> str | None:
        """Approve with an edit (issue #20): an approver replaces the proposed
        command; it is classified afresh (blocked: refused, nothing changes), the
        card is replaced by one showing the original and the edited command, and
        the editor's approval counts as one of the quorum the new risk needs.
        Returns a private message when nothing (more) happened, else None."""
        approval = await self.approvals.get(approval_id)
        if approval is None:
            return "That approval does not exist."
        # Read once for the whole edit: an edit keeps the task and the escalation.
        channel, thread = await self._where_task_lives(approval.task_id)
        where = _escalated(channel, await self.approvals.edit_state(approval_id))
        refusal = self.policy.refuse_decision(user, approval, "approve", where)
        if refusal is None and approval.decision is not None:
            return _already_decided(approval)
        if refusal:
            await self._record_refused_decision(approval, user, "edit", refusal, where)
            return refusal
        try:
            edit = await self.approvals.edit(approval_id, command, user)
        except ApprovalError as exc:
            return str(exc)
        edited = edit.approval
        needed = where.quorum_for(edited.risk_level)
        if thread is not None:
            backend = self.backends[thread.platform]
            shown = self.loop.redactor.redact
            await self.say(
                thread,
                edited_text(
                    backend.mention(user),
                    clip(shown(edit.old_command).text, 200),
                    clip(shown(edit.new_command).text, 200),
                    edit.old_risk,
                    edit.new_risk,
                    needed,
                ),
            )
            await self._replace_card(thread, approval, edited, user, where)
        # The editor's own approval of the edit (refused under four-eyes when the
        # editor asked for it: then another approver has to approve it).
        refusal = self.policy.refuse_decision(user, edited, "approve", where)
        if refusal:
            return f"Edited. {refusal}"
        return await self._take(edited, user, "approve", None, edit.revision, where, thread)

    async def _replace_card(
        self, thread: Thread, old: Approval, edited: Approval, editor: str, where: ChannelPolicy
    ) -> None:
        """After an edit: the old card shows that it was edited (no buttons), a new
        card shows the edited command (with the original in its reason) and is
        the approval's card from now on (the edit left it unposted: posted here
        once across processes, or by recovery)."""
        backend = self.backends[thread.platform]
        if old.card_ref and old.card_state == "posted":
            card = self._card(PendingApproval.from_approval(old, self.loop.redactor))
            note = f"edited to `{clip(self.shown_command(edited), 200)}`: see the new card"
            await self._safely(
                backend.resolve_card(
                    thread,
                    old.card_ref,
                    card,
                    CardResolution("edited", editor, datetime.now(UTC), note),
                )
            )
        await self.post_card(thread, edited, where)

    # -- inbound: /duck commands --------------------------------------------

    async def handle_command(
        self, thread: Thread, user: str, text: str, *, open_thread: bool = False
    ) -> str | None:
        """Run a `/duck` command. Returns the private reply, or None when the answer
        goes to a thread (`run`). With `open_thread`, a direct run first posts a
        root message in the channel so everybody sees what ran."""
        try:
            command = c.parse_command(text)
        except c.CommandError as exc:
            return str(exc)
        if isinstance(command, c.Run):
            # A direct run is a task too: the flood limits hold for it (issue #22).
            # Who may ask the platform checked before calling; the answer is private.
            ticket = Inbound(thread, user, command.command, deliveries=())
            refusal = self.admission.admit(ticket)
            if refusal is not None:
                await self._record_refusal(ticket, refusal)
                return refusal.text or STILL_REFUSED
            if open_thread:
                try:
                    root = await self.backends[thread.platform].send(
                        Thread(thread.platform, thread.channel),
                        # A slash command is private until this posts it: no secret in it.
                        f"{user} asked to run "
                        f"`{clip(self.loop.redactor.redact(command.command).text, 300)}`",
                    )
                except BaseException:
                    self.admission.cancel(ticket)
                    raise
                if root is None:
                    self.admission.cancel(ticket)
                    return "Could not open a thread for that command."
                thread = thread.in_thread(root)
            self._spawn(self._direct(thread, user, command.command, ticket))
            return None
        where = self.policy.for_channel(thread.platform, thread.channel)
        return await self.runner.execute(
            command,
            self.policy.actor(user, where),
            conversation_prefix=thread.channel_prefix,
            where=where,
        )

    # -- timed work (called by bot/scheduler.py) ------------------------------

    async def remind_approval(self, approval_id: str) -> None:
        """Once, while still pending: remind the approvers in the approval's thread."""
        approval = await self.approvals.get(approval_id)
        if approval is None or approval.decision is not None:
            return
        thread = await self.thread_of(approval.task_id)
        if thread is None or not await self.approvals.mark_reminded(approval_id):
            return
        backend = self.backends[thread.platform]
        reminded = [
            user
            for user in sorted((await self.policy_of_task(approval.task_id)).approvers)
            if user.startswith(f"{thread.platform}:")
        ]
        people = [backend.mention(user) for user in reminded]
        who = ", ".join(people) if people else "approvers"
        expiry = f" It expires at {when(approval.expires_at)}." if approval.expires_at else ""
        # Timed work is on the audit trail like every decision (issue #20).
        await self._safely(
            self.events.append(
                approval.task_id,
                "approval_reminded",
                {"approval_id": approval_id, "reminded": reminded},
            )
        )
        await self._safely(
            backend.send(
                thread,
                f"Reminder for {who}: `{clip(self.shown_command(approval), 200)}` is still "
                f"waiting for approval.{expiry}",
            )
        )

    async def escalate_approval(self, approval_id: str) -> None:
        """Once, while still pending: call the channel's escalation approvers
        (`escalate_to`) in the approval's thread; from then on they may decide it
        as approvers of that channel (issue #20)."""
        approval = await self.approvals.get(approval_id)
        if approval is None or approval.decision is not None:
            return
        thread = await self.thread_of(approval.task_id)
        if thread is None:
            return  # another replica may serve its platform: the claim's lease runs out
        where = await self.policy_of_task(approval.task_id)
        if not where.escalate_to:
            await self.approvals.end_escalation(approval_id)  # nobody to call in
            return
        if not await self.approvals.escalate(approval_id, sorted(where.escalate_to)):
            return  # escalated already (another replica, or before a restart)
        backend = self.backends[thread.platform]
        people = [
            backend.mention(user)
            for user in sorted(where.escalate_to)
            if user.startswith(f"{thread.platform}:")
        ]
        waited = duration(time.time() - approval.created_at.timestamp())
        await self._safely(
            backend.send(
                thread,
                f"Escalation for {', '.join(people) or 'the escalation approvers'}: "
                f"`{clip(self.shown_command(approval), 200)}` has waited {waited} for "
                "approval. You may decide it now: the buttons, or reply `approve`, "
                "`deny <reason>` or `edit <command>` here.",
            )
        )

    async def expire_approval(self, approval_id: str) -> None:
        """Decide an unanswered approval as expired (exactly once) and say so."""
        # The approval's expiry, the task's status and the event saying so commit together.
        async with self.db.transaction():
            if not await self.approvals.expire(approval_id):
                return  # decided (or expired) by someone else first
            approval = await self.approvals.get(approval_id)
            if approval is None:
                return
            if await self.tasks.claim_status(approval.task_id, "waiting_for_approval", "expired"):
                await self.events.append(
                    approval.task_id, "task_expired", {"approval_id": approval_id}
                )
        thread = await self.thread_of(approval.task_id)
        if thread is None:
            return
        await self.resolve_card(thread, approval)
        await self._safely(
            self.backends[thread.platform].send(
                thread,
                f"This approval expired at {when(approval.decided_at)} without an answer; "
                f"`{clip(self.shown_command(approval), 200)}` did not run. Ask again "
                "if it is still needed.",
            )
        )

    async def run_scheduled(self, schedule: Schedule, *, catch_up: bool = False) -> None:
        """A scheduled prompt: a root message in its channel, the task in its thread.
        Returns when the task has answered or is waiting for approval."""
        channel = self._schedule_thread(schedule)
        if channel is None:
            return
        marker = " (catch-up for a run missed while DuckLM was down)" if catch_up else ""
        root = await self._safely(
            self.backends[channel.platform].send(
                channel,
                f"Scheduled run of `{schedule.schedule_id}`{marker}: {clip(schedule.prompt, 300)}",
            )
        )
        if not root:
            return
        thread = channel.in_thread(root)
        await self._run(
            thread,
            self.loop.run_chat(
                schedule.prompt,
                self.workspace_of(thread),
                conversation=thread.key,
                requested_by=schedule.created_by,
            ),
        )

    async def schedule_skipped(self, schedule: Schedule) -> None:
        channel = self._schedule_thread(schedule)
        if channel is not None:
            await self._safely(
                self.backends[channel.platform].send(
                    channel,
                    f"Skipped a run of schedule `{schedule.schedule_id}`: the previous run is "
                    "still going.",
                )
            )

    async def post_to_channel(self, where: str, text: str) -> bool:
        """Post `text` as a new message in a channel named `platform:channel`
        (`slack:C024BE91L`, `matrix:!room:example.org`). False, logged, when the
        name is not one or no platform of this process serves it."""
        platform, _, channel = where.partition(":")
        if not channel or platform not in self.backends:
            logger.warning("cannot post to %r: not a channel of a platform served here", where)
            return False
        posted = await self._safely(self.backends[platform].send(Thread(platform, channel), text))
        return bool(posted)

    def _schedule_thread(self, schedule: Schedule) -> Thread | None:
        try:
            thread = Thread.parse(schedule.conversation)
        except ValueError:
            return None
        if thread.platform not in self.backends:
            logger.warning(
                "schedule %s posts to %s, which this process does not serve",
                schedule.schedule_id,
                thread.platform,
            )
            return None
        return Thread(thread.platform, thread.channel)

    async def recover(self) -> None:
        """At start, after a crash: what the dead process owed (bot/recovery.py).
        Only the serving process calls it: it takes running tasks as its own."""
        await self.start()
        await self.recovery.at_start()

    async def recover_periodically(self) -> None:
        """From time to time in a running bot: lagging cards, open messages,
        decisions not carried out (a platform that was down, a job that failed)."""
        await self.recovery.periodic()

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Register this process as a replica and heartbeat (runtime/replica.py),
        before the platforms start: from then on the tasks it creates or
        continues are its own, and recovery elsewhere leaves them alone while it
        lives. Idempotent (`recover` calls it too, for callers that did not)."""
        if self.replica.started:
            return
        await self.replica.start()
        self.loop.owner = self.replica.replica_id
        # A heartbeat that came too late: survivors may have taken tasks over.
        self.replica.on_late(self.loop.stop_lost_tasks)
        self.replica.on_beat(self._refresh_stale_before)
        await self._refresh_stale_before()

    async def _refresh_stale_before(self) -> None:
        self.stale_before = await self.replica.earliest_live_start(self.started_at)

    async def drain(self) -> None:
        """Wait until no background job is left (jobs may start further jobs)."""
        while self._jobs:
            await asyncio.wait(set(self._jobs))

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        # Marked stopped last, after its jobs ended: survivors then report what
        # it left running at once, instead of after DUCKLM_REPLICA_TIMEOUT.
        await self.replica.stop()

    # -- background jobs ----------------------------------------------------

    def _spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _chat(
        self, thread: Thread, user: str, text: str, history: list[dict[str, str]]
    ) -> None:
        await self._run(
            thread,
            self.loop.run_chat(
                text,
                self.workspace_of(thread),
                history_messages=history,
                conversation=thread.key,
                requested_by=user,
            ),
        )

    async def _direct(
        self, thread: Thread, user: str, command: str, ticket: Inbound | None = None
    ) -> None:
        try:
            await self._run(
                thread,
                self.loop.run_command(
                    command,
                    self.workspace_of(thread),
                    conversation=thread.key,
                    requested_by=user,
                ),
            )
        finally:
            if ticket is not None:
                self.admission.finished(ticket)  # its flood-limit slot (issue #22)

    def continue_task(self, thread: Thread, task_id: str, approval_id: str) -> None:
        """Carry out a decision in the background (once: the loop claims the task)."""
        self._spawn(self._continue(thread, task_id, approval_id))

    async def _continue(self, thread: Thread, task_id: str, approval_id: str) -> None:
        self._threads[task_id] = thread
        await self._run(thread, self.loop.continue_after_approval(task_id, approval_id))

    async def _run(
        self,
        thread: Thread,
        turn: Coroutine[Any, Any, ChatResult],
        *,
        preface: str | None = None,
    ) -> None:
        backend = self.backends[thread.platform]
        async with self._slots:
            await self._safely(backend.working(thread, "on it…"))
            try:
                result = await turn
            except StoreError as exc:  # disk full, read-only file: an operator must act
                logger.error("database failure in %s: %s", thread.key, exc)
                # The cause, not the file's path: the channel needn't see the server's layout.
                await self._safely(
                    backend.send(
                        thread,
                        f"DuckLM could not save its work to its database, so it stopped "
                        f"({exc.cause}). An operator needs to check the bot's database "
                        "(disk space, permissions) and its log.",
                    )
                )
                return
            except Exception:  # the runtime turns failures into results; this is a bug
                logger.exception("task in %s crashed", thread.key)
                await self._safely(
                    backend.send(thread, "Sorry, something went wrong inside DuckLM.")
                )
                return
            finally:
                await self._safely(backend.working(thread, None))
            self._threads.pop(result.task_id, None)
            await self._deliver(thread, result, preface=preface)

    async def _deliver(
        self, thread: Thread, result: ChatResult, *, preface: str | None = None
    ) -> None:
        backend = self.backends[thread.platform]
        if result.already_handled:
            return
        if result.status == "waiting_for_approval" and result.pending_approval:
            if preface:
                await self._safely(backend.send(thread, preface))
            crash_point("waiting_recorded")  # test seam (issue #15): waiting, no card yet
            approval = await self.approvals.get(result.pending_approval.approval_id)
            if approval is not None:
                await self.post_card(thread, approval)
            return
        await self.deliver_answer(
            thread, result.task_id, answer_text(result.status, result.final_response), preface
        )

    async def deliver_answer(
        self, thread: Thread, task_id: str, text: str, preface: str | None = None
    ) -> None:
        """Post a task's answer, once across processes: a finished task owes it until
        the platform took it (tasks.answered_at); a failed post is retried by
        recovery. Answers of tasks that owe none (a continuation that found nothing
        to do) are simply posted."""
        if preface:
            text = f"{preface}\n\n{text}"
        try:
            claim = await self.tasks.claim_answer(task_id, stale_before=self.stale_before)
        except StoreError as exc:  # better said twice than never: post it anyway
            logger.error("could not record the answer of task %s: %s", task_id, exc)
            claim = "not_owed"
        if claim == "taken":
            return
        backend = self.backends[thread.platform]
        # A dead process was posting it: it may be out already.
        if claim == "reclaimed" and await self._safely(backend.find_answer(thread, text)):
            await self._safely(self.tasks.answered(task_id))
            return
        try:
            await backend.send(thread, text)
        except Exception:
            logger.exception("could not post the answer of task %s", task_id)
            if claim in ("claimed", "reclaimed"):
                await self._safely(self.tasks.release_answer(task_id))
            return
        if claim in ("claimed", "reclaimed"):
            await self._safely(self.tasks.answered(task_id))

    # -- cards --------------------------------------------------------------

    def _card(self, pending: PendingApproval, quorum: int = 1) -> ApprovalCard:
        """The card of a pending approval; `quorum`: how many approvers its risk needs
        in its channel (above 1, no Always: one person's rule would bypass it)."""
        risk = pending.risk_level or "high"
        always_rule = None
        if pending.tool == "shell_exec_safe" and pending.command:
            # A click in chat makes a rule for the card's channel only, capped by
            # DUCKLM_RULE_MAX_AGE: the confirmation says so.
            rule = describe_rule(*rule_for_command(pending.command))
            always_rule = f"{rule}, in this channel only"
            max_age = self.runtime.settings.rule_max_age
            if max_age is not None:
                always_rule += f", for {duration(max_age)}"
        return ApprovalCard(
            approval_id=pending.approval_id,
            task_id=pending.task_id,
            tool=pending.tool,
            command=pending.command,
            risk_level=risk,
            action_type=pending.action_type or "unknown",
            reason=pending.reason or "it may change something",
            model_reason=pending.model_reason,
            requested_by=pending.requested_by,
            always_offered=risk != "critical" and quorum <= 1,
            always_rule=always_rule,
            expires_at=pending.expires_at,
        )

    async def post_card(
        self, thread: Thread, approval: Approval, where: ChannelPolicy | None = None
    ) -> None:
        """Post a pending approval's card, once across processes (a lease on the
        row); its reference and state are stored together. A failed post is
        retried by recovery. `where`: the approval's policy, if the caller has it."""
        if approval.decision is not None:
            return
        # A claim left by a dead process: its post may have gone out unrecorded.
        in_flight = approval.card_claimed_at is not None
        if not await self.approvals.claim_card(
            approval.approval_id, "unposted", stale_before=self.stale_before
        ):
            return
        backend = self.backends[thread.platform]
        ref = None
        if in_flight:
            ref = await self._safely(backend.find_card(thread, approval.approval_id))
        if not ref:
            if where is None:
                where = await self.approval_policy(approval)
            card = self._card(
                PendingApproval.from_approval(approval, self.loop.redactor),
                where.quorum_for(approval.risk_level),
            )
            ref = await self._safely(backend.send_card(thread, card))
        if not ref:
            await self.approvals.release_card(approval.approval_id)
            return
        await self.approvals.card_posted(approval.approval_id, ref)
        fresh = await self.approvals.get(approval.approval_id)
        if fresh is not None and fresh.decision is not None:
            await self.resolve_card(thread, fresh)  # decided while the card was on its way

    async def resolve_card(self, thread: Thread, approval: Approval) -> None:
        """Show the decision on the card in place of its buttons, once; a failed
        update is retried by recovery."""
        if approval.card_state == "unposted" and approval.card_claimed_at is not None:
            found = await self._unrecorded_card(thread, approval)
            if found is None:
                return
            approval = found
        if approval.card_state != "posted" or not approval.card_ref:
            return
        if not await self.approvals.claim_card(
            approval.approval_id, "posted", stale_before=self.stale_before
        ):
            return
        card = self._card(PendingApproval.from_approval(approval, self.loop.redactor))
        resolution = CardResolution(
            approval.decision or "?",
            approval.decided_by,
            approval.decided_at,
            approval.decision_note,
        )
        try:
            await self.backends[thread.platform].resolve_card(
                thread, approval.card_ref, card, resolution
            )
        except Exception:
            logger.exception("could not update the card of approval %s", approval.approval_id)
            await self.approvals.release_card(approval.approval_id)
            return
        await self.approvals.card_resolved(approval.approval_id)

    # -- helpers --------------------------------------------------------------

    def shown_command(self, approval: Approval) -> str:
        """An approval's command as chat may show it: secrets redacted."""
        return self.loop.redactor.redact(approval.command or approval.tool).text

    async def thread_of(self, task_id: str) -> Thread | None:
        """The thread a task lives in, if a platform this process serves owns it."""
        task = await self.tasks.get_task(task_id)
        return self._served_thread(task.conversation if task else None)

    def _served_thread(self, conversation: str | None) -> Thread | None:
        """The thread of a task's conversation key, if a platform served here owns it."""
        if not conversation:
            return None
        try:
            thread = Thread.parse(conversation)
        except ValueError:
            return None
        return thread if thread.platform in self.backends else None

    async def _unrecorded_card(self, thread: Thread, approval: Approval) -> Approval | None:
        """A decided approval whose card post was under way when its poster died: the
        card, if the platform finds it, is recorded as posted (and then resolved)."""
        if not await self.approvals.claim_card(
            approval.approval_id, "unposted", stale_before=self.stale_before
        ):
            return None  # a live process is still posting it; it resolves it after
        backend = self.backends[thread.platform]
        ref = await self._safely(backend.find_card(thread, approval.approval_id))
        if not ref:
            # Not found (or not findable): nothing known to resolve; the claim goes.
            await self.approvals.release_card(approval.approval_id)
            return None
        await self.approvals.card_posted(approval.approval_id, ref)
        return await self.approvals.get(approval.approval_id)

    async def say(self, thread: Thread, text: str) -> None:
        """Post in a thread, best effort."""
        await self._safely(self.backends[thread.platform].send(thread, text))

    async def _latest_decided_in(self, thread: Thread) -> Approval | None:
        """The thread's most recently decided approval (what a late decision word meets)."""
        latest: Approval | None = None
        for task in await self.tasks.list_by_conversation(thread.key, limit=20):
            for approval in await self.approvals.list_for_task(task.task_id):
                if approval.decision is None or approval.decided_at is None:
                    continue
                if latest is None or approval.decided_at > (
                    latest.decided_at or approval.decided_at
                ):
                    latest = approval
        return latest

    async def _pending_in(self, thread: Thread) -> Approval | None:
        for task in await self.tasks.list_by_conversation(thread.key, limit=20):
            if task.status != "waiting_for_approval":
                continue
            pending = await self.approvals.pending_for_task(task.task_id)
            if pending:
                return pending[-1]
        return None

    async def _on_event(self, event: Event) -> None:
        """Show which tool runs while a chat task works."""
        if event.task_id is None:
            return
        if event.event_type == "task_created":
            key = event.payload.get("conversation")
            if isinstance(key, str):
                try:
                    thread = Thread.parse(key)
                except ValueError:
                    return
                if thread.platform in self.backends:
                    self._threads[event.task_id] = thread
            return
        if event.event_type != "tool_call_started":
            return
        thread = self._threads.get(event.task_id)
        if thread is None:
            return
        args = event.payload.get("args") or {}
        what = args.get("command") or args.get("path") or event.payload.get("tool")
        await self._safely(
            self.backends[thread.platform].working(thread, f"running `{clip(str(what), 80)}`")
        )

    @staticmethod
    async def _safely(call: Coroutine[Any, Any, Any]) -> Any:
        """Chat output is best effort: a platform error is logged, never fatal."""
        try:
            return await call
        except Exception:
            logger.exception("chat platform call failed")
            return None


def _reply_decision(text: str) -> c.DecisionReply | str | None:
    """A thread reply's decision words: approve / deny [reason] / always, or the
    new command of `edit <command>` (approve with an edit, issue #20); None when
    the text is neither."""
    reply = c.parse_decision(text)
    return reply if reply is not None else parse_edit(text)


def _already_decided(approval: Approval) -> str:
    if approval.decision == "expired":
        return f"This approval expired at {when(approval.decided_at)}; nothing ran."
    return (
        f"Already decided: {approval.decision} by {approval.decided_by} at "
        f"{when(approval.decided_at)}. Nothing changed."
    )


def _escalated(where: ChannelPolicy, state: EditState | None) -> ChannelPolicy:
    """`where` with the escalation approvers among the approvers once the
    approval was escalated (issue #20)."""
    if state is not None and state.escalated_at is not None:
        return where.escalated()
    return where
