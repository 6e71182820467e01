"""Turning the bot's Markdown-ish text into Matrix message content.

Every message carries a plain `body` (the Markdown source, which reads fine as
text) and an HTML `formatted_body`. The HTML comes from markdown-it with raw
HTML switched off, so model output can never inject markup: `<b>` in an answer
arrives as the text `<b>`. Images are off (Matrix clients only load `mxc://`
media, and a remote image would leak the reader's address), and links are kept
only for http(s) and mailto.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from markdown_it import MarkdownIt

from bot.admin import when
from bot.backend import ApprovalCard, CardResolution

HTML_FORMAT = "org.matrix.custom.html"
NOTICE = "m.notice"

# A Matrix event may be at most 65536 bytes of JSON; leave room for the envelope,
# the relations and the HTML copy of the text.
MAX_BODY_CHARS = 24_000
MAX_EVENT_CONTENT_BYTES = 60_000

# The seeded reaction keys, spelt exactly as Element's emoji picker sends them
# (emojibase-data 17 `compact.json`, read through matrix-org/emojibase-bindings:
# every emoji that can take a variation selector carries U+FE0F). Element
# groups reactions by the exact key, so a picked ✅ joins the bot's pill only
# when the bytes match; incoming keys are compared without the selector.
APPROVE_KEY = "\u2705\ufe0f"  # ✅ check mark button
DENY_KEY = "\u274c\ufe0f"  # ❌ cross mark
ALWAYS_KEY = "\u267e\ufe0f"  # ♾️ infinity

_SAFE_LINK = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False})
    md.enable(["table", "strikethrough"])
    md.disable("image")
    md.validateLink = lambda url: bool(_SAFE_LINK.match(url.strip()))  # type: ignore[method-assign]
    return md


_MD = _markdown()


SHORTENED = "\n\n[… message shortened]"
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
MIN_CLIP_CHARS = 200


def clip_text(text: str, limit: int = MAX_BODY_CHARS) -> str:
    """`text` cut to at most `limit` characters of Markdown, never leaving a code
    fence open (it is closed before the "shortened" note), so the cut text still
    reads, and renders, as what it was."""
    if len(text) <= limit:
        return text
    cut = text[: max(0, limit - len(SHORTENED) - 8)].rstrip()
    fence = _open_fence(cut)
    if fence is not None:
        # Room for the closing fence was kept above unless the fence is long.
        cut = cut[: max(0, limit - len(SHORTENED) - len(fence) - 1)].rstrip()
        fence = _open_fence(cut)
    closing = f"\n{fence}" if fence is not None else ""
    return cut + closing + SHORTENED


def _open_fence(markdown: str) -> str | None:
    """The fence (```` ``` ```` or `~~~`) still open at the end of `markdown`, if any."""
    opened: str | None = None
    for line in markdown.split("\n"):
        match = _FENCE.match(line)
        if match is None:
            continue
        run = match.group(1)
        if opened is None:
            opened = run
        elif run[0] == opened[0] and len(run) >= len(opened) and not line.strip()[len(run) :]:
            opened = None  # a closing fence: same character, at least as long, nothing after
    return opened


def render_html(markdown: str) -> str:
    """Safe HTML for `markdown` (raw HTML escaped, unsafe links left as text)."""
    return _MD.render(markdown).strip()


def message_content(
    text: str, *, msgtype: str = NOTICE, max_bytes: int = MAX_EVENT_CONTENT_BYTES
) -> dict[str, Any]:
    """`m.room.message` content with a plain body and an HTML formatted_body,
    within `max_bytes` of JSON. The Markdown is clipped first and the HTML
    rendered from the clipped text, so the HTML is never cut inside an entity
    or a tag and no <pre>/<code> (nor ``` in the body) is left open."""
    source = text or "(empty)"
    limit = MAX_BODY_CHARS
    while True:
        body = clip_text(source, limit)
        content: dict[str, Any] = {
            "msgtype": msgtype,
            "body": body,
            "format": HTML_FORMAT,
            "formatted_body": render_html(body),
        }
        size = _size(content)
        if size <= max_bytes:
            return content
        if limit <= MIN_CLIP_CHARS:
            break
        # Escaping and markup grow the text unevenly: shrink in proportion, and
        # by at least a tenth so this ends quickly.
        limit = max(MIN_CLIP_CHARS, min(int(limit * max_bytes / size * 0.95), limit * 9 // 10))
    # Even a short text is too big as HTML (e.g. thousands of escaped characters
    # in a few hundred): keep the plain body alone.
    content = {"msgtype": msgtype, "body": clip_text(source, limit)}
    while _size(content) > max_bytes and limit > 20:
        limit //= 2
        content["body"] = clip_text(source, limit)
    return content


def _size(content: dict[str, Any]) -> int:
    return len(json.dumps(content).encode())


def mention_html(user_id: str, name: str | None = None) -> str:
    """A pill: clients render a link to matrix.to/#/<user> as the person's chip."""
    label = html.escape(name or user_id)
    return f'<a href="https://matrix.to/#/{html.escape(user_id, quote=True)}">{label}</a>'


def addressed_content(user_id: str, text: str, name: str | None = None) -> dict[str, Any]:
    """A notice addressed to one person: `alice: text`, with a pill and m.mentions
    (the text clipped like any message, then the name put in front)."""
    content = message_content(text, max_bytes=MAX_EVENT_CONTENT_BYTES - 1000)
    content["body"] = f"{name or user_id}: {content['body']}"
    if "formatted_body" in content:
        content["formatted_body"] = f"{mention_html(user_id, name)}: {content['formatted_body']}"
    content["m.mentions"] = {"user_ids": [user_id]}
    return content


def with_mentions(
    content: dict[str, Any], label: str, users: dict[str, str | None]
) -> dict[str, Any]:
    """Add a line `label: <pills>` that notifies `users` (user id -> display name)."""
    if not users:
        content["m.mentions"] = {}
        return content
    content["body"] += f"\n\n{label}: " + ", ".join(users)
    if "formatted_body" in content:
        pills = ", ".join(mention_html(user, name) for user, name in users.items())
        content["formatted_body"] += f"\n<p>{html.escape(label)}: {pills}</p>"
    content["m.mentions"] = {"user_ids": list(users)}
    return content


def fence(code: str) -> str:
    """A fenced code block that survives backticks inside `code`."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}\n{code}\n{ticks}"


def inline_code(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


MAX_SHOWN_COMMAND = 4000  # characters of a command a card shows, so its answers always fit


def shown_command(command: str) -> str:
    """The command for a card's code block: whole, or its start and how much is missing."""
    if len(command) <= MAX_SHOWN_COMMAND:
        return command
    rest = len(command) - MAX_SHOWN_COMMAND
    return f"{command[:MAX_SHOWN_COMMAND]}\n… ({rest} more characters not shown)"


def card_markdown(card: ApprovalCard) -> str:
    """The approval card: what would run, why, risk, who asked, until when, how to answer."""
    lines = [
        f"**Approval needed** — {card.risk_level} risk, {card.action_type} ({card.tool})",
        fence(shown_command(card.what)),
        f"**Why it needs approval:** {card.reason}",
    ]
    if card.model_reason:
        lines.append(f"**Why the agent wants it:** {card.model_reason}")
    asked = card.requested_by or "?"
    lines.append(f"**Asked by:** {asked} · **expires:** {when(card.expires_at)}")
    if card.votes:
        # The quorum so far (issue #20): the card stays open until it is met.
        lines.append(f"**Approved so far:** {card.votes}")
    answers = [f"{APPROVE_KEY} approve", f"{DENY_KEY} deny"]
    replies = ["`approve`", "`deny <reason>`"]
    if card.tool == "shell_exec_safe" and card.command:
        # Approve with a changed command (issue #20), as the Slack card offers.
        replies.append("`edit <command>`")
    if card.always_offered:
        rule = f" ({card.always_rule})" if card.always_rule else ""
        answers.append(f"{ALWAYS_KEY} always allow{rule}")
        replies.append("`always`")
    lines.append(
        f"React {' · '.join(answers)} — or reply {_either(replies)} in this thread. "
        f"Approval {inline_code(card.approval_id)}."
    )
    return "\n\n".join(lines)


def _either(options: list[str]) -> str:
    """ "`a`, `b` or `c`" """
    return ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]


_OUTCOMES = {
    "approve": f"{APPROVE_KEY} **Approved**",
    "deny": f"{DENY_KEY} **Denied**",
    "always": f"{ALWAYS_KEY} **Always allowed**",
    "expired": "⌛ **Expired** — nobody answered in time; nothing ran",
    # Replaced by an approver's edit (issue #20); the new card follows in the thread.
    "edited": "✏️ **Edited**",
}


def resolution_markdown(card: ApprovalCard, resolution: CardResolution) -> str:
    """The card after the decision: the action, then who decided what and when."""
    outcome = _OUTCOMES.get(resolution.decision, f"**{resolution.decision}**")
    line = outcome
    if resolution.decided_by and resolution.decision != "expired":
        line += f" by {resolution.decided_by}"
    if resolution.decided_at is not None:
        line += f" at {when(resolution.decided_at)}"
    parts = [
        f"**Approval** — {card.risk_level} risk, {card.action_type} ({card.tool})",
        fence(shown_command(card.what)),
        line + ".",
    ]
    if resolution.decision == "always" and card.always_rule:
        parts.append(f"Rule: {card.always_rule}.")
    if resolution.note:
        parts.append(f"Note: {resolution.note}")
    parts.append(f"Approval {inline_code(card.approval_id)}.")
    return "\n\n".join(parts)
