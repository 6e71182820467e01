"""The console's output (bot/console/output.py), rendered by the real rich into a buffer.

Whether a stream gets styling, what a styled answer looks like (ANSI styles, no
Markdown punctuation left), what the plain one is (the source, byte for byte),
and that control characters are shown in both modes.
"""

from __future__ import annotations

import io
import re

import pytest

from bot.console.output import Output, visible, wants_style

SGR = re.compile(r"\x1b\[([\d;]*)m")

ANSWER = """\
Disk **usage** is fine:
`/` at 40%
- `/home` at 70%
- *docs* are at [the wiki](https://wiki.example.org/disks)
- see <https://status.example.org>

Run `df -h <mount>` to check. Raw <b>HTML</b> stays text.

```sh
$ df -h
Filesystem  Size
```
(exit 0)"""


class Terminal(io.StringIO):
    """A buffer that says it is a terminal, as a pty does."""

    def isatty(self) -> bool:
        return True


def styles_before(out: str, text: str) -> set[str]:
    """The SGR parameters in force where `text` starts (the escapes right before it)."""
    index = out.index(text)
    params: set[str] = set()
    for match in SGR.finditer(out[:index]):
        codes = set(match.group(1).split(";"))
        params = set() if codes <= {"0", ""} else params | codes
    return params


def rendered(text: str) -> str:
    out = Terminal()
    output = Output(out, styled=True)
    output.markdown(text)
    return out.getvalue()


def test_style_needs_a_terminal_that_asks_for_colour() -> None:
    assert wants_style(Terminal(), {"TERM": "xterm-256color"})
    assert not wants_style(io.StringIO(), {"TERM": "xterm-256color"})  # a pipe or a file
    assert not wants_style(Terminal(), {"TERM": "xterm", "NO_COLOR": "1"})
    assert wants_style(Terminal(), {"TERM": "xterm", "NO_COLOR": ""})  # no-color.org: not empty
    assert not wants_style(Terminal(), {"TERM": "dumb"})
    closed = io.StringIO()
    closed.close()
    assert not wants_style(closed, {})  # isatty() raises on a closed stream


def test_a_styled_answer_is_rendered_markdown() -> None:
    out = rendered(ANSWER)
    plain = SGR.sub("", out)
    assert "```" not in plain and "**" not in plain and "`" not in plain
    assert "1" in styles_before(out, "usage")  # bold
    assert "3" in styles_before(out, "docs")  # italic
    assert "36" in styles_before(out, "/home")  # inline code: rich's cyan
    # the fence is a code block: its lines on a background, the info string gone
    assert any(code.startswith(("4", "10")) for code in styles_before(out, "Filesystem"))
    assert "Filesystem  Size" in plain and "sh\n" not in plain
    assert "•" in plain  # list bullets
    # links show where they go (no hidden terminal hyperlink), an autolink once
    assert "the wiki (https://wiki.example.org/disks)" in plain
    assert plain.count("https://status.example.org") == 1
    assert "\x1b]8;" not in out
    # as on Matrix: raw HTML is text, a single newline is a line break
    assert "df -h <mount>" in plain and "Raw <b>HTML</b> stays text." in plain
    assert re.search(r"Disk usage is fine: *\n/ at 40%", plain)


def test_a_plain_answer_is_the_source_as_written() -> None:
    out = io.StringIO()
    Output(out, environ={"TERM": "xterm-256color"}).markdown(ANSWER)
    assert out.getvalue() == ANSWER + "\n"
    out = Terminal()
    Output(out, environ={"TERM": "xterm-256color", "NO_COLOR": "1"}).markdown(ANSWER)
    assert out.getvalue() == ANSWER + "\n"


def test_console_replies_keep_their_lines_and_style_only_code() -> None:
    reply = "Rules:\n`r-1` exact `ls -l` — by console:me\n`r-2` prefix `git *.log` — by x"
    out = Terminal()
    Output(out, styled=True).inline(reply)
    plain = SGR.sub("", out.getvalue())
    assert plain.splitlines() == [
        "Rules:",
        "r-1 exact ls -l — by console:me",
        "r-2 prefix git *.log — by x",  # no emphasis made of the `*`
    ]
    assert "36" in styles_before(out.getvalue(), "git *.log")
    piped = io.StringIO()
    Output(piped, styled=False).inline(reply)
    assert piped.getvalue() == reply + "\n"


def test_cards_are_verbatim_even_on_a_terminal() -> None:
    card = "Approval needed (medium risk, write):\n  $ touch x\n  [a]pprove / [d]eny [reason]"
    out = Terminal()
    Output(out, styled=True).line(card)
    assert out.getvalue() == card + "\n"  # `[a]` is not rich markup, nothing is styled


@pytest.mark.parametrize("styled", [True, False])
def test_control_characters_are_shown_not_obeyed(styled: bool) -> None:
    hostile = (
        "ok\x1b]0;owned\x07 \x1b[2J\x1b]52;c;cGF5bG9hZA==\x07 \x9b31m "
        "rm -rf ~\rls\r\nnext \u202edesrever\u202c\x7f\x00"
    )
    for write in ("line", "inline", "markdown"):
        out = Terminal()
        getattr(Output(out, styled=styled), write)(hostile)
        text = SGR.sub("", out.getvalue())  # rich's own styling aside
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", text)
        assert "␛]0;owned␇" in text and "␛[2J" in text and "<U+009B>" in text
        assert "rm -rf ~␍ls" in text and "\nnext" in text  # CRLF is a newline
        assert "<U+202E>desrever<U+202C>" in text and "␡␀" in text


def test_visible_leaves_ordinary_text_alone() -> None:
    text = "tabs\tand\nnewlines, ünïcode ✅ and — dashes"
    assert visible(text) == text
