"""Carrying out the `/duck` commands that read or manage the store.

Every surface (Slack, Matrix, console, CLI) parses with `bot/commands.py` and
renders the plain-text replies built here; `run` and thread decisions need a
task thread, so the surfaces handle those themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from bot import commands as c
from bot.policy import Actor, ChannelPolicy
from runtime import rule_review
from runtime.approvals import ApprovalError, ApprovalService
from runtime.store import EventStore, ScheduleStore, TaskStore
from runtime.store.audit import verify
from runtime.store.models import Approval, Event, Rule, Schedule, Task

MAX_LISTED = 20


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def clip(text: str | None, limit: int = 80) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_rule(rule: Rule, at: datetime | None = None, shown: Callable[[str], str] = str) -> str:
    """One line: what it allows, where, until when, its use, and who made it from what;
    `shown` redacts the pattern for chat (a rule made by "Always" holds the command as
    it runs, secrets included)."""
    moment = at or datetime.now(UTC)
    if not rule.active:
        state = f" (revoked by {rule.revoked_by}, {when(rule.revoked_at)})"
    elif rule.expired(moment):
        state = f" (EXPIRED {when(rule.expires_at)})"
    elif rule.expires_at is not None:
        state = f", expires {when(rule.expires_at)}"
    else:
        state = ""
    where = f"in {rule.scope}" if rule.scope else "global"
    used = (
        f"used {rule.use_count}×, last {when(rule.last_used_at)}"
        if rule.use_count
        else "never used"
    )
    source = f" from approval `{rule.source_approval_id}`" if rule.source_approval_id else ""
    return (
        f"`{rule.rule_id}` {rule.kind} `{shown(rule.pattern)}` — {where}{state}; {used}; "
        f"by {rule.created_by}{source}, {when(rule.created_at)}"
    )


def describe_preview(preview: rule_review.Preview, shown: Callable[[str], str] = str) -> str:
    """What a rule would have allowed, from the audit log's recent commands."""
    head = f"A {preview.kind} rule `{shown(preview.pattern)}`"
    if not preview.allowed:
        lines = [f"{head} would have allowed none of the last {preview.scanned} commands."]
    else:
        lines = [f"{head} would have allowed {len(preview.allowed)} past command(s):"]
        lines += [f"  ✓ `{clip(shown(cmd), 120)}` ×{n}" for cmd, n in preview.allowed]
    if preview.near:
        lines.append("It would not allow (same program):")
        lines += [f"  ✗ `{clip(shown(cmd), 120)}`" for cmd in preview.near]
    return "\n".join(lines)


def describe_approval(approval: Approval, shown: Callable[[str], str] = str) -> str:
    """One line per pending approval; `shown` redacts the command for chat."""
    what = shown(approval.command or approval.tool)
    return (
        f"`{approval.approval_id}` {approval.risk_level or '?'} `{clip(what, 120)}` — task "
        f"`{approval.task_id}`, asked by {approval.requested_by or '?'}, "
        f"{when(approval.created_at)}"
    )


def describe_task(task: Task) -> str:
    return (
        f"`{task.task_id}` {task.status} — {clip(task.message, 60)!r} "
        f"({task.requested_by or '?'}, {when(task.created_at)})"
    )


def describe_schedule(schedule: Schedule) -> str:
    state = " (paused)" if schedule.paused else ""
    last = f", last run {when(schedule.last_run_at)}" if schedule.last_run_at else ""
    return (
        f"`{schedule.schedule_id}` `{schedule.cron}` {schedule.timezone}{state} — "
        f"{clip(schedule.prompt, 80)!r} (by {schedule.created_by}{last})"
    )


def describe_event(event: Event) -> str:
    """One line per audit event, the facts an on-call engineer looks for first."""
    p = event.payload
    kind = event.event_type
    detail = ""
    if kind == "command_audit":
        how = f"approved by {p.get('approved_by')}" if p.get("approved") else ""
        if p.get("blocked"):
            how = "blocked"
        elif p.get("requires_approval") and not p.get("approved"):
            how = "needs approval"
        rc = p.get("returncode")
        detail = f"`{clip(p.get('command'), 100)}` {p.get('risk_level')} {how}".rstrip()
        if rc is not None:
            detail += f", exit {rc}"
    elif kind in ("tool_call_started", "tool_call_finished"):
        detail = str(p.get("tool"))
        result = p.get("result") or {}
        if kind == "tool_call_finished":
            detail += " ok" if result.get("ok") else f" failed: {clip(result.get('error'), 80)}"
    elif kind == "tool_approval_requested":
        detail = f"approval `{p.get('approval_id')}` ({p.get('risk_level')})"
    elif kind == "approval_decided":
        detail = f"{p.get('decision')} by {p.get('decided_by')}"
        if p.get("note"):
            detail += f": {clip(p.get('note'), 80)}"
    elif kind == "approval_vote":  # issue #20: each approval of a quorum
        detail = f"{p.get('vote')} by {p.get('voter')}, {p.get('votes')} of {p.get('quorum')}"
    elif kind == "approval_edited":
        detail = (
            f"by {p.get('edited_by')}: `{clip(p.get('old_command'), 100)}` -> "
            f"`{clip(p.get('new_command'), 100)}`, risk {p.get('old_risk')} -> "
            f"{p.get('new_risk')}"
        )
    elif kind == "approval_escalated":
        detail = f"to {', '.join(str(u) for u in p.get('escalate_to') or []) or 'nobody'}"
    elif kind == "approval_reminded":
        reminded = ", ".join(str(u) for u in p.get("reminded") or [])
        detail = f"reminded {reminded or 'the approvers'}"
    elif kind in ("model_call_started",):
        detail = str(p.get("role"))
    elif kind == "model_call_finished":
        detail = f"{p.get('role')} {p.get('model')} {p.get('latency_ms')} ms"
        if p.get("total_tokens") is not None:
            detail += f", {p.get('total_tokens')} tokens"
    elif kind == "task_failed":
        detail = clip(p.get("error"), 120)
    elif kind == "task_completed":
        detail = clip(p.get("final_response"), 80)
    elif kind in ("action_directive",):
        detail = f"{len(p.get('actions') or [])} action(s)"
    elif kind == "action_directive_failed":
        detail = clip(p.get("error"), 100)
    elif kind in ("rule_created", "rule_revoked"):
        detail = f"`{p.get('rule_id')}`"
        if kind == "rule_created" and p.get("scope"):
            detail += f" in {p.get('scope')}"
    elif kind == "rule_matched":
        rules = ", ".join(f"`{r}`" for r in p.get("rule_ids") or [])
        detail = f"{rules} allowed `{clip(p.get('command'), 100)}`"
    elif kind == "decision_refused":
        detail = f"{p.get('decision')} by {p.get('user')} refused (policy {p.get('section')})"
    elif kind == "tool_refused":
        detail = f"{p.get('tool')}: {clip(p.get('reason'), 100)}"
    elif kind == "request_refused":
        detail = f"{p.get('user')}: {p.get('reason')}"
    elif kind == "retention_deleted":
        detail = f"{len(p.get('tasks') or {})} finished task(s) deleted"
    elif kind == "sandbox_refusal":
        detail = clip(", ".join(str(r) for r in p.get("refused") or []), 100)
    return f"{event.seq:>3} {event.created_at.strftime('%H:%M:%S')} {kind} {detail}".rstrip()


def describe_review(
    review: rule_review.Review, idle_days: float, shown: Callable[[str], str] = str
) -> str:
    """`rules review`: what deserves a second look (empty: says so)."""
    if review.empty:
        return "Rules review: nothing to look at."
    lines = ["Rules review:"]
    if review.idle:
        lines.append(f"Not used for {idle_days:g} days (revoke them?):")
        lines += [f"  {describe_rule(rule, shown=shown)}" for rule in review.idle[:MAX_LISTED]]
        if len(review.idle) > MAX_LISTED:
            lines.append(f"  … and {len(review.idle) - MAX_LISTED} more")
    for rule_id, notes in review.trouble.items():
        rule = review.rules.get(rule_id)
        what = f"{rule.kind} `{shown(rule.pattern)}`" if rule else ""
        lines.append(f"`{rule_id}` {what}:")
        lines += [f"  {shown(note)}" for note in notes[:5]]
        if len(notes) > 5:
            lines.append(f"  … and {len(notes) - 5} more")
    return "\n".join(lines)


ScheduleListener = Callable[[str], Awaitable[None]]


class CommandRunner:
    def __init__(
        self,
        tasks: TaskStore,
        events: EventStore,
        approvals: ApprovalService,
        schedules: ScheduleStore | None = None,
        *,
        timezone: str = "UTC",
        shown: Callable[[str], str] = str,
        rules_listed: int | None = MAX_LISTED,
        rule_idle_days: float = 30.0,
        workspace: str | None = None,
    ) -> None:
        # DUCKLM_RULE_IDLE_DAYS for `rules review`; where commands run (a prefix
        # rule's preview resolves the operands it lets a command add there).
        self.rule_idle_days = rule_idle_days
        self.workspace = workspace
        # How many rules `rules` lists (None: all, for a terminal).
        self.rules_listed = rules_listed
        # How a command may be shown where the answer goes (chat redacts secrets).
        self.shown = shown
        self.tasks = tasks
        self.events = events
        self.approvals = approvals
        self.schedules = schedules
        self.timezone = timezone
        # Told the id of every schedule that was added or changed (the live scheduler).
        self.schedule_listeners: list[ScheduleListener] = []

    async def execute(
        self,
        command: c.Command,
        actor: Actor,
        *,
        conversation_prefix: str | None = None,
        where: ChannelPolicy | None = None,
    ) -> str:
        """Carry out a parsed command and return the reply text. `where` is the
        policy of the channel it was typed in (its workspace for rule previews;
        what `policy` shows); None for the CLI, which uses the default."""
        workspace = where.workspace if where is not None else self.workspace
        if isinstance(command, c.ADMIN_ONLY) and not actor.is_admin:
            return (
                f"Only admins can change rules, and you ({actor.id}) are not one. "
                f"An operator can add `{actor.id}` to DUCKLM_ADMINS."
            )
        if isinstance(command, c.SCHEDULER_ONLY) and not actor.may_schedule:
            return (
                f"Only admins and schedulers can change schedules, and you ({actor.id}) are "
                "neither. An operator can add you to DUCKLM_SCHEDULERS."
            )
        match command:
            case c.Help():
                return c.USAGE
            case c.RulesList(include_revoked=include_revoked):
                return await self._rules(include_revoked)
            case c.RulesAdd():
                return await self._rules_add(command, actor, conversation_prefix, workspace)
            case c.RulesPreview(kind=kind, pattern=pattern):
                try:
                    preview = await self.approvals.preview_rule(kind, pattern, workspace)
                except ApprovalError as exc:
                    return f"No preview: {exc}"
                return describe_preview(preview, self.shown)
            case c.RulesReview():
                return await self._rules_review()
            case c.RulesRevoke(rule_id=rule_id):
                if await self.approvals.revoke_rule(rule_id, actor.id):
                    return f"Revoked rule `{rule_id}`."
                return f"No active rule `{rule_id}`. Send `rules` to list them."
            case c.Approvals():
                return await self._approvals()
            case c.Tasks():
                return await self._tasks(conversation_prefix)
            case c.PolicyShow():
                if where is None:
                    return "`policy` shows a channel's policy: send it in that channel or room."
                return "\n".join(where.describe())
            case c.TaskShow(task_id=task_id):
                return await self._task(task_id)
            case c.Run():
                return "`run` needs a chat thread; send it in a channel or the console."
            case c.ScheduleList():
                return await self._schedule_list(conversation_prefix)
            case c.ScheduleAdd():
                return await self._schedule_add(command, actor, conversation_prefix)
            case c.ScheduleChange():
                return await self._schedule_change(command, conversation_prefix)
        raise AssertionError(f"unhandled command {command!r}")

    async def _rules(self, include_revoked: bool) -> str:
        rules = await self.approvals.list_rules(include_revoked=include_revoked)
        if not rules:
            return "No rules. Admins add them with `rules add exact|prefix <command>`."
        # A chat message holds the first `rules_listed` (10,000 rules were one
        # 804,000-character message); the count of the rest is exact.
        shown = rules if self.rules_listed is None else rules[: self.rules_listed]
        left = len(rules) - len(shown)
        more = f"\n… and {left} more" if left > 0 else ""
        listed = "\n".join(describe_rule(r, shown=self.shown) for r in shown)
        return "Rules:\n" + listed + more

    async def _rules_add(
        self,
        command: c.RulesAdd,
        actor: Actor,
        conversation_prefix: str | None,
        workspace: str | None = None,
    ) -> str:
        # In chat a rule is limited to the channel it is added in unless `global`;
        # the CLI (no channel) makes global rules.
        channel = conversation_prefix.rstrip("|") if conversation_prefix else None
        scope = None if command.scope_global else channel
        preview = None
        if command.tool == "shell_exec_safe":
            try:
                preview = await self.approvals.preview_rule(
                    command.kind, command.pattern, workspace or self.workspace
                )
            except ApprovalError as exc:
                return f"Rule not added: {exc}"
            if (
                conversation_prefix is not None
                and not command.confirmed
                and preview.broader_than(command.pattern)
            ):
                return (
                    describe_preview(preview, self.shown)
                    + "\nThat is more than the command you named. Not added yet: send the "
                    "same `rules add …` again with `confirm` at the end to add it."
                )
        try:
            rule = await self.approvals.add_rule(
                command.tool,
                command.kind,
                command.pattern,
                actor.id,
                scope=scope,
                lifetime=command.lifetime,
            )
        except ApprovalError as exc:
            return f"Rule not added: {exc}"
        shown = f"\n{describe_preview(preview, self.shown)}" if preview is not None else ""
        return f"Added rule {describe_rule(rule, shown=self.shown)}{shown}"

    async def _rules_review(self) -> str:
        found = await self.approvals.review_rules(self.rule_idle_days, self.workspace)
        return describe_review(found, self.rule_idle_days, self.shown)

    async def review_for_admins(self) -> str | None:
        """The daily housekeeping's post to DUCKLM_RULE_REVIEW_CHANNEL: the `rules
        review` text, or None when there is nothing to look at (nothing is posted)."""
        found = await self.approvals.review_rules(self.rule_idle_days, self.workspace)
        return None if found.empty else describe_review(found, self.rule_idle_days, self.shown)

    async def _approvals(self) -> str:
        pending = await self.approvals.pending(MAX_LISTED)
        if not pending:
            return "No approvals are pending."
        lines = [describe_approval(a, self.shown) for a in pending]
        # Counted in the store: the list above is already cut to MAX_LISTED.
        left = await self.approvals.count_pending() - len(pending)
        more = f"\n… and {left} more" if left > 0 else ""
        return "Pending approvals:\n" + "\n".join(lines) + more

    async def _tasks(self, conversation_prefix: str | None) -> str:
        recent = await self.tasks.list_recent(MAX_LISTED, conversation_prefix=conversation_prefix)
        if not recent:
            return "No tasks yet."
        return "Recent tasks:\n" + "\n".join(describe_task(t) for t in recent)

    async def _schedule_list(self, conversation_prefix: str | None) -> str:
        if self.schedules is None:
            return "Schedules are not available here."
        found = await self.schedules.list(conversation_prefix=conversation_prefix)
        if not found:
            return 'No schedules here. Add one with `schedule add "<cron>" <prompt>`.'
        return "Schedules:\n" + "\n".join(describe_schedule(s) for s in found)

    async def _schedule_add(
        self, command: c.ScheduleAdd, actor: Actor, conversation_prefix: str | None
    ) -> str:
        from bot.cron import cron_trigger  # imports APScheduler: only when needed

        if self.schedules is None or conversation_prefix is None:
            return (
                "Scheduled prompts post into a chat channel: add them from Slack "
                "(`/duck schedule add …`) or Matrix (`!duck schedule add …`)."
            )
        timezone = command.timezone or self.timezone
        try:
            trigger = cron_trigger(command.cron, timezone)
        except ValueError as exc:
            return f"Schedule not added: {exc}"
        schedule = await self.schedules.insert(
            command.cron, timezone, command.prompt, conversation_prefix, actor.id
        )
        await self._schedules_changed(schedule.schedule_id)
        upcoming = trigger.get_next_fire_time(None, datetime.now(UTC))
        return f"Added schedule {describe_schedule(schedule)}; next run {when(upcoming)}."

    async def _schedule_change(
        self, command: c.ScheduleChange, conversation_prefix: str | None
    ) -> str:
        if self.schedules is None:
            return "Schedules are not available here."
        schedule = await self.schedules.get(command.schedule_id)
        if schedule is None or (
            conversation_prefix is not None
            and not schedule.conversation.startswith(conversation_prefix)
        ):
            return f"No schedule `{command.schedule_id}` here. Send `schedule list`."
        if command.action == "remove":
            changed = await self.schedules.delete(schedule.schedule_id)
            done = "Removed"
        else:
            changed = await self.schedules.set_paused(
                schedule.schedule_id, command.action == "pause"
            )
            done = "Paused" if command.action == "pause" else "Resumed"
        if not changed:
            return f"Schedule `{schedule.schedule_id}` was already {command.action}d."
        await self._schedules_changed(schedule.schedule_id)
        return f"{done} schedule `{schedule.schedule_id}`."

    async def _schedules_changed(self, schedule_id: str) -> None:
        for listener in self.schedule_listeners:
            await listener(schedule_id)

    async def _task(self, task_id: str) -> str:
        task = await self.tasks.get_task(task_id)
        if task is None:
            return f"No task `{task_id}`. Send `tasks` to list recent ones."
        events = await self.events.list_events(task_id)
        header = describe_task(task)
        if task.error:
            header += f"\nerror: {clip(task.error, 300)}"
        chain = await verify(self.events.db, task_id)
        if chain.ok:
            trail = f"audit chain verifies ({chain.events} events, head {(chain.head or '')[:16]})"
        else:
            trail = "audit chain DOES NOT VERIFY: " + "; ".join(
                f.describe() for f in chain.failures
            )
        body = "\n".join(describe_event(e) for e in events)
        return f"{header}\n{body}\n{trail}"
