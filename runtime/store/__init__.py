"""DuckLM's storage: every SQL statement of the project lives in this package.

`open_stores(target)` is the usual entry point, with `target` a SQLite file or a
postgresql:// URL (the same API on both backends):

    async with await open_stores("ducklm.db") as stores:
        task = await stores.tasks.create_task("why is web-1 slow?")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

# Imported for its effect: PostgresDatabase registers with Database.open for
# postgresql:// URLs (asyncpg itself loads only when one is opened).
import runtime.store.postgres  # noqa: F401
from runtime.store.approvals import ApprovalStore
from runtime.store.db import Database, StoreError
from runtime.store.deliveries import DeliveryStore
from runtime.store.events import EventStore
from runtime.store.inbox import InboxStore
from runtime.store.replicas import LeaseStore, OwnershipStore, ReplicaStore, StateStore
from runtime.store.rules import RuleStore
from runtime.store.schedules import ScheduleStore
from runtime.store.tasks import TaskStore

__all__ = [
    "ApprovalStore",
    "Database",
    "DeliveryStore",
    "EventStore",
    "InboxStore",
    "LeaseStore",
    "OwnershipStore",
    "ReplicaStore",
    "RuleStore",
    "ScheduleStore",
    "StateStore",
    "StoreError",
    "Stores",
    "TaskStore",
    "open_stores",
]


@dataclass
class Stores:
    """Every store on one shared connection."""

    db: Database
    tasks: TaskStore
    events: EventStore
    approvals: ApprovalStore
    rules: RuleStore
    deliveries: DeliveryStore
    schedules: ScheduleStore
    inbox: InboxStore
    # Several replicas on one database (issue #19, runtime/store/replicas.py).
    replicas: ReplicaStore
    leases: LeaseStore
    state: StateStore
    ownership: OwnershipStore

    @classmethod
    def on(cls, db: Database) -> Stores:
        return cls(
            db=db,
            tasks=TaskStore(db),
            events=EventStore(db),
            approvals=ApprovalStore(db),
            rules=RuleStore(db),
            deliveries=DeliveryStore(db),
            schedules=ScheduleStore(db),
            inbox=InboxStore(db),
            replicas=ReplicaStore(db),
            leases=LeaseStore(db),
            state=StateStore(db),
            ownership=OwnershipStore(db),
        )

    async def close(self) -> None:
        await self.db.close()

    async def __aenter__(self) -> Stores:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def open_stores(path: str | Path, *, pool_size: int = 10) -> Stores:
    """Open (and migrate) the database at `path` (a SQLite file or a postgresql://
    URL, with a pool of `pool_size` connections) and build every store on it."""
    return Stores.on(await Database.open(path, pool_size=pool_size))
