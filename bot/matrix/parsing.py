"""Reading what people send in Matrix: message bodies, `!duck` commands,
reactions and invite allow-lists. Pure functions (no matrix-nio)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from bot.matrix.format import ALWAYS_KEY, APPROVE_KEY, DENY_KEY

PLATFORM = "matrix"
COMMAND_PREFIX = "!duck"

REACTION_DECISIONS: dict[str, str] = {
    APPROVE_KEY: "approve",
    "✔": "approve",
    "☑": "approve",
    "👍": "approve",
    DENY_KEY: "deny",
    "✖": "deny",
    "❎": "deny",
    "👎": "deny",
    ALWAYS_KEY: "always",
}
_VARIATION_SELECTORS = re.compile("[\ufe0e\ufe0f]")


def normalize_reaction(key: str) -> str:
    """`♾` and `♾️` (with U+FE0F) are the same answer; clients differ in which they send."""
    return _VARIATION_SELECTORS.sub("", key or "").strip()


_DECISIONS_BY_KEY = {normalize_reaction(k): v for k, v in REACTION_DECISIONS.items()}


def reaction_decision(key: str) -> str | None:
    """The decision a reaction key stands for (`approve`, `deny`, `always`), or None."""
    return _DECISIONS_BY_KEY.get(normalize_reaction(key))


def strip_reply_fallback(body: str) -> str:
    """Drop the `> <@user> quoted text` lines old clients put before a reply."""
    lines = body.split("\n")
    if not lines or not lines[0].startswith(">"):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    return "\n".join(lines[i:]).lstrip("\n")


def command_text(body: str) -> str | None:
    """The text after `!duck` (case-insensitive), or None when it is no command."""
    stripped = body.strip()
    head = stripped[: len(COMMAND_PREFIX)]
    if head.lower() != COMMAND_PREFIX:
        return None
    rest = stripped[len(COMMAND_PREFIX) :]
    if rest and not rest[0].isspace():
        return None  # `!ducks` is not our command
    return rest.strip()


def user_matches(user_id: str | None, allowed: Iterable[str]) -> bool:
    """Is `user_id` listed, by full id (`@alice:example.org`) or by server
    (`example.org` or `:example.org`)? An empty list allows everybody."""
    entries = [entry.strip() for entry in allowed if entry.strip()]
    if not entries:
        return True
    if not user_id:
        return False
    server = user_id.partition(":")[2].lower()
    for entry in entries:
        entry = entry.removeprefix(f"{PLATFORM}:")
        if entry.startswith("@"):
            if entry == user_id:
                return True
        elif entry.lstrip(":").lower() == server:
            return True
    return False
