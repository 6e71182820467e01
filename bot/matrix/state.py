"""What the Matrix bot keeps between runs: in the database, shared by every
replica (`SharedMatrixState`, issue #19), and mirrored in files next to it.

In the database (shared_state, runtime/store/replicas.py), read first:

    matrix-session:<user>   homeserver, user id, device id, access token: every
                            replica uses the one device
    matrix-sync:<user>      the sync token after the last handled batch and the
                            per-room markers, written only by the holder of the
                            `matrix-sync:<user>` lease (a fenced write), so the
                            replica that takes over continues exactly there
    matrix-crypto:<user>    the crypto store's snapshot (bot/matrix/crypto.py),
                            with the device it belongs to; fenced likewise

Files of an installation from before #19 are imported into the database once
(when it has no value yet); afterwards the files are a local mirror, written
after the database, for a downgrade and for people who look:

    <db-stem>-matrix/session.json   homeserver, user id, device id, access token (0600)
    <db-stem>-matrix/sync.json      the sync token (`next_batch`) after the last batch
                                    the bot finished handling, and per room the last
                                    event it handled (where a gap fill stops)

Keeping the device id means a restart does not add a new device to the account
each time; keeping the sync token means a restart resumes exactly where the bot
stopped (nothing answered twice, nothing missed). nio's own token store needs
the e2e extra and saves the token before callbacks run (platforms.md §0.7), so
the bot writes it itself, after handling each batch.

Every file is written atomically (a temporary file, fsync, rename) with mode
0600, inside a 0700 directory: the session file holds a password-equivalent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.store.replicas import Lease, LeaseStore, SharedValue, StateStore

logger = logging.getLogger("ducklm.matrix")

SESSION_FILE = "session.json"
SYNC_FILE = "sync.json"


@dataclass(frozen=True)
class Session:
    homeserver: str
    user_id: str
    device_id: str | None = None
    access_token: str | None = None  # only a token the bot got by logging in itself


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` (text as UTF-8) so a crash leaves the old or
    the new file, never half."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # A damaged file costs a fresh login or a fresh start, not a crash.
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


class MatrixState:
    """The bot's files in `directory` (settings.matrix_state_dir)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def session_path(self) -> Path:
        return self.directory / SESSION_FILE

    @property
    def sync_path(self) -> Path:
        return self.directory / SYNC_FILE

    def load_session(self, homeserver: str, user_id: str) -> Session | None:
        """The saved session, if it belongs to this homeserver and account."""
        data = _read_json(self.session_path)
        if not data or data.get("user_id") != user_id:
            return None
        if _norm_url(str(data.get("homeserver", ""))) != _norm_url(homeserver):
            return None
        device_id = data.get("device_id")
        token = data.get("access_token")
        return Session(
            homeserver=homeserver,
            user_id=user_id,
            device_id=device_id if isinstance(device_id, str) and device_id else None,
            access_token=token if isinstance(token, str) and token else None,
        )

    def save_session(self, session: Session) -> None:
        atomic_write(self.session_path, json.dumps(asdict(session), indent=2) + "\n")

    def forget_access_token(self, homeserver: str, user_id: str) -> None:
        """Drop a token the server no longer accepts, keeping the device id."""
        session = self.load_session(homeserver, user_id)
        if session is not None and session.access_token:
            self.save_session(
                Session(homeserver, user_id, device_id=session.device_id, access_token=None)
            )

    def load_sync_token(self, user_id: str) -> str | None:
        data = _read_json(self.sync_path)
        if not data or data.get("user_id") != user_id:
            return None  # another account's token would resume the wrong timeline
        token = data.get("next_batch")
        return token if isinstance(token, str) and token else None

    def load_last_handled(self, user_id: str) -> dict[str, str]:
        """Room id -> the last event the bot handled there (empty for another account)."""
        data = _read_json(self.sync_path)
        if not data or data.get("user_id") != user_id:
            return {}
        rooms = data.get("rooms")
        if not isinstance(rooms, dict):
            return {}
        return {
            room: event
            for room, event in rooms.items()
            if isinstance(room, str) and isinstance(event, str) and event
        }

    def save_sync_token(
        self, user_id: str, next_batch: str, last_handled: dict[str, str] | None = None
    ) -> None:
        """The token and the per-room markers in one file, so they always agree."""
        data: dict[str, Any] = {"user_id": user_id, "next_batch": next_batch}
        if last_handled:
            data["rooms"] = dict(last_handled)
        atomic_write(self.sync_path, json.dumps(data) + "\n")


def _norm_url(url: str) -> str:
    return url.strip().rstrip("/").lower()


# -- the database's copy, shared by replicas (issue #19) -------------------------


def lease_name(user_id: str) -> str:
    """The lease of the one replica that syncs for `user_id`."""
    return f"matrix-sync:{user_id}"


def _session_from(data: dict[str, Any] | None, homeserver: str, user_id: str) -> Session | None:
    if not data or data.get("user_id") != user_id:
        return None
    if _norm_url(str(data.get("homeserver", ""))) != _norm_url(homeserver):
        return None
    device_id = data.get("device_id")
    token = data.get("access_token")
    return Session(
        homeserver=homeserver,
        user_id=user_id,
        device_id=device_id if isinstance(device_id, str) and device_id else None,
        access_token=token if isinstance(token, str) and token else None,
    )


def _loads(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        logger.warning("ignoring an unreadable shared Matrix value")
        return None
    return data if isinstance(data, dict) else None


def _crypto_from(found: SharedValue | None) -> tuple[int, str, bytes] | None:
    """(version, device id, snapshot) from the stored row, if it is readable."""
    data = _loads(found.value) if found is not None else None
    if found is None or not data:
        return None
    device, blob = data.get("device_id"), data.get("data")
    if not isinstance(device, str) or not isinstance(blob, str):
        return None
    try:
        return found.version, device, base64.b64decode(blob)
    except ValueError:
        logger.warning("matrix: ignoring an unreadable crypto snapshot")
        return None


class SharedMatrixState:
    """The session, the sync position and the sync lease of one Matrix account,
    in the database (see the module's docstring), for the replica `holder`."""

    def __init__(
        self,
        state: StateStore,
        leases: LeaseStore,
        files: MatrixState,
        user_id: str,
        holder: str,
    ) -> None:
        self.state = state
        self.leases = leases
        self.files = files
        self.user_id = user_id
        self.holder = holder
        self.lease = lease_name(user_id)
        self._session_key = f"matrix-session:{user_id}"
        self._sync_key = f"matrix-sync:{user_id}"
        self._crypto_key = f"matrix-crypto:{user_id}"
        self.session_version: int | None = None  # of the session last read
        # The crypto snapshot last read (version, updated_at) and its device.
        self._crypto_stamp: tuple[int, float] | None = None
        self._crypto_device: str | None = None

    # -- the lease -------------------------------------------------------------

    async def take_lease(self, ttl: float) -> Lease | None:
        """The sync lease for this replica if it is free or expired (or ours)."""
        return await self.leases.acquire(self.lease, self.holder, ttl)

    async def renew_lease(self, ttl: float) -> bool:
        return await self.leases.renew(self.lease, self.holder, ttl)

    async def release_lease(self) -> bool:
        return await self.leases.release(self.lease, self.holder)

    async def lease_holder(self) -> str | None:
        lease = await self.leases.get(self.lease)
        return None if lease is None else lease.holder

    # -- the session -------------------------------------------------------------

    async def load_session(self, homeserver: str) -> Session | None:
        """The shared session for this account and homeserver; an old
        session.json is imported once, when the database has none."""
        found = await self.state.get(self._session_key)
        if found is None:
            legacy = await asyncio.to_thread(self.files.load_session, homeserver, self.user_id)
            if legacy is None:
                return None
            await self.state.compare_and_set(self._session_key, json.dumps(asdict(legacy)), None)
            found = await self.state.get(self._session_key)
            if found is None:
                return legacy
            logger.info(
                "matrix: session imported into the database from %s", self.files.session_path
            )
        self.session_version = found.version
        return _session_from(_loads(found.value), homeserver, self.user_id)

    async def session_changed(self) -> bool:
        """Whether another replica wrote the session since it was last read here."""
        found = await self.state.get(self._session_key)
        return found is not None and found.version != self.session_version

    async def save_session(self, session: Session) -> None:
        self.session_version = await self.state.put(self._session_key, json.dumps(asdict(session)))
        await asyncio.to_thread(self.files.save_session, session)

    async def forget_access_token(self, homeserver: str) -> None:
        session = await self.load_session(homeserver)
        if session is not None and session.access_token:
            await self.save_session(
                Session(homeserver, self.user_id, device_id=session.device_id, access_token=None)
            )

    # -- the sync position ---------------------------------------------------------

    async def load_sync(self) -> tuple[str | None, dict[str, str]]:
        """The sync token and per-room markers; an old sync.json is imported once."""
        found = await self.state.get(self._sync_key)
        if found is None:
            token = await asyncio.to_thread(self.files.load_sync_token, self.user_id)
            if not token:
                return None, {}
            rooms = await asyncio.to_thread(self.files.load_last_handled, self.user_id)
            imported = json.dumps({"next_batch": token, "rooms": rooms})
            if await self.state.compare_and_set(self._sync_key, imported, None) is not None:
                logger.info(
                    "matrix: sync token imported into the database from %s", self.files.sync_path
                )
            found = await self.state.get(self._sync_key)
            if found is None:
                return token, rooms
        data = _loads(found.value) or {}
        token = data.get("next_batch")
        rooms = data.get("rooms")
        markers = (
            {
                room: event
                for room, event in rooms.items()
                if isinstance(room, str) and isinstance(event, str) and event
            }
            if isinstance(rooms, dict)
            else {}
        )
        return (token if isinstance(token, str) and token else None), markers

    async def save_sync(self, next_batch: str, last_handled: dict[str, str]) -> bool:
        """Write the position, only while this replica holds the lease (one
        fenced statement); False: the lease is lost, nothing was written."""
        value = json.dumps({"next_batch": next_batch, "rooms": dict(last_handled)})
        written = await self.state.put_if_holder(self._sync_key, value, self.lease, self.holder)
        if written is None:
            return False
        try:
            await asyncio.to_thread(
                self.files.save_sync_token, self.user_id, next_batch, last_handled
            )
        except OSError as exc:  # the mirror only; the database has it
            logger.warning(
                "matrix: cannot mirror the sync token to %s: %s", self.files.sync_path, exc
            )
        return True

    # -- the crypto store's snapshot ---------------------------------------------

    async def load_crypto(self) -> tuple[int, str, bytes] | None:
        """(version, device id, snapshot) of the crypto store, if one was saved."""
        return _crypto_from(await self.state.get(self._crypto_key))

    async def crypto_device(self) -> str | None:
        """The device of the saved snapshot. A standby without the store asks
        every second, and the snapshot can be megabytes: it is decoded again
        only when it was written since (a deleted and saved again snapshot can
        start over at the same version, not at the same time)."""
        if await self.state.stamp(self._crypto_key) == self._crypto_stamp:
            return self._crypto_device
        found = await self.state.get(self._crypto_key)
        loaded = _crypto_from(found)
        # The stamp of the row read, which may be newer than the one just compared.
        self._crypto_stamp = None if found is None else (found.version, found.updated_at)
        self._crypto_device = None if loaded is None else loaded[1]
        return self._crypto_device

    async def save_crypto(self, device_id: str, blob: bytes) -> int | None:
        """Store a snapshot while holding the lease; its version, or None."""
        value = json.dumps({"device_id": device_id, "data": base64.b64encode(blob).decode()})
        return await self.state.put_if_holder(self._crypto_key, value, self.lease, self.holder)

    async def forget_crypto(self) -> bool:
        """Drop the snapshot (`ducklm matrix reset-crypto`): nobody restores it."""
        return await self.state.delete(self._crypto_key)
