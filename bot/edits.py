"""Approve with an edit and quorum, in words (issue #20): the `edit <command>`
thread reply every surface accepts, and the sentences the thread shows.

Kept apart from bot/commands.py's decision grammar: an edit carries a whole
command, and a reply that is no edit must fall through to `approve`/`deny`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# `edit <command>`, `edit: <command>`, with the command in backticks or not.
_EDIT = re.compile(r"\s*edit\s*:?\s+(?P<command>.+?)\s*", re.IGNORECASE | re.DOTALL)


def parse_edit(text: str) -> str | None:
    """The new command of an `edit <command>` reply, or None if the text is no edit.
    One pair of surrounding backticks (how chat shows code) is taken off."""
    match = _EDIT.fullmatch(text or "")
    if match is None:
        return None
    command = match.group("command").strip()
    for fence in ("```", "`"):
        if len(command) > 2 * len(fence) and command.startswith(fence) and command.endswith(fence):
            command = command[len(fence) : -len(fence)].strip()
            break
    return command or None


def votes_text(voters: Sequence[str], needed: int, mention: Callable[[str], str]) -> str:
    """ "1 of 2: @alice" """
    names = ", ".join(mention(v) for v in voters) or "nobody yet"
    return f"{len(voters)} of {needed}: {names}"


def vote_counted_text(
    what: str, voters: Sequence[str], needed: int, mention: Callable[[str], str]
) -> str:
    more = needed - len(voters)
    return (
        f"Approved {votes_text(voters, needed, mention)} for `{what}`; it needs {more} more "
        f"approver{'s' if more != 1 else ''} before it runs (a deny by any approver denies)."
    )


def edited_text(
    editor: str,
    old: str,
    new: str,
    old_risk: str | None,
    new_risk: str,
    needed: int,
) -> str:
    risk = f"risk {new_risk}" + (f" (was {old_risk})" if old_risk and old_risk != new_risk else "")
    quorum = f"; it needs {needed} approvers" if needed > 1 else ""
    return f"{editor} edited the command: `{old}` → `{new}` ({risk}{quorum})."
