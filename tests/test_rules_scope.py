"""Rules with a scope, a lifetime, a preview and a review (issue #21), through the
real loop (`run_command`: the shell tool under the approval rules) and store."""

from __future__ import annotations

import asyncio
import time

import pytest

from bot import commands as c
from bot.admin import CommandRunner
from bot.cli import main
from bot.policy import Actor
from runtime.factory import Runtime
from tests.postgres import raw_execute

pytestmark = pytest.mark.backends("sqlite", "postgres")

C1 = "slack:C1"
C2 = "slack:C2"
ADMIN = Actor("slack:UADMIN", is_admin=True, is_approver=True)


def runner(runtime: Runtime, **kw: object) -> CommandRunner:
    stores = runtime.stores
    return CommandRunner(
        stores.tasks,
        stores.events,
        runtime.approvals,
        stores.schedules,
        rules_listed=None,
        workspace=str(runtime.settings.workspace),
        **kw,  # type: ignore[arg-type]
    )


async def test_a_scoped_rule_is_used_in_its_channel_and_not_in_another(runtime: Runtime) -> None:
    rule = await runtime.approvals.add_rule(
        "shell_exec_safe", "exact", "touch a.txt", "x", scope=C1
    )
    assert rule.scope == C1

    here = await runtime.loop.run_command("touch a.txt", conversation=f"{C1}|1.1")
    assert here.status == "completed"
    assert (runtime.settings.workspace / "a.txt").exists()
    elsewhere = await runtime.loop.run_command("touch a.txt", conversation=f"{C2}|1.1")
    assert elsewhere.status == "waiting_for_approval"
    nowhere = await runtime.loop.run_command("touch a.txt")  # no channel: global rules only
    assert nowhere.status == "waiting_for_approval"

    (used,) = await runtime.approvals.list_rules()
    assert used.use_count == 1 and used.last_used_at is not None
    events = await runtime.stores.events.list_events(here.task_id)
    (matched,) = [e.payload for e in events if e.event_type == "rule_matched"]
    assert matched == {
        "rule_ids": [rule.rule_id],
        "tool": "shell_exec_safe",
        "command": "touch a.txt",
    }
    trail = await runner(runtime).execute(c.TaskShow(here.task_id), ADMIN)
    assert f"rule_matched `{rule.rule_id}` allowed `touch a.txt`" in trail


async def test_always_is_scoped_to_the_channel_it_was_clicked_in(runtime: Runtime) -> None:
    first = await runtime.loop.run_command("touch b.txt", conversation=f"{C1}|2.2")
    approval_id = first.pending_approval.approval_id  # type: ignore[union-attr]
    outcome = await runtime.approvals.decide(approval_id, "always", "slack:UBOB")
    assert outcome.rule is not None and outcome.rule.scope == C1
    assert outcome.rule.source_approval_id == approval_id
    again = await runtime.loop.run_command("touch b.txt", conversation=f"{C1}|3.3")
    assert again.status == "completed"
    other = await runtime.loop.run_command("touch b.txt", conversation=f"{C2}|3.3")
    assert other.status == "waiting_for_approval"
    # An admin's `global` rule counts everywhere.
    reply = await runner(runtime).execute(
        c.parse_command("rules add exact touch b.txt global"), ADMIN, conversation_prefix=f"{C2}|"
    )
    assert reply.startswith("Added rule") and "— global" in reply
    assert (
        await runtime.loop.run_command("touch b.txt", conversation=f"{C2}|4.4")
    ).status == "completed"


async def test_an_expired_rule_stops_matching_and_is_listed_as_expired(runtime: Runtime) -> None:
    rule = await runtime.approvals.add_rule(
        "shell_exec_safe", "exact", "touch e.txt", "x", lifetime=0.5
    )
    assert rule.expires_at is not None
    action = {"tool": "shell_exec_safe", "args": {"command": "touch e.txt"}}
    assert await runtime.approvals.is_allowed_forever(action)
    deadline = time.monotonic() + 10
    while await runtime.approvals.is_allowed_forever(action):
        assert time.monotonic() < deadline, "the rule never expired"
        await asyncio.sleep(0.05)
    assert (await runtime.loop.run_command("touch e.txt")).status == "waiting_for_approval"
    listing = await runner(runtime).execute(c.RulesList(), ADMIN)
    assert f"`{rule.rule_id}`" in listing and "(EXPIRED " in listing


async def test_rule_max_age_caps_every_rule(runtime: Runtime) -> None:
    runtime.approvals.rule_max_age = 3600.0
    forever = await runtime.approvals.add_rule("shell_exec_safe", "exact", "touch m.txt", "x")
    week = await runtime.approvals.add_rule(
        "shell_exec_safe", "exact", "touch n.txt", "x", lifetime=7 * 86400
    )
    for rule in (forever, week):
        assert rule.expires_at is not None
        assert 3500 < rule.expires_at.timestamp() - time.time() <= 3600


async def _history(runtime: Runtime) -> None:
    workspace = runtime.settings.workspace
    (workspace / "logs").mkdir()
    (workspace / "a.txt").write_text("a\n")
    (workspace / "logs" / "b.txt").write_text("b\n")
    for command in (
        "cat a.txt",
        "cat logs/b.txt",
        "cat logs/b.txt",
        "cat -n a.txt",  # an option the rule does not name
        "cat /etc/hostname",  # outside the workspace
        "ls",  # another program: neither allowed nor a near miss
    ):
        assert (await runtime.loop.run_command(command)).status == "completed"


async def test_preview_lists_exactly_what_a_prefix_would_have_allowed(runtime: Runtime) -> None:
    await _history(runtime)
    preview = await runtime.approvals.preview_rule("prefix", "cat", str(runtime.settings.workspace))
    assert preview.allowed == [("cat logs/b.txt", 2), ("cat a.txt", 1)]
    assert sorted(preview.near) == ["cat -n a.txt", "cat /etc/hostname"]
    assert preview.broader_than("cat a.txt") and preview.broader_than("cat logs/b.txt")
    exact = await runtime.approvals.preview_rule("exact", "cat a.txt")
    assert exact.allowed == [("cat a.txt", 1)] and not exact.broader_than("cat a.txt")
    text = await runner(runtime).execute(c.parse_command("rules preview prefix cat"), ADMIN)
    assert "would have allowed 2 past command(s)" in text
    assert "✓ `cat logs/b.txt` ×2" in text and "✗ `cat -n a.txt`" in text and "`ls`" not in text


async def test_a_broad_rule_in_chat_asks_for_confirmation(runtime: Runtime) -> None:
    await _history(runtime)
    run = runner(runtime)
    asked = await run.execute(
        c.parse_command("rules add prefix cat for=7d"), ADMIN, conversation_prefix=f"{C1}|"
    )
    assert "✓ `cat logs/b.txt` ×2" in asked and "confirm" in asked
    assert await runtime.approvals.list_rules() == []  # nothing added yet
    added = await run.execute(
        c.parse_command("rules add prefix cat for=7d confirm"),
        ADMIN,
        conversation_prefix=f"{C1}|",
    )
    assert added.startswith("Added rule")
    (rule,) = await runtime.approvals.list_rules()
    assert (rule.kind, rule.pattern, rule.scope) == ("prefix", "cat", C1)
    assert rule.expires_at is not None
    assert 7 * 86400 - 60 < rule.expires_at.timestamp() - time.time() <= 7 * 86400
    # A rule that covers only its own command needs no confirmation.
    narrow = await run.execute(
        c.parse_command("rules add exact cat -n a.txt"), ADMIN, conversation_prefix=f"{C1}|"
    )
    assert narrow.startswith("Added rule")


async def test_review_lists_idle_rules_and_rules_that_allowed_a_failure(runtime: Runtime) -> None:
    idle = await runtime.approvals.add_rule("shell_exec_safe", "exact", "echo idle", "x")
    busy = await runtime.approvals.add_rule("shell_exec_safe", "prefix", "cat", "x")
    raw_execute(  # made 40 days ago
        runtime.settings.db,
        "UPDATE rules SET created_at = ? WHERE rule_id IN (?, ?)",
        (time.time() - 40 * 86400, idle.rule_id, busy.rule_id),
    )
    assert (await runtime.loop.run_command("cat missing.txt")).status == "completed"
    review = await runtime.approvals.review_rules(30)
    assert [r.rule_id for r in review.idle] == [idle.rule_id]  # busy was used just now
    (note,) = review.trouble[busy.rule_id]
    assert "`cat missing.txt`" in note and "failed (exit 1)" in note
    text = await runner(runtime, rule_idle_days=30).execute(c.RulesReview(), ADMIN)
    assert "Not used for 30 days" in text and f"`{idle.rule_id}`" in text
    assert f"`{busy.rule_id}` prefix `cat`:" in text
    assert await runner(runtime, rule_idle_days=30).review_for_admins() == text


async def test_review_flags_a_rule_covering_a_denied_command(runtime: Runtime) -> None:
    waiting = await runtime.loop.run_command("touch denied.txt", conversation=f"{C1}|1.1")
    approval_id = waiting.pending_approval.approval_id  # type: ignore[union-attr]
    await runtime.approvals.decide(approval_id, "deny", "slack:UBOB", "no")
    rule = await runtime.approvals.add_rule("shell_exec_safe", "exact", "touch denied.txt", "x")
    review = await runtime.approvals.review_rules(30)
    (note,) = review.trouble[rule.rule_id]
    assert "denied by slack:UBOB" in note
    assert (await runtime.approvals.review_rules(30, None)).idle == []
    empty = CommandRunner(runtime.stores.tasks, runtime.stores.events, runtime.approvals)
    await runtime.approvals.revoke_rule(rule.rule_id, "x")
    assert await empty.execute(c.RulesReview(), ADMIN) == "Rules review: nothing to look at."
    assert await empty.review_for_admins() is None  # the daily post is skipped


def test_parse_rule_options() -> None:
    cmd = c.parse_command("rules add prefix git pull for=7d global")
    assert cmd == c.RulesAdd("prefix", "git pull", lifetime=7 * 86400, scope_global=True)
    assert c.parse_command('rules add exact "echo global"') == c.RulesAdd("exact", "echo global")
    assert c.parse_command("rules review") == c.RulesReview()
    assert c.parse_command("rules preview prefix git pull") == c.RulesPreview("prefix", "git pull")
    with pytest.raises(c.CommandError, match="not a duration"):
        c.parse_command("rules add prefix git pull for=soon")


def test_cli_rules_add_for_and_channel(db_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = db_target
    assert (
        main(["--db", db, "rules", "add", "--for", "2h", "--channel", C1, "exact", "ls", "-la"])
        == 0
    )
    out = capsys.readouterr().out
    assert "in slack:C1, expires" in out
    assert main(["--db", db, "rules", "list"]) == 0
    assert "`ls -la` — in slack:C1, expires" in capsys.readouterr().out
    assert main(["--db", db, "rules", "add", "--for", "later", "exact", "ls"]) == 2


async def test_always_without_a_channel_makes_a_global_rule(runtime: Runtime) -> None:
    # The console's conversation key has no channel part.
    first = await runtime.loop.run_command("touch g.txt", conversation="console:alice")
    approval_id = first.pending_approval.approval_id  # type: ignore[union-attr]
    outcome = await runtime.approvals.decide(approval_id, "always", "console:alice")
    assert outcome.rule is not None and outcome.rule.scope is None
    assert (
        await runtime.loop.run_command("touch g.txt", conversation=f"{C2}|9.9")
    ).status == "completed"


def test_cli_preview_and_review(db_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = db_target
    assert main(["--db", db, "rules", "preview", "prefix", "git", "pull"]) == 0
    assert "would have allowed none of the last 0 commands" in capsys.readouterr().out
    assert main(["--db", db, "rules", "add", "exact", "uptime"]) == 0
    capsys.readouterr()
    assert main(["--db", db, "rules", "review"]) == 0
    assert capsys.readouterr().out.strip() == "Rules review: nothing to look at."
    assert main(["--db", db, "rules", "preview", "prefix", "bash", "-c"]) == 0
    assert capsys.readouterr().out.startswith("No preview: Invalid rule:")
