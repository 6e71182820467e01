"""The Matrix bot's pure parts: formatting, parsing helpers and the state files.
(The behaviour against a real homeserver is in test_matrix.py.)"""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.backend import ApprovalCard, CardResolution
from bot.matrix.format import (
    MAX_EVENT_CONTENT_BYTES,
    addressed_content,
    card_markdown,
    fence,
    message_content,
    render_html,
    resolution_markdown,
)
from bot.matrix.parsing import (
    command_text,
    normalize_reaction,
    strip_reply_fallback,
    user_in,
)
from bot.matrix.state import MatrixState, Session


def card(**changes: object) -> ApprovalCard:
    values: dict[str, object] = {
        "approval_id": "ap_1",
        "task_id": "t_1",
        "tool": "shell_exec_safe",
        "command": "systemctl restart nginx",
        "risk_level": "high",
        "action_type": "service_control",
        "reason": "it restarts a service",
        "model_reason": "nginx is stuck",
        "requested_by": "matrix:@bob:example.org",
        "always_offered": True,
        "always_rule": "exactly `systemctl restart nginx`",
        "expires_at": datetime(2030, 1, 2, 3, 4, tzinfo=UTC),
    }
    values.update(changes)
    return ApprovalCard(**values)  # type: ignore[arg-type]


# -- formatting -----------------------------------------------------------------


def test_html_escapes_raw_html_and_drops_unsafe_links() -> None:
    html = render_html(
        "**ok** <img src=x onerror=alert(1)> [bad](javascript:alert(1)) "
        "[good](https://example.org) ![pic](https://tracker.example/p.png)"
    )
    assert "<strong>ok</strong>" in html
    assert "<img" not in html and "&lt;img" in html
    assert 'href="javascript' not in html
    assert '<a href="https://example.org">good</a>' in html


def test_message_content_has_plain_and_html_bodies() -> None:
    content = message_content("line one\nline `two`")
    assert content["msgtype"] == "m.notice"
    assert content["body"] == "line one\nline `two`"
    assert content["format"] == "org.matrix.custom.html"
    assert "<br />" in content["formatted_body"] and "<code>two</code>" in content["formatted_body"]


def test_huge_messages_are_clipped_to_fit_an_event() -> None:
    for text in ("<&>" * 100_000, "🦆" * 100_000):
        content = message_content(text)
        assert len(json.dumps(content).encode()) <= MAX_EVENT_CONTENT_BYTES
        assert content["body"].endswith("[… message shortened]")


def test_fence_survives_backticks_in_commands() -> None:
    block = fence("echo ```; echo `date`")
    assert block.startswith("````\n") and block.endswith("\n````")
    assert "echo ```; echo `date`" in render_html(block)


def test_card_says_what_why_who_until_when_and_how_to_answer() -> None:
    text = card_markdown(card())
    for part in (
        "systemctl restart nginx",
        "high risk",
        "service_control",
        "it restarts a service",
        "nginx is stuck",
        "matrix:@bob:example.org",
        "2030-01-02 03:04 UTC",
        "✅",
        "❌",
        "♾️",
        "`always`",
        "ap_1",
    ):
        assert part in text, part
    critical = card_markdown(card(risk_level="critical", always_offered=False))
    assert "♾️" not in critical and "`always`" not in critical


def test_resolution_shows_decision_who_and_when() -> None:
    decided = datetime(2030, 1, 2, 3, 5, tzinfo=UTC)
    text = resolution_markdown(
        card(), CardResolution("deny", "matrix:@alice:example.org", decided, "not now")
    )
    assert "Denied" in text and "matrix:@alice:example.org" in text
    assert "2030-01-02 03:05 UTC" in text and "not now" in text
    assert "✅" not in text  # the answers are gone once decided


def test_addressed_content_mentions_the_person() -> None:
    content = addressed_content("@bob:example.org", "You are not an approver.", "Bob")
    assert content["body"] == "Bob: You are not an approver."
    assert content["m.mentions"] == {"user_ids": ["@bob:example.org"]}
    assert content["formatted_body"].startswith(
        '<a href="https://matrix.to/#/@bob:example.org">Bob</a>: '
    )


# -- parsing helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!duck rules", "rules"),
        ("  !DUCK   rules add exact uptime ", "rules add exact uptime"),
        ("!duck", ""),
        ("!ducks rules", None),
        ("duck rules", None),
    ],
)
def test_command_text(body: str, expected: str | None) -> None:
    assert command_text(body) == expected


def test_reply_fallback_is_stripped() -> None:
    assert strip_reply_fallback("> <@a:x> old\n> more\n\napprove") == "approve"
    assert strip_reply_fallback("approve") == "approve"


def test_reaction_keys_with_and_without_variation_selector() -> None:
    assert normalize_reaction("♾️") == normalize_reaction("♾") == "♾"
    assert normalize_reaction("✅") == "✅"


@pytest.mark.parametrize(
    ("user", "allowed", "expected"),
    [
        ("@alice:example.org", [], False),
        ("@alice:example.org", ["@alice:example.org"], True),
        ("@alice:example.org", ["matrix:@alice:example.org"], True),
        ("@mallory:example.org", ["@alice:example.org"], False),
        ("@bob:example.org", ["example.org"], True),
        ("@bob:example.org", [":example.org"], True),
        ("@bob:evil.example", ["example.org"], False),
        (None, ["example.org"], False),
    ],
)
def test_bot_users_by_id_or_server(user: str | None, allowed: list[str], expected: bool) -> None:
    """DUCKLM_MATRIX_BOT_USERS: an empty list names no bot."""
    assert user_in(user, allowed) is expected


# -- state files -----------------------------------------------------------------------


def test_state_files_are_private_and_belong_to_one_account(tmp_path: Path) -> None:
    state = MatrixState(tmp_path / "ducklm-matrix")
    hs, me = "https://matrix.example.org", "@duck:example.org"
    state.save_session(Session(hs, me, "DEVICE", "syt_secret"))
    state.save_sync_token(me, "s72594_4483_1934")

    assert stat.S_IMODE(state.directory.stat().st_mode) == 0o700
    for path in (state.session_path, state.sync_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state.load_session(hs + "/", me) == Session(hs + "/", me, "DEVICE", "syt_secret")
    assert state.load_session(hs, "@other:example.org") is None
    assert state.load_session("https://elsewhere.example", me) is None
    assert state.load_sync_token(me) == "s72594_4483_1934"
    assert state.load_sync_token("@other:example.org") is None
    assert [p.name for p in state.directory.iterdir()] == sorted(["session.json", "sync.json"])

    state.forget_access_token(hs, me)
    session = state.load_session(hs, me)
    assert session is not None and session.device_id == "DEVICE" and session.access_token is None


def test_damaged_state_files_mean_a_fresh_start(tmp_path: Path) -> None:
    state = MatrixState(tmp_path)
    state.session_path.write_text("{not json")
    state.sync_path.write_text("[]")
    assert state.load_session("https://hs", "@duck:hs") is None
    assert state.load_sync_token("@duck:hs") is None
