"""ApprovalService on a real SQLite file and a real PostgreSQL: exactly-once decisions,
expiry, rules."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runtime.approvals import ApprovalError, ApprovalService, DecisionOutcome
from runtime.store import Stores, open_stores

SHELL = "shell_exec_safe"

pytestmark = pytest.mark.backends("sqlite", "postgres")


def read_action(path: str = "app.log") -> dict[str, Any]:
    return {"tool": "read_file", "args": {"path": path, "max_bytes": 100}, "reason": "look"}


def shell_action(command: str) -> dict[str, Any]:
    return {"tool": SHELL, "args": {"command": command}, "reason": "needed"}


@pytest.fixture
def db_path(db_target: str) -> str:
    return db_target


@pytest.fixture
async def stores(db_path: str):
    async with await open_stores(db_path) as opened:
        yield opened


@pytest.fixture
def service(stores: Stores) -> ApprovalService:
    return ApprovalService.from_stores(stores)


async def pending(stores: Stores, service: ApprovalService, action: dict[str, Any], **kw: Any):
    task = await stores.tasks.create_task("q", requested_by="slack:U1")
    approval = await service.create_pending(task.task_id, action, **kw)
    return task, approval


async def event_types(stores: Stores, task_id: str | None) -> list[str]:
    return [e.event_type for e in await stores.events.list_events(task_id)]


# -- creating ----------------------------------------------------------------------


async def test_create_pending(stores: Stores) -> None:
    service = ApprovalService.from_stores(stores, ttl=60)
    task, approval = await pending(
        stores,
        service,
        shell_action("systemctl restart nginx"),
        index=3,
        risk_level="high",
        action_type="service",
        reason="restarts a service",
        requested_by="slack:U1",
    )
    assert approval.task_id == task.task_id
    assert (approval.tool, approval.command, approval.index) == (
        SHELL,
        "systemctl restart nginx",
        3,
    )
    assert (approval.risk_level, approval.action_type, approval.requested_by) == (
        "high",
        "service",
        "slack:U1",
    )
    assert approval.action == shell_action("systemctl restart nginx")
    assert approval.expires_at is not None
    assert timedelta(seconds=55) < approval.expires_at - datetime.now(UTC) <= timedelta(seconds=60)
    assert await service.get(approval.approval_id) == approval
    assert [a.approval_id for a in await service.pending()] == [approval.approval_id]
    assert [a.approval_id for a in await service.pending_for_task(task.task_id)] == [
        approval.approval_id
    ]
    assert await service.set_card_ref(approval.approval_id, "slack:C1:1.2")
    assert (await service.get(approval.approval_id)).card_ref == "slack:C1:1.2"

    without_ttl = await ApprovalService.from_stores(stores).create_pending(
        task.task_id, read_action()
    )
    assert without_ttl.expires_at is None and without_ttl.command is None


# -- deciding ----------------------------------------------------------------------


async def test_decide_exactly_once_under_concurrency(
    stores: Stores, service: ApprovalService
) -> None:
    task, approval = await pending(stores, service, read_action())
    outcomes = await asyncio.gather(
        *(
            service.decide(approval.approval_id, ("approve", "deny")[i % 2], f"slack:U{i}")
            for i in range(20)
        )
    )
    taken = [o for o in outcomes if o.taken]
    assert len(taken) == 1
    winner = taken[0].approval
    assert winner is not None and winner.decision in ("approve", "deny")
    # Everyone sees the same, single decision.
    assert {o.approval.decided_by for o in outcomes} == {winner.decided_by}
    decided = await stores.events.list_by_type("approval_decided")
    assert len(decided) == 1
    assert decided[0].task_id == task.task_id
    assert decided[0].payload == {
        "approval_id": approval.approval_id,
        "decision": winner.decision,
        "decided_by": winner.decided_by,
        "note": None,
    }


async def test_decide_from_a_second_connection_after_the_first(
    db_path: str, stores: Stores, service: ApprovalService
) -> None:
    _, approval = await pending(stores, service, read_action())
    assert (await service.decide(approval.approval_id, "deny", "slack:U2", "no")).taken
    async with await open_stores(db_path) as other:
        late = await ApprovalService.from_stores(other).decide(
            approval.approval_id, "approve", "slack:U3"
        )
    assert late == DecisionOutcome(taken=False, approval=late.approval)
    assert late.approval.decision == "deny" and late.approval.decided_by == "slack:U2"
    assert late.approval.decision_note == "no"
    assert len(await stores.events.list_by_type("approval_decided")) == 1


async def test_two_connections_decide_at_once(
    db_path: str, stores: Stores, service: ApprovalService
) -> None:
    _, approval = await pending(stores, service, read_action())
    async with await open_stores(db_path) as other:
        second = ApprovalService.from_stores(other)
        outcomes = await asyncio.gather(
            *(
                s.decide(approval.approval_id, "approve", f"u{i}")
                for i in range(10)
                for s in (service, second)
            )
        )
    assert sum(o.taken for o in outcomes) == 1
    assert len(await stores.events.list_by_type("approval_decided")) == 1


async def test_claim_execution_exactly_once(stores: Stores, service: ApprovalService) -> None:
    _, approval = await pending(stores, service, read_action())
    assert not await service.claim_execution(approval.approval_id)  # not decided yet
    await service.decide(approval.approval_id, "approve", "slack:U2")
    claims = await asyncio.gather(
        *(service.claim_execution(approval.approval_id) for _ in range(20))
    )
    assert claims.count(True) == 1
    assert (await service.get(approval.approval_id)).executed_at is not None

    _, denied = await pending(stores, service, read_action())
    await service.decide(denied.approval_id, "deny", "slack:U2")
    assert not await service.claim_execution(denied.approval_id)


async def test_deny_with_note(stores: Stores, service: ApprovalService) -> None:
    task, approval = await pending(stores, service, read_action())
    outcome = await service.decide(approval.approval_id, "deny", "matrix:@a:x", "use the replica")
    assert outcome.taken and outcome.rule is None
    assert outcome.approval.decision == "deny"
    assert outcome.approval.decision_note == "use the replica"
    assert outcome.approval.decided_at is not None
    (event,) = await stores.events.list_events(task.task_id)
    assert event.payload["note"] == "use the replica"
    assert await service.pending() == []


async def test_bad_decisions_are_approval_errors(stores: Stores, service: ApprovalService) -> None:
    with pytest.raises(ApprovalError, match="No such approval"):
        await service.decide("does-not-exist", "approve", "slack:U1")
    _, approval = await pending(stores, service, read_action())
    for decision in ("maybe", "expired", ""):
        with pytest.raises(ApprovalError):
            await service.decide(approval.approval_id, decision, "slack:U1")
    assert (await service.get(approval.approval_id)).decision is None


# -- expiry ------------------------------------------------------------------------


async def test_expire_exactly_once(stores: Stores, service: ApprovalService) -> None:
    task, approval = await pending(stores, service, read_action())
    results = await asyncio.gather(*(service.expire(approval.approval_id) for _ in range(5)))
    assert results.count(True) == 1
    expired = await service.get(approval.approval_id)
    assert (expired.decision, expired.decided_by) == ("expired", "system")
    assert await event_types(stores, task.task_id) == ["approval_expired"]
    late = await service.decide(approval.approval_id, "approve", "slack:U2")
    assert not late.taken and late.approval.decision == "expired"
    assert not await service.claim_execution(approval.approval_id)

    _, decided = await pending(stores, service, read_action())
    await service.decide(decided.approval_id, "approve", "slack:U2")
    assert not await service.expire(decided.approval_id)


async def test_answer_after_the_deadline_is_refused(stores: Stores) -> None:
    service = ApprovalService.from_stores(stores, ttl=0.01)
    task, approval = await pending(stores, service, read_action())
    await asyncio.sleep(0.05)
    with pytest.raises(ApprovalError, match="expired"):
        await service.decide(approval.approval_id, "approve", "slack:U2")
    assert (await service.get(approval.approval_id)).decision is None
    assert await event_types(stores, task.task_id) == []
    assert await service.expire(approval.approval_id)


async def test_reminder_is_claimed_once(stores: Stores, service: ApprovalService) -> None:
    _, approval = await pending(stores, service, read_action())
    results = await asyncio.gather(*(service.mark_reminded(approval.approval_id) for _ in range(5)))
    assert results.count(True) == 1


# -- always and rules (non-shell tools) ----------------------------------------------


async def test_always_creates_a_rule_that_allows_the_same_action(
    stores: Stores, service: ApprovalService
) -> None:
    action = read_action()
    assert not await service.is_allowed_forever(action)
    task, approval = await pending(stores, service, action, risk_level="medium")
    outcome = await service.decide(approval.approval_id, "always", "slack:U2")
    assert outcome.taken and outcome.approval.decision == "always"
    rule = outcome.rule
    assert rule is not None
    assert (rule.tool, rule.kind, rule.created_by) == ("read_file", "exact", "slack:U2")
    assert rule.pattern == json.dumps(action["args"], sort_keys=True)
    assert rule.source_approval_id == approval.approval_id

    assert await service.is_allowed_forever(action)
    reordered = {"tool": "read_file", "args": {"max_bytes": 100, "path": "app.log"}}
    assert await service.is_allowed_forever(reordered)
    assert not await service.is_allowed_forever(read_action("other.log"))
    assert not await service.is_allowed_forever({"tool": "list_dir", "args": action["args"]})

    events = await stores.events.list_events(task.task_id)
    assert [e.event_type for e in events] == ["approval_decided", "rule_created"]
    assert events[1].payload == {
        "rule_id": rule.rule_id,
        "tool": "read_file",
        "kind": "exact",
        "pattern": rule.pattern,
        "created_by": "slack:U2",
        "source_approval_id": approval.approval_id,
        "scope": None,  # the task has no conversation: a global rule
        "expires_at": None,
    }
    # A second "always" click changes nothing and makes no second rule.
    again = await service.decide(approval.approval_id, "always", "slack:U3")
    assert not again.taken and again.rule is None
    assert len(await service.list_rules()) == 1


async def test_always_on_critical_is_refused_with_nothing_changed(
    stores: Stores, service: ApprovalService
) -> None:
    task, approval = await pending(
        stores, service, read_action("/etc/shadow"), risk_level="critical"
    )
    with pytest.raises(ApprovalError, match="critical"):
        await service.decide(approval.approval_id, "always", "slack:U2")
    assert (await service.get(approval.approval_id)).decision is None
    assert await service.list_rules(include_revoked=True) == []
    assert await event_types(stores, task.task_id) == []
    # Approving it once is still possible.
    assert (await service.decide(approval.approval_id, "approve", "slack:U2")).taken


async def test_rules_add_list_revoke_with_events(stores: Stores, service: ApprovalService) -> None:
    task = await stores.tasks.create_task("/duck rules add")
    rule = await service.add_rule(
        "read_file", "exact", '{"path": "a.log"}', "slack:UADMIN", task_id=task.task_id
    )
    assert rule.pattern == json.dumps({"path": "a.log"}, sort_keys=True)
    global_rule = await service.add_rule("list_dir", "exact", '{"path": "."}', "cli")
    assert [r.rule_id for r in await service.list_rules()] == [rule.rule_id, global_rule.rule_id]
    assert await service.is_allowed_forever({"tool": "read_file", "args": {"path": "a.log"}})

    assert await event_types(stores, task.task_id) == ["rule_created"]
    assert await event_types(stores, None) == ["rule_created"]

    assert await service.revoke_rule(rule.rule_id, "slack:UADMIN")
    assert not await service.revoke_rule(rule.rule_id, "slack:UADMIN")
    assert not await service.revoke_rule("r-nothere", "slack:UADMIN")
    assert not await service.is_allowed_forever({"tool": "read_file", "args": {"path": "a.log"}})
    assert [r.rule_id for r in await service.list_rules()] == [global_rule.rule_id]
    revoked = (await service.list_rules(include_revoked=True))[0]
    assert revoked.revoked_by == "slack:UADMIN" and revoked.revoked_at is not None

    global_events = await stores.events.list_events(None)
    assert [e.event_type for e in global_events] == ["rule_created", "rule_revoked"]
    assert global_events[1].payload["rule_id"] == rule.rule_id
    assert global_events[1].payload["revoked_by"] == "slack:UADMIN"


async def test_add_rule_rejects_bad_input(service: ApprovalService) -> None:
    with pytest.raises(ApprovalError, match="kind"):
        await service.add_rule("read_file", "regex", ".*", "admin")
    with pytest.raises(ApprovalError, match="Prefix rules"):
        await service.add_rule("read_file", "prefix", "{}", "admin")
    with pytest.raises(ApprovalError, match="JSON"):
        await service.add_rule("read_file", "exact", "not json", "admin")
    with pytest.raises(ApprovalError, match="tool"):
        await service.add_rule("", "exact", "{}", "admin")
    assert await service.list_rules(include_revoked=True) == []


async def test_stores_must_share_one_database(stores: Stores, tmp_path: Path) -> None:
    async with await open_stores(tmp_path / "other.db") as other:
        with pytest.raises(ValueError):
            ApprovalService(stores.approvals, other.rules, stores.events)


# -- shell rules (runtime/tools/shell_rules.py decides what a rule covers) -------------


async def test_always_on_a_shell_command(stores: Stores, service: ApprovalService) -> None:
    from runtime.tools.shell_rules import rule_for_command

    command = "systemctl   restart 'nginx'"
    assert not await service.is_allowed_forever(shell_action(command))
    task, approval = await pending(stores, service, shell_action(command), risk_level="high")
    outcome = await service.decide(approval.approval_id, "always", "slack:U2")
    assert outcome.taken and outcome.rule is not None
    assert outcome.rule.tool == SHELL
    assert (outcome.rule.kind, outcome.rule.pattern) == rule_for_command(command)
    assert await service.is_allowed_forever(shell_action(command))
    assert await service.is_allowed_forever(shell_action("systemctl restart nginx"))
    assert not await service.is_allowed_forever(shell_action("systemctl stop nginx"))
    assert not await service.is_allowed_forever(
        shell_action("systemctl restart nginx && rm -rf /var/lib/postgresql")
    )
    assert await event_types(stores, task.task_id) == ["approval_decided", "rule_created"]


async def test_always_on_a_blocked_shell_command_is_refused(
    stores: Stores, service: ApprovalService
) -> None:
    # Blocked commands are classified critical; a stale or wrong risk level on the
    # approval must not open a way round that.
    task, approval = await pending(stores, service, shell_action("rm -rf /"), risk_level="high")
    with pytest.raises(ApprovalError, match="blocked"):
        await service.decide(approval.approval_id, "always", "slack:U2")
    assert (await service.get(approval.approval_id)).decision is None
    assert await service.list_rules(include_revoked=True) == []
    assert await event_types(stores, task.task_id) == []


async def test_shell_rules_added_by_an_admin(stores: Stores, service: ApprovalService) -> None:
    rule = await service.add_rule(SHELL, "prefix", "  git   pull ", "slack:UADMIN")
    assert (rule.kind, rule.pattern) == ("prefix", "git pull")
    assert await service.is_allowed_forever(shell_action("git pull"))
    # A prefix adds no option and, for git pull, no operand (issue 13, item 4).
    assert not await service.is_allowed_forever(shell_action("git pull --rebase origin main"))
    assert not await service.is_allowed_forever(shell_action("git push"))
    assert not await service.is_allowed_forever(shell_action("git pull && rm -rf build"))

    for kind, pattern in [("prefix", ""), ("prefix", "bash"), ("exact", "rm -rf /")]:
        with pytest.raises(ApprovalError, match="Invalid rule"):
            await service.add_rule(SHELL, kind, pattern, "slack:UADMIN")
    assert [r.rule_id for r in await service.list_rules(include_revoked=True)] == [rule.rule_id]

    # No rule, however broad, allows a blocked command.
    broad = await stores.rules.insert(SHELL, "prefix", "rm", "test")
    ws = "/srv/workspace"  # where the command would run: added operands resolve there
    assert await service.is_allowed_forever(shell_action("rm build.log"), ws)
    assert not await service.is_allowed_forever(shell_action("rm build.log"))  # no workspace
    assert not await service.is_allowed_forever(shell_action("rm -rf /"), ws)
    assert await service.revoke_rule(broad.rule_id, "slack:UADMIN")
    assert not await service.is_allowed_forever(shell_action("rm build.log"), ws)
