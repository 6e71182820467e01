"""The audit log as evidence: verifying its hash chains and exporting it.

`verify` recomputes every chain (one per task, plus the global stream of
events without a task) from its stored rows and names the first event of
each chain that does not match: an edited payload, type or time, a deleted
event (a gap in the numbers), or events moved or swapped (their seq is part
of what is hashed). It reads the rows in pages of PAGE_ROWS through the
(task_id, seq) index, so its memory does not grow with the log.

`export_actions` yields one record per proposed action (who asked, what was
proposed, its risk, who decided, the rule that allowed it, what ran, exit
code, duration, output size and the chain hash of the action's last event),
a page of tasks at a time, for `ducklm audit export`.

What the chain cannot show on its own: events cut from the END of a chain
(nothing after them points back). An export or `/duck task ID` shows a
chain's head hash; keeping a copy of it anchors the chain up to there.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from runtime.store.chain import canonical_event, link
from runtime.store.db import Database, load_json
from runtime.store.events import same_task

PAGE_ROWS = 2000
TASKS_PER_PAGE = 200


@dataclass(frozen=True)
class ChainFailure:
    task_id: str | None
    seq: int  # the first stored event that does not match (or the missing number)
    reason: str

    def describe(self) -> str:
        where = f"task {self.task_id}" if self.task_id is not None else "global events"
        return f"{where}, event {self.seq}: {self.reason}"


@dataclass
class VerifyResult:
    chains: int = 0
    events: int = 0
    failures: list[ChainFailure] = field(default_factory=list)
    # The hash of each chain's last event when one task was verified (its head).
    head: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


class _Chain:
    """Walks one chain's rows in order and remembers its first failure."""

    def __init__(self, task_id: str | None) -> None:
        self.task_id = task_id
        self.expected_seq = 1
        self.prev: str | None = None
        self.failure: ChainFailure | None = None

    def feed(self, row: Any) -> None:
        if self.failure is not None:
            return
        seq = int(row["seq"])
        if seq != self.expected_seq:
            missing = (
                f"event {self.expected_seq} is missing"
                if seq == self.expected_seq + 1
                else f"events {self.expected_seq}-{seq - 1} are missing"
            )
            self.failure = ChainFailure(self.task_id, seq, f"{missing} (deleted?)")
            return
        payload = load_json(row["payload"], row["payload"])
        computed = link(
            self.prev,
            canonical_event(self.task_id, seq, row["event_type"], payload, row["created_at"]),
        )
        stored = row["hash"]
        if stored is None:
            self.failure = ChainFailure(self.task_id, seq, "has no chain hash")
        elif stored != computed:
            self.failure = ChainFailure(
                self.task_id,
                seq,
                f"{row['event_type']}: its hash does not match its content or position "
                "(edited, moved or swapped)",
            )
        self.prev = stored
        self.expected_seq += 1


_ROW = "task_id, seq, event_type, payload, created_at, hash"


async def verify(
    db: Database, task_id: str | None = None, *, everything: bool = True
) -> VerifyResult:
    """Recompute chains: one task's (`task_id`), or with `everything` all of them
    (the global stream included) when `task_id` is None."""
    result = VerifyResult()
    if task_id is not None or not everything:
        chain = _Chain(task_id)
        last_seq = 0
        where, key = same_task(task_id)
        while True:
            rows = await db.fetchall(
                f"SELECT {_ROW} FROM events WHERE {where} AND seq > ? ORDER BY seq LIMIT ?",
                (*key, last_seq, PAGE_ROWS),
            )
            for row in rows:
                chain.feed(row)
            result.events += len(rows)
            if len(rows) < PAGE_ROWS:
                break
            last_seq = rows[-1]["seq"]
        result.chains = 1 if result.events else 0
        result.head = chain.prev
        if chain.failure is not None:
            result.failures.append(chain.failure)
        return result
    # The global stream first (task_id IS NULL), then every task in index order.
    glob = await verify(db, None, everything=False)
    result.chains, result.events, result.failures = glob.chains, glob.events, list(glob.failures)
    current: _Chain | None = None
    after: tuple[str, int] = ("", 0)
    while True:
        rows = await db.fetchall(
            f"SELECT {_ROW} FROM events WHERE task_id IS NOT NULL AND (task_id, seq) > (?, ?) "
            "ORDER BY task_id, seq LIMIT ?",
            (*after, PAGE_ROWS),
        )
        for row in rows:
            if current is None or current.task_id != row["task_id"]:
                if current is not None and current.failure is not None:
                    result.failures.append(current.failure)
                current = _Chain(row["task_id"])
                result.chains += 1
            current.feed(row)
        result.events += len(rows)
        if len(rows) < PAGE_ROWS:
            break
        after = (rows[-1]["task_id"], rows[-1]["seq"])
    if current is not None and current.failure is not None:
        result.failures.append(current.failure)
    return result


# -- export ---------------------------------------------------------------

EXPORT_FIELDS = (
    "task_id",
    "channel",
    "requester",
    "index",
    "tool",
    "command",
    "risk_level",
    "action_type",
    "proposed_at",
    "decision",  # approve | deny | always | expired | rule | none (ran without approval) | blocked
    "decided_by",
    "decided_at",
    "decision_note",
    "quorum",  # not recorded yet (no quorum approvals exist); always empty
    "edits",  # not recorded yet (approvals cannot be edited); always empty
    "rule_id",  # the rule(s) that allowed it, space-separated
    "ran",
    "exit_code",
    "duration_ms",
    "output_bytes",
    "ok",
    "event_seq",  # the action's last event
    "chain_hash",  # that event's hash
)


def _channel(conversation: str | None) -> str | None:
    if conversation is None:
        return None
    return conversation.split("|", 1)[0]


def _action_records(task: Any, events: Iterable[Any], approvals: dict[str, Any]) -> list[dict]:
    actions: dict[int, dict[str, Any]] = {}

    def record(index: Any) -> dict[str, Any]:
        key = int(index) if isinstance(index, int) else -1
        if key not in actions:
            actions[key] = {name: None for name in EXPORT_FIELDS} | {
                "task_id": task["task_id"],
                "channel": _channel(task["conversation"]),
                "requester": task["requested_by"],
                "index": key,
                "ran": False,
            }
        return actions[key]

    matched: list[str] | None = None  # the rules of the last rule_matched
    for row in events:
        payload = load_json(row["payload"], {})
        if row["event_type"] == "rule_matched" and isinstance(payload, dict):
            matched = [str(r) for r in payload.get("rule_ids") or []]
            continue
        if not isinstance(payload, dict) or "index" not in payload:
            continue
        kind = row["event_type"]
        if kind not in (
            "tool_call_started",
            "tool_approval_requested",
            "command_audit",
            "tool_call_finished",
        ):
            continue
        rec = record(payload.get("index"))
        rec["event_seq"], rec["chain_hash"] = row["seq"], row["hash"]
        rec["tool"] = payload.get("tool") or rec["tool"]
        if kind == "tool_call_started":
            if rec["proposed_at"] is None:
                rec["proposed_at"] = row["created_at"]
            args = payload.get("args") or {}
            if rec["command"] is None and isinstance(args, dict):
                rec["command"] = args.get("command")
            approval = approvals.get(payload.get("approval_id") or "")
            if approval is not None:
                _apply_approval(rec, approval)
        elif kind == "tool_approval_requested":
            approval = approvals.get(payload.get("approval_id") or "")
            if approval is not None:
                _apply_approval(rec, approval)
        elif kind == "command_audit":
            rec["command"] = payload.get("command") or rec["command"]
            rec["risk_level"] = payload.get("risk_level")
            rec["action_type"] = payload.get("action_type")
            rec["exit_code"] = payload.get("returncode")
            rec["duration_ms"] = payload.get("duration_ms")
            rec["ok"] = bool(payload.get("ok"))
            if payload.get("blocked"):
                rec["decision"] = "blocked"
            elif payload.get("approved_by") == "rule":
                rec["decision"] = "rule"
                # The loop records rule_matched just before the command it allowed.
                rec["rule_id"] = " ".join(matched or []) or None
                matched = None
            elif rec["decision"] is None and not payload.get("requires_approval"):
                rec["decision"] = "none"
            # It ran when it produced an exit code (a blocked or denied one has none).
            rec["ran"] = payload.get("returncode") is not None
        elif kind == "tool_call_finished":
            result = payload.get("result") or {}
            if isinstance(result, dict):
                rec["ok"] = bool(result.get("ok"))
                output = result.get("output") or ""
                rec["output_bytes"] = len(str(output).encode("utf-8", "replace"))
                metadata = result.get("metadata") or {}
                if isinstance(metadata, dict) and rec["exit_code"] is None:
                    rec["exit_code"] = metadata.get("returncode")
                if rec["tool"] != "shell_exec_safe" and not metadata.get("pending_approval"):
                    rec["ran"] = rec["decision"] not in ("deny", "expired", "blocked")
    return [actions[key] for key in sorted(actions)]


def _apply_approval(rec: dict[str, Any], approval: Any) -> None:
    rec["command"] = approval["command"] or rec["command"]
    rec["risk_level"] = approval["risk_level"] or rec["risk_level"]
    rec["action_type"] = approval["action_type"] or rec["action_type"]
    rec["decision"] = approval["decision"]
    rec["decided_by"] = approval["decided_by"]
    rec["decided_at"] = approval["decided_at"]
    rec["decision_note"] = approval["decision_note"]


async def export_actions(
    db: Database, since: float, until: float | None = None
) -> AsyncIterator[dict[str, Any]]:
    """One record per action of the tasks created in [since, until), oldest first,
    read a page of TASKS_PER_PAGE tasks at a time."""
    after: tuple[float, str] = (since, "")
    first = True
    end = float("inf") if until is None else until
    while True:
        tasks = await db.fetchall(
            "SELECT task_id, conversation, requested_by, created_at FROM tasks "
            "WHERE (created_at, task_id) " + (">=" if first else ">") + " (?, ?) "
            "AND created_at < ? ORDER BY created_at, task_id LIMIT ?",
            (*after, end, TASKS_PER_PAGE),
        )
        first = False
        if not tasks:
            return
        ids = [task["task_id"] for task in tasks]
        marks = ", ".join("?" * len(ids))
        events = await db.fetchall(
            f"SELECT {_ROW} FROM events WHERE task_id IN ({marks}) ORDER BY task_id, seq", ids
        )
        approvals = await db.fetchall(
            "SELECT approval_id, task_id, command, risk_level, action_type, decision, "
            f"decided_by, decided_at, decision_note FROM approvals WHERE task_id IN ({marks})",
            ids,
        )
        by_task: dict[str, list[Any]] = {}
        for row in events:
            by_task.setdefault(row["task_id"], []).append(row)
        approval_by_id = {row["approval_id"]: row for row in approvals}
        for task in tasks:
            for rec in _action_records(task, by_task.get(task["task_id"], []), approval_by_id):
                yield rec
        if len(tasks) < TASKS_PER_PAGE:
            return
        after = (tasks[-1]["created_at"], tasks[-1]["task_id"])


def to_jsonl(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"


def csv_header() -> str:
    out = io.StringIO()
    csv.writer(out).writerow(EXPORT_FIELDS)
    return out.getvalue()


def to_csv(record: dict[str, Any]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(
        ["" if record[name] is None else record[name] for name in EXPORT_FIELDS]
    )
    return out.getvalue()
