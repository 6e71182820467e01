"""Builds a ready runtime (stores, approvals, model client, loop) from Settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from runtime.approvals import ApprovalService
from runtime.loop import RuntimeLoop
from runtime.model import ModelClient
from runtime.settings import Settings
from runtime.store import Stores, open_stores
from runtime.tools.gateway import ToolGateway
from runtime.tools.redaction import Redactor
from runtime.tools.shell.sandbox import SandboxConfig


@dataclass
class Runtime:
    settings: Settings
    stores: Stores
    approvals: ApprovalService
    model: ModelClient | None
    loop: RuntimeLoop

    @property
    def redactor(self) -> Redactor:
        """The process's one Redactor (shared by the loop and every gateway).
        A platform that learns a credential at run time, such as the access
        token a Matrix login returns, adds it: `runtime.redactor.add_literal(
        token, "matrix-access-token")`."""
        return self.loop.redactor

    async def close(self) -> None:
        if self.model is not None:
            await self.model.aclose()
        await self.stores.close()


async def build_runtime(settings: Settings) -> Runtime:
    stores = await open_stores(settings.db)
    try:
        approvals = ApprovalService.from_stores(stores, ttl=settings.approval_ttl)
        model = ModelClient.from_settings(settings) if settings.model_configured else None
        # Every credential field of Settings, matched literally in all output.
        redactor = Redactor.from_settings(settings)
        loop = RuntimeLoop(
            stores.tasks,
            stores.events,
            model,
            approval_service=approvals,
            max_tool_iterations=settings.max_tool_iterations,
            gateway_factory=partial(
                ToolGateway.default,
                shell_timeout=settings.shell_timeout,
                shell_max_output=settings.shell_max_output,
                redactor=redactor,
                sandbox=SandboxConfig.from_settings(settings),
            ),
            default_workspace=str(settings.workspace),
            redactor=redactor,
        )
    except BaseException:
        await stores.close()
        raise
    return Runtime(settings, stores, approvals, model, loop)
