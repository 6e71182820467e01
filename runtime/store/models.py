"""The records DuckLM keeps: tasks, their events, approvals and allow rules.

These are plain pydantic models returned by the stores; nothing here touches
SQL. Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskStatus = Literal[
    "running", "waiting_for_approval", "completed", "failed", "expired", "interrupted"
]
FINISHED_STATUSES: frozenset[str] = frozenset({"completed", "failed", "expired", "interrupted"})

Decision = Literal["approve", "deny", "always", "expired"]
RuleKind = Literal["exact", "prefix"]
CardState = Literal["unposted", "posted", "resolved"]


class Record(BaseModel):
    """Base of the records. Their validators are built on first use rather than
    at import: `ducklm tasks` builds the one for Task only (faster start)."""

    model_config = ConfigDict(defer_build=True)


class Task(Record):
    task_id: str
    message: str
    workspace: str | None = None
    debug: bool = False
    status: TaskStatus = "running"
    # Opaque key of the chat thread the task belongs to ("slack:C1:1700.1",
    # "console:..."); the bot layer owns its format, the runtime only stores it.
    conversation: str | None = None
    # Platform-qualified id of the person who asked ("slack:U024BE7LH").
    requested_by: str | None = None
    # The thread history the task was started with, so a continuation after an
    # approval rebuilds exactly the same context.
    history_messages: list[dict[str, str]] = Field(default_factory=list)
    final_response: str | None = None
    error: str | None = None
    created_at: datetime
    updated_at: datetime


class Event(Record):
    task_id: str | None  # None for events not tied to a task (rule_created by an admin)
    seq: int  # 1, 2, 3 ... per task
    event_type: str
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    # SHA-256 chaining it to the task's previous event (runtime/store/chain.py);
    # None only on an event stored without one (a gap before schema v8).
    hash: str | None = None


class Approval(Record):
    approval_id: str
    task_id: str
    index: int = 1  # the action's index within its task, as in tool_call_* events
    action: dict[str, Any]  # normalized {"tool": str, "args": dict, "reason": str | None}
    tool: str
    command: str | None = None  # for shell_exec_safe: the command as it will run
    risk_level: str | None = None
    action_type: str | None = None
    reason: str | None = None  # why it needs approval (the classifier's sentence)
    requested_by: str | None = None
    created_at: datetime
    expires_at: datetime | None = None
    decision: Decision | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    decision_note: str | None = None  # e.g. the reason given with a deny
    executed_at: datetime | None = None  # when the approved action was claimed to run
    reminded_at: datetime | None = None
    card_ref: str | None = None  # where the approval card was posted (bot-owned format)
    # What the card shows: unposted (no card yet) | posted (buttons) | resolved (the decision).
    card_state: CardState = "unposted"
    # Set on an approval offered again because the run of this earlier one was cut short.
    replaces_approval_id: str | None = None
    # Set while a process posts or resolves the card (a lease); left set by one that died.
    card_claimed_at: datetime | None = None


class Rule(Record):
    rule_id: str
    tool: str
    kind: RuleKind
    # exact: the normalized command; prefix: the argv prefix, shell-quoted (shlex.join)
    pattern: str
    created_by: str
    created_at: datetime
    source_approval_id: str | None = None
    revoked_by: str | None = None
    revoked_at: datetime | None = None
    # Parsed once, when the rule is made (issue #23): the pattern normalized, the
    # program a prefix rule names, and a prefix rule's parsed words (JSON) that
    # matching reads instead of parsing the pattern again. None on a rule not yet
    # filled (made before schema v6, or inserted without them).
    normalized: str | None = None
    program: str | None = None
    parsed: str | None = None
    # Issue #21: the channel (conversation group, "slack:C1") the rule is used in,
    # None for everywhere; when it stops matching (None: never); its use.
    scope: str | None = None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    use_count: int = 0

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def expired(self, at: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= at


class Schedule(Record):
    schedule_id: str
    cron: str  # standard five fields: minute hour day-of-month month day-of-week
    timezone: str  # IANA name, e.g. "Europe/Berlin"
    prompt: str
    conversation: str  # where runs are posted (a channel-level conversation key)
    created_by: str
    created_at: datetime
    paused: bool = False
    last_run_at: datetime | None = None
