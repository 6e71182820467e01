"""`ducklm run`: serve every configured chat platform from one process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys

from bot.backend import Platform, PlatformStartError
from bot.health import Health, HealthServer
from bot.scheduler import Scheduler
from bot.service import ChatService
from runtime.factory import build_runtime
from runtime.settings import Settings

logger = logging.getLogger("ducklm.server")


def configured_platforms(service: ChatService, settings: Settings) -> list[Platform]:
    platforms: list[Platform] = []
    if settings.slack_configured:
        from bot.slack.platform import SlackPlatform

        platforms.append(SlackPlatform(service, settings))
    if settings.matrix_configured:
        from bot.matrix.platform import MatrixPlatform

        platforms.append(MatrixPlatform(service, settings))
    return platforms


def print_access(service: ChatService) -> None:
    """Who may ask, approve and administer, in one block at every start, so an
    operator sees an open configuration (DUCKLM_REQUESTERS=*) at a glance."""
    policy = service.policy
    for line in policy.startup_block():
        print(f"ducklm: {line}", file=sys.stderr)
    for warning in policy.startup_warnings():
        logger.warning(warning)
        print(f"warning: {warning}", file=sys.stderr)


async def recover_every(service: ChatService, interval: float, stop: asyncio.Event) -> None:
    """Recovery's periodic round until `stop`: a card whose post failed while the
    platform was down, a message whose job ended unfinished (bot/recovery.py)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
            return
        try:
            await service.recover_periodically()
        except Exception:  # the next round tries again
            logger.exception("periodic recovery failed")


def health_servers(
    platforms: list[Platform], health: Health, settings: Settings
) -> HealthServer | None:
    """Mount /healthz, /readyz and /metrics on every platform's HTTP server (Slack's
    HTTP mode) and return the server of their own DUCKLM_METRICS_PORT asks for
    (None when unset, or when it is the very port they are mounted on)."""
    mounted_on: set[int] = set()
    for platform in platforms:
        routes = getattr(platform, "http_routes", None)
        if routes is not None and getattr(platform, "mode", None) == "http":
            routes.append(health.add_routes)
            mounted_on.add(settings.http_port)
    port = settings.metrics_port
    if port is None or (port in mounted_on and port != 0):
        return None
    return HealthServer(health, settings.http_host, port)


async def drain(settings: Settings) -> None:
    """After SIGTERM: /readyz already answers 503 (the stop event is set); keep serving
    DUCKLM_SHUTDOWN_DRAIN seconds, so a load balancer stops routing here before
    the platforms go. A second signal does not cut it short: the orchestrator's
    own grace period (Kubernetes: SIGKILL after terminationGracePeriodSeconds)
    bounds it."""
    seconds = settings.shutdown_drain
    if seconds > 0:
        print(f"ducklm: draining for {seconds:g} s (/readyz answers 503)", file=sys.stderr)
        await asyncio.sleep(seconds)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    """Run until SIGINT/SIGTERM (or `stop` is set). Returns the process exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    runtime = await build_runtime(settings)
    service = ChatService(runtime, max_concurrent_tasks=settings.max_concurrent_tasks)
    for line in runtime.startup_notices():  # one line per MCP server
        print(line, file=sys.stderr)
    if runtime.model is None:
        print(
            "warning: no model is configured (DUCKLM_MODEL_BASE_URL); only direct "
            "commands (`/duck run …`) will work.",
            file=sys.stderr,
        )
    platforms = configured_platforms(service, settings)
    # Readiness fails from the moment `stop` is set (SIGTERM), before anything stops.
    health = Health(runtime, stopping=stop, replica=service.replica)
    health.expect(platforms)
    own_server = health_servers(platforms, health, settings)
    scheduler = Scheduler(
        service,
        remind_after=settings.approval_remind,
        timezone=settings.timezone,
        retention_days=settings.retention_days,
    )
    service.runner.schedule_listeners.append(scheduler.schedule_changed)
    started: list[Platform] = []
    recovering: asyncio.Task[None] | None = None
    try:
        if own_server is not None:  # first: /healthz answers while the rest starts
            await own_server.start()
            print(
                f"ducklm: /healthz, /readyz and /metrics on {settings.http_host}:{own_server.port}",
                file=sys.stderr,
            )
        # A registered, heartbeating replica before any message can arrive: the
        # tasks it creates from the first one on are its own (recovery elsewhere
        # leaves them alone while it lives).
        await service.start()
        for platform in platforms:
            await platform.start()
            started.append(platform)
            health.started(platform)
            print(f"ducklm: serving {platform.name}", file=sys.stderr)
            if health.add_routes in getattr(platform, "http_routes", ()):
                port = getattr(platform, "http_port", None)
                print(f"ducklm: /healthz, /readyz and /metrics on port {port}", file=sys.stderr)
        # After the platforms connected: they told the policy their home (the
        # Slack team, the Matrix server), which the default requesters name.
        print_access(service)
        # Only the serving process recovers: a CLI beside it must not touch its tasks.
        await service.recover()
        recovering = asyncio.create_task(recover_every(service, settings.recovery_interval, stop))
        await scheduler.start()
        for line in scheduler.describe() or ["no timed jobs"]:
            print(f"ducklm: schedule: {line}", file=sys.stderr)
        # Everything built so far lives as long as the process: move it out of
        # the collector's way, so full collections stay short (they showed up
        # as 40-55 ms pauses in the Slack ack latency benchmark).
        gc.collect()
        gc.freeze()
        health.starting = False  # ready (if the store and the platforms are)
        await stop.wait()
        await drain(settings)
        return 0
    except PlatformStartError as exc:
        print(f"ducklm: {exc}", file=sys.stderr)
        return 1
    finally:
        if recovering is not None:
            recovering.cancel()
            await asyncio.gather(recovering, return_exceptions=True)
        await scheduler.stop()
        for platform in reversed(started):
            with contextlib.suppress(Exception):
                await platform.stop()
        await service.close()
        await runtime.close()
        if own_server is not None:  # last: /readyz says 503 until the very end
            await own_server.stop()
