"""Reading what people send in Matrix: message bodies, `!duck` commands,
reactions, mentions and bot markers. Pure functions (no matrix-nio)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from bot.matrix.format import ALWAYS_KEY, APPROVE_KEY, DENY_KEY

PLATFORM = "matrix"
COMMAND_PREFIX = "!duck"

# Only the three keys the card offers decide. 👍 is Element's first quick
# reaction and people use it for "seen"; ✔ ☑ 👎 ✖ ❎ look like answers but the
# card never offered them: an acknowledgement must never run a command.
REACTION_DECISIONS: dict[str, str] = {
    APPROVE_KEY: "approve",
    DENY_KEY: "deny",
    ALWAYS_KEY: "always",
}
_VARIATION_SELECTORS = re.compile("[\ufe0e\ufe0f]")


def normalize_reaction(key: str) -> str:
    """`✅` and `✅️` (with U+FE0F) are the same answer; clients differ in which they send."""
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


def user_in(user_id: str | None, entries: Iterable[str]) -> bool:
    """Is `user_id` listed, by full id (`@bot:example.org`, `matrix:@bot:…`) or by
    server (`example.org` or `:example.org`)? An empty list lists nobody."""
    if not user_id:
        return False
    server = user_id.partition(":")[2].lower()
    for entry in (e.strip() for e in entries):
        entry = entry.removeprefix(f"{PLATFORM}:")
        if not entry:
            continue
        if entry.startswith("@"):
            if entry == user_id:
                return True
        elif entry.lstrip(":").lower() == server:
            return True
    return False


_PILL = re.compile(r"""href=["']https://matrix\.to/#/((?:@|%40)[^"'/?]+)""", re.IGNORECASE)


def mentioned_users(content: dict[str, Any]) -> set[str]:
    """Whom a message mentions: `m.mentions.user_ids` when the sender's client
    sets it (intentional mentions, Matrix 1.7; Element always does), else the
    pills (matrix.to links) in its HTML."""
    mentions = content.get("m.mentions")
    if isinstance(mentions, dict):
        ids = mentions.get("user_ids") or []
        return {str(i) for i in ids if isinstance(i, str)} if isinstance(ids, list) else set()
    formatted = str(content.get("formatted_body") or "")
    return {unquote(match) for match in _PILL.findall(formatted)}


# MSC3955's mixin marks an event as sent by automation (the successor of m.notice).
_AUTOMATED_KEYS = ("m.automated", "org.matrix.msc3955.automated")


def is_automated(content: dict[str, Any]) -> bool:
    return any(content.get(key) is True for key in _AUTOMATED_KEYS)
