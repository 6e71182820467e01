"""The crypto store's snapshots for replicas (issue #19) without a homeserver: the
cheap change signature that spares the lease holder a copy of the store on every
renewal, and the standby's cached read of the snapshot's device."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import bot.matrix.state as matrix_state
from bot.matrix.crypto import CryptoStore
from bot.matrix.state import MatrixState, SharedMatrixState
from runtime.store import Stores

USER = "@duck:example.org"


def store_with_database(tmp_path: Path) -> tuple[CryptoStore, Path]:
    store = CryptoStore(tmp_path, "passphrase")
    store.prepare()
    database = store.database(USER, "DEVICE")
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, pickle TEXT)")
        db.execute("INSERT INTO sessions (pickle) VALUES ('one')")
    db.close()
    return store, database


def write(database: Path, pickle: str) -> None:
    db = sqlite3.connect(database)
    try:
        with db:
            db.execute("UPDATE sessions SET pickle = ?", (pickle,))
    finally:
        db.close()


def test_the_signature_changes_with_a_write_and_only_then(tmp_path: Path) -> None:
    store, database = store_with_database(tmp_path)
    before = store.signature()
    assert store.signature() == before
    store.set_marker(7)  # the marker is not part of the store's contents
    assert store.signature() == before

    write(database, "two")
    assert store.signature() != before

    # A trust file nio writes by rename, even with the same size and mtime.
    trust = store.directory / f"{USER}_DEVICE.known_devices"
    trust.write_text("a\n")
    first = store.signature()
    stat = trust.stat()
    replacement = store.directory / ".tmp"
    replacement.write_text("b\n")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, trust)
    assert store.signature() != first


def test_a_write_within_one_timestamp_tick_still_changes_the_signature(
    tmp_path: Path,
) -> None:
    """Same size, same mtime (a coarse filesystem clock): SQLite's change counter
    in the header still tells the write."""
    store, database = store_with_database(tmp_path)
    stat = database.stat()
    before = store.signature()
    write(database, "owt")  # as long as "one": no new page
    os.utime(database, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert database.stat().st_size == stat.st_size
    assert store.signature() != before


def test_no_snapshot_is_taken_while_nothing_was_written_since_the_last_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, database = store_with_database(tmp_path)
    copies = 0
    snapshot = store.snapshot

    def counted() -> tuple[bytes, str]:
        nonlocal copies
        copies += 1
        return snapshot()

    monkeypatch.setattr(store, "snapshot", counted)

    found = store.changed_snapshot()
    assert found is not None and copies == 1
    blob, digest, signature = found
    # Not saved yet (say the lease was lost): the next call copies again.
    assert store.changed_snapshot() is not None and copies == 2
    store.saved(digest, signature)
    assert store.changed_snapshot() is None
    assert store.changed_snapshot() is None
    assert copies == 2

    write(database, "two")
    found = store.changed_snapshot()
    assert found is not None and copies == 3
    store.saved(found[1], found[2])
    assert store.changed_snapshot() is None

    # Restoring a snapshot replaces the files: the next save copies again.
    store.restore(blob, 3)
    assert store.changed_snapshot() is not None and copies == 4


def test_a_write_during_the_copy_is_copied_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signature is taken before the copy: one taken after it would cover
    a write the copy missed."""
    store, database = store_with_database(tmp_path)
    snapshot = store.snapshot

    def write_then_copy() -> tuple[bytes, str]:
        copied = snapshot()
        write(database, "written during the copy")
        return copied

    monkeypatch.setattr(store, "snapshot", write_then_copy)
    found = store.changed_snapshot()
    assert found is not None
    store.saved(found[1], found[2])
    monkeypatch.setattr(store, "snapshot", snapshot)
    later = store.changed_snapshot()
    assert later is not None and later[1] != found[1]


# -- the standby's read of the snapshot's device -----------------------------------


def shared(stores: Stores, tmp_path: Path, holder: str) -> SharedMatrixState:
    return SharedMatrixState(stores.state, stores.leases, MatrixState(tmp_path), USER, holder)


@pytest.mark.backends("sqlite", "postgres")
async def test_crypto_device_decodes_a_snapshot_only_when_it_changed(
    stores: Stores, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = shared(stores, tmp_path, "holder")
    standby = shared(stores, tmp_path, "standby")
    decoded = 0
    crypto_from = matrix_state._crypto_from

    def counted(found: Any) -> Any:
        nonlocal decoded
        decoded += 1
        return crypto_from(found)

    monkeypatch.setattr(matrix_state, "_crypto_from", counted)
    # The snapshot's row (megabytes in real life) is read only when it changed;
    # otherwise only its stamp is.
    reads = 0
    get = stores.state.get

    async def counted_get(key: str) -> Any:
        nonlocal reads
        reads += 1
        return await get(key)

    monkeypatch.setattr(stores.state, "get", counted_get)

    assert await standby.crypto_device() is None
    assert await holder.take_lease(60) is not None
    assert await holder.save_crypto("DEVICE1", b"x" * 100_000) is not None
    assert await standby.crypto_device() == "DEVICE1"
    assert decoded == 1
    read = reads
    for _ in range(3):
        assert await standby.crypto_device() == "DEVICE1"
    assert decoded == 1
    assert reads == read

    assert await holder.save_crypto("DEVICE2", b"y") is not None
    assert await standby.crypto_device() == "DEVICE2"
    assert decoded == 2

    assert await holder.forget_crypto()
    assert await standby.crypto_device() is None
    assert await holder.save_crypto("DEVICE3", b"z") == 1
    assert await standby.crypto_device() == "DEVICE3"

    # Deleted and saved again between two reads: the same version, a new snapshot.
    assert await holder.forget_crypto()
    assert await holder.save_crypto("DEVICE4", b"z") == 1
    assert await standby.crypto_device() == "DEVICE4"
