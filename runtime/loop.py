"""RuntimeLoop: a task from question to answer, pausing for approvals.

The shape follows the seed design (two model roles, an action loop of up to
`max_tool_iterations` rounds that stops at the first action needing approval,
`continue_after_approval`), with its defects fixed:

- a continuation rebuilds the context the task started with (thread history,
  question and every observation gathered before the pause), not a bare task;
- an approved action runs at most once: the task is claimed with a
  compare-and-set on its status, the approval must be the one the task waits
  on, and the approval's execution is claimed in the store before running;
- no secret travels through the loop (the seed's `password` is gone).

Events are recorded as the task goes and written in groups, one commit per
group: everything recorded since the last write goes to the store right before
the task next does something outside this process (calls the model, runs a
tool other than an in-process read), or together with its next status change.
A new task's row is stored with its first group. The audit log therefore always
shows what was about to happen before it happens, and a task costs a handful of
commits instead of one per event.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from runtime.approvals import ApprovalService
from runtime.context import CALL_KEYS, ContextBuilder
from runtime.crashpoints import crash_after_spawn, crash_point
from runtime.model import ModelClient, ModelError, ModelResponse
from runtime.planner import ActionPlanner
from runtime.store import EventStore, TaskStore
from runtime.store.inbox import InboxHandled, InboxStore
from runtime.store.models import Approval, Event, Task
from runtime.store.replicas import OwnershipStore
from runtime.tools.base import ToolArgumentError, ToolResult
from runtime.tools.gateway import ToolGateway, normalize_action
from runtime.tools.redaction import COUNT_KEY, Redactor

logger = logging.getLogger("ducklm.runtime")

SHELL_TOOL = "shell_exec_safe"
WAITING_TEXT = "Waiting for approval."
NO_MODEL_TEXT = (
    "No model is configured: set DUCKLM_MODEL_BASE_URL (and DUCKLM_MODEL_API_KEY if the "
    "endpoint needs one). Direct commands (`run <command>`) work without a model."
)

EventListener = Callable[[Event], Awaitable[None] | None]
GatewayFactory = Callable[[str], ToolGateway]


@dataclass
class PendingApproval:
    """What a chat adapter needs to draw an approval card."""

    approval_id: str
    task_id: str
    index: int
    tool: str
    command: str | None
    reason: str | None  # why it needs approval
    risk_level: str | None
    action_type: str | None
    model_reason: str | None  # why the model wants it
    requested_by: str | None
    expires_at: datetime | None
    # Secrets replaced in what the card shows (command, reasons). The stored
    # action is untouched: approving runs the command as the model wrote it.
    redacted: int = 0

    @classmethod
    def from_approval(cls, approval: Approval, redactor: Redactor | None = None) -> PendingApproval:
        command, reason = approval.command, approval.reason
        model_reason = approval.action.get("reason")
        redacted = 0
        if redactor is not None:
            (command, reason, model_reason), redacted, _ = redactor.redact_value(
                (command, reason, model_reason)
            )
            if redacted:
                reason = (
                    f"{reason or 'it may change something'} (note: {redacted} secret "
                    "value(s) in this request are shown as [REDACTED:…]; approving runs "
                    "the command with the real value)"
                )
        return cls(
            approval_id=approval.approval_id,
            task_id=approval.task_id,
            index=approval.index,
            tool=approval.tool,
            command=command,
            reason=reason,
            risk_level=approval.risk_level,
            action_type=approval.action_type,
            model_reason=model_reason,
            requested_by=approval.requested_by,
            expires_at=approval.expires_at,
            redacted=redacted,
        )


@dataclass
class ChatResult:
    task_id: str
    status: str
    final_response: str
    reasoning_content: str | None = None
    pending_approval: PendingApproval | None = None
    # True when a continuation found its approval already handled by another
    # caller (double click, retry): nothing ran and there is nothing to post.
    already_handled: bool = False


class _TakenOver(Exception):
    """A status write of a running task found it no longer this replica's (a
    survivor reported it interrupted while this one was taken for dead, or
    another replica carries it on): the task stops here, with nothing written."""


class _NotClaimed(Exception):
    """Another caller continued the task first (double click, second process)."""


@dataclass
class _WaitingState:
    approval_id: str | None
    observations: list[dict[str, Any]]
    direct: bool


def format_direct_result(command: str, observation: dict[str, Any]) -> str:
    """The answer to a direct command: what ran and what it printed, no model involved."""
    result = observation.get("result") or {}
    metadata = result.get("metadata") or {}
    if observation.get("decision") == "deny":
        return f"`{command}` did not run: {result.get('error') or 'denied'}."
    if metadata.get("blocked"):
        return f"`{command}` is blocked and cannot run: {metadata.get('reason') or ''}".strip()
    if metadata.get("pending_approval"):
        return f"`{command}` needs approval, but approvals are not available here."
    output = (result.get("output") or "").rstrip("\n")
    status = f"exit {metadata.get('returncode')}" if "returncode" in metadata else "done"
    if metadata.get("timed_out"):
        status = "timed out"
    if "duration_ms" in metadata:
        status += f", {metadata['duration_ms']} ms"
    text = f"```\n$ {command}\n{output}\n```\n({status})" if output else f"`$ {command}` ({status})"
    if not result.get("ok") and result.get("error") and not output:
        text += f"\n{result['error']}"
    return text


class RuntimeLoop:
    def __init__(
        self,
        task_store: TaskStore,
        event_store: EventStore,
        model_client: ModelClient | None = None,
        context_builder: ContextBuilder | None = None,
        approval_service: ApprovalService | None = None,
        max_tool_iterations: int = 4,
        *,
        gateway_factory: GatewayFactory | None = None,
        default_workspace: str = ".",
        redactor: Redactor | None = None,
    ) -> None:
        self.task_store = task_store
        self.event_store = event_store
        self.model_client = model_client
        self.approval_service = approval_service
        self.max_tool_iterations = max_tool_iterations
        self.default_workspace = default_workspace
        # Secrets are kept out of every event, answer and card this loop writes
        # (tool results are already redacted by the gateway). Share it with the
        # gateways so credentials learnt at run time apply everywhere.
        self.redactor = redactor if redactor is not None else Redactor()
        self._gateway_factory: GatewayFactory = gateway_factory or partial(
            ToolGateway.default, redactor=self.redactor
        )
        self._gateways: dict[str, ToolGateway] = {}
        self.context_builder = context_builder or ContextBuilder(
            self._gateway(default_workspace).specs()
        )
        # The action step (either protocol); None without a model.
        self.planner = (
            ActionPlanner(model_client, self.context_builder) if model_client is not None else None
        )
        # Planners offering only the tools a channel allows, by those tools' names
        # (see `_planner_for`); few distinct sets exist, so each is built once.
        self._narrowed: dict[frozenset[str], ActionPlanner] = {}
        self._listeners: list[EventListener] = []
        # Per task: events recorded since its last write (type, payload, time),
        # and tasks created but not yet stored.
        self._unwritten: dict[str, list[tuple[str, dict[str, Any], float]]] = {}
        self._unstored: dict[str, Task] = {}
        # Per unstored task: the inbox row (a person's recorded message) that the
        # task's first write closes, in the same commit as the task row.
        self._inbox_rows: dict[str, str] = {}
        self._inbox = InboxStore(task_store.db)
        # Which tools a task's channel allows (issue #20, set by bot/service.py from
        # the policy): given the task's conversation and a tool name, why that tool
        # may not be used there, or None. Unset: every tool may be used.
        self.tool_refusal: Callable[[str | None, str], str | None] | None = None
        # The replica running this loop (runtime/replica.py), recorded as the
        # owner of every task it creates or continues, in the same commit that
        # makes the task running: recovery on another replica then leaves the
        # task alone while this one heartbeats. None: no replica registered
        # (a CLI, a test), tasks are unowned and judged by age as before #19.
        self.owner: str | None = None
        # The turn (asyncio task) carrying out each task now, so a replica that
        # learns it was taken for dead can stop the tasks survivors took over.
        self._turns: dict[str, asyncio.Task[Any]] = {}
        self._ownership = OwnershipStore(task_store.db)

    # -- public API -------------------------------------------------------

    def add_listener(self, listener: EventListener) -> None:
        """Be told of every event as it is written (progress display, chat status)."""
        self._listeners.append(listener)

    async def run_chat(
        self,
        message: str,
        workspace: str | None = None,
        debug: bool = False,
        history_messages: list[dict[str, str]] | None = None,
        *,
        conversation: str | None = None,
        requested_by: str | None = None,
        inbox_id: str | None = None,
    ) -> ChatResult:
        """Answer a question. With `inbox_id`, the task row and the closing of that
        inbox row commit together; a row closed already (by another process's
        recovery) makes this a no-op (`already_handled`)."""
        task = await self._create(
            message,
            workspace,
            debug,
            history_messages,
            conversation,
            requested_by,
            mode="chat",
            inbox_id=inbox_id,
        )
        return await self._guard(task, self._model_turn(task, []))

    async def run_command(
        self,
        command: str,
        workspace: str | None = None,
        *,
        conversation: str | None = None,
        requested_by: str | None = None,
        inbox_id: str | None = None,
    ) -> ChatResult:
        """A direct command: straight to the shell tool under the same approval rules.
        `inbox_id` as for `run_chat`."""
        task = await self._create(
            command,
            workspace,
            False,
            None,
            conversation,
            requested_by,
            mode="direct",
            inbox_id=inbox_id,
        )
        self._record(
            task.task_id, "direct_command", {"command": command, "model": None, "via": "direct"}
        )
        return await self._guard(task, self._direct_turn(task, command))

    async def continue_after_approval(self, task_id: str, approval_id: str) -> ChatResult:
        if self.approval_service is None:
            return ChatResult(task_id, "failed", "Approval service is not configured.")
        task = await self.task_store.get_task(task_id)
        approval = await self.approval_service.get(approval_id)
        if task is None:
            return ChatResult(task_id, "failed", "Task not found.")
        if approval is None or approval.task_id != task_id:
            return ChatResult(task_id, "failed", "Approval not found for task.")
        if approval.decision is None:
            return ChatResult(
                task_id,
                "waiting_for_approval",
                WAITING_TEXT,
                pending_approval=PendingApproval.from_approval(approval, self.redactor),
            )
        if approval.decision == "expired":
            return ChatResult(task_id, task.status, "This approval expired before anyone answered.")

        state = await self._waiting_state(task_id)
        continued = {
            "approval_id": approval_id,
            "decision": approval.decision,
            "decided_by": approval.decided_by,
        }
        try:
            if state.approval_id != approval_id:
                raise _NotClaimed
            # The claim (waiting -> running) and its event commit together.
            await self._write(
                task_id, partial(self._claim_continuation, task_id), ("task_continued", continued)
            )
        except _NotClaimed:
            current = await self.task_store.get_task(task_id)
            return ChatResult(
                task_id,
                current.status if current else task.status,
                "Already handled.",
                already_handled=True,
            )
        return await self._guard(task, self._resume(task, approval, state))

    async def _claim_continuation(self, task_id: str) -> None:
        """Compare-and-set the task from waiting to running, owned by this replica
        from now on; only one caller (of every replica) gets it."""
        if not await self._ownership.claim_continuation(task_id, self.owner):
            raise _NotClaimed

    # -- turns ------------------------------------------------------------

    async def _create(
        self,
        message: str,
        workspace: str | None,
        debug: bool,
        history: list[dict[str, str]] | None,
        conversation: str | None,
        requested_by: str | None,
        *,
        mode: str,
        inbox_id: str | None = None,
    ) -> Task:
        # Stored with the task's first write (before its first model call or
        # tool), in the same commit as the events recorded until then.
        task = self.task_store.new_task(
            message,
            workspace,
            debug,
            conversation=conversation,
            requested_by=requested_by,
            history_messages=list(history or []),
        )
        self._unstored[task.task_id] = task
        if inbox_id is not None:
            self._inbox_rows[task.task_id] = inbox_id
        self._record(
            task.task_id,
            "task_created",
            {
                "message": message,
                "workspace": workspace,
                "debug": debug,
                "mode": mode,
                "conversation": conversation,
                "requested_by": requested_by,
            },
        )
        return task

    async def _guard(self, task: Task, turn: Awaitable[ChatResult]) -> ChatResult:
        """Turn any failure into a failed task with a human message, never a traceback."""
        me = asyncio.current_task()
        if me is not None:
            self._turns[task.task_id] = me
        try:
            return await turn
        except _TakenOver:
            return await self._taken_over(task.task_id)
        except InboxHandled:
            # Its message is someone else's task already; nothing was stored here.
            return ChatResult(task.task_id, "duplicate", "Already handled.", already_handled=True)
        except ModelError as exc:
            return await self._fail(task.task_id, str(exc))
        except Exception as exc:
            logger.exception("task %s crashed", task.task_id)
            return await self._fail(task.task_id, f"Internal error: {type(exc).__name__}: {exc}")
        finally:
            if self._turns.get(task.task_id) is me:
                del self._turns[task.task_id]
            # Only a cancelled turn (or a store that failed even to record the
            # failure) leaves events behind; they cannot be written now.
            self._unwritten.pop(task.task_id, None)
            self._unstored.pop(task.task_id, None)
            self._inbox_rows.pop(task.task_id, None)

    async def _model_turn(self, task: Task, observations: list[dict[str, Any]]) -> ChatResult:
        if self.model_client is None:
            return await self._fail(task.task_id, NO_MODEL_TEXT)
        messages = self.context_builder.build_basic_messages(task)
        observations, planning_failed = await self._action_loop(task, messages, observations)
        waiting = await self._wait_if_pending(task, observations, direct=False)
        if waiting is not None:
            return waiting
        return await self._answer(task, messages, observations, planning_failed=planning_failed)

    async def _direct_turn(self, task: Task, command: str) -> ChatResult:
        action = {"tool": SHELL_TOOL, "args": {"command": command}, "reason": "direct command"}
        observations = [await self._act(task, 1, action)]
        waiting = await self._wait_if_pending(task, observations, direct=True)
        if waiting is not None:
            return waiting
        return await self._finish(
            task, format_direct_result(command, observations[-1]), observations=observations
        )

    async def _resume(self, task: Task, approval: Approval, state: _WaitingState) -> ChatResult:
        decided = await self._run_decided(task, approval)
        # A native tool call keeps its id, so its result answers that call.
        for waiting in state.observations:
            if waiting.get("approval_id") == approval.approval_id:
                decided.update({k: waiting[k] for k in CALL_KEYS if k in waiting})
        observations = [
            o for o in state.observations if o.get("approval_id") != approval.approval_id
        ]
        observations.append(decided)
        observations.sort(key=lambda o: o.get("index", 0))
        if state.direct:
            return await self._finish(
                task,
                format_direct_result(approval.command or task.message, decided),
                observations=observations,
            )
        return await self._model_turn(task, observations)

    # -- model steps ------------------------------------------------------

    async def _action_loop(
        self, task: Task, messages: list[dict[str, str]], observations: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Plan and act for up to `max_tool_iterations` rounds. Returns the
        observations and, when the action model's replies could not be used
        even after the repair round, why (the thinker is told)."""
        planner = self._planner_for(task)
        observations = list(observations)
        if planner is None:
            return observations, None  # the channel allows no tool: the thinker answers
        call = partial(self._call_model, task.task_id)
        record = partial(self._record, task.task_id)
        for round_number in range(1, self.max_tool_iterations + 1):
            plan = await planner.plan(call, record, messages, observations)
            if plan.failed is not None:
                return observations, plan.failed
            if not plan.actions:
                return observations, None
            # Rounds are numbered across continuations, so replayed tool calls
            # keep their grouping after an approval.
            round_id = f"{len(observations)}.{round_number}"
            for proposed in plan.actions:
                action = {k: proposed.get(k) for k in ("tool", "args", "reason")}
                observation = await self._act(task, len(observations) + 1, action)
                if proposed.get("call_id"):
                    observation.setdefault("tool", proposed["tool"])
                    observation.update(
                        call_id=proposed["call_id"],
                        round=round_id,
                        args=proposed.get("args") or {},
                        function=proposed.get("function") or proposed["tool"],
                    )
                observations.append(observation)
                if observation.get("approval_id"):
                    return observations, None
        self._record(
            task.task_id,
            "tool_iteration_limit_reached",
            {"max_tool_iterations": self.max_tool_iterations},
        )
        return observations, None

    async def _answer(
        self,
        task: Task,
        messages: list[dict[str, str]],
        observations: list[dict[str, Any]],
        *,
        planning_failed: str | None = None,
    ) -> ChatResult:
        thinker_messages = self.context_builder.with_observations(messages, observations)
        if planning_failed is not None:
            thinker_messages = [
                *thinker_messages,
                {
                    "role": "user",
                    "content": (
                        "planning_failed: the planning step could not produce usable tool "
                        f"calls, even after one repair round ({planning_failed}). No further "
                        "tool ran. Tell the user plainly that planning failed, and answer "
                        "only from what is known."
                    ),
                },
            ]
        response = await self._call_model(task.task_id, "thinker", thinker_messages)
        answer = response.content
        notes = []
        if planning_failed is not None:
            notes.append(
                f"(Planning failed: the action model's reply could not be used, twice: "
                f"{planning_failed}. No further tool ran.)"
            )
        if response.finish_reason == "length":
            notes.append(
                "(This answer was cut off: the model reached its token limit, "
                "DUCKLM_THINKER_MAX_TOKENS.)"
            )
        elif response.finish_reason == "content_filter":
            notes.append("(This answer was cut off by the model provider's content filter.)")
        if notes:
            answer = "\n\n".join([answer.rstrip(), *notes] if answer.strip() else notes)
        return await self._finish(
            task, answer, response.reasoning_content, observations=observations
        )

    async def _call_model(
        self, task_id: str, role: str, messages: list[dict[str, Any]], **options: Any
    ) -> ModelResponse:
        """One model call with its events. Action calls arrive with their
        system prompt (the planner picks it per protocol); thinker calls get it here."""
        assert self.model_client is not None
        self._record(task_id, "model_call_started", {"role": role})
        await self._flush(task_id)
        if role == "thinker":
            messages = self.context_builder.for_role(role, messages)
        response = await self.model_client.chat(role, messages, **options)
        if role == "thinker":
            self._record(
                task_id,
                "cognition_response",
                {
                    "role": response.role,
                    "content": response.content,
                    "reasoning_content": response.reasoning_content,
                },
            )
        self._record(
            task_id,
            "model_call_finished",
            {
                "role": response.role,
                "model": response.model,
                "latency_ms": response.latency_ms,
                "prompt_tokens": response.prompt_tokens,
                "completion_tokens": response.completion_tokens,
                "total_tokens": response.total_tokens,
                "finish_reason": response.finish_reason,
            },
        )
        return response

    # -- tool steps -------------------------------------------------------

    async def _act(self, task: Task, index: int, raw_action: Any) -> dict[str, Any]:
        """Run one proposed action, or stop it for approval. Returns its observation."""
        try:
            action = normalize_action(raw_action)
        except ToolArgumentError as exc:
            return {"index": index, "ok": False, "error": str(exc)}
        tool = action["tool"]
        refused = self._tool_refused(task, tool)
        if refused is not None:
            # Stopped before it runs, as a blocked command is; the model is told.
            return self._refused_tool(task, index, action, refused)
        self._record(
            task.task_id,
            "tool_call_started",
            {"index": index, "tool": tool, "args": action["args"]},
        )
        by_rule = bool(
            self.approval_service
            # The workspace: the operands a prefix rule lets a command add resolve there.
            and await self.approval_service.is_allowed_forever(
                action,
                task.workspace or self.default_workspace,
                # Rules scoped to another channel do not count here (issue #21).
                conversation=task.conversation,
                record=partial(self._record, task.task_id),
            )
        )
        gateway = self._gateway(task.workspace)
        if gateway.leaves_the_process(action):
            await self._flush(task.task_id)
        result = await gateway.run_action(action, approved=by_rule)
        payload = result.model_dump()
        await self._audit(
            task.task_id, index, action, payload, approved_by="rule" if by_rule else None
        )
        observation: dict[str, Any] = {
            "index": index,
            "tool": tool,
            # The model sees its observations again: no secret in them either.
            "reason": self._shown(action["reason"]),
            "result": payload,
        }
        if not result.metadata.get("pending_approval"):
            self._record(
                task.task_id,
                "tool_call_finished",
                {"index": index, "tool": tool, "result": payload},
            )
            return observation

        approval = None
        if self.approval_service is not None:
            approval = await self.approval_service.create_pending(
                task.task_id,
                action,
                index=index,
                # From the action, never the (redacted) result: rules are made from it.
                # Other tools get their one-line description (MCP: `mcp server/tool {args}`).
                command=gateway.describe(action),
                risk_level=result.metadata.get("risk_level"),
                action_type=result.metadata.get("action_type"),
                reason=result.metadata.get("reason"),
                requested_by=task.requested_by,
            )
            crash_point("approval_recorded")  # test seam (issue #15): stored, not waited on
        self._record(
            task.task_id,
            "tool_approval_requested",
            {
                "index": index,
                "tool": tool,
                "action": action,
                "approval_id": approval.approval_id if approval else None,
                "reason": result.error,
                "risk_level": result.metadata.get("risk_level"),
                "action_type": result.metadata.get("action_type"),
            },
        )
        observation["requires_approval"] = True
        observation["approval_id"] = approval.approval_id if approval else None
        return observation

    def _planner_for(self, task: Task) -> ActionPlanner | None:
        """The planner offering the model only the tools the task's channel allows
        (issue #20), so it does not spend a round on one that would be refused;
        None when none is allowed. A tool named anyway is still refused when it
        is dispatched (`_tool_refused`)."""
        assert self.planner is not None
        specs = self.context_builder.tool_specs
        allowed = [spec for spec in specs if self._tool_refused(task, spec["tool"]) is None]
        if len(allowed) == len(specs):
            return self.planner
        if not allowed:
            return None
        names = frozenset(spec["tool"] for spec in allowed)
        planner = self._narrowed.get(names)
        if planner is None:
            planner = ActionPlanner(self.planner.client, ContextBuilder(allowed), specs)
            self._narrowed[names] = planner
        return planner

    def _tool_refused(self, task: Task, tool: str) -> str | None:
        return self.tool_refusal(task.conversation, tool) if self.tool_refusal else None

    def _refused_tool(
        self, task: Task, index: int, action: dict[str, Any], refused: str
    ) -> dict[str, Any]:
        """The observation (and the tool_refused event) of a tool the task's channel
        does not allow."""
        tool = action["tool"]
        self._record(
            task.task_id,
            "tool_refused",
            {"index": index, "tool": tool, "args": action["args"], "reason": refused},
        )
        return {
            "index": index,
            "tool": tool,
            "reason": self._shown(action["reason"]),
            "result": _policy_refusal(refused).model_dump(),
        }

    async def _run_decided(self, task: Task, approval: Approval) -> dict[str, Any]:
        """Run (or record the refusal of) the action a person decided on."""
        assert self.approval_service is not None
        action, index, tool = approval.action, approval.index, approval.tool
        approved = approval.decision in ("approve", "always")
        # The channel's policy may have changed since the card was posted (a restart
        # with another policy file): a tool no longer allowed there does not run.
        refused = self._tool_refused(task, tool) if approved else None
        if refused is not None:
            self._record(
                task.task_id,
                "tool_refused",
                {
                    "index": index,
                    "tool": tool,
                    "reason": refused,
                    "approval_id": approval.approval_id,
                },
            )
            result = _policy_refusal(refused)
        elif approved:
            if not await self.approval_service.claim_execution(approval.approval_id):
                raise RuntimeError("this approval's action was already run")
            crash_point("execution_claimed")  # test seam (issue #15): spent, not started
            self._record(
                task.task_id,
                "tool_call_started",
                {
                    "index": index,
                    "tool": tool,
                    "args": action.get("args") or {},
                    "approval_id": approval.approval_id,
                },
            )
            await self._flush(task.task_id)
            # Test seam (issue #15), armed only by DUCKLM_CRASH_AT: dies while it runs.
            result = await crash_after_spawn(
                "command_spawned",
                self._gateway(task.workspace).run_action(action, approved=True),
            )
        else:
            note = f": {approval.decision_note}" if approval.decision_note else ""
            result = ToolResult(
                ok=False,
                error=f"Denied by {approval.decided_by or 'an approver'}{note}",
                metadata={"decision": "deny", "note": approval.decision_note},
            )
        payload = result.model_dump()
        await self._audit(
            task.task_id,
            index,
            action,
            payload,
            approved_by=approval.decided_by if approval.decision != "deny" else None,
        )
        # The approval id says which approved run finished (recovery looks for it).
        self._record(
            task.task_id,
            "tool_call_finished",
            {"index": index, "tool": tool, "result": payload, "approval_id": approval.approval_id},
        )
        decided = {
            "index": index,
            "tool": tool,
            "reason": self._shown(action.get("reason")),
            "decision": approval.decision,
            "decided_by": approval.decided_by,
            "note": self._shown(approval.decision_note),
            "result": payload,
        }
        edited = action.get("edited")
        if isinstance(edited, dict):
            # Approved with an edit (issue #20): the model learns what ran instead
            # of what it proposed, so it does not propose the original again.
            decided["edited"] = self._shown(
                f"{edited.get('by')} edited your command `{edited.get('from')}` into "
                f"`{edited.get('to')}` before approving; the edited command is what "
                "ran. Do not run the original again."
            )
        return decided

    async def _audit(
        self,
        task_id: str,
        index: int,
        action: dict[str, Any],
        payload: dict[str, Any],
        *,
        approved_by: str | None,
    ) -> None:
        if action.get("tool") != SHELL_TOOL:
            return
        metadata = payload.get("metadata") or {}
        self._record(
            task_id,
            "command_audit",
            {
                "index": index,
                "tool": SHELL_TOOL,
                "command": _command_of(action, payload),
                "action_type": metadata.get("action_type"),
                "risk_level": metadata.get("risk_level"),
                "requires_approval": bool(metadata.get("requires_approval")),
                "blocked": bool(metadata.get("blocked")),
                "approved": approved_by is not None,
                "approved_by": approved_by,
                "ok": bool(payload.get("ok")),
                "returncode": metadata.get("returncode"),
                "duration_ms": metadata.get("duration_ms"),
                "timed_out": bool(metadata.get("timed_out")),
                "truncated": bool(metadata.get("truncated")),
                "reason": metadata.get("reason") or payload.get("error"),
                "sandboxed": bool(metadata.get("sandboxed")),
                "sandbox_profile": metadata.get("sandbox_profile"),
            },
        )
        # What the sandbox stopped (best-effort detection, see shell/refusals.py).
        if metadata.get("sandbox_refusals"):
            self._record(
                task_id,
                "sandbox_refusal",
                {
                    "index": index,
                    "command": _command_of(action, payload),
                    "refused": list(metadata["sandbox_refusals"]),
                    "sandbox_profile": metadata.get("sandbox_profile"),
                    "returncode": metadata.get("returncode"),
                },
            )

    # -- endings ----------------------------------------------------------

    async def _wait_if_pending(
        self, task: Task, observations: list[dict[str, Any]], *, direct: bool
    ) -> ChatResult | None:
        pending = next((o for o in reversed(observations) if o.get("approval_id")), None)
        if pending is None:
            return None
        await self._write(
            task.task_id,
            self._fenced(partial(self.task_store.waiting_for_approval, task.task_id)),
            (
                "task_waiting_for_approval",
                {
                    "approval_id": pending["approval_id"],
                    "direct": direct,
                    "observations": observations,
                },
            ),
        )
        assert self.approval_service is not None
        approval = await self.approval_service.get(pending["approval_id"])
        return ChatResult(
            task.task_id,
            "waiting_for_approval",
            WAITING_TEXT,
            pending_approval=PendingApproval.from_approval(approval, self.redactor)
            if approval
            else None,
        )

    async def _finish(
        self,
        task: Task,
        final_response: str,
        reasoning_content: str | None = None,
        *,
        observations: list[dict[str, Any]] | None = None,
    ) -> ChatResult:
        final_response = self._redacted_answer(final_response, observations or [])
        if reasoning_content:
            reasoning_content = self.redactor.redact(reasoning_content).text
        await self._write(
            task.task_id,
            self._fenced(partial(self.task_store.complete_task, task.task_id, final_response)),
            (
                "task_completed",
                {"final_response": final_response, "reasoning_content": reasoning_content},
            ),
        )
        return ChatResult(task.task_id, "completed", final_response, reasoning_content)

    async def _fail(self, task_id: str, error: str) -> ChatResult:
        error = self.redactor.redact(error).text
        try:
            await self._write(
                task_id,
                self._fenced(partial(self.task_store.fail_task, task_id, error)),
                ("task_failed", {"error": error}),
            )
        except _TakenOver:  # called from `_guard`'s handlers: handled here
            return await self._taken_over(task_id)
        return ChatResult(task_id, "failed", error)

    async def stop_lost_tasks(self) -> list[str]:
        """Cancel the turns of tasks that are no longer this replica's: reported
        interrupted by a survivor (this replica was taken for dead: a late
        heartbeat), or running as another replica's. Such a turn must not call
        another tool; its final write would be refused anyway (`_fenced`).
        Returns the task ids stopped."""
        if self.owner is None:
            return []
        stopped = []
        for task_id, turn in list(self._turns.items()):
            if task_id in self._unstored:
                continue  # not stored yet: nobody else can have taken it
            current = await self.task_store.get_task(task_id)
            if current is not None and current.status == "running":
                if await self._ownership.owner_of(task_id) == self.owner:
                    continue
            elif current is not None and current.status != "interrupted":
                continue  # finished or waiting by this turn's own last write
            logger.error(
                "task %s was taken over while this replica was taken for dead (%s now): "
                "stopping it here",
                task_id,
                current.status if current else "gone",
            )
            turn.cancel()
            stopped.append(task_id)
        return stopped

    def _fenced(self, write: Callable[..., Awaitable[bool]]) -> Callable[[], Awaitable[None]]:
        """A status write of a running task, done only while the task is still
        running and this replica's; raises `_TakenOver` (rolling back the write's
        transaction: no final event either) when it is not."""

        async def fenced() -> None:
            if not await write(if_running=True, owner=self.owner):
                raise _TakenOver

        return fenced

    async def _taken_over(self, task_id: str) -> ChatResult:
        current = await self.task_store.get_task(task_id)
        status = current.status if current else "interrupted"
        logger.warning(
            "task %s is no longer this replica's (it is %s now): stopped without writing",
            task_id,
            status,
        )
        # already_handled: the thread gets nothing from here (whoever changed the
        # task owes what the thread is told).
        return ChatResult(task_id, status, "Taken over.", already_handled=True)

    # -- plumbing ---------------------------------------------------------

    async def _waiting_state(self, task_id: str) -> _WaitingState:
        """What the task was waiting on, and what it had learned by then, from its events."""
        approval_id, observations, direct = None, [], False
        for event in await self.event_store.list_events(task_id):
            if event.event_type == "task_waiting_for_approval":
                approval_id = event.payload.get("approval_id")
                observations = list(event.payload.get("observations") or [])
                direct = bool(event.payload.get("direct"))
        return _WaitingState(approval_id, observations, direct)

    def _gateway(self, workspace: str | None) -> ToolGateway:
        key = workspace or self.default_workspace
        gateway = self._gateways.get(key)
        if gateway is None:
            gateway = self._gateways[key] = self._gateway_factory(key)
        return gateway

    def _atomic(self) -> AbstractAsyncContextManager[None]:
        """One transaction when the tasks and the events share a database."""
        db = self.task_store.db
        return db.transaction() if db is self.event_store.db else nullcontext()

    def _shown(self, text: str | None) -> str | None:
        return self.redactor.redact(text).text if text else text

    def _redacted_answer(self, answer: str, observations: list[dict[str, Any]]) -> str:
        """The answer with secrets replaced (a user can paste a token, a model can
        echo one), and one line saying so when anything the task saw or said was
        redacted: a reader must know the placeholders are not the real output."""
        seen = sum(
            int(((o.get("result") or {}).get("metadata") or {}).get(COUNT_KEY) or 0)
            for o in observations
        )
        found = self.redactor.redact(answer)
        notes = []
        if seen:
            notes.append(f"({seen} secret value(s) in tool output were redacted.)")
        if found.count:
            notes.append(f"({found.count} secret value(s) in this answer were redacted.)")
        return "\n\n".join([found.text, *notes]) if notes else found.text

    def _record(self, task_id: str, event_type: str, payload: dict[str, Any]) -> None:
        """Note an event now; it is written with the task's next write. Its payload
        is redacted first: the audit log never holds a secret, even one the user
        or the model typed into a command (the stored approval keeps the real
        action, which is what runs)."""
        payload, _, _ = self.redactor.redact_value(payload)
        self._unwritten.setdefault(task_id, []).append((event_type, payload, time.time()))

    async def _flush(self, task_id: str) -> None:
        """Write what the task recorded, before it does something outside this process."""
        await self._write(task_id)

    async def _write(
        self,
        task_id: str,
        status_change: Callable[[], Awaitable[object]] | None = None,
        last: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        """Write the task's recorded events, then `last`, in one commit together
        with the task itself if it is new and with `status_change` (a task's
        status and the event saying so commit together or not at all: a full
        disk must not leave a finished task without its final event). Listeners
        are told after the commit."""
        new_task = self._unstored.get(task_id)
        recorded = self._unwritten.get(task_id, [])
        events = [(kind, payload) for kind, payload, _ in recorded]
        times = [at for _, _, at in recorded]
        if last is not None:
            # Redacted like every recorded event (see `_record`).
            events.append((last[0], self.redactor.redact_value(last[1])[0]))
            times.append(time.time())
        if status_change is None and not events:
            return
        several = new_task is not None or status_change is not None
        inbox_id = self._inbox_rows.get(task_id) if new_task is not None else None
        async with self._atomic() if several else nullcontext():
            if new_task is not None:
                # Owned by this replica in the statement that stores it.
                await self.task_store.insert(new_task, owner=self.owner)
                # The message that asked for it is carried out from now on (issue #15).
                if inbox_id is not None and not await self._inbox.close(inbox_id, "task", task_id):
                    raise InboxHandled(inbox_id)
            if status_change is not None:
                await status_change()
            written = await self.event_store.append_many(task_id, events, at=times)
        # Dropped only once committed: if the write failed, `_fail` tries them again.
        self._unstored.pop(task_id, None)
        self._unwritten.pop(task_id, None)
        self._inbox_rows.pop(task_id, None)
        for event in written:
            await self._notify(event)

    async def _notify(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                outcome = listener(event)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:  # a broken progress display must not break the task
                logger.exception("event listener failed on %s", event.event_type)


def _command_of(action: dict[str, Any], payload: dict[str, Any]) -> str | None:
    metadata = payload.get("metadata") or {}
    command = metadata.get("command") or (action.get("args") or {}).get("command")
    return command if isinstance(command, str) else None


def _policy_refusal(reason: str) -> ToolResult:
    """What a tool the task's channel does not allow gives, whether it was stopped
    before running or after a person approved it (the policy changed meanwhile)."""
    return ToolResult(ok=False, error=reason, metadata={"refused": "policy"})
