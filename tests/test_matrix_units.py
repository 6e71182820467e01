"""The Matrix bot's pure parts: formatting, parsing helpers and the state files.
(The behaviour against a real homeserver is in test_matrix.py.)"""

from __future__ import annotations

import json
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.backend import ApprovalCard, CardResolution
from bot.matrix.backlog import is_late
from bot.matrix.format import (
    ALWAYS_KEY,
    APPROVE_KEY,
    DENY_KEY,
    MAX_EVENT_CONTENT_BYTES,
    addressed_content,
    card_markdown,
    clip_text,
    fence,
    message_content,
    render_html,
    resolution_markdown,
)
from bot.matrix.parsing import (
    command_text,
    is_automated,
    mentioned_users,
    normalize_reaction,
    reaction_decision,
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


def test_room_markers_are_saved_with_the_token(tmp_path: Path) -> None:
    state = MatrixState(tmp_path)
    me = "@duck:hs"
    state.save_sync_token(me, "s1", {"!a:hs": "$one", "!b:hs": "$two"})
    assert state.load_sync_token(me) == "s1"
    assert state.load_last_handled(me) == {"!a:hs": "$one", "!b:hs": "$two"}
    assert state.load_last_handled("@other:hs") == {}
    state.sync_path.write_text('{"user_id": "@duck:hs", "next_batch": "s2", "rooms": [1]}')
    assert state.load_last_handled(me) == {} and state.load_sync_token(me) == "s2"


# -- clipping after escaping ------------------------------------------------------------


def test_clipping_closes_an_open_code_fence() -> None:
    text = "Here is the log:\n\n```\n" + "line <&> of the log\n" * 3000 + "```\n\nThe end."
    clipped = clip_text(text, 2000)
    assert len(clipped) <= 2000
    assert clipped.endswith("```\n\n[… message shortened]")
    assert clipped.count("```") % 2 == 0
    html = render_html(clipped)
    assert html.count("<pre>") == html.count("</pre>") == 1
    assert html.count("<code>") == html.count("</code>")


def test_clipping_keeps_a_long_fence_and_tildes() -> None:
    for opener in ("`````", "~~~"):
        clipped = clip_text(f"{opener}\n" + "x ``` y\n" * 1000, 500)
        assert clipped.endswith(f"\n{opener}\n\n[… message shortened]"), clipped[-60:]
    closed = "```\ncode\n```\n" + "words " * 1000
    assert "```\n\n[…" not in clip_text(closed, 300)  # nothing open: nothing added


@pytest.mark.parametrize(
    "text",
    [
        "<&>\"'" * 30_000,  # escaping makes the HTML five times the text
        "```\n" + "& " * 40_000,  # an open fence full of entities
        "🦆 " * 40_000,
        "`a&b` " * 20_000,
    ],
)
def test_every_body_fits_and_its_html_is_whole(text: str) -> None:
    content = message_content(text)
    assert len(json.dumps(content).encode()) <= MAX_EVENT_CONTENT_BYTES
    assert content["body"].endswith("[… message shortened]")
    assert content["body"].count("```") % 2 == 0
    html = content.get("formatted_body", "")
    assert re.search(r"&[a-z#0-9]*$", html.split("<")[-1]) is None  # no half entity
    for tag in ("pre", "code", "p"):
        assert html.count(f"<{tag}>") + html.count(f"<{tag} ") == html.count(f"</{tag}>"), tag


def test_a_huge_command_leaves_the_card_answerable_and_its_edit_fits() -> None:
    huge = card(command="echo '" + "a&b<c> " * 20_000 + "'")
    content = message_content(card_markdown(huge))
    assert "React" in content["body"] and "approve" in content["body"]
    assert "more characters not shown" in content["body"]
    assert len(json.dumps(content).encode()) <= MAX_EVENT_CONTENT_BYTES
    resolved = resolution_markdown(huge, CardResolution("approve", "matrix:@a:hs", None))
    half = message_content(resolved, max_bytes=MAX_EVENT_CONTENT_BYTES // 2 - 500)
    assert len(json.dumps(half).encode()) * 2 <= MAX_EVENT_CONTENT_BYTES
    assert "Approved" in half["body"]


def test_addressed_content_clips_the_html_too() -> None:
    content = addressed_content("@bob:hs", "<&>" * 50_000, "Bob")
    assert len(json.dumps(content).encode()) <= MAX_EVENT_CONTENT_BYTES
    assert content["body"].startswith("Bob: ")


# -- reactions, mentions, bots -----------------------------------------------------------


def test_only_the_offered_keys_decide() -> None:
    assert reaction_decision("\u2705\ufe0f") == reaction_decision("\u2705") == "approve"
    assert reaction_decision("\u274c\ufe0f") == reaction_decision("\u274c") == "deny"
    assert reaction_decision("\u267e\ufe0f") == reaction_decision("\u267e") == "always"
    for key in ("👍", "👍️", "✔", "✔️", "☑️", "👎", "✖️", "❎", "🎉", "approve", ""):
        assert reaction_decision(key) is None, key
    assert (APPROVE_KEY, DENY_KEY, ALWAYS_KEY) == ("\u2705\ufe0f", "\u274c\ufe0f", "\u267e\ufe0f")


def test_mentioned_users_prefers_intentional_mentions() -> None:
    pills = (
        '<a href="https://matrix.to/#/@bob:hs">Bob</a> and '
        '<a href="https://matrix.to/#/%40carol%3Ahs">C</a>'
    )
    assert mentioned_users({"formatted_body": pills}) == {"@bob:hs", "@carol:hs"}
    assert mentioned_users({"formatted_body": pills, "m.mentions": {}}) == set()
    assert mentioned_users({"m.mentions": {"user_ids": ["@bob:hs", 3]}}) == {"@bob:hs"}
    assert mentioned_users({"m.mentions": {"user_ids": "@bob:hs"}}) == set()
    assert mentioned_users({"body": "@bob:hs hi"}) == set()


def test_automated_marker() -> None:
    assert is_automated({"m.automated": True})
    assert not is_automated({"m.automated": "yes"})  # MSC3955: anything but true is false
    assert not is_automated({})


# -- catching up ----------------------------------------------------------------------------


def test_late_means_before_the_start_or_long_ago() -> None:
    started, now = 1_000_000, 2_000_000
    assert is_late({"origin_server_ts": started - 1}, started, now)
    assert not is_late({"origin_server_ts": now - 1000}, started, now)
    assert is_late({"origin_server_ts": now - 61_000}, 0, now)
    assert is_late({}, started, now)  # no timestamp: treated as old
