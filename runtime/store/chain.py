"""The audit chain's hash: one function, shared by SQLite (as the SQL function
`ducklm_chain`, registered on every connection) and by the verifier.

Each event's hash is SHA-256 over the previous event's hash (of the same task)
and the event's canonical JSON, so editing, deleting or reordering a stored
event breaks every hash after it. The canonical JSON is the event as a JSON
object with sorted keys and no spaces, the payload parsed (not its stored
text), so anyone can recompute it from an export with any JSON library:

    {"created_at":1764639420.123,"event_type":"...","payload":{...},"seq":3,"task_id":"t-1"}

The first event of a chain has the previous hash GENESIS.

This module imports nothing from the store: db.py registers it on connect.
PostgreSQL cannot call Python from SQL, so there the store computes the same
hashes in Python (runtime/store/events.py), holding the chain's advisory lock
(`chain_lock_key`) for the transaction that reads the head and appends.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64
SQL_FUNCTION = "ducklm_chain"


def chain_lock_key(task_id: str | None) -> int:
    """The PostgreSQL advisory-lock key of a task's chain (None: the global one),
    a signed 64-bit number. Two chains sharing a key only wait for each other."""
    name = b"\x00global" if task_id is None else task_id.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(name).digest()[:8], "big", signed=True)


def canonical_event(
    task_id: str | None, seq: int, event_type: str, payload: Any, created_at: float
) -> str:
    """The event as the chain hashes it (payload already parsed)."""
    return json.dumps(
        {
            "created_at": float(created_at),
            "event_type": event_type,
            "payload": payload,
            "seq": int(seq),
            "task_id": task_id,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def link(previous: str | None, canonical: str) -> str:
    """The hash of an event whose canonical JSON is `canonical`, after `previous`."""
    digest = hashlib.sha256()
    digest.update((previous or GENESIS).encode("ascii"))
    digest.update(canonical.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def event_hash(
    previous: str | None,
    task_id: str | None,
    seq: int,
    event_type: str,
    payload_text: str,
    created_at: float,
) -> str:
    """The SQL function: the hash of a stored event (its payload as stored text)."""
    try:
        payload = json.loads(payload_text)
    except (TypeError, ValueError):
        # Not JSON (a hand edit): hashed as the text itself, so verify reports it.
        payload = payload_text
    return link(previous, canonical_event(task_id, seq, event_type, payload, created_at))
