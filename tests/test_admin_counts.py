"""Every "… and N more" is a count from the store, not the length of a cut list.

The listing of pending approvals shows MAX_LISTED lines; the store is asked for
at most that many rows, so the rest must be counted (it once said "and 80 more"
whatever the real number was, counting a list already limited to 100).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bot import commands as c
from bot.admin import MAX_LISTED, CommandRunner
from bot.policy import Actor
from runtime.approvals import SHELL_TOOL, ApprovalService
from runtime.store import Stores, open_stores
from tests.test_console import ducklm

pytestmark = pytest.mark.backends("sqlite", "postgres")

ADMIN = Actor("slack:U1", is_admin=True, is_approver=True)


async def add_pending(stores: Stores, n: int) -> list[str]:
    """`n` pending shell approvals, made the way the loop makes them."""
    service = ApprovalService.from_stores(stores)
    task = await stores.tasks.create_task("clean up", requested_by="slack:U1")
    ids = []
    for i in range(n):
        command = f"rm -rf build-{i}"
        approval = await service.create_pending(
            task.task_id,
            {"tool": SHELL_TOOL, "args": {"command": command}, "reason": "cleanup"},
            index=i + 1,
            risk_level="high",
        )
        ids.append(approval.approval_id)
    return ids


def listing(stores: Stores) -> CommandRunner:
    return CommandRunner(stores.tasks, stores.events, ApprovalService.from_stores(stores))


def more_line(text: str) -> str | None:
    found = [line for line in text.splitlines() if line.startswith("… and ")]
    assert len(found) <= 1, text
    return found[0] if found else None


async def test_duck_approvals_counts_every_pending_one(db_target: str) -> None:
    async with await open_stores(db_target) as stores:
        ids = await add_pending(stores, 250)
        runner = listing(stores)
        text = await runner.execute(c.parse_command("approvals"), ADMIN)
        shown = [i for i in ids if f"`{i}`" in text]
        assert shown == ids[:MAX_LISTED]  # oldest first, exactly MAX_LISTED of them
        assert more_line(text) == f"… and {250 - MAX_LISTED} more"

        # Deciding some changes the count by exactly that many.
        service = ApprovalService.from_stores(stores)
        for approval_id in ids[:7]:
            assert (await service.decide(approval_id, "deny", "slack:U1")).taken
        text = await runner.execute(c.parse_command("approvals"), ADMIN)
        assert more_line(text) == f"… and {250 - 7 - MAX_LISTED} more"
        assert f"`{ids[7]}`" in text and f"`{ids[6]}`" not in text


async def test_no_more_line_at_or_under_the_listed_count(db_target: str) -> None:
    async with await open_stores(db_target) as stores:
        runner = listing(stores)
        assert await runner.execute(c.parse_command("approvals"), ADMIN) == (
            "No approvals are pending."
        )
        await add_pending(stores, MAX_LISTED)
        text = await runner.execute(c.parse_command("approvals"), ADMIN)
        assert more_line(text) is None and text.count("\n") == MAX_LISTED
        await add_pending(stores, 1)
        text = await runner.execute(c.parse_command("approvals"), ADMIN)
        assert more_line(text) == "… and 1 more"


async def test_ducklm_approvals_counts_beyond_a_hundred(tmp_path: Path, db_target: str) -> None:
    """The CLI (another process, the same store) gives the same exact count."""
    async with await open_stores(db_target) as stores:
        await add_pending(stores, 1234)
    code, out, err = await ducklm(tmp_path, "approvals", DUCKLM_DB=db_target)
    assert code == 0, err
    assert more_line(out) == f"… and {1234 - MAX_LISTED} more", out
