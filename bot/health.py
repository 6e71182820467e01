"""/healthz, /readyz and /metrics for load balancers and Prometheus.

- `/healthz`: the process is alive (200 while its event loop answers).
- `/readyz`: 200 only when this replica should get traffic: the store answers
  a trivial query within READY_TIMEOUT, every configured platform started and
  says it is connected, start-up is over, and the replica is not shutting down
  (SIGTERM flips it to 503 before the platforms stop, so a load balancer drains
  it) nor behind on its heartbeat (other replicas would soon treat its tasks as
  a dead one's). Else 503; the JSON body names each failed check.
- `/metrics`: the runtime's registry in Prometheus text format.

They are mounted beside Slack's `/slack/events` in HTTP mode (same port) and,
with DUCKLM_METRICS_PORT, served on a port of their own (`serve`), for Socket
Mode, Matrix-only and `ducklm console`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from bot.backend import Platform, PlatformStartError
from runtime.store.stats import StatsStore

if TYPE_CHECKING:
    from runtime.factory import Runtime

logger = logging.getLogger("ducklm.health")

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
READY_TIMEOUT = 2.0  # seconds for the store's trivial query; probes time out at 1-5 s
SCRAPE_TIMEOUT = 5.0  # seconds for the store-backed gauges of one scrape
OK = "ok"


class ReplicaLike(Protocol):
    """What readiness reads of runtime/replica.py's Replica."""

    replica_id: str
    name: str
    last_beat: float | None
    timeout: float


class Health:
    """The three endpoints of one serving process. `stopping` is the process's
    stop event (set by SIGTERM): readiness fails from that moment on."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        stopping: asyncio.Event | None = None,
        replica: ReplicaLike | None = None,
    ) -> None:
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.stopping = stopping or asyncio.Event()
        self.replica = replica
        # Created now, at start: on SQLite it remembers which file was opened.
        self._stats = StatsStore(runtime.stores.db)
        self._expected: list[Platform] = []
        self._started: set[Platform] = set()
        self.starting = True  # until serve() says start-up (recovery included) is over
        if replica is not None and self.metrics is not None:
            self.metrics.set_replica(replica.replica_id, replica.name)

    def expect(self, platforms: list[Platform]) -> None:
        """The configured platforms: each must start and stay connected."""
        self._expected = list(platforms)

    def started(self, platform: Platform) -> None:
        self._started.add(platform)

    # -- the checks ----------------------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body): every check by name, "ok" or why not."""
        checks: dict[str, Any] = {"store": await self._store_check()}
        platforms: dict[str, str] = {}
        for platform in self._expected:
            platforms[platform.name] = await self._platform_check(platform)
        checks["platforms"] = platforms
        checks["replica"] = self._replica_check()
        failed = [name for name, value in checks.items() if value != OK and name != "platforms"]
        failed += [f"platform:{name}" for name, value in platforms.items() if value != OK]
        ready = not failed
        return ready, {"ready": ready, "failed": failed, "checks": checks}

    async def _store_check(self) -> str:
        try:
            await asyncio.wait_for(self._stats.ping(), READY_TIMEOUT)
        except TimeoutError:
            return f"the store did not answer within {READY_TIMEOUT:g} s"
        except Exception as exc:  # StoreError, OSError, a driver's error: all mean "not ready"
            return str(exc) or type(exc).__name__
        return OK

    async def _platform_check(self, platform: Platform) -> str:
        if platform not in self._started:
            return "not started"
        try:
            problem = await asyncio.wait_for(platform.connection_problem(), READY_TIMEOUT)
        except TimeoutError:
            return f"its connection check did not answer within {READY_TIMEOUT:g} s"
        except Exception as exc:  # a check that fails is a platform we cannot vouch for
            return f"its connection check failed: {str(exc) or type(exc).__name__}"
        return problem or OK

    def _replica_check(self) -> str:
        if self.stopping.is_set():
            return "shutting down"
        if self.starting:
            return "starting"
        replica = self.replica
        if replica is not None and replica.last_beat is not None:
            late = time.time() - replica.last_beat
            if late > replica.timeout:
                return (
                    f"last heartbeat {late:.0f} s ago (over DUCKLM_REPLICA_TIMEOUT, "
                    f"{replica.timeout:g} s): other replicas may take this one's tasks"
                )
        return OK

    # -- the endpoints -------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, body = await self.readiness()
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            return web.json_response({"error": "this process keeps no metrics"}, status=404)
        await self.metrics.refresh(within=SCRAPE_TIMEOUT)
        from runtime.metrics import CONTENT_TYPE  # loaded already: self.metrics exists

        response = web.Response(body=self.metrics.exposition())
        # aiohttp refuses a content_type with parameters; the header takes them.
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    def add_routes(self, app: web.Application) -> None:
        """Mount the three endpoints on an aiohttp application (Slack's HTTP mode)."""
        app.router.add_get(HEALTHZ, self.healthz)
        app.router.add_get(READYZ, self.readyz)
        app.router.add_get(METRICS, self.metrics_text)


class HealthServer:
    """The endpoints on a port of their own (DUCKLM_METRICS_PORT)."""

    def __init__(self, health: Health, host: str, port: int) -> None:
        self.health = health
        self.host = host
        self.port = port  # the bound port once started (0 asks for a free one)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        self.health.add_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PlatformStartError(
                f"Cannot listen on {self.host}:{self.port} for /healthz, /readyz and "
                f"/metrics ({exc}); set DUCKLM_METRICS_PORT to a free port."
            ) from exc
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def own_port(
    runtime: Runtime, *, replica: ReplicaLike | None = None
) -> AsyncIterator[Health]:
    """The endpoints on DUCKLM_METRICS_PORT for as long as the body runs (the
    console, which has no platform and no HTTP server of its own): ready once
    entered, unless the store fails."""
    settings = runtime.settings
    health = Health(runtime, replica=replica)
    port = settings.metrics_port
    server = HealthServer(health, settings.http_host, port) if port is not None else None
    if server is not None:
        await server.start()
        print(
            f"ducklm: /healthz, /readyz and /metrics on {settings.http_host}:{server.port}",
            file=sys.stderr,
        )
    health.starting = False
    try:
        yield health
    finally:
        health.stopping.set()
        if server is not None:
            await server.stop()
