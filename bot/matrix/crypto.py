"""End-to-end encryption for the Matrix bot: whether it is on, where its keys live,
and the key traffic a sync leaves to do.

    <db-stem>-matrix/crypto/          0700; nio's crypto store for the bot's device:
        <user>_<device>.db            Olm account, Olm/Megolm sessions (0600; the
                                      pickles are encrypted with the pickle key)
        <user>_<device>.*_devices     the trust files nio keeps beside it (0600)
        pickle.key                    a random pickle key, made at first start when
                                      MATRIX_STORE_PASSPHRASE is not set (0600)

The crypto itself is matrix-nio's `e2e` extra, which runs on vodozemac (the
maintained Rust implementation of Olm and Megolm, shipped as prebuilt wheels; no
libolm). This module writes no cryptography of its own.

The device id is the crypto identity: a store belongs to one device. So a device
id without its store is never reused (its old keys are on the server and new ones
would look like an impostor to every client): the bot logs in as a new device.

Several replicas (issue #19) share one device, and the store follows the Matrix
sync lease: the holder puts a snapshot of this directory into the database after
each handled batch that changed it (before that batch's sync token, so a
snapshot is never older than the position it goes with), and a replica taking
the lease over restores it first (`snapshot`, `restore`). The holder also asks
on every lease renewal; the files' signature (`signature`: a stat of each, and
SQLite's change counter) spares it the copy while nothing was written since its
last save (`changed_snapshot`, `saved`). The snapshot holds
pickle.key too (replicas must share it); set MATRIX_STORE_PASSPHRASE to keep the
key out of the database. What the holder did after its last snapshot (a room key
shared for a message it sent, one-time keys uploaded) is lost with it; people's
clients recover from that as from any new session (a new room key, a key request).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import secrets
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.matrix.state import atomic_write

if TYPE_CHECKING:
    from nio import AsyncClient

    from runtime.settings import Settings

logger = logging.getLogger("ducklm.matrix")

CRYPTO_DIR = "crypto"
PICKLE_KEY_FILE = "pickle.key"
# The shared_state version of the snapshot this directory was restored from or
# saved as: equal to the database's, the local store is that one (or newer).
SNAPSHOT_MARKER = "snapshot.version"
_SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")
# Where SQLite keeps a database file's change counter, bumped by every commit
# (rollback-journal mode, nio's): a write within one tick of the filesystem's
# timestamps still changes a signature.
_CHANGE_COUNTER = slice(24, 28)

# Per file: name, inode, size, mtime (ns) and a database's change counter.
Signature = tuple[tuple[str, int, int, int, bytes], ...]


@dataclass(frozen=True)
class CryptoStatus:
    """Whether the bot can encrypt, and if not, why (said once at start)."""

    enabled: bool
    reason: str


def crypto_status(settings: Settings) -> CryptoStatus:
    """On when vodozemac loads through nio, unless DUCKLM_MATRIX_ENCRYPTION is off."""
    if not settings.matrix_encryption:
        return CryptoStatus(False, "DUCKLM_MATRIX_ENCRYPTION is off")
    try:
        import vodozemac  # noqa: F401  (the Rust core; nio checks for it by name)
        from nio.crypto import ENCRYPTION_ENABLED
    except Exception as exc:  # an ImportError, or a wheel that does not load here
        return CryptoStatus(
            False,
            f"vodozemac cannot be loaded ({type(exc).__name__}: {exc}); install matrix-nio[e2e]",
        )
    if not ENCRYPTION_ENABLED:
        return CryptoStatus(False, "matrix-nio was installed without its e2e extra")
    return CryptoStatus(True, "on (matrix-nio e2e with vodozemac)")


class CryptoStore:
    """The crypto store directory beside the bot's other Matrix files."""

    def __init__(self, state_dir: Path, passphrase: str | None) -> None:
        self.directory = Path(state_dir) / CRYPTO_DIR
        self._passphrase = passphrase or None
        # The digest of the snapshot last saved, and the files' signature when it
        # was taken (`saved`); both forgotten by `restore`.
        self._saved_digest: str | None = None
        self._saved: Signature | None = None

    def prepare(self) -> None:
        """The directory exists with mode 0700 (nio creates files in it)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def pickle_key(self) -> str:
        """MATRIX_STORE_PASSPHRASE, or a random key kept in pickle.key (0600)."""
        if self._passphrase:
            return self._passphrase
        path = self.directory / PICKLE_KEY_FILE
        with contextlib.suppress(FileNotFoundError):
            key = path.read_text(encoding="utf-8").strip()
            if key:
                return key
        key = secrets.token_urlsafe(32)
        atomic_write(path, key + "\n")
        return key

    def database(self, user_id: str, device_id: str) -> Path:
        """nio's file name for a device's store (DefaultStore's default)."""
        return self.directory / f"{user_id}_{device_id}.db"

    def has_device(self, user_id: str, device_id: str | None) -> bool:
        return bool(device_id) and self.database(user_id, str(device_id)).exists()

    def protect(self) -> None:
        """Files nio (sqlite) created with the process umask become 0600."""
        for path in self.directory.iterdir():
            if path.is_file():
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o600)

    # -- snapshots for replicas (issue #19) ----------------------------------------

    def signature(self) -> Signature:
        """What the files look like, without copying them: equal signatures
        mean nothing was written in between (nio writes the trust files by
        rename, a new inode each time; SQLite's journal comes and goes)."""
        entries = []
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name == SNAPSHOT_MARKER or name.startswith(".") or name.endswith("-shm"):
                continue
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile: not in it
                info = path.stat()
                counter = b""
                if name.endswith(".db"):
                    with path.open("rb") as handle:
                        counter = handle.read(_CHANGE_COUNTER.stop)[_CHANGE_COUNTER]
                entries.append((name, info.st_ino, info.st_size, info.st_mtime_ns, counter))
        return tuple(entries)

    def changed_snapshot(self) -> tuple[bytes, str, Signature] | None:
        """`snapshot` and the signature it was taken at, or None when it is the
        snapshot last `saved`: the files are as they were for it (the lease
        holder asks every second; most times nothing changed), or were written
        back to the same contents. The signature is taken before the copy, so a
        write during the copy makes the next call copy again."""
        signature = self.signature()
        if signature == self._saved:
            return None
        blob, digest = self.snapshot()
        if digest == self._saved_digest:
            self._saved = signature  # written, but to the contents saved already
            return None
        return blob, digest, signature

    def saved(self, digest: str, signature: Signature) -> None:
        """The snapshot of `digest`, taken at `signature`, is the database's now."""
        self._saved_digest, self._saved = digest, signature

    def snapshot(self) -> tuple[bytes, str]:
        """The directory as a gzip'd tar, and a digest of its contents (equal
        digests: nothing changed). SQLite files are copied with SQLite's backup
        API, consistent even while nio writes to them."""
        files: list[tuple[str, bytes]] = []
        with tempfile.TemporaryDirectory() as scratch:
            for path in sorted(self.directory.iterdir()):
                name = path.name
                if (
                    not path.is_file()
                    or name == SNAPSHOT_MARKER
                    or name.startswith(".")
                    or name.endswith(_SQLITE_SIDE_FILES)
                ):
                    continue
                if name.endswith(".db"):
                    copy = Path(scratch) / name
                    source = sqlite3.connect(path)
                    target = sqlite3.connect(copy)
                    try:
                        source.backup(target)
                    finally:
                        target.close()
                        source.close()
                    files.append((name, copy.read_bytes()))
                else:
                    files.append((name, path.read_bytes()))
        digest = hashlib.sha256()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, data in files:
                digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o600
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue(), digest.hexdigest()

    def restore(self, blob: bytes, version: int) -> None:
        """Replace the directory's files by the snapshot's (each atomically, 0600)."""
        # The files are another holder's now: the next save copies.
        self._saved_digest, self._saved = None, None
        self.prepare()
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                # Plain files directly in the directory, nothing else (a damaged
                # or hostile snapshot must not write elsewhere).
                if not member.isfile() or "/" in name or name in ("", ".", ".."):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                atomic_write(self.directory / name, handle.read())
                for side in _SQLITE_SIDE_FILES:
                    with contextlib.suppress(FileNotFoundError):
                        (self.directory / (name + side)).unlink()
        self.set_marker(version)

    def marker(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self.directory / SNAPSHOT_MARKER).read_text(encoding="utf-8").strip())
        return None

    def set_marker(self, version: int) -> None:
        atomic_write(self.directory / SNAPSHOT_MARKER, f"{version}\n")

    def config(self) -> dict[str, Any]:
        """nio AsyncClientConfig fields for an encrypting client."""
        from nio.store import DefaultStore

        return {
            "encryption_enabled": True,
            "store": DefaultStore,
            "pickle_key": self.pickle_key(),
            # The bot saves its sync token itself, after handling a batch.
            "store_sync_tokens": False,
        }


async def key_maintenance(client: AsyncClient) -> None:
    """What nio's sync_forever does between syncs, which our own loop must do:
    upload one-time keys, query changed device lists, claim keys for new Olm
    sessions, and send queued to-device messages (key shares, key requests)."""
    if client.olm is None:
        return
    if client.should_upload_keys:
        await client.keys_upload()
    if client.should_query_keys:
        response = await client.keys_query()
        # Trust on first use: every device the homeserver lists gets keys, so a
        # change of someone's devices is worth a line in the log.
        for user, devices in (getattr(response, "changed", None) or {}).items():
            if user != client.user_id:
                logger.info(
                    "matrix: device list of %s changed (%s)", user, ", ".join(sorted(devices))
                )
    if client.should_claim_keys:
        users = client.get_users_for_key_claiming()
        if users:
            await client.keys_claim(users)
    await client.send_to_device_messages()


# Added to the source of an event nio decrypted, for the audit (never sent anywhere).
DECRYPTED = "ducklm.decrypted"


def event_source(event: Any) -> dict[str, Any]:
    """The event as the handlers read it; a decrypted one is marked with who
    encrypted it (the sender's Curve25519 key, so the device can be named)."""
    source: dict[str, Any] = getattr(event, "source", None) or {}
    if getattr(event, "decrypted", False):
        source = {
            **source,
            DECRYPTED: {
                "sender_key": getattr(event, "sender_key", None),
                "session_id": getattr(event, "session_id", None),
                "verified": bool(getattr(event, "verified", False)),
            },
        }
    return source


def sender_device(client: AsyncClient, user_id: str, sender_key: str | None) -> str | None:
    """The device of `user_id` whose identity key is `sender_key`, if known."""
    if client.olm is None or not sender_key:
        return None
    for device in client.device_store.active_user_devices(user_id):
        if device.curve25519 == sender_key:
            return str(device.id)
    return None
