"""How the console draws an approval card: plain text, keys in brackets."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.loop import PendingApproval


def render_card(pending: PendingApproval, *, quorum: int = 1) -> str:
    """The console's approval card. `quorum` is how many people the action's risk
    needs: above 1 there is no Always (one person's rule would bypass it)."""
    what = pending.command or pending.tool
    lines = [
        f"Approval needed ({pending.risk_level or '?'} risk, {pending.action_type or '?'}):",
        # `$` only before a shell command (an MCP call reads `mcp server/tool {args}`).
        f"  $ {what}" if pending.command and pending.tool == "shell_exec_safe" else f"  {what}",
    ]
    if pending.reason:
        lines.append(f"  why it needs approval: {pending.reason}")
    if pending.model_reason:
        lines.append(f"  why the agent wants it: {pending.model_reason}")
    always = " / a[l]ways" if pending.risk_level != "critical" and quorum <= 1 else ""
    lines.append(f"  [a]pprove / [d]eny [reason]{always}   (approval {pending.approval_id})")
    return "\n".join(lines)
