"""`/duck rules` lists the first MAX_LISTED rules and an exact count of the rest
(10,000 rules were once one 804,000-character message); a runner made with
`rules_listed=None` (for a terminal) lists every rule."""

from __future__ import annotations

import pytest

from bot import commands as c
from bot.admin import MAX_LISTED, CommandRunner
from bot.policy import Actor
from runtime.approvals import SHELL_TOOL, ApprovalService
from runtime.store import Stores, open_stores

pytestmark = pytest.mark.backends("sqlite", "postgres")

ADMIN = Actor("slack:U1", is_admin=True, is_approver=True)


async def add_rules(stores: Stores, n: int) -> list[str]:
    service = ApprovalService.from_stores(stores)
    ids = []
    for i in range(n):
        rule = await service.add_rule(SHELL_TOOL, "exact", f"ls /srv/app-{i}", "slack:U1")
        ids.append(rule.rule_id)
    return ids


def more_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("… and ")]


async def test_duck_rules_shows_the_first_ones_and_counts_the_rest(db_target: str) -> None:
    async with await open_stores(db_target) as stores:
        runner = CommandRunner(stores.tasks, stores.events, ApprovalService.from_stores(stores))
        ids = await add_rules(stores, 130)
        text = await runner.execute(c.parse_command("rules"), ADMIN)
        assert [i for i in ids if f"`{i}`" in text] == ids[:MAX_LISTED]  # oldest first
        assert more_lines(text) == [f"… and {130 - MAX_LISTED} more"]
        assert len(text) < 200 * (MAX_LISTED + 2)

        # Revoked rules leave the active listing, and its count, at once; `rules all`
        # counts them too.
        service = ApprovalService.from_stores(stores)
        for rule_id in ids[:5]:
            assert await service.revoke_rule(rule_id, "slack:U1")
        text = await runner.execute(c.parse_command("rules"), ADMIN)
        assert more_lines(text) == [f"… and {125 - MAX_LISTED} more"]
        assert f"`{ids[5]}`" in text and f"`{ids[4]}`" not in text

        exactly = await runner.execute(c.parse_command("rules"), ADMIN)
        assert exactly.count("\n") == MAX_LISTED + 1  # the heading, the rules, the count


async def test_no_count_line_at_the_listed_number(db_target: str) -> None:
    async with await open_stores(db_target) as stores:
        runner = CommandRunner(stores.tasks, stores.events, ApprovalService.from_stores(stores))
        await add_rules(stores, MAX_LISTED)
        text = await runner.execute(c.parse_command("rules"), ADMIN)
        assert more_lines(text) == [] and text.count("\n") == MAX_LISTED
        await add_rules(stores, 1)
        text = await runner.execute(c.parse_command("rules"), ADMIN)
        assert more_lines(text) == ["… and 1 more"]


async def test_a_runner_for_a_terminal_lists_every_rule(db_target: str) -> None:
    async with await open_stores(db_target) as stores:
        service = ApprovalService.from_stores(stores)
        runner = CommandRunner(stores.tasks, stores.events, service, rules_listed=None)
        ids = await add_rules(stores, MAX_LISTED + 15)
        text = await runner.execute(c.parse_command("rules"), ADMIN)
        assert [i for i in ids if f"`{i}`" in text] == ids and more_lines(text) == []


async def test_chat_shows_a_rule_holding_a_secret_redacted(db_target: str) -> None:
    """An "Always" rule keeps the command as it runs, a token in it included; the
    chat listing (and the line confirming a new rule) shows it as chat shows every
    command: through the redactor. The terminal's runner shows it as stored."""
    from runtime.tools.redaction import Redactor

    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    command = f"curl -H 'Authorization: token {token}' https://api.github.com/user"
    redactor = Redactor()
    assert token not in redactor.redact(command).text  # the premise: chat would redact it
    async with await open_stores(db_target) as stores:
        approvals = ApprovalService.from_stores(stores)
        chat = CommandRunner(
            stores.tasks, stores.events, approvals, shown=lambda t: redactor.redact(t).text
        )
        added = await chat.execute(c.parse_command(f"rules add exact {command}"), ADMIN)
        listed = await chat.execute(c.parse_command("rules"), ADMIN)
        for text in (added, listed):
            assert "curl -H" in text and token not in text, text
        terminal = CommandRunner(stores.tasks, stores.events, approvals, rules_listed=None)
        assert token in await terminal.execute(c.parse_command("rules"), ADMIN)
