"""What a rule covers, before and after it exists (issue #21).

`preview` answers "what would this rule have allowed?" from the audit log: the
distinct shell commands of recent `command_audit` events that the rule covers,
and the near misses (commands of the same program it does not cover), so an
admin sees what a prefix really allows before adding it.

`review` lists the rules worth a second look: the ones not used for
DUCKLM_RULE_IDLE_DAYS, and the ones that allowed a command that then failed,
or that cover a command a person denied.

Both read a bounded window of the newest events (SCAN_EVENTS), never the
whole log, so they answer in the same time on a store of any age. Each
command they judge is parsed (bashlex, up to about a millisecond), so they
give the event loop a turn after every one instead of holding it for the
whole window.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.store.models import Rule

if TYPE_CHECKING:
    from runtime.store import ApprovalStore, EventStore, RuleStore
    from runtime.tools.shell_rules import CommandLookup

SHELL_TOOL = "shell_exec_safe"
SCAN_EVENTS = 5000
# Near misses shown at most (the allowed list is never cut: that is the point).
MAX_NEAR = 20


@dataclass
class Preview:
    kind: str
    pattern: str  # as the rule would store it (validated, normalized)
    allowed: list[tuple[str, int]] = field(default_factory=list)  # command, times seen
    near: list[str] = field(default_factory=list)
    scanned: int = 0  # command_audit events read

    def broader_than(self, command: str) -> bool:
        """Whether it would have allowed anything but `command` itself."""
        from runtime.tools.shell_rules import normalize_command

        own = normalize_command(command)
        return any(normalize_command(seen) != own for seen, _ in self.allowed)


@dataclass
class Review:
    idle: list[Rule] = field(default_factory=list)
    # rule id -> what happened ("allowed `x`, which failed (exit 1)", "covers `y`, denied by z")
    trouble: dict[str, list[str]] = field(default_factory=dict)
    rules: dict[str, Rule] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.idle and not self.trouble


@dataclass(frozen=True)
class _Candidate:
    kind: str
    pattern: str


def _program(lookup: CommandLookup | None) -> str | None:
    from runtime.tools.shell_rules import program_name

    if lookup is None or not lookup.parts:
        return None
    first = lookup.parts[0]
    return program_name(first.values[0]) if first.words else None


async def preview(
    events: EventStore, kind: str, pattern: str, workspace: str | None = None
) -> Preview:
    """The past commands a shell rule `kind pattern` would have allowed (raises
    ValueError when the rule itself is not valid)."""
    from runtime.tools.shell_rules import lookup_command, usable_rules, validate_rule

    normalized = validate_rule(kind, pattern)
    # The rule parsed once for the whole window, not once per command judged.
    usable = usable_rules([_Candidate(kind, normalized)])
    programs = {_program(lookup_command(normalized))} - {None}
    seen: Counter[str] = Counter()
    scanned = 0
    for event in await events.list_by_type("command_audit", SCAN_EVENTS):
        scanned += 1
        command = event.payload.get("command")
        if isinstance(command, str) and command.strip():
            seen[command] += 1
    result = Preview(kind, normalized, scanned=scanned)
    for command, count in sorted(seen.items(), key=lambda item: (-item[1], item[0])):
        await asyncio.sleep(0)  # a parse per command: let the bot serve meanwhile
        lookup = lookup_command(command)  # one parse serves both questions
        if lookup is not None and lookup.covered_by(usable, workspace):
            result.allowed.append((command, count))
        elif len(result.near) < MAX_NEAR and _program(lookup) in programs:
            result.near.append(command)
    return result


# The rules that would allow an action now in a channel: ApprovalService's
# indexed lookup (one parse of the command, whatever the number of rules).
Allowing = Callable[[dict[str, Any], str | None, str | None], Awaitable[list[Rule]]]


async def review(
    rules: RuleStore,
    events: EventStore,
    approvals: ApprovalStore,
    allowing: Allowing,
    idle_days: float,
    workspace: str | None = None,
) -> Review:
    result = Review()
    result.idle = await rules.idle(time.time() - idle_days * 86400)
    active = {rule.rule_id: rule for rule in await rules.list()}
    result.rules = active

    # Allowed, then failed: a rule_matched followed in its task by the
    # command_audit of the command it allowed.
    # Each task once, in event order (a dict: a list's `in` made this quadratic).
    matched_events = await events.list_by_type("rule_matched", SCAN_EVENTS)
    tasks = list(dict.fromkeys(e.task_id for e in matched_events if e.task_id is not None))
    for task_id in tasks[:500]:
        matched: list[str] = []
        for event in await events.list_events(task_id):
            if event.event_type == "rule_matched":
                matched = [str(r) for r in event.payload.get("rule_ids") or []]
            elif event.event_type == "command_audit" and event.payload.get("approved_by") == "rule":
                if not event.payload.get("ok"):
                    rc = event.payload.get("returncode")
                    note = (
                        f"allowed `{event.payload.get('command')}` (task `{task_id}`), "
                        f"which failed" + (f" (exit {rc})" if rc is not None else "")
                    )
                    for rule_id in matched:
                        if rule_id in active:
                            result.trouble.setdefault(rule_id, []).append(note)
                matched = []

    # Covers what a person denied (in the channel it was denied in).
    judged: set[tuple[str, str | None]] = set()
    for event in await events.list_by_type("approval_decided", SCAN_EVENTS):
        if event.payload.get("decision") != "deny":
            continue
        approval = await approvals.get(str(event.payload.get("approval_id")))
        if approval is None or approval.tool != SHELL_TOOL or not approval.command:
            continue
        channel = await rules.task_channel(approval.task_id)
        if (approval.command, channel) in judged:
            continue
        judged.add((approval.command, channel))
        await asyncio.sleep(0)  # one parse per denied command
        action = {"tool": SHELL_TOOL, "args": {"command": approval.command}}
        for rule in await allowing(action, workspace, channel):
            result.trouble.setdefault(rule.rule_id, []).append(
                f"covers `{approval.command}`, denied by {approval.decided_by} "
                f"(task `{approval.task_id}`)"
            )
    return result
