"""Block Kit for approvals: the card with its buttons, the card once decided,
and the "Deny with reason…" modal.

Buttons carry only the approval id (`value`); everything else is read from the
store when someone clicks, so buttons keep working across restarts. Limits
from Slack's Block Kit reference: section text ≤ 3000, button text ≤ 75,
value ≤ 2000, confirm dialog title ≤ 100 / text ≤ 300 / buttons ≤ 30,
block_id ≤ 255, modal title ≤ 24, private_metadata ≤ 3000.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bot.backend import ApprovalCard, CardResolution
from bot.slack.format import (
    clip_escaped,
    clip_mrkdwn,
    clip_plain,
    code_block,
    escape,
    mention,
    to_mrkdwn,
)

ACTION_APPROVE = "duck_approve"
ACTION_DENY = "duck_deny"
ACTION_ALWAYS = "duck_always"
ACTION_DENY_REASON = "duck_deny_reason"
# "Edit and approve…" (issue #20): opens a modal with the command prefilled.
ACTION_EDIT = "duck_edit"
# Button action_id → the decision it takes (the reason button opens a modal instead).
DECISIONS = {ACTION_APPROVE: "approve", ACTION_DENY: "deny", ACTION_ALWAYS: "always"}

DENY_REASON_VIEW = "duck_deny_reason_view"
REASON_BLOCK = "duck_reason"
REASON_INPUT = "duck_reason_input"
EDIT_VIEW = "duck_edit_view"
EDIT_BLOCK = "duck_edit"
EDIT_INPUT = "duck_edit_input"
# The longest command the modal takes (runtime/approvals.py refuses longer ones too).
EDIT_MAX_CHARS = 3000

SECTION_LIMIT = 3000
_COMMAND_LIMIT = 2500
_RISK_EMOJI = {"low": ":large_green_circle:", "medium": ":large_yellow_circle:"}


Block = dict[str, Any]


def _text(kind: str, text: str) -> dict[str, Any]:
    return {"type": kind, "text": text}


# Every text here is escaped mrkdwn before it is clipped: a cut counts what
# Slack counts, never splits an escape (`&amp;`) and keeps code fences closed.


def _section(markdown: str) -> Block:
    return {"type": "section", "text": _text("mrkdwn", clip_mrkdwn(markdown, SECTION_LIMIT, "…"))}


def _context(markdown: str) -> Block:
    return {
        "type": "context",
        "elements": [_text("mrkdwn", clip_mrkdwn(markdown, SECTION_LIMIT, "…"))],
    }


def slack_date(moment: datetime | None) -> str:
    """A date every reader sees in their own time zone (`<!date^…>`), with a
    UTC fallback for clients that cannot render it."""
    if moment is None:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    fallback = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(moment.timestamp())}^{{date_short_pretty}} at {{time}}|{fallback}>"


def _command_block(card: ApprovalCard) -> str:
    return code_block(card.command if card.command is not None else card.tool, _COMMAND_LIMIT)


def _details(card: ApprovalCard) -> list[Block]:
    risk = card.risk_level or "unknown"
    emoji = _RISK_EMOJI.get(risk, ":red_circle:" if risk == "critical" else ":warning:")
    lines = [
        f"*Why it needs approval:* {to_mrkdwn(card.reason)}",
    ]
    if card.model_reason:
        lines.append(f"*Why the agent wants it:* {to_mrkdwn(card.model_reason)}")
    lines.append(f"*Asked by:* {mention(card.requested_by)}")
    return [
        _section(
            f"{emoji} *Approval needed* — *{escape(risk)}* risk, "
            f"{escape(card.action_type)} (`{escape(card.tool)}`)"
        ),
        _section(_command_block(card)),
        _section("\n".join(lines)),
    ]


def approval_text(card: ApprovalCard) -> str:
    """The notification / fallback text of the card."""
    what = clip_plain(card.what, 200)
    return f"Approval needed ({card.risk_level} risk): {escape(what)}"


def card_block_id(approval_id: str) -> str:
    """The block_id of a card's buttons: finds the card in its thread again."""
    return f"duck_approval:{approval_id}"[:255]


def approval_blocks(card: ApprovalCard) -> list[Block]:
    approval_id = card.approval_id
    buttons: list[Block] = [
        {
            "type": "button",
            "action_id": ACTION_APPROVE,
            "text": _text("plain_text", "Approve"),
            "style": "primary",
            "value": approval_id,
        },
        {
            "type": "button",
            "action_id": ACTION_DENY,
            "text": _text("plain_text", "Deny"),
            "style": "danger",
            "value": approval_id,
        },
    ]
    if card.always_offered:
        rule = card.always_rule or f"always allow `{card.what}`"
        buttons.append(
            {
                "type": "button",
                "action_id": ACTION_ALWAYS,
                "text": _text("plain_text", "Always"),
                "value": approval_id,
                "confirm": {
                    "title": _text("plain_text", "Allow from now on?"),
                    "text": _text(
                        "mrkdwn",
                        clip_escaped(
                            f"This approves it now and creates a rule: {to_mrkdwn(rule)}. "
                            "Matching actions will then run without asking. Admins can "
                            "revoke it with `/duck rules revoke`.",
                            300,
                        ),
                    ),
                    "confirm": _text("plain_text", "Approve and allow"),
                    "deny": _text("plain_text", "Cancel"),
                },
            }
        )
    buttons.append(
        {
            "type": "button",
            "action_id": ACTION_DENY_REASON,
            "text": _text("plain_text", "Deny with reason…"),
            "value": approval_id,
        }
    )
    if card.tool == "shell_exec_safe" and card.command:
        buttons.append(
            {
                "type": "button",
                "action_id": ACTION_EDIT,
                "text": _text("plain_text", "Edit and approve…"),
                "value": approval_id,
            }
        )
    expiry = f"Expires {slack_date(card.expires_at)}. " if card.expires_at else ""
    # The quorum so far (issue #20): its slack:U… ids become mentions.
    votes = [_section(f":ballot_box_with_check: *Approved so far:* {to_mrkdwn(card.votes or '')}")]
    return [
        *_details(card),
        *(votes if card.votes else []),
        {"type": "actions", "block_id": card_block_id(approval_id), "elements": buttons},
        _context(
            f"{expiry}Or reply in this thread: `approve`, `deny <reason>`"
            + (", `always`" if card.always_offered else "")
            + (", `edit <command>`" if card.tool == "shell_exec_safe" and card.command else "")
            + f". Approval `{escape(approval_id)}`."
        ),
    ]


_OUTCOMES = {
    "approve": (":white_check_mark:", "Approved"),
    "always": (":white_check_mark:", "Approved and allowed from now on"),
    "deny": (":no_entry_sign:", "Denied"),
    "expired": (":hourglass:", "Expired"),
    # The card of a command replaced by an edit; the new card follows it.
    "edited": (":pencil2:", "Edited"),
}


def resolution_text(card: ApprovalCard, resolution: CardResolution) -> str:
    _, label = _OUTCOMES.get(resolution.decision, (":grey_question:", resolution.decision))
    return f"{label}: {escape(clip_plain(card.what, 200))}"


def resolved_blocks(card: ApprovalCard, resolution: CardResolution) -> list[Block]:
    """The card after the decision: same details, no buttons, the outcome."""
    emoji, label = _OUTCOMES.get(
        resolution.decision, (":grey_question:", escape(resolution.decision))
    )
    if resolution.decision == "expired":
        outcome = f"{emoji} *{label}* {slack_date(resolution.decided_at)} — nothing ran."
    else:
        outcome = (
            f"{emoji} *{label}* by {mention(resolution.decided_by)} "
            f"{slack_date(resolution.decided_at)}"
        )
    if resolution.decision == "always" and card.always_rule:
        outcome += f"\nRule: {to_mrkdwn(card.always_rule)}"
    if resolution.note:
        outcome += f"\n*Reason:* {to_mrkdwn(resolution.note)}"
    return [*_details(card), _section(outcome)]


def deny_reason_modal(approval_id: str, what: str) -> dict[str, Any]:
    """The modal the "Deny with reason…" button opens. `private_metadata` carries
    the approval id, so the submission needs nothing else."""
    return {
        "type": "modal",
        "callback_id": DENY_REASON_VIEW,
        "private_metadata": approval_id,
        "title": _text("plain_text", "Deny with reason"),
        "submit": _text("plain_text", "Deny"),
        "close": _text("plain_text", "Cancel"),
        "blocks": [
            _section("Deny running:\n" + code_block(what, _COMMAND_LIMIT)),
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "label": _text("plain_text", "Why? The agent is told, and may try another way."),
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_INPUT,
                    "multiline": True,
                    "max_length": 1000,
                },
            },
        ],
    }


def reason_from_view(view: dict[str, Any]) -> str | None:
    """The reason typed into the modal, if any."""
    values = (view.get("state") or {}).get("values") or {}
    entry = (values.get(REASON_BLOCK) or {}).get(REASON_INPUT) or {}
    value = entry.get("value")
    if not isinstance(value, str):
        return None
    return value.strip() or None


def edit_modal(approval_id: str, command: str) -> dict[str, Any]:
    """The modal "Edit and approve…" opens: the command prefilled (as chat shows
    it: a secret stays redacted), `private_metadata` the approval id."""
    return {
        "type": "modal",
        "callback_id": EDIT_VIEW,
        "private_metadata": approval_id,
        "title": _text("plain_text", "Edit and approve"),
        "submit": _text("plain_text", "Approve edited"),
        "close": _text("plain_text", "Cancel"),
        "blocks": [
            _section(
                "Proposed:\n" + code_block(command, _COMMAND_LIMIT) + "\nThe edited command "
                "is checked again: a blocked one is refused, a riskier one may need more "
                "approvers. The agent is told what you changed."
            ),
            {
                "type": "input",
                "block_id": EDIT_BLOCK,
                "label": _text("plain_text", "Command to run instead"),
                "element": {
                    "type": "plain_text_input",
                    "action_id": EDIT_INPUT,
                    "multiline": True,
                    "initial_value": command[:EDIT_MAX_CHARS],
                    "max_length": EDIT_MAX_CHARS,
                },
            },
        ],
    }


def command_from_view(view: dict[str, Any]) -> str | None:
    """The command typed into the edit modal, if any."""
    values = (view.get("state") or {}).get("values") or {}
    value = ((values.get(EDIT_BLOCK) or {}).get(EDIT_INPUT) or {}).get("value")
    if not isinstance(value, str):
        return None
    return value.strip() or None
