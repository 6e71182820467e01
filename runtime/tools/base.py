"""What every tool shares: its result type and the interface the gateway drives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

RiskLevel = Literal["low", "medium", "high", "critical"]
RISK_ORDER: dict[str, int] = {"low": 0, "medium": 1, "high": 2, "critical": 3}


class ToolResult(BaseModel):
    ok: bool
    output: str = ""
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Assessment(BaseModel):
    """A tool's judgement of one call before it runs."""

    action_type: str = "read"
    risk_level: RiskLevel = "low"
    requires_approval: bool = False
    blocked: bool = False
    reason: str = ""


class ToolArgumentError(ValueError):
    """The model (or a user) called a tool with arguments it cannot take."""


class Tool(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    # JSON schema of `args`, shown to the action model in its prompt.
    args_schema: ClassVar[dict[str, Any]]
    # True when a call only reads, inside this process (no child process, no
    # change anywhere): the loop then need not write its audit events first.
    in_process_read: ClassVar[bool] = False

    @abstractmethod
    def assess(self, args: dict[str, Any]) -> Assessment:
        """Judge a call without running it. Raises ToolArgumentError on bad args."""

    @abstractmethod
    async def run(self, args: dict[str, Any], assessment: Assessment) -> ToolResult:
        """Run a call the gateway has cleared. Never raises for tool-level failures."""
