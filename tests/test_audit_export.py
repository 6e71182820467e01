"""`ducklm audit export` (issue #21): one record per action, read back field by field,
from real runs with an approval, a denial, a rule match, a blocked command and a
command that ran without asking."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from bot.cli import main
from runtime.factory import Runtime
from runtime.store.audit import EXPORT_FIELDS

C1 = "slack:C1"
ALICE = "slack:UALICE"
BOB = "slack:UBOB"

pytestmark = pytest.mark.backends("sqlite", "postgres")


async def _runs(runtime: Runtime) -> dict[str, str]:
    """The runs; returns what -> task id."""
    (runtime.settings.workspace / "a.txt").write_text("hello\n")
    conv = f"{C1}|1.1"
    ids: dict[str, str] = {}

    plain = await runtime.loop.run_command("cat a.txt", conversation=conv, requested_by=ALICE)
    ids["plain"] = plain.task_id

    asked = await runtime.loop.run_command("touch x.txt", conversation=conv, requested_by=ALICE)
    approval = asked.pending_approval.approval_id  # type: ignore[union-attr]
    await runtime.approvals.decide(approval, "approve", BOB)
    await runtime.loop.continue_after_approval(asked.task_id, approval)
    ids["approved"], ids["approved_id"] = asked.task_id, approval

    denied = await runtime.loop.run_command("touch y.txt", conversation=conv, requested_by=ALICE)
    deny_id = denied.pending_approval.approval_id  # type: ignore[union-attr]
    await runtime.approvals.decide(deny_id, "deny", BOB, "not today")
    await runtime.loop.continue_after_approval(denied.task_id, deny_id)
    ids["denied"] = denied.task_id

    rule = await runtime.approvals.add_rule(
        "shell_exec_safe", "exact", "touch z.txt", BOB, scope=C1
    )
    by_rule = await runtime.loop.run_command("touch z.txt", conversation=conv, requested_by=ALICE)
    assert by_rule.status == "completed"
    ids["rule"], ids["rule_id"] = by_rule.task_id, rule.rule_id

    blocked = await runtime.loop.run_command("rm -rf /", conversation=conv, requested_by=ALICE)
    ids["blocked"] = blocked.task_id
    return ids


def _export(runtime: Runtime, fmt: str, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    capsys.readouterr()
    since = (datetime.now(UTC) - timedelta(hours=1)).date().isoformat()
    code = main(["--db", str(runtime.settings.db), "audit", "export", "--since", since,
                 "--format", fmt, *extra])  # fmt: skip
    assert code == 0
    return capsys.readouterr().out


async def test_export_jsonl_and_csv_field_by_field(
    runtime: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await _runs(runtime)
    out = await asyncio.to_thread(_export, runtime, "jsonl", capsys)
    records = [json.loads(line) for line in out.splitlines()]
    by_task = {r["task_id"]: r for r in records}
    assert len(records) == len(by_task) == 5
    for record in records:
        assert list(record) == list(EXPORT_FIELDS)
        assert record["channel"] == C1 and record["requester"] == ALICE
        assert record["tool"] == "shell_exec_safe" and record["index"] == 1
        assert record["quorum"] is None and record["edits"] is None
        assert isinstance(record["proposed_at"], float)
        # The chain hash is the stored hash of the event the record ends at.
        events = await runtime.stores.events.list_events(record["task_id"])
        (event,) = [e for e in events if e.seq == record["event_seq"]]
        assert record["chain_hash"] == event.hash and len(event.hash or "") == 64

    plain = by_task[ids["plain"]]
    assert plain["command"] == "cat a.txt" and plain["decision"] == "none"
    assert plain["decided_by"] is None and plain["rule_id"] is None
    assert plain["ran"] is True and plain["exit_code"] == 0 and plain["ok"] is True
    assert plain["output_bytes"] == len("hello\n") and plain["risk_level"] == "low"
    assert isinstance(plain["duration_ms"], int | float)

    approved = by_task[ids["approved"]]
    assert approved["command"] == "touch x.txt" and approved["decision"] == "approve"
    assert approved["decided_by"] == BOB and isinstance(approved["decided_at"], float)
    assert approved["ran"] is True and approved["exit_code"] == 0 and approved["ok"] is True
    assert approved["risk_level"] in ("medium", "high") and approved["rule_id"] is None

    denied = by_task[ids["denied"]]
    assert denied["command"] == "touch y.txt" and denied["decision"] == "deny"
    assert denied["decided_by"] == BOB and denied["decision_note"] == "not today"
    assert denied["ran"] is False and denied["exit_code"] is None and denied["ok"] is False

    by_rule = by_task[ids["rule"]]
    assert by_rule["command"] == "touch z.txt" and by_rule["decision"] == "rule"
    assert by_rule["rule_id"] == ids["rule_id"] and by_rule["decided_by"] is None
    assert by_rule["ran"] is True and by_rule["exit_code"] == 0

    blocked = by_task[ids["blocked"]]
    assert blocked["command"] == "rm -rf /" and blocked["decision"] == "blocked"
    assert blocked["ran"] is False and blocked["exit_code"] is None
    assert blocked["risk_level"] == "critical"

    # CSV: the same records, every field as text (empty for none).
    text = await asyncio.to_thread(_export, runtime, "csv", capsys)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [tuple(r) for r in rows[:1]] == [EXPORT_FIELDS]
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        for name in EXPORT_FIELDS:
            value = record[name]
            assert row[name] == ("" if value is None else str(value)), name


async def test_export_window(runtime: Runtime, capsys: pytest.CaptureFixture[str]) -> None:
    await _runs(runtime)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    past = await asyncio.to_thread(_export, runtime, "jsonl", capsys, "--until", "2000-01-01")
    assert past == ""
    capsys.readouterr()
    code = await asyncio.to_thread(
        main, ["--db", str(runtime.settings.db), "audit", "export", "--since", tomorrow]
    )
    assert code == 0 and capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match="not a date"):
        await asyncio.to_thread(
            main, ["--db", str(runtime.settings.db), "audit", "export", "--since", "yesterday"]
        )
