"""The bot's connection to its homeserver: login, the sync loop, the
dispatcher, invites and joins (numbered pitfalls as in research/platforms.md §3).

    sync loop ──SyncResponse──▶ inbox ──▶ dispatcher ──▶ RoomEvents
    (own loop, backoff,           (queue)    (one batch at a time; then the
     never raises)                            sync token is written to disk)

- nio runs event callbacks inline in its sync loop and a raising callback ends
  `sync_forever` (M1), and a SyncError is returned, not raised, so it would spin
  (M2). So the bot runs its own loop around `client.sync()`, registers no nio
  callbacks, and only queues each response; the dispatcher hands the events on.
- The sync token is saved by us after a batch was handled (M4), so a restart
  resumes with `since=token, full_state=True`: nothing is answered twice and
  nothing sent while the bot was down is missed.
- History is never answered (M3): the first sync of a start without a saved
  token is history as a whole (only invites in it are acted on, and rooms
  joined from those invites start at the join), and in a room the bot just
  joined everything before its own invite is ignored. Both are structural, so
  a skewed clock cannot let old messages through.
- What a sync did not carry is fetched (bot/matrix/backlog.py): a `limited`
  timeline's gap back to the previous sync, and in a room just joined the
  messages between the invite and the join, both bounded, handled in order
  before the batch's own events.

Every background job of the Matrix side is started with `spawn`, so `stop`
ends them all and none is garbage-collected mid-run.

Several replicas (issue #19): one replica syncs at a time, the holder of the
`matrix-sync:<user>` lease in the database (TTL LEASE_TTL_S, renewed every
LEASE_EVERY_S). The others are standbys: logged in with the shared session
(one device for all), they send (answers of the tasks they own) but do not
sync, and try to take the lease every LEASE_EVERY_S. The holder's sync token
is written to the database after each handled batch, fenced by the lease, so a
standby that takes over continues exactly there. A holder that cannot renew
(a pause, the database unreachable) stops syncing at once, before its lease
can have passed to another replica. With end-to-end encryption the crypto
store is local to the replica that made it: a standby without the device's
store refuses to take over (logged) rather than make new keys for the shared
device, and never sends into an encrypted room (it cannot encrypt).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    LoginResponse,
    MatrixRoom,
    ProfileGetDisplayNameResponse,
    RoomGetStateEventResponse,
    SyncResponse,
    WhoamiResponse,
)

from bot.backend import PlatformStartError
from bot.matrix.backlog import (
    BacklogBounds,
    BacklogError,
    fetch_backlog,
    is_late,
    is_own_membership,
    now_ms,
    timestamp,
)
from bot.matrix.crosssign import CrossSigner, CrossSigningError
from bot.matrix.crypto import CryptoStore, crypto_status, event_source, key_maintenance
from bot.matrix.retry import backoff, error_text, is_token_error
from bot.matrix.state import MatrixState, Session, SharedMatrixState
from bot.matrix.trust import TrustPolicy
from runtime.store import StoreError

if TYPE_CHECKING:
    from runtime.settings import Settings
    from runtime.store import Stores

logger = logging.getLogger("ducklm.matrix")

DEVICE_NAME = "DuckLM"
SYNC_TIMEOUT_MS = 30_000  # long-poll; the server answers at once when something happens
REQUEST_TIMEOUT = 45.0  # per request; a sync gets its long-poll time on top (nio adds it)
START_TIMEOUT = 60.0  # login + first sync, before `ducklm run` gives up with a message
# How long a send into an encrypted room waits for a new lease holder's crypto
# store to load (restoring the snapshot, uploading keys) before refusing.
CRYPTO_LOAD_WAIT_S = 20.0
TOKEN_ERROR_BACKOFF = 300.0
STOP_TIMEOUT = 10.0


MAX_ROOM_MARKERS = 5000  # rooms whose last handled event sync.json remembers
# A batch whose messages the store would not take, or whose gap the homeserver
# would not give, is tried this often (about a minute of backoff in all).
BATCH_ATTEMPTS = 8
# The sync lease: how long it lasts unrenewed, how often the holder renews it
# and a standby tries to take it. A dead holder is replaced within about
# LEASE_TTL_S + LEASE_EVERY_S; a holder stops syncing when its renewal is late.
LEASE_TTL_S = 6.0
LEASE_EVERY_S = 1.0


class NotHolder(RuntimeError):
    """A standby replica cannot send this (it does not sync, so cannot encrypt)."""


class NotRecorded(Exception):
    """A message could not be put into the store (accept failed), or a gap could
    not be fetched: the batch must not be marked handled, or messages would be lost."""


class RoomEvents(Protocol):
    """What the dispatcher hands a room's new events to (`bot/matrix/events.py`)."""

    async def on_room_event(
        self, room: MatrixRoom, source: dict[str, Any], *, late: bool = False
    ) -> None: ...

    async def encrypted_room_notice(self, room: MatrixRoom, cause_event_id: str) -> None: ...

    async def after_batch(self, room: MatrixRoom, members_changed: bool) -> None: ...


@dataclass(frozen=True)
class Batch:
    """One sync response as the dispatcher handles it."""

    response: SyncResponse
    since: str | None  # the token it was asked with: where a gap fill stops
    history_only: bool = False  # a first sync without a saved token
    resumed: bool = False  # the first sync after a restart (all of it arrived late)


class MatrixConnection:
    def __init__(
        self,
        settings: Settings,
        *,
        may_invite: Callable[[str], bool],
        serves_room: Callable[[str], bool] = lambda room_id: True,
        on_access_token: Callable[[str], object] | None = None,
        stores: Stores,
        holder: str,
    ) -> None:
        # Told every access token the bot logs in with, so tool output never shows it.
        self.on_access_token = on_access_token
        self.settings = settings
        self.homeserver = (settings.matrix_homeserver or "").strip().rstrip("/")
        self.user_id = (settings.matrix_user_id or "").strip()
        # Whose invites are accepted (the access policy's may_invite, by Matrix id).
        self.may_invite = may_invite
        # DUCKLM_CHANNELS: a room the bot would never answer in is not joined.
        self.serves_room = serves_room
        self.bounds = BacklogBounds(settings.matrix_backlog_max, settings.matrix_backlog_max_age)
        self.state = MatrixState(settings.matrix_state_dir)
        # The session, sync token and sync lease in the database; `holder` is this
        # replica's id (runtime/replica.py).
        self.shared = SharedMatrixState(
            stores.state, stores.leases, self.state, self.user_id, holder
        )
        # Whether this replica holds the sync lease and syncs (else a standby),
        # and until when its last renewal keeps the lease (time.time()).
        self.syncing = False
        self._leasing = False
        self._lease_until = 0.0
        self._sync_jobs: list[asyncio.Task[Any]] = []
        self._refusal_logged = False
        # Tries for the sync lease so far (a standby tries every LEASE_EVERY_S):
        # what a test waits on to know a standby had its chances.
        self.lease_tries = 0
        self._snapshot_lock = asyncio.Lock()
        # Set while the client's Olm machine is loaded (sends may encrypt).
        self._crypto_loaded = asyncio.Event()
        # Standby sends: room id -> whether it is encrypted (asked once).
        self._encrypted_rooms: dict[str, bool] = {}
        # End-to-end encryption: wanted and possible here (vodozemac loads)?
        self.crypto = crypto_status(settings)
        self.crypto_store = CryptoStore(settings.matrix_state_dir, settings.matrix_store_passphrase)
        self.trust = TrustPolicy(settings.matrix_trust)  # DUCKLM_MATRIX_TRUST
        self.client: AsyncClient | None = None
        self.display_name: str | None = None
        self.device_id: str | None = None
        self.running = False
        self._handler: RoomEvents | None = None
        self._inbox: asyncio.Queue[Batch] = asyncio.Queue()
        # Strong references to everything we start (the loops, joins, typing
        # keepers, history fetches): a bare create_task may be garbage-collected.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._joining: set[str] = set()
        # Rooms joined from invites that were history at a first start: no backlog.
        self._no_backlog: set[str] = set()
        # Room -> the last event handled there (saved with the sync token).
        self.last_handled: dict[str, str] = {}
        self.started_ms = now_ms()
        # On a batch's last attempt a gap the homeserver will not give is skipped
        # (logged) rather than holding up everything after it for good.
        self._last_attempt = False
        # Set (and replaced) after every sync: waiting for room keys to arrive.
        self._synced = asyncio.Event()

    # -- start / stop ----------------------------------------------------------

    async def start(self, events: RoomEvents) -> None:
        """Log in and sync once (so a dead server fails the start), then run the
        sync loop and the dispatcher, which hands new room events to `events`."""
        self._check_settings()
        self._handler = events
        config = AsyncClientConfig(
            # nio retries timeouts forever by default, which would hang `ducklm run`
            # on a dead homeserver; we retry ourselves, with backoff, where it helps.
            max_timeouts=2,
            max_timeout_retry_wait_time=5,
            request_timeout=REQUEST_TIMEOUT,
            max_limit_exceeded=10,  # 429s honour retry_after_ms a few times
            **await self._crypto_config(),
        )
        self.client = AsyncClient(
            self.homeserver,
            self.user_id,
            config=config,
            store_path=str(self.crypto_store.directory) if self.crypto.enabled else "",
        )
        self.started_ms = now_ms()
        first: Batch | None = None
        # The lease is renewed from here on: logging in and the first sync may
        # take longer than its TTL.
        self._leasing = True
        self.spawn(self._lease_forever())
        try:
            async with asyncio.timeout(START_TIMEOUT):
                if await self._take_lease(starting=True):
                    await self._login()
                    await self._start_crypto()
                else:
                    await self._standby_login()
                await self._load_profile()
                if self.syncing:
                    first = await self._first_sync()
        except PlatformStartError:
            await self._abort_start()
            raise
        except StoreError as exc:
            await self._abort_start()
            raise PlatformStartError(f"Matrix: {exc}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            await self._abort_start()
            raise PlatformStartError(
                f"Matrix: cannot reach MATRIX_HOMESERVER={self.homeserver} "
                f"({type(exc).__name__}: {exc or 'no answer'}). Check the URL and that the "
                "homeserver is up."
            ) from exc
        self.running = True
        if first is not None:
            self._begin_syncing(first)
        logger.info(
            "matrix: serving as %s (device %s)%s",
            self.user_id,
            self.device_id,
            "" if self.syncing else "; standby: another replica syncs",
        )

    # -- the sync lease (issue #19) ---------------------------------------------

    async def _take_lease(self, *, starting: bool = False) -> bool:
        """Try for the sync lease; True when this replica holds it now."""
        self.lease_tries += 1
        if not await self._may_take_over(starting):
            return False
        at = time.time()
        lease = await self.shared.take_lease(LEASE_TTL_S)
        if lease is None:
            return False
        self._lease_until = at + LEASE_TTL_S
        self.syncing = True
        try:
            await self._restore_crypto()
        except BaseException:
            self.syncing = False
            with contextlib.suppress(Exception):
                await self.shared.release_lease()
            raise
        return True

    async def _restore_crypto(self) -> None:
        """As the new holder, before the crypto store is loaded: the database's
        snapshot of the shared device's store, unless the local store is that
        snapshot already (or newer: this replica saved it)."""
        if not self.crypto.enabled:
            return
        found = await self.shared.load_crypto()
        if found is None:
            return
        version, device, blob = found
        session = await self.shared.load_session(self.homeserver)
        if session is None or session.device_id != device:
            return  # a snapshot of an earlier device
        if await asyncio.to_thread(self.crypto_store.marker) == version:
            return
        # A replica that held the lease before has its Olm state loaded from the
        # files about to be replaced (another holder moved the keys on since):
        # unload it first, so `_start_crypto` loads the restored store afresh
        # instead of syncing on the stale in-memory state over the new files.
        self._unload_crypto()
        await asyncio.to_thread(self.crypto_store.restore, blob, version)
        client = self.client
        if client is not None:
            # The snapshot's pickle key is the one its pickles are encrypted with.
            key = await asyncio.to_thread(self.crypto_store.pickle_key)
            client.config = dataclasses.replace(client.config, pickle_key=key)
        logger.info("matrix: crypto store of device %s restored from the database", device)

    def _unload_crypto(self) -> None:
        """Drop the client's loaded crypto store and Olm machine (closing its
        database file), so that the next `_start_crypto` loads them again."""
        client = self.client
        if client is None or client.olm is None:
            return
        store = client.store
        self._crypto_loaded.clear()
        client.olm = None
        client.store = None
        database = getattr(store, "database", None)
        if database is not None:
            with contextlib.suppress(Exception):  # closed already: nothing to release
                database.close()
        logger.info("matrix: crypto store unloaded, to load the restored snapshot")

    def crypto_changed(self) -> None:
        """Something was sent (an encrypted send moves Olm and Megolm state): the
        holder saves a snapshot soon, so a takeover loses as little as possible."""
        if self.syncing and self.encrypting:
            self.spawn(self.save_crypto_snapshot())

    async def save_crypto_snapshot(self) -> None:
        """After a handled batch (before its token is saved), after sends, and on
        every lease renewal: the crypto store into the database, if it changed
        (fenced by the lease like the token). One at a time."""
        async with self._snapshot_lock:
            await self._save_snapshot()

    async def _save_snapshot(self) -> None:
        client = self.client
        if client is None or client.olm is None or not self.device_id or not self.syncing:
            return
        store = self.crypto_store
        try:
            # Mostly nothing was written since the last save: the files' signature
            # says so without copying and hashing the store.
            found = await asyncio.to_thread(store.changed_snapshot)
            if found is None:
                return
            blob, digest, signature = found
            version = await self.shared.save_crypto(self.device_id, blob)
        except (OSError, sqlite3.Error, StoreError) as exc:
            logger.warning("matrix: cannot save the crypto store's snapshot: %s", exc)
            return
        if version is None:
            return  # the lease is lost; saving the token says so next
        store.saved(digest, signature)
        await asyncio.to_thread(store.set_marker, version)

    async def _may_take_over(self, starting: bool) -> bool:
        """Without encryption any replica may sync. With it, the crypto store is
        local: a replica may take over only with the shared device's store here,
        or at its start when nobody holds the lease (as a single process always
        did: without a store it then logs in as a new device, see `_login`)."""
        if not self.crypto.enabled:
            return True
        session = await self.shared.load_session(self.homeserver)
        device = session.device_id if session else None
        if device is None or self.crypto_store.has_device(self.user_id, device):
            return True
        if await self.shared.crypto_device() == device:
            return True  # the holder's snapshot is in the database
        if starting and await self.shared.lease_holder() is None:
            return True
        if not self._refusal_logged:
            self._refusal_logged = True
            logger.error(
                "matrix: this replica cannot take over syncing: end-to-end encryption is on "
                "and the crypto store of device %s is not in %s (it is local to the replica "
                "that made it). Put DUCKLM_DATA_DIR on a volume every replica shares, or "
                "serve Matrix from one replica (docs/deploy.md)",
                device,
                self.crypto_store.directory,
            )
        return False

    async def _standby_login(self) -> None:
        """Use the shared session (the holder's device and token) without syncing;
        wait for it while the holder logs in, and take the lease instead if the
        holder goes away meanwhile."""
        while True:
            token = self.settings.matrix_access_token
            session = await self.shared.load_session(self.homeserver)
            token = token or (session.access_token if session else None)
            if token:
                who = await self._whoami(token, session.device_id if session else None)
                if isinstance(who, WhoamiResponse):
                    self._check_owner(who.user_id, "the shared session")
                    self.device_id = who.device_id or (session.device_id if session else None)
                    self.require_client().device_id = self.device_id or ""
                    self._learned_token(token)
                    return
                if not is_token_error(who):
                    raise PlatformStartError(
                        f"Matrix: MATRIX_HOMESERVER={self.homeserver} did not accept the "
                        f"shared session ({error_text(who)})."
                    )
            if await self._take_lease():
                await self._login()
                await self._start_crypto()
                return
            await asyncio.sleep(LEASE_EVERY_S)

    def holds_lease(self) -> bool:
        """This replica syncs and its last renewal still covers now."""
        return self.syncing and time.time() < self._lease_until

    def takes_over_inbox(self) -> bool:
        """Whether recovery here may take over Matrix messages a dead replica left
        open: with encryption on, only the lease holder has the crypto state to
        answer in encrypted rooms, so a standby leaves them to it."""
        return not self.crypto.enabled or self.holds_lease()

    def _begin_syncing(self, first: Batch) -> None:
        self._inbox = asyncio.Queue()
        self._inbox.put_nowait(first)
        self._sync_jobs = [
            self.spawn(self._supervise("dispatcher", self._dispatch_forever)),
            self.spawn(self._supervise("sync", self._sync_forever)),
        ]

    def _stop_syncing(self, why: str) -> None:
        """Lost the lease: stop at once (another replica may sync already)."""
        if not self.syncing:
            return
        self.syncing = False
        self._lease_until = 0.0
        for job in self._sync_jobs:
            job.cancel()
        self._sync_jobs = []
        self._inbox = asyncio.Queue()
        logger.warning("matrix: stopped syncing (%s); this replica is a standby now", why)

    async def _abort_start(self) -> None:
        """A failed start: no lease loop, no lease, no client."""
        await self.stop()

    async def _lease_forever(self) -> None:
        """Renew the lease while syncing; as a standby (once started), try to
        take it. Never raises: a failing step is logged and tried again."""
        while self._leasing:
            try:
                if self.syncing:
                    at = time.time()
                    if await self.shared.renew_lease(LEASE_TTL_S):
                        self._lease_until = at + LEASE_TTL_S
                        if self.running and self.encrypting:
                            await self.save_crypto_snapshot()
                    else:
                        self._stop_syncing("the sync lease expired or was taken over")
                elif self.running:
                    await self._standby_step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is away: the lease may run out meanwhile
                logger.warning("matrix: sync lease step failed: %s", exc)
            if self.syncing and time.time() >= self._lease_until:
                self._stop_syncing("the sync lease could not be renewed in time")
            await asyncio.sleep(LEASE_EVERY_S)

    async def _standby_step(self) -> None:
        """Follow the shared session (the holder may have logged in again), and
        take over when the lease is free."""
        client = self.require_client()
        if await self.shared.session_changed():
            session = await self.shared.load_session(self.homeserver)
            if (
                session is not None
                and session.access_token
                and not self.settings.matrix_access_token
            ):
                client.access_token = session.access_token
                self.device_id = session.device_id or self.device_id
                client.device_id = self.device_id or ""
                self._learned_token(session.access_token)
        if not await self._take_lease():
            return
        try:
            logger.info("matrix: took over syncing for %s", self.user_id)
            if self.crypto.enabled and client.olm is None:
                await self._start_crypto()
            self.started_ms = now_ms()
            self._begin_syncing(await self._first_sync())
        except BaseException:
            # Not syncing after all: give the lease back for another replica.
            self.syncing = False
            with contextlib.suppress(Exception):
                await self.shared.release_lease()
            raise

    async def check_can_send(self, room_id: str) -> None:
        """Only a replica with its crypto store loaded can encrypt: a standby, or
        a new holder still loading the store, refuses (NotHolder) to send into an
        encrypted room rather than send the text in the clear (nio sends in the
        clear when no Olm machine is loaded). A new holder waits for its store
        first, bounded: it is about to be able to."""
        if self.syncing and (self.encrypting or not self.crypto.enabled):
            return
        if not await self._room_encrypted(room_id):
            return
        if self.syncing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CRYPTO_LOAD_WAIT_S):
                    await self._crypto_loaded.wait()
            if self.syncing and self.encrypting:
                return
        raise NotHolder(
            f"{room_id} is encrypted and this replica cannot encrypt yet (it does not "
            "sync, or its crypto store is not loaded); the replica holding the sync "
            "lease posts it"
        )

    async def _room_encrypted(self, room_id: str) -> bool:
        """Whether a room is encrypted: the synced room's state if there is one,
        else the room's m.room.encryption state event (asked once)."""
        client = self.require_client()
        room = client.rooms.get(room_id)
        if room is not None and room.encrypted:
            return True
        encrypted = self._encrypted_rooms.get(room_id)
        if encrypted is None:
            response = await client.room_get_state_event(room_id, "m.room.encryption")
            if isinstance(response, RoomGetStateEventResponse):
                encrypted = bool(response.content)
            elif getattr(response, "status_code", None) == "M_NOT_FOUND":
                encrypted = False
            else:
                raise NotHolder(
                    f"cannot tell whether {room_id} is encrypted ({error_text(response)})"
                )
            self._encrypted_rooms[room_id] = encrypted
        return encrypted

    @property
    def encrypting(self) -> bool:
        """The bot reads and writes encrypted rooms (its crypto store is loaded)."""
        return self.client is not None and self.client.olm is not None

    async def _crypto_config(self) -> dict[str, Any]:
        if not self.crypto.enabled:
            logger.warning(
                "matrix: end-to-end encryption is off: %s; encrypted rooms get a notice",
                self.crypto.reason,
            )
            return {"encryption_enabled": False}
        try:
            await asyncio.to_thread(self.crypto_store.prepare)
            return await asyncio.to_thread(self.crypto_store.config)
        except OSError as exc:
            raise PlatformStartError(
                f"Matrix: cannot use the crypto store in {self.crypto_store.directory} ({exc}); "
                "it lives next to DUCKLM_DB."
            ) from exc

    async def _start_crypto(self) -> None:
        """Load the device's crypto store and upload its keys before the first sync,
        so people's clients can encrypt for the bot from the start."""
        client = self.require_client()
        if not self.crypto.enabled:
            return
        if client.olm is None:
            if not self.crypto_store.has_device(self.user_id, self.device_id):
                # A token's device (MATRIX_ACCESS_TOKEN) may be another client's, with
                # keys of its own: new ones under its id confuse everyone's clients.
                logger.warning(
                    "matrix: making new encryption keys for device %s; if that device "
                    "already had keys (a token taken from another client), use "
                    "MATRIX_PASSWORD instead so the bot has a device of its own",
                    self.device_id,
                )
            try:
                client.load_store()
            except Exception as exc:  # vodozemac's PickleException for a wrong key
                raise PlatformStartError(
                    f"Matrix: cannot open the crypto store in {self.crypto_store.directory} "
                    f"({type(exc).__name__}: {exc}). Was MATRIX_STORE_PASSPHRASE changed? "
                    "Set it back, or start over with `ducklm matrix reset-crypto`."
                ) from exc
        self._crypto_loaded.set()
        await asyncio.to_thread(self.crypto_store.protect)
        self.trust.at_start(client)
        await key_maintenance(client)
        logger.info("matrix: end-to-end encryption on (device %s)", self.device_id)
        signer = CrossSigner(
            self.homeserver,
            self.user_id,
            self.crypto_store.directory,
            await asyncio.to_thread(self.crypto_store.pickle_key),
            self.settings.matrix_password,
        )
        try:
            done = await signer.ensure(client.access_token, self.device_id or "")
        except (CrossSigningError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Not fatal: most clients still talk to an uncross-signed device.
            logger.error(
                "matrix: cross-signing the bot's device failed (%s); clients that only "
                "trust cross-signed devices will not share keys with it",
                exc,
            )
        else:
            logger.info("matrix: cross-signing: %s", done)

    async def next_sync(self, within: float) -> None:
        """Returns after the next sync (and its key traffic), or after `within` s."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), within)

    async def _crypto_step(self) -> None:
        """Key traffic after a sync; a failure is logged and tried after the next."""
        client = self.client
        if client is None or client.olm is None:
            return
        try:
            await key_maintenance(client)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # network, or nio refusing a state: never stop syncing
            logger.warning("matrix: key upload/query/claim failed (%s); retrying later", exc)

    async def stop(self) -> None:
        """End every spawned job, give the sync lease back (a standby takes over
        at once instead of after its TTL), then close the client."""
        self.running = False
        self._leasing = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        if self.syncing:
            self.syncing = False
            try:
                await self.shared.release_lease()
            except Exception as exc:  # it expires by itself
                logger.warning("matrix: could not release the sync lease: %s", exc)
        await self._close_client()

    def spawn(self, job: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start a background job that lives at most as long as the connection."""
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def require_client(self) -> AsyncClient:
        if self.client is None:
            raise RuntimeError("the Matrix platform is not started")
        return self.client

    def _check_settings(self) -> None:
        if not self.homeserver:
            raise PlatformStartError(
                "Matrix: MATRIX_HOMESERVER is not set (e.g. https://matrix.example.org)."
            )
        if not self.homeserver.startswith(("http://", "https://")):
            raise PlatformStartError(
                f"Matrix: MATRIX_HOMESERVER={self.homeserver} must start with https:// "
                "(or http:// for a local server)."
            )
        if not re.fullmatch(r"@[^:\s]+:\S+", self.user_id):
            raise PlatformStartError(
                f"Matrix: MATRIX_USER_ID={self.user_id or '(unset)'} must be a full user id "
                "such as @duck:example.org."
            )
        if not (self.settings.matrix_password or self.settings.matrix_access_token):
            raise PlatformStartError(
                "Matrix: set MATRIX_PASSWORD (the bot logs in and keeps its session) or "
                "MATRIX_ACCESS_TOKEN for the bot account."
            )

    async def _close_client(self) -> None:
        client, self.client = self.client, None
        self._crypto_loaded.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), STOP_TIMEOUT)

    # -- login ---------------------------------------------------------------

    async def _login(self) -> None:
        """Token from the environment, else the saved session, else the password."""
        client = self.require_client()
        saved = await self.shared.load_session(self.homeserver)
        device_id = saved.device_id if saved else None
        if (
            self.crypto.enabled
            and saved
            and device_id
            and not self.crypto_store.has_device(self.user_id, device_id)
            and self.settings.matrix_password
            and not self.settings.matrix_access_token
        ):
            # Its keys are on the server, but not here: new keys under the old id
            # would look like an impostor to everyone. A new device starts clean.
            logger.warning(
                "matrix: no crypto store for device %s in %s; logging in as a new device",
                device_id,
                self.crypto_store.directory,
            )
            saved, device_id = None, None
        token = self.settings.matrix_access_token
        if token:
            who = await self._whoami(token, device_id)
            if not isinstance(who, WhoamiResponse):
                raise PlatformStartError(
                    f"Matrix: the homeserver rejected MATRIX_ACCESS_TOKEN for "
                    f"MATRIX_USER_ID={self.user_id} ({error_text(who)}). Create a new token "
                    "or set MATRIX_PASSWORD instead."
                )
            self._check_owner(who.user_id, "MATRIX_ACCESS_TOKEN")
            self.device_id = who.device_id or device_id
            client.device_id = self.device_id or ""
            # The token belongs to the environment; only the device id is ours to keep.
            await self._save_session(Session(self.homeserver, self.user_id, self.device_id))
            return
        if saved and saved.access_token:
            who = await self._whoami(saved.access_token, device_id)
            if isinstance(who, WhoamiResponse):
                self._check_owner(who.user_id, "the saved session")
                self.device_id = who.device_id or device_id
                client.device_id = self.device_id or ""
                self._learned_token(saved.access_token)
                return
            if not is_token_error(who):
                raise PlatformStartError(
                    f"Matrix: MATRIX_HOMESERVER={self.homeserver} did not accept the saved "
                    f"session ({error_text(who)})."
                )
            logger.info("matrix: saved access token expired; logging in again")
        await self._password_login(device_id)

    async def _whoami(self, token: str, device_id: str | None) -> Any:
        client = self.require_client()
        # Not restore_login: with encryption it loads the store, which needs the
        # device id that whoami is about to tell.
        client.user_id, client.device_id, client.access_token = (
            self.user_id,
            device_id or "",
            token,
        )
        return await client.whoami()

    async def _password_login(self, device_id: str | None) -> None:
        client = self.require_client()
        client.access_token = ""
        # Reusing the saved device id keeps one device per bot, not one per restart.
        client.device_id = device_id or ""
        response = await client.login(
            password=self.settings.matrix_password or "", device_name=DEVICE_NAME
        )
        if not isinstance(response, LoginResponse):
            raise PlatformStartError(
                f"Matrix: login as MATRIX_USER_ID={self.user_id} failed "
                f"({error_text(response)}). Check MATRIX_PASSWORD (or set "
                "MATRIX_ACCESS_TOKEN)."
            )
        self._check_owner(response.user_id, "MATRIX_PASSWORD")
        self.device_id = response.device_id
        self._learned_token(response.access_token)
        await self._save_session(
            Session(self.homeserver, self.user_id, response.device_id, response.access_token)
        )

    def _learned_token(self, token: str) -> None:
        if self.on_access_token is not None and token:
            self.on_access_token(token)

    def _check_owner(self, user_id: str, source: str) -> None:
        if user_id != self.user_id:
            raise PlatformStartError(
                f"Matrix: {source} belongs to {user_id}, not MATRIX_USER_ID={self.user_id}."
            )

    async def _save_session(self, session: Session) -> None:
        try:
            await self.shared.save_session(session)
        except (OSError, StoreError) as exc:
            raise PlatformStartError(
                f"Matrix: cannot write the session to {self.state.directory} ({exc}); it "
                "lives next to DUCKLM_DB."
            ) from exc

    async def _load_profile(self) -> None:
        response = await self.require_client().get_displayname(self.user_id)
        if isinstance(response, ProfileGetDisplayNameResponse) and response.displayname:
            self.display_name = response.displayname

    async def _first_sync(self) -> Batch:
        """One sync before `start` returns, so a dead server fails the start."""
        client = self.require_client()
        # The database's position (the last batch any replica handled).
        token, markers = await self.shared.load_sync()
        if token:
            self.last_handled = markers
            # full_state rebuilds the rooms' state; the timeline still starts at
            # the token, so exactly the events we have not handled arrive (and a
            # `limited` room's gap is fetched back to the token).
            response = await client.sync(timeout=0, since=token, full_state=True)
            if isinstance(response, SyncResponse):
                return Batch(response, since=token, resumed=True)
            logger.warning("matrix: saved sync token refused (%s); starting fresh", response)
            self.last_handled = {}
        # No token: everything already in the rooms happened before this start, so
        # it is history (M3). Marking the batch, rather than comparing timestamps
        # with our clock, is immune to clock skew. Ask for little of it.
        response = await client.sync(
            timeout=0, full_state=True, sync_filter={"room": {"timeline": {"limit": 1}}}
        )
        if not isinstance(response, SyncResponse):
            raise PlatformStartError(
                f"Matrix: the first sync with MATRIX_HOMESERVER={self.homeserver} failed "
                f"({error_text(response)})."
            )
        return Batch(response, since=None, history_only=True)

    # -- the sync loop and the dispatcher ----------------------------------------

    async def _supervise(self, what: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Restart a loop that died of a bug instead of going deaf (M1)."""
        failures = 0
        while self.running:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                logger.exception("matrix: %s loop crashed; restarting", what)
                await asyncio.sleep(backoff(failures))

    async def _sync_forever(self) -> None:
        client = self.require_client()
        failures = 0
        while self.running and self.syncing:
            since = client.next_batch or None
            try:
                response = await client.sync(timeout=SYNC_TIMEOUT_MS, since=since)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                # Homeserver restarting, network gone, a proxy's HTML error page.
                failures += 1
                delay = backoff(failures)
                logger.warning("matrix: sync failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            if isinstance(response, SyncResponse):
                failures = 0
                if not self.holds_lease():
                    self._stop_syncing("the sync lease ran out during a sync")
                    return
                self._inbox.put_nowait(Batch(response, since=since))
                await self._crypto_step()
                synced, self._synced = self._synced, asyncio.Event()
                synced.set()
                continue
            failures += 1
            if is_token_error(response):
                if await self._relogin():
                    continue
                delay = backoff(failures, TOKEN_ERROR_BACKOFF)
                logger.error(
                    "matrix: the homeserver no longer accepts the bot's access token; set "
                    "MATRIX_PASSWORD or a new MATRIX_ACCESS_TOKEN (retrying in %.0f s)",
                    delay,
                )
            else:
                delay = backoff(failures)
                logger.warning("matrix: sync error %s; retrying in %.1f s", response, delay)
            # A SyncError is *returned*; without this sleep the loop would spin (M2).
            await asyncio.sleep(delay)

    async def _relogin(self) -> bool:
        if not self.settings.matrix_password:
            return False
        with contextlib.suppress(Exception):
            await self.shared.forget_access_token(self.homeserver)
        try:
            await self._password_login(self.device_id)
        except (PlatformStartError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.error("matrix: logging in again failed: %s", exc)
            return False
        logger.info("matrix: logged in again after the token was revoked")
        return True

    async def _dispatch_forever(self) -> None:
        inbox = self._inbox
        while True:
            batch = await inbox.get()
            if not self.holds_lease():
                # A pause outlived the lease: another replica may handle this
                # stretch already; it is its to handle, from the stored token.
                self._stop_syncing("the sync lease ran out before a batch was handled")
                return
            for attempt in range(1, BATCH_ATTEMPTS + 1):
                self._last_attempt = attempt == BATCH_ATTEMPTS
                try:
                    await self._handle_sync(batch)
                    break
                except NotRecorded as exc:
                    # Handle the whole batch again, later: what was recorded is a
                    # duplicate then, and the token stays where it was meanwhile.
                    if attempt == BATCH_ATTEMPTS:
                        logger.error(
                            "matrix: giving up on a batch (%s); what it carried is lost",
                            exc.__cause__ or exc,
                        )
                        break
                    delay = backoff(attempt, cap=30.0)
                    logger.warning(
                        "matrix: a batch could not be handled (%s); retrying it in %.1f s",
                        exc.__cause__ or exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
            # Only now is the batch handled (every message accepted into the
            # store), so only now may a restart (or the next holder) skip it (M4);
            # the crypto store first, so the next holder's keys are never older
            # than the position it resumes from.
            await self.save_crypto_snapshot()
            try:
                saved = await self.shared.save_sync(batch.response.next_batch, self.last_handled)
            except StoreError:
                logger.exception("matrix: cannot save the sync token")
                continue
            if not saved:
                self._stop_syncing(
                    "the sync lease was lost; the token stays where the new holder is"
                )
                return

    async def _handle_sync(self, batch: Batch) -> None:
        response = batch.response
        for room_id, invite in response.rooms.invite.items():
            if batch.history_only:
                self._no_backlog.add(room_id)  # invited before DuckLM ever ran
            await self._guarded(self._on_invite(room_id, invite.invite_state))
        for room_id in response.rooms.leave:
            self.last_handled.pop(room_id, None)
        for room_id, info in response.rooms.join.items():
            events = [event_source(event) for event in info.timeline.events]
            if batch.history_only:
                self._mark(room_id, events)
                continue
            await self._guarded(self._handle_room(batch, room_id, info.timeline, events))
        if (batch.history_only or batch.resumed) and self._handler is not None:
            # Who may ask can change between runs: look at every room once.
            for room in list(self.require_client().rooms.values()):
                await self._guarded(self._handler.after_batch(room, True))

    async def _handle_room(
        self, batch: Batch, room_id: str, timeline: Any, events: list[dict[str, Any]]
    ) -> None:
        handler = self._handler
        room = self.require_client().rooms.get(room_id)
        if handler is None or room is None:
            return
        joined_at = self._own_join(events)
        backlog: list[dict[str, Any]] = []
        if joined_at is not None:
            # A room just joined replays its history (M3): only what was said
            # since the bot was invited is for it.
            if room.encrypted:
                joined = str(events[joined_at].get("event_id") or "")
                await self._guarded(handler.encrypted_room_notice(room, joined))
            if room_id in self._no_backlog:
                start = joined_at + 1
            else:
                invited_at = self._own_invite(events[:joined_at])
                start = 0 if invited_at is None else invited_at + 1
                if invited_at is None and timeline.limited and timeline.prev_batch:
                    backlog = await self._backlog(room_id, timeline.prev_batch)
                if invited_at is None and not timeline.limited:
                    start = joined_at + 1  # the whole room is here and no invite: history
            self._no_backlog.discard(room_id)
        else:
            start = 0
            if timeline.limited and timeline.prev_batch:
                # More happened than the sync carried: fetch the gap, back to the
                # previous sync (or the last event handled here).
                marker = self.last_handled.get(room_id)
                backlog = await self._backlog(
                    room_id,
                    timeline.prev_batch,
                    until_token=batch.since,
                    stop_ids=(marker,) if marker else (),
                    stop_at_join=room_id in self._no_backlog,
                )
        pending = [(source, True) for source in backlog]
        pending += [(source, batch.resumed or joined_at is not None) for source in events[start:]]
        cutoff = self.bounds.cutoff_ms(now_ms())
        members_changed = False
        for source, from_backlog in pending:
            if from_backlog and timestamp(source) < cutoff:
                continue  # older than DUCKLM_MATRIX_BACKLOG_MAX_AGE: not answered now
            late = from_backlog and is_late(source, self.started_ms)
            members_changed |= source.get("type") == "m.room.member"
            await self._guarded(handler.on_room_event(room, source, late=late))
        self._mark(room_id, events)
        await self._guarded(handler.after_batch(room, members_changed or joined_at is not None))

    async def _backlog(self, room_id: str, prev_batch: str, **stops: Any) -> list[dict[str, Any]]:
        try:
            return await fetch_backlog(
                self.require_client(),
                room_id,
                prev_batch,
                user_id=self.user_id,
                bounds=self.bounds,
                **stops,
            )
        except BacklogError as exc:
            if not self._last_attempt:
                raise NotRecorded(room_id) from exc
            logger.error("matrix: %s; going on without the missed events", exc)
            return []

    def _mark(self, room_id: str, events: list[dict[str, Any]]) -> None:
        """Remember the room's newest event as handled (where a later gap fill stops)."""
        for source in reversed(events):
            if source.get("event_id"):
                self.last_handled.pop(room_id, None)
                self.last_handled[room_id] = str(source["event_id"])
                break
        while len(self.last_handled) > MAX_ROOM_MARKERS:
            self.last_handled.pop(next(iter(self.last_handled)))

    def _own_join(self, events: list[dict[str, Any]]) -> int | None:
        """Index of the bot's own (re)join in this batch, or None."""
        found = None
        for index, source in enumerate(events):
            if (
                is_own_membership(source, self.user_id, "join")
                and _prev_membership(source) != "join"
            ):
                found = index  # a display-name change is no join
        return found

    def _own_invite(self, events: list[dict[str, Any]]) -> int | None:
        found = None
        for index, source in enumerate(events):
            if is_own_membership(source, self.user_id, "invite"):
                found = index
        return found

    @staticmethod
    async def _guarded(call: Coroutine[Any, Any, Any]) -> None:
        """One bad event must not stop the others (nor the dispatcher); a message
        the store did not take stops the batch (it is handled again)."""
        try:
            await call
        except (asyncio.CancelledError, NotRecorded):
            raise
        except Exception:
            logger.exception("matrix: handling an event failed")

    # -- membership ------------------------------------------------------------

    async def _on_invite(self, room_id: str, invite_state: list[Any]) -> None:
        if room_id in self._joining:
            return  # nio repeats the invite in every sync until we have joined
        inviter = None
        for event in invite_state:
            # nio pops `content` out of an invite event's source; read its fields.
            if (
                getattr(event, "state_key", None) == self.user_id
                and getattr(event, "membership", None) == "invite"
            ):
                inviter = getattr(event, "sender", None)
        if not inviter or not self.may_invite(inviter) or not self.serves_room(room_id):
            logger.warning("matrix: declining invite to %s from %s", room_id, inviter)
            self._joining.add(room_id)
            self.spawn(self._decline(room_id))
            return
        self._joining.add(room_id)
        self.spawn(self._join(room_id, inviter))

    async def _join(self, room_id: str, inviter: str | None) -> None:
        try:
            for attempt in range(1, 6):
                try:
                    response = await self.require_client().join(room_id)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    response = exc
                if isinstance(response, JoinResponse):
                    logger.info("matrix: joined %s (invited by %s)", room_id, inviter)
                    return
                logger.warning("matrix: joining %s failed: %s", room_id, response)
                await asyncio.sleep(backoff(attempt))
        finally:
            self._joining.discard(room_id)

    async def _decline(self, room_id: str) -> None:
        try:
            await self.require_client().room_leave(room_id)
        finally:
            self._joining.discard(room_id)


def _prev_membership(source: dict[str, Any]) -> str | None:
    unsigned = source.get("unsigned") or {}
    prev = unsigned.get("prev_content") or source.get("prev_content") or {}
    membership = prev.get("membership") if isinstance(prev, dict) else None
    return membership if isinstance(membership, str) else None
