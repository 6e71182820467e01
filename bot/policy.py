"""Who may do what in chat: approvers, admins and the four-eyes rule.

Secure by default: with DUCKLM_APPROVERS unset nobody may approve in chat, and
with DUCKLM_ADMINS unset nobody may change rules in chat (the console and the
CLI still can; they are the operator).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from runtime.store.models import Approval
from runtime.tools.base import RISK_ORDER


@dataclass(frozen=True)
class Actor:
    """Who is asking, with what they may do. `id` is platform-qualified (`slack:U1`)."""

    id: str
    is_admin: bool = False
    is_approver: bool = False
    is_scheduler: bool = False

    @property
    def may_schedule(self) -> bool:
        return self.is_admin or self.is_scheduler


class AccessPolicy:
    def __init__(
        self,
        approvers: Iterable[str] = (),
        admins: Iterable[str] = (),
        four_eyes_risk: str = "high",
        schedulers: Iterable[str] = (),
    ) -> None:
        self.approvers = frozenset(approvers)
        self.admins = frozenset(admins)
        self.schedulers = frozenset(schedulers)
        self.four_eyes_risk = four_eyes_risk

    def actor(self, user: str) -> Actor:
        return Actor(
            user,
            is_admin=user in self.admins,
            is_approver=user in self.approvers,
            is_scheduler=user in self.schedulers,
        )

    def needs_second_person(self, risk_level: str | None) -> bool:
        if self.four_eyes_risk == "off":
            return False
        return RISK_ORDER.get(risk_level or "high", 2) >= RISK_ORDER[self.four_eyes_risk]

    def refuse_decision(self, user: str, approval: Approval, decision: str) -> str | None:
        """Why `user` may not take `decision` on `approval`, or None if they may."""
        if not self.approvers:
            return (
                "Nobody may approve actions in chat yet. An operator can allow you by "
                f"adding `{user}` to DUCKLM_APPROVERS."
            )
        if user not in self.approvers:
            return (
                f"You (`{user}`) are not an approver, so nothing changed. An operator can "
                "add you to DUCKLM_APPROVERS."
            )
        if decision == "always" and approval.risk_level == "critical":
            return "Critical actions can't be allowed forever; approve this once instead."
        if (
            decision in ("approve", "always")
            and user == approval.requested_by
            and self.needs_second_person(approval.risk_level)
        ):
            return (
                f"This is a {approval.risk_level}-risk action you asked for yourself; "
                "another approver has to approve it (four-eyes rule)."
            )
        return None

    def startup_warnings(self) -> list[str]:
        warnings = []
        if not self.approvers:
            warnings.append(
                "DUCKLM_APPROVERS is not set: nobody can approve actions in chat "
                "(set it to ids such as slack:U024BE7LH or matrix:@alice:example.org)."
            )
        if not self.admins:
            warnings.append("DUCKLM_ADMINS is not set: nobody can manage rules in chat.")
        return warnings
