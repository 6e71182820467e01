"""Builds a ready runtime (stores, approvals, model client, loop) from Settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from runtime.approvals import ApprovalService
from runtime.loop import RuntimeLoop
from runtime.model import ModelClient
from runtime.settings import Settings
from runtime.store import Stores, open_stores
from runtime.tools.gateway import ToolGateway
from runtime.tools.redaction import Redactor
from runtime.tools.shell.sandbox import SandboxConfig

if TYPE_CHECKING:
    from runtime.metrics import Metrics
    from runtime.tools.mcp.toolbox import McpToolbox


@dataclass
class Runtime:
    settings: Settings
    stores: Stores
    approvals: ApprovalService
    model: ModelClient | None
    loop: RuntimeLoop
    # MCP servers started from DUCKLM_MCP_CONFIG (None when unset or not wanted).
    mcp: McpToolbox | None = None
    # Prometheus metrics (runtime/metrics.py), kept by the serving commands only.
    metrics: Metrics | None = None

    def startup_notices(self) -> list[str]:
        """Lines to print at start (one per MCP server, or the config error)."""
        return self.mcp.report() if self.mcp is not None else []

    @property
    def redactor(self) -> Redactor:
        """The process's one Redactor (shared by the loop and every gateway).
        A platform that learns a credential at run time, such as the access
        token a Matrix login returns, adds it: `runtime.redactor.add_literal(
        token, "matrix-access-token")`."""
        return self.loop.redactor

    async def close(self) -> None:
        if self.mcp is not None:
            await self.mcp.close()
        if self.model is not None:
            await self.model.aclose()
        await self.stores.close()


async def _start_mcp(settings: Settings) -> McpToolbox:
    # Imported here: without DUCKLM_MCP_CONFIG nothing of MCP (or its SDK) loads.
    from runtime.tools.mcp.toolbox import McpToolbox

    assert settings.mcp_config is not None
    return await McpToolbox.start(settings.mcp_config, max_output=settings.shell_max_output)


async def build_runtime(
    settings: Settings, *, mcp: bool = True, metrics: bool | None = None
) -> Runtime:
    """A ready runtime. `mcp=False` skips starting MCP servers (for commands that
    only read the store, such as `ducklm tasks`); `metrics` (default: as `mcp`,
    the serving commands) keeps Prometheus metrics, whose import costs those
    quick commands tens of milliseconds."""
    stores = await open_stores(settings.db, pool_size=settings.db_pool_size)
    toolbox: McpToolbox | None = None
    try:
        if mcp and settings.mcp_config is not None:
            toolbox = await _start_mcp(settings)
        kept = _metrics(stores) if (mcp if metrics is None else metrics) else None
        approvals = ApprovalService.from_stores(
            stores, ttl=settings.approval_ttl, rule_max_age=settings.rule_max_age
        )
        approvals.metrics = kept
        model = (
            ModelClient.from_settings(settings, metrics=kept) if settings.model_configured else None
        )
        # Every credential field of Settings, matched literally in all output.
        redactor = Redactor.from_settings(settings)
        for value in toolbox.secret_values() if toolbox else []:
            redactor.add_literal(value, "mcp-config-credential")
        # The same one (a Matrix login's token is added to it later): an edited
        # command is recorded redacted like every other event.
        approvals.redactor = redactor
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
                extra_tools=tuple(toolbox.tools) if toolbox else (),
                metrics=kept,
            ),
            default_workspace=str(settings.workspace),
            redactor=redactor,
        )
    except BaseException:
        if toolbox is not None:
            await toolbox.close()
        await stores.close()
        raise
    return Runtime(settings, stores, approvals, model, loop, mcp=toolbox, metrics=kept)


def _metrics(stores: Stores) -> Metrics:
    from runtime.metrics import Metrics  # here: see build_runtime

    metrics = Metrics()
    metrics.watch_store(stores.db)
    return metrics
