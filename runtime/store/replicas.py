"""Several replicas on one database (issue #19): the SQL of replicas, leases,
shared state and task ownership.

- `ReplicaStore`: each `ducklm run`/`ducklm console` process registers a row,
  heartbeats it, and marks it stopped on a clean exit. A replica is dead when
  its heartbeat is older than the timeout (DUCKLM_REPLICA_TIMEOUT) or it stopped.
- `LeaseStore`: named leases with an expiry (the Matrix sync lease), taken,
  renewed and released by compare-and-set, one statement each, so of two
  replicas racing for one lease exactly one holds it.
- `StateStore`: what replicas share instead of keeping it on local disk (the
  Matrix session and sync token, once-a-day claims): get, put, compare-and-set
  on a version, a write fenced by a lease, and a once-per-period claim.
- `OwnershipStore`: which replica a running task belongs to, and what recovery
  may take over: only the work of dead replicas, never a live one's.

Every statement is portable (runtime/store/migrations.py v10): `?` placeholders,
`ON CONFLICT ... DO UPDATE ... WHERE`, `RETURNING`, no rowid. Times are the
database's clock on PostgreSQL (`clock`: replicas on several hosts compare
heartbeats and lease expiries on one clock, so their own clocks' skew does not
matter there) and the process clock on SQLite (one host). An explicit `at`
(tests) is used as given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.store.db import Database, now
from runtime.store.sql import platform_filter


async def clock(db: Database) -> float:
    """Now, in epoch seconds, for liveness and lease expiry: the database server's
    clock on PostgreSQL (the one clock every replica shares), the process clock
    on SQLite (a single host)."""
    if db.dialect != "postgres":
        return now()
    row = await db.fetchone("SELECT extract(epoch FROM clock_timestamp()) AS t")
    assert row is not None
    return float(row["t"])


# -- replicas ------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaRow:
    replica_id: str
    name: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None

    def alive(self, at: float, timeout: float) -> bool:
        """Heartbeating within `timeout` seconds of `at`, and not stopped."""
        return self.stopped_at is None and self.heartbeat_at >= at - timeout


_REPLICA_COLUMNS = "replica_id, name, host, pid, started_at, heartbeat_at, stopped_at"


def _replica(row: Mapping[str, Any]) -> ReplicaRow:
    return ReplicaRow(
        replica_id=row["replica_id"],
        name=row["name"],
        host=row["host"],
        pid=int(row["pid"]),
        started_at=float(row["started_at"]),
        heartbeat_at=float(row["heartbeat_at"]),
        stopped_at=None if row["stopped_at"] is None else float(row["stopped_at"]),
    )


class ReplicaStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def register(
        self, replica_id: str, name: str, host: str, pid: int, at: float | None = None
    ) -> ReplicaRow:
        """Record this process as alive (again, if its row was pruned or stopped)."""
        at = await clock(self.db) if at is None else at
        row = await self.db.fetchone(
            f"INSERT INTO replicas ({_REPLICA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL) "
            "ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
            f"stopped_at = NULL RETURNING {_REPLICA_COLUMNS}",
            (replica_id, name, host, pid, at, at),
        )
        assert row is not None
        return _replica(row)

    async def heartbeat(self, replica_id: str, at: float | None = None) -> bool:
        """Renew the heartbeat; False when the row is gone or marked stopped
        (the caller registers again)."""
        return bool(
            await self.db.execute(
                "UPDATE replicas SET heartbeat_at = ? "
                "WHERE replica_id = ? AND stopped_at IS NULL RETURNING 1",
                (await clock(self.db) if at is None else at, replica_id),
            )
        )

    async def stop(self, replica_id: str, at: float | None = None) -> bool:
        """A clean exit: the replica is dead from now on, without waiting for
        its heartbeat to age (survivors take its work over at their next round)."""
        return bool(
            await self.db.execute(
                "UPDATE replicas SET stopped_at = ? "
                "WHERE replica_id = ? AND stopped_at IS NULL RETURNING 1",
                (await clock(self.db) if at is None else at, replica_id),
            )
        )

    async def get(self, replica_id: str) -> ReplicaRow | None:
        row = await self.db.fetchone(
            f"SELECT {_REPLICA_COLUMNS} FROM replicas WHERE replica_id = ?", (replica_id,)
        )
        return None if row is None else _replica(row)

    async def live(self, within: float, at: float | None = None) -> list[ReplicaRow]:
        """Replicas that heartbeat within the last `within` seconds, oldest start first."""
        rows = await self.db.fetchall(
            f"SELECT {_REPLICA_COLUMNS} FROM replicas "
            "WHERE stopped_at IS NULL AND heartbeat_at >= ? ORDER BY started_at, replica_id",
            ((await clock(self.db) if at is None else at) - within,),
        )
        return [_replica(row) for row in rows]

    async def all(self) -> list[ReplicaRow]:
        rows = await self.db.fetchall(
            f"SELECT {_REPLICA_COLUMNS} FROM replicas ORDER BY started_at, replica_id"
        )
        return [_replica(row) for row in rows]

    async def prune(self, older_than: float, at: float | None = None) -> int:
        """Forget replicas dead for more than `older_than` seconds (a row only
        matters while its tasks and inbox rows may still be taken over)."""
        cutoff = (await clock(self.db) if at is None else at) - older_than
        return await self.db.execute(
            "DELETE FROM replicas WHERE heartbeat_at < ? "
            "OR (stopped_at IS NOT NULL AND stopped_at < ?) RETURNING 1",
            (cutoff, cutoff),
        )


# -- leases --------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    acquired_at: float
    expires_at: float


def _lease(row: Mapping[str, Any]) -> Lease:
    return Lease(
        name=row["name"],
        holder=row["holder"],
        acquired_at=float(row["acquired_at"]),
        expires_at=float(row["expires_at"]),
    )


class LeaseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def acquire(
        self, name: str, holder: str, ttl: float, at: float | None = None
    ) -> Lease | None:
        """Take the lease for `ttl` seconds if it is free, expired or already
        `holder`'s (then it is renewed); None when another holder has it. One
        statement: of concurrent callers exactly one gets a free lease (on
        PostgreSQL the loser waits for the winner's row and then sees it held)."""
        at = await clock(self.db) if at is None else at
        row = await self.db.fetchone(
            "INSERT INTO leases (name, holder, acquired_at, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
            "acquired_at = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > ? "
            "THEN leases.acquired_at ELSE excluded.acquired_at END, "
            "expires_at = excluded.expires_at "
            "WHERE leases.holder = excluded.holder OR leases.expires_at <= ? "
            "RETURNING name, holder, acquired_at, expires_at",
            (name, holder, at, at + ttl, at, at),
        )
        return None if row is None else _lease(row)

    async def renew(self, name: str, holder: str, ttl: float, at: float | None = None) -> bool:
        """Extend `holder`'s lease; False when it expired or is someone else's:
        the holder has lost it and must stop what the lease guards at once."""
        at = await clock(self.db) if at is None else at
        return bool(
            await self.db.execute(
                "UPDATE leases SET expires_at = ? "
                "WHERE name = ? AND holder = ? AND expires_at > ? RETURNING 1",
                (at + ttl, name, holder, at),
            )
        )

    async def release(self, name: str, holder: str) -> bool:
        """Give the lease up (a clean stop): a standby takes it at its next try."""
        return bool(
            await self.db.execute(
                "DELETE FROM leases WHERE name = ? AND holder = ? RETURNING 1", (name, holder)
            )
        )

    async def get(self, name: str) -> Lease | None:
        row = await self.db.fetchone(
            "SELECT name, holder, acquired_at, expires_at FROM leases WHERE name = ?", (name,)
        )
        return None if row is None else _lease(row)


# -- shared state --------------------------------------------------------------


@dataclass(frozen=True)
class SharedValue:
    key: str
    value: str
    version: int
    updated_at: float


def _shared(row: Mapping[str, Any]) -> SharedValue:
    return SharedValue(
        key=row["key"],
        value=row["value"],
        version=int(row["version"]),
        updated_at=float(row["updated_at"]),
    )


_UPSERT = (
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
    "version = shared_state.version + 1, updated_at = excluded.updated_at"
)


class StateStore:
    """Small shared values by key (TEXT; JSON is the caller's)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, key: str) -> SharedValue | None:
        row = await self.db.fetchone(
            "SELECT key, value, version, updated_at FROM shared_state WHERE key = ?", (key,)
        )
        return None if row is None else _shared(row)

    async def stamp(self, key: str) -> tuple[int, float] | None:
        """The key's (version, updated_at) without its value (None: no such key):
        a cheap "did it change?" for a large value (updated_at too: a deleted and
        stored again key starts over at version 1)."""
        row = await self.db.fetchone(
            "SELECT version, updated_at FROM shared_state WHERE key = ?", (key,)
        )
        return None if row is None else (int(row["version"]), float(row["updated_at"]))

    async def put(self, key: str, value: str) -> int:
        """Write unconditionally; returns the new version."""
        row = await self.db.fetchone(
            f"INSERT INTO shared_state (key, value, version, updated_at) VALUES (?, ?, 1, ?) "
            f"{_UPSERT} RETURNING version",
            (key, value, now()),
        )
        assert row is not None
        return int(row["version"])

    async def compare_and_set(self, key: str, value: str, version: int | None) -> int | None:
        """Write only if the stored version is still `version` (None: only if
        the key does not exist yet); the new version, or None when someone
        else wrote in between."""
        if version is None:
            row = await self.db.fetchone(
                "INSERT INTO shared_state (key, value, version, updated_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (key) DO NOTHING RETURNING version",
                (key, value, now()),
            )
        else:
            row = await self.db.fetchone(
                "UPDATE shared_state SET value = ?, version = version + 1, updated_at = ? "
                "WHERE key = ? AND version = ? RETURNING version",
                (value, now(), key, version),
            )
        return None if row is None else int(row["version"])

    async def put_if_holder(
        self, key: str, value: str, lease: str, holder: str, at: float | None = None
    ) -> int | None:
        """Write only while `holder` holds `lease` unexpired (a fenced write, one
        statement): a replica that lost the lease during a pause cannot move the
        sync token back under the new holder. The new version, or None."""
        at = await clock(self.db) if at is None else at
        # CASTs: PostgreSQL must know the parameters' types in a SELECT list.
        row = await self.db.fetchone(
            "INSERT INTO shared_state (key, value, version, updated_at) "
            "SELECT CAST(? AS TEXT), CAST(? AS TEXT), 1, CAST(? AS DOUBLE PRECISION) "
            "WHERE EXISTS (SELECT 1 FROM leases WHERE name = ? AND holder = ? AND expires_at > ?) "
            f"{_UPSERT} RETURNING version",
            (key, value, at, lease, holder, at),
        )
        return None if row is None else int(row["version"])

    async def claim_period(
        self, key: str, period: float, value: str = "", at: float | None = None
    ) -> bool:
        """True for one caller per `period` seconds across every replica (the
        daily housekeeping): the claim is the key's updated_at, moved forward by
        a compare-and-set only when it is at least `period` old."""
        at = await clock(self.db) if at is None else at
        row = await self.db.fetchone(
            f"INSERT INTO shared_state (key, value, version, updated_at) VALUES (?, ?, 1, ?) "
            f"{_UPSERT} WHERE shared_state.updated_at <= ? RETURNING version",
            (key, value, at, at - period),
        )
        return row is not None

    async def delete(self, key: str) -> bool:
        return bool(
            await self.db.execute("DELETE FROM shared_state WHERE key = ? RETURNING 1", (key,))
        )


# -- task ownership and what recovery may take over ----------------------------

# A replica row that makes its owner alive; `owner` is the outer row's column.
_LIVE = (
    "EXISTS (SELECT 1 FROM replicas r WHERE r.replica_id = {owner} "
    "AND r.stopped_at IS NULL AND r.heartbeat_at >= ?)"
)


async def _live_after(db: Database, live_after: float | None, within: float | None) -> float:
    """A heartbeat at or after this is a live replica's: `live_after` as given, or
    `within` seconds before the database's now (`clock`)."""
    if live_after is not None:
        return live_after
    if within is None:
        raise ValueError("live_after or within is needed")
    return await clock(db) - within


class OwnershipStore:
    """tasks.owner and the takeover rules (the tasks and inbox tables are
    otherwise runtime/store/tasks.py's and inbox.py's)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim_continuation(self, task_id: str, owner: str | None) -> bool:
        """waiting_for_approval -> running for `owner`, one compare-and-set: of
        several replicas continuing one decision exactly one gets True."""
        return bool(
            await self.db.execute(
                "UPDATE tasks SET status = 'running', owner = ?, updated_at = ? "
                "WHERE task_id = ? AND status = 'waiting_for_approval' RETURNING 1",
                (owner, now(), task_id),
            )
        )

    async def owner_of(self, task_id: str) -> str | None:
        row = await self.db.fetchone("SELECT owner FROM tasks WHERE task_id = ?", (task_id,))
        return None if row is None else row["owner"]

    async def running_by(self, owner: str) -> list[str]:
        rows = await self.db.fetchall(
            "SELECT task_id FROM tasks WHERE status = 'running' AND owner = ? ORDER BY created_at",
            (owner,),
        )
        return [row["task_id"] for row in rows]

    async def interrupt_orphans(
        self,
        me: str | None,
        *,
        live_after: float | None = None,
        within: float | None = None,
        unowned_before: float,
        limit: int,
        at: float | None = None,
    ) -> list[str]:
        """`running` tasks nobody alive works on become `interrupted` (the oldest
        `limit` of them; call again until fewer come back); returns their ids.

        Orphans are tasks owned by a replica without a heartbeat since
        `live_after` (or, given `within` instead, that many seconds before the
        database's now: `clock`) (or stopped), never `me`'s; and tasks without an owner
        (from before v10, or a process that runs no replica) last changed
        before `unowned_before` (the earliest start of a live replica: no live
        process can be working on them). The condition is repeated outside the
        sub-select so that on PostgreSQL a row another replica interrupted
        meanwhile is re-checked and skipped (READ COMMITTED re-evaluates the
        outer WHERE on the newest row version). The `task_interrupted` events
        are the caller's, in the same transaction."""
        live_after = await _live_after(self.db, live_after, within)
        at = await clock(self.db) if at is None else at
        orphan = (
            "status = 'running' AND ((owner IS NULL AND updated_at < ?) OR "
            f"(owner IS NOT NULL AND owner <> ? AND NOT {_LIVE.format(owner='tasks.owner')}))"
        )
        params = [unowned_before, me or "", live_after]
        rows = await self.db.fetchall(
            "UPDATE tasks SET status = 'interrupted', updated_at = ? WHERE task_id IN "
            f"(SELECT task_id FROM tasks WHERE {orphan} ORDER BY created_at LIMIT ?"
            # SKIP LOCKED (PostgreSQL): a replica recovering beside another takes
            # the next rows instead of waiting on the same ones and coming back
            # short (which would end its paging early).
            f"{self.db.skip_locked}) "
            f"AND {orphan} RETURNING task_id, created_at",
            (at, *params, limit, *params),
        )
        return [row["task_id"] for row in sorted(rows, key=lambda r: r["created_at"])]

    async def take_abandoned_inbox(
        self,
        owner: str,
        *,
        live_after: float | None = None,
        within: float | None = None,
        unowned_before: float,
        platforms: Sequence[str],
        limit: int,
        at: float | None = None,
    ) -> list[str]:
        """Claim for `owner` the open inbox rows of `platforms` that nobody alive
        is carrying out; returns their ids, oldest first. A row is abandoned
        when its owner is a registered replica that is dead, or, for an owner
        that never registered (before v10), when it was claimed before
        `unowned_before` (the earliest start of a live replica). Never a live
        replica's row, never `owner`'s own. One statement (the condition
        repeated outside, as in `interrupt_orphans`): two recovering replicas
        split the rows, never share one."""
        live_after = await _live_after(self.db, live_after, within)
        if not platforms:
            return []
        at = await clock(self.db) if at is None else at
        on_platforms, platform_params = platform_filter("conversation", platforms)
        registered = "EXISTS (SELECT 1 FROM replicas d WHERE d.replica_id = inbox.owner)"
        abandoned = (
            f"done_at IS NULL AND {on_platforms} AND (owner IS NULL OR (owner <> ? "
            f"AND NOT {_LIVE.format(owner='inbox.owner')} AND ({registered} "
            "OR claimed_at IS NULL OR claimed_at < ?)))"
        )
        params = [*platform_params, owner, live_after, unowned_before]
        rows = await self.db.fetchall(
            "UPDATE inbox SET owner = ?, claimed_at = ? WHERE inbox_id IN "
            f"(SELECT inbox_id FROM inbox WHERE {abandoned} ORDER BY received_at LIMIT ?"
            f"{self.db.skip_locked}) "
            f"AND {abandoned} RETURNING inbox_id, received_at",
            (owner, at, *params, limit, *params),
        )
        return [row["inbox_id"] for row in sorted(rows, key=lambda r: r["received_at"])]
