"""The data model of a judgement: `Classification`, `Verdict` and how verdicts combine.

A `Verdict` judges one part of a command; the worst verdict (blocked beats
risk) decides the whole command and becomes its `Classification`, the
result callers see. Everything else in the package produces verdicts, so this
module depends on nothing but `runtime.tools.base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from runtime.tools.base import RISK_ORDER, Assessment, RiskLevel


class Classification(BaseModel):
    action_type: str
    risk_level: RiskLevel
    requires_approval: bool
    blocked: bool
    reason: str
    # argv of every simple command found (including inside `bash -c`, substitutions)
    commands: list[list[str]] = Field(default_factory=list)
    # One simple command with literal words only: runnable as argv without a shell.
    simple: bool = False
    # The sandbox profile (`profiles.PROGRAM_PROFILES`) a read-only run of this
    # command needs beyond the default sandbox (network for a cluster client…).
    sandbox_profile: str | None = None

    def assessment(self) -> Assessment:
        return Assessment(
            action_type=self.action_type,
            risk_level=self.risk_level,
            requires_approval=self.requires_approval,
            blocked=self.blocked,
            reason=self.reason,
        )


@dataclass(frozen=True)
class Verdict:
    """The judgement of one part of a command."""

    action: str
    risk: str
    reason: str
    blocked: bool = False

    @property
    def rank(self) -> tuple[int, int]:
        return (1 if self.blocked else 0, RISK_ORDER[self.risk])


def _read(reason: str) -> Verdict:
    return Verdict("read", "low", reason)


def _block(reason: str) -> Verdict:
    return Verdict("destructive", "critical", reason, blocked=True)


def worst(verdicts: Sequence[Verdict]) -> Verdict | None:
    """The verdict that decides a compound command: blocked beats risk; ties keep the first."""
    best: Verdict | None = None
    for v in verdicts:
        if best is None or v.rank > best.rank:
            best = v
    return best


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _worse(a: Verdict, b: Verdict | None) -> Verdict:
    if b is None:
        return a
    return b if b.rank > a.rank else a
