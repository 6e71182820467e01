"""This process as one replica among several on a shared database (issue #19).

A replica has an id unique to the process (DUCKLM_REPLICA_NAME or the host
name, the pid and a random suffix: a restarted process on the same host is a
new replica, so its predecessor's tasks are recognisably a dead one's). It is
registered when the process starts serving, heartbeats every
DUCKLM_HEARTBEAT_INTERVAL seconds, and is marked stopped on a clean exit, so
survivors act at once instead of waiting DUCKLM_REPLICA_TIMEOUT.

The heartbeat is what makes this process's running tasks its own: a replica
whose heartbeat is older than the timeout is dead, and recovery elsewhere
reports its running tasks interrupted. So a heartbeat that comes late (the
process was paused, the database unreachable) is logged loudly: other replicas
may have taken its work meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from runtime.store import StoreError
from runtime.store.replicas import ReplicaRow, ReplicaStore

if TYPE_CHECKING:
    from runtime.factory import Runtime
    from runtime.settings import Settings

logger = logging.getLogger("ducklm.replica")
# About when this process started (this module loads at start-up): a replica row
# with this process's pid that started before it is a predecessor's.
PROCESS_STARTED = time.time()

BeatListener = Callable[[], Awaitable[object]]


def replica_name(configured: str | None) -> str:
    """DUCKLM_REPLICA_NAME, else the host name."""
    return (configured or "").strip() or socket.gethostname() or "ducklm"


def pid_running(pid: int) -> bool:
    """Whether a process `pid` runs on this host (a zombie, killed and not yet
    reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            # "pid (comm) state ...": the state follows the last ")".
            return handle.read().rpartition(")")[2].split()[:1] != ["Z"]
    except OSError:
        return True  # no /proc (not Linux): kill(0) said it exists


def new_replica_id(name: str) -> str:
    """`<name>:<pid>:<random>`, unique per process."""
    return f"{name}:{os.getpid()}:{secrets.token_hex(4)}"


class Replica:
    """This process's row in `replicas` and its heartbeat loop."""

    def __init__(
        self,
        store: ReplicaStore,
        *,
        name: str | None = None,
        heartbeat_interval: float = 5.0,
        timeout: float = 20.0,
    ) -> None:
        self.store = store
        self.name = replica_name(name)
        self.host = socket.gethostname() or "unknown"
        self.replica_id = new_replica_id(self.name)
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.started_at = time.time()
        self.last_beat: float | None = None  # time of the last heartbeat written
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[BeatListener] = []
        self._late_listeners: list[BeatListener] = []
        self.stopped = False

    @classmethod
    def from_settings(cls, store: ReplicaStore, settings: Settings) -> Replica:
        return cls(
            store,
            name=settings.replica_name,
            heartbeat_interval=settings.heartbeat_interval,
            timeout=settings.replica_timeout,
        )

    @property
    def started(self) -> bool:
        return self._task is not None

    def on_beat(self, listener: BeatListener) -> None:
        """Run `listener` after every heartbeat (a failing one is logged)."""
        self._listeners.append(listener)

    def on_late(self, listener: BeatListener) -> None:
        """Run `listener` after a heartbeat that came later than the timeout (other
        replicas may have taken this one's work meanwhile: the runtime stops the
        tasks it no longer owns)."""
        self._late_listeners.append(listener)

    async def start(self) -> None:
        """Register and start heartbeating (idempotent)."""
        if self._task is not None:
            return
        self.started_at = time.time()
        await self.store.register(self.replica_id, self.name, self.host, os.getpid())
        self.last_beat = time.time()
        await self.reap_local()
        self._task = asyncio.get_running_loop().create_task(
            self._beat_forever(), name=f"heartbeat:{self.replica_id}"
        )
        logger.info(
            "replica %s registered (heartbeat every %gs)", self.replica_id, self.heartbeat_interval
        )

    async def reap_local(self) -> list[str]:
        """Replicas of this host whose process is gone (a crash, a kill -9) are
        marked stopped at once: a restart must not wait DUCKLM_REPLICA_TIMEOUT
        before its predecessor's tasks count as interrupted. Same host name and
        either a pid that no longer runs, or this process's own pid registered
        before this process started (a container restarted in place). Returns
        the ids marked."""
        reaped = []
        for row in await self.live():
            if row.replica_id == self.replica_id or row.host != self.host:
                continue
            reused = row.pid == os.getpid() and row.started_at < PROCESS_STARTED
            if reused or (row.pid != os.getpid() and not pid_running(row.pid)):
                if await self.store.stop(row.replica_id):
                    reaped.append(row.replica_id)
                    logger.info(
                        "replica %s (pid %d on this host) is gone; marked stopped",
                        row.replica_id,
                        row.pid,
                    )
        return reaped

    async def stop(self) -> None:
        """Stop heartbeating and mark the replica stopped: survivors take over its
        leases and work at their next round. Never raises (a closing store is
        logged: the heartbeat then ages out instead)."""
        if self.stopped:
            return
        self.stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:
                await self.store.stop(self.replica_id)
            except StoreError as exc:
                logger.warning("replica %s could not mark itself stopped: %s", self.replica_id, exc)

    async def beat(self) -> None:
        """One heartbeat (the loop's step; tests call it directly)."""
        at = time.time()
        gap = None if self.last_beat is None else at - self.last_beat
        late = gap is not None and gap > self.timeout
        if late:
            # Other replicas saw this one dead for a while: its running tasks may
            # be reported interrupted, its leases taken over.
            logger.error(
                "replica %s: no heartbeat for %.1f s (more than DUCKLM_REPLICA_TIMEOUT=%g s); "
                "other replicas may have taken over its work",
                self.replica_id,
                gap,
                self.timeout,
            )
        # Stored at the database's time (the store's clock), which every replica
        # compares liveness on; `at` only measures the gap here.
        if not await self.store.heartbeat(self.replica_id):
            # Pruned or marked stopped by an operator: alive again from now on.
            await self.store.register(self.replica_id, self.name, self.host, os.getpid())
        self.last_beat = at
        listeners = [*self._late_listeners, *self._listeners] if late else self._listeners
        for listener in list(listeners):
            try:
                await listener()
            except Exception:
                logger.exception("heartbeat listener failed")

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.beat()
            except StoreError as exc:  # the next beat tries again
                logger.warning("replica %s: heartbeat failed: %s", self.replica_id, exc)
            except Exception:
                logger.exception("replica %s: heartbeat failed", self.replica_id)

    async def live(self) -> list[ReplicaRow]:
        """Replicas alive now (this one included once started)."""
        return await self.store.live(self.timeout)

    async def earliest_live_start(self, fallback: float) -> float:
        """The earliest start among live replicas other than this one, or
        `fallback` (this process's start) if that is earlier or there are none:
        work claimed before it cannot be any live process's."""
        starts = [r.started_at for r in await self.live() if r.replica_id != self.replica_id]
        return min([fallback, *starts])


@contextlib.asynccontextmanager
async def serving(runtime: Runtime) -> AsyncIterator[Replica]:
    """`async with serving(runtime):` this process is a registered, heartbeating
    replica and the runtime's loop owns the tasks it runs (for `ducklm console`
    and other users of the runtime without a ChatService, which has its own)."""
    replica = Replica.from_settings(runtime.stores.replicas, runtime.settings)
    await replica.start()
    runtime.loop.owner = replica.replica_id
    replica.on_late(runtime.loop.stop_lost_tasks)
    try:
        yield replica
    finally:
        runtime.loop.owner = None
        await replica.stop()
