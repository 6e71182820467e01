"""Slack message -> what the person typed, decoded once, by purpose.

Slack hands over what people type in two encodings:

- `blocks`: `rich_text` blocks (what the composer built): text runs with styles,
  and typed elements for links (url + the text shown), users, user groups,
  broadcasts (@here), channels and emoji, inside sections, lists, quotes and
  preformatted blocks. When a message has them, they are the better source.
- `text`: mrkdwn with `&amp; &lt; &gt;` entities and control sequences
  (`<url|label>`, `<mailto:a@b|a@b>`, `<@U…>`, `<!here>`, `<!subteam^S…|@team>`,
  `<#C…|name>`). Slash commands carry only this (entity-encoded; the control
  sequences too when the command escapes channels, users and links).

Either way the result is the same text. The purpose decides what a link
becomes: a command (`run …`, `/duck …`) gets exactly what the person typed (the
label Slack auto-linked, `example.com`), a question for the model may also
carry the link target as context (`example.com (link: http://example.com)`).

`ascii_command` then undoes what autocorrect does to a command (typographic
quotes, dashes used as option dashes) and says what it changed, so the card or
the answer can tell the person.

Pure functions: no slack-bolt, no I/O. Payloads are untrusted: anything of an
unexpected type is skipped, never raised on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Purpose = Literal["command", "question"]

# Where the bot's own mention was: removed together with one following space.
_BOT = "\ue010"

# `<…>` control sequences and the three entities, in one pass, so `&amp;lt;`
# becomes `&lt;` (what was typed) and never `<`.
_MRKDWN_TOKEN = re.compile(r"<([^<>]*)>|&(amp|lt|gt);")
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">"}
_SUBTEAM = re.compile(r"<!subteam\^([A-Z0-9]+)\|([^<>]*)>")
_CHANNEL = re.compile(r"<#([A-Z0-9]+)\|([^<>]*)>")
_USER = re.compile(r"<@([A-Z0-9]+)\|([^<>]*)>")

_STYLE_MARKS = (("bold", "*"), ("italic", "_"), ("strike", "~"), ("code", "`"))


@dataclass(frozen=True)
class Decoded:
    """What the person typed, and who they addressed."""

    text: str
    mentions_bot: bool = False
    # Other users mentioned (ids, without the bot): a message in a bot thread that
    # addresses only them is not for the bot.
    mentions: tuple[str, ...] = ()
    # User groups and broadcasts addressed (`S0ONCALL1`, `here`, `channel`).
    groups: tuple[str, ...] = ()
    links: tuple[tuple[str, str], ...] = ()  # (what was shown, the target)

    @property
    def addresses_only_others(self) -> bool:
        """It addresses people (a person, a group, @here), but not the bot."""
        return bool(self.mentions or self.groups) and not self.mentions_bot


def decode_message(
    message: Mapping[str, Any],
    *,
    bot_user_id: str | None = None,
    purpose: Purpose = "question",
    names: Mapping[str, str] | None = None,
) -> Decoded:
    """A message event (or a message of conversations.replies) -> Decoded.

    `names` maps user ids to display names where the caller knows them; the
    labels Slack itself sends (`<@U1|bob>`, `<!subteam^S1|@team>`,
    `<#C1|ops>`) are used in any case.
    """
    text = message.get("text") if isinstance(message.get("text"), str) else ""
    known = dict(_labels_in(text))
    known.update(names or {})
    blocks = message.get("blocks")
    rich = (
        [b for b in blocks if isinstance(b, dict) and b.get("type") == "rich_text"]
        if isinstance(blocks, list)
        else []
    )
    if rich:
        out = _Writer(purpose, bot_user_id, known)
        for number, block in enumerate(rich):
            if number:
                out.newline()
            out.blocks(block.get("elements"))
        return out.result()
    return decode_mrkdwn(text, bot_user_id=bot_user_id, purpose=purpose, names=known)


def decode_mrkdwn(
    text: str,
    *,
    bot_user_id: str | None = None,
    purpose: Purpose = "question",
    names: Mapping[str, str] | None = None,
) -> Decoded:
    """Slack's `text` field (or a slash command's `text`) -> Decoded."""
    out = _Writer(purpose, bot_user_id, {**dict(_labels_in(text or "")), **(names or {})})
    position = 0
    for match in _MRKDWN_TOKEN.finditer(text or ""):
        out.text(text[position : match.start()])
        position = match.end()
        if match.group(2):
            out.text(_ENTITIES[match.group(2)])
        else:
            _control(out, match.group(1))
    out.text((text or "")[position:])
    return out.result()


def _control(out: _Writer, inner: str) -> None:
    """One `<…>` sequence of mrkdwn."""
    target, _, label = inner.partition("|")
    label = _unescape(label)
    if target.startswith("@"):
        out.user(target[1:], label or None)
    elif target.startswith("#"):
        out.channel(target[1:], label or None)
    elif target.startswith("!subteam^"):
        out.usergroup(target[len("!subteam^") :], label or None)
    elif target.startswith("!date^"):
        out.text(label or target)
    elif target.startswith("!"):
        out.broadcast(target[1:], label or None)
    else:
        out.link(_unescape(target), label or None)


def _unescape(text: str) -> str:
    return _MRKDWN_TOKEN.sub(
        lambda m: _ENTITIES[m.group(2)] if m.group(2) else m.group(0), text or ""
    )


def _labels_in(text: str) -> Iterable[tuple[str, str]]:
    """The names Slack put into `text` (`<@U1|bob>`, `<!subteam^S1|@team>`,
    `<#C1|ops>`): rich_text elements carry only ids, so these fill them in."""
    for pattern in (_USER, _SUBTEAM, _CHANNEL):
        for match in pattern.finditer(text or ""):
            if match.group(2):
                yield match.group(1), _unescape(match.group(2)).lstrip("@#")


@dataclass
class _Writer:
    """Collects the decoded text; the purpose decides how a link is written."""

    purpose: Purpose
    bot_user_id: str | None
    names: dict[str, str]
    parts: list[str] = field(default_factory=list)
    mentions_bot: bool = False
    mentions: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    _style: tuple[str, ...] = ()

    # -- inline elements -------------------------------------------------------

    def text(self, value: str) -> None:
        if value:
            self.parts.append(value)

    def newline(self) -> None:
        if self.parts and not self.parts[-1].endswith("\n"):
            self.parts.append("\n")

    def user(self, user_id: str, label: str | None = None) -> None:
        if self.bot_user_id and user_id == self.bot_user_id:
            self.mentions_bot = True
            self.parts.append(_BOT)
            return
        if user_id not in self.mentions:
            self.mentions.append(user_id)
        self.text("@" + (label or self.names.get(user_id) or user_id).lstrip("@"))

    def usergroup(self, group_id: str, label: str | None = None) -> None:
        self.groups.append(group_id)
        self.text("@" + (label or self.names.get(group_id) or group_id).lstrip("@"))

    def channel(self, channel_id: str, label: str | None = None) -> None:
        self.text("#" + (label or self.names.get(channel_id) or channel_id).lstrip("#"))

    def broadcast(self, what: str, label: str | None = None) -> None:
        self.groups.append(what)
        self.text("@" + (label or what).lstrip("@"))

    def link(self, url: str, label: str | None) -> None:
        shown = label or (url[len("mailto:") :] if url.startswith("mailto:") else url)
        self.links.append((shown, url))
        self.text(shown)
        # A question may tell the model where a link points; a command never
        # (the shell would read the note as arguments).
        if self.purpose == "question" and url not in (shown, "mailto:" + shown):
            self.text(f" (link: {url})")

    # -- rich_text -------------------------------------------------------------

    def blocks(self, elements: Any) -> None:
        """The elements of a rich_text block: sections, lists, quotes, code."""
        for element in elements if isinstance(elements, list) else []:
            if not isinstance(element, dict):
                continue
            kind = element.get("type")
            if kind == "rich_text_section":
                self.inline(element.get("elements"))
            elif kind == "rich_text_preformatted":
                self.newline()
                self.parts.append("```\n")
                self.inline(element.get("elements"), plain=True)
                self.newline()
                self.parts.append("```\n")
            elif kind == "rich_text_quote":
                self.newline()
                self.parts.append("> ")
                start = len(self.parts)
                self.inline(element.get("elements"))
                quoted = "".join(self.parts[start:]).rstrip("\n").replace("\n", "\n> ")
                del self.parts[start:]
                self.parts.append(quoted + "\n")
            elif kind == "rich_text_list":
                self.list(element)

    def list(self, element: dict[str, Any]) -> None:
        self.newline()
        indent = element.get("indent") if isinstance(element.get("indent"), int) else 0
        offset = element.get("offset") if isinstance(element.get("offset"), int) else 0
        ordered = element.get("style") == "ordered"
        items = element.get("elements") if isinstance(element.get("elements"), list) else []
        for number, item in enumerate(items, start=offset + 1):
            if not isinstance(item, dict):
                continue
            self.parts.append("  " * max(0, indent) + (f"{number}. " if ordered else "- "))
            self.inline(item.get("elements"))
            self.newline()

    def inline(self, elements: Any, *, plain: bool = False) -> None:
        for element in elements if isinstance(elements, list) else []:
            if isinstance(element, dict):
                if not plain:
                    self._restyle(element.get("style"))
                self.element(element)
        self._restyle(None)

    def element(self, element: dict[str, Any]) -> None:
        kind = element.get("type")
        value = _string(element, "text")
        if kind == "text":
            self.text(value)
        elif kind == "link":
            url = _string(element, "url")
            if url:
                self.link(url, value or None)
            else:
                self.text(value)
        elif kind == "user" and _string(element, "user_id"):
            self.user(_string(element, "user_id"))
        elif kind == "usergroup" and _string(element, "usergroup_id"):
            self.usergroup(_string(element, "usergroup_id"))
        elif kind == "channel" and _string(element, "channel_id"):
            self.channel(_string(element, "channel_id"))
        elif kind == "broadcast":
            self.broadcast(_string(element, "range") or "here")
        elif kind == "emoji":
            name = _string(element, "name")
            tone = element.get("skin_tone")
            if name:
                self.text(f":{name}:" + (f":skin-tone-{tone}:" if isinstance(tone, int) else ""))
        elif kind == "date":
            self.text(_string(element, "fallback") or _string(element, "timestamp", number=True))
        elif kind == "color":
            self.text(_string(element, "value"))
        elif kind == "team" and _string(element, "team_id"):
            self.text("@" + _string(element, "team_id"))

    def _restyle(self, style: Any) -> None:
        """Write the markers a person types for bold/italic/strike/code, so the
        text reads as the `text` field would (`*bold*`, `` `code` ``)."""
        wanted = tuple(
            mark for name, mark in _STYLE_MARKS if isinstance(style, dict) and style.get(name)
        )
        if wanted == self._style:
            return
        self.parts.append("".join(reversed(self._style)) + "".join(wanted))
        self._style = wanted

    def result(self) -> Decoded:
        text = "".join(self.parts).replace(_BOT + " ", "").replace(_BOT, "")
        return Decoded(
            text=text.strip(),
            mentions_bot=self.mentions_bot,
            mentions=tuple(self.mentions),
            groups=tuple(dict.fromkeys(self.groups)),
            links=tuple(self.links),
        )


def _string(element: dict[str, Any], key: str, *, number: bool = False) -> str:
    value = element.get(key)
    if number and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a date's timestamp
    return value if isinstance(value, str) else ""


# -- commands ------------------------------------------------------------------------

_QUOTES = {
    "\u201c": '"',  # “
    "\u201d": '"',  # ”
    "\u201e": '"',  # „
    "\u201f": '"',  # ‟
    "\u2018": "'",  # ‘
    "\u2019": "'",  # ’
    "\u201a": "'",  # ‚
    "\u201b": "'",  # ‛
}
# A dash where an option starts: at the start of a word, right before a letter
# or digit. Autocorrect turns `--` into `—` (or `–`); a lone `–x` was `-x`.
_OPTION_DASH = re.compile(r"(?<!\S)([\u2013\u2014])(?=\w)(\w\b)?")


def ascii_command(command: str) -> tuple[str, str | None]:
    """Undo autocorrect in a command: typographic quotes become `"`/`'`, and
    `—`/`–` where an option starts become `--` (or `-` before one letter, as in
    `–l`). Returns the command and a note for the person, or None if nothing
    changed. Dashes elsewhere (`a – b` as prose) stay."""
    changed: list[str] = []

    def dash(match: re.Match[str]) -> str:
        single = match.group(2)
        replacement = "-" if match.group(1) == "\u2013" and single else "--"
        changed.append(f"{match.group(1)} → {replacement}")
        return replacement + (single or "")

    converted = _OPTION_DASH.sub(dash, command)
    quotes = sorted({ch for ch in converted if ch in _QUOTES})
    for ch in quotes:
        converted = converted.replace(ch, _QUOTES[ch])
        changed.append(f"{ch} → {_QUOTES[ch]}")
    if not changed:
        return command, None
    seen = list(dict.fromkeys(changed))
    return converted, (
        "Typographic characters (autocorrect) in the command were changed to ASCII: "
        + ", ".join(seen)
        + "."
    )


_RUN = re.compile(r"^run\s", re.IGNORECASE)
_WRAPPED = re.compile(r"^(```|`)\s*(.*?)\s*\1$", re.DOTALL)


def is_run(text: str) -> bool:
    """`run <command>`: a direct command, taken exactly as typed."""
    return bool(_RUN.match(text.strip()))


def unwrap_code(command: str) -> str:
    """`` `df -h` `` or a fenced block around the whole command -> the command:
    people format a command as code; the backticks are not part of it."""
    match = _WRAPPED.match(command.strip())
    if match and "`" not in match.group(2):
        return match.group(2)
    return command
