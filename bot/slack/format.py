"""Markdown → Slack mrkdwn, and cutting long text where Slack can show it.

The model and the service write ordinary Markdown; Slack's mrkdwn differs:
`*bold*` instead of `**bold**`, `_italic_`, `~strike~`, `<url|text>` links,
no headings. Code (fenced blocks and inline spans) is kept as code.

`&`, `<` and `>` are escaped everywhere, code included: Slack reads `<…>` as
control sequences (`<!channel>`, `<@U…>`, links) and its clients show the
entities as the plain characters, also inside code. Escaping in code too means
a command's output can never ping a channel.
"""

from __future__ import annotations

import re

# Slack's hard limit for `text` is 40,000 characters, but long messages are
# truncated or unreadable in clients; 3,000 is also a section block's limit.
MESSAGE_LIMIT = 3_000

_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[([^\]\n]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(?=\S)")
_QUOTE = re.compile(r"^\s{0,3}>\s?")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_BOLD_ITALIC = re.compile(r"\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_ITALIC = re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")


def escape(text: str) -> str:
    """Escape the three characters Slack treats as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def mention(user: str | None, platform_prefix: str = "slack:") -> str:
    """`slack:U024BE7LH` → `<@U024BE7LH>`; anything else is shown as text."""
    if not user:
        return "someone"
    if user.startswith(platform_prefix):
        return f"<@{user[len(platform_prefix) :]}>"
    return escape(user)


_QUALIFIED_USER = re.compile(r"(?<![\w`])slack:([UW][A-Z0-9]{2,})\b")


def to_mrkdwn(markdown: str) -> str:
    """Convert Markdown to Slack mrkdwn (see the module docstring).

    Platform-qualified Slack ids (`slack:U123`) outside code become mentions, so
    "Already decided by slack:U123" reads as "by @alice"; inside code they stay
    literal (that is where we show the id to put into DUCKLM_APPROVERS).
    """
    text = (markdown or "").replace("\r\n", "\n").replace("\ue000", "").replace("\ue001", "")
    out: list[str] = []
    fence: str | None = None
    block: list[str] = []
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                block = []
            else:
                out.append(_convert_line(line))
            continue
        if match and match.group(1) == fence and not line.strip()[3:].strip():
            out.append(_code_block(block))
            fence = None
        else:
            block.append(line)
    if fence is not None:  # an unclosed fence: show what there is as code
        out.append(_code_block(block))
    return "\n".join(out).strip("\n")


def _code_block(lines: list[str]) -> str:
    body = escape("\n".join(lines)).replace("```", "`\u200b``")
    return f"```\n{body}\n```" if body else "```\n \n```"


def _convert_line(line: str) -> str:
    stash: list[str] = []

    def keep(value: str) -> str:
        stash.append(value)
        return f"\ue000{len(stash) - 1}\ue001"

    # Code and links first, so nothing inside them is treated as emphasis.
    line = _INLINE_CODE.sub(lambda m: keep(f"`{escape(m.group(2))}`"), line)
    line = _LINK.sub(lambda m: keep(_link(m.group(2), m.group(1))), line)
    line = _AUTOLINK.sub(lambda m: keep(_link(m.group(1), "")), line)

    quote = ""
    if _QUOTE.match(line):
        quote, line = ">", _QUOTE.sub("", line, count=1)
        quote += " "
    if _RULE.match(line):
        return quote + "───────────"

    heading = _HEADING.match(line)
    if heading:
        line = heading.group(1).replace("**", "").replace("__", "")
    line = _BULLET.sub(lambda m: f"{m.group(1)}• ", line)
    line = escape(line)
    line = _QUALIFIED_USER.sub(lambda m: keep(f"<@{m.group(1)}>"), line)

    # Bold becomes a placeholder so the italic pass does not read its stars.
    line = _BOLD_ITALIC.sub(lambda m: keep(f"*_{m.group(1)}_*"), line)
    line = _BOLD.sub(lambda m: keep(f"*{_italic(m.group(1) or m.group(2))}*"), line)
    line = _italic(line)
    line = _STRIKE.sub(lambda m: f"~{m.group(1)}~", line)
    if heading and line.strip():
        line = f"*{line}*"
    line = quote + line

    # Placeholders may nest (a bold around a link), so restore until none is left.
    while _PLACEHOLDER.search(line):
        line = _PLACEHOLDER.sub(lambda m: stash[int(m.group(1))], line)
    return line


def _italic(text: str) -> str:
    return _ITALIC.sub(lambda m: f"_{m.group(1)}_", text)


def _link(url: str, label: str) -> str:
    url = url.replace("&", "&amp;").replace("<", "%3C").replace(">", "%3E").replace("|", "%7C")
    label = escape(label.replace("|", "¦")).strip()
    return f"<{url}|{label}>" if label else f"<{url}>"


def split_mrkdwn(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Cut mrkdwn into pieces of at most `limit` characters, at line breaks where
    possible; a code block cut in two is closed and reopened so both halves
    still show as code."""
    if limit < 20:
        raise ValueError("limit too small")
    pieces: list[str] = []
    in_code = False
    rest = text
    while rest:
        prefix = "```\n" if in_code else ""
        room = limit - len(prefix) - 4  # room for a closing "\n```"
        if len(prefix) + len(rest) <= limit:
            chunk, rest = rest, ""
        else:
            cut = rest.rfind("\n", 0, room)
            if cut < room // 2:  # no good line break: cut at a space, else hard
                cut = rest.rfind(" ", 0, room)
                if cut < room // 2:
                    cut = room
            # never cut inside an escape such as &amp;
            amp = rest.rfind("&", max(0, cut - 5), cut)
            if amp != -1 and ";" not in rest[amp:cut]:
                cut = amp
            chunk, rest = rest[:cut], rest[cut:].lstrip("\n")
        # to_mrkdwn writes every fence as a line of its own, so counting those
        # lines tells whether the chunk ends inside a code block.
        opened = in_code
        for line in chunk.split("\n"):
            if line.strip() == "```":
                opened = not opened
        piece = prefix + chunk
        if opened and rest:
            piece += "\n```"
        pieces.append(piece)
        in_code = opened
    return pieces or [""]


def clip_mrkdwn(text: str, limit: int, note: str) -> str:
    """The first piece of `text` that fits `limit` together with `note`."""
    if len(text) <= limit:
        return text
    head = split_mrkdwn(text, max(20, limit - len(note) - 2))[0]
    return f"{head}\n{note}"


def safe_cut(text: str, limit: int) -> int:
    """The largest index <= `limit` that does not cut an escape (`&amp;`) in two."""
    if limit >= len(text):
        return len(text)
    amp = text.rfind("&", max(0, limit - 4), limit)
    if amp != -1 and ";" not in text[amp:limit]:
        return amp
    return max(0, limit)


def clip_escaped(text: str, limit: int, marker: str = "…") -> str:
    """Shorten already-escaped mrkdwn to `limit` characters, never inside an
    escape: clipping happens after escaping, where the length Slack counts is."""
    if len(text) <= limit:
        return text
    return text[: safe_cut(text, max(0, limit - len(marker)))] + marker


def code_block(raw: str, limit: int) -> str:
    """`raw` as a fenced code block of at most `limit` characters: escaped first,
    then clipped, so the closing fence is always there."""
    body = escape(raw).replace("```", "`\u200b``")
    room = max(1, limit - len("```\n\n```"))
    return f"```\n{clip_escaped(body, room) or ' '}\n```"


def clip_plain(text: str, limit: int) -> str:
    """Shorten plain text (a modal title, a button) to Slack's field limit."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
