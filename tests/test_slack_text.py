"""Slack text decoded to what the person typed (bot/slack/text.py), from
payloads shaped after Slack's recorded fixtures (tests/data/slack/), and
clipping after escaping on the Slack surfaces (bot/slack/blocks.py, format.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bot.slack.blocks import approval_blocks, deny_reason_modal
from bot.slack.format import clip_escaped, clip_mrkdwn, code_block, escape, to_mrkdwn
from bot.slack.text import (
    ascii_command,
    decode_message,
    decode_mrkdwn,
    is_run,
    unwrap_code,
)
from tests.test_slack_format import card

DATA = Path(__file__).parent / "data" / "slack"
BOT = "UBOTDUCK"


def payload(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def event(name: str) -> dict[str, Any]:
    return payload(name)["event"]


def without_blocks(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "blocks"}


# -- links, e-mail, people: rich_text and the text field agree ---------------------------


@pytest.mark.parametrize("source", [lambda m: m, without_blocks], ids=["rich_text", "text"])
def test_a_command_gets_the_link_label_as_typed(source: Any) -> None:
    message = source(event("app_mention_link.json"))
    command = decode_message(message, bot_user_id=BOT, purpose="command")
    assert command.text == "run curl -sI example.com"
    assert command.mentions_bot and command.mentions == ()
    assert command.links == (("example.com", "http://example.com"),)
    # A question may tell the model where the link points.
    question = decode_message(message, bot_user_id=BOT, purpose="question")
    assert question.text == "run curl -sI example.com (link: http://example.com)"


@pytest.mark.parametrize("source", [lambda m: m, without_blocks], ids=["rich_text", "text"])
def test_an_email_address_is_the_address(source: Any) -> None:
    message = source(event("app_mention_email.json"))
    for purpose in ("command", "question"):
        decoded = decode_message(message, bot_user_id=BOT, purpose=purpose)  # type: ignore[arg-type]
        assert decoded.text == "run echo ops@example.com"


@pytest.mark.parametrize("source", [lambda m: m, without_blocks], ids=["rich_text", "text"])
def test_people_and_broadcasts_read_as_at_names_not_redirections(source: Any) -> None:
    decoded = decode_message(
        source(event("app_mention_people.json")), bot_user_id=BOT, purpose="command"
    )
    assert decoded.text == "run echo @U0BOB0001 @here"
    assert "<" not in decoded.text and ">" not in decoded.text
    assert decoded.mentions == ("U0BOB0001",)
    named = decode_message(
        source(event("app_mention_people.json")),
        bot_user_id=BOT,
        purpose="command",
        names={"U0BOB0001": "bob"},
    )
    assert named.text == "run echo @bob @here"


def test_every_rich_text_element_reads_as_typed() -> None:
    message = payload("rich_text_everything.json")
    decoded = decode_message(message, bot_user_id=BOT)
    assert decoded.text == (
        "*why* is `df -h` slow on #web for @oncall and @bob? see the board "
        "(link: https://grafana.example.com/d/x?a=1&b=2) :fire:\n"
        "> it was fine yesterday\n"
        "- web-1\n- web-2\n"
        "```\nls -la && du -sh *\n```"
    )
    # The names come from the text field's labels; rich_text carries only ids.
    assert decoded.mentions == ("U0BOB0001",) and decoded.mentions_bot
    # The text field alone says the same, in Slack's own list and fence spelling.
    fallback = decode_message(without_blocks(message), bot_user_id=BOT).text
    assert fallback.startswith("*why* is `df -h` slow on #web for @oncall and @bob? see the board")
    assert fallback.endswith("```ls -la && du -sh *```")


def test_a_reply_that_addresses_another_person_only() -> None:
    decoded = decode_message(event("thread_reply_other_person.json"), bot_user_id=BOT)
    assert decoded.addresses_only_others
    assert decoded.text == "@U0BOB0001 can you check web-2 by hand?"
    assert not decode_message(
        event("app_mention_people.json"), bot_user_id=BOT
    ).addresses_only_others
    # A user group or @here is people too; words alone address nobody.
    assert decode_mrkdwn("<!subteam^S0ONCALL1|@oncall> please look").addresses_only_others
    assert decode_mrkdwn("<!here> deploying now").addresses_only_others
    assert not decode_mrkdwn("and web-2?").addresses_only_others


# -- the text field and slash commands ------------------------------------------------------


def test_entities_decode_once() -> None:
    # `&amp;lt;` is what Slack sends for a typed "&lt;": it must stay "&lt;".
    assert decode_mrkdwn("a &amp;lt; b &lt;c&gt; &amp;&amp;").text == "a &lt; b <c> &&"
    assert decode_mrkdwn('grep "a&gt;b" f &amp;&amp; echo ok', purpose="command").text == (
        'grep "a>b" f && echo ok'
    )


def test_control_sequences_of_the_formatting_reference() -> None:
    text = (
        "<!channel> <!everyone> <!here|here> <@W0ENTERP1|ann> <#C0OPS0001> "
        "<!date^1392734382^{date_short}|Feb 18, 2014> <https://x.io/?q=a&amp;r=b>"
    )
    assert decode_mrkdwn(text, purpose="command").text == (
        "@channel @everyone @here @ann #C0OPS0001 Feb 18, 2014 https://x.io/?q=a&r=b"
    )


def test_the_bot_mention_goes_with_one_space_wherever_it_is() -> None:
    assert decode_mrkdwn("<@UBOTDUCK> hi", bot_user_id=BOT).text == "hi"
    assert decode_mrkdwn("please <@UBOTDUCK> run ls  -l", bot_user_id=BOT).text == (
        "please run ls  -l"
    )
    assert decode_mrkdwn("<@UBOTDUCK>", bot_user_id=BOT).text == ""


def test_malformed_blocks_are_skipped_not_raised() -> None:
    message = {
        "text": "fallback &amp; more",
        "blocks": [
            {"type": "rich_text", "elements": [7, {"type": "rich_text_section", "elements": "x"}]},
            {"type": "rich_text", "elements": [{"type": "rich_text_list", "elements": [None]}]},
            {
                "type": "rich_text",
                "elements": [
                    {
                        "type": "rich_text_section",
                        "elements": [
                            {"type": "link"},
                            {"type": "user"},
                            {"type": "emoji", "name": 3},
                            None,
                            {"type": "text", "text": ["no"]},
                            {"type": "date", "timestamp": 1},
                        ],
                    }
                ],
            },
        ],
    }
    assert decode_message(message).text == "1"  # nothing usable, nothing raised
    assert decode_message({"blocks": "nope", "text": 5}).text == ""


# -- commands: autocorrect undone, and said so -----------------------------------------------


def test_typographic_quotes_and_option_dashes_become_ascii_with_a_note() -> None:
    command, note = ascii_command("touch \u201ca b\u201d \u2018c\u2019 && ls \u2014all \u2013l")
    assert command == "touch \"a b\" 'c' && ls --all -l"
    assert note is not None and "\u201c" in note and "\u2014 → --" in note
    # Dashes that are prose, not options, stay.
    assert ascii_command("echo a \u2013 b") == ("echo a \u2013 b", None)
    assert ascii_command("echo plain 'ascii' --all") == ("echo plain 'ascii' --all", None)


def test_run_and_code_around_the_whole_command() -> None:
    assert is_run("run df -h") and is_run("RUN  ls") and not is_run("running late")
    assert unwrap_code("`df -h`") == "df -h"
    assert unwrap_code("```\ndf -h\n```") == "df -h"
    assert unwrap_code("echo `date`") == "echo `date`"  # a substitution stays


# -- clipping after escaping ------------------------------------------------------------------

_BROKEN_ESCAPE = re.compile(r"&(?!amp;|lt;|gt;)")


def test_a_card_for_a_long_command_with_markup_keeps_its_fence() -> None:
    long = "printf '%s' " + "a&b<c>d " * 800  # ~6,400 characters, 5x longer escaped
    blocks = approval_blocks(card(command=long))
    sections = [b["text"]["text"] for b in blocks if b["type"] == "section"]
    command = next(s for s in sections if s.startswith("```"))
    assert command.endswith("\n```") and command.count("```") == 2
    assert len(command) <= 3000 and "…" in command
    assert not _BROKEN_ESCAPE.search(command)
    assert all(len(s) <= 3000 for s in sections)


def test_the_deny_modal_is_not_cut_inside_an_escape() -> None:
    for pad in range(6):  # every alignment of the cut against "&amp;"
        view = deny_reason_modal("ap-1", "x" * pad + "&" * 3000)
        text = view["blocks"][0]["text"]["text"]
        assert len(text) <= 3000 and text.endswith("\n```")
        assert not _BROKEN_ESCAPE.search(text), pad


def test_the_always_confirmation_is_not_cut_inside_an_escape() -> None:
    for pad in range(6):
        rule = "exactly `" + "y" * pad + "&" * 400 + "`"
        blocks = approval_blocks(card(always_rule=rule))
        actions = next(b for b in blocks if b["type"] == "actions")
        text = next(e for e in actions["elements"] if "confirm" in e)["confirm"]["text"]["text"]
        assert len(text) <= 300 and not _BROKEN_ESCAPE.search(text), pad


def test_clip_helpers() -> None:
    escaped = escape("&" * 100)
    for limit in range(5, 40):
        clipped = clip_escaped(escaped, limit)
        assert len(clipped) <= limit and not _BROKEN_ESCAPE.search(clipped)
    block = code_block("<" * 1000, 100)
    assert len(block) <= 100 and block.startswith("```\n") and block.endswith("\n```")
    fenced = to_mrkdwn("intro\n```\n" + "a & b\n" * 2000 + "```")
    clipped = clip_mrkdwn(fenced, 3000, "…")
    assert len(clipped) <= 3000 and clipped.count("```") % 2 == 0
    assert not _BROKEN_ESCAPE.search(clipped)
