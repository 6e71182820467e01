"""ApprovalService: pending approvals, exactly-once decisions, and "always" rules.

Policy lives here; the SQL is in runtime/store. A decision, the rule an
"always" creates and their audit events are written in one transaction, so the
log never shows a decision without its rule or the other way round.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runtime import rule_review
from runtime.store.models import Approval, Rule
from runtime.store.votes import DueEscalation, EditState, VoteStore

if TYPE_CHECKING:
    from runtime.metrics import Metrics
    from runtime.store import ApprovalStore, EventStore, RuleStore, Stores
    from runtime.tools.redaction import Redactor
    from runtime.tools.shell import Classification
    from runtime.tools.shell_rules import CompiledRule

SHELL_TOOL = "shell_exec_safe"
# Rules parsed per transaction when filling the match columns of older rules.
RULE_FILL_BATCH = 200
CHAT_DECISIONS = frozenset({"approve", "deny", "always"})
RULE_KINDS = frozenset({"exact", "prefix"})
# The longest command an approver may type as an edit.
MAX_EDIT_CHARS = 4000
# Words a shell runs without a program file (an edit may start with them).
SHELL_BUILTINS = frozenset(
    "cd export set unset test [ true false : . source alias umask exit read wait".split()
)


class ApprovalError(Exception):
    """A decision or rule request that cannot be honoured; the message is for the user."""


# A decision taken on a revision that an edit has replaced since (issue #20).
EDITED_SINCE = (
    "The command was edited since you looked at it; look at the new card. Nothing was decided."
)


def always_refusal(quorum: int) -> str:
    """Why "Always" is refused where a risk needs `quorum` (> 1) approvers: the rule
    would be one person's, and every later matching action would run with none."""
    return (
        f"“Always” is not offered where this risk needs {quorum} approvers: one "
        "person's rule would let every later matching action run with no approver. "
        "Approve this one instead; nothing was decided."
    )


@dataclass
class DecisionOutcome:
    taken: bool  # False: someone (or something) decided first, or the quorum is not met
    approval: Approval | None
    rule: Rule | None = None
    # Quorum (issue #20): who has approved the current revision so far, and how
    # many approvals it needs. `counted`: this call added its voter's approval
    # (False for a second click of the same person, or no quorum vote at all).
    voters: tuple[str, ...] = ()
    needed: int = 1
    counted: bool = False

    @property
    def waiting_for_more(self) -> bool:
        """Approved by fewer people than the quorum; the approval stays open."""
        return not self.taken and self.approval is not None and self.approval.decision is None


@dataclass
class EditOutcome:
    """An edit taken: the approval now holds the edited command."""

    approval: Approval
    old_command: str
    new_command: str
    old_risk: str | None
    new_risk: str
    revision: int  # the edit's revision: what the editor's own approval is taken on


def exact_args_pattern(args: Any) -> str:
    """The pattern of an exact rule for a non-shell tool: its args, canonical JSON."""
    return json.dumps(args if args is not None else {}, sort_keys=True)


def rule_keys(tool: str, kind: str, pattern: str) -> CompiledRule:
    """What matching needs of a rule, computed once when it is made and stored with it.
    Shell rules are parsed (shell_rules.compile_rule); another tool's exact rule is
    looked up by its args pattern; a prefix rule of another tool covers nothing."""
    from runtime.tools import shell_rules

    if tool == SHELL_TOOL:
        return shell_rules.compile_rule(kind, pattern)
    key = shell_rules.exact_key(pattern) if kind == "exact" else None
    return shell_rules.CompiledRule(pattern, None, key, 0, None)


def _shell_command(approval: Approval) -> str | None:
    if approval.command:
        return approval.command
    args = approval.action.get("args")
    command = args.get("command") if isinstance(args, dict) else None
    return command if isinstance(command, str) else None


def edit_refusal(command: str, verdict: Classification | None = None) -> str | None:
    """Why `command` cannot replace a proposed one (None: it can): blocked, or no
    command at all ("edit: I think we should use web-2" is a remark, and would
    only fail to run). What a surface may check before taking an edit."""
    if verdict is None:
        from runtime.tools.shell import classify

        verdict = classify(command)
    if verdict.blocked:
        return f"Not edited: `{command}` is blocked ({verdict.reason}); nothing changed."
    unknown = _unknown_programs(verdict.commands)
    if unknown:
        return (
            f"Not edited: `{unknown[0]}` is no program here, so `{command}` would not "
            "run; give the whole command (`edit <command>`). Nothing changed."
        )
    return None


def _unknown_programs(commands: list[list[str]]) -> list[str]:
    """The programs of an edited command that neither exist on PATH nor are a
    path or a shell builtin (no commands at all: the empty program)."""
    import shutil

    if not commands:
        return [""]
    return [
        argv[0]
        for argv in commands
        if argv
        and "/" not in argv[0]
        and argv[0] not in SHELL_BUILTINS
        and shutil.which(argv[0]) is None
    ]


def _is_blocked(command: str) -> bool:
    from runtime.tools.shell import classify

    try:
        return bool(getattr(classify(command), "blocked", False))
    except ValueError:  # cannot even be parsed: certainly not something to allow forever
        return True


class ApprovalService:
    def __init__(
        self,
        approvals: ApprovalStore,
        rules: RuleStore,
        events: EventStore,
        *,
        ttl: float | None = None,
        rule_max_age: float | None = None,
    ) -> None:
        if not (approvals.db is rules.db is events.db):
            # Decisions and their events must commit together.
            raise ValueError("approvals, rules and events must share one Database")
        self._approvals = approvals
        self._votes = VoteStore(approvals.db)
        # Decision latency by decision (runtime/metrics.py); set by build_runtime.
        self.metrics: Metrics | None = None
        # Redacts the commands `approval_edited` logs (the audit log holds no
        # secret); the runtime's own, with its credential literals, when set.
        self.redactor: Redactor | None = None
        self._rules = rules
        self._events = events
        self._db = approvals.db
        self.ttl = ttl
        # DUCKLM_RULE_MAX_AGE: the longest any rule lives (None: no ceiling).
        self.rule_max_age = rule_max_age

    @classmethod
    def from_stores(
        cls, stores: Stores, ttl: float | None = None, rule_max_age: float | None = None
    ) -> ApprovalService:
        return cls(
            stores.approvals, stores.rules, stores.events, ttl=ttl, rule_max_age=rule_max_age
        )

    def rule_expiry(self, lifetime: float | None) -> float | None:
        """When a rule made now with `lifetime` seconds (None: unlimited) expires,
        capped by DUCKLM_RULE_MAX_AGE."""
        limits = [x for x in (lifetime, self.rule_max_age) if x is not None]
        return time.time() + min(limits) if limits else None

    # -- approvals -----------------------------------------------------------

    async def create_pending(
        self,
        task_id: str,
        action: Mapping[str, Any],
        *,
        index: int = 1,
        command: str | None = None,
        risk_level: str | None = None,
        action_type: str | None = None,
        reason: str | None = None,
        requested_by: str | None = None,
        replaces_approval_id: str | None = None,
    ) -> Approval:
        """Store an action waiting for a person. `action` is the normalized
        {"tool", "args", "reason"}; it is what runs once approved. With
        `replaces_approval_id` it offers that approval's action again (recovery,
        when its run was cut short); the caller writes `approval_reissued`."""
        tool = action.get("tool")
        if not isinstance(tool, str) or not tool:
            raise ApprovalError("An action needs a tool name to be approved.")
        if command is None and tool == SHELL_TOOL:
            args = action.get("args")
            found = args.get("command") if isinstance(args, dict) else None
            command = found if isinstance(found, str) else None
        expires_at = time.time() + self.ttl if self.ttl is not None else None
        return await self._approvals.insert(
            task_id,
            action,
            index=index,
            tool=tool,
            command=command,
            risk_level=risk_level,
            action_type=action_type,
            reason=reason,
            requested_by=requested_by,
            expires_at=expires_at,
            replaces_approval_id=replaces_approval_id,
        )

    async def get(self, approval_id: str) -> Approval | None:
        return await self._approvals.get(approval_id)

    async def pending(self, limit: int = 100) -> list[Approval]:
        """Undecided approvals, oldest first."""
        return await self._approvals.list_pending(limit)

    async def count_pending(self) -> int:
        """How many approvals are undecided, counted in the store (not a list's length)."""
        return await self._approvals.count_pending()

    async def pending_for_task(self, task_id: str) -> list[Approval]:
        return await self._approvals.pending_for_task(task_id)

    async def claim_execution(self, approval_id: str) -> bool:
        """True exactly once per approved action: the caller that gets it runs it."""
        return await self._approvals.claim_execution(approval_id)

    async def list_for_task(self, task_id: str) -> list[Approval]:
        return await self._approvals.list_for_task(task_id)

    async def find_by_card_ref(self, card_ref: str) -> Approval | None:
        """The approval whose card was posted as `card_ref` (a platform message id)."""
        return await self._approvals.find_by_card_ref(card_ref)

    async def set_card_ref(self, approval_id: str, ref: str | None) -> bool:
        return await self._approvals.set_card_ref(approval_id, ref)

    # Cards: each approval records what its card shows (card_state), so recovery
    # can post the missing ones and resolve the stale ones (issue #15).

    async def claim_card(
        self, approval_id: str, state: str, *, stale_before: float | None = None
    ) -> bool:
        """The right to post (state "unposted") or resolve (state "posted") the card
        now, held for a minute (a claim from before `stale_before` is void); True
        for one caller."""
        return await self._approvals.claim_card(approval_id, state, stale_before=stale_before)

    async def release_card(self, approval_id: str) -> None:
        await self._approvals.release_card(approval_id)

    async def card_posted(self, approval_id: str, ref: str) -> bool:
        return await self._approvals.card_posted(approval_id, ref)

    async def card_resolved(self, approval_id: str) -> bool:
        return await self._approvals.card_resolved(approval_id)

    async def replacement_of(self, approval_id: str) -> Approval | None:
        return await self._approvals.replacement_of(approval_id)

    async def mark_reminded(self, approval_id: str) -> bool:
        """True for the one caller that should send the reminder."""
        return await self._approvals.mark_reminded(approval_id)

    async def expire(self, approval_id: str) -> bool:
        """Decide "expired" (by "system") if still undecided; True exactly once.

        Appends `approval_expired` to the task. Marking the task itself expired
        is the caller's job (the task store is not ours).
        """
        async with self._db.transaction():
            taken = await self._approvals.decide(approval_id, "expired", "system")
            if taken:
                approval = await self._approvals.get(approval_id)
                assert approval is not None
                await self._events.append(
                    approval.task_id,
                    "approval_expired",
                    {
                        "approval_id": approval_id,
                        "expires_at": approval.expires_at,
                        "decided_by": "system",
                    },
                )
        if taken:  # after the commit: a rolled-back decision is not one
            self._observe("expired", approval)
        return taken

    async def decide(
        self,
        approval_id: str,
        decision: str,
        decided_by: str,
        note: str | None = None,
        *,
        quorum: int = 1,
        four_eyes: bool = False,
        revision: int | None = None,
    ) -> DecisionOutcome:
        """Take a person's decision, exactly once.

        A second decision (a double click, two approvers, a platform retry, another
        process) gets `taken=False` and the approval as it stands; nothing changes.

        With `quorum` > 1 an approve (or always) is one person's vote: it is
        recorded (`approval_vote`, once per person and revision) and the approval
        is decided by the vote that makes `quorum` distinct approvers, in the
        same transaction (one compare-and-set). A deny denies at once. With
        `four_eyes` the requester's own approval does not count. Under a quorum
        "always" is refused: its rule would be one person's (ApprovalError).

        `revision`: the revision the decider saw (what `quorum` and `four_eyes` were
        worked out from); an edit since then makes the call refuse with nothing
        decided (ApprovalError). None: the revision as this call first reads it.
        """
        if quorum > 1 and decision == "always":
            raise ApprovalError(always_refusal(quorum))
        if revision is None:
            # Read before the approval itself, so the copy decided on is never of a
            # later revision than the one the store checks.
            state = await self._votes.state(approval_id)
            revision = None if state is None else state.revision
        if quorum > 1 and decision == "approve":
            return await self._vote(approval_id, decided_by, quorum, four_eyes, revision)
        return await self._decide(approval_id, decision, decided_by, note, revision)

    async def _vote(
        self, approval_id: str, voter: str, quorum: int, four_eyes: bool, seen: int | None
    ) -> DecisionOutcome:
        decision = "approve"
        approval = await self._checked(approval_id)
        if approval.decision is not None:
            return DecisionOutcome(taken=False, approval=approval, needed=quorum)
        if four_eyes and voter == approval.requested_by:
            raise ApprovalError(
                "You asked for this action yourself: your approval does not count towards "
                "its quorum (four-eyes rule)."
            )
        taken = counted = False
        voters: list[str] = []
        async with self._db.transaction():
            # Held until the commit: concurrent voters count one after the other.
            revision = await self._votes.lock(approval_id)
            if revision is not None and seen is not None and revision != seen:
                # Edited since the voter looked: the quorum and the command they
                # approved are the old revision's. Nothing is written (rollback).
                raise ApprovalError(EDITED_SINCE)
            if revision is not None:
                counted = await self._votes.add(
                    approval_id, revision, voter, decision, approval.task_id
                )
                voters = await self._votes.voters(approval_id, revision)
                if counted:
                    await self._events.append(
                        approval.task_id,
                        "approval_vote",
                        {
                            "approval_id": approval_id,
                            "vote": decision,
                            "voter": voter,
                            "revision": revision,
                            "votes": len(voters),
                            "quorum": quorum,
                            "voters": voters,
                        },
                    )
                if len(voters) >= quorum:
                    taken = await self._approvals.decide(
                        approval_id, decision, voter, revision=revision
                    )
                if taken:
                    await self._events.append(
                        approval.task_id,
                        "approval_decided",
                        {
                            "approval_id": approval_id,
                            "decision": decision,
                            "decided_by": voter,
                            "note": None,
                            "quorum": quorum,
                            "voters": voters,
                        },
                    )
        if taken:
            self._observe(decision, approval)
        return DecisionOutcome(
            taken=taken,
            approval=await self._approvals.get(approval_id),
            voters=tuple(voters),
            needed=quorum,
            counted=counted,
        )

    async def _checked(self, approval_id: str) -> Approval:
        """The approval, refused when unknown or past its deadline."""
        approval = await self._approvals.get(approval_id)
        if approval is None:
            raise ApprovalError(f"No such approval: {approval_id}.")
        if (
            approval.decision is None
            and approval.expires_at is not None
            and approval.expires_at <= datetime.now(UTC)
        ):
            raise ApprovalError(
                f"This approval expired at {approval.expires_at:%Y-%m-%d %H:%M} UTC; "
                "ask again to run the action."
            )
        return approval

    async def _decide(
        self,
        approval_id: str,
        decision: str,
        decided_by: str,
        note: str | None = None,
        revision: int | None = None,
    ) -> DecisionOutcome:
        if decision not in CHAT_DECISIONS:
            raise ApprovalError(f"Unknown decision {decision!r}: use approve, deny or always.")
        # Past its deadline it is refused even if the expiry job has not run yet:
        # an answer after the deadline must not run the action anyway.
        approval = await self._checked(approval_id)
        if approval.decision is not None:
            return DecisionOutcome(taken=False, approval=approval)
        rule_spec = self._always_rule(approval) if decision == "always" else None
        # Parsed once, here, before the transaction: matching reads the stored form.
        new_keys = rule_keys(approval.tool, *rule_spec) if rule_spec is not None else None

        rule: Rule | None = None
        async with self._db.transaction():
            taken = await self._approvals.decide(
                approval_id, decision, decided_by, note, revision=revision
            )
            if taken:
                await self._events.append(
                    approval.task_id,
                    "approval_decided",
                    {
                        "approval_id": approval_id,
                        "decision": decision,
                        "decided_by": decided_by,
                        "note": note,
                    },
                )
                if rule_spec is not None:
                    kind, pattern = rule_spec
                    # An "Always" click is scoped to the channel it was clicked in.
                    rule = await self._rules.insert(
                        approval.tool,
                        kind,
                        pattern,
                        decided_by,
                        approval_id,
                        new_keys,
                        scope=await self._rules.task_channel(approval.task_id),
                        expires_at=self.rule_expiry(None),
                    )
                    await self._events.append(approval.task_id, "rule_created", _rule_payload(rule))
        if taken:  # after the commit: a rolled-back decision is not one
            self._observe(decision, approval)
        current = await self._approvals.get(approval_id)
        if not taken and current is not None and current.decision is None:
            # Undecided, yet not taken: an edit moved it past the revision seen.
            raise ApprovalError(EDITED_SINCE)
        return DecisionOutcome(taken=taken, approval=current, rule=rule)

    # -- quorum, edits, escalation (issue #20) --------------------------------

    async def voters(self, approval_id: str) -> list[str]:
        """Who has approved the approval's current revision so far."""
        state = await self._votes.state(approval_id)
        return [] if state is None else await self._votes.voters(approval_id, state.revision)

    async def edit_state(self, approval_id: str) -> EditState | None:
        return await self._votes.state(approval_id)

    async def edit(self, approval_id: str, new_command: str, editor: str) -> EditOutcome:
        """Replace a pending shell approval's command by `editor`'s edit, classified
        afresh: a blocked command is refused and nothing changes. The edit starts a
        new revision (approvals of the old command no longer count); the first
        proposed command is kept, `approval_edited` records both and who edited,
        and the action carries `edited` so the model is told what ran instead.
        The caller then takes the editor's own approval (decide)."""
        from runtime.tools.shell import classify

        approval = await self._checked(approval_id)
        if approval.decision is not None:
            raise ApprovalError("This approval is already decided; nothing was edited.")
        if approval.tool != SHELL_TOOL:
            raise ApprovalError(f"Only shell commands can be edited; this is {approval.tool}.")
        new_command = (new_command or "").strip()
        if not new_command:
            raise ApprovalError("Give the new command: `edit <command>`.")
        if len(new_command) > MAX_EDIT_CHARS:
            raise ApprovalError(f"An edited command may have at most {MAX_EDIT_CHARS} characters.")
        old_command = _shell_command(approval) or ""
        if new_command == old_command:
            raise ApprovalError("That is the command already proposed; approve it instead.")
        verdict = classify(new_command)
        refusal = edit_refusal(new_command, verdict)
        if refusal:
            raise ApprovalError(refusal)
        state = await self._votes.state(approval_id)
        assert state is not None
        first = state.original_command or old_command
        args = approval.action.get("args")
        action = {
            "tool": SHELL_TOOL,
            "args": {**(args if isinstance(args, dict) else {}), "command": new_command},
            "reason": approval.action.get("reason"),
            # Not part of what runs (normalize_action keeps tool/args/reason): the
            # loop hands it to the model with the result.
            "edited": {"from": first, "to": new_command, "by": editor},
        }
        reason = f"{verdict.reason} (edited by {editor}; first proposed: `{first}`)"
        async with self._db.transaction():
            if not await self._votes.edit(
                approval_id,
                state.revision,
                action,
                command=new_command,
                risk_level=verdict.risk_level,
                action_type=verdict.action_type,
                reason=reason,
                edited_by=editor,
            ):
                raise ApprovalError(
                    "Someone edited or decided this approval at the same moment; nothing "
                    "changed. Look at the card again."
                )
            await self._events.append(
                approval.task_id,
                "approval_edited",
                self._redacted(
                    {
                        "approval_id": approval_id,
                        "edited_by": editor,
                        "old_command": old_command,
                        "new_command": new_command,
                        "original_command": first,
                        "old_risk": approval.risk_level,
                        "new_risk": verdict.risk_level,
                        "revision": state.revision + 1,
                    },
                ),
            )
        edited = await self._approvals.get(approval_id)
        assert edited is not None
        return EditOutcome(
            edited,
            old_command,
            new_command,
            approval.risk_level,
            verdict.risk_level,
            state.revision + 1,
        )

    async def escalations_due(self, until: float, limit: int = 200) -> list[DueEscalation]:
        return await self._votes.escalations_due(until, limit)

    async def earliest_escalation(self) -> float | None:
        return await self._votes.earliest_escalation()

    async def claim_escalation(self, approval_id: str, was: float, next_at: float | None) -> bool:
        """True for the one caller (across replicas) that does what was due."""
        return await self._votes.claim_escalation(approval_id, was, next_at)

    async def end_escalation(self, approval_id: str) -> None:
        """No escalation will be done for this approval: its claim is not retried."""
        await self._votes.end_escalation(approval_id)

    async def escalate(self, approval_id: str, escalate_to: list[str]) -> bool:
        """Record the escalation (once): from now on `escalate_to` may decide. The
        same statement ends the claim's lease (bot/scheduler.py)."""
        async with self._db.transaction():
            if not await self._votes.mark_escalated(approval_id):
                await self._votes.end_escalation(approval_id)
                return False
            approval = await self._approvals.get(approval_id)
            assert approval is not None
            await self._events.append(
                approval.task_id,
                "approval_escalated",
                {"approval_id": approval_id, "escalate_to": sorted(escalate_to)},
            )
        return True

    def _redacted(self, payload: dict[str, Any]) -> dict[str, Any]:
        from runtime.tools.redaction import Redactor

        redacted, _, _ = (self.redactor or Redactor()).redact_value(payload)
        return redacted

    def _observe(self, decision: str, approval: Approval) -> None:
        if self.metrics is not None:
            self.metrics.decided(decision, time.time() - approval.created_at.timestamp())

    def _always_rule(self, approval: Approval) -> tuple[str, str]:
        """The rule an "always" on this approval would create; refuses before anything
        is decided when no rule may cover the action."""
        if approval.risk_level == "critical":
            raise ApprovalError(
                "“Always” is not offered for critical actions; approve this one once instead."
            )
        if approval.tool != SHELL_TOOL:
            return "exact", exact_args_pattern(approval.action.get("args"))
        command = _shell_command(approval)
        if not command:
            raise ApprovalError("This shell action has no command to build a rule from.")
        if _is_blocked(command):
            raise ApprovalError("This command is blocked; no rule can allow it.")
        from runtime.tools.shell_rules import rule_for_command

        try:
            return rule_for_command(command)
        except ValueError as exc:
            raise ApprovalError(f"Cannot make a rule for this command: {exc}") from exc

    # -- rules -----------------------------------------------------------------

    async def is_allowed_forever(
        self,
        action: Mapping[str, Any],
        workspace: str | None = None,
        *,
        conversation: str | None = None,
        record: Callable[[str, dict[str, Any]], object] | None = None,
    ) -> bool:
        """Whether a rule usable here covers this normalized action. `workspace` is
        where a shell command would run: the operands a prefix rule lets it add are
        resolved there. `conversation` is the asking task's conversation key: rules
        scoped to its channel count, rules of other channels do not (None: only
        global rules). Expired rules never count.

        A match is counted on the rules that named the action and, through
        `record(event_type, payload)` (the loop's buffered event writer: the task's
        row may not be written yet), logged as `rule_matched` {rule_ids, tool,
        command}: the export's "rule that allowed it".

        Only the rules whose stored match key the action could name are read (an
        index lookup), so a check costs the same with 10 rules or 10,000."""
        used = await self._allowing(action, workspace, _channel(conversation))
        if not used:
            return False
        await self._rules.used([rule.rule_id for rule in used])
        if record is not None:
            args = action.get("args")
            record(
                "rule_matched",
                {
                    "rule_ids": [rule.rule_id for rule in used],
                    "tool": action.get("tool"),
                    "command": args.get("command") if isinstance(args, dict) else None,
                },
            )
        return True

    async def _allowing(
        self, action: Mapping[str, Any], workspace: str | None, channel: str | None
    ) -> list[Rule]:
        """The rules that allow this action here (empty: none does)."""
        tool = action.get("tool")
        if not isinstance(tool, str) or not await self._rules.any_active(tool):
            return []
        await self._fill_rules()
        args = action.get("args")
        from runtime.tools import shell_rules

        if tool == SHELL_TOOL:
            command = args.get("command") if isinstance(args, dict) else None
            if not isinstance(command, str) or not command.strip():
                return []
            lookup = shell_rules.lookup_command(command)
            if lookup is None:
                return []
            longest = await self._rules.longest_prefix(tool, sorted(lookup.programs()))
            found = await self._rules.matching(tool, lookup.keys(longest), channel=channel)
            # covered_by itself refuses blocked commands, whatever the rules say.
            if not lookup.covered_by(shell_rules.usable_from_compiled(found), workspace):
                return []
            return [
                rule
                for rule in found
                if lookup.names(shell_rules.usable_from_compiled([rule]), workspace)
            ]
        try:
            pattern = exact_args_pattern(args)
        except (TypeError, ValueError):
            return []
        found = await self._rules.matching(tool, [shell_rules.exact_key(pattern)], channel=channel)
        return [rule for rule in found if rule.kind == "exact" and rule.pattern == pattern]

    # One filler at a time: checks that arrive meanwhile wait for it, not redo it.
    _fill_lock: asyncio.Lock | None = None

    async def _fill_rules(self) -> None:
        """Parse, once, the rules stored without their match columns (made before
        schema v6, or inserted without them); a no-op index probe once all are filled.
        Each rule is parsed between two turns of the event loop, never many at once."""
        if not await self._rules.unfilled(1):
            return
        if self._fill_lock is None:
            self._fill_lock = asyncio.Lock()
        async with self._fill_lock:
            while batch := await self._rules.unfilled(RULE_FILL_BATCH):
                filled = []
                for rule in batch:
                    filled.append((rule.rule_id, rule_keys(rule.tool, rule.kind, rule.pattern)))
                    await asyncio.sleep(0)
                await self._rules.fill(filled)

    async def add_rule(
        self,
        tool: str,
        kind: str,
        pattern: str,
        created_by: str,
        *,
        source_approval_id: str | None = None,
        task_id: str | None = None,
        scope: str | None = None,
        lifetime: float | None = None,
    ) -> Rule:
        """An admin's rule. Shell patterns are validated and normalized; other tools
        take an exact rule whose pattern is their args as JSON. `scope`: the channel
        it is limited to (None: global); `lifetime`: seconds until it expires (None:
        never, but DUCKLM_RULE_MAX_AGE caps both)."""
        if lifetime is not None and lifetime <= 0:
            raise ApprovalError("A rule's lifetime must be positive (for=7d, for=12h).")
        tool = tool.strip() if isinstance(tool, str) else tool
        if not tool:
            raise ApprovalError("A rule needs a tool name.")
        if kind not in RULE_KINDS:
            raise ApprovalError(f"Unknown rule kind {kind!r}: use exact or prefix.")
        if tool == SHELL_TOOL:
            from runtime.tools.shell_rules import validate_rule

            try:
                pattern = validate_rule(kind, pattern)
            except ValueError as exc:
                raise ApprovalError(f"Invalid rule: {exc}") from exc
        else:
            if kind != "exact":
                raise ApprovalError(f"Prefix rules exist only for {SHELL_TOOL}; use exact.")
            try:
                pattern = exact_args_pattern(json.loads(pattern))
            except ValueError as exc:
                raise ApprovalError(
                    f"An exact rule for {tool} takes the tool's args as JSON: {exc}"
                ) from exc
        keys = rule_keys(tool, kind, pattern)  # parsed once, here; matching reads it
        async with self._db.transaction():
            rule = await self._rules.insert(
                tool,
                kind,
                pattern,
                created_by,
                source_approval_id,
                keys,
                scope=scope,
                expires_at=self.rule_expiry(lifetime),
            )
            await self._events.append(task_id, "rule_created", _rule_payload(rule))
        return rule

    async def preview_rule(
        self, kind: str, pattern: str, workspace: str | None = None
    ) -> rule_review.Preview:
        """The past shell commands a rule would have allowed, and its near misses."""
        try:
            return await rule_review.preview(self._events, kind, pattern, workspace)
        except ValueError as exc:
            raise ApprovalError(f"Invalid rule: {exc}") from exc

    async def review_rules(
        self, idle_days: float, workspace: str | None = None
    ) -> rule_review.Review:
        """Rules idle for `idle_days`, and rules that allowed a failure or cover a denial."""
        return await rule_review.review(
            self._rules, self._events, self._approvals, self._allowing, idle_days, workspace
        )

    async def list_rules(self, include_revoked: bool = False) -> list[Rule]:
        return await self._rules.list(include_revoked)

    async def revoke_rule(self, rule_id: str, revoked_by: str) -> bool:
        """True if this call revoked it; False for an unknown or already revoked id."""
        async with self._db.transaction():
            if not await self._rules.revoke(rule_id, revoked_by):
                return False
            rule = await self._rules.get(rule_id)
            assert rule is not None
            await self._events.append(
                None,
                "rule_revoked",
                {
                    "rule_id": rule.rule_id,
                    "tool": rule.tool,
                    "kind": rule.kind,
                    "pattern": rule.pattern,
                    "revoked_by": revoked_by,
                },
            )
        return True


def _rule_payload(rule: Rule) -> dict[str, Any]:
    return {
        "rule_id": rule.rule_id,
        "tool": rule.tool,
        "kind": rule.kind,
        "pattern": rule.pattern,
        "created_by": rule.created_by,
        "source_approval_id": rule.source_approval_id,
        "scope": rule.scope,
        "expires_at": rule.expires_at.timestamp() if rule.expires_at else None,
    }


def _channel(conversation: str | None) -> str | None:
    """The channel part of a conversation key ("slack:C1|1700.1" -> "slack:C1"); a
    key without one (the console's "console:alice") has no channel: global rules."""
    from runtime.store.tasks import conversation_group

    return conversation_group(conversation)
