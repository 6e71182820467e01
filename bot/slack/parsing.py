"""Reading what Slack sends: message text, card references, payload fields.

Pure functions (no slack-bolt), so they are cheap to import and to test.
Slack's payloads are untrusted input: every field is checked for its type.
"""

from __future__ import annotations

from typing import Any

PLATFORM = "slack"


def slack_user_id(qualified: str) -> str | None:
    """`slack:U1` -> `U1`; None for another platform's id."""
    return qualified[len(PLATFORM) + 1 :] if qualified.startswith(PLATFORM + ":") else None


def card_ref(channel: str, ts: str) -> str:
    """Where a card lives, stored with the approval: `C024BE91L:1700000000.000100`
    (Slack channel ids never contain a colon)."""
    return f"{channel}:{ts}"


def parse_card_ref(ref: str) -> tuple[str, str]:
    channel, sep, ts = ref.partition(":")
    if not (channel and sep and ts):
        raise ValueError(f"not a Slack card reference: {ref!r}")
    return channel, ts


def ts_key(ts: str) -> tuple[int, int]:
    # Slack ts strings are "seconds.micro"; compare them exactly, not as floats.
    seconds, _, micro = ts.partition(".")
    try:
        return int(seconds), int(micro or 0)
    except ValueError:
        return (0, 0)


def text_field(data: dict[str, Any], key: str) -> str | None:
    """A non-empty string field of a Slack payload, else None (payloads are untrusted)."""
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def clicker(body: dict[str, Any]) -> str | None:
    user = body.get("user")
    user_id = user.get("id") if isinstance(user, dict) else None
    return user_id if isinstance(user_id, str) and user_id else None


def malformed_actions(body: Any) -> bool:
    """A block_actions payload whose `actions` is not a non-empty list of objects."""
    if not isinstance(body, dict) or body.get("type") != "block_actions":
        return False
    actions = body.get("actions")
    return not (isinstance(actions, list) and actions and all(isinstance(a, dict) for a in actions))


def origin_team(body: dict[str, Any], event: dict[str, Any]) -> str | None:
    """The sender's team: `user_team` (Slack Connect: the external member's own
    workspace), else the event's `team`. An Enterprise Grid org id that is the
    installing org's stands for the installing team (as bolt reads it)."""
    team = event.get("user_team") or event.get("team")
    if not isinstance(team, str) or not team:
        return None
    if team.startswith("E") and team == body.get("enterprise_id"):
        installed = body.get("team_id")
        return installed if isinstance(installed, str) and installed else None
    return team
