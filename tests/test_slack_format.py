"""Markdown → mrkdwn, cutting long text, Block Kit cards, and the app manifest."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import yaml

from bot.backend import ApprovalCard, CardResolution
from bot.slack.blocks import (
    ACTION_ALWAYS,
    ACTION_APPROVE,
    ACTION_DENY,
    ACTION_DENY_REASON,
    ACTION_EDIT,
    approval_blocks,
    deny_reason_modal,
    reason_from_view,
    resolved_blocks,
)
from bot.slack.format import MESSAGE_LIMIT, clip_mrkdwn, split_mrkdwn, to_mrkdwn

ROOT = Path(__file__).resolve().parent.parent
# Slack's published manifest schema, vendored unchanged (MIT licence) from
# slackapi/manifest-schema, schemas/manifest.schema.1.0.0.json at commit a936b12.
SCHEMA = ROOT / "tests" / "data" / "slack_manifest_schema.json"


# -- Markdown → mrkdwn -------------------------------------------------------------


def test_emphasis_links_and_headings() -> None:
    md = "# Disk report\n**web-1** is *almost* full, ~~fine~~ see [docs](https://x.io/a?b=1&c=2)"
    assert to_mrkdwn(md) == (
        "*Disk report*\n*web-1* is _almost_ full, ~fine~ see <https://x.io/a?b=1&amp;c=2|docs>"
    )


def test_bullets_quotes_rules_and_autolinks() -> None:
    md = "- one\n* two **bold**\n> quoted\n---\n<https://example.com>"
    assert to_mrkdwn(md) == "• one\n• two *bold*\n> quoted\n───────────\n<https://example.com>"


def test_escapes_markup_outside_and_inside_code() -> None:
    md = 'a < b && c > d `x<y` <!channel>\n```bash\ngrep "<!here>" f && echo **not bold**\n```'
    out = to_mrkdwn(md)
    assert out.splitlines()[0] == "a &lt; b &amp;&amp; c &gt; d `x&lt;y` &lt;!channel&gt;"
    # code keeps its text verbatim (no emphasis), loses the language tag
    assert out.endswith('```\ngrep "&lt;!here&gt;" f &amp;&amp; echo **not bold**\n```')
    assert "<!" not in out


def test_snake_case_and_arithmetic_stay_untouched() -> None:
    assert to_mrkdwn("use snake_case_name and 2*3*4") == "use snake_case_name and 2*3*4"
    assert to_mrkdwn("***both***") == "*_both_*"


def test_qualified_slack_ids_become_mentions_outside_code_only() -> None:
    text = "Already decided by slack:U024BE7LH. Add `slack:U0G9QF9C6` to DUCKLM_APPROVERS."
    assert to_mrkdwn(text) == (
        "Already decided by <@U024BE7LH>. Add `slack:U0G9QF9C6` to DUCKLM_APPROVERS."
    )


def test_unclosed_fence_is_still_code() -> None:
    assert to_mrkdwn("out:\n```\nline 1\nline 2") == "out:\n```\nline 1\nline 2\n```"


def test_split_keeps_code_blocks_balanced() -> None:
    text = to_mrkdwn("intro\n```\n" + "\n".join(f"line {i}" for i in range(400)) + "\n```\nend")
    pieces = split_mrkdwn(text, 500)
    assert len(pieces) > 5
    assert all(len(p) <= 500 for p in pieces)
    assert all(p.count("```") % 2 == 0 for p in pieces)
    assert pieces[0].startswith("intro") and pieces[-1].endswith("end")
    joined = "".join(pieces)
    assert all(f"line {i}\n" in joined for i in range(399))


def test_split_never_breaks_an_escape() -> None:
    text = "&amp;" * 200
    assert all(p.count("&") == p.count("&amp;") for p in split_mrkdwn(text, 103))


def test_clip_adds_the_note_within_the_limit() -> None:
    text = "\n".join("x" * 50 for _ in range(200))
    clipped = clip_mrkdwn(text, MESSAGE_LIMIT, "_(cut)_")
    assert len(clipped) <= MESSAGE_LIMIT and clipped.endswith("\n_(cut)_")
    assert clip_mrkdwn("short", MESSAGE_LIMIT, "_(cut)_") == "short"


# -- Block Kit ------------------------------------------------------------------------


def card(**overrides: object) -> ApprovalCard:
    values: dict[str, object] = {
        "approval_id": "ap-123",
        "task_id": "task-1",
        "tool": "shell_exec_safe",
        "command": "systemctl restart nginx && echo '<!channel>'",
        "risk_level": "high",
        "action_type": "service_control",
        "reason": "it restarts a service",
        "model_reason": "nginx is stuck",
        "requested_by": "slack:UASKER",
        "always_offered": True,
        "always_rule": "exactly `systemctl restart nginx`",
        "expires_at": datetime(2030, 1, 2, 3, 4, tzinfo=UTC),
    }
    values.update(overrides)
    return ApprovalCard(**values)  # type: ignore[arg-type]


def test_card_shows_everything_and_buttons_carry_only_the_id() -> None:
    blocks = approval_blocks(card())
    text = json.dumps(blocks)
    assert "```\\nsystemctl restart nginx &amp;&amp; echo '&lt;!channel&gt;'\\n```" in text
    assert "it restarts a service" in text and "nginx is stuck" in text
    assert "<@UASKER>" in text and "*high* risk" in text and "service_control" in text
    assert f"<!date^{int(datetime(2030, 1, 2, 3, 4, tzinfo=UTC).timestamp())}^" in text
    actions = next(b for b in blocks if b["type"] == "actions")
    buttons = {b["action_id"]: b for b in actions["elements"]}
    assert list(buttons) == [
        ACTION_APPROVE,
        ACTION_DENY,
        ACTION_ALWAYS,
        ACTION_DENY_REASON,
        ACTION_EDIT,
    ]
    assert {b["value"] for b in buttons.values()} == {"ap-123"}
    assert buttons[ACTION_APPROVE]["style"] == "primary"
    assert buttons[ACTION_DENY]["style"] == "danger"
    confirm = buttons[ACTION_ALWAYS]["confirm"]
    assert "exactly `systemctl restart nginx`" in confirm["text"]["text"]
    assert len(confirm["text"]["text"]) <= 300 and len(confirm["title"]["text"]) <= 100
    assert all(len(s["text"]["text"]) <= 3000 for s in blocks if s["type"] == "section")


def test_no_always_button_for_critical_actions() -> None:
    blocks = approval_blocks(card(risk_level="critical", always_offered=False))
    actions = next(b for b in blocks if b["type"] == "actions")
    assert ACTION_ALWAYS not in [b["action_id"] for b in actions["elements"]]
    assert "`always`" not in json.dumps(blocks)


def test_huge_command_fits_a_section() -> None:
    blocks = approval_blocks(card(command="echo " + "<" * 5000))
    assert all(len(b["text"]["text"]) <= 3000 for b in blocks if b["type"] == "section")


def test_resolved_card_has_no_buttons_and_says_who_and_when() -> None:
    moment = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    blocks = resolved_blocks(card(), CardResolution("deny", "slack:UBOSS", moment, "too risky"))
    text = json.dumps(blocks)
    assert all(b["type"] != "actions" for b in blocks)
    assert "Denied" in text and "<@UBOSS>" in text and "too risky" in text
    assert f"<!date^{int(moment.timestamp())}^" in text
    always = json.dumps(resolved_blocks(card(), CardResolution("always", "slack:U1", moment)))
    assert "allowed from now on" in always and "exactly `systemctl restart nginx`" in always


def test_deny_modal_round_trip() -> None:
    view = deny_reason_modal("ap-123", "touch x")
    assert view["private_metadata"] == "ap-123" and len(view["title"]["text"]) <= 24
    submitted = {
        **view,
        "state": {"values": {"duck_reason": {"duck_reason_input": {"value": " wrong host "}}}},
    }
    assert reason_from_view(submitted) == "wrong host"
    assert reason_from_view({"state": {"values": {}}}) is None


# -- the app manifest --------------------------------------------------------------------


def manifest() -> dict:
    return yaml.safe_load((ROOT / "manifest.yml").read_text())


def test_manifest_is_valid_against_slacks_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(manifest())]
    assert errors == []


def test_schema_rejects_a_broken_manifest() -> None:
    # The vendored schema really checks something (it is not an empty object).
    schema = json.loads(SCHEMA.read_text())
    broken = manifest()
    broken["features"]["slash_commands"][0]["command"] = "duck"  # no leading slash
    broken["settings"]["surprise"] = True
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) >= 2


def test_manifest_declares_what_the_code_uses() -> None:
    from bot.slack.platform import COMMAND

    data = manifest()
    settings = data["settings"]
    assert settings["socket_mode_enabled"] is True
    assert settings["interactivity"]["is_enabled"] is True
    assert [c["command"] for c in data["features"]["slash_commands"]] == [COMMAND]
    assert data["features"]["bot_user"]["display_name"]
    assert set(settings["event_subscriptions"]["bot_events"]) == {
        "app_mention",
        "message.channels",
        "message.groups",
        "message.im",
    }
    assert set(data["oauth_config"]["scopes"]["bot"]) == {
        "app_mentions:read",
        "channels:history",
        "groups:history",
        "im:history",
        "chat:write",
        "commands",
        "reactions:write",
        "files:write",
    }


def test_incoming_slack_text_reads_as_typed() -> None:
    from bot.slack.text import decode_mrkdwn

    text = (
        "<@UBOT> check <https://grafana/d?a=1&amp;b=2|the board> and <https://x.io> "
        "in <#C123|ops> cc <@U456> <!here> <!subteam^S1|@oncall> a &lt; b &amp;&amp; c"
    )
    assert decode_mrkdwn(text, bot_user_id="UBOT").text == (
        "check the board (link: https://grafana/d?a=1&b=2) and https://x.io in #ops cc @U456 "
        "@here @oncall a < b && c"
    )
